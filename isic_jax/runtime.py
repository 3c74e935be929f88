"""Process-wide settings, in one place: what `isic-jax` sets before and after parsing flags.

    runtime.before_import(command)   # cli.main, before the command module (and jax) is imported
    runtime.after_flags()            # cli.main, inside absl.app.run, before the command's main

Nothing else in the package changes global state on import or in a constructor, so library
functions run from a notebook or a script as they are (with JAX's own defaults). What is set
here, and why:
- XLA_FLAGS: the fast XLA:CPU fusion flag for this CPU (`set_default_xla_flags`), for the
  commands that run models, unless the user set XLA_FLAGS or JAX will run on a GPU/TPU here.
  Must happen before jax is imported.
- `configs`: an alias of `isic_jax.configs`, so that a config file written for a checkout
  (`from configs import default`) still imports; new files use `from isic_jax.configs import
  default`.
- logging: absl at WARNING unless `--verbosity` is given (Orbax logs every save and restore at
  INFO, TFDS every shard), minus two Orbax warnings that are expected here.
- `sys.unraisablehook`: drops the "Event loop is closed" noise TensorStore prints after a
  failed restore of a damaged checkpoint (`quiet_failed_restore_noise`).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import logging
import os
import signal
import subprocess
import sys
from typing import Any

# Commands that compile and run models (the others never import jax).
MODEL_COMMANDS = frozenset({"train", "evaluate", "export", "predict", "cv", "compare",
                            "pretrain"})


def before_import(command: str) -> None:
    """Settings that must precede importing the command module (XLA flags, the configs alias)."""
    if command in MODEL_COMMANDS:
        set_default_xla_flags()
    alias_configs_package()


def after_flags(verbosity_given: bool) -> None:
    """Settings that need parsed flags: log levels, the failed-restore noise filter."""
    if not verbosity_given:
        quiet_library_logging()
    quiet_failed_restore_noise()


def alias_configs_package() -> None:
    """`import configs` -> `isic_jax.configs` unless a `configs` package is importable already
    (a checkout's own folder on sys.path wins)."""
    if "configs" in sys.modules:
        return
    try:
        found = importlib.util.find_spec("configs")
    except (ImportError, ValueError):
        found = None
    if found is None:
        sys.modules["configs"] = importlib.import_module("isic_jax.configs")


# Orbax warnings that are expected here: checkpoints between evaluations carry no metrics, and
# `evaluate` opens the checkpoint folder read-only on purpose.
_EXPECTED_WARNINGS = ("did not provide metrics", "directory is read only")


class _DropExpected(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in _EXPECTED_WARNINGS)


_FILTER = _DropExpected()


def quiet_library_logging() -> None:
    """absl (which Orbax and TFDS log through) at WARNING, minus the expected warnings above."""
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    logger = logging.getLogger("absl")
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)


def quiet_failed_restore_noise() -> None:
    """When one read of a restore fails, TensorStore still
    completes the other reads of the restore and posts them to the asyncio loop Orbax already
    closed; each prints an "Event loop is closed" traceback (~100 for a small model, through
    `sys.unraisablehook`) that says nothing about the checkpoint. Drops those and nothing else;
    installed once per process."""
    previous = sys.unraisablehook
    if getattr(previous, "_isic_jax_quiet", False):
        return

    def hook(unraisable: Any) -> None:
        error = unraisable.exc_value
        if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
            return
        previous(unraisable)

    hook._isic_jax_quiet = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


# YNNPACK fusions for XLA:CPU. On the 2-core CPUs measured (docs/benchmarks.md): without AVX-512
# (Zen), eltwise+reduce trains a ResNet 2-3x faster than no flag; with AVX-512 (Sapphire Rapids),
# reduce alone is fastest (ResNet-18 112 px: 66 img/s vs 55 with eltwise too, 50 with neither,
# under the CPU lowering of models/cpu_lowering.py). XLA aborts the process on an unknown flag
# or value, so it is only set where this jaxlib is known (or probed) to accept it.
YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type=eltwise,reduce"
YNN_FLAG_AVX512 = "--xla_cpu_experimental_ynn_fusion_type=reduce"


