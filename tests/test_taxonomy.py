"""The ISIC Archive's own diagnosis taxonomy through the readers: every value of `isic-metadata`'s
`DiagnosisEnum` (written by the Archive team), as `isic image download` writes it in
`diagnosis_1..5` (and ISIC 2024 in `iddx_1..5`), lands in the coarse class its place in the
taxonomy gives.

The expectations are built from the taxonomy's structure (the status in level 1, the group in
level 2, the diagnosis in level 3), not from the keyword rules of `labels.py`.
"""

from __future__ import annotations

import collections
import os

import pytest
import tensorflow_datasets as tfds
from isic_metadata.diagnosis_hierarchical import DiagnosisEnum

from isic_jax.data import prepare as prepare_lib
from isic_jax.data.isic import labels as L
from isic_jax.data.isic import releases
from isic_jax.data.isic.layouts import VARIANTS
from isic_jax.data.isic.layouts.archive import INDETERMINATE_POLICIES
from isic_jax.data.isic.layouts.spec import MetadataRow
from isic_jax.data.isic.layouts.write import write_images, write_metadata
from isic_jax.testing import layouts

PATHS: list[str] = [d.value for d in DiagnosisEnum]
ID_OF: dict[str, str] = {path: f"ISIC_{i:07d}" for i, path in enumerate(PATHS)}
PATH_OF: dict[str, str] = {i: path for path, i in ID_OF.items()}
BENIGN_CLASSES = {"NV", "BKL", "DF", "VASC"}


def _levels(path: str) -> list[str]:
    return [level for level in DiagnosisEnum.levels(path) if level]


def expected_class(path: str) -> str:
    """The coarse class of a taxonomy path, from its status (level 1), group (level 2) and
    diagnosis (level 3); what docs/data.md ("Archive diagnoses") states."""
    levels = _levels(path)
    if len(levels) == 1:
        return "unknown"  # the status alone: no diagnosis
    status, group = levels[0], levels[1]
    name = levels[2] if len(levels) > 2 else ""
    if status == "Malignant":
        if group == "Malignant melanocytic proliferations (Melanoma)":
            return "MEL"  # invasive, in situ, metastasis, NOS and every subtype
        if group == "Malignant epidermal proliferations":
            return "SCC"  # SCC invasive / in situ (Bowen's), keratoacanthoma, verrucous carcinoma
        if group == "Malignant adnexal epithelial proliferations - Follicular" and name in (
            "Basal cell carcinoma",
            "Baso-squamous carcinoma",
        ):
            return "BCC"
        # Collisions (no one diagnosis), lymphomas, sarcomas (vascular ones too), adnexal
        # carcinomas, Merkel cell carcinoma, metastases of other cancers.
        return "other"
    if status == "Indeterminate":
        return "AK" if group == "Indeterminate epidermal proliferations" else "other"
    assert status == "Benign", path
    if group == "Benign melanocytic proliferations":
        return "BKL" if name == "Lentigo simplex" else "NV"
    if group == "Benign epidermal proliferations":
        return "BKL"
    if group == "Flat melanotic pigmentations - not melanocytic nevus":
        return "BKL" if "lentigo" in name.lower() else "other"
    if group == "Benign soft tissue proliferations - Fibro-histiocytic":
        return "DF" if name == "Dermatofibroma" else "other"
    if group in ("Benign soft tissue proliferations - Vascular", "Hemorrhagic lesions"):
        return "VASC"
    return "other"  # adnexal (nevus sebaceus, nevus comedonicus), cysts, other soft tissue, ...


