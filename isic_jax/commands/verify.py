"""`isic-jax verify --workdir DIR` or `isic-jax verify --model DIR`.

Checks every checkpoint and export found under the folder (a run, a cross-validation workdir,
an export, or a folder holding several) against the checksums saved with it: every array is
read back in full, and the JSON items and files are compared byte for byte. Prints one row per
checkpoint or export: where (relative to the given folder), step, status, reason.

Status: `ok`; `DAMAGED` (content differs from its checksums: files changed on disk after the
save); `UNREADABLE` (Orbax cannot read it); `unverified` (written by an earlier isic_jax,
without checksums); `set aside` (`<step>.corrupt`: a run already moved it away, with the
reason it recorded); `incomplete` (a save that never finished; never used). Exit status 8
(DAMAGED) when any checkpoint or export in use is DAMAGED or UNREADABLE, 2 when there is nothing
to check, else 0. Nothing is changed on disk.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import sys

from absl import app, flags

from isic_jax.commands import ExitCode, fail, no_arguments

_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run folder (or cv workdir, or any folder holding runs and exports).")
_MODEL = flags.DEFINE_string("model", None, "Export folder written by `isic-jax export`.")

MAX_DEPTH = 3  # folder levels searched below the given one
_CHECKPOINTS = "checkpoints"  # training/checkpointing.py CHECKPOINTS_DIR
_TMP_SUFFIX = ".orbax-checkpoint-tmp"
_CORRUPT = ".corrupt"
_SET_ASIDE_FILE = "set_aside.json"
_EXPORT_FILE = "model.json"


def find(root: pathlib.Path, max_depth: int = MAX_DEPTH) -> list[tuple[str, pathlib.Path]]:
    """("checkpoints" | "export", folder) for every checkpoint folder and export under `root`
    (itself included), sorted by path."""
    found = []
    for path, dirs, files in os.walk(root):
        here = pathlib.Path(path)
        depth = len(here.relative_to(root).parts)
        if _EXPORT_FILE in files:
            found.append(("export", here))
            dirs[:] = []  # an export's members are checked with it
            continue
        if here.name == _CHECKPOINTS and depth > 0:
            found.append(("checkpoints", here))
            dirs[:] = []
            continue
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if depth < max_depth else []
    return sorted(found, key=lambda item: str(item[1]))


def _step_key(path: pathlib.Path) -> tuple[int, str]:
    head = path.name.split(".", 1)[0]
    return (int(head) if head.isdigit() else -1, path.name)


def check_checkpoints(folder: pathlib.Path) -> list[tuple[str, str, str]]:
    """(step, status, reason) for each entry of a run's checkpoints folder."""
    from isic_jax.training import integrity

    rows = []
    for path in sorted(folder.iterdir(), key=_step_key):
        if not path.is_dir():
            continue
        step = path.name.split(".", 1)[0]
        if path.name.endswith(_TMP_SUFFIX):
            rows.append((step, "incomplete", "a save that never finished (never used)"))
        elif _CORRUPT in path.name:
            reason = "set aside by an earlier run"
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                reason += ": " + json.loads((path / _SET_ASIDE_FILE).read_text())["reason"]
            rows.append((path.name, "set aside", reason))
        elif path.name.isdigit():
            report = integrity.verify_folder(path)
            rows.append((step, _STATUS[report.status], _short(report.reason, path)))
    return rows


def _short(reason: str, folder: pathlib.Path) -> str:
    """A reason with the folder of its row left out of the paths it names."""
    return reason.replace(f"{folder}/", "").replace(str(folder), ".")


_STATUS = {"ok": "ok", "damaged": "DAMAGED", "unreadable": "UNREADABLE",
           "unverified": "unverified"}


def table(rows: list[tuple[str, str, str, str]]) -> str:
    header = ("where", "step", "status", "reason")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    lines = []
    for row in [header, *rows]:
        lines.append("  ".join(row[i].ljust(widths[i]) for i in range(3)) + "  " + row[3])
    return "\n".join(lines)


def verify(root: str | os.PathLike) -> tuple[list[tuple[str, str, str, str]], bool]:
    """(rows, whether anything in use is damaged or unreadable) for everything under `root`.

    Raises:
      FileNotFoundError: `root` is not a folder, or holds no checkpoint or export.
    """
    from isic_jax.training import integrity

    root = pathlib.Path(root).absolute()
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder")
    if (root / _EXPORT_FILE).is_file():
        found = [("export", root)]
    elif root.name == _CHECKPOINTS:
        found = [("checkpoints", root)]
    else:
        found = find(root)
    rows = []
    for kind, folder in found:
        shown = folder.relative_to(root).as_posix() if folder != root else "."
        if kind == "export":
            report = integrity.verify_folder(folder)
            rows.append((shown, "-", _STATUS[report.status], _short(report.reason, folder)))
        else:
            rows += [(shown, step, status, reason)
                     for step, status, reason in check_checkpoints(folder)]
    if not rows:
        raise FileNotFoundError(f"no checkpoint or export found under {root}")
    bad = any(status in ("DAMAGED", "UNREADABLE") for _, _, status, _ in rows)
    return rows, bad


def main(argv: list[str]) -> None:
    no_arguments(argv)
    if (_WORKDIR.value is None) == (_MODEL.value is None):
        raise app.UsageError("give exactly one of --workdir and --model")
    root = _WORKDIR.value or _MODEL.value
    try:
        rows, bad = verify(root)
    except FileNotFoundError as e:
        fail("verify", e, ExitCode.USAGE)
    print(f"Under {pathlib.Path(root).absolute()}:", flush=True)
    print(table(rows), flush=True)
    damaged = sum(status in ("DAMAGED", "UNREADABLE") for _, _, status, _ in rows)
    unverified = sum(status == "unverified" for _, _, status, _ in rows)
    summary = f"{len(rows)} checked: {damaged} damaged or unreadable"
    if unverified:
        summary += f", {unverified} without checksums (written by an earlier isic_jax)"
    print(summary, flush=True)
    if bad:
        print("isic-jax verify: damaged content found; a run resuming from that folder sets "
              "a damaged checkpoint aside and continues from the previous good one, and an "
              "export must be written again (`isic-jax export`).", file=sys.stderr, flush=True)
        sys.exit(int(ExitCode.DAMAGED))


if __name__ == "__main__":
    app.run(main)
