"""Train state, the pure train/eval steps, and the training loop.

    state = create_train_state(model, tx, rng, image_size, use_ema=True)
    step = functools.partial(train_step, model=model, tx=tx, loss_config=config.loss,
                             class_weights=weights, axis_name=par.axis_name, ema_decay=0.999)
    state, metrics = step(state, batch, rng)      # pure: pmap and jit wrap this same function

`train_and_evaluate(config, workdir)` is the loop behind `isic-jax train`: data parallel on every
device (parallel.py), batches prefetched to the devices, metrics pulled every `log_every` steps
(no host sync in between), evaluation every `eval_every` steps and at the end, asynchronous Orbax
checkpoints (checkpointing.py) every `checkpoint_every` steps, at every evaluation and at the
end, and resume from the latest checkpoint of the workdir.

Several processes (jax.distributed, see distributed.py): each reads its own slice of every global
batch; under jit the slices become one global array (`jax.make_array_from_process_local_data`),
under pmap each process feeds its local devices. Process 0 alone prints and writes config.json,
TensorBoard events and eval_history.jsonl; every process takes part in the Orbax saves and writes
its own input-pipeline state.

Interruptions: SIGTERM/SIGINT (`preemption.PreemptionGuard`, checked at every step on every
process) -> finish the step, checkpoint it, return with "stopped_by_signal". SIGKILL, or a second
signal -> the newest complete checkpoint survives (Orbax finalizes a save atomically). Resume
(`_restore_latest_good`): the newest checkpoint that restores, onto the current devices; a
damaged one is reported and set aside for the previous one; another model's checkpoints stop the
run. Data order after a resume: the input state counts global batches, so the same global
batches follow whatever the device or process count (only their split over devices/processes
changes, hence float-rounding differences); changing train.batch_size shifts the stream.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import pathlib
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from isic_jax import (
    checkpointing,
    config_utils,
    device_augment,
    input_pipeline,
    logging_utils,
    parallel,
    preemption,
)
from isic_jax.losses import class_weights_for_config, compute_loss
from isic_jax.metrics import classification_metrics, to_json_compatible
from isic_jax.models import create_model, init_variables
from isic_jax.optim import create_optimizer, ema_update

PyTree = Any


# ---------------------------------------------------------------------------------------------
# State and steps.


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training (a pytree; checkpointed as is).

    Attributes:
      step: int32 [] micro-steps (batches) done.
      params: model parameters (float32).
      batch_stats: BatchNorm running statistics (float32).
      opt_state: optimiser state (optax; MultiStepsState under gradient accumulation).
      ema: {"params", "batch_stats"} exponential moving average of both, used for evaluation;
        an empty dict when EMA is off.
    """

    step: jax.Array
    params: PyTree
    batch_stats: PyTree
    opt_state: PyTree
    ema: PyTree

    def eval_variables(self) -> dict[str, PyTree]:
        """The variables evaluation uses: the EMA ones when kept, else the live ones."""
        if self.ema:
            return {"params": self.ema["params"], "batch_stats": self.ema["batch_stats"]}
        return {"params": self.params, "batch_stats": self.batch_stats}


def create_train_state(
    model: flax.linen.Module,
    tx: optax.GradientTransformation,
    rng: jax.Array,
    image_size: int,
    use_ema: bool = False,
) -> TrainState:
    """Initialises parameters, BatchNorm statistics and the optimiser (on the default device).

    Works under `jax.eval_shape` (to build restore targets without allocating).
    """

    variables = init_variables(model, rng, image_size)
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    ema = {}
    if use_ema:
        # Copies: the state is donated to the step, and one buffer cannot be donated twice.
        ema = jax.tree.map(jnp.copy, {"params": params, "batch_stats": batch_stats})
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
        ema=ema,
    )


