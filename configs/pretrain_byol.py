"""BYOL self-supervised pretraining of the default ResNet-50 (`isic-jax pretrain`, accelerators).

BYOL (Grill et al., "Bootstrap your own latent", NeurIPS 2020) as published, at the scale of one
ISIC release instead of ImageNet: an online network (backbone -> projector -> predictor) learns
to predict, for a second random view of the same image, the projection a slowly moving average
of itself (the target: backbone -> projector) gives; no labels, no negative pairs. The labels
of the prepared dataset are unused, except by the k-NN probe on the held-out fold that tells
whether the features learn. Afterwards `isic-jax train --config.model.init_from=WORKDIR` takes
the online backbone (docs/pretraining.md).

    isic-jax pretrain --config configs/pretrain_byol.py --workdir runs/byol \
        --config.data.data_dir=~/tensorflow_datasets

What follows the paper (its JAX code, deepmind-research/byol) and what is scaled:
- projector and predictor: Linear(4096) -> BatchNorm -> ReLU -> Linear(256), as published;
- target EMA: tau = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2 over the K updates; tau_base
  0.99, the paper's value for its 100- and 300-epoch schedules (0.996 for 1000 epochs);
- optimiser: LARS (trust coefficient 1e-3, momentum 0.9; biases and BatchNorm excluded from
  weight decay and adaptation), lr 0.45 x batch / 256 (the 100-epoch preset), weight decay
  1e-6, 10 warm-up epochs then cosine to 0; 100 epochs of ISIC 2020's ~26k training images
  (the paper: 1000 epochs of ImageNet's 1.28M at batch 4096; one release is ~50x smaller);
- views: random resized crop (0.08-1 of the area, ratio 3/4-4/3), flips, colour jitter
  (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1, p 0.8), greyscale (p 0.2),
  Gaussian blur (p 1.0 / 0.1, sigma 0.1-2.0 px at 224 px, scaled to the view size),
  solarisation (p 0 / 0.2); the host ships the whole image (crop_scale 1) and both crops are
  taken from it on the device. Flips are the 8 dihedral flips/rotations: a dermoscopy image
  has no up or left (the supervised recipe uses them too);
- k-NN probe: k = 20, temperature 0.07 (Wu et al. 2018, as DINO evaluates).
"""

import ml_collections
from isic_jax.configs import default


def pretrain_section() -> ml_collections.ConfigDict:
    """The `config.pretrain` keys with BYOL's published values (the schema of the section)."""
    pretrain = ml_collections.ConfigDict()
    pretrain.method = "byol"  # the self-supervised method (BYOL, Grill et al. 2020)
    pretrain.projector_hidden = 4096  # projector MLP: Linear(hidden) -> BN -> ReLU -> Linear
    pretrain.projection_dim = 256  # output of the projector and of the predictor
    pretrain.predictor_hidden = 4096  # predictor MLP hidden width
    # Target network EMA rate at the start; cosine-increased to 1 at the end of the run.
    pretrain.target_decay = 0.99
    # k-NN probe of the frozen backbone on the labelled validation fold (train folds as the
    # memory bank), at each evaluation and once at step 0 (the random-init baseline).
    pretrain.probe_k = 20
    pretrain.probe_temperature = 0.07  # weights exp(cosine / T) of the k neighbours' votes
    # With data.val_fold = -1 (pretraining on every fold): the probe's query fold, the others
    # its memory bank (the backbone saw its images, without labels); -1: no probe. Ignored
    # with a held-out fold, which the probe queries.
    pretrain.probe_fold = 0
    # The two views, made on the device from the host's image (config.data.augment's crop).
    pretrain.views = ml_collections.ConfigDict()
    pretrain.views.crop_scale = (0.08, 1.0)  # random resized crop, fraction of the area
    pretrain.views.crop_ratio = (3 / 4, 4 / 3)
    pretrain.views.flips = "dihedral"  # dihedral (8 flips/rotations) | horizontal | none
    pretrain.views.brightness = 0.4  # factor uniform in [1 - v, 1 + v]
    pretrain.views.contrast = 0.4
    pretrain.views.saturation = 0.2
    pretrain.views.hue = 0.1  # turns of the hue circle, uniform in [-v, v]
    pretrain.views.jitter_prob = 0.8  # probability of the colour jitter above
    pretrain.views.grayscale_prob = 0.2
    pretrain.views.blur_prob = (1.0, 0.1)  # Gaussian blur, view 1 and view 2
    pretrain.views.blur_sigma = (0.1, 2.0)  # px at a 224 px view (scaled to the view size)
    pretrain.views.solarize_prob = (0.0, 0.2)  # view 1, view 2
    return pretrain


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config()
    config.pretrain = pretrain_section()
    config.data.image_size = 224
    config.data.stored_size = 256
    # The host ships the whole image; the two views' crops are taken on the device.
    config.data.augment.crop_scale = (1.0, 1.0)
    config.optim.name = "lars"
    config.optim.learning_rate = 0.45  # 0.45 x 256 / 256 (BYOL's 100-epoch value)
    config.optim.weight_decay = 1e-6
    config.optim.warmup_epochs = 10.0
    config.optim.end_lr_factor = 0.0
    config.optim.grad_clip_norm = 0.0
    config.train.batch_size = 256
    config.train.num_epochs = 100.0
    config.train.eval_every = 1000
    config.train.checkpoint_every = 1000
    config.eval.batch_size = 512
    return config
