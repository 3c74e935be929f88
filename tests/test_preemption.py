"""PreemptionGuard: SIGTERM finishes the step and saves; a second SIGTERM exits at once.

The signal tests run a tiny loop in a subprocess (a signal must not reach pytest itself), each
bounded by timeouts. The multi-process agreement is tested in test_distributed.py.
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from isic_jax.training.preemption import PreemptionGuard

REPO = pathlib.Path(__file__).resolve().parents[1]

# A "training loop": each step takes 50 ms and records itself once complete; on a stop it
# "saves" (optionally slowly) and exits 0.
LOOP = r"""
import pathlib, sys, time
from isic_jax.training.preemption import PreemptionGuard

out = pathlib.Path(sys.argv[1])
save_seconds = float(sys.argv[2])
with PreemptionGuard() as guard:
    print("mode", guard.mode, flush=True)
    for step in range(1, 100_000):
        time.sleep(0.05)                       # the step
        (out / "done").write_text(str(step))   # completed
        if step == 3:
            (out / "ready").touch()
        if guard.should_stop(step):
            (out / "saving").write_text(str(step))
            time.sleep(save_seconds)
            (out / "saved").write_text(str(step))
            break
print("exited loop", flush=True)
"""


def _start(tmp_path: pathlib.Path, save_seconds: float) -> subprocess.Popen:
    script = tmp_path / "loop.py"
    script.write_text(LOOP)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO), env.get("PYTHONPATH", "")] if p)
    return subprocess.Popen(
        [sys.executable, str(script), str(tmp_path), str(save_seconds)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _wait_for(path: pathlib.Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"loop exited early ({proc.returncode}): {proc.communicate()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{path.name} not written within {timeout} s")
        time.sleep(0.02)


def test_sigterm_finishes_step_saves_and_exits_0(tmp_path):
    proc = _start(tmp_path, save_seconds=0.2)
    try:
        _wait_for(tmp_path / "ready", proc)
        at_signal = int((tmp_path / "done").read_text())
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "mode local" in out and "exited loop" in out
    assert "finishing the current step, saving a checkpoint" in err
    saved = int((tmp_path / "saved").read_text())
    # It saved the last completed step, right after the one that was running at the signal.
    assert saved == int((tmp_path / "done").read_text())
    assert at_signal <= saved <= at_signal + 2


def test_second_sigterm_exits_immediately(tmp_path):
    proc = _start(tmp_path, save_seconds=120)
    try:
        _wait_for(tmp_path / "ready", proc)
        proc.send_signal(signal.SIGTERM)
        _wait_for(tmp_path / "saving", proc, timeout=30)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
        elapsed = time.monotonic() - t0
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGTERM  # killed by the default action, not a clean exit
    assert elapsed < 10
    assert not (tmp_path / "saved").exists()  # the slow save was cut short


def test_guard_in_process_flags_and_restores_handlers():
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with PreemptionGuard(num_processes=1) as guard:
        assert guard.mode == "local"
        assert not guard.should_stop(1)
        signal.raise_signal(signal.SIGINT)  # handled by the guard, no KeyboardInterrupt
        assert guard.requested and guard.signal_received == signal.SIGINT
        assert guard.should_stop(2)
        assert guard.should_stop(3)  # stays True
        # After the first signal the kernel default takes over: a second one would kill.
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    assert {s: signal.getsignal(s) for s in before} == before


@pytest.mark.parametrize("kwargs", [{"mode": "sometimes"}, {"sync_every": 0}])
def test_guard_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        PreemptionGuard(**kwargs)


def test_worker_processes_can_ignore_stop_signals():
    code = (
        "import os, signal\n"
        "from isic_jax.runtime import ignore_stop_signals\n"
        "ignore_stop_signals(0, 1)\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "print('alive')\n"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO), env.get("PYTHONPATH", "")] if p)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "alive", proc.stderr
