"""`prepare`: a manual ISIC download -> the `isic` TFDS dataset (array_record), with a report.

Runs the builder through the TFDS Python API (the `tfds build` CLI needs TensorFlow). The dataset
lands in `<data_dir>/isic/<release>_<size>/<version>/` (1.1.0); TFDS writes it in a temporary
sibling folder and renames it when complete, so an interrupted prepare leaves nothing that reads as
a dataset (a killed one leaves an `incomplete.*` folder, which the report lists and which is safe
to delete). A dataset of an older version in the same place is left as it is (runs that used it
keep working); the report lists it (`older_versions`).

A second prepare of the same release, size and options into the same data_dir is a no-op: it
reads the stored report and says so (`reused: true`). Different content options (folds, policy,
limits) for an existing dataset are refused rather than silently ignored.
"""

from __future__ import annotations

import collections
import json
import os
from typing import Any

import tensorflow_datasets as tfds

from isic_jax.data.isic import builder as isic_lib
from isic_jax.data.isic import labels as L
from isic_jax.data.isic import releases
from isic_jax.data.isic.images import DEFAULT_JPEG_QUALITY, DEFAULT_MAX_PIXELS

FORMATS: tuple[str, ...] = ("auto", *L.RELEASES)
DEFAULT_IMAGE_SIZE = 512
PRINT_SKIPPED_LIMIT = 1000  # more skipped inputs are summarised by reason (the JSON has all)


class PrepareError(Exception):
    """A prepare that cannot proceed; the message says why and what to do."""


