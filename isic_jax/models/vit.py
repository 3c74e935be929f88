"""Vision Transformer (Dosovitskiy et al. 2021) in timm's layout: `vit_{tiny,small,base}_patch16_
{224,384}`.

timm's `VisionTransformer` with its defaults: 16x16 patches embedded by a strided convolution,
a class token, learned position embeddings over [class token, patches] (added after the
concatenation), pre-norm blocks (LayerNorm eps 1e-6 -> multi-head self-attention with a fused
qkv projection with bias -> residual; LayerNorm -> MLP 4x with exact GELU -> residual), a final
LayerNorm, the class token's features. No BatchNorm: the model has no `batch_stats`.

The `_224` and `_384` names are one architecture each: the position embedding's grid is
(image side / 16)^2, taken from the input the model is initialised with (so
`config.data.image_size` sets it; it must be a multiple of 16). Pretrained weights of another
grid are resampled bicubically (antialiased, as `timm.layers.resample_abs_pos_embed`; the class
token's entry kept) when they are loaded (`resample_pos_embed`).

Stochastic depth (`config.model.drop_path`): linspace(0, rate, depth) over the blocks, on both
residual branches of a block, as timm.

Top-level modules (timm names):
    stem_embed                  patch_embed.proj, cls_token, pos_embed
    block{i}                    blocks.{i-1} (norm1, attn.qkv, attn.proj, norm2, mlp.fc1,
                                mlp.fc2)
    final_norm, head            norm, head
Parts: stem, block1 ... block{depth}, final: layer-wise learning-rate decay
(`config.finetune.layer_decay`) runs over the blocks. Grad-CAM reads `cam_tokens`: the patch
tokens entering the last block, as a [B, h, w, D] grid (the class token's output does not depend
on the patch tokens after the last block, so their gradient there would be zero).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from isic_jax.models import layers
from isic_jax.models.classifier import Classifier
from isic_jax.models.registry import Family, FlatKey, WeightLayout, register

VIT_MEAN_STD = (0.5, 0.5, 0.5)  # timm's default normalisation of its ViT weights (augreg)


class PatchEmbed(nn.Module):
    """Patches -> tokens: `proj` (a patch x patch convolution with stride patch), the class
    token prepended, the position embedding added.

    x: [B, H, W, 3] -> [B, 1 + (H / patch) * (W / patch), dim]. The position embedding
    [1, 1 + grid, dim] is sized by the input the module is initialised with.
    """

    patch: int
    dim: int
    conv: Callable[..., nn.Conv]

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv(self.dim, (self.patch, self.patch), self.patch, padding=0, name="proj")(x)
        b, h, w, d = x.shape
        cls = self.param("cls_token", nn.initializers.normal(1e-6), (1, 1, d), jnp.float32)
        pos = self.param("pos_embed", layers.trunc_normal, (1, 1 + h * w, d), jnp.float32)
        tokens = jnp.concatenate(
            [jnp.broadcast_to(cls.astype(x.dtype), (b, 1, d)), x.reshape(b, h * w, d)], axis=1)
        return tokens + pos.astype(x.dtype)


class Attention(nn.Module):
    """Multi-head self-attention with timm's fused `qkv` ([q | k | v], each heads x head_dim)
    and `proj`. x: [B, N, D] -> [B, N, D]; softmax in float32."""

    heads: int
    dense: Callable[..., nn.Dense]

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, d = x.shape
        head_dim = d // self.heads
        qkv = self.dense(3 * d, name="qkv")(x).reshape(b, n, 3, self.heads, head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, N, heads, head_dim]
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * jnp.asarray(head_dim ** -0.5, q.dtype)
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, n, d)
        return self.dense(d, name="proj")(out)


class Block(nn.Module):
    """timm's pre-norm transformer `Block`. x: [B, N, D] -> [B, N, D]."""

    heads: int
    dense: Callable[..., nn.Dense]
    norm: Callable[..., nn.LayerNorm]
    drop_path: float = 0.0
    train: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = Attention(self.heads, self.dense, name="attn")(self.norm(name="norm1")(x))
        x = x + layers.drop_path(self, y, self.drop_path, self.train)
        y = layers.Mlp(4 * x.shape[-1], self.dense, name="mlp")(self.norm(name="norm2")(x))
        return x + layers.drop_path(self, y, self.drop_path, self.train)


