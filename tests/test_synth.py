"""isic_jax.data.synth: official layouts, determinism, class balance, structure, learnability."""

from __future__ import annotations

import csv
import hashlib
import io
import os
import pathlib
import subprocess
import sys
from collections import Counter

import h5py
import numpy as np
import pytest
from PIL import Image

from isic_jax.data import synth

REPO = pathlib.Path(__file__).resolve().parents[1]
SMALL = 48  # px: layout tests do not need big images


def _rows(path: pathlib.Path, header: bool = True) -> tuple[list[str] | None, list[list[str]]]:
    with path.open(newline="", encoding="utf8") as f:
        rows = list(csv.reader(f))
    return (rows[0], rows[1:]) if header else (None, rows)


def _digest(root: pathlib.Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _read_truth(root: pathlib.Path, fmt: str) -> dict[str, dict[str, str]]:
    """image id -> {"status", "patient", "lesion"} read back from the release's own files."""
    out: dict[str, dict[str, str]] = {}
    if fmt == "archive":
        header, rows = _rows(root / "metadata.csv")
        for row in rows:
            r = dict(zip(header, row, strict=True))
            out[r["isic_id"]] = {"status": r["diagnosis_1"].lower(), "patient": r["patient_id"],
                                 "lesion": r["lesion_id"]}  # fmt: skip
    elif fmt == "isic2016":
        _, rows = _rows(root / "ISBI2016_ISIC_Part3_Training_GroundTruth.csv", header=False)
        out = {i: {"status": s, "patient": "", "lesion": ""} for i, s in rows}
    elif fmt == "isic2017":
        _, rows = _rows(root / "ISIC-2017_Training_Part3_GroundTruth.csv")
        for i, mel, _sk in rows:
            status = "malignant" if mel == "1.0" else "benign"
            out[i] = {"status": status, "patient": "", "lesion": ""}
    elif fmt in ("isic2018", "isic2019"):
        if fmt == "isic2018":
            gt = (
                root / "ISIC2018_Task3_Training_GroundTruth/ISIC2018_Task3_Training_GroundTruth.csv"
            )
            lesions = dict(
                (r[0], r[1]) for r in _rows(root / "ISIC2018_Task3_Training_LesionGroupings.csv")[1]
            )
        else:
            gt = root / "ISIC_2019_Training_GroundTruth.csv"
            lesions = {r[0]: r[3] for r in _rows(root / "ISIC_2019_Training_Metadata.csv")[1]}
        header, rows = _rows(gt)
        for row in rows:
            (cls,) = [c for c, v in zip(header[1:], row[1:], strict=True) if v == "1.0"]
            status = "malignant" if cls in synth.MALIGNANT[fmt] else "benign"
            out[row[0]] = {"status": status, "patient": "", "lesion": lesions[row[0]]}
    elif fmt == "isic2020":
        header, rows = _rows(root / "ISIC_2020_Training_GroundTruth_v2.csv")
        for row in rows:
            r = dict(zip(header, row, strict=True))
            out[r["image_name"]] = {"status": r["benign_malignant"], "patient": r["patient_id"],
                                    "lesion": r["lesion_id"]}  # fmt: skip
    elif fmt == "isic2024":
        header, rows = _rows(root / "train-metadata.csv")
        for row in rows:
            r = dict(zip(header, row, strict=True))
            status = "malignant" if r["target"] == "1" else r["iddx_1"].lower()
            out[r["isic_id"]] = {"status": status, "patient": r["patient_id"],
                                 "lesion": r["lesion_id"]}  # fmt: skip
    return out


def _image_bytes(root: pathlib.Path, fmt: str) -> dict[str, bytes]:
    if fmt == "isic2024":
        with h5py.File(root / "train-image.hdf5", "r") as f:
            return {k: bytes(f[k][()]) for k in f}
    folder = root / (synth.IMAGE_DIRS[fmt] or "")
    return {p.stem: p.read_bytes() for p in folder.glob("*.jpg")}


# Every file each layout must hold, besides the images (exact set).
_EXPECTED_FILES = {
    "archive": {"metadata.csv", "attribution.txt"},
    "isic2016": {"ISBI2016_ISIC_Part3_Training_GroundTruth.csv"},
    "isic2017": {
        "ISIC-2017_Training_Part3_GroundTruth.csv",
        "ISIC-2017_Training_Data/ISIC-2017_Training_Data_metadata.csv",
    },
    "isic2018": {
        "ISIC2018_Task3_Training_GroundTruth/ISIC2018_Task3_Training_GroundTruth.csv",
        "ISIC2018_Task3_Training_GroundTruth/ATTRIBUTION.txt",
        "ISIC2018_Task3_Training_GroundTruth/LICENSE.txt",
        "ISIC2018_Task3_Training_LesionGroupings.csv",
        "ISIC2018_Task3_Training_Input/ATTRIBUTION.txt",
        "ISIC2018_Task3_Training_Input/LICENSE.txt",
    },
    "isic2019": {
        "ISIC_2019_Training_GroundTruth.csv",
        "ISIC_2019_Training_Metadata.csv",
        "ISIC_2019_Training_Input/ATTRIBUTION.txt",
        "ISIC_2019_Training_Input/LICENSE.txt",
    },
    "isic2020": {"ISIC_2020_Training_GroundTruth_v2.csv", "ISIC_2020_Training_Duplicates.csv"},
    "isic2024": {"train-image.hdf5", "train-metadata.csv"},
}

_HEADERS = {
    "isic2017": ("ISIC-2017_Training_Part3_GroundTruth.csv",
                 ["image_id", "melanoma", "seborrheic_keratosis"]),
    "isic2018": ("ISIC2018_Task3_Training_GroundTruth/ISIC2018_Task3_Training_GroundTruth.csv",
                 ["image", "MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]),
    "isic2019": ("ISIC_2019_Training_GroundTruth.csv",
                 ["image", "MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]),
    "isic2020": ("ISIC_2020_Training_GroundTruth_v2.csv",
                 ["image_name", "patient_id", "lesion_id", "sex", "age_approx",
                  "anatom_site_general_challenge", "diagnosis", "benign_malignant", "target"]),
}  # fmt: skip


@pytest.mark.parametrize("fmt", synth.FORMATS)
def test_layout(tmp_path, fmt):
    summary = synth.write_synthetic(tmp_path, fmt, 30, seed=1, image_size=SMALL)
    files = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()}
    images = {f for f in files if f.endswith(".jpg")}
    others = files - images
    if fmt == "archive":
        others = {f for f in others if not f.startswith("licenses/")}
        assert any(f.startswith("licenses/") and f.endswith(".txt") for f in files)
    if fmt == "isic2017":
        superpixels = {f for f in others if f.endswith("_superpixels.png")}
        assert len(superpixels) == 30
        others -= superpixels
    assert others == _EXPECTED_FILES[fmt]

    truth = _read_truth(tmp_path, fmt)
    data = _image_bytes(tmp_path, fmt)
    assert len(truth) == len(data) == summary["num_images"] == 30
    assert set(truth) == set(data) == {r["image_id"] for r in summary["records"]}
    if fmt != "isic2024":
        folder = synth.IMAGE_DIRS[fmt]
        assert {f.rsplit("/", 1)[0] if "/" in f else "" for f in images} == {folder}
    for image_id, raw in list(data.items())[:5]:
        assert image_id.startswith("ISIC_")
        img = Image.open(io.BytesIO(raw))
        assert img.format == "JPEG" and img.mode == "RGB"
        assert max(img.size) <= SMALL and min(img.size) >= SMALL // 2
    if fmt in _HEADERS:
        name, header = _HEADERS[fmt]
        assert _rows(tmp_path / name)[0] == header
    if fmt == "isic2016":
        _, rows = _rows(tmp_path / "ISBI2016_ISIC_Part3_Training_GroundTruth.csv", header=False)
        assert all(len(r) == 2 and r[1] in ("benign", "malignant") for r in rows)
    if fmt in ("isic2018", "isic2019"):
        _, rows = _rows(tmp_path / _HEADERS[fmt][0])
        assert all(sorted(r[1:]) == ["0.0"] * (len(r) - 2) + ["1.0"] for r in rows)
    if fmt == "isic2018":
        header, _ = _rows(tmp_path / "ISIC2018_Task3_Training_LesionGroupings.csv")
        assert header == ["image", "lesion_id", "diagnosis_confirm_type"]
    if fmt == "isic2019":
        header, _ = _rows(tmp_path / "ISIC_2019_Training_Metadata.csv")
        assert header == ["image", "age_approx", "anatom_site_general", "lesion_id", "sex"]
    if fmt == "isic2020":
        header, _ = _rows(tmp_path / "ISIC_2020_Training_Duplicates.csv")
        assert header == ["image_name_1", "image_name_2"]
    if fmt == "isic2024":
        assert _rows(tmp_path / "train-metadata.csv")[0] == synth.METADATA_2024_COLUMNS
        assert len(synth.METADATA_2024_COLUMNS) == 55
    if fmt == "archive":
        raw = (tmp_path / "metadata.csv").read_bytes()
        assert raw.count(b"\r\n") == 31  # isic-cli's csv.DictWriter ends lines with CRLF
        header = _rows(tmp_path / "metadata.csv")[0]
        assert header[:3] == ["isic_id", "attribution", "copyright_license"]
        assert header[3:] == sorted(header[3:])
        for col in ("diagnosis_1", "diagnosis_2", "diagnosis_3", "patient_id", "lesion_id",
                    "age_approx", "sex", "anatom_site_general"):  # fmt: skip
            assert col in header


def test_archive_diagnosis_1_values(tmp_path):
    synth.write_synthetic(tmp_path, "archive", 80, seed=2, image_size=SMALL)
    header, rows = _rows(tmp_path / "metadata.csv")
    d1 = Counter(r[header.index("diagnosis_1")] for r in rows)
    assert set(d1) == {"Benign", "Malignant", "Indeterminate"}
    assert 1 <= d1["Indeterminate"] <= 5


@pytest.mark.parametrize("fmt", synth.FORMATS)
def test_same_seed_same_bytes_other_seed_other_images(tmp_path, fmt):
    a = _digest(
        pathlib.Path(synth.write_synthetic(tmp_path / "a", fmt, 16, 5, None, 40)["output_dir"])
    )
    b = _digest(
        pathlib.Path(synth.write_synthetic(tmp_path / "b", fmt, 16, 5, None, 40)["output_dir"])
    )
    assert a == b
    c_root = tmp_path / "c"
    synth.write_synthetic(c_root, fmt, 16, 6, None, 40)
    images_a = set(_image_bytes(tmp_path / "a", fmt).values())
    images_c = set(_image_bytes(c_root, fmt).values())
    assert not images_a & images_c


def test_same_bytes_across_processes(tmp_path):
    # Set iteration order changes with PYTHONHASHSEED: the output must not.
    digests = []
    for hash_seed in ("1", "2"):
        out = tmp_path / hash_seed
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(REPO)}
        code = (
            "import sys; from isic_jax.data import synth\n"
            "for f in ('archive', 'isic2024'):\n"
            "    synth.write_synthetic(sys.argv[1] + '/' + f, f, 20, 3, image_size=40)"
        )
        subprocess.run([sys.executable, "-c", code, str(out)], check=True, env=env, cwd=REPO)
        digests.append(_digest(out))
    assert digests[0] == digests[1]


@pytest.mark.parametrize(
    "fmt, n, fraction, expected",
    [("isic2020", 100, 0.2, 20), ("isic2018", 60, None, 18), ("isic2024", 50, 0.1, 5),
     ("isic2016", 40, 0.5, 20), ("archive", 100, 0.05, 5), ("isic2019", 30, 0.0, 0)],
)  # fmt: skip
def test_malignant_fraction(tmp_path, fmt, n, fraction, expected):
    summary = synth.write_synthetic(tmp_path, fmt, n, 0, fraction, SMALL)
    counts = Counter(t["status"] for t in _read_truth(tmp_path, fmt).values())
    assert counts["malignant"] == expected == summary["label_counts"]["malignant"]
    assert sum(counts.values()) == n


def test_multiclass_releases_have_every_class(tmp_path):
    for fmt in ("isic2018", "isic2019", "isic2017"):
        summary = synth.write_synthetic(tmp_path / fmt, fmt, 40, 0, None, SMALL)
        assert set(summary["diagnosis_counts"]) == set(synth.CLASSES[fmt]), fmt


@pytest.mark.parametrize("fmt", ["archive", "isic2020", "isic2024"])
def test_several_images_per_patient(tmp_path, fmt):
    synth.write_synthetic(tmp_path, fmt, 120, 0, None, SMALL)
    patients = Counter(t["patient"] for t in _read_truth(tmp_path, fmt).values() if t["patient"])
    assert max(patients.values()) >= 4
    assert sum(patients.values()) / len(patients) >= 1.8


@pytest.mark.parametrize("fmt", ["isic2018", "isic2019", "isic2020"])
def test_several_images_per_lesion_and_consistent_labels(tmp_path, fmt):
    synth.write_synthetic(tmp_path, fmt, 120, 0, None, SMALL)
    truth = _read_truth(tmp_path, fmt)
    by_lesion: dict[str, set[str]] = {}
    for t in truth.values():
        if t["lesion"]:
            by_lesion.setdefault(t["lesion"], set()).add(t["status"])
    sizes = Counter(t["lesion"] for t in truth.values() if t["lesion"])
    assert max(sizes.values()) >= 3
    assert all(len(statuses) == 1 for statuses in by_lesion.values())


@pytest.mark.parametrize(
    "fmt, name, columns",
    [("isic2020", "ISIC_2020_Training_GroundTruth_v2.csv",
      ["sex", "age_approx", "anatom_site_general_challenge"]),
     ("isic2019", "ISIC_2019_Training_Metadata.csv",
      ["age_approx", "anatom_site_general", "lesion_id", "sex"]),
     ("isic2024", "train-metadata.csv", ["age_approx", "sex", "anatom_site_general", "lesion_id"]),
     ("archive", "metadata.csv", ["age_approx", "sex", "anatom_site_general", "patient_id"])],
)  # fmt: skip
def test_missing_values_are_empty_cells(tmp_path, fmt, name, columns):
    synth.write_synthetic(tmp_path, fmt, 60, 0, None, SMALL)
    header, rows = _rows(tmp_path / name)
    for col in columns:
        values = [r[header.index(col)] for r in rows]
        assert "" in values, col
        assert sum(v != "" for v in values) > len(values) // 2, col


def test_isic2017_metadata_marks_missing_as_unknown(tmp_path):
    synth.write_synthetic(tmp_path, "isic2017", 40, 0, None, SMALL)
    header, rows = _rows(tmp_path / "ISIC-2017_Training_Data/ISIC-2017_Training_Data_metadata.csv")
    assert header == ["image_id", "age_approximate", "sex"]
    assert any(r[1] == "unknown" for r in rows) and any(r[2] == "unknown" for r in rows)


def test_isic2020_duplicates_are_real(tmp_path):
    summary = synth.write_synthetic(tmp_path, "isic2020", 150, 0, None, SMALL)
    _, pairs = _rows(tmp_path / "ISIC_2020_Training_Duplicates.csv")
    assert len(pairs) >= 2 and [list(p) for p in pairs] == sorted(summary["duplicates"])
    truth = _read_truth(tmp_path, "isic2020")
    train = tmp_path / "train"
    for first, second in pairs:
        assert (train / f"{first}.jpg").read_bytes() == (train / f"{second}.jpg").read_bytes()
        assert truth[first] == truth[second]
    assert len(set(_image_bytes(tmp_path, "isic2020").values())) == 150 - len(pairs)


@pytest.mark.parametrize("storage, dtype_kind", [("string", "S"), ("opaque", "V")])
def test_isic2024_hdf5(tmp_path, storage, dtype_kind):
    synth.write_synthetic(tmp_path, "isic2024", 12, 0, None, 64, hdf5_storage=storage)
    header, rows = _rows(tmp_path / "train-metadata.csv")
    with h5py.File(tmp_path / "train-image.hdf5", "r") as f:
        assert sorted(f) == sorted(r[0] for r in rows)
        for key in f:
            ds = f[key]
            assert ds.shape == () and ds.dtype.kind == dtype_kind
            img = Image.open(io.BytesIO(bytes(ds[()])))
            assert img.format == "JPEG" and img.size[0] == img.size[1] <= 64


def test_cli(tmp_path):
    out = tmp_path / "cli"
    result = subprocess.run(
        [sys.executable, "-m", "isic_jax", "synth", "--output", str(out), "--format", "isic2020",
         "--num-images", "12", "--seed", "3", "--malignant-fraction", "0.25", "--image-size", "48"],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "wrote 12 synthetic isic2020 images" in result.stdout
    assert "malignant 3" in result.stdout
    assert len(list((out / "train").glob("*.jpg"))) == 12


def test_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        synth.write_synthetic(tmp_path, "isic2099", 10, 0)
    with pytest.raises(ValueError):
        synth.write_synthetic(tmp_path, "isic2020", 10, 0, malignant_fraction=1.5)


# ------------------------------------------------------------------------------ learnability


def _image_features(raw: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Hand-made lesion statistics (colour spread, border shape, asymmetry) and the mean RGB."""
    x = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB").resize((64, 48)), np.float32)
    h, w, _ = x.shape
    frame = np.concatenate([x[:4].reshape(-1, 3), x[-4:].reshape(-1, 3),
                            x[:, :4].reshape(-1, 3), x[:, -4:].reshape(-1, 3)])  # fmt: skip
    dist = np.linalg.norm(x - np.median(frame, 0), axis=-1)
    mask = dist > 35  # lesion: far from the skin colour at the border
    if mask.sum() < 10:
        mask = dist > np.percentile(dist, 80)
    px = x[mask]
    lum = px.mean(1)
    chroma = np.stack([px[:, 0] - px[:, 1], px[:, 1] - px[:, 2]], 1)
    heterogeneity = np.abs(px - np.median(px, 0)).sum(1)
    yy, xx = np.nonzero(mask)
    centred = np.roll(mask, (h // 2 - int(yy.mean()), w // 2 - int(xx.mean())), (0, 1))
    rotated = centred[::-1, ::-1]
    asymmetry = 1 - (centred & rotated).sum() / max((centred | rotated).sum(), 1)
    inner = mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
    perimeter = mask[1:-1, 1:-1].sum() - inner.sum()
    compactness = perimeter**2 / (4 * np.pi * mask.sum())
    stats = [*px.std(0), lum.std(), *chroma.std(0), heterogeneity.mean(),
             np.percentile(heterogeneity, 90), asymmetry, compactness, mask.mean()]  # fmt: skip
    return np.asarray(stats), x.reshape(-1, 3).mean(0)


def test_malignancy_is_learnable_from_simple_image_statistics(tmp_path):
    """A logistic regression on a dozen image statistics separates malignant from benign images
    of held-out patients; the mean colour alone does much worse (the signal is not a colour
    shift). Grouped 5-fold cross-validation: every image is scored once, by a model that saw none
    of its patient's images."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import GroupKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    summary = synth.write_synthetic(tmp_path, "isic2020", 400, 0, None, 96)
    data = _image_bytes(tmp_path, "isic2020")
    feats, means, labels, groups = [], [], [], []
    for rec in summary["records"]:
        f, m = _image_features(data[rec["image_id"]])
        feats.append(f)
        means.append(m)
        labels.append(rec["status"] == "malignant")
        groups.append(rec["patient_id"])
    feats, means, labels = np.asarray(feats), np.asarray(means), np.asarray(labels)

    def auc(x: np.ndarray) -> float:
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        cv = GroupKFold(n_splits=5)
        scores = cross_val_predict(clf, x, labels, groups=groups, cv=cv, method="predict_proba")
        return roc_auc_score(labels, scores[:, 1])

    auc_stats, auc_mean = auc(feats), auc(means)
    print(f"learnability: AUC {auc_stats:.3f} from image statistics, {auc_mean:.3f} from mean RGB")
    assert auc_stats > 0.85
    assert auc_mean < auc_stats - 0.1
