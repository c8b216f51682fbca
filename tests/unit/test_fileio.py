"""Atomic writes (`megatron_nvembed/utils/fileio.py`): the old file or the new one, never half of one;
nothing left on failure; results readable as a plain write would leave them (the umask's mode,
not mkstemp's private 0600); stale temporaries of one file removed without touching others'.
Folders (`atomic_dir`): the old folder or the new one, replaced whole, nothing left beside it;
a killed run's temporary removed, a user's `NAME.tmp` kept. Output checks (`check_output_dir`):
a non-empty folder only with overwrite, never the source, inside it or around it. (The tools'
refusal messages and exit codes are tested in tests/functional/test_conversion.py.)"""

import os
import time

import pytest

from megatron_nvembed.utils.fileio import (
    atomic_dir,
    atomic_path,
    check_output_dir,
    remove_stale_temporaries,
    write_atomic,
)


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


def test_stale_temporaries_younger_than_min_age_are_kept(tmp_path):
    """A writer that is alive keeps its temporary's mtime recent: only an old one is removed."""
    (tmp_path / ".a.idx.live.tmp").write_text("")
    (tmp_path / ".a.idx.dead.tmp").write_text("")
    os.utime(tmp_path / ".a.idx.dead.tmp", (0, time.time() - 7200))
    assert remove_stale_temporaries(tmp_path, "a.idx", min_age_s=3600) == 1
    assert os.listdir(tmp_path) == [".a.idx.live.tmp"]


def test_atomic_dir_swaps_in_whole_and_a_failure_keeps_the_old_folder(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    killed = tmp_path / ".out.nvembed-tmp-deadbeef"  # a killed run's temporary
    killed.mkdir()
    (tmp_path / "out.tmp").mkdir()  # the user's own folder
    with pytest.raises(RuntimeError):
        with atomic_dir(final, overwrite=True, flag="--save") as tmp:
            (tmp / "new.txt").write_text("half")
            raise RuntimeError("failed midway")
    assert os.listdir(final) == ["old.txt"]
    assert sorted(os.listdir(tmp_path)) == [".out.nvembed-lock", "out", "out.tmp"]
    with atomic_dir(final, overwrite=True, flag="--save") as tmp:
        (tmp / "new.txt").write_text("new")
    assert os.listdir(final) == ["new.txt"]
    assert sorted(os.listdir(tmp_path)) == [".out.nvembed-lock", "out", "out.tmp"]


def test_atomic_dir_refuses_a_folder_filled_meanwhile_without_overwrite(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(ValueError, match="--save .*was filled while the conversion ran"):
        with atomic_dir(final, overwrite=False, flag="--save") as tmp:
            (tmp / "new.txt").write_text("new")
            final.mkdir()
            (final / "theirs.txt").write_text("theirs")
    assert os.listdir(final) == ["theirs.txt"]
    assert sorted(os.listdir(tmp_path)) == [".out.nvembed-lock", "out"]


def test_check_output_dir_refusals(tmp_path):
    src = tmp_path / "src"
    (src / "inner").mkdir(parents=True)
    sources = [("--load", src)]
    assert check_output_dir(tmp_path / "new", "--save", sources) == (tmp_path / "new").resolve()
    for out, relation in (
        (src, "is the same folder as"),
        (src / "inner", "is inside"),
        (tmp_path, "contains"),
    ):
        with pytest.raises(ValueError, match=f"--save {out} {relation} --load {src}"):
            check_output_dir(out, "--save", sources, overwrite=True)
    full = tmp_path / "full"
    full.mkdir()
    (full / "a").write_text("")
    with pytest.raises(ValueError, match=r"exists and is not empty \(1 entry\)"):
        check_output_dir(full, "--save", sources)
    assert check_output_dir(full, "--save", sources, overwrite=True) == full.resolve()
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="exists and is not a folder"):
        check_output_dir(tmp_path / "file", "--save", sources, overwrite=True)
    (tmp_path / "link").symlink_to(full)
    with pytest.raises(ValueError, match="is a symbolic link"):
        check_output_dir(tmp_path / "link", "--save", sources, overwrite=True)
