"""Grain input pipelines: infinite, resumable training batches and padded one-pass evaluation.

Sources are anything with `__len__` and `__getitem__(i) -> record dict` holding the features of
the prepared dataset (`dataset.load_sources` opens the prepared ISIC builder's splits so).

Batches (per JAX process, B = global_batch_size // process_count, S = data.image_size):

    image        uint8   [B, S, S, 3]  RGB, randomly cropped + resized (train) or centre-cropped
                                       (eval); NOT flipped or normalised: the step
                                       runs `device_augment.augment_batch` (train) or
                                       `device_augment.preprocess_eval` (eval) to get the float32
                                       ImageNet-normalised model input
    label        int32   [B]           task "binary": the `label` feature; "diagnosis": `diagnosis`
    mask         bool    [B]           False on evaluation padding; all True in training
    index        int64   [B]           record index in the source; -1 on padding
    position     int64   [B]           train: position in the global example stream (unique over
                                       the run, independent of process/device count: the
                                       per-example augmentation key, see device_augment);
                                       eval: position in the padded evaluation order
    image_id     bytes   [B] ('S')     b"" on padding
    patient_id   bytes   [B] ('S')     b"" when missing
    sex          int32   [B]           0 unknown, 1 female, 2 male
    age          int32   [B]           -1 when missing
    anatom_site  bytes   [B] ('S')     b"unknown" when missing
    fitzpatrick  bytes   [B] ('S')     Fitzpatrick skin type as recorded; b"" when missing
    source       bytes   [B] ('S')     the release the example comes from (its `source` field
                                       in a several-release run, else config.data.release);
                                       b"" on padding
    metadata     float32 [B, F]        only with `metadata=` (config.model.metadata): the
                                       features encoded by `metadata.MetadataEncoder`; padding
                                       rows have every feature missing

Training order (one global stream, identical on every process):

    source -> seeded shuffle + repeat, a new permutation each epoch   | or the balanced sampler
              (EpochSampler / BalancedSampler: an infinite source of (index, record))
           -> this process's batches (_ProcessBatches): batch j holds positions
              p + P * (j * B + i), i < B; disjoint slices that together cover the stream, one
              Grain element per batch
           -> map(TrainBatch): decode + random resized crop of the B images into one uint8
              array; the crops are a pure function of (seed, position), so they do not depend
              on the process count (the device part keys on `position` the same way)
           -> to_iter_dataset -> mp_prefetch(num_workers)   (skipped when num_workers == 0)

The iterator supports `get_state()` / `set_state()`; resuming replays exactly the batches the
uninterrupted run would have produced (grain checkpoint, per process).
"""

from __future__ import annotations

import math
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import grain
import numpy as np

from isic_jax import runtime
from isic_jax.data import image_ops
from isic_jax.utils import as_bytes

BATCH_KEYS = (
    "image", "label", "mask", "index", "position", "image_id", "patient_id", "sex", "age",
    "anatom_site", "fitzpatrick", "source",
)  # fmt: skip
METADATA_KEY = "metadata"  # in the batches only when the pipeline has a metadata encoder
_TASK_LABEL_KEY = {"binary": "label", "diagnosis": "diagnosis"}
_UINT32 = 2**32


Element = tuple[int, int, Mapping[str, Any] | None]  # (position, record index, record | padding)


class RandomAccessSource(Protocol):
    """What the pipelines read from: a sequence of record dicts."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Mapping[str, Any]: ...


# --------------------------------------------------------------------------- small helpers


def label_key(task: str) -> str:
    """The record feature holding the class for `task` ("binary" -> label, "diagnosis")."""
    try:
        return _TASK_LABEL_KEY[task]
    except KeyError:
        raise ValueError(
            f"data.task must be one of {sorted(_TASK_LABEL_KEY)}, got {task!r}"
        ) from None


def per_process_batch_size(global_batch_size: int, process_count: int) -> int:
    """global_batch_size // process_count; raises if it does not divide evenly."""
    if global_batch_size <= 0 or process_count <= 0:
        raise ValueError(
            f"batch size {global_batch_size} and process count {process_count} must be positive"
        )
    if global_batch_size % process_count:
        raise ValueError(
            f"global batch size {global_batch_size} is not divisible by the number of JAX "
            f"processes {process_count}: choose a multiple of {process_count}"
        )
    return global_batch_size // process_count


def num_eval_batches(num_examples: int, global_batch_size: int, process_count: int = 1) -> int:
    """Batches each process yields in one evaluation pass (the same on every process)."""
    per_process_batch_size(global_batch_size, process_count)
    return max(1, math.ceil(num_examples / global_batch_size))


