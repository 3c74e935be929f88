"""Grad-CAM (Selvaraju et al. 2017) for every registered model, and a figure of the worst
mistakes.

    heat = grad_cam(model, variables, images, class_index=1)     # f32[B, H, W] in [0, 1]
    idx = most_confident_mistakes(probs, labels, k=16)             # over the whole split
    rows = write_mistakes_figure("mistakes.png", model, variables, images_uint8_of(idx),
                                 probs=probs[idx], labels=labels[idx], class_names=names)
    # (or grad_cam + mistakes_grid(path, images_uint8, heat, titles) for another layout)

The map of class c is ReLU(sum_k alpha_k A_k), where A [h, w, K] is the output of the model's
`cam_layer` (a ResNet's last residual block, the highest `stage{i}_block{j}`) and alpha_k the
spatial mean of d logit_c / d A_k. The gradient is taken without touching the model: a Flax
method interceptor adds a zero perturbation to that layer's output, and `jax.vjp`
differentiates the logits w.r.t. it (what `nn.Module.perturb` does, without the module having
to call it).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from isic_jax import metrics as isic_metrics
from isic_jax.data import image_ops

__all__ = [
    "denormalize",
    "grad_cam",
    "mistakes_grid",
    "most_confident_mistakes",
    "write_mistakes_figure",
]

def _logits_and_features(
    model: nn.Module, variables: Mapping[str, Any], images: jax.Array, layer: str, delta: Any,
    metadata: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Eval-mode logits f32[B, C] with `delta` added to `layer`'s output, and that output.

    delta None only records the output (used by `jax.eval_shape` to learn its shape). metadata:
    f32[B, F] for a model with a metadata branch (held fixed: the map explains the image).
    """
    captured: list[jax.Array] = []

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and context.module.name == layer:
            if captured:
                raise ValueError(f"module {layer!r} is called more than once")
            captured.append(out)
            if delta is not None:
                out = out + delta.astype(out.dtype)
        return out

    with nn.intercept_methods(interceptor):
        logits = model.apply(variables, images, train=False, metadata=metadata)
    if not captured:
        raise ValueError(f"module {layer!r} was not called by the model")
    return logits.astype(jnp.float32), captured[0]


def _interpolation_matrix(n_out: int, n_in: int, stride: float) -> np.ndarray:
    """f32[n_out, n_in]: output pixel x samples the coarse map at x / stride (clamped to the
    outer cell centres), linearly between the two nearest cells."""
    pos = np.clip(np.arange(n_out, dtype=np.float64) / stride, 0.0, n_in - 1.0)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = pos - lo
    mat = np.zeros((n_out, n_in), np.float32)
    rows = np.arange(n_out)
    np.add.at(mat, (rows, lo), 1.0 - frac)
    np.add.at(mat, (rows, hi), frac)
    return mat


def _upsample(cam: jax.Array, size: tuple[int, int]) -> jax.Array:
    """f32[B, h, w] -> f32[B, H, W], each feature cell placed over the pixel it is centred on.

    With symmetric ("PyTorch") padding every stride-2 layer of the ResNet centres output cell i on
    input 2i, so cell m of the last stage sits on pixel stride * m. `jax.image.resize` assumes
    half-pixel cell centres instead and would shift the map by (stride - 1) / 2 px down and right
    (15.5 px, 7 % of the image, for ResNet-50 at 224 px). Strides are powers of two (the
    feature size is a rounded-up division of the input size). Linear interpolation stays within
    the coarse map's range; past the outer cell centres the edge value is held. (Not
    `jax.image.scale_and_translate`: it zeroes output pixels whose sample falls past the input's
    last half cell, which drew a cold strip along the right and bottom edges.)
    """
    h, w = cam.shape[1:]
    strides = [2.0 ** round(math.log2(n / m)) for n, m in zip(size, (h, w), strict=True)]
    rows = jnp.asarray(_interpolation_matrix(size[0], h, strides[0]))
    cols = jnp.asarray(_interpolation_matrix(size[1], w, strides[1]))
    return jnp.einsum("Yh,bhw,Xw->bYX", rows, cam, cols, precision=jax.lax.Precision.HIGHEST)


