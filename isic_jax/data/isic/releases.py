"""Readers of the official ISIC release layouts: find the files, parse labels and metadata.

`scan(release, source)` turns a manual download into a list of `Candidate`s (one per usable
metadata row whose image file exists) and a list of `Skip`s (every input left out, with its reason),
before any image is decoded. Decoding happens later, in the builder; images that fail there are
added to the skips by the builder.

What is looked for (up to `MAX_DEPTH` folder levels below the source; names are not fixed, files are
recognised by their CSV columns, see `EXPECTED`):
- Ground-truth / metadata CSVs, by header. When several CSVs fit one role, names containing "train"
  win over others, names containing "test"/"val" lose, "v2" wins, then the shallower, then by name.
- Images, by file name: `<id>.jpg|.jpeg|.png` (extension in any case) anywhere in the tree; an id is
  a file stem, never a path. `*_superpixels.png` (2017) and `*_segmentation.png`/`*_mask.png`
  files are not images of the task and are ignored. Images in a folder that holds at least one
  image of a ground-truth row but that have no row themselves are reported as skipped ("no
  ground-truth row"); folders with no matching image at all (e.g. the test images next to the
  training images) are ignored.
- ISIC 2024 images: `train-image.hdf5` (any `*.hdf5` next to the metadata; one dataset per isic_id
  holding the JPEG bytes), else image files as above (Kaggle's `train-image/image/`).

Safety: the tree walk does not follow symlinked folders; a file (or folder) link that resolves
outside the source is never read and is reported; an id containing a path separator or `..` is
reported and never used to build a path.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import itertools
import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from isic_jax.data.isic import labels as L
from isic_jax.data.isic.images import IMAGE_EXTENSIONS

MAX_DEPTH = 3  # folder levels searched below --source

# What each release is recognised by (shown when --format auto recognises nothing).
EXPECTED: dict[str, str] = {
    "archive": (
        "`isic image download` export: metadata.csv with columns isic_id + diagnosis_1 (or "
        "benign_malignant), images <isic_id>.jpg|.png; or legacy per-image JSON records "
        "<isic_id>.json (meta.clinical.benign_malignant, diagnosis) next to <isic_id>.jpg"
    ),
    "isic2016": (
        "ISBI2016_ISIC_Part3_Training_GroundTruth.csv (2 columns, no header: "
        "ISIC_xxxxxxx,benign|malignant|0|1) + images (ISBI2016_ISIC_Part3_Training_Data/)"
    ),
    "isic2017": (
        "ISIC-2017_Training_Part3_GroundTruth.csv (image_id,melanoma,seborrheic_keratosis) + "
        "images (ISIC-2017_Training_Data/); optional ISIC-2017_Training_Data_metadata.csv "
        "(image_id,age_approximate,sex)"
    ),
    "isic2018": (
        "ISIC2018_Task3_Training_GroundTruth.csv (image,MEL,NV,BCC,AKIEC,BKL,DF,VASC one-hot) or "
        "HAM10000_metadata.csv (lesion_id,image_id,dx,...) + images "
        "(ISIC2018_Task3_Training_Input/); optional ISIC2018_Task3_Training_LesionGroupings.csv "
        "(image,lesion_id,...)"
    ),
    "isic2019": (
        "ISIC_2019_Training_GroundTruth.csv (image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK one-hot) + "
        "images (ISIC_2019_Training_Input/); optional ISIC_2019_Training_Metadata.csv "
        "(image,age_approx,anatom_site_general,lesion_id,sex)"
    ),
    "isic2020": (
        "ISIC_2020_Training_GroundTruth.csv or _v2.csv (image_name,patient_id,sex,age_approx,"
        "anatom_site_general_challenge,diagnosis,benign_malignant,target[,lesion_id]) + images "
        "(train/*.jpg); optional ISIC_2020_Training_Duplicates.csv (image_name_1,image_name_2)"
    ),
    "isic2024": (
        "train-metadata.csv (isic_id,target,patient_id,...) + train-image.hdf5 (one dataset per "
        "isic_id holding JPEG bytes) or image files (train-image/image/)"
    ),
}


class SourceError(Exception):
    """The source folder cannot be read as the requested (or any) ISIC release."""


class ReleaseNotRecognisedError(SourceError):
    """--format auto found no release (the message lists what each release is recognised by)."""


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One metadata row whose image exists, before decoding.

    `path` is the absolute path of the image file, or of the HDF5 file when `hdf5_key` is set.
    """

    image_id: str
    path: str
    hdf5_key: str | None
    label: int  # 0 benign, 1 malignant
    diagnosis: int  # index in DIAGNOSIS_CLASSES[release]
    patient_id: str = ""
    lesion_id: str = ""
    age: int = -1
    sex: str = "unknown"
    anatom_site: str = L.UNKNOWN_SITE
    # Where the metadata has them ("" otherwise): Fitzpatrick skin type as written (I-VI), and
    # the image's attribution and licence (the prepare report counts them for model cards).
    fitzpatrick: str = ""
    attribution: str = ""
    license: str = ""

    @property
    def group(self) -> str:
        """Fold grouping key: the patient, else the lesion, else the image itself."""
        if self.patient_id:
            return "patient:" + self.patient_id
        if self.lesion_id:
            return "lesion:" + self.lesion_id
        return "image:" + self.image_id


