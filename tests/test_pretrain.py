"""Self-supervised pretraining (`isic-jax pretrain`, BYOL) on the training loop: exact resume,
jit = pmap, the k-NN probe, the workdir as an init_from source for `train`, bad inputs. One CPU
device and in-memory data unless said otherwise."""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
import pytest
from pretrain_helpers import (
    pretrain_config,
    records_data,
    restore_state,
    run_worker,
    texture_records,
)
from train_helpers import compile_cache, make_data, make_records, tiny_config  # noqa: F401

from isic_jax import config_utils
from isic_jax.models import PretrainedError

pytestmark = pytest.mark.usefixtures("compile_cache")


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, request) -> tuple[pathlib.Path, dict]:
    """The uninterrupted reference pretraining (6 steps, probes at 0, 3 and 6)."""
    from isic_jax.testing import runs

    request.getfixturevalue("compile_cache")
    workdir = tmp_path_factory.mktemp("byol")
    config = pretrain_config()
    result = runs.pretrain(config, workdir, data=make_data(config))
    assert result["step"] == 6
    return workdir, result


@pytest.mark.slow
def test_pretrain_writes_a_marked_workdir_with_the_probe(full_run) -> None:
    workdir, result = full_run
    record = json.loads((workdir / "pretrain.json").read_text())
    assert record["kind"] == "pretrain" and record["method"] == "byol"
    assert record["backbone"] == {"name": "resnet_tiny", "width": 4}
    assert record["dropped_modules"] == ["projector", "predictor"]
    assert record["held_out_fold"] == 0 and record["images"] == 32
    assert record["initial_probe"]["knn_queries"] == 12
    assert record["probe"]["step"] == 6
    assert result["probe"]["knn_auc_initial"] == record["initial_probe"]["knn_auc"]
    history = [json.loads(x) for x in (workdir / "eval_history.jsonl").open()]
    assert [h["step"] for h in history] == [3, 6]
    assert {"knn_auc", "knn_auc_initial", "knn_bank"} <= set(history[-1])
    assert set(result["train"]) >= {"loss", "grad_norm", "target_decay", "learning_rate"}
    assert 0.0 <= result["train"]["loss"] <= 8.0
    # The state: the classifier's backbone names, the projector and predictor on their own.
    state = restore_state(workdir)
    tops = {k.split("/")[1] for k in state if k.startswith("params/")}
    from isic_jax.models import create_model, init_variables

    classifier = init_variables(create_model(pretrain_config().model, 2), jax.random.key(0), 32)
    assert tops == (set(classifier["params"]) - {"head"}) | {"projector", "predictor"}
    assert not any(k.startswith("target/params/predictor") for k in state)
    assert any(k.startswith("target/batch_stats/projector") for k in state)


def test_interrupted_pretraining_resumes_bit_exactly(full_run, tmp_path, capsys) -> None:
    from isic_jax.testing import runs

    full_dir, full = full_run
    config = pretrain_config()
    data = make_data(config)
    part = runs.pretrain(config, tmp_path, data=data, stop_after_step=4)  # "killed" after 4
    assert part["step"] == 4
    capsys.readouterr()
    resumed = runs.pretrain(config, tmp_path, data=data)
    out = capsys.readouterr().out
    assert "checkpoints/3 (3/6)" in out and "k-NN probe at step 0" not in out
    assert resumed["step"] == 6
    a, b = restore_state(full_dir), restore_state(tmp_path)
    assert a.keys() == b.keys()
    different = [k for k in a if not np.array_equal(a[k], b[k])]
    assert not different, f"not bit-identical after resume: {different[:5]}"
    first = restore_state(full_dir, 3)
    assert any(not np.array_equal(first[k], a[k]) for k in a if k.startswith("target/params"))
    assert resumed["probe"] == full["probe"]


@pytest.mark.slow
def test_jit_and_pmap_give_the_same_state() -> None:
    report = run_worker("equivalence", {"steps": 3})
    assert report["devices"] == 4
    assert report["moved"] > 1e-4  # the steps changed the parameters
    for mode in ("pmap", "jit"):
        assert report[mode]["params"] < 1e-4, report
        assert report[mode]["target"] < 1e-4, report
        assert report[mode]["batch_stats"] < 1e-3, report
        assert report[mode]["loss"] < 1e-4, report


def test_init_from_a_pretrain_workdir_takes_the_online_backbone(full_run, tmp_path) -> None:
    from isic_jax.testing import runs
    from isic_jax.training import loop

    source, _ = full_run
    config = tiny_config(**{"model.init_from": str(source)})
    data = make_data(config)
    setup = loop.set_up(config, tmp_path, data=data)
    pre = setup.pretrained
    assert pre.source.origin == "isic_jax-pretrain" and pre.head == "reinitialized"
    assert any(line.startswith("params/projector/") for line in pre.ignored)
    assert any(line.startswith("batch_stats/predictor/") for line in pre.ignored)
    assert all("pretraining only" in line for line in pre.ignored)
    saved = restore_state(source)
    flat = {"/".join(k): v for k, v in __import__(
        "isic_jax.models.weight_mapping", fromlist=["flatten"]).flatten(pre.variables).items()}
    backbone = [k for k in flat if not k.startswith("params/head")]
    assert backbone and all(np.array_equal(flat[k], saved[k]) for k in backbone)
    state = setup.init_state()
    assert np.array_equal(np.asarray(state.params["stem_conv"]["kernel"]),
                          saved["params/stem_conv/kernel"])
    result = loop.run(setup)
    assert result["step"] == 6
    record = json.loads((tmp_path / "init_from.json").read_text())
    assert record["origin"] == "isic_jax-pretrain" and record["weights"] == "online"
    assert record["self_supervised"]["method"] == "byol"
    assert record["checkpoint"] == "latest" and record["head"] == "reinitialized"
    assert len(record["ignored"]) == len(pre.ignored)
    # The workdir of the fine-tuned run is an ordinary training workdir.
    assert not (tmp_path / "pretrain.json").exists()
    del runs


