"""Class probabilities for new images from an export (`isic-jax export`), as CSV.

    summary = predict_to_csv("exports/r50", "new_images/", "preds.csv", tta=True)
    summary = predict_to_csv("exports/r50", "test.csv", "sub.csv", submission="isic2020")

Model: by default the `jax.export` artefact (model.jax_export). Loading it needs no model code
and gives the numbers the export verified against the trained model; its batch dimension is
symbolic, so any batch works, and it is called inside `jax.shard_map` over a Mesh of all local
devices (each device runs the single-device program on its slice of the batch). When this
platform is not among those the artefact was lowered for (model.json `export.platforms`), the
Orbax variables + the model code are used instead (backend "checkpoint"; same forward pass,
`train.eval_step`).

Inputs (`list_inputs`):
- a folder: every image file (.jpg .jpeg .png .bmp .tif .tiff .webp, DICOM .dcm; any case) up
  to 3 folder levels down (`SourceTree`: hidden files skipped, folder links not followed, a link
  that resolves outside the folder is refused with an error row). Image id: the file stem (the
  relative path without extension when two files share a stem).
- a CSV: column `path`, or else `image` / `image_name` / `isic_id`, holding paths relative to the
  CSV's folder; an id without extension finds `<id>.<ext>` there. A path that resolves outside
  the CSV's folder (`../x.jpg`, an absolute path elsewhere, a link) gets an error row and is
  never opened.

Each image goes through what `isic-jax prepare` and evaluation do, with the sizes from
model.json: safe decode (`datasets.isic.images.process_image`: EXIF transpose, RGB conversion,
pixel limit) + shorter-side resize to `stored_size` + JPEG re-encode, then
`image_ops.eval_image` (centre crop, resize to `image_size`) -> uint8; colour constancy and
normalisation run inside the model function. An image that fails gets a row with an `error` and
the run goes on.

Calibration and decision (`decision_rule`, from model.json): the exported function's
probabilities are divided in log space by the temperature fitted on the validation fold
(softmax(log(p) / T); `calibrate=False` / `--no-calibration` skips it), and an image is called
malignant when its malignant probability reaches the operating threshold chosen on the
validation fold (model.json "threshold"; the one chosen for uncalibrated scores without
calibration). Exports without these fields: T = 1 and their "threshold".

Output: one row per input: image_id, path, prob_<class> for every class (calibrated),
prediction (binary: "malignant" iff malignant_probability >= threshold, else the other class;
several classes: the most probable class on the side of the threshold the image falls on),
malignant_probability (sum over the malignant classes), malignant_at_threshold (1/0), error.
With `submission`, the exact columns of that ISIC challenge (`SUBMISSION_COLUMNS`; failed images
are left out of that file and listed in `<output>.errors.csv`). `tta`: the mean of the
probabilities over the 8 flips/transposes of the input (8x the compute).
"""

from __future__ import annotations

import csv
import dataclasses
import os
import pathlib
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from isic_jax import config_utils, logging_utils
from isic_jax.data import image_ops
from isic_jax.data import metadata as metadata_lib
from isic_jax.data.isic import images, labels
from isic_jax.data.isic.releases import SourceTree
from isic_jax.evaluation import calibration
from isic_jax.inference import export as export_lib
from isic_jax.utils import write_csv

# .dcm: DICOM (e.g. Kaggle's ISIC 2020 test/*.dcm); `process_image` reads the JPEG it holds.
IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".dcm",
)  # fmt: skip
ID_COLUMNS: tuple[str, ...] = ("image", "image_name", "isic_id")
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
BACKENDS = ("auto", "export", "checkpoint")
MESH_AXIS = "data"
DEFAULT_BATCH_SIZE = 32


class SubmissionError(ValueError):
    """The model's classes cannot fill the asked-for submission columns."""


class InputError(ValueError):
    """The --input is neither a folder nor a readable CSV with a path/id column."""


# ---------------------------------------------------------------------------------------------
# Inputs.


@dataclasses.dataclass
class Item:
    """One input image.

    image_id: the id written to the output. path: absolute path to read (None when refused).
    shown: the path as the user gave it (relative to the folder / CSV folder). error: why it
    was refused before decoding (None when it is to be read). row: the CSV row it comes from
    (its metadata columns, read by their ISIC names, for a model with a metadata branch).
    """

    image_id: str
    path: str | None
    shown: str
    error: str | None = None
    row: dict[str, str] | None = None


