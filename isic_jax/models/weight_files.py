"""Reading pretrained weights from files: torchvision/timm state dicts and the Hugging Face Hub.

    src = read_weights_file("resnet50.safetensors")        # -> Source (tensors by torch name)
    src = read_hub("hf-hub:timm/efficientnet_b0.ra_in1k")  # the Hub cache, offline too

- `FILE.safetensors`: a timm or torchvision state dict, read with `safetensors` (no torch).
- `FILE.pth` / `.pt` / `.bin`: the same as a torch file, read with `torch.load(weights_only=True)`
  (tensors only: no code is unpickled) when torch is installed; without torch the error says how
  to convert it to safetensors once. Wrapped checkpoints ({"state_dict": ...}, {"model": ...})
  and DataParallel's "module." prefix are taken as they come.
- `hf-hub:ORG/NAME[@REVISION]`: a Hub repository in timm's layout (model.safetensors, else
  pytorch_model.bin, and config.json) through `huggingface_hub.hf_hub_download`, which honours
  HF_HOME / HF_HUB_CACHE and HF_HUB_OFFLINE=1: a populated cache works without network.
- a folder holding model.safetensors or pytorch_model.bin (+ config.json): a Hub snapshot, or
  what `save_pretrained` writes.

A timm config.json next to the weights gives the architecture and the normalisation
("pretrained_cfg": mean, std). Matching the tensors to a model is `models.weight_mapping`'s job;
this project's own runs and exports as sources are read by `training.weight_sources`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np

HUB_PREFIX = "hf-hub:"
SAFETENSORS_SUFFIXES: tuple[str, ...] = (".safetensors",)
TORCH_SUFFIXES: tuple[str, ...] = (".pth", ".pt", ".bin")
HUB_WEIGHT_FILES: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin")
HUB_CONFIG_FILE = "config.json"
# Wrappers of a state dict in training checkpoints, tried in this order.
_WRAPPER_KEYS = ("state_dict", "model", "module", "state_dict_ema", "model_ema")
MAX_LISTED = 8

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
    ignored: what the reader dropped before matching, each with the reason (a self-supervised
      pretrain's projector and predictor); `Pretrained.ignored` lists them first.
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
    ignored: list[str] = dataclasses.field(default_factory=list)


def read_weights_file(spec: str, path: pathlib.Path) -> Source:
    """A .safetensors or torch state-dict file (and a config.json beside it, if any).

    Raises:
      PretrainedError: not a weights file, or unreadable.
    """
    suffix = path.suffix.lower()
    if suffix not in SAFETENSORS_SUFFIXES + TORCH_SUFFIXES:
        raise PretrainedError(
            f"config.model.init_from={spec!r}: {path} is not a file this reads (expected "
            f"{', '.join(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES)}, a folder, or "
            f"{HUB_PREFIX}ORG/NAME)")
    src = Source(spec=spec, kind="state_dict", origin="file", path=path)
    src.tensors = read_state_dict(path, src.notes)
    src.details["sha256"] = sha256(path)
    read_sibling_config(src, path.parent / HUB_CONFIG_FILE)
    return src


def read_weights_folder(spec: str, path: pathlib.Path) -> Source | None:
    """A Hub snapshot or `save_pretrained` folder (model.safetensors or pytorch_model.bin, and
    config.json), or None when the folder holds neither weights file."""
    for name in HUB_WEIGHT_FILES:
        if (path / name).is_file():
            src = Source(spec=spec, kind="state_dict", origin="folder", path=path / name)
            src.tensors = read_state_dict(path / name, src.notes)
            src.details["sha256"] = sha256(path / name)
            read_sibling_config(src, path / HUB_CONFIG_FILE)
            return src
    return None


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
            raise PretrainedError(f"{path}: not a readable safetensors file ({short(e)})") from e
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
            f"{path}: torch.load(weights_only=True) could not read it ({short(e)}). Only plain "
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
                f"{', '.join(map(str, list(obj)[:MAX_LISTED]))}")
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


def read_hub(spec: str) -> Source:
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
            errors[filename] = f"{type(e).__name__}: {short(e, 200)}"
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
    src.details["sha256"] = sha256(weights)
    try:
        config_path = pathlib.Path(hf_hub_download(repo, HUB_CONFIG_FILE,
                                                   revision=revision or None))
    except Exception:  # noqa: BLE001 - optional: ImageNet normalisation is assumed without it
        src.notes.append(f"No {HUB_CONFIG_FILE} in {repo}: assuming ImageNet normalisation.")
    else:
        read_sibling_config(src, config_path)
    return src


def read_sibling_config(src: Source, path: pathlib.Path) -> None:
    """Architecture and mean/std from a timm/Hub config.json next to the weights, if any."""
    if not path.is_file():
        return
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        src.notes.append(f"Ignored {path}: not readable JSON ({short(e, 120)}).")
        return
    if not isinstance(cfg, dict):
        return
    pre = cfg.get("pretrained_cfg") if isinstance(cfg.get("pretrained_cfg"), dict) else cfg
    mean, std = pre.get("mean"), pre.get("std")
    if is_triple(mean) and is_triple(std) and min(std) > 0:
        src.mean, src.std = tuple(map(float, mean)), tuple(map(float, std))
    arch = cfg.get("architecture") or cfg.get("model_type")
    if isinstance(arch, str):
        src.architecture = arch
    src.details["config"] = str(path)


def is_triple(v: Any) -> bool:
    return (isinstance(v, (list, tuple)) and len(v) == 3
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v))


def sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def short(error: BaseException, limit: int = 300) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[:limit] + " ..."
