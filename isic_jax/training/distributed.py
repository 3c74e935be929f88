"""Multi-process start-up on JAX's own distributed runtime (SLURM, Open MPI, Cloud TPU, Kubernetes).

    info = maybe_initialize(None, None, None)              # detect a cluster, else one process
    info = maybe_initialize("10.0.0.1:1234", 4, rank)      # explicit: all three or none

Must run before anything touches a JAX backend (`jax.devices()`, a computation, ...). What it does,
in order:

1. Explicit `coordinator_address`, `num_processes`, `process_id`: validated, then
   `jax.distributed.initialize(address, n, i, cluster_detection_method="deactivate")`, so JAX's
   cluster detection cannot override them (nor pin the process to one GPU under SLURM). Process 0
   first checks that the coordinator port is free on this host and fails fast otherwise.
2. Otherwise, a cluster found the way `jax.distributed.initialize()` finds one (the `ClusterEnv`
   subclasses of `jax._src.clusters`, in JAX's order: Open MPI, SLURM, Cloud TPU (GKE, GCE),
   Kubernetes; mpi4py only on request), with two guards against false positives:
   - a cluster that reports a single process is ignored (an interactive `srun --pty bash`, a
     one-task SLURM step, a single-host TPU VM): the run is one ordinary process;
   - Kubernetes counts only in an indexed Job (`JOB_COMPLETION_INDEX` set), which JAX requires
     anyway; any other pod (a notebook, a CI runner) is not a cluster.
   Then `jax.distributed.initialize()` runs with JAX's own detection, with one exception: under
   SLURM or Open MPI with ONE process per node, JAX would make only GPU `SLURM_LOCALID` (= 0)
   visible to the process; there the detected values are passed explicitly with detection
   deactivated, so the process drives all GPUs of its node. `JAX_LOCAL_DEVICE_IDS`,
   `JAX_COORDINATOR_ADDRESS` and `JAX_COORDINATOR_PORT` keep their JAX meaning.
3. Otherwise (or with `cluster="none"`): a single process; nothing is called.

A process that cannot reach the coordinator within `initialization_timeout` seconds is aborted by
JAX itself (`DEADLINE_EXCEEDED ... RegisterTask`, SIGABRT); the line logged before connecting says
which address it waited for.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import socket
import sys
from typing import Any

from absl import flags

logger = logging.getLogger(__name__)

# JAX's cluster names (`ClusterEnv.name`; Kubernetes has none in JAX, "k8s" here).
CLUSTERS = ("ompi", "slurm", "mpi4py", "gketpu", "gcetpu", "k8s")
CLUSTER_CHOICES = ("auto", "none", *CLUSTERS)
DEFAULT_INITIALIZATION_TIMEOUT = 300  # JAX's default: pods and nodes may start minutes apart


class DistributedError(ValueError):
    """Bad distributed flags or a coordinator that cannot start; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class DistributedInfo:
    """How this process joined the run.

    Attributes:
      source: "single" (nothing initialised), "flags" (explicit flags) or the cluster found
        ("slurm", "ompi", "gcetpu", "gketpu", "k8s", "mpi4py"); "external" when the caller had
        already called `jax.distributed.initialize` itself.
      process_id: this process's index in [0, num_processes).
      num_processes: processes in the run.
      coordinator_address: "host:port" of process 0's coordinator; None for a single process.
    """

    source: str = "single"
    process_id: int = 0
    num_processes: int = 1
    coordinator_address: str | None = None

    @property
    def initialized(self) -> bool:
        """Whether `jax.distributed.initialize` was called."""
        return self.source != "single"


# ---------------------------------------------------------------------------------------------
# Flags.


