"""A tiny model and a few steps on synthetic data: for tests and a quick look."""

from isic_jax.configs import default


def get_config():
    config = default.get_config()
    config.data.release = "isic2020"
    config.data.stored_size = 96
    config.data.image_size = 72
    config.data.num_workers = 0
    config.data.augment.rotation = 0.0
    config.model.name = "resnet_tiny"
    config.model.width = 8
    config.model.dtype = "float32"
    config.loss.label_smoothing = 0.0
    config.optim.warmup_epochs = 0.0
    config.train.batch_size = 8
    config.train.num_steps = 6
    config.train.log_every = 2
    config.train.eval_every = 3
    config.train.checkpoint_every = 3
    config.train.progress = False
    config.eval.batch_size = 8
    return config