def has_avx512(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this (Linux) CPU has AVX-512F; False where it cannot be read."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            return any(line.startswith("flags") and " avx512f" in line for line in f)
    except OSError:
        return False


def ynn_flag() -> str:
    """The YNN fusion flag for this CPU (see above)."""
    return YNN_FLAG_AVX512 if has_avx512() else YNN_FLAG


_YNN_KNOWN_GOOD = ("0.10.2",)  # probed on the development machines; >= 0.12 measured too


def _jaxlib_version() -> tuple[int, ...] | None:
    try:
        text = importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return None
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def _probe_xla_flag(flag: str, timeout: float = 120.0) -> bool:
    """Whether a fresh process with XLA_FLAGS=flag starts the CPU backend (an unknown flag
    aborts it)."""
    env = dict(os.environ, XLA_FLAGS=flag, JAX_PLATFORMS="cpu")
    try:
        result = subprocess.run(
            [sys.executable, "-c", "import jax; jax.devices('cpu')"],
            env=env, capture_output=True, timeout=timeout, check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


# A JAX accelerator plugin, and the device node its hardware shows up as: with both, JAX's default
# backend is that accelerator (checked without importing jax, which must come after XLA_FLAGS).
_ACCELERATORS = (
    (("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_plugins.xla_cuda12", "jax_plugins.xla_cuda13"),
     ("/dev/nvidiactl", "/dev/nvidia0")),
    (("libtpu",), ("/dev/accel0", "/dev/vfio/0")),
    (("jax_rocm7_plugin", "jax_plugins.xla_rocm7"), ("/dev/kfd",)),
)


def _module_installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def accelerator_present() -> bool:
    """Whether JAX will find a GPU or TPU here: its plugin is installed and the device exists."""
    return any(
        any(os.path.exists(node) for node in nodes) and any(map(_module_installed, modules))
        for modules, nodes in _ACCELERATORS
    )


def set_default_xla_flags() -> str | None:
    """Sets XLA_FLAGS to the fast XLA:CPU fusion flags unless the user set XLA_FLAGS.

    Call before jax is imported (`before_import` does, for the commands that run models). The flag
    only changes how XLA:CPU compiles; on a machine whose GPU/TPU JAX will use nothing is set.

    Returns:
      The flags set, or None when nothing was set (user flags, jax already imported, a non-CPU
      JAX_PLATFORMS, a GPU/TPU that JAX will use (`accelerator_present`), or a jaxlib that
      rejects the flag).
    """
    if "XLA_FLAGS" in os.environ or "jax" in sys.modules:
        return None
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms and "cpu" not in platforms.split(","):
        return None
    if not platforms and accelerator_present():
        return None  # JAX will run on the GPU/TPU: CPU flags have no business there
    version = _jaxlib_version()
    if version is None:
        return None
    flag = ynn_flag()
    known = ".".join(map(str, version)) in _YNN_KNOWN_GOOD or version[:2] >= (0, 12)
    if not known and not _probe_xla_flag(flag):
        return None
    os.environ["XLA_FLAGS"] = flag
    return flag


def ignore_stop_signals(worker_index: int = 0, worker_count: int = 1) -> None:
    """For data-loading worker processes: ignore SIGTERM and SIGINT (their parent stops them).

    SLURM signals every process of a job step and Ctrl-C every process of the terminal's group, so
    Grain's worker processes get the stop signal too; by default they die at once and the training
    process fails on its next batch before it reaches the checkpoint. Pass this function as
    `worker_init_fn` of Grain's `mp_prefetch`; Grain still stops its workers itself on close
    (stop event, then SIGKILL after 25 s).
    """
    del worker_index, worker_count
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