def _grad_cam(
    model: nn.Module,
    variables: Mapping[str, Any],
    images: jax.Array,
    class_index: jax.Array,
    layer: str,
    resize: bool,
    normalize: bool,
    metadata: jax.Array | None = None,
) -> jax.Array:
    feature_shape = jax.eval_shape(
        lambda x: _logits_and_features(model, variables, x, layer, None, metadata)[1], images
    )
    delta = jnp.zeros(feature_shape.shape, feature_shape.dtype)
    logits, vjp_fn, features = jax.vjp(
        lambda d: _logits_and_features(model, variables, images, layer, d, metadata), delta,
        has_aux=True,
    )
    # Images are independent in eval mode, so one cotangent picks each image's own class logit.
    (grads,) = vjp_fn(jax.nn.one_hot(class_index, logits.shape[-1], dtype=logits.dtype))
    grads = grads.astype(jnp.float32)
    features = features.astype(jnp.float32)
    alpha = grads.mean(axis=(1, 2), keepdims=True)  # [B, 1, 1, K]
    cam = jax.nn.relu((alpha * features).sum(axis=-1))  # [B, h, w]
    if resize:
        cam = _upsample(cam, images.shape[1:3])
    if normalize:
        peak = cam.max(axis=(1, 2), keepdims=True)
        cam = jnp.where(peak > 0, cam / jnp.where(peak > 0, peak, 1.0), 0.0)
        cam = jnp.clip(cam, 0.0, 1.0)
    return cam


_grad_cam_jit = jax.jit(_grad_cam, static_argnames=("model", "layer", "resize", "normalize"))


def grad_cam(
    model: nn.Module,
    variables: Mapping[str, Any],
    images: Any,
    class_index: int | Sequence[int] | np.ndarray,
    *,
    layer: str | None = None,
    resize: bool = True,
    normalize: bool = True,
    metadata: Any = None,
) -> np.ndarray:
    """Grad-CAM heat maps of `class_index` over `images` (eval mode: BatchNorm running stats).

    Args:
      model: from `models.create_model`.
      variables: {"params", "batch_stats"}.
      images: f32[B, H, W, 3], normalised as the model's input.
      class_index: the class whose logit is explained: an int for all images or int[B].
      layer: the module whose output is the feature map (default: `model.cam_layer`, e.g. a
        ResNet's last residual block).
      resize: upsample to [H, W] (linear, cells aligned to their receptive-field centres); else
        the map stays at the feature map's [h, w].
      normalize: divide each map by its maximum, so it lies in [0, 1] (an all-zero map, where no
        location raises the logit, stays zero).
      metadata: f32[B, F], the encoded metadata of a model with a metadata branch.

    Returns:
      f32[B, H, W] (or [B, h, w]) numpy array; in [0, 1] when `normalize`.
    """
    images = jnp.asarray(images, jnp.float32)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be [B, H, W, 3], got shape {images.shape}")
    layer = layer or model.cam_layer(variables["params"])
    idx = jnp.broadcast_to(jnp.asarray(class_index, jnp.int32), images.shape[:1])
    meta = None if metadata is None else jnp.asarray(metadata, jnp.float32)
    cam = _grad_cam_jit(model, variables, images, idx, layer, resize, normalize, meta)
    return np.asarray(cam, np.float32)


def denormalize(
    images: Any, mean: Any = image_ops.IMAGENET_MEAN, std: Any = image_ops.IMAGENET_STD
) -> np.ndarray:
    """Model input f32[..., 3] (mean/std normalised; ImageNet's by default) -> displayable
    uint8[..., 3]."""
    x = (np.asarray(images, np.float32) * np.asarray(std, np.float32)
         + np.asarray(mean, np.float32))
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def most_confident_mistakes(probs: Any, labels: Any, k: int) -> np.ndarray:
    """Indices int64[<=k] of the wrong predictions, the most confident first.

    An image is a mistake when some wrong class has a probability at least that of the true class
    (argmax, ties wrong, as in `metrics`); it is ranked by the highest wrong-class probability.

    Args:
      probs: f[N, C] class probabilities.
      labels: int[N] true classes.
      k: how many to return at most.
    """
    p = np.asarray(probs, np.float64)
    y = np.asarray(labels).reshape(-1).astype(np.int64)
    if p.ndim != 2 or p.shape[0] != y.shape[0]:
        raise ValueError(f"probs [N, C] and labels [N] disagree: {p.shape} vs {y.shape}")
    if p.shape[0] == 0 or k <= 0:
        return np.zeros((0,), np.int64)
    candidates = np.flatnonzero(isic_metrics.argmax_ties_wrong(p) != y)
    _, wrong_prob = _top_wrong_class(p[candidates], y[candidates])
    # Stable sort: equal confidence keeps dataset order, so the figure is reproducible.
    order = np.argsort(-wrong_prob, kind="stable")
    return candidates[order][:k].astype(np.int64)


