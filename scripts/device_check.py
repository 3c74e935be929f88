"""One call on a bare GPU machine turns into measured training speed (run by device_check.sh).

    bash scripts/device_check.sh             # on the GPU machine: installs .whl/, then this
    python scripts/device_check.py --dry-run # here: the same stages, tiny, on the CPU (~1 min)

Stages, each under its own time limit inside one overall budget (DEVICE_CHECK_BUDGET_S, default
480 s); a stage that fails or runs out of time is reported in the table and the next ones still
run (all but `env`: without the packages nothing else can run):

  env      Python, the project's dependencies against its pins, the imports, the devices
  data     `isic-jax synth` + `isic-jax prepare` on this machine's cores: stored at 256 px (for
           224 px training) and at 512 px (configs/default.py)
  bench    scripts/bench_train.py --gpu: the bare train step (ResNet-50, 224 px, bfloat16,
           batch 256, batches already on the GPU), the bf16 matmul peak it is compared with, the
           input pipeline alone (Grain, all host cores), and a jax.profiler trace of a few steps
  loop     the real `isic-jax train` loop for the same net, size and batch (Grain workers on all
           host cores, device prefetch, metric pulls): loop img/s / bare-step img/s
  default  `isic-jax train --config configs/default.py` as it is (384 px, batch 256, pmap), a few
           dozen steps, its evaluation and checkpoint; on out-of-memory once more at half batch
  preset   one such run per config in EXTRA_PRESETS (device_check.sh, or --extra-presets)

The table comes last on stdout. With $OUT set (or --out), it also writes there: summary.txt,
results.json, device_check.log (every stage's full output), profile.tar.gz (the trace), and
runs.tar.gz (the runs' config, TensorBoard events and evaluation, no checkpoints).

Standard library only: it starts before the carried packages are known to import.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]

# Goals and anchors the table compares with (ResNet-50, 224 px, bf16/mixed precision, training).
GOAL_BARE_IMG_S = 3000.0  # one H100, bare step
GOAL_LOOP_RATIO = 0.95  # real loop / bare step
A100_ANCHOR_IMG_S = 2470.0  # NVIDIA's PyTorch ResNet-50, one A100, AMP
MLPERF_H100_IMG_S = 7000.0  # MLPerf Training H100 systems, per GPU (~)

SIZES = {
    # The lent GPU machine: ResNet-50 at 224 px, batch 256, 16 host cores.
    "gpu": dict(num_images=1536, synth_size=352, stored=256, stored_default=512,
                model="resnet50", width=64, image=224, batch=256, bench_steps=20,
                loop_steps=100, log_every=10, default_steps=40, default_log_every=10,
                preset_steps=40, matmul_n=8192),
    # --dry-run: every stage, tiny, on this CPU.
    "dry": dict(num_images=48, synth_size=128, stored=96, stored_default=112,
                model="resnet_tiny", width=8, image=72, batch=8, bench_steps=3,
                loop_steps=6, log_every=2, default_steps=4, default_log_every=2,
                preset_steps=4, matmul_n=256),
}  # fmt: skip
# Seconds each stage may take at most (the overall budget may leave less).
STAGE_LIMITS = {"env": 90, "data": 120, "bench": 210, "loop": 150, "default": 180,
                "preset": 150}
RESERVE_S = 10  # kept for the report

OOM = re.compile(r"RESOURCE_EXHAUSTED|[Oo]ut of memory|OOM when allocating")
TRAIN_LINE = re.compile(r"^\[train step\s+(\d+)/(\d+)\].*?\bimg/s (\S+)", re.M)


class Budget:
    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def limit(self, stage_max: float) -> float:
        return min(stage_max, self.left() - RESERVE_S)


def run(cmd: list[str], log: pathlib.Path, timeout: float, env: dict) -> tuple[int | None, float]:
    """Runs cmd (its output appended to log) in a session of its own; on timeout the whole
    session (Grain workers too) is stopped. Returns (exit status or None on timeout, seconds).

    The working directory is the log's folder, not the checkout: `python -m`/`-c` put it first
    on sys.path, and the checkout's isic_jax/ there would shadow the importable package (whose
    isic_jax.configs is the checkout's configs/)."""
    start = time.monotonic()
    with open(log, "a") as f:
        shown = ["<code>" if "\n" in arg else arg for arg in cmd]
        f.write(f"\n$ {' '.join(shown)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=str(log.parent),
                                env=env, start_new_session=True)
        try:
            rc: int | None = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            rc = None
            for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
            f.write(f"\n[device_check] stopped after {timeout:.0f} s (time limit)\n")
    return rc, time.monotonic() - start


