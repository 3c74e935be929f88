"""Features for a stacker: per image, the model's scores, its embedding, the metadata and the
patient's context, as CSV or Parquet (`isic-jax evaluate --features FILE`).

    table = feature_table(preds, class_names, malignant_classes, source, tabular_columns)
    write_table(table, "runs/r50/features.parquet")

One row per image of the split, columns:
- image_id, patient_id, source, label, prob_<class>..., malignant_probability;
- emb_0 ... emb_{D-1}: the penultimate-layer features (pooled image features, with the
  metadata branch's when the model has one);
- the metadata as recorded: age (NaN missing), sex, anatom_site, fitzpatrick,
  images_per_patient, and the release's tabular columns by their ISIC names (ISIC 2024: the
  `tbp_lv_*` measurements, NaN missing);
- the patient context ("ugly duckling": how an image stands out among the same patient's):
  patient_num_images, patient_rank (1 = the highest malignant probability of the patient),
  malignant_probability_minus_patient_mean, and `<column>_minus_patient_mean` for every numeric
  metadata column; NaN for images without a patient id.

With the out-of-fold predictions of `isic-jax cv` (one file per fold, each on its own validation
fold), the concatenation is what a LightGBM/XGBoost stacker trains on (docs/metadata.md).
"""

from __future__ import annotations

import math
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from isic_jax import metrics as isic_metrics
from isic_jax.data.isic import labels as L
from isic_jax.utils import as_bytes, write_csv

FORMATS = (".csv", ".parquet")


def _record_number(record: Mapping[str, Any], key: str) -> float:
    value = record.get(key)
    if value is None:
        return math.nan
    value = float(value if not isinstance(value, (list, tuple)) else value[0])
    return value if value >= 0 else math.nan  # -1 marks a missing count


def feature_table(
    preds: Any,
    class_names: Sequence[str],
    malignant_classes: Sequence[int],
    source: Any,
    tabular_columns: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, list[Any]]:
    """The columns of the module docstring, {name: N values}, in order.

    Args:
      preds: `predictions.Predictions` with `embedding` (`predict_checkpoint(...,
        with_embedding=True)`).
      class_names, malignant_classes: the task's classes.
      source: the split's records (`InputData.source(split)`), which `preds.index` indexes (for
        images_per_patient and the tabular columns).
      tabular_columns: {release: names of its records' `tabular` vector} (the prepared
        datasets' info.metadata["tabular_columns"]; a record's release is its `source`).
    """
    n = len(preds.labels)
    if preds.embedding is None:
        raise ValueError("the predictions carry no embedding (predict with with_embedding=True)")
    _, score = isic_metrics.malignant_score(preds.probs, preds.labels, list(malignant_classes))
    records = [source[int(i)] for i in preds.index]
    table: dict[str, list[Any]] = {
        "image_id": list(preds.image_id),
        "patient_id": list(preds.patient_id),
        "source": list(preds.source),
        "label": [int(v) for v in preds.labels],
    }
    for k, name in enumerate(class_names):
        table[f"prob_{name}"] = [float(v) for v in preds.probs[:, k]]
    table["malignant_probability"] = [float(v) for v in score]
    for d in range(preds.embedding.shape[1]):
        table[f"emb_{d}"] = [float(v) for v in preds.embedding[:, d]]
    numeric: dict[str, np.ndarray] = {
        "age": np.where(preds.age >= 0, preds.age, np.nan).astype(np.float64),
        "images_per_patient": np.array([_record_number(r, "images_per_patient")
                                        for r in records]),
    }
    layouts = dict(tabular_columns or {})
    for column in dict.fromkeys(c for cols in layouts.values() for c in cols):
        numeric[column] = np.array([_tabular(r, s, column, layouts)
                                    for r, s in zip(records, preds.source, strict=True)])
    table["age"] = list(numeric["age"])
    table["sex"] = [L.SEX_NAMES[int(s)] if 0 <= int(s) < len(L.SEX_NAMES) else "unknown"
                    for s in preds.sex]
    table["anatom_site"] = list(preds.anatom_site)
    table["fitzpatrick"] = list(preds.fitzpatrick if preds.fitzpatrick is not None
                                else [""] * n)
    for name, values in numeric.items():
        if name != "age":
            table[name] = list(values)
    table.update(_patient_context(np.asarray(preds.patient_id, dtype=object), score, numeric))
    return table


def _tabular(record: Mapping[str, Any], source: str, column: str,
             layouts: Mapping[str, Sequence[str]]) -> float:
    """One tabular value of a record (NaN when its release has no such column)."""
    columns = layouts.get(source) or (next(iter(layouts.values())) if len(layouts) == 1 else ())
    vector = record.get("tabular")
    if column not in columns or not isinstance(vector, (list, tuple, np.ndarray)):
        return math.nan
    k = list(columns).index(column)
    return float(vector[k]) if k < len(vector) else math.nan


def _patient_context(patients: np.ndarray, score: np.ndarray,
                     numeric: Mapping[str, np.ndarray]) -> dict[str, list[float]]:
    """Per image: how it compares with the other images of its patient (NaN without one)."""
    n = len(patients)
    count = np.full(n, np.nan)
    rank = np.full(n, np.nan)
    score_delta = np.full(n, np.nan)
    deltas = {name: np.full(n, np.nan) for name in numeric}
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(patients):
        if p:
            groups.setdefault(p, []).append(i)
    for rows in groups.values():
        idx = np.asarray(rows)
        count[idx] = len(idx)
        order = np.argsort(-score[idx], kind="stable")
        rank[idx[order]] = np.arange(1, len(idx) + 1)
        score_delta[idx] = score[idx] - score[idx].mean()
        for name, values in numeric.items():
            v = values[idx]
            if np.any(np.isfinite(v)):
                deltas[name][idx] = v - np.nanmean(v)
    out = {"patient_num_images": list(count), "patient_rank": list(rank),
           "malignant_probability_minus_patient_mean": list(score_delta)}
    for name, values in deltas.items():
        out[f"{name}_minus_patient_mean"] = list(values)
    return out


def write_table(table: Mapping[str, Sequence[Any]], path: str | os.PathLike) -> pathlib.Path:
    """Writes the table as CSV or Parquet (by the file's extension); returns the path.

    Raises:
      ValueError: another extension, or Parquet without pyarrow installed.
    """
    path = pathlib.Path(path)
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"--features {path}: the file must end in {' or '.join(FORMATS)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".csv":
        names = list(table)
        rows = zip(*[[_cell(v) for v in table[c]] for c in names], strict=True)
        write_csv(path, names, rows)
        return path
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ValueError(f"--features {path}: Parquet needs pyarrow (pip install pyarrow), or "
                         f"write a .csv") from e
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(pa.table({k: list(v) for k, v in table.items()}), tmp)
    tmp.replace(path)
    return path


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.7g}"
    if isinstance(value, (bytes, np.bytes_)):
        return as_bytes(value).decode("utf-8", "replace")
    return value
