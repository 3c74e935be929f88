"""End to end through the CLI: synth -> prepare -> train (2 fake devices) -> evaluate.

Every command runs as `python -m isic_jax ...` in a subprocess, as a user would run it.
"""

from __future__ import annotations

import csv
import json
import os
import pathlib
import subprocess
import sys

import pytest
from test_train_lib import cache_env, compile_cache  # noqa: F401

REPO = pathlib.Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("compile_cache")


def _run(args: list[str], devices: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    env = cache_env(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["CI"] = "true"  # plain progress lines, no bar
    return subprocess.run(
        [sys.executable, "-m", "isic_jax", *args], cwd=str(REPO), env=env,
        capture_output=True, text=True, timeout=timeout, check=False,
    )


def _ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> pathlib.Path:
    pytest.importorskip("isic_jax.datasets.isic")
    root = tmp_path_factory.mktemp("e2e")
    _ok(_run(["synth", "--output", str(root / "src"), "--format", "isic2020",
              "--num-images", "60"]))
    _ok(_run(["prepare", "--source", str(root / "src"), "--data-dir", str(root / "tfds"),
              "--image-size", "96"]))
    return root / "tfds"


@pytest.fixture(scope="module")
def trained(data_dir: pathlib.Path, tmp_path_factory) -> tuple[pathlib.Path, str]:
    workdir = tmp_path_factory.mktemp("run") / "smoke"
    out = _ok(_run(["train", "--config", "configs/smoke.py", "--workdir", str(workdir),
                    f"--config.data.data_dir={data_dir}"]))
    return workdir, out


def test_train_writes_checkpoints_logs_and_config(trained) -> None:
    workdir, out = trained
    assert "on 2 cpu device(s) (pmap)" in out
    assert "[train step 6/6]" in out and "[val step 6/6]" in out and "img/s" in out
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) \
        == [3, 6]
    config = json.loads((workdir / "config.json").read_text())
    assert config["model"]["name"] == "resnet_tiny"
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))


def test_second_train_resumes_from_the_workdir(trained, data_dir) -> None:
    workdir, _ = trained
    out = _ok(_run(["train", "--config", "configs/smoke.py", "--workdir", str(workdir),
                    f"--config.data.data_dir={data_dir}"]))
    assert "Resuming from" in out and "checkpoints/6 (6/6)" in out
    assert "Nothing to do" in out


def test_evaluate_writes_metrics_and_predictions(trained) -> None:
    workdir, _ = trained
    out = _ok(_run(["evaluate", "--workdir", str(workdir)]))
    assert "metrics.json" in out
    metrics = json.loads((workdir / "eval" / "val" / "metrics.json").read_text())
    assert metrics["step"] == 6 and metrics["split"] == "val"
    for key in ("auc", "pauc_80", "balanced_accuracy", "sensitivity", "specificity", "loss"):
        assert key in metrics
    with open(workdir / "eval" / "val" / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == metrics["num_examples"] > 0
    assert rows[0]["image_id"].startswith("ISIC_")
    assert len({r["image_id"] for r in rows}) == len(rows)

    # Another split of the prepared dataset, the best checkpoint, one device.
    _ok(_run(["evaluate", "--workdir", str(workdir), "--split", "fold1", "--checkpoint",
              "best"], devices=1))
    other = json.loads((workdir / "eval" / "fold1" / "metrics.json").read_text())
    assert other["split"] == "fold1" and other["step"] in (3, 6)

    bad = _run(["evaluate", "--workdir", str(workdir), "--split", "nope"], devices=1)
    assert bad.returncode == 2 and "unknown split 'nope'" in bad.stderr


def test_nan_loss_exits_nonzero_and_keeps_last_good_checkpoint(data_dir, tmp_path) -> None:
    workdir = tmp_path / "nan"
    result = _run(["train", "--config", "configs/smoke.py", "--workdir", str(workdir),
                   f"--config.data.data_dir={data_dir}", "--config.optim.learning_rate=1e30",
                   "--config.train.checkpoint_every=1", "--config.train.log_every=1"])
    assert result.returncode == 3, result.stderr[-3000:]
    assert "Non-finite" in result.stderr and "is the last good one" in result.stderr
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and f"(step {steps[-1]}) is the last good one" in result.stderr