@dataclasses.dataclass(frozen=True)
class Skip:
    """An input left out of the dataset. `item`: an image id, or a path relative to the source."""

    item: str
    reason: str
    stage: str = "scan"  # "scan": layout/metadata; "decode": the image itself

    def to_json(self) -> dict[str, str]:
        return {"item": self.item, "reason": self.reason, "stage": self.stage}


@dataclasses.dataclass
class Scan:
    """The result of reading a release's metadata: what will be decoded, and what was left out."""

    release: str
    source: str  # absolute, symlinks resolved
    files: dict[str, str]  # role -> path relative to the source (or "hdf5")
    candidates: list[Candidate]  # sorted by image_id
    skipped: list[Skip]


@dataclasses.dataclass
class _Row:
    """A parsed metadata row (label known) before its image is located."""

    image_id: str
    where: str  # e.g. "metadata.csv row 12", for messages
    label: int
    diagnosis: str
    patient_id: str = ""
    lesion_id: str = ""
    age: int = -1
    sex: str = "unknown"
    anatom_site: str = L.UNKNOWN_SITE
    fitzpatrick: str = ""
    attribution: str = ""
    license: str = ""


# ----------------------------------------------------------------------------- the source tree


class SourceTree:
    """The files below a source folder (up to MAX_DEPTH levels), without following folder links."""

    def __init__(self, source: str | os.PathLike, max_depth: int = MAX_DEPTH):
        if not os.path.isdir(source):
            raise SourceError(f"source folder {os.fspath(source)!r} does not exist")
        self.root = os.path.realpath(source)
        self.files: list[str] = []  # relative posix paths of files inside the root
        self.outside: list[str] = []  # relative paths of links that resolve outside the root
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=False):
            rel_dir = os.path.relpath(dirpath, self.root)
            depth = 0 if rel_dir == "." else rel_dir.count(os.sep) + 1
            dirnames.sort()
            for d in list(dirnames):
                full = os.path.join(dirpath, d)
                if os.path.islink(full) and not self._inside(os.path.realpath(full)):
                    self.outside.append(self._rel(full))
            if depth >= max_depth:
                dirnames[:] = []
            for name in sorted(filenames):
                full = os.path.join(dirpath, name)
                if name.startswith("."):
                    continue  # .DS_Store, ._ resource forks, hidden files
                if os.path.islink(full) and not self._inside(os.path.realpath(full)):
                    self.outside.append(self._rel(full))
                elif os.path.isfile(full):
                    self.files.append(self._rel(full))

    def _inside(self, real: str) -> bool:
        return real == self.root or real.startswith(self.root + os.sep)

    def _rel(self, full: str) -> str:
        return os.path.relpath(full, self.root).replace(os.sep, "/")

    def abspath(self, rel: str) -> str:
        return os.path.join(self.root, *rel.split("/"))

    def with_suffix(self, *suffixes: str) -> list[str]:
        return [f for f in self.files if f.lower().endswith(suffixes)]

    def images(self) -> list[str]:
        """Image files, minus the challenges' auxiliary masks (ignored without a report line)."""
        return [f for f in self.with_suffix(*IMAGE_EXTENSIONS) if not _AUXILIARY.search(_stem(f))]


# ISIC 2017's superpixel maps and the segmentation tasks' masks sit next to the images.
_AUXILIARY = re.compile(r"_(superpixels|segmentation|mask)$", re.IGNORECASE)


def _stem(rel: str) -> str:
    return os.path.splitext(rel.rsplit("/", 1)[-1])[0]


def _dir(rel: str) -> str:
    return rel.rsplit("/", 1)[0] if "/" in rel else ""


