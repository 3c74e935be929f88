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

Inputs: a folder of images or a CSV listing them (`inputs.list_inputs`), each image decoded,
resized and cropped as `isic-jax prepare` and evaluation do, with the sizes from model.json
(`inputs.load_image`); colour constancy and normalisation run inside the model function. An
image that fails gets a row with an `error` and the run goes on.

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
With `submission`, the exact columns of that ISIC challenge (`submission.SUBMISSION_COLUMNS`;
failed images are left out of that file and listed in `<output>.errors.csv`). `tta`: the mean of the
probabilities over the 8 flips/transposes of the input (8x the compute).
"""

from __future__ import annotations

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
from isic_jax.data.isic import images
from isic_jax.evaluation import calibration
from isic_jax.inference import export as export_lib
from isic_jax.inference.inputs import Item, list_inputs, load_image
from isic_jax.inference.submission import format_probability, submission_table
from isic_jax.training import integrity
from isic_jax.utils import write_csv

BACKENDS = ("auto", "export", "checkpoint")
MESH_AXIS = "data"
DEFAULT_BATCH_SIZE = 32


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

    Raises:
      integrity.IntegrityError: the weights it uses (model.jax_export, or the variables) differ
        from the export's checksums.json (the message names the file or array). An export
        without checksums loads with a note.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    meta = export_lib.read_metadata(export_dir)
    platform = export_lib.current_platform()
    covered = list(meta["export"]["platforms"])
    if backend == "auto":
        backend = "export" if platform in covered else "checkpoint"
    if backend == "export" and platform not in covered:
        raise ValueError(
            f"the exported model was lowered for {', '.join(covered)}, not {platform}; "
            "use backend 'checkpoint'"
        )
    # The weights it uses are checked against checksums.json before use: the StableHLO file
    # here, the variables when they are restored (export.restore_variables).
    if integrity.check_folder_files(
            export_dir, lambda rel: backend == "export" and rel == export_lib.EXPORTED_FILE
    ) == integrity.ABSENT:
        print(integrity.absent_note(f"The export {export_dir}"), file=sys.stderr, flush=True)
    if backend == "export":
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
                rows.append([item.image_id, item.shown, *[format_probability(v) for v in p],
                             prediction_label(p, bool(flagged[i]), names, malignant),
                             format_probability(mal_prob[i]), int(flagged[i]), ""])
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
