#!/usr/bin/env bash
# From scratch vs fine-tuned on the real ISIC sample (fold 0 held out), the fine-tuned runs
# starting from a run pretrained on another release (synthetic ISIC 2019, 8 diagnoses: no
# ImageNet weights are reachable offline). ~25 minutes on 2 idle CPU cores.
#
#   bash scripts/finetune_sample.sh [OUT_DIR]       (default /tmp/isic_finetune_sample)
#
# Prints the validation AUC of the last checkpoint of each run (isic-jax evaluate).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-/tmp/isic_finetune_sample}"
SAMPLE="${ISIC_JAX_SHARED_DATA:-../shared/data}/isic-uda1/images"
D="$OUT/tfds"
mkdir -p "$OUT"

isic-jax synth --output "$OUT/synth2019" --format isic2019 --num-images 1500 --seed 1
isic-jax prepare --source "$OUT/synth2019" --image-size 128 --data-dir "$D"
isic-jax prepare --source "$SAMPLE" --image-size 128 --data-dir "$D"

common=(--config=cpu_sample "--config.data.data_dir=$D" --config.train.progress=False)
# 1. Pretraining on the other release (8 classes).
isic-jax train "${common[@]}" --workdir "$OUT/pre2019" --config.data.release=isic2019 \
    --config.data.task=diagnosis --config.train.num_epochs=15
# 2. The real sample from scratch, 3. from the pretrained run (head 8 -> 2 classes
#    re-initialised), 4. the same with a slower backbone and one head-only epoch.
isic-jax train "${common[@]}" --workdir "$OUT/scratch"
isic-jax train "${common[@]}" --workdir "$OUT/finetuned" "--config.model.init_from=$OUT/pre2019"
isic-jax train "${common[@]}" --workdir "$OUT/finetuned_ctl" \
    "--config.model.init_from=$OUT/pre2019" --config.finetune.backbone_lr_mult=0.3 \
    --config.finetune.head_warmup_epochs=1.0
for run in scratch finetuned finetuned_ctl; do
  isic-jax evaluate --workdir "$OUT/$run" --checkpoint latest >/dev/null
  python - "$OUT/$run" <<'EOF'
import json, sys
m = json.load(open(f"{sys.argv[1]}/eval/val/metrics.json"))
print(f"{sys.argv[1]}: val AUC {m['auc']:.3f}, balanced accuracy {m['balanced_accuracy']:.3f}")
EOF
done
