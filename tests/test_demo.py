"""The README's main job (`isic-jax demo`) end to end, shortened: synth -> prepare -> train ->
evaluate through the real commands, then a second run that reuses every finished step."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def _demo(workdir, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CI": "true"}
    return subprocess.run(
        [sys.executable, "-m", "isic_jax", "demo", f"--workdir={workdir}", "--num-images=80",
         "--num-epochs=1", *extra],
        capture_output=True, text=True, timeout=600, env=env, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def test_demo_runs_end_to_end_and_resumes(tmp_path):
    done = _demo(tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Demo finished." in done.stdout
    metrics = json.loads((tmp_path / "train" / "eval" / "val" / "metrics.json").read_text())
    assert metrics["num_examples"] > 0
    assert 0.0 <= metrics["auc"] <= 1.0
    assert (tmp_path / "train" / "eval" / "val" / "roc.png").stat().st_size > 10_000
    assert (tmp_path / "download" / "ISIC_2020_Training_GroundTruth_v2.csv").exists()

    again = _demo(tmp_path)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "isic-jax synth" not in again.stdout  # the generated download is reused
    assert "already prepared" in again.stdout
