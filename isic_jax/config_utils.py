"""Config validation, presets by name, saving/loading the resolved config.

    validate_config(config)              # ConfigError naming the key, before anything is built
    config_file("smoke")                 # a shipped preset's file, for --config NAME
    save_config(config, workdir)         # workdir/config.json (also stored in every checkpoint)
    config = load_config(workdir)        # what `evaluate` runs with

The schema is the default preset (`isic_jax.configs.default`, the repository's configs/ folder):
its keys are the known keys, and `_CHECKS` holds the value check of each. Imports no jax.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import sys
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections

from isic_jax.data.image_ops import RESAMPLE
from isic_jax.data.isic.labels import RELEASES

CONFIG_FILENAME = "config.json"
INTERPOLATIONS = tuple(sorted(RESAMPLE))
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


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int(lo: int | None = None, hi: int | None = None) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        if not _is_int(v):
            return f"must be an integer, got {v!r}"
        if lo is not None and v < lo:
            return f"must be >= {lo}, got {v}"
        if hi is not None and v > hi:
            return f"must be <= {hi}, got {v}"
        return None

    return check


def _num(
    lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False
) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        if not _is_num(v):
            return f"must be a finite number, got {v!r}"
        if lo is not None and (v <= lo if lo_open else v < lo):
            return f"must be {'>' if lo_open else '>='} {lo}, got {v}"
        if hi is not None and (v >= hi if hi_open else v > hi):
            return f"must be {'<' if hi_open else '<='} {hi}, got {v}"
        return None

    return check


def _choice(options: tuple[str, ...]) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        if v not in options:
            return f"must be one of {', '.join(options)}; got {v!r}"
        return None

    return check


def _bool(v: Any) -> str | None:
    return None if isinstance(v, bool) else f"must be True or False, got {v!r}"


def _str(v: Any) -> str | None:
    return None if isinstance(v, str) and v else f"must be a non-empty string, got {v!r}"


def _range(lo: float, hi: float | None) -> Callable[[Any], str | None]:
    """A (low, high) pair with lo <= low <= high (<= hi)."""

    def check(v: Any) -> str | None:
        if not isinstance(v, (tuple, list)) or len(v) != 2 or not all(_is_num(x) for x in v):
            return f"must be a pair of numbers (low, high), got {v!r}"
        a, b = v
        if not (lo < a <= b) or (hi is not None and b > hi):
            bound = f"{lo} < low <= high" + (f" <= {hi}" if hi is not None else "")
            return f"must satisfy {bound}, got {tuple(v)}"
        return None

    return check


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
    from isic_jax.data.metadata import parse_feature_list

    try:
        parse_feature_list(v)
    except ValueError as exc:
        return f"must be a comma-separated list of feature names (e.g. age,sex,site): {exc}"
    return None


def _channels(
    lo: float, hi: float | None, lo_open: bool = False
) -> Callable[[Any], str | None]:
    """() (resolved later: the pretrained source's, else ImageNet's) or 3 numbers in range."""
    one = _num(lo, hi, lo_open=lo_open)

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
    "seed": _int(0),
    "data.release": _releases,
    "data.stored_size": _int(32),
    "data.data_dir": _str,
    "data.num_folds": _int(2),
    "data.val_fold": _int(-1),  # -1: a final model on all folds, no validation
    "data.task": _choice(TASKS),
    "data.image_size": _int(32),
    "data.balanced_sampling": _bool,
    "data.num_workers": _int(0),
    "data.prefetch_buffer_size": _int(1),
    "data.device_prefetch": _int(0),
    "data.augment.crop_scale": _range(0.0, 1.0),
    "data.augment.crop_ratio": _range(0.0, None),
    "data.augment.interpolation": _choice(INTERPOLATIONS),
    "data.augment.dihedral": _bool,
    "data.augment.rotation": _num(0.0, 180.0),
    "data.augment.brightness": _num(0.0),
    "data.augment.contrast": _num(0.0),
    "data.augment.saturation": _num(0.0),
    "data.augment.hue": _num(0.0, 0.5),
    "data.augment.color_constancy": _bool,
    "data.mean": _channels(0.0, 1.0),
    "data.std": _channels(0.0, None, lo_open=True),
    "model.name": _model_name,
    "model.dropout": _num(0.0, 1.0, hi_open=True),
    "model.drop_path": _num(0.0, 1.0, hi_open=True),
    "model.dtype": _choice(MODEL_DTYPES),
    "model.width": _int(1),
    "model.lowering": _choice(LOWERINGS),
    "model.metadata": _metadata_features,
    "model.metadata_hidden": _int(1),
    "model.metadata_dropout": _num(0.0, 1.0, hi_open=True),
    "model.init_from": _init_from,
    "model.init_head": _choice(INIT_HEAD),
    "finetune.backbone_lr_mult": _num(0.0),
    "finetune.layer_decay": _num(0.0, 1.0, lo_open=True),
    "finetune.freeze_stages": _int(0),
    "finetune.freeze_bn": _bool,
    "finetune.head_warmup_epochs": _num(0.0),
    "loss.name": _choice(("cross_entropy", "focal")),
    "loss.label_smoothing": _num(0.0, 1.0, hi_open=True),
    "loss.class_weights": _choice(("none", "balanced")),
    "loss.focal_gamma": _num(0.0),
    "optim.name": _choice(("adamw", "sgd")),
    "optim.learning_rate": _num(0.0, lo_open=True),
    "optim.momentum": _num(0.0, 1.0, hi_open=True),
    "optim.weight_decay": _num(0.0),
    "optim.warmup_epochs": _num(0.0),
    "optim.end_lr_factor": _num(0.0),
    "optim.grad_clip_norm": _num(0.0),
    "optim.accumulation_steps": _int(1),
    "optim.ema_decay": _num(0.0, 1.0, hi_open=True),
    "train.batch_size": _int(1),
    "train.num_epochs": _num(0.0),
    "train.num_steps": _int(-1),
    "train.parallelism": _choice(PARALLELISM),
    "train.log_every": _int(1),
    "train.eval_every": _int(1),
    "train.checkpoint_every": _int(1),
    "train.keep_checkpoints": _int(1),
    "train.best_metric": _choice(BEST_METRICS),
    "train.progress": _bool,
    "eval.batch_size": _int(1),
    "eval.threshold": _num(0.0, 1.0, lo_open=True, hi_open=True),
    "eval.threshold_method": _choice(THRESHOLD_METHODS),
    "eval.target_sensitivity": _num(0.0, 1.0, lo_open=True),
    "eval.temperature_scaling": _bool,
    "eval.calibration_bins": _int(2, 1000),
    "eval.bootstrap_samples": _int(0),
    "eval.bootstrap_seed": _int(0),
    "eval.ci_level": _num(0.5, 1.0, hi_open=True),
    "eval.pauc_min_tpr": _num(0.0, 1.0, hi_open=True),
    "eval.retrieval_top_k": _int(1),
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


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; ConfigDicts and dicts alike."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, (ml_collections.ConfigDict, dict)):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _default_values() -> dict[str, Any]:
    """The default preset's value of every key (tuples as lists, as saved configs have them)."""
    from isic_jax.configs import default

    return _flatten(config_to_dict(default.get_config()))


