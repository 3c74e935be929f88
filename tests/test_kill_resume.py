"""SIGKILL at several points, including inside an asynchronous checkpoint write; every restart
resumes from the newest complete checkpoint and the run ends bit-identical to an uninterrupted one.

The training run is a subprocess of this file (`python tests/test_kill_resume.py WORKDIR`, in-memory
data, 1 CPU device, the same environment as the in-process reference). It kills itself at exact
places through the test hook `ISIC_JAX_TEST_KILL_AT=<point>:<step>` (isic_jax/checkpointing.py):
`during_save:N` dies inside the background commit of step N's save (its `N.orbax-checkpoint-tmp`
folder exists, nothing is finalized), `after_step:N` dies right after step N once earlier saves are
finalized. Another, untimed SIGKILL comes from outside (the test) while a run starts up.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from train_helpers import REPO, cache_env, compile_cache, restore_params  # noqa: F401

pytestmark = pytest.mark.usefixtures("compile_cache")

# 8 micro-steps, a checkpoint every 2, evaluation every 4. Everything that carries state across a
# resume is on (momentum, gradient accumulation, EMA, dropout, augmentation RNG, async saves).
OVERRIDES = {"train.num_steps": 8, "train.checkpoint_every": 2, "train.eval_every": 4,
             "train.log_every": 2, "train.keep_checkpoints": 3}
TIMEOUT = 180


def _config():
    from train_helpers import standard_config

    return standard_config(**OVERRIDES)


def _worker(workdir: str) -> dict:
    from train_helpers import make_data

    from isic_jax.testing import runs

    config = _config()
    result = runs.train(config, workdir, data=make_data(config))
    return {"step": result["step"], "val_loss": (result["val"] or {}).get("loss")}


def _start(workdir: pathlib.Path, kill_at: str | None) -> subprocess.Popen:
    env = cache_env(os.environ)
    env.pop("ISIC_JAX_TEST_KILL_AT", None)
    if kill_at:
        env["ISIC_JAX_TEST_KILL_AT"] = kill_at
    return subprocess.Popen([sys.executable, __file__, str(workdir)], env=env, cwd=str(REPO),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen) -> str:
    try:
        return proc.communicate(timeout=TIMEOUT)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        tail = proc.communicate()[0][-4000:]
        raise AssertionError(f"run did not end in {TIMEOUT} s:\n{tail}") from None


def _on_disk(workdir: pathlib.Path) -> list[str]:
    return sorted(p.name for p in (workdir / "checkpoints").iterdir())


@pytest.mark.slow
def test_sigkill_anywhere_resumes_from_newest_complete_checkpoint(tmp_path) -> None:
    from train_helpers import make_data

    from isic_jax.testing import runs


    # The uninterrupted reference, in this process (same devices and XLA flags as the runs).
    config = _config()
    reference = runs.train(config, tmp_path / "reference", data=make_data(config))
    assert reference["step"] == 8
    workdir = tmp_path / "run"

    # 1. Killed inside the background commit of step 4's checkpoint: 2 is complete, 4 is not.
    proc = _start(workdir, "during_save:4")
    log = _finish(proc)
    assert proc.returncode == -signal.SIGKILL, log
    assert "test hook ISIC_JAX_TEST_KILL_AT=during_save:4" in log
    assert _on_disk(workdir) == ["2", "4.orbax-checkpoint-tmp"]

    # 2. Restarted: resumes from 2 (the interrupted save is named and ignored), then SIGKILL
    #    from outside as soon as it says so, untimed: in compilation, a step or a save.
    proc = _start(workdir, None)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")),
                              daemon=True)
    reader.start()
    deadline = time.monotonic() + TIMEOUT
    while not any("checkpoints/2 (2/8)" in line for line in lines):
        assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=TIMEOUT)
    reader.join(timeout=TIMEOUT)
    log = "".join(lines)
    assert proc.returncode == -signal.SIGKILL, log
    assert "4.orbax-checkpoint-tmp: a save that never finished" in log
    newest = max(int(n) for n in _on_disk(workdir) if n.isdigit())

    # 3. Restarted: resumes from whatever was newest and complete; killed after step 7, once
    #    the saves before it are complete (4 and 6 at the latest).
    proc = _start(workdir, "after_step:7")
    log = _finish(proc)
    assert f"checkpoints/{newest} ({newest}/8)" in log, log
    assert proc.returncode == -signal.SIGKILL, log
    assert [n for n in _on_disk(workdir) if not n.isdigit()] == []  # tmp folders cleaned up
    assert max(int(n) for n in _on_disk(workdir)) == 6

    # 4. Killed inside the commit of the final save (step 8), after resuming from 6.
    proc = _start(workdir, "during_save:8")
    log = _finish(proc)
    assert proc.returncode == -signal.SIGKILL, log
    assert "checkpoints/6 (6/8)" in log
    assert "8.orbax-checkpoint-tmp" in _on_disk(workdir)

    # 5. The last restart finishes from 6 and ends exactly where the uninterrupted run ended.
    proc = _start(workdir, None)
    log = _finish(proc)
    assert proc.returncode == 0, log
    assert "checkpoints/6 (6/8)" in log
    assert json.loads(log.strip().splitlines()[-1])["step"] == 8
    expected, got = restore_params(tmp_path / "reference"), restore_params(workdir)
    assert expected.keys() == got.keys()
    different = [k for k in expected if not np.array_equal(expected[k], got[k])]
    assert not different, f"not bit-identical after 4 kills: {different[:5]}"
    assert json.loads(log.strip().splitlines()[-1])["val_loss"] == reference["val"]["loss"]


if __name__ == "__main__":
    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    print(json.dumps(_worker(sys.argv[1]), default=float), flush=True)
