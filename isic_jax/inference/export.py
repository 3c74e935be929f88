"""Inference artefacts from a training checkpoint: Orbax variables, a `jax.export` model, a JSON.

    meta = export_checkpoint("runs/r50", "exports/r50", checkpoint="best")

writes

    exports/r50/
      model.json          which model, classes in order, input, exact preprocessing, platforms,
                          the temperature and operating threshold `predict` applies
      MODEL_CARD.md       the model card (model_card.json: the same as JSON; model_card.py)
      model.jax_export    jax.export artefact: uint8 [B, S, S, 3] RGB -> float32 [B, C] probs
      variables/          Orbax checkpoint {"params", "batch_stats"} (EMA weights when the run
                          kept them: the ones evaluation uses); no optimiser state
      config.json         the run's resolved config (rebuilds the model with isic_jax)
      checksums.json      CRC-32 of every file and of every array of variables/, written last
                          (training/integrity.py); `predict` checks the weights it uses
                          against it, `isic-jax verify --model` everything

The exported function is the evaluation forward pass, `steps.eval_step`, with the variables
baked in as constants: colour constancy (if the run used it) and the run's normalisation
(config.data.mean/std: ImageNet's, or the pretrained weights') run inside it, so a caller only
decodes, resizes and centre-crops (`model.json["preprocessing"]`, which `isic-jax predict`
follows). The batch size is symbolic ("b"): any batch works. It is
lowered for CPU, CUDA and TPU where this JAX can (each platform is tried on its own when the
joint lowering fails; the platforms that worked are in model.json). Loading it needs plain
`jax` (and `flatbuffers`), not isic_jax:

    import json, numpy as np, jax
    from jax import export
    meta = json.load(open("exports/r50/model.json"))
    with open("exports/r50/model.jax_export", "rb") as f:
        model = export.deserialize(bytearray(f.read()))
    s = meta["input"]["image_size"]
    images = np.zeros((4, s, s, 3), np.uint8)  # RGB, resized as meta["preprocessing"] says
    probs = np.asarray(model.call(images))     # float32 [4, C]; columns: meta["class_names"]

Numbers: at export the artefact is deserialised and run on random images against
`steps.eval_step` on the same variables; the largest absolute difference of the probabilities
is stored as `export.verified_max_abs_diff` and must be within `export.tolerance` (1e-5 for
float32 compute, 1e-2 for bfloat16), or the export fails.

The variables restore with Orbax on any device count, without the model code
(`restore_variables`: the target is built from the checkpoint's own metadata).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import export as jax_export

from isic_jax import config_utils
from isic_jax.data import dataset, image_ops, metadata
from isic_jax.data.isic import images, labels
from isic_jax.evaluation import analysis, evaluate
from isic_jax.inference import model_card
from isic_jax.models import create_model
from isic_jax.training import init_from as warm_start
from isic_jax.training import integrity, parallel, steps
from isic_jax.training import state as train_state
from isic_jax.utils import atomic_directory

PyTree = Any

FORMAT = "isic_jax.export"
FORMAT_VERSION = 1  # what a single-model export writes
# Newest model.json this isic_jax reads (2: an ensemble, inference/ensemble.py).
READ_VERSION = 2
METADATA_FILE = "model.json"
EXPORTED_FILE = "model.jax_export"
VARIABLES_DIR = "variables"
CONFIG_FILE = "config.json"
DEFAULT_PLATFORMS: tuple[str, ...] = ("cpu", "cuda", "tpu")
# |exported - eval_step| on probabilities, by compute dtype (the same program; only fusion or
# algorithm choices for another batch shape differ).
TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-2}
VERIFY_BATCH = 3  # random images compared at export time
# What `isic-jax prepare` does to every image (datasets/isic/images.py: process_image).
STORED_FILTER = "lanczos"
SHADES_OF_GRAY_POWER = 6


class ExportError(RuntimeError):
    """The export could not be written or did not reproduce the trained model."""


# ---------------------------------------------------------------------------------------------
# The model's classes and forward pass.


def class_names_for(config: Any) -> list[str]:
    """Class names in the model's output order: the prepared dataset's ClassLabel names.

    task "binary": ["benign", "malignant"]; "diagnosis": the release's classes, or for several
    releases ("isic2019+isic2020") the common taxonomy they train on (`labels.diagnosis_classes`).
    """
    if config.data.task == "binary":
        return list(labels.LABEL_NAMES)
    return labels.diagnosis_classes(config.data.release)


def malignant_classes_for(config: Any, class_names: Sequence[str]) -> list[int]:
    """Indices of the classes whose probabilities sum to the malignant probability."""
    return dataset.malignant_class_indices(config.data.task, config.data.release, list(class_names))


def inference_forward(
    config: Any, variables: dict[str, PyTree], num_classes: int, metadata_encoder: Any = None
) -> Callable[..., jax.Array]:
    """The evaluation forward pass with `variables` closed over (traceable, not jitted).

    Args:
      config: the run's resolved config (model, data.augment.color_constancy).
      variables: {"params", "batch_stats"}: what evaluation uses (EMA ones when kept).
      num_classes: size of the model's head.
      metadata_encoder: the run's `metadata.MetadataEncoder` (a model with a metadata branch).

    Returns:
      f(images uint8 [B, S, S, 3] RGB[, metadata float32 [B, F]]) -> float32 [B, C] softmax
      probabilities: exactly `steps.eval_step` (colour constancy if configured, the run's
      normalisation, the model).
    """
    model = create_model(config.model, num_classes, metadata=metadata_encoder)
    augment = steps.augment_config(config)
    state = train_state.TrainState(
        step=jnp.zeros((), jnp.int32),
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        opt_state=(),
        ema={},
    )

    def forward(images: jax.Array, metadata: jax.Array | None = None) -> jax.Array:
        batch = {"image": images} if metadata is None else {"image": images,
                                                             "metadata": metadata}
        return steps.eval_step(state, batch, model=model, augment=augment)

    return forward


def mean_forward(forwards: Sequence[Callable[..., jax.Array]]) -> Callable[..., jax.Array]:
    """f(images[, metadata]) -> the mean of the members' probabilities float32 [B, C] (an
    ensemble; each member gets the same arguments)."""
    if len(forwards) == 1:
        return forwards[0]

    def averaged(images: jax.Array, *metadata: jax.Array) -> jax.Array:
        return jnp.mean(jnp.stack([f(images, *metadata) for f in forwards]), axis=0)

    return averaged


def with_tta(forward: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
    """f(images[, metadata]) -> mean over the 8 flips/transposes k of f(dihedral(images, k)[,
    metadata]); one call on 8B images."""

    def averaged(images: jax.Array, *metadata: jax.Array) -> jax.Array:
        batch = images.shape[0]
        variants = jnp.concatenate(
            [image_ops.dihedral(images, k, axes=(1, 2)) for k in range(8)], axis=0)
        probs = forward(variants, *(jnp.concatenate([m] * 8, axis=0) for m in metadata))
        return jnp.mean(probs.reshape(8, batch, probs.shape[-1]), axis=0)

    return averaged


# ---------------------------------------------------------------------------------------------
# jax.export.


def _export_for(
    jitted: Callable, specs: Sequence[jax.ShapeDtypeStruct], platforms: Sequence[str]
) -> jax_export.Exported:
    return jax_export.export(jitted, platforms=tuple(platforms))(*specs)


def export_forward(
    forward: Callable[..., jax.Array],
    image_size: int,
    platforms: Sequence[str] = DEFAULT_PLATFORMS,
    metadata_width: int = 0,
) -> tuple[jax_export.Exported, list[str], dict[str, str]]:
    """Lowers `forward` for uint8 [b, S, S, 3] (and float32 [b, F] metadata when
    `metadata_width` F > 0) with a symbolic batch `b`, for `platforms`.

    All platforms are lowered together first (one artefact that runs on each); if that fails,
    each platform is tried alone and the artefact covers those that lowered.

    Returns:
      (exported, platforms it covers, {platform: error} for those that failed).

    Raises:
      ExportError: no platform lowered.
    """
    (batch,) = jax_export.symbolic_shape("b")
    spec = [jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.uint8)]
    if metadata_width:
        spec.append(jax.ShapeDtypeStruct((batch, metadata_width), jnp.float32))
    jitted = jax.jit(forward)
    platforms = [p.lower() for p in platforms]
    try:
        return _export_for(jitted, spec, platforms), list(platforms), {}
    except Exception as joint_error:  # noqa: BLE001 - lowering errors have many types
        if len(platforms) == 1:
            raise ExportError(f"lowering for {platforms[0]} failed: {joint_error}") from joint_error
    ok: list[str] = []
    failed: dict[str, str] = {}
    for platform in platforms:
        try:
            _export_for(jitted, spec, [platform])
            ok.append(platform)
        except Exception as e:  # noqa: BLE001
            failed[platform] = f"{type(e).__name__}: {' '.join(str(e).split())[:500]}"
    if not ok:
        raise ExportError(f"no platform could be lowered: {failed}")
    return _export_for(jitted, spec, ok), ok, failed


def current_platform() -> str:
    """This process's default backend as jax.export names it (cpu, cuda, rocm, tpu)."""
    device = jax.local_devices()[0]
    if device.platform == "gpu":
        version = str(getattr(device.client, "platform_version", "")).lower()
        return "rocm" if "rocm" in version else "cuda"
    return device.platform


