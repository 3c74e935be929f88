"""Loading pretrained weights without torch: safetensors state dicts, the Hub cache offline, the
head decision, and every mismatch error (tests/test_torch_interop.py checks the mapping against
the real torchvision and timm modules)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from pretrained_helpers import (
    REVISION,
    model_config,
    safetensors_bytes,
    save_safetensors,
    timm_config,
    torchvision_state_dict,
    write_hub_cache,
)

from isic_jax.models import PretrainedError
from isic_jax.training import weight_sources

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def r18_file(tmp_path_factory) -> tuple[pathlib.Path, dict[str, np.ndarray]]:
    """A resnet18 (width 8) state dict with a 5-class head, as .safetensors."""
    tensors = torchvision_state_dict("resnet18", 8, num_classes=5)
    return save_safetensors(tmp_path_factory.mktemp("w") / "r18.safetensors", tensors), tensors


def test_state_dict_fills_exactly_the_model_tree(r18_file) -> None:
    import jax

    from isic_jax.models import create_model, init_variables

    path, tensors = r18_file
    pre = weight_sources.load(path, model_config("resnet18", 8), 5)
    model = create_model(model_config("resnet18", 8), 5)
    reference = jax.eval_shape(lambda: init_variables(model, jax.random.PRNGKey(0), 65))
    assert jax.tree.structure(pre.variables) == jax.tree.structure(reference)
    for got, want in zip(jax.tree.leaves(pre.variables), jax.tree.leaves(reference), strict=True):
        assert got.shape == want.shape and got.dtype == np.float32
    params, stats = pre.variables["params"], pre.variables["batch_stats"]
    np.testing.assert_array_equal(params["stem_conv"]["kernel"],
                                  tensors["conv1.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(params["stage2_block1"]["proj_conv"]["kernel"],
                                  tensors["layer2.0.downsample.0.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(params["stage3_block2"]["bn2"]["scale"],
                                  tensors["layer3.1.bn2.weight"])
    np.testing.assert_array_equal(stats["stage4_block1"]["proj_bn"]["var"],
                                  tensors["layer4.0.downsample.1.running_var"])
    np.testing.assert_array_equal(params["head"]["kernel"], tensors["fc.weight"].T)
    # Every tensor is used or ignored with its reason: the 20 BatchNorm step counters.
    assert pre.mapped + len(pre.ignored) == len(tensors)
    assert len(pre.ignored) == 20
    assert all("num_batches_tracked" in line for line in pre.ignored)
    assert pre.head == "kept" and "5 outputs" in pre.head_reason
    # A bare state dict: torchvision/timm ResNets were trained with ImageNet's statistics.
    np.testing.assert_allclose(pre.mean, [0.485, 0.456, 0.406], atol=1e-6)
    np.testing.assert_allclose(pre.std, [0.229, 0.224, 0.225], atol=1e-6)
    record = pre.record()
    assert record["sha256"] and record["head"] == "kept" and record["path"] == str(path)


def test_head_of_another_class_count_is_reinitialised(r18_file) -> None:
    path, tensors = r18_file
    pre = weight_sources.load(path, model_config("resnet18", 8), 2)
    assert pre.head == "reinitialized"
    assert "5 outputs" in pre.head_reason and "this model 2" in pre.head_reason
    assert "fc.weight: the head is re-initialised" in pre.ignored
    head = pre.variables["params"]["head"]
    assert head["kernel"].shape == (512 // 8, 2)
    np.testing.assert_array_equal(head["bias"], 0.0)
    # Flax's Dense initialiser (lecun normal): std ~ 1/sqrt(fan_in), not the source's.
    assert 0.5 / np.sqrt(64) < np.std(head["kernel"]) < 2.0 / np.sqrt(64)
    # The backbone is the source's either way.
    np.testing.assert_array_equal(pre.variables["params"]["stem_conv"]["kernel"],
                                  tensors["conv1.weight"].transpose(2, 3, 1, 0))


def test_init_head_reinit_replaces_a_matching_head(r18_file) -> None:
    path, tensors = r18_file
    pre = weight_sources.load(path, model_config("resnet18", 8), 5, init_head="reinit")
    assert pre.head == "reinitialized" and "init_head=reinit" in pre.head_reason
    assert not np.array_equal(pre.variables["params"]["head"]["kernel"], tensors["fc.weight"].T)
    with pytest.raises(PretrainedError, match="init_head must be one of auto, reinit"):
        weight_sources.load(path, model_config("resnet18", 8), 5, init_head="keep")


def test_load_pretrained_is_ready_for_apply(r18_file) -> None:
    import jax

    from isic_jax.models import create_model
    from isic_jax.training.weight_sources import load_pretrained

    path, _ = r18_file
    variables = load_pretrained(path, model_config("resnet18", 8), 5)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(variables))
    x = np.random.default_rng(0).normal(size=(2, 65, 65, 3)).astype(np.float32)
    logits = create_model(model_config("resnet18", 8), 5).apply(variables, x, train=False)
    assert logits.shape == (2, 5) and np.all(np.isfinite(np.asarray(logits)))


def _error(path, name="resnet18", width=8, classes=5) -> str:
    with pytest.raises(PretrainedError) as info:
        weight_sources.load(path, model_config(name, width), classes)
    return str(info.value)


def test_wrong_width_names_file_key_and_both_shapes(r18_file) -> None:
    path, _ = r18_file
    message = _error(path, width=16)
    assert str(path) in message
    assert "conv1.weight: the file has [8, 3, 7, 7], this model needs [16, 3, 7, 7]" in message
    assert "(for params/stem_conv/kernel)" in message
    assert "--config.model.name=resnet18 --config.model.width=8" in message


def test_wrong_architecture_lists_unexpected_keys_and_guesses_it(tmp_path) -> None:
    r34 = save_safetensors(tmp_path / "r34.safetensors", torchvision_state_dict("resnet34", 8))
    message = _error(r34)
    # The 8 extra blocks x (2 convs + 2 BatchNorms x 4 tensors); their step counters ignored.
    assert "80 tensor(s) unexpected" in message
    assert "unexpected layer1.2.bn1.weight [8] (this model has no such tensor)" in message
    assert "a resnet34 (basic blocks 3-4-6-3, width 8)" in message
    r50 = save_safetensors(tmp_path / "r50.safetensors", torchvision_state_dict("resnet50", 8))
    message = _error(r50)
    assert "layer1.0.conv1.weight: the file has [8, 8, 1, 1], this model needs [8, 8, 3, 3]" \
        in message
    assert "unexpected layer1.0.bn3.bias [32]" in message
    assert "a resnet50 (bottleneck blocks 3-4-6-3" in message
    assert "... and" in message  # many problems: the list is cut, with a count


def test_missing_key_and_non_finite_values(r18_file, tmp_path) -> None:
    _, tensors = r18_file
    broken = dict(tensors)
    del broken["layer2.0.downsample.0.weight"]
    broken["layer3.0.bn1.running_var"] = broken["layer3.0.bn1.running_var"].copy()
    broken["layer3.0.bn1.running_var"][0] = np.nan
    message = _error(save_safetensors(tmp_path / "broken.safetensors", broken))
    assert "missing layer2.0.downsample.0.weight [16, 8, 1, 1]" in message
    assert "layer3.0.bn1.running_var: has NaN or Inf values" in message


def test_deep_stem_and_non_resnet_files_are_named(tmp_path) -> None:
    tensors = torchvision_state_dict("resnet18", 8)
    stem = tensors.pop("conv1.weight")
    tensors["conv1.0.weight"] = stem[:, :, :3, :3]
    message = _error(save_safetensors(tmp_path / "r18d.safetensors", tensors))
    assert "missing conv1.weight [8, 3, 7, 7]" in message and "deep stem" in message
    other = save_safetensors(tmp_path / "vit.safetensors",
                             {"patch_embed.proj.weight": np.zeros((4, 3, 2, 2), np.float32)})
    assert ("no timm/torchvision state dict of a model isic_jax builds (its first keys: "
            "patch_embed.proj.weight)") in _error(other)


def test_torch_file_without_torch_says_how_to_convert(tmp_path, monkeypatch) -> None:
    path = tmp_path / "resnet50-0676ba61.pth"
    path.write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    message = _error(path)
    assert "needs torch" in message and "pip install torch" in message
    assert "safetensors.torch" in message and "weights_only=True" in message
    assert str(path.with_suffix(".safetensors")) in message


def test_missing_or_unknown_sources_are_named(tmp_path) -> None:
    assert "does not exist" in _error(tmp_path / "nope.safetensors")
    npz = tmp_path / "w.npz"
    npz.write_bytes(b"x")
    assert "not a file this reads (expected .safetensors, .pth, .pt, .bin" in _error(npz)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 16)
    assert f"{bad}: not a readable safetensors file" in _error(bad)
    (tmp_path / "empty").mkdir()
    assert "neither an isic_jax export" in _error(tmp_path / "empty")


def test_folder_with_weights_and_config_json(tmp_path) -> None:
    """A Hub snapshot / save_pretrained folder: its config.json gives mean/std and the
    architecture (checked before the keys)."""
    tensors = torchvision_state_dict("resnet18", 8)
    save_safetensors(tmp_path / "m" / "model.safetensors", tensors)
    cfg = timm_config("resnet18", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    pre = weight_sources.load(tmp_path / "m", model_config("resnet18", 8), 2)
    assert pre.mean == (0.5, 0.5, 0.5) and pre.std == (0.25, 0.25, 0.25)
    assert pre.mean_std_from == "recorded by the source" and pre.source.origin == "folder"
    cfg["architecture"] = "resnet50d"
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    assert "names the architecture 'resnet50d'" in _error(tmp_path / "m", classes=2)
    cfg["architecture"] = "resnet34"
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    assert "is a resnet34; this config builds resnet18: set --config.model.name=resnet34" \
        in _error(tmp_path / "m", classes=2)


_HUB_SCRIPT = textwrap.dedent("""
    import json, sys
    from isic_jax.models import PretrainedError
    from isic_jax.training import weight_sources
    from isic_jax.configs import default
    config = default.get_config().model
    config.name, config.width = "resnet18", 8
    out = {}
    pre = weight_sources.load("hf-hub:timm/resnet18.test_in1k", config, 2)
    out["record"] = pre.record()
    out["pinned"] = weight_sources.load(
        "hf-hub:timm/resnet18.test_in1k@%s" % sys.argv[1], config, 2).record()["revision"]
    for spec in ("hf-hub:timm/not_cached", "hf-hub:timm/resnet18.test_in1k@v9"):
        try:
            weight_sources.load(spec, config, 2)
        except PretrainedError as e:
            out[spec] = str(e)
    print(json.dumps(out))
