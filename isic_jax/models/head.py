"""The classifier head every backbone ends with: dropout (or multi-sample dropout) + one Dense.

    logits = classifier_head(features, num_classes=C, dropout=0.5, msd_samples=5, train=train)

Called from inside `Classifier.__call__` (a compact method): its layers are the caller's
submodules, so the parameters stay at the caller's top level ("head/kernel",
"head/bias"): checkpoints, pretrained-weight matching and the optimiser's part labels see the same
names as before.

Multi-sample dropout (Inoue 2019, arXiv:1905.09788; SIIM-ISIC 2020 1st place, Ha et al. 2020:
5 dropout masks, p = 0.5, on the pooled features of each backbone): in training, `msd_samples`
independent dropout masks are applied to the same features, the shared head is applied to each,
and the logits are averaged; the loss sees the averaged logits. In evaluation dropout is off and
the head runs once (the K copies would be identical): deterministic, and the same cost as
without MSD. With msd_samples = 1 this is exactly plain dropout + head.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def classifier_head(
    features: jax.Array,
    *,
    num_classes: int,
    dropout: float = 0.0,
    msd_samples: int = 1,
    train: bool = False,
    name: str = "head",
) -> jax.Array:
    """features float32 [B, D] -> logits float32 [B, num_classes] (see the module docstring).

    Must run inside a compact Linen method; needs rngs={"dropout": key} when training with
    dropout > 0.
    """
    if msd_samples < 1:
        raise ValueError(f"msd_samples must be >= 1, got {msd_samples}")
    dense = nn.Dense(num_classes, dtype=jnp.float32, param_dtype=jnp.float32, name=name)
    if train and dropout > 0 and msd_samples > 1:
        # One dropout over [K, B, D]: K independent masks of the same features.
        copies = jnp.broadcast_to(features, (msd_samples, *features.shape))
        dropped = nn.Dropout(dropout, deterministic=False)(copies)
        return jnp.mean(dense(dropped).astype(jnp.float32), axis=0)
    x = nn.Dropout(dropout, deterministic=not train)(features)
    return dense(x).astype(jnp.float32)