def load_exported(export_dir: str | os.PathLike) -> jax_export.Exported:
    """Deserialises `export_dir/model.jax_export`."""
    path = pathlib.Path(export_dir) / EXPORTED_FILE
    return jax_export.deserialize(bytearray(path.read_bytes()))


# ---------------------------------------------------------------------------------------------
# Orbax variables.


def save_variables(path: str | os.PathLike, variables: dict[str, PyTree]) -> None:
    """Writes {"params", "batch_stats"} with Orbax (synchronously) to `path` (must not exist)."""
    import orbax.checkpoint as ocp

    tree = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
    # Host copies: no sharding is recorded, so nothing ties the checkpoint to these devices.
    tree = jax.device_get(tree)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(pathlib.Path(path).absolute(), tree)
        ckptr.wait_until_finished()


def restore_variables(
    export_dir: str | os.PathLike, sharding: jax.sharding.Sharding | None = None
) -> dict[str, PyTree]:
    """Restores the exported variables on this process's devices, whatever their count.

    Needs no model code: shapes and dtypes come from the checkpoint's metadata.

    Args:
      export_dir: a folder written by `export_checkpoint` (or its `variables/` folder).
      sharding: where every leaf goes; default replicated on all local devices
        (NamedSharding(Mesh(local devices), P())).

    Returns:
      {"params": ..., "batch_stats": ...} of jax.Arrays (float32).

    Raises:
      integrity.IntegrityError: an array differs from the export's checksums.json (named).
    """
    import orbax.checkpoint as ocp

    path = pathlib.Path(export_dir).absolute()
    if (path / VARIABLES_DIR).is_dir():
        path = path / VARIABLES_DIR
    if sharding is None:
        mesh = jax.sharding.Mesh(np.asarray(jax.local_devices()), ("data",))
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    with ocp.StandardCheckpointer() as ckptr:
        tree = ckptr.metadata(path).item_metadata.tree
        target = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=sharding), tree
        )
        variables = ckptr.restore(path, target)
    integrity.check_saved_arrays(path, integrity.named_leaves(variables))
    return variables


