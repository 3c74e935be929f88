"""isic_jax.training.distributed: flag validation, cluster detection, the port check, a real
two-process run, and the launch recipes in scripts/launch.

Only `test_two_processes_psum_and_preemption` starts JAX's distributed runtime (two subprocesses on
this machine, bounded by a timeout: a lost peer makes JAX wait, then abort). The other tests replace
`jax.distributed.initialize` with a recorder.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import pytest
from absl import flags

from isic_jax.training import distributed
from isic_jax.training.distributed import DistributedError

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / "scripts" / "launch"

# Variables through which a cluster could be detected on the machine running the tests.
_CLUSTER_VARS = ("SLURM_", "OMPI_", "PMI_", "KUBERNETES_", "JOB_COMPLETION_INDEX", "TPU_",
                 "JAX_COORDINATOR", "JAX_LOCAL_DEVICE_IDS", "MEGASCALE")


@pytest.fixture
def clean_env(monkeypatch):
    for key in list(os.environ):
        if key.startswith(_CLUSTER_VARS):
            monkeypatch.delenv(key)
    return monkeypatch


@pytest.fixture
def calls(clean_env):
    """Records jax.distributed.initialize calls instead of making them."""
    recorded: list[tuple[tuple, dict]] = []
    clean_env.setattr(jax.distributed, "initialize", lambda *a, **k: recorded.append((a, k)))
    return recorded


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (("127.0.0.1:1234", None, None), "--num_processes, --process_id missing"),
        ((None, 2, 0), "--coordinator_address missing"),
        (("127.0.0.1:1234", 2, 2), "--process_id=2: must be in 0..1"),
        (("127.0.0.1:1234", 2, -1), "--process_id=-1: must be in 0..1"),
        (("127.0.0.1:1234", 0, 0), "--num_processes=0: must be at least 1"),
        (("127.0.0.1", 2, 1), "must be HOST:PORT"),
        ((":1234", 2, 1), "must be HOST:PORT"),
        (("host:http", 2, 1), "port must be a number in 1..65535"),
        (("host:70000", 2, 1), "port must be a number in 1..65535"),
    ],
)
def test_bad_flags_fail_before_anything_starts(calls, args, message):
    with pytest.raises(DistributedError, match=message.replace(".", r"\.").replace("+", r"\+")):
        distributed.maybe_initialize(*args)
    assert calls == []


def test_parse_address_accepts_ipv6_and_names():
    assert distributed.parse_address("[::1]:1234") == ("::1", 1234)
    assert distributed.parse_address("node001:61234") == ("node001", 61234)


def test_port_in_use_fails_fast_naming_the_port(calls):
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        t0 = time.monotonic()
        with pytest.raises(DistributedError) as e:
            distributed.maybe_initialize(f"127.0.0.1:{port}", 2, 0)
        assert time.monotonic() - t0 < 5
    text = str(e.value)
    assert f"coordinator port {port}" in text and "already in use" in text
    assert "--coordinator_address=127.0.0.1:OTHERPORT" in text
    assert calls == []


def test_explicit_flags_initialize_with_detection_off(calls):
    port = _free_port()
    info = distributed.maybe_initialize(f"127.0.0.1:{port}", 4, 0, initialization_timeout=7)
    assert calls == [((f"127.0.0.1:{port}", 4, 0),
                      {"cluster_detection_method": "deactivate", "initialization_timeout": 7})]
    assert info.initialized and info.source == "flags" and info.num_processes == 4


def test_port_taken_after_the_check_still_names_the_fix(clean_env):
    def fail(*args, **kwargs):  # what jax raises when its gRPC server cannot bind
        raise RuntimeError("UNKNOWN: Failed to start RPC server")

    clean_env.setattr(jax.distributed, "initialize", fail)
    with pytest.raises(DistributedError, match="--coordinator_address=127.0.0.1:OTHERPORT"):
        distributed.maybe_initialize(f"127.0.0.1:{_free_port()}", 2, 0)


def test_flags_are_defined_and_parsed():
    fv = flags.FlagValues()
    holders = distributed.define_flags(fv)
    fv(["prog", "--coordinator_address=10.0.0.1:1234", "--num_processes=2", "--process_id=1"])
    assert (holders.coordinator_address.value, holders.num_processes.value,
            holders.process_id.value, holders.cluster.value) == ("10.0.0.1:1234", 2, 1, "auto")
    with pytest.raises(flags.IllegalFlagValueError):
        fv2 = flags.FlagValues()
        distributed.define_flags(fv2)
        fv2(["prog", "--num_processes=0"])


# --- cluster detection --------------------------------------------------------------------------


def test_no_cluster_runs_a_single_process(calls):
    info = distributed.maybe_initialize(None, None, None)
    assert calls == [] and not info.initialized
    assert (info.process_id, info.num_processes, info.source) == (0, 1, "single")


def _slurm(env, ntasks: int, nodes: int, procid: int = 1) -> None:
    env.setenv("SLURM_JOB_ID", "1234")
    env.setenv("SLURM_STEP_NODELIST", "gpu[007-008]")
    env.setenv("SLURM_NTASKS", str(ntasks))
    env.setenv("SLURM_STEP_NUM_TASKS", str(ntasks))
    env.setenv("SLURM_STEP_NUM_NODES", str(nodes))
    env.setenv("SLURM_PROCID", str(procid))
    env.setenv("SLURM_LOCALID", "0")


def test_single_task_slurm_shell_is_not_a_cluster(calls, clean_env):
    _slurm(clean_env, ntasks=1, nodes=1, procid=0)  # e.g. `srun --pty bash`
    assert not distributed.maybe_initialize(None, None, None).initialized
    assert calls == []


def test_slurm_one_task_per_node_keeps_all_gpus(calls, clean_env):
    _slurm(clean_env, ntasks=2, nodes=2, procid=1)
    info = distributed.maybe_initialize(None, None, None, initialization_timeout=9)
    # JAX's own detection would pass local_device_ids=[SLURM_LOCALID]: one GPU per node.
    port = 1234 % 4096 + 65535 - 4096 + 1  # JAX's port rule for SLURM
    assert calls == [((f"gpu007:{port}", 2, 1),
                      {"cluster_detection_method": "deactivate", "initialization_timeout": 9})]
    assert (info.source, info.process_id, info.num_processes) == ("slurm", 1, 2)


def test_slurm_process_0_checks_the_coordinator_port(calls, clean_env):
    _slurm(clean_env, ntasks=2, nodes=2, procid=0)
    clean_env.setenv("SLURM_STEP_NODELIST", "localhost")
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        clean_env.setenv("JAX_COORDINATOR_PORT", str(port))
        expected = f"coordinator port {port} .*JAX_COORDINATOR_PORT=OTHERPORT"
        with pytest.raises(DistributedError, match=expected):
            distributed.maybe_initialize(None, None, None)
    assert calls == []


def test_slurm_one_task_per_gpu_uses_jax_detection(calls, clean_env):
    _slurm(clean_env, ntasks=16, nodes=2, procid=3)
    distributed.maybe_initialize(None, None, None)
    assert calls == [((), {"cluster_detection_method": "slurm", "initialization_timeout": 300})]


def test_pod_that_is_not_an_indexed_job_is_not_a_cluster(calls, clean_env, recwarn):
    clean_env.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    assert not distributed.maybe_initialize(None, None, None).initialized
    assert calls == []
    assert not [w for w in recwarn if "Kubernetes" in str(w.message)]


def test_named_cluster_must_be_present(calls):
    with pytest.raises(DistributedError, match="does not detect a slurm environment"):
        distributed.maybe_initialize(None, None, None, cluster="slurm")
    with pytest.raises(DistributedError, match="--cluster_detection='yarn'"):
        distributed.maybe_initialize(None, None, None, cluster="yarn")
    assert not distributed.maybe_initialize(None, None, None, cluster="none").initialized
    assert calls == []


# --- a real two-process run ---------------------------------------------------------------------

WORKER = r"""
import json, os, pathlib, sys, time
port, pid, out = int(sys.argv[1]), int(sys.argv[2]), pathlib.Path(sys.argv[3])
from isic_jax.training import distributed, preemption

