"""Multi-sample dropout on the head, and stochastic weight averaging: snapshots, the BatchNorm
recomputation, which weights evaluation uses, exact resume mid-SWA, older checkpoints."""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_helpers import (  # noqa: F401
    compile_cache,
    make_data,
    restore_params,
    standard_config,
    tiny_config,
)

from isic_jax.models import create_model, init_variables
from isic_jax.training import swa

SWA = {"optim.swa_start_epoch": 0.5, "optim.swa_every_epochs": 0.25, "optim.swa_bn_batches": 2}


# ------------------------------------------------------------------------------ MSD


def _model(**model):
    config = tiny_config(**{f"model.{k}": v for k, v in model.items()})
    return create_model(config.model, 3)


def test_msd_keeps_the_parameters_and_shapes_and_eval_is_deterministic() -> None:
    plain, msd = _model(dropout=0.5), _model(dropout=0.5, msd_samples=8)
    variables = init_variables(plain, jax.random.PRNGKey(0), 32)
    same = init_variables(msd, jax.random.PRNGKey(0), 32)
    assert jax.tree.structure(variables) == jax.tree.structure(same)
    assert "head" in variables["params"]  # the head keeps its name (checkpoints, pretrained)
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 32, 32, 3))
    # Evaluation: dropout off, one head application: the same logits as without MSD, every time.
    eval_msd = msd.apply(variables, x, train=False)
    assert eval_msd.shape == (4, 3) and eval_msd.dtype == jnp.float32
    np.testing.assert_array_equal(eval_msd, msd.apply(variables, x, train=False))
    np.testing.assert_allclose(eval_msd, plain.apply(variables, x, train=False), atol=1e-6)

    def train_logits(model, seed):
        logits, _ = model.apply(variables, x, train=True, mutable=["batch_stats"],
                                rngs={"dropout": jax.random.PRNGKey(seed)})
        return np.asarray(logits)

    no_dropout = train_logits(_model(dropout=0.0), 0)  # same BatchNorm batch statistics
    assert train_logits(msd, 0).shape == (4, 3)
    assert not np.allclose(train_logits(msd, 0), train_logits(msd, 1))  # masks vary with the key
    # The average over K masks is an estimate of the no-dropout logits with less variance.
    err = {k: np.mean([np.abs(train_logits(_model(dropout=0.5, msd_samples=k), s)
                              - no_dropout).mean() for s in range(4)]) for k in (1, 32)}
    assert err[32] < 0.5 * err[1], err


# ------------------------------------------------------------------------------ SWA units


def test_snapshot_average_equals_the_mean_of_the_snapshots() -> None:
    rng = np.random.default_rng(0)
    snaps = [{"w": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=4)
              .astype(np.float32)} for _ in range(5)]
    stats = [{"mean": rng.normal(size=4).astype(np.float32)} for _ in range(5)]
    state = swa.init_state(snaps[0], stats[0])
    for p, s in zip(snaps, stats, strict=True):
        state = jax.jit(swa.add_snapshot)(state, p, s)
    assert int(state["count"]) == 5
    for key in ("w", "b"):
        np.testing.assert_allclose(state["params"][key], np.mean([s[key] for s in snaps], 0),
                                   atol=1e-6)
    np.testing.assert_allclose(state["batch_stats"]["mean"],
                               np.mean([s["mean"] for s in stats], 0), atol=1e-6)


def test_snapshots_are_taken_on_the_schedule_only() -> None:
    schedule = swa.SwaSchedule(start=4, every=3)
    assert schedule.snapshot_steps(11) == [4, 7, 10]
    state = swa.init_state({"w": jnp.zeros(2)}, {})
    step_fn = jax.jit(lambda s, step, w: swa.maybe_snapshot(s, step, {"w": w}, {}, schedule))
    taken = []
    for step in range(1, 12):
        state = step_fn(state, step, jnp.full(2, float(step)))
        taken.append(int(state["count"]))
    assert taken == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3]
    np.testing.assert_allclose(state["params"]["w"], np.mean([4, 7, 10]))
    # Not on a step that applied no update (inside gradient accumulation).
    skipped = swa.maybe_snapshot(swa.init_state({"w": jnp.ones(2)}, {}), 4, {"w": jnp.ones(2)},
                                 {}, schedule, applied=False)
    assert int(skipped["count"]) == 0


