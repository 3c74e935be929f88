"""BYOL on the real ISIC sample's 400 images on 2 CPU cores (`isic-jax pretrain`).

The backbone of `cpu_sample.py` (ResNet-18 at half width, 112 px crops of 128 px images), so that
`isic-jax train --config=cpu_sample --config.model.init_from=WORKDIR` (or `cv`) fine-tunes it:

    isic-jax prepare --source ../shared/data/isic-uda1/images --image-size 128 --data-dir /tmp/d
    isic-jax pretrain --config configs/pretrain_cpu_sample.py --workdir /tmp/byol \
        --config.data.data_dir=/tmp/d

BYOL's recipe (configs/pretrain_byol.py) scaled to 2 cores and a few hundred images:
- projector / predictor MLPs 512 -> 128 (the backbone gives 256 features, not ResNet-50's
  2048: BYOL's 4096 -> 256 is twice its features, then 256);
- AdamW at 2e-3 (batch 64) instead of LARS, which is meant for batches of thousands; weight
  decay 1e-5; 3 warm-up epochs, cosine to 0;
- target EMA tau_base 0.99 (cosine to 1), as the paper's shorter schedules;
- views: crops of 0.25-1 of the area (the lesion fills the middle of a dermoscopy image: BYOL's
  0.08 often keeps only skin at 112 px), and milder colour changes, because colour is what
  tells many melanomas from nevi: saturation 0.1, hue 0.02 (the supervised recipe's), no
  greyscale, blur with probability 0.5 / 0.1, solarisation 0 / 0.1; brightness and contrast
  0.4 as published. With the published colour jitter the k-NN probe on the sample's fold 0
  fell below the random-init network's (0.67 vs 0.74 after 60 steps; docs/pretraining.md);
- 30 epochs (~15 minutes on 2 busy cores); the probe every 50 steps.
"""

from isic_jax.configs import cpu_sample, pretrain_byol


def get_config():
    config = cpu_sample.get_config()
    config.pretrain = pretrain_byol.pretrain_section()
    config.pretrain.projector_hidden = 512
    config.pretrain.projection_dim = 128
    config.pretrain.predictor_hidden = 512
    config.pretrain.views.crop_scale = (0.25, 1.0)
    config.pretrain.views.saturation = 0.1
    config.pretrain.views.hue = 0.02
    config.pretrain.views.grayscale_prob = 0.0
    config.pretrain.views.blur_prob = (0.5, 0.1)
    config.pretrain.views.solarize_prob = (0.0, 0.1)
    config.data.augment.crop_scale = (1.0, 1.0)  # the whole image; the views crop on the device
    # cpu_sample's small-data recipe belongs to the classifier: BYOL makes its own views and
    # averages weights through its target network.
    config.data.augment.update(color_constancy=False, affine_p=0.0, gamma_p=0.0, cutout_p=0.0,
                               blur_p=0.0, noise_p=0.0, mixup_p=0.0)
    config.optim.swa_start_epoch = -1.0
    config.model.dropout = 0.0
    config.loss.class_weights = "none"  # no labels are trained on
    config.optim.name = "adamw"
    config.optim.learning_rate = 2e-3
    config.optim.weight_decay = 1e-5
    config.optim.warmup_epochs = 3.0
    config.optim.end_lr_factor = 0.0
    config.optim.grad_clip_norm = 0.0
    config.train.batch_size = 64
    config.train.num_epochs = 30.0
    config.train.log_every = 5
    config.train.eval_every = 50
    config.train.checkpoint_every = 50
    config.eval.batch_size = 64
    return config
