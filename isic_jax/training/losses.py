"""Classification losses: (label-smoothed) softmax cross-entropy and softmax focal loss.

Reduction. With mask m_i (`weights`, 1 for real examples, 0 for padding) and class weight
w_c (1 without class weights), each example counts a_i = m_i * w_{y_i}, and

    loss = sum_i a_i * l_i / sum_i a_i            (0 when sum_i a_i == 0, e.g. all padding)

Data parallelism. Under jit over a Mesh the batch is global, so this is the exact global mean.
Under pmap the train step averages per-device losses (and gradients) with `lax.pmean`; that
equals the global mean only when every device has the same sum_i a_i, which holds without class
weights when each device holds the same number of valid examples (train batches are all valid),
but not with class weights (devices see different label mixes). Pass `axis_name` to make it
exact in all cases: the denominator becomes the global sum_i a_i / n_devices (psum over the
axis; it depends on data only, so gradients are unaffected by that collective), and the pmean
of the per-device results is then exactly the global weighted mean, for the loss and its
gradient alike.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

LOSS_NAMES: tuple[str, ...] = ("cross_entropy", "focal")
CLASS_WEIGHTING: tuple[str, ...] = ("none", "balanced")


def class_weights_from_counts(counts: np.ndarray | list[int]) -> np.ndarray:
    """Inverse-frequency ("balanced") class weights, normalised to mean 1 over the examples.

    w_c = N / (K * n_c), with n_c the count of class c, N = sum_c n_c and K the number of classes
    with n_c > 0 (scikit-learn's "balanced"). Then sum_c n_c * w_c = N: the average weight per
    training example is 1, so the loss scale (and a tuned learning rate) stays the same. A class
    absent from the counts gets weight 1 (it cannot affect training; eval stays unweighted).

    Args:
      counts: int [C] examples per class.

    Returns:
      float32 [C].
    """
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 1 or counts.size == 0:
        raise ValueError(f"counts must be a non-empty 1-D array, got shape {counts.shape}.")
    if (counts < 0).any() or counts.sum() <= 0:
        raise ValueError(f"counts must be >= 0 with a positive sum, got {counts.tolist()}.")
    present = counts > 0
    weights = np.ones_like(counts)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights.astype(np.float32)


def class_weights_for_config(loss_config: Any, counts: np.ndarray | list[int]) -> np.ndarray | None:
    """The class weights `config.loss.class_weights` asks for: None ("none") or balanced [C].

    Raises:
      ValueError: unknown `config.loss.class_weights`.
    """
    mode = getattr(loss_config, "class_weights", "none")
    if mode == "none":
        return None
    if mode == "balanced":
        return class_weights_from_counts(counts)
    raise ValueError(
        f"Unknown config.loss.class_weights={mode!r}; known: {', '.join(CLASS_WEIGHTING)}."
    )


def softmax_focal_loss(logits: jax.Array, targets: jax.Array, gamma: float) -> jax.Array:
    """Multi-class softmax focal loss (Lin et al. 2017), per example.

    l_i = -sum_c t_ic * (1 - p_ic)**gamma * log p_ic, p = softmax(logits). gamma = 0 is the
    softmax cross-entropy; with one-hot targets it is -(1 - p_y)**gamma * log p_y.

    Args:
      logits: float [B, C].
      targets: float [B, C] target distribution (one-hot or label-smoothed).
      gamma: focusing parameter >= 0.

    Returns:
      float32 [B].
    """
    log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    if gamma == 0:
        modulator = 1.0  # avoids 0**0 and its NaN gradient at p == 1
    else:
        # 1 - p computed as -expm1(log p) (accurate near p = 1), floored so that the gradient
        # of x**gamma stays finite for gamma < 1 when p rounds to 1.
        one_minus_p = jnp.maximum(-jnp.expm1(log_p), 1e-12)
        modulator = one_minus_p**gamma
    return -jnp.sum(targets * modulator * log_p, axis=-1)


def compute_loss(
    logits: jax.Array,
    labels: jax.Array,
    weights: jax.Array,
    loss_config: Any,
    class_weights: np.ndarray | jax.Array | None = None,
    *,
    axis_name: str | None = None,
    mix: tuple[jax.Array, jax.Array] | None = None,
) -> jax.Array:
    """Weighted mean classification loss (see the module docstring for the reduction).

    Args:
      logits: float32 [B, C].
      labels: int32 [B] class indices.
      weights: float32 (or bool) [B], the batch mask: 1 for real examples, 0 for padding.
      loss_config: `config.loss` with `name` ("cross_entropy" | "focal"), `label_smoothing`
        (alpha: targets (1 - alpha) * one_hot + alpha / C), `focal_gamma`.
      class_weights: float [C] per-class weights (e.g. `class_weights_from_counts`), or None.
      axis_name: pmap axis to normalise over, for an exact global mean after `lax.pmean`.
      mix: (partner labels int32 [B], lam float32 [B]) from `data.mixing.mix_batch` (mixup /
        cutmix), or None. Example i then has the soft target lam_i t(label_i) + (1 - lam_i)
        t(partner_i), t the (smoothed) one-hot, through the same cross-entropy or focal loss, and
        the class weight lam_i w[label_i] + (1 - lam_i) w[partner_i]. lam = 1 is exactly the
        unmixed loss.

    Returns:
      float32 scalar.

    Raises:
      ValueError: unknown `config.loss.name`.
    """
    name = loss_config.name
    if name not in LOSS_NAMES:
        raise ValueError(f"Unknown config.loss.name={name!r}; known: {', '.join(LOSS_NAMES)}.")
    num_classes = logits.shape[-1]
    logits = logits.astype(jnp.float32)
    targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    smoothing = float(getattr(loss_config, "label_smoothing", 0.0))
    if smoothing > 0:
        targets = optax.smooth_labels(targets, smoothing)
    if mix is not None:
        partner, lam = mix
        lam = jnp.asarray(lam, jnp.float32)
        other = jax.nn.one_hot(partner, num_classes, dtype=jnp.float32)
        if smoothing > 0:
            other = optax.smooth_labels(other, smoothing)
        targets = lam[:, None] * targets + (1.0 - lam[:, None]) * other
    if name == "cross_entropy":
        per_example = optax.softmax_cross_entropy(logits, targets)
    else:
        per_example = softmax_focal_loss(logits, targets, float(loss_config.focal_gamma))

    example_weights = jnp.asarray(weights, jnp.float32)
    if class_weights is not None:
        table = jnp.asarray(class_weights, jnp.float32)
        if mix is None:
            example_weights = example_weights * table[labels]
        else:
            example_weights = example_weights * (lam * table[labels] + (1.0 - lam) * table[partner])
    total = jnp.sum(example_weights * per_example)
    denominator = jnp.sum(example_weights)
    if axis_name is not None:
        # Global weight sum spread evenly over the devices: pmean of the results = global mean.
        denominator = jax.lax.psum(denominator, axis_name) / jax.lax.psum(1, axis_name)
    safe = jnp.where(denominator > 0, denominator, 1.0)
    return jnp.where(denominator > 0, total / safe, 0.0)
