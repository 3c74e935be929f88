"""`isic-jax pretrain` end to end on a tiny prepared synthetic dataset: the pretraining, `train`
and `cv` from it, and the refusals with their exit codes, nothing written over."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
from train_helpers import cache_env, compile_cache  # noqa: F401

REPO = pathlib.Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.usefixtures("compile_cache"), pytest.mark.slow]

CONFIG = '''
from isic_jax.configs import pretrain_byol, smoke


def get_config():
    config = smoke.get_config()
    config.pretrain = pretrain_byol.pretrain_section()
    config.pretrain.projector_hidden = 16
    config.pretrain.projection_dim = 8
    config.pretrain.predictor_hidden = 16
    config.data.stored_size = 40
    config.data.image_size = 32
    config.data.num_folds = 3
    config.data.augment.crop_scale = (1.0, 1.0)
    config.model.width = 4
    config.optim.name = "sgd"
    config.optim.learning_rate = 0.05
    config.optim.weight_decay = 0.0
    config.train.num_steps = 2
    config.train.eval_every = 2
    config.train.checkpoint_every = 1
    config.train.log_every = 1
    return config
'''


def _cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**cache_env(os.environ), "CI": "true", "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "isic_jax.testing.cli", *args], cwd=str(REPO),
                          env=env, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, pathlib.Path]:
    from isic_jax.data import prepare, synth

    root = tmp_path_factory.mktemp("pretrain_cli")
    synth.write_synthetic(root / "src", "isic2020", 48, 0, image_size=48)
    prepare.prepare(root / "src", root / "tfds", image_size=40, num_folds=3)
    config = root / "tiny_pretrain.py"
    config.write_text(CONFIG)
    return {"root": root, "data": root / "tfds", "config": config}


def _files(path: pathlib.Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(path)), p.stat().st_mtime_ns) for p in path.rglob("*"))


def test_pretrain_then_train_and_cv_from_it_and_the_refusals(setup) -> None:
    data = f"--config.data.data_dir={setup['data']}"
    config = f"--config={setup['config']}"
    byol = setup["root"] / "byol"
    done = _cli("pretrain", config, "--workdir", str(byol), data)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "k-NN probe at step 0" in done.stdout and "Pretraining done at step 2/2" in done.stdout
    record = json.loads((byol / "pretrain.json").read_text())
    assert record["probe"]["step"] == 2 and record["held_out_fold"] == 0

    # Fine-tuning from it: train (tiny smoke model, same width) and one fold of cv.
    smoke = ["--config=smoke", data, "--config.data.stored_size=40",
             "--config.data.image_size=32", "--config.train.num_steps=2",
             "--config.train.eval_every=2"]
    tiny = [*smoke, "--config.model.width=4", f"--config.model.init_from={byol}"]
    run = setup["root"] / "finetuned"
    done = _cli("train", *tiny, "--workdir", str(run))
    assert done.returncode == 0, done.stderr[-3000:]
    init = json.loads((run / "init_from.json").read_text())
    assert init["origin"] == "isic_jax-pretrain" and init["head"] == "reinitialized"
    assert any("projector" in line for line in init["ignored"])
    done = _cli("cv", *tiny, "--workdir", str(setup["root"] / "cv"), "--folds", "1")
    assert done.returncode == 0, done.stderr[-3000:]
    cv_init = json.loads((setup["root"] / "cv" / "fold_1" / "init_from.json").read_text())
    assert cv_init["origin"] == "isic_jax-pretrain"

    # Refusals: each one leaves the workdirs as they were.
    before_byol, before_run = _files(byol), _files(run)
    refused = [
        (("train", *tiny, "--workdir", str(byol)), 2, "is a pretraining workdir"),
        (("pretrain", config, data, "--workdir", str(run)), 2, "holds a training run"),
        (("cv", *tiny, "--workdir", str(byol)), 2, "is a pretraining workdir"),
        (("evaluate", "--workdir", str(byol)), 2, "has no classifier"),
        (("pretrain", config, data, "--workdir", str(byol), "--config.train.batch_size=1",
          "--config.eval.batch_size=1"), 2, "needs at least 2 per device"),
        (("pretrain", "--config=smoke", data, "--workdir", str(byol)), 2,
         "no config.pretrain section"),
        (("pretrain", config, "--config.data.data_dir=/nonexistent", "--workdir",
          str(setup["root"] / "none")), 4, "does not exist"),
        (("train", *smoke, "--config.model.width=8", f"--config.model.init_from={byol}",
          "--workdir", str(setup["root"] / "wide")), 6, "holds a resnet_tiny of width 4"),
    ]
    for args, status, message in refused:
        done = _cli(*args)
        assert done.returncode == status, (args, done.stderr[-2000:])
        assert message in done.stderr, (args, done.stderr[-2000:])
    assert _files(byol) == before_byol and _files(run) == before_run
    assert not (setup["root"] / "none").exists() and not (setup["root"] / "wide").exists()