class VisionTransformer(Classifier, kw_only=True):
    """ViT under the shared `Classifier` head (see the module docstring).

    Attributes (besides `Classifier`'s):
      patch: patch side, px (16).
      dim: token width (192 tiny, 384 small, 768 base).
      depth: blocks (12).
      heads: attention heads (3, 6, 12).
      drop_path: stochastic depth rate of the last block (0: off).
    """

    patch: int = 16
    dim: int = 384
    depth: int = 12
    heads: int = 6
    drop_path: float = 0.0

    def parts(self) -> tuple[str, ...]:
        return ("stem", *(f"block{i + 1}" for i in range(self.depth)), "final")

    def cam_layer(self, params: Any) -> str:
        return "cam_tokens"

    def features(self, x: jax.Array, train: bool) -> jax.Array:
        """x: float32 [B, H, W, 3] (H, W multiples of `patch`) -> the class token after the
        final LayerNorm, float32 [B, dim]."""
        b, height, width, _ = x.shape
        if height % self.patch or width % self.patch:
            raise ValueError(f"a ViT with {self.patch} px patches needs an image side that is a "
                             f"multiple of {self.patch} (config.data.image_size), got "
                             f"{height}x{width}")
        h, w = height // self.patch, width // self.patch
        dense = layers.dense(self, kernel_init=layers.trunc_normal)
        norm = layers.layer_norm(self.dtype)
        conv = layers.conv(self, use_bias=True, kernel_init=nn.initializers.lecun_normal())
        tokens = PatchEmbed(self.patch, self.dim, conv, name="stem_embed")(x)
        rates = layers.drop_path_rates(self.drop_path, self.depth)
        for i in range(self.depth):
            if i == self.depth - 1:
                grid = layers.Tap(name="cam_tokens")(tokens[:, 1:].reshape(b, h, w, self.dim))
                tokens = jnp.concatenate([tokens[:, :1], grid.reshape(b, h * w, self.dim)], 1)
            tokens = Block(self.heads, dense, norm, drop_path=rates[i], train=train,
                           name=f"block{i + 1}")(tokens)
        cls = tokens[:, 0].astype(jnp.float32)
        return layers.layer_norm(jnp.float32)(name="final_norm")(cls)


_SIZES = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12)}
ARCHITECTURES: dict[str, dict[str, Any]] = {
    f"vit_{size}_patch16_{px}": {"patch": 16, "dim": dim, "depth": 12, "heads": heads}
    for size, (dim, heads) in _SIZES.items() for px in (224, 384)
}
# For tests and smoke runs (no timm counterpart).
ARCHITECTURES["vit_test"] = {"patch": 16, "dim": 32, "depth": 2, "heads": 2}


def torch_key(key: FlatKey) -> tuple[str, str]:
    """The timm tensor name of a ViT variable, and its layout change:

        stem_embed/proj                 -> patch_embed.proj (conv)
        stem_embed/cls_token, pos_embed -> cls_token, pos_embed
        block{i}/<sub>                  -> blocks.{i-1}.<sub> (attn/qkv -> attn.qkv, dense)
        final_norm / head               -> norm / head (dense)

    Raises:
      ValueError: a variable the mapping does not know.
    """
    collection, top, *rest = key
    leaf = rest.pop()
    if top == "stem_embed":
        prefix = "patch_embed.proj" if rest == ["proj"] else ""
        if rest not in (["proj"], []):
            raise ValueError(f"no timm ViT name for {'/'.join(key)}")
        return layers.torch_leaf(collection, prefix, leaf)
    fixed = {"final_norm": "norm", "head": "head"}
    if top in fixed and not rest:
        return layers.torch_leaf(collection, fixed[top], leaf, dense=True)
    match = re.fullmatch(r"block(\d+)", top)
    if not match or not rest:
        raise ValueError(f"no timm ViT name for {'/'.join(key)}")
    prefix = ".".join([f"blocks.{int(match[1]) - 1}", *rest])
    return layers.torch_leaf(collection, prefix, leaf, dense=True)


