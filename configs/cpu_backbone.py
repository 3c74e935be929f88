"""configs/cpu_sample.py (the real ISIC sample on 2 CPU cores, from scratch) with another
backbone, named after the preset: the smallest of each family, for a CPU comparison with the
ResNet-18 of cpu_sample.py on the same folds.

    isic-jax train --config=cpu_backbone:efficientnet_b0 --workdir /tmp/b0 \
        --config.data.data_dir=/tmp/d
    isic-jax cv --config=cpu_backbone:convnext_tiny --workdir /tmp/cv_cnx \
        --config.data.data_dir=/tmp/d

Any registered model name works (default efficientnet_b0); the three below get their family's
optimiser settings, everything else (112 px from 128 px stored, batch 32, 40 epochs, balanced
class weights) is cpu_sample.py's. ViTs need an image side that is a multiple of 16 (112 is).
Throughput on 2 cores is in docs/models.md ("CPU speed"): EfficientNet-B0 and ConvNeXt-T train
several times slower than the half-width ResNet-18 here, ViT-Ti faster.
"""

from isic_jax.configs import cpu_sample

# Family settings for training from scratch on the sample (AdamW): learning rate, weight decay.
# ConvNeXt and ViT follow their papers' AdamW weight decay of 0.05.
FAMILY_OPTIM = {
    "efficientnet": (2e-3, 1e-4),
    "convnext": (1e-3, 0.05),
    "vit": (5e-4, 0.05),
}


def get_config(name: str = "efficientnet_b0"):
    config = cpu_sample.get_config()
    config.model.name = name or "efficientnet_b0"
    # By name (tf_efficientnet_b0 too), without importing the models (and jax) here; an unknown
    # name is reported by the config check.
    family = next((f for f in FAMILY_OPTIM if f in config.model.name), None)
    if family is not None:
        config.optim.learning_rate, config.optim.weight_decay = FAMILY_OPTIM[family]
        config.model.drop_path = 0.1
    return config
