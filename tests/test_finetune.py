"""Fine-tuning: a run pretrained on one release fine-tunes on another with another class count;
the optimiser's parts, frozen stages and BatchNorm, head-only warm-up; exact resume; the
normalisation the weights came with through training, config.json, export and predict."""

from __future__ import annotations

import json
import pathlib
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from pretrained_helpers import (
    diagnosis_data,
    flat_variables,
    model_config,
    save_safetensors,
    torchvision_state_dict,
)
from train_helpers import (  # noqa: F401
    TINY_PARTS,
    compile_cache,
    make_data,
    restore_params,
    standard_config,
    tiny_config,
)

from isic_jax import config_utils
from isic_jax.data.isic import labels
from isic_jax.models import PretrainedError, create_model, init_variables, weight_files
from isic_jax.training import optim, weight_sources

pytestmark = pytest.mark.usefixtures("compile_cache")

ISIC2019 = list(labels.DIAGNOSIS_CLASSES["isic2019"])
CUSTOM_MEAN, CUSTOM_STD = (0.6, 0.5, 0.4), (0.3, 0.25, 0.2)


@pytest.fixture(scope="module")
def source_run(tmp_path_factory, request) -> pathlib.Path:
    """"Pretraining": a binary ISIC 2020-style run with EMA weights and its own mean/std."""
    from isic_jax.testing import runs

    request.getfixturevalue("compile_cache")
    workdir = tmp_path_factory.mktemp("source")
    config = tiny_config(**{"optim.ema_decay": 0.9})
    config.data.mean, config.data.std = CUSTOM_MEAN, CUSTOM_STD
    result = runs.train(config, workdir, data=make_data(config))
    assert result["step"] == 6
    return workdir


def _finetune_config(source: pathlib.Path, **overrides):
    config = tiny_config(**{"data.release": "isic2019", "data.task": "diagnosis",
                            "model.init_from": str(source), **overrides})
    return config


@pytest.fixture(scope="module")
def finetuned(source_run, tmp_path_factory) -> tuple[pathlib.Path, dict]:
    """Fine-tuned on an 8-class ISIC 2019-style release with the whole backbone frozen."""
    from isic_jax.testing import runs

    workdir = tmp_path_factory.mktemp("finetuned")
    config = _finetune_config(source_run, **{"finetune.freeze_stages": 3})
    result = runs.train(config, workdir, data=diagnosis_data(config, ISIC2019, "isic2019"))
    return workdir, result


def test_finetune_on_another_release_with_another_class_count(source_run, finetuned) -> None:
    workdir, result = finetuned
    assert result["step"] == 6
    record = json.loads((workdir / "init_from.json").read_text())
    assert record["source"] == str(source_run) and record["origin"] == "isic_jax-workdir"
    assert record["ema"] is True and record["checkpoint"] == "best"
    assert record["head"] == "reinitialized"
    assert "2 classes (benign, malignant), this model 8" in record["head_reason"]
    # The source's EMA weights of its best checkpoint are the backbone; with every part frozen
    # (stem + 2 stages of resnet_tiny) they, and their BatchNorm statistics, never moved.
    source = restore_params(source_run, "best")
    state = jax.device_get(result["state"])
    tuned = flat_variables({"params": state.params, "batch_stats": state.batch_stats})
    backbone = [k for k in tuned if "/head/" not in k]
    assert len(backbone) > 10
    for key in backbone:
        collection, rest = key.split("/", 1)
        src = source[f".ema['{collection}']" + "".join(f"['{p}']" for p in rest.split("/"))]
        np.testing.assert_array_equal(tuned[key], src, err_msg=key)
    assert tuned["params/head/kernel"].shape[-1] == 8
    assert np.abs(tuned["params/head/bias"]).max() > 0  # the new head trained
    # The source run's normalisation was taken over and recorded.
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["data"]["mean"] == list(CUSTOM_MEAN) and saved["data"]["std"] == list(CUSTOM_STD)
    assert record["mean"] == list(CUSTOM_MEAN) and record["mean_std_from"] == "the source run's"


