"""The one atomic-write helper both sides use."""

from __future__ import annotations

import gzip
import os

import pytest

from socklab.atomic import replacing, write_atomic


def test_write_atomic_replaces_text_and_bytes_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "meta.json"
    write_atomic(path, "first\n")
    write_atomic(path, "second é\n", durable=True)
    assert path.read_text(encoding="utf-8") == "second é\n"
    write_atomic(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    assert os.listdir(tmp_path) == ["meta.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_its_temporary(tmp_path):
    path = tmp_path / "state.json"
    write_atomic(path, "old")
    with pytest.raises(RuntimeError):
        with replacing(path) as fh:
            fh.write("half of the new")
            raise RuntimeError("killed mid-write")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["state.json"]


def test_a_stream_written_through_it_is_whole_and_permissions_follow_the_umask(tmp_path):
    path = tmp_path / "x.trace.gz"
    with replacing(path, "wb") as raw, gzip.open(raw, "wt", encoding="utf-8") as fh:
        fh.write("line\n" * 1000)
    assert gzip.decompress(path.read_bytes()) == b"line\n" * 1000
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_only_whole_file_modes_are_accepted(tmp_path):
    with pytest.raises(ValueError, match="mode 'w' or 'wb'"):
        with replacing(tmp_path / "f", "a"):
            pass
