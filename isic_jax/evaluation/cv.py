"""Cross-validation: one run per fold (and seed), out-of-fold predictions, the CV summary.

    result = run_cv(config, "runs/cv", folds=None, seeds=None)   # trains the missing folds
    summary = summarize_cv("runs/cv", checkpoint="last")          # any time

Layout of a cv workdir W (each member is an ordinary `isic-jax train` workdir):

    W/cv.json                 the shared config (without data.val_fold and seed) and fold count
    W/fold_<k>/               member trained with data.val_fold = k and config.seed
    W/fold_<k>_seed_<s>/      with `--seeds`: one member per fold and seed
    W/<member>/cv_member.json written when the member's schedule is complete
    W/oof_predictions.csv     every example once, scored by the members that did not train on it
    W/cv_metrics.json         per member, mean and std over members, pooled out-of-fold

A member resumes exactly as `train` does; a complete one is skipped. Members run one after the
other in this process (on all its devices, and on every process of a multi-host job); separate
machines can each run some folds (`--folds k`) into the same shared workdir.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from isic_jax import config_utils
from isic_jax.data import dataset
from isic_jax.evaluation import analysis, evaluate
from isic_jax.logging_utils import say
from isic_jax.training import loop, parallel, predictions
from isic_jax.utils import to_json_compatible, write_csv

MANIFEST = "cv.json"
MEMBER_DONE = "cv_member.json"
OOF_FILE = "oof_predictions.csv"
METRICS_FILE = "cv_metrics.json"
FORMAT = "isic_jax.cv"
# Keys that `train` resolves when left empty (training/init_from.py), so a member's saved config
# may hold a value where cv.json has none.
RESOLVED_KEYS = ("data.mean:", "data.std:")
# What the summary reports per member and pools out of fold.
SUMMARY_METRICS = ("auc", "pauc_80", "balanced_accuracy", "sensitivity", "specificity")
CHECKPOINTS = {"last": "latest", "best": "best"}


class CVError(ValueError):
    """A cv request that cannot be honoured (folds out of range, another config, a foreign
    workdir); the message says what to do. Nothing in the workdir was changed."""


@dataclasses.dataclass(frozen=True)
class Member:
    """One run of the cross-validation: validation fold `fold`, trained with `seed`."""

    fold: int
    seed: int
    name: str  # its folder in the cv workdir

    @staticmethod
    def of(fold: int, seed: int, with_seed: bool) -> Member:
        return Member(fold, seed, f"fold_{fold}_seed_{seed}" if with_seed else f"fold_{fold}")


def is_cv_workdir(path: str | os.PathLike) -> bool:
    return (pathlib.Path(path) / MANIFEST).is_file()


def shared_config(config: ml_collections.ConfigDict | dict) -> dict[str, Any]:
    """The config as a plain dict without the keys that differ between members."""
    out = json.loads(json.dumps(config_utils.config_to_dict(config)
                                if isinstance(config, ml_collections.ConfigDict) else config))
    out["data"].pop("val_fold", None)
    out.pop("seed", None)
    return out


def member_config(config: ml_collections.ConfigDict, member: Member) -> ml_collections.ConfigDict:
    out = ml_collections.ConfigDict(config_utils.config_to_dict(config))
    out.data.val_fold = member.fold
    out.seed = member.seed
    return out


def plan(num_folds: int, folds: Sequence[int] | None, seeds: Sequence[int] | None,
         default_seed: int) -> list[Member]:
    """The members a request asks for. `seeds` None: config.seed, folders `fold_<k>`.

    Raises:
      CVError: a fold outside [0, num_folds) or a repeated fold/seed.
    """
    folds = list(range(num_folds)) if folds is None else [int(k) for k in folds]
    bad = [k for k in folds if not 0 <= k < num_folds]
    if bad:
        raise CVError(f"--folds {','.join(map(str, bad))}: the prepared dataset has {num_folds} "
                      f"folds, 0 to {num_folds - 1}")
    with_seed = seeds is not None
    seeds = [int(default_seed)] if seeds is None else [int(s) for s in seeds]
    if len(set(folds)) != len(folds) or len(set(seeds)) != len(seeds) or not folds or not seeds:
        raise CVError(f"--folds and --seeds must list distinct values, got folds {folds}, "
                      f"seeds {seeds}")
    return [Member.of(k, s, with_seed) for s in seeds for k in folds]


# ---------------------------------------------------------------------------------------------
# The manifest and the members on disk.


def open_workdir(workdir: pathlib.Path, config: ml_collections.ConfigDict, num_folds: int
                 ) -> dict[str, Any]:
    """Creates `cv.json` in a new or empty workdir, or checks that an existing one was made with
    this config (all keys but data.val_fold and seed).

    Raises:
      CVError: the workdir holds another cv run's folds (differences listed), or is a run folder
        of `isic-jax train`, or holds other files.
    """
    manifest = {"format": FORMAT, "version": 1, "num_folds": int(num_folds),
                "config": shared_config(config)}
    path = workdir / MANIFEST
    if path.is_file():
        old = json.loads(path.read_text())
        changed = config_utils.config_differences(old.get("config", {}), manifest["config"])
        if changed or old.get("num_folds") != manifest["num_folds"]:
            lines = changed + ([f"num_folds: {old.get('num_folds')} -> {num_folds}"]
                               if old.get("num_folds") != num_folds else [])
            raise CVError(
                f"{workdir} holds cross-validation folds trained with another config:\n  "
                + "\n  ".join(lines) + f"\nUse a new --workdir, or run with the config in {path}."
            )
        return old
    if (workdir / config_utils.CONFIG_FILENAME).exists() or (workdir / "checkpoints").exists():
        raise CVError(f"{workdir} is the run folder of `isic-jax train`, not a cross-validation "
                      f"workdir; choose a new --workdir")
    if workdir.is_dir() and any(workdir.iterdir()):
        raise CVError(f"{workdir} exists and holds files but no {MANIFEST}; choose a new or empty "
                      f"--workdir")
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".json.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        tmp.replace(path)
    return manifest


def read_manifest(workdir: pathlib.Path) -> dict[str, Any]:
    path = workdir / MANIFEST
    if not path.is_file():
        raise CVError(f"{workdir} is not a cross-validation workdir (no {MANIFEST}); run "
                      f"`isic-jax cv --config C --workdir {workdir}` first")
    return json.loads(path.read_text())


def completed_members(workdir: pathlib.Path) -> list[tuple[Member, dict[str, Any]]]:
    """(member, its cv_member.json) for every complete member, by seed then fold."""
    out = []
    for marker in workdir.glob(f"fold_*/{MEMBER_DONE}"):
        info = json.loads(marker.read_text())
        out.append((Member(int(info["fold"]), int(info["seed"]), marker.parent.name), info))
    return sorted(out, key=lambda m: (m[0].seed, m[0].fold, m[0].name))


def _check_member_config(workdir: pathlib.Path, member: Member, manifest: dict[str, Any]) -> None:
    saved = workdir / member.name / config_utils.CONFIG_FILENAME
    if not saved.is_file():
        return
    changed = config_utils.config_differences(manifest["config"],
                                              shared_config(json.loads(saved.read_text())))
    # The trainer writes what it resolved: data.mean/std () becomes the weights' or ImageNet's.
    changed = [line for line in changed
               if not (line.startswith(RESOLVED_KEYS) and line.split(": ", 1)[1].startswith(
                   ("[] ->", "() ->", "None ->")))]
    if changed:
        raise CVError(f"{saved.parent} was trained with another config than {workdir}/{MANIFEST}:"
                      "\n  " + "\n  ".join(changed))


# ---------------------------------------------------------------------------------------------
# Training.


def run_cv(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    *,
    folds: Sequence[int] | None = None,
    seeds: Sequence[int] | None = None,
    checkpoint: str = "last",
    summarize: bool = True,
) -> dict[str, Any]:
    """Trains the requested members that are not complete, then summarises what is complete.

    Args:
      config: the resolved config; data.val_fold and seed are set per member.
      workdir: the cv workdir (created; see the module docstring).
      folds: validation folds to train (default: all of the prepared dataset).
      seeds: one member per fold and seed (default: config.seed alone).
      checkpoint: for the summary, "last" or "best" (by config.train.best_metric).
      summarize: write oof_predictions.csv and cv_metrics.json afterwards.

    Returns:
      {"members": [names trained or skipped], "stopped_by_signal": bool, "summary": the
      `summarize_cv` result or None}.

    Raises:
      CVError: see `plan` and `open_workdir`; plus what `train_and_evaluate` raises.
    """
    config_utils.validate_config(config)
    if checkpoint not in CHECKPOINTS:
        raise CVError(f"--checkpoint must be last or best for cv, got {checkpoint!r}")
    workdir = pathlib.Path(workdir).absolute()
    dataset.check_prepared_dataset(config.data)
    num_folds = dataset.prepared_num_folds(config.data)
    members = plan(num_folds, folds, seeds, int(config.seed))
    manifest = open_workdir(workdir, config, num_folds)
    is_main = jax.process_index() == 0
    for member in members:
        _check_member_config(workdir, member, manifest)
    done = {m.name for m, _ in completed_members(workdir)}
    for i, member in enumerate(members, 1):
        where = workdir / member.name
        if member.name in done:
            say(is_main, f"[cv {i}/{len(members)}] {member.name}: complete, skipped")
            continue
        say(is_main, f"[cv {i}/{len(members)}] {member.name}: validation fold {member.fold}, "
                     f"seed {member.seed} -> {where}")
        result = loop.train_and_evaluate(member_config(config, member), where)
        if result["stopped_by_signal"]:
            return {"members": [m.name for m in members], "stopped_by_signal": True,
                    "summary": None}
        if is_main and result["step"] >= result["total_steps"]:
            info = {"fold": member.fold, "seed": member.seed, "step": int(result["step"]),
                    "val": {k: (result["val"] or {}).get(k) for k in SUMMARY_METRICS}}
            (where / MEMBER_DONE).write_text(json.dumps(to_json_compatible(info), indent=2,
                                                        sort_keys=True) + "\n")
    summary = summarize_cv(workdir, checkpoint=checkpoint) if summarize else None
    return {"members": [m.name for m in members], "stopped_by_signal": False, "summary": summary}


# ---------------------------------------------------------------------------------------------
# Out-of-fold predictions and the summary.


def summarize_cv(workdir: str | os.PathLike, *, checkpoint: str = "last") -> dict[str, Any]:
    """Scores every complete member on its validation fold and writes oof_predictions.csv and
    cv_metrics.json (and each member's eval/val/metrics.json and predictions.csv).

    With several seeds, an example's out-of-fold probabilities are the mean over the members
    (one per seed) that held its fold out.

    Returns:
      The cv_metrics.json content: members (fold, seed, step, metrics), mean and std over
      members, oof (the pooled out-of-fold metrics), complete (every fold of every seed there),
      missing (members not complete yet).

    Raises:
      CVError: not a cv workdir, or no member is complete.
    """
    if checkpoint not in CHECKPOINTS:
        raise CVError(f"--checkpoint must be last or best for cv, got {checkpoint!r}")
    workdir = pathlib.Path(workdir).absolute()
    manifest = read_manifest(workdir)
    members = completed_members(workdir)
    if not members:
        raise CVError(f"no fold of {workdir} is complete yet; run `isic-jax cv` to train them")
    rows, per_member, class_names, malignant = [], [], None, None
    for member, _ in members:
        run = workdir / member.name
        config = config_utils.load_config(run)
        data = dataset.InputData.for_run(config, run, read_train_labels=False)
        par = parallel.DataParallel.create(config.train.parallelism)
        which = CHECKPOINTS[checkpoint]
        preds, step, _, _ = evaluate.predict_checkpoint(run, config, data, par, "val", which)
        if jax.process_index() == 0:  # the member's own evaluation, as `evaluate` writes it
            settings = analysis.EvalSettings.from_config(config)
            fitted = evaluate.fitted_for(run, "val", step, preds, data.malignant_classes,
                                         settings)
            result, calibrated = evaluate.evaluation_result(preds, data, config, "val", which,
                                                            step, settings, fitted)
            evaluate.write_evaluation(run, "val", result, preds, data, calibrated,
                                      float(fitted.threshold))
        # The table: raw probabilities at the fixed config.eval.threshold (a threshold fitted
        # on the fold itself would give its target sensitivity by construction).
        metrics = predictions.summarize(preds, data.class_names, data.malignant_classes,
                                        float(config.eval.threshold))
        class_names, malignant = data.class_names, data.malignant_classes
        per_member.append({"name": member.name, "fold": member.fold, "seed": member.seed,
                           "step": int(step), **{k: metrics.get(k) for k in SUMMARY_METRICS}})
        rows.append((member, preds))
    oof = _pool(rows)
    threshold = float(config_utils.config_from_dict(manifest["config"]).eval.threshold)
    pooled = predictions.summarize(oof, class_names, malignant, threshold)
    seeds = sorted({m.seed for m, _ in members})
    with_seed = any("_seed_" in m.name for m, _ in members)
    expected = {Member.of(k, s, with_seed).name
                for s in seeds for k in range(int(manifest["num_folds"]))}
    missing = sorted(expected - {m.name for m, _ in members})
    summary = {
        "checkpoint": checkpoint,
        "num_folds": int(manifest["num_folds"]),
        "seeds": seeds,
        "members": per_member,
        "mean": {k: _stat(per_member, k, np.mean) for k in SUMMARY_METRICS},
        "std": {k: _stat(per_member, k, np.std) for k in SUMMARY_METRICS},
        "oof": {"num_examples": int(len(oof.labels)),
                **{k: pooled.get(k) for k in SUMMARY_METRICS}},
        "complete": not missing,
        "missing": missing,
    }
    summary = to_json_compatible(summary)
    if jax.process_index() == 0:
        _write_oof(workdir / OOF_FILE, oof, class_names, malignant)
        path = workdir / METRICS_FILE
        tmp = path.with_suffix(f".json.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
        tmp.replace(path)
        print(format_table(summary), flush=True)
    return summary


@dataclasses.dataclass
class _OOF(predictions.Predictions):
    """Predictions with the fold of each row and the number of members averaged."""

    fold: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int32))
    num_members: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int32))


def _pool(rows: list[tuple[Member, predictions.Predictions]]) -> _OOF:
    """One row per example (by fold and record index), probabilities averaged over seeds."""
    keyed: dict[tuple[int, int], list] = {}
    for member, preds in rows:
        for i in range(len(preds.labels)):
            keyed.setdefault((member.fold, int(preds.index[i])), []).append((preds, i))
    keys = sorted(keyed)

    def column(name: str) -> np.ndarray:
        return np.array([getattr(keyed[k][0][0], name)[keyed[k][0][1]] for k in keys])

    probs = np.stack([np.mean([p.probs[i] for p, i in keyed[k]], axis=0) for k in keys])
    has_fitzpatrick = all(p.fitzpatrick is not None for _, p in rows)
    return _OOF(
        probs=probs.astype(np.float32), labels=column("labels").astype(np.int32),
        index=column("index").astype(np.int64), image_id=column("image_id").astype(object),
        patient_id=column("patient_id").astype(object), sex=column("sex").astype(np.int32),
        age=column("age").astype(np.int32), anatom_site=column("anatom_site").astype(object),
        fitzpatrick=column("fitzpatrick").astype(object) if has_fitzpatrick else None,
        fold=np.array([k[0] for k in keys], np.int32),
        num_members=np.array([len(keyed[k]) for k in keys], np.int32),
    )


# Subgroup metadata in the OOF file (for stackers, the ensemble's calibration and model card).
_OOF_METADATA = ("sex", "age", "anatom_site", "fitzpatrick")


def _write_oof(path: pathlib.Path, oof: _OOF, class_names: list[str], malignant: list[int]
               ) -> None:
    fitz = oof.fitzpatrick if oof.fitzpatrick is not None else np.full(len(oof.labels), "")
    header = ["image_id", "patient_id", "fold", "label", *[f"prob_{n}" for n in class_names],
              "malignant_probability", "num_members", *_OOF_METADATA]
    rows = ([oof.image_id[i], oof.patient_id[i], int(oof.fold[i]), int(oof.labels[i]),
             *[f"{p:.6g}" for p in oof.probs[i]], f"{oof.probs[i][malignant].sum():.6g}",
             int(oof.num_members[i]), int(oof.sex[i]), int(oof.age[i]), oof.anatom_site[i],
             fitz[i]] for i in range(len(oof.labels)))
    write_csv(path, header, rows)


def read_oof(path: str | os.PathLike, class_names: Sequence[str]) -> _OOF:
    """`oof_predictions.csv` back as predictions (probabilities float32 [N, C], labels, ids,
    subgroup metadata), in file order.

    Raises:
      CVError: a missing file, or columns that are not those of `class_names`.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise CVError(f"{path} not found: run `isic-jax cv --workdir {path.parent} --summarize`")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    columns = [f"prob_{n}" for n in class_names]
    if not rows or any(c not in rows[0] for c in (*columns, "label", "fold")):
        raise CVError(f"{path} does not hold out-of-fold predictions of the classes "
                      f"{', '.join(class_names)}")

    def col(name: str, dtype: Any, default: Any = "") -> np.ndarray:
        return np.array([r.get(name, default) for r in rows]).astype(dtype)

    return _OOF(
        probs=np.array([[float(r[c]) for c in columns] for r in rows], np.float32),
        labels=col("label", np.int32), index=np.arange(len(rows), dtype=np.int64),
        image_id=col("image_id", object), patient_id=col("patient_id", object),
        sex=col("sex", np.int32, 0), age=col("age", np.int32, -1),
        anatom_site=col("anatom_site", object, "unknown"), fitzpatrick=col("fitzpatrick", object),
        fold=col("fold", np.int32), num_members=col("num_members", np.int32, 1),
    )


def _stat(rows: list[dict[str, Any]], key: str, fn: Any) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return float(fn(values)) if values else None


def format_table(summary: dict[str, Any]) -> str:
    """The console table: one line per member, mean ± std, pooled out-of-fold."""
    def cell(v: Any) -> str:
        return "   -  " if v is None else f"{v:6.4f}"

    head = f"{'member':<18}" + "".join(f"{k:>19}" for k in SUMMARY_METRICS)
    lines = [f"Cross-validation ({summary['checkpoint']} checkpoint of each fold)", head]
    for row in summary["members"]:
        lines.append(f"{row['name']:<18}" + "".join(f"{cell(row[k]):>19}"
                                                    for k in SUMMARY_METRICS))
    lines.append(f"{'mean ± std':<18}" + "".join(
        f"{cell(summary['mean'][k]) + ' ± ' + cell(summary['std'][k]).strip():>19}"
        for k in SUMMARY_METRICS))
    lines.append(f"{'pooled OOF':<18}" + "".join(f"{cell(summary['oof'][k]):>19}"
                                                 for k in SUMMARY_METRICS))
    if summary["missing"]:
        lines.append(f"not complete yet: {', '.join(summary['missing'])}")
    return "\n".join(lines)
