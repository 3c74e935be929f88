"""`isic-jax export --workdir DIR --output DIR [--checkpoint latest|best|STEP] [--tta]`.

Writes the inference artefacts of one checkpoint of a run: model.json (model, classes in order,
input, exact preprocessing, platforms), model.jax_export (jax.export StableHLO, uint8 images in,
probabilities out, symbolic batch), variables/ (Orbax: params + BatchNorm statistics, the EMA
ones when the run kept them) and config.json.

On a cross-validation workdir (`isic-jax cv`), or with `--members RUN,RUN,...` for any runs, it
writes one ensemble: the exported function averages the members' probabilities (members/<i>/
holds each one's variables and config). `--tta` averages the 8 flips/transposes inside the
exported function as well. Exit status 2 when there is no such run or checkpoint, or the output
folder is in the way; 3 when the export does not reproduce the model or members do not fit
together; 8 (DAMAGED) when the checkpoint's content differs from the checksums saved with it
(`isic-jax verify --workdir DIR` lists the damaged ones).
"""

from __future__ import annotations

from absl import app, flags

from isic_jax import config_utils
from isic_jax.commands import (
    ExitCode,
    checkpoint_flag_value,
    fail,
    no_arguments,
    refuse_pretraining_workdir,
)
from isic_jax.evaluation import cv
from isic_jax.inference import ensemble, export
from isic_jax.training import integrity

_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run folder written by `isic-jax train`, or a cv workdir (an ensemble)."
)
_MEMBERS = flags.DEFINE_list(
    "members", None, "Run folders to export as one ensemble (instead of --workdir)."
)
_TTA = flags.DEFINE_bool(
    "tta", False, "Average over the 8 flips/transposes inside the exported function."
)
_OUTPUT = flags.DEFINE_string("output", None, "Export folder to write (empty or new).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "latest", "latest, best, or a step number.")
_PLATFORMS = flags.DEFINE_list(
    "platforms", ["cpu", "cuda", "tpu"],
    "jax.export platforms to lower for; those this JAX cannot lower for are left out (and "
    "recorded in model.json).",
)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an earlier export in --output.")
_VERIFY = flags.DEFINE_bool(
    "verify", True, "Check the exported model against the trained one on random images."
)
flags.mark_flags_as_required(["output"])


def main(argv: list[str]) -> None:
    no_arguments(argv)
    which = checkpoint_flag_value(_CHECKPOINT.value)
    if (_WORKDIR.value is None) == (_MEMBERS.value is None):
        raise app.UsageError("give exactly one of --workdir and --members")
    refuse_pretraining_workdir("export", _WORKDIR.value)
    options = {"platforms": _PLATFORMS.value, "overwrite": _OVERWRITE.value,
               "verify": _VERIFY.value}
    try:
        if _MEMBERS.value is not None:
            meta = ensemble.export_ensemble(_MEMBERS.value, _OUTPUT.value, which, tta=_TTA.value,
                                            **options)
        elif cv.is_cv_workdir(_WORKDIR.value):
            meta = ensemble.export_ensemble(ensemble.cv_members(_WORKDIR.value), _OUTPUT.value,
                                            which, tta=_TTA.value, **options)
        else:
            meta = export.export_checkpoint(_WORKDIR.value, _OUTPUT.value, which, tta=_TTA.value,
                                            **options)
    except (FileNotFoundError, FileExistsError, config_utils.ConfigError, cv.CVError) as e:
        fail("export", e, ExitCode.USAGE)
    except export.ExportError as e:
        fail("export", e, ExitCode.MISMATCH)
    except integrity.IntegrityError as e:
        fail("export", e, ExitCode.DAMAGED)
    if meta.get("members"):
        _print_ensemble(meta)
        return
    info = meta["export"]
    failed = "".join(
        f"\n  not lowered for {p}: {why}" for p, why in info["platforms_failed"].items()
    )
    diff = info["verified_max_abs_diff"]
    check = (f"max |exported - trained| = {diff:.2g} on {info['verified_on']} "
             f"(tolerance {info['tolerance']:g})" if diff is not None else "not verified")
    print(
        f"Exported {meta['model']['name']} step {meta['checkpoint']['step']} "
        f"({'EMA' if meta['variables']['ema'] else 'live'} weights), classes "
        f"{', '.join(meta['class_names'])}, input uint8 [b, {meta['input']['image_size']}, "
        f"{meta['input']['image_size']}, 3] to {_OUTPUT.value}\n"
        f"  platforms: {', '.join(info['platforms'])}; {check}{failed}",
        flush=True,
    )
    cal = meta.get("calibration") or {}
    op = meta.get("operating_point") or {}
    if op:
        print(f"  threshold {meta['threshold']:.4g} ({op.get('description')}; validation "
              f"sensitivity {op.get('sensitivity', float('nan')):.3f}, specificity "
              f"{op.get('specificity', float('nan')):.3f}); temperature "
              f"{cal.get('temperature', 1.0):.4g}", flush=True)
    else:
        print(f"  threshold {meta['threshold']:.4g} (config.eval.threshold), no calibration: "
              f"{meta.get('validation_source')}", flush=True)
    print(f"  model card: {_OUTPUT.value}/MODEL_CARD.md", flush=True)



def _print_ensemble(meta: dict) -> None:
    info = meta["export"]
    diff = info["verified_max_abs_diff"]
    check = (f"max |exported - members' mean| = {diff:.2g} on {info['verified_on']}"
             if diff is not None else "not verified")
    members = ", ".join(f"{m['workdir']} (step {m['checkpoint']['step']})"
                        for m in meta["members"])
    tta = " with TTA inside" if info["tta_inside"] else ""
    print(f"Exported an ensemble of {len(meta['members'])} ({members}){tta} to {_OUTPUT.value}\n"
          f"  platforms: {', '.join(info['platforms'])}; {check}", flush=True)


if __name__ == "__main__":
    app.run(main)
