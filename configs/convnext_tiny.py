"""ConvNeXt-T fine-tuned from timm's ImageNet-22k -> 1k weights on ISIC 2020.

The optimiser follows the ConvNeXt paper's fine-tuning recipe (Liu et al. 2022, "A ConvNet for
the 2020s", arXiv:2201.03545, Appendix A: AdamW, cosine schedule, layer-wise learning-rate
decay, stochastic depth 0.1 for ConvNeXt-T); the data side follows default.py (ISIC 2020 at
384 px from 512 px stored, 15 epochs). Differences from the paper's ImageNet fine-tuning: a
batch of 64 with a peak learning rate of 1e-4 (the paper: 5e-5 at 512, no warm-up), one epoch
of warm-up because the classifier is new, and weight decay 0.05 (the paper's pre-training
value; its 1e-8 for fine-tuning on ImageNet's 1.3M images leaves ISIC's few thousand
melanomas unregularised). Layer decay 0.8 over the parts stem, stage1 ... stage4, final.

    isic-jax train --config=convnext_tiny --workdir runs/cnx --config.data.data_dir=~/tfds
    isic-jax train --config=convnext_tiny:~/weights/convnext_tiny.safetensors --workdir ...
"""

from isic_jax.configs import default

DEFAULT_WEIGHTS = "hf-hub:timm/convnext_tiny.fb_in22k_ft_in1k"


def get_config(init_from: str = DEFAULT_WEIGHTS):
    config = default.get_config()
    config.model.name = "convnext_tiny"
    config.model.init_from = init_from or DEFAULT_WEIGHTS
    config.model.drop_path = 0.1
    config.optim.name = "adamw"
    config.optim.learning_rate = 1e-4
    config.optim.weight_decay = 0.05
    config.optim.warmup_epochs = 1.0
    config.finetune.layer_decay = 0.8
    config.train.batch_size = 64
    config.eval.batch_size = 128
    return config
