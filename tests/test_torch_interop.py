"""The weight mapping against the real torchvision and timm ResNets: same logits in eval mode.

Needs torch, torchvision and timm (`pip install -e ".[interop]"`, several GB): skipped without
them, except where ISIC_JAX_REQUIRE_TORCH=1 (the Python 3.11 pass of .ci/run) makes them
mandatory; the Python 3.12 pass deselects them (`-m "not torch_interop"`).
"""

from __future__ import annotations

import functools
import json
import pathlib

import jax
import numpy as np
import pytest
from conftest import require_module
from pretrained_helpers import model_config, write_hub_cache

from isic_jax.models import PretrainedError, create_model
from isic_jax.training import weight_sources
from isic_jax.training.weight_sources import load_pretrained

pytestmark = pytest.mark.torch_interop

NUM_CLASSES = 10
SIZE = 72  # >= 65 px: smaller inputs hit a slow XLA:CPU path (models/resnet.py)
RTOL = 1e-4  # max |jax - torch| / max |torch| over the logits


@pytest.fixture(scope="module")
def torch():
    torch = require_module("torch")
    require_module("torchvision")
    require_module("timm")
    torch.manual_seed(0)
    return torch


def _randomise_batchnorm(torch, module, seed: int) -> None:
    """Running statistics and affine parameters far from their defaults, so that a wrong
    mapping of any of them changes the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
                m.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=gen))
                m.weight.copy_(0.5 + torch.rand(n, generator=gen))
                m.bias.copy_(0.4 * torch.rand(n, generator=gen) - 0.2)
                m.num_batches_tracked.fill_(11)


def _torch_model(torch, library: str, arch: str, seed: int = 0):
    torch.manual_seed(seed)
    if library == "torchvision":
        import torchvision

        model = getattr(torchvision.models, arch)(weights=None, num_classes=NUM_CLASSES)
    else:
        import timm

        model = timm.create_model(arch, pretrained=False, num_classes=NUM_CLASSES)
    _randomise_batchnorm(torch, model, seed)
    return model.eval()


@functools.cache
def _apply(arch: str):
    return jax.jit(functools.partial(create_model(model_config(arch, 64), NUM_CLASSES).apply,
                                     train=False))


def _inputs(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(2, 3, SIZE, SIZE)).astype(np.float32)


def _relative_error(torch, model, variables, arch: str) -> float:
    x = _inputs()
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    got = np.asarray(_apply(arch)(variables, x.transpose(0, 2, 3, 1)))  # NCHW -> NHWC
    return float(np.max(np.abs(got - expected)) / np.max(np.abs(expected)))


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50"])
@pytest.mark.parametrize("library", ["torchvision", "timm"])
def test_logits_equal_torch_from_safetensors_and_pth(torch, library, arch, tmp_path) -> None:
    from safetensors.torch import save_file

    model = _torch_model(torch, library, arch)
    state = model.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "w.safetensors")
    torch.save(state, tmp_path / "w.pth")
    for name in ("w.safetensors", "w.pth"):
        pre = weight_sources.load(tmp_path / name, model_config(arch, 64), NUM_CLASSES)
        assert pre.head == "kept"
        assert pre.mapped + len(pre.ignored) == len(state)  # every tensor used or ignored
        assert all(k.endswith("num_batches_tracked: BatchNorm's step counter (Flax keeps none)")
                   for k in pre.ignored)
        error = _relative_error(torch, model, pre.variables, arch)
        assert error < RTOL, f"{library} {arch} from {name}: relative error {error:.2e}"


def test_hub_cache_of_a_timm_model_offline(torch, tmp_path, monkeypatch) -> None:
    """What timm pushes to the Hub (`save_for_hf`: model.safetensors + config.json), read back
    from a Hugging Face cache with the Hub offline; a repository holding only
    pytorch_model.bin is read with torch."""
    import huggingface_hub
    from timm.models import _hub

    model = _torch_model(torch, "timm", "resnet18", seed=3)
    saved = tmp_path / "saved"
    _hub.save_for_hf(model, str(saved), safe_serialization=True)
    files = {p.name: p.read_bytes() for p in saved.iterdir()}
    write_hub_cache(tmp_path / "hf", "timm/resnet18.interop", files)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    write_hub_cache(tmp_path / "hf", "someone/resnet18-bin",
                    {"pytorch_model.bin": (tmp_path / "pytorch_model.bin").read_bytes()})
    # huggingface_hub reads HF_HOME/HF_HUB_OFFLINE at import (timm imported it already); its
    # constants are read at call time (tests/test_pretrained.py covers the variables).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for spec in ("hf-hub:timm/resnet18.interop", "hf-hub:someone/resnet18-bin"):
        pre = weight_sources.load(spec, model_config("resnet18", 64), NUM_CLASSES)
        assert pre.source.origin == "hf-hub"
        assert _relative_error(torch, model, pre.variables, "resnet18") < RTOL
    config = json.loads(files["config.json"])
    pre = weight_sources.load("hf-hub:timm/resnet18.interop", model_config("resnet18", 64), 2)
    assert pre.mean == tuple(config["pretrained_cfg"]["mean"])
    assert pre.source.architecture == "resnet18" and pre.head == "reinitialized"


def test_resnet_d_and_wrapped_checkpoints(torch, tmp_path) -> None:
    import timm

    resnet_d = timm.create_model("resnet18d", pretrained=False, num_classes=NUM_CLASSES)
    torch.save(resnet_d.state_dict(), tmp_path / "r18d.pth")
    with pytest.raises(PretrainedError, match="deep stem") as info:
        weight_sources.load(tmp_path / "r18d.pth", model_config("resnet18", 64), NUM_CLASSES)
    assert "missing conv1.weight [64, 3, 7, 7]" in str(info.value)
    assert "unexpected conv1.0.weight [32, 3, 3, 3]" in str(info.value)

    # A training checkpoint of a DataParallel model: the state dict under "state_dict", keys
    # prefixed with "module.", next to non-tensor entries.
    model = _torch_model(torch, "torchvision", "resnet18", seed=5)
    wrapped = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in
                                          model.state_dict().items()}}
    torch.save(wrapped, tmp_path / "checkpoint.pt")
    pre = weight_sources.load(tmp_path / "checkpoint.pt", model_config("resnet18", 64), NUM_CLASSES)
    assert any("'state_dict' entry" in note for note in pre.source.notes)
    assert any("'module.' prefix" in note for note in pre.source.notes)
    assert _relative_error(torch, model, pre.variables, "resnet18") < RTOL
    # load_pretrained gives the same numbers as jax arrays.
    variables = load_pretrained(tmp_path / "checkpoint.pt", model_config("resnet18", 64),
                                NUM_CLASSES)
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(pre.variables), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)


class _Payload:
    """Unpickling this would create `marker`: torch.load(weights_only=True) must refuse."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_pickled_code_is_never_run(torch, tmp_path) -> None:
    marker = tmp_path / "executed"
    torch.save({"conv1.weight": torch.zeros(1), "x": _Payload(marker)}, tmp_path / "evil.pth")
    with pytest.raises(PretrainedError, match="weights_only=True"):
        weight_sources.load(tmp_path / "evil.pth", model_config("resnet18", 64), NUM_CLASSES)
    assert not marker.exists()
