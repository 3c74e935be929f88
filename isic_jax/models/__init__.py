"""Models: `create_model(config.model, num_classes, axis_name)` and variable helpers.

    model = create_model(config.model, num_classes=2, axis_name=None)
    variables = init_variables(model, jax.random.key(0), image_size=112)
    logits, updates = model.apply(variables, images, train=True, mutable=["batch_stats"],
                                  rngs={"dropout": key})        # logits float32 [B, 2]

Every `config.model.name` is registered by its family (`models.registry`), one module per
family: ResNet (resnet.py), EfficientNet B0-B7 and the TF ports (efficientnet.py), ConvNeXt
(convnext.py), ViT (vit.py), under timm's names and state-dict keys (docs/models.md); shared
building blocks in layers.py. Every model is a `Classifier`: a backbone's pooled features,
optionally a metadata branch, dropout and a dense head. Its parts (`model_parts`, `part_of`)
are what freezing, per-part learning rates and layer decay work on.

On CPU use inputs of 65 px or more for ResNets (64 px hits a slow XLA:CPU path, see
models/resnet.py).
"""

from isic_jax.models.classifier import HEAD, Classifier, part_of
from isic_jax.models.convnext import ConvNeXt
from isic_jax.models.efficientnet import EfficientNet
from isic_jax.models.factory import (
    DTYPE_NAMES,
    count_params,
    create_model,
    init_variables,
    model_parts,
)
from isic_jax.models.registry import FAMILIES, Family, family_of, model_names
from isic_jax.models.resnet import ARCHITECTURES, BasicBlock, BottleneckBlock, ResNet
from isic_jax.models.vit import VisionTransformer
from isic_jax.models.weight_files import PretrainedError

__all__ = [
    "ARCHITECTURES",
    "DTYPE_NAMES",
    "FAMILIES",
    "HEAD",
    "BasicBlock",
    "BottleneckBlock",
    "Classifier",
    "ConvNeXt",
    "EfficientNet",
    "Family",
    "PretrainedError",
    "ResNet",
    "VisionTransformer",
    "count_params",
    "create_model",
    "family_of",
    "init_variables",
    "model_names",
    "model_parts",
    "part_of",
]