def _applied_update(opt_state: PyTree) -> jax.Array | bool:
    """Whether the last `tx.update` applied an update (False inside a MultiSteps accumulation)."""
    if isinstance(opt_state, optax.MultiStepsState):
        return jnp.logical_and(opt_state.mini_step == 0, opt_state.gradient_step > 0)
    return True


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    *,
    model: flax.linen.Module,
    tx: optax.GradientTransformation,
    loss_config: Any,
    class_weights: np.ndarray | None = None,
    axis_name: str | None = None,
    ema_decay: float = 0.0,
    augment: Any = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimiser micro-step. Pure; collectives only when `axis_name` is given (pmap).

    Args:
      state: TrainState (pmap: this device's copy).
      batch: image uint8 [B, H, W, 3] (host-cropped; augmented and normalised here by
        `device_augment.augment_batch`) or float32 (already normalised, used as is), label
        int32 [B], mask bool [B], position uint32 [B] (the example's place in the training
        stream: its augmentation key). B: this device's share under pmap, the global batch
        under jit.
      rng: the run's PRNG key (uint32 [2]), the same on every device. Augmentation uses
        fold_in(rng, AUGMENT_STREAM) and the positions (identical whatever the device count);
        dropout uses fold_in(rng, step) (and the pmap device index).
      model: from `create_model(..., axis_name=axis_name)`.
      tx: from `optim.create_optimizer`.
      loss_config: `config.loss`.
      class_weights: float32 [C] or None.
      axis_name: pmap axis: gradients and metrics are `lax.pmean`-ed over it. None under jit
        (the batch is global; XLA reduces across devices itself).
      ema_decay: > 0 updates `state.ema` after each applied optimiser update.
      augment: `device_augment.DeviceAugmentConfig` (from config.data.augment); None: no
        rotation/colour jitter, only normalisation.

    Returns:
      (new state, metrics) with metrics float32 scalars: loss (mean over the global batch),
      accuracy, grad_norm (of the averaged gradient).
    """
    step_rng = jax.random.fold_in(rng, state.step)
    if axis_name is not None:
        # Different dropout masks per device, as one global draw would give.
        step_rng = jax.random.fold_in(step_rng, jax.lax.axis_index(axis_name))
    images = train_inputs(batch, rng, augment, axis_name)
    weights = batch["mask"].astype(jnp.float32)
    labels = batch["label"].astype(jnp.int32)

    def loss_fn(params):
        logits, updates = model.apply(
            {"params": params, "batch_stats": state.batch_stats},
            images,
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": step_rng},
        )
        loss = compute_loss(
            logits, labels, weights, loss_config, class_weights, axis_name=axis_name
        )
        return loss, (logits, updates.get("batch_stats", {}))

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params
    )
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    count = jnp.sum(weights)
    correct_sum = jnp.sum(correct * weights)
    if axis_name is not None:
        # compute_loss normalised by the global weight sum / n: pmean gives the global mean.
        grads = jax.lax.pmean(grads, axis_name)
        loss = jax.lax.pmean(loss, axis_name)
        count = jax.lax.psum(count, axis_name)
        correct_sum = jax.lax.psum(correct_sum, axis_name)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)

    ema = state.ema
    if ema_decay > 0 and ema:
        new_vars = {"params": params, "batch_stats": batch_stats}
        updated = ema_update(ema, new_vars, ema_decay)
        applied = _applied_update(opt_state)
        ema = jax.tree.map(lambda u, o: jnp.where(applied, u, o), updated, ema)

    new_state = state.replace(
        step=state.step + 1,
        params=params,
        batch_stats=batch_stats,
        opt_state=opt_state,
        ema=ema,
    )
    metrics = {
        "loss": loss,
        "accuracy": correct_sum / jnp.maximum(count, 1.0),
        "grad_norm": optax.tree.norm(grads),
    }
    return new_state, metrics


def _no_augment() -> Any:
    return device_augment.DeviceAugmentConfig()


def augment_config(config: ml_collections.ConfigDict) -> Any:
    """The device half of config.data.augment (static, hashable)."""
    return device_augment.DeviceAugmentConfig.from_config(config.data.augment)


def train_inputs(
    batch: dict[str, jax.Array], rng: jax.Array, augment: Any, axis_name: str | None
) -> jax.Array:
    """Model input float32 [B, H, W, 3] from a train batch (see `train_step`)."""
    images = batch["image"]
    if images.dtype != jnp.uint8:
        return images.astype(jnp.float32)

    aug_rng = jax.random.fold_in(rng, device_augment.AUGMENT_STREAM)
    positions = batch.get("position")
    if positions is None and axis_name is not None:
        # Without positions the keys are split over the local batch: differ per device.
        aug_rng = jax.random.fold_in(aug_rng, jax.lax.axis_index(axis_name))
    return device_augment.augment_batch(
        images, aug_rng, augment or _no_augment(), example_ids=positions
    )


# What the steps read from a batch; only these go to the devices (ids stay on the host).
TRAIN_KEYS = ("image", "label", "mask", "position")
EVAL_KEYS = ("image",)


def device_batch(batch: dict[str, np.ndarray], keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The entries of a host batch a step needs; positions as uint32 (what fold_in takes; JAX
    has no int64 without x64)."""
    out = {k: batch[k] for k in keys if k in batch}
    if "position" in out:
        out["position"] = (np.asarray(out["position"]) % 2**32).astype(np.uint32)
    return out


def eval_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    model: flax.linen.Module,
    augment: Any = None,
) -> jax.Array:
    """Class probabilities (EMA weights when kept). Pure, no collectives.

    Args:
      batch: image uint8 [B, H, W, 3] (normalised here by `device_augment.preprocess_eval`,
        with colour constancy if `augment` asks for it) or float32 already normalised.
      augment: `device_augment.DeviceAugmentConfig` or None.

    Returns:
      float32 [B, C] softmax probabilities.
    """
    images = batch["image"]
    if images.dtype == jnp.uint8:
        images = device_augment.preprocess_eval(images, augment or _no_augment())
    logits = model.apply(state.eval_variables(), images, train=False)
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


