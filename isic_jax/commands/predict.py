"""`isic-jax predict --model EXPORT_DIR --input DIR_OR_CSV --output FILE.csv [--tta]
[--submission isic2019|isic2020|isic2024]`.

Class probabilities for every image of a folder (jpg, jpeg, png, bmp, tif, tiff, webp) or of a
CSV (column `path`, or `image`/`image_name`/`isic_id`, relative to the CSV's folder), with the
resize and preprocessing of evaluation (from the export's model.json). One row per image: id,
path, prob_<class>, prediction, malignant_probability, error (an unreadable image gets its error
and the run goes on). --submission writes the exact columns of that ISIC challenge instead
(failed images listed in FILE.errors.csv). --tta averages over the 8 flips/transposes.
Probabilities are calibrated with the temperature the export stores (fitted on the validation
fold; --no-calibration turns it off), and `prediction` uses the export's operating threshold
(chosen on the validation fold, e.g. for sensitivity 0.90); the command says which it used.
Exit status 2 for a bad --model/--input or a submission the model cannot fill; 8 when the
weights it uses differ from the export's checksums.json (a damaged export).
"""

from __future__ import annotations

import sys

from absl import app, flags

from isic_jax.commands import ExitCode, fail, no_arguments, underscore_alias
from isic_jax.inference import predict
from isic_jax.training import integrity

_MODEL = flags.DEFINE_string("model", None, "Folder written by `isic-jax export`.")
_INPUT = flags.DEFINE_string("input", None, "Folder of images, or a CSV listing them.")
_OUTPUT = flags.DEFINE_string("output", None, "CSV file to write.")
_TTA = flags.DEFINE_bool("tta", False, "Mean over the 8 flips/transposes (8x the compute).")
_SUBMISSION = flags.DEFINE_enum(
    "submission", None, ["isic2019", "isic2020", "isic2024"],
    "Write the exact columns of this ISIC challenge's submission file.",
)
_BATCH = flags.DEFINE_integer(
    "batch_size", 32, "Images per device call (over all local devices; rounded up to a "
    "multiple of their count).", lower_bound=1,
)
_BACKEND = flags.DEFINE_enum(
    "backend", "auto", ["auto", "export", "checkpoint"],
    "export: the jax.export artefact; checkpoint: Orbax variables + model code; auto: the "
    "artefact when it was lowered for this platform.",
)
_WORKERS = flags.DEFINE_integer(
    "num_workers", 0, "Decode threads (0: one per core).", lower_bound=0
)
_NO_CALIBRATION = underscore_alias(flags.DEFINE_bool(
    "no-calibration", False, "Write the exported function's raw probabilities: no temperature "
    "scaling, and the threshold chosen for uncalibrated scores."))
flags.mark_flags_as_required(["model", "input", "output"])


def main(argv: list[str]) -> None:
    no_arguments(argv)
    try:
        summary = predict.predict_to_csv(
            _MODEL.value, _INPUT.value, _OUTPUT.value, tta_flips=_TTA.value,
            submission=_SUBMISSION.value, batch_size=_BATCH.value, backend=_BACKEND.value,
            num_workers=_WORKERS.value or None, calibrate=not _NO_CALIBRATION.value,
        )
    except integrity.IntegrityError as e:  # a damaged export (before the other ValueErrors)
        fail("predict", e, ExitCode.DAMAGED)
    except (FileNotFoundError, ValueError) as e:  # InputError, SubmissionError are ValueErrors
        fail("predict", e, ExitCode.USAGE)
    n = len(summary.items)
    print(
        f"Predicted {n - summary.num_failed}/{n} images in {summary.seconds:.1f} s on "
        f"{summary.num_devices} device(s) (backend {summary.backend}"
        f"{', TTA x8' if _TTA.value else ''}); wrote {summary.output}",
        flush=True,
    )
    if summary.decision is not None:
        print(summary.decision.describe(), flush=True)
    if summary.num_failed:
        where = summary.errors_file or summary.output
        print(f"isic-jax predict: {summary.num_failed} image(s) could not be read; see the error "
              f"column of {where}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    app.run(main)