def test_export_and_predict_use_the_runs_normalisation(finetuned, tmp_path) -> None:
    from isic_jax.data import device_augment
    from isic_jax.inference import export, predict
    from isic_jax.training import steps

    workdir, _ = finetuned
    meta = export.export_checkpoint(workdir, tmp_path / "export", platforms=("cpu",))
    assert meta["preprocessing"]["mean"] == list(CUSTOM_MEAN)
    assert meta["preprocessing"]["std"] == list(CUSTOM_STD)
    assert meta["init_from"]["head"] == "reinitialized"
    assert meta["class_names"] == ISIC2019
    # Inside the exported function: the run's mean/std, not ImageNet's.
    config = config_utils.load_config(workdir)
    variables = export.restore_variables(tmp_path / "export")
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    exported = np.asarray(export.load_exported(tmp_path / "export").call(images))
    model = create_model(config.model, 8)
    aug = steps.augment_config(config)
    assert aug.mean == pytest.approx(CUSTOM_MEAN) and aug.std == pytest.approx(CUSTOM_STD)
    ours = jax.nn.softmax(model.apply(variables, device_augment.preprocess_eval(images, aug)))
    imagenet = jax.nn.softmax(model.apply(variables, device_augment.normalize(images)))
    np.testing.assert_allclose(exported, np.asarray(ours), atol=1e-5)
    assert np.abs(exported - np.asarray(imagenet)).max() > 1e-3
    # The checkpoint backend of predict agrees with the artefact.
    ckpt_model = predict.load_model(tmp_path / "export", backend="checkpoint")
    np.testing.assert_allclose(np.asarray(ckpt_model.forward(images)), exported, atol=1e-5)

    # An export is itself a source: its variables, its classes, its normalisation.
    pre = weight_sources.load(tmp_path / "export", config.model, 8, class_names=ISIC2019)
    assert pre.source.origin == "isic_jax-export" and pre.head == "kept"
    assert pre.mean == pytest.approx(CUSTOM_MEAN) and pre.mean_std_from == "the source run's"
    for a, b in zip(jax.tree.leaves(pre.variables), jax.tree.leaves(jax.device_get(variables)),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    other = list(reversed(ISIC2019))  # 8 classes, another order: the head is not reused
    pre = weight_sources.load(tmp_path / "export", config.model, 8, class_names=other)
    assert pre.head == "reinitialized" and "are not this model's" in pre.head_reason
    with pytest.raises(PretrainedError, match="holds a resnet_tiny of width 4; this config "
                                              "builds resnet18 of width 4"):
        weight_sources.load(tmp_path / "export", model_config("resnet18", 4), 8)


def test_finetune_resumes_bit_exactly_without_rereading_the_source(source_run, tmp_path) -> None:
    """Every fine-tuning control on, with the standard resume config (accumulation, EMA,
    dropout, jit): killed after step 4 and resumed = uninterrupted, even with the source gone."""
    from isic_jax.testing import runs

    overrides = {"model.init_from": str(tmp_path / "source"), "optim.name": "adamw",
                 "optim.learning_rate": 1e-3, "finetune.backbone_lr_mult": 0.1,
                 "finetune.layer_decay": 0.5, "finetune.freeze_stages": 1,
                 "finetune.head_warmup_epochs": 0.5, "finetune.freeze_bn": True}
    shutil.copytree(source_run, tmp_path / "source")
    config = standard_config(**overrides)
    data = make_data(config)
    full = runs.train(config, tmp_path / "full", data=data)
    assert full["step"] == 6
    part = runs.train(config, tmp_path / "part", data=data, stop_after_step=4)
    assert part["step"] == 4
    shutil.rmtree(tmp_path / "source")
    resumed = runs.train(config, tmp_path / "part", data=data)
    assert resumed["step"] == 6
    a, b = restore_params(tmp_path / "full"), restore_params(tmp_path / "part")
    assert a.keys() == b.keys()
    assert [k for k in a if not np.array_equal(a[k], b[k])] == []
    assert any("inner_states" in k for k in a)  # the multi_transform state was checkpointed
    # freeze_bn: no BatchNorm statistic moved from the source's.
    source = restore_params(source_run, "best")
    for key in (k for k in a if k.startswith(".batch_stats")):
        np.testing.assert_array_equal(a[key], source[".ema['batch_stats']" + key[len(
            ".batch_stats"):]], err_msg=key)
    # The head-only warm-up held the backbone for the first update; then it moved (the stem,
    # frozen, did not).
    assert not np.array_equal(a[".params['stage1_block1']['conv1']['kernel']"],
                              source[".ema['params']['stage1_block1']['conv1']['kernel']"])
    np.testing.assert_array_equal(a[".params['stem_conv']['kernel']"],
                                  source[".ema['params']['stem_conv']['kernel']"])


def test_weights_that_do_not_fit_fail_before_the_workdir_is_made(tmp_path) -> None:
    from isic_jax.testing import runs

    weights = save_safetensors(tmp_path / "r18.safetensors", torchvision_state_dict("resnet18", 4))
    config = tiny_config(**{"model.init_from": str(weights)})
    with pytest.raises(PretrainedError, match="r18.safetensors does not fit this model"):
        runs.train(config, tmp_path / "run", data=make_data(config))
    assert not (tmp_path / "run").exists()
    config = tiny_config(**{"model.init_from": str(tmp_path / "missing.pth")})
    with pytest.raises(PretrainedError, match="missing.pth does not exist"):
        runs.train(config, tmp_path / "run", data=make_data(config))
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------ optimiser


def _tiny_params(name="resnet_tiny", classes=2):
    model = create_model(model_config(name, 4), classes)
    return init_variables(model, jax.random.PRNGKey(0), 32)["params"]


def _updates(finetune: dict, steps: int = 1, grads_scale: float = 1.0, **optim_overrides):
    config = tiny_config(**{"optim.momentum": 0.0, "optim.grad_clip_norm": 0.0,
                            "optim.warmup_epochs": 0.0, "optim.end_lr_factor": 1.0,
                            **optim_overrides})
    for key, value in finetune.items():
        config.finetune[key] = value
    params = _tiny_params()
    tx, schedule = optim.create_optimizer(config.optim, 100, 10, config.finetune, parts=TINY_PARTS)
    state = tx.init(params)
    grads = jax.tree.map(lambda p: jnp.full_like(p, grads_scale), params)
    out = []
    for _ in range(steps):
        updates, state = tx.update(grads, state, params)
        out.append(updates)
    return out, state, float(config.optim.learning_rate)


def test_backbone_multiplier_and_layer_decay_scale_each_part() -> None:
    (updates,), _, lr = _updates({"backbone_lr_mult": 0.1, "layer_decay": 0.5})
    expected = {"head": lr, "stage2_block1": lr * 0.1 * 0.5, "stage1_block1": lr * 0.1 * 0.25,
                "stem_conv": lr * 0.1 * 0.125, "stem_bn": lr * 0.1 * 0.125}
    for module, value in expected.items():
        for leaf in jax.tree.leaves(updates[module]):
            np.testing.assert_allclose(np.asarray(leaf), -value, rtol=1e-6, err_msg=module)


def test_frozen_stages_get_no_update_and_no_state() -> None:
    (updates,), state, lr = _updates({"freeze_stages": 2})
    for module in ("stem_conv", "stem_bn", "stage1_block1"):
        assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(updates[module]))
    np.testing.assert_allclose(np.asarray(updates["stage2_block1"]["conv1"]["kernel"]), -lr)
    # SGD with momentum keeps one buffer per trainable leaf only.
    _, plain, _ = _updates({}, **{"optim.momentum": 0.9})
    _, frozen, _ = _updates({"freeze_stages": 2}, **{"optim.momentum": 0.9})
    def n(tree):  # float scalars (momentum buffers; not the int step counters)
        return sum(x.size for x in jax.tree.leaves(tree) if x.dtype == jnp.float32)

    params = _tiny_params()
    trainable = n({k: v for k, v in params.items() if k in ("stage2_block1", "head")})
    assert n(plain) == n(params) and n(frozen) == trainable < n(params)
    with pytest.raises(ValueError, match="freeze_stages=4 exceeds this model's 3 parts"):
        optim.FineTune(freeze_stages=4).frozen_parts(TINY_PARTS)


