"""EfficientNet-B3 fine-tuned from timm's ImageNet weights on ISIC 2020: the single-model recipe
of the SIIM-ISIC 2020 winners (Ha, Liu & Liu 2020, "Identifying Melanoma Images using
EfficientNet Ensemble", arXiv:2010.05351; code: github.com/haqishen/SIIM-ISIC-Melanoma-
Classification-1st-Place-Solution, train.py).

Their EfficientNet runs: ImageNet-pretrained backbones, images stored at 512 (or 768/1024) px and
trained at 384-640 px, Adam with a one-epoch warm-up from 3e-5 to 3e-4 (GradualWarmupScheduler,
multiplier 10) then cosine decay, batch 64, 15 epochs, no weight decay, heavy flip/rotate/colour
augmentation, dropout 0.5 before the classifier (five dropout samples averaged). This preset
keeps those numbers at 384 px from 512 px stored, with the default preset's augmentation and
bfloat16 compute; stochastic depth 0.2 is timm's training default for B3. (Their best models
also trained on ISIC 2019 + 2018 with a 9-class target: `--config.data.release=
isic2019+isic2020 --config.data.task=diagnosis`.)

    isic-jax train --config=efficientnet_b3 --workdir runs/b3 --config.data.data_dir=~/tfds
    isic-jax train --config=efficientnet_b3:~/weights/b3.safetensors --workdir runs/b3 ...

The weights come from `config.model.init_from` (the argument after the preset name; default
timm's efficientnet_b3.ra2_in1k from the Hugging Face Hub, cached; HF_HUB_OFFLINE=1 reads the
cache without network). For TensorFlow-trained weights (timm's tf_efficientnet_b3.* tags) set
--config.model.name=tf_efficientnet_b3 as well: TF padding and BatchNorm epsilon differ.
"""

from isic_jax.configs import default

DEFAULT_WEIGHTS = "hf-hub:timm/efficientnet_b3.ra2_in1k"


def get_config(init_from: str = DEFAULT_WEIGHTS):
    config = default.get_config()
    config.model.name = "efficientnet_b3"
    config.model.init_from = init_from or DEFAULT_WEIGHTS
    config.model.dropout = 0.5
    config.model.drop_path = 0.2
    config.optim.name = "adamw"
    config.optim.learning_rate = 3e-4
    config.optim.weight_decay = 0.0
    config.optim.warmup_epochs = 1.0
    config.train.batch_size = 64
    config.eval.batch_size = 128
    return config
