"""Patient and lesion metadata as one float32 array per example, for a metadata branch.

    catalog = metadata.Catalog.from_info(info)            # what the opened dataset(s) hold
    encoder = metadata.fit("age,sex,site,tbp_lv_*", train_source, catalog)
    x = encoder.encode_records(records)                   # float32 [N, F]
    x, warnings = encoder.encode_rows(csv_rows)           # rows keyed by ISIC column names
    saved = encoder.to_json(); encoder = metadata.MetadataEncoder.from_json(saved)

Features (`config.model.metadata`, comma-separated; a wildcard such as `tbp_lv_*` names every
matching column):
- `age` (ISIC column age_approx), `images_per_patient` (images of the same patient in the
  release; for CSV rows without the column, counted over the rows' patient_id): numerical,
  standardised with the training split's mean and std; a missing value becomes 0 and sets the
  feature's "missing" indicator column.
- `sex` (female, male), `site` (anatom_site_general / anatom_site_general_challenge; the
  categories seen in the training split): one-hot, with an explicit "missing" category that also
  takes a category never seen in training.
- the release's tabular columns (ISIC 2024: `clin_size_long_diam_mm` and the `tbp_lv_*`
  measurements, numerical; `tbp_lv_location(_simple)`, `tbp_tile_type`, categorical), by their
  ISIC names.
A record or row that lacks a feature (another release in a several-release run, a CSV without
the column) has it missing. Output columns: per numerical feature [value, missing]; per
categorical feature [one column per category, missing]; in the order the features were listed.
`columns()` describes each (name, feature, ISIC column, normalisation or category), JSON-ready.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
import os
import pathlib
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from isic_jax.data.isic import labels as L

FORMAT = "isic_jax.metadata"
# Where a run (workdir) and an export keep the encoder fitted on the run's training split.
ENCODER_FILE = "metadata_encoder.json"
FORMAT_VERSION = 1
MAX_CATEGORIES = 64  # fitted categories kept (the most frequent); rarer ones count as missing
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_*?\[\]-]+$")

NUMERIC, CATEGORICAL = "numeric", "categorical"


class MetadataFeatureError(ValueError):
    """An unknown metadata feature, or one the prepared dataset lacks; the message names it and
    lists the available ones (or says what to re-run)."""


def parse_feature_list(text: str) -> list[str]:
    """"age, sex,site" -> ["age", "sex", "site"] ("" -> []).

    Raises:
      ValueError: an empty item or a name with characters other than letters, digits, _ - and
        the wildcards * ? [ ].
    """
    if not str(text).strip():
        return []
    names = [n.strip() for n in str(text).split(",")]
    for name in names:
        if not name:
            raise ValueError(f"empty feature name in {text!r}")
        if not NAME_PATTERN.match(name):
            raise ValueError(f"bad feature name {name!r} in {text!r}")
    return names


# ----------------------------------------------------------------------------- feature sources


@dataclasses.dataclass(frozen=True)
class Feature:
    """One metadata feature: where its values are in a record and in a CSV row.

    kind: NUMERIC or CATEGORICAL. isic_columns: the CSV columns that hold it (the first present
    is read). record_key: the prepared dataset's feature. column: for tabular columns, the name
    inside the `tabular` / `tabular_text` vector. categories: fixed categories (sex); None: the
    ones seen in the training split.
    """

    name: str
    kind: str
    isic_columns: tuple[str, ...]
    record_key: str
    column: str = ""
    categories: tuple[str, ...] | None = None


BASE_FEATURES: dict[str, Feature] = {
    "age": Feature("age", NUMERIC, ("age_approx", "age_approximate", "age"), "age"),
    "sex": Feature("sex", CATEGORICAL, ("sex",), "sex", categories=("female", "male")),
    "site": Feature(
        "site", CATEGORICAL,
        ("anatom_site_general", "anatom_site_general_challenge", "anatom_site", "localization"),
        "anatom_site",
    ),  # fmt: skip
    "images_per_patient": Feature(
        "images_per_patient", NUMERIC, ("images_per_patient",), "images_per_patient"
    ),
}


def tabular_feature(column: str, numeric: bool) -> Feature:
    """The feature of one tabular column of a release (`Release.tabular` / `tabular_text`)."""
    if numeric:
        return Feature(column, NUMERIC, (column,), "tabular", column=column)
    return Feature(column, CATEGORICAL, (column,), "tabular_text", column=column)


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


Layout = Mapping[str, Sequence[str]]  # "tabular" / "tabular_text" -> the column names


def _vector_value(record: Mapping[str, Any], feature: Feature, layout: Layout | None) -> Any:
    """The value of a tabular column in a record (None when the record does not have it).

    The vector's column names: the record's own `<key>_columns`, else `layout` (its release's).
    """
    names = record.get(f"{feature.record_key}_columns") or (layout or {}).get(feature.record_key)
    values = record.get(feature.record_key)
    if not names or values is None or feature.column not in names:
        return None
    if not isinstance(values, list | tuple | np.ndarray):  # one column: parsed as a scalar
        values = [values]
    return values[list(names).index(feature.column)]


def record_value(
    record: Mapping[str, Any], feature: Feature, layout: Layout | None = None
) -> float | str | None:
    """A feature's value in a prepared record (as `dataset` sources give them): a float or a
    category, or None when missing. layout: the column names of the record's tabular vectors."""
    if feature.column:
        value = _vector_value(record, feature, layout)
        if value is None:
            return None
        if feature.kind == NUMERIC:
            value = float(value)
            return None if math.isnan(value) else value
        text = _text(value)
        return text or None
    value = record.get(feature.record_key)
    if value is None:
        return None
    if feature.name == "sex":
        index = int(value)
        return L.SEX_NAMES[index] if 0 < index < len(L.SEX_NAMES) else None
    if feature.name == "site":
        text = _text(value)
        return None if text in ("", L.UNKNOWN_SITE) else text
    number = float(value)
    return None if number < 0 or math.isnan(number) else number


def _row_parsers() -> dict[str, Callable[[str], float | str | None]]:
    def age(v: str) -> float | None:
        a = L.parse_age(v)
        return None if a < 0 else float(a)

    def sex(v: str) -> str | None:
        s = L.parse_sex(v)
        return None if s == "unknown" else s

    def site(v: str) -> str | None:
        s = L.parse_site(v)
        return None if s == L.UNKNOWN_SITE else s

    def count(v: str) -> float | None:
        n = L.parse_float(v)
        return None if math.isnan(n) or n < 1 else n

    return {"age": age, "sex": sex, "site": site, "images_per_patient": count}


_ROW_PARSERS = _row_parsers()


def _row_parse(feature: Feature, raw: str) -> float | str | None:
    if feature.name in _ROW_PARSERS and not feature.column:
        return _ROW_PARSERS[feature.name](raw)
    if feature.kind == NUMERIC:
        value = L.parse_float(raw)
        return None if math.isnan(value) else value
    return L.parse_text(raw) or None


# ----------------------------------------------------------------------------- the catalog


@dataclasses.dataclass
class Catalog:
    """Which features the opened dataset(s) hold, and which a re-prepared one would add.

    available: name -> Feature, in listing order. lacking: name -> why one of the opened
      datasets does not have it although its release would store it in a newer dataset version
      (asking for it fails, rather than silently leaving that release's examples missing).
    """

    available: dict[str, Feature]
    lacking: dict[str, str] = dataclasses.field(default_factory=dict)
    datasets: list[Mapping[str, Any]] = dataclasses.field(default_factory=list)

    @classmethod
    def from_info(cls, info: Any) -> Catalog:
        """From the `dataset.SourceInfo` of the opened dataset(s)."""
        return cls.from_datasets(info.datasets)

    @classmethod
    def from_datasets(cls, datasets: Sequence[Mapping[str, Any]]) -> Catalog:
        """From one description per opened release: {"release", "version", "features" (record
        keys), "tabular_columns", "tabular_text_columns", "prepare" (the command to re-run)}."""
        from isic_jax.data.isic.layouts import RELEASES as ENTRIES

        available: dict[str, Feature] = {}
        lacking: dict[str, str] = {}
        for ds in datasets:
            keys = set(ds["features"])
            entry = ENTRIES.get(ds["release"])
            wanted = [*BASE_FEATURES.values()]
            wanted += [tabular_feature(c, True) for c in ds.get("tabular_columns") or ()]
            wanted += [tabular_feature(c, False) for c in ds.get("tabular_text_columns") or ()]
            for feature in wanted:
                if feature.record_key in keys:
                    available.setdefault(feature.name, feature)
            newer = list(BASE_FEATURES)
            if entry is not None:
                newer += [*entry.tabular, *entry.tabular_text]
            have = {f.name for f in wanted if f.record_key in keys}
            for name in newer:
                if name not in have:
                    lacking.setdefault(
                        name,
                        f"the prepared dataset {ds['release']} (version {ds['version']}) has "
                        f"no {name!r}: newer versions store it; re-run `{ds['prepare']}` (it "
                        "builds the new version beside the old one, which keeps working for "
                        "image-only runs)",
                    )
        return cls(available, lacking, list(datasets))

    def resolve(self, names: Sequence[str]) -> list[Feature]:
        """The features `names` (wildcards expanded, in the order given, each once).

        Raises:
          MetadataFeatureError: a name (or wildcard) that matches no available feature.
        """
        out: dict[str, Feature] = {}
        for name in names:
            if any(ch in name for ch in "*?["):
                lacking = [n for n in self.lacking if fnmatch.fnmatchcase(n, name)]
                hits = [n for n in self.available if fnmatch.fnmatchcase(n, name)]
            else:
                lacking = [name] if name in self.lacking else []
                hits = [name] if name in self.available else []
            if lacking or not hits:
                self._fail(name, lacking[0] if lacking else None)
            out.update((n, self.available[n]) for n in hits)
        return list(out.values())

    def _fail(self, name: str, lacking: str | None) -> None:
        if lacking is not None:
            raise MetadataFeatureError(f"metadata feature {name!r}: {self.lacking[lacking]}")
        raise MetadataFeatureError(
            f"unknown metadata feature {name!r} (config.model.metadata); available: "
            f"{', '.join(self.available) or '(none)'}"
        )


# ----------------------------------------------------------------------------- the encoder


@dataclasses.dataclass
class FittedFeature:
    """A feature with its training statistics: mean/std (numeric) or categories (categorical)."""

    feature: Feature
    mean: float = 0.0
    std: float = 1.0
    categories: tuple[str, ...] = ()
    num_missing: int = 0  # in the training split
    num_values: int = 0

    @property
    def width(self) -> int:
        return 2 if self.feature.kind == NUMERIC else len(self.categories) + 1

    def columns(self) -> list[dict[str, Any]]:
        f = self.feature
        base = {"feature": f.name, "isic_column": f.isic_columns[0],
                "isic_columns": list(f.isic_columns)}  # fmt: skip
        if f.kind == NUMERIC:
            return [
                {"name": f.name, **base, "kind": "numeric",
                 "normalisation": {"kind": "standardise", "mean": self.mean, "std": self.std,
                                   "missing_value": 0.0}},
                {"name": f"{f.name}_missing", **base, "kind": "missing_indicator"},
            ]  # fmt: skip
        cols = [{"name": f"{f.name}={c}", **base, "kind": "one_hot", "category": c}
                for c in self.categories]  # fmt: skip
        cols.append({"name": f"{f.name}=missing", **base, "kind": "one_hot", "category": None})
        return cols

    def encode(self, values: Sequence[float | str | None]) -> np.ndarray:
        """float32 [N, width] for N values (None = missing)."""
        n = len(values)
        out = np.zeros((n, self.width), np.float32)
        if self.feature.kind == NUMERIC:
            raw = np.array([np.nan if v is None else float(v) for v in values], np.float64)
            missing = np.isnan(raw)
            out[:, 0] = np.where(missing, 0.0, (raw - self.mean) / self.std)
            out[:, 1] = missing
            return out
        index = {c: i for i, c in enumerate(self.categories)}
        miss = len(self.categories)
        cols = [index.get(v, miss) if v is not None else miss for v in values]
        out[np.arange(n), cols] = 1.0
        return out

    def to_json(self) -> dict[str, Any]:
        f = self.feature
        return {
            "name": f.name, "kind": f.kind, "isic_columns": list(f.isic_columns),
            "record_key": f.record_key, "column": f.column,
            "fixed_categories": None if f.categories is None else list(f.categories),
            "mean": self.mean, "std": self.std, "categories": list(self.categories),
            "num_missing": self.num_missing, "num_values": self.num_values,
        }  # fmt: skip

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FittedFeature:
        fixed = data.get("fixed_categories")
        feature = Feature(
            data["name"], data["kind"], tuple(data["isic_columns"]), data["record_key"],
            data.get("column", ""), None if fixed is None else tuple(fixed),
        )  # fmt: skip
        return cls(feature, float(data["mean"]), float(data["std"]),
                   tuple(data["categories"]), int(data.get("num_missing", 0)),
                   int(data.get("num_values", 0)))  # fmt: skip


def _fit_one(feature: Feature, values: Sequence[float | str | None]) -> FittedFeature:
    present = [v for v in values if v is not None]
    fitted = FittedFeature(feature, num_missing=len(values) - len(present),
                           num_values=len(present))  # fmt: skip
    if feature.kind == NUMERIC:
        if present:
            arr = np.asarray(present, np.float64)
            fitted.mean = float(arr.mean())
            std = float(arr.std())
            fitted.std = std if std > 1e-12 else 1.0  # a constant column: centred only
        return fitted
    if feature.categories is not None:
        fitted.categories = feature.categories
    else:
        counts = Counter(str(v) for v in present)
        common = sorted(counts, key=lambda c: (-counts[c], c))[:MAX_CATEGORIES]
        fitted.categories = tuple(sorted(common))
    return fitted


class MetadataEncoder:
    """Encodes records (or CSV rows) into float32 [N, F] with fitted statistics; JSON-ready.

    Picklable (Grain workers encode their batches).
    """

    def __init__(self, fitted: Sequence[FittedFeature]):
        self.fitted = list(fitted)
        self._layouts: dict[str, dict[str, tuple[str, ...]]] = {}
        self._default_source: str | None = None

    def bind(self, datasets: Sequence[Mapping[str, Any]]) -> MetadataEncoder:
        """Tells the encoder the tabular column names of each opened release (`SourceInfo.
        datasets`), to find tabular values in their records; returns self. A record's release
        is its `source`, or the only one."""
        self._layouts = {
            ds["release"]: {"tabular": tuple(ds.get("tabular_columns") or ()),
                            "tabular_text": tuple(ds.get("tabular_text_columns") or ())}
            for ds in datasets
        }  # fmt: skip
        self._default_source = datasets[0]["release"] if len(datasets) == 1 else None
        return self

    def _layout(self, record: Mapping[str, Any]) -> Layout | None:
        source = record.get("source")
        name = _text(source) if source else self._default_source
        return self._layouts.get(name) if name else None

    @property
    def names(self) -> list[str]:
        """The features, in column order."""
        return [f.feature.name for f in self.fitted]

    @property
    def width(self) -> int:
        """F: the number of output columns."""
        return sum(f.width for f in self.fitted)

    def columns(self) -> list[dict[str, Any]]:
        """One JSON-ready description per output column (name, feature, isic_column(s), kind,
        normalisation or category), in column order."""
        return [c for f in self.fitted for c in f.columns()]

    def groups(self) -> list[int]:
        """The feature index (0..num features - 1) of every output column, int [F]."""
        return [i for i, f in enumerate(self.fitted) for _ in range(f.width)]

    def missing_row(self) -> np.ndarray:
        """float32 [F]: the encoding of a row with every feature missing (what feature dropout
        and absent inputs turn a feature into)."""
        return self.encode_records([None])[0]

    def encode_records(self, records: Sequence[Mapping[str, Any] | None]) -> np.ndarray:
        """float32 [N, F] for prepared records (None: a padding row, every feature missing)."""
        layouts = [None if r is None else self._layout(r) for r in records]
        parts = [
            f.encode([None if r is None else record_value(r, f.feature, lay)
                      for r, lay in zip(records, layouts, strict=True)])
            for f in self.fitted
        ]  # fmt: skip
        return _concat(parts, len(records))

    def encode_rows(
        self, rows: Sequence[Mapping[str, str]]
    ) -> tuple[np.ndarray, list[str]]:
        """(float32 [N, F], warnings) for CSV rows keyed by ISIC column names (case ignored).

        A column the rows do not have makes its feature missing everywhere, with one warning;
        an empty or unreadable cell is missing. images_per_patient without its column is counted
        over the rows' patient_id (as the ISIC 2020 winners did over the test set).
        """
        header = {k.strip().lower(): k for r in rows[:1] for k in r}
        warnings: list[str] = []
        absent: list[str] = []
        parts = []
        for fitted in self.fitted:
            feature = fitted.feature
            column = next((header[c.lower()] for c in feature.isic_columns
                           if c.lower() in header), None)  # fmt: skip
            if column is not None:
                values = [_row_parse(feature, r.get(column, "") or "") for r in rows]
            elif feature.name == "images_per_patient" and "patient_id" in header:
                pid = header["patient_id"]
                ids = [L.parse_text(r.get(pid)) for r in rows]
                counts = Counter(i for i in ids if i)
                values = [float(counts[i]) if i else None for i in ids]
                warnings.append("images_per_patient: no such column; counted over the rows' "
                                "patient_id")  # fmt: skip
            else:
                values = [None] * len(rows)
                if rows:
                    absent.append(f"{feature.name} ({' / '.join(feature.isic_columns)})")
            parts.append(fitted.encode(values))
        if absent:  # one warning for all of them
            warnings.append(f"{len(absent)} metadata feature(s) have no column in the input and "
                            f"are treated as missing: {', '.join(absent)}")
        return _concat(parts, len(rows)), warnings

    def recoder(self, source: MetadataEncoder) -> Callable[[Any], Any]:
        """f(x) -> this encoder's encoding of what `source` encoded as x (float [N, F_source] ->
        float32 [N, F]), traceable with jax.numpy: the encoders of one config fitted on
        different training folds differ only in statistics and categories, so an ensemble of
        fold models can take one encoding.

        Raises:
          ValueError: the two do not encode the same features in the same order.
        """
        import jax.numpy as jnp

        if [(f.feature.name, f.feature.kind) for f in self.fitted] != [
                (f.feature.name, f.feature.kind) for f in source.fitted]:
            raise ValueError(f"the metadata encoders encode other features: {source.names} vs "
                             f"{self.names}")
        if self.to_json()["features"] == source.to_json()["features"]:
            return lambda x: x
        steps = []
        offset = 0
        for mine, theirs in zip(self.fitted, source.fitted, strict=True):
            if mine.feature.kind == NUMERIC:
                steps.append(("numeric", offset, theirs.mean, theirs.std, mine.mean, mine.std))
            else:
                # Source category j (or its missing column) -> this encoder's column.
                index = {c: i for i, c in enumerate(mine.categories)}
                miss = len(mine.categories)
                matrix = np.zeros((theirs.width, mine.width), np.float32)
                for j, c in enumerate(theirs.categories):
                    matrix[j, index.get(c, miss)] = 1.0
                matrix[len(theirs.categories), miss] = 1.0
                steps.append(("categorical", offset, theirs.width, matrix))
            offset += theirs.width

        def recode(x: Any) -> Any:
            x = jnp.asarray(x, jnp.float32)
            out = []
            for step in steps:
                if step[0] == "numeric":
                    _, o, mean_s, std_s, mean_d, std_d = step
                    value, missing = x[:, o], x[:, o + 1]
                    new = (value * std_s + mean_s - mean_d) / std_d
                    out += [jnp.where(missing > 0.5, 0.0, new), missing]
                else:
                    _, o, width, matrix = step
                    out.append(x[:, o : o + width] @ jnp.asarray(matrix))
            return jnp.concatenate([c[:, None] if c.ndim == 1 else c for c in out], axis=1)

        return recode

    def to_json(self) -> dict[str, Any]:
        """Everything needed to encode as at training time, plus the column descriptions."""
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "features": [f.to_json() for f in self.fitted],
            "columns": self.columns(),
            "width": self.width,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> MetadataEncoder:
        if data.get("format") != FORMAT or int(data.get("format_version", 0)) > FORMAT_VERSION:
            raise ValueError(
                f"not a metadata encoder this isic_jax reads (format {data.get('format')!r}, "
                f"version {data.get('format_version')!r})"
            )
        return cls([FittedFeature.from_json(f) for f in data["features"]])

    def __repr__(self) -> str:
        return f"MetadataEncoder({', '.join(self.names)}; {self.width} columns)"


def recoding(forward: Callable[..., Any], encoder: MetadataEncoder | None,
             shared: MetadataEncoder | None) -> Callable[..., Any]:
    """f(images, metadata) of a model whose encoder is `encoder`, taking the metadata as
    `shared` encodes it instead (an ensemble of cross-validation members, whose encoders were
    fitted on different training folds, takes one encoding). Images-only models: `forward`."""
    if encoder is None or shared is None:
        return forward
    recode = encoder.recoder(shared)
    return lambda images, m: forward(images, recode(m))


def save_encoder(encoder: MetadataEncoder, folder: str | os.PathLike) -> pathlib.Path:
    """Writes `folder/metadata_encoder.json` (atomically) and returns its path."""
    path = pathlib.Path(folder) / ENCODER_FILE
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(encoder.to_json(), indent=1) + "\n")
    tmp.replace(path)
    return path