def test_workdirs_of_the_other_kind_are_refused_untouched(full_run, tmp_path) -> None:
    from isic_jax.pretraining import task
    from isic_jax.testing import runs
    from isic_jax.training import loop

    source, _ = full_run
    before = sorted(p.name for p in source.rglob("*"))
    config = tiny_config()
    with pytest.raises(loop.WorkdirError, match="is a pretraining workdir"):
        runs.train(config, source, data=make_data(config))
    assert sorted(p.name for p in source.rglob("*")) == before
    # A training workdir given to pretrain.
    config_utils.save_config(config, tmp_path)
    with pytest.raises(loop.WorkdirError, match="holds a training run"):
        task.set_up(pretrain_config(), tmp_path, data=make_data(config))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_bad_inputs_fail_before_anything_is_written(tmp_path) -> None:
    from isic_jax.pretraining import task

    workdir = tmp_path / "w"
    no_section = tiny_config()
    with pytest.raises(config_utils.ConfigError, match="no config.pretrain section"):
        task.set_up(no_section, workdir, data=make_data(no_section))
    small = pretrain_config(**{"train.batch_size": 1, "eval.batch_size": 1})
    with pytest.raises(config_utils.ConfigError, match="needs at least 2 per device"):
        task.set_up(small, workdir, data=make_data(small))
    config = pretrain_config()
    same = make_records(1, seed=3) * 24
    with pytest.raises(task.PretrainDataError, match="all the same"):
        task.set_up(config, workdir, data=records_data(config, same, make_records(6, seed=4)))
    with pytest.raises(task.PretrainDataError, match="holds no image"):
        task.set_up(config, workdir, data=records_data(config, [], make_records(6, seed=4)))
    balanced = pretrain_config(**{"data.balanced_sampling": True})
    with pytest.raises(config_utils.ConfigError, match="balanced_sampling must be False"):
        task.set_up(balanced, workdir, data=make_data(balanced))
    bad_value = pretrain_config(**{"pretrain.views.blur_prob": (1.0,)})
    with pytest.raises(config_utils.ConfigError, match="config.pretrain.views.blur_prob"):
        config_utils.validate_config(bad_value)
    missing = pretrain_config()
    del missing.pretrain["probe_k"]
    with pytest.raises(config_utils.ConfigError,
                       match="Missing config key config.pretrain.probe_k"):
        config_utils.validate_config(missing)
    assert not workdir.exists()


def test_init_from_a_pretrain_of_another_model_is_refused(full_run, tmp_path) -> None:
    from isic_jax.models import registry
    from isic_jax.training import loop

    source, _ = full_run
    wider = tiny_config(**{"model.init_from": str(source), "model.width": 8})
    with pytest.raises(PretrainedError, match="holds a resnet_tiny of width 4; this config builds"
                                              " resnet_tiny of width 8"):
        loop.set_up(wider, tmp_path, data=make_data(wider))
    others = [name for family in registry.FAMILIES.values() if family.name != "resnet"
              for name in family.architectures]
    if others:  # another family (registered by the model families' modules)
        other = tiny_config(**{"model.init_from": str(source), "model.name": others[0]})
        with pytest.raises(PretrainedError, match="holds a resnet_tiny"):
            loop.set_up(other, tmp_path, data=make_data(other))
    assert not tmp_path.joinpath("config.json").exists()


@pytest.mark.slow
def test_probe_of_a_short_pretraining_beats_random_init(tmp_path) -> None:
    """On synthetic lesions whose class is in the texture (striped or solid) under colour,
    size and place changes that dominate their pixel statistics, a short BYOL run (200 steps)
    lifts the k-NN probe of the frozen features above the random-init network's."""
    from isic_jax.testing import runs

    config = pretrain_config(**{
        "data.image_size": 40, "data.stored_size": 40, "model.width": 16,
        "pretrain.projector_hidden": 128, "pretrain.predictor_hidden": 128,
        "pretrain.projection_dim": 64, "pretrain.views.crop_scale": (0.35, 1.0),
        "train.batch_size": 32, "train.num_steps": 200, "train.eval_every": 200,
        "train.checkpoint_every": 200, "train.log_every": 100, "eval.batch_size": 64,
        "optim.learning_rate": 2e-3, "optim.warmup_epochs": 1.0,
    })
    data = records_data(config, texture_records(256, seed=1), texture_records(96, seed=2))
    probe = runs.pretrain(config, tmp_path, data=data)["probe"]
    assert probe["knn_auc"] > probe["knn_auc_initial"] + 0.05, probe
    assert probe["knn_auc"] > 0.9, probe
