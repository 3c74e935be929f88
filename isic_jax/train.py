"""Train state, the pure train/eval steps, and the training loop.

    state = create_train_state(model, tx, rng, image_size, ema=True)
    step = functools.partial(train_step, model=model, tx=tx, loss_config=config.loss,
                             class_weights=weights, axis_name=par.axis_name, ema_decay=0.999)
    state, metrics = step(state, batch, rng)      # pure: pmap and jit wrap this same function

`train_and_evaluate(config, workdir)` is the loop behind `isic-jax train`: data parallel on every
device (parallel.py), batches prefetched to the devices, metrics pulled every `log_every` steps
(no host sync in between), evaluation every `eval_every` steps and at the end, asynchronous Orbax
checkpoints (checkpointing.py) every `checkpoint_every` steps, at every evaluation and at the
end, and resume from the latest checkpoint of the workdir.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from isic_jax import checkpointing, config_utils, logging_utils, parallel

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
    from isic_jax.models import init_variables

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

    from isic_jax.losses import compute_loss

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
        from isic_jax.optim import ema_update

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
    from isic_jax import device_augment

    return device_augment.DeviceAugmentConfig()


def augment_config(config: ml_collections.ConfigDict) -> Any:
    """The device half of config.data.augment (static, hashable)."""
    from isic_jax import device_augment

    return device_augment.DeviceAugmentConfig.from_config(config.data.augment)


def train_inputs(
    batch: dict[str, jax.Array], rng: jax.Array, augment: Any, axis_name: str | None
) -> jax.Array:
    """Model input float32 [B, H, W, 3] from a train batch (see `train_step`)."""
    images = batch["image"]
    if images.dtype != jnp.uint8:
        return images.astype(jnp.float32)
    from isic_jax import device_augment

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
        from isic_jax import device_augment

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
    anatom_site str [N] ("unknown" when missing). Empty arrays when not collected.
    """

    probs: np.ndarray
    labels: np.ndarray
    index: np.ndarray
    image_id: np.ndarray
    patient_id: np.ndarray
    sex: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0,), np.int32))
    age: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0,), np.int32))
    anatom_site: np.ndarray = dataclasses.field(
        default_factory=lambda: np.zeros((0,), object)
    )


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
    from isic_jax.metrics import classification_metrics

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


class InputData:
    """The run's data: sources from `input_pipeline.load_sources` and the Grain pipelines on them.

    Args:
      config: the resolved config.
      sources: (train_source, val_source, info) as `load_sources` returns them; opened from
        config.data when None (tests pass in-memory sources).
    """

    def __init__(self, config: ml_collections.ConfigDict, sources: tuple | None = None):
        from isic_jax import input_pipeline

        self._config = config
        if sources is None:
            sources = input_pipeline.load_sources(config.data)
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
        from isic_jax import input_pipeline

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
        return builder.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()})

    def eval_batches(self, split: str = "val") -> Iterable[dict[str, np.ndarray]]:
        """One padded pass over a split (mask False on padding)."""
        from isic_jax import input_pipeline

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
      last train scalars, "state": the final TrainState (one copy, on the devices)}.

    Raises:
      NonFiniteError: the loss or state became NaN/Inf; the latest checkpoint is the last good one.
      ValueError: a bad config value or a global batch that does not divide over the devices.
    """
    from isic_jax.losses import class_weights_for_config
    from isic_jax.models import create_model
    from isic_jax.optim import create_optimizer

    config_utils.validate_config(config)
    workdir = pathlib.Path(workdir).absolute()
    is_main = jax.process_index() == 0
    par = parallel.DataParallel.create(config.train.parallelism, devices)
    par.check_global_batch(int(config.train.batch_size), "config.train.batch_size")
    par.check_global_batch(int(config.eval.batch_size), "config.eval.batch_size")
    if is_main:
        workdir.mkdir(parents=True, exist_ok=True)

    data = data or InputData(config)
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
    writer = logging_utils.MetricWriter(workdir / "tensorboard", enabled=is_main)
    progress: logging_utils.Progress | None = None
    prefetcher: parallel.DevicePrefetcher | None = None
    stop_signal: list[int] = []
    previous_handler = _install_sigterm(stop_signal)
    train_iter = None
    try:
        train_iter = data.train_iterator()
        start_step = ckpt.latest_step() or 0
        if start_step:
            # The config first (cheap): a change that alters the state's structure (EMA on/off,
            # another model) then fails the restore below with the reason already printed.
            saved = ckpt.restore(start_step, None, with_rng=False).config or {}
            changed = config_utils.config_differences(saved, config_dict)
            message = f"Resuming from {ckpt.directory}/{start_step} ({start_step}/{total_steps})."
            if changed:
                message += " Config changed since that checkpoint:\n  " + "\n  ".join(changed)
            _print(is_main, message)
            target = checkpointing.abstract_target(jax.eval_shape(init_state), par.state_sharding())
            restored = ckpt.restore(
                start_step,
                target,
                data_iter=checkpointing.IteratorState(iterator=train_iter),
                with_config=False,
            )
            state = restored.state
            train_rng = jnp.asarray(restored.rng, jnp.uint32)
        else:
            state = init_state()
        if is_main:
            config_utils.save_config(config, workdir)

        state = par.replicate(state)
        rng = par.replicate(train_rng)
        p_train = par.compile_train_step(
            functools.partial(
                train_step,
                model=model,
                tx=tx,
                loss_config=config.loss,
                class_weights=class_weights,
                axis_name=par.axis_name,
                ema_decay=float(config.optim.ema_decay),
                augment=augment_config(config),
            )
        )
        p_eval = par.compile_eval_step(
            functools.partial(eval_step, model=model, augment=augment_config(config))
        )
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
            )
            last_saved = step

        step = start_step
        if start_step >= total_steps:
            _print(is_main, f"Nothing to do: {workdir} holds step {start_step}/{total_steps}.")
        for step in range(start_step + 1, total_steps + 1):
            item = next(prefetcher)
            state, metrics = p_train(state, item.device, rng)
            pending.metrics.append(metrics)
            progress.update(step)
            final = step == total_steps
            do_eval = step % int(config.train.eval_every) == 0 or final
            do_save = step % int(config.train.checkpoint_every) == 0 or final or do_eval
            interrupted = bool(stop_signal)
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
                _print(is_main, f"Stopped by signal {stop_signal[0]} after step {step}; "
                       f"checkpoint saved, rerun the same command to resume.")
                break
            if stop_after_step is not None and step >= stop_after_step:
                break
        return {
            "step": step,
            "val": last_val,
            "train": last_train,
            "state": par.unreplicate(state),
        }
    finally:
        if prefetcher is not None:
            prefetcher.close()
        _close(train_iter)  # stops Grain worker processes
        if progress is not None:
            progress.close()
        ckpt.close()  # waits for the asynchronous saves
        writer.close()
        _restore_sigterm(previous_handler)


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

    def default(o: Any) -> Any:
        if isinstance(o, np.ndarray):
            return o.tolist()
        if isinstance(o, (np.integer, np.floating)):
            return o.item()
        return str(o)

    return json.dumps(obj, default=default, sort_keys=True)


def _install_sigterm(flag: list[int]) -> Any:
    """SIGTERM (preemption) -> save a checkpoint after the current step and stop."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum: int, frame: Any) -> None:
        flag.append(signum)

    return signal.signal(signal.SIGTERM, handler)


def _restore_sigterm(previous: Any) -> None:
    import threading

    if previous is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, previous)