# ---------------------------------------------------------------------------------------------
# Metadata.


def preprocessing_metadata(config: Any, max_pixels: int | None = None) -> dict[str, Any]:
    """What happens to an image before and inside the exported function (model.json)."""
    stored = int(config.data.stored_size)
    size = int(config.data.image_size)
    constancy = bool(config.data.augment.get("color_constancy", False))
    inside = (["color_constancy"] if constancy else []) + ["normalize"]
    steps = [
        "decode with PIL; EXIF orientation applied; 8-bit RGB (alpha composited over black, "
        "16-bit grey divided by 257)",
        f"prepare resize: shorter side to {stored} px (Lanczos, aspect kept), JPEG re-encoded "
        f"at quality {images.DEFAULT_JPEG_QUALITY} (what `isic-jax prepare` stores)",
        f"eval resize: centred square of the shorter side, resized to {size}x{size} (PIL "
        "antialiased bilinear; JPEG draft decoding when the stored image is >= 2x the size)",
        "inside the exported function: "
        + ("Shades-of-Gray colour constancy (p=6), then " if constancy else "")
        + "(x / 255 - mean) / std per channel",
    ]
    return {
        "steps": steps,
        "stored_size": stored,
        "stored_resize": {
            "method": "shorter_side",
            "filter": STORED_FILTER,
            "jpeg_quality": images.DEFAULT_JPEG_QUALITY,
        },
        "image_size": size,
        "eval_resize": {"method": "center_square_crop_then_resize", "filter": "bilinear"},
        "color_constancy": {
            "enabled": constancy,
            "method": "shades_of_gray",
            "power": SHADES_OF_GRAY_POWER,
        },
        # The decimal constants (the code holds them as float32): config.data.mean/std as the
        # run resolved them (the pretrained weights' or ImageNet's).
        "mean": [round(float(v), 6) for v in image_ops.normalization(config.data)[0]],
        "std": [round(float(v), 6) for v in image_ops.normalization(config.data)[1]],
        "value_scale": 255.0,
        "channel_order": "RGB",
        "layout": "NHWC",
        "inside_exported_function": inside,
        "max_pixels": int(max_pixels or images.DEFAULT_MAX_PIXELS),
    }


