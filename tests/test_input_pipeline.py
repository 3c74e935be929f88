"""Tests of the Grain pipelines on an in-memory source of tiny JPEG records."""

from __future__ import annotations

import io
import itertools

import ml_collections
import numpy as np
import pytest
from PIL import Image

from isic_jax.data import pipeline as ip

SIZE = 32


def _record(i: int, rng: np.random.Generator, positive: bool) -> dict:
    image = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG", quality=85)
    return {
        "image": buf.getvalue(),
        "image_id": f"ISIC_{i:07d}",
        "label": np.int64(positive),
        "diagnosis": np.int64(i % 3),
        "patient_id": f"IP_{i // 2:04d}" if i % 4 else "",
        "lesion_id": "",
        "age": np.int32(30 + i % 50),
        "sex": np.int64(i % 3),
        "anatom_site": "torso",
        "fold": np.int32(i % 5),
    }


def make_source(n: int, num_positive: int | None = None) -> ip.ListSource:
    rng = np.random.default_rng(n)
    num_positive = n // 4 if num_positive is None else num_positive
    return ip.ListSource([_record(i, rng, i < num_positive) for i in range(n)])


def data_config(**overrides) -> ml_collections.ConfigDict:
    from isic_jax.configs import default

    config = default.get_config().data
    config.image_size = SIZE
    config.num_workers = 0
    config.prefetch_buffer_size = 1
    for key, value in overrides.items():
        config[key] = value
    return config


def take(iterator, n: int) -> list[dict]:
    return [next(iterator) for _ in range(n)]


def assert_batches_equal(a: list[dict], b: list[dict]):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def train_iter(source, config, batch=4, seed=0, index=0, count=1, **kwargs):
    ds = ip.create_train_dataset(
        source, config, batch, seed, process_index=index, process_count=count, **kwargs
    )
    return iter(ds)


@pytest.fixture(scope="module")
def source() -> ip.ListSource:
    return make_source(12)


def test_batch_shapes_and_dtypes(source):
    batch = next(train_iter(source, data_config(), batch=4))
    expected = {
        "image": (np.uint8, (4, SIZE, SIZE, 3)),
        "label": (np.int32, (4,)),
        "mask": (np.bool_, (4,)),
        "index": (np.int64, (4,)),
        "position": (np.int64, (4,)),
        "sex": (np.int32, (4,)),
        "age": (np.int32, (4,)),
    }
    assert set(batch) == set(ip.BATCH_KEYS)
    for key, (dtype, shape) in expected.items():
        assert batch[key].dtype == dtype and batch[key].shape == shape, key
    for key in ("image_id", "patient_id", "anatom_site"):
        assert batch[key].dtype.kind == "S" and batch[key].shape == (4,)
    assert batch["mask"].all()
    for i, index in enumerate(batch["index"]):
        record = source[index]
        assert batch["image_id"][i] == record["image_id"].encode()
        assert batch["label"][i] == record["label"]
        assert batch["patient_id"][i] == record["patient_id"].encode()
        assert batch["age"][i] == record["age"] and batch["sex"][i] == record["sex"]
    # uint8 RGB crops of the (random-noise) records, not normalised: the device does that.
    assert batch["image"].std() > 20 and batch["image"].max() > 200
    np.testing.assert_array_equal(batch["position"], np.arange(4))


def test_positions_number_the_global_stream(source):
    batches = take(train_iter(source, data_config(), batch=4), 5)
    positions = np.concatenate([b["position"] for b in batches])
    np.testing.assert_array_equal(positions, np.arange(20))  # unique, past the 12-record epoch
    assert sorted(np.concatenate([b["index"] for b in batches])[:12]) == list(range(12))


def test_diagnosis_task_uses_the_diagnosis_feature(source):
    batch = next(train_iter(source, data_config(task="diagnosis")))
    np.testing.assert_array_equal(batch["label"], batch["index"] % 3)


def test_same_seed_same_batches_other_seed_different(source):
    config = data_config()
    a = take(train_iter(source, config, seed=3), 4)
    b = take(train_iter(source, config, seed=3), 4)
    c = take(train_iter(source, config, seed=4), 4)
    assert_batches_equal(a, b)
    assert not all(np.array_equal(x["index"], y["index"]) for x, y in zip(a, c, strict=True))
    assert not np.array_equal(a[0]["image"], c[0]["image"])


