"""Friendlier errors for `--config.a.b=value` overrides on the command line (absl flags).

    config_flags.DEFINE_config_file("config", ...)
    friendly_override_errors(_CONFIG)    # an unknown key or a wrong type: one line, the key named
"""

from __future__ import annotations

import sys
from typing import Any

from absl import flags


def friendly_override_errors(flag_holder: Any) -> None:
    """Turns ml_collections' errors for a bad `--config.a.b=v` override into a flags error.

    ml_collections raises KeyError/AttributeError ("Did you mean ...") from inside absl's flag
    parsing, which absl shows as a long traceback; as a `flags.Error` absl prints one line,
    "FATAL Flags parsing error: ...", and exits with status 1. Only this flag is touched.
    """
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
