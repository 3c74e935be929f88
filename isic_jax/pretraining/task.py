"""`isic-jax pretrain`: BYOL as a task of the training loop (training/loop.py).

    result = pretrain(config, workdir)            # config: a preset with config.pretrain
    setup = set_up(config, workdir, devices=..., data=...)   # tests: injected devices/data
    result = loop.run(setup)

The loop, its phases, checkpoints (Orbax, asynchronous, exact resume with the data position),
preemption, jit/pmap, multi-host, TensorBoard and progress display are `train`'s; `ByolTask`
gives the state (`byol.PretrainState`), the pure step (`byol.train_step`), the embedding step
and the evaluation hook: the k-NN probe (`probe.py`) on the labelled held-out fold, run once at
step 0 (the random-init baseline, or the init_from weights') and at each evaluation.

The workdir holds what a `train` workdir holds (config.json, checkpoints/, tensorboard/,
eval_history.jsonl, init_from.json when started from weights) and `pretrain.json`, the marker
that makes it a weight source for `--config.model.init_from` (training/weight_sources.py) and
that `train` refuses as its own workdir. Its probe results are filled in at the end.
"""

from __future__ import annotations

import functools
import hashlib
import json
import pathlib
from typing import Any

import jax
import ml_collections
import numpy as np

from isic_jax import config_utils
from isic_jax.data import image_ops
from isic_jax.data.dataset import InputData
from isic_jax.logging_utils import say
from isic_jax.pretraining import byol, probe
from isic_jax.pretraining import views as views_lib
from isic_jax.training import checkpointing, init_from, loop, steps, weight_sources
from isic_jax.training.optim import FineTune
from isic_jax.utils import to_json_compatible

RECORD_FILE = weight_sources.PRETRAIN_RECORD_FILE
DUPLICATE_SAMPLE = 512  # records whose images are hashed to catch an all-duplicate dataset


class PretrainDataError(ValueError):
    """The data cannot be pretrained on (empty, or every image the same); nothing was written."""


def pretrain(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, Any]:
    """Pretrains (resuming from the newest readable checkpoint in `workdir`).

    Returns:
      `loop.run`'s result ("step", "val": the last probe, "train", "state": the final
      `byol.PretrainState`, "stopped_by_signal") and "probe": {"knn_auc", "knn_auc_initial",
      ...} (None without a labelled fold to probe).

    Raises:
      config_utils.ConfigError (loop.WorkdirError: a training workdir), PretrainDataError,
      dataset.DataNotFoundError, checkpointing.CheckpointError, models.PretrainedError,
      loop.NonFiniteError: as `loop.train_and_evaluate`.
    """
    return loop.run(set_up(config, workdir))


def set_up(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
           devices: list[jax.Device] | None = None, data: InputData | None = None
           ) -> loop.Setup:
    """`loop.set_up` with the pretraining task (checks first; nothing written on failure)."""
    return loop.set_up(config, workdir, devices=devices, data=data, task=ByolTask())


def probe_splits(config: ml_collections.ConfigDict) -> tuple[str, str] | None:
    """(memory bank split, query split) of the k-NN probe: ("train", "val") with a held-out
    fold; with data.val_fold = -1, pretrain.probe_fold k as the queries and the other folds as
    the bank (the backbone saw their images, without labels); None when there is no probe."""
    if int(config.data.val_fold) >= 0:
        return "train", "val"
    k = int(config.pretrain.get("probe_fold", -1))
    if k < 0:
        return None
    from isic_jax.data import dataset

    folds = dataset.prepared_num_folds(config.data)
    if k >= folds:
        raise config_utils.ConfigError(
            f"config.pretrain.probe_fold={k} must be < the dataset's {folds} folds.")
    return "+".join(f"fold{i}" for i in range(folds) if i != k), f"fold{k}"