def _top_wrong_class(p: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(class int64[N], probability f64[N]) of each row's most probable wrong class."""
    rows = np.arange(y.shape[0])
    wrong = p.copy()
    wrong[rows, y] = -np.inf
    top = wrong.argmax(axis=1) if y.size else np.zeros((0,), np.int64)
    return top, wrong[rows, top]


def mistakes_grid(
    path: str | os.PathLike,
    images_uint8: np.ndarray,
    heatmaps: np.ndarray,
    titles: Sequence[str],
    *,
    ncols: int = 4,
    alpha: float = 0.45,
    cmap: str = "jet",
    suptitle: str | None = None,
    show_original: bool = True,
) -> None:
    """Writes a PNG grid: each image (left) and the image with its heat map overlaid (right).

    Args:
      path: the PNG to write.
      images_uint8: uint8[K, H, W, 3].
      heatmaps: f[K, H, W] in [0, 1] (e.g. from `grad_cam`).
      titles: K strings, one per image (newlines allowed).
      ncols: images per row.
      alpha: opacity of the heat map over the image.
      cmap: matplotlib colormap of the heat map.
      suptitle: figure title.
      show_original: also draw each image without overlay, to its left.
    """
    from matplotlib.figure import Figure  # Agg canvas, no pyplot state (headless)

    images_uint8 = np.asarray(images_uint8)
    heatmaps = np.asarray(heatmaps, np.float32)
    k = images_uint8.shape[0]
    if heatmaps.shape != images_uint8.shape[:3] or len(titles) != k:
        raise ValueError(
            f"images {images_uint8.shape}, heatmaps {heatmaps.shape} and {len(titles)} titles"
            " disagree"
        )
    per = 2 if show_original else 1
    ncols = max(1, min(ncols, k))
    nrows = max(1, math.ceil(k / ncols))
    # Square panels of ~2 in under two title lines (0.5 in), the colour bar in a narrow strip:
    # sized so that neither blank rows nor a blank band before the colour bar open up.
    # A narrow blank column between image pairs, so each pair reads as one unit.
    gap = 0.12 if per > 1 and ncols > 1 else 0.0
    ratios = ([1.0] * per + [gap]) * ncols if gap else [1.0] * (per * ncols)
    ratios = ratios[: len(ratios) - 1] if gap else ratios
    fig = Figure(
        figsize=(2.05 * ncols * per + 2.05 * gap * (ncols - 1) + 0.9, 2.5 * nrows + 0.5),
        layout="constrained",
    )
    grid = fig.subplots(nrows, len(ratios), squeeze=False, width_ratios=ratios)
    for ax in grid.flat:
        ax.axis("off")
    # The image columns only (the spacers dropped): [nrows, ncols * per].
    keep = [j for j in range(len(ratios)) if not gap or j % (per + 1) != per]
    axes = grid[:, keep]
    if k == 0:
        axes[0, 0].text(0.5, 0.5, "no mistakes", ha="center", va="center", fontsize=14)
    mappable = None
    for i in range(k):
        r, c = divmod(i, ncols)
        ax_img, ax_cam = axes[r, c * per], axes[r, c * per + per - 1]
        if show_original:
            ax_img.imshow(images_uint8[i])
            ax_img.set_title(titles[i], fontsize=8, loc="left")
        ax_cam.imshow(images_uint8[i])
        mappable = ax_cam.imshow(
            np.clip(heatmaps[i], 0.0, 1.0), cmap=cmap, alpha=alpha, vmin=0.0, vmax=1.0
        )
        if not show_original:
            ax_cam.set_title(titles[i], fontsize=8, loc="left")
    if mappable is not None:
        fig.colorbar(
            mappable,
            ax=grid.ravel().tolist(),
            shrink=min(0.8, 0.3 + 0.25 * nrows),
            fraction=0.02,
            pad=0.01,
            aspect=25,
            label="Grad-CAM (relative)",
        )
    if suptitle:
        fig.suptitle(suptitle, fontsize=12)
    fig.savefig(path, dpi=100)


def write_mistakes_figure(
    path: str | os.PathLike,
    model: nn.Module,
    variables: Mapping[str, Any],
    images_uint8: np.ndarray,
    *,
    probs: Any,
    labels: Any,
    class_names: Sequence[str],
    image_ids: Sequence[str] | None = None,
    preprocess: Callable[[np.ndarray], Any] | None = None,
    batch_size: int = 16,
    metadata: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """Grad-CAM of the predicted (wrong) class over each mistake, drawn by `mistakes_grid`.

    Pick the images first with `most_confident_mistakes(all_probs, all_labels, k)`, then pass
    those K images and their rows of probs and labels.

    Args:
      path: the PNG to write.
      model, variables: as for `grad_cam` ({"params", "batch_stats"}, unreplicated; EMA
        parameters if those are what was evaluated).
      images_uint8: uint8[K, S, S, 3], the model's eval input before normalisation
        (`image_ops.eval_image` output).
      probs: f[K, C] class probabilities of these images.
      labels: int[K] their true classes.
      class_names: the C class names.
      image_ids: K ids (str or bytes) for the titles (default: the position).
      preprocess: uint8[B, S, S, 3] -> the model input f32[B, S, S, 3], as evaluation does it,
        e.g. `lambda x: device_augment.preprocess_eval(x, aug_config)` when colour constancy is
        on (default: `image_ops.normalize`, ImageNet mean/std only). The figure shows the uint8
        images as given.
      batch_size: images per Grad-CAM call (bounds memory).
      metadata: f32[K, F] the images' encoded metadata (a model with a metadata branch).

    Returns:
      JSON-ready [{image_id, label, predicted, probability}] in figure order.
    """
    images_uint8 = np.asarray(images_uint8, np.uint8)
    p = np.asarray(probs, np.float64)
    y = np.asarray(labels).reshape(-1).astype(np.int64)
    k = images_uint8.shape[0]
    if p.shape[0] != k or y.shape[0] != k:
        raise ValueError(f"{k} images, {p.shape[0]} rows of probs, {y.shape[0]} labels")
    ids = [
        v.decode("utf-8", "replace") if isinstance(v, bytes | np.bytes_) else str(v)
        for v in (range(k) if image_ids is None else image_ids)
    ]
    predicted, _ = _top_wrong_class(p, y)
    maps = []
    size = max(1, min(batch_size, k))  # k = 0 (no mistakes): no chunk, an empty grid
    for start in range(0, k, size):
        chunk = images_uint8[start : start + size]
        # Pad the last chunk to the same batch, so the Grad-CAM step compiles once.
        batch = np.zeros((size, *images_uint8.shape[1:]), np.uint8)
        batch[: len(chunk)] = chunk
        inputs = (preprocess or image_ops.normalize)(batch)
        index = np.zeros(size, np.int64)
        index[: len(chunk)] = predicted[start : start + size]
        meta = None
        if metadata is not None:
            meta = np.zeros((size, metadata.shape[1]), np.float32)
            meta[: len(chunk)] = metadata[start : start + size]
        maps.append(grad_cam(model, variables, inputs, index, metadata=meta)[: len(chunk)])
    heat = np.concatenate(maps) if maps else np.zeros(images_uint8.shape[:3], np.float32)
    suptitle = "Most confident mistakes: Grad-CAM of the predicted class"
    if k:
        # The map's own resolution: a 3 x 3 map upsampled looks blocky, and should be read so.
        layer = model.cam_layer(variables["params"])
        inputs = jax.ShapeDtypeStruct(images_uint8.shape, jnp.float32)
        meta = None if metadata is None else jax.ShapeDtypeStruct(metadata.shape, jnp.float32)
        cells = jax.eval_shape(
            lambda x, m: _logits_and_features(model, variables, x, layer, None, m)[1], inputs,
            meta,
        ).shape[1:3]
        suptitle += f" ({layer} output, {cells[0]} x {cells[1]} cells, upsampled)"
    rows = []
    titles = []
    for i in range(k):
        c = int(predicted[i])
        rows.append(
            {
                "image_id": ids[i],
                "label": class_names[y[i]],
                "predicted": class_names[c],
                "probability": float(p[i, c]),
            }
        )
        titles.append(f"{ids[i]}\ntrue {class_names[y[i]]}, pred {class_names[c]} {p[i, c]:.2f}")
    mistakes_grid(
        path,
        images_uint8,
        heat,
        titles,
        suptitle=suptitle,
    )
    return rows