def prepare(
    source: str | os.PathLike,
    data_dir: str | os.PathLike,
    *,
    fmt: str = "auto",
    image_size: int = DEFAULT_IMAGE_SIZE,
    num_folds: int = 5,
    fold_seed: int = 0,
    indeterminate: str = "skip",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    jpeg_quality: int = DEFAULT_JPEG_QUALITY,
    num_workers: int = 0,
    report_path: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Builds (or finds already built) the dataset of the release in `source`.

    Args:
      source: the folder holding the manual download.
      data_dir: the TFDS data_dir to write into.
      fmt: "auto" (recognise the release from its files) or one of RELEASES.
      image_size: shorter side of the stored images, px.
      num_folds: K, the number of patient-grouped stratified folds (splits fold0..fold{K-1}).
      fold_seed: salts the fold assignment's tie-breaking.
      indeterminate: archive: Indeterminate diagnoses are "skip"ped, or counted "benign" or
        "malignant".
      max_pixels: images with more pixels are skipped (decompression bombs).
      jpeg_quality: quality of the stored JPEGs.
      num_workers: decode threads (0: all cores).
      report_path: also write the report as JSON there.

    Returns:
      The report (JSON-serialisable): dataset, config, data_dir, dataset_dir, reused, splits,
      label_counts, diagnosis_counts, skipped [{item, reason, stage}], seconds, ... .

    Raises:
      PrepareError: unknown/ambiguous layout, no usable example, or a conflicting existing dataset.
    """
    source = os.path.realpath(os.path.expanduser(os.fspath(source)))
    data_dir = os.path.abspath(os.path.expanduser(os.fspath(data_dir)))
    if fmt not in FORMATS:
        raise PrepareError(f"unknown --format {fmt!r}; expected one of {', '.join(FORMATS)}")
    try:
        options = isic_lib.BuildOptions(
            num_folds=num_folds,
            fold_seed=fold_seed,
            indeterminate=indeterminate,
            max_pixels=max_pixels,
            jpeg_quality=jpeg_quality,
            num_workers=num_workers,
        )
        if fmt == "auto":
            release = releases.detect(source)
        else:  # fail before TFDS creates anything
            release = fmt
            releases.release_files(releases.Layout(releases.SourceTree(source)), release, source)
        builder = isic_lib.make_builder(release, image_size, data_dir, options=options)
    except (ValueError, releases.SourceError) as exc:
        raise PrepareError(str(exc)) from exc

    if builder.data_path.exists() and not builder.is_prepared():
        # TFDS would "reuse" any existing folder; only a finished build may be reused.
        raise PrepareError(
            f"{builder.data_path} exists but is not a complete dataset (no dataset_info.json / "
            "features.json): delete it and prepare again"
        )
    if builder.data_path.exists():
        report = _reuse(builder, options, source)
    else:
        try:
            builder.download_and_prepare(
                download_config=tfds.download.DownloadConfig(manual_dir=source),
                file_format="array_record",
            )
        except releases.SourceError as exc:  # includes NoUsableExamplesError
            raise PrepareError(str(exc)) from exc
        report = dict(builder.report or {})
        report["reused"] = False
    report["data_dir"] = data_dir
    report["dataset_dir"] = os.fspath(builder.data_path)
    report["stale_incomplete_dirs"] = sorted(
        os.fspath(p) for p in builder.data_path.parent.glob("incomplete.*")
    )
    report["older_versions"] = [
        v for v in isic_lib.prepared_versions(release, image_size, data_dir)
        if v != str(builder.version)
    ]
    if report_path:
        report_path = os.path.expanduser(os.fspath(report_path))
        os.makedirs(os.path.dirname(os.path.abspath(report_path)), exist_ok=True)
        with open(report_path, "w") as f:
            json.dump(report, f, indent=1)
    return report


def _reuse(builder: isic_lib.Isic, options: isic_lib.BuildOptions, source: str) -> dict[str, Any]:
    """The report of an existing dataset, after checking that it was built the same way."""
    stored = dict(builder.info.metadata or {})
    wanted = options.content()
    differ = {k: (stored.get(k), v) for k, v in wanted.items() if stored.get(k) != v}
    if differ:
        listing = ", ".join(f"{k}: stored {a!r}, asked {b!r}" for k, (a, b) in differ.items())
        raise PrepareError(
            f"{builder.data_path} was already prepared with other options ({listing}). Delete "
            "that folder to rebuild it, or use another --data-dir."
        )
    report = isic_lib.read_report(builder) or {
        "dataset": f"{builder.name}/{builder.builder_config.name}/{builder.version}",
        "config": builder.builder_config.name,
        "release": builder.release,
        "image_size": builder.image_size,
        "splits": {name: split.num_examples for name, split in builder.info.splits.items()},
        "skipped": [],
    }
    report["reused"] = True
    if stored.get("source") and stored["source"] != source:
        report["note"] = (
            f"the existing dataset was built from {stored['source']}, not {source}; delete "
            f"{builder.data_path} to rebuild from the new source"
        )
    return report


def format_summary(report: dict[str, Any]) -> str:
    """Human-readable summary: dataset, examples and class counts per split, skipped inputs."""
    lines = [
        f"dataset {report['dataset']} (release {report['release']}, shorter side "
        f"{report['image_size']} px)",
        f"  at {report.get('dataset_dir', '?')}",
    ]
    if report.get("reused"):
        lines.append(
            "  already prepared: nothing to do (this is a no-op; delete the folder to rebuild)"
        )
    else:
        lines.append(
            f"  prepared in {report.get('seconds', 0):.1f} s: {report.get('images_decoded', 0)} "
            f"images decoded at {report.get('images_per_second') or 0:.1f} img/s on "
            f"{report.get('num_workers', '?')} threads"
        )
    if report.get("note"):
        lines.append(f"  note: {report['note']}")
    lines.append(f"  source: {report.get('source', '?')} {report.get('source_files', '')}")

    splits = report.get("splits", {})
    label_counts = report.get("label_counts", {})
    names = report.get("label_names", L.LABEL_NAMES)
    header = f"  {'split':<8}{'examples':>10}" + "".join(f"{n:>11}" for n in names)
    lines += ["", header]
    totals = collections.Counter()
    for split, n in splits.items():
        counts = label_counts.get(split, {})
        totals.update(counts)
        lines.append(f"  {split:<8}{n:>10}" + "".join(f"{counts.get(c, 0):>11}" for c in names))
    lines.append(
        f"  {'total':<8}{sum(splits.values()):>10}" + "".join(f"{totals[c]:>11}" for c in names)
    )
    diagnosis_counts = report.get("diagnosis_counts", {})
    if diagnosis_counts:
        classes = report.get("diagnosis_classes", [])
        used = [c for c in classes if any(d.get(c, 0) for d in diagnosis_counts.values())]
        lines += ["", "  diagnosis per split: " + ", ".join(used)]
        for split, counts in diagnosis_counts.items():
            lines.append(f"  {split:<8}" + " ".join(f"{c}={counts.get(c, 0)}" for c in used))

    skipped = report.get("skipped", [])
    lines += ["", f"  skipped inputs: {len(skipped)}"]
    for s in skipped[:PRINT_SKIPPED_LIMIT]:
        lines.append(f"    [{s['stage']}] {s['item']}: {s['reason']}")
    if len(skipped) > PRINT_SKIPPED_LIMIT:
        by_reason = collections.Counter(s["reason"].split(" (")[0] for s in skipped)
        lines.append(f"    ... {len(skipped) - PRINT_SKIPPED_LIMIT} more; all by reason:")
        lines += [f"    {n} x {r}" for r, n in by_reason.most_common()]
    older = report.get("older_versions") or []
    if older:
        lines += ["", f"  older dataset versions beside it, left as they are: {', '.join(older)} "
                  "(image-only runs on them keep working; delete them when no run needs them)"]
    stale = report.get("stale_incomplete_dirs") or []
    if stale:
        lines += ["", "  left over from interrupted prepares (safe to delete):"]
        lines += [f"    {p}" for p in stale]
    return "\n".join(lines)
