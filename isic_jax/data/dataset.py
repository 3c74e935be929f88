"""Opening a prepared dataset: the checks before anything is built, and `InputData`.

    check_prepared_dataset(config.data)       # DataNotFoundError with what to run, or nothing
    data = InputData(config)                  # sources + Grain pipelines of the run
    it = data.train_iterator()                # infinite, get_state/set_state
    for batch in data.eval_batches("val"): ...
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

from isic_jax import config_utils
from isic_jax.data import pipeline


class UnknownSplitError(ValueError):
    """An evaluation split that is neither val, train nor a split of the prepared dataset."""


def malignant_class_indices(task: str, release: str, class_names: list[str]) -> list[int]:
    """Classes counted as malignant: [1] for the binary task, else the release's malignant
    diagnoses (datasets.isic.MALIGNANT_DIAGNOSES)."""
    if task == "binary":
        return [1]
    from isic_jax.data.isic import MALIGNANT_DIAGNOSES

    malignant = set(MALIGNANT_DIAGNOSES[release])
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
    release, size = str(data_config.release), int(data_config.stored_size)
    name = f"{release}_{size}"
    prepare = (f"isic-jax prepare --source YOUR_{release.upper()}_DOWNLOAD --data-dir {data_dir} "
               f"--image-size {size}")
    if not data_dir.is_dir():
        raise DataNotFoundError(
            f"config.data.data_dir={data_config.data_dir} does not exist ({data_dir}). Prepare "
            f"the dataset first: `{prepare}`, or pass --config.data.data_dir=DIR with the folder "
            f"`isic-jax prepare --data-dir` wrote."
        )
    found = _prepared_configs(data_dir)
    if name in found:
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


class InputData:
    """The run's data: sources from `load_sources` and the Grain pipelines on them.

    Args:
      config: the resolved config.
      sources: (train_source, val_source, info) as `load_sources` returns them; opened from
        config.data when None (tests pass in-memory sources).
      read_train_labels: passed to `load_sources` (default: when balanced sampling needs them;
        False where nothing is trained, e.g. evaluate).
    """

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        sources: tuple | None = None,
        *,
        read_train_labels: bool | None = None,
    ):
        self._config = config
        if sources is None:
            check_prepared_dataset(config.data)
            sources = load_sources(config.data, read_train_labels=read_train_labels)
        self.train_source, self.val_source, self.info = sources

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

    def train_iterator(self) -> Iterator[dict[str, np.ndarray]]:
        """Infinite iterator of this process's training batches (get_state/set_state)."""
        ds = pipeline.create_train_dataset(
            self.train_source,
            self._config.data,
            int(self._config.train.batch_size),
            int(self._config.seed),
            labels=getattr(self.info, "train_labels", None),
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

        builder = _builder(self._config.data)
        known = sorted(builder.info.splits)
        parts = split.split("+")
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
            self.source(split), self._config.data, int(self._config.eval.batch_size)
        )


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


def _builder(data_config: Any) -> Any:
    from isic_jax.data.isic import make_builder

    return make_builder(
        data_config.release,
        data_config.stored_size,
        os.path.expanduser(str(data_config.data_dir)),
        num_folds=int(data_config.get("num_folds", config_utils.DEFAULT_NUM_FOLDS)),
    )


def _num_folds(builder: Any) -> int:
    metadata = dict(builder.info.metadata or {})
    return int(
        metadata.get("num_folds") or sum(str(s).startswith("fold") for s in builder.info.splits)
    )


def prepared_num_folds(data_config: Any) -> int:
    """The number of folds (splits fold0..foldK-1) of the prepared dataset config.data names."""
    return _num_folds(_builder(data_config))


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
    )
    return train, val, info
