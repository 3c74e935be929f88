"""Coverage of the bootstrap intervals of `isic-jax evaluate`: how often the 95 % interval
contains the true AUC of a known distribution, over many simulated validation sets.

    python scripts/bootstrap_coverage.py              # 1000 data sets per scenario, ~2 minutes
    python scripts/bootstrap_coverage.py --trials 200

Scenarios (scores binormal: malignant N(d, 1), benign N(0, 1), true AUC = Phi(d / sqrt 2)):
- independent images (n = 200, 30 % malignant; and n = 400, 5 % malignant): the interval should
  cover ~95 %;
- clustered: 60 patients x 8 images of one lesion (one label per patient), a patient effect of
  sd 1 and image noise of sd 0.5 (true AUC Phi(d / sqrt(2 (1 + 0.25)))): resampling images
  ignores the clustering and under-covers, resampling patients (what evaluate does where the
  split has patient ids) covers.
The printed table is coverage with its binomial standard error, and the mean interval width.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys

import numpy as np
from scipy import stats

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from isic_jax.evaluation import bootstrap  # noqa: E402


def _interval(y, s, ids, resamples: int, seed: int, level: float):
    sorted_scores = bootstrap.SortedScores(y, s)
    units = bootstrap.resampling_units(ids, y.size)
    draws = bootstrap.bootstrap(lambda w: {"auc": bootstrap.auc(sorted_scores.roc(w))}, units,
                                resamples, seed)
    return bootstrap.percentile_interval(draws["auc"], level)


def independent(rng, n: int, prevalence: float, d: float):
    y = (rng.random(n) < prevalence).astype(np.int64)
    while y.min() == y.max():
        y = (rng.random(n) < prevalence).astype(np.int64)
    return y, rng.normal(0, 1, n) + d * y, None, float(stats.norm.cdf(d / math.sqrt(2)))


def clustered(rng, d: float, patients: int = 60, per: int = 8, sd_p: float = 1.0,
              sd_i: float = 0.5):
    pid = np.repeat(np.arange(patients), per)
    y = (rng.random(patients) < 0.3).astype(np.int64)
    while y.min() == y.max():
        y = (rng.random(patients) < 0.3).astype(np.int64)
    y = y[pid]
    s = d * y + rng.normal(0, sd_p, patients)[pid] + rng.normal(0, sd_i, y.size)
    true = float(stats.norm.cdf(d / math.sqrt(2 * (sd_p**2 + sd_i**2))))
    return y, s, pid.astype(str), true


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--level", type=float, default=0.95)
    args = parser.parse_args()
    d = 1.0
    scenarios = [
        ("independent, n=200, 30% malignant", lambda r: independent(r, 200, 0.3, d), "image"),
        ("independent, n=400, 5% malignant", lambda r: independent(r, 400, 0.05, d), "image"),
        ("clustered 60x8, images resampled", lambda r: clustered(r, d), "image"),
        ("clustered 60x8, patients resampled", lambda r: clustered(r, d), "patient"),
    ]
    print(f"{args.trials} data sets per scenario, {args.resamples} resamples, "
          f"{args.level:.0%} percentile intervals")
    print(f"{'scenario':<40} {'coverage':>10} {'+-':>6} {'width':>7}")
    for name, make, unit in scenarios:
        rng = np.random.default_rng(0)
        hits, widths = 0, []
        for trial in range(args.trials):
            y, s, ids, true = make(rng)
            low, high = _interval(y, s, ids if unit == "patient" else None, args.resamples,
                                  trial, args.level)
            hits += low <= true <= high
            widths.append(high - low)
        p = hits / args.trials
        se = math.sqrt(p * (1 - p) / args.trials)
        print(f"{name:<40} {p:>10.3f} {se:>6.3f} {np.mean(widths):>7.3f}")


if __name__ == "__main__":
    main()
