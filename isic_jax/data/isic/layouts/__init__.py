"""The release table: one `Release` entry per ISIC release, the one place that describes it.

    from isic_jax.data.isic.layouts import RELEASES
    RELEASES["isic2019"].classes      # ("MEL", "NV", ...)
    RELEASES["isic2018"].variants     # Task 3 ground truth, or the HAM10000 metadata

Every part that knows about releases reads these entries: `releases.detect` and `releases.scan`
(recognising a layout, reading its rows, locating its images), `labels.RELEASES` /
`DIAGNOSIS_CLASSES` / `MALIGNANT_DIAGNOSES`, the TFDS builder (configs, classes, citations),
`isic_jax.data.synth` and the hand-made test layouts (`isic_jax.testing.layouts`), which write the
official files through `write`.

Adding a release (or a layout of one) is one entry: a module here with a `RELEASE` (or one more
`Variant` in an existing one), listed in `_MODULES`. Types: `spec` (Release, Variant, Role,
ImageSource, MetadataRow), `rows` (Row, Skip, CSV helpers), `synthspec` (how synth imitates a
release), `write` (the writers).
"""

from __future__ import annotations

from isic_jax.data.isic.layouts import (
    archive,
    isic2016,
    isic2017,
    isic2018,
    isic2019,
    isic2020,
    isic2024,
)
from isic_jax.data.isic.layouts.spec import Release, Variant

# In this order: config lists, `--format` choices and synth's seeds follow it.
_MODULES = (archive, isic2016, isic2017, isic2018, isic2019, isic2020, isic2024)

RELEASES: dict[str, Release] = {m.RELEASE.name: m.RELEASE for m in _MODULES}

# Every layout by name ("archive", "archive_json", ..., "isic2024_files").
VARIANTS: dict[str, Variant] = {v.name: v for r in RELEASES.values() for v in r.variants}

# The release each layout belongs to.
RELEASE_OF: dict[str, str] = {v.name: r.name for r in RELEASES.values() for v in r.variants}


def _check() -> None:
    """Roles of one name within a release are recognised alike (`Scan.files` keys them so)."""
    if len(VARIANTS) != sum(len(r.variants) for r in RELEASES.values()):
        raise ValueError("two layouts share a name")
    for release in RELEASES.values():
        seen = {}
        for variant in release.variants:
            for role in variant.roles:
                key = (role.kind, role.recognise, role.near, role.prefer)
                if seen.setdefault(role.name, key) != key:
                    raise ValueError(f"{release.name}: role {role.name!r} recognised two ways")


_check()
