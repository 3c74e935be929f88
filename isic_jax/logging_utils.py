"""Console progress and TensorBoard event files; only process 0 writes anything.

    writer = MetricWriter(workdir / "tensorboard", enabled=jax.process_index() == 0)
    writer.write_scalars(step, {"train/loss": 0.69})
    progress = Progress(total=1000, initial=0, enabled=..., bar=use_progress_bar(True))
    progress.update(step); progress.log(step, {"loss": 0.69}); progress.close()

TensorBoard events go through tensorboardX (no TensorFlow). The progress display is a tqdm bar on
an interactive terminal; with CI=true, no TTY, or `config.train.progress=False` it prints one
plain line per log instead, which is what a CI log or a redirected file wants.
"""

from __future__ import annotations

import math
import os
import pathlib
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO


def say(enabled: bool, message: str) -> None:
    """Prints `message` (flushed) when `enabled` (process 0 in a multi-process run)."""
    if enabled:
        print(message, flush=True)


def use_progress_bar(requested: bool, stream: TextIO | None = None) -> bool:
    """A tqdm bar only when asked for, on a TTY, and not under CI (CI=true/1)."""
    stream = stream or sys.stderr
    ci = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
    isatty = getattr(stream, "isatty", lambda: False)
    return bool(requested) and not ci and bool(isatty())


def format_scalars(scalars: Mapping[str, Any]) -> str:
    """"loss 0.6931  lr 1.00e-03  img/s 123.4" (compact, stable order as given)."""
    parts = []
    for key, value in scalars.items():
        if isinstance(value, float):
            if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5) and math.isfinite(value):
                text = f"{value:.3e}"
            else:
                text = f"{value:.4f}" if abs(value) < 100 else f"{value:.1f}"
        else:
            text = str(value)
        parts.append(f"{key} {text}")
    return "  ".join(parts)


def _terminal_size(fd: int) -> bool:
    """Whether `fd` is a terminal that reports a usable size."""
    try:
        size = os.get_terminal_size(fd)
    except OSError:
        return False
    return size.columns > 0 and size.lines > 0


class MetricWriter:
    """Scalars to TensorBoard event files (tensorboardX). A no-op when not enabled."""

    def __init__(self, logdir: str | os.PathLike, enabled: bool = True):
        self._writer = None
        if enabled:
            from tensorboardX import SummaryWriter

            pathlib.Path(logdir).mkdir(parents=True, exist_ok=True)
            self._writer = SummaryWriter(logdir=str(logdir), flush_secs=30)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        if self._writer is None:
            return
        for key, value in scalars.items():
            try:
                value = float(value)
            except (TypeError, ValueError):
                continue
            self._writer.add_scalar(key, value, global_step=int(step))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class Progress:
    """Progress of a count (steps, images): a tqdm bar (interactive) or plain lines (CI, files).
    Process 0 only.

    Args:
      total: last step of the run (or number of items).
      initial: step the run starts from (resume).
      enabled: False on processes other than 0 (nothing is printed).
      bar: tqdm bar (True) or plain lines (False): one per `log` call, and with `label` one
        about every 10 % of `total` ("label: done/total units (rate unit/s)").
      stream: where to write (stderr for the bar, stdout for lines by default).
      unit: what is counted.
      label: prefix of the 10 % lines (None: no such lines).
    """

    def __init__(
        self,
        total: int,
        initial: int = 0,
        enabled: bool = True,
        bar: bool = False,
        stream: TextIO | None = None,
        unit: str = "step",
        label: str | None = None,
    ):
        self.total = int(total)
        self.enabled = enabled
        self._bar = None
        self._step = int(initial)
        self._stream = stream
        self._unit, self._label = unit, label
        self._next_line = self._step + max(1, self.total // 10)
        self._start = time.perf_counter()
        if enabled and bar:
            from tqdm import tqdm

            # A pty that reports a 0x0 size (e.g. under `script`, some CI runners) makes tqdm
            # hide the bar: fall back to a fixed size there.
            sized = _terminal_size(2)
            self._bar = tqdm(
                total=self.total,
                initial=self._step,
                file=stream or sys.stderr,
                dynamic_ncols=sized,
                ncols=None if sized else 100,
                nrows=None if sized else 24,
                unit=unit,
                mininterval=0.5,
            )

    def update(self, step: int) -> None:
        """Cheap; call every step (with the count done so far)."""
        if self._bar is not None and step > self._step:
            self._bar.update(step - self._step)
        self._step = step
        if (self._bar is None and self.enabled and self._label is not None
                and (step >= self._next_line or step == self.total)):
            rate = step / max(time.perf_counter() - self._start, 1e-9)
            print(f"{self._label}: {step}/{self.total} {self._unit}s ({rate:.1f} "
                  f"{self._unit}/s)", file=self._stream or sys.stdout, flush=True)
            self._next_line = step + max(1, self.total // 10)

    def advance(self, n: int = 1) -> None:
        """`update` with a count of `n` more."""
        self.update(self._step + n)

    def log(self, step: int, scalars: Mapping[str, Any], prefix: str = "train") -> None:
        """One line (or the bar's postfix) with the given scalars."""
        if not self.enabled:
            return
        text = format_scalars(scalars)
        if self._bar is not None:
            if prefix == "train":
                self._bar.set_postfix_str(text, refresh=False)
            else:
                self._bar.write(f"[{prefix} step {step}/{self.total}] {text}")
        else:
            width = len(str(self.total))
            print(
                f"[{prefix} step {step:>{width}}/{self.total}] {text}",
                file=self._stream or sys.stdout,
                flush=True,
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
