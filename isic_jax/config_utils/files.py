"""Presets by name, and saving/loading the resolved config of a run.

    config_file("smoke")                 # a shipped preset's file, for --config NAME
    save_config(config, workdir)         # workdir/config.json (also stored in every checkpoint)
    config = load_config(workdir)        # what `evaluate` runs with
    config_differences(saved, new)       # "key: old -> new" lines, to warn when resuming
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import ml_collections

from isic_jax import configs
from isic_jax.config_utils.schema import flatten
from isic_jax.configs import default

CONFIG_FILENAME = "config.json"


def config_file(value: str) -> str:
    """`--config` value -> a file path: a shipped preset's name ("smoke", "default:arg") becomes
    its file in `isic_jax.configs`; anything else (a path) is returned as given."""
    name, sep, arg = value.partition(":")
    if os.path.exists(name) or "/" in name or os.sep in name or name.endswith(".py"):
        return value
    path = pathlib.Path(configs.__file__).parent / f"{name}.py"
    return f"{path}{sep}{arg}" if path.is_file() else value


def preset_names() -> list[str]:
    """Names of the presets shipped in `isic_jax.configs`."""
    folder = pathlib.Path(configs.__file__).parent
    return sorted(p.stem for p in folder.glob("*.py") if not p.stem.startswith("_"))


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
    a, b = flatten(old), flatten(new)
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


def _default_values() -> dict[str, Any]:
    """The default preset's value of every key (tuples as lists, as saved configs have them)."""
    return flatten(config_to_dict(default.get_config()))