class Stage:
    """One row of the table: status, seconds, result text, and the numbers behind it."""

    def __init__(self, name: str, work: pathlib.Path):
        self.name = name
        self.log = work / "logs" / (re.sub(r"[^A-Za-z0-9_.-]", "_", name) + ".log")
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.log.write_text("")
        self.status = "skipped"
        self.seconds = 0.0
        self.result = ""
        self.data: dict = {}

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def row(self) -> dict:
        return {"stage": self.name, "status": self.status, "seconds": round(self.seconds, 1),
                "result": self.result, **self.data}


def _status(rc: int | None) -> str:
    return "ok" if rc == 0 else ("timeout" if rc is None else f"failed (exit {rc})")


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()
             and not line.startswith(("$ ", "[device_check]"))]
    error = next((line for line in reversed(lines)
                  if re.search(r"Error|error:|Traceback|RESOURCE_EXHAUSTED", line)), None)
    return (error or (lines[-1] if lines else ""))[:300]


def loop_images_per_s(text: str) -> tuple[float | None, list[float]]:
    """Steady img/s of an `isic-jax train` log: the median of its logged intervals after the
    first two (compilation, pipeline warm-up); all intervals as logged."""
    rates = [float(m.group(3)) for m in TRAIN_LINE.finditer(text)]
    steady = rates[2:] if len(rates) >= 4 else rates[1:] or rates
    return (statistics.median(steady) if steady else None), rates


# ---------------------------------------------------------------------------------------- stages

ENV_CODE = r"""
import importlib, importlib.metadata as md, json, os, sys
report = {"python": sys.version.split()[0], "cpus": os.cpu_count()}
try:
    import tomllib
    from packaging.requirements import Requirement
    with open(os.path.join(sys.argv[1], "pyproject.toml"), "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    versions = {}
    for text in deps:
        req = Requirement(text)
        try:
            v = md.version(req.name)
            ok = req.specifier.contains(v, prereleases=True)
            versions[req.name] = [v, ok, str(req.specifier)]
        except md.PackageNotFoundError:
            versions[req.name] = [None, False, str(req.specifier)]
    report["dependencies"] = versions
except Exception as e:
    report["dependencies_error"] = repr(e)
failed = []
for name in ("isic_jax.cli", "isic_jax.commands.train", "isic_jax.commands.prepare", "grain",
             "tensorflow_datasets", "array_record", "ml_collections", "tensorboardX", "pydicom",
             "flax", "optax", "orbax.checkpoint"):
    try:
        importlib.import_module(name)
    except Exception as e:
        failed.append(f"{name}: {type(e).__name__}: {e}")
report["import_failures"] = failed
report["from"] = {name: getattr(sys.modules.get(name), "__file__", None)
                  for name in ("isic_jax", "grain", "tensorflow_datasets", "flax")}
try:
    from isic_jax.configs import default
    c = default.get_config()
    report["default_config"] = {"image_size": c.data.image_size, "batch": c.train.batch_size,
                                "model": c.model.name, "parallelism": c.train.parallelism}
except Exception as e:
    failed.append(f"configs/default.py: {type(e).__name__}: {e}")
import jax
report["jax"] = jax.__version__
report["devices"] = [f"{d.platform}:{d.device_kind}" for d in jax.devices()]
report["backend"] = jax.default_backend()
try:
    report["memory_limit_gib"] = jax.devices()[0].memory_stats()["bytes_limit"] / 2**30
except Exception:
    pass
print("ENV_JSON " + json.dumps(report))
for name, (v, ok, spec) in sorted(report.get("dependencies", {}).items()):
    print(f"  {name:<22} {v or 'MISSING':<14} {'ok' if ok else 'OUTSIDE ' + spec}")
for line in failed:
    print("  import failed:", line)
want_accelerator = os.environ.get("DEVICE_CHECK_DRY_RUN") != "1"
sys.exit(1 if failed or (want_accelerator and report["backend"] == "cpu") else 0)
"""


