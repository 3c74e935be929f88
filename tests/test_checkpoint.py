"""Checkpoint retention (latest N + best), resume from the latest, restore on fewer devices."""

from __future__ import annotations

import csv
import json
import pathlib

import numpy as np
import pytest
from train_helpers import (  # noqa: F401
    compile_cache,
    make_data,
    restore_params,
    run_worker,
    standard_config,
    tiny_config,
)

pytestmark = pytest.mark.usefixtures("compile_cache")


def _checkpointer(path: pathlib.Path, **kwargs):
    from isic_jax.training import checkpointing

    return checkpointing.Checkpointer(path, **kwargs)


def test_keeps_latest_n_and_the_best_separately(tmp_path: pathlib.Path) -> None:
    from isic_jax.training import checkpointing

    state = {"w": np.arange(4, dtype=np.float32), "step": np.array(0, np.int32)}
    aucs = {1: 0.5, 2: 0.95, 3: 0.6, 4: None, 5: 0.7, 6: 0.65}
    with _checkpointer(tmp_path, keep=2, best_metric="auc") as ckpt:
        for step, auc in aucs.items():
            ckpt.save(
                step,
                {**state, "step": np.array(step, np.int32)},
                rng=np.array([0, step], np.uint32),
                data_iter=checkpointing.IteratorState({"next_index": step}),
                config={"seed": 0},
                metrics=None if auc is None else {"auc": auc, "per_class": {"a": 1}},
            )
        ckpt.wait_until_finished()
        # The best (2) survives although 4 newer checkpoints came after it, and the newest two
        # survive although they are worse than the best: resuming never loses the newest.
        assert ckpt.all_steps() == [2, 5, 6]
        assert ckpt.latest_step() == 6
        assert ckpt.best_step() == 2
        assert ckpt.resolve_step("latest") == 6
        assert ckpt.resolve_step("best") == 2
        assert ckpt.resolve_step("5") == 5
        with pytest.raises(FileNotFoundError, match="available"):
            ckpt.resolve_step(3)
        restored = ckpt.restore(6, {"w": np.zeros(4, np.float32), "step": np.array(0, np.int32)})
        assert int(restored.state["step"]) == 6 and restored.rng.tolist() == [0, 6]
        assert restored.config == {"seed": 0}
    assert json.loads((tmp_path / "6" / "data_iter" / "process_0-of-1.json").read_text()) == {
        "next_index": 6
    }


def test_min_mode_and_non_finite_metrics(tmp_path: pathlib.Path) -> None:
    state = {"w": np.zeros(2, np.float32)}
    with _checkpointer(tmp_path, keep=1, best_metric="loss", best_mode="min") as ckpt:
        for step, loss in [(1, 0.3), (2, float("nan")), (3, 0.2), (4, 0.9)]:
            ckpt.save(step, state, rng=np.zeros(2, np.uint32), data_iter=None, config={},
                      metrics={"loss": loss})
        ckpt.wait_until_finished()
        assert ckpt.best_step() == 3  # NaN ranks worst, not best
        assert ckpt.all_steps() == [3, 4]


@pytest.mark.slow
def test_resume_continues_from_latest_not_best(tmp_path: pathlib.Path, monkeypatch, capsys):
    from isic_jax.testing import runs
    from isic_jax.training import loop, predictions

    # Validation AUC 0.9 at step 3, then worse: the best checkpoint is older than the latest.
    fake_auc = iter([0.9, 0.5, 0.4])
    real_summarize = predictions.summarize

    def summarize(*args, **kwargs):
        return {**real_summarize(*args, **kwargs), "auc": next(fake_auc)}

    monkeypatch.setattr(loop, "summarize", summarize)
    config = standard_config(**{"train.keep_checkpoints": 1})
    data = make_data(config)
    runs.train(config, tmp_path, data=data)
    with _checkpointer(tmp_path / "checkpoints", read_only=True) as ckpt:
        assert ckpt.all_steps() == [3, 6] and ckpt.best_step() == 3
    capsys.readouterr()
    config.train.num_steps = 9
    result = runs.train(config, tmp_path, data=data)
    out = capsys.readouterr().out
    assert "checkpoints/6 (6/9)" in out
    assert "train.num_steps: 6 -> 9" in out  # the changed config is reported
    assert result["step"] == 9
    with _checkpointer(tmp_path / "checkpoints", read_only=True) as ckpt:
        assert ckpt.all_steps() == [3, 9]


