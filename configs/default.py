"""ResNet-50 on ISIC 2020 (binary, malignant vs benign): the accelerator run.

Follows the strong public ISIC 2020 pipelines: images stored at 512 px and trained at 384 px,
heavy flip/rotate/colour augmentation, a global batch of 256, AdamW with a short linear warmup and
cosine decay, light label smoothing, ~15 epochs, bfloat16 compute. Presets in this folder import
this file and override only what differs.

    isic-jax train --config configs/default.py --workdir runs/r50 --config.data.data_dir=~/tfds
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0

    # --- data: which prepared TFDS dataset, which fold, how images are read and augmented.
    config.data = ml_collections.ConfigDict()
    # archive | isic2016 ... isic2024: which prepared dataset; several joined by + (e.g.
    # "isic2019+isic2020") train on their union (same stored size, one label map, folds anew)
    config.data.release = "isic2020"
    config.data.stored_size = 512  # shorter side the builder resized to at prepare time
    config.data.data_dir = "~/tensorflow_datasets"  # TFDS data_dir holding the prepared dataset
    config.data.val_fold = 0  # this fold is the validation set; the others are trained on
    # (-1: train on every fold: a final model, no validation and no best checkpoint)
    config.data.task = "binary"  # binary (benign/malignant) | diagnosis (the release's classes)
    config.data.image_size = 384  # train/eval crop side, px
    config.data.balanced_sampling = False  # oversample classes to equal frequency
    config.data.num_workers = 8  # Grain worker processes per JAX process (0: in-process)
    config.data.prefetch_buffer_size = 2  # batches each Grain worker keeps ready
    config.data.device_prefetch = 2  # batches kept on the devices ahead of the step
    config.data.augment = ml_collections.ConfigDict()
    config.data.augment.crop_scale = (0.4, 1.0)  # random resized crop, fraction of the area
    config.data.augment.crop_ratio = (3 / 4, 4 / 3)
    # Host crop+resize filter. nearest keeps the host under 25 % over bare JPEG decode (see
    # scripts/bench_input.py); rotation on the device then resamples bilinearly anyway.
    # nearest | box | bilinear (PIL) | opencv_bilinear (bilinear at nearest's cost; [fast-resize])
    config.data.augment.interpolation = "nearest"
    config.data.augment.dihedral = True  # the 8 flips/transposes (on the device)
    config.data.augment.rotation = 30.0  # max degrees, uniform in [-r, r] (on the device)
    config.data.augment.brightness = 0.2
    config.data.augment.contrast = 0.2
    config.data.augment.saturation = 0.2
    config.data.augment.hue = 0.02
    config.data.augment.color_constancy = False  # Shades of Gray (p=6), train and eval alike
    # More on-device ops of the ISIC winners (docs/augmentation.md: what each does, its source,
    # its cost). Each runs per image with probability <op>_p (0 = off, not even compiled); the
    # strengths below are mild and only act once their _p is raised.
    config.data.augment.affine_p = 0.0  # zoom / shear / shift (ISIC 2020 1st: ShiftScaleRotate)
    config.data.augment.affine_scale = 0.1  # zoom uniform in [1 - s, 1 + s]
    config.data.augment.affine_shear = 5.0  # degrees, uniform in [-d, d]
    config.data.augment.affine_translate = 0.1  # x the side, uniform in [-t, t] per axis
    config.data.augment.elastic_p = 0.0  # smooth random displacement field (grid/elastic)
    config.data.augment.elastic_magnitude = 0.03  # max control-point shift, x the side
    config.data.augment.elastic_grid = 4  # control points per side
    config.data.augment.gamma_p = 0.0  # contrast curve 255 (x / 255)^g
    config.data.augment.gamma = 0.2  # g uniform in [1 - v, 1 + v]
    config.data.augment.blur_p = 0.0  # Gaussian blur
    config.data.augment.blur_sigma = 1.0  # sigma uniform in [0, s] px
    config.data.augment.noise_p = 0.0  # additive Gaussian noise
    config.data.augment.noise_std = 0.02  # std uniform in [0, s] x 255
    config.data.augment.cutout_p = 0.0  # square holes filled with the mean colour
    config.data.augment.cutout_size = 0.375  # hole side x the image side (ISIC 2020 1st)
    config.data.augment.cutout_holes = 1
    # Pair mixing (training only; labels become soft targets through the loss). Pairs are
    # stream positions 2k, 2k+1, so train.batch_size must be even; mixup_p + cutmix_p <= 1.
    config.data.augment.mixup_p = 0.0  # mixup (Zhang et al. 2018)
    config.data.augment.mixup_alpha = 0.4  # lambda ~ Beta(alpha, alpha)
    config.data.augment.cutmix_p = 0.0  # CutMix (Yun et al. 2019)
    config.data.augment.cutmix_alpha = 1.0
    # Input normalisation (x / 255 - mean) / std per RGB channel, in training, evaluation and
    # export. () = the pretrained source's (config.model.init_from: timm's config.json, an
    # isic_jax run's config; torchvision/timm ResNets: ImageNet), else ImageNet's
    # (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225). The resolved values go into config.json.
    config.data.mean = ()
    config.data.std = ()

    # --- model
    config.model = ml_collections.ConfigDict()
    # resnet18|34|50|101|152|200 (tiny variants for tests), efficientnet_b0..b7,
    # tf_efficientnet_b0..b7, convnext_tiny|small|base, vit_{tiny,small,base}_patch16_{224,384}
    # (timm's names; docs/models.md)
    config.model.name = "resnet50"
    config.model.dropout = 0.0  # before the classifier head
    # Multi-sample dropout (ISIC 2020 1st: 5 masks, dropout 0.5): K dropout masks on the pooled
    # features, the head on each, logits averaged; training only. 1 = plain dropout.
    config.model.msd_samples = 1
    # stochastic depth: the last block's drop rate, linear over the blocks (EfficientNet,
    # ConvNeXt, ViT; ResNets ignore it); only in training
    config.model.drop_path = 0.0
    config.model.dtype = "bfloat16"  # compute dtype; parameters stay float32
    config.model.width = 64  # ResNets: channels of the stem; halve it for a fast CPU model
    # auto: on CPU, convolutions and max-pooling lowered for XLA:CPU (models/cpu_lowering.py);
    # GPU/TPU always get XLA's own | xla: XLA's own everywhere. Same numbers either way.
    config.model.lowering = "auto"
    # Pretrained weights (docs/finetuning.md): "" = from scratch;
    # a torchvision/timm ResNet state dict (FILE.safetensors, or FILE.pth/.pt/.bin with torch
    # installed); hf-hub:ORG/NAME[@REVISION] (Hugging Face cache, HF_HOME / HF_HUB_OFFLINE
    # honoured); or an isic_jax workdir (best checkpoint, else latest; EMA when kept) or export.
    config.model.init_from = ""
    config.model.init_head = "auto"  # auto: keep the source head if its classes match | reinit

    # --- fine-tuning controls (all off by default; configs/finetune.py turns some on)
    config.finetune = ml_collections.ConfigDict()
    config.finetune.backbone_lr_mult = 1.0  # learning rate of all but the head, x this
    config.finetune.layer_decay = 1.0  # lr x decay**depth below the head (last stage 1 ... stem)
    config.finetune.freeze_stages = 0  # 0 none; 1 the stem; k: the stem + first k-1 stages
    config.finetune.freeze_bn = False  # every BatchNorm uses and keeps its running statistics
    config.finetune.head_warmup_epochs = 0.0  # epochs training the head alone, backbone fixed
    # Patient/lesion metadata features, comma-separated ("" = images only): age, sex, site,
    # images_per_patient, and a release's tabular columns (ISIC 2024: tbp_lv_*, ...); the
    # batches then carry them as `metadata` (data/metadata.py)
    config.model.metadata = ""
    config.model.metadata_hidden = 128  # width of the metadata branch's two dense layers
    config.model.metadata_dropout = 0.1  # training: each feature set to missing with this prob.

    # --- loss
    config.loss = ml_collections.ConfigDict()
    config.loss.name = "cross_entropy"  # cross_entropy | focal
    config.loss.label_smoothing = 0.05
    config.loss.class_weights = "none"  # none | balanced (inverse class frequency)
    config.loss.focal_gamma = 2.0

    # --- optimiser and schedule
    config.optim = ml_collections.ConfigDict()
    config.optim.name = "adamw"  # adamw | sgd (Nesterov momentum) | lars (pretraining)
    config.optim.learning_rate = 1e-3  # peak, for the global batch size below
    config.optim.momentum = 0.9  # sgd only
    config.optim.weight_decay = 1e-4  # not applied to BatchNorm parameters and biases
    config.optim.warmup_epochs = 1.0
    config.optim.end_lr_factor = 0.01  # cosine decays to learning_rate * this
    config.optim.grad_clip_norm = 1.0  # 0 disables clipping
    config.optim.accumulation_steps = 1  # gradient accumulation (micro-batches per update)
    config.optim.ema_decay = 0.0  # >0 keeps an EMA of the weights, used for evaluation
    # Stochastic weight averaging: from this epoch on (< 0: off), a snapshot of the weights every
    # swa_every_epochs goes into a running mean; its BatchNorm statistics are recomputed on
    # swa_bn_batches training batches (0: mean of the snapshots' statistics). Once it holds a
    # snapshot, evaluation, export and cv use it (instead of the EMA or live weights).
    config.optim.swa_start_epoch = -1.0
    config.optim.swa_every_epochs = 1.0
    config.optim.swa_bn_batches = 16

    # --- training loop
    config.train = ml_collections.ConfigDict()
    config.train.batch_size = 256  # global, over all devices and processes
    config.train.num_epochs = 15.0
    config.train.num_steps = -1  # >0 overrides num_epochs
    # jit over a Mesh of all devices (what big_vision and MaxText run; jax.pmap is in maintenance
    # mode since JAX 0.8), or pmap (the Flax ImageNet example's); checkpoints move between them.
    config.train.parallelism = "jit"
    config.train.log_every = 50  # steps between metric pulls from the devices
    config.train.eval_every = 1000  # steps; also evaluates at the end
    config.train.checkpoint_every = 1000
    config.train.keep_checkpoints = 3  # latest N kept; the best is kept separately
    config.train.best_metric = "auc"  # validation metric that selects the best checkpoint
    config.train.progress = True  # progress display on the console (process 0)

    # --- evaluation
    config.eval = ml_collections.ConfigDict()
    config.eval.batch_size = 256
    config.eval.threshold = 0.5  # malignant-probability threshold for sens/spec
    # in training's validation and, with threshold_method "fixed", in `evaluate` and `predict`.
    # How `evaluate` picks the operating threshold on the validation fold (stored at export and
    # used by `predict`): "sensitivity" (the highest threshold whose sensitivity reaches
    # target_sensitivity), "youden" (max sensitivity + specificity - 1) or "fixed" (threshold).
    config.eval.threshold_method = "sensitivity"
    config.eval.target_sensitivity = 0.90
    # Fit a softmax temperature on the validation fold (evaluate); export stores it, predict
    # applies it (`--no-calibration` turns it off).
    config.eval.temperature_scaling = True
    config.eval.calibration_bins = 15  # equal-width bins of ECE/MCE (torchmetrics' default)
    # Percentile bootstrap CIs in `evaluate`: resamples (0 turns CIs off), seed, level.
    # Patients are resampled where the split has patient ids, else images.
    config.eval.bootstrap_samples = 1000
    config.eval.bootstrap_seed = 0
    config.eval.ci_level = 0.95
    config.eval.pauc_min_tpr = 0.8  # partial AUC above this TPR (Kaggle ISIC 2024 metric)
    config.eval.retrieval_top_k = 15  # ISIC 2024 top-k per-patient retrieval sensitivity

    return config
