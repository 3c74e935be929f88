"""EfficientNet, ConvNeXt and ViT against the real timm modules: a timm state dict saved as
safetensors, loaded through the project's loader, gives timm's logits in eval mode.

timm's modules get random weights with non-trivial normalisation (BatchNorm running statistics
and affine parameters, LayerNorm affine parameters, ConvNeXt's layer scale, ViT's class token),
so that a wrong mapping of any of them changes the logits.

Needs torch and timm (the interop extra; see tests/test_torch_interop.py for the skip logic).
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
from conftest import require_module
from pretrained_helpers import model_config

from isic_jax.models import PretrainedError, create_model
from isic_jax.training import weight_sources

pytestmark = pytest.mark.torch_interop

NUM_CLASSES = 10
RTOL = 1e-4  # max |jax - torch| / max |torch| over the logits


@pytest.fixture(scope="module")
def torch():
    torch = require_module("torch")
    require_module("timm")
    torch.manual_seed(0)
    return torch


def _randomise(torch, module, seed: int) -> None:
    """Normalisation statistics/affine parameters, layer scales and the class token far from
    their initial values."""
    gen = torch.Generator().manual_seed(seed)

    def rand(n):
        return torch.rand(n, generator=gen)

    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(rand(n) - 0.5)
                m.running_var.copy_(0.5 + 1.5 * rand(n))
                m.num_batches_tracked.fill_(11)
            if isinstance(m, torch.nn.BatchNorm2d | torch.nn.LayerNorm):
                n = m.weight.numel()
                m.weight.copy_(0.5 + rand(n))
                m.bias.copy_(0.4 * rand(n) - 0.2)
        for name, p in module.named_parameters():
            if name.endswith("gamma"):  # ConvNeXt layer scale (1e-6 at init)
                p.copy_(0.5 + rand(p.numel()))
            elif name == "cls_token":
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


def _timm(torch, arch: str, seed: int = 0, **kwargs):
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, num_classes=NUM_CLASSES, **kwargs)
    _randomise(torch, model, seed)
    return model.eval()


def _save(torch, model, path):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return path


@functools.cache
def _apply(arch: str):
    return jax.jit(functools.partial(create_model(model_config(arch), NUM_CLASSES).apply,
                                     train=False))


def _relative_error(torch, model, variables, arch: str, size: int, seed: int = 0) -> float:
    x = np.random.default_rng(seed).normal(size=(2, 3, size, size)).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    got = np.asarray(_apply(arch)(variables, x.transpose(0, 2, 3, 1)))  # NCHW -> NHWC
    return float(np.max(np.abs(got - expected)) / np.max(np.abs(expected)))


@pytest.mark.parametrize("arch, size", [
    ("efficientnet_b0", 72),
    ("tf_efficientnet_b0", 67),  # odd sizes: TF "SAME" pads asymmetrically at every stride 2
    ("convnext_tiny", 64),
    ("vit_tiny_patch16_224", 64),  # timm built at 64 px: a 4x4 position grid
])
def test_logits_equal_timm(torch, arch, size, tmp_path) -> None:
    kwargs = {"img_size": size} if arch.startswith("vit") else {}
    model = _timm(torch, arch, **kwargs)
    state = model.state_dict()
    pre = weight_sources.load(_save(torch, model, tmp_path / "w.safetensors"),
                              model_config(arch), NUM_CLASSES, image_size=size)
    assert pre.head == "kept"
    assert pre.mapped + len(pre.ignored) == len(state)  # every tensor used or ignored
    assert all(k.endswith("BatchNorm's step counter (Flax keeps none)") for k in pre.ignored)
    error = _relative_error(torch, model, pre.variables, arch, size)
    assert error < RTOL, f"{arch} at {size} px: relative error {error:.2e}"


def test_tf_port_padding_differs_from_timm_native(torch, tmp_path) -> None:
    """The same tensors through efficientnet_b0 (symmetric padding, eps 1e-5) do not give the
    tf_ port's logits: the two variants are not interchangeable."""
    model = _timm(torch, "tf_efficientnet_b0", seed=1)
    path = _save(torch, model, tmp_path / "tf.safetensors")
    pre = weight_sources.load(path, model_config("efficientnet_b0"), NUM_CLASSES, image_size=72)
    assert _relative_error(torch, model, pre.variables, "efficientnet_b0", 72) > 10 * RTOL


def test_vit_position_embedding_resampled_as_timm(torch, tmp_path) -> None:
    """Weights at 224 px (14x14 grid) loaded for 64 px (4x4) and 384 px (24x24): the same logits
    as timm's own model at that size with timm's `resample_abs_pos_embed` of the weights."""
    from timm.layers import resample_abs_pos_embed

    source = _timm(torch, "vit_tiny_patch16_224", seed=2)
    path = _save(torch, source, tmp_path / "vit224.safetensors")
    for size in (64, 384):
        target = _timm(torch, "vit_tiny_patch16_224", seed=2, img_size=size)
        state = dict(source.state_dict())
        grid = size // 16
        state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], [grid, grid],
                                                    num_prefix_tokens=1)
        target.load_state_dict(state)
        pre = weight_sources.load(path, model_config("vit_tiny_patch16_224"), NUM_CLASSES,
                                  image_size=size)
        assert any("Resized pos_embed from [1, 197, 192]" in note for note in pre.source.notes)
        # The embedding itself, and the logits.
        np.testing.assert_allclose(pre.variables["params"]["stem_embed"]["pos_embed"],
                                   state["pos_embed"].numpy(), rtol=0, atol=2e-6)
        if size == 64:  # 384 px: a ViT-Ti forward at 577 tokens is slow for a unit test
            error = _relative_error(torch, target, pre.variables, "vit_tiny_patch16_224", size)
            assert error < RTOL, f"vit at {size} px from 224 px weights: {error:.2e}"


def test_weights_of_another_family_or_size_fail_with_both_names(torch, tmp_path) -> None:
    convnext = _save(torch, _timm(torch, "convnext_tiny"), tmp_path / "convnext.safetensors")
    with pytest.raises(PretrainedError) as info:
        weight_sources.load(convnext, model_config("efficientnet_b0"), NUM_CLASSES)
    message = str(info.value)
    assert "convnext.safetensors holds convnext weights, not efficientnet weights" in message
    assert "a convnext_tiny (depths 3-3-9-3, dims 96-192-384-768)" in message
    assert "missing conv_stem.weight [32, 3, 3, 3]" in message

    b0 = _save(torch, _timm(torch, "efficientnet_b0"), tmp_path / "b0.safetensors")
    with pytest.raises(PretrainedError) as info:
        weight_sources.load(b0, model_config("efficientnet_b3"), NUM_CLASSES)
    message = str(info.value)
    # Mismatches listed in network order (the stem first), each with both shapes.
    assert message.split("\n")[2].strip() == (
        "bn1.bias: the file has [32], this model needs [40] (for params/stem_bn/bias)"), message
    assert ("conv_stem.weight: the file has [32, 3, 3, 3], this model needs [40, 3, 3, 3] "
            "(for params/stem_conv/kernel)") in message
    assert "an efficientnet_b0 or tf_efficientnet_b0" in message

    vit_s = _save(torch, _timm(torch, "vit_small_patch16_224"), tmp_path / "vit_s.safetensors")
    with pytest.raises(PretrainedError, match=r"set --config.model.name=vit_small_patch16_224 or "
                                              r"vit_small_patch16_384"):
        weight_sources.load(vit_s, model_config("vit_tiny_patch16_224"), NUM_CLASSES)