def _preference(rel: str) -> tuple:
    """Sort key among files fitting one role: training files, then v2, then shallow, then name."""
    low = rel.lower()
    name = low.rsplit("/", 1)[-1]
    return (
        "train" not in name,
        bool(re.search(r"test|val", name)),
        "v2" not in name,
        rel.count("/"),
        rel,
    )


# ----------------------------------------------------------------------------- CSV roles


def _csv_rows(path: str) -> Iterator[tuple[int, list[str]]]:
    """(line number, row) for each row of a CSV that is not blank."""
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
        reader = csv.reader(f)
        for row in reader:
            if any(cell.strip() for cell in row):
                yield reader.line_num, row


def _head(path: str, n: int = 2) -> list[list[str]]:
    with contextlib.closing(_csv_rows(path)) as rows:
        return [row for _, row in itertools.islice(rows, n)]


def _is_2016_row(row: Sequence[str]) -> bool:
    return (
        len(row) == 2 and row[0].strip().startswith("ISIC_") and L.parse_binary(row[1]) is not None
    )


_ONE_HOT_2018 = L.DIAGNOSIS_CLASSES["isic2018"]
_ONE_HOT_2019 = L.DIAGNOSIS_CLASSES["isic2019"]  # UNK (test set only) is not required


def csv_roles(head: list[list[str]]) -> set[str]:
    """Roles a CSV can play, from its first rows ("isic2019/ground_truth", ...)."""
    if not head:
        return set()
    cols = {c.strip().lower() for c in head[0]}
    roles = set()
    has = lambda *names: all(n.lower() in cols for n in names)
    if _is_2016_row(head[0]) or (len(head) > 1 and len(head[0]) == 2 and _is_2016_row(head[1])):
        roles.add("isic2016/ground_truth")
    if has("isic_id", "target"):
        roles.add("isic2024/metadata")
    elif has("isic_id") and (has("diagnosis_1") or has("benign_malignant")):
        roles.add("archive/metadata")
    if has("image_id", "melanoma", "seborrheic_keratosis"):
        roles.add("isic2017/ground_truth")
    if has("image_id", "age_approximate", "sex"):
        roles.add("isic2017/metadata")
    if has("image", *_ONE_HOT_2019):
        roles.add("isic2019/ground_truth")
    elif has("image", *_ONE_HOT_2018):
        roles.add("isic2018/ground_truth")
    if has("image_id", "lesion_id", "dx"):
        roles.add("isic2018/ham10000")
    if has("image", "lesion_id") and not has("age_approx"):
        roles.add("isic2018/lesion_groupings")
    if has("image", "age_approx", "sex"):
        roles.add("isic2019/metadata")
    if has("image_name", "target"):
        roles.add("isic2020/ground_truth")
    if has("image_name_1", "image_name_2"):
        roles.add("isic2020/duplicates")
    return roles


def _is_json_record(path: str) -> bool:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and isinstance(record.get("meta"), dict)


_REQUIRED: dict[str, tuple[str, ...]] = {
    "isic2016": ("ground_truth",),
    "isic2017": ("ground_truth",),
    "isic2019": ("ground_truth",),
    "isic2020": ("ground_truth",),
}