def load_encoder(folder: str | os.PathLike) -> MetadataEncoder | None:
    """The encoder saved in a run or export folder, or None when it has none (images only)."""
    path = pathlib.Path(folder) / ENCODER_FILE
    if not path.is_file():
        return None
    return MetadataEncoder.from_json(json.loads(path.read_text()))


def _concat(parts: list[np.ndarray], n: int) -> np.ndarray:
    return np.concatenate(parts, axis=1) if parts else np.zeros((n, 0), np.float32)


def fit_records(
    features: Sequence[Feature],
    records: Iterable[Mapping[str, Any]],
    datasets: Sequence[Mapping[str, Any]] = (),
) -> MetadataEncoder:
    """Fits the statistics of `features` on training records (of the releases `datasets`)."""
    records = list(records)
    probe = MetadataEncoder([]).bind(datasets)
    layouts = [probe._layout(r) for r in records]
    return MetadataEncoder(
        [_fit_one(f, [record_value(r, f, lay) for r, lay in zip(records, layouts, strict=True)])
         for f in features]
    ).bind(datasets)  # fmt: skip


def fit(spec: str | Sequence[str], source: Any, catalog: Catalog) -> MetadataEncoder:
    """Resolves the features `spec` names against `catalog` and fits them on every record of the
    training `source` (one pass; images are not decoded).

    Raises:
      MetadataFeatureError: an unknown feature, or one the prepared dataset lacks.
    """
    from isic_jax.data.pipeline import read_fields

    names = parse_feature_list(spec) if isinstance(spec, str) else list(spec)
    features = catalog.resolve(names)
    keys = {f.record_key for f in features}
    keys |= {f"{k}_columns" for k in keys} | {"source"}

    def pick(record: Mapping[str, Any]) -> dict[str, Any]:
        return {k: record[k] for k in keys if k in record}

    return fit_records(features, read_fields(source, pick), catalog.datasets)
