"""Opening a prepared dataset: the checks before anything is built, and `InputData`.

    check_prepared_dataset(config.data)       # DataNotFoundError with what to run, or nothing
    data = InputData(config)                  # sources + Grain pipelines of the run
    it = data.train_iterator()                # infinite, get_state/set_state
    for batch in data.eval_batches("val"): ...

`config.data.release` names one prepared release, or several joined by "+" (trained on their
union, see `union`: one label map, cross-release duplicates removed, folds re-assigned). Each is
read at the newest prepared dataset version (`isic.open_prepared`: a 1.0.0 dataset prepared by
an older isic_jax still works for everything it stores). With `config.model.metadata` set,
`InputData.metadata` is the encoder (`metadata.MetadataEncoder`) fitted on the training split
and the batches carry its float32 array as `metadata`.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from isic_jax.data import pipeline
from isic_jax.data import union as union_lib
from isic_jax.data.isic import labels as L


class UnknownSplitError(ValueError):
    """An evaluation split that is neither val, train nor a split of the prepared dataset."""


def malignant_class_indices(task: str, release: str, class_names: list[str]) -> list[int]:
    """Classes counted as malignant: [1] for the binary task, else the release's malignant
    diagnoses (`labels.malignant_diagnoses`: those of the common taxonomy for "a+b")."""
    if task == "binary":
        return [1]
    malignant = set(L.malignant_diagnoses(release))
    return [i for i, name in enumerate(class_names) if name in malignant]


class DataNotFoundError(FileNotFoundError):
    """config.data names a dataset that is not prepared under config.data.data_dir; the message
    says what is there and what to run."""


def _prepared_configs(data_dir: pathlib.Path) -> list[str]:
    """Names ("isic2019_96") of the prepared `isic` datasets under a TFDS data_dir."""
    root = data_dir / "isic"
    if not root.is_dir():
        return []
    # TFDS layout: <data_dir>/isic/<release>_<size>/<version>/dataset_info.json (written last).
    return sorted({p.parent.parent.name for p in root.glob("*/*/dataset_info.json")})


def check_prepared_dataset(data_config: Any) -> None:
    """Fails fast (before TFDS, devices or checkpoints are touched) when the dataset that
    config.data names is not prepared under config.data.data_dir.

    Raises:
      DataNotFoundError: the folder is missing, holds no prepared ISIC dataset, or holds other
        releases/sizes only; the message lists what is there and the command to run.
    """
    data_dir = pathlib.Path(os.path.expanduser(str(data_config.data_dir)))
    size = int(data_config.stored_size)
    parts = L.release_parts(data_config.release)
    found = _prepared_configs(data_dir) if data_dir.is_dir() else []
    missing = [r for r in parts if f"{r}_{size}" not in found]
    # The first release that is not prepared is the one reported (all of them, for a union).
    release = missing[0] if missing else parts[0]
    name = f"{release}_{size}"
    prepare = _prepare_command(release, data_dir, size)
    if len(parts) > 1 and missing and found:
        raise DataNotFoundError(
            f"config.data.release={data_config.release} needs every release prepared at "
            f"config.data.stored_size={size} under {data_dir}; not prepared: "
            f"{', '.join(f'isic/{r}_{size}' for r in missing)} (there: "
            f"{', '.join(f'isic/{n}' for n in found)}). Prepare each, e.g. `{prepare}`."
        )
    if not data_dir.is_dir():
        raise DataNotFoundError(
            f"config.data.data_dir={data_config.data_dir} does not exist ({data_dir}). Prepare "
            f"the dataset first: `{prepare}`, or pass --config.data.data_dir=DIR with the folder "
            f"`isic-jax prepare --data-dir` wrote."
        )
    if not missing:
        return
    if not found:
        raise DataNotFoundError(
            f"config.data.data_dir={data_dir} holds no prepared ISIC dataset (looked for "
            f"{data_dir}/isic/{name}/<version>/dataset_info.json). Prepare it first: `{prepare}`."
        )
    options = "; ".join(
        "--config.data.release={} --config.data.stored_size={}".format(*n.rsplit("_", 1))
        for n in found
    )
    raise DataNotFoundError(
        f"config.data.data_dir={data_dir} holds isic/{', isic/'.join(found)} but not isic/{name} "
        f"(config.data.release={release}, config.data.stored_size={size}). To train on what is "
        f"there, pass {options}; to use {release} at {size} px, prepare it: `{prepare}`."
    )


def _prepare_command(release: str, data_dir: Any, size: int) -> str:
    return (f"isic-jax prepare --source YOUR_{release.upper()}_DOWNLOAD --data-dir {data_dir} "
            f"--image-size {size}")  # fmt: skip


class InputData:
    """The run's data: sources from `load_sources` and the Grain pipelines on them.

    Args:
      config: the resolved config.
      sources: (train_source, val_source, info) as `load_sources` returns them; opened from
        config.data when None (tests pass in-memory sources).
      read_train_labels: passed to `load_sources` (default: when balanced sampling needs them;
        False where nothing is trained, e.g. evaluate).
      metadata_encoder: the encoder of `config.model.metadata` saved with a model (evaluation,
        export); default: fitted on the training split here.

    Raises:
      metadata.MetadataFeatureError: config.model.metadata names a feature that the prepared
        dataset does not have (the message lists the available ones, or says to re-run
        `isic-jax prepare` when a newer dataset version has it).
    """

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        sources: tuple | None = None,
        *,
        read_train_labels: bool | None = None,
        metadata_encoder: Any = None,
    ):
        self._config = config
        if sources is None:
            check_prepared_dataset(config.data)
            sources = load_sources(config.data, read_train_labels=read_train_labels)
        self.train_source, self.val_source, self.info = sources
        self.metadata = self._metadata(metadata_encoder)
        if self.info.union is not None:
            _announce(union_lib.describe(self.info.union.summary))

    @classmethod
    def for_run(cls, config: ml_collections.ConfigDict, workdir: str | os.PathLike,
                **kwargs: Any) -> InputData:
        """The data of an existing run: with the metadata encoder the run saved (its training
        statistics), not one fitted anew."""
        from isic_jax.data import metadata

        return cls(config, metadata_encoder=metadata.load_encoder(workdir), **kwargs)

    def _metadata(self, encoder: Any) -> Any:
        """The metadata encoder of config.model.metadata (None when it is empty)."""
        from isic_jax.data import metadata

        spec = str(self._config.get("model", {}).get("metadata", "") or "")
        if not metadata.parse_feature_list(spec):
            return None
        if encoder is not None:  # saved with the model: its statistics, these releases' columns
            return encoder.bind(self.info.datasets or _datasets_of(self.train_source, self.info))
        catalog = metadata.Catalog.from_datasets(
            self.info.datasets or _datasets_of(self.train_source, self.info)
        )
        return metadata.fit(spec, self.train_source, catalog)

    @property
    def num_train(self) -> int:
        return len(self.train_source)

    @property
    def has_val(self) -> bool:
        """False for a final model trained on all folds (config.data.val_fold = -1)."""
        return self.val_source is not None

    @property
    def num_classes(self) -> int:
        return len(self.info.class_names)

    @property
    def class_names(self) -> list[str]:
        return list(self.info.class_names)

    @property
    def train_class_counts(self) -> np.ndarray:
        return np.asarray(self.info.train_class_counts)

    @property
    def malignant_classes(self) -> list[int]:
        return malignant_class_indices(self.info.task, self.info.release, self.class_names)

    @property
    def sources(self) -> list[str]:
        """The releases of the run (the `source` of its examples), in config order."""
        return list(self.info.sources or L.release_parts(self.info.release))

    def train_iterator(self) -> Iterator[dict[str, np.ndarray]]:
        """Infinite iterator of this process's training batches (get_state/set_state)."""
        ds = pipeline.create_train_dataset(
            self.train_source,
            self._config.data,
            int(self._config.train.batch_size),
            int(self._config.seed),
            labels=getattr(self.info, "train_labels", None),
            metadata=self.metadata,
        )
        return iter(ds)

    def source(self, split: str) -> Any:
        """"val" (the validation fold), "train" (the other folds) or a builder split name
        (e.g. "fold3", "fold1+fold2")."""
        if split == "val":
            if self.val_source is None:
                raise UnknownSplitError(
                    "this run has no validation fold (config.data.val_fold=-1 trains on all "
                    "folds); evaluate a split of the prepared dataset instead, e.g. --split fold0"
                )
            return self.val_source
        if split == "train":
            return self.train_source
        import tensorflow_datasets as tfds

        parts = split.split("+")
        if self.info.union is not None:  # the union's own folds
            known = [f"fold{k}" for k in range(self.info.union.num_folds)]
            if not all(p in known for p in parts):
                raise UnknownSplitError(
                    f"unknown split {split!r}; known: val, train, {', '.join(known)}"
                )
            return self.info.union.source([known.index(p) for p in parts])
        builder = _builder(self._config.data)
        known = sorted(builder.info.splits)
        if not all(p in known for p in parts):
            raise UnknownSplitError(
                f"unknown split {split!r}; known: val, train, {', '.join(known)}"
            )
        # As load_sources opens val and train: raw records parsed by TfExampleSource.
        raw = tfds.decode.DeserializeMethod.RAW_BYTES
        return TfExampleSource(builder.as_data_source(split=split, deserialize_method=raw))

    def eval_batches(self, split: str = "val") -> Iterable[dict[str, np.ndarray]]:
        """One padded pass over a split (mask False on padding)."""
        return pipeline.create_eval_dataset(
            self.source(split), self._config.data, int(self._config.eval.batch_size),
            metadata=self.metadata,
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The prepared builder's splits as record sources.


class TfExampleSource:
    """Record dicts from a TFDS source opened with `deserialize_method=RAW_BYTES`.

    Parses the serialized tf.Example with protobuf (upb) and returns each single-value feature as
    bytes (bytes_list: image JPEG, texts) or int (int64_list: labels, age, fold). Same values as
    `as_data_source(decoders={"image": SkipDecoding()})`, but ~15 us per record instead of ~190 us
    (TFDS's per-feature Python decoding), measured on the prepared sample on this machine.
    """

    def __init__(self, raw_source: Any):
        self._source = raw_source

    def __len__(self) -> int:
        return len(self._source)

    @staticmethod
    def parse(serialized: bytes) -> dict[str, Any]:
        """One serialized tf.Example -> {feature: bytes | int | float} (first value of each)."""
        from tensorflow_datasets.proto import tf_example_pb2

        record: dict[str, Any] = {}
        for key, feature in tf_example_pb2.Example.FromString(serialized).features.feature.items():
            kind = feature.WhichOneof("kind")
            values = getattr(feature, kind).value if kind else ()
            record[key] = values[0] if len(values) == 1 else list(values)
        return record

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.parse(self._source[index])

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        return [self.parse(r) for r in self._source.__getitems__(list(indices))]

    def __repr__(self) -> str:
        return f"TfExampleSource({self._source!r})"


@dataclasses.dataclass
class SourceInfo:
    """What the trainer needs to know about the opened splits.

    class_names: names of the task's classes (index = label).
    train_class_counts / val_class_counts: int64 [num_classes] (from the builder's metadata).
    train_labels: int32 [num_train], the class of each train record, read from the records when
      balanced sampling is on (else None); pass it to `create_train_dataset(labels=...)`.
    """

    release: str
    task: str
    class_names: list[str]
    num_train: int
    num_val: int
    train_class_counts: np.ndarray
    val_class_counts: np.ndarray
    train_split: str
    val_split: str | None
    train_labels: np.ndarray | None = None
    label_read_seconds: float = 0.0
    # The releases of the run (several for "a+b"), and per release what its prepared dataset
    # holds: {"release", "version", "features", "tabular_columns", "tabular_text_columns",
    # "prepare"} (what `metadata.Catalog` reads).
    sources: list[str] = dataclasses.field(default_factory=list)
    datasets: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    union: Any = None  # union.Union for several releases: its folds, summary and sources

    @property
    def has_val(self) -> bool:
        """False for a final model trained on all folds (config.data.val_fold = -1)."""
        return self.val_source is not None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _split_counts(metadata: Mapping[str, Any], key: str, split: str) -> np.ndarray | None:
    """Class counts of feature `key` in a "foldA+foldB" split from the builder metadata
    ("<key>_counts"; None if absent)."""
    per_fold = metadata.get(f"{key}_counts")
    if not per_fold:
        return None
    try:
        return np.sum([np.asarray(per_fold[f], np.int64) for f in split.split("+")], axis=0)
    except KeyError:
        return None


def _builder(data_config: Any, release: str | None = None) -> Any:
    """The prepared dataset of `release` (default: config.data.release, one release) to read:
    the newest prepared version (`isic.open_prepared`)."""
    from isic_jax.data.isic import open_prepared

    return open_prepared(
        release or data_config.release,
        int(data_config.stored_size),
        os.path.expanduser(str(data_config.data_dir)),
    )


def _describe(release: str, builder: Any, data_config: Any) -> dict[str, Any]:
    """What the catalog of metadata features needs to know about one opened dataset."""
    metadata = dict(builder.info.metadata or {})
    return {
        "release": release,
        "version": str(builder.info.version),
        "features": list(builder.info.features.keys()),
        "tabular_columns": list(metadata.get("tabular_columns") or ()),
        "tabular_text_columns": list(metadata.get("tabular_text_columns") or ()),
        "prepare": _prepare_command(
            release, os.path.expanduser(str(data_config.data_dir)), int(data_config.stored_size)
        ),
    }


def _datasets_of(source: Any, info: Any) -> list[dict[str, Any]]:
    """A dataset description from a record of an in-memory source (tests, tools)."""
    record = source[0] if len(source) else {}
    return [{
        "release": str(info.release), "version": "?", "features": list(record),
        "tabular_columns": list(record.get("tabular_columns") or ()),
        "tabular_text_columns": list(record.get("tabular_text_columns") or ()),
        "prepare": "isic-jax prepare",
    }]  # fmt: skip


def _announce(message: str) -> None:
    """Prints on the first JAX process only (every process opens the same data)."""
    import sys

    if "jax" in sys.modules and sys.modules["jax"].process_index() != 0:
        return
    print(message, flush=True)


def _num_folds(builder: Any) -> int:
    metadata = dict(builder.info.metadata or {})
    return int(
        metadata.get("num_folds") or sum(str(s).startswith("fold") for s in builder.info.splits)
    )


def prepared_num_folds(data_config: Any) -> int:
    """The number of folds (splits fold0..foldK-1) of the prepared dataset config.data names;
    for several releases, of their union (config.data.num_folds, else the releases' own)."""
    parts = L.release_parts(data_config.release)
    if len(parts) == 1:
        return _num_folds(_builder(data_config))
    if data_config.get("num_folds") is not None:
        return int(data_config.num_folds)
    counts = {r: _num_folds(_builder(data_config, r)) for r in parts}
    if len(set(counts.values())) != 1:
        raise ValueError(
            f"the prepared releases have different numbers of folds ({counts}): set "
            "config.data.num_folds for the union"
        )
    return next(iter(counts.values()))


def load_sources(
    data_config: Any, *, read_train_labels: bool | None = None
) -> tuple[TfExampleSource, TfExampleSource | None, SourceInfo]:
    """Opens the prepared builder: train = all folds but `val_fold`, val = that fold; with
    val_fold = -1 (a final model), train = every fold and val = None.

    Args:
      data_config: `config.data` (release, stored_size, data_dir, val_fold, task,
        balanced_sampling; num_folds optional, the prepared dataset's own folds are used).
      read_train_labels: read the label of every train record (default: when balanced
        sampling is on). Costs one pass over the records without JPEG decoding: ~80 us/record on
        the sample at 256 px (mostly reading the record bytes), so ~3 s for ISIC 2020's 33k.

    Returns:
      (train_source, val_source, info); the sources yield record dicts with raw JPEG bytes.
    """
    import tensorflow_datasets as tfds

    from isic_jax.data.isic import fold_names, train_val_splits

    if len(L.release_parts(data_config.release)) > 1:
        return _load_union(data_config)
    builder = _builder(data_config)
    metadata = dict(builder.info.metadata or {})
    num_folds = _num_folds(builder)
    val_fold = int(data_config.val_fold)
    if val_fold < 0:
        train_split, val_split = "+".join(fold_names(num_folds)), None
    else:
        train_split, val_split = train_val_splits(num_folds, val_fold)
    raw = tfds.decode.DeserializeMethod.RAW_BYTES
    train = TfExampleSource(builder.as_data_source(split=train_split, deserialize_method=raw))
    val = None
    if val_split is not None:
        val = TfExampleSource(builder.as_data_source(split=val_split, deserialize_method=raw))
    key = pipeline.label_key(data_config.task)
    names = list(builder.info.features[key].names)

    if read_train_labels is None:
        read_train_labels = bool(data_config.get("balanced_sampling", False))
    train_counts = _split_counts(metadata, key, train_split)
    val_counts = (np.zeros(len(names), np.int64) if val is None
                  else _split_counts(metadata, key, val_split))
    train_labels, seconds = None, 0.0
    if read_train_labels or train_counts is None:
        start = time.perf_counter()
        train_labels = pipeline.read_labels(train, key)
        seconds = time.perf_counter() - start
        counts = np.bincount(train_labels, minlength=len(names)).astype(np.int64)
        if train_counts is not None and not np.array_equal(counts, train_counts):
            raise ValueError(f"labels read {counts} differ from the metadata's {train_counts}")
        train_counts = counts
    if val_counts is None:
        val_labels = pipeline.read_labels(val, key)
        val_counts = np.bincount(val_labels, minlength=len(names)).astype(np.int64)
    info = SourceInfo(
        release=data_config.release,
        task=data_config.task,
        class_names=names,
        num_train=len(train),
        num_val=0 if val is None else len(val),
        train_class_counts=train_counts,
        val_class_counts=val_counts,
        train_split=train_split,
        val_split=val_split,
        train_labels=train_labels,
        label_read_seconds=seconds,
        sources=[str(data_config.release)],
        datasets=[_describe(str(data_config.release), builder, data_config)],
    )
    return train, val, info


def _load_union(data_config: Any) -> tuple[Any, Any, SourceInfo]:
    """`load_sources` for several releases: the union's folds (see `union`)."""
    import tensorflow_datasets as tfds

    from isic_jax.data.isic import fold_names

    raw = tfds.decode.DeserializeMethod.RAW_BYTES
    parts, datasets = [], []
    for release in L.release_parts(data_config.release):
        builder = _builder(data_config, release)
        k = _num_folds(builder)
        records = TfExampleSource(
            builder.as_data_source(split="+".join(fold_names(k)), deserialize_method=raw)
        )
        metadata = dict(builder.info.metadata or {})
        parts.append(union_lib.Part(
            release, records, list(builder.info.features["diagnosis"].names), k,
            int(metadata.get("fold_seed", 0)),
        ))  # fmt: skip
        datasets.append(_describe(release, builder, data_config))
    start = time.perf_counter()
    num_folds = data_config.get("num_folds")
    try:
        union = union_lib.open_union(parts, num_folds=None if num_folds is None else int(num_folds))
    except ValueError as exc:
        raise ValueError(f"config.data.release={data_config.release}: {exc}") from exc
    seconds = time.perf_counter() - start
    val_fold = int(data_config.val_fold)
    if val_fold >= union.num_folds:
        raise ValueError(
            f"config.data.val_fold={val_fold} must be < the union's {union.num_folds} folds"
        )
    folds = list(range(union.num_folds))
    train_folds = folds if val_fold < 0 else [f for f in folds if f != val_fold]
    train = union.source(train_folds)
    val = None if val_fold < 0 else union.source([val_fold])
    key = pipeline.label_key(data_config.task)
    names = list(L.LABEL_NAMES) if key == "label" else list(L.COMMON_CLASSES)
    pick = (lambda s: s.labels) if key == "label" else (lambda s: s.diagnoses)
    train_labels = pick(train).astype(np.int32)
    count = lambda s: np.bincount(pick(s), minlength=len(names)).astype(np.int64)
    info = SourceInfo(
        release=str(data_config.release),
        task=data_config.task,
        class_names=names,
        num_train=len(train),
        num_val=0 if val is None else len(val),
        train_class_counts=count(train),
        val_class_counts=np.zeros(len(names), np.int64) if val is None else count(val),
        train_split="+".join(f"fold{k}" for k in train_folds),
        val_split=None if val is None else f"fold{val_fold}",
        train_labels=train_labels,
        label_read_seconds=seconds,
        sources=[p.name for p in parts],
        datasets=datasets,
        union=union,
    )
    return train, val, info
