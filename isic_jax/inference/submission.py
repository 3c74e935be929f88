"""ISIC challenge submission files: the exact columns of 2019, 2020 and 2024.

    table = submission_table("isic2019", rows, class_names)   # header + one row per image

ISIC 2019 asks for the 8 training diagnoses plus UNK; a model trained on another release's
classes is mapped onto them (`isic2019_matrix`: AKIEC (2018) is actinic keratosis +
intraepithelial carcinoma, 2019's AK; "unknown"/"other" (Archive classes) are UNK). ISIC 2020
and 2024 ask for the malignant probability as `target`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from isic_jax.data.isic import labels

# The submission columns: the 8 training diagnoses plus UNK (test set only).
ISIC2019_CLASSES: tuple[str, ...] = (*labels.DIAGNOSIS_CLASSES["isic2019"], "UNK")
SUBMISSION_COLUMNS: dict[str, tuple[str, ...]] = {
    "isic2019": ("image", *ISIC2019_CLASSES),
    "isic2020": ("image_name", "target"),
    "isic2024": ("isic_id", "target"),
}
# Model class names of the other releases -> ISIC 2019 columns. AKIEC (2018) is actinic
# keratosis + intraepithelial carcinoma: 2019's AK. "unknown"/"other" (Archive classes) are
# outside the 8 diagnoses: UNK.
ISIC2019_ALIASES: dict[str, str] = {
    "melanoma": "MEL",
    "nevus": "NV",
    "seborrheic_keratosis": "BKL",
    "AKIEC": "AK",
    "unknown": "UNK",
    "other": "UNK",
}


class SubmissionError(ValueError):
    """The model's classes cannot fill the asked-for submission columns."""


def isic2019_matrix(class_names: Sequence[str]) -> np.ndarray:
    """float32 [C, 9]: model class i -> ISIC 2019 column (ISIC2019_CLASSES); rows one-hot.

    Raises:
      SubmissionError: a binary model, or a class with no 2019 column.
    """
    names = list(class_names)
    if sorted(n.lower() for n in names) == ["benign", "malignant"]:
        raise SubmissionError(
            "--submission isic2019 needs the 2019 diagnosis classes (MEL, NV, BCC, ...), but "
            "this model is binary (benign, malignant): train with config.data.task='diagnosis'"
        )
    matrix = np.zeros((len(names), len(ISIC2019_CLASSES)), np.float32)
    unmapped = []
    for i, name in enumerate(names):
        column = name if name in ISIC2019_CLASSES else ISIC2019_ALIASES.get(name)
        if column is None:
            unmapped.append(name)
            continue
        matrix[i, ISIC2019_CLASSES.index(column)] = 1.0
    if unmapped:
        raise SubmissionError(
            f"--submission isic2019: the model's classes {unmapped} have no ISIC 2019 column "
            f"({', '.join(ISIC2019_CLASSES)})"
        )
    return matrix


def submission_table(
    submission: str,
    image_ids: Sequence[str],
    probs: np.ndarray,
    class_names: Sequence[str],
    malignant_classes: Sequence[int],
) -> tuple[tuple[str, ...], list[list[Any]]]:
    """(header, rows) of an ISIC submission file.

    probs float32 [N, C] in class_names order. isic2020/isic2024: target = the malignant
    probability (sum over malignant_classes); isic2019: the model's classes summed into the 9
    columns (UNK 0 unless the model has unknown/other classes).
    """
    if submission not in SUBMISSION_COLUMNS:
        raise SubmissionError(
            f"unknown submission {submission!r}; known: {', '.join(SUBMISSION_COLUMNS)}"
        )
    header = SUBMISSION_COLUMNS[submission]
    probs = np.asarray(probs, np.float32).reshape(len(image_ids), len(class_names))
    if submission == "isic2019":
        values = probs @ isic2019_matrix(class_names)
    else:
        values = probs[:, list(malignant_classes)].sum(axis=1, keepdims=True)
    rows = [[i, *[format_probability(v) for v in row]]
            for i, row in zip(image_ids, values, strict=True)]
    return header, rows


def format_probability(value: float) -> str:
    """A probability as CSV text (7 significant digits)."""
    return f"{float(value):.7g}"