@pytest.mark.slow
def test_checkpoint_from_4_devices_restores_and_evaluates_on_1(tmp_path: pathlib.Path) -> None:
    import jax

    from isic_jax.testing import runs


    assert jax.device_count() == 1
    workdir = tmp_path / "run"
    dump = tmp_path / "state.npz"
    out = run_worker("train", {"workdir": str(workdir), "dump": str(dump),
                               "overrides": {"train.parallelism": "pmap"}})
    assert out["step"] == 6
    written = dict(np.load(dump))
    restored = restore_params(workdir)  # on this process's single device
    assert written.keys() == restored.keys()
    for key in written:
        np.testing.assert_array_equal(restored[key], written[key], err_msg=key)

    config = tiny_config()
    result = runs.evaluate(workdir, "val", "latest", data=make_data(config))
    assert result["step"] == 6 and result["num_examples"] == 12
    # The same checkpoint on 4 devices (during training) and on 1 gives the same figures.
    assert result["loss"] == pytest.approx(out["val_loss"], abs=1e-5)
    assert result["auc"] == pytest.approx(out["val_auc"], abs=1e-6)
    metrics = json.loads((workdir / "eval" / "val" / "metrics.json").read_text())
    assert metrics["step"] == 6 and "pauc_80" in metrics
    with open(workdir / "eval" / "val" / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12
    assert set(rows[0]) == {"image_id", "patient_id", "label", "index", "prob_benign",
                            "prob_malignant", "malignant_probability", "malignant_at_threshold"}
    assert all(abs(float(r["prob_benign"]) + float(r["prob_malignant"]) - 1) < 1e-4 for r in rows)
    assert sorted(int(r["index"]) for r in rows) == list(range(12))  # each example once


# ------------------------------------------------------------------------------ damaged folders


def _digest(folder: pathlib.Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `folder` (to prove nothing was changed)."""
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _truncate_state_data(step_dir: pathlib.Path) -> None:
    """Halves the largest array-data file of a checkpoint's state (OCDBT data under state/d)."""
    path = max((p for p in (step_dir / "state" / "d").iterdir()), key=lambda p: p.stat().st_size)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_damaged_checkpoints_fall_back_to_the_previous_good_one(tmp_path, capsys) -> None:
    import shutil

    from isic_jax.testing import runs


    config = standard_config()
    data = make_data(config)
    runs.train(config, tmp_path, data=data)  # checkpoints 3 and 6
    final = restore_params(tmp_path)
    ckpts = tmp_path / "checkpoints"

    # A truncated data file in the newest checkpoint: said, step 3 used, 6 set aside and redone.
    _truncate_state_data(ckpts / "6")
    capsys.readouterr()
    assert runs.train(config, tmp_path, data=data)["step"] == 6
    out = capsys.readouterr().out
    assert f"checkpoint {ckpts}/6 cannot be restored" in out
    assert "checkpoints/3 (3/6)" in out
    assert (ckpts / "6.corrupt").is_dir()  # kept, not deleted
    redone = restore_params(tmp_path)
    assert all(np.array_equal(final[k], redone[k]) for k in final)  # bit-exact again

    # A missing item (the RNG key) in the newest checkpoint: the same fallback.
    shutil.rmtree(ckpts / "6" / "rng")
    capsys.readouterr()
    assert runs.train(config, tmp_path, data=data)["step"] == 6
    out = capsys.readouterr().out
    assert f"checkpoint {ckpts}/6 cannot be restored" in out and "rng" in out
    assert "checkpoints/3 (3/6)" in out
    assert (ckpts / "6.corrupt.1").is_dir()
    redone = restore_params(tmp_path)
    assert all(np.array_equal(final[k], redone[k]) for k in final)


def test_no_readable_checkpoint_stops_instead_of_starting_over(tmp_path) -> None:
    from isic_jax.testing import runs
    from isic_jax.training import checkpointing

    config = standard_config(**{"train.num_steps": 3})
    data = make_data(config)
    runs.train(config, tmp_path, data=data)  # checkpoint 3 only
    step_dir = tmp_path / "checkpoints" / "3"
    (step_dir / "state" / "_METADATA").write_text('{"tree_metadata": {')  # truncated JSON
    before = _digest(tmp_path)
    with pytest.raises(checkpointing.CheckpointError) as info:
        runs.train(config, tmp_path, data=data)
    message = str(info.value)
    assert "None of the 1 checkpoint(s)" in message and "step 3:" in message
    assert "Not starting from scratch" in message and "new --workdir" in message
    assert _digest(tmp_path) == before  # nothing moved, deleted or written


def test_incomplete_save_only_is_reported_and_the_run_starts_over(tmp_path, capsys) -> None:
    """A folder holding only an interrupted save (`<step>.orbax-checkpoint-tmp`, as a kill in the
    first save leaves) has no checkpoint: the run says so and starts from step 0."""
    from isic_jax.testing import runs

    config = standard_config(**{"train.num_steps": 3})
    tmp = tmp_path / "checkpoints" / "3.orbax-checkpoint-tmp"
    (tmp / "state").mkdir(parents=True)
    assert runs.train(config, tmp_path, data=make_data(config))["step"] == 3
    out = capsys.readouterr().out
    assert f"Ignoring {tmp}: a save that never finished" in out
    assert "Resuming" not in out
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["3"]
