"""Every family through the real trainer: one short run each (the small test architectures,
32 px), interrupted and resumed, then evaluated (report with Grad-CAM, the stacking features),
exported (jax.export with a symbolic batch) and used by `predict` with TTA.

The runs spread the settings over the families: pmap + bfloat16 + the metadata branch + frozen
stages + a head-only warm-up for EfficientNet (BatchNorm under pmap); jit + layer decay for
ConvNeXt; jit + bfloat16 + layer decay + a frozen stem for ViT (ConvNeXt and ViT have no
BatchNorm: empty `batch_stats` through checkpoints, EMA and export). All of them: gradient
accumulation, EMA, dropout and stochastic depth (standard_config).
"""

from __future__ import annotations

import csv
import pathlib

import jax
import numpy as np
import pytest
from PIL import Image
from train_helpers import compile_cache, make_data, restore_params, standard_config  # noqa: F401

pytestmark = [pytest.mark.usefixtures("compile_cache"), pytest.mark.slow]

CASES = {
    "efficientnet_test": {"train.parallelism": "pmap", "model.dtype": "bfloat16",
                          "model.metadata": "age,sex,site", "finetune.freeze_stages": 2,
                          "finetune.head_warmup_epochs": 0.5},
    "convnext_test": {"train.parallelism": "jit", "finetune.layer_decay": 0.8},
    "vit_test": {"train.parallelism": "jit", "model.dtype": "bfloat16",
                 "finetune.layer_decay": 0.75, "finetune.freeze_stages": 1},
}


def _images(folder: pathlib.Path, n: int = 3) -> pathlib.Path:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        pixels = rng.integers(60, 200, (48, 56, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"ISIC_{i:07d}.jpg", quality=90)
    return folder


@pytest.mark.parametrize("name", list(CASES))
def test_train_resume_evaluate_export_predict(name, tmp_path, capsys) -> None:
    from isic_jax import config_utils
    from isic_jax.evaluation import evaluate
    from isic_jax.inference import export, predict
    from isic_jax.testing import runs
    from isic_jax.training import parallel

    config = standard_config(**{"model.name": name, "model.drop_path": 0.1, **CASES[name]})
    workdir = tmp_path / "run"
    data = make_data(config)
    assert runs.train(config, workdir, data=data, stop_after_step=4)["step"] == 4
    capsys.readouterr()
    resumed = runs.train(config, workdir, data=make_data(config))
    assert "checkpoints/3 (3/6)" in capsys.readouterr().out
    assert resumed["step"] == 6 and np.isfinite(resumed["val"]["loss"])
    first, last = restore_params(workdir, 3), restore_params(workdir, 6)
    trained = [k for k in last if "params" in k and not np.array_equal(first[k], last[k])]
    assert trained, "no parameter moved between steps 3 and 6"
    if name != "efficientnet_test":
        assert not any("batch_stats" in k and "ema" not in k for k in last)  # no BatchNorm
    if CASES[name].get("finetune.freeze_stages"):
        frozen = [k for k in last if "'stem" in k and "params" in k and "opt_state" not in k
                  and "ema" not in k]
        assert frozen and all(np.array_equal(first[k], last[k]) for k in frozen)

    # Evaluation with the report (Grad-CAM of the worst mistakes) and the stacking features.
    saved = config_utils.load_config(workdir)
    par = parallel.DataParallel.create(saved.train.parallelism, jax.devices()[:1])
    features = tmp_path / "features.csv"
    metrics = evaluate.evaluate_run(workdir, saved, make_data(saved), par, "val", "latest",
                                    report=True, features_path=features)
    assert 0.0 <= metrics["auc"] <= 1.0 and "mistakes.png" in metrics["figures"]
    with open(features, newline="") as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == metrics["num_examples"] and "emb_0" in table[0]

    # Export (symbolic batch, verified against evaluation) and predict with TTA.
    meta = export.export_checkpoint(workdir, tmp_path / "export", "latest")
    assert meta["export"]["symbolic_batch"] == "b" and "cpu" in meta["export"]["platforms"]
    assert meta["export"]["verified_max_abs_diff"] <= meta["export"]["tolerance"]
    folder = _images(tmp_path / "images")
    summary = predict.predict_to_csv(tmp_path / "export", folder, tmp_path / "p.csv",
                                     tta_flips=True, progress=False)
    assert len(summary.items) == 3 and not any(summary.errors)
    with open(tmp_path / "p.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 3
    assert all(0.0 <= float(r["malignant_probability"]) <= 1.0 for r in rows)
    if name != "efficientnet_test":
        # The checkpoint backend restores the exported variables (an empty batch_stats here)
        # and rebuilds the model: the same numbers as the jax.export artefact.
        predict.predict_to_csv(tmp_path / "export", folder, tmp_path / "c.csv", tta_flips=True,
                               backend="checkpoint", progress=False)
        with open(tmp_path / "c.csv", newline="") as fh:
            again = list(csv.DictReader(fh))
        np.testing.assert_allclose([float(r["malignant_probability"]) for r in again],
                                   [float(r["malignant_probability"]) for r in rows], atol=1e-5)


def test_an_ensemble_mixes_families_that_share_the_inputs(tmp_path) -> None:
    """A ResNet and a ConvNeXt (ImageNet normalisation both) make one ensemble export that
    `predict` uses; a ViT normalised as timm's ViT weights are (mean = std = 0.5) is refused,
    naming what differs."""
    from isic_jax.inference import ensemble, export, predict
    from isic_jax.testing import runs

    members = {}
    own = {"vit_test": {"data.mean": (0.5, 0.5, 0.5), "data.std": (0.5, 0.5, 0.5)}}
    for name in ("resnet_tiny", "convnext_test", "vit_test"):
        config = standard_config(**{"model.name": name, **own.get(name, {})})
        members[name] = tmp_path / name
        runs.train(config, members[name], data=make_data(config))
    meta = ensemble.export_ensemble([members["resnet_tiny"], members["convnext_test"]],
                                    tmp_path / "ens")
    assert [m["model"]["name"] for m in meta["members"]] == ["resnet_tiny", "convnext_test"]
    assert meta["export"]["verified_max_abs_diff"] <= meta["export"]["tolerance"]
    summary = predict.predict_to_csv(tmp_path / "ens", _images(tmp_path / "images"),
                                     tmp_path / "p.csv", progress=False)
    assert len(summary.items) == 3 and not any(summary.errors)
    with pytest.raises(export.ExportError, match="vit_test cannot join an ensemble") as err:
        ensemble.export_ensemble([members["resnet_tiny"], members["vit_test"]], tmp_path / "bad")
    assert "mean" in str(err.value)
    assert not (tmp_path / "bad").exists()
