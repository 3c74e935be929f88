"""The training loop behind `isic-jax train` (and `isic-jax pretrain`), in four named phases.

    result = train_and_evaluate(config, workdir)
    result = run(set_up(config, workdir, task=some_task))     # another task, the same loop

1. `set_up`: validate the config, pick the devices, open the data, build model and optimiser.
   Nothing is written before this succeeds (a missing dataset or a bad value stops here).
2. `resume.restore_or_init`: the newest readable checkpoint of the workdir onto these devices,
   or a fresh state.
3. `TrainLoop.run`: the steps. Metrics stay on the devices until every `log_every` steps;
   evaluation every `eval_every` steps and at the end (none for a final model on all folds,
   `data.val_fold = -1`); asynchronous Orbax checkpoints every `checkpoint_every` steps, at
   each evaluation and at the end; SIGTERM/SIGINT (checked every
   step on every process) -> finish the step, checkpoint it, stop with "stopped_by_signal".
4. finish: one ExitStack closes what phases 2-3 opened, in reverse: device prefetcher, progress,
   TensorBoard writer, Grain workers, the checkpointer (waiting for its saves), the signal guard.

What is trained is a `Task`: it builds the state, gives the pure step functions of
(state, batch, rng) that pmap and jit wrap alike, and evaluates. `SupervisedTask` (the default)
is the classifier of `isic-jax train`; `isic_jax.pretraining` defines the self-supervised one.
The phases, checkpoints, resume, preemption, logging and parallelism are the same for every task.

Data parallel on every device (parallel.py: pmap or jit over a Mesh). Several processes
(jax.distributed): each reads its slice of every global batch; process 0 alone prints and writes
config.json, TensorBoard events and eval_history.jsonl; every process takes part in the saves.
Data order after a resume: the input state counts global batches, so the same global batches
follow whatever the device or process count (only their split changes, hence float-rounding
differences); changing train.batch_size shifts the stream.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import pathlib
import signal
import time
from typing import Any

import flax
import jax
import ml_collections
import numpy as np
import optax

from isic_jax import config_utils, logging_utils
from isic_jax.data import metadata
from isic_jax.data.dataset import InputData
from isic_jax.logging_utils import say
from isic_jax.models import create_model, model_parts
from isic_jax.models.weight_mapping import Pretrained
from isic_jax.training import (
    checkpointing,
    events,
    init_from,
    integrity,
    parallel,
    preemption,
    resume,
    steps,
    swa,
    weight_sources,
)
from isic_jax.training.losses import class_weights_for_config
from isic_jax.training.optim import FineTune, create_optimizer
from isic_jax.training.predictions import predict_split, summarize
from isic_jax.training.state import TrainState, create_train_state, seed_keys
from isic_jax.utils import close_iterator, to_json_compatible

EVAL_HISTORY = "eval_history.jsonl"


class NonFiniteError(FloatingPointError):
    """The loss (or the state) became NaN/Inf; nothing from that point on was checkpointed."""


class WorkdirError(config_utils.ConfigError):
    """The workdir belongs to another kind of run (a pretraining workdir given to `train`, or
    a training workdir to `pretrain`); nothing in it was changed."""


def schedule_lengths(config: ml_collections.ConfigDict, num_train: int) -> tuple[int, int]:
    """(total micro-steps, micro-steps per epoch) for a train split of `num_train` examples."""
    batch = int(config.train.batch_size)
    steps_per_epoch = max(1, num_train // batch)
    if int(config.train.num_steps) > 0:
        return int(config.train.num_steps), steps_per_epoch
    return max(1, math.ceil(float(config.train.num_epochs) * steps_per_epoch)), steps_per_epoch


# ---------------------------------------------------------------------------------------------
# What a run trains: the task.


class Task:
    """What the loop trains and how it checks it (an interface; `SupervisedTask` is the default).

    A task builds the step-0 state (a pytree the checkpointer saves as is), the pure
    `train_step(state, batch, rng) -> (state, metrics)` and `eval_step(state, batch) -> per-
    example outputs` that `parallel.DataParallel` compiles under pmap or jit alike, and the
    evaluation hook run every `train.eval_every` steps. Metrics of a train step are float32
    scalars with at least "loss" (checked for NaN/Inf); all of them are logged.
    """

    command = "train"  # the isic-jax command that runs it, for messages
    verb = "Training"
    # Validation metrics shown on the console (all scalars go to TensorBoard).
    shown_metrics: tuple[str, ...] = ()

    def check(self, config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
        """Before anything is opened or written: raises ConfigError (WorkdirError for a
        workdir of another kind of run) on what this task cannot run."""

    def check_setup(self, setup: Setup) -> None:
        """Once devices and data are known, before the workdir is written to."""

    def init_state(self, setup: Setup, abstract: bool = False) -> Any:
        """The step-0 state (`abstract`: under `jax.eval_shape`, without reading weights)."""
        raise NotImplementedError

    def train_step(self, setup: Setup) -> Any:
        """The pure step function of (state, batch, rng) -> (state, metrics), uncompiled."""
        raise NotImplementedError

    def eval_step(self, setup: Setup) -> Any:
        """The pure function of (state, batch) -> per-example outputs, uncompiled."""
        raise NotImplementedError

    def evaluates(self, setup: Setup) -> bool:
        """Whether the run evaluates (`train`: when it has a validation fold)."""
        return setup.data.has_val

    def evaluate(self, loop: TrainLoop, step: int) -> dict[str, Any]:
        """Validation metrics of the loop's current state (JSON-ready; scalars are logged)."""
        raise NotImplementedError

    def on_start(self, setup: Setup, start: resume.Start) -> None:
        """Process 0, once the checkpoints proved usable, before config.json is written: the
        task's own records in the workdir."""

    def begin(self, loop: TrainLoop) -> None:
        """Before the first step of this process's run (after restore or init)."""

    def finish(self, loop: TrainLoop, result: dict[str, Any]) -> dict[str, Any]:
        """After the last step (or a stop): the result `run` returns."""
        return result


