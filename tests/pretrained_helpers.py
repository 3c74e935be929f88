"""Helpers for the pretrained-weights tests (no tests here): state dicts in torchvision naming
without torch, a Hugging Face cache folder laid out as huggingface_hub writes it, in-memory data
of a diagnosis release.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from typing import Any

import ml_collections
import numpy as np

# A fixed 40-hex-digit commit id for the fake Hub snapshots.
REVISION = "0123456789abcdef0123456789abcdef01234567"


def model_config(name: str = "resnet18", width: int = 8) -> ml_collections.ConfigDict:
    """config.model as the default preset has it, for `name` at `width`."""
    from isic_jax.configs import default

    config = default.get_config().model
    config.name, config.width, config.dtype = name, width, "float32"
    return config


def torchvision_state_dict(name: str = "resnet18", width: int = 8, num_classes: int = 1000,
                           seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 tensors under torchvision's/timm's names and layouts (OIHW, fc [C, F]) for
    an isic_jax `name` (any family; `width` for ResNets), plus the `num_batches_tracked`
    counters torchvision saves.

    Built from the loader's own name table (its family's `torch_key`), so it checks the loader's
    bookkeeping (errors, head, ignored keys), not the mapping itself: tests/test_torch_interop.py
    checks that against the real torchvision and timm modules.
    """
    from isic_jax.models import family_of, weight_mapping

    torch_key = family_of(name).weights.torch_key
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    expected = weight_mapping.expected_shapes(model_config(name, width), num_classes)
    for key, shape in expected.items():
        torch_name, kind = torch_key(key)
        torch_shape = weight_mapping.torch_shape(shape, kind)
        if key[-1] == "var":
            value = rng.uniform(0.5, 2.0, torch_shape)
        else:
            value = rng.normal(0.0, 0.1, torch_shape)
        out[torch_name] = value.astype(np.float32)
        if key[0] == "batch_stats" and key[-1] == "mean":
            out[torch_name.rsplit(".", 1)[0] + ".num_batches_tracked"] = np.array(7, np.int64)
    return out


def save_safetensors(path: pathlib.Path, tensors: dict[str, np.ndarray]) -> pathlib.Path:
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path))
    return path


def timm_config(architecture: str, num_classes: int = 1000, mean=(0.485, 0.456, 0.406),
                std=(0.229, 0.224, 0.225)) -> dict[str, Any]:
    """A config.json as timm's `push_to_hf_hub` writes it (the keys this loader reads)."""
    return {
        "architecture": architecture,
        "num_classes": num_classes,
        "num_features": 512,
        "pretrained_cfg": {
            "tag": "test", "custom_load": False, "input_size": [3, 224, 224],
            "interpolation": "bicubic", "crop_pct": 0.95, "crop_mode": "center",
            "mean": list(mean), "std": list(std), "num_classes": num_classes,
            "pool_size": [7, 7], "first_conv": "conv1", "classifier": "fc",
        },
    }


def write_hub_cache(hf_home: pathlib.Path, repo: str, files: dict[str, bytes],
                    revision: str = REVISION) -> pathlib.Path:
    """`files` into HF_HOME/hub as huggingface_hub lays out its cache: blobs/<sha256>,
    snapshots/<revision>/<file> -> relative links to the blobs, refs/main = revision.
    Returns the snapshot folder."""
    org, name = repo.split("/")
    root = hf_home / "hub" / f"models--{org}--{name}"
    snapshot = root / "snapshots" / revision
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(revision)
    for filename, data in files.items():
        digest = hashlib.sha256(data).hexdigest()
        (root / "blobs" / digest).write_bytes(data)
        link = snapshot / filename
        if link.exists() or link.is_symlink():
            link.unlink()
        os.symlink(os.path.relpath(root / "blobs" / digest, snapshot), link)
    return snapshot


def safetensors_bytes(tensors: dict[str, np.ndarray]) -> bytes:
    from safetensors.numpy import save

    return save({k: np.ascontiguousarray(v) for k, v in tensors.items()})


def diagnosis_data(config, class_names: list[str], release: str, n_train: int = 32,
                   n_val: int = 16, seed: int = 10):
    """An in-memory `InputData` of a diagnosis release: label i % C, brightness by class."""
    import io

    from PIL import Image

    from isic_jax.data import dataset, pipeline

    num = len(class_names)
    rng = np.random.default_rng(seed)

    def records(n: int, offset: int) -> list[dict[str, Any]]:
        out = []
        for i in range(n):
            label = i % num
            base = 40 + 180 * label / max(1, num - 1)
            pixels = np.clip(rng.normal(base, 25, (40, 40, 3)), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
            out.append({
                "image": buf.getvalue(), "image_id": f"ISIC_{offset + i:07d}".encode(),
                "label": int(label == 0), "diagnosis": label,
                "patient_id": f"IP_{(offset + i) // 2:05d}".encode(), "lesion_id": b"",
                "age": 40, "sex": 2, "anatom_site": b"torso", "fold": 0,
            })
        return out

    train, val = records(n_train, 0), records(n_val, 10_000)
    counts = lambda rs: np.bincount([r["diagnosis"] for r in rs], minlength=num)  # noqa: E731
    info = dataset.SourceInfo(
        release=release, task="diagnosis", class_names=list(class_names),
        num_train=n_train, num_val=n_val, train_class_counts=counts(train),
        val_class_counts=counts(val),
        train_labels=np.array([r["diagnosis"] for r in train], np.int32),
        train_split="fold1+fold2+fold3+fold4", val_split="fold0",
    )
    return dataset.InputData(config, sources=(pipeline.ListSource(train),
                                              pipeline.ListSource(val), info))


def flat_variables(variables: dict[str, Any]) -> dict[str, np.ndarray]:
    """{"params/stem_conv/kernel": array, ...} of a variables tree."""
    import jax

    flat = jax.tree_util.tree_flatten_with_path(variables)[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(leaf)
            for path, leaf in flat}


def write_json(path: pathlib.Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