def read_metadata(export_dir: str | os.PathLike) -> dict[str, Any]:
    """`export_dir/model.json`.

    Raises:
      FileNotFoundError: not an export folder (with a hint).
      ValueError: a model.json of another format or a newer version.
    """
    path = pathlib.Path(export_dir) / METADATA_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: is {export_dir} a folder written by `isic-jax export`?"
        )
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT or int(meta.get("format_version", 0)) > READ_VERSION:
        raise ValueError(
            f"{path}: format {meta.get('format')!r} version {meta.get('format_version')!r}; this "
            f"isic_jax reads {FORMAT!r} up to version {READ_VERSION}"
        )
    return meta


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


# ---------------------------------------------------------------------------------------------
# The export.


def _verify(
    forward: Callable[..., jax.Array],
    exported: jax_export.Exported,
    image_size: int,
    seed: int = 0,
    metadata_width: int = 0,
) -> float:
    """max |exported(x) - forward(x)| over random uint8 images (and standard-normal metadata
    when the model takes it); float."""
    rng = np.random.default_rng(seed)
    args = [rng.integers(0, 256, (VERIFY_BATCH, image_size, image_size, 3), dtype=np.uint8)]
    if metadata_width:
        args.append(rng.standard_normal((VERIFY_BATCH, metadata_width)).astype(np.float32))
    expected = np.asarray(jax.jit(forward)(*args))
    got = np.asarray(jax.jit(exported.call)(*args))
    if got.shape != expected.shape:
        raise ExportError(f"exported output shape {got.shape} != model output {expected.shape}")
    return float(np.max(np.abs(got - expected)))


def _prepare_output(output: pathlib.Path, overwrite: bool) -> None:
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        if not overwrite:
            raise FileExistsError(
                f"{output} exists and is not empty; choose another --output or pass --overwrite"
            )
        if output.is_dir() and not (output / METADATA_FILE).exists():
            # Only an earlier export is replaced, never an arbitrary folder.
            raise FileExistsError(
                f"{output} is not an earlier export (no {METADATA_FILE}); refusing to replace it"
            )


@dataclasses.dataclass
class Artefact:
    """A lowered, serialised and (where this platform allows) verified forward pass."""

    serialized: bytes
    exported: jax_export.Exported
    platforms: list[str]  # covered
    failed: dict[str, str]  # platform -> why it did not lower
    verified_on: str | None
    max_abs_diff: float | None
    tolerance: float

    def metadata(self) -> dict[str, Any]:
        """model.json's "export" entry."""
        return {
            "file": EXPORTED_FILE,
            "function": "uint8 [b, S, S, 3] RGB -> float32 [b, C] probabilities",
            "platforms": self.platforms,
            "platforms_failed": self.failed,
            "symbolic_batch": "b",
            "nr_devices": int(self.exported.nr_devices),
            "calling_convention_version": int(self.exported.calling_convention_version),
            "jax_version": jax.__version__,
            "verified_on": self.verified_on,
            "verified_max_abs_diff": self.max_abs_diff,
            "tolerance": self.tolerance,
            "bytes": len(self.serialized),
        }


def build_artefact(
    forward: Callable[..., jax.Array],
    image_size: int,
    dtype: str,
    platforms: Sequence[str] = DEFAULT_PLATFORMS,
    verify: bool = True,
    metadata_width: int = 0,
) -> Artefact:
    """Lowers `forward` (`export_forward`), serialises it and, when this platform is covered
    and `verify`, checks the deserialised artefact against `forward` within the tolerance of
    the compute `dtype`.

    Raises:
      ExportError: nothing lowered, or the artefact differs from `forward` beyond tolerance.
    """
    exported, covered, failed = export_forward(forward, image_size, platforms, metadata_width)
    serialized = exported.serialize()
    tolerance = TOLERANCE.get(dtype, TOLERANCE["bfloat16"])
    here, max_diff = current_platform(), None
    if verify and here in covered:
        max_diff = _verify(forward, jax_export.deserialize(bytearray(serialized)), image_size,
                           metadata_width=metadata_width)
        if not max_diff <= tolerance:
            raise ExportError(
                f"the exported model differs from the trained model by {max_diff:.3g} "
                f"(tolerance {tolerance:g}) on {here}"
            )
    return Artefact(serialized, exported, covered, failed,
                    here if max_diff is not None else None, max_diff, tolerance)


