"""Mixup and CutMix inside the jitted train step: pairs of examples and their labels.

    images, mix = mix_batch(images, labels, rng, aug_config, positions=batch["position"],
                            axis_name=axis_name)
    loss = compute_loss(logits, labels, mask, loss_config, class_weights, mix=mix)

`images` are the model inputs after `device_augment.augment_batch` (float32, normalised), so each
example of a pair was augmented on its own first. `mix` = (partner_labels int32 [B], lam float32
[B]): example i's target is lam_i * t(label_i) + (1 - lam_i) * t(partner_label_i) with t the
(label-smoothed) one-hot, and its class weight mixes the same way (`losses.compute_loss`); lam = 1
is the unmixed example. Evaluation never mixes.

Pairs (why they do not depend on the device or process count)
------------------------------------------------------------
Example at stream position q is paired with position q XOR 1 (positions 2k and 2k+1 form pair k).
The global batch of a step covers a contiguous range of positions that starts at a multiple of
the (even) global batch size, so both members are always in the same step, whatever the split.
Pair k's draws come from fold_in(fold_in(rng, MIX_STREAM), k): both members see the same choice
(cutmix, mixup or neither), lambda and box, and take from each other (member a gets
lam * x_a + (1 - lam) * x_b, member b gets lam * x_b + (1 - lam) * x_a; cutmix: each gets the
other's box). This is timm's "pair" mode with position-defined pairs instead of the batch flipped.

Finding the partner:
- jit over a Mesh (axis_name None): the batch is global; the partner is looked up by position in
  it (XLA moves the rows between devices if they live elsewhere).
- pmap, one process: the pipeline gives each device a contiguous run of positions of even length
  when the per-device batch is even, so the partner is on the same device: looked up locally.
- pmap with several processes (each process holds positions p, p + P, ...) or an odd per-device
  batch: the images, labels and positions are `all_gather`-ed over the pmap axis (one copy of
  the global batch per device: B x H x W x 3 float32) and the partner looked up there.
Either way each example gets the same partner, lambda and box as on one device: the results are
identical on 1, 4 or 8 devices, pmap or jit, one process or several (tests/test_mixing.py).
Without positions (float inputs from a caller), pairs are local rows 2k, 2k+1 with keys from the
local index (and the pmap device index): then the result depends on the split.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

MIX_STREAM = 0x006D6978  # fold_in constant of the pair stream (ASCII "mix")
LOOKUPS = ("auto", "local", "gather")


def _config(aug_config: Any) -> Any:
    from isic_jax.data.device_augment import DeviceAugmentConfig

    return DeviceAugmentConfig.from_config(aug_config)


def find_partners(
    images: jax.Array,
    labels: jax.Array,
    positions: jax.Array | None,
    *,
    axis_name: str | None = None,
    lookup: str = "auto",
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(partner images, partner labels, pair ids uint32 [B]) of each example (module docstring).

    An example whose partner is not in the searched batch (cannot happen with the training
    pipeline's batches) is its own partner, so it stays unmixed.
    """
    if lookup not in LOOKUPS:
        raise ValueError(f"lookup must be one of {LOOKUPS}, got {lookup!r}")
    batch = images.shape[0]
    if positions is None:
        index = jnp.arange(batch) ^ 1
        index = jnp.where(index < batch, index, jnp.arange(batch))
        return images[index], labels[index], (jnp.arange(batch) // 2).astype(jnp.uint32)
    pos = jnp.asarray(positions).astype(jnp.uint32)
    if lookup == "auto":
        lookup = "gather" if axis_name is not None and (
            jax.process_count() > 1 or batch % 2) else "local"
    pool_images, pool_labels, pool_pos = images, labels, pos
    if axis_name is not None and lookup == "gather":
        gather = lambda x: jax.lax.all_gather(x, axis_name, tiled=True)
        pool_images, pool_labels, pool_pos = gather(images), gather(labels), gather(pos)
    match = pool_pos[None, :] == (pos ^ 1)[:, None]  # [B, pool]
    found = jnp.any(match, axis=1)
    index = jnp.argmax(match, axis=1)
    partner_images = jnp.where(found[:, None, None, None], pool_images[index], images)
    partner_labels = jnp.where(found, pool_labels[index], labels)
    return partner_images, partner_labels, pos >> 1


def pair_draws(
    rng: jax.Array, pair_ids: jax.Array, config: Any, size: tuple[int, int]
) -> dict[str, jax.Array]:
    """Per example (identical for both members of a pair): which op, lambda, cutmix box.

    Returns {"mixup": bool [B], "cutmix": bool [B], "lam": float32 [B] (1 when unmixed; for
    cutmix 1 - box area / image area, after clipping the box), "box": int32 [B, 4] (y0, y1, x0,
    x1)}. Choice: u < cutmix_p -> cutmix; else u < cutmix_p + mixup_p -> mixup; else neither.
    """
    height, width = size
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, pair_ids.astype(jnp.uint32))

    def one(key: jax.Array) -> dict[str, jax.Array]:
        u = jax.random.uniform(key, (3,))
        cut = u[0] < config.cutmix_p
        mix = jnp.logical_and(~cut, u[0] < config.cutmix_p + config.mixup_p)
        lam_mix = (jax.random.beta(jax.random.fold_in(key, 1), config.mixup_alpha,
                                   config.mixup_alpha) if config.mixup_p > 0 else 1.0)
        lam_cut = (jax.random.beta(jax.random.fold_in(key, 2), config.cutmix_alpha,
                                   config.cutmix_alpha) if config.cutmix_p > 0 else 1.0)
        # Box of area (1 - lam) H W centred uniformly, clipped at the border (timm's rand_bbox).
        ratio = jnp.sqrt(jnp.clip(1.0 - lam_cut, 0.0, 1.0))
        cy, cx = u[1] * height, u[2] * width
        half_h, half_w = 0.5 * ratio * height, 0.5 * ratio * width
        y0 = jnp.clip(jnp.round(cy - half_h), 0, height).astype(jnp.int32)
        y1 = jnp.clip(jnp.round(cy + half_h), 0, height).astype(jnp.int32)
        x0 = jnp.clip(jnp.round(cx - half_w), 0, width).astype(jnp.int32)
        x1 = jnp.clip(jnp.round(cx + half_w), 0, width).astype(jnp.int32)
        area = ((y1 - y0) * (x1 - x0)).astype(jnp.float32) / float(height * width)
        lam = jnp.where(cut, 1.0 - area, jnp.where(mix, lam_mix, 1.0)).astype(jnp.float32)
        return {"mixup": mix, "cutmix": cut, "lam": lam, "box": jnp.stack([y0, y1, x0, x1])}

    return jax.vmap(one)(keys)


