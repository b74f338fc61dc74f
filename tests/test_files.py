"""Tests of cbmir.files: the one atomic writer leaves the old file or the whole new one, fsyncs before the
rename, and leaves no temporary file behind when a write fails."""

import os

import numpy as np
import pytest

from cbmir.files import write_atomically, write_atomically_with


def test_writes_and_replaces_a_file_creating_its_folder(tmp_path):
    path = tmp_path / "new" / "report.json"
    write_atomically(path, b"first")
    write_atomically(path, b"second")
    assert path.read_bytes() == b"second"
    assert os.listdir(path.parent) == ["report.json"]


def test_a_writer_callback_gets_a_binary_file(tmp_path):
    path = tmp_path / "array.npy"
    write_atomically_with(path, lambda file: np.save(file, np.arange(5)))
    np.testing.assert_array_equal(np.load(path), np.arange(5))


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "state.pt"
    write_atomically(path, b"old")

    def half_then_fail(file):
        file.write(b"half of the new")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_atomically_with(path, half_then_fail)
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["state.pt"]


def test_an_interrupted_first_write_leaves_nothing(tmp_path):
    def interrupted(file):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomically_with(tmp_path / "cache.npy", interrupted)
    assert os.listdir(tmp_path) == []


def test_an_unwritable_folder_is_an_os_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OSError):
        write_atomically(blocker / "report.json", b"data")
    assert os.listdir(tmp_path) == ["file"]


def test_the_content_is_fsynced_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync")
        real_fsync(fd)

    def replace(source, target):
        events.append("replace")
        real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    write_atomically(tmp_path / "split.json", b"{}")
    assert events == ["fsync", "replace"]
