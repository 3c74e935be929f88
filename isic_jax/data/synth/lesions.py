"""Lesion-like dermoscopy images drawn with numpy (vectorised, no per-pixel Python loops).

What is learnable: malignant lesions (melanoma, BCC, SCC, AK) are drawn asymmetric, with irregular
borders and several colours (black, dark brown, blue-grey, red, white regression), or with the
cues of their class (BCC: pink with red branching vessels and blue-grey nests; SCC: keratin
centre and dotted vessels; AK: ill-defined red scaly patch). Benign ones are round-ish, sharply
bordered and uniformly coloured, with their own cues (seborrheic keratosis: milia and fissures;
dermatofibroma: white centre; vascular: red-purple lacunae). Lesion size and overall darkness
are drawn from overlapping ranges in both groups so that a global colour mean is a weak cue.

`lesion_params(style, rng)` draws what makes one lesion look like itself; `render(params, skin,
h, w, rng)` draws one photo of it (orientation, framing, lighting, hair vary per photo).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

JPEG_QUALITY = 90

PALETTE: dict[str, np.ndarray] = {
    k: np.asarray(v, np.float32)
    for k, v in {
        "black": (38, 28, 28),
        "dark_brown": (80, 48, 32),
        "brown": (128, 84, 56),
        "light_brown": (170, 120, 84),
        "tan": (196, 154, 116),
        "blue_grey": (100, 112, 138),
        "red": (178, 62, 66),
        "dark_red": (120, 30, 45),
        "pink": (214, 138, 142),
        "purple": (118, 52, 92),
        "white": (226, 216, 212),
        "yellow": (224, 204, 150),
        "skin_light": (238, 204, 184),
        "skin_dark": (168, 118, 88),
    }.items()
}
STYLES = ("NV", "ATYP", "MEL", "BKL", "LENTIGO", "BCC", "AK", "SCC", "DF", "VASC")
_MEL_COLOURS = ["black", "dark_brown", "blue_grey", "red", "tan", "white"]
_EXTENT = 1.7  # canonical lesion fields span [-EXTENT, EXTENT] lesion radii
_SQRT_PI = math.sqrt(math.pi)


def lerp(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    return a + (b - a) * np.float32(t)


def _basis(coords: np.ndarray, n: int, extent: float = _EXTENT) -> np.ndarray:
    """Gaussian bumps at n nodes over [-extent, extent]. coords f32[L] -> f32[L, n].

    A field sum_jk G[j,k] basis(q)[j] basis(p)[k] with G ~ N(0, 1) has unit variance roughly
    (the squared bumps of width = node spacing sum to sqrt(pi) per axis).
    """
    centres = np.linspace(-extent, extent, n, dtype=np.float32)
    d = (coords[:, None] - centres[None, :]) * np.float32((n - 1) / (2 * extent))
    return np.exp(-0.5 * d * d) * np.float32(1 / math.sqrt(_SQRT_PI))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return np.float32(0.5) + np.float32(0.5) * np.tanh(np.float32(0.5) * x)


class _Canvas:
    """Pixel grid of one image, in canonical lesion coordinates (units of the lesion radius).

    The image shows the lesion in one of the 8 dihedral orientations (rotations by 90 degrees and
    flips), so canonical p and q each depend on one image axis only and every canonical field
    stays separable: F = basis(rows) @ G @ basis(cols).T, a few small matrix products.
    """

    def __init__(self, h: int, w: int, cx: float, cy: float, radius: float, orient: int):
        self.h, self.w = h, w
        u = (np.arange(w, dtype=np.float32) - np.float32(cx)) / np.float32(radius)  # [W]
        v = (np.arange(h, dtype=np.float32) - np.float32(cy)) / np.float32(radius)  # [H]
        self.swap = bool(orient & 4)
        s1 = np.float32(-1.0 if orient & 1 else 1.0)
        s2 = np.float32(-1.0 if orient & 2 else 1.0)
        if self.swap:  # p along image rows, q along image columns
            self.p1d, self.q1d = s1 * v, s2 * u
            p2, q2 = self.p1d[:, None], self.q1d[None, :]
        else:
            self.p1d, self.q1d = s1 * u, s2 * v
            p2, q2 = self.p1d[None, :], self.q1d[:, None]
        self.rho = np.sqrt(p2 * p2 + q2 * q2)  # f32[H, W]
        self.theta = np.arctan2(q2, p2)  # f32[H, W]
        self._bases: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def field(self, g: np.ndarray) -> np.ndarray:
        """Smooth random field from node weights g f32[n, n] (rows: q, cols: p) -> f32[H, W]."""
        n = g.shape[0]
        if n not in self._bases:
            self._bases[n] = (_basis(self.p1d, n), _basis(self.q1d, n))
        bp, bq = self._bases[n]
        if self.swap:
            return bp @ g.T @ bq.T
        return bq @ g @ bp.T


def _image_field(rng: np.random.Generator, h: int, w: int, n: int) -> np.ndarray:
    """Smooth unit-variance noise over the whole image f32[H, W] (background shading)."""
    g = rng.standard_normal((n, n), dtype=np.float32)
    rows = _basis(np.linspace(-1, 1, h, dtype=np.float32), n, 1.0)
    cols = _basis(np.linspace(-1, 1, w, dtype=np.float32), n, 1.0)
    return rows @ g @ cols.T


@dataclasses.dataclass
class _Region:
    colour: np.ndarray  # f32[3]
    g: np.ndarray  # f32[n, n] node weights of the region's field
    threshold: float
    strength: float


@dataclasses.dataclass
class LesionParams:
    """Everything that makes one lesion look like itself across its images."""

    style: str
    size: float  # lesion radius as a fraction of half the shorter image side
    # f32[K] border amplitudes a_k of r(theta) = 1 + sum_k a_k cos(k theta + phi_k)
    harmonics: np.ndarray
    phases: np.ndarray  # f32[K]
    edge: float  # border softness, lesion radii
    base: np.ndarray  # f32[3] lesion colour
    centre_dark: float  # darkening toward the centre, fraction
    regions: list[_Region]
    network: float  # pigment network strength
    g_network: np.ndarray
    texture: dict[str, Any]


def _harmonics(rng: np.random.Generator, low: Sequence[float], high: float) -> np.ndarray:
    """Border harmonics: explicit amplitudes for k=1..len(low), then noise of scale `high`/k."""
    k_total = 10
    a = np.zeros(k_total, np.float32)
    for i, amp in enumerate(low):
        a[i] = amp
    ks = np.arange(len(low) + 1, k_total + 1, dtype=np.float32)
    a[len(low) :] = rng.standard_normal(len(ks), dtype=np.float32) * np.float32(high) / np.sqrt(ks)
    return a


def lesion_params(style: str, rng: np.random.Generator) -> LesionParams:
    """Draw the parameters of one lesion of a drawing style."""
    u = rng.uniform
    pal = PALETTE
    regions: list[_Region] = []
    texture: dict[str, Any] = {}
    network = 0.0
    centre_dark = 0.0
    g = lambda n: rng.standard_normal((n, n), dtype=np.float32)  # noqa: E731

    if style in ("NV", "ATYP"):
        size = u(0.45, 0.85)
        low = [u(0, 0.03), u(0, 0.12), u(0, 0.02)]
        harm = _harmonics(rng, low, 0.008)
        edge = u(0.025, 0.06)
        kind = rng.random()
        if kind < 0.12:  # blue nevus: benign, uniformly blue-grey
            base = lerp(pal["blue_grey"], pal["dark_brown"], u(0.0, 0.5))
        elif kind < 0.22:  # dermal nevus: pinkish tan
            base = lerp(pal["pink"], pal["light_brown"], u(0.3, 0.8))
        else:
            base = lerp(pal["tan"], pal["dark_brown"], u(0.0, 1.0))
        base = base * rng.uniform(0.93, 1.07, 3).astype(np.float32)
        centre_dark = u(0.0, 0.3)
        network = u(0.05, 0.3)
        # A faint second brown keeps benign lesions from being perfectly flat.
        regions.append(_Region(base * np.float32(u(0.8, 0.9)), g(5), u(0.3, 1.0), u(0.3, 0.6)))
        if style == "ATYP":  # between nevus and melanoma
            harm[0] = u(0.05, 0.12)
            harm[2] = u(0.03, 0.08)
            colour = pal["dark_brown"] if rng.random() < 0.6 else pal["tan"]
            regions.append(_Region(colour, g(5), u(0.3, 0.8), u(0.6, 0.9)))
    elif style == "MEL":
        size = u(0.45, 0.85)
        low = [u(0.08, 0.22), u(0.05, 0.2), u(0.04, 0.15)]
        harm = _harmonics(rng, low, 0.05)
        edge = u(0.04, 0.14)
        base = lerp(pal["light_brown"], pal["dark_brown"], u(0.1, 0.9))
        network = u(0.0, 0.35)
        # One colour that contrasts with brown (the multicolour cue), then 1-3 more of any kind.
        contrast = ["blue_grey", "red", "white", "black"]
        first = str(rng.choice(contrast, p=[0.35, 0.25, 0.15, 0.25]))
        names = [c for c in _MEL_COLOURS if c != first]
        p = np.asarray([0.25, 0.22, 0.22, 0.13, 0.1, 0.08])[[c != first for c in _MEL_COLOURS]]
        more = rng.choice(names, size=int(rng.integers(1, 4)), replace=False, p=p / p.sum())
        picks = [first, *more]
        for name in picks:
            regions.append(_Region(pal[str(name)], g(5), u(0.0, 0.8), u(0.75, 1.0)))
    elif style == "BKL":
        size = u(0.45, 0.85)
        harm = _harmonics(rng, [u(0, 0.04), u(0.04, 0.18)], 0.02)
        edge = u(0.02, 0.05)
        base = lerp(pal["tan"], pal["brown"], u(0.1, 0.9))
        centre_dark = u(-0.1, 0.15)
        texture = {"milia": g(21), "comedo": g(21), "fissure": g(9), "fissure_amp": u(0.15, 0.35)}
    elif style == "LENTIGO":
        size = u(0.5, 0.9)
        harm = _harmonics(rng, [u(0, 0.05), u(0.04, 0.16)], 0.04)
        edge = u(0.04, 0.09)
        base = lerp(pal["tan"], pal["light_brown"], u(0.0, 1.0))
        network = u(0.05, 0.2)
        regions.append(_Region(base * np.float32(0.88), g(5), u(0.4, 1.0), u(0.3, 0.5)))
    elif style == "BCC":
        size = u(0.45, 0.85)
        harm = _harmonics(rng, [u(0.03, 0.12), u(0.04, 0.15), u(0.02, 0.1)], 0.03)
        edge = u(0.08, 0.16)
        base = lerp(pal["pink"], pal["skin_light"], u(0.0, 0.4))
        regions.append(_Region(pal["blue_grey"], g(9), u(0.9, 1.4), u(0.8, 1.0)))
        texture = {"vessels": g(11), "vessel_width": u(0.06, 0.1)}
        if rng.random() < 0.4:  # ulceration
            regions.append(_Region(pal["dark_red"], g(5), u(1.0, 1.5), u(0.7, 0.95)))
    elif style == "AK":
        size = u(0.5, 0.9)
        harm = _harmonics(rng, [u(0.04, 0.12), u(0.05, 0.15), u(0.03, 0.1)], 0.05)
        edge = u(0.15, 0.3)
        base = lerp(pal["pink"], pal["red"], u(0.2, 0.7))
        texture = {"scale": g(21), "scale_threshold": u(0.5, 1.0)}
        regions.append(_Region(pal["light_brown"], g(5), u(0.4, 1.2), u(0.4, 0.8)))
    elif style == "SCC":
        size = u(0.45, 0.85)
        harm = _harmonics(rng, [u(0.04, 0.14), u(0.04, 0.14), u(0.03, 0.1)], 0.04)
        edge = u(0.05, 0.12)
        base = lerp(pal["pink"], pal["red"], u(0.0, 0.5))
        texture = {"keratin": u(0.35, 0.6), "dots": g(25)}
        regions.append(_Region(pal["white"], g(5), u(0.2, 0.9), u(0.5, 0.9)))
    elif style == "DF":
        size = u(0.35, 0.6)
        harm = _harmonics(rng, [u(0, 0.04), u(0.02, 0.12)], 0.01)
        edge = u(0.12, 0.22)
        base = lerp(pal["light_brown"], pal["brown"], u(0.0, 0.6))
        network = u(0.15, 0.35)
        texture = {"white_centre": u(0.35, 0.55)}
    elif style == "VASC":
        size = u(0.4, 0.75)
        harm = _harmonics(rng, [u(0, 0.04), u(0.02, 0.12)], 0.01)
        edge = u(0.02, 0.05)
        base = lerp(pal["red"], pal["purple"], u(0.0, 1.0))
        texture = {"lacunae": g(11)}
    else:
        raise ValueError(f"unknown drawing style {style!r}")

    phases = rng.uniform(0, 2 * np.pi, len(harm)).astype(np.float32)
    return LesionParams(
        style=style,
        size=float(size),
        harmonics=harm,
        phases=phases,
        edge=float(edge),
        base=np.asarray(base, np.float32),
        centre_dark=float(centre_dark),
        regions=regions,
        network=float(network),
        g_network=g(25),
        texture=texture,
    )


def _hair(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """0-4 dark curved hairs as an alpha map f32[H, W] (image coordinates)."""
    alpha = np.zeros((h, w), np.float32)
    x = np.arange(w, dtype=np.float32)[None, :]
    y = np.arange(h, dtype=np.float32)[:, None]
    for _ in range(int(rng.integers(1, 5))):
        px, py = rng.uniform(0, w), rng.uniform(0, h)
        a = rng.uniform(0, np.pi)
        ca, sa = np.float32(math.cos(a)), np.float32(math.sin(a))
        perp = (x - px) * -sa + (y - py) * ca
        along = (x - px) * ca + (y - py) * sa
        amp, freq = rng.uniform(0, 0.08) * w, rng.uniform(1, 3) * 2 * np.pi / w
        s = perp - np.float32(amp) * np.sin(
            np.float32(freq) * along + np.float32(rng.uniform(0, 6))
        )
        width = np.float32(rng.uniform(0.5, 1.1))
        half_len = np.float32(rng.uniform(0.3, 0.8) * max(h, w))
        line = np.exp(-(s * s) / (width * width)) * (np.abs(along) < half_len)
        alpha = np.maximum(alpha, line)
    return alpha


def render(
    params: LesionParams,
    skin: np.ndarray,
    h: int,
    w: int,
    rng: np.random.Generator,
    *,
    dermoscopic: bool = True,
) -> np.ndarray:
    """One image of a lesion: uint8[H, W, 3]. `rng` draws what varies from photo to photo."""
    f32 = np.float32
    radius = params.size * min(h, w) / 2 * rng.uniform(0.9, 1.1)
    cx = w / 2 + rng.normal(0, 0.05) * w
    cy = h / 2 + rng.normal(0, 0.05) * h
    canvas = _Canvas(h, w, cx, cy, radius, int(rng.integers(0, 8)))

    # Background skin: patient skin tone, smooth shading, later pixel noise.
    shade = _image_field(rng, h, w, 4)
    img = skin[None, None, :] * (f32(1) + f32(0.05) * shade)[..., None]

    # Lesion mask from the border r(theta).
    theta = canvas.theta
    r = np.ones_like(theta)
    for k in range(len(params.harmonics)):
        if params.harmonics[k] != 0:
            r += params.harmonics[k] * np.cos(f32(k + 1) * theta + params.phases[k])
    r = np.clip(r, f32(0.35), f32(1.8))
    mask = _sigmoid((r - canvas.rho) / f32(params.edge))  # f32[H, W]
    t = np.clip(canvas.rho / r, f32(0), f32(1))  # 0 at the centre, 1 on the border

    col = np.broadcast_to(params.base, (h, w, 3)).astype(np.float32)
    if params.centre_dark:
        col = col * (f32(1) - f32(params.centre_dark) * (f32(1) - t))[..., None]
    for region in params.regions:
        wgt = _sigmoid((canvas.field(region.g) - f32(region.threshold)) / f32(0.18))
        wgt = (wgt * f32(region.strength))[..., None]
        col = col + (region.colour - col) * wgt
    if params.network:
        lines = np.exp(-((canvas.field(params.g_network) / f32(0.3)) ** 2))
        col = col * (f32(1) - f32(params.network) * lines)[..., None]

    tex = params.texture
    if "milia" in tex:  # seborrheic keratosis: white milia-like cysts, dark comedo openings
        milia = _sigmoid((canvas.field(tex["milia"]) - f32(1.7)) / f32(0.12))[..., None]
        col = col + (PALETTE["white"] - col) * milia
        comedo = _sigmoid((canvas.field(tex["comedo"]) - f32(1.8)) / f32(0.12))[..., None]
        col = col + (PALETTE["dark_brown"] - col) * comedo
        fissure = np.exp(-((canvas.field(tex["fissure"]) / f32(0.2)) ** 2))
        col = col * (f32(1) - f32(tex["fissure_amp"]) * fissure)[..., None]
    if "vessels" in tex:  # BCC: branching red vessels
        vessels = np.exp(-((canvas.field(tex["vessels"]) / f32(tex["vessel_width"])) ** 2))
        vessels = (vessels * (t < 0.92))[..., None]
        col = col + (PALETTE["red"] - col) * vessels * f32(0.9)
    if "scale" in tex:  # AK: white scale
        scale = _sigmoid((canvas.field(tex["scale"]) - f32(tex["scale_threshold"])) / f32(0.1))
        col = col + (PALETTE["white"] - col) * (scale * f32(0.8))[..., None]
    if "keratin" in tex:  # SCC: keratin centre, dotted vessels
        keratin = _sigmoid((f32(tex["keratin"]) - t) / f32(0.08))[..., None]
        col = col + (PALETTE["yellow"] - col) * keratin * f32(0.9)
        dots = _sigmoid((canvas.field(tex["dots"]) - f32(1.5)) / f32(0.1))[..., None]
        col = col + (PALETTE["dark_red"] - col) * dots * f32(0.9)
    if "white_centre" in tex:  # DF: central white scar-like patch
        centre = _sigmoid((f32(tex["white_centre"]) - t) / f32(0.1))[..., None]
        col = col + (PALETTE["white"] - col) * centre * f32(0.85)
    if "lacunae" in tex:  # VASC: red-purple lacunae
        lac = _sigmoid((canvas.field(tex["lacunae"]) - f32(0.5)) / f32(0.15))[..., None]
        col = col + (PALETTE["dark_red"] - col) * lac * f32(0.8)

    img = img + (col - img) * mask[..., None]

    if dermoscopic and rng.random() < 0.35:
        hair = _hair(rng, h, w)[..., None]
        img = img + (PALETTE["black"] * f32(1.2) - img) * hair * f32(0.85)
    img = img * f32(rng.uniform(0.92, 1.08))  # exposure
    if dermoscopic and rng.random() < 0.3:  # dark circular surround of contact dermoscopy
        yy = (np.arange(h, dtype=np.float32)[:, None] - f32(h / 2)) ** 2
        xx = (np.arange(w, dtype=np.float32)[None, :] - f32(w / 2)) ** 2
        dist = np.sqrt(yy + xx)
        rim = f32(rng.uniform(0.52, 0.62) * math.hypot(h, w))
        img = img * (f32(1) - f32(0.92) * _sigmoid((dist - rim) / f32(2.5)))[..., None]
    img = img + rng.standard_normal((h, w, 3), dtype=np.float32) * f32(2.5)
    return np.clip(img + f32(0.5), 0, 255).astype(np.uint8)


def single_threaded_blas() -> contextlib.AbstractContextManager[Any]:
    """The fields are tiny matrix products: BLAS threads only add overhead (2-5x slower on a busy
    2-core machine). threadpoolctl comes with scikit-learn; without it, change nothing."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def encode_jpeg(pixels: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    """uint8[H, W, 3] -> JPEG bytes; fixed settings and no metadata, so bytes are reproducible."""
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(
        buf, format="JPEG", quality=quality, subsampling=2, optimize=False, progressive=False
    )
    return buf.getvalue()



@functools.lru_cache(maxsize=8)  # one per image shape (4 aspect ratios): encode each once
def superpixels_png(h: int, w: int) -> bytes:
    """A coarse superpixel index map encoded in RGB, as the 2017 *_superpixels.png files are."""
    cell = 16
    idx = (np.arange(h)[:, None] // cell) * ((w + cell - 1) // cell) + np.arange(w)[None, :] // cell
    rgb = np.stack([idx & 255, (idx >> 8) & 255, (idx >> 16) & 255], axis=-1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()

