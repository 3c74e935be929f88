"""The README's main job (`isic-jax demo`) end to end from a built wheel, in a folder outside the
checkout: synth -> prepare -> train -> evaluate through the real commands, a second run that
reuses every finished step, and a user's own config file that imports the shipped default."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel_site(tmp_path_factory) -> pathlib.Path:
    """The project built as a wheel and installed (without dependencies) into its own folder."""
    root = tmp_path_factory.mktemp("wheel")
    dist, site = root / "dist", root / "site"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(dist), str(REPO)], check=True,
                   capture_output=True, timeout=600)
    (wheel,) = dist.glob("isic_jax-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=600)
    return site


def _run(site: pathlib.Path, cwd: pathlib.Path, *args: str) -> subprocess.CompletedProcess:
    # The wheel's copy first on the path: ahead of this checkout's editable install.
    env = {**os.environ, "CI": "true", "PYTHONPATH": str(site)}
    return subprocess.run(
        [sys.executable, *args], cwd=str(cwd), capture_output=True, text=True, timeout=600,
        env=env, stdin=subprocess.DEVNULL,
    )


def test_wheel_lists_every_package_of_the_tree(wheel_site) -> None:
    packages = {".".join(p.parent.relative_to(REPO).parts)
                for p in (REPO / "isic_jax").rglob("__init__.py")}
    installed = {".".join(p.parent.relative_to(wheel_site).parts)
                 for p in (wheel_site / "isic_jax").rglob("__init__.py")}
    assert installed == packages | {"isic_jax.configs"}
    shipped = {p.name for p in (wheel_site / "isic_jax" / "configs").glob("*.py")}
    assert shipped == {p.name for p in (REPO / "configs").glob("*.py")}


@pytest.mark.slow
def test_demo_from_the_wheel_runs_end_to_end_resumes_and_takes_user_configs(
    wheel_site, tmp_path
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = _run(wheel_site, elsewhere, "-c",
                 "import isic_jax, isic_jax.configs.default as d; print(isic_jax.__file__, "
                 "d.__file__)")
    assert where.returncode == 0, where.stderr[-2000:]
    assert all(path.startswith(str(wheel_site)) for path in where.stdout.split())

    demo = ["-m", "isic_jax", "demo", "--workdir=run", "--num-images=80", "--num-epochs=1"]
    done = _run(wheel_site, elsewhere, *demo)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Demo finished." in done.stdout
    workdir = elsewhere / "run"
    metrics = json.loads((workdir / "train" / "eval" / "val" / "metrics.json").read_text())
    assert metrics["num_examples"] > 0
    assert 0.0 <= metrics["auc"] <= 1.0
    assert (workdir / "train" / "eval" / "val" / "roc.png").stat().st_size > 10_000
    assert (workdir / "download" / "ISIC_2020_Training_GroundTruth_v2.csv").exists()

    again = _run(wheel_site, elsewhere, *demo)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "isic-jax synth" not in again.stdout  # the generated download is reused
    assert "already prepared" in again.stdout

    # A user's own config, in a folder of its own, importing the default preset as documented.
    mine = tmp_path / "my_configs" / "tiny.py"
    mine.parent.mkdir()
    mine.write_text(textwrap.dedent("""
        from isic_jax.configs import default


        def get_config():
            config = default.get_config()
            config.data.stored_size = 128
            config.data.image_size = 72
            config.data.num_workers = 0
            config.model.name = "resnet_tiny"
            config.model.width = 8
            config.model.dtype = "float32"
            config.train.batch_size = 8
            config.train.num_steps = 2
            config.train.eval_every = 2
            config.train.checkpoint_every = 2
            config.eval.batch_size = 8
            return config
    """))
    trained = _run(wheel_site, elsewhere, "-m", "isic_jax", "train", f"--config={mine}",
                   "--workdir=mine", f"--config.data.data_dir={workdir / 'tfds'}")
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    saved = json.loads((elsewhere / "mine" / "config.json").read_text())
    assert saved["model"]["name"] == "resnet_tiny" and saved["train"]["num_steps"] == 2
    assert (elsewhere / "mine" / "checkpoints" / "2").is_dir()