@dataclasses.dataclass(frozen=True)
class DistributedFlags:
    """The absl flags of `define_flags`; `maybe_initialize()` reads them after parsing."""

    coordinator_address: flags.FlagHolder
    num_processes: flags.FlagHolder
    process_id: flags.FlagHolder
    cluster: flags.FlagHolder

    def maybe_initialize(self, **kwargs: Any) -> DistributedInfo:
        """`maybe_initialize` with the parsed flag values (kwargs: initialization_timeout)."""
        return maybe_initialize(
            self.coordinator_address.value,
            self.num_processes.value,
            self.process_id.value,
            cluster=self.cluster.value,
            **kwargs,
        )


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> DistributedFlags:
    """Defines --coordinator_address, --num_processes, --process_id and --cluster_detection."""
    return DistributedFlags(
        coordinator_address=flags.DEFINE_string(
            "coordinator_address", None,
            "host:port of process 0's JAX coordinator, reachable from every process (multi-process "
            "runs without a cluster JAX detects; needs --num_processes and --process_id).",
            flag_values=flag_values,
        ),
        num_processes=flags.DEFINE_integer(
            "num_processes", None, "Number of processes in the run (with --coordinator_address).",
            lower_bound=1, flag_values=flag_values,
        ),
        process_id=flags.DEFINE_integer(
            "process_id", None,
            "This process's index, 0..num_processes-1; 0 runs the coordinator.",
            lower_bound=0, flag_values=flag_values,
        ),
        cluster=flags.DEFINE_enum(
            "cluster_detection", "auto", list(CLUSTER_CHOICES),
            "auto: join a multi-process cluster JAX detects (SLURM, Open MPI, Cloud TPU, "
            "Kubernetes indexed Job), else run one process; none: always one process; a name: "
            "that cluster only (mpi4py must be named).",
            flag_values=flag_values,
        ),
    )


# ---------------------------------------------------------------------------------------------
# Entry point.


def maybe_initialize(
    coordinator_address: str | None,
    num_processes: int | None,
    process_id: int | None,
    *,
    cluster: str = "auto",
    initialization_timeout: int = DEFAULT_INITIALIZATION_TIMEOUT,
) -> DistributedInfo:
    """Joins a multi-process run when asked to or when in a cluster; see the module docstring.

    Args:
      coordinator_address, num_processes, process_id: explicit setup; all three or none.
      cluster: "auto", "none" or one of CLUSTERS (that cluster must be present).
      initialization_timeout: seconds to wait for all processes to connect.

    Returns:
      DistributedInfo. Calling it again after a successful initialisation returns the same.

    Raises:
      DistributedError: incomplete or invalid flags, a coordinator port in use on this host, an
        unknown or absent named cluster.
    """
    if cluster not in CLUSTER_CHOICES:
        raise DistributedError(
            f"--cluster_detection={cluster!r}: use one of {', '.join(CLUSTER_CHOICES)}."
        )
    current = _current_info()
    if current is not None:
        return current  # already initialised (by an earlier call, or by the caller itself)
    explicit = (coordinator_address, num_processes, process_id)
    if any(v is not None for v in explicit):
        host, port = validate_flags(coordinator_address, num_processes, process_id)
        assert num_processes is not None and process_id is not None  # validated
        if process_id == 0:
            check_coordinator_port(host, port, hint="--coordinator_address")
        address = str(coordinator_address)
        _initialize(address, num_processes, process_id, initialization_timeout,
                    source="flags", hint="--coordinator_address")
        return _remember(DistributedInfo("flags", process_id, num_processes, address))
    if cluster == "none":
        return DistributedInfo()

    env = _detect_cluster(cluster)
    if env is None:
        return DistributedInfo()
    name = _cluster_name(env)
    n = int(env.get_process_count())
    if n <= 1 and cluster == "auto":
        logger.info("%s environment with one process: running as a single process.", name)
        return DistributedInfo()

    if name in ("slurm", "ompi") and _one_process_per_node(name) and (
        "JAX_LOCAL_DEVICE_IDS" not in os.environ
    ):
        # JAX would restrict this process to GPU <local rank>; pass everything explicitly instead
        # so that the single process of this node drives all of its GPUs.
        address = os.environ.get("JAX_COORDINATOR_ADDRESS") or env.get_coordinator_address(
            timeout_secs=initialization_timeout,
            override_coordinator_port=os.environ.get("JAX_COORDINATOR_PORT"),
        )
        pid = int(env.get_process_id())
        hint = ("JAX_COORDINATOR_ADDRESS" if os.environ.get("JAX_COORDINATOR_ADDRESS")
                else "JAX_COORDINATOR_PORT")
        if pid == 0:
            host, port = parse_address(address, "the coordinator address")
            check_coordinator_port(host, port, hint=hint)
        _initialize(address, n, pid, initialization_timeout, source=name, hint=hint)
        return _remember(DistributedInfo(name, pid, n, address))

    print(f"isic-jax: {name} cluster detected ({n} processes); joining it through "
          f"jax.distributed.initialize() (waits up to {initialization_timeout} s for all "
          f"processes; --cluster_detection=none runs a single process).",
          file=sys.stderr, flush=True)
    import jax

    # Kubernetes has no name in JAX: let JAX pick it itself (it is the last one it tries).
    method = env.name if getattr(env, "name", "") else None
    _call_jax(lambda: jax.distributed.initialize(
        cluster_detection_method=method, initialization_timeout=initialization_timeout,
    ), address=None, hint="JAX_COORDINATOR_PORT")
    state = _jax_state()
    return _remember(DistributedInfo(
        name, int(state.process_id), int(state.num_processes), state.coordinator_address
    ))


