"""Content checksums of checkpoints and exports: recorded at save, checked before use.

    entries = array_entries(named_arrays(state))        # {name: {shape, dtype, crc32}}
    check_arrays(entries, named_arrays(restored), "checkpoint step 20, state")   # or raises

What is checksummed: every array by value (CRC-32, `zlib.crc32`, of its bytes in C order, with
its shape and dtype), the JSON items by their canonical JSON (sorted keys), and plain files by
their bytes. Arrays are hashed from the host values that were saved and from the values a restore
returns, so a check covers what is actually used, whatever the storage layer did in between.

Where it is stored:
- A checkpoint: an extra Orbax composite item `checksums/` saved in the same `Composite` as the
  state, so Orbax finalizes it atomically with the rest. Every process writes its own file,
  `checksums/process_<i>-of-<n>.json` (grain's naming), from its own copy of the state and its own
  input-pipeline state. The CRCs are computed in Orbax's background commit (`ChecksumHandler`),
  off the training step: the step only takes host views of the arrays (no copy on CPU).
- An export: `checksums.json` beside `model.json`, covering its files and the arrays of each
  Orbax `variables/` folder (`write_folder_checksums`).

A manifest (`checksums` item file or `checksums.json`):

    {"format": "isic_jax.checksums", "version": 1, "algorithm": "crc32",
     "arrays": {"state": {"params.conv_init.kernel": {"shape": [...], "dtype": "float32",
                                                      "crc32": "1a2b3c4d"}, ...}},
     "json": {"rng": "...", "config": "..."},            # canonical JSON of a JSON item
     "files": {"data_iter/process_0-of-1.json": "..."},  # bytes of a file (relative path)
     "unchecked": {"state": [...]},   # arrays sharded over processes (not held whole here)
     "extra": {"train_loss": 0.41, ...}}

CRC-32 detects every burst of up to 32 changed bits and any other accidental change with
probability 1 - 2^-32; it is not a defence against deliberate tampering. It runs at ~3-4 GB/s per
core here and releases the GIL, so arrays are hashed on a few threads.

This module imports nothing from isic_jax (training/weight_sources.py uses it for isic_jax
sources).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import pathlib
import threading
import zlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

PyTree = Any

FORMAT = "isic_jax.checksums"
VERSION = 1
ALGORITHM = "crc32"
ITEM = "checksums"  # the checkpoint's composite item (a folder of per-process files)
EXPORT_FILE = "checksums.json"  # an export's manifest, beside model.json
_THREADS = max(1, min(8, os.cpu_count() or 1))
_PARALLEL_BYTES = 1 << 20  # smaller trees are hashed on the calling thread


class IntegrityError(ValueError):
    """Content that does not match the checksum recorded when it was written (or a manifest
    that cannot be read): the message names the checkpoint or file, and the array."""


ABSENT = "absent"  # written before checksums existed: nothing to verify against
VERIFIED = "verified"
OFF = "off"  # checking disabled


def absent_note(what: str) -> str:
    """The one line said when `what` has no checksums."""
    return (f"{what} has no checksums (written by an earlier isic_jax): its content cannot be "
            f"verified.")


# ---------------------------------------------------------------------------------------------
# Hashing.


def crc32(data: Any) -> str:
    """CRC-32 of bytes-like data (or a numpy array's bytes in C order) as 8 hex digits."""
    if isinstance(data, np.ndarray):
        data = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    return f"{zlib.crc32(data) & 0xFFFFFFFF:08x}"


def array_entry(x: np.ndarray) -> dict[str, Any]:
    """{"shape", "dtype", "crc32"} of a host array."""
    x = np.asarray(x)
    return {"shape": list(x.shape), "dtype": str(x.dtype), "crc32": crc32(x)}


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def json_crc32(obj: Any) -> str:
    """CRC-32 of a JSON value's canonical form (the same before a save and after a restore)."""
    return crc32(canonical_json(obj))


def _key_name(entry: Any) -> str:
    for attr in ("name", "key", "idx"):  # GetAttrKey, DictKey/FlattenedIndexKey, SequenceKey
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def named_leaves(tree: PyTree) -> dict[str, Any]:
    """{dotted name: leaf}, named as Orbax names them on disk (dataclass fields, dict keys and
    NamedTuple fields by name, sequence items by index): the same names for a train state, its
    abstract target and the metadata tree of its checkpoint."""
    return {".".join(_key_name(k) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _whole(leaf: Any) -> Any:
    """The device array holding a leaf's whole value on this process (None: it holds part of
    it), or the leaf itself when it is not a jax.Array."""
    if not isinstance(leaf, jax.Array):
        return leaf
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        leaf = jax.random.key_data(leaf)
    if leaf.is_fully_addressable:
        return leaf
    if leaf.is_fully_replicated:
        return leaf.addressable_data(0)
    return None


def host_array(leaf: Any) -> np.ndarray | None:
    """A host view of a leaf's whole value as this process holds it; None when the process holds
    only part of it (an array sharded over processes).

    CPU device arrays give a view without a copy; accelerator arrays are copied to the host. A
    replicated array of a multi-process run gives this process's own copy."""
    whole = _whole(leaf)
    return None if whole is None else np.asarray(whole)


def host_arrays(leaves: Mapping[str, Any]) -> dict[str, np.ndarray | None]:
    """`host_array` of every leaf; the device-to-host copies all start first (pipelined)."""
    wholes = {name: _whole(leaf) for name, leaf in leaves.items()}
    for whole in wholes.values():
        if isinstance(whole, jax.Array):
            whole.copy_to_host_async()
    return {name: None if w is None else np.asarray(w) for name, w in wholes.items()}


def named_arrays(tree: PyTree) -> dict[str, np.ndarray | None]:
    """{dotted name: host array (None: sharded over processes)} of a pytree."""
    return host_arrays(named_leaves(tree))


def _map(fn: Callable[[Any], Any], values: list[Any], total_bytes: int) -> list[Any]:
    if total_bytes < _PARALLEL_BYTES or _THREADS == 1 or len(values) < 2:
        return [fn(v) for v in values]
    with concurrent.futures.ThreadPoolExecutor(_THREADS, "isic-jax-crc32") as pool:
        return list(pool.map(fn, values))


def array_entries(arrays: Mapping[str, np.ndarray | None]
                  ) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """({name: array_entry}, [names not checksummed: None values]) (zlib releases the GIL, so
    large trees are hashed on several threads)."""
    present = [(k, v) for k, v in arrays.items() if v is not None]
    total = sum(int(v.nbytes) for _, v in present)
    entries = _map(array_entry, [v for _, v in present], total)
    return ({k: e for (k, _), e in zip(present, entries, strict=True)},
            sorted(k for k, v in arrays.items() if v is None))


# ---------------------------------------------------------------------------------------------
# Checking.


def check_arrays(
    expected: Mapping[str, Mapping[str, Any]],
    arrays: Mapping[str, Any],
    where: str,
    *,
    unchecked: Iterable[str] = (),
    complete: bool = True,
) -> int:
    """Compares arrays (host or device leaves, by name) with their recorded entries.

    Args:
      expected: {name: {"shape", "dtype", "crc32"}} as recorded.
      arrays: {name: array}; device arrays are read back to the host (this process's copy).
      where: what holds them, for the message ("checkpoint .../20, item state").
      unchecked: names recorded as not checksummed (skipped).
      complete: `arrays` must be exactly the recorded ones (else a subset is checked).

    Returns:
      The number of arrays checked.

    Raises:
      IntegrityError: the first array (by name) whose shape, dtype or checksum differs, or an
        array missing on either side; the message names it.
    """
    skip = set(unchecked)
    if complete:
        missing = sorted(set(expected) - set(arrays) - skip)
        if missing:
            raise IntegrityError(f"{where}: array {missing[0]} is recorded in the checksums but "
                                 f"was not restored" + _more(missing))
    hosts = host_arrays({name: leaf for name, leaf in arrays.items() if name not in skip})
    unknown = sorted(name for name in hosts if name not in expected)
    if unknown:
        raise IntegrityError(f"{where}: array {unknown[0]} is not in its checksums (they were "
                             f"written for other content)" + _more(unknown))
    todo = [(name, x) for name, x in sorted(hosts.items()) if x is not None]
    total = sum(int(x.nbytes) for _, x in todo)
    got = _map(lambda item: array_entry(item[1]), todo, total)
    bad = []
    for (name, _), entry in zip(todo, got, strict=True):
        want = expected[name]
        if [int(d) for d in want.get("shape", [])] != entry["shape"] or (
                str(want.get("dtype")) != entry["dtype"]):
            bad.append(f"array {name} is {entry['dtype']} {tuple(entry['shape'])}, but "
                       f"{want.get('dtype')} {tuple(want.get('shape', []))} was saved")
        elif str(want.get("crc32")) != entry["crc32"]:
            bad.append(f"array {name} does not match the checksum saved with it (crc32 "
                       f"{entry['crc32']}, saved {want.get('crc32')})")
    if bad:
        others = f" (and {len(bad) - 1} more array(s))" if len(bad) > 1 else ""
        raise IntegrityError(f"{where}: {bad[0]}{others}: its files changed after the save")
    return len(todo)


def _more(names: list[str]) -> str:
    return f" (and {len(names) - 1} more)" if len(names) > 1 else ""


def check_value(expected: str | None, actual: str, where: str, what: str) -> None:
    """Raises IntegrityError when a recorded CRC (None: not recorded) differs from `actual`."""
    if expected is not None and str(expected) != actual:
        raise IntegrityError(f"{where}: {what} does not match the checksum saved with it "
                             f"(crc32 {actual}, saved {expected}): it changed after the save")


# ---------------------------------------------------------------------------------------------
# Manifests.


def new_manifest(**extra: Any) -> dict[str, Any]:
    return {"format": FORMAT, "version": VERSION, "algorithm": ALGORITHM, "arrays": {},
            "json": {}, "files": {}, "unchecked": {}, "extra": dict(extra)}


def parse_manifest(path: pathlib.Path) -> dict[str, Any]:
    """A manifest file, checked for format and version.

    Raises:
      IntegrityError: unreadable, not a manifest, or a newer version.
    """
    try:
        manifest = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:
        raise IntegrityError(f"the checksum file {path} cannot be read ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise IntegrityError(f"{path} is not an isic_jax checksum file")
    if int(manifest.get("version", 0)) > VERSION or manifest.get("algorithm") != ALGORITHM:
        raise IntegrityError(f"{path}: checksums of version {manifest.get('version')} "
                             f"({manifest.get('algorithm')}); this isic_jax reads version "
                             f"{VERSION} ({ALGORITHM})")
    return manifest


def process_file(index: int | None = None, count: int | None = None) -> str:
    """This process's file name in a per-process item (grain's naming)."""
    index = jax.process_index() if index is None else index
    count = jax.process_count() if count is None else count
    return f"process_{index}-of-{count}.json"


def read_checkpoint_manifest(step_dir: str | os.PathLike) -> dict[str, Any] | None:
    """This process's manifest in a checkpoint step folder; process 0's when the checkpoint was
    written by another number of processes; None for a checkpoint without checksums.

    Raises:
      IntegrityError: the `checksums` item is there but its file for this process is missing or
        unreadable.
    """
    folder = pathlib.Path(step_dir) / ITEM
    if not folder.is_dir():
        return None
    own = folder / process_file()
    if own.is_file():
        return parse_manifest(own)
    firsts = sorted(folder.glob("process_0-of-*.json"))
    written_by = {p.name.split("-of-")[-1] for p in folder.glob("process_*-of-*.json")}
    if firsts and str(jax.process_count()) + ".json" not in written_by:
        return parse_manifest(firsts[0])
    raise IntegrityError(f"{folder}: no checksum file for this process ({own.name}): the "
                         f"checkpoint is incomplete")


def check_checkpoint_arrays(step_dir: str | os.PathLike, item: str,
                            arrays: Mapping[str, Any], complete: bool = False) -> str:
    """Checks arrays read from one item of a checkpoint step folder (all of them, or a subset
    when not `complete`) against this process's manifest. Returns VERIFIED, or ABSENT for a
    checkpoint without checksums.

    Raises:
      IntegrityError: an array that differs (named, with the step folder).
    """
    manifest = read_checkpoint_manifest(step_dir)
    if manifest is None:
        return ABSENT
    check_arrays(manifest["arrays"].get(item, {}), arrays, f"checkpoint {step_dir}, {item}",
                 unchecked=manifest["unchecked"].get(item, ()), complete=complete)
    return VERIFIED


# ---------------------------------------------------------------------------------------------
# The Orbax item of a checkpoint.


class ChecksumHandler(ocp.AsyncCheckpointHandler):
    """Writes `process_<i>-of-<n>.json` (this process's manifest) into the item folder.

    The CRCs are computed in the commit future, which Orbax runs in its background thread and
    waits for before it finalizes the checkpoint: a save returns without hashing, and the
    manifest lands atomically with the other items."""

    def __init__(self, **kwargs: Any):
        del kwargs  # Orbax may pass handler options

    async def _write(self, directory: Any, args: ChecksumSave) -> None:
        if args.after is not None:  # e.g. until the blocking part of an async save returned
            import asyncio

            await asyncio.to_thread(args.after.wait)
        manifest = args.manifest()
        path = pathlib.Path(os.fspath(directory)) / process_file()
        path.write_text(json.dumps(manifest, sort_keys=True, indent=0) + "\n")

    async def async_save(self, directory: Any, args: ChecksumSave | None = None,
                         *unused: Any, **kwargs: Any) -> list[Any]:
        return [ocp.future.CommitFutureAwaitingContractedSignals(
            self._write(directory, args), name="isic_jax_checksums")]

    def save(self, directory: Any, args: ChecksumSave | None = None, **kwargs: Any) -> None:
        import asyncio

        asyncio.run(self._write(directory, args))

    def restore(self, directory: Any, args: Any = None) -> dict[str, Any] | None:
        return read_checkpoint_manifest(pathlib.Path(os.fspath(directory)).parent)

    def metadata(self, directory: Any) -> None:
        return None

    def finalize(self, directory: Any) -> None:
        pass

    def close(self) -> None:
        pass

    @classmethod
    def typestr(cls) -> str:
        return f"{cls.__module__}.{cls.__qualname__}"


@ocp.args.register_with_handler(ChecksumHandler, for_save=True)
@dataclasses.dataclass
class ChecksumSave(ocp.args.CheckpointArgs):
    """What a checkpoint's `checksums` item records.

    arrays: {item: {name: host array (None: not held whole by this process)}}, hashed later.
    json: {item: CRC of its canonical JSON}; files: {relative path: CRC of its bytes}; extra:
    JSON-able facts kept with the checksums (e.g. the training loss at the save). after: an
    event the hashing waits for (None: none), so that it does not compete with the caller.
    """

    arrays: dict[str, dict[str, np.ndarray | None]]
    json: dict[str, str] = dataclasses.field(default_factory=dict)
    files: dict[str, str] = dataclasses.field(default_factory=dict)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    after: threading.Event | None = None

    def manifest(self) -> dict[str, Any]:
        manifest = new_manifest(**self.extra)
        for item, arrays in self.arrays.items():
            entries, unchecked = array_entries(arrays)
            manifest["arrays"][item] = entries
            if unchecked:
                manifest["unchecked"][item] = unchecked
        manifest["json"] = dict(self.json)
        manifest["files"] = dict(self.files)
        return manifest


@ocp.args.register_with_handler(ChecksumHandler, for_restore=True)
@dataclasses.dataclass
class ChecksumRestore(ocp.args.CheckpointArgs):
    """Reads this process's manifest (see `read_checkpoint_manifest`)."""


# ---------------------------------------------------------------------------------------------
# Folders (exports) and whole-folder checks (`isic-jax verify`).


def read_arrays(path: str | os.PathLike, keys: Iterable[str] | None = None
                ) -> dict[str, np.ndarray]:
    """The arrays of an Orbax PyTree item as host numpy, by dotted name, read with the item's own
    metadata (no model code); `keys`: only these top-level subtrees (e.g. params)."""
    return {name: np.asarray(v) for name, v in named_leaves(restore_tree(path, keys)).items()}


def restore_tree(path: str | os.PathLike, keys: Iterable[str] | None = None) -> PyTree:
    """An Orbax PyTree item (a whole checkpoint item, or only its `keys` subtrees: an optimiser
    state stays on disk) as nested host numpy arrays, read with the item's own metadata (a
    Checkpointer would also look for a step-level file, which an item of a composite checkpoint
    does not have, and log about it)."""
    path = pathlib.Path(path).absolute()
    handler = ocp.StandardCheckpointHandler()
    try:
        metadata = handler.metadata(path)
    finally:
        handler.close()
    tree = getattr(metadata, "tree", metadata)
    if keys is not None:
        tree = {k: tree[k] for k in keys if k in tree}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    with ocp.PyTreeCheckpointer() as ckptr:
        return ckptr.restore(path, args=ocp.args.PyTreeRestore(
            item=tree, restore_args=restore_args, partial_restore=keys is not None))


def write_folder_checksums(folder: str | os.PathLike,
                           arrays: Mapping[str, PyTree] | None = None) -> dict[str, Any]:
    """Writes `folder/checksums.json`: the CRC of every file in it (except those inside the
    array folders, which Orbax reads) and of every array of each `arrays` entry
    ({relative folder of an Orbax item: the host tree saved there}). Call it last."""
    folder = pathlib.Path(folder)
    arrays = dict(arrays or {})
    manifest = new_manifest()
    array_dirs = [folder / rel for rel in arrays]
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if path.name == EXPORT_FILE and path.parent == folder:
            continue
        if any(d == path or d in path.parents for d in array_dirs):
            continue
        manifest["files"][path.relative_to(folder).as_posix()] = crc32(path.read_bytes())
    for rel, tree in arrays.items():
        entries, unchecked = array_entries(named_arrays(tree))
        manifest["arrays"][rel] = entries
        if unchecked:
            manifest["unchecked"][rel] = unchecked
    (folder / EXPORT_FILE).write_text(json.dumps(manifest, sort_keys=True, indent=0) + "\n")
    return manifest


def read_folder_checksums(folder: str | os.PathLike) -> dict[str, Any] | None:
    """`folder/checksums.json`, or None when the folder has none (an earlier export)."""
    path = pathlib.Path(folder) / EXPORT_FILE
    return parse_manifest(path) if path.is_file() else None


def check_folder_files(folder: str | os.PathLike,
                       wanted: Callable[[str], bool] | None = None) -> str:
    """Checks the recorded files of a folder with `checksums.json` (those `wanted(relative path)`
    selects; default all). Returns VERIFIED, or ABSENT when the folder has no checksums.

    Raises:
      IntegrityError: a recorded file that is missing or whose bytes changed (named).
    """
    folder = pathlib.Path(folder)
    manifest = read_folder_checksums(folder)
    if manifest is None:
        return ABSENT
    for rel, want in sorted(manifest["files"].items()):
        if wanted is not None and not wanted(rel):
            continue
        path = folder / rel
        if not path.is_file():
            raise IntegrityError(f"{path} is missing (it is recorded in {folder / EXPORT_FILE})")
        check_value(want, crc32(path.read_bytes()), str(path), "the file")
    return VERIFIED


def check_saved_arrays(item_dir: str | os.PathLike, arrays: Mapping[str, Any],
                       complete: bool = True) -> str:
    """Checks arrays restored from an Orbax item of a folder with `checksums.json` one to three
    levels up (an export's `variables/`, an ensemble's `members/<i>/variables/`). Returns
    VERIFIED, or ABSENT when no checksums cover that folder.

    Raises:
      IntegrityError: an array whose checksum differs (named, with the folder).
    """
    item_dir = pathlib.Path(item_dir).absolute()
    for root in list(item_dir.parents)[:3]:
        manifest = read_folder_checksums(root)
        if manifest is None:
            continue
        rel = item_dir.relative_to(root).as_posix()
        if rel in manifest["arrays"]:
            check_arrays(manifest["arrays"][rel], arrays, str(item_dir),
                         unchecked=manifest["unchecked"].get(rel, ()), complete=complete)
            return VERIFIED
    return ABSENT


@dataclasses.dataclass
class Report:
    """The result of checking one checkpoint or export folder in full."""

    path: pathlib.Path
    status: str  # "ok", "damaged", "unreadable", "unverified"
    reason: str = ""
    checked: int = 0  # arrays, JSON items and files compared


def _verify_manifest(folder: pathlib.Path, manifest: dict[str, Any],
                     cache: dict[str, dict[str, np.ndarray]]) -> int:
    checked = 0
    for rel, want in sorted(manifest.get("files", {}).items()):
        path = folder / rel
        if not path.is_file():
            raise IntegrityError(f"{path} is missing (recorded in the checksums)")
        check_value(want, crc32(path.read_bytes()), str(path), "the file")
        checked += 1
    for name, want in sorted(manifest.get("json", {}).items()):
        handler = ocp.JsonCheckpointHandler()
        try:
            value = handler.restore(folder / name)
        finally:
            handler.close()
        check_value(want, json_crc32(value), str(folder / name), f"the {name} item")
        checked += 1
    for rel, entries in sorted(manifest.get("arrays", {}).items()):
        if rel not in cache:
            cache[rel] = read_arrays(folder / rel)
        checked += check_arrays(entries, cache[rel], str(folder / rel),
                                unchecked=manifest.get("unchecked", {}).get(rel, ()))
    return checked


def verify_folder(folder: str | os.PathLike) -> Report:
    """Checks everything a checkpoint step folder (its `checksums/` item, every process's file)
    or an export folder (`checksums.json`) records: arrays read back in full, JSON items, files.
    Never raises for damaged content: the report says what was found."""
    folder = pathlib.Path(folder)
    item = folder / ITEM
    try:
        if item.is_dir():
            paths = sorted(item.glob("process_*-of-*.json"))
            if not paths:
                raise IntegrityError(f"{item} holds no checksum file")
            manifests = [parse_manifest(p) for p in paths]
        elif (folder / EXPORT_FILE).is_file():
            manifests = [parse_manifest(folder / EXPORT_FILE)]
        else:
            return Report(folder, "unverified", "no checksums (written by an earlier isic_jax)")
        cache: dict[str, dict[str, np.ndarray]] = {}
        checked = sum(_verify_manifest(folder, m, cache) for m in manifests)
    except IntegrityError as e:
        return Report(folder, "damaged", str(e))
    except Exception as e:  # noqa: BLE001 - Orbax/TensorStore raise many types
        return Report(folder, "unreadable", f"{type(e).__name__}: {' '.join(str(e).split())}")
    return Report(folder, "ok", f"{checked} arrays, items and files match their checksums",
                  checked)
