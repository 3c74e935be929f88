"""Time to load ResNet-50 weights, side by side with reading the file and a random init.

    python scripts/bench_pretrained.py [--repeats 3] [--arch resnet50]

Writes a ResNet-50 state dict with random values to a temporary folder (torchvision's own
module when torch is installed, else the same names and shapes from the loader's table), as
.safetensors (and .pth with torch), then measures in one run (median of --repeats):

- read:      `safetensors.numpy.load_file` alone (the floor: bytes -> numpy)
- load:      `training.weight_sources.load` (read, sha256 for the record, shapes of the model
             traced, every key mapped and checked, OIHW -> HWIO, head decision)
- load .pth: the same from a torch file (`torch.load(weights_only=True)`), with torch
- init:      `models.init_variables` (what a run from scratch does instead: jit + random init)

and prints the ratios load / read and load / init.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--arch", default="resnet50")
    args = parser.parse_args()

    import jax
    import numpy as np
    from pretrained_helpers import model_config, save_safetensors, torchvision_state_dict
    from safetensors.numpy import load_file

    from isic_jax.models import create_model, init_variables
    from isic_jax.training import weight_sources

    config = model_config(args.arch, 64)
    folder = pathlib.Path(tempfile.mkdtemp(prefix="bench_pretrained_"))
    try:
        import torch
        import torchvision
    except ImportError:
        torch = None
    if torch is not None:
        module = getattr(torchvision.models, args.arch)(weights=None)
        state = {k: v.contiguous() for k, v in module.state_dict().items()}
        from safetensors.torch import save_file

        save_file(state, folder / "w.safetensors")
        torch.save(state, folder / "w.pth")
        origin = f"torchvision.models.{args.arch}(weights=None)"
    else:
        save_safetensors(folder / "w.safetensors", torchvision_state_dict(args.arch, 64))
        origin = "generated (torch not installed)"
    size_mb = (folder / "w.safetensors").stat().st_size / 2**20
    print(f"{args.arch} state dict: {origin}, {size_mb:.1f} MB as safetensors; jax "
          f"{jax.__version__}, {jax.devices()[0].platform}; median of {args.repeats}")

    # Warm the page cache and JAX's tracing machinery once, as a second run of a user would.
    weight_sources.load(folder / "w.safetensors", config, 1000)
    read = _median_seconds(lambda: load_file(str(folder / "w.safetensors")), args.repeats)
    load = _median_seconds(lambda: weight_sources.load(folder / "w.safetensors", config, 1000),
                           args.repeats)
    model = create_model(config, 1000)
    init = _median_seconds(
        lambda: jax.block_until_ready(init_variables(model, jax.random.PRNGKey(0), 224)),
        args.repeats)
    print(f"read (safetensors.numpy.load_file)   {read * 1e3:8.1f} ms")
    print(f"load (.safetensors -> variables)      {load * 1e3:8.1f} ms   {load / read:5.1f}x read")
    if torch is not None:
        weight_sources.load(folder / "w.pth", config, 1000)
        pth = _median_seconds(lambda: weight_sources.load(folder / "w.pth", config, 1000),
                              args.repeats)
        print(f"load (.pth via torch.load)            {pth * 1e3:8.1f} ms   "
              f"{pth / read:5.1f}x read")
    print(f"init (random, from scratch, jitted)   {init * 1e3:8.1f} ms")
    print(f"ratio load / init: {load / init:.2f}")
    pre = weight_sources.load(folder / "w.safetensors", config, 1000)
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(pre.variables))
    print(f"{pre.mapped} tensors mapped, {len(pre.ignored)} ignored, {n:,} values")


if __name__ == "__main__":
    main()
