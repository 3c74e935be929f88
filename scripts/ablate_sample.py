"""Cross-validated ablation: each variant (a config plus a few overrides) through `isic-jax cv`,
then one table of pooled out-of-fold AUC, fold mean ± std, wall time and CPU time.

    python scripts/ablate_sample.py --data-dir /tmp/d --out /tmp/ablate       # the recipe's table
    python scripts/ablate_sample.py --data-dir /tmp/d --out /tmp/ablate --only recipe,no_ema
    python scripts/ablate_sample.py --data-dir /tmp/d --out /tmp/mine --variants my_variants.txt
    python scripts/ablate_sample.py --data-dir /tmp/d --out /tmp/ablate --dry-run   # commands only
    python scripts/ablate_sample.py --out /tmp/ablate --table                      # table only

--data-dir is a TFDS data_dir prepared by `isic-jax prepare` (for the real sample:
`isic-jax prepare --source ../shared/data/isic-uda1/images --image-size 128 --data-dir D`).
Every variant trains `isic-jax cv --config=CONFIG --workdir OUT/<variant>` with
`--config.data.data_dir=D`, `--config.train.progress=False` and its own overrides (and --set
ones for all of them). Resumable: a variant whose OUT/<variant>/cv_metrics.json is complete is
skipped, an interrupted one resumes where `isic-jax cv` left it (wall and CPU time add up over
the attempts). OUT/<variant>.log holds the cv output, OUT/<variant>.run.json the command, wall
time, CPU time of the cv process and its workers, and the machine's mean 1-minute load average
during the run (sampled every 10 s: on a shared machine the wall time depends on it; the CPU
time much less). The table goes to stdout and to OUT/ablation.md and OUT/ablation.json.

A variants file (--variants) has one variant per line: a name, then `key=value` overrides of
the config (no spaces inside a value; `#` starts a comment). The first variant is the reference
of the Δ column. Without --variants, the built-in list below runs: the small-data recipe of
configs/cpu_sample.py, each of its levers turned off (or swapped), and the previous preset.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import shlex
import subprocess
import sys
import threading
import time

# The ablation of configs/cpu_sample.py (docs/augmentation.md, "Small-data recipe"): the
# recipe itself, then each lever off relative to it, then the preset before the recipe.
RECIPE_VARIANTS = """
recipe
"""

METRICS = "cv_metrics.json"


def parse_variants(text: str) -> list[tuple[str, list[str]]]:
    """[(name, ["key=value", ...])] from the variants format (see the module docstring)."""
    variants: list[tuple[str, list[str]]] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, *overrides = line.split()
        bad = [o for o in overrides if "=" not in o or o.startswith("=")]
        if bad or "/" in name or name.startswith("."):
            raise SystemExit(f"variants line {number}: want `name key=value ...`, got {raw!r}")
        if name in {n for n, _ in variants}:
            raise SystemExit(f"variants line {number}: variant {name!r} is listed twice")
        variants.append((name, overrides))
    if not variants:
        raise SystemExit("no variants given")
    return variants


def cv_command(config: str, workdir: pathlib.Path, data_dir: str, overrides: list[str],
               seeds: str | None) -> list[str]:
    cmd = [sys.executable, "-m", "isic_jax", "cv", f"--config={config}", f"--workdir={workdir}",
           f"--config.data.data_dir={data_dir}", "--config.train.progress=False"]
    cmd += [f"--config.{o}" for o in overrides]
    if seeds:
        cmd.append(f"--seeds={seeds}")
    return cmd


def read_metrics(workdir: pathlib.Path) -> dict | None:
    path = workdir / METRICS
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_variant(cmd: list[str], log: pathlib.Path, record: pathlib.Path) -> int:
    """Runs one cv command, appending its output to `log` and its timing to `record`."""
    previous = json.loads(record.read_text()) if record.is_file() else {}
    loads: list[float] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(10.0):
            loads.append(os.getloadavg()[0])

    sampler = threading.Thread(target=sample, daemon=True)
    loads.append(os.getloadavg()[0])
    cpu0, start = _children_cpu_s(), time.time()
    sampler.start()
    with log.open("a") as out:
        out.write(f"$ {shlex.join(cmd)}\n")
        out.flush()
        rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=False).returncode
    done.set()
    sampler.join()
    wall, cpu = time.time() - start, _children_cpu_s() - cpu0
    loads.append(os.getloadavg()[0])
    attempts = previous.get("attempts", 0) + 1
    mean_load = (previous.get("load_mean", 0.0) * previous.get("wall_s", 0.0)
                 + sum(loads) / len(loads) * wall) / max(previous.get("wall_s", 0.0) + wall, 1e-9)
    record.write_text(json.dumps({
        "command": shlex.join(cmd), "returncode": rc, "attempts": attempts,
        "wall_s": previous.get("wall_s", 0.0) + wall, "cpu_s": previous.get("cpu_s", 0.0) + cpu,
        "load_mean": mean_load, "cpus": os.cpu_count(),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }, indent=2) + "\n")
    return rc


def _fmt(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def table_rows(out: pathlib.Path, variants: list[tuple[str, list[str]]]) -> list[dict]:
    rows = []
    for name, overrides in variants:
        metrics = read_metrics(out / name)
        record = out / f"{name}.run.json"
        timing = json.loads(record.read_text()) if record.is_file() else {}
        row = {"variant": name, "overrides": overrides, "complete": False}
        if metrics:
            aucs = [m["auc"] for m in metrics["members"] if m.get("auc") is not None]
            row.update(complete=bool(metrics.get("complete")), oof_auc=metrics["oof"].get("auc"),
                       fold_auc_mean=metrics["mean"].get("auc"),
                       fold_auc_std=metrics["std"].get("auc"), fold_aucs=aucs,
                       members=len(metrics["members"]))
        row.update({k: timing.get(k) for k in ("wall_s", "cpu_s", "load_mean")})
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    reference = rows[0].get("oof_auc") if rows else None
    lines = ["| variant | pooled OOF AUC | Δ | fold AUC mean ± std | wall min | CPU min | load |"
             " overrides |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        oof = r.get("oof_auc")
        delta = (f"{oof - reference:+.3f}" if oof is not None and reference is not None
                 and r is not rows[0] else "")
        folds = (f"{r['fold_auc_mean']:.3f} ± {r['fold_auc_std']:.3f}"
                 if r.get("fold_auc_mean") is not None else "—")
        if r.get("oof_auc") is not None and not r["complete"]:
            folds += f" (incomplete: {r['members']} members)"
        wall = _fmt(r["wall_s"] / 60, 1) if r.get("wall_s") else "—"
        cpu = _fmt(r["cpu_s"] / 60, 1) if r.get("cpu_s") else "—"
        lines.append(f"| {r['variant']} | {_fmt(oof)} | {delta} | {folds} | {wall} | {cpu} | "
                     f"{_fmt(r.get('load_mean'), 1)} | {' '.join(r['overrides']) or '—'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder of the cv workdirs and the table")
    parser.add_argument("--data-dir", help="TFDS data_dir of the prepared dataset")
    parser.add_argument("--config", default="cpu_sample", help="config file or preset name")
    parser.add_argument("--variants", help="variants file (default: the recipe's ablation)")
    parser.add_argument("--only", help="comma-separated variant names to run (default: all)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an override for every variant (repeatable)")
    parser.add_argument("--seeds", help="passed to `isic-jax cv --seeds` (e.g. 0,1)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--table", action="store_true", help="only print the table")
    args = parser.parse_args(argv)

    text = (pathlib.Path(args.variants).read_text() if args.variants else RECIPE_VARIANTS)
    variants = parse_variants(text)
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(wanted) - {n for n, _ in variants})
        if unknown:
            parser.error(f"--only names unknown variants {unknown}; known: "
                         f"{[n for n, _ in variants]}")
        variants = [v for v in variants if v[0] in wanted]
    bad = [s for s in args.set if "=" not in s]
    if bad:
        parser.error(f"--set takes KEY=VALUE, got {bad}")
    out = pathlib.Path(args.out).absolute()
    failed = []
    if not args.table:
        if not args.data_dir:
            parser.error("--data-dir is required (except with --table)")
        data_dir = str(pathlib.Path(args.data_dir).expanduser().absolute())
        if not args.dry_run:
            out.mkdir(parents=True, exist_ok=True)
        for i, (name, overrides) in enumerate(variants, 1):
            workdir = out / name
            cmd = cv_command(args.config, workdir, data_dir, [*args.set, *overrides], args.seeds)
            metrics = read_metrics(workdir)
            if metrics and metrics.get("complete"):
                print(f"[{i}/{len(variants)}] {name}: complete, skipped", flush=True)
                continue
            if args.dry_run:
                print(shlex.join(cmd), flush=True)
                continue
            print(f"[{i}/{len(variants)}] {name}: {shlex.join(cmd)}", flush=True)
            rc = run_variant(cmd, out / f"{name}.log", out / f"{name}.run.json")
            if rc != 0:
                print(f"  {name} failed (exit status {rc}); see {out / name}.log", flush=True)
                failed.append(name)
        if args.dry_run:
            return 0
    rows = table_rows(out, variants)
    table = format_table(rows)
    print(table)
    if out.is_dir():
        (out / "ablation.md").write_text(table + "\n")
        (out / "ablation.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
