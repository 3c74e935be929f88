"""Ensemble export: several runs (the folds of a cv workdir, or any runs) as one model.

    meta = export_ensemble(cv_members("runs/cv"), "exports/cv", tta=True)

The exported function has the single-model contract (uint8 [b, S, S, 3] RGB in, float32 [b, C]
probabilities out): the mean of the members' probabilities, optionally of the 8 flips and
transposes of the input too (`tta`, then 8 x members forward passes per image). Layout:

    model.json           as for one model (format_version 2), plus "members" and "ensemble"
    model.jax_export     the averaged forward pass
    members/<i>/         each member's variables/ (Orbax) and config.json

Members must agree on what goes in and comes out (input size, stored size, classes,
preprocessing); architectures, seeds and folds may differ.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import jax

from isic_jax import config_utils
from isic_jax.data import metadata
from isic_jax.evaluation import analysis, cv, evaluate
from isic_jax.inference import export, model_card
from isic_jax.training import integrity, parallel
from isic_jax.utils import atomic_directory

MEMBERS_DIR = "members"
ENSEMBLE_FORMAT_VERSION = 2


def cv_members(workdir: str | os.PathLike) -> list[pathlib.Path]:
    """The run folders of the complete members of a cv workdir.

    Raises:
      cv.CVError: not a cv workdir, or no complete member.
    """
    workdir = pathlib.Path(workdir).absolute()
    cv.read_manifest(workdir)
    members = cv.completed_members(workdir)
    if not members:
        raise cv.CVError(f"no fold of {workdir} is complete yet; run `isic-jax cv` first")
    return [workdir / member.name for member, _ in members]


def _signature(config: Any) -> dict[str, Any]:
    """What members must share: classes, task, input size and every preprocessing step."""
    preprocessing = export.preprocessing_metadata(config)
    preprocessing.pop("steps")  # the same facts as the other entries, in words
    return {"class_names": export.class_names_for(config), "task": str(config.data.task),
            "image_size": int(config.data.image_size), "preprocessing": preprocessing}


def check_compatible(runs: Sequence[pathlib.Path], configs: Sequence[Any]) -> None:
    """Raises export.ExportError naming the first member that differs from the first one and in
    what (classes, input size, preprocessing)."""
    first = _signature(configs[0])
    for run, config in zip(runs[1:], configs[1:], strict=True):
        other = _signature(config)
        diffs = config_utils.config_differences(first, other)
        if diffs:
            raise export.ExportError(
                f"{run} cannot join an ensemble with {runs[0]}: its inputs or outputs differ:\n  "
                + "\n  ".join(diffs)
            )


def export_ensemble(
    runs: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    checkpoint: str | int = "latest",
    *,
    tta: bool = False,
    platforms: Sequence[str] = export.DEFAULT_PLATFORMS,
    overwrite: bool = False,
    verify: bool = True,
) -> dict[str, Any]:
    """Writes one export whose function averages the members' probabilities.

    Args:
      runs: `isic-jax train` run folders (e.g. `cv_members(workdir)`); at least one.
      output: the export folder (must be empty, or an earlier export with `overwrite`).
      checkpoint: of every member: "latest", "best" or a step number.
      tta: average over the 8 flips/transposes inside the exported function as well.
      platforms, verify: as for `export.export_checkpoint`.

    Returns:
      The metadata written to model.json.

    Raises:
      FileNotFoundError: a run or checkpoint missing. FileExistsError: `output` in the way.
      export.ExportError: members that do not fit together, or an artefact that does not
        reproduce the averaged members.
    """
    if jax.process_count() > 1:
        raise export.ExportError("export runs in a single process (it needs one device)")
    runs = [pathlib.Path(r).absolute() for r in runs]
    if not runs:
        raise export.ExportError("an ensemble needs at least one member")
    output = pathlib.Path(output).absolute()
    export._prepare_output(output, overwrite)
    configs = [config_utils.load_config(run) for run in runs]
    check_compatible(runs, configs)
    class_names = export.class_names_for(configs[0])
    encoders = member_encoders(runs)
    par = parallel.DataParallel.create("jit", [jax.local_devices()[0]])
    forwards, variables, entries = [], [], []
    for i, (run, config) in enumerate(zip(runs, configs, strict=True)):
        state, step, metrics = evaluate.restore_for_eval(run, config, len(class_names), par,
                                                         checkpoint)
        member_vars = jax.device_get(state.eval_variables())
        forwards.append(metadata.recoding(
            export.inference_forward(config, member_vars, len(class_names), encoders[i]),
            encoders[i], encoders[0]))
        variables.append(member_vars)
        entries.append({
            "dir": f"{MEMBERS_DIR}/{i}",
            "workdir": str(run),
            "fold": int(config.data.val_fold),
            "seed": int(config.seed),
            "model": {"name": str(config.model.name), "width": int(config.model.width),
                      "dtype": str(config.model.dtype)},
            "checkpoint": {"requested": str(checkpoint), "step": int(step), "metrics": metrics},
            "ema": bool(state.ema),
        })
    forward = export.mean_forward(forwards)
    if tta:
        forward = export.with_tta(forward)
    dtype = "bfloat16" if any(str(c.model.dtype) == "bfloat16" for c in configs) else "float32"
    width = encoders[0].width if encoders[0] is not None else 0
    artefact = export.build_artefact(forward, int(configs[0].data.image_size), dtype, platforms,
                                     verify, metadata_width=width)
    meta = export.model_metadata(configs[0], class_names, artefact, ema=False, checkpoint=None,
                                 metadata_encoder=encoders[0])
    meta["format_version"] = ENSEMBLE_FORMAT_VERSION
    meta["model"] = {"name": "ensemble", "num_classes": len(class_names),
                     "members": [e["model"] for e in entries]}
    meta["variables"] = {"dirs": [f"{e['dir']}/{export.VARIABLES_DIR}" for e in entries],
                         "format": "orbax StandardCheckpointer: {params, batch_stats}",
                         "ema": [e["ema"] for e in entries]}
    meta["export"]["tta_inside"] = bool(tta)
    meta["members"] = entries
    meta["ensemble"] = {
        "size": len(entries),
        "combine": "mean of the members' probabilities" + (
            " over the 8 flips/transposes of the input" if tta else ""),
        "cv": _cv_summary(runs),
    }
    validation, how = oof_validation(runs, configs[0])
    meta.update(export.calibration_metadata(validation, configs[0]))
    meta["validation_source"] = how
    meta["model_card"] = {"markdown": model_card.MARKDOWN_FILE, "json": model_card.JSON_FILE}
    meta = export._jsonable(meta)
    card = model_card.build_card(meta, configs[0], {"params": [v["params"] for v in variables],
                                                    "batch_stats": [v["batch_stats"]
                                                                    for v in variables]},
                                 validation=validation, validation_source=how, workdir=runs[0])
    with atomic_directory(output) as tmp:
        (tmp / export.EXPORTED_FILE).write_bytes(artefact.serialized)
        for entry, member_vars, config, encoder in zip(entries, variables, configs, encoders,
                                                       strict=True):
            export.save_variables(tmp / entry["dir"] / export.VARIABLES_DIR, member_vars)
            config_utils.save_config(config, tmp / entry["dir"])
            if encoder is not None:
                metadata.save_encoder(encoder, tmp / entry["dir"])
        if encoders[0] is not None:  # the encoding the exported function takes
            metadata.save_encoder(encoders[0], tmp)
        (tmp / export.METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        model_card.write_card(tmp, card)
        integrity.write_folder_checksums(tmp, {
            f"{entry['dir']}/{export.VARIABLES_DIR}": member_vars
            for entry, member_vars in zip(entries, variables, strict=True)})
    return meta


def member_encoders(runs: Sequence[pathlib.Path]) -> list[Any]:
    """Each member's metadata encoder (None for images-only members).

    Raises:
      export.ExportError: some members take metadata and others do not, or they encode other
        features.
    """
    encoders = [metadata.load_encoder(run) for run in runs]
    if any(e is not None for e in encoders) and any(e is None for e in encoders):
        with_meta = [str(r) for r, e in zip(runs, encoders, strict=True) if e is not None]
        raise export.ExportError(f"only some members take metadata ({', '.join(with_meta)}): "
                                 f"an ensemble's members all take it or none does")
    if encoders[0] is not None:
        for run, encoder in zip(runs[1:], encoders[1:], strict=True):
            try:
                encoder.recoder(encoders[0])
            except ValueError as e:
                raise export.ExportError(
                    f"{run} cannot join an ensemble with {runs[0]}: {e}") from e
    return encoders


def oof_validation(runs: Sequence[pathlib.Path], config: Any
                   ) -> tuple[dict[str, Any] | None, str]:
    """What the ensemble's temperature, operating threshold and model card are fitted on: the
    pooled out-of-fold predictions of the cv workdir the members come from (each image scored by
    the members that did not train on it: an approximation of the ensemble's own, which has no
    held-out data). (None, why) for members from anywhere else: predict then uses T = 1 and
    config.eval.threshold."""
    parents = {run.parent for run in runs}
    if len(parents) != 1 or not (next(iter(parents)) / cv.OOF_FILE).is_file():
        return None, ("not calibrated: the members do not come from one cv workdir with "
                      f"{cv.OOF_FILE}")
    path = next(iter(parents)) / cv.OOF_FILE
    class_names = export.class_names_for(config)
    malignant = export.malignant_classes_for(config, class_names)
    oof = cv.read_oof(path, class_names)
    settings = analysis.EvalSettings.from_config(config)
    fitted = analysis.fit(oof.probs, oof.labels, malignant, settings, split="oof")
    summary, _ = analysis.analyse(oof, class_names, malignant, settings, fitted)
    return {"split": "oof", **summary}, (
        f"pooled out-of-fold predictions of the members ({path}), an approximation of the "
        f"ensemble's own")


def _cv_summary(runs: Sequence[pathlib.Path]) -> dict[str, Any] | None:
    """The mean/std/pooled-OOF figures of the cv workdir the members come from, if they all
    come from one that has a summary."""
    parents = {run.parent for run in runs}
    if len(parents) != 1:
        return None
    path = next(iter(parents)) / cv.METRICS_FILE
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    return {k: summary.get(k) for k in ("checkpoint", "mean", "std", "oof", "complete")}
