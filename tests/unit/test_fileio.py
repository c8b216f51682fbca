"""Atomic writes (`megatron_nvembed/fileio.py`): the old file or the new one, never half of one;
nothing left on failure; results readable as a plain write would leave them (the umask's mode,
not mkstemp's private 0600); stale temporaries of one file removed without touching others'."""

import os

import pytest

from megatron_nvembed.fileio import atomic_path, remove_stale_temporaries, write_atomic


def test_write_replaces_whole_and_gets_the_plain_open_mode(tmp_path):
    target = tmp_path / "sub" / "result.json"
    write_atomic(target, "old")
    write_atomic(target, "new")
    assert target.read_text() == "new"
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert (target.stat().st_mode & 0o777) == (plain.stat().st_mode & 0o777)
    assert os.listdir(target.parent) == ["result.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing(tmp_path):
    target = tmp_path / "result.json"
    write_atomic(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed midway")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["result.json"]


def test_stale_temporaries_of_one_file_only(tmp_path):
    (tmp_path / ".a.jsonl.x1.tmp").write_text("")
    (tmp_path / ".b.jsonl.x2.tmp").write_text("")
    assert remove_stale_temporaries(tmp_path, "a.jsonl") == 1
    assert sorted(os.listdir(tmp_path)) == [".b.jsonl.x2.tmp"]
    assert remove_stale_temporaries(tmp_path) == 1
    assert os.listdir(tmp_path) == []