@jax.jit
def tree_all_finite(tree: PyTree) -> jax.Array:
    """bool []: every float leaf of `tree` is finite."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.floating)]
    if not leaves:
        return jnp.array(True)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


class UnknownSplitError(ValueError):
    """An evaluation split that is neither val, train nor a split of the prepared dataset."""


class NonFiniteError(FloatingPointError):
    """The loss (or the state) became NaN/Inf; nothing from that point on was checkpointed."""


# ---------------------------------------------------------------------------------------------
# Evaluation over a dataset (used during training and by evaluate.py).


@dataclasses.dataclass
class Predictions:
    """Per-example outputs over a split (padding removed), in the order the pipeline gave them.

    probs float32 [N, C], labels int32 [N], index int64 [N] (record index), image_id / patient_id
    str [N] (empty strings when the pipeline has no such field); the subgroup metadata of the
    evaluation report: sex int32 [N] (0 unknown, 1 female, 2 male), age int32 [N] (-1 missing),
    anatom_site str [N] ("unknown" when missing); `predict` fills every field, with those
    placeholders when the pipeline has no such field.
    """

    probs: np.ndarray
    labels: np.ndarray
    index: np.ndarray
    image_id: np.ndarray
    patient_id: np.ndarray
    sex: np.ndarray
    age: np.ndarray
    anatom_site: np.ndarray


def _as_str(values: np.ndarray) -> np.ndarray:
    """bytes/str [N] -> object array of str."""
    return np.array(
        [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in values],
        dtype=object,
    )


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


def predict(
    p_eval: Callable[[TrainState, dict[str, jax.Array]], jax.Array],
    state: TrainState,
    batches: Iterable[dict[str, np.ndarray]],
    par: parallel.DataParallel,
    prefetch: int = 2,
) -> Predictions:
    """Runs a compiled eval step over an iterable of host batches (one pass, padded last batch).

    Args:
      p_eval: `par.compile_eval_step(partial(eval_step, model=...))`.
      state: replicated as for `p_eval`.
      batches: dicts with image float32 [B, H, W, 3], label int32 [B], mask bool [B] and
        optionally index, image_id, patient_id, sex, age, anatom_site (kept on the host).
    """
    probs, labels, index, image_id, patient_id = [], [], [], [], []
    sex, age, anatom_site = [], [], []
    it = iter(batches)

    def shard(b: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return par.shard_batch(device_batch(b, EVAL_KEYS))

    prefetcher = parallel.DevicePrefetcher(it, shard, size=prefetch)
    pending: list[tuple[jax.Array, dict[str, np.ndarray]]] = []

    def drain() -> None:
        for out, host in pending:
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
            }
            if jax.process_count() > 1:
                rows = _gather_processes(rows)  # every process computes metrics on all
            mask = rows["mask"]
            probs.append(rows["probs"][mask])
            labels.append(rows["label"][mask])
            index.append(rows["index"][mask])
            image_id.append(_as_str(rows["image_id"][mask]))
            patient_id.append(_as_str(rows["patient_id"][mask]))
            sex.append(rows["sex"][mask])
            age.append(rows["age"][mask])
            anatom_site.append(_as_str(rows["anatom_site"][mask]))
        pending.clear()

    try:
        for item in prefetcher:
            pending.append((p_eval(state, item.device), item.host))
            if len(pending) >= 8:  # bounded host memory, still no per-batch sync
                drain()
        drain()
    finally:
        prefetcher.close()
        _close(it)
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


# ---------------------------------------------------------------------------------------------
# Input data.


def malignant_class_indices(task: str, release: str, class_names: list[str]) -> list[int]:
    """Classes counted as malignant: [1] for the binary task, else the release's malignant
    diagnoses (datasets.isic.MALIGNANT_DIAGNOSES)."""
    if task == "binary":
        return [1]
    from isic_jax.datasets.isic import MALIGNANT_DIAGNOSES

    malignant = set(MALIGNANT_DIAGNOSES[release])
    return [i for i, name in enumerate(class_names) if name in malignant]


class DataNotFoundError(FileNotFoundError):
    """config.data names a dataset that is not prepared under config.data.data_dir; the message
    says what is there and what to run."""


def _prepared_configs(data_dir: pathlib.Path) -> list[str]:
    """Names ("isic2019_96") of the prepared `isic` datasets under a TFDS data_dir."""
    root = data_dir / "isic"
    if not root.is_dir():
        return []
    # TFDS layout: <data_dir>/isic/<release>_<size>/<version>/dataset_info.json (written last).
    return sorted({p.parent.parent.name for p in root.glob("*/*/dataset_info.json")})


def check_prepared_dataset(data_config: Any) -> None:
    """Fails fast (before TFDS, devices or checkpoints are touched) when the dataset that
    config.data names is not prepared under config.data.data_dir.

    Raises:
      DataNotFoundError: the folder is missing, holds no prepared ISIC dataset, or holds other
        releases/sizes only; the message lists what is there and the command to run.
    """
    data_dir = pathlib.Path(os.path.expanduser(str(data_config.data_dir)))
    release, size = str(data_config.release), int(data_config.stored_size)
    name = f"{release}_{size}"
    prepare = (f"isic-jax prepare --source YOUR_{release.upper()}_DOWNLOAD --data-dir {data_dir} "
               f"--image-size {size}")
    if not data_dir.is_dir():
        raise DataNotFoundError(
            f"config.data.data_dir={data_config.data_dir} does not exist ({data_dir}). Prepare "
            f"the dataset first: `{prepare}`, or pass --config.data.data_dir=DIR with the folder "
            f"`isic-jax prepare --data-dir` wrote."
        )
    found = _prepared_configs(data_dir)
    if name in found:
        return
    if not found:
        raise DataNotFoundError(
            f"config.data.data_dir={data_dir} holds no prepared ISIC dataset (looked for "
            f"{data_dir}/isic/{name}/<version>/dataset_info.json). Prepare it first: `{prepare}`."
        )
    options = "; ".join(
        "--config.data.release={} --config.data.stored_size={}".format(*n.rsplit("_", 1))
        for n in found
    )
    raise DataNotFoundError(
        f"config.data.data_dir={data_dir} holds isic/{', isic/'.join(found)} but not isic/{name} "
        f"(config.data.release={release}, config.data.stored_size={size}). To train on what is "
        f"there, pass {options}; to use {release} at {size} px, prepare it: `{prepare}`."
    )


class InputData:
    """The run's data: sources from `input_pipeline.load_sources` and the Grain pipelines on them.

    Args:
      config: the resolved config.
      sources: (train_source, val_source, info) as `load_sources` returns them; opened from
        config.data when None (tests pass in-memory sources).
      read_train_labels: passed to `load_sources` (default: when balanced sampling needs them;
        False where nothing is trained, e.g. evaluate).
    """

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        sources: tuple | None = None,
        *,
        read_train_labels: bool | None = None,
    ):
        self._config = config
        if sources is None:
            check_prepared_dataset(config.data)
            sources = input_pipeline.load_sources(
                config.data, read_train_labels=read_train_labels
            )
        self.train_source, self.val_source, self.info = sources

    @property
    def num_train(self) -> int:
        return len(self.train_source)

    @property
    def num_classes(self) -> int:
        return len(self.info.class_names)

    @property
    def class_names(self) -> list[str]:
        return list(self.info.class_names)

    @property
    def train_class_counts(self) -> np.ndarray:
        return np.asarray(self.info.train_class_counts)

    @property
    def malignant_classes(self) -> list[int]:
        return malignant_class_indices(self.info.task, self.info.release, self.class_names)

    def train_iterator(self) -> Iterator[dict[str, np.ndarray]]:
        """Infinite iterator of this process's training batches (get_state/set_state)."""
        ds = input_pipeline.create_train_dataset(
            self.train_source,
            self._config.data,
            int(self._config.train.batch_size),
            int(self._config.seed),
            labels=getattr(self.info, "train_labels", None),
        )
        return iter(ds)

    def source(self, split: str) -> Any:
        """"val" (the validation fold), "train" (the other folds) or a builder split name
        (e.g. "fold3", "fold1+fold2")."""
        if split == "val":
            return self.val_source
        if split == "train":
            return self.train_source
        import tensorflow_datasets as tfds

        from isic_jax.datasets.isic import make_builder

        data = self._config.data
        builder = make_builder(
            data.release,
            int(data.stored_size),
            str(pathlib.Path(str(data.data_dir)).expanduser()),
            num_folds=int(data.get("num_folds", config_utils.DEFAULT_NUM_FOLDS)),
        )
        known = sorted(builder.info.splits)
        parts = split.split("+")
        if not all(p in known for p in parts):
            raise UnknownSplitError(
                f"unknown split {split!r}; known: val, train, {', '.join(known)}"
            )
        # As load_sources opens val and train: raw records parsed by TfExampleSource.
        raw = tfds.decode.DeserializeMethod.RAW_BYTES
        return input_pipeline.TfExampleSource(
            builder.as_data_source(split=split, deserialize_method=raw)
        )

    def eval_batches(self, split: str = "val") -> Iterable[dict[str, np.ndarray]]:
        """One padded pass over a split (mask False on padding)."""
        return input_pipeline.create_eval_dataset(
            self.source(split), self._config.data, int(self._config.eval.batch_size)
        )


