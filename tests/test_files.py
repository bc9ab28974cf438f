"""maskspec.files: a file or folder appears whole or not at all, with ordinary permissions, and no temporary is
left behind."""

from __future__ import annotations

import os
import stat

import pytest

import maskspec.files as files
from maskspec.files import atomic_folder, atomic_write_bytes, atomic_write_text


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(params=[0o022, 0o077])
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


class Killed(BaseException):
    """Stands for a kill in the middle of a write (not an Exception: nothing may catch it on the way)."""


def test_new_file_gets_the_umask_default_and_no_temporary_is_left(tmp_path, umask):
    path = atomic_write_bytes(tmp_path / "a.bin", b"\x00\x01data")
    assert path == tmp_path / "a.bin"
    assert path.read_bytes() == b"\x00\x01data"
    assert _mode(path) == 0o666 & ~umask
    assert os.listdir(tmp_path) == ["a.bin"]


def test_replacing_keeps_the_mode_of_the_file_unless_one_is_given(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("old")
    os.chmod(path, 0o640)
    atomic_write_text(path, "new")
    assert path.read_text() == "new" and _mode(path) == 0o640
    atomic_write_text(path, "newer", mode=0o600)
    assert path.read_text() == "newer" and _mode(path) == 0o600


def test_text_is_utf8_and_newlines_are_written_as_given(tmp_path):
    path = atomic_write_text(tmp_path / "t.md", "é\r\nx\n")
    assert path.read_bytes() == "é\r\nx\n".encode("utf-8")


@pytest.mark.parametrize("failing", ["write", "fsync", "replace"])
def test_a_failed_write_keeps_the_old_content_and_leaves_no_temporary(tmp_path, monkeypatch, failing):
    path = tmp_path / "answers.json"
    path.write_text("old content")

    def fail(*args, **kwargs):
        raise Killed

    if failing == "write":  # the data is half written when the process dies
        real_fdopen = os.fdopen

        class Half:
            def __init__(self, fh):
                self.fh = fh

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.fh.close()

            def write(self, data):
                self.fh.write(data[:3])
                self.fh.flush()
                raise Killed

        monkeypatch.setattr(files.os, "fdopen", lambda fd, mode: Half(real_fdopen(fd, mode)))
    else:
        monkeypatch.setattr(files.os, failing, fail)
    with pytest.raises(Killed):
        atomic_write_text(path, "new content that is longer")
    monkeypatch.undo()
    assert path.read_text() == "old content"
    assert os.listdir(tmp_path) == ["answers.json"]


def test_a_failed_first_write_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(files.os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(tmp_path / "new.bin", b"data")
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------- folders
def test_folder_appears_whole_with_ordinary_permissions(tmp_path, umask):
    target = tmp_path / "deep" / "adapter"
    with atomic_folder(target) as tmp:
        assert tmp.parent == target.parent and tmp.is_dir() and not target.exists()
        (tmp / "weights").write_bytes(b"w")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "config").write_text("c")
        assert not target.exists()  # nothing is visible before the block ends
    assert (target / "weights").read_bytes() == b"w" and (target / "sub" / "config").read_text() == "c"
    assert _mode(target) == 0o777 & ~umask  # not tempfile.mkdtemp's 0o700
    assert os.listdir(target.parent) == ["adapter"]


def test_folder_replaces_an_existing_one_entirely(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "stale").write_text("old")
    with atomic_folder(target) as tmp:
        (tmp / "fresh").write_text("new")
    assert sorted(os.listdir(target)) == ["fresh"]
    assert os.listdir(tmp_path) == ["out"]


def test_a_failure_inside_the_block_keeps_the_old_folder(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "file").write_text("old")
    with pytest.raises(Killed):
        with atomic_folder(target) as tmp:
            (tmp / "file").write_text("half")
            raise Killed
    assert (target / "file").read_text() == "old"
    assert os.listdir(tmp_path) == ["out"]


def test_a_failed_rename_puts_the_old_folder_back(tmp_path, monkeypatch):
    target = tmp_path / "out"
    target.mkdir()
    (target / "file").write_text("old")
    real_replace = os.replace

    def replace(src, dst):
        if os.path.basename(src).startswith(".tmp-"):
            raise OSError("rename failed")
        return real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", replace)
    with pytest.raises(OSError, match="rename failed"):
        with atomic_folder(target) as tmp:
            (tmp / "file").write_text("new")
    assert (target / "file").read_text() == "old"
    assert os.listdir(tmp_path) == ["out"]


def _complete(folder) -> bool:
    return (folder / "COMPLETE").is_file()


def test_keep_existing_keeps_a_folder_another_process_finished_first(tmp_path):
    target = tmp_path / "cache"
    with atomic_folder(target, keep_existing=_complete) as tmp:
        (tmp / "COMPLETE").write_text("mine")
        # Meanwhile another process publishes its own copy.
        target.mkdir()
        (target / "COMPLETE").write_text("theirs")
    assert (target / "COMPLETE").read_text() == "theirs"
    assert os.listdir(tmp_path) == ["cache"]


def test_keep_existing_replaces_a_folder_that_fails_the_test(tmp_path):
    target = tmp_path / "cache"
    target.mkdir()
    (target / "partial").write_text("x")
    with atomic_folder(target, keep_existing=_complete) as tmp:
        (tmp / "COMPLETE").write_text("mine")
    assert os.listdir(target) == ["COMPLETE"] and (target / "COMPLETE").read_text() == "mine"


def test_a_fixed_temporary_name_is_shared_and_a_leftover_of_it_is_cleared(tmp_path):
    target = tmp_path / "step-1"
    leftover = tmp_path / ".tmp-step-1"
    leftover.mkdir()
    (leftover / "from-a-killed-run").write_text("x")
    with atomic_folder(target, temp_name=".tmp-step-1") as tmp:
        assert tmp == leftover and os.listdir(tmp) == []
        (tmp / "rng-rank1.pt").write_text("written by another process that knows the name")
    assert os.listdir(target) == ["rng-rank1.pt"]
    assert os.listdir(tmp_path) == ["step-1"]
