"""What the checkpoint checksums cost: save and restore of a train state with and without them,
side by side in one run.

    python scripts/bench_checkpoint.py                      # ResNet-50, AdamW (configs/default.py)
    python scripts/bench_checkpoint.py --rounds 9 --ema     # + an EMA copy of the weights
    python scripts/bench_checkpoint.py --model resnet_tiny --rounds 1   # a quick check

The state is configs/default.py's (ResNet-50, AdamW: params + two moments + BatchNorm
statistics, ~300 MB of float32), filled with random values on the default device. Each round
saves it once with `Checkpointer(checksums=True)` and once with `checksums=False` (the order
alternates between rounds, so drift on a shared machine hits both), then restores each checkpoint
with the same setting. Timed, per setting (median over the rounds, and the best):

- save, on the step: how long `Checkpointer.save` blocks the caller (the training step waits for
  this much; the CRCs are not computed here, only host views of the arrays are taken);
- save, to finalized: until the checkpoint is committed (`wait_until_finished`); the CRCs run in
  Orbax's background commit, beside its writes;
- restore: `Checkpointer.restore` of the state onto the device, with the check when on;
- the CRCs alone: hashing the state's host arrays once (what the background commit and the
  restore check add at most, before any overlap).

Ratios are with / without. Restores read from the page cache here (the files were just
written), the fastest case for the restore and so the largest relative cost of the check.
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import statistics
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_state(model: str, ema: bool, seed: int = 0):
    """(train state of random values on the default device, its restore target)."""
    import jax
    import numpy as np
    from isic_jax.configs import default

    from isic_jax.training import checkpointing
    from isic_jax.training import state as train_state

    config = default.get_config()
    config.model.name = model
    config.optim.ema_decay = 0.999 if ema else 0.0
    abstract = train_state.abstract_train_state(config, num_classes=2)
    rng = np.random.default_rng(seed)

    def fill(x):
        if np.issubdtype(x.dtype, np.floating):
            return rng.standard_normal(x.shape, dtype=np.float32).astype(x.dtype)
        return np.zeros(x.shape, x.dtype)

    device = jax.devices()[0]
    state = jax.device_put(jax.tree.map(fill, abstract), device)
    sharding = jax.sharding.SingleDeviceSharding(device)
    return state, checkpointing.abstract_target(abstract, sharding)


def bench(model: str = "resnet50", rounds: int = 5, ema: bool = False,
          directory: str | None = None) -> dict[str, dict[str, list[float]]]:
    """{"on"|"off": {"save_blocking"|"save_total"|"restore": [seconds per round]}, "crc": ...}."""
    import logging

    import jax
    import numpy as np

    from isic_jax.training import checkpointing, integrity

    logging.getLogger("absl").setLevel(logging.ERROR)
    state, target = make_state(model, ema)
    jax.block_until_ready(state)
    nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
    print(f"{model} train state: {len(jax.tree.leaves(state))} arrays, {nbytes / 1e6:.0f} MB "
          f"on {jax.devices()[0].platform}; {rounds} round(s)", flush=True)
    root = pathlib.Path(directory or tempfile.mkdtemp(prefix="bench_checkpoint_"))
    times: dict[str, dict[str, list[float]]] = {
        s: {"save_blocking": [], "save_total": [], "restore": []} for s in ("on", "off")}
    times["crc"] = {"hash": []}
    try:
        for r in range(rounds + 1):  # round 0 warms up (first Orbax use, page cache)
            order = ("on", "off") if r % 2 == 0 else ("off", "on")
            for setting in order:
                folder = root / setting
                with checkpointing.Checkpointer(folder, keep=2,
                                                checksums=setting == "on") as ckpt:
                    start = time.perf_counter()
                    ckpt.save(r + 1, state, rng=np.zeros(2, np.uint32), data_iter=None,
                              config={"model": model})
                    blocking = time.perf_counter() - start
                    ckpt.wait_until_finished()
                    total = time.perf_counter() - start
                with checkpointing.Checkpointer(folder, checksums=setting == "on") as ckpt:
                    start = time.perf_counter()
                    restored = ckpt.restore(r + 1, target, with_rng=False, with_config=False)
                    jax.block_until_ready(restored.state)
                    restore = time.perf_counter() - start
                    assert restored.checksums == (integrity.VERIFIED if setting == "on"
                                                  else integrity.OFF)
                del restored
                if r:
                    times[setting]["save_blocking"].append(blocking)
                    times[setting]["save_total"].append(total)
                    times[setting]["restore"].append(restore)
            if r:
                start = time.perf_counter()
                integrity.array_entries(integrity.named_arrays(state))
                times["crc"]["hash"].append(time.perf_counter() - start)
    finally:
        if directory is None:
            shutil.rmtree(root, ignore_errors=True)
    return times


def report(times: dict[str, dict[str, list[float]]]) -> str:
    rows = [("", "with checksums", "without", "ratio", "added")]
    labels = {"save_blocking": "save, on the step", "save_total": "save, to finalized",
              "restore": "restore (checked)"}
    for key, label in labels.items():
        on, off = (statistics.median(times[s][key]) for s in ("on", "off"))
        best_on, best_off = (min(times[s][key]) for s in ("on", "off"))
        rows.append((label, f"{on * 1e3:8.1f} ms (best {best_on * 1e3:7.1f})",
                     f"{off * 1e3:8.1f} ms (best {best_off * 1e3:7.1f})", f"{on / off:5.3f}",
                     f"{(on / off - 1) * 100:+5.1f} %"))
    crc = statistics.median(times["crc"]["hash"])
    rows.append(("CRC-32 of the state alone", f"{crc * 1e3:8.1f} ms", "", "", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--ema", action="store_true", help="an EMA copy of the weights too")
    parser.add_argument("--dir", default=None, help="where to write (default: a temp folder)")
    args = parser.parse_args(argv)
    print(report(bench(args.model, args.rounds, args.ema, args.dir)), flush=True)


if __name__ == "__main__":
    main()