def test_head_warmup_holds_the_backbone_then_warms_it_up() -> None:
    # 10 updates per epoch: 0.3 epochs = 3 head-only updates; then the backbone's own schedule.
    ups, _, lr = _updates({"head_warmup_epochs": 0.3}, steps=6, **{"optim.warmup_epochs": 0.2})
    stem = [float(np.asarray(u["stem_conv"]["kernel"]).ravel()[0]) for u in ups]
    head = [float(np.asarray(u["head"]["bias"])[0]) for u in ups]
    assert stem[:3] == [0.0, 0.0, 0.0]
    assert stem[3] == 0.0 and stem[4] < 0.0 and stem[5] < stem[4]  # linear warmup from 0
    assert head[1] < 0 and head[2] < head[1]  # the head trains (and warms up) from the start
    # Clipping sees only what trains: during the warm-up a huge backbone gradient does not
    # shrink the head's update.
    config = tiny_config(**{"optim.grad_clip_norm": 1.0})
    config.finetune.head_warmup_epochs = 1.0
    params = _tiny_params()
    tx, _ = optim.create_optimizer(config.optim, 100, 10, config.finetune, parts=TINY_PARTS)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 100.0), params)
    grads["head"] = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params["head"])
    updates, _ = tx.update(grads, tx.init(params), params)
    tx_plain, _ = optim.create_optimizer(config.optim, 100, 10, None, parts=TINY_PARTS)
    head_only = {k: (v if k == "head" else jax.tree.map(jnp.zeros_like, v))
                 for k, v in grads.items()}
    expected, _ = tx_plain.update(head_only, tx_plain.init(params), params)
    np.testing.assert_allclose(np.asarray(updates["head"]["kernel"]),
                               np.asarray(expected["head"]["kernel"]), rtol=1e-6)


