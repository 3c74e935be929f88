"""The ISIC TFDS builder (`builder`): official ISIC releases -> array_record, K patient-grouped
folds.

    from isic_jax.data import isic
    builder = isic.make_builder("isic2020", 512, data_dir)          # already prepared
    train_split, val_split = isic.train_val_splits(builder.info.metadata["num_folds"], 0)

Modules: `layouts` (the release table: one entry per release, its layouts, readers, writers and
classes), `labels` (release names and classes from the table, value parsing; light), `releases`
(recognising and reading a source folder with the entries), `images` (decode + resize), `folds`
(fold assignment), `builder` (the TFDS builder), `tfds_compat`. Names are resolved on first use,
so that importing this package (or `labels`) does not import TFDS.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    **dict.fromkeys(("assign_folds", "fold_names", "train_val_splits"), "folds"),
    **dict.fromkeys(
        ("DEFAULT_CONFIG", "REPORT_FILENAME", "STANDARD_SIZES", "VERSION", "BuildOptions", "Isic",
         "IsicConfig", "NoUsableExamplesError", "config_for", "features", "make_builder",
         "missing_features", "open_prepared", "prepared_versions", "read_report", "version_of"),
        "builder",
    ),
    **dict.fromkeys(
        ("ARCHIVE_CLASSES", "COMMON_CLASSES", "COMMON_MALIGNANT", "DIAGNOSIS_CLASSES",
         "LABEL_NAMES", "MALIGNANT_DIAGNOSES", "RELEASES", "SEX_NAMES", "diagnosis_classes",
         "malignant_diagnoses", "release_parts"),
        "labels",
    ),
    **dict.fromkeys(
        ("Candidate", "ReleaseNotRecognisedError", "Skip", "SourceError", "detect", "scan"),
        "releases",
    ),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
