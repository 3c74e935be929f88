"""Ready for an accelerator: the install extras, the device check's wheel list, its CPU dry run.

- pyproject's cuda12/cuda13/tpu extras name JAX's own extras within the project's jax pin, and
  the installed jax (0.10.2 on Python 3.11, 0.12 on 3.12) provides those extras;
- scripts/device_requirements.txt carries exactly what a lent GPU machine's image lacks: the
  project's runtime dependency closure for Python 3.12 on x86-64 Linux (from the installed
  packages' Requires-Dist, markers evaluated for that target) minus the image's packages
  (scripts/device_image_packages.txt), with versions inside the pins (static: no network);
- scripts/device_check.sh --dry-run runs every stage, tiny, on this CPU and writes the report
  files a lent machine's $OUT takes back;
- `isic-jax` sets no XLA:CPU flags where JAX will run on a GPU/TPU.
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys
import tomllib

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
# The lent machines' image: CPython 3.12 on x86-64 Linux.
TARGET = dict(default_environment(), python_version="3.12", python_full_version="3.12.3",
              sys_platform="linux", platform_system="Linux", platform_machine="x86_64",
              os_name="posix", implementation_name="cpython",
              platform_python_implementation="CPython")


def _pyproject() -> dict:
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]


def _device_check_module():
    spec = importlib.util.spec_from_file_location("device_check", SCRIPTS / "device_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------- extras


@pytest.mark.parametrize("extra", ["cuda12", "cuda13", "tpu"])
def test_accelerator_extras_stay_inside_the_jax_pin(extra: str) -> None:
    project = _pyproject()
    (core,) = [Requirement(r) for r in project["dependencies"] if Requirement(r).name == "jax"]
    reqs = [Requirement(r) for r in project["optional-dependencies"][extra]]
    assert [(r.name, r.extras) for r in reqs] == [("jax", {extra})]
    spec = reqs[0].specifier
    # Every release the extra allows, the core pin allows too, and some exist: probe the
    # versions around the pin's bounds.
    probes = [Version(f"0.{minor}.{patch}") for minor in range(8, 15) for patch in range(6)]
    allowed = [v for v in probes if spec.contains(v)]
    assert allowed and all(core.specifier.contains(v) for v in allowed), (spec, core.specifier)
    assert spec.contains(Version(md.version("jax")))
    # The jax installed here (0.10.2 / 0.12) has that extra.
    assert extra in (md.distribution("jax").metadata.get_all("Provides-Extra") or [])


# --------------------------------------------------------------------------------- wheel list


def _names(path: pathlib.Path) -> list[str]:
    return [line.split("#")[0].strip() for line in path.read_text().splitlines()
            if line.split("#")[0].strip()]


def _carried() -> dict[str, tuple[Version, bool]]:
    """device_requirements.txt: name -> (pinned version, a fallback)."""
    out = {}
    for line in (SCRIPTS / "device_requirements.txt").read_text().splitlines():
        spec = line.split("#")[0].strip()
        if not spec:
            continue
        name, _, version = spec.partition("==")
        assert version, f"{line!r}: pin one version (NAME==VERSION)"
        key = canonicalize_name(name)
        assert key not in out, f"{name} listed twice"
        out[key] = (Version(version), "# fallback" in line)
    return out


def _needs(requirement: Requirement, extras: set[str], only_extras: bool) -> bool:
    """Whether `requirement` applies on the target for these extras (only_extras: only where an
    extra brings it)."""
    if requirement.marker is None:
        return not only_extras
    plain = requirement.marker.evaluate(dict(TARGET, extra=""))
    if plain:
        return not only_extras
    return any(requirement.marker.evaluate(dict(TARGET, extra=e)) for e in extras)


def runtime_closure(image: set[str]) -> tuple[dict[str, set[str]], list[str]]:
    """The packages the project needs on the target that the image lacks (name -> who needs it),
    walking the installed packages' Requires-Dist. Image packages are taken as they are (their
    own needs met there), except for what an extra asked of them brings; and problems found."""
    needed: dict[str, set[str]] = {}
    extras_of: dict[str, set[str]] = {}
    problems: list[str] = []
    todo = [(Requirement(r), "isic-jax") for r in _pyproject()["dependencies"]]
    while todo:
        req, parent = todo.pop()
        name = canonicalize_name(req.name)
        new_extras = set(req.extras) - extras_of.get(name, set())
        seen = name in extras_of
        extras_of.setdefault(name, set()).update(req.extras)
        in_image = name in image
        if not in_image:
            needed.setdefault(name, set()).add(parent)
        if seen and not new_extras:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            if not in_image:
                problems.append(f"{name} (needed by {parent}) is not installed here: its own "
                                f"needs cannot be checked")
            continue
        for text in dist.requires or []:
            sub = Requirement(text)
            if in_image:  # only what the extras asked of an image package bring
                if _needs(sub, new_extras, only_extras=True):
                    todo.append((sub, name))
            elif _needs(sub, extras_of[name], only_extras=False):
                todo.append((sub, name))
    return needed, problems


def test_device_wheels_are_the_runtime_closure_minus_the_image() -> None:
    image = {canonicalize_name(n) for n in _names(SCRIPTS / "device_image_packages.txt")}
    carried = _carried()
    needed, problems = runtime_closure(image)
    assert problems == []
    missing = sorted(set(needed) - set(carried))
    assert missing == [], {m: sorted(needed[m]) for m in missing}
    missing_only = {n for n, (_, fallback) in carried.items() if not fallback}
    assert sorted(missing_only - set(needed)) == [], "carried but not needed"
    # Fallbacks are image packages (installed there only where the image's version misses a
    # requirement); the project's own pins hold for every carried version.
    pins = {canonicalize_name(Requirement(r).name): Requirement(r).specifier
            for r in _pyproject()["dependencies"]}
    for name, (version, fallback) in carried.items():
        assert (name in image) == fallback, f"{name}: in the image <=> a fallback"
        if name in pins:
            assert pins[name].contains(version), f"{name}=={version} outside {pins[name]}"


def test_carried_versions_meet_each_others_requirements() -> None:
    carried = _carried()
    for name, (version, _) in carried.items():
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        if Version(dist.version) != version:
            continue  # another version here: its metadata says nothing about the carried one
        for text in dist.requires or []:
            req = Requirement(text)
            other = canonicalize_name(req.name)
            if other in carried and _needs(req, set(), only_extras=False):
                assert req.specifier.contains(carried[other][0], prereleases=True), (
                    f"{name}=={version} needs {text}; carried {carried[other][0]}")


def test_fetch_script_reads_the_list_and_targets_python_312() -> None:
    text = (SCRIPTS / "fetch_device_wheels.sh").read_text()
    assert "scripts/device_requirements.txt" in text
    assert "--python-version 3.12" in text and "--only-binary=:all:" in text
    assert "/.whl/" in (REPO / ".gitignore").read_text().split()


# ----------------------------------------------------------------------------------- dry run


@pytest.mark.slow
def test_device_check_dry_run(tmp_path: pathlib.Path) -> None:
    """Every stage of the check, tiny, on this CPU (~1-2 minutes on 2 busy cores)."""
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable, INSTALL_WHEELS="0",
               SITE=str(tmp_path / "site"), PROJECT=str(tmp_path / "project"),
               DEVICE_CHECK_BUDGET_S="480")
    env.pop("OUT", None)
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(["bash", str(SCRIPTS / "device_check.sh"), "--dry-run",
                           "--workdir", str(tmp_path / "work"), "--out", str(out)],
                          env=env, cwd=str(tmp_path), capture_output=True, text=True,
                          timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    # What a lent machine's $OUT takes back: <= 8 plain files of <= 16 MiB, no deeper folders.
    files = sorted(p.name for p in out.iterdir())
    assert files == ["device_check.log", "profile.tar.gz", "results.json", "runs.tar.gz",
                     "summary.txt"]
    assert all(p.is_file() and p.stat().st_size < 16 * 2**20 for p in out.iterdir())
    rows = {r["stage"]: r for r in json.loads((out / "results.json").read_text())["stages"]}
    assert {k: r["status"] for k, r in rows.items()} == dict.fromkeys(
        ["env", "data", "bench", "pipeline", "loop", "default",
         "preset:configs/efficientnet_b3.py"], "ok")
    assert rows["bench"]["images_per_s"] > 0 and rows["bench"]["achieved_tflop_s"] > 0
    assert rows["pipeline"]["images_per_s"] > 0 and rows["loop"]["vs_bare_step"] > 0
    assert rows["default"]["checkpoint"] and rows["default"]["images_per_s"] > 0
    summary = (out / "summary.txt").read_text()
    assert proc.stdout.rstrip().endswith(summary.rstrip())  # the table comes last
    assert "profile/plugins/profile" in subprocess.run(
        ["tar", "tzf", str(out / "profile.tar.gz")], capture_output=True, text=True).stdout


def test_device_check_reads_train_logs_and_sizes_the_default_batch() -> None:
    dc = _device_check_module()
    log = "\n".join(f"[train step {10 * i:>3}/100] loss 0.6931  lr 1.00e-03  img/s {r}  "
                    f"s/step 0.0850" for i, r in enumerate([12.0, 2500.0, 3000.0, 3010.0,
                                                            2990.0], start=1))
    rate, rates = dc.loop_images_per_s(log)
    assert rates == [12.0, 2500.0, 3000.0, 3010.0, 2990.0] and rate == 3000.0
    ctx = {"bench": {"step_temp_gib": 30.0, "batch": 256, "image_size": 224},
           "default_config": {"batch": 256, "image_size": 384}, "memory_limit_gib": 70.0}
    overrides: dict = {}
    note = dc._halve_if_too_big(ctx, overrides)  # 30 GiB x (384/224)^2 = 88 GiB > 70
    assert overrides["train.batch_size"] == 128 and "88 GiB" in note
    ctx["memory_limit_gib"] = 120.0
    assert dc._halve_if_too_big(ctx, overrides := {}) == "" and overrides == {}


# ----------------------------------------------------------------------------------- runtime


def test_no_cpu_xla_flags_where_jax_uses_an_accelerator(monkeypatch, tmp_path) -> None:
    from isic_jax import runtime

    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    monkeypatch.delitem(sys.modules, "jax", raising=False)  # as before jax is imported
    monkeypatch.setattr(runtime, "accelerator_present", lambda: True)
    assert runtime.set_default_xla_flags() is None and "XLA_FLAGS" not in os.environ
    monkeypatch.undo()
    # The detection: an installed plugin and its device node, both needed.
    node = tmp_path / "nvidiactl"
    node.touch()
    for modules, nodes, expected in ((("json",), (str(node),), True),
                                     (("no_such_jax_plugin_xyz",), (str(node),), False),
                                     (("json",), (str(tmp_path / "missing"),), False)):
        monkeypatch.setattr(runtime, "_ACCELERATORS", ((modules, nodes),))
        assert runtime.accelerator_present() is expected


def test_bench_train_gpu_report_lines() -> None:
    sys.path.insert(0, str(SCRIPTS))
    try:
        import bench_train
    finally:
        sys.path.remove(str(SCRIPTS))
    report = {"platform": "gpu", "device": "NVIDIA H100 80GB HBM3", "model": "resnet50",
              "image_size": 224, "batch": 256, "bf16_matmul_peak_tflop_s": 760.0,
              "bf16_spec_peak_tflop_s": 989.0, "images_per_s": 3200.0, "step_ms": 80.0,
              "vs_a100_anchor": 3200 / 2470, "vs_mlperf_h100": 3200 / 7000,
              "achieved_tflop_s": 78.0, "step_tflop": 6.24, "fraction_of_measured_peak": 0.103,
              "init_s": 12.0, "compile_s": 50.0,
              "input_pipeline": {"images_per_s": 5100.0, "workers": 16, "first_batch_s": 9.0}}
    text = "\n".join(bench_train.gpu_lines(report))
    assert "3200 img/s" in text and "10.3 % of the measured bf16 matmul peak" in text
    assert "5100 img/s with 16 Grain workers" in text
    assert re.search(r"1\.30x the A100 anchor", text)