# ---------------------------------------------------------------------------------------------
# Validation.


def parse_address(address: str, what: str = "--coordinator_address") -> tuple[str, int]:
    """"host:port" or "[v6addr]:port" -> (host without brackets, port)."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not host:
        raise DistributedError(
            f"{what}={address!r} must be HOST:PORT, e.g. 10.0.0.1:1234 (the address of the "
            f"host running process 0)."
        )
    try:
        port = int(port_text)
    except ValueError:
        port = -1
    if not 0 < port < 65536:
        raise DistributedError(f"{what}={address!r}: the port must be a number in 1..65535.")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, port


def validate_flags(
    coordinator_address: str | None, num_processes: int | None, process_id: int | None
) -> tuple[str, int]:
    """Checks the explicit flags together; returns the coordinator's (host, port)."""
    given = {
        "--coordinator_address": coordinator_address,
        "--num_processes": num_processes,
        "--process_id": process_id,
    }
    missing = [k for k, v in given.items() if v is None]
    if missing:
        raise DistributedError(
            f"{', '.join(missing)} missing: a multi-process run without a cluster JAX detects "
            f"needs all of --coordinator_address=HOST:PORT --num_processes=N --process_id=I "
            f"(the same address and N on every process, I = 0..N-1); give none of them for a "
            f"single process."
        )
    assert num_processes is not None and process_id is not None and coordinator_address
    if num_processes < 1:
        raise DistributedError(f"--num_processes={num_processes}: must be at least 1.")
    if not 0 <= process_id < num_processes:
        raise DistributedError(
            f"--process_id={process_id}: must be in 0..{num_processes - 1} "
            f"(--num_processes={num_processes})."
        )
    return parse_address(coordinator_address)


def check_coordinator_port(host: str, port: int, hint: str = "--coordinator_address") -> None:
    """Process 0: fails fast when the coordinator's port cannot be bound on this host.

    JAX's coordinator listens on [::]:port with SO_REUSEPORT, so a second run on the same port
    would not fail: its processes would join the first run's coordinator and hang until the
    timeout. Binding without SO_REUSEPORT here detects any listener on that port.

    Raises:
      DistributedError: the port is in use (or not bindable); the message says what to do.
    """
    if not _is_local_host(host):
        logger.warning(
            "Process 0 runs the coordinator, but %s does not resolve to this host; the other "
            "processes may not find it.", host,
        )
        return
    error = _bind_error(port)
    if error is None:
        return
    reason = ("already in use" if error.errno == errno.EADDRINUSE
              else f"not available ({error.strerror})")
    raise DistributedError(
        f"coordinator port {port} on {host} is {reason}: another run (or program) holds it. "
        f"Stop it, or {_fix(hint, host)}."
    )


def _fix(hint: str, host: str | None) -> str:
    """How to move the coordinator to another port, for the setting named by `hint`."""
    where = _join(host, "OTHERPORT") if host else "HOST:OTHERPORT"
    if hint == "--coordinator_address":
        return f"pass --coordinator_address={where} with a free port (the same on every process)"
    if hint == "JAX_COORDINATOR_ADDRESS":
        return f"export JAX_COORDINATOR_ADDRESS={where} (a free port) for every process"
    return "export JAX_COORDINATOR_PORT=OTHERPORT (a free port) for every process"


# ---------------------------------------------------------------------------------------------
# Internals.