def model_metadata(
    config: Any, class_names: list[str], artefact: Artefact, *, ema: bool,
    checkpoint: dict[str, Any], init_from: dict[str, Any] | None = None,
    metadata_encoder: Any = None,
) -> dict[str, Any]:
    """model.json: which model, classes in order, input, preprocessing, the artefact, where the
    weights come from (`checkpoint`: workdir, requested, step, metrics; `init_from`: the
    pretrained weights the run started from, its init_from.json, or None from scratch), and,
    for a model with a metadata branch, its second input (`metadata_encoder`)."""
    image_size, num_classes = int(config.data.image_size), len(class_names)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": {
            "name": str(config.model.name),
            "width": int(config.model.get("width", 64)),
            "dtype": str(config.model.get("dtype", "float32")),
            "dropout": float(config.model.get("dropout", 0.0)),
            "num_classes": num_classes,
        },
        "task": str(config.data.task),
        "release": str(config.data.release),
        "class_names": class_names,
        "malignant_classes": malignant_classes_for(config, class_names),
        "threshold": float(config.eval.threshold),
        "input": {
            "image_size": image_size,
            "shape": [None, image_size, image_size, 3],
            "dtype": "uint8",
            "layout": "NHWC",
            "channel_order": "RGB",
            "value_range": [0, 255],
            "normalized_inside": True,
        },
        "output": {
            "shape": [None, num_classes],
            "dtype": "float32",
            "kind": "softmax probabilities, columns in class_names order",
        },
        "preprocessing": preprocessing_metadata(config),
        "export": artefact.metadata(),
        "variables": {
            "dir": VARIABLES_DIR,
            "format": "orbax StandardCheckpointer: {params, batch_stats}",
            "ema": ema,
        },
        "checkpoint": checkpoint,
        "init_from": init_from,
    }
    if metadata_encoder is not None:
        width = metadata_encoder.width
        meta["input"]["metadata"] = {
            "shape": [None, width],
            "dtype": "float32",
            "file": metadata.ENCODER_FILE,
            "missing_row": [float(v) for v in metadata_encoder.missing_row()],
            "kind": "the second argument of the exported function: the encoded metadata, one "
                    "column per entry of model.json's metadata.columns",
        }
        meta["metadata"] = {"features": metadata_encoder.names,
                            "columns": metadata_encoder.columns()}
        meta["export"]["function"] = (f"uint8 [b, S, S, 3] RGB, float32 [b, {width}] metadata "
                                      f"-> float32 [b, C] probabilities")
    return _jsonable(meta)


def calibration_metadata(validation: dict[str, Any] | None, config: Any) -> dict[str, Any]:
    """model.json's "threshold", "operating_point" and "calibration" from the validation split's
    metrics (`evaluate.validation_metrics`); without them, config.eval.threshold and T = 1.

    `predict` applies the temperature to the exported function's probabilities (it is not
    inside model.jax_export, so `--no-calibration` can turn it off) and then the threshold.
    """
    fitted = analysis.Fitted.from_metrics(validation) if validation else None
    how = {"formula": "softmax(log(p) / temperature) of the exported function's probabilities",
           "applied_by": "isic-jax predict (--no-calibration turns it off)"}
    if fitted is None:
        return {
            "threshold": float(config.eval.threshold),
            "calibration": {"temperature": 1.0, "fitted": False, **how},
        }
    op = validation["operating_point"]
    cal = validation.get("calibration") or {}
    return {
        "threshold": fitted.threshold,
        "operating_point": {
            **fitted.to_json(),
            **{k: op.get(k) for k in ("sensitivity", "specificity", "ppv", "npv")},
            "rule": "malignant iff malignant_probability >= threshold",
        },
        "calibration": {
            "temperature": fitted.temperature,
            "fitted": True,
            "fitted_on": fitted.fitted_on,
            "ece_before": cal.get("ece_before"),
            "ece_after": cal.get("ece_after"),
            "num_bins": cal.get("num_bins"),
            **how,
        },
    }