def test_each_epoch_is_a_new_permutation(source):
    batches = take(train_iter(source, data_config(), batch=4), 9)  # 3 epochs of 12
    epochs = np.concatenate([b["index"] for b in batches]).reshape(3, 12)
    for epoch in epochs:
        assert sorted(epoch) == list(range(12))
    assert len({tuple(e) for e in epochs}) == 3


def test_augmentation_differs_between_epochs(source):
    batches = take(train_iter(source, data_config(), batch=4), 6)
    first, second = {}, {}
    for epoch, chunk in ((first, batches[:3]), (second, batches[3:])):
        for b in chunk:
            for index, image in zip(b["index"], b["image"], strict=True):
                epoch[int(index)] = image
    assert not any(np.array_equal(first[i], second[i]) for i in range(12))


@pytest.mark.parametrize("count", [2, 3])
def test_process_slices_are_disjoint_and_complete(source, count):
    config = data_config()
    per_process = 2
    global_batch = per_process * count
    steps = 12 // global_batch  # exactly one epoch over all processes
    slices = [
        take(train_iter(source, config, batch=global_batch, index=p, count=count), steps)
        for p in range(count)
    ]
    indices = [np.concatenate([b["index"] for b in s]) for s in slices]
    positions = [np.concatenate([b["position"] for b in s]) for s in slices]
    everything = np.concatenate(indices)
    assert sorted(everything) == list(range(12))
    # Process p holds positions p, p + count, ... of the single-process stream, images included.
    single = take(train_iter(source, config, batch=1), 12)
    for p in range(count):
        images = np.concatenate([b["image"] for b in slices[p]])
        np.testing.assert_array_equal(indices[p], [s["index"][0] for s in single[p::count]])
        np.testing.assert_array_equal(positions[p], np.arange(p, 12, count))
        np.testing.assert_array_equal(images, np.stack([s["image"][0] for s in single[p::count]]))


def test_batch_size_must_divide_by_process_count(source):
    with pytest.raises(ValueError, match=r"global batch size 10 .* processes 3"):
        ip.create_train_dataset(source, data_config(), 10, 0, process_index=0, process_count=3)
    with pytest.raises(ValueError, match=r"10 .* 4"):
        ip.create_eval_dataset(source, data_config(), 10, process_index=0, process_count=4)