def test_schedule_from_config_rounds_to_updates() -> None:
    config = tiny_config(**{"optim.swa_start_epoch": 0.5, "optim.swa_every_epochs": 0.25,
                            "optim.accumulation_steps": 2})
    schedule = swa.SwaSchedule.from_config(config.optim, total_steps=20, steps_per_epoch=4)
    assert (schedule.start, schedule.every) == (2, 2)  # every 1 micro-step -> every update
    assert swa.SwaSchedule.from_config(tiny_config().optim, 20, 4) is None  # off by default


def test_eval_variables_switch_to_swa_once_it_has_a_snapshot() -> None:
    from isic_jax.training.state import TrainState

    live = {"params": {"w": jnp.zeros(2)}, "batch_stats": {"m": jnp.zeros(1)}}
    ema = {"params": {"w": jnp.ones(2)}, "batch_stats": {"m": jnp.ones(1)}}
    averaged = swa.init_state({"w": jnp.full(2, 5.0)}, {"m": jnp.full(1, 5.0)})
    state = TrainState(step=jnp.zeros((), jnp.int32), opt_state=(), ema=ema, swa=averaged,
                       **live)
    np.testing.assert_array_equal(state.eval_variables()["params"]["w"], 1.0)  # EMA first
    counted = state.replace(swa={**averaged, "count": jnp.ones((), jnp.int32)})
    got = jax.jit(lambda s: s.eval_variables())(counted)  # traceable
    np.testing.assert_array_equal(got["params"]["w"], 5.0)
    np.testing.assert_array_equal(got["batch_stats"]["m"], 5.0)


# ------------------------------------------------------------------------------ BatchNorm


def test_batchnorm_recompute_is_the_mean_of_the_batch_statistics() -> None:
    from isic_jax.training import parallel, steps
    from isic_jax.training.optim import create_optimizer
    from isic_jax.training.state import create_train_state

    config = tiny_config(**SWA)
    data = make_data(config)
    model = create_model(config.model, 2)
    tx, _ = create_optimizer(config.optim, 10, 4)
    state = create_train_state(model, tx, jax.random.PRNGKey(0), 32, use_swa=True)
    state = state.replace(swa=swa.add_snapshot(state.swa, state.params, state.batch_stats))
    par = parallel.DataParallel.create("jit", jax.devices()[:1])
    rng = jax.random.PRNGKey(5)
    augment = steps.augment_config(config)
    recompute = swa.BatchNormRecompute(model, par, augment, data, rng, num_batches=2)
    new = recompute(state)
    before, after = state.swa["batch_stats"], new.swa["batch_stats"]
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(before),
                                                      jax.tree.leaves(after), strict=True))
    # By hand: flax's running average from zero statistics is 0.1 x the batch statistic
    # (momentum 0.9), so each batch's statistics are 10 x that; their mean is expected.
    it = data.train_iterator()
    per_batch = []
    for _ in range(2):
        batch = steps.device_batch(next(it), steps.TRAIN_KEYS)
        images = steps.train_inputs(batch, rng, augment, None)
        zeros = jax.tree.map(jnp.zeros_like, state.swa["batch_stats"])
        _, upd = model.apply({"params": state.swa["params"], "batch_stats": zeros}, images,
                             train=True, mutable=["batch_stats"],
                             rngs={"dropout": jax.random.PRNGKey(0)})
        per_batch.append(jax.tree.map(lambda u: u / 0.1, upd["batch_stats"]))
    expected = jax.tree.map(lambda a, b: (a + b) / 2, *per_batch)
    for got, want in zip(jax.tree.leaves(after), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-5)
    # Nothing new since: the same state comes back without another pass.
    assert recompute(new) is new


