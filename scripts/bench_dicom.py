"""Prepare time of the Kaggle DICOM layout of ISIC 2020 vs the same images as JPEG files, and
whether both give byte-identical records.

    python scripts/bench_dicom.py [--num-images 600] [--image-size 512] [--stored-size 128]

Writes `isic-jax synth --format isic2020_dicom` (train.csv + train/*.dcm, JPEG-baseline
encapsulated), makes a copy in which every DICOM is replaced by the JPEG it holds
(jpeg/train/<id>.jpg, same CSVs), prepares both and compares every record of every fold.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import tensorflow_datasets as tfds

from isic_jax.data import prepare as prepare_lib
from isic_jax.data import synth
from isic_jax.data.isic import builder as isic
from isic_jax.data.isic import dicom, images


def _records(data_dir: Path, size: int) -> list[dict]:
    builder = isic.make_builder("isic2020", size, data_dir)
    source = builder.as_data_source(split="+".join(builder.info.splits),
                                    decoders={"image": tfds.decode.SkipDecoding()})  # fmt: skip
    return sorted((source[i] for i in range(len(source))), key=lambda r: r["image_id"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=600)
    parser.add_argument("--image-size", type=int, default=512, help="synthetic images, px")
    parser.add_argument("--stored-size", type=int, default=128)
    parser.add_argument("--num-workers", type=int, default=0)
    args = parser.parse_args()
    tfds.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        synth.write_synthetic(root / "dicom", "isic2020_dicom", args.num_images, 0,
                              image_size=args.image_size)  # fmt: skip
        print(f"synth {args.num_images} DICOM images ({args.image_size} px): "
              f"{time.perf_counter() - start:.1f} s")  # fmt: skip
        shutil.copytree(root / "dicom", root / "jpeg", ignore=shutil.ignore_patterns("*.dcm"))
        (root / "jpeg" / "jpeg" / "train").mkdir(parents=True)
        for path in sorted((root / "dicom" / "train").glob("*.dcm")):
            frame = dicom.read_image(str(path), images.DEFAULT_MAX_PIXELS)
            (root / "jpeg" / "jpeg" / "train" / f"{path.stem}.jpg").write_bytes(frame)
        reports = {}
        for name in ("jpeg", "dicom"):
            reports[name] = prepare_lib.prepare(
                root / name, root / f"tfds_{name}", image_size=args.stored_size,
                num_workers=args.num_workers,
            )  # fmt: skip
            r = reports[name]
            print(f"prepare {name:>5}: {r['seconds']:.2f} s, {r['images_per_second']:.1f} img/s "
                  f"({r['num_examples']} examples, {r['num_workers']} threads)")  # fmt: skip
        a = _records(root / "tfds_dicom", args.stored_size)
        b = _records(root / "tfds_jpeg", args.stored_size)
        print(f"records identical: {a == b} ({len(a)} records, every feature incl. the JPEG bytes)")
        ratio = reports["dicom"]["seconds"] / reports["jpeg"]["seconds"]
        print(f"DICOM / JPEG prepare time: {ratio:.2f}")


if __name__ == "__main__":
    main()
