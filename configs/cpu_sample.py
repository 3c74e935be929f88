"""A small ResNet that trains on the real ISIC sample on 2 CPU cores in under 10 minutes.

Prepare the sample first (legacy per-image JSON records of the ISIC Archive):

    isic-jax prepare --source ../shared/data/isic-uda1/images --image-size 128 --data-dir /tmp/d
    isic-jax train --config configs/cpu_sample.py --workdir /tmp/run --config.data.data_dir=/tmp/d

Resolution and width follow CPU measurements on the development machines: ResNet-18 at half
width and 112 px trains at ~90-120 img/s on 2 idle cores with the YNN eltwise,reduce fusion
flags that `train` sets on CPU; 40 epochs of the 320 training images take ~2-6 minutes.
"""

from isic_jax.configs import default


def get_config():
    config = default.get_config()
    config.data.release = "archive"
    config.data.stored_size = 128
    config.data.image_size = 112
    config.data.num_workers = 2
    config.data.balanced_sampling = False
    config.model.name = "resnet18"
    config.model.width = 32
    config.model.dtype = "float32"
    config.model.dropout = 0.2
    config.loss.class_weights = "balanced"
    config.optim.learning_rate = 2e-3
    config.optim.warmup_epochs = 2.0
    config.train.batch_size = 32
    config.train.num_epochs = 40.0
    config.train.log_every = 10
    config.train.eval_every = 100
    config.train.checkpoint_every = 100
    config.eval.batch_size = 64
    return config
