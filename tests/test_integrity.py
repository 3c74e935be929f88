"""Content checksums: a checkpoint or export whose bytes changed on disk (and still decode) is
caught before its weights are used; resume sets it aside and continues from the previous one.

Damage is made the way the issue saw it: 16 bytes inverted in the middle of the largest data
file of the state, at an offset where the checkpoint still reads (`integrity_helpers`).
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest
from integrity_helpers import damage_silently, edit_json_file
from train_helpers import (  # noqa: F401
    REPO,
    compile_cache,
    make_data,
    restore_params,
    standard_config,
)

pytestmark = pytest.mark.usefixtures("compile_cache")


def _cli(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", CI="true")
    return subprocess.run([sys.executable, "-m", "isic_jax", *args], env=env, cwd=str(REPO),
                          capture_output=True, text=True, timeout=300, check=False)


def test_checksums_name_the_array_that_changed() -> None:
    import jax
    import jax.numpy as jnp

    from isic_jax.training import integrity

    arrays = {
        "params.dense.kernel": np.arange(12, dtype=np.float32).reshape(3, 4),
        "params.dense.bias": jnp.ones((4,), jnp.bfloat16),  # a device array, 2-byte dtype
        "mask": np.array([True, False]),
        "step": np.array(7, np.int32),
    }
    entries, unchecked = integrity.array_entries(integrity.named_arrays(arrays))
    assert unchecked == [] and entries["params.dense.bias"]["dtype"] == "bfloat16"
    assert integrity.check_arrays(entries, arrays, "here") == 4
    assert integrity.check_arrays(entries, jax.device_put(arrays), "here") == 4

    changed = dict(arrays, **{"params.dense.kernel": arrays["params.dense.kernel"] + 1e-7})
    changed["params.dense.kernel"][1, 2] = 99.0
    with pytest.raises(integrity.IntegrityError,
                       match=r"here: array params.dense.kernel does not match the checksum"):
        integrity.check_arrays(entries, changed, "here")
    with pytest.raises(integrity.IntegrityError, match=r"array step is int32 \(2,\), but int32 "):
        integrity.check_arrays(entries, dict(arrays, step=np.zeros(2, np.int32)), "here")
    with pytest.raises(integrity.IntegrityError, match="array mask is recorded .* not restored"):
        integrity.check_arrays(entries, {k: v for k, v in arrays.items() if k != "mask"}, "x")
    # A subset (e.g. the params of a state) is checked without the rest.
    assert integrity.check_arrays(entries, {"step": arrays["step"]}, "x", complete=False) == 1


def _save(ckpt, step: int, state: dict, next_index: int) -> None:
    from isic_jax.training import checkpointing

    ckpt.save(step, state, rng=np.array([0, step], np.uint32),
              data_iter=checkpointing.IteratorState({"next_index": next_index}),
              config={"seed": 0, "lr": 0.1}, train_loss=0.25)


def test_checkpointer_checks_state_input_state_and_reads_old_checkpoints(tmp_path) -> None:
    from isic_jax.training import checkpointing, integrity

    rng = np.random.default_rng(0)
    state = {"params": {"a": rng.standard_normal((64, 32)).astype(np.float32),
                        "b": rng.standard_normal((3, 3, 8, 8)).astype(np.float32)},
             "step": np.array(1, np.int32)}
    target = {"params": {"a": np.zeros((64, 32), np.float32),
                         "b": np.zeros((3, 3, 8, 8), np.float32)}, "step": np.array(0, np.int32)}
    with checkpointing.Checkpointer(tmp_path, keep=5) as ckpt:
        for step in (1, 2):
            _save(ckpt, step, state, step)
    # The checksums are an item of the checkpoint, one file per process.
    files = sorted(p.name for p in (tmp_path / "2" / "checksums").glob("*.json"))
    assert files == ["process_0-of-1.json"]
    with checkpointing.Checkpointer(tmp_path) as ckpt:
        restored = ckpt.restore(2, target, data_iter=checkpointing.IteratorState())
        assert restored.checksums == integrity.VERIFIED and restored.train_loss == 0.25

        # 1. Array data that still decodes, with other values.
        damage_silently(tmp_path / "2" / "state")
        with pytest.raises(integrity.IntegrityError) as info:
            ckpt.restore(2, target)
        message = str(info.value)
        assert f"checkpoint {tmp_path}/2, state: array params." in message
        assert "does not match the checksum saved with it" in message
        report = integrity.verify_folder(tmp_path / "2")
        assert report.status == "damaged" and "array params." in report.reason

        # 2. The input-pipeline state of this process, still valid JSON.
        edit_json_file(tmp_path / "1" / "data_iter" / "process_0-of-1.json")
        ckpt.restore(1, target)  # the input state is not asked for: fine
        with pytest.raises(integrity.IntegrityError,
                           match=r"input-pipeline state \(data_iter/process_0-of-1.json\)"):
            ckpt.restore(1, target, data_iter=checkpointing.IteratorState())

    # 3. A checkpoint written without checksums (as before this version) restores, unverified.
    with checkpointing.Checkpointer(tmp_path, checksums=False) as old:
        _save(old, 3, state, 3)
    assert not (tmp_path / "3" / "checksums").exists()
    with checkpointing.Checkpointer(tmp_path) as ckpt:
        restored = ckpt.restore(3, target, data_iter=checkpointing.IteratorState())
        assert restored.checksums == integrity.ABSENT
        np.testing.assert_array_equal(restored.state["params"]["a"], state["params"]["a"])
    assert integrity.verify_folder(tmp_path / "3").status == "unverified"


@pytest.mark.slow
def test_damaged_newest_checkpoint_is_set_aside_and_the_run_continues(tmp_path, capsys) -> None:
    """The issue's repro, in process (jit, one device): the newest checkpoint's state changed on
    disk -> verify and evaluate name the array; resume sets it aside, continues from the
    previous one and ends bit-identical to the uninterrupted run. Then a checkpoint without
    checksums (an earlier version's) still resumes, with one line saying so."""
    from isic_jax.commands import verify
    from isic_jax.testing import runs
    from isic_jax.training import integrity

    config = standard_config()
    data = make_data(config)
    runs.train(config, tmp_path, data=data)  # checkpoints 3 and 6
    final = restore_params(tmp_path)
    ckpts = tmp_path / "checkpoints"
    damage_silently(ckpts / "6" / "state")

    rows, bad = verify.verify(tmp_path)
    assert bad and [(r[1], r[2]) for r in rows] == [("3", "ok"), ("6", "DAMAGED")]
    assert "state: array " in rows[1][3]
    with pytest.raises(integrity.IntegrityError, match=r"/6, state: array .* does not match"):
        restore_params(tmp_path)  # evaluate's restore

    capsys.readouterr()
    assert runs.train(config, tmp_path, data=data)["step"] == 6
    out = capsys.readouterr().out
    assert f"WARNING: checkpoint {ckpts}/6 is damaged (IntegrityError: checkpoint {ckpts}/6, " \
           f"state: array " in out
    assert "checkpoints/3 (3/6)" in out
    reason = json.loads((ckpts / "6.corrupt" / "set_aside.json").read_text())["reason"]
    assert "does not match the checksum saved with it" in reason
    redone = restore_params(tmp_path)
    assert all(np.array_equal(final[k], redone[k]) for k in final)  # bit-exact again
    rows, bad = verify.verify(tmp_path)
    assert not bad and [(r[1], r[2]) for r in rows] == [
        ("3", "ok"), ("6", "ok"), ("6.corrupt", "set aside")]

    # A checkpoint of an earlier version (no checksums item) resumes, unverified.
    shutil.rmtree(ckpts / "6")
    shutil.rmtree(ckpts / "3" / "checksums")
    capsys.readouterr()
    assert runs.train(config, tmp_path, data=data)["step"] == 6
    out = capsys.readouterr().out
    assert "checkpoints/3 (3/6)" in out
    assert "Checkpoint 3 has no checksums (written by an earlier isic_jax)" in out
    assert (ckpts / "6" / "checksums" / "process_0-of-1.json").is_file()
    redone = restore_params(tmp_path)
    assert all(np.array_equal(final[k], redone[k]) for k in final)


def test_non_finite_loss_right_after_a_resume_points_at_the_checkpoint() -> None:
    from isic_jax.training import checkpointing, integrity, loop

    restored = checkpointing.Restored(step=20, state=None, rng=None, config=None,
                                      checksums=integrity.ABSENT, train_loss=0.4123)
    fake = types.SimpleNamespace(
        resumed=restored, last_saved=20,
        ckpt=types.SimpleNamespace(directory=pathlib.Path("/w/checkpoints"),
                                   latest_step=lambda: 20),
        setup=types.SimpleNamespace(workdir=pathlib.Path("/w")))
    text = loop.TrainLoop.non_finite_message(fake, 23, float("nan"))
    assert "at step 23, 3 step(s) after resuming from checkpoint /w/checkpoints/20" in text
    assert "its training loss was finite when it was saved (0.4123)" in text
    assert "no checksums (written by an earlier isic_jax)" in text
    assert "isic-jax verify --workdir /w" in text
    restored.checksums = integrity.VERIFIED
    text = loop.TrainLoop.non_finite_message(fake, 23, float("nan"))
    assert "matched the checksums saved with it" in text
    fake.last_saved = 25  # a checkpoint was written since the resume: the usual message
    text = loop.TrainLoop.non_finite_message(fake, 27, float("inf"))
    assert "the latest checkpoint (step 20) is the last good one" in text
    assert "verify" not in text


def test_damaged_export_is_refused_by_predict_init_from_and_verify(tmp_path) -> None:
    from test_export import make_workdir

    from isic_jax.inference import export, predict
    from isic_jax.models import PretrainedError
    from isic_jax.training import integrity, weight_sources

    workdir = tmp_path / "run"
    make_workdir(workdir)
    good = tmp_path / "model"
    export.export_checkpoint(workdir, good, "latest", platforms=["cpu"])
    recorded = json.loads((good / "checksums.json").read_text())
    assert {"model.json", "model.jax_export", "config.json"} <= set(recorded["files"])
    assert "params.head.kernel" in recorded["arrays"]["variables"]
    assert integrity.verify_folder(good).status == "ok"

    # The variables (what the checkpoint backend and init_from read).
    damaged = tmp_path / "damaged_variables"
    shutil.copytree(good, damaged)
    damage_silently(damaged / "variables")
    with pytest.raises(integrity.IntegrityError, match=r"/variables: array (params|batch_)"):
        predict.load_model(damaged, "checkpoint")
    with pytest.raises(PretrainedError, match=r"init_from=.*/variables: array "):
        weight_sources.read_source(str(damaged))
    predict.load_model(damaged, "export")  # reads only the artefact, which is intact

    # The StableHLO artefact.
    path = tmp_path / "damaged_artefact"
    shutil.copytree(good, path)
    data = bytearray((path / "model.jax_export").read_bytes())
    middle = len(data) // 2
    data[middle:middle + 16] = bytes(b ^ 0xFF for b in data[middle:middle + 16])
    (path / "model.jax_export").write_bytes(bytes(data))
    with pytest.raises(integrity.IntegrityError,
                       match=f"{path}/model.jax_export: the file does not match the checksum"):
        predict.load_model(path, "export")  # `isic-jax predict` exits 2 with this message

    # `isic-jax verify` over the folder holding all three.
    result = _cli(["verify", "--workdir", str(tmp_path)])
    assert result.returncode == 8, result.stdout + result.stderr[-3000:]  # ExitCode.DAMAGED
    lines = {line.split()[0]: line for line in result.stdout.splitlines()[2:] if line.strip()}
    assert " ok " in lines["model"] and " DAMAGED " in lines["damaged_variables"]
    assert "model.jax_export" in lines["damaged_artefact"]
    assert " ok " in lines["run/checkpoints"]


@pytest.mark.slow
def test_two_processes_agree_to_set_aside_what_one_of_them_finds_damaged(tmp_path) -> None:
    """2 processes (pmap: each saves host copies) write checkpoints 3 and 6; process 1's own
    input-pipeline state of step 6 is then changed (valid JSON, another position): only process
    1's check can see it. Both resume from 3, process 0 prints process 1's reason, and step 6 is
    set aside. (The in-process test above covers jit.)"""
    from test_multiprocess import run

    workdir = tmp_path / "w"
    outs, _ = run(workdir, 2, 1, mode="pmap")
    assert [o["step"] for o in outs] == [6, 6]
    ckpts = workdir / "checkpoints"
    assert sorted(p.name for p in (ckpts / "6" / "checksums").glob("*.json")) == [
        "process_0-of-2.json", "process_1-of-2.json"]
    edit_json_file(ckpts / "6" / "data_iter" / "process_1-of-2.json")

    outs, logs = run(workdir, 2, 1, mode="pmap")
    assert [o["step"] for o in outs] == [6, 6]
    assert outs[0]["param_sum"] == outs[1]["param_sum"]
    assert (f"WARNING: checkpoint {ckpts}/6 is damaged (on process 1: IntegrityError: "
            f"checkpoint {ckpts}/6: the input-pipeline state (data_iter/process_1-of-2.json) "
            f"does not match") in logs[0], logs[0]
    assert "checkpoints/3 (3/6)" in logs[0]
    reason = json.loads((ckpts / "6.corrupt" / "set_aside.json").read_text())["reason"]
    assert reason.startswith("on process 1: IntegrityError:")


def test_bench_checkpoint_runs_on_a_tiny_model(capsys) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_checkpoint",
                                                  REPO / "scripts" / "bench_checkpoint.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--model", "resnet_tiny", "--rounds", "1"])
    out = capsys.readouterr().out
    for row in ("save, on the step", "save, to finalized", "restore (checked)", "CRC-32"):
        assert row in out