info = distributed.maybe_initialize(f"127.0.0.1:{port}", 2, pid, initialization_timeout=60)
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

mesh = Mesh(np.asarray(jax.devices()), ("d",))
# Process p holds [p+1, p+1] (one value per local device): the global array is [1, 1, 2, 2].
x = jax.make_array_from_process_local_data(
    NamedSharding(mesh, P("d")), np.full((2,), pid + 1, np.float32))
psum = jax.jit(jax.shard_map(lambda a: jax.lax.psum(a, "d"), mesh=mesh, in_specs=P("d"),
                             out_specs=P()))
total = float(np.asarray(psum(x).addressable_data(0))[0])
result = {"info": [info.source, info.process_id, info.num_processes],
          "devices": jax.device_count(), "local": jax.local_device_count(), "psum": total}

def loop(tag, **kw):
    with preemption.PreemptionGuard(**kw) as guard:
        result[tag + "_mode"] = guard.mode
        for step in range(1, 3000):
            time.sleep(0.02)
            if step == 5:
                (out / f"{tag}_ready{pid}").touch()
            if guard.should_stop(step):
                result[tag + "_stop"] = step
                return
        result[tag + "_stop"] = None

loop("jax")                                   # JAX's preemption sync point
loop("gather", mode="allgather", sync_every=4)  # all-gathered flags
(out / f"result{pid}.json").write_text(json.dumps(result))
"""


def test_two_processes_psum_and_preemption(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO), env.get("PYTHONPATH", "")] if p)
    procs = [
        subprocess.Popen([sys.executable, str(script), str(port), str(i), str(tmp_path)],
                         cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
        for i in range(2)
    ]
    deadline = time.monotonic() + 120

    def wait_for(name: str) -> None:
        while not all((tmp_path / f"{name}{i}").exists() for i in range(2)):
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                for p in procs:
                    p.kill()
                logs = "\n".join(p.communicate()[0][-3000:] for p in procs)
                raise AssertionError(f"{name} not reached:\n{logs}")
            time.sleep(0.05)

    try:
        wait_for("jax_ready")
        procs[1].send_signal(signal.SIGTERM)  # one host preempted: both must stop together
        wait_for("gather_ready")
        procs[0].send_signal(signal.SIGTERM)
        logs = [p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], logs
    results = [json.loads((tmp_path / f"result{i}.json").read_text()) for i in range(2)]
    for i, r in enumerate(results):
        assert r["info"] == ["flags", i, 2]
        assert (r["devices"], r["local"]) == (4, 2)
        assert r["psum"] == 6.0  # 1 + 1 + 2 + 2 over the 4 devices of both processes
        assert r["jax_mode"] == "jax" and r["gather_mode"] == "allgather"
    # Both processes stopped, at the same step, in each mode.
    assert results[0]["jax_stop"] == results[1]["jax_stop"] is not None
    assert results[0]["gather_stop"] == results[1]["gather_stop"] is not None
    assert results[0]["gather_stop"] % 4 == 0


# --- launch recipes -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["slurm.sbatch", "tpu_pod.sh"])
def test_launch_scripts_parse(name):
    proc = subprocess.run(["bash", "-n", str(LAUNCH / name)], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0, proc.stderr


def test_slurm_script_runs_one_task_per_node_with_a_pre_timeout_signal():
    text = (LAUNCH / "slurm.sbatch").read_text()
    for line in ("#SBATCH --ntasks-per-node=1", "#SBATCH --requeue", "#SBATCH --signal=B:USR1@"):
        assert line in text
    assert "srun" in text and 'isic-jax "${COMMAND}"' in text
    assert 'COMMAND="${ISIC_JAX_COMMAND:-train}"' in text  # train unless asked for cv


def test_k8s_manifest_meets_jax_kubernetes_requirements():
    yaml = pytest.importorskip("yaml")
    docs = [d for d in yaml.safe_load_all((LAUNCH / "k8s_jobset.yaml").read_text()) if d]
    kinds = {d["kind"]: d for d in docs}
    assert {"ServiceAccount", "Role", "RoleBinding", "JobSet"} <= set(kinds)
    # JAX reads pods (list, by IP), its Job and, for plain Jobs, Services.
    rules = {(g, r): set(rule["verbs"]) for rule in kinds["Role"]["rules"]
             for g in rule["apiGroups"] for r in rule["resources"]}
    assert {"get", "list"} <= rules[("", "pods")]
    assert "get" in rules[("batch", "jobs")]
    jobset = kinds["JobSet"]
    [replicated] = jobset["spec"]["replicatedJobs"]
    assert replicated["replicas"] == 1  # JAX counts processes as one Job's parallelism
    job = replicated["template"]["spec"]
    assert job["completionMode"] == "Indexed"  # JAX's process id is JOB_COMPLETION_INDEX
    assert job["parallelism"] == job["completions"] >= 2
    pod = job["template"]["spec"]
    assert pod["serviceAccountName"] == kinds["ServiceAccount"]["metadata"]["name"]
    assert pod["terminationGracePeriodSeconds"] >= 120  # time to finish a step and checkpoint
    assert pod["restartPolicy"] == "Never"
    [container] = pod["containers"]
    assert "train" in container["command"] + container.get("args", [])
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert any(m in " ".join(container["command"] + container.get("args", [])) for m in mounts)


TASK = r"""
import os, pathlib, sys, time
from isic_jax.training.preemption import EXIT_PREEMPTED, PreemptionGuard