def mix_batch(
    images: jax.Array,
    labels: jax.Array,
    rng: jax.Array,
    aug_config: Mapping[str, Any] | Any,
    *,
    positions: jax.Array | None = None,
    axis_name: str | None = None,
    lookup: str = "auto",
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """Mixup / CutMix of pairs (see the module docstring).

    Args:
      images: float32 [B, H, W, C] model inputs (augmented, normalised).
      labels: int32 [B] class indices.
      rng: the run's key, the same on every device (as `device_augment.augment_batch`'s).
      aug_config: `config.data.augment` or a `DeviceAugmentConfig` (mixup_p, mixup_alpha,
        cutmix_p, cutmix_alpha).
      positions: uint32 [B] stream positions (`batch["position"]`), or None.
      axis_name: the pmap axis (None under jit).
      lookup: "auto" (module docstring), "local" or "gather" (pmap; for tests).

    Returns:
      (mixed images float32 [B, H, W, C], (partner labels int32 [B], lam float32 [B])).
    """
    config = _config(aug_config)
    images = jnp.asarray(images, jnp.float32)
    labels = jnp.asarray(labels, jnp.int32)
    partner_images, partner_labels, pair_ids = find_partners(
        images, labels, positions, axis_name=axis_name, lookup=lookup)
    mix_rng = jax.random.fold_in(rng, MIX_STREAM)
    if positions is None and axis_name is not None:
        mix_rng = jax.random.fold_in(mix_rng, jax.lax.axis_index(axis_name))
    height, width = images.shape[1], images.shape[2]
    d = pair_draws(mix_rng, pair_ids, config, (height, width))
    lam = d["lam"]
    blend = lam[:, None, None, None]
    out = jnp.where(d["mixup"][:, None, None, None],
                    blend * images + (1.0 - blend) * partner_images, images)
    rows = jnp.arange(height)[None, :]
    cols = jnp.arange(width)[None, :]
    box = d["box"]
    in_rows = (rows >= box[:, 0:1]) & (rows < box[:, 1:2])  # [B, H]
    in_cols = (cols >= box[:, 2:3]) & (cols < box[:, 3:4])  # [B, W]
    in_box = in_rows[:, :, None] & in_cols[:, None, :] & d["cutmix"][:, None, None]
    out = jnp.where(in_box[..., None], partner_images, out)
    return out, (partner_labels, lam)
