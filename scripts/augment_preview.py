"""A PNG grid of a batch before and after the training augmentation, one column per op.

    python scripts/augment_preview.py                                  # -> augment_preview.png
    python scripts/augment_preview.py --config configs/cpu_sample.py --output preview.png
    python scripts/augment_preview.py --images path/to/jpegs --num 8 --size 224
    python scripts/augment_preview.py --config default --config-override data.augment.blur_p=1

Rows are images; columns: "input" (the evaluation crop: shorter side to --size, centre square),
"config" (everything the config's `data.augment` turns on, mixup/cutmix included, exactly as the
train step applies it), then each device op of the augmentation table alone at p = 1 with the
config's strengths ("flips+rotation", "colour jitter", affine, elastic, gamma, blur, noise,
cutout, mixup, cutmix). The host's random resized crop is not shown (it only picks the region).
Images: --images (a folder of JPEG/PNG files), else the ISIC sample of the shared data folder
when it is there, else synthetic lesions (--synthetic forces them).
"""

from __future__ import annotations

import argparse
import ast
import pathlib
import runpy
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SAMPLE = REPO.parent / "shared" / "data" / "isic-uda1" / "images"

_OFF = {"dihedral": False, "rotation": (0.0, 0.0), "brightness": 0.0, "contrast": 0.0,
        "saturation": 0.0, "hue": 0.0}
# Column -> the keys it turns on (on top of everything off); strengths come from the config.
SINGLE = {
    "flips+rotation": {"dihedral": True, "rotation": None},
    "colour jitter": {"brightness": None, "contrast": None, "saturation": None, "hue": None},
    **{op: {f"{op}_p": 1.0} for op in ("affine", "elastic", "gamma", "blur", "noise", "cutout",
                                        "mixup", "cutmix")},
}


def load_config(spec: str, overrides: list[str]):
    """A preset name or file (as `isic-jax train --config` takes it) with key=value overrides."""
    from isic_jax import config_utils

    path = config_utils.config_file(spec).partition(":")[0]
    config = runpy.run_path(path)["get_config"]()
    for item in overrides:
        key, _, raw = item.partition("=")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        config.update_from_flattened_dict({key: value})
    config_utils.validate_config(config)
    return config


def synthetic_images(num: int, size: int, seed: int = 0):
    """Lesion-like uint8 [num, size, size, 3]: a dark irregular blob on skin tone, with texture."""
    import numpy as np

    rng = np.random.default_rng(seed)
    y, x = (np.mgrid[0:size, 0:size] + 0.5) / size - 0.5
    theta, rho = np.arctan2(y, x), np.hypot(x, y)
    out = []
    for _ in range(num):
        skin = rng.uniform([190, 140, 120], [235, 185, 165])
        lesion = rng.uniform([70, 40, 30], [150, 100, 80])
        border = 0.25 + 0.05 * sum(rng.normal() * np.cos((k + 2) * theta + rng.uniform(0, 6))
                                   for k in range(4))
        inside = 1 / (1 + np.exp((rho - border) / 0.015))
        texture = 1 + 0.08 * np.sin(40 * x + rng.uniform(0, 6)) * np.sin(33 * y)
        image = skin * (1 - inside[..., None]) + lesion * texture[..., None] * inside[..., None]
        out.append(image + rng.normal(0, 4, image.shape))
    return np.clip(np.stack(out), 0, 255).astype(np.uint8)


def folder_images(folder: pathlib.Path, num: int, size: int):
    """The first `num` images of a folder, evaluation-cropped to size x size."""
    import numpy as np

    from isic_jax.data import image_ops

    files = sorted(p for p in folder.iterdir()
                   if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:num]
    if not files:
        raise SystemExit(f"no .jpg/.jpeg/.png files in {folder}")
    return np.stack([image_ops.eval_image(p.read_bytes(), size) for p in files])


def augmented_columns(images, config, seed: int = 0) -> dict[str, object]:
    """{column title: uint8 [N, S, S, 3]} (see the module docstring)."""
    import dataclasses

    import jax
    import numpy as np

    from isic_jax.data import device_augment as da
    from isic_jax.data import mixing
    from isic_jax.training import steps

    full = steps.augment_config(config)  # the run's ops and normalisation
    none = dataclasses.replace(full, color_constancy=False, **_OFF,
                               **{f.name: 0.0 for f in dataclasses.fields(full)
                                  if f.name.endswith("_p")})
    rng = jax.random.PRNGKey(seed)
    ids = np.arange(len(images), dtype=np.uint32)
    labels = np.zeros(len(images), np.int32)
    mean = np.asarray(full.mean) * 255
    std = np.asarray(full.std) * 255

    def run(cfg: da.DeviceAugmentConfig) -> np.ndarray:
        x = da.augment_batch(images, jax.random.fold_in(rng, da.AUGMENT_STREAM), cfg,
                             example_ids=ids)
        if cfg.has_mixing:
            x, _ = mixing.mix_batch(x, labels, rng, cfg, positions=ids)
        return np.clip(np.asarray(x) * std + mean, 0, 255).round().astype(np.uint8)

    columns = {"input": np.asarray(images), "config": run(full)}
    defaults = dataclasses.asdict(full)
    for title, keys in SINGLE.items():
        on = {k: (defaults[k] if v is None else v) for k, v in keys.items()}
        if "rotation" in on and on["rotation"] == (0.0, 0.0):
            on["rotation"] = (-30.0, 30.0)  # the config rotates nothing: show 30 degrees
        columns[title] = run(dataclasses.replace(none, **on))
    return columns


def write_grid(columns: dict[str, object], output: pathlib.Path, title: str = "") -> pathlib.Path:
    """One PNG: a row per image, a column per entry of `columns`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(columns)
    rows = len(columns[names[0]])
    fig, axes = plt.subplots(rows, len(names), figsize=(1.5 * len(names), 1.5 * rows + 0.4),
                             squeeze=False)
    for j, name in enumerate(names):
        for i in range(rows):
            ax = axes[i][j]
            ax.imshow(columns[name][i])
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=100)
    plt.close(fig)
    return output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="default", help="preset name or config file")
    parser.add_argument("--config-override", action="append", default=[], metavar="KEY=VALUE",
                        help="e.g. data.augment.blur_p=1.0 (repeatable)")
    parser.add_argument("--images", type=pathlib.Path, help="folder of JPEG/PNG images")
    parser.add_argument("--synthetic", action="store_true", help="synthetic lesions")
    parser.add_argument("--num", type=int, default=6, help="images (rows)")
    parser.add_argument("--size", type=int, default=0, help="px (default: data.image_size)")
    parser.add_argument("--seed", type=int, default=0, help="the augmentation key")
    parser.add_argument("--output", type=pathlib.Path, default=pathlib.Path("augment_preview.png"))
    args = parser.parse_args()

    config = load_config(args.config, args.config_override)
    size = args.size or min(int(config.data.image_size), 256)
    if args.images is not None:
        images, where = folder_images(args.images, args.num, size), str(args.images)
    elif SAMPLE.is_dir() and not args.synthetic:
        images, where = folder_images(SAMPLE, args.num, size), str(SAMPLE)
    else:
        images, where = synthetic_images(args.num, size, args.seed), "synthetic lesions"
    columns = augmented_columns(images, config, args.seed)
    path = write_grid(columns, args.output,
                      f"{args.config}: {where}, {size} px, key {args.seed}")
    print(f"wrote {path} ({len(images)} images x {len(columns)} columns)")


if __name__ == "__main__":
    main()