def _write_export(root) -> str:
    """An `isic image download` folder: one tiny image and one metadata.csv row per value."""
    rows = []
    for i, path in enumerate(PATHS):
        levels = {k: v or "" for k, v in DiagnosisEnum.as_dict(path).items()}
        extra = {"attribution": "Anonymous", "copyright_license": "CC-0", **levels}
        rows.append(
            MetadataRow(
                image_id=ID_OF[path],
                label=levels["diagnosis_1"],
                patient_id=f"IP_{i // 3:07d}",
                lesion_id=f"IL_{i:07d}",
                age="55",
                sex=("female", "male")[i % 2],
                site="posterior torso",
                columns=extra,
            )
        )
    variant = VARIANTS["archive"]
    write_metadata(variant, root, rows)
    image = layouts.jpeg(8, 8)
    write_images(variant, root, {r.image_id: image for r in rows})
    return os.fspath(root)


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> str:
    return _write_export(tmp_path_factory.mktemp("archive_export"))


@pytest.fixture(scope="module")
def classes(export) -> dict[str, str]:
    """Taxonomy path -> the coarse class the archive reader gives it (every row kept)."""
    scan = releases.scan("archive", export, indeterminate="benign")
    assert not scan.skipped
    names = L.DIAGNOSIS_CLASSES["archive"]
    return {PATH_OF[c.image_id]: names[c.diagnosis] for c in scan.candidates}


def test_the_export_holds_every_value_of_the_taxonomy(export):
    assert len(PATHS) >= 400  # 418 in isic-metadata 4.12, over five levels
    assert {len(_levels(p)) for p in PATHS} == {1, 2, 3, 4, 5}
    with open(os.path.join(export, "metadata.csv"), encoding="utf8") as f:
        header = f.readline().strip().split(",")
    assert header[:3] == ["isic_id", "attribution", "copyright_license"]
    assert {f"diagnosis_{i}" for i in range(1, 6)} <= set(header)
    assert releases.detect(export) == "archive"


@pytest.mark.parametrize("policy", INDETERMINATE_POLICIES)
def test_binary_label_follows_diagnosis_1(export, policy):
    scan = releases.scan("archive", export, indeterminate=policy)
    labels = {PATH_OF[c.image_id]: c.label for c in scan.candidates}
    skipped = {PATH_OF[s.item]: s.reason for s in scan.skipped}
    for path in PATHS:
        status = _levels(path)[0]
        if status == "Indeterminate" and policy == "skip":
            assert path not in labels, path
            assert "indeterminate" in skipped[path] and "policy: skip" in skipped[path], path
            continue
        want = status.lower() if status in ("Benign", "Malignant") else policy
        assert labels[path] == L.LABEL_NAMES.index(want), path
    assert len(labels) + len(skipped) == len(PATHS)


def test_every_value_lands_in_the_class_of_its_place_in_the_taxonomy(classes):
    wrong = {p: (classes[p], expected_class(p)) for p in PATHS if classes[p] != expected_class(p)}
    assert not wrong, "\n".join(f"{p}: got {got}, want {want}" for p, (got, want) in wrong.items())


def test_classes_never_cross_the_status(classes):
    malignant_classes = set(L.COMMON_MALIGNANT) | set(L.MALIGNANT_DIAGNOSES["archive"])
    for path in PATHS:
        status, got = _levels(path)[0], classes[path]
        if status == "Benign":
            assert got not in malignant_classes, (path, got)
        elif status == "Malignant":
            assert got not in BENIGN_CLASSES, (path, got)
        else:
            assert got in ("AK", "other", "unknown"), (path, got)


def test_every_subtree_of_the_named_classes(classes):
    subtrees = {
        "MEL": "Malignant:Malignant melanocytic proliferations (Melanoma)",
        "BCC": "Malignant:Malignant adnexal epithelial proliferations - Follicular:"
        "Basal cell carcinoma",
        "SCC": "Malignant:Malignant epidermal proliferations",
        "NV": "Benign:Benign melanocytic proliferations:Nevus",
        "AK": "Indeterminate:Indeterminate epidermal proliferations",
        "DF": "Benign:Benign soft tissue proliferations - Fibro-histiocytic:Dermatofibroma",
        "VASC": "Benign:Benign soft tissue proliferations - Vascular",
    }
    for name, root in subtrees.items():
        members = [p for p in PATHS if p == root or p.startswith(root + ":")]
        assert len(members) > 1, root
        assert {classes[p] for p in members} == {name}, root


