"""Pretrained weights for the ResNets: torchvision/timm state dicts, the Hugging Face Hub cache,
and this project's own runs.

    variables = load_pretrained("resnet50-0676ba61.pth", config.model, num_classes=2)
    logits = create_model(config.model, 2).apply(variables, x, train=False)   # f32 [B, 2]

    pre = load("hf-hub:timm/resnet50.a1_in1k", config.model, 2)   # + what was done, for logs
    pre.variables, pre.mean, pre.std, pre.head, pre.ignored, pre.record()

Sources (`config.model.init_from`):
- `FILE.safetensors`: a torchvision or timm ResNet state dict, read with `safetensors` (no torch).
- `FILE.pth` / `.pt` / `.bin`: the same as a torch file, read with `torch.load(weights_only=True)`
  (tensors only: no code is unpickled) when torch is installed; without torch the error says how
  to convert it to safetensors once. Wrapped checkpoints ({"state_dict": ...}, {"model": ...})
  and DataParallel's "module." prefix are taken as they come.
- `hf-hub:ORG/NAME[@REVISION]`: a Hub repository in timm's layout (model.safetensors, else
  pytorch_model.bin, and config.json) through `huggingface_hub.hf_hub_download`, which honours
  HF_HOME / HF_HUB_CACHE and HF_HUB_OFFLINE=1: a populated cache works without network.
- a folder holding model.safetensors or pytorch_model.bin (+ config.json): a Hub snapshot, or
  what `save_pretrained` writes.
- an isic_jax export (model.json + variables/) or workdir (config.json + checkpoints/): the best
  checkpoint by that run's train.best_metric, else the latest; the EMA weights when the run kept
  them (what it evaluated with).

Key mapping (torchvision and timm name ResNet-18/34/50/101/152 tensors alike):

    conv1.weight                     -> params/stem_conv/kernel           OIHW -> HWIO
    bn1.{weight,bias}                -> params/stem_bn/{scale,bias}
    bn1.{running_mean,running_var}   -> batch_stats/stem_bn/{mean,var}
    layerS.I.convK / bnK             -> stageS_block{I+1}/convK / bnK
    layerS.0.downsample.0 / .1       -> stageS_block1/proj_conv / proj_bn
    fc.weight [C, F], fc.bias [C]    -> params/head/kernel [F, C], bias [C]
    *.num_batches_tracked            -> ignored (Flax BatchNorm keeps no counter)

Every tensor of the source is used or listed in `Pretrained.ignored`. A missing key, an
unexpected key, a shape that differs (another architecture or width), a non-float or non-finite
tensor: one `PretrainedError` listing every problem with the file, the key and both shapes, and
a guess of what the file holds, before any training starts.

Head (`init_head`): "auto" keeps the source's classifier when its shape is this model's (and,
for an isic_jax source, its classes are the same, in the same order), and re-initialises it
otherwise, saying why; "reinit" always re-initialises it (Flax's Dense initialiser, as from
scratch).

Normalisation: torchvision and timm ResNets were trained on ImageNet with mean (0.485, 0.456,
0.406), std (0.229, 0.224, 0.225) on [0, 1] RGB; a timm config.json ("pretrained_cfg") or an
isic_jax run records its own, which wins. `Pretrained.mean/std` is what the fine-tuning run
should normalise with (`config.data.mean/std` = () takes it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from isic_jax.data.image_ops import IMAGENET_MEAN, IMAGENET_STD
from isic_jax.models.resnet import ARCHITECTURES, BottleneckBlock

HUB_PREFIX = "hf-hub:"
SAFETENSORS_SUFFIXES: tuple[str, ...] = (".safetensors",)
TORCH_SUFFIXES: tuple[str, ...] = (".pth", ".pt", ".bin")
HUB_WEIGHT_FILES: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin")
HUB_CONFIG_FILE = "config.json"
INIT_HEAD_MODES: tuple[str, ...] = ("auto", "reinit")
# The torchvision/timm ResNets this mapping covers (same names in isic_jax).
TORCH_ARCHITECTURES: tuple[str, ...] = ("resnet18", "resnet34", "resnet50", "resnet101",
                                        "resnet152")
# The folders an isic_jax run and export write (training/checkpointing.py and
# inference/export.py; tests/test_pretrained.py checks that the names agree).
RUN_CONFIG_FILE = "config.json"
RUN_CHECKPOINTS_DIR = "checkpoints"
RUN_STATE_ITEM = "state"
EXPORT_METADATA_FILE = "model.json"
EXPORT_VARIABLES_DIR = "variables"
# Wrappers of a state dict in training checkpoints, tried in this order.
_WRAPPER_KEYS = ("state_dict", "model", "module", "state_dict_ema", "model_ema")
_IGNORED_SUFFIXES = (".num_batches_tracked",)
_MAX_LISTED = 8
_TRACE_SIZE = 64  # px: parameter shapes do not depend on the input size

PyTree = Any
FlatKey = tuple[str, ...]


class PretrainedError(ValueError):
    """The weights cannot be used for this model; the message names the file, the key(s) and
    the shapes, and says what to change."""


@dataclasses.dataclass
class Source:
    """What a weights source holds, before it is matched to a model.

    kind: "state_dict" (torchvision/timm tensors by name) or "isic_jax" (Flax variables).
    origin: "file", "hf-hub", "folder", "isic_jax-workdir" or "isic_jax-export".
    path: the file read (state dict) or the run/export folder.
    tensors: state dict: name -> numpy array as stored. variables: isic_jax: flat
      {("params"|"batch_stats", module, ..., leaf): float32 array}.
    mean, std: the normalisation the weights were trained with, when the source records it.
    class_names: the classes of the source's head, when known (isic_jax sources).
    architecture, width: the source's model, when recorded (timm config.json, isic_jax config).
    details: provenance for the record (revision, step, ema, sha256, ...).
    notes: things said about reading it (a wrapper used, a prefix removed, dtypes cast).
    """

    spec: str
    kind: str
    origin: str
    path: pathlib.Path
    tensors: dict[str, np.ndarray] | None = None
    variables: dict[FlatKey, np.ndarray] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    class_names: list[str] | None = None
    architecture: str | None = None
    width: int | None = None
    details: dict[str, Any] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Pretrained:
    """Weights matched to a model (`load`).

    variables: {"params", "batch_stats"}: nested dicts of float32 numpy arrays, exactly the
      tree `create_model(model_config, num_classes)` initialises.
    head: "kept" (the source's classifier) or "reinitialized"; head_reason says why.
    mean, std: float [3] each on [0, 1]: the normalisation these weights expect; mean_std_from
      says where it comes from.
    ignored: source keys not used, each with the reason ("layer1.0.bn1.num_batches_tracked:
      ...").
    mapped: how many source tensors became variables.
    """

    source: Source
    variables: dict[str, PyTree]
    head: str
    head_reason: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    mean_std_from: str
    ignored: list[str]
    mapped: int

    def record(self) -> dict[str, Any]:
        """JSON-ready provenance (the trainer writes it as init_from.json; exports copy it)."""
        src = self.source
        return {
            "source": src.spec,
            "origin": src.origin,
            "format": "torchvision/timm state dict" if src.kind == "state_dict" else "isic_jax",
            "path": str(src.path),
            **src.details,
            "architecture": src.architecture,
            "tensors_mapped": self.mapped,
            "ignored": self.ignored,
            "head": self.head,
            "head_reason": self.head_reason,
            "mean": [round(float(v), 6) for v in self.mean],
            "std": [round(float(v), 6) for v in self.std],
            "mean_std_from": self.mean_std_from,
            "notes": src.notes,
        }

    def summary(self) -> str:
        """A few lines for the console."""
        src = self.source
        where = str(src.path) if src.spec == str(src.path) else f"{src.spec} ({src.path})"
        kinds = _ignored_kinds(self.ignored)
        lines = [
            f"Initialising from {where}: {self.mapped} tensors mapped"
            + (f", {len(self.ignored)} ignored ({kinds})" if self.ignored else "") + ".",
            f"Head {self.head}: {self.head_reason}.",
            f"Input normalisation mean {_fmt(self.mean)}, std {_fmt(self.std)} "
            f"({self.mean_std_from}).",
        ]
        lines += src.notes
        return "\n  ".join(lines)


# ---------------------------------------------------------------------------------------------
# Public API.


def load_pretrained(
    source: str | os.PathLike,
    model_config: Any,
    num_classes: int,
    *,
    init_head: str = "auto",
    class_names: Sequence[str] | None = None,
    rng: jax.Array | None = None,
) -> dict[str, PyTree]:
    """Variables for `create_model(model_config, num_classes)` from pretrained weights.

    Args:
      source: a `config.model.init_from` value (see the module docstring).
      model_config: `config.model` (name, width; the rest does not shape the variables).
      num_classes: the model's classes.
      init_head: "auto" or "reinit" (see the module docstring).
      class_names: this model's classes in order, when known: an isic_jax source's head is
        kept only when they are its classes.
      rng: PRNG key of a re-initialised head (default PRNGKey(0)).

    Returns:
      {"params": ..., "batch_stats": ...} of float32 jax arrays, ready for
      `model.apply(variables, x, train=False)`.

    Raises:
      PretrainedError: the source is missing or unreadable, or does not fit the model.
    """
    pre = load(source, model_config, num_classes, init_head=init_head,
               class_names=class_names, rng=rng)
    return jax.tree.map(jnp.asarray, pre.variables)


def load(
    source: str | os.PathLike,
    model_config: Any,
    num_classes: int,
    *,
    init_head: str = "auto",
    class_names: Sequence[str] | None = None,
    rng: jax.Array | None = None,
) -> Pretrained:
    """`load_pretrained` with what was done: the variables as host numpy arrays, the head
    decision, the ignored keys, the normalisation and the provenance (see `Pretrained`)."""
    if init_head not in INIT_HEAD_MODES:
        raise PretrainedError(
            f"config.model.init_head must be one of {', '.join(INIT_HEAD_MODES)}, got "
            f"{init_head!r}")
    src = read_source(source)
    expected = expected_shapes(model_config, num_classes)
    if src.kind == "state_dict":
        _check_architecture(src, model_config)
        flat, used, ignored, head, reason = match_state_dict(
            src.tensors or {}, expected, src.path, model_config, num_classes, init_head)
    else:
        _check_isic_model(src, model_config)
        flat, used, ignored, head, reason = match_variables(
            src.variables or {}, expected, src.path, num_classes, init_head,
            src.class_names, list(class_names) if class_names is not None else None)
    if head == "reinitialized":
        flat.update(init_head_variables(expected, rng))
    variables = _unflatten(flat)
    if src.mean is not None and src.std is not None:
        mean, std = src.mean, src.std
        where = ("recorded by the source" if src.kind == "state_dict"
                 else "the source run's")
    else:
        mean, std = tuple(IMAGENET_MEAN.tolist()), tuple(IMAGENET_STD.tolist())
        where = ("ImageNet's: torchvision/timm ResNet weights" if src.kind == "state_dict"
                 else "ImageNet's: the source run predates recorded normalisation")
    return Pretrained(
        source=src, variables=variables, head=head, head_reason=reason,
        mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std),
        mean_std_from=where, ignored=ignored, mapped=used,
    )


# ---------------------------------------------------------------------------------------------
# Reading a source.


def read_source(spec: str | os.PathLike) -> Source:
    """Resolves and reads `config.model.init_from` (see the module docstring).

    Raises:
      PretrainedError: nothing there, an unknown kind of file, or unreadable contents.
    """
    spec = os.fspath(spec)
    if not spec:
        raise PretrainedError("config.model.init_from is empty: nothing to load")
    if spec.startswith(HUB_PREFIX):
        return _read_hub(spec)
    path = pathlib.Path(spec).expanduser()
    if not path.exists():
        raise PretrainedError(
            f"config.model.init_from={spec!r}: {path.absolute()} does not exist (a weights file, "
            f"an isic_jax workdir or export folder, or {HUB_PREFIX}ORG/NAME)")
    path = path.absolute()
    if path.is_dir():
        return _read_folder(spec, path)
    suffix = path.suffix.lower()
    if suffix not in SAFETENSORS_SUFFIXES + TORCH_SUFFIXES:
        raise PretrainedError(
            f"config.model.init_from={spec!r}: {path} is not a file this reads (expected "
            f"{', '.join(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES)}, a folder, or "
            f"{HUB_PREFIX}ORG/NAME)")
    src = Source(spec=spec, kind="state_dict", origin="file", path=path)
    src.tensors = read_state_dict(path, src.notes)
    src.details["sha256"] = _sha256(path)
    _read_sibling_config(src, path.parent / HUB_CONFIG_FILE)
    return src


def read_state_dict(path: str | os.PathLike, notes: list[str] | None = None
                    ) -> dict[str, np.ndarray]:
    """name -> numpy array of a .safetensors or torch file (see the module docstring).

    Raises:
      PretrainedError: unreadable, not a state dict, or torch needed but not installed.
    """
    path = pathlib.Path(path)
    notes = notes if notes is not None else []
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        from safetensors.numpy import load_file

        try:
            tensors = load_file(str(path))
        except Exception as e:  # noqa: BLE001 - safetensors raises several types
            raise PretrainedError(f"{path}: not a readable safetensors file ({_short(e)})") from e
    else:
        tensors = _torch_load(path, notes)
    tensors = _strip_prefix(tensors, "module.", notes)
    if not tensors:
        raise PretrainedError(f"{path} holds no tensors")
    return tensors


def _torch_load(path: pathlib.Path, notes: list[str]) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        target = path.with_suffix(".safetensors")
        raise PretrainedError(
            f"{path} is a PyTorch file: reading it needs torch, which isic_jax does not install "
            f"(pip install torch). Or convert it once where torch is installed and point "
            f"config.model.init_from at the result:\n  python -c \"import torch, "
            f"safetensors.torch as st; st.save_file(torch.load('{path}', weights_only=True), "
            f"'{target}')\"") from e
    try:
        # weights_only: tensors and plain containers only; never code from the file.
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for bad files
        raise PretrainedError(
            f"{path}: torch.load(weights_only=True) could not read it ({_short(e)}). Only plain "
            f"state dicts of tensors are read; nothing in the file is executed.") from e
    obj = _unwrap_state_dict(obj, path, notes, torch)
    out: dict[str, np.ndarray] = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            continue  # listed by _unwrap_state_dict
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.float()  # numpy has no bfloat16; the model's params are float32
        out[str(key)] = value.numpy()
    return out


def _unwrap_state_dict(obj: Any, path: pathlib.Path, notes: list[str], torch: Any
                       ) -> Mapping[str, Any]:
    """The tensor dict inside what torch.load returned (a state dict or a training checkpoint)."""

    def tensor_dict(x: Any) -> bool:
        return isinstance(x, Mapping) and any(isinstance(v, torch.Tensor) for v in x.values())

    if not isinstance(obj, Mapping):
        raise PretrainedError(
            f"{path} holds a {type(obj).__name__}, not a state dict (a dict of tensors)")
    if not tensor_dict(obj):
        for key in _WRAPPER_KEYS:
            if tensor_dict(obj.get(key)):
                notes.append(f"Used the {key!r} entry of {path.name} (a training checkpoint).")
                obj = obj[key]
                break
        else:
            raise PretrainedError(
                f"{path} holds no tensors at its top level nor under "
                f"{', '.join(repr(k) for k in _WRAPPER_KEYS)}; its keys: "
                f"{', '.join(map(str, list(obj)[:_MAX_LISTED]))}")
    others = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if others:
        notes.append(f"Ignored non-tensor entries of {path.name}: {', '.join(others)}.")
    return obj


def _strip_prefix(tensors: dict[str, np.ndarray], prefix: str, notes: list[str]
                  ) -> dict[str, np.ndarray]:
    if tensors and all(k.startswith(prefix) for k in tensors):
        notes.append(f"Removed the {prefix!r} prefix of every key (a DataParallel state dict).")
        return {k[len(prefix):]: v for k, v in tensors.items()}
    return tensors


def _read_hub(spec: str) -> Source:
    repo, _, revision = spec[len(HUB_PREFIX):].partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise PretrainedError(
            f"config.model.init_from={spec!r}: expected {HUB_PREFIX}ORG/NAME[@REVISION]")
    try:
        import huggingface_hub
        from huggingface_hub import hf_hub_download
    except ImportError as e:
        raise PretrainedError(
            f"config.model.init_from={spec!r} needs huggingface_hub (pip install "
            f"huggingface_hub)") from e
    errors: dict[str, str] = {}
    weights = None
    for filename in HUB_WEIGHT_FILES:
        try:
            weights = pathlib.Path(hf_hub_download(repo, filename, revision=revision or None))
            break
        except Exception as e:  # noqa: BLE001 - network, cache and 404 errors alike
            errors[filename] = f"{type(e).__name__}: {_short(e, 200)}"
    if weights is None:
        constants = huggingface_hub.constants
        offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
        found = "; ".join(f"{k}: {v}" for k, v in errors.items())
        raise PretrainedError(
            f"config.model.init_from={spec!r}: neither {' nor '.join(HUB_WEIGHT_FILES)} of "
            f"{repo}{'@' + revision if revision else ''} is in the Hugging Face cache "
            f"{constants.HF_HUB_CACHE} or reachable on the Hub{offline} ({found}). Download it "
            f"where there is network (`hf download {repo}`), copy that cache and point HF_HOME at "
            f"it, or set config.model.init_from to the downloaded weights file.")
    src = Source(spec=spec, kind="state_dict", origin="hf-hub", path=weights)
    src.details.update({"repo": repo, "revision": weights.parent.name,
                        "requested_revision": revision or "main"})
    src.tensors = read_state_dict(weights, src.notes)
    src.details["sha256"] = _sha256(weights)
    try:
        config_path = pathlib.Path(hf_hub_download(repo, HUB_CONFIG_FILE,
                                                   revision=revision or None))
    except Exception:  # noqa: BLE001 - optional: ImageNet normalisation is assumed without it
        src.notes.append(f"No {HUB_CONFIG_FILE} in {repo}: assuming ImageNet normalisation.")
    else:
        _read_sibling_config(src, config_path)
    return src


def _read_sibling_config(src: Source, path: pathlib.Path) -> None:
    """Architecture and mean/std from a timm/Hub config.json next to the weights, if any."""
    if not path.is_file():
        return
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        src.notes.append(f"Ignored {path}: not readable JSON ({_short(e, 120)}).")
        return
    if not isinstance(cfg, dict):
        return
    pre = cfg.get("pretrained_cfg") if isinstance(cfg.get("pretrained_cfg"), dict) else cfg
    mean, std = pre.get("mean"), pre.get("std")
    if _is_triple(mean) and _is_triple(std) and min(std) > 0:
        src.mean, src.std = tuple(map(float, mean)), tuple(map(float, std))
    arch = cfg.get("architecture") or cfg.get("model_type")
    if isinstance(arch, str):
        src.architecture = arch
    src.details["config"] = str(path)


def _read_folder(spec: str, path: pathlib.Path) -> Source:
    if (path / EXPORT_METADATA_FILE).is_file() and (path / EXPORT_VARIABLES_DIR).is_dir():
        return _read_isic_export(spec, path)
    if (path / RUN_CONFIG_FILE).is_file() and (path / RUN_CHECKPOINTS_DIR).is_dir():
        return _read_isic_workdir(spec, path)
    for name in HUB_WEIGHT_FILES:
        if (path / name).is_file():
            src = Source(spec=spec, kind="state_dict", origin="folder", path=path / name)
            src.tensors = read_state_dict(path / name, src.notes)
            src.details["sha256"] = _sha256(path / name)
            _read_sibling_config(src, path / HUB_CONFIG_FILE)
            return src
    raise PretrainedError(
        f"config.model.init_from={spec!r}: {path} is a folder but neither an isic_jax export "
        f"({EXPORT_METADATA_FILE} + {EXPORT_VARIABLES_DIR}/), an isic_jax workdir "
        f"({RUN_CONFIG_FILE} + {RUN_CHECKPOINTS_DIR}/), nor a weights folder "
        f"({' or '.join(HUB_WEIGHT_FILES)})")


def _read_isic_export(spec: str, path: pathlib.Path) -> Source:
    meta_path = path / EXPORT_METADATA_FILE
    try:
        meta = json.loads(meta_path.read_text())
        model = meta["model"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PretrainedError(f"{meta_path}: not an isic_jax model.json ({_short(e)})") from e
    src = Source(spec=spec, kind="isic_jax", origin="isic_jax-export", path=path)
    src.variables = _restore_numpy(path / EXPORT_VARIABLES_DIR, ("params", "batch_stats"))
    src.architecture, src.width = str(model.get("name")), int(model.get("width", 64))
    src.class_names = [str(c) for c in meta.get("class_names", [])] or None
    pre = meta.get("preprocessing", {})
    if _is_triple(pre.get("mean")) and _is_triple(pre.get("std")):
        src.mean, src.std = tuple(pre["mean"]), tuple(pre["std"])
    checkpoint = meta.get("checkpoint", {})
    src.details.update({"step": checkpoint.get("step"), "run": checkpoint.get("workdir"),
                        "ema": bool(meta.get("variables", {}).get("ema", False)),
                        "release": meta.get("release"), "task": meta.get("task")})
    return src


def _read_isic_workdir(spec: str, path: pathlib.Path) -> Source:
    import orbax.checkpoint as ocp

    from isic_jax import config_utils

    try:
        config = json.loads((path / RUN_CONFIG_FILE).read_text())
        model = config["model"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PretrainedError(f"{path / RUN_CONFIG_FILE}: not an isic_jax run config "
                              f"({_short(e)})") from e
    directory = path / RUN_CHECKPOINTS_DIR
    options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
    with ocp.CheckpointManager(directory, options=options) as manager:
        steps = sorted(manager.all_steps())
        if not steps:
            raise PretrainedError(f"{directory} holds no finished checkpoint")
        metric = str(config.get("train", {}).get("best_metric", "auc"))
        best = _best_step(steps, metric, config_utils.best_metric_mode(metric), manager.metrics)
    step = best if best is not None else steps[-1]
    state = directory / str(step) / RUN_STATE_ITEM
    tree = _restore_numpy(state, ("params", "batch_stats", "ema", "swa"))
    ema = {k[1:]: v for k, v in tree.items() if k[0] == "ema"}
    # The weights evaluation uses (TrainState.eval_variables): SWA once it holds a snapshot.
    swa = {k[1:]: v for k, v in tree.items() if k[0] == "swa" and k[1] != "count"}
    use_swa = bool(swa) and int(tree.get(("swa", "count"), 0)) > 0
    use_ema = bool(ema) and not use_swa
    live = {k: v for k, v in tree.items() if k[0] not in ("ema", "swa")}
    variables = swa if use_swa else ema if use_ema else live
    src = Source(spec=spec, kind="isic_jax", origin="isic_jax-workdir", path=path,
                 variables=variables)
    src.architecture, src.width = str(model.get("name")), int(model.get("width", 64))
    src.class_names = _run_class_names(config.get("data", {}))
    data = config.get("data", {})
    if _is_triple(data.get("mean")) and _is_triple(data.get("std")):
        src.mean, src.std = tuple(data["mean"]), tuple(data["std"])
    src.details.update({
        "step": int(step), "checkpoint": "best" if best is not None else "latest",
        "best_metric": metric if best is not None else None, "ema": use_ema, "swa": use_swa,
        "release": data.get("release"), "task": data.get("task"),
    })
    which = f"best by {metric}" if best is not None else "latest: no step has validation metrics"
    src.notes.append(f"Checkpoint step {step} of {path} ({which}; "
                     f"{'SWA' if use_swa else 'EMA' if use_ema else 'live'} weights).")
    return src


def _best_step(steps: list[int], metric: str, mode: str, metrics_of: Any) -> int | None:
    """The step with the best finite `metric` (ties: the later step); None when none has it."""
    best, best_value = None, None
    for step in steps:
        try:
            value = float((metrics_of(step) or {}).get(metric))
        except (TypeError, ValueError):
            continue
        if not np.isfinite(value):
            continue
        better = best_value is None or (value >= best_value if mode == "max"
                                        else value <= best_value)
        if better:
            best, best_value = step, value
    return best


def _run_class_names(data: Mapping[str, Any]) -> list[str] | None:
    from isic_jax.data.isic import labels

    if data.get("task") == "binary":
        return list(labels.LABEL_NAMES)
    return list(labels.DIAGNOSIS_CLASSES.get(str(data.get("release")), [])) or None


def _restore_numpy(path: pathlib.Path, keys: Sequence[str]) -> dict[FlatKey, np.ndarray]:
    """The `keys` subtrees of an Orbax PyTree checkpoint as host numpy arrays (nothing else
    is read: an optimiser state stays on disk), flattened."""
    import orbax.checkpoint as ocp

    try:
        # The item's own metadata (a Checkpointer would also look for a step-level file, which
        # an item of a composite checkpoint does not have, and log about it).
        handler = ocp.StandardCheckpointHandler()
        try:
            metadata = handler.metadata(path)
        finally:
            handler.close()
        tree = getattr(metadata, "tree", metadata)
        item = {k: tree[k] for k in keys if k in tree}
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
        with ocp.PyTreeCheckpointer() as ckptr:
            out = ckptr.restore(path, args=ocp.args.PyTreeRestore(
                item=item, restore_args=restore_args, partial_restore=True))
    except Exception as e:  # noqa: BLE001 - Orbax/TensorStore raise many types
        raise PretrainedError(f"{path}: the checkpoint cannot be read ({_short(e)})") from e
    return {k: np.asarray(v) for k, v in _flatten(out).items()}


# ---------------------------------------------------------------------------------------------
# Matching a source to a model.


def expected_shapes(model_config: Any, num_classes: int) -> dict[FlatKey, tuple[int, ...]]:
    """{("params"|"batch_stats", module, ..., leaf): shape} of the model's variables (traced,
    nothing allocated)."""
    from isic_jax.models import create_model  # the registry imports this module

    model = create_model(model_config, num_classes)
    dummy = jax.ShapeDtypeStruct((1, _TRACE_SIZE, _TRACE_SIZE, 3), jnp.float32)
    shapes = jax.eval_shape(
        lambda x: model.init(jax.random.PRNGKey(0), x, train=False), dummy)
    shapes = {k: shapes[k] for k in ("params", "batch_stats") if k in shapes}
    flat = {k: tuple(v.shape) for k, v in _flatten(shapes).items()}
    return dict(sorted(flat.items(), key=lambda item: _network_order(item[0])))


def _network_order(key: FlatKey) -> tuple:
    """Input to output (stem, stage1 block1, ..., head), params before statistics: the order
    problems are listed in."""
    collection, top, *rest = key
    match = re.fullmatch(r"stage(\d+)_block(\d+)", top)
    if top.startswith("stem"):
        place = (0, 0, 0 if top == "stem_conv" else 1)
    elif match:
        place = (int(match[1]), int(match[2]), 0)
    else:
        place = (1_000, 0, 0)
    return (*place, tuple(rest), collection != "params")


def torch_key(key: FlatKey) -> tuple[str, str]:
    """The torchvision/timm tensor name of a variable, and its layout change.

    Returns:
      (name, kind) with kind "conv" (OIHW -> HWIO), "dense" (transposed) or "same".

    Raises:
      ValueError: a variable the mapping does not know.
    """
    collection, *modules, leaf = key
    top, rest = modules[0], modules[1:]
    if top == "stem_conv":
        prefix = "conv1"
    elif top == "stem_bn":
        prefix = "bn1"
    elif top == "head":
        prefix = "fc"
    else:
        match = re.fullmatch(r"stage(\d+)_block(\d+)", top)
        if not match or len(rest) != 1:
            raise ValueError(f"no torchvision name for {'/'.join(key)}")
        stage, block = int(match[1]), int(match[2]) - 1
        sub = {"proj_conv": "downsample.0", "proj_bn": "downsample.1"}.get(rest[0], rest[0])
        prefix = f"layer{stage}.{block}.{sub}"
    if collection == "batch_stats":
        return f"{prefix}.running_{leaf}", "same"  # mean, var
    if leaf == "kernel":
        return f"{prefix}.weight", "dense" if top == "head" else "conv"
    if leaf == "scale":
        return f"{prefix}.weight", "same"
    return f"{prefix}.{leaf}", "same"  # bias


def _to_flax(array: np.ndarray, kind: str) -> np.ndarray:
    if kind == "conv":
        array = array.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    elif kind == "dense":
        array = array.T  # [out, in] -> [in, out]
    return np.ascontiguousarray(array, dtype=np.float32)


def _torch_shape(shape: tuple[int, ...], kind: str) -> tuple[int, ...]:
    """A Flax shape in the source's layout (for comparisons and messages)."""
    if kind == "conv":
        h, w, i, o = shape
        return (o, i, h, w)
    if kind == "dense":
        return tuple(reversed(shape))
    return shape


def match_state_dict(
    tensors: Mapping[str, np.ndarray],
    expected: Mapping[FlatKey, tuple[int, ...]],
    file: os.PathLike | str,
    model_config: Any,
    num_classes: int,
    init_head: str,
) -> tuple[dict[FlatKey, np.ndarray], int, list[str], str, str]:
    """Maps a torchvision/timm ResNet state dict onto the model's variables.

    Returns:
      (flat float32 variables without the head when it is re-initialised, number of tensors
      mapped, ignored keys with reasons, head "kept"/"reinitialized", why).

    Raises:
      PretrainedError: every missing / unexpected / mis-shaped / unusable tensor, at once.
    """
    head, reason = _head_decision_torch(tensors, expected, num_classes, init_head)
    flat: dict[FlatKey, np.ndarray] = {}
    used: set[str] = set()
    problems: list[str] = []
    for key, shape in expected.items():
        if head == "reinitialized" and key[1] == "head":
            continue
        name, kind = torch_key(key)
        want = _torch_shape(shape, kind)
        where = "/".join(key)
        if name not in tensors:
            problems.append(f"missing {name} {list(want)} (for {where})")
            continue
        used.add(name)
        array = tensors[name]
        if tuple(array.shape) != want:
            problems.append(f"{name}: the file has {list(array.shape)}, this model needs "
                            f"{list(want)} (for {where})")
        elif not np.issubdtype(array.dtype, np.floating) and array.dtype.name != "bfloat16":
            problems.append(f"{name}: dtype {array.dtype}, expected floating point")
        else:
            converted = _to_flax(array, kind)
            if not np.all(np.isfinite(converted)):
                problems.append(f"{name}: has NaN or Inf values")
            flat[key] = converted
    ignored, unexpected = [], []
    for name in tensors:
        if name in used:
            continue
        if name.endswith(_IGNORED_SUFFIXES):
            ignored.append(f"{name}: BatchNorm's step counter (Flax keeps none)")
        elif head == "reinitialized" and name in ("fc.weight", "fc.bias"):
            ignored.append(f"{name}: the head is re-initialised")
        else:
            unexpected.append(name)
    problems += [f"unexpected {name} {list(tensors[name].shape)} (this model has no such "
                 f"tensor)" for name in sorted(unexpected, key=_natural)]
    if problems:
        raise PretrainedError(_mismatch_message(file, model_config, num_classes, problems,
                                                guess_architecture(tensors)))
    return flat, len(used), ignored, head, reason


def _head_decision_torch(tensors: Mapping[str, np.ndarray],
                         expected: Mapping[FlatKey, tuple[int, ...]],
                         num_classes: int, init_head: str) -> tuple[str, str]:
    want = _torch_shape(expected[("params", "head", "kernel")], "dense")  # [C, F]
    weight = tensors.get("fc.weight")
    if init_head == "reinit":
        return "reinitialized", "config.model.init_head=reinit"
    if weight is None:
        return "reinitialized", "the source has no classifier (fc.weight)"
    if tuple(weight.shape) == want and "fc.bias" in tensors:
        return "kept", f"the source classifier has this model's {num_classes} outputs"
    if weight.ndim == 2 and weight.shape[1] == want[1]:
        return "reinitialized", (f"the source classifier has {weight.shape[0]} outputs, this "
                                 f"model {num_classes}")
    return "kept", "checked with the other tensors"  # a feature-size mismatch: reported there


def match_variables(
    source: Mapping[FlatKey, np.ndarray],
    expected: Mapping[FlatKey, tuple[int, ...]],
    path: os.PathLike | str,
    num_classes: int,
    init_head: str,
    source_classes: list[str] | None,
    classes: list[str] | None,
) -> tuple[dict[FlatKey, np.ndarray], int, list[str], str, str]:
    """Like `match_state_dict` for the variables of an isic_jax run or export (same names)."""
    head_kernel = source.get(("params", "head", "kernel"))
    want = expected[("params", "head", "kernel")]
    if init_head == "reinit":
        head, reason = "reinitialized", "config.model.init_head=reinit"
    elif head_kernel is None:
        head, reason = "reinitialized", "the source has no head"
    elif tuple(head_kernel.shape) != want:
        head = "reinitialized" if head_kernel.shape[0] == want[0] else "kept"
        reason = (f"the source head has {head_kernel.shape[-1]} classes"
                  + (f" ({', '.join(source_classes)})" if source_classes else "")
                  + f", this model {num_classes}")
    elif source_classes and classes and list(source_classes) != list(classes):
        head, reason = "reinitialized", (f"the source classes ({', '.join(source_classes)}) "
                                         f"are not this model's ({', '.join(classes)})")
    else:
        same = f" ({', '.join(classes)})" if source_classes and classes else ""
        head, reason = "kept", f"the source head has this model's {num_classes} classes{same}"
    flat: dict[FlatKey, np.ndarray] = {}
    problems: list[str] = []
    used = 0
    for key, shape in expected.items():
        if head == "reinitialized" and key[1] == "head":
            continue
        name = "/".join(key)
        if key not in source:
            problems.append(f"missing {name} {list(shape)}")
            continue
        used += 1
        array = source[key]
        if tuple(array.shape) != shape:
            problems.append(f"{name}: the source has {list(array.shape)}, this model needs "
                            f"{list(shape)}")
        else:
            converted = np.ascontiguousarray(array, np.float32)
            if not np.all(np.isfinite(converted)):
                problems.append(f"{name}: has NaN or Inf values")
            flat[key] = converted
    ignored = []
    for key in source:
        if key in expected and not (head == "reinitialized" and key[1] == "head"):
            continue
        if head == "reinitialized" and key[1] == "head":
            ignored.append(f"{'/'.join(key)}: the head is re-initialised")
        else:
            problems.append(f"unexpected {'/'.join(key)} {list(source[key].shape)}")
    if problems:
        raise PretrainedError(_mismatch_message(path, None, num_classes, problems, None))
    return flat, used, ignored, head, reason


def _check_architecture(src: Source, model_config: Any) -> None:
    """A Hub/timm config.json naming another architecture: a clear error before the keys."""
    arch = src.architecture
    if not arch:
        return
    base = arch.split(".")[0]
    if base not in TORCH_ARCHITECTURES:
        raise PretrainedError(
            f"{src.spec}: {src.details.get('config', 'its config.json')} names the architecture "
            f"{arch!r}; this loader maps the plain torchvision/timm ResNets "
            f"({', '.join(TORCH_ARCHITECTURES)}) onto isic_jax's ResNet (ResNet-D / SE / "
            f"ResNeXt variants have other layers)")
    if base != model_config.name:
        raise PretrainedError(
            f"{src.spec} is a {base}; this config builds {model_config.name}: set "
            f"--config.model.name={base} (and --config.model.width=64)")


def _check_isic_model(src: Source, model_config: Any) -> None:
    width = int(getattr(model_config, "width", 64))
    if (src.architecture, src.width) != (model_config.name, width):
        raise PretrainedError(
            f"{src.path} holds a {src.architecture} of width {src.width}; this config builds "
            f"{model_config.name} of width {width}: set --config.model.name={src.architecture} "
            f"--config.model.width={src.width}, or train from other weights")


def init_head_variables(expected: Mapping[FlatKey, tuple[int, ...]],
                        rng: jax.Array | None) -> dict[FlatKey, np.ndarray]:
    """A fresh head, initialised as `ResNet`'s `nn.Dense` head is from scratch."""
    import flax.linen as nn

    features, classes = expected[("params", "head", "kernel")]
    rng = jax.random.PRNGKey(0) if rng is None else rng
    head = nn.Dense(classes, dtype=jnp.float32, param_dtype=jnp.float32)
    params = head.init(rng, jnp.zeros((1, features), jnp.float32))["params"]
    return {("params", "head", k): np.asarray(v, np.float32) for k, v in params.items()}


def guess_architecture(tensors: Mapping[str, np.ndarray]) -> str | None:
    """What a state dict looks like, for error messages: "a resnet50 (bottleneck blocks
    3-4-6-3, width 64)", a ResNet-D deep stem, or None when it is no torchvision ResNet."""
    if "conv1.0.weight" in tensors:
        return ("a ResNet with a deep stem (conv1.0/1/3/4/6: timm's resnet*d / ResNet-D), "
                "which isic_jax's ResNet does not implement")
    stem = tensors.get("conv1.weight")
    if stem is None or stem.ndim != 4:
        first = ", ".join(list(tensors)[:5])
        return f"no torchvision/timm ResNet (its first keys: {first})"
    sizes = []
    while True:
        prefix = f"layer{len(sizes) + 1}."
        blocks = {k[len(prefix):].split(".")[0] for k in tensors if k.startswith(prefix)}
        if not blocks:
            break
        sizes.append(len(blocks))
    bottleneck = "layer1.0.conv3.weight" in tensors
    width = int(stem.shape[0])
    name = next((n for n, (block, s) in ARCHITECTURES.items()
                 if tuple(s) == tuple(sizes) and (block is BottleneckBlock) == bottleneck), None)
    kind = "bottleneck" if bottleneck else "basic"
    layout = f"{kind} blocks {'-'.join(map(str, sizes))}, width {width}"
    if name is None:
        return f"a ResNet-like network ({layout}) that matches no isic_jax architecture"
    return f"a {name} ({layout}): set --config.model.name={name} --config.model.width={width}"


def _mismatch_message(file: Any, model_config: Any, num_classes: int, problems: list[str],
                      guess: str | None) -> str:
    """The problems grouped (shape/value, missing, unexpected), up to _MAX_LISTED of each."""
    groups: dict[str, list[str]] = {"of another shape or unusable": [], "missing": [],
                                    "unexpected": []}
    for line in problems:
        kind = line.split(" ", 1)[0]
        groups[kind if kind in ("missing", "unexpected") else "of another shape or unusable"
               ].append(line)
    what = (f"config.model.name={model_config.name}, width="
            f"{int(getattr(model_config, 'width', 64))}, " if model_config is not None else "")
    text = f"{file} does not fit this model ({what}{num_classes} classes):"
    for title, lines in groups.items():
        if not lines:
            continue
        shown = lines[:_MAX_LISTED]
        if len(lines) > _MAX_LISTED:
            shown.append(f"... and {len(lines) - _MAX_LISTED} more")
        text += f"\n {len(lines)} tensor(s) {title}:\n  " + "\n  ".join(shown)
    if guess:
        text += f"\nThe file looks like {guess}."
    return text


# ---------------------------------------------------------------------------------------------
# Small helpers.


def _flatten(tree: Mapping[str, Any], prefix: FlatKey = ()) -> dict[FlatKey, Any]:
    out: dict[FlatKey, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, (*prefix, str(key))))
        else:
            out[(*prefix, str(key))] = value
    return out


def _unflatten(flat: Mapping[FlatKey, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"params": {}, "batch_stats": {}}
    for key, value in sorted(flat.items()):
        node = out
        for part in key[:-1]:
            node = node.setdefault(part, {})
        node[key[-1]] = value
    return out


def _natural(name: str) -> tuple:
    """"layer1.10.conv1" after "layer1.2.conv1"."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


def _is_triple(v: Any) -> bool:
    return (isinstance(v, (list, tuple)) and len(v) == 3
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v))


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _short(error: BaseException, limit: int = 300) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[:limit] + " ..."


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def _ignored_kinds(ignored: list[str]) -> str:
    kinds: dict[str, int] = {}
    for line in ignored:
        reason = line.split(": ", 1)[-1]
        kinds[reason] = kinds.get(reason, 0) + 1
    return "; ".join(f"{n} x {reason}" for reason, n in kinds.items())
