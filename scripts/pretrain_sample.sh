#!/usr/bin/env bash
# Self-supervised pretraining (BYOL) on the real ISIC sample, then 5-fold cross-validation
# fine-tuned from it against the same cross-validation from scratch (docs/pretraining.md).
# ~1.5-3 hours on 2 CPU cores (most of it the two cross-validations; longer on busy cores).
#
#   bash scripts/pretrain_sample.sh [OUT_DIR]        (default /tmp/isic_pretrain_sample)
#
# The pretraining sees all 400 images without their labels (data.val_fold=-1): label-free but
# transductive, since every fold's validation images were among them. Its k-NN probe queries
# fold 0 with folds 1-4 as the memory bank. A strictly inductive comparison pretrains once per
# fold without it (PER_FOLD=1 below: five pretrainings, ~5x longer).
# Prints the pretraining's probe and both cross-validations' pooled out-of-fold AUC, fold mean
# and std, and wall times.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-/tmp/isic_pretrain_sample}"
SAMPLE="${ISIC_JAX_SHARED_DATA:-../shared/data}/isic-uda1/images"
D="$OUT/tfds"
mkdir -p "$OUT"
timed() {  # timed NAME COMMAND...: runs it, appends "NAME seconds" to $OUT/times.txt
  local name="$1" start
  shift
  start=$(date +%s)
  "$@"
  echo "$name $(( $(date +%s) - start ))" >> "$OUT/times.txt"
}

isic-jax prepare --source "$SAMPLE" --image-size 128 --data-dir "$D"
common=("--config.data.data_dir=$D" --config.train.progress=False)

if [ "${PER_FOLD:-0}" = 1 ]; then
  for k in 0 1 2 3 4; do
    timed "pretrain_fold$k" isic-jax pretrain --config=pretrain_cpu_sample \
        --workdir "$OUT/byol_fold$k" "${common[@]}" --config.data.val_fold=$k
    timed "cv_byol_fold$k" isic-jax cv --config=cpu_sample --workdir "$OUT/cv_byol_inductive" \
        "${common[@]}" --folds $k "--config.model.init_from=$OUT/byol_fold$k"
  done
  isic-jax cv --workdir "$OUT/cv_byol_inductive" --summarize
fi

# 1. BYOL on every image (labels unused), the probe on fold 0.
timed pretrain isic-jax pretrain --config=pretrain_cpu_sample --workdir "$OUT/byol" \
    "${common[@]}" --config.data.val_fold=-1 --config.pretrain.probe_fold=0
# 2. Cross-validation from scratch, 3. from the pretrained backbone (the same config).
timed cv_scratch isic-jax cv --config=cpu_sample --workdir "$OUT/cv_scratch" "${common[@]}"
timed cv_byol isic-jax cv --config=cpu_sample --workdir "$OUT/cv_byol" "${common[@]}" \
    "--config.model.init_from=$OUT/byol"

python - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
record = json.loads((out / "byol" / "pretrain.json").read_text())
probe = record.get("probe") or {}
print(f"k-NN probe on fold 0: random init {probe.get('knn_auc_initial')}, "
      f"after BYOL {probe.get('knn_auc')} (step {probe.get('step')})")
for name in ("cv_scratch", "cv_byol", "cv_byol_inductive"):
    path = out / name / "cv_metrics.json"
    if not path.is_file():
        continue
    m = json.loads(path.read_text())
    folds = [r["auc"] for r in m["members"]]
    print(f"{name}: pooled OOF AUC {m['oof']['auc']:.3f}, folds "
          f"{' / '.join(f'{a:.3f}' for a in folds)}, mean {m['mean']['auc']:.3f} "
          f"± {m['std']['auc']:.3f}")
print((out / "times.txt").read_text())
PY