def _inside(real: str, root: str) -> bool:
    return real == root or real.startswith(root + os.sep)


def list_folder(folder: str | os.PathLike) -> list[Item]:
    """The image files of a folder tree (see the module docstring), sorted by relative path."""
    tree = SourceTree(folder)
    rels = [f for f in tree.files if f.lower().endswith(IMAGE_EXTENSIONS)]
    outside = [f for f in tree.outside if f.lower().endswith(IMAGE_EXTENSIONS)]
    stems: dict[str, int] = {}
    for rel in rels + outside:
        stem = os.path.splitext(rel.rsplit("/", 1)[-1])[0]
        stems[stem] = stems.get(stem, 0) + 1

    def image_id(rel: str) -> str:
        stem = os.path.splitext(rel.rsplit("/", 1)[-1])[0]
        return stem if stems[stem] == 1 else os.path.splitext(rel)[0]

    items = [Item(image_id(rel), tree.abspath(rel), rel) for rel in rels]
    items += [
        Item(image_id(rel), None, rel, "link that resolves outside the input folder: refused")
        for rel in outside
    ]
    return sorted(items, key=lambda item: item.shown)


def _resolve_csv_path(root: str, value: str) -> tuple[str | None, str | None]:
    """(absolute path, None) or (None, error) for one CSV cell, relative to `root` (real)."""
    candidates = [value]
    if not value.lower().endswith(IMAGE_EXTENSIONS):
        candidates += [value + ext for ext in IMAGE_EXTENSIONS]
        candidates += [value + ext.upper() for ext in IMAGE_EXTENSIONS]
    for candidate in candidates:
        real = os.path.realpath(os.path.join(root, candidate))
        if not _inside(real, root):
            return None, (
                f"path {value!r} resolves outside the CSV's folder ({root}): refused"
            )
        if os.path.isfile(real):
            return real, None
    return None, f"no such image file: {value!r} (looked in {root})"


def list_csv(csv_path: str | os.PathLike) -> list[Item]:
    """One item per data row of a CSV (see the module docstring), in file order.

    Raises:
      InputError: no `path` and no image-id column, or an unreadable file.
    """
    csv_path = pathlib.Path(csv_path)
    root = os.path.realpath(csv_path.parent)
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
            header = [h.strip() for h in (rows[0].keys() if rows else [])]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise InputError(f"cannot read {csv_path}: {e}") from e
    if not rows:
        raise InputError(f"{csv_path} has no data rows")
    lower = {h.lower(): h for h in header if h}
    path_col = lower.get("path")
    id_col = next((lower[c] for c in ID_COLUMNS if c in lower), None)
    if path_col is None and id_col is None:
        raise InputError(
            f"{csv_path} needs a column `path` or one of {', '.join(ID_COLUMNS)}; "
            f"it has {', '.join(header)}"
        )
    items = []
    for row in rows:
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
        value = row.get(path_col or id_col, "")
        image_id = row.get(id_col, "") if id_col else ""
        if not image_id:
            image_id = os.path.splitext(os.path.basename(value))[0]
        if not value:
            items.append(Item(image_id, None, value, "empty path", row))
            continue
        path, error = _resolve_csv_path(root, value)
        items.append(Item(image_id, path, value, error, row))
    return items


def list_inputs(source: str | os.PathLike) -> list[Item]:
    """A folder or a CSV -> items (see the module docstring)."""
    if os.path.isdir(source):
        return list_folder(source)
    if os.path.isfile(source):
        return list_csv(source)
    raise InputError(f"--input {os.fspath(source)!r} is neither a folder nor a CSV file")


# ---------------------------------------------------------------------------------------------
# Images.


def load_image(path: str, stored_size: int, image_size: int, max_pixels: int) -> np.ndarray:
    """What a prepared-then-evaluated image looks like; uint8 [image_size, image_size, 3].

    Raises:
      datasets.isic.images.BadImage: with the reason.
    """
    stored = images.process_image(path, stored_size, max_pixels=max_pixels)
    return image_ops.eval_image(stored, image_size)


# ---------------------------------------------------------------------------------------------
# The model.