d = pathlib.Path(os.environ["STUB_DIR"])
(d / "args").write_text(" ".join(sys.argv[1:]))
(d / "task.pid").write_text(str(os.getpid()))
with PreemptionGuard(num_processes=1) as guard:
    for step in range(1, 100_000):
        time.sleep(0.05)
        if step == 3:
            (d / "ready").touch()
        if guard.should_stop(step):
            (d / "saved").write_text(str(step))
            sys.exit(EXIT_PREEMPTED)
"""


def test_slurm_script_checkpoints_and_requeues_before_the_time_limit(tmp_path):
    """Runs slurm.sbatch with stub srun/scancel/scontrol: USR1 (what --signal=B:USR1@300 sends)
    must reach the training task as SIGTERM, and the job must requeue after the task saved."""
    stub = tmp_path / "bin"
    stub.mkdir()
    (tmp_path / "task.py").write_text(TASK)
    stubs = {
        # srun: drop its options, run the command (one task).
        "srun": 'while [[ "$1" == --* ]]; do shift; done; exec "$@"',
        "isic-jax": f'exec {sys.executable} "$STUB_DIR/task.py" "$@"',
        "scancel": 'echo "$@" >> "$STUB_DIR/scancel.log"; kill -TERM "$(cat "$STUB_DIR/task.pid")"',
        "scontrol": 'echo "$@" >> "$STUB_DIR/scontrol.log"',
    }
    for name, body in stubs.items():
        (stub / name).write_text(f"#!/bin/bash\n{body}\n")
        (stub / name).chmod(0o755)
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text(f'export PATH="{stub}:$PATH"\n')
    env = dict(os.environ, STUB_DIR=str(tmp_path), ISIC_JAX_VENV=str(venv), JAX_PLATFORMS="cpu",
               SLURM_JOB_ID="42", SLURM_SUBMIT_DIR=str(REPO), SLURM_JOB_NODELIST="gpu001",
               SLURM_NNODES="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO), env.get("PYTHONPATH", "")] if p)
    proc = subprocess.Popen(
        ["bash", str(LAUNCH / "slurm.sbatch"), "configs/default.py", str(tmp_path / "run"),
         "--config.train.batch_size=64"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "ready").exists():
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "the training task did not start"
            time.sleep(0.05)
        proc.send_signal(signal.SIGUSR1)
        out = proc.communicate(timeout=60)[0]
    finally:
        proc.kill()
    assert proc.returncode == 75, out  # the task's status comes through
    assert (tmp_path / "args").read_text() == (
        f"train --config=configs/default.py --workdir={tmp_path / 'run'} "
        f"--config.train.batch_size=64"
    )
    assert (tmp_path / "saved").exists(), out
    assert (tmp_path / "scancel.log").read_text().split() == ["--signal=TERM", "42"]
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "42"]
    assert "time limit near" in out and "requeueing job 42" in out


def test_slurm_array_task_runs_its_fold_of_a_cross_validation(tmp_path):
    stub = tmp_path / "bin"
    stub.mkdir()
    stubs = {"srun": 'while [[ "$1" == --* ]]; do shift; done; exec "$@"',
             "isic-jax": 'echo "$@" > "$STUB_DIR/args"'}
    for name, body in stubs.items():
        (stub / name).write_text(f"#!/bin/bash\n{body}\n")
        (stub / name).chmod(0o755)
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text(f'export PATH="{stub}:$PATH"\n')
    env = dict(os.environ, STUB_DIR=str(tmp_path), ISIC_JAX_VENV=str(venv), SLURM_JOB_ID="43",
               SLURM_SUBMIT_DIR=str(REPO), SLURM_JOB_NODELIST="gpu001", SLURM_NNODES="1",
               ISIC_JAX_COMMAND="cv", SLURM_ARRAY_TASK_ID="3")
    done = subprocess.run(["bash", str(LAUNCH / "slurm.sbatch"), "cpu_sample", "/runs/cv",
                           "--config.train.num_epochs=2"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "args").read_text().split() == [
        "cv", "--config=cpu_sample", "--workdir=/runs/cv", "--folds=3",
        "--config.train.num_epochs=2"]
    env["ISIC_JAX_COMMAND"] = "evaluate"
    bad = subprocess.run(["bash", str(LAUNCH / "slurm.sbatch"), "c", "w"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "must be train or cv" in bad.stderr


def test_k8s_cv_job_runs_one_independent_process_per_fold():
    yaml = pytest.importorskip("yaml")
    (job,) = [d for d in yaml.safe_load_all((LAUNCH / "k8s_cv_job.yaml").read_text()) if d]
    spec = job["spec"]
    assert job["kind"] == "Job" and spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] >= 2
    (container,) = spec["template"]["spec"]["containers"]
    command = container["command"]
    assert command[:2] == ["isic-jax", "cv"] and "--folds=$(FOLD)" in command
    assert "--cluster_detection=none" in command  # not one multi-process job
    env = {e["name"]: e for e in container["env"]}
    assert env["FOLD"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.annotations['batch.kubernetes.io/job-completion-index']")
    rules = spec["podFailurePolicy"]["rules"]
    assert any(r["action"] == "Ignore" and r.get("onExitCodes", {}).get("values") == [75]
               for r in rules)
    assert spec["template"]["spec"]["terminationGracePeriodSeconds"] >= 120