def reference_keys() -> set[str]:
    """The keys of the default preset (`isic_jax.configs.default`): the config schema."""
    from isic_jax.configs import default

    return set(_flatten(default.get_config()))


def config_file(value: str) -> str:
    """`--config` value -> a file path: a shipped preset's name ("smoke", "default:arg") becomes
    its file in `isic_jax.configs`; anything else (a path) is returned as given."""
    name, sep, arg = value.partition(":")
    if os.path.exists(name) or "/" in name or os.sep in name or name.endswith(".py"):
        return value
    from isic_jax import configs

    path = pathlib.Path(configs.__file__).parent / f"{name}.py"
    return f"{path}{sep}{arg}" if path.is_file() else value


def preset_names() -> list[str]:
    """Names of the presets shipped in `isic_jax.configs`."""
    from isic_jax import configs

    folder = pathlib.Path(configs.__file__).parent
    return sorted(p.stem for p in folder.glob("*.py") if not p.stem.startswith("_"))


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Checks every key and value of a resolved config; the first problem raises.

    Unknown keys (typos in a preset, which ConfigDict silently accepts) are rejected against the
    keys of the default preset. Overrides on the command line are rejected earlier by
    ml_collections, which names the key.

    Raises:
      ConfigError (a ValueError): naming the key, e.g. "config.train.parallelism must be one
        of pmap, jit; got 'foo'".
    """
    flat = _flatten(config)
    known = reference_keys() | _OPTIONAL
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


def friendly_override_errors(flag_holder: Any) -> None:
    """Turns ml_collections' errors for a bad `--config.a.b=v` override into a flags error.

    ml_collections raises KeyError/AttributeError ("Did you mean ...") from inside absl's flag
    parsing, which absl shows as a long traceback; as a `flags.Error` absl prints one line,
    "FATAL Flags parsing error: ...", and exits with status 1. Only this flag is touched.
    """
    from absl import flags

    flag = flags.FLAGS[flag_holder.name]
    parse = flag._parse

    def _parse(argument: Any) -> Any:
        try:
            config = parse(argument)
        except (KeyError, AttributeError, TypeError, ValueError) as e:
            # ml_collections nests KeyError("'name'\nDid you mean ...") in an AttributeError.
            inner: BaseException = e
            while inner.args and isinstance(inner.args[0], BaseException):
                inner = inner.args[0]
            text = str(inner.args[0]) if inner.args else str(inner)
            text = " ".join(text.split())
            bad = [a.split("=", 1)[0] for a in sys.argv if a.startswith(f"--{flag_holder.name}.")]
            name = text.split()[0].strip("'") if text else ""
            culprit = [a for a in bad if a.endswith("." + name) or f".{name}." in a]
            where = f" {culprit[0]}" if culprit else ""
            raise flags.IllegalFlagValueError(
                f"bad --{flag_holder.name} override{where}: unknown key {text}"
                if isinstance(inner, KeyError)
                else f"bad --{flag_holder.name} override{where}: {text}"
            ) from e
        # The override flags (`--config.a.b`) exist from here on: explain their type errors.
        prefix = f"{flag_holder.name}."
        for name in list(flags.FLAGS):
            if name.startswith(prefix):
                _explain_type_errors(flags.FLAGS[name], config, name[len(prefix):])
        return config

    flag._parse = _parse


def _explain_type_errors(field_flag: Any, config: Any, path: str) -> None:
    """Makes an override of the wrong type (`--config.train.batch_size=eight`) say which type
    the key takes and give an example, instead of absl's bare "invalid literal for int()"."""
    from absl import flags

    if getattr(field_flag, "_isic_explained", False):
        return
    parse = field_flag._parse
    current: Any = config
    try:
        for part in path.split("."):
            current = current[part]
    except (KeyError, TypeError, AttributeError):
        return

    def _parse(argument: Any) -> Any:
        try:
            return parse(argument)
        except (flags.Error, TypeError, ValueError) as e:
            kind = {bool: "True or False", int: "an integer", float: "a number",
                    str: "a string"}.get(type(current), f"a {type(current).__name__}")
            detail = str(e).split(": ", 1)[-1]
            raise flags.IllegalFlagValueError(
                f"bad override --{field_flag.name}={argument}: config.{path} takes {kind} (the "
                f"config file sets {current!r}); e.g. --{field_flag.name}={current} ({detail})."
            ) from e

    field_flag._parse = _parse
    field_flag._isic_explained = True