def stage_env(st: Stage, ctx: dict, budget: Budget) -> None:
    env, py = ctx["env"], ctx["python"]
    if shutil.which("nvidia-smi"):
        run(["nvidia-smi"], st.log, min(30, budget.limit(30)), env)
    rc, st.seconds = run([py, "-c", ENV_CODE, str(REPO)], st.log,
                         budget.limit(STAGE_LIMITS["env"]), env)
    st.status = _status(rc)
    found = re.search(r"^ENV_JSON (.*)$", st.text(), re.M)
    if found:
        info = json.loads(found.group(1))
        st.data.update(info)
        ctx["default_config"] = info.get("default_config")
        ctx["memory_limit_gib"] = info.get("memory_limit_gib")
        outside = [f"{k} {v[0]}" for k, v in info.get("dependencies", {}).items() if not v[1]]
        st.result = (f"Python {info['python']}, jax {info['jax']} on {info['backend']} "
                     f"({', '.join(sorted(set(info['devices'])))}), {info['cpus']} host cores")
        if outside:
            st.result += f"; outside the pins: {', '.join(outside)}"
        if info["import_failures"]:
            st.result += f"; import failed: {'; '.join(info['import_failures'])[:300]}"
        if rc and not info["import_failures"] and info["backend"] == "cpu" and not ctx["dry"]:
            st.result += "; no GPU visible to jax"
    else:
        st.result = _last_line(st.text())


def stage_data(st: Stage, ctx: dict, budget: Budget) -> None:
    s, env, work, isic = ctx["sizes"], ctx["env"], ctx["work"], ctx["isic_jax"]
    src, tfds = work / "synth", work / "tfds"
    steps = [("synth", [*isic, "synth", "--output", str(src), "--format", "isic2020",
                        "--num-images", str(s["num_images"]), "--image-size", str(s["synth_size"]),
                        "--seed", "0"])]
    for size in dict.fromkeys((s["stored"], s["stored_default"])):
        steps.append((f"prepare {size} px", [*isic, "prepare", "--source", str(src),
                                             "--data-dir", str(tfds), "--image-size", str(size)]))
    parts, start = [], time.monotonic()
    limit = budget.limit(STAGE_LIMITS["data"])
    for what, cmd in steps:
        rc, seconds = run(cmd, st.log, limit - (time.monotonic() - start), env)
        parts.append(f"{what} {seconds:.0f} s")
        if rc != 0:
            st.status = _status(rc)
            st.result = f"{what}: {_status(rc)}: {_last_line(st.text())}"
            break
    else:
        st.status = "ok"
        st.result = f"{s['num_images']} synthetic ISIC 2020 images: " + ", ".join(parts)
    st.seconds = time.monotonic() - start
    ctx["data_dir"] = str(tfds)


