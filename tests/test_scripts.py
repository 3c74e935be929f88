"""The benchmark scripts keep up with the package: every isic_jax name they import exists, and the
bench_train side-by-side path runs end to end on a tiny case (PyTorch's side when torch is
importable here, else its "not run" message)."""

from __future__ import annotations

import ast
import importlib
import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = sorted((REPO / "scripts").glob("*.py"))


def _package_references(tree: ast.AST) -> list[tuple[str, str | None]]:
    """(module, name) for `from isic_jax.x import name` and (module, None) for `import
    isic_jax.x`, plus (module, attr) for `runtime.attr`-style uses of imported modules."""
    refs: list[tuple[str, str | None]] = []
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("isic_jax"):
            for alias in node.names:
                refs.append((node.module, alias.name))
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            refs += [(a.name, None) for a in node.names if a.name.startswith("isic_jax")]
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in aliases):
            refs.append((aliases[node.value.id], node.attr))
    return refs


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_imports_resolve(script: pathlib.Path) -> None:
    missing = []
    for module_name, name in _package_references(ast.parse(script.read_text())):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError:
            parent, _, last = module_name.rpartition(".")
            if not hasattr(importlib.import_module(parent), last):
                missing.append(module_name)
            continue
        if name is not None and not hasattr(module, name):
            try:
                importlib.import_module(f"{module_name}.{name}")
            except ModuleNotFoundError:
                missing.append(f"{module_name}.{name}")
    assert not missing, f"{script.name} uses names the package no longer has: {missing}"


@pytest.mark.slow
def test_bench_train_side_by_side_runs() -> None:
    code = (
        "import sys; sys.argv = ['bench_train.py']; sys.path.insert(0, 'scripts');"
        "import bench_train as bt; bt.TORCH_CASES = (('resnet18', 40, 2),);"
        "rows = bt.bench_vs_torch(sys.executable, quick=True); r = rows[0];"
        "assert r['step_auto'] > 0 and r['step_xla'] > 0 and r['loop'] > 0, r;"
        "t = r['torch']; assert t.get('images_per_s', 0) > 0 or 'PyTorch not run' in t['error'], t;"
        "print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=str(REPO), capture_output=True,
                         text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "ok"


def test_bench_layers_vs_torch_runs() -> None:
    out = subprocess.run(
        [sys.executable, "scripts/bench_layers_vs_torch.py", "--only", "s4 proj", "--calls", "1",
         "--json"], cwd=str(REPO), capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for side in ("isic_jax", "isic_jax_1_core"):
        assert list(result[side]) == ["s4 proj 1x1/2"], result
        assert all(result[side]["s4 proj 1x1/2"][p] > 0 for p in ("fwd", "dx", "dw")), result
    torch_side = result["torch"]
    assert "torch not run" in torch_side.get("error", "") or all(
        torch_side["s4 proj 1x1/2"][p] > 0 for p in ("fwd", "dx", "dw")), torch_side
    assert "dw   isic_jax" in out.stdout


@pytest.mark.slow
def test_bench_augment_runs() -> None:
    out = subprocess.run(
        [sys.executable, "scripts/bench_augment.py", "--model", "resnet_tiny", "--width", "4",
         "--size", "32", "--batch", "4", "--steps", "1", "--rounds", "1",
         "--only", "none,cutout,mixup,msd5,swa", "--stored", "40", "--host-batches", "1",
         "--json"],
        cwd=str(REPO), capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert list(result["steps"]) == ["none", "cutout", "mixup", "msd5", "swa"]
    assert all(r["step_ms"] > 0 and r["aug_ms"] > 0 for r in result["steps"].values())
    assert all("added_ms" in result["steps"][n] for n in ("cutout", "mixup", "msd5", "swa"))
    assert all(v > 0 for v in result["host_img_per_s"].values())
    assert "added ms" in out.stdout and "host pipeline" in out.stdout


@pytest.mark.slow
def test_augment_preview_writes_a_png(tmp_path: pathlib.Path) -> None:
    output = tmp_path / "preview.png"
    out = subprocess.run(
        [sys.executable, "scripts/augment_preview.py", "--config", "smoke", "--synthetic",
         "--num", "2", "--size", "40", "--output", str(output),
         "--config-override", "data.augment.cutout_p=0.5"],
        cwd=str(REPO), capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "2 images x 12 columns" in out.stdout


def _ablate(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "scripts/ablate_sample.py", *args], cwd=str(REPO),
                          capture_output=True, text=True, timeout=900, check=False,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})})


