"""Predictions over a split: run a compiled eval step over one padded pass, gather, summarise.

    preds = predict_split(p_eval, state, data.eval_batches("val"), par)
    metrics = summarize(preds, data.class_names, data.malignant_classes, threshold=0.5)

Used by the training loop (validation) and by `evaluate`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np

from isic_jax.metrics import classification_metrics
from isic_jax.training import parallel
from isic_jax.training.state import TrainState
from isic_jax.training.steps import EVAL_KEYS, device_batch
from isic_jax.utils import close_iterator, to_str, write_csv

PyTree = Any


@dataclasses.dataclass
class Predictions:
    """Per-example outputs over a split (padding removed), in the order the pipeline gave them.

    probs float32 [N, C], labels int32 [N], index int64 [N] (record index), image_id / patient_id
    str [N] (empty strings when the pipeline has no such field); the subgroup metadata of the
    evaluation report: sex int32 [N] (0 unknown, 1 female, 2 male), age int32 [N] (-1 missing),
    anatom_site str [N] ("unknown" when missing), fitzpatrick str [N] ("" when missing);
    source str [N]: the release each example comes from (for metrics per source in a
    several-release run; "" when the pipeline has no such field, and when not given).
    `predict_split` fills every field, with those placeholders when the pipeline has no such
    field.
    """

    probs: np.ndarray
    labels: np.ndarray
    index: np.ndarray
    image_id: np.ndarray
    patient_id: np.ndarray
    sex: np.ndarray
    age: np.ndarray
    anatom_site: np.ndarray
    fitzpatrick: np.ndarray | None = None  # str [N], "" when missing
    source: np.ndarray | None = None
    embedding: np.ndarray | None = None  # float32 [N, D] penultimate features, when asked for

    def __post_init__(self) -> None:
        if self.source is None:
            self.source = np.full(len(self.labels), "", dtype=object)


def _gather_processes(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Concatenates every process's rows (process-major, the order of the global batch).

    Byte strings travel as fixed-width uint8 matrices (collectives carry numbers only).
    """
    from jax.experimental import multihost_utils

    out = {}
    for key, value in rows.items():
        if value.dtype.kind == "S":
            # Same width everywhere: the widest string of any process.
            widths = multihost_utils.process_allgather(np.int32(max(1, value.dtype.itemsize)))
            width = int(np.max(widths))
            raw = np.frombuffer(value.astype(f"S{width}").tobytes(), np.uint8)
            raw = raw.reshape(len(value), width)
            gathered = np.asarray(multihost_utils.process_allgather(raw))
            gathered = gathered.reshape(-1, width)
            out[key] = np.frombuffer(gathered.tobytes(), f"S{width}")
        else:
            gathered = np.asarray(multihost_utils.process_allgather(value))
            out[key] = gathered.reshape(-1, *value.shape[1:])
    return out


