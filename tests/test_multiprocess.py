"""Several JAX processes on JAX's distributed runtime: train, checkpoint, resume, change topology.

Every run is a subprocess of this file (`python tests/test_multiprocess.py '{json}'`), because the
number of fake CPU devices must be set before jax is imported. Two processes x 2 CPU devices join
through `distributed.maybe_initialize` on localhost (gloo collectives); every run is bounded by a
timeout, and a hung or failed peer is killed, so that a lost process cannot hang CI.

The reference is one process x 4 devices. Global batches are identical whatever the split: the
input pipeline's batch j of process p holds stream positions p + P * (j * B + i), so the P
processes together hold positions [j * G, (j + 1) * G) (G the global batch); augmentation is keyed
by position, BatchNorm and the loss reduce over the global batch, dropout is off (its mask follows
the row order, which does change). The rows sit on other devices, so sums run in another order:
results agree to float32 rounding (ATOL, as in test_parallel.py), not bit for bit.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import numpy as np
import pytest
from train_helpers import REPO, cache_env, compile_cache  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("compile_cache")

ATOL = 1e-5  # params after 6 SGD steps of resnet_tiny, float32 (see test_parallel.py)
TIMEOUT = 240  # seconds for one run of all its processes (they normally take ~15-30 s)


# ------------------------------------------------------------------------------ the worker


def _worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One process of a run: joins the others, trains, optionally dumps the final state."""
    from isic_jax.training import distributed

    n, pid = spec["num_processes"], spec["process_id"]
    if n > 1:
        distributed.maybe_initialize(f"127.0.0.1:{spec['port']}", n, pid,
                                     initialization_timeout=60)
    import jax
    from train_helpers import make_data, standard_config

    from isic_jax.testing import runs

    config = standard_config(**{"train.parallelism": spec["mode"], "model.dropout": 0.0,
                                **spec.get("overrides", {})})
    result = runs.train(config, spec["workdir"], data=make_data(config),
                                      stop_after_step=spec.get("stop_after_step"))
    state = jax.device_get(result["state"])
    if spec.get("dump") and jax.process_index() == 0:
        flat = jax.tree_util.tree_flatten_with_path(state)[0]
        np.savez(spec["dump"], **{jax.tree_util.keystr(p): np.asarray(x) for p, x in flat})
    val = result["val"] or {}
    return {
        "process": jax.process_index(),
        "processes": jax.process_count(),
        "devices": jax.device_count(),
        "local_devices": jax.local_device_count(),
        "step": result["step"],
        "val_loss": val.get("loss"),
        "val_examples": val.get("num_examples"),
        "param_sum": float(sum(np.sum(np.abs(x), dtype=np.float64)
                               for x in jax.tree.leaves(state.params))),
        "stopped_by_signal": result["stopped_by_signal"],
    }


class _Recorder:
    """Wraps the training iterator; records the stream positions of every batch drawn."""

    def __init__(self, it: Any, out: list):
        self._it, self._out = it, out

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = next(self._it)
        self._out.append(np.asarray(batch["position"]).tolist())
        return batch

    def get_state(self) -> Any:
        return self._it.get_state()

    def set_state(self, state: Any) -> None:
        self._it.set_state(state)