def test_ablate_sample_dry_run_lists_the_recipe_variants(tmp_path: pathlib.Path) -> None:
    sys.path.insert(0, str(REPO / "scripts"))
    import ablate_sample

    variants = ablate_sample.parse_variants(ablate_sample.RECIPE_VARIANTS)
    assert variants[0] == ("recipe", [])
    out = _ablate("--data-dir", str(tmp_path / "d"), "--out", str(tmp_path / "o"), "--dry-run",
                  "--set", "train.num_epochs=2", "--seeds", "0,1")
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert len(lines) == len(variants)
    for line, (name, overrides) in zip(lines, variants, strict=True):
        assert f"--workdir={tmp_path / 'o' / name}" in line
        assert f"--config.data.data_dir={tmp_path / 'd'}" in line
        assert "--config.train.num_epochs=2" in line and line.endswith("--seeds=0,1")
        assert all(f"--config.{o}" in line for o in overrides)
    assert not (tmp_path / "o").exists()
    bad = tmp_path / "bad.txt"
    bad.write_text("a model.dropout=0.1\na\n")
    out = _ablate("--data-dir", "d", "--out", str(tmp_path / "o"), "--variants", str(bad))
    assert out.returncode != 0 and "listed twice" in out.stderr
    out = _ablate("--data-dir", "d", "--out", str(tmp_path / "o"), "--only", "nope")
    assert out.returncode != 0 and "unknown variants ['nope']" in out.stderr


@pytest.mark.slow
def test_ablate_sample_runs_cv_per_variant_and_resumes(tmp_path: pathlib.Path) -> None:
    """Two variants of a tiny model on a 2-fold synthetic dataset, 2 steps a fold; a rerun skips
    both. The second variant compiles the same programs (the compilation cache serves them)."""
    from isic_jax.data import prepare, synth

    synth.write_synthetic(tmp_path / "src", "isic2020", 24, 0, 0.5, image_size=48)
    prepare.prepare(tmp_path / "src", tmp_path / "tfds", image_size=40, num_folds=2)
    variants = tmp_path / "variants.txt"
    variants.write_text(
        "# name overrides\nbase\nlow_threshold eval.threshold=0.4  # same programs\n")
    tiny = ["data.stored_size=40", "data.image_size=32", "model.width=4", "train.batch_size=8",
            "eval.batch_size=8", "train.num_steps=2", "train.eval_every=2",
            "train.checkpoint_every=2", "eval.bootstrap_samples=0"]
    args = ["--config", "smoke", "--data-dir", str(tmp_path / "tfds"), "--out",
            str(tmp_path / "out"), "--variants", str(variants)]
    args += [a for kv in tiny for a in ("--set", kv)]
    env = {"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    out = _ablate(*args, env=env)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    rows = json.loads((tmp_path / "out" / "ablation.json").read_text())
    assert [r["variant"] for r in rows] == ["base", "low_threshold"]
    for row in rows:
        assert row["complete"] and row["members"] == 2 and len(row["fold_aucs"]) == 2
        assert 0.0 <= row["oof_auc"] <= 1.0 and row["wall_s"] > 0 and row["cpu_s"] > 0
        record = json.loads((tmp_path / "out" / f"{row['variant']}.run.json").read_text())
        assert record["returncode"] == 0 and record["attempts"] == 1
    # Thresholds change no AUC: the same programs and data give the same probabilities.
    assert rows[0]["oof_auc"] == rows[1]["oof_auc"]
    table = (tmp_path / "out" / "ablation.md").read_text()
    assert "| low_threshold |" in table and "+0.000" in table and "eval.threshold=0.4" in table
    again = _ablate(*args, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("complete, skipped") == 2
    assert json.loads((tmp_path / "out" / "base.run.json").read_text())["attempts"] == 1
