"""Readers of the official ISIC release layouts: find the files, parse labels and metadata.

What each release's download looks like is its entry in the release table
(`isic_jax.data.isic.layouts`); this module applies the entries to a source folder.
`scan(release, source)` turns a manual download into a list of `Candidate`s (one per usable
metadata row whose image file exists) and a list of `Skip`s (every input left out, with its reason),
before any image is decoded. Decoding happens later, in the builder; images that fail there are
added to the skips by the builder.

What is looked for (up to `MAX_DEPTH` folder levels below the source; names are not fixed, files are
recognised by their content, see the entries' `Role`s and `EXPECTED`):
- Ground-truth / metadata CSVs, by header. When several CSVs fit one role, names containing "train"
  win over others, names containing "test"/"val" lose, "v2" wins, then the shallower, then by name.
  A release is read in its first layout (`Variant`) whose required files are there.
- Images, by file name: `<id>.jpg|.jpeg|.png` (extension in any case) anywhere in the tree; an id is
  a file stem, never a path. `*_superpixels.png` (2017) and `*_segmentation.png`/`*_mask.png`
  files are not images of the task and are ignored. Images in a folder that holds at least one
  image of a ground-truth row but that have no row themselves are reported as skipped ("no
  ground-truth row"); folders with no matching image at all (e.g. the test images next to the
  training images) are ignored.
- HDF5 image containers (ISIC 2024's `train-image.hdf5`: any `*.hdf5` next to the metadata, else
  anywhere; one dataset per image id holding the JPEG bytes), for the layouts that read one.
- DICOM files `<id>.dcm` (the Kaggle copy of ISIC 2020), for the layouts that read them: a
  release's layouts are tried in the entry's order, and a layout is read only when the tree
  holds its kind of images, so JPEGs win over DICOM files when both are there.
- A CSV whose header is exactly a release's sample submission (`Release.submission`, e.g.
  Kaggle's `sample_submission.csv`: image_name,target) plays no role of another release.

Safety: the tree walk does not follow symlinked folders; a file (or folder) link that resolves
outside the source is never read and is reported; an id containing a path separator or `..` is
reported and never used to build a path.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Iterable, Sequence

from isic_jax.data.isic import labels as L
from isic_jax.data.isic.dicom import DICOM_EXTENSIONS
from isic_jax.data.isic.images import IMAGE_EXTENSIONS
from isic_jax.data.isic.layouts import RELEASES as ENTRIES
from isic_jax.data.isic.layouts import rows as R
from isic_jax.data.isic.layouts.archive import INDETERMINATE_POLICIES
from isic_jax.data.isic.layouts.rows import Row, Skip
from isic_jax.data.isic.layouts.spec import Inputs, Role, Variant

__all__ = [
    "EXPECTED", "INDETERMINATE_POLICIES", "MAX_DEPTH", "Candidate", "Layout",
    "ReleaseNotRecognisedError", "Scan", "Skip", "SourceError", "SourceTree", "csv_roles",
    "detect", "release_files", "scan", "unsafe_id_reason",
]  # fmt: skip

MAX_DEPTH = 3  # folder levels searched below --source

# What each release is recognised by (shown when --format auto recognises nothing).
EXPECTED: dict[str, str] = {name: r.expected for name, r in ENTRIES.items()}


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
    fitzpatrick: str = ""  # Fitzpatrick skin type as written (I-VI), "" = missing
    tabular: tuple[float, ...] = ()  # Release.tabular, NaN = missing
    tabular_text: tuple[str, ...] = ()  # Release.tabular_text, "" = missing
    attribution: str = ""
    copyright_license: str = ""

    @property
    def group(self) -> str:
        """Fold grouping key: the patient, else the lesion, else the image itself."""
        if self.patient_id:
            return "patient:" + self.patient_id
        if self.lesion_id:
            return "lesion:" + self.lesion_id
        return "image:" + self.image_id


@dataclasses.dataclass
class Scan:
    """The result of reading a release's metadata: what will be decoded, and what was left out."""

    release: str
    source: str  # absolute, symlinks resolved
    files: dict[str, str]  # role -> path relative to the source (or "hdf5")
    candidates: list[Candidate]  # sorted by image_id
    skipped: list[Skip]


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

    def dicoms(self) -> list[str]:
        """DICOM files (`*.dcm`, `*.dicom`)."""
        return self.with_suffix(*DICOM_EXTENSIONS)


