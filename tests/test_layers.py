"""The package's imports run one way: every import of a module of isic_jax (at the top of a
module or inside a function) points to a lower layer, or stays inside its own unit. No
exceptions are listed; a new import that points up or sideways fails here."""

from __future__ import annotations

import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO / "isic_jax"

# Top to bottom. A unit is a subpackage or a top-level module of isic_jax; units of one layer
# do not import each other.
LAYERS: list[set[str]] = [
    {"testing"},  # test helpers: the CLI and runs with injected hooks, data and devices
    {"__main__"},  # python -m isic_jax
    {"cli"},
    {"commands"},
    {"inference"},  # export, predict, ensembles, model cards
    {"evaluation"},  # evaluate, cross-validation, reports, Grad-CAM, bootstrap
    {"pretraining"},  # self-supervised pretraining (BYOL) on the training loop, the k-NN probe
    {"training"},  # the loop, steps, checkpoints, weight sources, prediction over a split
    {"metrics", "config_utils"},
    {"models"},
    {"data"},
    {"configs"},  # the presets (ml_collections only)
    {"logging_utils", "runtime", "utils", "value_checks"},
]
RANK = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}


def _unit(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "isic_jax" or len(parts) < 2:
        return None
    return parts[1]


def _imports() -> list[tuple[str, int, str, str]]:
    """(file, line, importing unit, imported unit) of every import of isic_jax's own modules."""
    out = []
    # configs/ is shipped as isic_jax.configs (pyproject's package-dir).
    files = [(p, p.relative_to(REPO).with_suffix("").parts) for p in PACKAGE.rglob("*.py")]
    files += [(p, ("isic_jax", "configs", p.stem)) for p in (REPO / "configs").glob("*.py")]
    for path, parts in sorted(files):
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                # `from isic_jax import metrics` imports the unit `metrics`.
                targets = [f"{base}.{alias.name}" if base == "isic_jax" else base
                           for alias in node.names]
            else:
                continue
            for target in targets:
                src, dst = _unit(module), _unit(target)
                if src and dst and src != dst:
                    out.append((str(path.relative_to(REPO)), node.lineno, src, dst))
    return out


def test_every_unit_has_a_layer() -> None:
    units = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
             if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").is_file()}
    units.add("configs")
    assert units == set(RANK), f"units without a layer: {sorted(units - set(RANK))}"


def test_imports_point_down() -> None:
    wrong = [f"{file}:{line}: {src} imports {dst}" for file, line, src, dst in _imports()
             if RANK[dst] <= RANK[src]]
    assert not wrong, "imports that do not point down:\n" + "\n".join(wrong)


def test_the_library_never_imports_the_test_helpers() -> None:
    users = {src for _, _, src, dst in _imports() if dst == "testing"}
    assert not users, users


@pytest.mark.parametrize("unit", ["data", "models", "config_utils", "metrics"])
def test_lower_units_import_no_training_code(unit) -> None:
    """The layers the trainer builds on do not reach into it (a cycle would start here)."""
    above = {u for u, rank in RANK.items() if rank <= RANK["training"]}
    bad = [(f, line, dst) for f, line, src, dst in _imports() if src == unit and dst in above]
    assert not bad, bad
