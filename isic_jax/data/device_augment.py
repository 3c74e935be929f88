"""Training augmentation and normalisation on the accelerator, inside the jitted step (pure jax).

The host pipeline (`input_pipeline`, `image_ops`) only does what shrinks the data: JPEG decode
and the random resized crop + resize to S, and ships uint8 [B, S, S, 3]. Everything that keeps
the size of the image or needs float maths runs here, batched:

    augment_batch(images, rng, aug_config, example_ids=...)   train: dihedral flips + rotation
                                                              + affine + elastic (one bilinear
                                                              gather), colour jitter,
                                                              constancy, gamma, blur, noise,
                                                              normalise, cutout
    preprocess_eval(images, aug_config)                        eval/predict: constancy, normalise

Both take uint8 [B, H, W, 3] and return float32 [B, H, W, 3], normalised with the config's
mean/std (`DeviceAugmentConfig.mean/std`; ImageNet's by default): the model input the steps
expect. They are jit / pmap / vmap / shard_map friendly: no Python control flow on traced values
(the config is static Python), every per-example draw comes from that example's own key, and
each example is processed independently of the others.

Per-example randomness (what the train step must pass)
------------------------------------------------------
The batches carry `position` int64 [B]: the example's position in the global training stream,
unique over the whole run and the same whatever the process or device count (see
`input_pipeline`). Pass it as `example_ids` with ONE key that is the same on every device and not
folded with the device index:

    def train_step(state, batch, rng, ...):                   # rng: the run's key, replicated
        aug_rng = jax.random.fold_in(rng, device_augment.AUGMENT_STREAM)
        images = device_augment.augment_batch(
            batch["image"], aug_rng, aug_config, example_ids=batch["position"])
        ...  # dropout etc. keep their own fold_in(rng, step) [+ axis_index] keys

Example i then gets `fold_in(aug_rng, position_i)`: its augmentation depends only on the run's key
and its stream position, so 1 device or 8, pmap or jit over a Mesh, one process or several, and
an interrupted-and-resumed run all augment every example identically (there is no need to fold
in the step: positions never repeat). `batch["index"]` (the record index) is NOT a good key: a
record drawn twice in one step (balanced sampling, tiny datasets) would get the same augmentation.
Without `example_ids` the keys are `jax.random.split(rng, B)` over the local batch: then the
result depends on how the global batch is split, and under pmap rng must differ per device.

Cost: on the 2-core dev CPU (jax 0.10.2, XLA:CPU) the default config (flips + rotation 30 +
jitter) on a batch of 32 at 224 px runs at ~1000-1700 img/s (scripts/bench_input.py), ~5000 img/s
at 112 px: a few % of a CPU training step. On an accelerator it is a bilinear gather and a few
elementwise passes inside the step, a small fraction of a ResNet step.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy import ndimage

from isic_jax.data import augment_ops
from isic_jax.data.image_ops import IMAGENET_MEAN, IMAGENET_STD

# Luma weights (ITU-R 601, as torchvision's rgb_to_grayscale) and RGB <-> YIQ for hue rotation
# about the grey axis (a linear map, so it folds into the colour matrix).
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ)

# fold_in constant that derives the augmentation stream from a run key (any fixed uint32; the
# ASCII of "aug" keeps it apart from small step numbers used with fold_in elsewhere).
AUGMENT_STREAM = 0x00617567

_FILL_MODES = {"reflect": "reflect", "edge": "nearest"}
_NUM_DRAWS = 6  # angle, brightness, contrast, saturation, hue, dihedral element


@dataclasses.dataclass(frozen=True)
class DeviceAugmentConfig:
    """The device half of `config.data.augment` (frozen, hashable: usable as a static arg).

    dihedral: one of the 8 flips/transposes uniformly (`image_ops.dihedral` element k), before
      the rotation, in the same bilinear gather (free when rotating; needs square images).
    rotation: (min, max) degrees, angle uniform in it; positive turns the content
      counter-clockwise (as np.rot90). `from_config` maps a number r to (-r, r).
    brightness, contrast, saturation: factor uniform in [max(0, 1 - v), 1 + v]; 0 disables.
    hue: shift uniform in [-hue, hue] turns, a rotation about the grey axis in YIQ; 0 disables.
    color_constancy: Shades of Gray (p = 6) per image before the jitter (and in eval).
    fill: how rotation fills the corners: "reflect" (mirror at the border; skin continues past
      it) or "edge" (repeat the border pixel).
    mean, std: the input normalisation per RGB channel on the [0, 1] scale (config.data.mean/std
      as resolved for the run: the pretrained weights' or ImageNet's); train and eval alike.

    Each op below runs per image with probability `<op>_p` (0 = not built at all), with the
    strengths of `augment_ops` (see `augment_table.AUGMENTATIONS` and docs/augmentation.md):
    affine_* (zoom / shear / shift, in the same resampling as flips and rotation), elastic_*
    (smooth displacement field, same resampling), gamma*, blur_*, noise_*, cutout_* (holes
    filled with the normalisation mean, i.e. 0 in the model input). mixup_* / cutmix_* are not
    applied here: they mix pairs of examples and their labels (`mixing.mix_batch`, called by
    the train step after this function).
    """

    dihedral: bool = False
    rotation: tuple[float, float] = (0.0, 0.0)
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0
    color_constancy: bool = False
    fill: str = "reflect"
    mean: tuple[float, float, float] = tuple(float(v) for v in IMAGENET_MEAN)
    std: tuple[float, float, float] = tuple(float(v) for v in IMAGENET_STD)
    affine_p: float = 0.0
    affine_scale: float = 0.0
    affine_shear: float = 0.0
    affine_translate: float = 0.0
    elastic_p: float = 0.0
    elastic_magnitude: float = 0.0
    elastic_grid: int = 4
    gamma_p: float = 0.0
    gamma: float = 0.0
    blur_p: float = 0.0
    blur_sigma: float = 0.0
    noise_p: float = 0.0
    noise_std: float = 0.0
    cutout_p: float = 0.0
    cutout_size: float = 0.375
    cutout_holes: int = 1
    mixup_p: float = 0.0
    mixup_alpha: float = 0.0
    cutmix_p: float = 0.0
    cutmix_alpha: float = 0.0

    def __post_init__(self) -> None:
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(
                f"mean/std must be 3 values each, std > 0; got {self.mean}, {self.std}")
        if self.fill not in _FILL_MODES:
            raise ValueError(f"fill must be one of {sorted(_FILL_MODES)}, got {self.fill!r}")
        lo, hi = self.rotation
        if lo > hi:
            raise ValueError(f"rotation range {self.rotation} has min > max")

    @classmethod
    def from_config(cls, augment: Mapping[str, Any] | DeviceAugmentConfig) -> DeviceAugmentConfig:
        """From `config.data.augment` (ConfigDict or dict); missing keys keep the defaults.

        `rotation` may be a number r (angle in [-r, r]) or a (min, max) pair; host-only keys
        (crop_scale, crop_ratio, interpolation) are ignored.
        """
        if isinstance(augment, DeviceAugmentConfig):
            return augment
        kwargs: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            if field.name in augment:
                kwargs[field.name] = augment[field.name]
        if "rotation" in kwargs:
            rotation = kwargs["rotation"]
            if isinstance(rotation, int | float):
                rotation = (-abs(float(rotation)), abs(float(rotation)))
            kwargs["rotation"] = tuple(float(v) for v in rotation)
        for field in dataclasses.fields(cls):  # numbers and flags by their default's type
            if field.name in kwargs and isinstance(field.default, (bool, int, float)):
                kwargs[field.name] = type(field.default)(kwargs[field.name])
        for key in ("mean", "std"):
            if key in kwargs:
                kwargs[key] = tuple(float(v) for v in kwargs[key])
        return cls(**kwargs)

    @property
    def has_rotation(self) -> bool:
        return self.rotation != (0.0, 0.0)

    @property
    def has_jitter(self) -> bool:
        return any((self.brightness, self.contrast, self.saturation, self.hue))

    @property
    def has_geometry(self) -> bool:
        """Whether `augment_batch` resamples the images (one bilinear gather for all of it)."""
        return self.has_rotation or self.dihedral or self.affine_p > 0 or self.elastic_p > 0

    @property
    def has_mixing(self) -> bool:
        """Whether the train step mixes pairs (`mixing.mix_batch`)."""
        return self.mixup_p > 0 or self.cutmix_p > 0


# --------------------------------------------------------------------------- keys


def example_keys(
    rng: jax.Array, batch_size: int, example_ids: jax.Array | None = None
) -> jax.Array:
    """One PRNG key per example: fold_in(rng, example_ids[i]), or split(rng, batch_size).

    rng: a key (raw uint32 [2] or typed). example_ids: int [B] (e.g. `batch["position"]`).
    Returns keys [B, ...] of rng's kind.
    """
    if example_ids is None:
        return jax.random.split(rng, batch_size)
    ids = jnp.asarray(example_ids)
    # fold_in takes uint32 data; positions stay far below 2**32 (and wrap harmlessly above it).
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, ids.astype(jnp.uint32))


def _factor(u: jax.Array, strength: float) -> jax.Array:
    """Uniform in [max(0, 1 - v), 1 + v] from u ~ U[0, 1); exactly 1 when v == 0."""
    lo = max(0.0, 1.0 - strength)
    return lo + (1.0 + strength - lo) * u


# --------------------------------------------------------------------------- geometry


def _dihedral_source_matrices() -> np.ndarray:
    """float32 [8, 2, 2]: output offset (dy, dx) -> source offset for `image_ops.dihedral(., k)`.

    np.rot90 (one CCW turn): out[r, c] = in[c, W-1-r], i.e. source (dy, dx) = (dx, -dy); the
    transpose: (dy, dx) -> (dx, dy). Element k = rot90^(k % 4) after a transpose when k >= 4, so
    its source map is T @ R^(k % 4) (the transpose is undone last).
    """
    turn = np.array([[0.0, 1.0], [-1.0, 0.0]])
    transpose = np.array([[0.0, 1.0], [1.0, 0.0]])
    mats = []
    for k in range(8):
        mat = np.linalg.matrix_power(turn, k % 4)
        mats.append(transpose @ mat if k >= 4 else mat)
    return np.stack(mats).astype(np.float32)


_DIHEDRAL_SOURCE = _dihedral_source_matrices()


def geometry_matrices(angles_deg: jax.Array, dihedral_k: jax.Array | None = None) -> jax.Array:
    """Source-offset maps of "dihedral element k, then rotate by angle"; float32 [B, 2, 2].

    angles_deg: float [B], positive = counter-clockwise as displayed (np.rot90 for 90).
    dihedral_k: int [B] in 0..7 (`image_ops.dihedral` elements) or None. Row-vector convention:
    source offset (dy, dx) = M @ output offset (dy, dx), offsets from the image centre.
    """
    theta = jnp.deg2rad(jnp.asarray(angles_deg, jnp.float32))
    cos, sin = jnp.cos(theta), jnp.sin(theta)
    # Rows grow downwards, so this inverse map turns the content counter-clockwise.
    rot = jnp.stack([jnp.stack([cos, sin], -1), jnp.stack([-sin, cos], -1)], -2)
    if dihedral_k is None:
        return rot
    flips = jnp.asarray(_DIHEDRAL_SOURCE)[jnp.asarray(dihedral_k, jnp.int32)]
    return jnp.einsum("bij,bjk->bik", flips, rot)  # the flip is undone after the rotation


def warp(
    images: jax.Array,
    matrices: jax.Array,
    fill: str = "reflect",
    offsets: jax.Array | None = None,
    displacement: jax.Array | None = None,
) -> jax.Array:
    """Resamples each image through its centred affine map (bilinear); float32 [B, H, W, C].

    images: [B, H, W, C] (any real dtype; sampled as float32). matrices: float32 [B, 2, 2] from
    `geometry_matrices`. Output pixel (r, c) samples the input at centre + M @ (r, c) - centre
    (+ offsets [B, 2] (dy, dx) px, + displacement [B, H, W, 2] px at that pixel: a distortion
    field); points outside the input are filled per `fill`. Integer matrices (angle 0, any
    dihedral element) on a square image sample exactly at pixel centres: the input values come
    back.
    """
    mode = _FILL_MODES[fill]
    batch = images.shape[0]
    offsets = jnp.zeros((batch, 2), jnp.float32) if offsets is None else offsets

    def one(image: jax.Array, mat: jax.Array, off: jax.Array, disp: jax.Array | None
            ) -> jax.Array:
        height, width = image.shape[0], image.shape[1]
        cy, cx = (height - 1) / 2.0, (width - 1) / 2.0
        dy = jnp.arange(height, dtype=jnp.float32)[:, None] - cy
        dx = jnp.arange(width, dtype=jnp.float32)[None, :] - cx
        src_y = mat[0, 0] * dy + mat[0, 1] * dx + cy + off[0]
        src_x = mat[1, 0] * dy + mat[1, 1] * dx + cx + off[1]
        if disp is not None:
            src_y = src_y + disp[..., 0]
            src_x = src_x + disp[..., 1]
        image = image.astype(jnp.float32)
        # map_coordinates per channel was the fastest of the variants tried on CPU (a hand-written
        # 4-corner gather of RGB rows was ~1.4x slower, a 3-D map_coordinates ~5x).
        return jax.vmap(
            lambda plane: ndimage.map_coordinates(plane, [src_y, src_x], order=1, mode=mode),
            in_axes=-1,
            out_axes=-1,
        )(image)

    if displacement is None:
        return jax.vmap(lambda i, m, o: one(i, m, o, None))(images, matrices, offsets)
    return jax.vmap(one)(images, matrices, offsets, displacement)


def rotate(images: jax.Array, angles_deg: jax.Array, fill: str = "reflect") -> jax.Array:
    """Rotates each image about its centre by its angle (bilinear); float32 [B, H, W, C].

    angles_deg: float [B], positive = counter-clockwise as displayed (np.rot90 for 90). An angle
    of exactly 0 returns the input values.
    """
    return warp(images, geometry_matrices(angles_deg), fill)


# --------------------------------------------------------------------------- colour


def shades_of_gray_gains(images: jax.Array, power: float = 6.0) -> jax.Array:
    """Shades-of-Gray colour constancy gains per image (Finlayson & Trezzi 2004); float32 [B, 3].

    images: [B, H, W, 3] on [0, 255]. The illuminant is the Minkowski p-norm mean of each channel;
    gains make it neutral (1 for a grey image), as in the ISIC 2018/2019 winning entries. An
    all-black image gets gains 1.
    """
    x = images.astype(jnp.float32) * (1.0 / 255.0)  # keeps x**6 far from float32's range limits
    if power == 6:  # by multiplication: a float pow is several times slower on CPU
        squared = x * x
        powered = squared * squared * squared
    else:
        powered = x**power
    illuminant = jnp.mean(powered, axis=(1, 2)) ** (1.0 / power)  # [B, 3]
    norm = jnp.sqrt(jnp.sum(illuminant**2, axis=-1, keepdims=True))
    unit = jnp.maximum(illuminant / jnp.maximum(norm, 1e-12), 1e-6)
    gains = 1.0 / (unit * math.sqrt(3.0))
    return jnp.where(norm > 0, gains, 1.0)


def hue_matrices(hue: jax.Array) -> jax.Array:
    """RGB hue rotation by `hue` turns about the grey axis (YIQ); float32 [B, 3, 3]."""
    theta = 2.0 * jnp.pi * hue.astype(jnp.float32)
    cos, sin = jnp.cos(theta), jnp.sin(theta)
    zero, one = jnp.zeros_like(cos), jnp.ones_like(cos)
    rot = jnp.stack(
        [
            jnp.stack([one, zero, zero], -1),
            jnp.stack([zero, cos, -sin], -1),
            jnp.stack([zero, sin, cos], -1),
        ],
        -2,
    )
    to_rgb = jnp.asarray(_YIQ_TO_RGB, jnp.float32)
    to_yiq = jnp.asarray(_RGB_TO_YIQ, jnp.float32)
    return jnp.einsum("ij,bjk,kl->bil", to_rgb, rot, to_yiq)


def color_matrices(
    mean_rgb: jax.Array,
    gains: jax.Array | None = None,
    brightness: jax.Array | None = None,
    contrast: jax.Array | None = None,
    saturation: jax.Array | None = None,
    hue: jax.Array | None = None,
) -> jax.Array:
    """Composes gains -> brightness -> contrast -> saturation -> hue into x -> A x + t.

    Factors follow torchvision's adjust_* (1 = identity; hue in turns), all float32 [B]; None =
    identity. mean_rgb: float32 [B, 3], the image's mean colour before any op (contrast blends
    with the mean luma of the image after gains and brightness). gains: float32 [B, 3].
    Returns float32 [B, 3, 4]: [A | t] on the [0, 255] scale.
    """
    batch = mean_rgb.shape[0]
    ones = jnp.ones((batch,), jnp.float32)
    gains = jnp.ones((batch, 3), jnp.float32) if gains is None else gains
    brightness = ones if brightness is None else brightness
    contrast = ones if contrast is None else contrast
    saturation = ones if saturation is None else saturation
    # Linear part before saturation/hue: contrast * brightness * diag(gains).
    scale = (contrast * brightness)[:, None] * gains  # [B, 3]
    mean_gray = brightness * jnp.einsum("bc,c->b", gains * mean_rgb, jnp.asarray(LUMA))
    offset = ((1.0 - contrast) * mean_gray)[:, None] * jnp.ones((1, 3))  # grey, [B, 3]
    eye = jnp.eye(3, dtype=jnp.float32)
    grey = jnp.outer(jnp.ones(3), jnp.asarray(LUMA))  # x -> luma(x) in every channel
    sat = saturation[:, None, None] * eye + (1.0 - saturation)[:, None, None] * grey
    mat = sat * scale[:, None, :]  # sat @ diag(scale)
    offset = jnp.einsum("bij,bj->bi", sat, offset)
    if hue is not None:
        rot = hue_matrices(hue)
        mat = jnp.einsum("bij,bjk->bik", rot, mat)
        offset = jnp.einsum("bij,bj->bi", rot, offset)
    return jnp.concatenate([mat, offset[:, :, None]], axis=-1)


def apply_color(images: jax.Array, affine: jax.Array) -> jax.Array:
    """clip(A x + t, 0, 255) per image; float32 [B, H, W, 3].

    images: [B, H, W, 3] on [0, 255] (uint8 or float). affine: float32 [B, 3, 4] = [A | t].
    Written as three multiply-adds per channel (not a K=3 dot, which XLA:CPU lowers to a slow
    batched matmul): XLA fuses it, the cast and the clip into one elementwise pass.
    """
    x = images.astype(jnp.float32)
    a = affine[:, None, None, :, :]  # [B, 1, 1, 3, 4]
    y = x[..., 0:1] * a[..., 0] + x[..., 1:2] * a[..., 1] + x[..., 2:3] * a[..., 2] + a[..., 3]
    return jnp.clip(y, 0.0, 255.0)


def normalize(
    images: jax.Array, mean: Any = IMAGENET_MEAN, std: Any = IMAGENET_STD
) -> jax.Array:
    """uint8 [B, H, W, 3] (or [H, W, 3]) -> float32, (x / 255 - mean) / std (ImageNet's default).

    mean, std: 3 values on the [0, 1] scale (static: folded into two float32 constants).
    """
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    x = jnp.asarray(images).astype(jnp.float32)
    return x * jnp.asarray(1.0 / (255.0 * std)) - jnp.asarray(mean / std)


# --------------------------------------------------------------------------- public entry points


def augment_batch(
    images: jax.Array,
    rng: jax.Array,
    aug_config: Mapping[str, Any] | DeviceAugmentConfig,
    *,
    example_ids: jax.Array | None = None,
) -> jax.Array:
    """Random flips + rotation + colour jitter (+ colour constancy) + normalisation of a batch.

    Args:
      images: uint8 [B, H, W, 3] from the host pipeline (`batch["image"]`).
      rng: one PRNG key. With `example_ids`, the same key on every device (see module docstring).
      aug_config: `config.data.augment` or a `DeviceAugmentConfig` (static Python values).
      example_ids: int [B], `batch["position"]`: example i uses fold_in(rng, example_ids[i]), so
        results do not depend on the sharding. None: split(rng, B) over this (local) batch.

    Returns:
      float32 [B, H, W, 3], normalised with `aug_config`'s mean/std.

    Per example, from its key: one uniform vector u [6] -> angle = lo + (hi - lo) u0 degrees,
    brightness / contrast / saturation factors from u1..u3, hue = hue * (2 u4 - 1) turns,
    dihedral element k = floor(8 u5). Then: dihedral element k and the rotation about the centre
    in one bilinear resampling (corners per `fill`); colour matrix [A | t] built from
    the rotated image's mean colour (and Shades-of-Gray gains); one fused pass clip(A x + t) and
    normalise. Differences from torchvision's ColorJitter, on purpose: fixed order, one clamp at
    the end, hue is a rotation about the grey axis in YIQ (a linear map) instead of an HSV shift.

    The ops of `augment_ops` (each only when its `<op>_p` > 0, with draws from fold_in(key_i,
    op), so the draws above do not change) slot in as: affine zoom/shear/shift and the elastic
    field in the same resampling as the flips and rotation; after the colour matrix: gamma,
    Gaussian blur, Gaussian noise; after the normalisation: cutout (holes = 0, the mean colour).
    """
    config = DeviceAugmentConfig.from_config(aug_config)
    images = jnp.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be [B, H, W, 3], got {images.shape}")
    batch = images.shape[0]
    keys = example_keys(rng, batch, example_ids)
    u = jax.vmap(lambda k: jax.random.uniform(k, (_NUM_DRAWS,), jnp.float32))(keys)  # [B, 6]

    x = images
    size = (images.shape[1], images.shape[2])
    if config.has_geometry:
        if config.dihedral and images.shape[1] != images.shape[2]:
            raise ValueError(f"dihedral flips need square images, got {images.shape[1:3]}")
        lo, hi = config.rotation
        k = (
            jnp.minimum(jnp.floor(u[:, 5] * 8.0), 7.0).astype(jnp.int32)
            if config.dihedral
            else None
        )
        mats = geometry_matrices(lo + (hi - lo) * u[:, 0], k)
        offsets = field = None
        if config.affine_p > 0:
            zoom_shear, offsets = augment_ops.affine(
                keys, config.affine_p, config.affine_scale, config.affine_shear,
                config.affine_translate, size)
            mats = jnp.einsum("bij,bjk->bik", mats, zoom_shear)
        if config.elastic_p > 0:
            field = augment_ops.elastic(keys, config.elastic_p, config.elastic_magnitude,
                                        config.elastic_grid, size)
        x = warp(x, mats, config.fill, offsets, field)
    if config.has_jitter or config.color_constancy:
        # Statistics of the image being recoloured (after rotation, as torchvision's ColorJitter
        # after RandomRotation). Reading the rotated image twice (here and in apply_color) also
        # makes XLA materialise it once instead of fusing the bilinear gather into the
        # channel-mixing colour map, which recomputed it per channel: 3x slower on CPU at 224 px.
        mean_rgb = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        affine = color_matrices(
            mean_rgb,
            gains=shades_of_gray_gains(x) if config.color_constancy else None,
            brightness=_factor(u[:, 1], config.brightness) if config.brightness else None,
            contrast=_factor(u[:, 2], config.contrast) if config.contrast else None,
            saturation=_factor(u[:, 3], config.saturation) if config.saturation else None,
            hue=config.hue * (2.0 * u[:, 4] - 1.0) if config.hue else None,
        )
        x = apply_color(x, affine)
    if config.gamma_p > 0:
        x = augment_ops.gamma(x.astype(jnp.float32), keys, config.gamma_p, config.gamma)
    if config.blur_p > 0:
        x = augment_ops.gaussian_blur(x.astype(jnp.float32), keys, config.blur_p,
                                      config.blur_sigma)
    if config.noise_p > 0:
        x = augment_ops.gaussian_noise(x.astype(jnp.float32), keys, config.noise_p,
                                       config.noise_std)
    x = normalize(x, config.mean, config.std)
    if config.cutout_p > 0:
        holes = augment_ops.cutout_mask(keys, config.cutout_p, config.cutout_size,
                                        config.cutout_holes, size)
        x = jnp.where(holes[..., None], 0.0, x)  # 0 = the normalisation mean colour
    return x


def preprocess_eval(
    images: jax.Array, aug_config: Mapping[str, Any] | DeviceAugmentConfig
) -> jax.Array:
    """Deterministic model input: Shades of Gray (if `color_constancy`) + normalisation.

    images: uint8 [B, H, W, 3] (`batch["image"]` of the eval pipeline, or `image_ops.eval_image`
    outputs stacked). Returns float32 [B, H, W, 3]. Padding rows (zeros) stay finite.
    """
    config = DeviceAugmentConfig.from_config(aug_config)
    images = jnp.asarray(images)
    if not config.color_constancy:
        return normalize(images, config.mean, config.std)
    batch = images.shape[0]
    affine = color_matrices(jnp.zeros((batch, 3), jnp.float32), gains=shades_of_gray_gains(images))
    return normalize(apply_color(images, affine), config.mean, config.std)