def resample_pos_embed(pos_embed: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """A position embedding [1, 1 + g*g, D] (class token first, square grid g x g) resampled to
    [1, 1 + grid[0]*grid[1], D]: the grid part bicubically with antialiasing (Keys a = -0.5,
    as PyTorch's `interpolate(mode="bicubic", antialias=True)` that
    `timm.layers.resample_abs_pos_embed` uses), the class token's entry unchanged; float32."""
    pos_embed = np.asarray(pos_embed, np.float32)
    g = math.isqrt(pos_embed.shape[1] - 1)
    dim = pos_embed.shape[2]
    if g * g != pos_embed.shape[1] - 1:
        raise ValueError(f"position embedding {list(pos_embed.shape)} has no square grid after "
                         f"the class token")
    patches = jnp.asarray(pos_embed[0, 1:].reshape(g, g, dim))
    resized = jax.image.resize(patches, (*grid, dim), "bicubic", antialias=True)
    return np.concatenate([pos_embed[:, :1], np.asarray(resized, np.float32).reshape(1, -1, dim)],
                          axis=1)


def resize(name: str, array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray | None:
    """`WeightLayout.resize`: a `pos_embed` of another (square) grid resampled to `shape`
    [1, 1 + g'^2, D]; None for anything else."""
    if name != "pos_embed" or array.ndim != 3 or len(shape) != 3 or array.shape[2] != shape[2]:
        return None
    side = math.isqrt(shape[1] - 1)
    if side * side != shape[1] - 1 or math.isqrt(array.shape[1] - 1) ** 2 != array.shape[1] - 1:
        return None
    return resample_pos_embed(array, (side, side))


def recognise(tensors: Mapping[str, np.ndarray]) -> str | None:
    """What a timm ViT state dict is ("a ViT-S/16 (dim 384, 12 blocks, 14x14 position grid):
    set --config.model.name=vit_small_patch16_224 or _384"), or None when it is no ViT."""
    cls = tensors.get("cls_token")
    proj = tensors.get("patch_embed.proj.weight")
    if cls is None or proj is None or "blocks.0.attn.qkv.weight" not in tensors:
        return None
    dim, patch = int(cls.shape[-1]), int(proj.shape[-1])
    depth = len({k.split(".")[1] for k in tensors if k.startswith("blocks.")})
    pos = tensors.get("pos_embed")
    grid = math.isqrt(int(pos.shape[1]) - 1) if pos is not None else None
    layout = f"dim {dim}, {depth} blocks, {patch} px patches, {grid}x{grid} position grid"
    names = [n for n, arch in ARCHITECTURES.items()
             if (arch["dim"], arch["depth"], arch["patch"]) == (dim, depth, patch)]
    if not names:
        return f"a ViT ({layout}) that matches no isic_jax architecture"
    return (f"a ViT ({layout}): set --config.model.name={' or '.join(names)} (the position "
            f"embedding is resampled to config.data.image_size)")


FAMILY = register(Family(
    name="vit",
    module=VisionTransformer,
    architectures=ARCHITECTURES,
    options=lambda model_config: {"drop_path": float(getattr(model_config, "drop_path", 0.0))},
    weights=WeightLayout(torch_key=torch_key, recognise=recognise, head=("head.weight",
                                                                         "head.bias"),
                         mean=VIT_MEAN_STD, std=VIT_MEAN_STD, resize=resize),
    batch_norm=False,
    config_keys=("drop_path",),
))