# ISIC 2017's superpixel maps and the segmentation tasks' masks sit next to the images.
_AUXILIARY = re.compile(r"_(superpixels|segmentation|mask)$", re.IGNORECASE)
_stem, _dir = R.stem, R.folder


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


# ----------------------------------------------------------------------------- recognising files


def _csv_recognisers() -> dict[str, Callable[[Sequence[Sequence[str]]], bool]]:
    """Recogniser of every CSV role of every entry, keyed "release/role"."""
    out = {}
    for release in ENTRIES.values():
        for variant in release.variants:
            for role in variant.roles:
                if role.kind == "csv" and role.recognise is not None:
                    out.setdefault(f"{release.name}/{role.name}", role.recognise)
    return out


_CSV_RECOGNISERS = _csv_recognisers()
# Sample-submission headers (lower-case) -> the release they belong to.
_SUBMISSIONS: dict[tuple[str, ...], str] = {
    tuple(c.lower() for c in r.submission): r.name for r in ENTRIES.values() if r.submission
}


def csv_roles(head: list[list[str]]) -> set[str]:
    """Roles a CSV can play, from its first rows ("isic2019/ground_truth", ...).

    A release's sample submission (header exactly `Release.submission`) plays roles of that
    release only: Kaggle's 2020 `sample_submission.csv` (image_name,target, then ISIC_...,0)
    would otherwise read as an ISIC 2016 ground truth.
    """
    roles = {key for key, recognise in _CSV_RECOGNISERS.items() if recognise(head)}
    owner = _SUBMISSIONS.get(tuple(c.strip().lower() for c in head[0])) if head else None
    if owner is not None:
        roles = {key for key in roles if key.split("/", 1)[0] == owner}
    return roles


def _is_json_record(path: str) -> bool:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and isinstance(record.get("meta"), dict)


class Layout:
    """Which files of the tree play which role, for every release (computed once per source)."""

    def __init__(self, tree: SourceTree):
        self.tree = tree
        self.csv_heads: dict[str, list[str]] = {}
        self.roles: dict[str, list[str]] = {}  # "release/role" -> sorted candidate files
        for rel in tree.with_suffix(".csv"):
            try:
                first = R.head(tree.abspath(rel))
            except OSError:
                continue
            self.csv_heads[rel] = first[0] if first else []
            for role in csv_roles(first):
                self.roles.setdefault(role, []).append(rel)
        for files in self.roles.values():
            files.sort(key=_preference)
        # Legacy archive records: folders of <id>.json holding {"meta": {...}}; the first JSON of
        # each folder decides (checking all of them would read every record twice).
        self.json_dirs: list[str] = []
        seen: set[str] = set()
        for rel in tree.with_suffix(".json"):
            where = _dir(rel)
            if where not in seen:
                seen.add(where)
                if _is_json_record(tree.abspath(rel)):
                    self.json_dirs.append(where)
        self.hdf5: list[str] = sorted(tree.with_suffix(".hdf5", ".h5"), key=_preference)

    def first(self, role: str) -> str | None:
        files = self.roles.get(role)
        return files[0] if files else None

    def _find(self, release: str, role: Role, picked: dict[str, str]) -> str | None:
        """The file of the tree that plays `role` (None if none)."""
        if role.kind == "csv":
            return self.first(f"{release}/{role.name}")
        if role.kind == "json":
            return ",".join(d or "." for d in self.json_dirs) if self.json_dirs else None
        if role.kind == "hdf5":
            anchor = _dir(picked[role.near]) if role.near in picked else None
            near = [h for h in self.hdf5 if _dir(h) == anchor] or self.hdf5
            ranked = sorted(near, key=lambda h: (role.prefer not in h, h))
            return ranked[0] if ranked else None
        raise ValueError(f"unknown role kind {role.kind!r}")

    def _files(self, release: str, variant: Variant) -> dict[str, str] | None:
        """Role -> file for `variant`, or None when one of its required files is absent."""
        picked: dict[str, str] = {}
        for role in variant.roles:
            found = self._find(release, role, picked)
            if found:
                picked[role.name] = found
            elif role.required:
                return None
        return picked

    def variant_for(self, release: str) -> tuple[Variant, dict[str, str]] | None:
        """The layout of `release` to read, and role -> file: the first one whose required files
        are there and whose kind of images the tree holds, else the first one whose required
        files are there (its images are then reported missing)."""
        matches = [
            (variant, files)
            for variant in ENTRIES[release].variants
            if (files := self._files(release, variant)) is not None
        ]
        for variant, files in matches:
            if _IMAGE_SOURCES[variant.images.kind].present(self.tree):
                return variant, files
        return matches[0] if matches else None

    def files_for(self, release: str) -> dict[str, str] | None:
        """Role -> file for `release`, or None when its required files are absent."""
        found = self.variant_for(release)
        return found[1] if found else None

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
    return _variant(layout, release, source)[1]


