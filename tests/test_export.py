"""`isic-jax export`: inference variables, the jax.export artefact, model.json.

A run folder is made in-process (a `resnet_tiny` TrainState with EMA weights, saved through
`checkpointing.Checkpointer`), so no training runs here. `make_workdir` is reused by
test_predict.py.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

# The checkpoint "best" picks (higher auc) and the latest one.
BEST_STEP, LATEST_STEP = 3, 5


def tiny_export_config(task: str = "binary", release: str = "isic2020"):
    """configs/smoke.py, smaller: resnet_tiny width 4, stored 48 px, model input 40 px, EMA on,
    colour constancy on (so the exported function carries it)."""
    from isic_jax.configs import smoke

    config = smoke.get_config()
    config.data.release = release
    config.data.task = task
    config.data.stored_size = 48
    config.data.image_size = 40
    config.data.augment.color_constancy = True
    config.model.width = 4
    config.optim.ema_decay = 0.9
    return config


def _state(config, num_classes: int, seed: int):
    """A TrainState whose EMA weights and BatchNorm statistics differ from the live ones."""
    from isic_jax.models import create_model
    from isic_jax.training import state as train_state
    from isic_jax.training.optim import create_optimizer

    model = create_model(config.model, num_classes)
    tx, _ = create_optimizer(config.optim, total_steps=1, steps_per_epoch=1)
    init_rng, _ = train_state.seed_keys(config.seed)
    state = train_state.create_train_state(
        model, tx, init_rng, int(config.data.image_size), use_ema=True
    )
    rng = np.random.default_rng(seed)

    def noise(tree, scale, positive=False):
        def one(x):
            z = rng.standard_normal(x.shape).astype(np.float32) * scale
            return np.asarray(x) + (np.abs(z) if positive else z)

        return jax.tree.map(one, tree)

    ema = {"params": noise(state.params, 0.1),
           "batch_stats": noise(state.batch_stats, 0.3, positive=True)}
    return state.replace(ema=jax.tree.map(np.asarray, ema))


def make_workdir(path: pathlib.Path, task: str = "binary", release: str = "isic2020"):
    """A run folder like `isic-jax train` leaves: config.json + checkpoints at BEST_STEP (auc
    0.9) and LATEST_STEP (auc 0.7), with different weights.

    Returns:
      (config, {step: TrainState}).
    """
    from isic_jax import config_utils
    from isic_jax.inference import export
    from isic_jax.training import checkpointing
    from isic_jax.training import state as train_state

    config = tiny_export_config(task, release)
    num_classes = len(export.class_names_for(config))
    config_utils.save_config(config, path)
    _, rng = train_state.seed_keys(config.seed)
    states = {step: _state(config, num_classes, seed)
              for step, seed in ((BEST_STEP, 1), (LATEST_STEP, 2))}
    with checkpointing.Checkpointer(path / "checkpoints", best_metric="auc") as ckpt:
        for step, auc in ((BEST_STEP, 0.9), (LATEST_STEP, 0.7)):
            ckpt.save(step, states[step], rng=rng, data_iter=None,
                      config=config_utils.config_to_dict(config), metrics={"auc": auc})
    return config, states


def eval_probs(config, state, images: np.ndarray) -> np.ndarray:
    """What evaluation computes: `steps.eval_step` on uint8 images [B, S, S, 3]."""
    from isic_jax.inference import export
    from isic_jax.models import create_model
    from isic_jax.training import steps

    model = create_model(config.model, len(export.class_names_for(config)))
    out = jax.jit(lambda s, x: steps.eval_step(s, {"image": x}, model=model,
                                               augment=steps.augment_config(config)))(
        state, images)
    return np.asarray(out)


def random_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = tmp_path_factory.mktemp("export_run")
    config, states = make_workdir(path)
    return path, config, states


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    from isic_jax.inference import export

    workdir, _, _ = run
    out = tmp_path_factory.mktemp("exports") / "best"
    meta = export.export_checkpoint(workdir, out, "best")
    return out, meta


def test_metadata_describes_model_classes_and_preprocessing(exported) -> None:
    out, meta = exported
    assert meta == json.loads((out / "model.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == [
        "MODEL_CARD.md", "checksums.json", "config.json", "model.jax_export", "model.json",
        "model_card.json", "variables"]
    assert meta["model"]["name"] == "resnet_tiny" and meta["model"]["num_classes"] == 2
    assert meta["class_names"] == ["benign", "malignant"] and meta["malignant_classes"] == [1]
    assert meta["checkpoint"]["step"] == BEST_STEP and meta["checkpoint"]["metrics"]["auc"] == 0.9
    assert meta["variables"]["ema"] is True
    assert meta["input"] == {
        "image_size": 40, "shape": [None, 40, 40, 3], "dtype": "uint8", "layout": "NHWC",
        "channel_order": "RGB", "value_range": [0, 255], "normalized_inside": True}
    pre = meta["preprocessing"]
    assert pre["stored_size"] == 48 and pre["image_size"] == 40
    assert pre["color_constancy"]["enabled"] is True
    assert pre["inside_exported_function"] == ["color_constancy", "normalize"]
    assert pre["mean"] == [0.485, 0.456, 0.406] and pre["std"] == [0.229, 0.224, 0.225]
    info = meta["export"]
    assert "cpu" in info["platforms"] and info["symbolic_batch"] == "b"
    assert set(info["platforms"]) | set(info["platforms_failed"]) == {"cpu", "cuda", "tpu"}
    assert info["verified_on"] == "cpu" and info["verified_max_abs_diff"] <= info["tolerance"]


def test_exported_model_equals_eval_step_with_ema_weights(run, exported) -> None:
    from isic_jax.inference import export

    _, config, states = run
    out, meta = exported
    model = export.load_exported(out)
    images = random_images(5, 40, seed=3)
    got = np.asarray(model.call(images))
    want = eval_probs(config, states[BEST_STEP], images)
    assert got.shape == (5, 2) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=meta["export"]["tolerance"], rtol=0)
    # Any batch size (symbolic batch) gives the same rows.
    np.testing.assert_allclose(np.asarray(model.call(images[:1])), want[:1], atol=1e-5, rtol=0)
    # The live weights (no EMA) and the other checkpoint give other numbers: the test can fail.
    live = eval_probs(config, states[BEST_STEP].replace(ema={}), images)
    assert np.max(np.abs(live - want)) > 1e-3
    other = eval_probs(config, states[LATEST_STEP], images)
    assert np.max(np.abs(other - want)) > 1e-3


def test_variables_are_the_ema_ones_without_optimizer_state(run, exported) -> None:
    from isic_jax.inference import export

    _, _, states = run
    out, _ = exported
    restored = export.restore_variables(out)
    assert set(restored) == {"params", "batch_stats"}
    want = states[BEST_STEP].ema
    for got, ref in zip(jax.tree.leaves(restored), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
    assert jax.tree.structure(restored) == jax.tree.structure(want)


# What a user without isic_jax runs (the snippet in docs/export_predict.md), plus a guard that
# isic_jax is not importable in that process.
PLAIN_JAX = textwrap.dedent(
    """
    import sys

    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name == "isic_jax" or name.startswith("isic_jax."):
                raise ImportError("isic_jax is blocked in this test")

    sys.meta_path.insert(0, _Block())

    import json, numpy as np, jax
    from jax import export
    export_dir = sys.argv[1]
    meta = json.load(open(export_dir + "/model.json"))
    with open(export_dir + "/model.jax_export", "rb") as f:
        model = export.deserialize(bytearray(f.read()))
    s = meta["input"]["image_size"]
    images = np.load(sys.argv[2])
    assert images.shape[1:] == (s, s, 3) and images.dtype == np.uint8
    probs = np.asarray(model.call(images))
    np.save(sys.argv[3], probs)
    try:
        import isic_jax  # noqa: F401
        print("ISIC_JAX_IMPORTABLE")
    except ImportError:
        pass
    print("LOADED", [m for m in sys.modules if m.startswith("isic_jax")])
    """
)


def test_artefact_runs_with_plain_jax_in_a_process_without_isic_jax(exported, tmp_path) -> None:
    from isic_jax.inference import export

    out, _ = exported
    images = random_images(3, 40, seed=4)
    np.save(tmp_path / "images.npy", images)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["JAX_PLATFORMS"] = "cpu"
    result = subprocess.run(
        [sys.executable, "-I", "-c", PLAIN_JAX, str(out), str(tmp_path / "images.npy"),
         str(tmp_path / "probs.npy")],
        cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ISIC_JAX_IMPORTABLE" not in result.stdout and "LOADED []" in result.stdout
    got = np.load(tmp_path / "probs.npy")
    want = np.asarray(export.load_exported(out).call(images))
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


def test_platform_that_cannot_lower_is_left_out_and_recorded(run, monkeypatch) -> None:
    from isic_jax.inference import export

    _, config, states = run
    forward = export.inference_forward(config, states[BEST_STEP].eval_variables(), 2)
    real = export._export_for

    def no_tpu(jitted, spec, platforms):
        if "tpu" in platforms:
            raise NotImplementedError("no TPU lowering here")
        return real(jitted, spec, platforms)

    monkeypatch.setattr(export, "_export_for", no_tpu)
    exp, covered, failed = export.export_forward(forward, 40, ("cpu", "cuda", "tpu"))
    assert covered == ["cpu", "cuda"] and list(exp.platforms) == ["cpu", "cuda"]
    assert "no TPU lowering here" in failed["tpu"]


def _cli(args: list[str], devices: int = 1) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", CI="true",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return subprocess.run([sys.executable, "-m", "isic_jax", *args], cwd=str(REPO), env=env,
                          capture_output=True, text=True, timeout=300, check=False)


def test_cli_exports_latest_and_refuses_to_overwrite(run, tmp_path) -> None:
    workdir, _, _ = run
    out = tmp_path / "latest"
    result = _cli(["export", "--workdir", str(workdir), "--output", str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"step {LATEST_STEP}" in result.stdout and "platforms: cpu" in result.stdout
    meta = json.loads((out / "model.json").read_text())
    assert meta["checkpoint"]["step"] == LATEST_STEP

    again = _cli(["export", "--workdir", str(workdir), "--output", str(out), "--overwrite",
                  "--checkpoint", "7"])
    assert again.returncode == 2 and "no checkpoint for step 7" in again.stderr
    assert json.loads((out / "model.json").read_text()) == meta  # left as it was


def test_output_in_the_way_is_refused(run, tmp_path) -> None:
    from isic_jax.inference import export

    workdir, _, _ = run
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        export.export_checkpoint(workdir, tmp_path)
    with pytest.raises(FileExistsError, match="not an earlier export"):
        export.export_checkpoint(workdir, tmp_path, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"
