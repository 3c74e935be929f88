"""Bad augmentation / regulariser settings are rejected at config validation, naming the key."""

from __future__ import annotations

import pytest

from isic_jax import config_utils
from isic_jax.data import augment_table


def _smoke(**overrides):
    from isic_jax.configs import smoke

    config = smoke.get_config()
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def _rejects(message: str, **overrides) -> None:
    with pytest.raises(config_utils.ConfigError) as info:
        config_utils.validate_config(_smoke(**overrides))
    assert message in str(info.value), str(info.value)


PROBABILITIES = sorted(k for k in augment_table.by_key() if k.endswith("_p"))


@pytest.mark.parametrize("key", PROBABILITIES)
@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan")])
def test_probabilities_outside_0_1_are_rejected(key: str, value) -> None:
    _rejects(f"config.data.augment.{key} ", **{f"data.augment.{key}": value})


@pytest.mark.parametrize("key, value, message", [
    ("blur_sigma", -1.0, "config.data.augment.blur_sigma must be >= 0.0"),
    ("noise_std", 0.9, "config.data.augment.noise_std must be <= 0.5"),
    ("gamma", 1.0, "config.data.augment.gamma must be < 1.0"),
    ("cutout_size", 0.0, "config.data.augment.cutout_size must be > 0.0"),
    ("cutout_holes", 0, "config.data.augment.cutout_holes must be >= 1"),
    ("elastic_grid", 1, "config.data.augment.elastic_grid must be >= 2"),
    ("affine_scale", 1.0, "config.data.augment.affine_scale must be < 1.0"),
    ("affine_translate", 0.7, "config.data.augment.affine_translate must be <= 0.5"),
    ("mixup_alpha", -1.0, "config.data.augment.mixup_alpha must be >= 0.0"),
])
def test_bad_strengths_name_the_key(key: str, value, message: str) -> None:
    _rejects(message, **{f"data.augment.{key}": value})


def test_wrong_types_in_a_saved_config_are_rejected() -> None:
    # ConfigDict refuses a float for an int key on assignment; a config read from JSON is a
    # plain dict first, so the table's checks also look at the type.
    check = config_utils.schema._CHECKS["data.augment.cutout_holes"]
    assert check(1.5) == "must be an integer, got 1.5"
    assert "must be True or False" in config_utils.schema._CHECKS["data.augment.dihedral"](1)


@pytest.mark.parametrize("name", ["mixup", "cutmix"])
def test_alpha_must_be_positive_while_enabled(name: str) -> None:
    _rejects(f"config.data.augment.{name}_alpha must be > 0 when config.data.augment.{name}_p",
             **{f"data.augment.{name}_p": 0.5, f"data.augment.{name}_alpha": 0.0})
    # Off, an alpha of 0 is fine.
    config_utils.validate_config(_smoke(**{f"data.augment.{name}_alpha": 0.0}))


def test_combinations_that_cannot_hold() -> None:
    _rejects("config.data.augment.mixup_p + config.data.augment.cutmix_p must be <= 1",
             **{"data.augment.mixup_p": 0.7, "data.augment.cutmix_p": 0.5})
    _rejects("config.train.batch_size must be even",
             **{"data.augment.cutmix_p": 0.5, "train.batch_size": 7})
    config_utils.validate_config(_smoke(**{"train.batch_size": 7}))  # fine without mixing
    # Every task today has one class index per example: mixing is allowed with each.
    for task in config_utils.TASKS:
        assert task in augment_table.SINGLE_LABEL_TASKS
        config_utils.validate_config(_smoke(**{"data.augment.mixup_p": 0.5, "data.task": task}))
    # A task that is not single-label (none exists yet) would be refused by the table.
    problems = augment_table.combination_problems(
        {"data.augment.mixup_p": 0.5, "data.augment.mixup_alpha": 0.4, "data.task": "multilabel"})
    assert any("config.data.task='multilabel' is not a single-label task" in p for p in problems)


def test_multi_sample_dropout_settings() -> None:
    _rejects("config.model.msd_samples must be >= 1", **{"model.msd_samples": 0})
    _rejects("config.model.msd_samples=4 needs config.model.dropout > 0",
             **{"model.msd_samples": 4, "model.dropout": 0.0})
    config_utils.validate_config(_smoke(**{"model.msd_samples": 4, "model.dropout": 0.3}))


def test_swa_settings() -> None:
    _rejects("config.optim.swa_every_epochs must be > 0.0", **{"optim.swa_every_epochs": 0.0})
    _rejects("config.optim.swa_bn_batches must be >= 0", **{"optim.swa_bn_batches": -1})
    # A start at or past the end of an epoch-based run.
    _rejects("config.optim.swa_start_epoch=15.0 is not before the end of the run",
             **{"optim.swa_start_epoch": 15.0, "train.num_steps": -1, "train.num_epochs": 15.0})
    config_utils.validate_config(_smoke(**{"optim.swa_start_epoch": 10.0, "train.num_steps": -1,
                                           "train.num_epochs": 15.0}))
    # With num_steps the run's length is known once the data is: checked then, naming the key.
    from isic_jax.training.swa import SwaSchedule

    optim = _smoke(**{"optim.swa_start_epoch": 2.0}).optim
    with pytest.raises(config_utils.ConfigError, match=r"config.optim.swa_start_epoch=2.0 starts"
                       r" SWA at step 8, after the last step \(6 steps"):
        SwaSchedule.from_config(optim, total_steps=6, steps_per_epoch=4)
    assert SwaSchedule.from_config(optim, total_steps=8, steps_per_epoch=4).start == 8