def test_melanoma_as_the_archive_counts_it(classes):
    """`DiagnosisEnum.is_melanoma` holds the melanoma group and the malignant collisions; the
    coarse class keeps MEL for the melanoma group (a collision names no one diagnosis)."""
    collision = "Malignant:Collision - At least one malignant proliferation"
    for path in PATHS:
        if DiagnosisEnum.is_melanoma(path) and path != collision:
            assert classes[path] == "MEL", path
        elif classes[path] == "MEL":
            raise AssertionError(f"{path}: MEL, not a melanoma for the Archive")
    assert DiagnosisEnum.is_melanoma(collision) and classes[collision] == "other"


@pytest.mark.parametrize(
    "name, want",
    [
        ("Nevus", "NV"),
        ("Nevus, Spitz", "NV"),
        ("Blue nevus, Cellular", "NV"),
        ("Nevus comedonicus", "other"),  # a follicular adnexal lesion
        ("Nevus sebaceus", "other"),  # a sebaceous adnexal lesion
        ("Nevus anemicus", "VASC"),
        ("Lipomatous nevus", "other"),
        ("Epidermal nevus", "BKL"),
        ("Cafe au lait macule or patch", "other"),
        ("Ephelis", "other"),
        ("Solar lentigo", "BKL"),
        ("Lentigo NOS", "BKL"),
        ("Ink-spot lentigo", "BKL"),
        ("Lentigo simplex", "BKL"),
        ("Melanoma in situ, Lentigo maligna type", "MEL"),
        ("Melanoma Invasive, On chronically sun-exposed skin or lentigo maligna melanoma", "MEL"),
        ("Melanoma Invasive, Associated with a nevus", "MEL"),
        ("Melanoma metastasis", "MEL"),
        ("Seborrheic keratosis, Clonal", "BKL"),
        ("Pigmented benign keratosis", "BKL"),
        ("Lichen planus like keratosis", "BKL"),
        ("Angiokeratoma", "VASC"),
        ("Hemangioma, Cherry", "VASC"),
        ("Pyogenic granuloma", "VASC"),
        ("Subungual hemorrhage", "VASC"),
        ("Kaposi sarcoma", "other"),  # malignant: never VASC
        ("Intravascular large B-cell lymphoma", "other"),
        ("Dermatofibroma, Hemosiderotic", "DF"),
        ("Dermatofibrosarcoma protuberans", "other"),
        ("Squamous cell carcinoma in situ, Bowens disease", "SCC"),
        ("Keratoacanthoma", "SCC"),
        ("Verrucous carcinoma", "SCC"),
        ("Bowenoid papulosis", "SCC"),
        ("Basal cell carcinoma, Superficial", "BCC"),
        ("Baso-squamous carcinoma", "BCC"),
        ("Actinic keratosis, Bowenoid", "AK"),
        ("Solar or actinic cheilitis", "AK"),
        ("Atypical melanocytic neoplasm", "other"),
        ("Atypical proliferative nodules in congenital melanocytic nevus", "other"),
        ("Collision - Only benign proliferations", "other"),
        ("Merkel cell carcinoma", "other"),
    ],
)
def test_named_values(classes, name, want):
    path = DiagnosisEnum.accept_terminal_values(name)
    assert path in classes, name
    assert classes[path] == want, path


