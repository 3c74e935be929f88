"""The types of the release table: `Release`, its `Variant`s, their `Role`s and `ImageSource`.

A `Release` says what one ISIC release is: its name, class list and malignant classes, its
citation, the text shown when `--format auto` recognises nothing, which ids its metadata carries,
how `isic_jax.data.synth` imitates it (`synthspec.SynthSpec`), and the layouts (`Variant`s) in
which its download comes. A variant lists the files it reads (`Role`s: how each is recognised,
whether it is required, its official name and columns, and how one image's row is written), the
function that reads its rows, and where its images are (`ImageSource`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from isic_jax.data.isic import labels as L
from isic_jax.data.isic.layouts.rows import Row, Skip

if TYPE_CHECKING:
    from isic_jax.data.isic.layouts.synthspec import SynthSpec

Recogniser = Callable[[Sequence[Sequence[str]]], bool]


@dataclasses.dataclass(frozen=True)
class Header:
    """Recognises a CSV by its header row (column names compared lower-case, stripped).

    required: every one of these columns. any_of: at least one of these (when not empty).
    unless: not when the header has all the columns of one of these groups (the file of another
      role that shares the required columns).
    """

    required: tuple[str, ...]
    any_of: tuple[str, ...] = ()
    unless: tuple[tuple[str, ...], ...] = ()

    def __call__(self, head: Sequence[Sequence[str]]) -> bool:
        """head: the first rows of the CSV (list of cells each)."""
        if not head:
            return False
        cols = {c.strip().lower() for c in head[0]}
        has = lambda names: all(n.lower() in cols for n in names)
        return (
            has(self.required)
            and (not self.any_of or any(n.lower() in cols for n in self.any_of))
            and not any(has(group) for group in self.unless)
        )


@dataclasses.dataclass(frozen=True)
class MetadataRow:
    """One image as a release's metadata files state it, for the writers; values as written
    ("" is an empty cell).

    label: the value of the release's label field (a class name for the one-hot and 2016/2017
      ground truths, "0"/"1" for a `target`, "Benign"/"Malignant"/"Indeterminate" for the
      archive's diagnosis_1, "benign"/"malignant" for a JSON record); any other value is written
      as is, to make an "unknown label" row.
    diagnosis: free-text diagnosis where the release has a field for it beside the label.
    duplicate_of: the id of the image this one repeats (files that list duplicate pairs).
    columns: other official columns by name; they win over the values derived from the fields.
    """

    image_id: str
    label: str
    diagnosis: str = ""
    patient_id: str = ""
    lesion_id: str = ""
    age: str = ""
    sex: str = ""
    site: str = ""
    duplicate_of: str = ""
    columns: Mapping[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Role:
    """One file of a variant, keyed by `name` in `Scan.files` (and the prepare report).

    kind: "csv" (recognised by `recognise` over its first two rows), "json" (folders of per-image
      records `<image_id>.json` holding {"meta": {...}}), or "hdf5" (an image container: the one
      in the folder of the role named `near`, else any; names containing `prefer` first).
    required: the variant is not there without this file.
    official: the file's path in the official download, relative to its root (what writers use).
    columns: the official columns, in file order; `header`: whether the file starts with them.
    line_end: "\\n", or "\\r\\n" as isic-cli writes its CSV.
    values: the column values (csv) or the record (json) of one image; None: not written per
      image. table: the rows of a file that is not one row per image (e.g. duplicate pairs).
    """

    name: str
    kind: str = "csv"
    recognise: Recogniser | None = None
    required: bool = False
    official: str = ""
    columns: tuple[str, ...] = ()
    header: bool = True
    line_end: str = "\n"
    values: Callable[[MetadataRow], Mapping[str, Any]] | None = None
    table: Callable[[Sequence[MetadataRow]], Iterable[Sequence[str]]] | None = None
    near: str = ""
    prefer: str = ""


@dataclasses.dataclass(frozen=True)
class ImageSource:
    """Where a variant's images are.

    kind: "files": `<image_id>.jpg|.jpeg|.png` anywhere in the tree (written to `folder`, "" is
      the top level); "dicom": `<image_id>.dcm` anywhere in the tree (written to `folder`; a
      layout of this kind is read when the tree holds no image files, see `releases`); "hdf5":
      one dataset per image id in the file of the role named `role`.
    beside_records: files only: images count only in the folders of the JSON records.
    """

    kind: str = "files"
    folder: str = ""
    role: str = ""
    beside_records: bool = False

    @property
    def image_dir(self) -> str | None:
        """The folder of the image files; None when the images are inside a container file."""
        return None if self.role else self.folder


@dataclasses.dataclass(frozen=True)
class Inputs:
    """What a variant's reader gets.

    tree: the `releases.SourceTree` of the source. files: role name -> path relative to the
    source (`Role.kind` "json": the record folders, comma-separated, "." for the top level).
    record_dirs: the folders holding JSON records. indeterminate: the archive's policy for
    Indeterminate diagnoses ("skip", "benign", "malignant").
    """

    tree: Any
    files: Mapping[str, str]
    record_dirs: tuple[str, ...] = ()
    indeterminate: str = "skip"

    def path(self, role: str) -> str | None:
        """Absolute path of the file of `role`, or None when the source has none."""
        return self.tree.abspath(self.files[role]) if role in self.files else None


@dataclasses.dataclass(frozen=True)
class TypicalLabels:
    """Label values (and the diagnosis written with them) of a typical benign and malignant
    image; hand-made test layouts use them."""

    benign: str
    malignant: str
    benign_diagnosis: str = ""
    malignant_diagnosis: str = ""

    def diagnosis(self, label: str) -> str:
        """The diagnosis written with `label` ("" for a label value of neither kind)."""
        return {self.benign: self.benign_diagnosis, self.malignant: self.malignant_diagnosis}.get(
            label, ""
        )


Reader = Callable[[Inputs], Iterable[Row | Skip]]
Refiner = Callable[[Inputs, list[Row], list[Skip]], list[Row]]


@dataclasses.dataclass(frozen=True)
class Variant:
    """One layout in which a release's download comes.

    name: the layout's name (the release's own for its main layout, which synth writes; test
      layouts are written by name). roles: the files it reads, in the order `Scan.files` lists
      them.
    read: the rows of its metadata (`Row`s, and a `Skip` for every row left out).
    refine: after duplicate ids are dropped: drops more rows (adding their `Skip`s).
    weak: yields to any other release whose files are in the same source.
    typical: label values of typical images, for hand-made layouts (None: not written by them).
    synth: `isic-jax synth --format <name>` writes this layout too (the release's first layout
      is always written, under the release's name).
    extras: synth writes these files beside the official ones (e.g. the Kaggle copy's
      sample_submission.csv); gets the output folder and the rows, returns the names written.
    """

    name: str
    roles: tuple[Role, ...]
    read: Reader
    images: ImageSource = ImageSource()
    refine: Refiner | None = None
    weak: bool = False
    typical: TypicalLabels | None = None
    synth: bool = False
    extras: Callable[[Any, Sequence[MetadataRow]], list[str]] | None = None

    def role(self, name: str) -> Role:
        """The role called `name` (KeyError if the variant has none)."""
        for role in self.roles:
            if role.name == name:
                return role
        raise KeyError(name)


@dataclasses.dataclass(frozen=True)
class Release:
    """One ISIC release: one entry of `layouts.RELEASES`, the one place that describes it.

    classes: the diagnosis classes (the `diagnosis` feature, in this order); malignant: those
    labelled 1. expected: how its files are recognised, shown when `--format auto` finds nothing.
    variants: its layouts, the preferred first (the first one whose required roles are found is
    read; synth writes the first). ids: which of "patient", "lesion" its metadata carries.
    synth: how `isic_jax.data.synth` imitates it (None: synth does not write it).
    submission: the header of the release's sample submission (e.g. image_name,target): a CSV
      with exactly these columns plays no role of another release.
    tabular: numeric metadata columns stored per image in the `tabular` feature (float32, NaN =
      missing), in this order; tabular_text: text columns stored in `tabular_text`.
    common: class -> its class in the common taxonomy (`labels.COMMON_CLASSES`), used when
      several releases train together; a class that is itself a common class maps to itself
      unless listed.
    """

    name: str
    classes: tuple[str, ...]
    malignant: tuple[str, ...]
    expected: str
    citation: str
    variants: tuple[Variant, ...]
    ids: tuple[str, ...] = ()
    synth: SynthSpec | None = None
    submission: tuple[str, ...] = ()
    tabular: tuple[str, ...] = ()
    tabular_text: tuple[str, ...] = ()
    common: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = set(self.malignant) - set(self.classes)
        if unknown:
            raise ValueError(f"{self.name}: malignant classes {sorted(unknown)} not in classes")
        unmapped = [c for c in self.classes if self.common_class(c) not in L.COMMON_CLASSES]
        if unmapped:
            raise ValueError(
                f"{self.name}: classes {unmapped} have no class in the common taxonomy "
                f"({', '.join(L.COMMON_CLASSES)}): list them in `common`"
            )
        if set(self.tabular) & set(self.tabular_text):
            raise ValueError(f"{self.name}: a column is both in tabular and tabular_text")

    def common_class(self, name: str) -> str:
        """The class of the common taxonomy that this release's class `name` maps onto."""
        return self.common.get(name, name)