def predict_split(
    p_eval: Callable[[TrainState, dict[str, jax.Array]], jax.Array],
    state: TrainState,
    batches: Iterable[dict[str, np.ndarray]],
    par: parallel.DataParallel,
    prefetch: int = 2,
) -> Predictions:
    """Runs a compiled eval step over an iterable of host batches (one pass, padded last batch).

    Args:
      p_eval: `par.compile_eval_step(partial(eval_step, model=...))`, or of `embed_step`
        (probabilities and embeddings: `Predictions.embedding` is filled).
      state: replicated as for `p_eval`.
      batches: dicts with image float32 [B, H, W, 3], label int32 [B], mask bool [B] and
        optionally index, image_id, patient_id, sex, age, anatom_site, fitzpatrick (kept on
        the host).
    """
    probs, labels, index, image_id, patient_id, embedding = [], [], [], [], [], []
    sex, age, anatom_site, fitzpatrick, source = [], [], [], [], []
    it = iter(batches)

    def shard(b: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return par.shard_batch(device_batch(b, EVAL_KEYS))

    prefetcher = parallel.DevicePrefetcher(it, shard, size=prefetch)
    pending: list[tuple[jax.Array, dict[str, np.ndarray]]] = []

    def drain() -> None:
        for out, host in pending:
            emb = None
            if isinstance(out, tuple):  # embed_step
                out, emb = out
            rows = {
                "probs": par.local_rows(out),
                "mask": np.asarray(host["mask"], bool),
                "label": np.asarray(host["label"]),
                "index": np.asarray(host.get("index", np.full(host["mask"].shape, -1))),
                "image_id": np.asarray(host.get("image_id", np.zeros(host["mask"].shape, "S1"))),
                "patient_id": np.asarray(
                    host.get("patient_id", np.zeros(host["mask"].shape, "S1"))
                ),
                "sex": np.asarray(host.get("sex", np.zeros(host["mask"].shape)), np.int32),
                "age": np.asarray(host.get("age", np.full(host["mask"].shape, -1)), np.int32),
                "anatom_site": np.asarray(
                    host.get("anatom_site", np.full(host["mask"].shape, b"unknown"))
                ),
                "fitzpatrick": np.asarray(
                    host.get("fitzpatrick", np.zeros(host["mask"].shape, "S1"))
                ),
                "source": np.asarray(host.get("source", np.zeros(host["mask"].shape, "S1"))),
            }
            if emb is not None:
                rows["embedding"] = par.local_rows(emb)
            if jax.process_count() > 1:
                rows = _gather_processes(rows)  # every process computes metrics on all
            mask = rows["mask"]
            probs.append(rows["probs"][mask])
            labels.append(rows["label"][mask])
            index.append(rows["index"][mask])
            image_id.append(to_str(rows["image_id"][mask]))
            patient_id.append(to_str(rows["patient_id"][mask]))
            sex.append(rows["sex"][mask])
            age.append(rows["age"][mask])
            anatom_site.append(to_str(rows["anatom_site"][mask]))
            fitzpatrick.append(to_str(rows["fitzpatrick"][mask]))
            source.append(to_str(rows["source"][mask]))
            if emb is not None:
                embedding.append(rows["embedding"][mask])
        pending.clear()

    try:
        for item in prefetcher:
            pending.append((p_eval(state, item.device), item.host))
            if len(pending) >= 8:  # bounded host memory, still no per-batch sync
                drain()
        drain()
    finally:
        prefetcher.close()
        close_iterator(it)
    if not probs:
        raise ValueError("the evaluation split yielded no batches")
    return Predictions(
        probs=np.concatenate(probs).astype(np.float32),
        labels=np.concatenate(labels).astype(np.int32),
        index=np.concatenate(index).astype(np.int64),
        image_id=np.concatenate(image_id),
        patient_id=np.concatenate(patient_id),
        sex=np.concatenate(sex).astype(np.int32),
        age=np.concatenate(age).astype(np.int32),
        anatom_site=np.concatenate(anatom_site),
        fitzpatrick=np.concatenate(fitzpatrick),
        source=np.concatenate(source),
        embedding=np.concatenate(embedding).astype(np.float32) if embedding else None,
    )


def summarize(
    preds: Predictions,
    class_names: list[str],
    malignant_classes: list[int],
    threshold: float,
) -> dict[str, Any]:
    """metrics.classification_metrics on the predictions (JSON-ready, NaN -> None), plus "loss":
    the mean negative log-likelihood of the true class (no label smoothing or class weights)."""

    has_patients = np.any(preds.patient_id != "")
    result = dict(
        classification_metrics(
            preds.probs,
            preds.labels,
            class_names,
            malignant_classes=malignant_classes,
            threshold=threshold,
            patient_ids=preds.patient_id if has_patients else None,
        )
    )
    p_true = preds.probs[np.arange(len(preds.labels)), preds.labels]
    result["loss"] = float(-np.mean(np.log(np.clip(p_true, 1e-12, 1.0))))
    return result


def write_predictions(
    path: str | os.PathLike,
    preds: Predictions,
    class_names: list[str],
    *,
    malignant_probability: np.ndarray | None = None,
    threshold: float | None = None,
) -> None:
    """CSV: image_id, patient_id, label, index, prob_<class> for each class (the model's raw
    probabilities), then, when given, malignant_probability (f[N], after temperature scaling:
    what `predict` writes) and malignant_at_threshold (1 iff it is >= threshold)."""
    header = ["image_id", "patient_id", "label", "index", *[f"prob_{n}" for n in class_names]]
    # The source release of each image, in a several-release run.
    sources = preds.source if len(set(np.asarray(preds.source).tolist()) - {""}) > 1 else None
    extra = malignant_probability is not None
    if extra:
        header += ["malignant_probability"] + (["malignant_at_threshold"] if threshold else [])
    if sources is not None:
        header.append("source")

    def row(i: int) -> list[Any]:
        out = [preds.image_id[i], preds.patient_id[i], int(preds.labels[i]), int(preds.index[i]),
               *[f"{p:.6g}" for p in preds.probs[i]]]
        if extra:
            m = float(malignant_probability[i])
            out.append(repr(m))  # exact: it is compared with the threshold
            if threshold:
                out.append(int(m >= threshold))
        if sources is not None:
            out.append(sources[i])
        return out

    write_csv(path, header, (row(i) for i in range(len(preds.labels))))
