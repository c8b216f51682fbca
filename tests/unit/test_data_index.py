"""The JSONL training-data index (`data/jsonl_index.py`): built once, reused, rebuilt when it must
be, and never a different dataset than reading the file itself.

- a second open maps the index and parses nothing (the parser and the validator would raise; the
  index file keeps its inode and mtime; the log says "reused");
- the data file changed (a record appended; same size and mtime but other bytes; only its mtime):
  rebuilt, the log line naming the index and why;
- a damaged index (truncated, garbage, unreadable footer, footer fields of the wrong type, a row
  missing) is rebuilt, the log line naming it; a cache folder that cannot be written is an error
  naming the index and `--data-cache-path`;
- records, counts, stats, flag and the sampler's batches through a first build and a reused
  index equal those of reading the files with `records.iter_records`;
- `--data-cache-path` parses, reaches the trainer's `build_data` and puts the index there (not
  beside the data); a data folder that is not writable sends it to the temporary folder with a
  warning;
- a bad record stops the first build naming file:line and leaves no index; `--skip-bad-records`
  counts are the same from a reused index, and switching the flag rebuilds;
- an index built under older record rules (before text UTF-8 cannot encode was refused) is
  rebuilt, and the record it kept is now skipped;
- records of two files that disagree on `in_batch_negatives` give the same message from built and
  from reused indexes;
- a pickled source carries no rows (it maps the file again).

Run alone: pytest tests/unit/test_data_index.py (a few seconds)
"""

import json
import logging
import os
import pickle
import random
import tempfile
from types import SimpleNamespace

import numpy as np
import pytest

from megatron_nvembed.data import jsonl_index
from megatron_nvembed.data.blending import BlendedSampler
from megatron_nvembed.data.loading import load_dataset_spec
from megatron_nvembed.data.records import ReadStats, iter_records
from megatron_nvembed.data.sources import RecordValidator

ROWS = [
    {
        "query": f"q{i}",
        "pos": [f"p{i}"] * (1 + i % 2),
        "neg": [f"n{i}_{j}" for j in range(i % 4)],
        "task": "MSMARCO",
        "id": i,
    }
    for i in range(12)
]


def _write(path, rows, extra_lines=()):
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n")
    return path


def _index(data):
    return data.with_name(data.name + jsonl_index.SUFFIX)