def stage_bench(st: Stage, ctx: dict, budget: Budget) -> None:
    s, work = ctx["sizes"], ctx["work"]
    out_json = work / "bench.json"
    cmd = [ctx["python"], str(REPO / "scripts" / "bench_train.py"), "--gpu",
           "--model", s["model"], "--width", str(s["width"]), "--image-size", str(s["image"]),
           "--gpu-batch", str(s["batch"]), "--steps", str(s["bench_steps"]),
           "--matmul-n", str(s["matmul_n"]), "--data-dir", ctx["data_dir"],
           "--stored-size", str(s["stored"]), "--workers", str(ctx["workers"]),
           "--profile-dir", str(work / "profile"), "--json", str(out_json)]
    if ctx["dry"]:
        cmd.append("--allow-cpu")
    rc, st.seconds = run(cmd, st.log, budget.limit(STAGE_LIMITS["bench"]), ctx["env"])
    st.status = _status(rc)
    r = json.loads(out_json.read_text()) if out_json.exists() else {}
    st.data = r
    ctx["bench"] = r
    if "images_per_s" not in r:
        st.result = _last_line(st.text())
        return
    spec = f", spec {r['bf16_spec_peak_tflop_s']:.0f}" if r.get("bf16_spec_peak_tflop_s") else ""
    st.result = (
        f"{r['model']} {r['image_size']} px bf16 b{r['batch']}: {r['images_per_s']:,.0f} img/s "
        f"({r['step_ms']:.1f} ms/step; {r['vs_a100_anchor']:.2f}x the A100 anchor "
        f"{A100_ANCHOR_IMG_S:,.0f}, {r['vs_mlperf_h100']:.2f}x MLPerf H100 ~"
        f"{MLPERF_H100_IMG_S:,.0f}); {r['achieved_tflop_s']:.1f} TFLOP/s = "
        f"{100 * r['fraction_of_measured_peak']:.1f} % of the measured bf16 matmul peak "
        f"{r['bf16_matmul_peak_tflop_s']:.0f} TFLOP/s{spec}; compile {r['compile_s']:.0f} s"
    )  # fmt: skip
    if "step_temp_gib" in r:
        st.result += f", step memory {r['step_temp_gib']:.1f} GiB"
    if r.get("profile_error"):
        st.result += f"; profile failed: {r['profile_error'][:120]}"


def pipeline_row(ctx: dict) -> Stage:
    """The input pipeline alone, measured inside the bench stage."""
    st = Stage("pipeline", ctx["work"])
    r = ctx.get("bench", {})
    pipe = r.get("input_pipeline")
    if not pipe:
        st.result = "not measured (bench stage did not get there)"
        return st
    if "error" in pipe:
        st.status, st.result = "failed", pipe["error"][:300]
        return st
    st.status, st.data = "ok", pipe
    s = ctx["sizes"]
    st.result = (f"Grain, {pipe['workers']} workers, {s['image']} px crops of {s['stored']} px "
                 f"JPEGs: {pipe['images_per_s']:,.0f} img/s")
    if r.get("images_per_s"):
        ratio = pipe["images_per_s"] / r["images_per_s"]
        st.data["vs_bare_step"] = ratio
        st.result += (f" = {ratio:.2f}x the bare step: "
                      + ("the host keeps up" if ratio >= 1.0 else "the host cannot keep up"))
    return st


def _train_cmd(ctx: dict, config: str, workdir: pathlib.Path, overrides: dict) -> list[str]:
    return [*ctx["isic_jax"], "train", "--config", config, "--workdir", str(workdir),
            *(f"--config.{k}={v}" for k, v in overrides.items())]


def _small_model(ctx: dict) -> dict:
    """Dry run: the tiny model and batch instead of the config's own."""
    s = ctx["sizes"]
    if not ctx["dry"]:
        return {}
    return {"model.name": s["model"], "model.width": s["width"], "data.image_size": s["image"],
            "train.batch_size": s["batch"], "eval.batch_size": s["batch"],
            "data.num_workers": 2}


def stage_loop(st: Stage, ctx: dict, budget: Budget) -> None:
    s = ctx["sizes"]
    overrides = {
        "data.data_dir": ctx["data_dir"], "data.stored_size": s["stored"],
        "data.image_size": s["image"], "model.name": s["model"], "model.width": s["width"],
        "train.batch_size": s["batch"], "eval.batch_size": s["batch"],
        "train.num_steps": s["loop_steps"], "train.log_every": s["log_every"],
        "train.eval_every": 10**6, "train.checkpoint_every": 10**6,
        "data.num_workers": ctx["workers"], "data.val_fold": -1,
        "train.parallelism": "jit", "train.progress": False,
    }  # fmt: skip
    cmd = _train_cmd(ctx, str(REPO / "configs" / "default.py"), ctx["work"] / "run_loop",
                     overrides)
    rc, st.seconds = run(cmd, st.log, budget.limit(STAGE_LIMITS["loop"]), ctx["env"])
    st.status = _status(rc)
    rate, rates = loop_images_per_s(st.text())
    st.data = {"images_per_s": rate, "intervals_img_s": rates, "workers": ctx["workers"]}
    if rate is None:
        st.result = _last_line(st.text())
        return
    st.result = (f"isic-jax train, {s['model']} {s['image']} px b{s['batch']}, jit, "
                 f"{ctx['workers']} Grain workers: {rate:,.0f} img/s")
    bare = ctx.get("bench", {}).get("images_per_s")
    if bare:
        st.data["vs_bare_step"] = rate / bare
        st.result += f" = {rate / bare:.2f} of the bare step (goal >= {GOAL_LOOP_RATIO})"


