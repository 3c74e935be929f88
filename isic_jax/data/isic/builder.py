"""The `isic` TFDS builder: one BuilderConfig per ISIC release and stored image size.

Flow of `download_and_prepare` (TFDS writes into `<data_dir>/isic/<config>/incomplete.XXXX_1.1.0/`
and renames it to `1.1.0/` only when every split is written, so an interrupted build never looks
complete; an exception also deletes the temporary folder):

1. `_split_generators` reads the release's metadata (`releases.scan`): the candidates to decode and
   the inputs skipped for layout/metadata reasons. Folds are assigned on the candidates
   (`folds.assign_folds`), so a corrupt file never moves other images to another fold.
2. `_generate_examples` (one call per fold) decodes, validates and resizes the fold's images on a
   thread pool (`images.ordered_map`, results in input order). Images that fail are appended to
   the builder's skip list with the reason and yield nothing.
3. `_download_and_prepare` wraps TFDS's own generation: it lets the shuffler spill to disk without
   TensorFlow (`tfds_compat.shuffler_gfile`), sets PIL's decompression-bomb limit, then stores the
   class counts and options in `info.metadata` (metadata.json) and the full report, every skip
   included, in `isic_prepare_report.json` inside the temporary folder, so both appear atomically
   with the data.

Records (`as_data_source`): see `features()`; splits are "fold0" ... "fold{K-1}".

Versions: 1.1.0 added per-image metadata for the metadata branch and the model card (see
`RELEASE_NOTES`). A 1.0.0 dataset prepared before keeps working for everything it has
(`open_prepared` opens it from its folder); `isic-jax prepare` builds 1.1.0 beside it.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from isic_jax.data.isic import folds as folds_lib
from isic_jax.data.isic import images, releases, tfds_compat
from isic_jax.data.isic import labels as L
from isic_jax.data.isic.layouts import RELEASES as ENTRIES

VERSION = "1.1.0"
# Features each version added over the one before (`features`).
ADDED_IN: dict[str, tuple[str, ...]] = {
    "1.1.0": ("images_per_patient", "attribution", "copyright_license", "fitzpatrick", "tabular",
              "tabular_text"),
}
STANDARD_SIZES: tuple[int, ...] = (64, 96, 128, 192, 224, 256, 384, 512, 768, 1024)
DEFAULT_CONFIG = "isic2020_512"
REPORT_FILENAME = "isic_prepare_report.json"
INDETERMINATE_POLICIES = releases.INDETERMINATE_POLICIES


class NoUsableExamplesError(releases.SourceError):
    """The source (or one fold of it) has no example that could be used."""


@dataclasses.dataclass(eq=False)
class IsicConfig(tfds.core.BuilderConfig):
    """A release and the shorter side (px) its images are stored at. Name: f"{release}_{size}"."""

    release: str = "isic2020"
    image_size: int = 512


def _new_config(release: str, image_size: int) -> IsicConfig:
    return IsicConfig(
        name=f"{release}_{image_size}",
        description=f"ISIC {release}, shorter side {image_size} px",
        release=release,
        image_size=image_size,
    )


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    """Prepare-time options that are not part of the config name.

    All but `num_workers` change the content; they are stored in `info.metadata`, and `prepare`
    refuses to reuse a dataset built with other values.
    """

    num_folds: int = 5
    fold_seed: int = 0
    indeterminate: str = "skip"  # archive: Indeterminate diagnoses are skipped|benign|malignant
    max_pixels: int = images.DEFAULT_MAX_PIXELS  # larger images are skipped (decompression bomb)
    jpeg_quality: int = images.DEFAULT_JPEG_QUALITY
    num_workers: int = 0  # decode threads; 0: all cores

    def __post_init__(self) -> None:
        if self.num_folds < 2:
            raise ValueError(f"num_folds must be >= 2, got {self.num_folds}")
        if self.indeterminate not in INDETERMINATE_POLICIES:
            raise ValueError(f"indeterminate must be one of {INDETERMINATE_POLICIES}")
        if self.max_pixels < 1 or not 1 <= self.jpeg_quality <= 100:
            raise ValueError("max_pixels must be >= 1 and jpeg_quality in 1..100")

    def content(self) -> dict[str, Any]:
        """The options that determine the stored data."""
        out = dataclasses.asdict(self)
        del out["num_workers"]
        return out


def features(release: str, version: str = VERSION) -> tfds.features.FeaturesDict:
    """The features of one record (one image) of `release` in dataset `version`. Missing values
    are explicit, never dropped.

    1.1.0 adds: images_per_patient int32 (images of the same patient in the release, -1 without
    a patient id), attribution, copyright_license and fitzpatrick (text, "" = missing), and, for a
    release
    with `Release.tabular` columns, tabular float32 [T] (NaN = missing; the column names are
    `info.metadata["tabular_columns"]`) and with `Release.tabular_text` columns, tabular_text
    text [K] ("" = missing; `info.metadata["tabular_text_columns"]`).
    """
    entry = ENTRIES[release]
    new = {}
    if tfds.core.Version(version) >= tfds.core.Version("1.1.0"):
        new = {
            "images_per_patient": tfds.features.Scalar(dtype=np.int32),  # -1 = no patient id
            "attribution": tfds.features.Text(),  # "" = missing
            "copyright_license": tfds.features.Text(),  # "" = missing
            # Fitzpatrick skin type as the metadata writes it (I-VI; "" = missing).
            "fitzpatrick": tfds.features.Text(),
        }
        if entry.tabular:
            new["tabular"] = tfds.features.Tensor(shape=(len(entry.tabular),), dtype=np.float32)
        if entry.tabular_text:
            new["tabular_text"] = tfds.features.Tensor(
                shape=(len(entry.tabular_text),), dtype=np.object_
            )
    return tfds.features.FeaturesDict(
        {
            # JPEG bytes, RGB, shorter side = image_size (decode with PIL, or SkipDecoding).
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
            "image_id": tfds.features.Text(),
            "label": tfds.features.ClassLabel(names=L.LABEL_NAMES),
            "diagnosis": tfds.features.ClassLabel(names=L.DIAGNOSIS_CLASSES[release]),
            "patient_id": tfds.features.Text(),  # "" = missing
            "lesion_id": tfds.features.Text(),  # "" = missing
            "age": tfds.features.Scalar(dtype=np.int32),  # -1 = missing
            "sex": tfds.features.ClassLabel(names=L.SEX_NAMES),  # 0 = unknown
            "anatom_site": tfds.features.Text(),  # "unknown" = missing
            "fold": tfds.features.Scalar(dtype=np.int32),
            **new,
        }
    )


class Isic(tfds.core.GeneratorBasedBuilder):
    """ISIC dermoscopy images, benign/malignant + diagnosis, in K patient-grouped folds."""

    RELEASE_NOTES = {  # keyed by the version string (before VERSION is rebound below)
        "1.0.0": "Releases archive and isic2016-isic2024; K patient-grouped stratified folds.",
        "1.1.0": "Per-image metadata: images_per_patient, attribution, copyright_license, "
        "fitzpatrick (skin type); "
        "tabular (float32, NaN = missing) and tabular_text: the release's other metadata "
        "columns (ISIC 2024: clin_size_long_diam_mm and the tbp_lv_* lesion measurements), "
        "names in info.metadata. ISIC 2020 also from the "
        "Kaggle DICOM files. Re-run `isic-jax prepare` to get it (it is built beside 1.0.0).",
    }
    VERSION = tfds.core.Version(VERSION)
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download one ISIC release yourself (https://challenge.isic-archive.com/data/, Kaggle "
        "for 2020/2024, or `isic image download` for the Archive), extract it into one folder, "
        "and run `isic-jax prepare --source FOLDER --data-dir DIR` (or pass "
        "`download_config=tfds.download.DownloadConfig(manual_dir=FOLDER)`). Layouts read:\n"
        + "\n".join(f"  {r}: {text}" for r, text in releases.EXPECTED.items())
    )
    BUILDER_CONFIGS = [
        _new_config(release, size) for release in L.RELEASES for size in STANDARD_SIZES
    ]
    DEFAULT_BUILDER_CONFIG_NAME = DEFAULT_CONFIG
    # TFDS would infer this through importlib.resources; setting it avoids the lookup.
    pkg_dir_path = epath.Path(__file__).parent

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:  # see tfds_compat (importlib_resources)
        return tfds_compat.code_path(__file__)

    def __init__(self, *, options: BuildOptions | None = None, **kwargs: Any):
        self.options = options or BuildOptions()
        self.report: dict[str, Any] | None = None  # set by download_and_prepare
        self._skipped: list[releases.Skip] = []
        self._scan: releases.Scan | None = None
        self._counts: dict[str, dict[str, list[int]]] = {}
        # Images per attribution / licence in the source metadata (those written).
        self._attributions: collections.Counter[str] = collections.Counter()
        self._licenses: collections.Counter[str] = collections.Counter()
        self._images_per_patient: dict[str, int] = {}
        super().__init__(**kwargs)

    @property
    def release(self) -> str:
        return self.builder_config.release

    @property
    def image_size(self) -> int:
        return self.builder_config.image_size

    def _info(self) -> tfds.core.DatasetInfo:
        cfg = self.builder_config
        return self.dataset_info_from_configs(
            description=(
                f"ISIC {cfg.release} dermoscopy images (JPEG, shorter side {cfg.image_size} px), "
                "benign/malignant label and diagnosis, patient-grouped stratified folds."
            ),
            features=features(cfg.release, str(self.version)),
            supervised_keys=("image", "label"),
            homepage="https://www.isic-archive.com",
            citation=ENTRIES[cfg.release].citation,
            metadata=tfds.core.MetadataDict(),
        )

    # ------------------------------------------------------------------ generation

    def _download_and_prepare(self, dl_manager, download_config) -> None:  # noqa: ANN001
        start = time.perf_counter()
        self._skipped, self._counts, self._scan = [], {}, None
        self._attributions.clear()
        self._licenses.clear()
        with tfds_compat.shuffler_gfile(), images.pil_limits(self.options.max_pixels):
            super()._download_and_prepare(dl_manager=dl_manager, download_config=download_config)
        seconds = time.perf_counter() - start
        self.report = self._make_report(seconds)
        self.info.metadata.update(self._metadata())
        (self.data_path / REPORT_FILENAME).write_text(json.dumps(self.report, indent=1))

    def _split_generators(self, dl_manager) -> dict[str, Iterator]:  # noqa: ANN001
        scan = releases.scan(
            self.release, os.fspath(dl_manager.manual_dir), indeterminate=self.options.indeterminate
        )
        self._scan = scan
        self._skipped.extend(scan.skipped)
        if not scan.candidates:
            raise NoUsableExamplesError(no_usable_message(scan.source, self._skipped))
        cands = scan.candidates
        # Over the images of the release that can be used (before decoding: a corrupt file of a
        # patient is still one of that patient's photographs).
        self._images_per_patient = dict(
            collections.Counter(c.patient_id for c in cands if c.patient_id)
        )
        try:
            fold_of = folds_lib.assign_folds(
                [c.group for c in cands],
                [c.label for c in cands],
                self.options.num_folds,
                diagnoses=[c.diagnosis for c in cands],
                seed=self.options.fold_seed,
            )
        except ValueError as exc:  # fewer patient/lesion/image groups than folds
            raise releases.SourceError(f"{scan.source}: {exc}") from exc
        return {
            f"fold{k}": self._generate_examples(
                candidates=[c for c, f in zip(cands, fold_of, strict=True) if f == k], fold=k
            )
            for k in range(self.options.num_folds)
        }

    def _inputs(
        self, candidates: Sequence[releases.Candidate]
    ) -> Iterator[tuple[releases.Candidate, str | bytes | images.BadImage]]:
        """(candidate, path or encoded bytes or the reason it cannot be read), in order.

        HDF5 reads happen here, in the generating thread (h5py is not for concurrent use).
        """
        h5 = None
        try:
            for cand in candidates:
                if cand.hdf5_key is None:
                    yield cand, cand.path
                    continue
                if h5 is None:
                    import h5py

                    h5 = h5py.File(cand.path, "r")
                try:
                    payload = _hdf5_bytes(h5[cand.hdf5_key])
                except Exception as exc:  # noqa: BLE001 - one unreadable entry is one skip
                    payload = images.BadImage(f"cannot read from HDF5 ({exc})")
                yield cand, payload
        finally:
            if h5 is not None:
                h5.close()

    def _generate_examples(
        self, candidates: Sequence[releases.Candidate], fold: int
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        size, opts = self.image_size, self.options

        def work(item: tuple[releases.Candidate, Any]) -> tuple[releases.Candidate, Any]:
            cand, payload = item
            if isinstance(payload, images.BadImage):
                return cand, payload
            try:
                return cand, images.process_image(
                    payload, size, max_pixels=opts.max_pixels, quality=opts.jpeg_quality
                )
            except images.BadImage as exc:
                return cand, exc

        split = f"fold{fold}"
        counts = self._counts[split] = {
            "label": [0] * len(L.LABEL_NAMES),
            "diagnosis": [0] * len(L.DIAGNOSIS_CLASSES[self.release]),
        }
        workers = opts.num_workers or images.default_num_workers()
        keys = set(self.info.features.keys())  # the features of the version being written
        for cand, result in images.ordered_map(work, self._inputs(candidates), workers):
            if isinstance(result, images.BadImage):
                self._skipped.append(releases.Skip(cand.image_id, str(result), "decode"))
                continue
            counts["label"][cand.label] += 1
            counts["diagnosis"][cand.diagnosis] += 1
            if cand.attribution:
                self._attributions[cand.attribution] += 1
            if cand.copyright_license:
                self._licenses[cand.copyright_license] += 1
            example = {
                "image": result,
                "image_id": cand.image_id,
                "label": cand.label,
                "diagnosis": cand.diagnosis,
                "patient_id": cand.patient_id,
                "lesion_id": cand.lesion_id,
                "age": np.int32(cand.age),
                "sex": cand.sex,
                "anatom_site": cand.anatom_site,
                "fitzpatrick": cand.fitzpatrick,
                "fold": np.int32(fold),
                "images_per_patient": np.int32(self._images_per_patient.get(cand.patient_id, -1)),
                "attribution": cand.attribution,
                "copyright_license": cand.copyright_license,
                "tabular": np.asarray(cand.tabular, np.float32),
                "tabular_text": np.asarray(cand.tabular_text, dtype=object),
            }
            yield cand.image_id, {k: v for k, v in example.items() if k in keys}
        if sum(counts["label"]) == 0:
            # TFDS cannot write an empty split; say why instead of its "No examples were yielded".
            raise NoUsableExamplesError(
                f"{split}: none of its {len(candidates)} images could be decoded. "
                + no_usable_message(self._scan.source if self._scan else "", self._skipped)
            )

    # ------------------------------------------------------------------ report

    def _metadata(self) -> dict[str, Any]:
        entry = ENTRIES[self.release]
        columns = {}
        if "images_per_patient" in self.info.features:  # 1.1.0 on
            columns = {
                "tabular_columns": list(entry.tabular),
                "tabular_text_columns": list(entry.tabular_text),
            }
        return {
            **columns,
            "release": self.release,
            "image_size": self.image_size,
            **self.options.content(),
            "label_names": L.LABEL_NAMES,
            "diagnosis_classes": L.DIAGNOSIS_CLASSES[self.release],
            "malignant_diagnoses": L.MALIGNANT_DIAGNOSES[self.release],
            "sex_names": L.SEX_NAMES,
            "label_counts": {s: c["label"] for s, c in self._counts.items()},
            "diagnosis_counts": {s: c["diagnosis"] for s, c in self._counts.items()},
            "num_skipped": len(self._skipped),
            "source": self._scan.source if self._scan else "",
        }

    def _make_report(self, seconds: float) -> dict[str, Any]:
        splits = {s: sum(c["label"]) for s, c in self._counts.items()}
        decoded = sum(splits.values()) + sum(1 for s in self._skipped if s.stage == "decode")
        return {
            "dataset": f"{self.name}/{self.builder_config.name}/{self.version}",
            "name": self.name,
            "config": self.builder_config.name,
            "version": str(self.version),
            "release": self.release,
            "image_size": self.image_size,
            "source": self._scan.source if self._scan else "",
            "source_files": dict(self._scan.files) if self._scan else {},
            "options": self.options.content(),
            "num_examples": sum(splits.values()),
            "splits": splits,
            "label_names": L.LABEL_NAMES,
            "diagnosis_classes": L.DIAGNOSIS_CLASSES[self.release],
            "label_counts": {
                s: dict(zip(L.LABEL_NAMES, c["label"], strict=True))
                for s, c in self._counts.items()
            },
            "diagnosis_counts": {
                s: dict(zip(L.DIAGNOSIS_CLASSES[self.release], c["diagnosis"], strict=True))
                for s, c in self._counts.items()
            },
            "num_skipped": len(self._skipped),
            # Images per attribution and per licence where the source metadata has them
            # (ISIC Archive exports, ISIC 2024), most frequent first; {} otherwise.
            "attributions": dict(self._attributions.most_common()),
            "licenses": dict(self._licenses.most_common()),
            "skipped": [s.to_json() for s in self._skipped],
            "seconds": round(seconds, 3),
            "images_decoded": decoded,
            "images_per_second": round(decoded / seconds, 2) if seconds > 0 else None,
            "num_workers": self.options.num_workers or images.default_num_workers(),
        }


def _hdf5_bytes(value: Any) -> bytes:
    """The encoded image stored in one HDF5 dataset (bytes string, opaque, or uint8 array)."""
    data = value[()]
    if isinstance(data, bytes):
        return data
    if isinstance(data, np.void):
        return data.tobytes()
    if isinstance(data, np.ndarray) and data.dtype == np.uint8:
        return data.tobytes()
    if isinstance(data, np.ndarray) and data.dtype.kind in "SV" and data.size == 1:
        return data.reshape(()).item() if data.dtype.kind == "S" else data.tobytes()
    raise images.BadImage(f"HDF5 entry holds {type(data).__name__}, not encoded image bytes")


def no_usable_message(source: str, skipped: Sequence[releases.Skip], limit: int = 10) -> str:
    """Why nothing could be used: the most frequent skip reasons."""
    reasons = collections.Counter(s.reason.split(" (")[0] for s in skipped)
    lines = [f"  {n} x {reason}" for reason, n in reasons.most_common(limit)]
    detail = "\n".join(lines) if lines else "  (no metadata row at all)"
    return f"no usable example in {source}; skipped inputs by reason:\n{detail}"


def config_for(release: str, image_size: int) -> IsicConfig:
    """The predefined config f"{release}_{image_size}", or a new one for another size."""
    if release not in L.RELEASES:
        raise ValueError(f"unknown release {release!r}; expected one of {', '.join(L.RELEASES)}")
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8 px, got {image_size}")
    name = f"{release}_{image_size}"
    for config in Isic.BUILDER_CONFIGS:
        if config.name == name:
            return config
    return _new_config(release, image_size)


def make_builder(
    release: str,
    image_size: int,
    data_dir: str | os.PathLike,
    num_folds: int = 5,
    *,
    options: BuildOptions | None = None,
) -> Isic:
    """The `isic` builder for `release` at `image_size` px under `data_dir` (array_record).

    For reading, `num_folds` does not matter (the prepared dataset's own splits are used), and
    `open_prepared` also opens an older version. For writing, `options` (if given) overrides
    `num_folds`.
    """
    options = options or BuildOptions(num_folds=num_folds)
    config = config_for(release, image_size)
    # A predefined config goes by name: TFDS re-creates a pickled builder (Grain workers) from
    # its constructor arguments and refuses a config object that is not the class's own.
    predefined = any(c is config for c in Isic.BUILDER_CONFIGS)
    return Isic(
        config=config.name if predefined else config,
        data_dir=os.fspath(os.path.expanduser(data_dir)),
        file_format="array_record",
        options=options,
    )


def prepared_versions(release: str, image_size: int, data_dir: str | os.PathLike) -> list[str]:
    """The versions of `<data_dir>/isic/<release>_<size>/` that are completely prepared (have a
    dataset_info.json), oldest first."""
    root = epath.Path(os.path.expanduser(os.fspath(data_dir)))
    folder = root / "isic" / f"{release}_{image_size}"
    if not folder.exists():
        return []
    found = []
    for child in folder.iterdir():
        try:
            version = tfds.core.Version(child.name)
        except ValueError:  # incomplete.* folders, stray files
            continue
        if (child / "dataset_info.json").exists():
            found.append(version)
    return [str(v) for v in sorted(found)]


def open_prepared(release: str, image_size: int, data_dir: str | os.PathLike) -> Any:
    """The prepared dataset to read: the builder of VERSION when that is prepared; else the
    newest older version, opened from its folder (`tfds.builder_from_directory`: its own
    features, e.g. a 1.0.0 dataset without the 1.1.0 metadata); else the (unprepared) VERSION
    builder, whose reads fail as TFDS's do.

    `version_of(builder)` says which one it is; `missing_features` what it lacks.
    """
    builder = make_builder(release, image_size, data_dir)
    # The version folders first: TFDS's own check warns about a missing VERSION folder.
    versions = prepared_versions(release, image_size, data_dir)
    if not versions or VERSION in versions:
        return builder
    return tfds.builder_from_directory(builder.data_path.parent / versions[-1])


def version_of(builder: Any) -> str:
    """The dataset version a builder reads ("1.0.0", "1.1.0")."""
    return str(builder.info.version)


def missing_features(builder: Any, names: Sequence[str]) -> list[str]:
    """The record features among `names` that the prepared dataset `builder` lacks."""
    have = set(builder.info.features.keys())
    return [n for n in names if n not in have]


def read_report(builder: Isic) -> dict[str, Any] | None:
    """The prepare report stored with a prepared dataset (None if absent)."""
    path = builder.data_path / REPORT_FILENAME
    return json.loads(path.read_text()) if path.exists() else None