def test_default_finetune_keys_keep_the_plain_optimizer_state() -> None:
    config = tiny_config(**{"optim.name": "adamw"})
    params = _tiny_params()
    plain, _ = optim.create_optimizer(config.optim, 10, 5)
    default, _ = optim.create_optimizer(config.optim, 10, 5, config.finetune, parts=TINY_PARTS)
    assert jax.tree.structure(plain.init(params)) == jax.tree.structure(default.init(params))


def test_frozen_batchnorm_keeps_its_running_statistics() -> None:
    config = model_config("resnet_tiny", 4)
    variables = init_variables(create_model(config, 2), jax.random.PRNGKey(0), 32)
    x = np.random.default_rng(0).normal(2.0, 3.0, (4, 32, 32, 3)).astype(np.float32)
    model = create_model(config, 2, frozen_bn=("stem", "stage1"))
    logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    before, after = variables["batch_stats"], updates["batch_stats"]
    for module in ("stem_bn",):
        assert jax.tree.all(jax.tree.map(np.array_equal, before[module], after[module]))
    assert jax.tree.all(jax.tree.map(np.array_equal, before["stage1_block1"],
                                     after["stage1_block1"]))
    assert not np.array_equal(before["stage2_block1"]["bn1"]["mean"],
                              after["stage2_block1"]["bn1"]["mean"])
    # Same parameter tree as the plain model: checkpoints and weights are interchangeable.
    frozen_shapes = jax.eval_shape(lambda: init_variables(model, jax.random.PRNGKey(0), 32))
    assert jax.tree.structure(frozen_shapes) == jax.tree.structure(variables)


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("data.mean", (0.5, 0.5), "config.data.mean must be () or 3 numbers"),
        ("data.std", (0.2, 0.0, 0.2), "config.data.std (each channel) must be > 0.0"),
        ("data.mean", (0.5, 0.5, 1.5), "config.data.mean (each channel) must be <= 1.0"),
        ("model.init_head", "keep", "config.model.init_head must be one of auto, reinit"),
        ("model.init_from", "hf-hub:resnet50", "hf-hub:ORG/NAME[@REVISION]"),
        ("finetune.layer_decay", 0.0, "config.finetune.layer_decay must be > 0.0"),
        ("finetune.layer_decay", 1.5, "config.finetune.layer_decay must be <= 1.0"),
        ("finetune.freeze_stages", -1, "config.finetune.freeze_stages must be >= 0"),
        ("finetune.backbone_lr_mult", -0.1, "config.finetune.backbone_lr_mult must be >= 0.0"),
        ("finetune.head_warmup_epochs", -1.0, "must be >= 0.0"),
        ("finetune.freeze_bn", 1, "config.finetune.freeze_bn must be True or False"),
    ],
)
def test_bad_values_name_the_key(key, value, message) -> None:
    config = tiny_config()
    section, name = key.split(".")
    with config[section].ignore_type():
        config[section][name] = value
    with pytest.raises(config_utils.ConfigError, match=re.escape(message)):
        config_utils.validate_config(config)


