"""ResNet-50 fine-tuned from ImageNet weights on ISIC 2020: the accelerator recipe of the strong
SIIM-ISIC 2020 entries (pretrained backbone, low learning rate, short warm-up, the backbone
slower than the new head).

The weights come from `config.model.init_from`; by default timm's ResNet-50 on the Hugging Face
Hub (downloaded once into the Hugging Face cache; with HF_HUB_OFFLINE=1 a populated cache is
used without network). Any other source goes after the preset name:

    isic-jax train --config=finetune --workdir runs/ft --config.data.data_dir=~/tfds
    isic-jax train --config=finetune:~/weights/resnet50-0676ba61.pth --workdir runs/ft ...
    isic-jax train --config=finetune:runs/isic2019_r50 --workdir runs/ft2020 ...  # own run

Differences from default.py: peak learning rate 3e-4 for the head and 3e-5 for the backbone
(backbone_lr_mult 0.1; from scratch the default uses 1e-3 everywhere), half an epoch of linear
warm-up, 10 epochs instead of 15, a little more weight decay. The input normalisation is the
weights' own (config.data.mean/std = (): ImageNet's for torchvision/timm ResNets).
"""

from isic_jax.configs import default

DEFAULT_WEIGHTS = "hf-hub:timm/resnet50.a1_in1k"


def get_config(init_from: str = DEFAULT_WEIGHTS):
    config = default.get_config()
    config.model.init_from = init_from or DEFAULT_WEIGHTS
    config.optim.learning_rate = 3e-4
    config.optim.warmup_epochs = 0.5
    config.optim.weight_decay = 1e-3
    config.finetune.backbone_lr_mult = 0.1
    config.train.num_epochs = 10.0
    return config