@pytest.mark.parametrize("count", [1, 2, 3])
def test_eval_covers_each_example_exactly_once(count):
    source = make_source(10)
    global_batch = 6
    expected_batches = ip.num_eval_batches(len(source), global_batch, count)
    seen, positions = [], []
    for p in range(count):
        ds = ip.create_eval_dataset(
            source, data_config(), global_batch, process_index=p, process_count=count
        )
        batches = list(ds)
        assert len(batches) == expected_batches == 2
        for b in batches:
            assert b["image"].shape == (global_batch // count, SIZE, SIZE, 3)
            assert b["image"].dtype == np.uint8
            np.testing.assert_array_equal(b["mask"], b["index"] >= 0)
            assert (b["image_id"][~b["mask"]] == b"").all()
            assert (b["image"][~b["mask"]] == 0).all()
            np.testing.assert_array_equal(b["position"][b["mask"]], b["index"][b["mask"]])
            seen.extend(b["index"][b["mask"]].tolist())
            positions.extend(b["position"].tolist())
    assert sorted(seen) == list(range(10))
    assert sorted(positions) == list(range(expected_batches * global_batch))


def test_eval_is_deterministic(source):
    a = list(ip.create_eval_dataset(source, data_config(), 8, process_index=0, process_count=1))
    b = list(ip.create_eval_dataset(source, data_config(), 8, process_index=0, process_count=1))
    assert_batches_equal(a, b)


def _check_resume(source, config, warmup: int, after: int):
    it = train_iter(source, config, batch=4, seed=7)
    take(it, warmup)
    state = it.get_state()
    expected = take(it, after)
    if hasattr(it, "close"):
        it.close()
    resumed = train_iter(source, config, batch=4, seed=7)
    resumed.set_state(state)
    got = take(resumed, after)
    if hasattr(resumed, "close"):
        resumed.close()
    assert_batches_equal(expected, got)


def test_resume_exactly_in_process(source):
    _check_resume(source, data_config(), warmup=3, after=4)


def test_resume_exactly_with_two_workers(source):
    _check_resume(source, data_config(num_workers=2), warmup=3, after=3)


def test_resume_exactly_with_balanced_sampling(source):
    _check_resume(source, data_config(balanced_sampling=True), warmup=2, after=3)


def test_balanced_sampler_equalises_classes_and_covers_the_majority():
    labels = np.array([1] * 3 + [0] * 97)
    sampler = ip.BalancedSampler(labels, seed=0)
    assert sampler.block_length == 100
    draws = np.array([sampler[i] for i in range(1000)])
    per_block = labels[draws].reshape(10, 100).sum(1)
    np.testing.assert_array_equal(per_block, 50)  # exactly half positives in every block
    assert set(draws[labels[draws] == 1]) == {0, 1, 2}
    # Every majority record is drawn within 2 blocks (97 records, 50 slots per block).
    assert set(draws[:200][labels[draws[:200]] == 0]) == set(range(3, 100))
    # Reproducible per seed, different across seeds.
    assert [sampler[i] for i in range(50)] == draws[:50].tolist()
    other = ip.BalancedSampler(labels, seed=1)
    assert [other[i] for i in range(50)] != draws[:50].tolist()


def test_balanced_pipeline_gives_about_equal_class_frequency():
    source = make_source(24, num_positive=3)
    labels = ip.read_labels(source, "label")
    assert labels.sum() == 3
    it = train_iter(source, data_config(balanced_sampling=True), batch=8, labels=labels)
    seen = np.concatenate([b["label"] for b in take(it, 6)])
    assert abs(seen.mean() - 0.5) < 0.1
    # Without balancing the positives stay rare.
    it = train_iter(source, data_config(), batch=8)
    assert np.concatenate([b["label"] for b in take(it, 6)]).mean() < 0.25


def test_read_labels_uses_batched_reads():
    class Batched(ip.ListSource):
        calls = 0

        def __getitems__(self, keys):
            Batched.calls += 1
            return [self[k] for k in keys]

    source = Batched([{"label": i % 2} for i in range(10)])
    np.testing.assert_array_equal(ip.read_labels(source, chunk=4), np.arange(10) % 2)
    assert Batched.calls == 3


def test_all_batches_in_an_epoch_have_the_augmented_size(source):
    config = data_config(image_size=24)
    for batch in itertools.islice(train_iter(source, config, batch=6), 3):
        assert batch["image"].shape == (6, 24, 24, 3)


@pytest.fixture(scope="module")
def prepared_sample(uda1_images, tmp_path_factory):
    """The real sample prepared with the TFDS builder at 64 px (a few seconds)."""
    import tensorflow_datasets as tfds

    from isic_jax.data.isic import make_builder

    data_dir = tmp_path_factory.mktemp("tfds")
    builder = make_builder("archive", 64, str(data_dir))
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(uda1_images))
    )
    return builder, data_config(release="archive", stored_size=64, data_dir=str(data_dir))


@pytest.mark.shared_data
def test_load_sources_on_the_prepared_sample(prepared_sample):
    import tensorflow_datasets as tfds

    builder, config = prepared_sample
    config = ml_collections.ConfigDict(config.to_dict())
    config.val_fold = 1
    config.balanced_sampling = True
    from isic_jax.data import dataset

    train, val, info = dataset.load_sources(config)
    assert len(train) + len(val) == 400 and (info.num_train, info.num_val) == (320, 80)
    assert info.class_names == ["benign", "malignant"] and info.num_classes == 2
    assert info.train_class_counts.sum() == 320 and info.val_class_counts.sum() == 80
    assert info.train_class_counts.tolist() == np.bincount(info.train_labels).tolist()
    train_ids = {train[i]["image_id"] for i in range(len(train))}
    val_ids = {val[i]["image_id"] for i in range(len(val))}
    assert len(train_ids) == 320 and not train_ids & val_ids
    # The fast tf.Example parser returns what TFDS's own decoding returns.
    reference = builder.as_data_source(
        split="fold1", decoders={"image": tfds.decode.SkipDecoding()}
    )
    for i in (0, 41, 79):
        ours, theirs = val[i], reference[i]
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert ours[key] == (
                theirs[key].item() if hasattr(theirs[key], "item") else theirs[key]
            )
    # And the pipelines run on it.
    config.image_size = 48
    batch = next(
        iter(
            ip.create_train_dataset(
                train, config, 8, 0, process_index=0, process_count=1, labels=info.train_labels
            )
        )
    )
    assert batch["image"].shape == (8, 48, 48, 3)
    assert all(b.startswith(b"ISIC_") for b in batch["image_id"])
    evals = list(ip.create_eval_dataset(val, config, 32, process_index=0, process_count=1))
    assert sum(int(b["mask"].sum()) for b in evals) == 80
