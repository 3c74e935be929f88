"""The training loop: exact resume, the NaN guard, logs. One CPU device, in-memory data."""

from __future__ import annotations

import io
import json
import os
import pathlib
import signal

import numpy as np
import pytest
from train_helpers import (  # noqa: F401
    compile_cache,
    make_data,
    restore_params,
    standard_config,
    tiny_config,
)

pytestmark = pytest.mark.usefixtures("compile_cache")


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, request) -> tuple[pathlib.Path, dict]:
    """The uninterrupted reference run (6 steps, checkpoints at 3 and 6)."""
    from isic_jax.testing import runs

    request.getfixturevalue("compile_cache")

    workdir = tmp_path_factory.mktemp("full")
    config = standard_config()
    result = runs.train(config, workdir, data=make_data(config))
    assert result["step"] == 6
    return workdir, result


def _assert_same_final_state(full: pathlib.Path, other: pathlib.Path) -> None:
    a = restore_params(full)
    b = restore_params(other)
    assert a.keys() == b.keys()
    assert any("ema" in k for k in a) and any("mini_step" in k for k in a)
    different = [k for k in a if not np.array_equal(a[k], b[k])]
    assert not different, f"not bit-identical after resume: {different[:5]}"
    # Not trivially equal: training moved the parameters.
    first = restore_params(full, 3)
    assert any(not np.array_equal(first[k], a[k]) for k in a if "params" in k)


def test_interrupted_run_resumes_bit_exactly(full_run, tmp_path: pathlib.Path, capsys) -> None:

    from isic_jax.testing import runs
    full_dir, full = full_run
    config = standard_config()
    data = make_data(config)
    # "Killed" after step 4: the latest checkpoint is step 3, step 4 is lost and redone.
    part = runs.train(config, tmp_path, data=data, stop_after_step=4)
    assert part["step"] == 4
    capsys.readouterr()
    resumed = runs.train(config, tmp_path, data=data)
    assert "checkpoints/3 (3/6)" in capsys.readouterr().out
    assert resumed["step"] == 6
    _assert_same_final_state(full_dir, tmp_path)
    # The same validation figures at the end.
    assert resumed["val"]["loss"] == full["val"]["loss"]

    # Logs: TensorBoard events, the validation history and the resolved config.
    assert list((full_dir / "tensorboard").glob("events.out.tfevents.*"))
    history = [json.loads(x) for x in (full_dir / "eval_history.jsonl").open()]
    assert [h["step"] for h in history] == [3, 6]
    saved = json.loads((full_dir / "config.json").read_text())
    assert saved["optim"]["accumulation_steps"] == 2


class _SigtermAt:
    """Sends this process SIGTERM when batch `at` is drawn (as a preemption would)."""

    def __init__(self, it, at: int):
        self._it, self._at, self._n = it, at, 0

    def __iter__(self):
        return self

    def __next__(self):
        self._n += 1
        if self._n == self._at:
            os.kill(os.getpid(), signal.SIGTERM)
        return next(self._it)

    def get_state(self):
        return self._it.get_state()

    def set_state(self, state):
        self._it.set_state(state)


def test_sigterm_saves_and_resumes_bit_exactly(full_run, tmp_path: pathlib.Path, capsys) -> None:
    from isic_jax.testing import runs
    from isic_jax.training import checkpointing

    full_dir, _ = full_run
    config = standard_config()
    data = make_data(config)
    original = data.train_iterator
    data.train_iterator = lambda: _SigtermAt(original(), at=2)
    stopped = runs.train(config, tmp_path, data=data)
    assert "Stopped by signal" in capsys.readouterr().out
    assert stopped["step"] < 6
    with checkpointing.Checkpointer(tmp_path / "checkpoints", read_only=True) as ckpt:
        assert ckpt.latest_step() == stopped["step"]  # saved right where it stopped
    data.train_iterator = original
    assert runs.train(config, tmp_path, data=data)["step"] == 6
    _assert_same_final_state(full_dir, tmp_path)


def test_progress_display_modes(monkeypatch, tmp_path: pathlib.Path, capsys) -> None:
    from isic_jax import logging_utils

    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.delenv("CI", raising=False)
    assert logging_utils.use_progress_bar(True, Tty())
    assert not logging_utils.use_progress_bar(True, io.StringIO())  # not a terminal
    assert not logging_utils.use_progress_bar(False, Tty())
    monkeypatch.setenv("CI", "true")
    assert not logging_utils.use_progress_bar(True, Tty())
    progress = logging_utils.Progress(10, initial=2, bar=False)
    progress.update(4)
    progress.log(4, {"loss": 0.5, "img/s": "12.0"})
    assert capsys.readouterr().out == "[train step  4/10] loss 0.5000  img/s 12.0\n"
    silent = logging_utils.Progress(10, enabled=False)
    silent.log(1, {"loss": 1.0})
    assert capsys.readouterr().out == ""
    writer = logging_utils.MetricWriter(tmp_path / "tb", enabled=False)
    writer.write_scalars(1, {"a": 1.0})
    writer.close()
    assert not (tmp_path / "tb").exists()  # only process 0 writes


def test_nan_loss_stops_and_keeps_last_good_checkpoint(
    tmp_path: pathlib.Path, monkeypatch
) -> None:
    import jax
    import jax.numpy as jnp

    from isic_jax.testing import runs
    from isic_jax.training import checkpointing, loop, steps

    # Metrics are pulled every 5 steps, checkpoints every 2: the NaN at step 3 must still be
    # caught before the step-4 checkpoint is written.
    config = standard_config(**{"train.log_every": 5, "train.checkpoint_every": 2,
                                "train.eval_every": 100})
    data = make_data(config)
    real_step = steps.train_step

    def poisoned_step(state, batch, rng, **kwargs):
        # Step 3 diverges: NaN loss and NaN parameters from then on.
        new_state, metrics = real_step(state, batch, rng, **kwargs)
        bad = new_state.step == 3
        params = jax.tree.map(lambda p: jnp.where(bad, jnp.nan, p), new_state.params)
        metrics = {**metrics, "loss": jnp.where(bad, jnp.nan, metrics["loss"])}
        return new_state.replace(params=params), metrics

    monkeypatch.setattr(steps, "train_step", poisoned_step)
    with pytest.raises(loop.NonFiniteError) as info:
        runs.train(config, tmp_path, data=data)
    message = str(info.value)
    assert "Non-finite training loss" in message and "step 3" in message
    assert "(step 2) is the last good one" in message
    ckpt = checkpointing.Checkpointer(tmp_path / "checkpoints", read_only=True)
    try:
        assert ckpt.all_steps() == [2]
    finally:
        ckpt.close()
    state = restore_params(tmp_path)
    assert all(np.all(np.isfinite(v)) for v in state.values() if v.dtype.kind == "f")


def test_schedule_lengths() -> None:

    from isic_jax.training import loop
    config = tiny_config(**{"train.num_steps": -1, "train.num_epochs": 2.5})
    assert loop.schedule_lengths(config, num_train=33) == (10, 4)  # 33 // 8 = 4 per epoch
    config.train.num_steps = 7
    assert loop.schedule_lengths(config, num_train=33) == (7, 4)
