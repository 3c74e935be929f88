"""Whether the features learn: a weighted k-NN classifier on the frozen embedding.

    bank = embed(p_embed, state, data.eval_batches("train"), par)    # memory bank: train folds
    queries = embed(p_embed, state, data.eval_batches("val"), par)   # the labelled held-out fold
    metrics = knn_metrics(bank, queries, k=20, temperature=0.07, class_names=..., ...)

The embedding is the backbone's pooled features in evaluation mode (running BatchNorm
statistics, the evaluation crop), L2-normalised; one compiled pass per split, as
`training.predictions` runs the classifier's (the same prefetch, padding and gathering over
processes). Each query takes the k most cosine-similar bank images and scores class c with
sum_j exp(s_j / T) [label_j = c] / sum_j exp(s_j / T) (Wu et al., "Unsupervised feature learning
via non-parametric instance discrimination", CVPR 2018; k = 20, T = 0.07 as DINO, Caron et al.
2021, evaluates). The malignant score is the sum over the malignant classes; its AUC on the
query fold is `knn_auc`. Labels are read here and only here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import numpy as np

from isic_jax.metrics import classification_metrics
from isic_jax.training import parallel
from isic_jax.training.predictions import predict_split

CHUNK = 1024  # query rows per similarity block (a block is CHUNK x bank size float32)


@dataclasses.dataclass
class Embedding:
    """Unit feature rows float32 [N, D] and their labels int32 [N] (padding removed)."""

    features: np.ndarray
    labels: np.ndarray


def embed(p_embed: Callable[..., jax.Array], state: Any, batches: Iterable[dict[str, np.ndarray]],
          par: parallel.DataParallel, prefetch: int = 2) -> Embedding:
    """One compiled pass of `p_embed` (`par.compile_eval_step` of `byol.embed_step`) over a
    split's evaluation batches; every process gets all rows."""
    preds = predict_split(p_embed, state, batches, par, prefetch=prefetch)
    # predict_split keeps the per-example output of the step as `probs`: here, the features.
    return Embedding(features=np.asarray(preds.probs, np.float32),
                     labels=np.asarray(preds.labels, np.int32))


def knn_probabilities(bank: Embedding, queries: np.ndarray, num_classes: int, k: int = 20,
                      temperature: float = 0.07) -> np.ndarray:
    """Weighted k-NN class scores of unit query rows float32 [Nq, D] against the bank: float32
    [Nq, num_classes], rows summing to 1 (see the module docstring)."""
    if len(bank.features) == 0:
        raise ValueError("the k-NN probe's memory bank is empty")
    k = min(int(k), len(bank.features))
    out = np.zeros((len(queries), num_classes), np.float64)
    onehot = np.eye(num_classes, dtype=np.float64)[bank.labels]  # [Nb, C]
    for start in range(0, len(queries), CHUNK):
        sims = queries[start:start + CHUNK] @ bank.features.T  # [n, Nb] cosine similarities
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        top_sims = np.take_along_axis(sims, top, axis=1).astype(np.float64)
        weights = np.exp((top_sims - top_sims.max(axis=1, keepdims=True)) / temperature)
        scores = np.einsum("nk,nkc->nc", weights, onehot[top])
        out[start:start + CHUNK] = scores / scores.sum(axis=1, keepdims=True)
    return out.astype(np.float32)


def knn_metrics(bank: Embedding, queries: Embedding, *, class_names: Sequence[str],
                malignant_classes: Sequence[int], k: int = 20, temperature: float = 0.07
                ) -> dict[str, Any]:
    """The probe's metrics on the query rows: knn_auc (malignant vs the rest), knn_pauc_80,
    knn_balanced_accuracy, knn_accuracy, and the counts. NaN metrics (one class only) are
    None."""
    probs = knn_probabilities(bank, queries.features, len(class_names), k, temperature)
    found = classification_metrics(probs, queries.labels, list(class_names),
                                   malignant_classes=list(malignant_classes), threshold=0.5)
    out: dict[str, Any] = {}
    for name in ("auc", "pauc_80", "balanced_accuracy", "accuracy"):
        value = found.get(name)
        try:
            value = float(value)
        except (TypeError, ValueError):
            value = None
        out[f"knn_{name}"] = value if value is not None and np.isfinite(value) else None
    out["knn_queries"] = int(len(queries.labels))
    out["knn_bank"] = int(len(bank.labels))
    return out