def _process_info(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # lazy: worker processes and tests that pass both need no jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    return process_index, process_count


def _split_seed(seed: int, n: int) -> list[int]:
    """n independent uint32 seeds from one integer seed."""
    return [int(s) for s in np.random.SeedSequence(int(seed) % _UINT32).generate_state(n)]


def _read_options(num_workers: int, prefetch: int) -> grain.ReadOptions:
    # Elements are whole batches. In-process (no workers) two threads overlap PIL's GIL-free
    # decode/resample with the training loop; inside each worker one thread keeps the next batch
    # in flight while the worker hands the previous one over (more would oversubscribe the cores).
    return grain.ReadOptions(
        num_threads=2 if num_workers == 0 else 1, prefetch_buffer_size=max(1, prefetch)
    )


# --------------------------------------------------------------------------- sources


class ListSource:
    """A random-access source over an in-memory list of record dicts (tests, small tools)."""

    def __init__(self, records: Sequence[Mapping[str, Any]]):
        self._records = list(records)

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> Mapping[str, Any]:
        return self._records[index]

    def __repr__(self) -> str:
        return f"ListSource(len={len(self._records)})"


class _PaddedSource:
    """Length `padded_length`: position -> (position, index, record); past the source, padding
    `(position, -1, None)`."""

    def __init__(self, source: RandomAccessSource, padded_length: int):
        self._source = source
        self._num = len(source)
        self._length = padded_length

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, position: int) -> tuple[int, int, Mapping[str, Any] | None]:
        if position < self._num:
            return position, position, self._source[position]
        return position, -1, None

    def __repr__(self) -> str:
        return f"_PaddedSource({self._source!r}, padded_length={self._length})"


class _PermutationCache:
    """Seeded permutations of range(n), keyed by integers; the last few are kept (not pickled).

    Why not grain's `shuffle`: its `index_shuffle` cycle-walks a Feistel network and costs per
    element ~1.1 ms for n = 12, ~0.1 ms for n = 320 (the real sample), ~3.5 us for n >= 26k on this
    machine. A numpy permutation per epoch costs O(n) once (~5 ms for 400k), O(1) per element.
    """

    def __init__(self, seed: int, keep: int = 4):
        self._seed = int(seed) % _UINT32
        self._keep = keep
        self._cache: dict[tuple[int, ...], np.ndarray] = {}
        self._lock = threading.Lock()  # grain's prefetch threads share the sampler

    def __call__(self, n: int, *key: int) -> np.ndarray:
        cache_key = (n, *key)
        with self._lock:
            perm = self._cache.get(cache_key)
        if perm is None:
            perm = np.random.default_rng([self._seed, *key]).permutation(n)
            with self._lock:
                self._cache[cache_key] = perm
                while len(self._cache) > self._keep:  # drop the oldest
                    del self._cache[next(iter(self._cache))]
        return perm

    def __getstate__(self) -> dict[str, Any]:
        return {"_seed": self._seed, "_keep": self._keep}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["_seed"], state["_keep"])


class EpochSampler:
    """Infinite stream of record indices: epoch e is permutation e of range(n) (seeded)."""

    def __init__(self, num_records: int, seed: int):
        if num_records <= 0:
            raise ValueError("the training source is empty")
        self._n = int(num_records)
        self._perms = _PermutationCache(seed)

    def __getitem__(self, position: int) -> int:
        epoch, j = divmod(position, self._n)
        return int(self._perms(self._n, 0, epoch)[j])


class BalancedSampler:
    """Class-balanced infinite stream of record indices, deterministic and O(1) per position.

    The stream is cut into blocks of L = C * ceil(N / C) positions (C = classes present, N =
    records), so a block is about one epoch. Each block holds exactly L / C slots of every class,
    in an order permuted per block. The k-th draw of class c takes member `perm_{c, cycle}(k mod
    n_c)` with cycle = k // n_c: members are visited without replacement in a fresh order each
    cycle, so minority records repeat ~L / (C n_c) times per block while the majority class is
    covered once every ~n_c C / L blocks, never dropped.
    """

    def __init__(self, labels: np.ndarray, seed: int):
        labels = np.asarray(labels)
        if labels.ndim != 1 or labels.size == 0:
            raise ValueError("balanced sampling needs a non-empty 1-D label array")
        classes = np.unique(labels)
        self._members = [np.flatnonzero(labels == c).astype(np.int64) for c in classes]
        self._num_classes = len(classes)
        self._per_block = math.ceil(labels.size / self._num_classes)
        self._block = self._per_block * self._num_classes
        self._perms = _PermutationCache(seed, keep=2 + 2 * self._num_classes)

    @property
    def block_length(self) -> int:
        return self._block

    def __getitem__(self, position: int) -> int:
        block, j = divmod(position, self._block)
        slot, c = divmod(int(self._perms(self._block, 0, block)[j]), self._num_classes)
        members = self._members[c]
        cycle, k = divmod(block * self._per_block + slot, len(members))
        return int(members[self._perms(len(members), 1, c, cycle)[k]])


