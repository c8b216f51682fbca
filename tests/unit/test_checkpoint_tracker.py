"""The tracker file (`latest_checkpointed_iteration.txt`) is read as a number or refused naming
the file, whatever it holds (megatron_nvembed.checkpoint.store.latest_iteration)."""

from __future__ import annotations

import pytest

from megatron_nvembed.checkpoint.store import TRACKER, latest_iteration


@pytest.mark.parametrize("content", [b"12\n", b" 7 ", b"0"])
def test_a_tracker_holding_a_number_names_that_iteration(tmp_path, content):
    (tmp_path / TRACKER).write_bytes(content)
    assert latest_iteration(tmp_path) == int(content)


@pytest.mark.faults
@pytest.mark.parametrize(
    "content",
    [b"9" * 5000, b"9" * 19, b"abc", b"-3", b"12\x00", b"\xff\xfe1", "\u0661\u0662".encode(), b""],
    ids=[
        "5000-nines",
        "19-digits",
        "letters",
        "negative",
        "nul",
        "not-utf8",
        "arabic-digits",
        "empty",
    ],
)
def test_a_tracker_holding_no_iteration_number_is_refused_naming_the_file(tmp_path, content):
    """Fault: The tracker file holds no iteration number (5000 nines, letters, bytes that are not
        UTF-8, a negative number, nothing).
    Happens: Refused in one error naming the tracker file and what it holds (at most 64 bytes
        are read), before any checkpoint file is opened.
    Do: Write the number of a complete `iter_*` folder of that checkpoint into the tracker."""
    (tmp_path / TRACKER).write_bytes(content)
    with pytest.raises(ValueError, match="expected an iteration number") as err:
        latest_iteration(tmp_path)
    assert str(tmp_path / TRACKER) in str(err.value) and len(str(err.value)) < 400