def _variant(
    layout: Layout, release: str, source: str | os.PathLike
) -> tuple[Variant, dict[str, str]]:
    found = layout.variant_for(release)
    if found is None:
        raise SourceError(
            f"{os.fspath(source)} does not hold an {release} layout: expected "
            f"{EXPECTED[release]}\n{layout.describe()}"
        )
    return found


def detect(source: str | os.PathLike) -> str:
    """The one release whose files are in `source` (--format auto).

    Raises:
      ReleaseNotRecognisedError: none recognised (lists what each release needs) or several.
    """
    layout = Layout(SourceTree(source))
    found = {r: v for r in ENTRIES if (v := layout.variant_for(r)) is not None}
    # A weak layout (legacy-JSON archive records) yields to another release found beside it.
    if len(found) > 1:
        found = {r: v for r, v in found.items() if not v[0].weak} or found
    if len(found) == 1:
        return next(iter(found))
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


def _dedupe(rows: Iterable[Row | Skip], skips: list[Skip]) -> tuple[list[Row], set[str]]:
    """Keeps the first row of each id; returns the rows and every id that had a row."""
    kept: dict[str, Row] = {}
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
    rows: list[Row],
    all_ids: set[str],
    skips: list[Skip],
    folders: set[str] | None = None,
    *,
    extensions: tuple[str, ...] = IMAGE_EXTENSIONS,
) -> dict[str, str]:
    """image id -> relative image path; reports missing, duplicate, outside and row-less images.

    extensions: of the image files looked for (IMAGE_EXTENSIONS, or DICOM_EXTENSIONS).
    """
    by_stem: dict[str, list[str]] = {}
    files = tree.images() if extensions == IMAGE_EXTENSIONS else tree.with_suffix(*extensions)
    for rel in files:
        if folders is None or _dir(rel) in folders:
            by_stem.setdefault(_stem(rel), []).append(rel)
    outside = {_stem(rel): rel for rel in tree.outside}
    ext_rank = {e: i for i, e in enumerate(extensions)}
    wanted = "/".join(extensions)
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
                        f"image file missing ({row.where} has no {row.image_id}{wanted})",
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


def _candidate(release: str, row: Row, path: str, hdf5_key: str | None = None) -> Candidate:
    entry = ENTRIES[release]
    # A reader that read no tabular column gives all of them as missing.
    tabular = row.tabular or (float("nan"),) * len(entry.tabular)
    tabular_text = row.tabular_text or ("",) * len(entry.tabular_text)
    if len(tabular) != len(entry.tabular) or len(tabular_text) != len(entry.tabular_text):
        raise ValueError(f"{release}: the reader gave tabular values that do not fit the entry")
    return Candidate(
        image_id=row.image_id,
        path=path,
        hdf5_key=hdf5_key,
        label=row.label,
        diagnosis=ENTRIES[release].classes.index(row.diagnosis),
        patient_id=row.patient_id,
        lesion_id=row.lesion_id,
        age=row.age,
        sex=row.sex,
        anatom_site=row.anatom_site,
        fitzpatrick=row.fitzpatrick,
        tabular=tuple(tabular),
        tabular_text=tuple(tabular_text),
        attribution=row.attribution,
        copyright_license=row.copyright_license,
    )


