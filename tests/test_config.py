"""Config validation (bad keys/values fail at start naming the key), saving, XLA flag defaults."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def _configs():
    from isic_jax.configs import (
        convnext_tiny,
        cpu_backbone,
        cpu_sample,
        default,
        demo,
        efficientnet_b3,
        smoke,
        vit_small,
    )

    return {"default": default.get_config(), "smoke": smoke.get_config(),
            "cpu_sample": cpu_sample.get_config(), "demo": demo.get_config(),
            "efficientnet_b3": efficientnet_b3.get_config(),
            "convnext_tiny": convnext_tiny.get_config(), "vit_small": vit_small.get_config(),
            **{f"cpu_backbone:{name}": cpu_backbone.get_config(name) for name in
               ("efficientnet_b0", "convnext_tiny", "vit_tiny_patch16_224")}}


def test_presets_are_valid() -> None:
    from isic_jax import config_utils

    for name, config in _configs().items():
        config_utils.validate_config(config)  # raises on a problem
        assert config.train.parallelism in config_utils.PARALLELISM, name


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("train.parallelism", "foo", "config.train.parallelism must be one of pmap, jit"),
        ("data.image_size", 16, "config.data.image_size must be >= 32"),
        ("data.val_fold", 5, "config.data.val_fold=5 must be < the number of folds (5"),
        ("data.val_fold", -2, "config.data.val_fold must be >= -1"),
        ("train.batch_size", 0, "config.train.batch_size must be >= 1"),
        ("train.best_metric", "f1", "config.train.best_metric must be one of"),
        ("optim.ema_decay", 1.0, "config.optim.ema_decay must be < 1.0"),
        ("optim.learning_rate", float("nan"), "config.optim.learning_rate must be a finite"),
        ("data.augment.crop_scale", (0.9, 0.4), "config.data.augment.crop_scale must satisfy"),
        ("train.num_steps", 0, "config.train.num_steps must be > 0, or -1"),
        ("model.dtype", "float16", "config.model.dtype must be one of float32, bfloat16"),
        ("eval.threshold_method", "f1", "config.eval.threshold_method must be one of"),
        ("eval.target_sensitivity", 0.0, "config.eval.target_sensitivity must be > 0.0"),
        ("eval.target_sensitivity", 1.2, "config.eval.target_sensitivity must be <= 1.0"),
        ("eval.bootstrap_samples", -1, "config.eval.bootstrap_samples must be >= 0"),
        ("eval.ci_level", 1.0, "config.eval.ci_level must be < 1.0"),
        ("eval.pauc_min_tpr", 1.0, "config.eval.pauc_min_tpr must be < 1.0"),
        ("eval.calibration_bins", 1, "config.eval.calibration_bins must be >= 2"),
    ],
)
def test_bad_values_name_the_key(key: str, value, message: str) -> None:
    from isic_jax import config_utils

    config = _configs()["smoke"]
    section, _, name = key.partition(".")
    node = config[section]
    while "." in name:
        head, _, name = name.partition(".")
        node = node[head]
    node[name] = value
    with pytest.raises(ValueError) as info:
        config_utils.validate_config(config)
    assert isinstance(info.value, config_utils.ConfigError)
    assert message in str(info.value)


def test_every_key_of_the_default_preset_has_a_value_check() -> None:
    """One schema: the default preset's keys are the known keys, each with its check (and the
    optional keys the code reads with a default)."""
    from isic_jax import config_utils

    keys = config_utils.reference_keys()
    assert keys == set(config_utils.schema._CHECKS) - config_utils.schema._OPTIONAL
    assert set(config_utils.schema._CHECKS) >= config_utils.schema._OPTIONAL
    config = _configs()["smoke"]
    config.data.augment.interpolation = "cubic"
    with pytest.raises(config_utils.ConfigError, match="config.data.augment.interpolation"):
        config_utils.validate_config(config)
    config = _configs()["smoke"]
    config.model.name = "resnet19"
    with pytest.raises(config_utils.ConfigError,
                       match="config.model.name must be a registered model, got 'resnet19' "
                             r"\(did you mean 'resnet18'\? known: .*resnet: resnet18"):
        config_utils.validate_config(config)
    # Every family is listed by name, and the closest name is suggested across families.
    config.model.name = "efficientnet_b8"
    with pytest.raises(config_utils.ConfigError) as info:
        config_utils.validate_config(config)
    for listed in ("did you mean 'efficientnet_b7'?", "efficientnet: efficientnet_b0",
                   "tf_efficientnet_b7", "convnext: convnext_tiny", "vit: vit_tiny_patch16_224"):
        assert listed in str(info.value)
    config.model.name = "efficientnet_b3"
    config.model.drop_path = 1.0
    with pytest.raises(config_utils.ConfigError, match="config.model.drop_path must be < 1.0"):
        config_utils.validate_config(config)


def test_presets_by_name_resolve_to_the_shipped_files(tmp_path: pathlib.Path) -> None:
    from isic_jax import config_utils, configs

    folder = pathlib.Path(configs.__file__).parent
    assert config_utils.preset_names() == ["convnext_tiny", "cpu_backbone", "cpu_sample",
                                           "default", "demo", "efficientnet_b3", "finetune",
                                           "pretrain_byol", "pretrain_cpu_sample", "smoke",
                                           "vit_small"]
    assert config_utils.config_file("smoke") == str(folder / "smoke.py")
    assert config_utils.config_file("default:arg") == f"{folder / 'default.py'}:arg"
    own = tmp_path / "mine.py"
    assert config_utils.config_file(str(own)) == str(own)  # a path stays a path
    assert config_utils.config_file("no_such_preset") == "no_such_preset"


def test_unknown_key_in_a_preset_is_rejected() -> None:
    from isic_jax import config_utils

    config = _configs()["smoke"]
    config.train.batchsize = 4  # a typo ConfigDict accepts silently
    with pytest.raises(config_utils.ConfigError, match=r"config\.train\.batchsize") as info:
        config_utils.validate_config(config)
    assert "batch_size" in str(info.value)  # the known keys are listed


def test_num_folds_key_bounds_val_fold() -> None:
    from isic_jax import config_utils

    config = _configs()["smoke"]
    config.data.num_folds = 10  # read when present (make_builder's default is 5)
    config.data.val_fold = 7
    config_utils.validate_config(config)
    config.data.val_fold = 10
    with pytest.raises(config_utils.ConfigError, match="must be < the number of folds .10"):
        config_utils.validate_config(config)


def test_save_and_load_round_trip(tmp_path: pathlib.Path) -> None:
    from isic_jax import config_utils

    config = _configs()["smoke"]
    path = config_utils.save_config(config, tmp_path)
    assert path == tmp_path / "config.json"
    data = json.loads(path.read_text())
    assert data["train"]["batch_size"] == config.train.batch_size
    loaded = config_utils.load_config(tmp_path)
    config_utils.validate_config(loaded)
    assert config_utils.config_differences(config, loaded) == []
    loaded.train.num_steps = 99
    assert config_utils.config_differences(config, loaded) == ["train.num_steps: 6 -> 99"]
    with pytest.raises(FileNotFoundError, match="isic-jax train"):
        config_utils.load_config(tmp_path / "nowhere")


def _cli(args: list[str], tmp_path: pathlib.Path, **env_extra: str):
    env = dict(os.environ, **env_extra)
    return subprocess.run(
        [sys.executable, "-m", "isic_jax", *args], cwd=str(REPO), env=env,
        capture_output=True, text=True, timeout=120, check=False,
    )


@pytest.mark.slow
def test_cli_rejects_unknown_override_and_bad_value(tmp_path: pathlib.Path) -> None:
    workdir = tmp_path / "w"
    base = ["train", "--config", "configs/smoke.py", "--workdir", str(workdir)]
    unknown = _cli([*base, "--config.train.batchsize=4"], tmp_path)
    assert unknown.returncode != 0
    assert "batchsize" in unknown.stderr
    bad = _cli([*base, "--config.train.parallelism=foo"], tmp_path)
    assert bad.returncode == 2, bad.stderr[-2000:]
    assert "config.train.parallelism must be one of pmap, jit; got 'foo'" in bad.stderr
    assert not workdir.exists()  # failed before anything was written


def test_cli_takes_a_preset_by_name(tmp_path: pathlib.Path) -> None:
    workdir = tmp_path / "w"
    bad = _cli(["train", "--config=smoke", "--workdir", str(workdir),
                "--config.train.parallelism=foo"], tmp_path)
    assert bad.returncode == 2, bad.stderr[-2000:]  # the preset loaded, then its value failed
    assert "config.train.parallelism must be one of pmap, jit; got 'foo'" in bad.stderr


def test_importing_the_library_changes_nothing_global(tmp_path: pathlib.Path) -> None:
    """XLA_FLAGS, log levels, warning hooks, absl flags and sys.path are set by the CLI's
    runtime setup only; importing every module (as a notebook would) leaves them alone."""
    code = """
