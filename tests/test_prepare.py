"""`prepare` / `isic-jax prepare`: no-op reruns, interrupted builds, layout errors, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from isic_jax.data import isic
from isic_jax.data import prepare as prepare_lib
from isic_jax.data.isic import images
from isic_jax.testing import layouts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def source(tmp_path):
    return layouts.write_layout(
        tmp_path / "src", "isic2020", layouts.balanced_examples("isic2020", 10)
    )


def test_prepare_report_and_summary(source, tmp_path):
    report_file = tmp_path / "out" / "report.json"
    report = prepare_lib.prepare(
        source, tmp_path / "data", image_size=32, num_folds=2, report_path=report_file
    )
    assert report["reused"] is False
    assert report["dataset"] == f"isic/isic2020_32/{isic.VERSION}"
    assert report["splits"].keys() == {"fold0", "fold1"}
    assert json.loads(report_file.read_text())["num_examples"] == 10
    summary = prepare_lib.format_summary(report)
    assert f"isic/isic2020_32/{isic.VERSION}" in summary and "malignant" in summary
    assert "skipped inputs: 0" in summary


def test_second_prepare_is_a_no_op(source, tmp_path):
    first = prepare_lib.prepare(source, tmp_path / "data", image_size=32, num_folds=2)
    files = {p: os.stat(p).st_mtime_ns for p in _files(first["dataset_dir"])}
    second = prepare_lib.prepare(source, tmp_path / "data", image_size=32, num_folds=2)
    assert second["reused"] is True
    assert second["splits"] == first["splits"] and second["skipped"] == first["skipped"]
    assert {p: os.stat(p).st_mtime_ns for p in _files(first["dataset_dir"])} == files
    assert "nothing to do" in prepare_lib.format_summary(second)
    with pytest.raises(prepare_lib.PrepareError, match="num_folds: stored 2, asked 3"):
        prepare_lib.prepare(source, tmp_path / "data", image_size=32, num_folds=3)


def _files(folder):
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs)


def test_exception_mid_build_leaves_nothing_that_reads_as_complete(source, tmp_path, monkeypatch):
    calls = []
    real = images.process_image

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 6:  # inside the second fold: fold0 is already written
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(images, "process_image", failing)
    with pytest.raises(KeyboardInterrupt):
        prepare_lib.prepare(source, tmp_path / "data", image_size=32, num_folds=2, num_workers=1)
    builder = isic.make_builder("isic2020", 32, tmp_path / "data")
    assert not builder.is_prepared()
    assert not builder.data_path.exists()
    assert not list(builder.data_path.parent.glob("incomplete.*"))  # TFDS removed its tmp dir

    monkeypatch.setattr(images, "process_image", real)
    report = prepare_lib.prepare(source, tmp_path / "data", image_size=32, num_folds=2)
    assert report["reused"] is False and report["num_examples"] == 10


def test_killed_build_is_not_read_as_complete(source, tmp_path):
    data_dir = tmp_path / "data"
    script = textwrap.dedent(
        f"""
        import os, signal
        from isic_jax.data.isic import images
        from isic_jax.data import prepare
        real, calls = images.process_image, []
        def killing(*args, **kwargs):
            calls.append(1)
            if len(calls) == 10:  # the last image: fold0 is written, fold1 is not
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)
        images.process_image = killing
        prepare.prepare({os.fspath(source)!r}, {os.fspath(data_dir)!r}, image_size=32,
                        num_folds=2, num_workers=1)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    builder = isic.make_builder("isic2020", 32, data_dir)
    stale = list(builder.data_path.parent.glob("incomplete.*"))
    assert len(stale) == 1 and list(stale[0].glob("isic-fold0.array_record*"))  # half-written
    assert not builder.is_prepared() and not builder.data_path.exists()

    report = prepare_lib.prepare(source, data_dir, image_size=32, num_folds=2)
    assert report["reused"] is False and report["num_examples"] == 10
    assert report["stale_incomplete_dirs"] == [os.fspath(stale[0])]
    assert "interrupted" in prepare_lib.format_summary(report)


def test_format_auto_failure_lists_expected_files(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "notes.csv").write_text("a,b\n1,2\n")
    with pytest.raises(prepare_lib.PrepareError) as err:
        prepare_lib.prepare(tmp_path / "src", tmp_path / "data")
    message = str(err.value)
    assert "recognised no ISIC release" in message
    for release, needs in [
        ("archive", "metadata.csv"),
        ("isic2016", "ISBI2016_ISIC_Part3_Training_GroundTruth.csv"),
        ("isic2017", "ISIC-2017_Training_Part3_GroundTruth.csv"),
        ("isic2018", "ISIC2018_Task3_Training_GroundTruth.csv"),
        ("isic2019", "ISIC_2019_Training_GroundTruth.csv"),
        ("isic2020", "ISIC_2020_Training_GroundTruth"),
        ("isic2024", "train-image.hdf5"),
    ]:
        assert f"{release}: " in message and needs in message
    assert "notes.csv: a,b" in message  # what was found instead


def test_explicit_format_that_does_not_match(source, tmp_path):
    with pytest.raises(prepare_lib.PrepareError, match="does not hold an isic2019 layout"):
        prepare_lib.prepare(source, tmp_path / "data", fmt="isic2019")
    assert not (tmp_path / "data").exists()  # failed before TFDS created anything


def test_cli_exit_codes(source, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "readme.txt").write_text("nothing here")
    cmd = [sys.executable, "-m", "isic_jax", "prepare", "--data-dir", os.fspath(tmp_path / "d")]
    proc = subprocess.run([*cmd, "--source", os.fspath(bad)], cwd=REPO, capture_output=True,
                          text=True)  # fmt: skip
    assert proc.returncode == 4  # ExitCode.DATA
    assert "isic-jax prepare: error: --format auto recognised no ISIC release" in proc.stderr
    assert "isic2024: train-metadata.csv" in proc.stderr

    report = tmp_path / "report.json"
    args = ["--source", os.fspath(source), "--image-size", "32", "--num_folds", "2"]
    proc = subprocess.run([*cmd, *args, "--report", os.fspath(report)], cwd=REPO,
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"dataset isic/isic2020_32/{isic.VERSION}" in proc.stdout and "fold1" in proc.stdout
    assert json.loads(report.read_text())["num_examples"] == 10


def test_existing_folder_that_is_not_a_finished_dataset(source, tmp_path):
    (tmp_path / "data" / "isic" / "isic2020_32" / isic.VERSION).mkdir(parents=True)
    with pytest.raises(prepare_lib.PrepareError, match="not a complete dataset"):
        prepare_lib.prepare(source, tmp_path / "data", image_size=32, num_folds=2)


def test_fewer_groups_than_folds(tmp_path):
    src = layouts.write_layout(
        tmp_path / "src", "isic2020", layouts.balanced_examples("isic2020", 6)
    )  # 3 patients
    with pytest.raises(prepare_lib.PrepareError, match="only 3 distinct .* cannot make 5 folds"):
        prepare_lib.prepare(src, tmp_path / "data", image_size=32, num_folds=5)