class ByolTask(loop.Task):
    """BYOL (`byol.py`) in the training loop; see the module docstring."""

    command = "pretrain"
    verb = "Pretraining (BYOL)"
    shown_metrics = ("knn_auc", "knn_auc_initial", "knn_balanced_accuracy")

    # --- checks ------------------------------------------------------------------------------

    def check(self, config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
        if "pretrain" not in config:
            raise config_utils.ConfigError(
                "this config has no config.pretrain section: use a pretraining preset "
                "(--config=pretrain_byol, --config=pretrain_cpu_sample) or add its keys "
                "(configs/pretrain_byol.py: pretrain_section()).")
        if str(config.model.get("metadata", "") or ""):
            raise config_utils.ConfigError(
                "config.model.metadata must be empty for pretraining: the backbone sees images "
                "only (the metadata branch belongs to the fine-tuned classifier).")
        if bool(config.data.balanced_sampling):
            raise config_utils.ConfigError(
                "config.data.balanced_sampling must be False for pretraining: it would sample by "
                "the labels, which self-supervision does not read.")
        if float(config.optim.ema_decay) > 0:
            raise config_utils.ConfigError(
                "config.optim.ema_decay must be 0 for pretraining: BYOL's target network is "
                "the moving average (config.pretrain.target_decay).")
        if float(config.optim.get("swa_start_epoch", -1.0)) >= 0:
            raise config_utils.ConfigError(
                "config.optim.swa_start_epoch must be < 0 (off) for pretraining: weight "
                "averaging belongs to the fine-tuned classifier.")
        if FineTune.from_config(config.get("finetune")) != FineTune():
            raise config_utils.ConfigError(
                "config.finetune.* must keep their defaults for pretraining (they shape the "
                "fine-tuning of a classifier's head and stages).")
        _check_workdir(workdir)

    def check_setup(self, setup: loop.Setup) -> None:
        per_device = int(setup.config.train.batch_size) // setup.par.num_devices
        if per_device < 2:
            raise config_utils.ConfigError(
                f"config.train.batch_size={setup.config.train.batch_size} gives "
                f"{per_device} example(s) per device on {setup.par.num_devices} device(s): "
                f"BYOL's BatchNorm (backbone, projector, predictor) needs at least 2 per "
                f"device; use a batch of at least {2 * setup.par.num_devices}.")
        _check_images(setup.data, setup.config)
        probe_splits(setup.config)  # a bad probe fold fails here

    # --- the state and the steps -------------------------------------------------------------

    @staticmethod
    def networks(setup: loop.Setup) -> byol.Networks:
        p = setup.config.pretrain
        return byol.Networks.create(setup.model, projector_hidden=int(p.projector_hidden),
                                    projection_dim=int(p.projection_dim),
                                    predictor_hidden=int(p.predictor_hidden))

    def init_state(self, setup: loop.Setup, abstract: bool = False) -> byol.PretrainState:
        pre = setup.pretrained
        backbone = None if abstract or pre is None else pre.variables
        return byol.create_state(self.networks(setup), setup.tx, setup.init_rng,
                                 int(setup.config.data.image_size), backbone=backbone)

    def train_step(self, setup: loop.Setup) -> Any:
        config = setup.config
        k = int(config.optim.accumulation_steps)
        mean, std = image_ops.normalization(config.data)
        return functools.partial(
            byol.train_step, nets=self.networks(setup), tx=setup.tx,
            views=views_lib.ViewConfig.from_config(config.pretrain.views, mean, std),
            axis_name=setup.par.axis_name, base_decay=float(config.pretrain.target_decay),
            total_updates=max(1, setup.total_steps // k), accumulation_steps=k)

    def eval_step(self, setup: loop.Setup) -> Any:
        return functools.partial(byol.embed_step, nets=self.networks(setup),
                                 augment=steps.augment_config(setup.config))

    # --- the probe ---------------------------------------------------------------------------

    def evaluates(self, setup: loop.Setup) -> bool:
        return probe_splits(setup.config) is not None

    def _probe(self, loop_: loop.TrainLoop) -> dict[str, Any]:
        setup = loop_.setup
        bank_split, query_split = probe_splits(setup.config)  # type: ignore[misc]
        prefetch = max(1, int(setup.config.data.device_prefetch))
        bank = probe.embed(loop_.p_eval, loop_.state, setup.data.eval_batches(bank_split),
                           setup.par, prefetch)
        queries = probe.embed(loop_.p_eval, loop_.state, setup.data.eval_batches(query_split),
                              setup.par, prefetch)
        p = setup.config.pretrain
        return probe.knn_metrics(bank, queries, class_names=setup.data.class_names,
                                 malignant_classes=setup.data.malignant_classes,
                                 k=int(p.probe_k), temperature=float(p.probe_temperature))

    def begin(self, loop_: loop.TrainLoop) -> None:
        """The step-0 probe (random init, or the init_from weights) of a fresh run; a resumed
        run reads it from pretrain.json."""
        self.initial: dict[str, Any] | None = None
        setup = loop_.setup
        if not self.evaluates(setup):
            return
        if loop_.start_step > 0:
            record = _read_record(setup.workdir) or {}
            self.initial = record.get("initial_probe")
            return
        self.initial = self._probe(loop_)
        what = "the init_from weights" if setup.pretrained is not None else "random init"
        say(setup.is_main, f"k-NN probe at step 0 ({what}): AUC "
                           f"{_fmt(self.initial.get('knn_auc'))} on {self.initial['knn_queries']} "
                           f"held-out images ({self.initial['knn_bank']} in the memory bank).")
        loop_.writer.write_scalars(0, {f"val/{k}": v for k, v in self.initial.items()
                                       if checkpointing.is_scalar(v)})
        if setup.is_main:
            _update_record(setup.workdir, initial_probe=self.initial)

    def evaluate(self, loop_: loop.TrainLoop, step: int) -> dict[str, Any]:
        result = self._probe(loop_)
        initial = getattr(self, "initial", None) or {}
        result["knn_auc_initial"] = initial.get("knn_auc")
        return result

    # --- records -----------------------------------------------------------------------------

    def on_start(self, setup: loop.Setup, start: Any) -> None:
        if start.step > 0 and (setup.workdir / RECORD_FILE).is_file():
            return
        config = setup.config
        splits = probe_splits(config) if self.evaluates(setup) else None
        _update_record(
            setup.workdir, kind="pretrain", method="byol", paper=byol.PAPER,
            weights="online", dropped_modules=list(weight_sources.PRETRAIN_MODULES),
            backbone={"name": str(config.model.name),
                      "width": int(config.model.get("width", 64))},
            release=str(config.data.release), held_out_fold=int(config.data.val_fold),
            images=int(setup.data.num_train),
            probe_splits={"bank": splits[0], "queries": splits[1]} if splits else None,
        )

    def finish(self, loop_: loop.TrainLoop, result: dict[str, Any]) -> dict[str, Any]:
        setup = loop_.setup
        initial = getattr(self, "initial", None) or {}
        last = loop_.last_val
        summary = None
        if last is not None or initial:
            summary = {"step": result["step"] if last is not None else 0,
                       "knn_auc": (last or initial).get("knn_auc"),
                       "knn_auc_initial": initial.get("knn_auc"),
                       "knn_balanced_accuracy": (last or initial).get("knn_balanced_accuracy")}
        result["probe"] = summary
        if setup.is_main:
            if last is not None:
                _update_record(setup.workdir, probe=summary, step=result["step"])
            done = "stopped" if result["stopped_by_signal"] else "done"
            text = f"Pretraining {done} at step {result['step']}/{result['total_steps']}."
            if summary is not None:
                text += (f" k-NN probe AUC {_fmt(summary['knn_auc'])} (step 0: "
                         f"{_fmt(summary['knn_auc_initial'])}).")
            if result["stopped_by_signal"]:
                text += " Rerun the same command to resume."
            else:
                text += (f" Fine-tune it with --config.model.init_from={setup.workdir} "
                         f"(the online backbone; docs/pretraining.md).")
            say(True, text)
        return result


# ---------------------------------------------------------------------------------------------
# Checks and the record.


def _check_workdir(workdir: pathlib.Path) -> None:
    """A training workdir (config.json or checkpoints without pretrain.json) is refused."""
    if (workdir / RECORD_FILE).is_file():
        return
    has_config = (workdir / config_utils.CONFIG_FILENAME).is_file()
    if has_config or init_from.has_checkpoints(workdir):
        raise loop.WorkdirError(
            f"{workdir} holds a training run (config.json / checkpoints/, no {RECORD_FILE}): "
            f"pretrain into a new --workdir. Nothing in it was changed.")


def _check_images(data: InputData, config: ml_collections.ConfigDict) -> None:
    """An empty training split, or one whose images are all the same (hashed over up to
    DUPLICATE_SAMPLE records), cannot be pretrained on."""
    n = int(data.num_train)
    where = (f"config.data.release={config.data.release} (data_dir {config.data.data_dir}, "
             f"val_fold {config.data.val_fold})")
    if n == 0:
        raise PretrainDataError(f"{where}: the training split holds no image to pretrain on.")
    source = data.train_source
    picks = np.unique(np.linspace(0, n - 1, min(n, DUPLICATE_SAMPLE)).astype(np.int64))
    digests = {hashlib.sha1(bytes(source[int(i)]["image"])).digest() for i in picks}
    if len(digests) < 2:
        raise PretrainDataError(
            f"{where}: the training split holds {n} image(s), all the same: BYOL learns what "
            f"two views of different images do not share, so it needs different images.")


def _read_record(workdir: pathlib.Path) -> dict[str, Any] | None:
    try:
        return weight_sources.read_pretrain_record(workdir)
    except Exception:  # noqa: BLE001 - an unreadable record is rewritten
        return None


def _update_record(workdir: pathlib.Path, **values: Any) -> pathlib.Path:
    """Merges `values` into workdir/pretrain.json (atomically)."""
    record = _read_record(workdir) or {}
    record.update(to_json_compatible(values))
    path = workdir / RECORD_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{float(value):.3f}"