def write_export(
    output: pathlib.Path, artefact: Artefact, variables: dict[str, PyTree], config: Any,
    meta: dict[str, Any], write_extra: Callable[[pathlib.Path], None] | None = None,
) -> None:
    """Writes the export folder atomically (`utils.atomic_directory`): never half-written.
    `write_extra(folder)` adds files (the model card) before the rename."""
    with atomic_directory(output) as tmp:
        (tmp / EXPORTED_FILE).write_bytes(artefact.serialized)
        save_variables(tmp / VARIABLES_DIR, variables)
        config_utils.save_config(config, tmp)  # tmp/config.json
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if write_extra is not None:
            write_extra(tmp)
        integrity.write_folder_checksums(tmp, {VARIABLES_DIR: variables})


def export_checkpoint(
    workdir: str | os.PathLike,
    output: str | os.PathLike,
    checkpoint: str | int = "latest",
    *,
    platforms: Sequence[str] = DEFAULT_PLATFORMS,
    overwrite: bool = False,
    verify: bool = True,
    tta: bool = False,
) -> dict[str, Any]:
    """Writes the inference artefacts of one checkpoint of a run (see the module docstring).

    Args:
      workdir: the `isic-jax train` run folder (config.json + checkpoints/).
      output: the export folder (created; must be empty, or an earlier export with overwrite).
      checkpoint: "latest", "best" or a step number.
      platforms: jax.export platforms to lower for (those that fail are left out and recorded).
      overwrite: replace an earlier export in `output`.
      verify: run the deserialised artefact against `steps.eval_step` (fails beyond tolerance).
      tta: the exported function averages over the 8 flips/transposes of its input (`with_tta`).

    Returns:
      The metadata written to model.json.

    Raises:
      FileNotFoundError: no such run or checkpoint. FileExistsError: `output` in the way.
      ExportError: nothing could be lowered, or the artefact does not reproduce the model.
    """
    if jax.process_count() > 1:
        raise ExportError("export runs in a single process (it needs one device)")
    workdir = pathlib.Path(workdir).absolute()
    output = pathlib.Path(output).absolute()
    _prepare_output(output, overwrite)
    config = config_utils.load_config(workdir)
    class_names = class_names_for(config)
    # One device: the artefact is a single-device program (predict shards the batch itself).
    par = parallel.DataParallel.create("jit", [jax.local_devices()[0]])
    state, step, metrics = evaluate.restore_for_eval(workdir, config, len(class_names), par,
                                                     checkpoint)
    variables = state.eval_variables()
    encoder = metadata.load_encoder(workdir)
    forward = inference_forward(config, variables, len(class_names), encoder)
    if tta:
        forward = with_tta(forward)
    width = encoder.width if encoder is not None else 0
    artefact = build_artefact(forward, int(config.data.image_size),
                              str(config.model.get("dtype", "float32")), platforms, verify,
                              metadata_width=width)
    # eval_variables picks the SWA weights once SWA holds a snapshot (training/swa.py).
    swa_used = bool(state.swa) and int(jax.device_get(state.swa["count"])) > 0
    meta = model_metadata(
        config, class_names, artefact, ema=bool(state.ema) and not swa_used,
        checkpoint={"workdir": str(workdir), "requested": str(checkpoint), "step": int(step),
                    "metrics": metrics},
        init_from=warm_start.read_record(workdir), metadata_encoder=encoder,
    )
    meta["export"]["tta_inside"] = bool(tta)
    meta["variables"]["swa"] = swa_used
    card = add_validation(meta, config, variables, workdir, int(step))

    def extra(folder: pathlib.Path) -> None:
        model_card.write_card(folder, card)
        if encoder is not None:
            metadata.save_encoder(encoder, folder)

    write_export(output, artefact, variables, config, meta, write_extra=extra)
    return meta


def add_validation(
    meta: dict[str, Any], config: Any, variables: dict[str, PyTree], workdir: pathlib.Path,
    step: int,
) -> dict[str, Any]:
    """Adds the validation fold's calibration and operating threshold to `meta` (model.json) and
    returns the model card (`model_card.build_card`)."""
    validation, how = evaluate.validation_metrics(workdir, config, step)
    meta.update(_jsonable(calibration_metadata(validation, config)))
    meta["validation_source"] = how
    meta["model_card"] = {"markdown": model_card.MARKDOWN_FILE, "json": model_card.JSON_FILE}
    return model_card.build_card(meta, config, jax.device_get(variables), validation=validation,
                                 validation_source=how, workdir=workdir)
