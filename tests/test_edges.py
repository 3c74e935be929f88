"""Bad input at the edges of `isic-jax train`: each fails fast, says what to do, and leaves the
workdir's checkpoints untouched (compared file by file with sha256 before and after).

Through the real command (`python -m isic_jax train ...` in subprocesses, bounded by timeouts) on a
tiny prepared dataset (`isic-jax synth` + `prepare`, 32 images at 40 px): SIGTERM -> checkpoint
and exit 75; then a checkpoint of another model, an override of the wrong type, a missing data
directory and a coordinator port in use, each refused; then the same workdir resumes. The data
checks that need no process (empty folder, another release or size) call the library.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from train_helpers import REPO, cache_env, compile_cache  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("compile_cache")

TIMEOUT = 180


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> pathlib.Path:
    """A TFDS data_dir holding isic/isic2020_40 (synthetic, 2 folds of 16 images)."""
    from isic_jax.data import prepare as prepare_lib
    from isic_jax.data import synth

    root = tmp_path_factory.mktemp("data")
    synth.write_synthetic(root / "src", "isic2020", 32, 0)
    prepare_lib.prepare(root / "src", root / "data", image_size=40, num_folds=2)
    assert (root / "data" / "isic" / "isic2020_40").is_dir()
    return root / "data"


def _args(workdir: pathlib.Path, data_dir: pathlib.Path | str, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "isic_jax", "train", "--config", "configs/smoke.py",
        f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
        "--config.data.stored_size=40", "--config.data.image_size=32", "--config.model.width=4",
        *extra,
    ]


def _env() -> dict[str, str]:
    env = cache_env(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=_env(), cwd=str(REPO), capture_output=True, text=True,
                          timeout=TIMEOUT, check=False)


def _digest(folder: pathlib.Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_line(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.slow
def test_sigterm_exits_75_and_bad_inputs_leave_checkpoints_untouched(prepared, tmp_path):
    workdir = tmp_path / "run"
    # 1. SIGTERM during training: the step finishes, a checkpoint is written, exit status 75.
    proc = subprocess.Popen(
        _args(workdir, prepared, "--config.train.num_steps=500", "--config.train.log_every=1",
              "--config.train.checkpoint_every=1000", "--config.train.eval_every=1000"),
        env=_env(), cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")),
                              daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + TIMEOUT
        while not any("[train step" in line for line in lines):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=TIMEOUT)
    finally:
        proc.kill()
    reader.join(timeout=30)
    log = "".join(lines)
    assert proc.returncode == 75, log
    assert "SIGTERM received: finishing the current step" in log
    assert "Stopped by signal SIGTERM after step" in log
    steps = [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(steps) == 1 and 1 <= steps[0] < 500
    stopped = steps[0]
    assert f"after step {stopped};" in log
    before = _digest(workdir)

    # 2. A checkpoint of another model in the workdir (here: twice as wide).
    result = _run(_args(workdir, prepared, "--config.model.width=8"))
    message = _one_line(result.stderr)
    assert result.returncode == 5, result.stderr
    assert "holds checkpoints of another model" in message
    assert "model.width: 4 -> 8" in message
    assert "Use a new --workdir" in message
    assert _digest(workdir) == before

    # 3. An override of the wrong type: rejected while the flags are parsed.
    result = _run(_args(workdir, prepared, "--config.train.batch_size=eight"))
    message = _one_line(result.stderr)
    assert result.returncode == 1, result.stderr
    assert "config.train.batch_size takes an integer" in message
    assert "e.g. --config.train.batch_size=8" in message
    assert _digest(workdir) == before

    # 4. A data directory that does not exist.
    result = _run(_args(workdir, tmp_path / "nowhere"))
    message = _one_line(result.stderr)
    assert result.returncode == 4, result.stderr
    assert f"config.data.data_dir={tmp_path / 'nowhere'} does not exist" in message
    assert "isic-jax prepare --source" in message and "--image-size 40" in message
    assert _digest(workdir) == before

    # 5. The coordinator's port is taken (by a listening socket standing in for another run).
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        t0 = time.monotonic()
        result = _run(_args(workdir, prepared, f"--coordinator_address=127.0.0.1:{port}",
                            "--num_processes=2", "--process_id=0"))
        assert time.monotonic() - t0 < 60  # no wait for peers
    message = _one_line(result.stderr)
    assert result.returncode == 2, result.stderr
    assert f"coordinator port {port}" in message and "already in use" in message
    assert "--coordinator_address=127.0.0.1:OTHERPORT" in message
    assert _digest(workdir) == before

    # 6. The right command still resumes where the SIGTERM left it.
    result = _run(_args(workdir, prepared, f"--config.train.num_steps={stopped + 1}",
                        "--config.train.eval_every=1000"))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert f"checkpoints/{stopped} ({stopped}/{stopped + 1})" in result.stdout


def _data_config(data_dir, release: str = "isic2020", size: int = 40):
    from isic_jax.configs import smoke

    config = smoke.get_config()
    config.data.data_dir = str(data_dir)
    config.data.release = release
    config.data.stored_size = size
    return config.data


def test_empty_data_dir_says_how_to_prepare(tmp_path) -> None:
    from isic_jax.data import dataset

    empty = tmp_path / "empty"
    empty.mkdir()
    # What an interrupted `prepare` leaves (TFDS's incomplete folder) counts as nothing.
    (empty / "isic" / "isic2020_40" / "incomplete.ABC123_1.0.0").mkdir(parents=True)
    with pytest.raises(dataset.DataNotFoundError) as info:
        dataset.check_prepared_dataset(_data_config(empty))
    message = _one_line(str(info.value))
    assert f"{empty} holds no prepared ISIC dataset" in message
    assert f"isic-jax prepare --source YOUR_ISIC2020_DOWNLOAD --data-dir {empty} " \
           f"--image-size 40" in message


def test_dataset_of_another_release_or_size_names_what_is_there(prepared) -> None:

    from isic_jax.data import dataset
    dataset.check_prepared_dataset(_data_config(prepared))  # the prepared one passes
    for release, size in [("isic2019", 40), ("isic2020", 96)]:
        with pytest.raises(dataset.DataNotFoundError) as info:
            dataset.check_prepared_dataset(_data_config(prepared, release, size))
        message = _one_line(str(info.value))
        assert f"holds isic/isic2020_40 but not isic/{release}_{size}" in message
        assert "--config.data.release=isic2020 --config.data.stored_size=40" in message
        assert f"--image-size {size}" in message


def test_one_exit_code_table() -> None:
    """Every command uses `commands.ExitCode`; the preemption status is the one the training
    loop's guard documents, and no two meanings share a number."""
    from isic_jax.commands import ExitCode
    from isic_jax.training import preemption

    assert ExitCode.PREEMPTED == preemption.EXIT_PREEMPTED == 75
    assert len({int(code) for code in ExitCode}) == len(ExitCode)
    commands = pathlib.Path(__file__).resolve().parents[1] / "isic_jax" / "commands"
    for path in commands.glob("*.py"):
        text = path.read_text()
        assert "EXIT_" not in text, f"{path.name} defines its own exit codes"
        assert not re.search(r"fail\([^)]*, \d+\)", text), f"{path.name} fails with a bare number"
