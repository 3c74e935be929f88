"""Two gaps of tensorflow-datasets 4.9 without TensorFlow, closed for the ISIC builder only.

1. Splits over 1 GB. `GeneratorBasedBuilder` writes every split through
   `tensorflow_datasets.core.shuffle.Shuffler`, which keeps records in memory up to
   `MAX_MEM_BUFFER_SIZE` (1 GB) and then spills them to 1000 bucket files through
   `tf.io.gfile`, i.e. TensorFlow. `disable_shuffling = True` does not avoid it: it only changes
   the sort key, and the spill happens either way (`Shuffler.add` -> `_add_to_mem_buffer`; checked
   in the installed source and by tests/test_builder_shuffler.py). `shuffler_gfile()` gives the
   shuffler module a `tf` with just the three `tf.io.gfile` calls it makes (GFile, exists, remove),
   backed by `etils.epath` (local files, or the cloud filesystems epath supports), and raises the
   open-file limit the 1000 buckets need. It changes nothing when TensorFlow is installed.

2. `DatasetBuilder.code_path` evaluates `importlib_resources.abc.Traversable`, a backport package
   that is not installed (nor needed) on Python >= 3.9; download_and_prepare fails on it for any
   builder defined in a regular package. `code_path()` gives the answer TFDS falls back to.
"""

from __future__ import annotations

import contextlib
import importlib.util
import types
from collections.abc import Iterator

from etils import epath


def tensorflow_installed() -> bool:
    return importlib.util.find_spec("tensorflow") is not None


class _NeverRaised(Exception):
    """Stands in for tf.errors.ResourceExhaustedError, which only TensorFlow raises."""


def _gfile_open(path: epath.PathLike, mode: str = "r"):  # noqa: ANN202 - a file object
    return epath.Path(path).open(mode)


def _remove(path: epath.PathLike) -> None:
    epath.Path(path).unlink()


def _exists(path: epath.PathLike) -> bool:
    return epath.Path(path).exists()


_LOCAL_TF = types.SimpleNamespace(
    io=types.SimpleNamespace(
        gfile=types.SimpleNamespace(GFile=_gfile_open, exists=_exists, remove=_remove)
    ),
    errors=types.SimpleNamespace(ResourceExhaustedError=_NeverRaised),
)


@contextlib.contextmanager
def _open_files_limit(needed: int) -> Iterator[None]:
    """Raises the soft RLIMIT_NOFILE to at least `needed` (up to the hard limit) for a while."""
    try:
        import resource
    except ImportError:  # not on Unix
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        try:
            yield
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    else:
        yield


@contextlib.contextmanager
def shuffler_gfile() -> Iterator[None]:
    """Lets TFDS's shuffler spill splits over 1 GB to disk without TensorFlow (see module doc)."""
    if tensorflow_installed():
        yield
        return
    from tensorflow_datasets.core import shuffle

    previous = shuffle.tf
    shuffle.tf = _LOCAL_TF
    try:
        with _open_files_limit(shuffle.BUCKETS_NUMBER + 1024):
            yield
    finally:
        shuffle.tf = previous


def code_path(module_file: str) -> epath.Path:
    """What `DatasetBuilder.code_path` returns for a builder defined in `module_file`."""
    return epath.Path(module_file)
