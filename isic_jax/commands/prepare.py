"""`isic-jax prepare`: build the `isic` TFDS dataset from a manual ISIC download.

isic-jax prepare --source ~/isic2020 --data-dir ~/tensorflow_datasets --image-size 512 \
    [--format auto|archive|isic2016|...|isic2024] [--num-folds 5] [--report prepare.json]

Prints the dataset name and config, examples and class counts per split, and every skipped input
with its reason. Exit status 4 (`commands.ExitCode.DATA`, message on stderr) for a layout that
matches no release, a source with no usable example, or an existing dataset built with other
options. A second run over the
same output is a no-op and says so.
"""

from __future__ import annotations

import tensorflow_datasets as tfds
from absl import flags

from isic_jax import logging_utils
from isic_jax.commands import ExitCode, fail, no_arguments, underscore_alias
from isic_jax.data import prepare as prepare_lib
from isic_jax.data.isic import builder as isic_lib

_SOURCE = flags.DEFINE_string("source", None, "Folder holding the manual download.", required=True)
# Dashed names as the docs spell them (--data-dir); the underscore spellings are aliases.
_DATA_DIR = underscore_alias(flags.DEFINE_string(
    "data-dir", "~/tensorflow_datasets", "TFDS data_dir to write the dataset into."
))
_FORMAT = flags.DEFINE_enum(
    "format",
    "auto",
    list(prepare_lib.FORMATS),
    "Release layout of --source; auto recognises it from its files.",
)
_IMAGE_SIZE = underscore_alias(flags.DEFINE_integer(
    "image-size",
    prepare_lib.DEFAULT_IMAGE_SIZE,
    "Shorter side of the stored images, px (aspect ratio kept).",
    lower_bound=8,
))
_NUM_FOLDS = underscore_alias(flags.DEFINE_integer(
    "num-folds", 5, "Patient-grouped stratified folds (splits fold0..foldK-1).", lower_bound=2
))
_REPORT = flags.DEFINE_string("report", None, "Also write the report as JSON to this file.")
_INDETERMINATE = flags.DEFINE_enum(
    "indeterminate",
    "skip",
    list(isic_lib.INDETERMINATE_POLICIES),
    "archive: what an Indeterminate diagnosis becomes (skipped by default).",
)
_MAX_PIXELS = underscore_alias(flags.DEFINE_integer(
    "max-pixels",
    prepare_lib.DEFAULT_MAX_PIXELS,
    "Images with more pixels are skipped as decompression bombs.",
    lower_bound=1,
))
_JPEG_QUALITY = underscore_alias(flags.DEFINE_integer(
    "jpeg-quality", prepare_lib.DEFAULT_JPEG_QUALITY, "Quality of the stored JPEGs.", 1, 100
))
_NUM_WORKERS = underscore_alias(flags.DEFINE_integer(
    "num-workers", 0, "Decode threads (0: all cores).", lower_bound=0
))
_FOLD_SEED = underscore_alias(
    flags.DEFINE_integer("fold-seed", 0, "Salts the fold assignment's tie-breaking.")
)


def main(argv: list[str]) -> None:
    no_arguments(argv)
    if not logging_utils.use_progress_bar(True):
        tfds.disable_progress_bar()  # no TTY or CI: TFDS's bars would only litter the log
    try:
        report = prepare_lib.prepare(
            _SOURCE.value,
            _DATA_DIR.value,
            fmt=_FORMAT.value,
            image_size=_IMAGE_SIZE.value,
            num_folds=_NUM_FOLDS.value,
            fold_seed=_FOLD_SEED.value,
            indeterminate=_INDETERMINATE.value,
            max_pixels=_MAX_PIXELS.value,
            jpeg_quality=_JPEG_QUALITY.value,
            num_workers=_NUM_WORKERS.value,
            report_path=_REPORT.value,
        )
    except prepare_lib.PrepareError as exc:
        fail("prepare", f"error: {exc}", ExitCode.DATA)
    print(prepare_lib.format_summary(report))
    if _REPORT.value:
        print(f"\nreport written to {_REPORT.value}")
