"""pmap and jit-over-Mesh wrap the same step and agree with a single-device run; prefetching.

The multi-device checks run in a subprocess with 4 fake CPU devices (see train_helpers.py).
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
from train_helpers import compile_cache, run_two_processes, run_worker  # noqa: F401

pytestmark = pytest.mark.usefixtures("compile_cache")

# Float tolerance for pmap vs jit vs one device after 3 SGD steps of resnet_tiny (params O(1)),
# with device augmentation (rotation + colour jitter keyed by stream position): the same maths
# summed in a different order (per-device partial sums + all-reduce) differs by a few float32
# ulps; measured ~6e-8 on params, ~1.2e-6 on BatchNorm variances, ~2e-7 on the loss. SGD on
# purpose: Adam divides by sqrt(v) + eps, so gradients that are ~0 turn ulp-level differences
# into steps of up to ~lr (measured 1.2e-3 with lr 1e-3): expected, not a layout bug.
ATOL_PARAMS = 1e-5
ATOL_BATCH_STATS = 1e-4


@pytest.fixture(scope="module")
def equivalence() -> dict:
    return run_worker("equivalence", {"steps": 3})


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["pmap", "jit"])
def test_same_params_as_single_device(equivalence: dict, mode: str) -> None:
    report = equivalence[mode]
    assert equivalence["devices"] == 4
    assert report["param_scale"] > 0.1  # the comparison is not between zeros
    assert report["params"] < ATOL_PARAMS, report
    assert report["batch_stats"] < ATOL_BATCH_STATS, report
    assert report["loss"] < 1e-5, report


@pytest.mark.parametrize("mode", ["pmap", "jit"])
def test_step_compiles_once(equivalence: dict, mode: str) -> None:
    # The state comes back with the sharding it went in with: no recompilation at step 2.
    assert equivalence[mode]["compiles"] == 1
    assert equivalence["single_compiles"] == 1


def test_batch_not_divisible_fails_before_compiling(tmp_path) -> None:
    out = run_worker(
        "train", {"workdir": str(tmp_path / "w"), "overrides": {"train.batch_size": 6}}
    )
    message = out["config_error"]
    assert "config.train.batch_size=6" in message
    assert "4 devices" in message
    assert not (tmp_path / "w" / "checkpoints").exists()


@pytest.mark.slow
def test_two_processes_train_evaluate_and_checkpoint(tmp_path) -> None:
    # jax.distributed on localhost, 1 CPU device per process (gloo collectives), pmap: each
    # process feeds its half of the global batch; gradients are averaged over both processes,
    # evaluation gathers every example on every process, process 0 writes the logs.
    outs = run_two_processes(str(tmp_path / "w"), "pmap")
    assert [o["process"] for o in outs] == [0, 1]
    assert all(o["devices"] == 2 and o["step"] == 6 for o in outs)
    assert outs[0]["val_examples"] == outs[1]["val_examples"] == 12  # all of val, on both
    assert outs[0]["val_loss"] == outs[1]["val_loss"]
    assert outs[0]["param_sum"] == outs[1]["param_sum"]  # the replicas stayed in sync
    assert (tmp_path / "w" / "checkpoints" / "6").is_dir()
    assert (tmp_path / "w" / "config.json").exists()


# ------------------------------------------------------------------------------ prefetch


class _CountingIterator:
    """0, 1, 2, ... as batches; its state is the count of batches drawn."""

    def __init__(self, n: int, fail_at: int | None = None):
        self.i = 0
        self.n = n
        self.fail_at = fail_at
        self.threads: set[str] = set()

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        self.threads.add(threading.current_thread().name)
        if self.i == self.fail_at:
            raise RuntimeError("boom")
        if self.i >= self.n:
            raise StopIteration
        self.i += 1
        return {"x": np.full((4,), self.i - 1, np.int32), "id": np.array([b"a"] * 4)}

    def get_state(self) -> dict:
        return {"i": self.i}


@pytest.mark.parametrize("size", [0, 1, 3])
def test_prefetcher_keeps_order_and_states(size: int) -> None:
    from isic_jax.training import parallel

    it = _CountingIterator(5)
    shard_calls = []

    def shard(batch):
        on_device = parallel.device_arrays(batch)
        shard_calls.append(sorted(on_device))
        return {k: v.copy() for k, v in on_device.items()}

    with parallel.DevicePrefetcher(it, shard, size=size, get_state=lambda i: i.get_state()) as p:
        items = list(p)
    assert [int(b.device["x"][0]) for b in items] == [0, 1, 2, 3, 4]
    # The state recorded with batch k is the state right after drawing it.
    assert [b.iterator_state["i"] for b in items] == [1, 2, 3, 4, 5]
    assert all(call == ["x"] for call in shard_calls)  # byte ids stay on the host
    assert items[0].host["id"][0] == b"a"
    assert ("device-prefetch" in it.threads) == (size > 0)


def test_prefetcher_reraises_errors() -> None:
    from isic_jax.training import parallel

    p = parallel.DevicePrefetcher(_CountingIterator(5, fail_at=2), lambda b: b, size=2)
    try:
        assert int(next(p).device["x"][0]) == 0
        assert int(next(p).device["x"][0]) == 1
        with pytest.raises(RuntimeError, match="boom"):
            next(p)
    finally:
        p.close()


def test_create_rejects_unknown_mode() -> None:
    from isic_jax import config_utils
    from isic_jax.training import parallel

    with pytest.raises(config_utils.ConfigError, match="config.train.parallelism"):
        parallel.DataParallel.create("foo")


@pytest.mark.slow
@pytest.mark.parametrize("first,second", [("pmap", "jit"), ("jit", "pmap")])
def test_a_checkpoint_resumes_under_the_other_parallelism(tmp_path, first, second) -> None:
    """Half a run under one mode, the rest under the other: the same final state as the whole
    run under the second mode (the checkpoint holds unreplicated arrays either way). No dropout:
    pmap folds the device index into its key, so its masks are not jit's."""
    from train_helpers import make_data, restore_params, standard_config

    from isic_jax.testing import runs

    whole = tmp_path / "whole"
    config = standard_config(**{"train.parallelism": second, "model.dropout": 0.0})
    runs.train(config, whole, data=make_data(config))
    split = tmp_path / "split"
    runs.train(standard_config(**{"train.parallelism": first, "model.dropout": 0.0}), split,
               data=make_data(config),
               stop_after_step=3)  # checkpoint_every=3: as if killed right after saving step 3
    result = runs.train(config, split, data=make_data(config))
    assert result["step"] == 6
    expected, got = restore_params(whole), restore_params(split)
    assert expected.keys() == got.keys()
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=2e-5, atol=2e-6, err_msg=key)
