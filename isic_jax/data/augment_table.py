"""The table of every augmentation: its `config.data.augment` keys, their checks, where it runs,
what it does and where it comes from. Imports no jax (config validation reads it).

    config_checks()                      # {"data.augment.<key>": check(value) -> problem | None}
    combination_problems(flat_config)    # ["config.data.augment.mixup_p ... needs ...", ...]
    AUGMENTATIONS                        # the rows, in the order the device applies them

`config_utils.validate_config` takes the value check of every `data.augment.*` key from here and
raises the first combination problem; `docs/augmentation.md` describes the same rows for users
(tests/test_augment_ops.py checks that the table, configs/default.py and the doc list the same
keys). Adding an augmentation = a row here + its key in configs/default.py + its op (device ops
in `augment_ops.py` / `device_augment.py`, pair mixing in `mixing.py`).

Where: "host" (data/pipeline.py + image_ops.py, in the Grain workers), "device" (per example in
`device_augment.augment_batch`, inside the jitted step), "pairs" (`mixing.mix_batch`: two
examples of the global batch and their labels, inside the jitted step, training only).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from isic_jax.data.image_ops import RESAMPLE
from isic_jax.value_checks import Check, boolean, choice, integer, number, pair, probability

# Label tasks whose targets are one class index per example (`data.task`; losses one-hot them):
# the ones pair mixing can blend into soft targets. Every task today is; a multi-label task
# added later must be listed here before mixup/cutmix may run with it.
SINGLE_LABEL_TASKS = ("binary", "diagnosis")


# --------------------------------------------------------------------------- the table


@dataclasses.dataclass(frozen=True)
class Param:
    """One key of `config.data.augment`: its name, value check and meaning."""

    key: str
    check: Check
    doc: str


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """One augmentation (or regulariser applied to the input): a row of the table."""

    name: str
    where: str  # "host" | "device" | "pairs"
    params: tuple[Param, ...]
    summary: str
    source: str


AUGMENTATIONS: tuple[Augmentation, ...] = (
    Augmentation(
        "random resized crop", "host",
        (Param("crop_scale", pair(0.0, 1.0), "area fraction (low, high) of the crop"),
         Param("crop_ratio", pair(0.0, None), "aspect ratio (low, high) of the crop"),
         Param("interpolation", choice(tuple(sorted(RESAMPLE))), "the host's resize filter")),
        "Crop a random area/aspect of the stored image and resize it to data.image_size.",
        "Szegedy et al. 2015 (Inception); ISIC 2019 1st place (Gessert et al. 2020)."),
    Augmentation(
        "dihedral flips", "device",
        (Param("dihedral", boolean, "one of the 8 flips/transposes, uniformly"),),
        "Flips and transposes: lesions have no canonical orientation.",
        "SIIM-ISIC 2020 1st place (Ha et al. 2020: Transpose, VerticalFlip, HorizontalFlip)."),
    Augmentation(
        "rotation", "device",
        (Param("rotation", number(0.0, 180.0), "max degrees; angle uniform in [-r, r]"),),
        "Rotation about the centre (bilinear; corners by reflection).",
        "ISIC 2019 1st place (Gessert et al. 2020); ISIC 2020 1st place (ShiftScaleRotate)."),
    Augmentation(
        "affine (shift / scale / shear)", "device",
        (Param("affine_p", probability, "probability per image"),
         Param("affine_scale", number(0.0, 1.0, hi_open=True),
               "zoom factor uniform in [1 - s, 1 + s]"),
         Param("affine_shear", number(0.0, 45.0), "shear angle uniform in [-d, d] degrees"),
         Param("affine_translate", number(0.0, 0.5),
               "shift uniform in [-t, t] x the side, per axis")),
        "Zoom, shear and shift, in the same bilinear resampling as flips and rotation.",
        "SIIM-ISIC 2020 1st place (albumentations ShiftScaleRotate: shift 0.1, scale 0.1)."),
    Augmentation(
        "elastic (grid) distortion", "device",
        (Param("elastic_p", probability, "probability per image"),
         Param("elastic_magnitude", number(0.0, 0.25),
               "max displacement of a control point, x the side"),
         Param("elastic_grid", integer(2, 64), "control points per side")),
        "A smooth random displacement field (a coarse grid of random shifts, bilinearly "
        "upsampled) added to the resampling coordinates: local stretching of the skin.",
        "Simard et al. 2003 (elastic); SIIM-ISIC 2020 1st place (Optical/Grid/ElasticTransform)."),
    Augmentation(
        "colour jitter", "device",
        (Param("brightness", number(0.0), "factor uniform in [max(0, 1 - v), 1 + v]"),
         Param("contrast", number(0.0), "factor uniform in [max(0, 1 - v), 1 + v]"),
         Param("saturation", number(0.0), "factor uniform in [max(0, 1 - v), 1 + v]"),
         Param("hue", number(0.0, 0.5), "shift uniform in [-h, h] turns")),
        "Brightness, contrast, saturation and hue as one colour matrix per image.",
        "ISIC 2019 1st place; SIIM-ISIC 2020 1st place (RandomBrightness/Contrast, "
        "HueSaturationValue)."),
    Augmentation(
        "colour constancy", "device",
        (Param("color_constancy", boolean, "Shades of Gray (p = 6), training and evaluation"),),
        "Normalises the illuminant of each image (also at evaluation and export).",
        "Finlayson & Trezzi 2004; ISIC 2018/2019 1st places (Gessert et al.)."),
    Augmentation(
        "gamma", "device",
        (Param("gamma_p", probability, "probability per image"),
         Param("gamma", number(0.0, 1.0, hi_open=True), "gamma uniform in [1 - g, 1 + g]")),
        "Contrast curve 255 (x / 255)^gamma per image.",
        "albumentations RandomGamma; a cheap stand-in for CLAHE (SIIM-ISIC 2020 1st place)."),
    Augmentation(
        "Gaussian blur", "device",
        (Param("blur_p", probability, "probability per image"),
         Param("blur_sigma", number(0.0, 8.0), "sigma uniform in [0, s] pixels")),
        "Separable Gaussian blur with a per-image sigma (kernel radius ceil(3 s)).",
        "SIIM-ISIC 2020 1st place (OneOf Motion/Median/GaussianBlur)."),
    Augmentation(
        "Gaussian noise", "device",
        (Param("noise_p", probability, "probability per image"),
         Param("noise_std", number(0.0, 0.5), "per-image std uniform in [0, s] x 255")),
        "Additive per-pixel Gaussian noise, clipped to [0, 255].",
        "SIIM-ISIC 2020 1st place (GaussNoise)."),
    Augmentation(
        "cutout (coarse dropout)", "device",
        (Param("cutout_p", probability, "probability per image"),
         Param("cutout_size", number(0.0, 1.0, lo_open=True), "hole side, x the image side"),
         Param("cutout_holes", integer(1, 16), "holes per image")),
        "Square holes at uniform centres (clipped at the border), filled with the "
        "normalisation mean (0 in the model input).",
        "DeVries & Taylor 2017; SIIM-ISIC 2020 1st place (Cutout, 0.375 x the side)."),
    Augmentation(
        "mixup", "pairs",
        (Param("mixup_p", probability, "probability per pair"),
         Param("mixup_alpha", number(0.0), "lambda ~ Beta(alpha, alpha); > 0 when mixup_p > 0")),
        "Blends two examples and their (smoothed) one-hot labels with one lambda.",
        "Zhang et al. 2018 (mixup); timm Mixup."),
    Augmentation(
        "cutmix", "pairs",
        (Param("cutmix_p", probability, "probability per pair"),
         Param("cutmix_alpha", number(0.0), "lambda ~ Beta(alpha, alpha); > 0 when cutmix_p > 0")),
        "Pastes a box of the partner (area 1 - lambda); labels mixed by the box's true area.",
        "Yun et al. 2019 (CutMix); timm Mixup (cutmix_alpha 1.0)."),
)


def by_key() -> dict[str, tuple[Augmentation, Param]]:
    """{key: (its augmentation, its Param)} over the whole table."""
    return {p.key: (aug, p) for aug in AUGMENTATIONS for p in aug.params}


def config_checks(prefix: str = "data.augment") -> dict[str, Check]:
    """{"<prefix>.<key>": value check} for every key of the table."""
    return {f"{prefix}.{key}": param.check for key, (_, param) in by_key().items()}


def combination_problems(flat: Mapping[str, Any], prefix: str = "data.augment") -> list[str]:
    """Problems of combinations of keys (each message names its keys), for a flat config
    ({"data.augment.mixup_p": 0.5, "train.batch_size": 256, ...}) whose single values passed
    `config_checks`. Missing keys count as off."""
    get = lambda key, default=0.0: flat.get(f"{prefix}.{key}", default)
    problems = []
    for name in ("mixup", "cutmix"):
        if get(f"{name}_p") > 0 and get(f"{name}_alpha") <= 0:
            problems.append(
                f"config.{prefix}.{name}_alpha must be > 0 when config.{prefix}.{name}_p > 0 "
                f"(lambda ~ Beta(alpha, alpha)), got {get(f'{name}_alpha')}")
    mixing = get("mixup_p") > 0 or get("cutmix_p") > 0
    if get("mixup_p") + get("cutmix_p") > 1 + 1e-9:
        problems.append(
            f"config.{prefix}.mixup_p + config.{prefix}.cutmix_p must be <= 1 (each pair gets "
            f"cutmix, mixup or neither), got {get('mixup_p')} + {get('cutmix_p')}")
    if mixing:
        batch = flat.get("train.batch_size")
        if isinstance(batch, int) and batch % 2:
            problems.append(
                f"config.{prefix}.mixup_p / cutmix_p pair examples 2k and 2k+1 of the training "
                f"stream: config.train.batch_size must be even, got {batch}")
        task = flat.get("data.task")
        if task is not None and task not in SINGLE_LABEL_TASKS:
            problems.append(
                f"config.{prefix}.mixup_p / cutmix_p blend one-hot labels: config.data.task="
                f"{task!r} is not a single-label task ({', '.join(SINGLE_LABEL_TASKS)})")
    return problems