@dataclasses.dataclass
class InferenceModel:
    """A loaded export.

    meta: model.json. backend: "export" (the jax.export artefact) or "checkpoint" (Orbax
    variables + model code). forward: traceable f(uint8 [b, S, S, 3][, float32 [b, F]
    metadata]) -> float32 [b, C]. encoder: the export's metadata encoder (a model with a
    metadata branch), else None.
    """

    meta: dict[str, Any]
    backend: str
    forward: Callable[..., jax.Array]
    encoder: Any = None

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["class_names"])

    @property
    def image_size(self) -> int:
        return int(self.meta["input"]["image_size"])


def load_model(export_dir: str | os.PathLike, backend: str = "auto") -> InferenceModel:
    """Loads an export for prediction on this process's devices.

    Args:
      backend: "export" (the StableHLO artefact; fails when not lowered for this platform),
        "checkpoint" (Orbax variables + model code), "auto" (export when it covers this
        platform, else checkpoint).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    meta = export_lib.read_metadata(export_dir)
    platform = export_lib.current_platform()
    covered = list(meta["export"]["platforms"])
    if backend == "auto":
        backend = "export" if platform in covered else "checkpoint"
    if backend == "export":
        if platform not in covered:
            raise ValueError(
                f"the exported model was lowered for {', '.join(covered)}, not {platform}; "
                "use backend 'checkpoint'"
            )
        exported = export_lib.load_exported(export_dir)
        return InferenceModel(meta, "export", exported.call, _encoder(export_dir, meta))
    return InferenceModel(meta, "checkpoint", _checkpoint_forward(export_dir, meta),
                          _encoder(export_dir, meta))


def _encoder(export_dir: str | os.PathLike, meta: dict[str, Any]) -> Any:
    """The export's metadata encoder when its function takes metadata."""
    if "metadata" not in meta.get("input", {}):
        return None
    encoder = metadata_lib.load_encoder(export_dir)
    if encoder is None:
        raise ValueError(f"{export_dir}: model.json says the model takes metadata, but "
                         f"{metadata_lib.ENCODER_FILE} is missing; re-export the run")
    return encoder


def _checkpoint_forward(
    export_dir: str | os.PathLike, meta: dict[str, Any]
) -> Callable[[jax.Array], jax.Array]:
    """The exported function rebuilt from the Orbax variables and the model code: one model, or
    the mean of an ensemble's members (and the 8 flips when the export has them inside)."""
    if meta.get("members"):
        shared = metadata_lib.load_encoder(export_dir)
        forward = export_lib.mean_forward([
            metadata_lib.recoding(_member_forward(pathlib.Path(export_dir) / m["dir"], meta),
                              metadata_lib.load_encoder(pathlib.Path(export_dir) / m["dir"]),
                              shared)
            for m in meta["members"]
        ])
    else:
        forward = _member_forward(export_dir, meta)
    return export_lib.with_tta(forward) if meta["export"].get("tta_inside") else forward


def _member_forward(
    export_dir: str | os.PathLike, meta: dict[str, Any]
) -> Callable[[jax.Array], jax.Array]:
    """One model's forward pass from its Orbax variables (`export_dir/variables`), config and
    the model code, preprocessing per meta."""
    pre = meta["preprocessing"]
    config = config_utils.load_config(export_dir)
    # The forward pass normalises with config.json's mean/std; model.json must say the same.
    mean, std = image_ops.normalization(config.data)
    if not (np.allclose(pre["mean"], mean) and np.allclose(pre["std"], std)):
        raise ValueError(
            f"{export_dir}: model.json's mean/std ({pre['mean']}, {pre['std']}) differ from its "
            f"config.json's ({mean.tolist()}, {std.tolist()}); re-export the run")
    config.data.augment.color_constancy = bool(pre["color_constancy"]["enabled"])
    variables = export_lib.restore_variables(export_dir)
    return export_lib.inference_forward(config, variables, len(meta["class_names"]),
                                        metadata_lib.load_encoder(export_dir))


