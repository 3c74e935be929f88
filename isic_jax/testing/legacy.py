"""Datasets as older versions of isic_jax prepared them, for the tests of reading them.

    builder = legacy.make_builder_v1_0("isic2020", 32, data_dir, options=...)
    builder.download_and_prepare(download_config=...)   # <data_dir>/isic/isic2020_32/1.0.0

TFDS only generates a builder's current VERSION, so the 1.0.0 dataset is written by a subclass
whose VERSION is 1.0.0: the same builder code with the 1.0.0 features (`isic.features(release,
"1.0.0")`, what 1.0.0 wrote) and its metadata, in the same folder layout (`isic/<config>/1.0.0`).
"""

from __future__ import annotations

import os
from typing import Any

import tensorflow_datasets as tfds

from isic_jax.data.isic import builder as isic


class IsicV1_0(isic.Isic, skip_registration=True):  # noqa: N801 - the version in the name
    """The `isic` builder at dataset version 1.0.0."""

    name = "isic"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": isic.Isic.RELEASE_NOTES["1.0.0"]}


def make_builder_v1_0(
    release: str, image_size: int, data_dir: str | os.PathLike, **kwargs: Any
) -> IsicV1_0:
    """`isic.make_builder` at version 1.0.0 (kwargs: options=BuildOptions(...))."""
    return IsicV1_0(
        config=isic.config_for(release, image_size),
        data_dir=os.fspath(os.path.expanduser(data_dir)),
        file_format="array_record",
        **kwargs,
    )