class Layout:
    """Which files of the tree play which role, for every release (computed once per source)."""

    def __init__(self, tree: SourceTree):
        self.tree = tree
        self.csv_heads: dict[str, list[str]] = {}
        self.roles: dict[str, list[str]] = {}  # "release/role" -> sorted candidate files
        for rel in tree.with_suffix(".csv"):
            try:
                head = _head(tree.abspath(rel))
            except OSError:
                continue
            self.csv_heads[rel] = head[0] if head else []
            for role in csv_roles(head):
                self.roles.setdefault(role, []).append(rel)
        for files in self.roles.values():
            files.sort(key=_preference)
        # Legacy archive records: folders of <id>.json holding {"meta": {...}}; the first JSON of
        # each folder decides (checking all of them would read every record twice).
        self.json_dirs: list[str] = []
        seen: set[str] = set()
        for rel in tree.with_suffix(".json"):
            folder = _dir(rel)
            if folder not in seen:
                seen.add(folder)
                if _is_json_record(tree.abspath(rel)):
                    self.json_dirs.append(folder)
        self.hdf5: list[str] = sorted(tree.with_suffix(".hdf5", ".h5"), key=_preference)

    def first(self, role: str) -> str | None:
        files = self.roles.get(role)
        return files[0] if files else None

    def files_for(self, release: str) -> dict[str, str] | None:
        """Role -> file for `release`, or None when its required files are absent."""
        pick = {}
        for role in ("ground_truth", "metadata", "lesion_groupings", "ham10000", "duplicates"):
            found = self.first(f"{release}/{role}")
            if found:
                pick[role] = found
        if release == "archive":
            if "metadata" in pick:
                return {"metadata": pick["metadata"]}
            if self.json_dirs:
                return {"records": ",".join(d or "." for d in self.json_dirs)}
            return None
        if release == "isic2018":
            if "ground_truth" not in pick and "ham10000" not in pick:
                return None
            return pick
        if release == "isic2024":
            if "metadata" not in pick:
                return None
            meta_dir = _dir(pick["metadata"])
            near = [h for h in self.hdf5 if _dir(h) == meta_dir] or self.hdf5
            if near:
                pick["hdf5"] = sorted(near, key=lambda h: ("train-image" not in h, h))[0]
            return pick
        if all(r in pick for r in _REQUIRED[release]):
            return pick
        return None

    def describe(self, limit: int = 15) -> str:
        """The CSV files seen and their first columns, for error messages."""
        if not self.csv_heads and not self.json_dirs and not self.hdf5:
            shown = self.tree.files[:limit]
            more = len(self.tree.files) - len(shown)
            listing = ", ".join(shown) + (f" ... (+{more} more)" if more > 0 else "")
            return f"no CSV/JSON/HDF5 file found; files: {listing or '(none)'}"
        lines = []
        for rel, head in list(self.csv_heads.items())[:limit]:
            cols = ",".join(head[:8]) + (",..." if len(head) > 8 else "")
            lines.append(f"  {rel}: {cols}")
        lines += [f"  {h}" for h in self.hdf5[:limit]]
        return "found:\n" + "\n".join(lines)


def release_files(layout: Layout, release: str, source: str | os.PathLike) -> dict[str, str]:
    """`layout.files_for(release)`; SourceError (what `release` needs, what is there) if absent."""
    files = layout.files_for(release)
    if files is None:
        raise SourceError(
            f"{os.fspath(source)} does not hold an {release} layout: expected "
            f"{EXPECTED[release]}\n{layout.describe()}"
        )
    return files


def detect(source: str | os.PathLike) -> str:
    """The one release whose files are in `source` (--format auto).

    Raises:
      ReleaseNotRecognisedError: none recognised (lists what each release needs) or several.
    """
    layout = Layout(SourceTree(source))
    found = [r for r in L.RELEASES if layout.files_for(r) is not None]
    # A legacy-JSON archive folder may sit next to a challenge release; the challenge file wins.
    if (
        len(found) > 1
        and "archive" in found
        and "metadata" not in (layout.files_for("archive") or {})
    ):
        found.remove("archive")
    if len(found) == 1:
        return found[0]
    if not found:
        expected = "\n".join(f"  {r}: {text}" for r, text in EXPECTED.items())
        raise ReleaseNotRecognisedError(
            f"--format auto recognised no ISIC release in {os.fspath(source)} (searched "
            f"{MAX_DEPTH} folder levels down). Each release is recognised by:\n{expected}\n"
            f"{layout.describe()}"
        )
    raise ReleaseNotRecognisedError(
        f"{os.fspath(source)} holds the files of several releases ({', '.join(found)}): pass "
        "--format with the one to prepare"
    )


# ----------------------------------------------------------------------------- per-release rows


