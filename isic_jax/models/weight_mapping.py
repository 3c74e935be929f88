"""Matching pretrained weights to a model: timm/torchvision tensor names -> Flax variables.

    pre = match(source, config.model, num_classes=2, image_size=224)   # -> Pretrained
    pre.variables, pre.mean, pre.std, pre.head, pre.ignored, pre.record()

Each family's `registry.WeightLayout` names its variables the way timm does (`torch_key`; the
ResNets' table is in models/resnet.py) and says how a source tensor is laid out: convolutions
OIHW -> HWIO (depthwise [C, 1, kh, kw] -> [kh, kw, 1, C] alike), dense [out, in] -> [in, out].
Sources of this project (runs, exports) hold Flax variables under the same names as the model.

Every tensor of the source is used or listed in `Pretrained.ignored`. A missing key, an
unexpected key, a shape that differs (another architecture, width or family), a non-float or
non-finite tensor: one `PretrainedError` listing every problem with the file, the key and both
shapes, and what the file looks like (the family that recognises it), before any training.

Head (`init_head`): "auto" keeps the source's classifier when its shape is this model's (and,
for an isic_jax source, its classes are the same, in the same order), and re-initialises it
otherwise, saying why; "reinit" always re-initialises it (Flax's Dense initialiser, as from
scratch).

Normalisation: a timm config.json ("pretrained_cfg") or an isic_jax run records its own, which
wins; otherwise the family's (`WeightLayout.mean/std`, ImageNet's for the timm weights).
`Pretrained.mean/std` is what the fine-tuning run should normalise with.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from isic_jax.models import registry
from isic_jax.models.classifier import HEAD, natural_key, part_of
from isic_jax.models.factory import create_model
from isic_jax.models.weight_files import MAX_LISTED, PretrainedError, Source

INIT_HEAD_MODES: tuple[str, ...] = ("auto", "reinit")
TRACE_SIZE = 64  # px: the trace size when the caller gives none (ConvNets' shapes ignore it)
_HEAD_KEY = ("params", "head", "kernel")

PyTree = Any
FlatKey = tuple[str, ...]


@dataclasses.dataclass
class Pretrained:
    """Weights matched to a model (`match`).

    variables: {"params", "batch_stats"}: nested dicts of float32 numpy arrays, exactly the
      tree `create_model(model_config, num_classes)` initialises.
    head: "kept" (the source's classifier) or "reinitialized"; head_reason says why.
    mean, std: float [3] each on [0, 1]: the normalisation these weights expect; mean_std_from
      says where it comes from.
    ignored: source keys not used, each with the reason ("layer1.0.bn1.num_batches_tracked:
      ...").
    mapped: how many source tensors became variables.
    """

    source: Source
    variables: dict[str, PyTree]
    head: str
    head_reason: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    mean_std_from: str
    ignored: list[str]
    mapped: int

    def record(self) -> dict[str, Any]:
        """JSON-ready provenance (the trainer writes it as init_from.json; exports copy it)."""
        src = self.source
        return {
            "source": src.spec,
            "origin": src.origin,
            "format": "torchvision/timm state dict" if src.kind == "state_dict" else "isic_jax",
            "path": str(src.path),
            **src.details,
            "architecture": src.architecture,
            "tensors_mapped": self.mapped,
            "ignored": self.ignored,
            "head": self.head,
            "head_reason": self.head_reason,
            "mean": [round(float(v), 6) for v in self.mean],
            "std": [round(float(v), 6) for v in self.std],
            "mean_std_from": self.mean_std_from,
            "notes": src.notes,
        }

    def summary(self) -> str:
        """A few lines for the console."""
        src = self.source
        where = str(src.path) if src.spec == str(src.path) else f"{src.spec} ({src.path})"
        kinds = _ignored_kinds(self.ignored)
        lines = [
            f"Initialising from {where}: {self.mapped} tensors mapped"
            + (f", {len(self.ignored)} ignored ({kinds})" if self.ignored else "") + ".",
            f"Head {self.head}: {self.head_reason}.",
            f"Input normalisation mean {_fmt(self.mean)}, std {_fmt(self.std)} "
            f"({self.mean_std_from}).",
        ]
        lines += src.notes
        return "\n  ".join(lines)


def match(
    src: Source,
    model_config: Any,
    num_classes: int,
    *,
    init_head: str = "auto",
    class_names: Sequence[str] | None = None,
    rng: jax.Array | None = None,
    image_size: int = TRACE_SIZE,
) -> Pretrained:
    """The variables of `create_model(model_config, num_classes)` from a read source, with the
    head decision, the ignored keys, the normalisation and the provenance.

    Args:
      src: from `weight_files` (state dicts) or `training.weight_sources` (isic_jax runs).
      model_config: `config.model`.
      num_classes: the model's classes.
      init_head: "auto" or "reinit" (see the module docstring).
      class_names: this model's classes in order, when known: an isic_jax source's head is
        kept only when they are its classes.
      rng: PRNG key of a re-initialised head (default key(0)).
      image_size: the training input side, px (a ViT's position embedding depends on it).

    Raises:
      PretrainedError: the source does not fit the model.
    """
    if init_head not in INIT_HEAD_MODES:
        raise PretrainedError(
            f"config.model.init_head must be one of {', '.join(INIT_HEAD_MODES)}, got "
            f"{init_head!r}")
    family = registry.family_of(model_config.name)
    expected = expected_shapes(model_config, num_classes, image_size)
    if src.kind == "state_dict":
        check_architecture(src, model_config)
        flat, used, ignored, head, reason = match_state_dict(
            src.tensors or {}, expected, src.path, model_config, num_classes, init_head,
            src.notes)
    else:
        check_isic_model(src, model_config)
        flat, used, ignored, head, reason = match_variables(
            src.variables or {}, expected, src.path, num_classes, init_head,
            src.class_names, list(class_names) if class_names is not None else None,
            family.weights)
    if head == "reinitialized":
        flat.update(init_head_variables(expected, rng))
    variables = unflatten(flat)
    if src.mean is not None and src.std is not None:
        mean, std = src.mean, src.std
        where = ("recorded by the source" if src.kind == "state_dict"
                 else "the source run's")
    else:
        mean, std = ((family.weights.mean, family.weights.std) if family.weights is not None
                     else (registry.IMAGENET_MEAN, registry.IMAGENET_STD))
        imagenet = tuple(mean) == registry.IMAGENET_MEAN and tuple(std) == registry.IMAGENET_STD
        default = "ImageNet's" if imagenet else "timm's default"
        where = (f"{default}: timm/torchvision {family.name} weights" if src.kind == "state_dict"
                 else "ImageNet's: the source run predates recorded normalisation")
    return Pretrained(
        source=src, variables=variables, head=head, head_reason=reason,
        mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std),
        mean_std_from=where, ignored=[*src.ignored, *ignored], mapped=used,
    )


def expected_shapes(model_config: Any, num_classes: int, image_size: int = TRACE_SIZE
                    ) -> dict[FlatKey, tuple[int, ...]]:
    """{("params"|"batch_stats", module, ..., leaf): shape} of the model's variables (traced,
    nothing allocated), in network order: parts input to output, then the head."""
    model = create_model(model_config, num_classes)
    dummy = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    shapes = jax.eval_shape(
        lambda x: model.init(jax.random.key(0), x, train=False), dummy)
    shapes = {k: shapes[k] for k in ("params", "batch_stats") if k in shapes}
    flat = {k: tuple(v.shape) for k, v in flatten(shapes).items()}
    rank = {part: i for i, part in enumerate(model.parts())}

    def order(key: FlatKey) -> tuple:
        collection, top, *rest = key
        return (rank.get(part_of(top), len(rank)), natural_key(top), tuple(rest),
                collection != "params")

    return dict(sorted(flat.items(), key=lambda item: order(item[0])))


def to_flax(array: np.ndarray, kind: str) -> np.ndarray:
    """A source tensor in Flax's layout, float32 (see `torch_shape`)."""
    if kind == "conv":
        array = array.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    elif kind == "dense":
        array = array.T  # [out, in] -> [in, out]
    return np.ascontiguousarray(array, dtype=np.float32)


def torch_shape(shape: tuple[int, ...], kind: str) -> tuple[int, ...]:
    """A Flax shape in the source's layout (for comparisons and messages)."""
    if kind == "conv":
        h, w, i, o = shape
        return (o, i, h, w)
    if kind == "dense":
        return tuple(reversed(shape))
    return shape


def match_state_dict(
    tensors: Mapping[str, np.ndarray],
    expected: Mapping[FlatKey, tuple[int, ...]],
    file: os.PathLike | str,
    model_config: Any,
    num_classes: int,
    init_head: str,
    notes: list[str] | None = None,
) -> tuple[dict[FlatKey, np.ndarray], int, list[str], str, str]:
    """Maps a timm/torchvision state dict onto the model's variables by its family's layout.

    Returns:
      (flat float32 variables without the head when it is re-initialised, number of tensors
      mapped, ignored keys with reasons, head "kept"/"reinitialized", why).

    Raises:
      PretrainedError: every missing / unexpected / mis-shaped / unusable tensor, at once.
    """
    family = registry.family_of(model_config.name)
    layout = family.weights
    if layout is None:
        raise PretrainedError(f"{file}: {model_config.name} ({family.name}) has no known "
                              f"timm/torchvision weight layout; start it from an isic_jax run")
    head_names = set(layout.head)
    head, reason = _head_decision_torch(tensors, expected, num_classes, init_head, layout)
    flat: dict[FlatKey, np.ndarray] = {}
    used: set[str] = set()
    problems: list[str] = []
    for key, shape in expected.items():
        if head == "reinitialized" and key[1] == HEAD:
            continue
        name, kind = layout.torch_key(key)
        want = torch_shape(shape, kind)
        where = "/".join(key)
        if name not in tensors:
            problems.append(f"missing {name} {list(want)} (for {where})")
            continue
        used.add(name)
        array = tensors[name]
        if tuple(array.shape) != want and layout.resize is not None:
            resized = layout.resize(name, np.asarray(array), want)
            if resized is not None:
                if notes is not None:
                    notes.append(f"Resized {name} from {list(array.shape)} to {list(want)}.")
                array = resized
        if tuple(array.shape) != want:
            problems.append(f"{name}: the file has {list(array.shape)}, this model needs "
                            f"{list(want)} (for {where})")
        elif not np.issubdtype(array.dtype, np.floating) and array.dtype.name != "bfloat16":
            problems.append(f"{name}: dtype {array.dtype}, expected floating point")
        else:
            converted = to_flax(array, kind)
            if not np.all(np.isfinite(converted)):
                problems.append(f"{name}: has NaN or Inf values")
            flat[key] = converted
    ignored, unexpected = [], []
    for name in tensors:
        if name in used:
            continue
        if name.endswith(layout.ignored_suffixes):
            ignored.append(f"{name}: BatchNorm's step counter (Flax keeps none)")
        elif head == "reinitialized" and name in head_names:
            ignored.append(f"{name}: the head is re-initialised")
        else:
            unexpected.append(name)
    problems += [f"unexpected {name} {list(tensors[name].shape)} (this model has no such "
                 f"tensor)" for name in sorted(unexpected, key=natural_key)]
    if problems:
        first = ", ".join(list(tensors)[:5])
        found = identify(tensors) or (
            None, f"no timm/torchvision state dict of a model isic_jax builds (its first keys: "
                  f"{first})")
        raise PretrainedError(_mismatch_message(file, model_config, num_classes, problems,
                                                found))
    return flat, len(used), ignored, head, reason


def _head_decision_torch(tensors: Mapping[str, np.ndarray],
                         expected: Mapping[FlatKey, tuple[int, ...]],
                         num_classes: int, init_head: str,
                         layout: registry.WeightLayout) -> tuple[str, str]:
    want = torch_shape(expected[_HEAD_KEY], "dense")  # [C, F]
    weight_name, bias_name = layout.head
    weight = tensors.get(weight_name)
    if init_head == "reinit":
        return "reinitialized", "config.model.init_head=reinit"
    if weight is None:
        return "reinitialized", f"the source has no classifier ({weight_name})"
    if tuple(weight.shape) == want and bias_name in tensors:
        return "kept", f"the source classifier has this model's {num_classes} outputs"
    if weight.ndim == 2 and weight.shape[1] == want[1]:
        return "reinitialized", (f"the source classifier has {weight.shape[0]} outputs, this "
                                 f"model {num_classes}")
    return "kept", "checked with the other tensors"  # a feature-size mismatch: reported there


def match_variables(
    source: Mapping[FlatKey, np.ndarray],
    expected: Mapping[FlatKey, tuple[int, ...]],
    path: os.PathLike | str,
    num_classes: int,
    init_head: str,
    source_classes: list[str] | None,
    classes: list[str] | None,
    layout: registry.WeightLayout | None = None,
) -> tuple[dict[FlatKey, np.ndarray], int, list[str], str, str]:
    """Like `match_state_dict` for the variables of an isic_jax run or export (same names; a
    family's `WeightLayout.resize` adapts e.g. a ViT's position embedding to `expected`)."""
    head_kernel = source.get(_HEAD_KEY)
    want = expected[_HEAD_KEY]
    if init_head == "reinit":
        head, reason = "reinitialized", "config.model.init_head=reinit"
    elif head_kernel is None:
        head, reason = "reinitialized", "the source has no head"
    elif tuple(head_kernel.shape) != want:
        head = "reinitialized" if head_kernel.shape[0] == want[0] else "kept"
        reason = (f"the source head has {head_kernel.shape[-1]} classes"
                  + (f" ({', '.join(source_classes)})" if source_classes else "")
                  + f", this model {num_classes}")
    elif source_classes and classes and list(source_classes) != list(classes):
        head, reason = "reinitialized", (f"the source classes ({', '.join(source_classes)}) "
                                         f"are not this model's ({', '.join(classes)})")
    else:
        same = f" ({', '.join(classes)})" if source_classes and classes else ""
        head, reason = "kept", f"the source head has this model's {num_classes} classes{same}"
    flat: dict[FlatKey, np.ndarray] = {}
    problems: list[str] = []
    used = 0
    for key, shape in expected.items():
        if head == "reinitialized" and key[1] == HEAD:
            continue
        name = "/".join(key)
        if key not in source:
            problems.append(f"missing {name} {list(shape)}")
            continue
        used += 1
        array = source[key]
        if tuple(array.shape) != shape and layout is not None and layout.resize is not None:
            resized = layout.resize(layout.torch_key(key)[0], np.asarray(array), shape)
            array = array if resized is None else resized
        if tuple(array.shape) != shape:
            problems.append(f"{name}: the source has {list(array.shape)}, this model needs "
                            f"{list(shape)}")
        else:
            converted = np.ascontiguousarray(array, np.float32)
            if not np.all(np.isfinite(converted)):
                problems.append(f"{name}: has NaN or Inf values")
            flat[key] = converted
    ignored = []
    for key in source:
        if key in expected and not (head == "reinitialized" and key[1] == HEAD):
            continue
        if head == "reinitialized" and key[1] == HEAD:
            ignored.append(f"{'/'.join(key)}: the head is re-initialised")
        else:
            problems.append(f"unexpected {'/'.join(key)} {list(source[key].shape)}")
    if problems:
        raise PretrainedError(_mismatch_message(path, None, num_classes, problems, None))
    return flat, used, ignored, head, reason


def check_architecture(src: Source, model_config: Any) -> None:
    """A Hub/timm config.json naming another architecture: a clear error before the keys."""
    arch = src.architecture
    if not arch:
        return
    base = arch.split(".")[0]
    where = f"{src.spec}: {src.details.get('config', 'its config.json')}"
    if base not in registry.model_names():
        known = "; ".join(f"{f.name}: {', '.join(f.architectures)}"
                          for f in registry.FAMILIES.values())
        raise PretrainedError(
            f"{where} names the architecture {arch!r}, which isic_jax does not build (variants "
            f"such as ResNet-D, SE or ResNeXt have other layers); known: {known}")
    if base != model_config.name:
        found, builds = registry.family_of(base), registry.family_of(model_config.name)
        if same_architecture(base, model_config.name):
            src.notes.append(f"{where} names {base}, the same layers as {model_config.name} (the "
                             f"two differ only in their default input size).")
            return
        width = " (and --config.model.width=64)" if "width" in found.config_keys else ""
        families = (f" (a {found.name}, not a {builds.name})" if found is not builds else "")
        raise PretrainedError(
            f"{src.spec} is a {base}; this config builds {model_config.name}{families}: set "
            f"--config.model.name={base}{width}")


def same_architecture(name: str, other: str) -> bool:
    """Whether two registered model names build the same layers (e.g. vit_small_patch16_224 and
    vit_small_patch16_384: one ViT, whose position grid follows the input size)."""
    family = registry.family_of(name)
    return (family is registry.family_of(other)
            and family.architectures[name] == family.architectures[other])


def check_isic_model(src: Source, model_config: Any) -> None:
    """An isic_jax run or export of another architecture (or ResNet width): a clear error."""
    family = registry.family_of(model_config.name)
    uses_width = "width" in family.config_keys
    width = int(getattr(model_config, "width", 64))
    known = src.architecture in registry.model_names()
    other = src.architecture != model_config.name and not (
        known and same_architecture(str(src.architecture), model_config.name))
    if other or (uses_width and src.width != width):
        if uses_width:
            held = f"a {src.architecture} of width {src.width}"
            builds = f"{model_config.name} of width {width}"
            fix = f"--config.model.name={src.architecture} --config.model.width={src.width}"
        else:
            held, builds = f"a {src.architecture}", model_config.name
            fix = f"--config.model.name={src.architecture}"
        raise PretrainedError(
            f"{src.path} holds {held}; this config builds {builds}: set {fix}, or train from "
            f"other weights")


def init_head_variables(expected: Mapping[FlatKey, tuple[int, ...]],
                        rng: jax.Array | None) -> dict[FlatKey, np.ndarray]:
    """A fresh head, initialised as `Classifier`'s `nn.Dense` head is from scratch."""
    import flax.linen as nn

    features, classes = expected[_HEAD_KEY]
    rng = jax.random.key(0) if rng is None else rng
    head = nn.Dense(classes, dtype=jnp.float32, param_dtype=jnp.float32)
    params = head.init(rng, jnp.zeros((1, features), jnp.float32))["params"]
    return {("params", HEAD, k): np.asarray(v, np.float32) for k, v in params.items()}


def identify(tensors: Mapping[str, np.ndarray]) -> tuple[str, str] | None:
    """(family, description) of the first registered family that recognises a state dict, for
    error messages; None when none does."""
    for family in registry.FAMILIES.values():
        if family.weights is not None:
            found = family.weights.recognise(tensors)
            if found:
                return family.name, found
    return None


def _mismatch_message(file: Any, model_config: Any, num_classes: int, problems: list[str],
                      found: tuple[str | None, str] | None) -> str:
    """The problems grouped (shape/value, missing, unexpected), up to MAX_LISTED of each;
    found: (the family that recognises the file or None, what the file looks like)."""
    groups: dict[str, list[str]] = {"of another shape or unusable": [], "missing": [],
                                    "unexpected": []}
    for line in problems:
        kind = line.split(" ", 1)[0]
        groups[kind if kind in ("missing", "unexpected") else "of another shape or unusable"
               ].append(line)
    what = ""
    if model_config is not None:
        family = registry.family_of(model_config.name)
        what = f"config.model.name={model_config.name}, "
        if "width" in family.config_keys:
            what += f"width={int(getattr(model_config, 'width', 64))}, "
        if found is not None and found[0] not in (None, family.name):
            what = f"{family.name}: {what}"
            text = (f"{file} holds {found[0]} weights, not {family.name} weights, and does not "
                    f"fit this model ({what}{num_classes} classes):")
        else:
            text = f"{file} does not fit this model ({what}{num_classes} classes):"
    else:
        text = f"{file} does not fit this model ({num_classes} classes):"
    for title, lines in groups.items():
        if not lines:
            continue
        shown = lines[:MAX_LISTED]
        if len(lines) > MAX_LISTED:
            shown.append(f"... and {len(lines) - MAX_LISTED} more")
        text += f"\n {len(lines)} tensor(s) {title}:\n  " + "\n  ".join(shown)
    if found is not None:
        text += f"\nThe file looks like {found[1]}."
    return text


def flatten(tree: Mapping[str, Any], prefix: FlatKey = ()) -> dict[FlatKey, Any]:
    """Nested dicts -> {path tuple: leaf}."""
    out: dict[FlatKey, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, (*prefix, str(key))))
        else:
            out[(*prefix, str(key))] = value
    return out


def unflatten(flat: Mapping[FlatKey, Any]) -> dict[str, Any]:
    """{path tuple: leaf} -> {"params": ..., "batch_stats": ...} nested dicts."""
    out: dict[str, Any] = {"params": {}, "batch_stats": {}}
    for key, value in sorted(flat.items()):
        node = out
        for part in key[:-1]:
            node = node.setdefault(part, {})
        node[key[-1]] = value
    return out


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def _ignored_kinds(ignored: list[str]) -> str:
    kinds: dict[str, int] = {}
    for line in ignored:
        reason = line.split(": ", 1)[-1]
        kinds[reason] = kinds.get(reason, 0) + 1
    return "; ".join(f"{n} x {reason}" for reason, n in kinds.items())
