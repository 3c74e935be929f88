"""`isic-jax compare RUN_A RUN_B [--split val] [--bootstrap-samples 1000] [--seed 0]
[--output FILE.json]`.

Compares two runs evaluated on the same split (`isic-jax evaluate` wrote RUN/eval/<split>/
predictions.csv): the difference in AUC (B - A) with its paired-bootstrap interval and p-value
(patients resampled where the predictions have patient ids) and DeLong's test, and the same
bootstrap for pAUC above 80 % TPR and average precision. RUN may also be the eval folder itself.
Exit status 2 when a run has no predictions or the runs hold other images or labels.
"""

from __future__ import annotations

import json
import pathlib

from absl import app, flags

from isic_jax.commands import ExitCode, fail, underscore_alias
from isic_jax.evaluation import compare

_SPLIT = flags.DEFINE_string("split", "val", "The evaluated split of both runs.")
_SAMPLES = underscore_alias(flags.DEFINE_integer(
    "bootstrap-samples", 1000, "Paired bootstrap resamples.", lower_bound=1))
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the resampling.", lower_bound=0)
_LEVEL = flags.DEFINE_float("level", 0.95, "Level of the intervals.", lower_bound=0.5,
                            upper_bound=0.999)
_OUTPUT = flags.DEFINE_string("output", None, "Also write the comparison as JSON to this file.")


def main(argv: list[str]) -> None:
    if len(argv) != 3:
        raise app.UsageError("give two runs: isic-jax compare RUN_A RUN_B [--split val]")
    try:
        result = compare.compare_runs(argv[1], argv[2], _SPLIT.value,
                                      num_resamples=_SAMPLES.value, seed=_SEED.value,
                                      level=_LEVEL.value)
    except (compare.CompareError, FileNotFoundError) as e:
        fail("compare", e, ExitCode.USAGE)
    print(compare.summary_text(result), flush=True)
    if _OUTPUT.value:
        path = pathlib.Path(_OUTPUT.value)
        if path.exists() and path.is_dir():
            fail("compare", f"--output {path} is a folder", ExitCode.USAGE)
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    app.run(main)