# ------------------------------------------------------------------------------ training


@pytest.fixture(scope="module")
def swa_run(tmp_path_factory, request) -> tuple[pathlib.Path, dict]:
    """6 steps, SWA from step 2 every update (accumulation 2): snapshots at 2, 4 and 6."""
    from isic_jax.testing import runs

    request.getfixturevalue("compile_cache")
    workdir = tmp_path_factory.mktemp("swa")
    config = standard_config(**SWA)
    result = runs.train(config, workdir, data=make_data(config))
    assert result["step"] == 6
    return workdir, result


def test_swa_run_averages_and_evaluation_uses_it(swa_run) -> None:
    from isic_jax import config_utils
    from isic_jax.evaluation import evaluate
    from isic_jax.training import parallel

    workdir, result = swa_run
    assert int(result["state"].swa["count"]) == 3
    flat = restore_params(workdir)
    assert any(".swa['params']" in k for k in flat) and any(".ema['params']" in k for k in flat)
    par = parallel.DataParallel.create("jit", jax.devices()[:1])
    config = config_utils.load_config(workdir)
    state, _, _ = evaluate.restore_for_eval(workdir, config, 2, par)
    used = state.eval_variables()
    for a, b in zip(jax.tree.leaves(used), jax.tree.leaves(
            {"params": state.swa["params"], "batch_stats": state.swa["batch_stats"]}),
            strict=True):
        np.testing.assert_array_equal(a, b)
    # init_from such a run takes the SWA weights too.
    from isic_jax.training import weight_sources

    source = weight_sources._read_isic_workdir(str(workdir), workdir)
    assert source.details["swa"] is True and not source.details["ema"]
    assert any("SWA weights" in note for note in source.notes)


def test_resume_mid_swa_gives_the_same_final_state(swa_run, tmp_path: pathlib.Path) -> None:
    from isic_jax.testing import runs

    full_dir, full = swa_run
    config = standard_config(**SWA)
    data = make_data(config)
    # "Killed" after step 4 (its snapshot is lost; the latest checkpoint is step 3).
    assert runs.train(config, tmp_path, data=data, stop_after_step=4)["step"] == 4
    resumed = runs.train(config, tmp_path, data=data)
    assert resumed["step"] == 6
    a, b = restore_params(full_dir), restore_params(tmp_path)
    assert a.keys() == b.keys() and any("swa" in k for k in a)
    different = [k for k in a if not np.array_equal(a[k], b[k])]
    assert not different, f"not bit-identical after resume: {different[:5]}"
    assert resumed["val"]["loss"] == full["val"]["loss"]


@flax.struct.dataclass
class _StateBeforeSwa:
    """TrainState as checkpoints written before the swa field existed hold it."""

    step: Any
    params: Any
    batch_stats: Any
    opt_state: Any
    ema: Any


def test_checkpoints_written_before_swa_existed_still_restore(tmp_path: pathlib.Path) -> None:
    from isic_jax.training import checkpointing
    from isic_jax.training.optim import create_optimizer
    from isic_jax.training.state import create_train_state

    model = _model()
    tx, _ = create_optimizer(tiny_config().optim, 10, 4)
    state = create_train_state(model, tx, jax.random.PRNGKey(0), 32)
    old = _StateBeforeSwa(**{f.name: getattr(state, f.name)
                             for f in dataclasses.fields(_StateBeforeSwa)})
    with checkpointing.Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(1, old, rng=np.zeros(2, np.uint32), data_iter=None, config={})
    target = jax.eval_shape(lambda: state)
    with checkpointing.Checkpointer(tmp_path / "ckpt", read_only=True) as ckpt:
        restored = ckpt.restore(1, target).state
    assert restored.swa == {} and type(restored).__name__ == "TrainState"
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(a, b)
