"""Metadata for model cards and subgroup results, from the source to the evaluation: the
Fitzpatrick skin type (a record field and a batch field), attribution and licence counts in the
prepare report."""

from __future__ import annotations

import csv
import os

import numpy as np
import tensorflow_datasets as tfds

from isic_jax.data import isic, pipeline
from isic_jax.testing import layouts as testing


def test_archive_fitzpatrick_attribution_and_licence_reach_records_and_report(tmp_path) -> None:
    src = tmp_path / "src"
    testing.write_layout(src, "archive", testing.balanced_examples("archive", 8))
    path = src / "metadata.csv"
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    types = ["II", "III", "", "VI", "I", "II", "IV", ""]
    for k, row in enumerate(rows):
        row["fitzpatrick_skin_type"] = types[k]
        row["attribution"] = "Hospital A" if k < 5 else "Anonymous"
        row["copyright_license"] = "CC-BY" if k < 5 else "CC-0"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    builder = isic.make_builder("archive", 32, tmp_path / "data",
                                options=isic.BuildOptions(num_folds=2, num_workers=2))
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(src)))
    source = builder.as_data_source(split="fold0+fold1",
                                    decoders={"image": tfds.decode.SkipDecoding()})
    got = {r["image_id"].decode(): r["fitzpatrick"].decode() for r in source}
    assert got == {row["isic_id"]: types[k] for k, row in enumerate(rows)}
    report = builder.report
    assert report["attributions"] == {"Hospital A": 5, "Anonymous": 3}
    assert report["licenses"] == {"CC-BY": 5, "CC-0": 3}
    assert isic.read_report(builder)["attributions"] == report["attributions"]

    # The evaluation batches carry it (b"" on padding and for records without the field).
    records = [dict(r) for r in source]
    old = next(r for r in records if r["fitzpatrick"] == b"II")
    old.pop("fitzpatrick")  # as in a dataset prepared before the field existed
    from isic_jax.configs import smoke

    data = smoke.get_config().data
    data.image_size = 32
    batches = list(pipeline.create_eval_dataset(pipeline.ListSource(records), data, 3))
    fitz = np.concatenate([b["fitzpatrick"][b["mask"]] for b in batches])
    ids = np.concatenate([b["image_id"][b["mask"]] for b in batches])
    want = {r["image_id"]: r.get("fitzpatrick", b"") for r in records}
    assert [want[i] for i in ids] == list(fitz) and b"" in fitz and b"VI" in fitz
    assert len(fitz) == 8
    assert all(b["fitzpatrick"][~b["mask"]].tolist() == [b""] * int((~b["mask"]).sum())
               for b in batches)