class _SampledSource:
    """Infinite source: position -> (position, record index, record), the index drawn by a
    sampler."""

    def __init__(self, source: RandomAccessSource, sampler: EpochSampler | BalancedSampler):
        self._source = source
        self._sampler = sampler

    def __len__(self) -> int:
        return sys.maxsize

    def __getitem__(self, position: int) -> tuple[int, int, Mapping[str, Any]]:
        index = self._sampler[position]
        return position, index, self._source[index]

    def __repr__(self) -> str:
        return f"_SampledSource({self._source!r}, {type(self._sampler).__name__})"


class _ProcessBatches:
    """This process's batches of an element source: batch j = the elements at positions
    p + P * (j * B + i), i < B (the same as slicing [p::P] and batching B, drop_remainder).

    One Grain element per batch instead of per example: Grain's per-element bookkeeping cost
    ~35 us per example here, as much as reading the record.
    """

    def __init__(self, elements: Any, batch_size: int, process_index: int, process_count: int):
        self._elements = elements
        self._batch = batch_size
        self._index = process_index
        self._count = process_count

    def __len__(self) -> int:
        total = len(self._elements)
        if total == sys.maxsize:  # infinite training stream
            return sys.maxsize
        return len(range(self._index, total, self._count)) // self._batch

    def __getitem__(self, j: int) -> list[Element]:
        start = j * self._batch
        return [self._elements[self._index + self._count * (start + i)] for i in range(self._batch)]

    def __repr__(self) -> str:
        return (
            f"_ProcessBatches({self._elements!r}, batch={self._batch}, "
            f"process={self._index}/{self._count})"
        )


def read_labels(
    source: RandomAccessSource, key: str = "label", chunk: int = 256, progress: bool = False
) -> np.ndarray:
    """The `key` feature of every record, int32 [N], read once (uses `__getitems__` if any).

    This parses whole records (image bytes included, JPEGs are not decoded): see `load_sources`
    for the measured cost.
    """
    n = len(source)
    out = np.empty(n, np.int32)
    start_time = time.perf_counter()
    for start, records in _chunks(source, chunk):
        out[start : start + len(records)] = [int(r[key]) for r in records]
        if progress and start // chunk % 20 == 0:
            done = start + len(records)
            print(f"read labels {done}/{n} ({time.perf_counter() - start_time:.1f} s)")
    return out


def read_fields(
    source: RandomAccessSource, fields: Callable[[Mapping[str, Any]], Any], chunk: int = 256
) -> list[Any]:
    """`fields(record)` of every record, in order, in one pass (uses `__getitems__` if any);
    what the several-release index and the metadata statistics read."""
    out: list[Any] = []
    for _, records in _chunks(source, chunk):
        out.extend(fields(r) for r in records)
    return out


def _chunks(source: RandomAccessSource, chunk: int) -> Iterator[tuple[int, list]]:
    n = len(source)
    getitems = getattr(source, "__getitems__", None)
    for start in range(0, n, chunk):
        keys = list(range(start, min(n, start + chunk)))
        yield start, (getitems(keys) if getitems is not None else [source[i] for i in keys])


# --------------------------------------------------------------------------- transforms


