"""Per-layer forward + backward time of XLA's convolutions vs `models/cpu_lowering.py`, on CPU.

    python scripts/bench_conv_grads.py            # the ResNet-50 224 px b16 and ResNet-18 112 px
                                                  # b32 layer shapes, ~3 minutes on 2 cores

For each convolution shape of the two nets: one jitted function computing the output and both
gradients (input and weight; the stem's input gradient is not needed in training and is
skipped, as XLA would) through `lax.conv_general_dilated` and through
`cpu_lowering.conv_general_dilated`, timed side by side (best of 7) in one process, plus the
max-pool layer. Inputs are the output of a BatchNorm-like affine + ReLU computed inside the
function, as in the network, because what XLA fuses into the gradient convolutions matters.
XLA_FLAGS are the ones `isic-jax train` sets for this CPU unless XLA_FLAGS is set.
"""

from __future__ import annotations

import os
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# name, batch, input size, in channels, out channels, kernel, stride
LAYERS = (
    ("r50 stem 7x7/2", 16, 224, 3, 64, 7, 2),
    ("r50 s1 1x1 64->256", 16, 56, 64, 256, 1, 1),
    ("r50 s1 1x1 256->64", 16, 56, 256, 64, 1, 1),
    ("r50 s1 3x3 64", 16, 56, 64, 64, 3, 1),
    ("r50 s2 3x3/2 128", 16, 56, 128, 128, 3, 2),
    ("r50 s2 proj 1x1/2", 16, 56, 256, 512, 1, 2),
    ("r50 s3 3x3 256", 16, 14, 256, 256, 3, 1),
    ("r50 s4 3x3 512", 16, 7, 512, 512, 3, 1),
    ("r18 s1 3x3 64", 32, 28, 64, 64, 3, 1),
    ("r18 s2 3x3/2 128", 32, 28, 64, 128, 3, 2),
    ("r18 s4 3x3 512", 32, 4, 512, 512, 3, 1),
)


def _time(f, *args, repeats: int = 7) -> float:
    import jax

    jax.block_until_ready(f(*args))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(f(*args))
        best = min(best, time.perf_counter() - start)
    return best


def _grads_fn(conv, k: int, stride: int, need_dx: bool):
    import jax
    import jax.numpy as jnp

    pads = [(k // 2, k // 2)] * 2

    def run(a, scale, w, g):
        x = jax.nn.relu(a * scale + 0.1)  # as a BatchNorm + ReLU would make it

        def f(x, w):
            return conv(x, w, (stride, stride), pads, dimension_numbers=("NHWC", "HWIO", "NHWC"))

        if need_dx:
            y, vjp = jax.vjp(f, x, w)
            dx, dw = vjp(g)
            return y, dx, dw
        y, vjp = jax.vjp(lambda w: f(x, w), w)
        return y, jnp.zeros(()), vjp(g)[0]

    return jax.jit(run)


def main() -> None:
    if "XLA_FLAGS" not in os.environ:
        from isic_jax import runtime

        runtime.set_default_xla_flags()
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    from jax import lax

    from isic_jax.models import cpu_lowering

    print(f"jax {jax.__version__}, XLA_FLAGS={os.environ.get('XLA_FLAGS')}")
    print(f"{'layer':<24} {'XLA ms':>8} {'lowered ms':>11} {'speed-up':>9}  max rel. diff")
    total_xla = total_low = 0.0
    for name, b, size, cin, cout, k, stride in LAYERS:
        keys = jax.random.split(jax.random.PRNGKey(0), 4)
        a = jax.random.normal(keys[0], (b, size, size, cin))
        scale = jax.random.normal(keys[1], (cin,))
        w = jax.random.normal(keys[2], (k, k, cin, cout)) * 0.05
        out = (size - 1) // stride + 1
        g = jax.random.normal(keys[3], (b, out, out, cout))
        need_dx = cin > 3
        plain = _grads_fn(lax.conv_general_dilated, k, stride, need_dx)
        lowered = _grads_fn(cpu_lowering.conv_general_dilated, k, stride, need_dx)
        ref, got = plain(a, scale, w, g), lowered(a, scale, w, g)
        diff = max(float(jnp.max(jnp.abs(r - o)) / (jnp.max(jnp.abs(r)) + 1e-30))
                   for r, o in zip(ref, got, strict=True))
        t_xla, t_low = _time(plain, a, scale, w, g), _time(lowered, a, scale, w, g)
        total_xla, total_low = total_xla + t_xla, total_low + t_low
        print(f"{name:<24} {t_xla * 1e3:8.1f} {t_low * 1e3:11.1f} {t_xla / t_low:8.2f}x  "
              f"{diff:.1e}", flush=True)

    x = jax.nn.relu(jax.random.normal(jax.random.PRNGKey(1), (16, 112, 112, 64)))
    gp = jax.random.normal(jax.random.PRNGKey(2), (16, 56, 56, 64))
    pools = {
        "xla": lambda v: nn.max_pool(v, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1))),
        "lowered": lambda v: cpu_lowering.max_pool(v, 3, 2, ((1, 1), (1, 1))),
    }
    times = {}
    for label, pool in pools.items():
        fn = jax.jit(lambda v, g, pool=pool: jax.vjp(pool, v)[1](g)[0])
        times[label] = _time(fn, x, gp)
    print(f"{'r50 max-pool 3x3/2':<24} {times['xla'] * 1e3:8.1f} {times['lowered'] * 1e3:11.1f} "
          f"{times['xla'] / times['lowered']:8.2f}x")
    print(f"{'all convolutions above':<24} {total_xla * 1e3:8.1f} {total_low * 1e3:11.1f} "
          f"{total_xla / total_low:8.2f}x")


if __name__ == "__main__":
    main()