def _config_run(st: Stage, ctx: dict, budget: Budget, config: str, steps: int, log_every: int,
                stage_max: float, extra: dict | None = None) -> None:
    """A short real run of a config file as it is (data location, run length and `extra`
    aside); once more at half the batch if the first try ran out of accelerator memory."""
    s = ctx["sizes"]
    start = time.monotonic()
    overrides = {"data.data_dir": ctx["data_dir"], "data.stored_size": s["stored_default"],
                 "train.num_steps": steps, "train.log_every": log_every,
                 "train.eval_every": steps, "train.checkpoint_every": steps,
                 "train.progress": False, **(extra or {}), **_small_model(ctx)}
    workdir = ctx["work"] / f"run_{st.log.stem}"
    note = ""
    if st.name == "default" and not ctx["dry"]:
        note = _halve_if_too_big(ctx, overrides)
    rc = None
    for attempt in range(2):
        limit = min(stage_max - (time.monotonic() - start), budget.limit(stage_max))
        if attempt and limit < 60:
            note += "no time left to try again; "
            break
        cmd = _train_cmd(ctx, config, workdir, overrides)
        rc, _ = run(cmd, st.log, limit, ctx["env"])
        if rc == 0 or attempt or not OOM.search(st.text()):
            break
        batch = _config_value(workdir, "train", "batch_size") or s["batch"]
        note = f"out of memory at batch {batch}, "
        overrides["train.batch_size"] = overrides["eval.batch_size"] = max(1, int(batch) // 2)
        shutil.rmtree(workdir, ignore_errors=True)
        with open(st.log, "a") as f:
            f.write(f"\n[device_check] out of memory: again at batch {batch // 2}\n")
    st.seconds = time.monotonic() - start
    st.status = _status(rc)
    text = st.text().split("[device_check] out of memory")[-1]
    rate, rates = loop_images_per_s(text)
    size = _config_value(workdir, "data", "image_size")
    batch = _config_value(workdir, "train", "batch_size")
    parallelism = _config_value(workdir, "train", "parallelism")
    model = _config_value(workdir, "model", "name")
    st.data = {"images_per_s": rate, "intervals_img_s": rates, "image_size": size,
               "batch": batch, "model": model}
    evals = workdir / "eval_history.jsonl"
    auc = None
    if evals.exists():
        rows = [json.loads(line) for line in evals.read_text().splitlines() if line.strip()]
        auc = rows[-1].get("auc") if rows else None
    saved = any((workdir / "checkpoints").glob("*"))
    st.data.update(val_auc=auc, checkpoint=saved)
    if rate is None:
        st.result = note + _last_line(st.text())
        return
    st.result = (f"{note}{model} {size} px b{batch}, {parallelism}: {rate:,.0f} img/s; "
                 f"val AUC {auc if auc is None else f'{auc:.3f}'}, "
                 f"checkpoint {'saved' if saved else 'missing'}")


def _halve_if_too_big(ctx: dict, overrides: dict) -> str:
    """Halves configs/default.py's batch (in overrides) while the bench step's memory, scaled
    to its image size and batch, is clearly over the device's memory: an out-of-memory try costs
    a compilation. Returns a note for the table ("" when the batch stays)."""
    bench, default = ctx.get("bench", {}), ctx.get("default_config") or {}
    limit = ctx.get("memory_limit_gib")
    temp = bench.get("step_temp_gib")
    if not (limit and temp and bench.get("batch") and default.get("batch")):
        return ""
    per_pixel = temp / (bench["batch"] * bench["image_size"] ** 2)
    image, batch = default["image_size"], default["batch"]
    need = per_pixel * batch * image**2
    while batch > 1 and per_pixel * batch * image**2 > 1.15 * limit:
        batch //= 2
    if batch == default["batch"]:
        return ""
    overrides["train.batch_size"] = overrides["eval.batch_size"] = batch
    return (f"batch {default['batch']} would need ~{need:.0f} GiB of {limit:.0f} (bench's step "
            f"scaled), ")


def _config_value(workdir: pathlib.Path, section: str, key: str):
    path = workdir / "config.json"
    try:
        return json.loads(path.read_text())[section][key]
    except (OSError, ValueError, KeyError):
        return None


def stage_default(st: Stage, ctx: dict, budget: Budget) -> None:
    s = ctx["sizes"]
    _config_run(st, ctx, budget, str(REPO / "configs" / "default.py"), s["default_steps"],
                s["default_log_every"], STAGE_LIMITS["default"])


def stage_preset(st: Stage, ctx: dict, budget: Budget, config: str) -> None:
    s = ctx["sizes"]
    path = pathlib.Path(config)
    path = path if path.is_absolute() else REPO / path
    # Random weights: the machine has no network for a preset's hf-hub weights.
    _config_run(st, ctx, budget, str(path), s["preset_steps"], s["default_log_every"],
                STAGE_LIMITS["preset"], extra={"model.init_from": ""})


# ---------------------------------------------------------------------------------------- report


def table(stages: list[Stage], header: str) -> str:
    width = max(8, *(len(st.name) for st in stages))
    lines = [header, f"{'stage':<{width}}  {'status':<16} {'time':>6}  result"]
    for st in stages:
        lines.append(f"{st.name:<{width}}  {st.status:<16} {st.seconds:>5.0f}s  {st.result}")
    return "\n".join(lines)


def goals(ctx: dict, stages: dict[str, Stage]) -> list[str]:
    bare = ctx.get("bench", {}).get("images_per_s")
    loop = stages["loop"].data.get("vs_bare_step") if "loop" in stages else None
    out = []
    if bare is not None:
        out.append(f"goal: bare step >= {GOAL_BARE_IMG_S:,.0f} img/s on one H100: "
                   f"{'met' if bare >= GOAL_BARE_IMG_S else 'NOT met'} ({bare:,.0f})")
    if loop is not None:
        out.append(f"goal: real loop >= {GOAL_LOOP_RATIO} of the bare step: "
                   f"{'met' if loop >= GOAL_LOOP_RATIO else 'NOT met'} ({loop:.2f})")
    return out


def _capped_copy(src: pathlib.Path, dst: pathlib.Path, cap: int = 15 * 2**20) -> None:
    data = src.read_bytes()
    if len(data) > cap:
        data = data[: cap // 3] + b"\n[... cut ...]\n" + data[-(2 * cap // 3):]
    dst.write_bytes(data)


def write_outputs(out: pathlib.Path, work: pathlib.Path, stages: list[Stage], summary: str,
                  ctx: dict) -> list[str]:
    """At most 6 files, each under 16 MiB, directly in out."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.txt").write_text(summary + "\n")
    (out / "results.json").write_text(json.dumps(
        {"sizes": ctx["sizes"], "dry_run": ctx["dry"], "stages": [st.row() for st in stages]},
        indent=1, default=str))
    log = work / "device_check.log"
    with open(log, "w") as f:
        for st in stages:
            f.write(f"\n{'=' * 30} {st.name} ({st.status}, {st.seconds:.0f} s) {'=' * 30}\n")
            f.write(st.text())
    _capped_copy(log, out / "device_check.log")
    notes = []
    profile = work / "profile"
    if profile.exists():
        target = out / "profile.tar.gz"
        with tarfile.open(target, "w:gz") as tar:
            tar.add(profile, arcname="profile")
        if target.stat().st_size > 16 * 2**20:
            target.unlink()
            notes.append(f"profile: over 16 MiB, left in {profile}")
        else:
            notes.append(f"profile: {target} ({target.stat().st_size / 2**20:.1f} MiB; "
                         f"tensorboard --logdir or xprof on the unpacked profile/)")
    runs = sorted(work.glob("run_*"))
    if runs:
        with tarfile.open(out / "runs.tar.gz", "w:gz") as tar:
            for run_dir in runs:
                tar.add(run_dir, arcname=run_dir.name,
                        filter=lambda t: None if "/checkpoints" in t.name else t)
    return notes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny sizes on the CPU (JAX_PLATFORMS=cpu): checks the stages run")
    parser.add_argument("--workdir", default=os.environ.get("DEVICE_CHECK_WORKDIR",
                                                            "/tmp/isic_jax_device_check"))
    parser.add_argument("--out", default=os.environ.get("OUT"),
                        help="folder for the report files (default $OUT; none if unset)")
    parser.add_argument("--budget", type=float,
                        default=float(os.environ.get("DEVICE_CHECK_BUDGET_S", 480)),
                        help="seconds for all stages together")
    parser.add_argument("--extra-presets", default=os.environ.get("EXTRA_PRESETS", ""),
                        help="config files, space-separated, each run like configs/default.py")
    parser.add_argument("--only", default="", help="comma list of stages to run (default all)")
    args = parser.parse_args()

    t0 = time.monotonic()
    budget = Budget(args.budget)
    work = pathlib.Path(args.workdir)
    marker = work / ".isic_jax_device_check"
    if work.exists() and any(work.iterdir()) and not marker.exists():
        parser.error(f"--workdir {work} holds other files: give an empty or a new folder")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    marker.touch()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(work / "jax_cache"))
    if args.dry_run:
        env.update(JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="", DEVICE_CHECK_DRY_RUN="1")
    else:
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.90")
    workers = 2 if args.dry_run else (os.cpu_count() or 1)
    python = os.environ.get("DEVICE_CHECK_PYTHON", sys.executable)
    ctx = {"dry": args.dry_run, "sizes": SIZES["dry" if args.dry_run else "gpu"], "env": env,
           "work": work, "python": python, "isic_jax": [python, "-m", "isic_jax"],
           "workers": workers, "data_dir": str(work / "tfds")}

    plan = [("env", stage_env), ("data", stage_data), ("bench", stage_bench),
            ("loop", stage_loop), ("default", stage_default)]
    plan += [(f"preset:{p}", lambda st, c, b, p=p: stage_preset(st, c, b, p))
             for p in args.extra_presets.split()]
    only = set(filter(None, args.only.split(",")))
    stages: dict[str, Stage] = {}
    for name, fn in plan:
        st = Stage(name, work)
        stages[name] = st
        if only and name not in only:
            st.result = "not asked for (--only)"
        elif name != "env" and stages["env"].status not in ("ok", "skipped"):
            st.result = "env failed"
        elif budget.limit(10**6) < 20:
            st.result = "no time left"
        else:
            print(f"[device_check] {name}: started ({budget.left():.0f} s left)", flush=True)
            try:
                fn(st, ctx, budget)
            except Exception as e:  # noqa: BLE001 - one stage's bug must not lose the others
                st.status, st.result = "failed", f"device_check: {type(e).__name__}: {e}"
            print(f"[device_check] {name}: {st.status} in {st.seconds:.0f} s", flush=True)
        if name == "bench":
            stages["pipeline"] = pipeline_row(ctx)

    env_info = stages["env"].data
    device = ", ".join(sorted(set(env_info.get("devices", [])))) or "?"
    header = (f"== isic_jax device check{' (dry run, CPU)' if args.dry_run else ''}: {device}, "
              f"{env_info.get('cpus', os.cpu_count())} host cores, jax {env_info.get('jax', '?')}, "
              f"Python {env_info.get('python', '?')}; {time.monotonic() - t0:.0f} s ==")
    order = [n for n in ("env", "data", "bench", "pipeline", "loop", "default") if n in stages]
    order += [n for n in stages if n.startswith("preset:")]
    rows = [stages[n] for n in order]
    summary = "\n".join([table(rows, header), *goals(ctx, stages)])
    notes = []
    if args.out:
        notes = write_outputs(pathlib.Path(args.out), work, rows, summary, ctx)
    else:
        notes.append(f"logs: {work / 'logs'}")
    print("\n" + "\n".join(notes + [summary]), flush=True)
    return 0 if all(st.status in ("ok", "skipped") for st in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
