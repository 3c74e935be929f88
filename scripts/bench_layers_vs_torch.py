"""Where the CPU train step loses to PyTorch: per-layer forward, input-gradient and
weight-gradient time of ResNet-18's convolutions (112 px, batch 32), isic_jax vs PyTorch.

    python scripts/bench_layers_vs_torch.py --torch-python .venv/bin/python   # ~4 min, 2 cores

Each side runs in a process of its own (so the two never share the cores): isic_jax's
`cpu_lowering.conv_general_dilated` (what `isic-jax train` runs on CPU, under the XLA_FLAGS it
sets) on all cores and pinned to one core, and PyTorch's `conv2d` / `aten.convolution_backward`
(channels_last, all cores). Per layer it prints ms and GFLOP/s of each phase; the totals weight
each shape by how often ResNet-18 has it. A phase whose time on one core equals its time on all
cores runs single-threaded. torch is never a dependency: without it that column says so.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from bench_train import best_seconds, worker_json

BATCH = 32
# name, input size, in channels, out channels, kernel, stride, count in ResNet-18
LAYERS = (
    ("stem 7x7/2 3->64", 112, 3, 64, 7, 2, 1),
    ("s1 3x3 64", 28, 64, 64, 3, 1, 4),
    ("s2 3x3/2 64->128", 28, 64, 128, 3, 2, 1),
    ("s2 proj 1x1/2", 28, 64, 128, 1, 2, 1),
    ("s2 3x3 128", 14, 128, 128, 3, 1, 3),
    ("s3 3x3/2 128->256", 14, 128, 256, 3, 2, 1),
    ("s3 proj 1x1/2", 14, 128, 256, 1, 2, 1),
    ("s3 3x3 256", 7, 256, 256, 3, 1, 3),
    ("s4 3x3/2 256->512", 7, 256, 512, 3, 2, 1),
    ("s4 proj 1x1/2", 7, 256, 512, 1, 2, 1),
    ("s4 3x3 512", 4, 512, 512, 3, 1, 3),
)
PHASES = ("fwd", "dx", "dw")


def _layers(only: str | None) -> tuple:
    """LAYERS whose name contains one of the comma-separated `only` parts (all when None)."""
    if not only:
        return LAYERS
    return tuple(row for row in LAYERS if any(part in row[0] for part in only.split(",")))


def _best_ms(f, n: int) -> float:
    return best_seconds(f, n, rounds=3) * 1e3


def jax_worker(layers: tuple, n: int) -> dict:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from isic_jax import runtime

    os.environ.setdefault("XLA_FLAGS", runtime.set_default_xla_flags() or "")
    import jax
    import numpy as np

    from isic_jax.models import cpu_lowering

    out = {}
    for name, size, cin, cout, k, stride, _ in layers:
        pads = ((k // 2, k // 2),) * 2

        def conv(x, w, stride=stride, pads=pads):
            return cpu_lowering.conv_general_dilated(
                x, w, (stride, stride), pads, dimension_numbers=("NHWC", "HWIO", "NHWC"))

        rs = np.random.RandomState(0)
        x = rs.randn(BATCH, size, size, cin).astype(np.float32)
        w = rs.randn(k, k, cin, cout).astype(np.float32)
        g = rs.randn(*jax.eval_shape(conv, x, w).shape).astype(np.float32)
        x, w, g = jax.device_put((x, w, g))
        # XLA drops whichever gradient a function does not return.
        fns = {"fwd": jax.jit(conv),
               "dx": jax.jit(lambda x, w, g, conv=conv: jax.vjp(conv, x, w)[1](g)[0]),
               "dw": jax.jit(lambda x, w, g, conv=conv: jax.vjp(conv, x, w)[1](g)[1])}
        operands = {"fwd": (x, w), "dx": (x, w, g), "dw": (x, w, g)}
        out[name] = {p: _best_ms(lambda f=fns[p], a=operands[p]: jax.block_until_ready(f(*a)), n)
                     for p in PHASES if not (p == "dx" and cin == 3)}
    return out


def torch_worker(layers: tuple, n: int) -> dict:
    import torch

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    out = {}
    for name, size, cin, cout, k, stride, _ in layers:
        pad = k // 2
        cl = torch.channels_last
        x = torch.randn(BATCH, cin, size, size).to(memory_format=cl)
        w = torch.randn(cout, cin, k, k).to(memory_format=cl)
        g = torch.nn.functional.conv2d(x, w, stride=stride, padding=pad)
        g = torch.randn_like(g).to(memory_format=cl)

        def backward(mask, x=x, w=w, g=g, stride=stride, pad=pad):
            return torch.ops.aten.convolution_backward(
                g, x, w, None, [stride] * 2, [pad] * 2, [1, 1], False, [0, 0], 1, mask)

        fns = {"fwd": lambda x=x, w=w, s=stride, p=pad: torch.nn.functional.conv2d(
                   x, w, stride=s, padding=p),
               "dx": lambda b=backward: b([True, False, False]),
               "dw": lambda b=backward: b([False, True, False])}
        out[name] = {p: _best_ms(fns[p], n) for p in PHASES if not (p == "dx" and cin == 3)}
    return out


def _run(python: str, side: str, cores: int | None, args: argparse.Namespace) -> dict:
    cmd = [python, __file__, "--worker", side, "--calls", str(args.calls)]
    if args.only:
        cmd += ["--only", args.only]
    if cores:
        cmd += ["--cores", str(cores)]
    return worker_json(cmd, side)


def _gflop(size: int, cin: int, cout: int, k: int, stride: int) -> float:
    out = (size - 1) // stride + 1
    return 2 * BATCH * out * out * k * k * cin * cout / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--torch-python", default=sys.executable,
                        help="interpreter with torch for the PyTorch column")
    parser.add_argument("--only", help="comma-separated parts of layer names to run")
    parser.add_argument("--calls", type=int, default=10, help="calls per timing round")
    parser.add_argument("--json", action="store_true", help="also print the timings as JSON")
    parser.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--cores", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        if args.cores:
            os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.cores])
        worker = jax_worker if args.worker == "jax" else torch_worker
        print(json.dumps(worker(_layers(args.only), args.calls)))
        return

    ours, one_core = _run(sys.executable, "jax", None, args), _run(sys.executable, "jax", 1, args)
    theirs = _run(args.torch_python, "torch", None, args)
    if "error" in ours:
        sys.exit(ours["error"])
    for side in (ours, one_core, theirs):
        if "error" in side:
            print(side["error"])
    print(f"ResNet-18 112 px batch {BATCH}, float32, {os.cpu_count()} cores: ms per call "
          "(GFLOP/s); 1 core: isic_jax pinned to one core; ratio: PyTorch ms / isic_jax ms")
    print(f"{'layer':<20} {'x':>2} {'phase':<5} {'isic_jax':>15} {'1 core':>8} "
          f"{'PyTorch':>15} {'ratio':>6}")
    totals = {p: [0.0, 0.0] for p in PHASES}
    for name, size, cin, cout, k, stride, count in _layers(args.only):
        gf = _gflop(size, cin, cout, k, stride)
        for p in PHASES:
            if p not in ours.get(name, {}):
                continue
            a, b = ours[name][p], theirs.get(name, {}).get(p)
            one = one_core.get(name, {}).get(p)
            totals[p][0] += count * a
            torch_col = f"{b:6.2f} ({gf / b * 1e3:4.0f})" if b else "-"
            print(f"{name:<20} {count:>2} {p:<5} {a:6.2f} ({gf / a * 1e3:4.0f}) "
                  f"{f'{one:8.2f}' if one else '-':>8} {torch_col:>15} "
                  f"{(b / a) if b else float('nan'):6.2f}")
            if b:
                totals[p][1] += count * b
    print("totals over the net (ms per step):")
    for p, (a, b) in totals.items():
        theirs_col = f"PyTorch {b:6.1f}  ratio {b / a:.2f}" if b else "PyTorch -"
        print(f"  {p:<4} isic_jax {a:6.1f}  {theirs_col}")
    if args.json:
        print(json.dumps({"isic_jax": ours, "isic_jax_1_core": one_core, "torch": theirs}))


if __name__ == "__main__":
    main()
