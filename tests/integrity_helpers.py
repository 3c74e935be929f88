"""Helpers for the checksum tests (no tests here): damage that still decodes."""

from __future__ import annotations

import pathlib

import numpy as np

NUM_BYTES = 16  # as in the issue: 16 bytes in the middle of the largest data file


def _data_files(item_dir: pathlib.Path) -> list[pathlib.Path]:
    """The OCDBT data files of an Orbax item (`<item>/d/…`, `<item>/ocdbt.process_*/d/…`),
    largest first."""
    files = [p for p in item_dir.rglob("*") if p.is_file() and p.parent.name == "d"]
    return sorted(files, key=lambda p: (-p.stat().st_size, str(p)))


def damage_silently(item_dir: pathlib.Path, num_bytes: int = NUM_BYTES
                    ) -> tuple[pathlib.Path, int]:
    """Inverts `num_bytes` bytes near the middle of the largest data file of an Orbax item, at
    the first offset (middle, then outwards) where the item still reads but some array's values
    differ: the damage a checksum has to catch (damage that fails to decode is caught anyway).
    Returns (file, offset).
    """
    from isic_jax.training import integrity

    before = integrity.read_arrays(item_dir)
    path = _data_files(item_dir)[0]
    data = path.read_bytes()
    middle = len(data) // 2
    for k in range(200):
        offset = middle + (k // 2 + 1) * 61 * (1 if k % 2 else -1) if k else middle
        if not 0 <= offset <= len(data) - num_bytes:
            continue
        damaged = bytearray(data)
        damaged[offset:offset + num_bytes] = bytes(b ^ 0xFF for b in data[offset:offset
                                                                          + num_bytes])
        path.write_bytes(bytes(damaged))
        try:
            after = integrity.read_arrays(item_dir)
        except Exception:  # noqa: BLE001 - this offset does not decode: try the next
            continue
        if after.keys() == before.keys() and any(
                not np.array_equal(before[k], after[k], equal_nan=True) for k in before):
            return path, offset
    path.write_bytes(data)
    raise AssertionError(f"no offset of {path} gave damage that still decodes")


def edit_json_file(path: pathlib.Path) -> None:
    """Changes one digit of a JSON file so that it still parses (a number differs)."""
    text = path.read_text()
    i = next(i for i, c in enumerate(text) if c.isdigit())
    path.write_text(text[:i] + str((int(text[i]) + 1) % 10) + text[i + 1:])
