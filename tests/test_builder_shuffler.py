"""Splits over TFDS's 1 GB in-memory limit build without TensorFlow.

TFDS's shuffler spills a split to disk through `tf.io.gfile` once it holds more than
`shuffle.MAX_MEM_BUFFER_SIZE` bytes. These tests lower that limit to a few bytes, so every split
of a tiny dataset takes the spill path that a real >1 GB split (ISIC 2020 at 512 px) takes.
"""

from __future__ import annotations

import os

import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.core import shuffle

from isic_jax.data import isic
from isic_jax.data.isic import tfds_compat
from isic_jax.testing import layouts

no_tensorflow = pytest.mark.skipif(
    tfds_compat.tensorflow_installed(), reason="the failure only exists without TensorFlow"
)


@no_tensorflow
@pytest.mark.parametrize("disable_shuffling", [False, True])
def test_plain_tfds_shuffler_spill_needs_tensorflow(tmp_path, monkeypatch, disable_shuffling):
    """The finding: the spill uses TensorFlow, and disable_shuffling=True does not avoid it."""
    monkeypatch.setattr(shuffle, "MAX_MEM_BUFFER_SIZE", 10)
    shuffler = shuffle.Shuffler(tmp_path, "salt", disable_shuffling=disable_shuffling)
    with pytest.raises(ModuleNotFoundError, match="tensorflow"):
        for key in range(3):
            shuffler.add(key, b"x" * 8)


@pytest.mark.parametrize("disable_shuffling", [False, True])
def test_shuffler_spills_to_disk_with_the_compat_gfile(tmp_path, monkeypatch, disable_shuffling):
    monkeypatch.setattr(shuffle, "MAX_MEM_BUFFER_SIZE", 10)
    with tfds_compat.shuffler_gfile():
        shuffler = shuffle.Shuffler(tmp_path, "salt", disable_shuffling=disable_shuffling)
        for key in range(50):
            shuffler.add(key, f"record {key}".encode())
        assert list(tmp_path.glob("bucket_*.tmp")), "records were not spilled to disk"
        out = [data for _, data in shuffler]
    assert sorted(out) == sorted(f"record {k}".encode() for k in range(50))
    if disable_shuffling:
        assert out == [f"record {k}".encode() for k in range(50)]
    assert not list(tmp_path.glob("bucket_*.tmp"))  # buckets are deleted once read
    assert shuffle.tf is not tfds_compat._LOCAL_TF  # restored


def _prepare(source, data_dir) -> list[tuple]:
    builder = isic.make_builder(
        "isic2020", 32, data_dir, options=isic.BuildOptions(num_folds=2, num_workers=2)
    )
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(source))
    )
    out = []
    for split in ("fold0", "fold1"):
        src = builder.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()})
        out += [(split, src[i]["image_id"], src[i]["image"]) for i in range(len(src))]
    return out


def test_prepare_with_splits_over_the_memory_limit(tmp_path, monkeypatch):
    source = layouts.write_layout(
        tmp_path / "src", "isic2020", layouts.balanced_examples("isic2020", 10)
    )
    in_memory = _prepare(source, tmp_path / "a")

    spills = []
    bucket_add = shuffle._Bucket.add

    def counting_add(self, key, data):
        spills.append(key)
        return bucket_add(self, key, data)

    monkeypatch.setattr(shuffle, "MAX_MEM_BUFFER_SIZE", 100)  # every split is "over 1 GB"
    monkeypatch.setattr(shuffle._Bucket, "add", counting_add)
    spilled = _prepare(source, tmp_path / "b")

    assert len(spills) == 10  # every record went through the disk buckets
    assert spilled == in_memory  # same records, same order, same bytes
    assert not list((tmp_path / "b").rglob("bucket_*.tmp"))