@pytest.mark.parametrize(
    "text, want",
    [
        ("nevus", "NV"),
        ("melanoma", "MEL"),
        ("melanoma metastasis", "MEL"),
        ("seborrheic keratosis", "BKL"),
        ("lentigo NOS", "BKL"),
        ("lentigo simplex", "BKL"),
        ("solar lentigo", "BKL"),
        ("lentigo maligna", "MEL"),
        ("lichenoid keratosis", "BKL"),
        ("pigmented benign keratosis", "BKL"),
        ("angioma", "VASC"),
        ("angiokeratoma", "VASC"),
        ("vascular lesion", "VASC"),
        ("dermatofibroma", "DF"),
        ("basal cell carcinoma", "BCC"),
        ("squamous cell carcinoma", "SCC"),
        ("actinic keratosis", "AK"),
        ("AKIEC", "AK"),
        ("cafe-au-lait macule", "other"),
        ("atypical melanocytic proliferation", "other"),
        ("unknown", "unknown"),
        ("", "unknown"),
    ],
)
def test_legacy_free_text_diagnoses(text, want):
    """The older records' free-text `diagnosis` (legacy JSON, ISIC 2020's ground truth)."""
    assert L.archive_class(text) == want


@pytest.mark.parametrize(
    "levels, texts, want",
    [
        (["Benign", "", "Nevus"], (), "NV"),  # a gap: the keyword rules
        (["Benign", "A later group", "Melanoma-like nevus"], (), "other"),  # never MEL if benign
        (["Malignant", "A later group", "Melanoma, a later subtype"], (), "MEL"),
        (["Malignant", "A later vascular group", "Sarcoma"], (), "other"),  # never VASC
        (["Indeterminate", "A later group", "Nevus, atypical"], (), "other"),
        ([" malignant ", "MALIGNANT MELANOCYTIC PROLIFERATIONS (MELANOMA)"], (), "MEL"),
        (["Indeterminate"], (), "unknown"),
        (["Benign", "", "", "", ""], ("nevus",), "NV"),  # an older export's free text
        (["", "", "", "", ""], ("melanoma",), "MEL"),  # benign_malignant + free text
        (["", "", "", "", ""], (), "unknown"),
    ],
)
def test_paths_outside_the_table(levels, texts, want):
    assert L.taxonomy_class(levels, *texts) == want


def test_isic2024_iddx_columns_read_the_same(tmp_path, classes):
    """ISIC 2024's iddx_1..5 (or iddx_full alone, joined by "::") carry the same taxonomy."""
    only_full = {f"iddx_{i}": "" for i in range(1, 6)}
    rows = [
        MetadataRow(
            image_id=ID_OF[path],
            label="1" if path.startswith("Malignant") else "0",
            diagnosis=path.replace(":", "::"),
            patient_id=f"IP_{i // 3:07d}",
            columns=only_full if i % 2 else {},
        )
        for i, path in enumerate(PATHS)
    ]
    variant = VARIANTS["isic2024_files"]
    write_metadata(variant, tmp_path, rows)
    image = layouts.jpeg(8, 8)
    write_images(variant, tmp_path, {r.image_id: image for r in rows})
    scan = releases.scan("isic2024", tmp_path)
    names = L.DIAGNOSIS_CLASSES["isic2024"]
    got = {PATH_OF[c.image_id]: names[c.diagnosis] for c in scan.candidates}
    assert got == classes


def test_prepare_stores_the_classes(export, tmp_path, classes):
    """End to end: `isic-jax prepare` over the export keeps each image's class in its record."""
    report = prepare_lib.prepare(
        export, tmp_path / "data", image_size=8, num_folds=2, indeterminate="malignant",
        num_workers=2,
    )  # fmt: skip
    assert report["release"] == "archive" and report["num_examples"] == len(PATHS)
    builder = tfds.builder_from_directory(report["dataset_dir"])
    source = builder.as_data_source(
        split="fold0+fold1", decoders={"image": tfds.decode.SkipDecoding()}
    )
    names = L.DIAGNOSIS_CLASSES["archive"]
    stored = {}
    for i in range(len(source)):
        rec = source[i]
        path = PATH_OF[rec["image_id"].decode()]
        stored[path] = names[rec["diagnosis"]]
        assert rec["label"] == (0 if path.startswith("Benign") else 1), path
    assert stored == classes
    totals = collections.Counter()
    for counts in report["diagnosis_counts"].values():
        totals.update(counts)
    assert +totals == collections.Counter(classes.values())