# ---------------------------------------------------------------------------------------------
# Saving and loading.


def config_to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """A JSON-serialisable plain dict (tuples become lists)."""
    return json.loads(config.to_json_best_effort(sort_keys=True))


def save_config(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> pathlib.Path:
    """Writes the resolved config as `workdir/config.json` (atomically) and returns its path."""
    path = pathlib.Path(workdir) / CONFIG_FILENAME
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(config_to_dict(config), indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


def config_from_dict(data: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """Inverse of `config_to_dict` (lists stay lists; every consumer indexes them)."""
    return ml_collections.ConfigDict(dict(data))


def load_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """Reads `workdir/config.json`.

    Raises:
      FileNotFoundError: with a hint when the workdir has no saved config.
    """
    path = pathlib.Path(workdir) / CONFIG_FILENAME
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: is {workdir} the --workdir of an `isic-jax train` run?"
        )
    return config_from_dict(json.loads(path.read_text()))


def config_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Lines "key: old -> new" for keys whose value changed (to warn when resuming).

    A key of the default preset that one side lacks (a config saved before the key existed)
    counts as its default value there, so that adding a key does not make older runs differ.
    """
    a, b = _flatten(old), _flatten(new)
    defaults = _default_values()
    lines = []
    for key in sorted(set(a) | set(b)):
        va = a[key] if key in a else defaults.get(key) if key in b else None
        vb = b[key] if key in b else defaults.get(key) if key in a else None
        if isinstance(va, tuple):
            va = list(va)
        if isinstance(vb, tuple):
            vb = list(vb)
        if va != vb:
            lines.append(f"{key}: {va!r} -> {vb!r}")
    return lines
