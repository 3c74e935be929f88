"""`isic-jax synth`: write a synthetic ISIC-like dataset in an official release layout.

isic-jax synth --output /tmp/isic2020 --format isic2020 --num-images 600 --seed 0
"""

from __future__ import annotations

from absl import flags

from isic_jax.commands import no_arguments, underscore_alias
from isic_jax.data import synth

_OUTPUT = flags.DEFINE_string("output", None, "Folder to write the dataset into.", required=True)
_FORMAT = flags.DEFINE_enum(
    "format", "isic2020", list(synth.LAYOUTS),
    "Release layout to write (isic2020_dicom: the Kaggle copy, train.csv + train/*.dcm).",
)
# Dashed names as the docs spell them (--num-images); the underscore spellings are aliases.
_NUM_IMAGES = underscore_alias(
    flags.DEFINE_integer("num-images", 600, "Number of images.", lower_bound=1)
)
_SEED = flags.DEFINE_integer("seed", 0, "Same seed, same bytes.")
_MALIGNANT_FRACTION = underscore_alias(flags.DEFINE_float(
    "malignant-fraction",
    None,
    f"Share of malignant images (default {synth.DEFAULT_MALIGNANT_FRACTION}).",
    lower_bound=0.0,
    upper_bound=1.0,
))
_IMAGE_SIZE = underscore_alias(flags.DEFINE_integer(
    "image-size",
    synth.DEFAULT_IMAGE_SIZE,
    "Longer image side in px (isic2024: side of the square tiles).",
    lower_bound=16,
))


def main(argv: list[str]) -> None:
    no_arguments(argv)
    summary = synth.write_synthetic(
        _OUTPUT.value,
        _FORMAT.value,
        _NUM_IMAGES.value,
        _SEED.value,
        malignant_fraction=_MALIGNANT_FRACTION.value,
        image_size=_IMAGE_SIZE.value,
    )
    n, fmt, where = summary["num_images"], summary["format"], summary["output_dir"]
    print(f"wrote {n} synthetic {fmt} images to {where} in {summary['seconds']:.1f} s")
    labels = {k: v for k, v in summary["label_counts"].items() if v or k != "indeterminate"}
    print("  labels: " + ", ".join(f"{k} {v}" for k, v in labels.items()))
    print("  diagnoses: " + ", ".join(f"{k} {v}" for k, v in summary["diagnosis_counts"].items()))
    print(f"  patients {summary['num_patients']}, lesions {summary['num_lesions']}", end="")
    if summary["duplicates"]:
        print(f", duplicate pairs {len(summary['duplicates'])}", end="")
    print()
    images = summary["image_dir"]
    print(f"  images: {images + '/' if images else '(top level)'}" if images is not None
          else f"  images: {summary['image_file']}")  # fmt: skip
    print("  metadata: " + ", ".join(summary["metadata_files"]))
