"""Shared fixtures. Tests that need the real ISIC sample skip without it, except in CI.

`.ci/run` sets ISIC_JAX_REQUIRE_SHARED_DATA=1, which turns that skip into a failure.
"""

from __future__ import annotations

import os
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = pathlib.Path(
    os.environ.get("ISIC_JAX_SHARED_DATA", REPO.parent / "shared" / "data")
).resolve()


def _need(path: pathlib.Path) -> pathlib.Path:
    if path.exists():
        return path
    reason = f"real ISIC sample not found at {path} (set ISIC_JAX_SHARED_DATA)"
    if os.environ.get("ISIC_JAX_REQUIRE_SHARED_DATA") == "1":
        pytest.fail(reason + "; ISIC_JAX_REQUIRE_SHARED_DATA=1 makes it mandatory")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def uda1_images() -> pathlib.Path:
    """../shared/data/isic-uda1/images: 400 JPEGs + JSON records (286 benign, 114 malignant)."""
    return _need(SHARED_DATA / "isic-uda1" / "images")


@pytest.fixture(scope="session")
def uda1_fullres() -> pathlib.Path:
    """../shared/data/isic-uda1/fullres: 4 full-size archive images (up to 3872x2592)."""
    return _need(SHARED_DATA / "isic-uda1" / "fullres")


def require_module(name: str):
    """Imports an optional test dependency (torch, torchvision, timm: the `interop` extra) or
    skips; `.ci/run` sets ISIC_JAX_REQUIRE_TORCH=1 in the pass that installs them, which turns
    the skip into a failure."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as e:
        reason = f"{name} is not installed ({e}); pip install -e '.[interop]'"
        if os.environ.get("ISIC_JAX_REQUIRE_TORCH") == "1":
            pytest.fail(reason + "; ISIC_JAX_REQUIRE_TORCH=1 makes these tests mandatory")
        pytest.skip(reason)