""")


def test_hub_source_resolves_from_a_populated_cache_offline(tmp_path) -> None:
    """HF_HOME + HF_HUB_OFFLINE=1 in a fresh process (huggingface_hub reads them at import),
    a cache laid out as huggingface_hub writes it: no network is tried."""
    tensors = torchvision_state_dict("resnet18", 8)
    cfg = timm_config("resnet18", mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2))
    snapshot = write_hub_cache(tmp_path / "hf", "timm/resnet18.test_in1k", {
        "model.safetensors": safetensors_bytes(tensors),
        "config.json": json.dumps(cfg).encode(),
    })
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1",
               JAX_PLATFORMS="cpu")
    env.pop("HF_HUB_CACHE", None)
    result = subprocess.run([sys.executable, "-c", _HUB_SCRIPT, REVISION], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    record = out["record"]
    assert record["origin"] == "hf-hub" and record["repo"] == "timm/resnet18.test_in1k"
    assert record["revision"] == REVISION and out["pinned"] == REVISION
    assert record["path"] == str(snapshot / "model.safetensors")
    assert record["mean"] == [0.5, 0.4, 0.3] and record["std"] == [0.2, 0.2, 0.2]
    assert record["head"] == "reinitialized" and record["architecture"] == "resnet18"
    missing = out["hf-hub:timm/not_cached"]
    assert "HF_HUB_OFFLINE is set" in missing and "hf download timm/not_cached" in missing
    assert str(tmp_path / "hf" / "hub") in missing
    assert "timm/resnet18.test_in1k@v9" in out["hf-hub:timm/resnet18.test_in1k@v9"]


def test_layout_names_agree_with_the_writers() -> None:
    """weight_sources reads exports without importing inference (imports run one way); the
    folder and item names must be those the writers use."""
    from isic_jax import config_utils
    from isic_jax.inference import export
    from isic_jax.training import checkpointing

    assert weight_sources.RUN_CHECKPOINTS_DIR == checkpointing.CHECKPOINTS_DIR
    assert weight_sources.RUN_STATE_ITEM == checkpointing.STATE
    assert weight_sources.RUN_CONFIG_FILE == config_utils.CONFIG_FILENAME
    assert weight_sources.EXPORT_METADATA_FILE == export.METADATA_FILE
    assert weight_sources.EXPORT_VARIABLES_DIR == export.VARIABLES_DIR


def test_best_step_picks_the_best_finite_metric() -> None:
    metrics = {1: {"auc": 0.7}, 2: {"auc": float("nan")}, 3: {"auc": 0.9}, 4: {"auc": 0.8},
               5: None}
    assert weight_sources._best_step([1, 2, 3, 4, 5], "auc", "max", metrics.get) == 3
    assert weight_sources._best_step([1, 3, 4], "loss", "min", lambda s: {"loss": s}) == 1
    assert weight_sources._best_step([5], "auc", "max", metrics.get) is None