def _device_count_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One process, 4 devices: a 9-step reference on 4, and a run resumed on 4 -> 2 -> 1 device.

    `data.device_prefetch=0`: no look-ahead, so the batches drawn are the batches trained on.
    """
    import jax
    from train_helpers import make_data, standard_config

    from isic_jax.testing import runs


    root = pathlib.Path(spec["root"])
    config = standard_config(**{"train.num_steps": 9, "data.device_prefetch": 0})
    out: dict[str, Any] = {"devices": jax.device_count()}

    def segment(workdir: pathlib.Path, n_devices: int, stop: int | None, positions: list) -> Any:
        data = make_data(config)
        make = data.train_iterator
        data.train_iterator = lambda: _Recorder(make(), positions)
        result = runs.train(config, workdir, devices=jax.devices()[:n_devices],
                                          data=data, stop_after_step=stop)
        return jax.device_get(result["state"])

    ref_positions: list = []
    reference = segment(root / "reference", 4, None, ref_positions)
    positions: list = []
    segment(root / "run", 4, 3, positions)          # checkpoint at 3, stopped
    segment(root / "run", 2, 6, positions)          # resumed on 2 devices, checkpoint at 6
    state = segment(root / "run", 1, None, positions)  # resumed on 1 device, to the end
    out["reference_positions"] = ref_positions
    out["positions"] = positions
    diffs = [float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b))))
             for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(state), strict=True)]
    out["max_diff"] = max(diffs)
    out["moved"] = float(max(np.max(np.abs(np.asarray(a))) for a in jax.tree.leaves(
        reference.params)))
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(workdir: pathlib.Path, processes: int, devices_per_process: int, mode: str = "jit",
          **spec: Any) -> list[subprocess.Popen]:
    """Starts the `processes` subprocesses of one training run."""
    env = cache_env(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices_per_process}"
    env.pop("CUDA_VISIBLE_DEVICES", None)
    port = _free_port()
    return [
        subprocess.Popen(
            [sys.executable, __file__, json.dumps({
                **spec, "workdir": str(workdir), "mode": mode, "port": port,
                "num_processes": processes, "process_id": i,
            })],
            env=env, cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i in range(processes)
    ]


def run(workdir: pathlib.Path, processes: int, devices_per_process: int, mode: str = "jit",
        **spec: Any) -> tuple[list[dict], list[str]]:
    """Runs one training run as `processes` subprocesses; returns their results and logs."""
    procs = start(workdir, processes, devices_per_process, mode, **spec)
    deadline = time.monotonic() + TIMEOUT
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        logs = [p.communicate()[0] for p in procs]
        raise AssertionError(f"run did not finish in {TIMEOUT} s:\n" + _tails(logs)) from None
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    if any(p.returncode != 0 for p in procs):
        raise AssertionError(f"exit codes {[p.returncode for p in procs]}:\n" + _tails(logs))
    return [json.loads(log.strip().splitlines()[-1]) for log in logs], logs


def _tails(logs: list[str]) -> str:
    return "\n".join(f"--- process {i}:\n{log[-4000:]}" for i, log in enumerate(logs))


def _load(path: pathlib.Path) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return dict(f)


def _max_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    assert a.keys() == b.keys()
    return max(float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) for k in a if a[k].size)


# ------------------------------------------------------------------------------ the test


@pytest.mark.slow
def test_two_processes_train_checkpoint_resume_and_change_process_count(tmp_path) -> None:
    """One test (not fixtures shared by several): under pytest-xdist each worker would rerun the
    shared runs, and five runs of ~10-30 s each are the budget here."""
    # Reference: 1 process x 4 devices, 6 uninterrupted steps (checkpoints at 3 and 6).
    ref_dir = tmp_path / "reference"
    outs, _ = run(ref_dir, 1, 4, dump=str(tmp_path / "reference.npz"))
    assert outs[0]["step"] == 6 and outs[0]["devices"] == 4
    ref_state, ref_val_loss = _load(tmp_path / "reference.npz"), outs[0]["val_loss"]

    # 2 processes x 2 devices (jit), "killed" after step 4: the latest checkpoint is step 3.
    part = tmp_path / "part"
    outs, logs = run(part, 2, 2, stop_after_step=4)
    assert [o["process"] for o in outs] == [0, 1]
    assert all(o["step"] == 4 and o["devices"] == 4 and o["local_devices"] == 2 for o in outs)
    # Only process 0 prints; every process writes its own input-pipeline state.
    assert "Training resnet_tiny" in logs[0] and "Training resnet_tiny" not in logs[1]
    files = sorted(p.name for p in (part / "checkpoints" / "3" / "data_iter").iterdir()
                   if p.suffix == ".json")
    assert files == ["process_0-of-2.json", "process_1-of-2.json"]

    # Resume with 2 processes: the same parameters as the single-process run.
    workdir = tmp_path / "resumed"
    shutil.copytree(part, workdir)
    outs, logs = run(workdir, 2, 2, dump=str(tmp_path / "resumed.npz"))
    assert "checkpoints/3 (3/6)" in logs[0]
    assert all(o["step"] == 6 for o in outs)
    # The processes stayed in step and both evaluated every validation example.
    assert outs[0]["param_sum"] == outs[1]["param_sum"]
    assert outs[0]["val_examples"] == outs[1]["val_examples"] == 12
    assert outs[0]["val_loss"] == outs[1]["val_loss"]
    diff = _max_diff(ref_state, _load(tmp_path / "resumed.npz"))
    assert diff < ATOL, diff
    assert outs[0]["val_loss"] == pytest.approx(ref_val_loss, abs=1e-5)
    # Process 0 alone writes the reports: one line per evaluation (3 before the stop, 6 now).
    history = [json.loads(x)["step"] for x in (workdir / "eval_history.jsonl").open()]
    assert history == [3, 6]
    assert len(list((workdir / "tensorboard").glob("events.out.tfevents.*"))) == 2  # 2 runs

    # 2 processes -> 1 (jit, 4 devices): the input state counts global batches, so the same
    # global batches continue, now all in one process.
    down = tmp_path / "down"
    shutil.copytree(part, down)
    outs, logs = run(down, 1, 4, dump=str(tmp_path / "down.npz"))
    assert outs[0]["step"] == 6
    assert "saved by 2 process(es) and resumes on 1" in logs[0]
    assert _max_diff(ref_state, _load(tmp_path / "down.npz")) < ATOL

    # 1 process -> 2 (pmap, 2 x 2 devices; each process restores onto its own devices).
    up = tmp_path / "up"
    shutil.copytree(ref_dir, up)
    shutil.rmtree(up / "checkpoints" / "6")  # as if the single-process run stopped after 3
    outs, logs = run(up, 2, 2, mode="pmap", dump=str(tmp_path / "up.npz"))
    assert "checkpoints/3 (3/6)" in logs[0]
    assert "saved by 1 process(es) and resumes on 2" in logs[0]
    assert all(o["step"] == 6 for o in outs)
    assert outs[0]["param_sum"] == outs[1]["param_sum"]
    assert _max_diff(ref_state, _load(tmp_path / "up.npz")) < ATOL


@pytest.mark.slow
def test_sigterm_to_one_process_stops_all_at_the_same_step(tmp_path) -> None:
    """SIGTERM to process 1 only (as when one host is preempted): JAX's preemption service
    (jax.distributed's SIGTERM handler) makes both stop after the same step; both save that
    step together and report the stop (the command then exits 75)."""
    workdir = tmp_path / "w"
    procs = start(workdir, 2, 2, overrides={"train.num_steps": 5000, "train.log_every": 1,
                                            "train.checkpoint_every": 5000,
                                            "train.eval_every": 5000})
    lines: list[list[str]] = [[], []]
    readers = [threading.Thread(target=lambda p=p, out=out: out.extend(iter(p.stdout.readline,
                                                                            "")), daemon=True)
               for p, out in zip(procs, lines, strict=True)]
    for r in readers:
        r.start()
    try:
        deadline = time.monotonic() + TIMEOUT
        while not any("[train step" in line for line in lines[0]):
            assert all(p.poll() is None for p in procs) and time.monotonic() < deadline, (
                _tails(["".join(x) for x in lines]))
            time.sleep(0.02)
        procs[1].send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            p.kill()
    for r in readers:
        r.join(timeout=30)
    logs = ["".join(x) for x in lines]
    assert [p.returncode for p in procs] == [0, 0], _tails(logs)
    outs = [json.loads(log.strip().splitlines()[-1]) for log in logs]
    assert all(o["stopped_by_signal"] for o in outs)
    stop = outs[0]["step"]
    assert outs[1]["step"] == stop < 5000
    assert outs[0]["param_sum"] == outs[1]["param_sum"]
    assert f"Stopped by a stop signal to one of the processes after step {stop};" in logs[0]
    assert f"every process saves a checkpoint after step {stop}" in logs[1]
    step_dir = workdir / "checkpoints" / str(stop)
    assert sorted(p.name for p in (step_dir / "data_iter").glob("*.json")) == [
        "process_0-of-2.json", "process_1-of-2.json"]
    assert [p.name for p in (workdir / "checkpoints").iterdir()] == [str(stop)]


@pytest.mark.slow
def test_device_count_changes_4_2_1_keep_state_and_data_order(tmp_path) -> None:
    """Same process count, fewer devices at each resume: the state is restored onto the current
    devices and the input state is unchanged, so the data order continues exactly: the batches
    trained on are the uninterrupted run's, position for position."""
    env = cache_env(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    spec = {"kind": "device_count", "root": str(tmp_path)}
    proc = subprocess.run([sys.executable, __file__, json.dumps(spec)], env=env, cwd=str(REPO),
                          capture_output=True, text=True, timeout=TIMEOUT, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["devices"] == 4
    assert "Written by 1 process(es) on 4 device(s), resumed by 1 on 2" in proc.stdout
    assert "Written by 1 process(es) on 2 device(s), resumed by 1 on 1" in proc.stdout
    assert len(out["positions"]) == 9
    assert out["positions"] == out["reference_positions"]
    assert out["moved"] > 0.1
    assert out["max_diff"] < ATOL, out["max_diff"]


if __name__ == "__main__":
    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    spec = json.loads(sys.argv[1])
    work = _device_count_worker if spec.get("kind") == "device_count" else _worker
    print(json.dumps(work(spec), default=float), flush=True)
