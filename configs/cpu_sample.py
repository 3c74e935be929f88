"""The small-data recipe: a few hundred labelled images on 2 CPU cores, from scratch.

Prepare the real sample first (legacy per-image JSON records of the ISIC Archive):

    isic-jax prepare --source ../shared/data/isic-uda1/images --image-size 128 --data-dir /tmp/d
    isic-jax train --config configs/cpu_sample.py --workdir /tmp/run --config.data.data_dir=/tmp/d
    isic-jax cv --config=cpu_sample --workdir /tmp/cv --config.data.data_dir=/tmp/d

Resolution and width follow CPU measurements: ResNet-18 at half width and 112 px trains at
~90-120 img/s on 2 idle cores with the XLA:CPU flags that `train` sets; 40 epochs of the 320
training images of a fold take ~2 minutes.

The levers on top of the previous preset were each chosen by 5-fold `isic-jax cv` on the real
sample (pooled out-of-fold AUC, never a single fold; `scripts/ablate_sample.py`, the table in
docs/augmentation.md "Small-data recipe"), each beating the preset alone:
- Shades-of-Gray colour constancy (ISIC 2019 1st place), train and eval alike;
- the SIIM-ISIC 2020 1st place device augmentations: affine zoom/shear/shift, a gamma curve and
  cutout at p=0.5, Gaussian blur and noise at p=0.2;
- mixup on half of the batches (alpha 0.4);
- SWA over the last 10 epochs, BatchNorm statistics recomputed on the training data.
"""

from isic_jax.configs import default


def get_config():
    config = default.get_config()
    config.data.release = "archive"
    config.data.stored_size = 128
    config.data.image_size = 112
    config.data.num_workers = 2
    config.data.balanced_sampling = False
    config.data.augment.color_constancy = True
    config.data.augment.affine_p = 0.5
    config.data.augment.gamma_p = 0.5
    config.data.augment.cutout_p = 0.5
    config.data.augment.blur_p = 0.2
    config.data.augment.noise_p = 0.2
    config.data.augment.mixup_p = 0.5
    config.model.name = "resnet18"
    config.model.width = 32
    config.model.dtype = "float32"
    config.model.dropout = 0.2
    config.loss.class_weights = "balanced"
    config.optim.learning_rate = 2e-3
    config.optim.warmup_epochs = 2.0
    config.optim.swa_start_epoch = 30.0
    config.train.batch_size = 32
    config.train.num_epochs = 40.0
    config.train.log_every = 10
    config.train.eval_every = 100
    config.train.checkpoint_every = 100
    config.eval.batch_size = 64
    return config