@pytest.fixture
def log():
    """The index module's log lines (INFO and up) of one test."""
    logger = logging.getLogger(jsonl_index.__name__)
    lines = []

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    handler, level = Keep(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield lines
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_second_open_maps_the_index_and_parses_nothing(tmp_path, log, monkeypatch):
    data = _write(tmp_path / "a.jsonl", ROWS)
    first = load_dataset_spec(str(data))
    index = _index(data)
    assert log[0] == f"data index {index}: building (none yet)"
    before = index.stat()

    def refuse(*args, **kwargs):
        raise AssertionError("a reused index must not parse or validate the data")

    monkeypatch.setattr(jsonl_index, "parse_json_line", refuse)
    monkeypatch.setattr(RecordValidator, "add", refuse)
    log.clear()
    again = load_dataset_spec(str(data))
    assert log == [f"data index {index}: reused (12 records of {data})"]
    after = index.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert isinstance(again.indexes[0].rows, np.memmap)  # mapped, not read into lists
    assert [r.to_json() for r in again] == ROWS
    assert [again.counts(i) for i in range(12)] == [first.counts(i) for i in range(12)]


def test_rebuilt_when_the_data_file_changes(tmp_path, log):
    data = _write(tmp_path / "a.jsonl", ROWS[:6])
    index = _index(data)
    load_dataset_spec(str(data))
    with open(data, "a") as f:  # a record appended
        f.write(json.dumps(ROWS[6]) + "\n")
    log.clear()
    assert [r.query for r in load_dataset_spec(str(data))][-1] == "q6"
    assert log[0].startswith(f"data index {index}: building (the data file changed size (")
    # same size, same mtime, other bytes: only the content hash tells
    st = data.stat()
    data.write_text(data.read_text().replace('"q3"', '"x3"'))
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (data.stat().st_size, data.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    log.clear()
    assert load_dataset_spec(str(data))[3].query == "x3"
    assert (
        log[0]
        == f"data index {index}: building (the data file's content changed (its first or last MiB))"
    )
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # only the mtime
    log.clear()
    load_dataset_spec(str(data))
    assert log[0] == f"data index {index}: building (the data file was modified since (mtime))"


@pytest.mark.parametrize(
    "damage", ["truncated", "garbage", "footer", "footer fields", "row missing"]
)
def test_damaged_index_is_rebuilt_with_a_line_naming_it(tmp_path, log, damage):
    data = _write(tmp_path / "a.jsonl", ROWS)
    index = _index(data)
    load_dataset_spec(str(data))
    raw = index.read_bytes()
    rows_end = len(ROWS) * jsonl_index.ROW.itemsize
    if damage == "truncated":
        index.write_bytes(raw[: len(raw) // 2])
    elif damage == "garbage":
        index.write_bytes(random.Random(0).randbytes(len(raw)))
    elif damage == "footer":  # the end marker intact, the JSON before it not
        index.write_bytes(raw[:rows_end] + b"{" * (len(raw) - rows_end - 16) + raw[-16:])
    elif damage == "footer fields":  # JSON, but not what an index holds
        footer = json.dumps({"format": 1, "key": 5, "records": "12"}).encode()
        index.write_bytes(
            raw[:rows_end] + footer + jsonl_index._END.pack(len(footer), jsonl_index.MAGIC)
        )
    else:  # one row fewer than the footer counts
        index.write_bytes(raw[jsonl_index.ROW.itemsize :])
    log.clear()
    src = load_dataset_spec(str(data))
    assert log[0].startswith(f"data index {index}: building (damaged: ")
    assert [r.to_json() for r in src] == ROWS
    log.clear()
    load_dataset_spec(str(data))
    assert log[0].startswith(f"data index {index}: reused")


def _plain(folder, skip):
    """The dataset as `records.iter_records` reads it: records and counts."""
    stats, recs = ReadStats(), []
    for path in sorted(folder.glob("*.jsonl")):
        recs += list(iter_records(path, skip_bad_records=skip, stats=stats))
    return recs, stats


class _ListSource(list):
    """Records in a list, with what the sampler asks of a source."""

    def counts(self, i):
        return len(self[i].pos), len(self[i].neg)


def _batches(source, steps=4):
    sampler = BlendedSampler.for_sources(
        [source], [1.0], global_batch_size=8, micro_batch_size=2, num_negatives=2
    )
    out = []
    for _ in range(steps):
        micro = sampler.next_micro_batches()
        out.append([[(s, source[s.index]) for s in mb] for mb in micro])
    return out


def test_records_and_batches_equal_reading_the_files(tmp_path, log):
    folder = tmp_path / "ds"
    scored = [
        dict(r, pos_scores=[1.0] * len(r["pos"]), neg_scores=[0.5] * len(r["neg"]))
        for r in ROWS[7:10]
    ]
    _write(folder / "a.jsonl", ROWS[:7], ["", "{oops", json.dumps(dict(ROWS[0], pos=[]))])
    _write(folder / "b.jsonl", [dict(r, in_batch_negatives=False) for r in scored + ROWS[10:]])
    recs, stats = _plain(folder, skip=True)
    want = _batches(_ListSource(recs))
    for opened in ("built", "reused"):
        src = load_dataset_spec(str(folder), skip_bad_records=True)
        assert (
            f"data index {folder / 'b.jsonl.nvembed-index'}: {'building' if opened == 'built' else 'reused'}"
            in "\n".join(log)
        )
        assert list(src) == recs, opened
        assert [src.counts(i) for i in range(len(src))] == [(len(r.pos), len(r.neg)) for r in recs]
        assert (src.stats.read, src.stats.skipped, src.stats.errors) == (
            stats.read, stats.skipped, stats.errors,
        )  # fmt: skip
        assert src.scored_records == 3 and src.in_batch_negatives is False
        assert list(src.num_positives) == [len(r.pos) for r in recs]
        assert _batches(src) == want, opened


def test_data_cache_path_flag_reaches_the_index(tmp_path, log):
    from megatron_nvembed.training.arguments import parse_args
    from megatron_nvembed.training.setup import build_data

    data = _write(tmp_path / "data" / "a.jsonl", ROWS)
    cache = tmp_path / "cache"
    argv = ["--recipe", "tiny", "--train-data", str(data)]
    assert parse_args(argv).data.data_cache_path is None
    cfg = parse_args([*argv, "--data-cache-path", str(cache)])
    assert cfg.data.data_cache_path == str(cache)
    pg = SimpleNamespace(dp=SimpleNamespace(rank=lambda: 0, size=lambda: 1))
    built = build_data(cfg, None, pg, "Instruct: {instruction}\nQuery: ")  # no batch: no tokenizer
    assert len(built.sources[0]) == len(ROWS)
    (index,) = cache.iterdir()
    assert index.name.startswith("a.jsonl.") and index.name.endswith(jsonl_index.SUFFIX)
    assert os.listdir(data.parent) == ["a.jsonl"]  # nothing beside the data
    log.clear()
    build_data(cfg, None, pg, "Instruct: {instruction}\nQuery: ")
    assert log == [f"data index {index}: reused (12 records of {data})"]


def test_cache_folder_that_cannot_be_written_is_an_error_naming_the_flag(tmp_path):
    data = _write(tmp_path / "a.jsonl", ROWS)
    (tmp_path / "taken").write_text("a file, not a folder")
    with pytest.raises(
        OSError,
        match=r"data index .*taken.*could not build it from .*a.jsonl.*--data-cache-path DIR",
    ):
        load_dataset_spec(str(data), data_cache_path=tmp_path / "taken" / "cache")


def test_read_only_data_folder_sends_the_index_to_the_temporary_folder(tmp_path, log, monkeypatch):
    data = _write(tmp_path / "data" / "a.jsonl", ROWS)
    monkeypatch.setattr(jsonl_index, "_writable", lambda folder: False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    src = load_dataset_spec(str(data))
    (index,) = (tmp_path / "tmp").glob("megatron_nvembed-data-index-*/a.jsonl.*.nvembed-index")
    assert log[0] == (
        f"data index: {data.parent} is not writable; the index of {data} goes to "
        f"{index.parent} (--data-cache-path DIR chooses the folder)"
    )
    assert os.listdir(data.parent) == ["a.jsonl"] and len(src) == len(ROWS)
    log.clear()
    load_dataset_spec(str(data))
    assert log == [f"data index {index}: reused (12 records of {data})"]


def test_bad_record_stops_the_first_build_and_leaves_no_index(tmp_path):
    data = _write(tmp_path / "bad.jsonl", [ROWS[0], dict(ROWS[1], neg="n"), ROWS[2]])
    for _ in range(2):  # no index was written, so the second start finds the same record
        with pytest.raises(
            ValueError, match=r"bad.jsonl:2: key 'neg' must be a list of strings, got str$"
        ):
            load_dataset_spec(str(data))
        assert os.listdir(tmp_path) == ["bad.jsonl"]  # no index, no temporary


def test_skipped_counts_are_the_same_from_a_reused_index(tmp_path, log):
    data = _write(
        tmp_path / "bad.jsonl",
        [ROWS[0], "{oops", dict(ROWS[1], pos=[]), ROWS[2], dict(ROWS[3], task=3)],
    )
    index = _index(data)
    built = load_dataset_spec(str(data), skip_bad_records=True)
    assert (built.stats.read, built.stats.skipped) == (2, 3)
    log.clear()
    reused = load_dataset_spec(str(data), skip_bad_records=True)
    assert log[0].startswith(f"data index {index}: reused")
    assert (reused.stats.read, reused.stats.skipped, reused.stats.errors) == (
        built.stats.read, built.stats.skipped, built.stats.errors,
    )  # fmt: skip
    assert "bad.jsonl:2: malformed record" in reused.stats.errors[0]
    assert "bad.jsonl:5: key 'task' must be a string, got int" in reused.stats.errors[2]
    log.clear()
    with pytest.raises(ValueError, match=r"bad.jsonl:2: malformed record"):
        load_dataset_spec(str(data))  # the flag is part of the key
    assert (
        log[0]
        == f"data index {index}: building (built with --skip-bad-records on, this run has it off)"
    )
    log.clear()
    load_dataset_spec(str(data), skip_bad_records=True)  # the failed build kept the old index
    assert log[0].startswith(f"data index {index}: reused")


def test_index_built_under_older_record_rules_is_rebuilt(tmp_path, log, monkeypatch):
    """An index of the rules before text that UTF-8 cannot encode was refused (key "rules": the
    task table's hash alone) kept such a record; now it is stale, rebuilt, and the record is
    skipped and counted."""
    import hashlib

    from megatron_nvembed.data import records
    from megatron_nvembed.data.templates import TASK_DEFINITIONS_FILE

    old_rules = hashlib.blake2b(TASK_DEFINITIONS_FILE.read_bytes(), digest_size=8).hexdigest()
    assert jsonl_index._rules() != old_rules
    data = _write(tmp_path / "a.jsonl", [ROWS[0], dict(ROWS[1], pos=["p\ud800"]), ROWS[2]])
    index = _index(data)
    with monkeypatch.context() as old:  # the code before the rule: no check, the old key
        old.setattr(records, "check_encodable", lambda obj, where: None)
        old.setattr(jsonl_index, "_rules", lambda: old_rules)
        assert len(load_dataset_spec(str(data), skip_bad_records=True)) == 3
    log.clear()
    now = load_dataset_spec(str(data), skip_bad_records=True)
    assert log[0] == (
        f"data index {index}: building (the record rules or the task table "
        "(task_definitions.json) changed since)"
    )
    assert (len(now), now.stats.skipped) == (2, 1)
    assert now.stats.errors[0].startswith(f"{data}:2: key 'pos' item 0 cannot be encoded")


def test_files_disagreeing_on_in_batch_negatives_same_message_built_or_reused(tmp_path):
    folder = tmp_path / "ds"
    _write(folder / "a.jsonl", [ROWS[0], dict(ROWS[1], in_batch_negatives=True)])
    _write(folder / "b.jsonl", [dict(ROWS[2], in_batch_negatives=False)])
    message = (
        rf"{folder / 'b.jsonl'}:1: in_batch_negatives=False but {folder / 'a.jsonl'}:2 has True"
    )
    with pytest.raises(ValueError, match=message):  # found while b.jsonl's index is built
        load_dataset_spec(str(folder))
    assert load_dataset_spec(str(folder / "b.jsonl")).in_batch_negatives is False  # b's index
    with pytest.raises(ValueError, match=message):  # found from the two reused indexes
        load_dataset_spec(str(folder))


def test_pickled_source_maps_the_index_again(tmp_path):
    rows = [dict(ROWS[i % 12], id=i) for i in range(500)]
    data = _write(tmp_path / "a.jsonl", rows)
    src = load_dataset_spec(str(data))
    blob = pickle.dumps(src)
    assert len(blob) < 2000  # 500 rows of 24 bytes would be 12,000
    again = pickle.loads(blob)
    assert again[499].to_json() == rows[499] and isinstance(again.indexes[0].rows, np.memmap)
    os.utime(data, ns=(0, 10**9))
    load_dataset_spec(str(data))  # rebuilt: the pickled source's index is gone
    with pytest.raises(ValueError, match=r"a.jsonl.nvembed-index: rebuilt since it was opened"):
        pickle.loads(blob)