class SupervisedTask(Task):
    """`isic-jax train`: the classifier (`steps.train_step`, `steps.eval_step`), validated by its
    metrics on the validation fold (`predictions.summarize`)."""

    shown_metrics = ("loss", "auc", "pauc_80", "balanced_accuracy", "sensitivity",
                     "specificity")

    def check(self, config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
        marker = workdir / weight_sources.PRETRAIN_RECORD_FILE
        if marker.is_file():
            raise WorkdirError(
                f"{workdir} is a pretraining workdir ({marker.name}): resume it with "
                f"`isic-jax pretrain --workdir {workdir}`, or start from its backbone with "
                f"--config.model.init_from={workdir} and a new --workdir. Nothing in it was "
                f"changed.")

    def init_state(self, setup: Setup, abstract: bool = False) -> TrainState:
        pre = setup.pretrained
        variables = None if abstract or pre is None else pre.variables
        return create_train_state(setup.model, setup.tx, setup.init_rng,
                                  int(setup.config.data.image_size),
                                  use_ema=float(setup.config.optim.ema_decay) > 0,
                                  variables=variables, use_swa=setup.swa is not None)

    def train_step(self, setup: Setup) -> Any:
        config = setup.config
        return functools.partial(
            steps.train_step, model=setup.model, tx=setup.tx, loss_config=config.loss,
            class_weights=setup.class_weights, axis_name=setup.par.axis_name,
            ema_decay=float(config.optim.ema_decay), augment=steps.augment_config(config),
            frozen_parts=setup.frozen_parts, swa=setup.swa,
        )

    def eval_step(self, setup: Setup) -> Any:
        return functools.partial(steps.eval_step, model=setup.model,
                                 augment=steps.augment_config(setup.config))

    def evaluate(self, loop: TrainLoop, step: int) -> dict[str, Any]:
        setup = loop.setup
        preds = predict_split(loop.p_eval, loop.state, setup.data.eval_batches("val"), setup.par,
                              prefetch=max(1, int(setup.config.data.device_prefetch)))
        return summarize(preds, setup.data.class_names, setup.data.malignant_classes,
                         float(setup.config.eval.threshold))


# ---------------------------------------------------------------------------------------------
# Phase 1: set up.


@dataclasses.dataclass(frozen=True)
class Setup:
    """What a run is made of, before any state exists (phase 1's result)."""

    config: ml_collections.ConfigDict
    workdir: pathlib.Path
    par: parallel.DataParallel
    data: InputData
    model: flax.linen.Module
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    total_steps: int
    steps_per_epoch: int
    class_weights: np.ndarray | None
    init_rng: jax.Array
    train_rng: jax.Array
    config_dict: dict[str, Any]
    is_main: bool
    # Pretrained weights of a fresh run (config.model.init_from); None from scratch or resuming.
    pretrained: Pretrained | None = None
    frozen_parts: tuple[str, ...] = ()  # config.finetune.freeze_stages: parts that do not train
    swa: swa.SwaSchedule | None = None  # config.optim.swa_*: weight averaging (None: off)
    task: Task = dataclasses.field(default_factory=SupervisedTask)  # what is trained

    @property
    def topology(self) -> dict[str, Any]:
        """Where the run is, as recorded with each checkpoint."""
        return {"processes": jax.process_count(), "devices": self.par.num_devices,
                "parallelism": self.par.mode}

    def init_state(self, abstract: bool = False) -> Any:
        """The step-0 state (the task's: a TrainState for `train`): from the pretrained weights
        when the run has them, else random. `abstract`: built for `jax.eval_shape` (the same
        shapes, without reading weights)."""
        return self.task.init_state(self, abstract)

    def abstract_state(self) -> Any:
        """The state's shapes and dtypes, without allocating (restore target)."""
        return jax.eval_shape(functools.partial(self.init_state, abstract=True))


def set_up(
    config: ml_collections.ConfigDict,
    workdir: str | pathlib.Path,
    *,
    devices: list[jax.Device] | None = None,
    data: InputData | None = None,
    task: Task | None = None,
) -> Setup:
    """Phase 1: checks and builds everything that does not depend on the workdir's contents.

    Args:
      config: a resolved config (configs/default.py schema); validated first.
      workdir: run folder (created here, once the data is known to exist).
      devices: devices to use (default: all).
      data: the run's data (default: `InputData(config)`, opened from config.data).
      task: what is trained (default: `SupervisedTask`, the classifier of `isic-jax train`).

    Raises:
      config_utils.ConfigError: a bad config value (WorkdirError: the workdir is another kind
        of run's); ValueError: a global batch that does not
        divide over the devices; dataset.DataNotFoundError: the dataset is not prepared;
      models.PretrainedError: config.model.init_from cannot be read or does not fit the model.
    """
    config_utils.validate_config(config)
    workdir = pathlib.Path(workdir).absolute()
    task = task or SupervisedTask()
    task.check(config, workdir)
    is_main = jax.process_index() == 0
    par = parallel.DataParallel.create(config.train.parallelism, devices)
    par.check_global_batch(int(config.train.batch_size), "config.train.batch_size")
    par.check_global_batch(int(config.eval.batch_size), "config.eval.batch_size")
    # A missing dataset fails here, before the workdir is made. A resumed run keeps the metadata
    # encoder it saved (InputData.for_run); a fresh one fits it on the training split.
    data = data or InputData.for_run(config, workdir)
    finetune = FineTune.from_config(config.get("finetune"))
    stages = model_parts(config.model)
    try:
        frozen = finetune.frozen_parts(stages)
    except ValueError as e:
        raise config_utils.ConfigError(str(e)) from e
    total_steps, steps_per_epoch = schedule_lengths(config, data.num_train)
    averaging = swa.SwaSchedule.from_config(config.optim, total_steps, steps_per_epoch)
    k = int(config.optim.accumulation_steps)
    tx, schedule = create_optimizer(
        config.optim, total_steps=max(1, total_steps // k),
        steps_per_epoch=max(1, steps_per_epoch // k),
        finetune_config=config.get("finetune"), parts=stages,
    )
    init_rng, train_rng = seed_keys(config.seed)
    # Pretrained weights (fresh runs) are read and checked here, before the workdir is made;
    # the returned config holds the resolved input normalisation.
    config, pre, notes = init_from.resolve(config, workdir, data.num_classes, data.class_names,
                                           init_rng)
    model = create_model(config.model, data.num_classes, axis_name=par.axis_name,
                         frozen_bn=finetune.frozen_bn_parts(stages), metadata=data.metadata)
    setup = Setup(
        config=config, workdir=workdir, par=par, data=data, model=model,
        tx=tx, schedule=schedule, total_steps=total_steps, steps_per_epoch=steps_per_epoch,
        class_weights=class_weights_for_config(config.loss, data.train_class_counts),
        init_rng=init_rng, train_rng=train_rng,
        config_dict=config_utils.config_to_dict(config), is_main=is_main,
        pretrained=pre, frozen_parts=frozen, swa=averaging, task=task,
    )
    task.check_setup(setup)
    for note in notes:
        say(is_main, note)
    if is_main:
        workdir.mkdir(parents=True, exist_ok=True)
    return setup


# ---------------------------------------------------------------------------------------------
# The whole loop.


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path
                       ) -> dict[str, Any]:
    """Trains (resuming from the newest readable checkpoint in `workdir`), evaluates, saves.

    Returns:
      {"step": last step, "val": last validation metrics (None if no evaluation ran), "train":
      last train scalars, "state": the final TrainState (one copy, on the devices),
      "stopped_by_signal": True when SIGTERM/SIGINT (on any process) stopped the run early after
      saving a checkpoint (`isic-jax train` then exits with preemption.EXIT_PREEMPTED)}.

    Raises:
      NonFiniteError: the loss or state became NaN/Inf; the latest checkpoint is the last good one.
      config_utils.ConfigError / ValueError / dataset.DataNotFoundError: from `set_up`.
      checkpointing.CheckpointError: the workdir holds another model's checkpoints, or none of
        its checkpoints can be restored (nothing in it is changed in either case).
    """
    return run(set_up(config, workdir))


def run(setup: Setup, until: int | None = None) -> dict[str, Any]:
    """Phases 2-4 on a `set_up` result; `until` ends the steps after that one (as a kill would:
    nothing more is saved)."""
    config = setup.config
    with contextlib.ExitStack() as stack:  # phase 4: closes all of this, in reverse
        ckpt = stack.enter_context(checkpointing.open_checkpointer(setup.workdir, config))
        guard = stack.enter_context(
            preemption.PreemptionGuard(sync_every=int(config.train.log_every)))
        train_iter = setup.data.train_iterator()
        stack.callback(close_iterator, train_iter)  # stops Grain worker processes
        start = resume.restore_or_init(setup, ckpt, train_iter)
        # Written only once the checkpoints proved usable: a refused workdir stays as it was.
        if setup.is_main:
            setup.task.on_start(setup, start)
            config_utils.save_config(config, setup.workdir)
            if start.step == 0 and setup.pretrained is not None:
                init_from.write_record(setup.workdir, setup.pretrained)
            if setup.data.metadata is not None:  # what evaluate, export and predict encode with
                metadata.save_encoder(setup.data.metadata, setup.workdir)
        loop = TrainLoop(setup, ckpt, start, train_iter, stack)
        return loop.run(guard, until)


# ---------------------------------------------------------------------------------------------
# Phase 3: the steps.


@dataclasses.dataclass
class _Pending:
    """Device metrics of the steps since the last pull (no host sync until `log_every`)."""

    first_step: int = 0
    metrics: list = dataclasses.field(default_factory=list)
    t_start: float = 0.0


class TrainLoop:
    """The steps from `start` to the end of the schedule (or a signal), with their metric pulls,
    evaluations and checkpoints. Opens its writer, progress and prefetcher on `stack`."""

    def __init__(self, setup: Setup, ckpt: checkpointing.Checkpointer, start: resume.Start,
                 train_iter: Any, stack: contextlib.ExitStack):
        self.setup, self.ckpt = setup, ckpt
        config, par = setup.config, setup.par
        self.start_step = self.last_saved = start.step
        self.resumed = start.restored  # the checkpoint resumed from (None: a fresh state)
        self.base_rng = start.rng  # what each checkpoint stores
        self.state = par.replicate(start.state)
        # The key's bits travel as host numpy (a device-committed key cannot be placed on
        # another process's devices), then become a typed key again on every device.
        self.rng = jax.random.wrap_key_data(par.replicate(checkpointing.key_bits(start.rng)))
        self.task = setup.task
        self.evaluates = self.task.evaluates(setup)
        self.p_train = par.compile_train_step(self.task.train_step(setup))
        # SWA (`train` only): BatchNorm statistics of the averaged weights, before evaluations
        # and saves.
        self.swa_bn = None
        if setup.swa is not None and setup.swa.bn_batches > 0:
            self.swa_bn = swa.BatchNormRecompute(setup.model, par, steps.augment_config(config),
                                                 setup.data, self.rng, setup.swa.bn_batches)
        self.p_eval = par.compile_eval_step(self.task.eval_step(setup))
        self.writer = logging_utils.MetricWriter(setup.workdir / "tensorboard",
                                                 enabled=setup.is_main)
        stack.callback(self.writer.close)
        say(setup.is_main,
            f"{self.task.verb} {config.model.name} on {par.num_devices} "
            f"{jax.devices()[0].platform} device(s) ({par.mode}), global batch "
            f"{config.train.batch_size}, "
            f"{setup.total_steps} steps ({setup.steps_per_epoch} per epoch, "
            f"{setup.data.num_train} train examples), workdir {setup.workdir}")
        self.progress = logging_utils.Progress(
            setup.total_steps, initial=start.step, enabled=setup.is_main,
            bar=logging_utils.use_progress_bar(bool(config.train.progress)),
        )
        stack.callback(self.progress.close)
        self.prefetcher = stack.enter_context(parallel.DevicePrefetcher(
            train_iter, lambda b: par.shard_batch(steps.device_batch(b, steps.TRAIN_KEYS)),
            size=int(config.data.device_prefetch), get_state=checkpointing.iterator_state,
        ))
        self.last_val: dict[str, Any] | None = None
        self.last_train: dict[str, float] = {}
        self.pending = _Pending(first_step=start.step + 1, t_start=time.perf_counter())

    def run(self, guard: preemption.PreemptionGuard, until: int | None = None) -> dict[str, Any]:
        train = self.setup.config.train
        total = self.setup.total_steps
        step, interrupted = self.start_step, False
        if step >= total:
            say(self.setup.is_main,
                f"Nothing to do: {self.setup.workdir} holds step {step}/{total}.")
        self.task.begin(self)
        for step in range(self.start_step + 1, total + 1):
            item = next(self.prefetcher)
            self.state, metrics = self.p_train(self.state, item.device, self.rng)
            self.pending.metrics.append(metrics)
            self.progress.update(step)
            events.notify("after_step", step, self.ckpt.wait_until_finished)
            final = step == total
            do_eval = self.evaluates and (step % int(train.eval_every) == 0 or final)
            do_save = step % int(train.checkpoint_every) == 0 or final or do_eval
            # Every step, every process: the processes agree on the step to stop after.
            interrupted = guard.should_stop(step) and not final
            if step % int(train.log_every) == 0 or final or do_save or interrupted:
                self.pull_metrics(step)
            if self.swa_bn is not None and (do_eval or do_save):
                self.state = self.swa_bn(self.state)
            val = self.evaluate(step) if do_eval else None
            if do_save or interrupted:
                self.save(step, item, val)
            if do_eval or do_save:
                self.pending.t_start = time.perf_counter()  # eval/save time is not step time
            if interrupted:
                cause = (f"signal {signal_name(guard.signal_received)}"
                         if guard.signal_received else "a stop signal to one of the processes")
                say(self.setup.is_main, f"Stopped by {cause} after step {step}; checkpoint "
                    f"saved, rerun the same command to resume.")
                break
            if until is not None and step >= until:
                break
        return self.task.finish(self, {
            "step": step, "total_steps": total, "val": self.last_val, "train": self.last_train,
            "state": self.setup.par.unreplicate(self.state), "stopped_by_signal": interrupted})

    def pull_metrics(self, step: int) -> None:
        """Host sync: fetch the pending metrics, check them, log their means."""
        pending = self.pending
        if not pending.metrics:
            return
        values = jax.device_get(pending.metrics)
        elapsed = time.perf_counter() - pending.t_start
        rows = [{k: float(np.asarray(v).reshape(-1)[0]) for k, v in m.items()} for m in values]
        for i, row in enumerate(rows):
            if not math.isfinite(row["loss"]):
                raise NonFiniteError(self.non_finite_message(pending.first_step + i, row["loss"]))
        means = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
        update = (step - 1) // int(self.setup.config.optim.accumulation_steps)
        n, batch = len(rows), int(self.setup.config.train.batch_size)
        scalars = {
            **means,  # the task's step metrics ("loss", "accuracy", "grad_norm" for `train`)
            "learning_rate": float(self.setup.schedule(update)),
            "images_per_sec": n * batch / max(elapsed, 1e-9),
            "step_time": elapsed / n,
        }
        self.last_train = scalars
        self.writer.write_scalars(step, {f"train/{k}": v for k, v in scalars.items()})
        self.progress.log(step, {
            "loss": scalars["loss"],
            "lr": scalars["learning_rate"],
            "img/s": f"{scalars['images_per_sec']:.1f}",
            "s/step": f"{scalars['step_time']:.4f}",
        })
        pending.metrics.clear()
        pending.first_step = step + 1
        pending.t_start = time.perf_counter()

    def non_finite_message(self, step: int, loss: float) -> str:
        """What a non-finite loss at `step` means. Right after a resume (no checkpoint written
        since), the checkpoint resumed from is the first suspect: say what is known of it."""
        resumed = self.resumed
        if resumed is None or self.last_saved != resumed.step:
            return (f"Non-finite training loss ({loss}) at step {step}: stopping. Nothing after "
                    f"step {self.last_saved} was checkpointed; the latest checkpoint (step "
                    f"{self.ckpt.latest_step()}) is the last good one. Lower "
                    f"config.optim.learning_rate or check the data.")
        before = (f"its training loss was finite when it was saved ({resumed.train_loss:.4g})"
                  if resumed.train_loss is not None else
                  "its parameters were finite when it was saved")
        checked = {
            integrity.VERIFIED: ", and what was restored matched the checksums saved with it",
            integrity.ABSENT: "; it has no checksums (written by an earlier isic_jax), so its "
                              "content could not be verified at restore",
        }.get(resumed.checksums, "")
        return (f"Non-finite training loss ({loss}) at step {step}, {step - resumed.step} "
                f"step(s) after resuming from checkpoint {self.ckpt.directory}/{resumed.step}: "
                f"{before}{checked}. Nothing after step {resumed.step} was checkpointed. Run "
                f"`isic-jax verify --workdir {self.setup.workdir}` to check the run's "
                f"checkpoints; if they are intact, lower config.optim.learning_rate or check "
                f"the data.")

    def evaluate(self, step: int) -> dict[str, Any]:
        """Validation metrics of the current state (the task's): TensorBoard, console,
        eval_history.jsonl."""
        setup = self.setup
        result = self.task.evaluate(self, step)
        scalars = {k: v for k, v in result.items() if checkpointing.is_scalar(v)}
        self.writer.write_scalars(step, {f"val/{k}": v for k, v in scalars.items()})
        shown = {k: scalars[k] for k in self.task.shown_metrics if k in scalars}
        self.progress.log(step, shown, prefix="val")
        self.last_val = result
        if setup.is_main:
            with open(setup.workdir / EVAL_HISTORY, "a") as f:
                f.write(json.dumps(to_json_compatible({"step": step, **result}),
                                   sort_keys=True) + "\n")
        return result

    def save(self, step: int, item: parallel.PrefetchedBatch, metrics: dict | None) -> None:
        """Starts an asynchronous checkpoint of this step (never of a non-finite state)."""
        single = self.setup.par.unreplicate(self.state)
        if not bool(steps.tree_all_finite(single)):
            raise NonFiniteError(
                f"Non-finite parameters at step {step}: stopping without saving. The latest "
                f"checkpoint (step {self.ckpt.latest_step()}) is the last good one."
            )
        # Orbax copies device arrays to the host before save() returns (its default,
        # synchronous D2H transfer), so the next step may donate these buffers.
        self.ckpt.save(
            step, single, rng=self.base_rng,
            data_iter=checkpointing.IteratorState(item.iterator_state),
            config=self.setup.config_dict, metrics=metrics, topology=self.setup.topology,
            train_loss=self.last_train.get("loss"),
        )
        self.last_saved = step


def signal_name(signum: int | None) -> str:
    """"SIGTERM" for 15, etc."""
    try:
        return signal.Signals(int(signum)).name
    except (TypeError, ValueError):
        return str(signum)
