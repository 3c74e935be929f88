"""Data parallelism over all devices: the same pure step under `jax.pmap` or `jax.jit` over a Mesh.

    par = DataParallel.create("pmap")                 # or "jit"
    par.check_global_batch(256, "config.train.batch_size")
    state = par.replicate(state)                      # pmap: [n_dev, ...] stacked; jit: P()
    p_step = par.compile_train_step(functools.partial(train_step, axis_name=par.axis_name, ...))
    state, metrics = p_step(state, par.shard_batch(host_batch), par.replicate(rng))

pmap: the step is mapped over the local devices with axis name "batch"; the step itself averages
gradients and metrics with `lax.pmean` (BatchNorm syncs over the same axis). The state carries a
leading device axis. jit: the step runs on global arrays; the batch is sharded on the "data"
axis of a `jax.sharding.Mesh` of all devices and the state is replicated (P()); XLA inserts
the all-reduces itself, so the step gets `axis_name=None` and no collective is written by hand.

Host batches are dicts of numpy arrays holding this process's share of the global batch
[B_local, ...]; only numeric arrays go to the devices (ids stay on the host).
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from isic_jax.config_utils import ConfigError

PMAP_AXIS = "batch"  # the pmap axis name the step and BatchNorm reduce over
MESH_AXIS = "data"  # the Mesh axis the batch is sharded on under jit
MODES = ("pmap", "jit")

PyTree = Any


def device_arrays(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The entries of a host batch that go to the devices (numeric arrays; not bytes/str ids)."""
    return {
        k: v for k, v in batch.items() if isinstance(v, np.ndarray) and v.dtype.kind in "biuf"
    }


