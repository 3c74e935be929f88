"""The `isic-jax` console script: dispatches `isic-jax COMMAND [flags]` to `isic_jax.commands`.

Each subcommand lives in its own module that defines absl flags at import time, so only the
flags of the chosen command exist in a process. The command then runs under `absl.app.run`, which
parses flags before any Grain worker process is spawned.
"""

from __future__ import annotations

import importlib
import os
import sys

from absl import app, flags

COMMANDS: dict[str, str] = {
    "synth": "writes a synthetic ISIC-like dataset in an official layout",
    "prepare": "builds the TFDS dataset from a manual ISIC download",
    "train": "trains (and resumes) a model from a config file",
    "evaluate": "writes metrics.json and plots for a split",
    "export": "writes inference artefacts from a checkpoint",
    "predict": "class probabilities per image, as CSV",
    "demo": "the main job: synth -> prepare -> train -> evaluate on generated data",
}


def _usage() -> str:
    lines = ["usage: isic-jax COMMAND [--flags]", "", "commands:"]
    lines += [f"  {name:<9} {text}" for name, text in COMMANDS.items()]
    lines += ["", "`isic-jax COMMAND --help` lists the flags of a command."]
    return "\n".join(lines)


def _make_configs_importable(args: list[str]) -> None:
    """Presets do `from configs import default`: put the folder above each config on sys.path."""
    roots = [os.getcwd()]
    for i, arg in enumerate(args):
        path = None
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        elif arg == "--config" and i + 1 < len(args):
            path = args[i + 1]
        if path:
            roots.append(os.path.dirname(os.path.dirname(os.path.abspath(path.split(":")[0]))))
    for root in roots:
        if root not in sys.path:
            sys.path.insert(0, root)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(_usage())
        sys.exit(0 if len(argv) >= 2 else 2)
    command = argv[1]
    if command not in COMMANDS:
        print(f"isic-jax: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        sys.exit(2)
    _make_configs_importable(argv[2:])
    module = importlib.import_module(f"isic_jax.commands.{command}")
    if any(arg in ("-h", "--help", "-help") for arg in argv[2:]):
        # absl's --help lists only the flags of the __main__ module; ours live in `module`.
        print(f"usage: isic-jax {command} [--flags]\n")
        print((module.__doc__ or "").strip() + "\n")
        print(flags.FLAGS.module_help(module))
        sys.exit(0)
    app.run(module.main, argv=[f"isic-jax {command}", *argv[2:]])


if __name__ == "__main__":
    main()
