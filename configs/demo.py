"""The README's main job: a small ResNet on synthetic ISIC 2020-style data, a few CPU minutes.

`isic-jax demo` generates the data (`isic-jax synth`), prepares it and trains with this preset.
"""

from isic_jax.configs import default


def get_config():
    config = default.get_config()
    config.data.release = "isic2020"
    config.data.stored_size = 128
    config.data.image_size = 96
    config.data.num_workers = 2
    config.data.augment.rotation = 0.0
    config.model.name = "resnet18"
    config.model.width = 32
    config.model.dtype = "float32"
    config.loss.label_smoothing = 0.0
    config.optim.learning_rate = 2e-3
    config.optim.warmup_epochs = 1.0
    config.train.batch_size = 32
    config.train.num_epochs = 12.0
    config.train.log_every = 10
    config.train.eval_every = 200
    config.train.checkpoint_every = 200
    config.eval.batch_size = 64
    return config
