"""What the readers of the release layouts yield (`Row`, `Skip`) and the CSV helpers they share."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import itertools
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from isic_jax.data.isic import labels as L


@dataclasses.dataclass(frozen=True)
class Skip:
    """An input left out of the dataset. `item`: an image id, or a path relative to the source."""

    item: str
    reason: str
    stage: str = "scan"  # "scan": layout/metadata; "decode": the image itself

    def to_json(self) -> dict[str, str]:
        return {"item": self.item, "reason": self.reason, "stage": self.stage}


@dataclasses.dataclass
class Row:
    """A parsed metadata row (label known) before its image is located.

    where: e.g. "metadata.csv row 12", for messages. diagnosis: a name in the release's classes.
    """

    image_id: str
    where: str
    label: int  # 0 benign, 1 malignant
    diagnosis: str
    patient_id: str = ""
    lesion_id: str = ""
    age: int = -1
    sex: str = "unknown"
    anatom_site: str = L.UNKNOWN_SITE
    # Where the metadata has them: the Fitzpatrick skin type as written (I-VI), the release's
    # `Release.tabular` / `tabular_text` columns, in that order (empty: none read, stored as
    # missing), where the image comes from and under which licence ("" = missing).
    fitzpatrick: str = ""
    tabular: tuple[float, ...] = ()
    tabular_text: tuple[str, ...] = ()
    attribution: str = ""
    copyright_license: str = ""


def stem(rel: str) -> str:
    """File name without folder and extension."""
    return os.path.splitext(rel.rsplit("/", 1)[-1])[0]


def folder(rel: str) -> str:
    """Folder part of a relative posix path ("" at the top level)."""
    return rel.rsplit("/", 1)[0] if "/" in rel else ""


def csv_rows(path: str) -> Iterator[tuple[int, list[str]]]:
    """(line number, row) for each row of a CSV that is not blank."""
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
        reader = csv.reader(f)
        for row in reader:
            if any(cell.strip() for cell in row):
                yield reader.line_num, row


def head(path: str, n: int = 2) -> list[list[str]]:
    """The first `n` rows of a CSV that are not blank."""
    with contextlib.closing(csv_rows(path)) as rows:
        return [row for _, row in itertools.islice(rows, n)]


def dict_rows(path: str) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, row dict with lower-cased stripped keys) for each data row of a CSV."""
    header = None
    for line, row in csv_rows(path):
        if header is None:
            header = [c.strip().lower() for c in row]
            continue
        yield line, {k: (row[i].strip() if i < len(row) else "") for i, k in enumerate(header)}


def metadata_by_id(path: str | None, id_column: str) -> dict[str, dict[str, str]]:
    """Rows of an optional metadata CSV by image id ({} without the file)."""
    if path is None:
        return {}
    return {row.get(id_column, ""): row for _, row in dict_rows(path)}


def one_hot(row: Mapping[str, str], classes: Sequence[str]) -> tuple[str | None, str]:
    """The class whose column is 1 (others 0), or (None, why)."""
    hot = []
    for name in classes:
        raw = row.get(name.lower(), "")
        try:
            value = float(raw)
        except ValueError:
            return None, f"unknown label value {name}={raw!r}"
        if value not in (0.0, 1.0):
            return None, f"unknown label value {name}={raw!r}"
        if value == 1.0:
            hot.append(name)
    if len(hot) != 1:
        return None, f"unknown label: {len(hot)} classes set ({','.join(hot) or 'none'})"
    return hot[0], ""


def archive_fields(row: Mapping[str, str]) -> dict[str, Any]:
    """Row's patient/lesion/age/sex/site from the ISIC Archive's column names (isic-cli's
    metadata.csv and the 2024 train-metadata.csv share them)."""
    return {
        "patient_id": L.parse_text(row.get("patient_id")),
        "lesion_id": L.parse_text(row.get("lesion_id")),
        "age": L.parse_age(row.get("age_approx")),
        "sex": L.parse_sex(row.get("sex")),
        "anatom_site": L.parse_site(row.get("anatom_site_general")),
    }


def extra_fields(
    row: Mapping[str, Any], tabular: Sequence[str] = (), tabular_text: Sequence[str] = ()
) -> dict[str, Any]:
    """Row's Fitzpatrick skin type, tabular measurements (NaN when missing), text columns,
    attribution and licence, from a CSV row with lower-cased keys (`dict_rows`) or a JSON
    record's fields."""
    get = lambda name: row.get(name.lower(), row.get(name))
    return {
        "fitzpatrick": L.parse_text(get("fitzpatrick_skin_type")),
        "tabular": tuple(L.parse_float(get(c)) for c in tabular),
        "tabular_text": tuple(L.parse_text(get(c)) for c in tabular_text),
        "attribution": L.parse_text(get("attribution")),
        "copyright_license": L.parse_text(get("copyright_license")),
    }


def one_hot_values(classes: Sequence[str], label: str) -> dict[str, str]:
    """One-hot ground-truth cells ("1.0" in the column named `label`, "0.0" elsewhere)."""
    return {c: "1.0" if c == label else "0.0" for c in classes}


def one_hot_rows(
    path: str,
    rel: str,
    classes: Sequence[str],
    malignant: Sequence[str],
    meta: Mapping[str, Mapping[str, str]],
    *,
    unknown_column: str = "",
) -> Iterator[Row | Skip]:
    """Rows of a one-hot ground truth (`image,<class>...`), with lesion/age/sex/site from `meta`
    (rows by image id). unknown_column: a column whose 1 means "unknown diagnosis" (skipped)."""
    malignant = set(malignant)
    for line, row in dict_rows(path):
        image_id = row.get("image", "")
        where = f"{rel} row {line}"
        if unknown_column and L.parse_binary(row.get(unknown_column, "0")) == 1:
            yield Skip(
                image_id,
                f"label {unknown_column.upper()} (unknown diagnosis) has no benign/malignant "
                f"label ({where})",
            )
            continue
        name, why = one_hot(row, classes)
        if name is None:
            yield Skip(image_id, f"{why} ({where})")
            continue
        m = meta.get(image_id, {})
        yield Row(
            image_id,
            where,
            int(name in malignant),
            name,
            lesion_id=L.parse_text(m.get("lesion_id")),
            age=L.parse_age(m.get("age_approx", m.get("age"))),
            sex=L.parse_sex(m.get("sex")),
            anatom_site=L.parse_site(m.get("anatom_site_general", m.get("localization"))),
        )