# ---------------------------------------------------------------------------------------------
# The training loop.


def schedule_lengths(config: ml_collections.ConfigDict, num_train: int) -> tuple[int, int]:
    """(total micro-steps, micro-steps per epoch) for a train split of `num_train` examples."""
    batch = int(config.train.batch_size)
    steps_per_epoch = max(1, num_train // batch)
    if int(config.train.num_steps) > 0:
        return int(config.train.num_steps), steps_per_epoch
    return max(1, math.ceil(float(config.train.num_epochs) * steps_per_epoch)), steps_per_epoch


def seed_keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """(init key, training key) from config.seed (uint32 [2] raw keys: plain to checkpoint)."""
    init_rng, train_rng = jax.random.split(jax.random.PRNGKey(int(seed)))
    return init_rng, train_rng


@dataclasses.dataclass
class _Pending:
    """Device metrics of the steps since the last pull (no host sync until `log_every`)."""

    first_step: int = 0
    metrics: list = dataclasses.field(default_factory=list)
    t_start: float = 0.0


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | pathlib.Path,
    *,
    devices: list[jax.Device] | None = None,
    stop_after_step: int | None = None,
    data: Any = None,
) -> dict[str, Any]:
    """Trains (resuming from the latest checkpoint in `workdir`), evaluates, checkpoints.

    Args:
      config: a resolved config (configs/default.py schema); validated first.
      workdir: run folder: config.json, checkpoints/, tensorboard/, eval_history.jsonl.
      devices: devices to use (default all); for tests.
      stop_after_step: simulate an interruption: return right after this step, saving nothing
        more (as a killed process would); for tests.
      data: an `InputData` (default: built from config.data); for tests.

    Returns:
      {"step": last step, "val": last validation metrics (None if no evaluation ran), "train":
      last train scalars, "state": the final TrainState (one copy, on the devices),
      "stopped_by_signal": True when SIGTERM/SIGINT (on any process) stopped the run early after
      saving a checkpoint (`isic-jax train` then exits with preemption.EXIT_PREEMPTED)}.

    Raises:
      NonFiniteError: the loss or state became NaN/Inf; the latest checkpoint is the last good one.
      ValueError: a bad config value or a global batch that does not divide over the devices.
      DataNotFoundError: config.data names a dataset not prepared under data.data_dir.
      checkpointing.CheckpointError: the workdir holds another model's checkpoints, or none of
        its checkpoints can be restored (nothing in it is changed in either case).

    Resuming (see `_restore_latest_good`): from the newest checkpoint that restores, onto this
    run's devices whatever their number; the input pipeline continues with the next global
    batch. Same process count: each process gets its own saved input state back. Another process
    count: every process gets the common saved state, which counts global batches, so the same
    global batches follow, split over the new processes (checkpointing.Checkpointer.restore).
    """

    config_utils.validate_config(config)
    workdir = pathlib.Path(workdir).absolute()
    is_main = jax.process_index() == 0
    par = parallel.DataParallel.create(config.train.parallelism, devices)
    par.check_global_batch(int(config.train.batch_size), "config.train.batch_size")
    par.check_global_batch(int(config.eval.batch_size), "config.eval.batch_size")
    data = data or InputData(config)  # a missing dataset fails here, before the workdir is made
    if is_main:
        workdir.mkdir(parents=True, exist_ok=True)
    total_steps, steps_per_epoch = schedule_lengths(config, data.num_train)
    k = int(config.optim.accumulation_steps)
    tx, schedule = create_optimizer(
        config.optim,
        total_steps=max(1, total_steps // k),
        steps_per_epoch=max(1, steps_per_epoch // k),
    )
    class_weights = class_weights_for_config(config.loss, data.train_class_counts)
    model = create_model(config.model, data.num_classes, axis_name=par.axis_name)
    use_ema = float(config.optim.ema_decay) > 0
    init_rng, train_rng = seed_keys(config.seed)
    image_size = int(config.data.image_size)

    def init_state() -> TrainState:
        return create_train_state(model, tx, init_rng, image_size, use_ema=use_ema)

    config_dict = config_utils.config_to_dict(config)
    ckpt = checkpointing.Checkpointer(
        workdir / "checkpoints",
        keep=int(config.train.keep_checkpoints),
        best_metric=config.train.best_metric,
        best_mode=config_utils.best_metric_mode(config.train.best_metric),
    )
    writer: logging_utils.MetricWriter | None = None
    progress: logging_utils.Progress | None = None
    prefetcher: parallel.DevicePrefetcher | None = None
    topology = {
        "processes": jax.process_count(),
        "devices": par.num_devices,
        "parallelism": par.mode,
    }
    # SIGTERM/SIGINT: finish the step, save, stop (in step on every process; preemption.py).
    guard = preemption.PreemptionGuard(sync_every=int(config.train.log_every))
    guard.__enter__()
    train_iter = None
    try:
        train_iter = data.train_iterator()
        start_step = 0
        restored = _restore_latest_good(
            ckpt,
            abstract_state=jax.eval_shape(init_state),
            sharding=par.state_sharding(),
            train_iter=train_iter,
            config_dict=config_dict,
            is_main=is_main,
        )
        if restored is not None:
            start_step = restored.step
            changed = config_utils.config_differences(restored.config or {}, config_dict)
            message = f"Resuming from {ckpt.directory}/{start_step} ({start_step}/{total_steps})."
            if changed:
                message += " Config changed since that checkpoint:\n  " + "\n  ".join(changed)
            for note in _topology_notes(restored, topology, config_dict):
                message += "\n  " + note
            _print(is_main, message)
            state = restored.state
            train_rng = jnp.asarray(restored.rng, jnp.uint32)
        else:
            state = init_state()
        # Written only once the checkpoints proved usable: a refused workdir stays as it was.
        if is_main:
            config_utils.save_config(config, workdir)
        writer = logging_utils.MetricWriter(workdir / "tensorboard", enabled=is_main)

        state = par.replicate(state)
        rng = par.replicate(train_rng)
        augment = augment_config(config)
        p_train = par.compile_train_step(
            functools.partial(
                train_step,
                model=model,
                tx=tx,
                loss_config=config.loss,
                class_weights=class_weights,
                axis_name=par.axis_name,
                ema_decay=float(config.optim.ema_decay),
                augment=augment,
            )
        )
        p_eval = par.compile_eval_step(functools.partial(eval_step, model=model, augment=augment))
        batch = int(config.train.batch_size)
        _print(
            is_main,
            f"Training {config.model.name} on {par.num_devices} {jax.devices()[0].platform} "
            f"device(s) ({par.mode}), global batch {batch}, {total_steps} steps "
            f"({steps_per_epoch} per epoch, {data.num_train} train examples), workdir {workdir}",
        )
        progress = logging_utils.Progress(
            total_steps,
            initial=start_step,
            enabled=is_main,
            bar=logging_utils.use_progress_bar(bool(config.train.progress)),
        )
        prefetcher = parallel.DevicePrefetcher(
            train_iter,
            lambda b: par.shard_batch(device_batch(b, TRAIN_KEYS)),
            size=int(config.data.device_prefetch),
            get_state=checkpointing.iterator_state,
        )
        last_saved = start_step
        last_val: dict[str, Any] | None = None
        last_train: dict[str, float] = {}
        pending = _Pending(first_step=start_step + 1, t_start=time.perf_counter())

        def pull_metrics(step: int) -> None:
            """Host sync: fetch the pending metrics, check them, log their means."""
            nonlocal last_train
            if not pending.metrics:
                return
            values = jax.device_get(pending.metrics)
            elapsed = time.perf_counter() - pending.t_start
            n = len(values)
            rows = [{k: float(np.asarray(v).reshape(-1)[0]) for k, v in m.items()} for m in values]
            for i, row in enumerate(rows):
                if not math.isfinite(row["loss"]):
                    bad = pending.first_step + i
                    raise NonFiniteError(
                        f"Non-finite training loss ({row['loss']}) at step {bad}: stopping. "
                        f"Nothing after step {last_saved} was checkpointed; the latest checkpoint "
                        f"(step {ckpt.latest_step()}) is the last good one. Lower "
                        f"config.optim.learning_rate or check the data."
                    )
            means = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
            update = (step - 1) // k
            scalars = {
                "loss": means["loss"],
                "accuracy": means["accuracy"],
                "grad_norm": means["grad_norm"],
                "learning_rate": float(schedule(update)),
                "images_per_sec": n * batch / max(elapsed, 1e-9),
                "step_time": elapsed / n,
            }
            last_train = scalars
            writer.write_scalars(step, {f"train/{k}": v for k, v in scalars.items()})
            progress.log(
                step,
                {
                    "loss": scalars["loss"],
                    "lr": scalars["learning_rate"],
                    "img/s": f"{scalars['images_per_sec']:.1f}",
                    "s/step": f"{scalars['step_time']:.4f}",
                },
            )
            pending.metrics.clear()
            pending.first_step = step + 1
            pending.t_start = time.perf_counter()

        def evaluate_now(step: int) -> dict[str, Any]:
            preds = predict(p_eval, state, data.eval_batches("val"), par,
                            prefetch=max(1, int(config.data.device_prefetch)))
            result = summarize(preds, data.class_names, data.malignant_classes,
                               float(config.eval.threshold))
            scalars = {k: v for k, v in result.items() if checkpointing._is_scalar(v)}
            writer.write_scalars(step, {f"val/{k}": v for k, v in scalars.items()})
            shown = {k: scalars[k] for k in ("loss", "auc", "pauc_80", "balanced_accuracy",
                                             "sensitivity", "specificity") if k in scalars}
            progress.log(step, shown, prefix="val")
            if is_main:
                with open(workdir / "eval_history.jsonl", "a") as f:
                    f.write(_json_line({"step": step, **result}) + "\n")
            return result

        def save_now(step: int, item: parallel.PrefetchedBatch, metrics: dict | None) -> None:
            nonlocal last_saved
            single = par.unreplicate(state)
            # Never checkpoint a broken state: the latest checkpoint must stay a good one.
            if not bool(tree_all_finite(single)):
                raise NonFiniteError(
                    f"Non-finite parameters at step {step}: stopping without saving. The latest "
                    f"checkpoint (step {ckpt.latest_step()}) is the last good one."
                )
            # Orbax copies device arrays to the host before save() returns (its default,
            # synchronous D2H transfer), so the next step may donate these buffers.
            ckpt.save(
                step,
                single,
                rng=train_rng,
                data_iter=checkpointing.IteratorState(item.iterator_state),
                config=config_dict,
                metrics=metrics,
                topology=topology,
            )
            last_saved = step

        step = start_step
        interrupted = False
        if start_step >= total_steps:
            _print(is_main, f"Nothing to do: {workdir} holds step {start_step}/{total_steps}.")
        for step in range(start_step + 1, total_steps + 1):
            item = next(prefetcher)
            state, metrics = p_train(state, item.device, rng)
            pending.metrics.append(metrics)
            progress.update(step)
            checkpointing.kill_point("after_step", step, ckpt.wait_until_finished)  # test hook
            final = step == total_steps
            do_eval = step % int(config.train.eval_every) == 0 or final
            do_save = step % int(config.train.checkpoint_every) == 0 or final or do_eval
            # Every step, every process: the processes agree on the step to stop after.
            interrupted = guard.should_stop(step) and not final
            if step % int(config.train.log_every) == 0 or final or do_save or interrupted:
                pull_metrics(step)
            val = None
            if do_eval:
                val = last_val = evaluate_now(step)
            if do_save or interrupted:
                save_now(step, item, val)
            if do_eval or do_save:
                pending.t_start = time.perf_counter()  # eval/save time is not step time
            if interrupted:
                cause = (f"signal {signal_name(guard.signal_received)}"
                         if guard.signal_received else "a stop signal to one of the processes")
                _print(is_main, f"Stopped by {cause} after step {step}; checkpoint saved, rerun "
                       f"the same command to resume.")
                break
            if stop_after_step is not None and step >= stop_after_step:
                break
        return {
            "step": step,
            "val": last_val,
            "train": last_train,
            "state": par.unreplicate(state),
            "stopped_by_signal": interrupted,
        }
    finally:
        if prefetcher is not None:
            prefetcher.close()
        _close(train_iter)  # stops Grain worker processes
        if progress is not None:
            progress.close()
        ckpt.close()  # waits for the asynchronous saves
        if writer is not None:
            writer.close()
        guard.__exit__(None, None, None)


def _close(iterator: Any) -> None:
    """Closes a Grain iterator that has worker processes (others have no close)."""
    close = getattr(iterator, "close", None)
    if callable(close):
        close()


def _print(enabled: bool, message: str) -> None:
    if enabled:
        print(message, flush=True)


def _json_line(obj: Any) -> str:
    import json

    return json.dumps(to_json_compatible(obj), sort_keys=True)


def signal_name(signum: int | None) -> str:
    """"SIGTERM" for 15, etc."""
    import signal

    try:
        return signal.Signals(int(signum)).name
    except (TypeError, ValueError):
        return str(signum)


# ---------------------------------------------------------------------------------------------
# Resuming.


def _all_processes(flag: bool) -> bool:
    """Whether `flag` holds on every process (each process restores on its own; they must agree
    on the step they continue from)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.int32(bool(flag)))
    return bool(np.all(np.asarray(flags)))


def _reason(error: BaseException, limit: int = 300) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    if len(text) > limit:
        text = text[:limit] + " ..."
    return f"{type(error).__name__}: {text}"


def _restore_latest_good(
    ckpt: checkpointing.Checkpointer,
    *,
    abstract_state: PyTree,
    sharding: jax.sharding.Sharding,
    train_iter: Any,
    config_dict: dict[str, Any],
    is_main: bool,
) -> checkpointing.Restored | None:
    """Restores the newest checkpoint that can be read; None when the folder holds none.

    - Interrupted saves (`<step>.orbax-checkpoint-tmp`) are not checkpoints: reported, and
      deleted once the run goes on (from a checkpoint or from scratch when there is none).
    - A checkpoint of another model (its state's array names/shapes/dtypes differ from this
      config's, read from its metadata only) stops the run with `CheckpointError` before
      anything is restored or written: falling back would hide a wrong --workdir.
    - A finalized checkpoint that fails to restore (truncated or missing file, missing item) is
      reported with its step and the reason, and the previous one is tried. Once one restores,
      the unreadable newer ones are renamed `<step>.corrupt` (kept, ignored by Orbax) so that
      the run can write those step numbers again.
    - When none can be restored: `CheckpointError`; a run never starts from scratch silently
      while checkpoints exist.

    The state is restored into `abstract_state` placed with `sharding` (this run's devices,
    whatever the device count that wrote it); the input pipeline's state goes to `train_iter`.
    """
    for path in ckpt.found_incomplete:
        _print(is_main, f"Ignoring {path}: a save that never finished (the run was killed while "
                        f"writing it); the newest complete checkpoint is used instead.")
    steps = ckpt.all_steps()
    if not steps:
        ckpt.remove_incomplete_saves()
        return None
    expected = checkpointing.state_signature(abstract_state)
    target = checkpointing.abstract_target(abstract_state, sharding)
    checkpointing.quiet_failed_restore_noise()  # before: the noise comes during a failing restore
    failures: list[tuple[int, str]] = []
    for step in reversed(steps):
        where = f"{ckpt.directory}/{step}"
        saved = error = None
        try:
            saved = ckpt.saved_state_signature(step)
        except Exception as e:  # noqa: BLE001 - any unreadable metadata means a damaged step
            error = e
        if _all_processes(error is None) and saved != expected:
            _raise_other_model(ckpt, step, saved or {}, expected, config_dict)
        if error is None:
            try:
                restored = ckpt.restore(
                    step, target, data_iter=checkpointing.IteratorState(iterator=train_iter)
                )
            except checkpointing.CheckpointError:
                raise
            except Exception as e:  # noqa: BLE001 - Orbax/TensorStore raise many types
                error = e
        if _all_processes(error is None):
            ckpt.remove_incomplete_saves()
            for bad, _ in failures:
                moved = ckpt.set_aside(bad)
                _print(is_main, f"Moved the unreadable checkpoint {ckpt.directory}/{bad} to "
                                f"{moved} (kept for inspection; delete it when done).")
            return restored
        reason = _reason(error) if error is not None else "unreadable on another process"
        failures.append((step, reason))
        _print(is_main, f"WARNING: checkpoint {where} cannot be restored ({reason}). Trying the "
                        f"previous checkpoint.")
    listing = "\n  ".join(f"step {s}: {r}" for s, r in failures)
    raise checkpointing.CheckpointError(
        f"None of the {len(steps)} checkpoint(s) in {ckpt.directory} can be restored:\n  "
        f"{listing}\nNot starting from scratch over them. To train from scratch, move that "
        f"folder away or use a new --workdir; to keep the run, restore the folder from a backup."
    )


# Config keys that shape the train state; named when a workdir holds another model.
_STATE_KEYS = ("model.", "optim.name", "optim.accumulation_steps", "optim.ema_decay",
               "data.task", "data.release", "data.image_size")


def _raise_other_model(
    ckpt: checkpointing.Checkpointer,
    step: int,
    saved: dict[str, Any],
    expected: dict[str, Any],
    config_dict: dict[str, Any],
) -> None:
    """CheckpointError for a workdir whose checkpoints hold another model's state."""
    try:
        saved_config = ckpt.restore(step, None, with_rng=False).config or {}
    except Exception:  # noqa: BLE001 - the config item is only used to explain
        saved_config = {}
    changed = [line for line in config_utils.config_differences(saved_config, config_dict)
               if line.startswith(_STATE_KEYS)]
    lines = changed or checkpointing.signature_differences(saved, expected)
    raise checkpointing.CheckpointError(
        f"{ckpt.directory} holds checkpoints of another model (step {step}), which this config "
        f"cannot resume:\n  " + "\n  ".join(lines) + "\nUse a new --workdir for this config, "
        f"or resume with the config the run was started with ({ckpt.directory.parent}/"
        f"{config_utils.CONFIG_FILENAME}). Nothing in {ckpt.directory} was changed."
    )


def _topology_notes(
    restored: checkpointing.Restored, topology: dict[str, Any], config_dict: dict[str, Any]
) -> list[str]:
    """What changed in hardware since the checkpoint, and what it means for the data order."""
    notes = []
    old = restored.topology or {}
    if old and (old.get("processes"), old.get("devices")) != (
        topology["processes"], topology["devices"]
    ):
        notes.append(
            f"Written by {old.get('processes')} process(es) on {old.get('devices')} device(s), "
            f"resumed by {topology['processes']} on {topology['devices']}: the state is "
            f"re-placed on the current devices and every global batch is the same as before "
            f"(its split over devices changes, so results match up to float rounding)."
        )
    if restored.data_note:
        notes.append(restored.data_note[0].upper() + restored.data_note[1:] + ".")
    old_batch = ((restored.config or {}).get("train") or {}).get("batch_size")
    new_batch = config_dict["train"]["batch_size"]
    if old_batch is not None and old_batch != new_batch:
        notes.append(
            f"WARNING: train.batch_size changed ({old_batch} -> {new_batch}): the input state "
            f"counts global batches, so the stream resumes at example {restored.step} x "
            f"{new_batch} instead of {restored.step} x {old_batch}; examples are skipped or "
            f"repeated once."
        )
    return notes