def _join(host: str, port: Any) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _is_local_host(host: str) -> bool:
    """Whether `host` names an address of this machine (it can be bound)."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except socket.gaierror:
        return False
    for family, _, _, _, sockaddr in infos:
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.bind((sockaddr[0], 0))
            return True
        except OSError:
            continue
    return False


def _bind_error(port: int) -> OSError | None:
    """Tries to bind `port` on all addresses as JAX's coordinator does ([::], else 0.0.0.0)."""
    # SO_REUSEADDR like gRPC, so that a port in TIME_WAIT after a previous run counts as free.
    attempts = []
    if socket.has_ipv6:
        attempts.append((socket.AF_INET6, "::"))
    attempts.append((socket.AF_INET, "0.0.0.0"))
    for family, any_addr in attempts:
        try:
            s = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            continue  # no IPv6 on this host
        with s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            try:
                s.bind((any_addr, port))
            except OSError as e:
                if e.errno == errno.EAFNOSUPPORT or e.errno == errno.EADDRNOTAVAIL:
                    continue
                return e
            return None
    return None


def _cluster_types() -> list[type]:
    from jax._src import clusters  # JAX's own cluster detection (what initialize() uses)

    return list(clusters.ClusterEnv._cluster_types)


def _cluster_name(env: type) -> str:
    return getattr(env, "name", "") or ("k8s" if "K8s" in env.__name__ else env.__name__)


def _detect_cluster(cluster: str) -> type | None:
    """The first cluster environment present, in JAX's order (None: none)."""
    for env in _cluster_types():
        name = _cluster_name(env)
        if name not in CLUSTERS:
            continue  # abstract bases (BaseTpuCluster)
        if cluster == "auto" and env.opt_in_only_method:
            continue
        if cluster not in ("auto", name):
            continue
        # Not an indexed Job: JAX's Kubernetes support cannot work (and its check would query
        # the API server, or warn that the `kubernetes` package is missing, in any pod).
        if name == "k8s" and "JOB_COMPLETION_INDEX" not in os.environ:
            present = False
        else:
            present = bool(env.is_env_present())
        if present:
            return env
        if cluster != "auto":
            needs = (" (it needs an indexed Job and the `kubernetes` package)"
                     if name == "k8s" else "")
            raise DistributedError(
                f"--cluster_detection={cluster}: JAX does not detect a {cluster} environment in "
                f"this process{needs}. Use --cluster_detection=auto, or the explicit "
                f"--coordinator_address --num_processes --process_id flags."
            )
    return None


def _one_process_per_node(name: str) -> bool:
    if name == "ompi":
        return os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE") == "1"
    # SLURM: as many tasks as nodes in this step (every node of a step runs at least one task).
    tasks, nodes = os.environ.get("SLURM_STEP_NUM_TASKS"), os.environ.get("SLURM_STEP_NUM_NODES")
    if tasks is not None and nodes is not None:
        return tasks == nodes
    return os.environ.get("SLURM_NTASKS_PER_NODE") == "1" or (
        os.environ.get("SLURM_NTASKS") is not None
        and os.environ.get("SLURM_NTASKS") == os.environ.get("SLURM_NNODES")
    )


def _initialize(address: str, n: int, pid: int, timeout: int, *, source: str, hint: str) -> None:
    print(f"isic-jax: process {pid} of {n} ({source}) connecting to the JAX coordinator at "
          f"{address} (waits up to {timeout} s for all {n} processes; a DEADLINE_EXCEEDED abort "
          f"means process 0 did not start or {address} is unreachable from here).",
          file=sys.stderr, flush=True)
    import jax

    _call_jax(lambda: jax.distributed.initialize(
        address, n, pid, cluster_detection_method="deactivate", initialization_timeout=timeout,
    ), address=address, hint=hint)


def _call_jax(fn: Any, *, address: str | None, hint: str) -> None:
    try:
        fn()
    except Exception as e:  # jax raises its own JaxRuntimeError (XlaRuntimeError before)
        if "Failed to start RPC server" in str(e):
            host = parse_address(address)[0] if address else None
            where = f" ({address})" if address else ""
            raise DistributedError(
                f"the JAX coordinator could not listen on its port{where}: it is in use. Stop the "
                f"other run, or {_fix(hint, host)}."
            ) from e
        raise


_LAST: list[DistributedInfo] = []  # what this module initialised in this process


def _remember(info: DistributedInfo) -> DistributedInfo:
    _LAST[:] = [info]
    return info


def _jax_state() -> Any:
    from jax._src import distributed as jax_distributed

    return jax_distributed.global_state


def _current_info() -> DistributedInfo | None:
    """An earlier successful initialisation in this process (source "external" when it was not
    done here), else None."""
    state = _jax_state()
    if state.client is None:
        return None
    if _LAST:
        return _LAST[0]
    return DistributedInfo(
        "external", int(state.process_id), int(state.num_processes), state.coordinator_address
    )