class Runner:
    """Runs a forward pass on batches sharded over the local devices (jit + shard_map).

    Args:
      forward: traceable uint8 [b, S, S, 3] (, float32 [b, F] metadata) -> float32 [b, C].
      batch_size: images per call; rounded up to a multiple of the device count.
      devices: default all local devices.
    """

    def __init__(
        self,
        forward: Callable[[jax.Array], jax.Array],
        batch_size: int = DEFAULT_BATCH_SIZE,
        devices: Sequence[jax.Device] | None = None,
    ):
        devices = list(devices) if devices is not None else jax.local_devices()
        self.num_devices = len(devices)
        self.batch_size = -(-max(1, int(batch_size)) // self.num_devices) * self.num_devices
        self.mesh = Mesh(np.asarray(devices), (MESH_AXIS,))
        self.sharding = NamedSharding(self.mesh, P(MESH_AXIS))
        self._forward = forward
        self._fns: dict[int, Callable[..., jax.Array]] = {}

    def _fn(self, *arrays: jax.Array) -> jax.Array:
        # Each device runs the (single-device) program on its slice: no collectives. One
        # program per number of inputs (images, or images and metadata).
        fn = self._fns.get(len(arrays))
        if fn is None:
            specs = tuple(P(MESH_AXIS) for _ in arrays)
            fn = self._fns[len(arrays)] = jax.jit(jax.shard_map(
                self._forward, mesh=self.mesh, in_specs=specs, out_specs=P(MESH_AXIS)))
        return fn(*arrays)

    def submit(self, images: np.ndarray, *metadata: np.ndarray) -> jax.Array:
        """Starts one batch (<= batch_size images, uint8 [n, S, S, 3], and their metadata
        float32 [n, F] for a model that takes it); returns the device output [batch_size, C]
        (rows past n are padding). Asynchronous."""
        n = len(images)
        if n > self.batch_size:
            raise ValueError(f"{n} images > batch size {self.batch_size}")
        arrays = [images, *metadata]
        if n < self.batch_size:
            arrays = [np.concatenate([a, np.zeros((self.batch_size - n, *a.shape[1:]), a.dtype)])
                      for a in arrays]
        return self._fn(*(jax.device_put(a, self.sharding) for a in arrays))

    def __call__(self, images: np.ndarray, *metadata: np.ndarray) -> np.ndarray:
        """float32 [n, C] for uint8 [n, S, S, 3] (and metadata [n, F]), any n (batched,
        padded)."""
        step = self.batch_size
        outs = [(len(images[i : i + step]),
                 self.submit(images[i : i + step], *(m[i : i + step] for m in metadata)))
                for i in range(0, len(images), step)]
        return np.concatenate([np.asarray(out)[:n] for n, out in outs])


# ---------------------------------------------------------------------------------------------
# Submissions.


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
    rows = [[i, *[_fmt(v) for v in row]] for i, row in zip(image_ids, values, strict=True)]
    return header, rows


def _fmt(value: float) -> str:
    return f"{float(value):.7g}"


# ---------------------------------------------------------------------------------------------
# The run.


@dataclasses.dataclass
class Summary:
    """What `predict_to_csv` did. probs float32 [N, C] (NaN on failed rows), errors per item."""

    items: list[Item]
    probs: np.ndarray
    errors: list[str | None]
    class_names: list[str]
    output: pathlib.Path
    errors_file: pathlib.Path | None
    backend: str
    num_devices: int
    seconds: float
    decision: Decision | None = None

    @property
    def num_failed(self) -> int:
        return sum(e is not None for e in self.errors)


def _decoded(
    items: Sequence[Item], pre: dict[str, Any], image_size: int, num_workers: int
) -> Iterator[tuple[int, np.ndarray | None, str | None]]:
    """(index, uint8 image or None, error or None) per item, in order, decoded on threads."""
    stored, max_pixels = int(pre["stored_size"]), int(pre["max_pixels"])

    def work(i: int) -> tuple[int, np.ndarray | None, str | None]:
        item = items[i]
        if item.error is not None:
            return i, None, item.error
        try:
            return i, load_image(item.path, stored, image_size, max_pixels), None
        except images.BadImage as e:
            return i, None, str(e)
        except OSError as e:  # vanished or unreadable file
            return i, None, f"cannot read the file ({e})"

    yield from images.ordered_map(work, range(len(items)), num_workers)


def predict_items(
    model: InferenceModel,
    items: Sequence[Item],
    *,
    tta_flips: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE,
    devices: Sequence[jax.Device] | None = None,
    num_workers: int | None = None,
    progress: bool = True,
) -> tuple[np.ndarray, list[str | None]]:
    """Probabilities of every item: (float32 [N, C] with NaN rows where it failed, errors)."""
    num_classes = len(model.class_names)
    probs = np.full((len(items), num_classes), np.nan, np.float32)
    errors: list[str | None] = [None] * len(items)
    if not items:
        return probs, errors
    n_devices = len(devices) if devices is not None else jax.local_device_count()
    # No bigger than needed: a few images should not pay for a full padded batch.
    batch_size = min(int(batch_size), -(-len(items) // n_devices) * n_devices)
    if tta_flips and model.meta["export"].get("tta_inside"):
        raise ValueError("this export already averages the 8 flips/transposes inside (it was "
                         "exported with --tta): drop --tta")
    forward = export_lib.with_tta(model.forward) if tta_flips else model.forward
    runner = Runner(forward, batch_size, devices)
    meta_rows = None
    if model.encoder is not None:
        # Read by their ISIC names (CSV input); absent columns or values are missing.
        meta_rows, warnings = model.encoder.encode_rows([item.row or {} for item in items])
        for warning in dict.fromkeys(warnings):
            print(f"isic-jax predict: {warning}", file=sys.stderr, flush=True)
    pre = model.meta["preprocessing"]
    workers = num_workers or images.default_num_workers()
    bar = logging_utils.Progress(len(items), enabled=progress,
                                 bar=logging_utils.use_progress_bar(True), stream=sys.stderr,
                                 unit="image", label="predict")
    pending: list[tuple[list[int], jax.Array]] = []

    def drain(keep: int) -> None:
        while len(pending) > keep:
            indices, out = pending.pop(0)
            probs[indices] = np.asarray(out)[: len(indices)]
            bar.advance(len(indices))

    def submit(indices: list[int], imgs: list[np.ndarray]) -> jax.Array:
        extra = () if meta_rows is None else (meta_rows[indices],)
        return runner.submit(np.stack(imgs), *extra)

    batch_idx: list[int] = []
    batch_img: list[np.ndarray] = []
    try:
        with images.pil_limits(int(pre["max_pixels"])):
            for i, image, error in _decoded(items, pre, model.image_size, workers):
                if image is None:
                    errors[i] = error
                    bar.advance(1)
                    continue
                batch_idx.append(i)
                batch_img.append(image)
                if len(batch_idx) == runner.batch_size:
                    pending.append((batch_idx, submit(batch_idx, batch_img)))
                    batch_idx, batch_img = [], []
                    drain(keep=2)  # decode of the next batches overlaps the device
        if batch_idx:
            pending.append((batch_idx, submit(batch_idx, batch_img)))
        drain(keep=0)
    finally:
        bar.close()
    return probs, errors


@dataclasses.dataclass(frozen=True)
class Decision:
    """How `predict` turns probabilities into its `prediction` column (from model.json).

    temperature: applied to the exported function's probabilities (1: none);
    threshold: on the malignant probability (malignant iff >= threshold); source: where both
    come from, for the message and the model card.
    """

    temperature: float
    threshold: float
    calibrated: bool
    source: str

    def describe(self) -> str:
        cal = (f"probabilities calibrated with temperature {self.temperature:.4g}"
               if self.temperature != 1.0 else "probabilities not calibrated")
        return (f"prediction: malignant iff malignant_probability >= {self.threshold:.4g} "
                f"({self.source}); {cal}")


def decision_rule(meta: dict[str, Any], calibrate: bool = True) -> Decision:
    """The temperature and threshold of an export's model.json.

    Exports written before calibration existed have neither "calibration" nor
    "operating_point": temperature 1 and their "threshold". With calibrate=False the temperature
    is 1 and the threshold the one chosen on uncalibrated scores (when the export has it).
    """
    op = meta.get("operating_point") or {}
    temperature = float((meta.get("calibration") or {}).get("temperature", 1.0))
    how = op.get("description") or "model.json threshold"
    if not calibrate:
        threshold = op.get("threshold_uncalibrated", meta.get("threshold", 0.5))
        return Decision(1.0, float(threshold), False,
                        f"{how}, on uncalibrated scores (--no-calibration)")
    return Decision(temperature, float(meta.get("threshold", 0.5)), temperature != 1.0, how)


def apply_decision(
    probs: np.ndarray, decision: Decision, malignant: Sequence[int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(probabilities float32 [N, C] after the temperature, malignant probability f32[N],
    malignant at the threshold bool[N]); rows of NaN (failed images) stay NaN / False."""
    out = np.array(probs, np.float32, copy=True)
    ok = np.all(np.isfinite(out), axis=1)
    if decision.temperature != 1.0 and ok.any():
        out[ok] = calibration.apply_temperature(out[ok], decision.temperature)
    mal = out[:, list(malignant)].sum(axis=1)
    return out, mal, ok & (mal >= decision.threshold)


def errors_path(output: str | os.PathLike) -> pathlib.Path:
    """Where a submission's failed images are listed: <output stem>.errors.csv."""
    output = pathlib.Path(output)
    return output.with_name(output.stem + ".errors.csv")


def predict_to_csv(
    model_dir: str | os.PathLike,
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    tta_flips: bool = False,
    submission: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    backend: str = "auto",
    devices: Sequence[jax.Device] | None = None,
    num_workers: int | None = None,
    progress: bool = True,
    calibrate: bool = True,
) -> Summary:
    """Predicts every image of `source` (folder or CSV) and writes `output` (see module doc).

    calibrate: apply model.json's temperature (False: the raw probabilities, and the threshold
    chosen for them).

    Raises:
      InputError: a bad --input. SubmissionError: the model cannot fill the submission
      (checked before any image is read). FileNotFoundError/ValueError: not an export folder.
    """
    start = time.perf_counter()
    output = pathlib.Path(output)
    items = list_inputs(source)  # before the model: a typo in --input fails at once
    model = load_model(model_dir, backend)
    names = model.class_names
    malignant = list(model.meta["malignant_classes"])
    if submission is not None:  # fails before any image is read
        submission_table(submission, [], np.zeros((0, len(names))), names, malignant)
    decision = decision_rule(model.meta, calibrate)
    probs, errors = predict_items(
        model, items, tta_flips=tta_flips, batch_size=batch_size, devices=devices,
        num_workers=num_workers, progress=progress,
    )
    probs, mal_prob, flagged = apply_decision(probs, decision, malignant)
    ok = [i for i, e in enumerate(errors) if e is None]
    errors_file = None
    if submission is None:
        header = ["image_id", "path", *[f"prob_{n}" for n in names], "prediction",
                  "malignant_probability", "malignant_at_threshold", "error"]
        rows = []
        for i, item in enumerate(items):
            if errors[i] is None:
                p = probs[i]
                rows.append([item.image_id, item.shown, *[_fmt(v) for v in p],
                             prediction_label(p, bool(flagged[i]), names, malignant),
                             _fmt(mal_prob[i]), int(flagged[i]), ""])
            else:
                rows.append([item.image_id, item.shown, *[""] * len(names), "", "", "",
                             errors[i]])
        write_csv(output, header, rows)
    else:
        header, rows = submission_table(
            submission, [items[i].image_id for i in ok], probs[ok], names, malignant
        )
        write_csv(output, header, rows)
        if len(ok) < len(items):
            errors_file = errors_path(output)
            write_csv(errors_file, ["image_id", "path", "error"],
                       [[it.image_id, it.shown, errors[i]] for i, it in enumerate(items)
                        if errors[i] is not None])
    return Summary(
        items=list(items), probs=probs, errors=errors, class_names=names, output=output,
        errors_file=errors_file, backend=model.backend,
        num_devices=len(devices) if devices is not None else jax.local_device_count(),
        seconds=time.perf_counter() - start, decision=decision,
    )


def prediction_label(
    probs: np.ndarray, malignant_at_threshold: bool, names: Sequence[str],
    malignant: Sequence[int],
) -> str:
    """The `prediction` column: for two classes, the malignant class iff the malignant
    probability reaches the threshold (else the other); for several, the most probable class
    within the side of the threshold the image falls on (malignant classes, or the others)."""
    mal = set(int(c) for c in malignant)
    side = [c for c in range(len(names)) if (c in mal) == malignant_at_threshold]
    if not side:  # every class on one side: the threshold cannot pick
        side = list(range(len(names)))
    return names[max(side, key=lambda c: probs[c])]
