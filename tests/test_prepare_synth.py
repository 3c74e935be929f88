"""`prepare` on `isic-jax synth` output, in every release layout (the two modules agree)."""

from __future__ import annotations

import pytest

from isic_jax.data import isic, synth
from isic_jax.data import prepare as prepare_lib


@pytest.mark.parametrize("fmt", isic.RELEASES)
def test_prepare_synthetic_release(tmp_path, fmt):
    summary = synth.write_synthetic(tmp_path / "src", fmt, 24, 0)
    report = prepare_lib.prepare(tmp_path / "src", tmp_path / "data", image_size=32, num_folds=3)

    assert report["release"] == fmt  # --format auto recognised the layout
    n = report["num_examples"]
    reasons = [s["reason"] for s in report["skipped"]]
    assert n + len(reasons) == summary["num_images"], reasons
    # Only the documented policies drop anything: Indeterminate (archive), 2020 duplicates.
    assert all("indeterminate" in r or "duplicate image of" in r for r in reasons), reasons
    malignant = sum(c["malignant"] for c in report["label_counts"].values())
    assert 0 < malignant < n
    assert all(count > 0 for count in report["splits"].values())