def test_mean_without_std_is_refused() -> None:
    config = tiny_config()
    config.data.mean = (0.5, 0.5, 0.5)
    with pytest.raises(config_utils.ConfigError, match="set both"):
        config_utils.validate_config(config)


def test_normalisation_resolves_from_source_config_or_imagenet(tmp_path) -> None:
    from isic_jax.training import init_from

    weights = save_safetensors(tmp_path / "w" / "model.safetensors",
                               torchvision_state_dict("resnet_tiny", 4, num_classes=2))
    (weights.parent / "config.json").write_text(json.dumps(
        {"pretrained_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}}))
    config = tiny_config(**{"model.init_from": str(weights)})
    resolved, pre, notes = init_from.resolve(config, tmp_path / "run", 2, None, None)
    assert resolved.data.mean == (0.5, 0.5, 0.5) and config.data.mean == ()  # a copy
    assert pre is not None and "Head kept" in notes[0]
    # An explicit config value wins, with a warning.
    config.data.mean, config.data.std = CUSTOM_MEAN, CUSTOM_STD
    resolved, _, notes = init_from.resolve(config, tmp_path / "run", 2, None, None)
    assert resolved.data.mean == CUSTOM_MEAN and "WARNING" in notes[-1]
    # From scratch: ImageNet's.
    resolved, pre, _ = init_from.resolve(tiny_config(), tmp_path / "run", 2, None, None)
    assert pre is None and resolved.data.mean == (0.485, 0.456, 0.406)


def test_state_dict_into_a_training_run_maps_every_tensor(tmp_path) -> None:
    """init_from a torchvision-named file (resnet_tiny's layout) trains, and records the file."""
    from isic_jax.testing import runs

    tensors = torchvision_state_dict("resnet_tiny", 4, num_classes=1000)
    weights = save_safetensors(tmp_path / "tv.safetensors", tensors)
    config = tiny_config(**{"model.init_from": str(weights), "train.num_steps": 2,
                            "train.eval_every": 2, "train.checkpoint_every": 2})
    result = runs.train(config, tmp_path / "run", data=make_data(config))
    assert result["step"] == 2
    record = json.loads((tmp_path / "run" / "init_from.json").read_text())
    assert record["tensors_mapped"] + len(record["ignored"]) == len(tensors)
    assert record["head"] == "reinitialized" and "1000 outputs" in record["head_reason"]
    assert record["sha256"] == weight_files.sha256(weights)


def test_cli_preset_with_a_source_exits_6_before_writing(tmp_path) -> None:
    """`--config=finetune:FILE` passes the file to the preset; weights of another architecture
    stop `isic-jax train` with exit status 6, the file, the keys and a guess, and no workdir."""
    import os
    import subprocess
    import sys

    from isic_jax.data import prepare as prepare_lib
    from isic_jax.data import synth

    synth.write_synthetic(tmp_path / "src", "isic2020", 16, 0)
    prepare_lib.prepare(tmp_path / "src", tmp_path / "data", image_size=40, num_folds=2)
    weights = save_safetensors(tmp_path / "r18.safetensors", torchvision_state_dict("resnet18", 4))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-m", "isic_jax", "train", f"--config=finetune:{weights}",
         f"--workdir={tmp_path / 'run'}", f"--config.data.data_dir={tmp_path / 'data'}",
         "--config.data.stored_size=40", "--config.data.image_size=32",
         "--config.data.num_workers=0"],
        env=env, cwd=str(pathlib.Path(__file__).resolve().parents[1]), capture_output=True,
        text=True, timeout=300, check=False)
    assert result.returncode == 6, result.stdout[-2000:] + result.stderr[-3000:]
    message = " ".join(result.stderr.split())
    assert f"{weights} does not fit this model (config.model.name=resnet50, width=64" in message
    assert "conv1.weight: the file has [4, 3, 7, 7], this model needs [64, 3, 7, 7]" in message
    assert "looks like a resnet18 (basic blocks 2-2-2-2, width 4)" in message
    assert not (tmp_path / "run").exists()

    # Weights of another family: the same exit, naming both families and the first keys.
    convnext = save_safetensors(tmp_path / "cnx.safetensors",
                                torchvision_state_dict("convnext_test", num_classes=2))
    result = subprocess.run(
        [sys.executable, "-m", "isic_jax", "train", "--config=cpu_backbone:efficientnet_test",
         f"--workdir={tmp_path / 'run2'}", f"--config.data.data_dir={tmp_path / 'data'}",
         "--config.data.release=isic2020", "--config.data.stored_size=40",
         "--config.data.image_size=32", "--config.data.num_workers=0",
         f"--config.model.init_from={convnext}"],
        env=env, cwd=str(pathlib.Path(__file__).resolve().parents[1]), capture_output=True,
        text=True, timeout=300, check=False)
    assert result.returncode == 6, result.stdout[-2000:] + result.stderr[-3000:]
    message = " ".join(result.stderr.split())
    assert (f"{convnext} holds convnext weights, not efficientnet weights, and does not fit "
            f"this model (efficientnet: config.model.name=efficientnet_test") in message
    assert "missing conv_stem.weight [8, 3, 3, 3]" in message
    assert "tensor(s) unexpected: unexpected head.fc.bias [2]" in message
    assert ("looks like a convnext_test (depths 1-1-1-1, dims 16-24-32-48): set "
            "--config.model.name=convnext_test") in message
    assert not (tmp_path / "run2").exists()


def test_finetune_step_is_the_same_under_pmap_jit_and_one_device() -> None:
    """Frozen stem (stopped gradients, inference-mode BatchNorm: no collective), a slower
    layer-decayed backbone: pmap and jit over 4 devices agree with one device (SGD; the
    tolerances of tests/test_parallel.py)."""
    from train_helpers import run_worker

    report = run_worker("equivalence", {"steps": 3, "finetune": {
        "freeze_stages": 1, "backbone_lr_mult": 0.5, "layer_decay": 0.8}})
    for mode in ("pmap", "jit"):
        assert report[mode]["param_scale"] > 0.1
        assert report[mode]["params"] < 1e-5, report
        assert report[mode]["batch_stats"] < 1e-4, report
        assert report[mode]["compiles"] == 1, report