def _collate(
    images: np.ndarray,
    elements: Sequence[Element],
    label_key_: str,
    source: bytes = b"",
    metadata: Any = None,
) -> dict[str, np.ndarray]:
    """The batch dict of the module docstring from uint8 images [B, S, S, 3] and the elements.

    source: the `source` of records that have none (the run's one release). metadata: a
    `metadata.MetadataEncoder`, or None (no `metadata` key).
    """
    records = [_PADDING_RECORD if r is None else r for _, _, r in elements]
    mask = np.array([r is not None for _, _, r in elements], np.bool_)
    batch = {
        "image": images,
        "label": np.array([int(r[label_key_]) for r in records], np.int32),
        "mask": mask,
        "index": np.array([i for _, i, _ in elements], np.int64),  # -1 on padding
        "position": np.array([p for p, _, _ in elements], np.int64),
        "image_id": np.array([as_bytes(r.get("image_id", b"")) for r in records], np.bytes_),
        "patient_id": np.array([as_bytes(r.get("patient_id", b"")) for r in records], np.bytes_),
        "sex": np.array([int(r.get("sex", 0)) for r in records], np.int32),
        "age": np.array([int(r.get("age", -1)) for r in records], np.int32),
        "anatom_site": np.array(
            [as_bytes(r.get("anatom_site", b"unknown")) for r in records], np.bytes_
        ),
        "fitzpatrick": np.array([as_bytes(r.get("fitzpatrick", b"")) for r in records],
                                np.bytes_),
        # Padding records have source b"".
        "source": np.array([as_bytes(r.get("source", source)) for r in records], np.bytes_),
    }
    if metadata is not None:
        rows = [r if m else None for r, m in zip(records, mask, strict=True)]
        batch[METADATA_KEY] = metadata.encode_records(rows)
    return batch


# Metadata of evaluation padding rows (mask False): label 0, ids b"", sex 0 (unknown), age -1.
_PADDING_RECORD: Mapping[str, Any] = {
    "label": 0, "diagnosis": 0, "image_id": b"", "patient_id": b"", "sex": 0, "age": -1,
    "anatom_site": b"", "fitzpatrick": b"", "source": b"",
}  # fmt: skip


def default_source(data_config: Any) -> bytes:
    """The `source` of records that carry none: config.data.release for one release (a union's
    records carry their own)."""
    release = str(data_config.get("release", "") or "")
    return b"" if "+" in release else release.encode()


class TrainBatch(grain.transforms.Map):
    """[(position, index, record)] -> training batch: uint8 images randomly cropped + resized.

    The crops are a pure function of (seed, position) (`image_ops.train_batch`), so they do not
    depend on the process count or on where a batch starts; one Grain element per batch keeps
    Grain's per-element cost (and a Generator per image) off the hot path.
    """

    def __init__(
        self, image_size: int, augment: image_ops.AugmentConfig, label_key_: str, seed: int,
        source: bytes = b"", metadata: Any = None,
    ):  # fmt: skip
        self.image_size = int(image_size)
        self.augment = augment
        self.label_key = label_key_
        self.seed = int(seed)
        self.source = source
        self.metadata = metadata

    def map(self, elements: Sequence[Element]) -> dict[str, np.ndarray]:
        images = image_ops.train_batch(
            [as_bytes(r["image"]) for _, _, r in elements],
            [p for p, _, _ in elements],
            self.seed,
            self.image_size,
            self.augment,
        )
        return _collate(images, elements, self.label_key, self.source, self.metadata)


class EvalBatch(grain.transforms.Map):
    """[(position, index, record | None)] -> evaluation batch: deterministic uint8 images
    (`image_ops.eval_image`; zeros on padding). Colour constancy, if configured, and the
    normalisation run on the device (`device_augment.preprocess_eval`)."""

    def __init__(
        self, image_size: int, label_key_: str, source: bytes = b"", metadata: Any = None
    ):
        self.image_size = int(image_size)
        self.label_key = label_key_
        self.source = source
        self.metadata = metadata

    def map(self, elements: Sequence[Element]) -> dict[str, np.ndarray]:
        datas = [None if r is None else as_bytes(r["image"]) for _, _, r in elements]
        images = image_ops.eval_batch(datas, self.image_size)
        return _collate(images, elements, self.label_key, self.source, self.metadata)


# --------------------------------------------------------------------------- pipelines