@dataclasses.dataclass(frozen=True)
class DataParallel:
    """How a step is distributed over the devices (see the module docstring).

    Attributes:
      mode: "pmap" or "jit".
      mesh: pmap: Mesh of this process's devices, axis "batch" (the layout pmap's outputs have,
        so inputs placed with it are not moved again); jit: Mesh of all devices, axis "data".
    """

    mode: str
    mesh: Mesh

    @classmethod
    def create(cls, mode: str, devices: list[jax.Device] | None = None) -> DataParallel:
        """Builds the mesh. `devices` defaults to all devices (pmap: this process's)."""
        if mode not in MODES:
            raise ConfigError(
                f"config.train.parallelism must be one of {', '.join(MODES)}; got {mode!r}."
            )
        if mode == "pmap":
            devs = list(devices) if devices is not None else jax.local_devices()
            # An explicit Mesh: jax.make_mesh would default to Explicit axes.
            return cls(mode, Mesh(np.asarray(devs), (PMAP_AXIS,)))
        devs = list(devices) if devices is not None else jax.devices()
        return cls(mode, Mesh(np.asarray(devs), (MESH_AXIS,)))

    # --- facts -------------------------------------------------------------------------------

    @property
    def devices(self) -> list[jax.Device]:
        return list(self.mesh.devices.flat)

    @property
    def num_devices(self) -> int:
        """Devices the global batch is split over (pmap: local devices x processes)."""
        n = self.mesh.devices.size
        return n * jax.process_count() if self.mode == "pmap" else n

    @property
    def axis_name(self) -> str | None:
        """The axis the step must pmean over (and BatchNorm sync over): "batch" or None."""
        return PMAP_AXIS if self.mode == "pmap" else None

    def check_global_batch(self, global_batch: int, key: str = "config.train.batch_size") -> None:
        """Fails before anything compiles when the global batch does not split evenly."""
        n = self.num_devices
        if global_batch % n:
            raise ConfigError(
                f"{key}={global_batch} does not divide over {n} devices "
                f"({global_batch} % {n} = {global_batch % n}); use a multiple of {n}."
            )
        if global_batch % jax.process_count():
            raise ConfigError(
                f"{key}={global_batch} does not divide over {jax.process_count()} processes."
            )

    # --- placement ---------------------------------------------------------------------------

    @property
    def replicated(self) -> NamedSharding:
        """Sharding of a replicated value: jit: the state; pmap: one copy on every device."""
        return NamedSharding(self.mesh, P())

    @property
    def batch_sharding(self) -> NamedSharding:
        """Leading axis split over the devices (jit: the global batch; pmap: the device axis)."""
        return NamedSharding(self.mesh, P(self.mesh.axis_names[0]))

    def replicate(self, tree: PyTree) -> PyTree:
        """Puts a single copy of a pytree (host or device arrays) on every device.

        pmap: leaves get a leading axis of size n_local_devices, sharded over it (the layout
        pmap returns, so the step compiles once). jit: leaves replicated with P().
        """
        if self.mode == "jit":
            return jax.device_put(tree, self.replicated)
        n = self.mesh.devices.size

        def stack(t: PyTree) -> PyTree:
            return jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *jnp.shape(x))), t)

        # Replicate first so that the broadcast runs where the output lives (no host round trip
        # for a state that is already on a device, e.g. restored).
        tree = jax.device_put(tree, self.replicated)
        return jax.jit(stack, out_shardings=self.batch_sharding)(tree)

    def unreplicate(self, tree: PyTree) -> PyTree:
        """One copy of a replicated pytree (pmap: device 0's slice; jit: the arrays as they are)."""
        if self.mode == "jit":
            return tree
        # One compiled program for the whole tree (x[0] leaf by leaf would compile per shape).
        first = _take_first(tree)
        if jax.process_count() > 1:
            # pmap arrays are host-local; Orbax only saves global arrays or numpy in multi-host.
            return jax.device_get(first)
        return first

    def shard_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """Sends this process's part of a global batch to its devices (asynchronously).

        Args:
          batch: numeric numpy arrays [B_local, ...] (use `device_arrays` to drop ids).

        Returns:
          pmap: arrays [n_local_devices, B_local / n_local, ...]; jit: global arrays
          [B_global, ...] sharded on "data".
        """
        if self.mode == "jit":
            sharding = self.batch_sharding
            return {
                k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
                for k, v in batch.items()
            }
        n = self.mesh.devices.size
        out = {}
        for k, v in batch.items():
            v = np.asarray(v)
            if v.shape[0] % n:
                raise ValueError(
                    f"batch entry {k!r} has {v.shape[0]} examples, not divisible over {n} devices."
                )
            out[k] = jax.device_put(v.reshape(n, v.shape[0] // n, *v.shape[1:]),
                                    self.batch_sharding)
        return out

    def local_rows(self, x: jax.Array) -> np.ndarray:
        """This process's rows of a per-example step output, in batch order [B_local, ...].

        pmap outputs [n_local_devices, B / n, ...] and jit outputs [B_global, ...] sharded on
        "data" alike: the addressable shards, ordered by their offset, concatenated (no
        cross-process transfer; with one process this is the whole batch).
        """
        shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
        rows = np.concatenate([np.asarray(s.data) for s in shards])
        if self.mode == "pmap":
            rows = rows.reshape(-1, *rows.shape[2:])
        return rows

    # --- compilation -------------------------------------------------------------------------

    def compile_train_step(self, step_fn: Callable[..., tuple[PyTree, PyTree]]) -> Callable:
        """Wraps `step_fn(state, batch, rng) -> (state, metrics)`; the state buffers are donated.

        pmap: `jax.pmap(step_fn, axis_name="batch")`; step_fn must pmean (pass
        axis_name=self.axis_name to it). jit: `jax.jit` with the batch on P("data"), state, rng
        and metrics replicated.
        """
        if self.mode == "pmap":
            return jax.pmap(step_fn, axis_name=PMAP_AXIS, donate_argnums=(0,))
        repl, data = self.replicated, self.batch_sharding
        return jax.jit(
            step_fn,
            in_shardings=(repl, data, repl),
            out_shardings=(repl, repl),
            donate_argnums=(0,),
        )

    def compile_eval_step(self, eval_fn: Callable[..., PyTree]) -> Callable:
        """Wraps `eval_fn(state, batch) -> per-example outputs [B, ...]` (no donation)."""
        if self.mode == "pmap":
            return jax.pmap(eval_fn, axis_name=PMAP_AXIS)
        return jax.jit(
            eval_fn,
            in_shardings=(self.replicated, self.batch_sharding),
            out_shardings=self.batch_sharding,
        )

    def state_sharding(self) -> jax.sharding.Sharding:
        """Where a restored (unreplicated) state should land before `replicate`."""
        if self.mode == "jit":
            return self.replicated
        return jax.sharding.SingleDeviceSharding(self.devices[0])


@jax.jit
def _take_first(tree: PyTree) -> PyTree:
    return jax.tree.map(lambda x: x[0], tree)


# ---------------------------------------------------------------------------------------------
# Device prefetch.


@dataclasses.dataclass
class PrefetchedBatch:
    """A batch already on the devices, its host-only entries and the input state after it.

    Attributes:
      device: arrays as `DataParallel.shard_batch` returns them.
      host: the whole host batch (ids, masks, labels as numpy), for evaluation bookkeeping.
      iterator_state: the data iterator's state right after this batch was drawn (what a
        checkpoint taken after this batch's step must store to resume exactly), or None.
    """

    device: dict[str, jax.Array]
    host: dict[str, np.ndarray]
    iterator_state: Any = None


class _End:
    pass


class DevicePrefetcher:
    """Keeps `size` batches sharded on the devices ahead of the step, filled by a thread.

    A background thread draws host batches from `iterator`, records the iterator state after
    each (so that checkpoints match the batches actually consumed, not the ones prefetched),
    and starts their transfer; the training loop only takes ready batches. With size 0
    everything happens in the caller's thread.

    Args:
      iterator: yields dicts of numpy arrays.
      shard_fn: host batch -> device batch, e.g. `lambda b: par.shard_batch(device_arrays(b))`
        (it picks what goes to the devices).
      size: batches kept ready (0: no thread, no look-ahead).
      get_state: iterator -> state, called after each batch (None: do not record).
    """

    def __init__(
        self,
        iterator: Iterator[dict[str, np.ndarray]],
        shard_fn: Callable[[dict[str, np.ndarray]], dict[str, jax.Array]],
        size: int = 2,
        get_state: Callable[[Any], Any] | None = None,
    ):
        self._it = iterator
        self._shard = shard_fn
        self._get_state = get_state
        self._size = int(size)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if self._size > 0:
            self._queue: queue.Queue = queue.Queue(maxsize=self._size)
            self._thread = threading.Thread(target=self._run, name="device-prefetch", daemon=True)
            self._thread.start()

    def _produce(self) -> PrefetchedBatch:
        host = next(self._it)
        state = self._get_state(self._it) if self._get_state is not None else None
        return PrefetchedBatch(self._shard(host), host, state)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                item = self._produce()
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except StopIteration:
            self._put_final(_End())
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer's thread
            self._put_final(e)

    def _put_final(self, item: Any) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def __iter__(self) -> DevicePrefetcher:
        return self

    def __next__(self) -> PrefetchedBatch:
        if self._thread is None:
            return self._produce()
        item = self._queue.get()
        if isinstance(item, _End):
            self._put_final(item)  # stays exhausted
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        """Stops the thread (batches already drawn are dropped)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def __enter__(self) -> DevicePrefetcher:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
