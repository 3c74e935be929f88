"""The config schema: every key's value check, and the validation of a resolved config.

    validate_config(config)              # ConfigError naming the key, before anything is built
    check_value("train.batch_size", 8)   # one key

The schema is the default preset (`isic_jax.configs.default`, the repository's configs/ folder):
its keys are the known keys, and `_CHECKS` holds the value check of each. Optional sections
(`config.pretrain`, the self-supervised pretraining of `isic-jax pretrain`, whose keys are
`configs/pretrain_byol.py`'s `pretrain_section()`) are known where a config has them, and are
then complete; `SECTION_CHECKS` holds their checks. Choices by name
(models, interpolations, releases) are read from the tables that define them. Imports no jax:
the command line is parsed (and XLA flags set) before jax is imported.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import ml_collections

from isic_jax.configs import default, pretrain_byol
from isic_jax.data import augment_table
from isic_jax.data.isic.labels import RELEASES
from isic_jax.data.metadata import parse_feature_list
from isic_jax.value_checks import (
    boolean,
    choice,
    integer,
    is_number,
    nonempty_string,
    number,
    pair,
    probability,
)

PARALLELISM = ("pmap", "jit")
TASKS = ("binary", "diagnosis")
MODEL_DTYPES = ("float32", "bfloat16")
# How `evaluate` chooses the operating threshold (evaluation/operating_points.py).
THRESHOLD_METHODS = ("sensitivity", "youden", "fixed")
INIT_HEAD = ("auto", "reinit")
LOWERINGS = ("auto", "xla")
DEFAULT_NUM_FOLDS = 5  # make_builder's default; `data.num_folds` overrides it when present
# Scalar validation metrics a checkpoint can be ranked by (metrics.classification_metrics plus
# the validation loss and accuracy computed by the trainer). "loss" is minimised, others maximised.
BEST_METRICS = (
    "auc",
    "pauc_80",
    "balanced_accuracy",
    "sensitivity",
    "specificity",
    "patient_auc",
    "accuracy",
    "loss",
)


class ConfigError(ValueError):
    """A bad config key or value; the message names the key (`config.a.b`)."""


def best_metric_mode(name: str) -> str:
    """"min" for losses, "max" for every other validation metric."""
    return "min" if "loss" in name else "max"


# ---------------------------------------------------------------------------------------------
# Value checks. Each returns an error text (without the key) or None.


def _releases(v: Any) -> str | None:
    """One release, or several joined by "+" (each once), trained on their union."""
    if not isinstance(v, str) or not v:
        return f"must be a release ({', '.join(RELEASES)}) or several joined by +, got {v!r}"
    parts = [p.strip() for p in v.split("+")]
    unknown = [p for p in parts if p not in RELEASES]
    if unknown:
        return (f"names unknown release(s) {', '.join(repr(p) for p in unknown)} in {v!r}; "
                f"known: {', '.join(RELEASES)} (several: joined by +, e.g. isic2019+isic2020)")
    if len(set(parts)) != len(parts):
        return f"names a release twice: {v!r}"
    return None


def _metadata_features(v: Any) -> str | None:
    """A comma-separated list of metadata feature names ("" for none); which exist is checked
    against the prepared dataset (`data.metadata`)."""
    if not isinstance(v, str):
        return f"must be a comma-separated string of feature names (e.g. age,sex,site), got {v!r}"
    try:
        parse_feature_list(v)
    except ValueError as exc:
        return f"must be a comma-separated list of feature names (e.g. age,sex,site): {exc}"
    return None


def _channels(
    lo: float, hi: float | None, lo_open: bool = False
) -> Callable[[Any], str | None]:
    """() (resolved later: the pretrained source's, else ImageNet's) or 3 numbers in range."""
    one = number(lo, hi, lo_open=lo_open)

    def check(v: Any) -> str | None:
        if not isinstance(v, (tuple, list)) or len(v) not in (0, 3):
            return f"must be () or 3 numbers (R, G, B on the [0, 1] scale), got {v!r}"
        problems = [one(x) for x in v]
        bad = next((p for p in problems if p), None)
        return f"(each channel) {bad}" if bad else None

    return check


def _init_from(v: Any) -> str | None:
    """"" or a non-empty source spec; whether it exists is checked when training starts."""
    if not isinstance(v, str):
        return f"must be a string (a file, a folder, hf-hub:ORG/NAME, or \"\"), got {v!r}"
    if v.startswith("hf-hub:") and "/" not in v[len("hf-hub:"):]:
        return f"must name a Hub repository as hf-hub:ORG/NAME[@REVISION], got {v!r}"
    return None


def _model_name(v: Any) -> str | None:
    # Imported here, not at the top: the models import jax, and XLA flags must be set before
    # jax is imported (runtime.py), after the command line that this module parses.
    from isic_jax.models import registry

    return registry.check_name(v)


# The value check of every key of the default preset (isic_jax/configs/default.py, the schema:
# tests/test_config.py checks that the two list the same keys).
_CHECKS: dict[str, Callable[[Any], str | None]] = {
    "seed": integer(0),
    "data.release": _releases,
    "data.stored_size": integer(32),
    "data.data_dir": nonempty_string,
    "data.num_folds": integer(2),
    "data.val_fold": integer(-1),  # -1: a final model on all folds, no validation
    "data.task": choice(TASKS),
    "data.image_size": integer(32),
    "data.balanced_sampling": boolean,
    "data.num_workers": integer(0),
    "data.prefetch_buffer_size": integer(1),
    "data.device_prefetch": integer(0),
    # data.augment.*: the table of augmentations, next to their ops (data/augment_table.py).
    **augment_table.config_checks("data.augment"),
    "data.mean": _channels(0.0, 1.0),
    "data.std": _channels(0.0, None, lo_open=True),
    "model.name": _model_name,
    "model.dropout": number(0.0, 1.0, hi_open=True),
    "model.msd_samples": integer(1, 64),
    "model.drop_path": number(0.0, 1.0, hi_open=True),
    "model.dtype": choice(MODEL_DTYPES),
    "model.width": integer(1),
    "model.lowering": choice(LOWERINGS),
    "model.metadata": _metadata_features,
    "model.metadata_hidden": integer(1),
    "model.metadata_dropout": number(0.0, 1.0, hi_open=True),
    "model.init_from": _init_from,
    "model.init_head": choice(INIT_HEAD),
    "finetune.backbone_lr_mult": number(0.0),
    "finetune.layer_decay": number(0.0, 1.0, lo_open=True),
    "finetune.freeze_stages": integer(0),
    "finetune.freeze_bn": boolean,
    "finetune.head_warmup_epochs": number(0.0),
    "loss.name": choice(("cross_entropy", "focal")),
    "loss.label_smoothing": number(0.0, 1.0, hi_open=True),
    "loss.class_weights": choice(("none", "balanced")),
    "loss.focal_gamma": number(0.0),
    "optim.name": choice(("adamw", "sgd", "lars")),
    "optim.learning_rate": number(0.0, lo_open=True),
    "optim.momentum": number(0.0, 1.0, hi_open=True),
    "optim.weight_decay": number(0.0),
    "optim.warmup_epochs": number(0.0),
    "optim.end_lr_factor": number(0.0),
    "optim.grad_clip_norm": number(0.0),
    "optim.accumulation_steps": integer(1),
    "optim.ema_decay": number(0.0, 1.0, hi_open=True),
    "optim.swa_start_epoch": number(),  # < 0: off
    "optim.swa_every_epochs": number(0.0, lo_open=True),
    "optim.swa_bn_batches": integer(0),
    "train.batch_size": integer(1),
    "train.num_epochs": number(0.0),
    "train.num_steps": integer(-1),
    "train.parallelism": choice(PARALLELISM),
    "train.log_every": integer(1),
    "train.eval_every": integer(1),
    "train.checkpoint_every": integer(1),
    "train.keep_checkpoints": integer(1),
    "train.best_metric": choice(BEST_METRICS),
    "train.progress": boolean,
    "eval.batch_size": integer(1),
    "eval.threshold": number(0.0, 1.0, lo_open=True, hi_open=True),
    "eval.threshold_method": choice(THRESHOLD_METHODS),
    "eval.target_sensitivity": number(0.0, 1.0, lo_open=True),
    "eval.temperature_scaling": boolean,
    "eval.calibration_bins": integer(2, 1000),
    "eval.bootstrap_samples": integer(0),
    "eval.bootstrap_seed": integer(0),
    "eval.ci_level": number(0.5, 1.0, hi_open=True),
    "eval.pauc_min_tpr": number(0.0, 1.0, hi_open=True),
    "eval.retrieval_top_k": integer(1),
}


def check_value(key: str, value: Any) -> None:
    """Checks one value against the schema (`key` as "eval.bootstrap_samples").

    Raises:
      ConfigError: naming the key; also for a key the schema does not have.
    """
    if key not in _CHECKS:
        raise ConfigError(f"Unknown config key config.{key}.")
    problem = _CHECKS[key](value)
    if problem:
        raise ConfigError(f"config.{key} {problem}.")


# Keys the code reads with a default when absent.
_OPTIONAL = frozenset({"data.num_folds"})

PRETRAIN_METHODS = ("byol",)
FLIPS = ("dihedral", "horizontal", "none")


def _probabilities(count: int) -> Callable[[Any], str | None]:
    """`count` probabilities (one per view)."""

    def check(v: Any) -> str | None:
        if (not isinstance(v, (tuple, list)) or len(v) != count
                or not all(is_number(x) and 0.0 <= x <= 1.0 for x in v)):
            return f"must be {count} probabilities in [0, 1] (one per view), got {v!r}"
        return None

    return check


# Optional sections: the value checks of their keys (tests/test_config.py checks that they are
# the keys of the section's reference).
SECTION_CHECKS: dict[str, dict[str, Callable[[Any], str | None]]] = {
    "pretrain": {
        "pretrain.method": choice(PRETRAIN_METHODS),
        "pretrain.projector_hidden": integer(1),
        "pretrain.projection_dim": integer(1),
        "pretrain.predictor_hidden": integer(1),
        "pretrain.target_decay": number(0.0, 1.0, hi_open=True),
        "pretrain.probe_k": integer(1),
        "pretrain.probe_temperature": number(0.0, lo_open=True),
        "pretrain.probe_fold": integer(-1),
        "pretrain.views.crop_scale": pair(0.0, 1.0),
        "pretrain.views.crop_ratio": pair(0.0, None),
        "pretrain.views.flips": choice(FLIPS),
        "pretrain.views.brightness": number(0.0, 1.0),
        "pretrain.views.contrast": number(0.0, 1.0),
        "pretrain.views.saturation": number(0.0, 1.0),
        "pretrain.views.hue": number(0.0, 0.5),
        "pretrain.views.jitter_prob": probability,
        "pretrain.views.grayscale_prob": probability,
        "pretrain.views.blur_prob": _probabilities(2),
        "pretrain.views.blur_sigma": pair(0.0, None),
        "pretrain.views.solarize_prob": _probabilities(2),
    },
}


def section_keys(section: str) -> set[str]:
    """The keys of an optional section's reference (`config.pretrain`: `pretrain_section()` of
    configs/pretrain_byol.py)."""
    if section != "pretrain":
        raise KeyError(section)
    return set(flatten(pretrain_byol.pretrain_section(), "pretrain."))


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; ConfigDicts and dicts alike."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, (ml_collections.ConfigDict, dict)):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def reference_keys() -> set[str]:
    """The keys of the default preset (`isic_jax.configs.default`): the config schema."""
    return set(flatten(default.get_config()))


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Checks every key and value of a resolved config; the first problem raises.

    Unknown keys (typos in a preset, which ConfigDict silently accepts) are rejected against the
    keys of the default preset. Overrides on the command line are rejected earlier by
    ml_collections, which names the key.

    Raises:
      ConfigError (a ValueError): naming the key, e.g. "config.train.parallelism must be one
        of pmap, jit; got 'foo'".
    """
    flat = flatten(config)
    sections = [name for name in SECTION_CHECKS if name in config]
    known = reference_keys() | _OPTIONAL
    for name in sections:
        known |= section_keys(name)
    for key in sorted(flat):
        if key not in known:
            section = key.rsplit(".", 1)[0] if "." in key else ""
            siblings = sorted(
                k.rsplit(".", 1)[1] for k in known if "." in k and k.rsplit(".", 1)[0] == section
            )
            hint = f" (known keys in config.{section}: {', '.join(siblings)})" if siblings else ""
            raise ConfigError(f"Unknown config key config.{key}{hint}.")
    for key, check in _CHECKS.items():
        if key not in flat:
            continue
        problem = check(flat[key])
        if problem:
            raise ConfigError(f"config.{key} {problem}.")
    for key in sorted(known):
        if key not in flat and key in _CHECKS and key not in _OPTIONAL:
            raise ConfigError(f"Missing config key config.{key}.")
    for name in sections:
        for key, check in SECTION_CHECKS[name].items():
            if key not in flat:
                raise ConfigError(f"Missing config key config.{key}.")
            problem = check(flat[key])
            if problem:
                raise ConfigError(f"config.{key} {problem}.")

    num_folds = int(flat.get("data.num_folds", DEFAULT_NUM_FOLDS))
    if flat["data.val_fold"] >= num_folds:
        raise ConfigError(
            f"config.data.val_fold={flat['data.val_fold']} must be < the number of folds "
            f"({num_folds}; config.data.num_folds)."
        )
    if bool(flat["data.mean"]) != bool(flat["data.std"]):
        raise ConfigError(
            f"config.data.mean={tuple(flat['data.mean'])} and config.data.std="
            f"{tuple(flat['data.std'])}: set both (3 numbers each) or neither (())."
        )
    if flat["train.num_steps"] == 0:
        raise ConfigError(
            "config.train.num_steps must be > 0, or -1 to use config.train.num_epochs."
        )
    if flat["train.num_steps"] < 0 and flat["train.num_epochs"] <= 0:
        raise ConfigError(
            f"config.train.num_epochs must be > 0 when config.train.num_steps=-1, got "
            f"{flat['train.num_epochs']}."
        )
    for problem in augment_table.combination_problems(flat, "data.augment"):
        raise ConfigError(problem + ".")
    _check_regularisers(flat)


def _check_regularisers(flat: Mapping[str, Any]) -> None:
    """Multi-sample dropout and SWA combinations (a start past the run's end is also checked
    when the run's length is known: training.swa.SwaSchedule.from_config)."""
    if flat.get("model.msd_samples", 1) > 1 and flat["model.dropout"] <= 0:
        raise ConfigError(
            f"config.model.msd_samples={flat['model.msd_samples']} needs config.model.dropout > 0 "
            f"(without dropout the samples are identical copies of the head).")
    start = flat.get("optim.swa_start_epoch", -1.0)
    if start >= 0 and flat["train.num_steps"] < 0 and start >= flat["train.num_epochs"]:
        raise ConfigError(
            f"config.optim.swa_start_epoch={start} is not before the end of the run "
            f"(config.train.num_epochs={flat['train.num_epochs']}): SWA would average nothing; "
            f"use a smaller value, or -1 to turn SWA off.")


