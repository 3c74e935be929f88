"""The `isic-jax` console script: dispatches `isic-jax COMMAND [flags]` to `isic_jax.commands`.

Each subcommand lives in its own module that defines absl flags at import time, so only the
flags of the chosen command exist in a process. The command then runs under `absl.app.run`, which
parses flags before any Grain worker process is spawned. Process-wide settings (XLA flags, log
levels) are made here and only here, through `runtime`.
"""

from __future__ import annotations

import importlib
import sys

from absl import app, flags

from isic_jax import runtime

COMMANDS: dict[str, str] = {
    "synth": "writes a synthetic ISIC-like dataset in an official layout",
    "prepare": "builds the TFDS dataset from a manual ISIC download",
    "train": "trains (and resumes) a model from a config file",
    "cv": "cross-validation: a run per fold, out-of-fold predictions, CV summary",
    "pretrain": "self-supervised pretraining of a backbone (BYOL) on unlabelled images",
    "evaluate": "writes metrics.json (with CIs), plots and report.html for a split",
    "compare": "paired AUC difference of two evaluated runs (bootstrap CI, p-value, DeLong)",
    "export": "writes inference artefacts from a checkpoint",
    "predict": "class probabilities per image, as CSV",
    "verify": "checks checkpoints and exports against the checksums saved with them",
    "demo": "the main job: synth -> prepare -> train -> evaluate on generated data",
}


def _usage() -> str:
    lines = ["usage: isic-jax COMMAND [--flags]", "", "commands:"]
    lines += [f"  {name:<9} {text}" for name, text in COMMANDS.items()]
    lines += ["", "`isic-jax COMMAND --help` lists the flags of a command."]
    return "\n".join(lines)


def _preset_paths(args: list[str]) -> list[str]:
    """`--config NAME` / `--config=NAME[:arg]` with a shipped preset's name -> its file path."""
    from isic_jax import config_utils

    out = list(args)
    for i, arg in enumerate(out):
        if arg.startswith("--config="):
            out[i] = "--config=" + config_utils.config_file(arg.split("=", 1)[1])
        elif arg == "--config" and i + 1 < len(out):
            out[i + 1] = config_utils.config_file(out[i + 1])
    return out


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(_usage())
        sys.exit(0 if len(argv) >= 2 else 2)
    command = argv[1]
    if command not in COMMANDS:
        print(f"isic-jax: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        sys.exit(2)
    runtime.before_import(command)
    module = importlib.import_module(f"isic_jax.commands.{command}")
    if any(arg in ("-h", "--help", "-help") for arg in argv[2:]):
        # absl's --help lists only the flags of the __main__ module; ours live in `module`.
        print(f"usage: isic-jax {command} [--flags]\n")
        print((module.__doc__ or "").strip() + "\n")
        print(flags.FLAGS.module_help(module))
        sys.exit(0)

    def run(args: list[str]) -> None:
        runtime.after_flags(verbosity_given=flags.FLAGS["verbosity"].present)
        module.main(args)

    app.run(run, argv=[f"isic-jax {command}", *_preset_paths(argv[2:])])


if __name__ == "__main__":
    main()