def _hdf5_keys(path: str) -> list[str]:
    import h5py  # only the HDF5 layouts need it

    with h5py.File(path, "r") as f:
        return sorted(f.keys())


def _from_files(
    release: str, variant: Variant, inputs: Inputs, kept: list[Row], all_ids: set[str],
    skips: list[Skip],
) -> list[Candidate]:  # fmt: skip
    """Candidates whose image is a file of the tree (reporting missing and row-less images)."""
    tree = inputs.tree
    folders = set(inputs.record_dirs) if variant.images.beside_records else None
    located = _locate(tree, kept, all_ids, skips, folders)
    return [
        _candidate(release, row, tree.abspath(located[row.image_id]))
        for row in kept
        if row.image_id in located
    ]


def _from_dicom(
    release: str, variant: Variant, inputs: Inputs, kept: list[Row], all_ids: set[str],
    skips: list[Skip],
) -> list[Candidate]:  # fmt: skip
    """Candidates whose image is a DICOM file of the tree (decoded by `images.process_image`)."""
    tree = inputs.tree
    located = _locate(tree, kept, all_ids, skips, extensions=DICOM_EXTENSIONS)
    return [
        _candidate(release, row, tree.abspath(located[row.image_id]))
        for row in kept
        if row.image_id in located
    ]


def _from_hdf5(
    release: str, variant: Variant, inputs: Inputs, kept: list[Row], all_ids: set[str],
    skips: list[Skip],
) -> list[Candidate]:  # fmt: skip
    """Candidates whose image is a dataset of the HDF5 container (reporting missing and row-less
    ones)."""
    role = variant.images.role
    hdf5, rel = inputs.path(role), inputs.files[role]
    try:
        keys = _hdf5_keys(hdf5)
    except Exception as exc:  # noqa: BLE001 - any h5py failure means the file is unusable
        raise SourceError(f"cannot read {rel}: {exc}") from exc
    key_set = set(keys)
    candidates = []
    for row in kept:
        if row.image_id in key_set:
            candidates.append(_candidate(release, row, hdf5, row.image_id))
        else:
            skips.append(Skip(row.image_id, f"image missing from {rel} ({row.where})"))
    skips += [Skip(f"{rel}:{k}", "image with no metadata row") for k in keys if k not in all_ids]
    return candidates


@dataclasses.dataclass(frozen=True)
class _ImageKind:
    """What `scan` does for one kind of image source (`ImageSource.kind`).

    present: whether the tree holds images of this kind (a layout whose required files are
    there holds them when its container role was found). candidates: the rows whose image is
    there, as candidates; reports the missing and row-less images.
    """

    present: Callable[[SourceTree], bool]
    candidates: Callable[[str, Variant, Inputs, list[Row], set[str], list[Skip]], list[Candidate]]


_IMAGE_SOURCES: dict[str, _ImageKind] = {
    "files": _ImageKind(lambda tree: bool(tree.images()), _from_files),
    "dicom": _ImageKind(lambda tree: bool(tree.dicoms()), _from_dicom),
    "hdf5": _ImageKind(lambda tree: True, _from_hdf5),
}


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
    variant, files = _variant(layout, release, source)
    inputs = Inputs(tree, files, tuple(layout.json_dirs), indeterminate)
    skips: list[Skip] = [
        Skip(rel, "link that resolves outside the source folder")
        for rel in tree.outside
        if not rel.lower().endswith(IMAGE_EXTENSIONS)
    ]
    kept, all_ids = _dedupe(variant.read(inputs), skips)
    if variant.refine is not None:
        kept = variant.refine(inputs, kept, skips)
    make = _IMAGE_SOURCES[variant.images.kind].candidates
    candidates = make(release, variant, inputs, kept, all_ids, skips)
    candidates.sort(key=lambda c: c.image_id)
    return Scan(
        release=release, source=tree.root, files=files, candidates=candidates, skipped=skips
    )
