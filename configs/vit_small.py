"""ViT-S/16 fine-tuned from timm's AugReg ImageNet-21k -> 1k weights on ISIC 2020 at 384 px.

Pretrained ViTs transfer to dermoscopy as well as CNNs do with default fine-tuning settings
(Matsoukas et al. 2021, "Is it Time to Replace CNNs with Transformers for Medical Images?",
arXiv:2108.09038: DeiT-S, i.e. ViT-S/16, on ISIC 2019). The optimiser is the layer-wise-decay
fine-tuning protocol of BEiT/MAE (Bao et al. 2022, arXiv:2106.08254; He et al. 2022,
arXiv:2111.06377, Appendix A.3: AdamW, weight decay 0.05, layer decay 0.65-0.75, stochastic
depth 0.1, warm-up then cosine), here with layer decay 0.75 over the 14 parts (stem, block1 ...
block12, final), a peak learning rate of 1e-4 at batch 64 (MAE's 5e-4 x batch / 256 would be
1.25e-4), one epoch of warm-up and default.py's ISIC 2020 schedule (15 epochs, 384 px from
512 px stored). The position embedding of the 224 px weights is resampled to the 24x24 grid of
384 px when they are loaded; the class token and position embedding get no weight decay.
Normalisation: the weights' own (timm's config.json: mean = std = 0.5).

    isic-jax train --config=vit_small --workdir runs/vit_s --config.data.data_dir=~/tfds
    isic-jax train --config=vit_small:~/weights/vit_s.safetensors --workdir runs/vit_s ...
"""

from isic_jax.configs import default

DEFAULT_WEIGHTS = "hf-hub:timm/vit_small_patch16_384.augreg_in21k_ft_in1k"


def get_config(init_from: str = DEFAULT_WEIGHTS):
    config = default.get_config()
    config.model.name = "vit_small_patch16_384"
    config.model.init_from = init_from or DEFAULT_WEIGHTS
    config.model.drop_path = 0.1
    config.optim.name = "adamw"
    config.optim.learning_rate = 1e-4
    config.optim.weight_decay = 0.05
    config.optim.warmup_epochs = 1.0
    config.finetune.layer_decay = 0.75
    config.train.batch_size = 64
    config.eval.batch_size = 128
    return config