def train_map_dataset(
    source: RandomAccessSource,
    data_config: Any,
    global_batch_size: int,
    seed: int,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    labels: np.ndarray | None = None,
    metadata: Any = None,
) -> grain.MapDataset:
    """The random-access part of the training pipeline: infinite MapDataset of batches.

    Args:
      source: random-access records (see module docstring).
      data_config: `config.data` (image_size, task, balanced_sampling, augment.crop_scale,
        crop_ratio, interpolation; the other augment keys are `device_augment`'s).
      global_batch_size: batch over all processes; must divide by process_count.
      seed: the run's seed; same seed -> same batches.
      process_index, process_count: default to jax.process_index()/process_count().
      labels: int [len(source)] class of each record, for balanced sampling; read from the
        source (`read_labels`) when needed and not given.
      metadata: a `metadata.MetadataEncoder`: the batches get `metadata` float32 [B, F].

    Returns:
      MapDataset whose element i is this process's batch i (dict, module docstring).
    """
    process_index, process_count = _process_info(process_index, process_count)
    batch_size = per_process_batch_size(global_batch_size, process_count)
    key = label_key(data_config.task)
    shuffle_seed, augment_seed = _split_seed(seed, 2)
    if len(source) == 0:
        raise ValueError("the training source is empty")
    if data_config.get("balanced_sampling", False):
        if labels is None:
            labels = read_labels(source, key)
        if len(labels) != len(source):
            raise ValueError(f"{len(labels)} labels for a source of {len(source)} records")
        sampler = BalancedSampler(labels, shuffle_seed)
    else:
        sampler = EpochSampler(len(source), shuffle_seed)
    # Shuffle + repeat live in the sampler (see `_PermutationCache` for why not grain.shuffle).
    stream = _SampledSource(source, sampler)
    ds = grain.MapDataset.source(_ProcessBatches(stream, batch_size, process_index, process_count))
    augment = image_ops.AugmentConfig.from_config(data_config.augment)
    return ds.map(TrainBatch(data_config.image_size, augment, key, augment_seed,
                             default_source(data_config), metadata))  # fmt: skip


def create_train_dataset(
    source: RandomAccessSource,
    data_config: Any,
    global_batch_size: int,
    seed: int,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    labels: np.ndarray | None = None,
    read_options: grain.ReadOptions | None = None,
    metadata: Any = None,
) -> grain.IterDataset:
    """Infinite training IterDataset of this process's batches (see `train_map_dataset`).

    `iter(ds)` has get_state()/set_state(); with data_config.num_workers > 0 the batches are made
    in that many spawned worker processes (mp_prefetch). Close the iterator when done.
    """
    ds = train_map_dataset(
        source, data_config, global_batch_size, seed,
        process_index=process_index, process_count=process_count, labels=labels,
        metadata=metadata,
    )  # fmt: skip
    return _to_iter(ds, data_config, read_options)


def create_eval_dataset(
    source: RandomAccessSource,
    data_config: Any,
    global_batch_size: int,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    read_options: grain.ReadOptions | None = None,
    metadata: Any = None,
) -> grain.IterDataset:
    """One deterministic pass; every record appears exactly once over all processes.

    The record order is padded with -1 to num_eval_batches * global_batch_size positions and
    process p takes positions p, p + P, ... ; so every process yields `num_eval_batches(...)`
    full batches of global_batch_size // P, padding (mask False, index -1) at the end.
    Images are uint8: run `device_augment.preprocess_eval` on them (colour constancy, normalise).
    """
    process_index, process_count = _process_info(process_index, process_count)
    batch_size = per_process_batch_size(global_batch_size, process_count)
    num_batches = num_eval_batches(len(source), global_batch_size, process_count)
    padded = _PaddedSource(source, num_batches * global_batch_size)
    key = label_key(data_config.task)
    batches = _ProcessBatches(padded, batch_size, process_index, process_count)
    ds = grain.MapDataset.source(batches).map(
        EvalBatch(data_config.image_size, key, default_source(data_config), metadata)
    )
    return _to_iter(ds, data_config, read_options)


def _to_iter(
    ds: grain.MapDataset, data_config: Any, read_options: grain.ReadOptions | None
) -> grain.IterDataset:
    num_workers = int(data_config.get("num_workers", 0))
    prefetch = int(data_config.get("prefetch_buffer_size", 2))
    it = ds.to_iter_dataset(read_options or _read_options(num_workers, prefetch))
    if num_workers > 0:
        _grain_flags_readable()
        # Workers ignore SIGTERM/SIGINT: a scheduler signals the whole process group, and dead
        # workers would fail the trainer before it can save its preemption checkpoint.
        it = it.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=num_workers, per_worker_buffer_size=max(1, prefetch)
            ),
            worker_init_fn=runtime.ignore_stop_signals,
        )
    return it


def _grain_flags_readable() -> None:
    """Lets Grain read its own absl flags outside `absl.app.run` (a notebook, a script).

    Grain's parent process reads `--grain_*` flags (e.g. worker profiling) when it starts worker
    processes, and absl raises on reading an unparsed flag. Marking only Grain's flags present,
    at their defaults, is what Grain itself does in its workers; all other absl flags, and a
    later `absl.app.run`, are untouched. A no-op once flags are parsed.
    """
    from absl import flags

    if flags.FLAGS.is_parsed():
        return
    for name in list(flags.FLAGS):
        if name.startswith("grain_") and not flags.FLAGS[name].present:
            flags.FLAGS[name].present = 1
