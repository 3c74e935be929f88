"""The ISIC TFDS builder (`isic`): official ISIC releases -> array_record, K patient-grouped folds.

    from isic_jax.datasets.isic import make_builder, train_val_splits
    builder = make_builder("isic2020", 512, data_dir)          # already prepared
    train_split, val_split = train_val_splits(builder.info.metadata["num_folds"], val_fold=0)
    source = builder.as_data_source(split=train_split,
                                    decoders={"image": tfds.decode.SkipDecoding()})

Modules: `labels` (releases, classes, value parsing), `releases` (layout readers), `images`
(decode + resize), `folds` (fold assignment), `isic` (the builder), `tfds_compat`.
"""

from isic_jax.datasets.isic.folds import assign_folds, fold_names, train_val_splits
from isic_jax.datasets.isic.isic import (
    DEFAULT_CONFIG,
    REPORT_FILENAME,
    STANDARD_SIZES,
    BuildOptions,
    Isic,
    IsicConfig,
    NoUsableExamplesError,
    config_for,
    features,
    make_builder,
    read_report,
)
from isic_jax.datasets.isic.labels import (
    ARCHIVE_CLASSES,
    DIAGNOSIS_CLASSES,
    LABEL_NAMES,
    MALIGNANT_DIAGNOSES,
    RELEASES,
    SEX_NAMES,
)
from isic_jax.datasets.isic.releases import (
    Candidate,
    ReleaseNotRecognisedError,
    Skip,
    SourceError,
    detect,
    scan,
)

IsicBuilder = Isic

__all__ = [
    "ARCHIVE_CLASSES",
    "DEFAULT_CONFIG",
    "DIAGNOSIS_CLASSES",
    "LABEL_NAMES",
    "MALIGNANT_DIAGNOSES",
    "RELEASES",
    "REPORT_FILENAME",
    "SEX_NAMES",
    "STANDARD_SIZES",
    "BuildOptions",
    "Candidate",
    "Isic",
    "IsicBuilder",
    "IsicConfig",
    "NoUsableExamplesError",
    "ReleaseNotRecognisedError",
    "Skip",
    "SourceError",
    "assign_folds",
    "config_for",
    "detect",
    "features",
    "fold_names",
    "make_builder",
    "read_report",
    "scan",
    "train_val_splits",
]