import importlib, logging, os, pkgutil, sys
from absl import flags, logging as absl_logging
before = (os.environ.get("XLA_FLAGS"), absl_logging.get_verbosity(), sys.unraisablehook,
          list(sys.path), flags.FLAGS.is_parsed(), list(logging.getLogger("absl").filters),
          "configs" in sys.modules)
import isic_jax
for info in pkgutil.walk_packages(isic_jax.__path__, "isic_jax."):
    if info.name.startswith("isic_jax.commands."):
        continue  # command modules define absl flags: the CLI imports exactly one
    importlib.import_module(info.name)
after = (os.environ.get("XLA_FLAGS"), absl_logging.get_verbosity(), sys.unraisablehook,
         list(sys.path), flags.FLAGS.is_parsed(), list(logging.getLogger("absl").filters),
         "configs" in sys.modules)
assert "jax" in sys.modules and "isic_jax.training.loop" in sys.modules
print("same" if before == after else f"changed: {before} -> {after}")
"""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=str(tmp_path),
                         capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "same"


def test_xla_flags_default_and_user_override() -> None:
    code = (
        "import os, sys; from isic_jax import runtime; "
        "print(runtime.set_default_xla_flags()); import jax; jax.devices(); "
        "print(os.environ.get('XLA_FLAGS'))"
    )
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=str(REPO),
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]  # the flag is accepted by this jaxlib
    lines = out.stdout.split()
    from isic_jax import runtime

    assert lines == [runtime.ynn_flag()] * 2
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=str(REPO),
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.stdout.split() == ["None", "--xla_force_host_platform_device_count=2"]


def test_ynn_flag_follows_avx512(tmp_path: pathlib.Path) -> None:
    from isic_jax import runtime

    avx512 = tmp_path / "avx512"
    avx512.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw\n")
    plain = tmp_path / "plain"
    plain.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n")
    assert runtime.has_avx512(str(avx512)) and not runtime.has_avx512(str(plain))
    assert not runtime.has_avx512(str(tmp_path / "missing"))
    assert runtime.ynn_flag() in (runtime.YNN_FLAG, runtime.YNN_FLAG_AVX512)


def test_xla_flag_probe_rejects_unknown_values() -> None:
    from isic_jax import runtime

    assert not runtime._probe_xla_flag("--xla_cpu_experimental_ynn_fusion_type=bogus")


def test_a_key_added_since_a_config_was_saved_is_no_difference_at_its_default() -> None:
    from isic_jax.configs import default

    from isic_jax import config_utils

    new = config_utils.config_to_dict(default.get_config())
    old = json.loads(json.dumps(new))
    del old["model"]["metadata"]  # saved before config.model.metadata existed
    assert config_utils.config_differences(old, new) == []
    new["model"]["metadata"] = "age,sex"
    assert config_utils.config_differences(old, new) == ["model.metadata: '' -> 'age,sex'"]


def test_release_and_metadata_values() -> None:
    from isic_jax.configs import default

    from isic_jax import config_utils

    for release in ("isic2020", "isic2019+isic2020", "archive+isic2018+isic2024"):
        config = default.get_config()
        config.data.release = release
        config_utils.validate_config(config)
    for bad, match in (("isic2019+", "unknown release"), ("", "release"),
                       ("isic2024+isic2024", "twice")):
        config = default.get_config()
        config.data.release = bad
        with pytest.raises(config_utils.ConfigError, match=match):
            config_utils.validate_config(config)
    config = default.get_config()
    config.model.metadata = "age,,sex"
    with pytest.raises(config_utils.ConfigError, match="config.model.metadata"):
        config_utils.validate_config(config)
    config.model.metadata = "age, sex,tbp_lv_*"
    config_utils.validate_config(config)