def _dict_rows(path: str) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, row dict with lower-cased stripped keys) for each data row of a CSV."""
    header = None
    for line, row in _csv_rows(path):
        if header is None:
            header = [c.strip().lower() for c in row]
            continue
        yield line, {k: (row[i].strip() if i < len(row) else "") for i, k in enumerate(header)}


def _one_hot(row: dict[str, str], classes: Sequence[str]) -> tuple[str | None, str]:
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


def _rows_2016(path: str, rel: str) -> Iterator[_Row | Skip]:
    for line, (_, row) in enumerate(_csv_rows(path), start=1):
        if len(row) < 2:
            yield Skip(f"{rel} row {line}", "malformed row (expected image,label)")
            continue
        image_id, raw = row[0].strip(), row[1].strip()
        if line == 1 and not image_id.startswith("ISIC_") and L.parse_binary(raw) is None:
            continue  # a header
        label = L.parse_binary(raw)
        if label is None:
            yield Skip(image_id, f"unknown label value {raw!r} ({rel} row {line})")
            continue
        yield _Row(image_id, f"{rel} row {line}", label, L.LABEL_NAMES[label])


def _rows_2017(path: str, rel: str, meta: dict[str, dict[str, str]]) -> Iterator[_Row | Skip]:
    for line, row in _dict_rows(path):
        image_id = row.get("image_id", "")
        flags = {}
        for col in ("melanoma", "seborrheic_keratosis"):
            raw = row.get(col, "")
            flags[col] = L.parse_binary(raw)
            if flags[col] is None:
                yield Skip(image_id, f"unknown label value {col}={raw!r} ({rel} row {line})")
                break
        else:
            if flags["melanoma"] and flags["seborrheic_keratosis"]:
                yield Skip(
                    image_id,
                    f"unknown label: melanoma and seborrheic_keratosis both 1 ({rel} row {line})",
                )
                continue
            diagnosis = (
                "melanoma"
                if flags["melanoma"]
                else "seborrheic_keratosis"
                if flags["seborrheic_keratosis"]
                else "nevus"
            )
            m = meta.get(image_id, {})
            yield _Row(
                image_id,
                f"{rel} row {line}",
                int(flags["melanoma"]),
                diagnosis,
                age=L.parse_age(m.get("age_approximate")),
                sex=L.parse_sex(m.get("sex")),
            )


def _rows_one_hot(
    path: str, rel: str, release: str, meta: dict[str, dict[str, str]]
) -> Iterator[_Row | Skip]:
    classes = L.DIAGNOSIS_CLASSES[release]
    malignant = set(L.MALIGNANT_DIAGNOSES[release])
    for line, row in _dict_rows(path):
        image_id = row.get("image", "")
        where = f"{rel} row {line}"
        if release == "isic2019" and L.parse_binary(row.get("unk", "0")) == 1:
            yield Skip(
                image_id, f"label UNK (unknown diagnosis) has no benign/malignant label ({where})"
            )
            continue
        name, why = _one_hot(row, classes)
        if name is None:
            yield Skip(image_id, f"{why} ({where})")
            continue
        m = meta.get(image_id, {})
        yield _Row(
            image_id,
            where,
            int(name in malignant),
            name,
            lesion_id=L.parse_text(m.get("lesion_id")),
            age=L.parse_age(m.get("age_approx", m.get("age"))),
            sex=L.parse_sex(m.get("sex")),
            anatom_site=L.parse_site(m.get("anatom_site_general", m.get("localization"))),
        )


_HAM_DX = {
    "akiec": "AKIEC",
    "bcc": "BCC",
    "bkl": "BKL",
    "df": "DF",
    "mel": "MEL",
    "nv": "NV",
    "vasc": "VASC",
}


def _rows_ham10000(path: str, rel: str) -> Iterator[_Row | Skip]:
    malignant = set(L.MALIGNANT_DIAGNOSES["isic2018"])
    for line, row in _dict_rows(path):
        image_id = row.get("image_id", "")
        name = _HAM_DX.get(row.get("dx", "").lower())
        if name is None:
            yield Skip(image_id, f"unknown label value dx={row.get('dx')!r} ({rel} row {line})")
            continue
        yield _Row(
            image_id,
            f"{rel} row {line}",
            int(name in malignant),
            name,
            lesion_id=L.parse_text(row.get("lesion_id")),
            age=L.parse_age(row.get("age")),
            sex=L.parse_sex(row.get("sex")),
            anatom_site=L.parse_site(row.get("localization")),
        )


def _rows_2020(path: str, rel: str) -> Iterator[_Row | Skip]:
    for line, row in _dict_rows(path):
        image_id = row.get("image_name", "")
        where = f"{rel} row {line}"
        raw = row.get("target", "")
        label = L.parse_binary(raw) if raw != "" else L.parse_binary(row.get("benign_malignant"))
        if label is None:
            yield Skip(image_id, f"unknown label value target={raw!r} ({where})")
            continue
        yield _Row(
            image_id,
            where,
            label,
            L.archive_class(row.get("diagnosis")),
            patient_id=L.parse_text(row.get("patient_id")),
            lesion_id=L.parse_text(row.get("lesion_id")),
            age=L.parse_age(row.get("age_approx")),
            sex=L.parse_sex(row.get("sex")),
            anatom_site=L.parse_site(
                row.get("anatom_site_general_challenge", row.get("anatom_site_general"))
            ),
        )


def _archive_fields(row: Mapping[str, str]) -> dict[str, Any]:
    """_Row's patient/lesion/age/sex/site from the ISIC Archive's column names (isic-cli's
    metadata.csv and the 2024 train-metadata.csv share them)."""
    return {
        "patient_id": L.parse_text(row.get("patient_id")),
        "lesion_id": L.parse_text(row.get("lesion_id")),
        "age": L.parse_age(row.get("age_approx")),
        "sex": L.parse_sex(row.get("sex")),
        "anatom_site": L.parse_site(row.get("anatom_site_general")),
        "fitzpatrick": L.parse_text(row.get("fitzpatrick_skin_type")),
        "attribution": L.parse_text(row.get("attribution")),
        "license": L.parse_text(row.get("copyright_license")),
    }


def _rows_2024(path: str, rel: str) -> Iterator[_Row | Skip]:
    for line, row in _dict_rows(path):
        image_id = row.get("isic_id", "")
        raw = row.get("target", "")
        label = L.parse_binary(raw)
        if label is None:
            yield Skip(image_id, f"unknown label value target={raw!r} ({rel} row {line})")
            continue
        # iddx_full repeats iddx_1..5 joined by "::"; alone ("Benign") it says nothing more.
        full = row.get("iddx_full", "")
        diagnosis = L.archive_class(
            *(row.get(f"iddx_{i}") for i in (5, 4, 3, 2)), full if "::" in full else ""
        )
        yield _Row(
            image_id,
            f"{rel} row {line}",
            label,
            diagnosis,
            **_archive_fields(row),
        )


INDETERMINATE_POLICIES = ("skip", "benign", "malignant")


def _archive_label(value: object, indeterminate: str) -> tuple[int | None, str]:
    """Binary label from diagnosis_1 / benign_malignant, applying the Indeterminate policy."""
    if L.is_missing(value):
        return None, "no benign/malignant label (diagnosis_1 / benign_malignant empty)"
    text = str(value).strip().lower()
    if text in ("benign", "malignant"):
        return L.LABEL_NAMES.index(text), ""
    if text.startswith("indeterminate"):
        if indeterminate == "skip":
            return None, (
                f"indeterminate diagnosis {str(value)!r} (policy: skip; "
                "--indeterminate=benign|malignant keeps it)"
            )
        return L.LABEL_NAMES.index(indeterminate), ""
    return None, f"unknown label value {str(value)!r}"


def _rows_archive_csv(path: str, rel: str, indeterminate: str) -> Iterator[_Row | Skip]:
    for line, row in _dict_rows(path):
        image_id = row.get("isic_id", "")
        where = f"{rel} row {line}"
        raw = row.get("diagnosis_1") or row.get("benign_malignant")
        label, why = _archive_label(raw, indeterminate)
        if label is None:
            yield Skip(image_id, f"{why} ({where})")
            continue
        diagnosis = L.archive_class(
            *(row.get(f"diagnosis_{i}") for i in (5, 4, 3, 2)), row.get("diagnosis")
        )
        yield _Row(
            image_id,
            where,
            label,
            diagnosis,
            **_archive_fields(row),
        )


def _rows_archive_json(
    tree: SourceTree, folders: Iterable[str], indeterminate: str
) -> Iterator[_Row | Skip]:
    wanted = set(folders)
    for rel in tree.with_suffix(".json"):
        if _dir(rel) not in wanted:
            continue
        try:
            with open(tree.abspath(rel), encoding="utf-8") as f:
                record = json.load(f)
        except (OSError, ValueError) as exc:
            yield Skip(rel, f"invalid metadata record ({type(exc).__name__}: {exc})")
            continue
        if not isinstance(record, dict) or not isinstance(record.get("meta"), dict):
            yield Skip(rel, "not an ISIC metadata record (no 'meta' object)")
            continue
        image_id = str(record.get("name") or record.get("isic_id") or _stem(rel))
        meta = record["meta"]
        clinical = meta.get("clinical") if isinstance(meta.get("clinical"), dict) else {}
        label, why = _archive_label(clinical.get("benign_malignant"), indeterminate)
        if label is None:
            yield Skip(image_id, f"{why} ({rel})")
            continue
        yield _Row(
            image_id,
            rel,
            label,
            L.archive_class(clinical.get("diagnosis")),
            patient_id=L.parse_text(clinical.get("patient_id", meta.get("patient_id"))),
            lesion_id=L.parse_text(clinical.get("lesion_id", meta.get("lesion_id"))),
            age=L.parse_age(clinical.get("age_approx")),
            sex=L.parse_sex(clinical.get("sex")),
            anatom_site=L.parse_site(clinical.get("anatom_site_general")),
            fitzpatrick=L.parse_text(clinical.get("fitzpatrick_skin_type")),
        )


def _metadata_by_id(path: str | None, id_column: str) -> dict[str, dict[str, str]]:
    if path is None:
        return {}
    return {row.get(id_column, ""): row for _, row in _dict_rows(path)}


# ----------------------------------------------------------------------------- ids and images


def unsafe_id_reason(image_id: str) -> str | None:
    """Why `image_id` cannot name an image file (ids are file stems, never paths), or None."""
    if not image_id:
        return "empty image id"
    if "\x00" in image_id:
        return "image id contains a NUL byte"
    if "/" in image_id or "\\" in image_id or image_id in (".", "..") or image_id.startswith("~"):
        normal = os.path.normpath(os.path.join("source", image_id.replace("\\", "/")))
        if normal == "source" or not normal.startswith("source" + os.sep) or ".." in image_id:
            return f"unsafe image id {image_id!r}: it would resolve outside the source folder"
        return f"unsafe image id {image_id!r}: ids are file names, not paths"
    return None


def _dedupe(rows: Iterable[_Row | Skip], skips: list[Skip]) -> tuple[list[_Row], set[str]]:
    """Keeps the first row of each id; returns the rows and every id that had a row."""
    kept: dict[str, _Row] = {}
    seen: set[str] = set()
    for row in rows:
        if isinstance(row, Skip):
            skips.append(row)
            if row.item:
                seen.add(row.item)
            continue
        seen.add(row.image_id)
        why = unsafe_id_reason(row.image_id)
        if why:
            skips.append(Skip(row.image_id, f"{why} ({row.where})"))
        elif row.image_id in kept:
            first = kept[row.image_id].where
            skips.append(Skip(row.image_id, f"duplicate id ({row.where}; kept {first})"))
        else:
            kept[row.image_id] = row
    return list(kept.values()), seen


def _locate(
    tree: SourceTree,
    rows: list[_Row],
    all_ids: set[str],
    skips: list[Skip],
    folders: set[str] | None = None,
) -> dict[str, str]:
    """image id -> relative image path; reports missing, duplicate, outside and row-less images."""
    by_stem: dict[str, list[str]] = {}
    for rel in tree.images():
        if folders is None or _dir(rel) in folders:
            by_stem.setdefault(_stem(rel), []).append(rel)
    outside = {_stem(rel): rel for rel in tree.outside}
    ext_rank = {e: i for i, e in enumerate(IMAGE_EXTENSIONS)}
    located: dict[str, str] = {}
    for row in rows:
        paths = sorted(
            by_stem.get(row.image_id, []),
            key=lambda p: (p.count("/"), ext_rank.get(os.path.splitext(p)[1].lower(), 9), p),
        )
        if not paths:
            if row.image_id in outside:
                skips.append(
                    Skip(
                        row.image_id,
                        f"image {outside[row.image_id]} is a link that "
                        "resolves outside the source folder",
                    )
                )
            else:
                skips.append(
                    Skip(
                        row.image_id,
                        f"image file missing ({row.where} has no {row.image_id}.jpg/.jpeg/.png)",
                    )
                )
            continue
        located[row.image_id] = paths[0]
        for extra in paths[1:]:
            skips.append(
                Skip(extra, f"duplicate image file for id {row.image_id} (using {paths[0]})")
            )
    image_dirs = {_dir(p) for stem, paths in by_stem.items() if stem in all_ids for p in paths}
    for stem, paths in sorted(by_stem.items()):
        if stem in all_ids:
            continue
        for rel in paths:
            if _dir(rel) in image_dirs:
                skips.append(Skip(rel, "image with no ground-truth/metadata row"))
    for rel in tree.outside:
        if _stem(rel) not in all_ids and _dir(rel) in image_dirs:
            skips.append(Skip(rel, "link that resolves outside the source folder"))
    return located


def _candidate(release: str, row: _Row, path: str, hdf5_key: str | None = None) -> Candidate:
    return Candidate(
        image_id=row.image_id,
        path=path,
        hdf5_key=hdf5_key,
        label=row.label,
        diagnosis=L.DIAGNOSIS_CLASSES[release].index(row.diagnosis),
        patient_id=row.patient_id,
        lesion_id=row.lesion_id,
        age=row.age,
        sex=row.sex,
        anatom_site=row.anatom_site,
        fitzpatrick=row.fitzpatrick,
        attribution=row.attribution,
        license=row.license,
    )


def _hdf5_keys(path: str) -> list[str]:
    import h5py  # only ISIC 2024 needs it

    with h5py.File(path, "r") as f:
        return sorted(f.keys())


def scan(release: str, source: str | os.PathLike, *, indeterminate: str = "skip") -> Scan:
    """Reads the metadata of `release` in `source`: candidates to decode and skipped inputs.

    Args:
      release: one of RELEASES (not "auto": call `detect` first).
      source: the manual download folder.
      indeterminate: archive only: what an Indeterminate diagnosis becomes ("skip" (default),
        "benign" or "malignant").

    Raises:
      SourceError: the release's files are not in `source`.
    """
    if release not in L.RELEASES:
        raise ValueError(f"unknown release {release!r}; expected one of {L.RELEASES}")
    if indeterminate not in INDETERMINATE_POLICIES:
        raise ValueError(f"indeterminate must be one of {INDETERMINATE_POLICIES}")
    tree = SourceTree(source)
    layout = Layout(tree)
    files = release_files(layout, release, source)
    path = lambda role: tree.abspath(files[role]) if role in files else None
    skips: list[Skip] = [
        Skip(rel, "link that resolves outside the source folder")
        for rel in tree.outside
        if not rel.lower().endswith(IMAGE_EXTENSIONS)
    ]
    folders: set[str] | None = None
    if release == "archive" and "metadata" in files:
        rows = _rows_archive_csv(path("metadata"), files["metadata"], indeterminate)
    elif release == "archive":
        folders = set(layout.json_dirs)
        rows = _rows_archive_json(tree, folders, indeterminate)
    elif release == "isic2016":
        rows = _rows_2016(path("ground_truth"), files["ground_truth"])
    elif release == "isic2017":
        meta = _metadata_by_id(path("metadata"), "image_id")
        rows = _rows_2017(path("ground_truth"), files["ground_truth"], meta)
    elif release == "isic2018" and "ground_truth" in files:
        meta = _metadata_by_id(path("ham10000"), "image_id")
        groupings = _metadata_by_id(path("lesion_groupings"), "image")
        for image_id, row in groupings.items():
            meta.setdefault(image_id, {})["lesion_id"] = row.get("lesion_id", "")
        rows = _rows_one_hot(path("ground_truth"), files["ground_truth"], release, meta)
    elif release == "isic2018":
        files.pop("lesion_groupings", None)
        rows = _rows_ham10000(path("ham10000"), files["ham10000"])
    elif release == "isic2019":
        meta = _metadata_by_id(path("metadata"), "image")
        rows = _rows_one_hot(path("ground_truth"), files["ground_truth"], release, meta)
    elif release == "isic2020":
        rows = _rows_2020(path("ground_truth"), files["ground_truth"])
    else:
        rows = _rows_2024(path("metadata"), files["metadata"])

    kept, all_ids = _dedupe(rows, skips)

    if release == "isic2020" and "duplicates" in files:
        dropped: set[str] = set()
        present = {r.image_id for r in kept}
        for line, row in _dict_rows(path("duplicates")):
            first, second = row.get("image_name_1", ""), row.get("image_name_2", "")
            if first in dropped or second in dropped or first == second or second not in present:
                continue
            dropped.add(second)
            skips.append(
                Skip(
                    second,
                    f"duplicate image of {first} ({files['duplicates']} row "
                    f"{line}: the second of each pair is dropped)",
                )
            )
        kept = [r for r in kept if r.image_id not in dropped]

    candidates: list[Candidate] = []
    if release == "isic2024" and "hdf5" in files:
        hdf5 = path("hdf5")
        try:
            keys = _hdf5_keys(hdf5)
        except Exception as exc:  # noqa: BLE001 - any h5py failure means the file is unusable
            raise SourceError(f"cannot read {files['hdf5']}: {exc}") from exc
        key_set = set(keys)
        for row in kept:
            if row.image_id in key_set:
                candidates.append(_candidate(release, row, hdf5, row.image_id))
            else:
                skips.append(
                    Skip(row.image_id, f"image missing from {files['hdf5']} ({row.where})")
                )
        skips += [
            Skip(f"{files['hdf5']}:{k}", "image with no metadata row")
            for k in keys
            if k not in all_ids
        ]
    else:
        located = _locate(tree, kept, all_ids, skips, folders)
        candidates = [
            _candidate(release, row, tree.abspath(located[row.image_id]))
            for row in kept
            if row.image_id in located
        ]
    candidates.sort(key=lambda c: c.image_id)
    return Scan(
        release=release, source=tree.root, files=files, candidates=candidates, skipped=skips
    )
