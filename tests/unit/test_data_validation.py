"""Record validation at open: every record of every `--train-data` file is checked when the data is
opened (`build_train_data` / `load_dataset_spec`), before any batch, and the first bad record is
one ValueError naming file:line, the key and the cause.

- a missing key, a wrong type and a duplicated key are told apart ("missing key 'task'",
  "key 'neg' must be a list of strings, got str", "key 'query' appears twice");
- `neg` is a list of strings (empty allowed, null = absent); "", false, {}, numbers, a bare
  string and non-string items are refused;
- blank `query` / `pos` texts and a blank `instruction` are refused;
- task names are resolved at open: an unknown task stops `build_train_data` naming file:line
  (with close names), or is skipped and counted with `skip_bad_records`;
- an explicit `instruction` makes `task` optional (and lets it be any name), and the query then
  trains with that instruction;
- text that cannot be encoded is refused naming file:line: a lone surrogate (JSON "\\ud800") in
  `query`, `pos`, `neg`, `instruction` or another key (naming the key and item), and a line whose
  bytes are not UTF-8; with `skip_bad_records` both are skipped and counted, the rest trains;
- the same rules hold for tools reading records (`iter_records`, `iter_jsonl`).

Run alone: pytest tests/unit/test_data_validation.py
"""

import json

import pytest

from megatron_nvembed.data.blending import Slot
from megatron_nvembed.data.collate import collate
from megatron_nvembed.data.loading import load_dataset_spec
from megatron_nvembed.data.pipeline import build_train_data
from megatron_nvembed.data.records import ReadStats, iter_jsonl, iter_records
from megatron_nvembed.testing import build_word_tokenizer

GOOD = {"query": "what is a cat", "pos": ["a cat is an animal"], "neg": ["dogs bark"]}
GOOD_LINE = json.dumps(dict(GOOD, task="SQuAD"))


def _write(path, bad_line: str, before: int = 2):
    """`before` good records, then `bad_line` (line `before + 1`), then one more good one."""
    path.write_text("\n".join([GOOD_LINE] * before + [bad_line, GOOD_LINE]) + "\n")
    return path


def _open_error(path, needle: str):
    """The message of opening `path`; asserts it names file:line and contains `needle`."""
    with pytest.raises(ValueError) as err:
        load_dataset_spec(str(path))
    msg = str(err.value)
    assert msg.startswith(f"{path}:3: "), msg
    assert needle in msg, msg
    return msg


def _without(key):
    return {k: v for k, v in dict(GOOD, task="SQuAD").items() if k != key}


@pytest.mark.parametrize(
    "row, needle",
    [
        (_without("task"), "missing key 'task'"),
        (_without("query"), "missing key 'query'"),
        (_without("pos"), "record has no positive (missing key 'pos')"),
        (dict(GOOD, task=7), "key 'task' must be a string, got int"),
        (dict(GOOD, task="SQuAD", query=["q"]), "key 'query' must be a string, got list"),
        (dict(GOOD, task="SQuAD", pos="a cat"), "key 'pos' must be a list of strings, got str"),
        (dict(GOOD, task="SQuAD", pos=[1]), "key 'pos' must be a list of strings, item 0 is int"),
        (dict(GOOD, task="SQuAD", instruction=False), "key 'instruction' must be a string"),
    ],
)
def test_missing_key_and_wrong_type_name_file_line_and_key(tmp_path, row, needle):
    path = _write(tmp_path / "a.jsonl", json.dumps(row))
    msg = _open_error(path, needle)
    assert "appears twice" not in msg
    with pytest.raises(ValueError, match=f"a.jsonl:3: .*{needle[:12]}"):
        list(iter_records(path))  # the tools' reader: the same rule


def test_missing_key_is_not_a_wrong_type(tmp_path):
    path = _write(tmp_path / "a.jsonl", json.dumps(_without("task")))
    msg = _open_error(path, "task").removeprefix(f"{path}:3: ")
    assert msg.startswith("missing key 'task'") and "must be a string" not in msg
    path = _write(tmp_path / "b.jsonl", json.dumps(dict(GOOD, task=1)))
    msg = _open_error(path, "task").removeprefix(f"{path}:3: ")
    assert msg == "key 'task' must be a string, got int"


@pytest.mark.parametrize(
    "line, key",
    [
        ('{"query": "q", "query": "r", "pos": ["p"], "task": "SQuAD"}', "query"),
        ('{"query": "q", "pos": ["p"], "task": "SQuAD", "task": "NotATask"}', "task"),
        ('{"query": "q", "pos": ["p"], "neg": [], "neg": ["n"], "task": "SQuAD"}', "neg"),
        ('{"query": "q", "pos": ["p"], "task": "SQuAD", "meta": {"a": 1, "a": 2}}', "a"),
    ],
)
def test_duplicated_key_is_refused(tmp_path, line, key):
    path = _write(tmp_path / "d.jsonl", line)
    msg = _open_error(path, f"key {key!r} appears twice")
    assert "malformed" not in msg and "must be" not in msg
    with pytest.raises(ValueError, match=rf"d.jsonl:3: key '{key}' appears twice"):
        list(iter_records(path))
    with pytest.raises(ValueError, match=rf"d.jsonl:3: key '{key}' appears twice"):
        list(iter_jsonl(path))  # raw rows of tools/prepare_data.py
    # skippable like any bad record
    source = load_dataset_spec(str(path), skip_bad_records=True)
    assert (source.stats.read, source.stats.skipped) == (3, 1)
    assert "appears twice" in source.stats.errors[0]


@pytest.mark.parametrize(
    "neg, got",
    [
        ('""', "got str"),
        ('"dogs bark"', "got str"),
        ("false", "got bool"),
        ("true", "got bool"),
        ("{}", "got dict"),
        ("0", "got int"),
        ("1.5", "got float"),
        ('["dogs bark", 2]', "item 1 is int"),
        ('[["dogs bark"]]', "item 0 is list"),
        ("[null]", "item 0 is null"),
    ],
)
def test_bad_negatives_are_refused(tmp_path, neg, got):
    line = f'{{"query": "q", "pos": ["p"], "neg": {neg}, "task": "SQuAD"}}'
    path = _write(tmp_path / "n.jsonl", line)
    _open_error(path, f"key 'neg' must be a list of strings, {got}")


def test_negatives_may_be_empty_null_or_absent(tmp_path):
    rows = [dict(GOOD, task="SQuAD", neg=[]), dict(GOOD, task="SQuAD", neg=None), _without("neg")]
    path = tmp_path / "ok.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = load_dataset_spec(str(path))
    assert [source.counts(i) for i in range(3)] == [(1, 0)] * 3


@pytest.mark.parametrize(
    "row, needle",
    [
        (dict(GOOD, task="SQuAD", query=""), "key 'query' is an empty or blank string"),
        (dict(GOOD, task="SQuAD", query=" \n"), "key 'query' is an empty or blank string"),
        (dict(GOOD, task="SQuAD", pos=["ok", ""]), "key 'pos' item 1 is an empty or blank"),
        (dict(GOOD, task="SQuAD", pos=["\t"]), "key 'pos' item 0 is an empty or blank"),
        (dict(GOOD, task="SQuAD", pos=[]), "record has no positive ('pos' is empty)"),
        (dict(GOOD, task="SQuAD", instruction=""), "key 'instruction' is an empty or blank"),
        (dict(GOOD, instruction="  "), "key 'instruction' is an empty or blank"),
    ],
)
def test_blank_texts_are_refused(tmp_path, row, needle):
    _open_error(_write(tmp_path / "b.jsonl", json.dumps(row)), needle)


def test_unknown_task_stops_build_train_data_at_open(tmp_path):
    """The function the trainer calls refuses the data before any batch (it needs no model: the
    tokenizer is first used by the first batch)."""
    good = tmp_path / "good.jsonl"
    good.write_text(GOOD_LINE + "\n")
    bad = _write(tmp_path / "bad.jsonl", json.dumps(dict(GOOD, task="MSMACRO")), before=2)
    with pytest.raises(ValueError) as err:
        build_train_data(
            ["0.5", str(good), "0.5", str(bad)], None, global_batch_size=2, micro_batch_size=1
        )
    msg = str(err.value)
    assert msg.startswith(f"{bad}:3: key 'task': unknown task 'MSMACRO'"), msg
    assert "did you mean MSMARCO" in msg and '"instruction"' in msg
    # task names are matched as training matches them (case and punctuation ignored, aliases)
    for name in ("msmarco", "Natural Question", "hotpot-qa"):
        load_dataset_spec(str(_write(tmp_path / "t.jsonl", json.dumps(dict(GOOD, task=name)))))
    # with skip_bad_records: skipped and counted, the rest trains
    data = build_train_data(
        [str(good), str(bad)],
        None,
        skip_bad_records=True,
        global_batch_size=2,
        micro_batch_size=1,
    )
    assert [len(s) for s in data.sources] == [1, 3]
    assert data.sources[1].stats.skipped == 1 and "MSMACRO" in data.sources[1].stats.errors[0]


def test_unknown_task_in_parquet_names_the_row(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [dict(GOOD, task="SQuAD"), dict(GOOD, task="Nope")]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
    with pytest.raises(ValueError, match=r"t.parquet: row 2: key 'task': unknown task 'Nope'"):
        load_dataset_spec(str(tmp_path / "t.parquet"))


def test_instruction_without_task_is_accepted_and_trains_with_it(tmp_path):
    instruction = "Given a riddle find its answer"
    rows = [
        dict(GOOD, instruction=instruction),  # no task at all
        dict(GOOD, task="my-own-task", instruction=instruction),  # a name outside Table 6
        dict(GOOD, task=None, instruction=instruction),  # null task (Parquet / pandas)
    ]
    path = tmp_path / "own.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = build_train_data([str(path)], None, global_batch_size=3, micro_batch_size=3)
    (source,) = data.sources
    assert len(source) == 3 and source[0].task is None and source[0].instruction == instruction
    tok = build_word_tokenizer([f"Instruct: {instruction}\nQuery: {GOOD['query']}", *GOOD["pos"]])
    batch = collate([Slot(0, i, 0, ()) for i in range(3)], [source], tok, num_negatives=0)
    for row in range(3):
        text = tok.decode(batch.query["input_ids"][row], skip_special_tokens=True)
        assert instruction in text and GOOD["query"] in text, text


def test_tools_reader_resolves_tasks_only_when_it_uses_them(tmp_path):
    """Mining with its own `--instruction` (needs_instruction=False) takes any task name."""
    path = _write(tmp_path / "m.jsonl", json.dumps(dict(GOOD, task="Nope")))
    with pytest.raises(ValueError, match=r"m.jsonl:3: key 'task': unknown task 'Nope'"):
        list(iter_records(path))
    assert len(list(iter_records(path, needs_instruction=False))) == 4
    stats = ReadStats()
    assert len(list(iter_records(path, skip_bad_records=True, stats=stats))) == 3
    assert stats.skipped == 1


def test_utf8_bom_on_the_first_line_is_read(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (GOOD_LINE + "\n").encode() * 2)
    source = load_dataset_spec(str(path))
    assert [r.query for r in source] == [GOOD["query"]] * 2  # re-read by offset, BOM included
    assert len(list(iter_records(path))) == 2


@pytest.mark.parametrize(
    "scores, needle",
    [
        ({"pos_scores": [1.0]}, "key 'pos_scores' without 'neg_scores'"),
        ({"neg_scores": [1.0]}, "key 'neg_scores' without 'pos_scores'"),
        ({"pos_scores": 1.0, "neg_scores": [0.5]}, "key 'pos_scores' must be a list of numbers"),
        ({"pos_scores": [True], "neg_scores": [0.5]}, "item 0 is bool"),
        ({"pos_scores": ["1"], "neg_scores": [0.5]}, "item 0 is str"),
        ({"pos_scores": [1.0], "neg_scores": [1e400]}, "key 'neg_scores' item 0 is not finite"),
        ({"pos_scores": [1.0, 2.0], "neg_scores": [0.5]}, "2 score(s) for 1 'pos' text(s)"),
        ({"pos_scores": [1.0], "neg_scores": []}, "0 score(s) for 1 'neg' text(s)"),
    ],
)
def test_teacher_scores_are_checked_at_open(tmp_path, scores, needle):
    """`pos_scores` / `neg_scores` (distillation): both or neither, finite numbers, one per text."""
    line = json.dumps(dict(GOOD, task="SQuAD", **scores))
    path = _write(tmp_path / "s.jsonl", line)
    _open_error(path, needle)


def test_teacher_scores_follow_the_sampled_texts(tmp_path):
    """Each candidate gets its own text's score; records without scores and absent negatives get
    NaN; the dataset counts its scored records."""
    rows = [
        dict(GOOD, task="SQuAD", pos=["a", "b"], neg=["c", "d"], pos_scores=[1.0, 2.0],
             neg_scores=[3.0, 4.0]),
        dict(GOOD, task="SQuAD"),
    ]  # fmt: skip
    path = tmp_path / "scored.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = load_dataset_spec(str(path))
    assert source.scored_records == 1
    tok = build_word_tokenizer(["what is a cat a b c d cat is an animal dogs bark"])
    slots = [Slot(0, 0, 1, (1,)), Slot(0, 1, 0, (0,))]
    batch = collate(slots, [source], tok, num_negatives=2)
    got = batch.loss_inputs.teacher_scores.tolist()
    assert got[0][:2] == [2.0, 4.0] and got[0][2] != got[0][2]  # "b", "d", then absent: NaN
    assert all(v != v for v in got[1])
    assert source[0].to_json()["neg_scores"] == [3.0, 4.0]


@pytest.mark.parametrize(
    "ids, needle",
    [
        ({"pos_ids": "d1"}, "key 'pos_ids' must be a list of ids, got str"),
        (
            {"neg_ids": [1.5]},
            "key 'neg_ids' must be a list of string or integer ids, item 0 is float",
        ),
        ({"pos_ids": [True]}, "item 0 is bool"),
        ({"pos_ids": ["a", "b"]}, "key 'pos_ids' has 2 id(s) for 1 'pos' text(s)"),
        ({"neg_ids": []}, "key 'neg_ids' has 0 id(s) for 1 'neg' text(s)"),
    ],
)
def test_document_ids_are_checked_at_open(tmp_path, ids, needle):
    """`pos_ids` / `neg_ids` (each optional): string or integer ids, one per text."""
    line = json.dumps(dict(GOOD, task="SQuAD", **ids))
    path = _write(tmp_path / "i.jsonl", line)
    _open_error(path, needle)


def test_document_ids_follow_the_sampled_texts(tmp_path):
    """Each candidate gets `id_hash` of its own text's document id (integers read as strings),
    0 where its record has none (one list may come without the other) and for absent negatives;
    ids are written back unchanged in type-normalised form."""
    from megatron_nvembed.utils.hashing import id_hash

    rows = [
        dict(GOOD, task="SQuAD", pos=["a", "b"], neg=["c", "d"], pos_ids=["p1", 7],
             neg_ids=["n1", "n2"]),
        dict(GOOD, task="SQuAD", neg_ids=["x"]),
    ]  # fmt: skip
    path = tmp_path / "ids.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = load_dataset_spec(str(path))
    tok = build_word_tokenizer(["what is a cat a b c d cat is an animal dogs bark"])
    slots = [Slot(0, 0, 1, (1,)), Slot(0, 1, 0, (0,))]
    batch = collate(slots, [source], tok, num_negatives=2)
    assert batch.loss_inputs.document_ids.tolist() == [
        [id_hash("7"), id_hash("n2"), 0],
        [0, id_hash("x"), 0],
    ]
    assert 0 not in (id_hash("7"), id_hash("n2"), id_hash("x"))
    assert source[0].to_json()["pos_ids"] == ["p1", "7"]
    assert "pos_ids" not in source[1].to_json() and source[1].to_json()["neg_ids"] == ["x"]


# text that cannot be encoded: JSON escapes of lone surrogates, bytes that are not UTF-8

SURROGATE = "\ud800"  # json.dumps writes it as the escape "\ud800": the line itself is ASCII


@pytest.mark.parametrize(
    "row, key",
    [
        (dict(GOOD, task="SQuAD", query="what is " + SURROGATE), "key 'query'"),
        (dict(GOOD, task="SQuAD", pos=["fine", SURROGATE + "x"]), "key 'pos' item 1"),
        (dict(GOOD, task="SQuAD", neg=["x\udfff"]), "key 'neg' item 0"),
        (dict(GOOD, instruction="Given a " + SURROGATE), "key 'instruction'"),
        (dict(GOOD, task="SQuAD", id=SURROGATE), "key 'id'"),  # kept and written back
    ],
)
@pytest.mark.faults
def test_text_utf8_cannot_encode_is_refused_at_open(tmp_path, row, key):
    """Fault: A training record holding a lone surrogate (a JSON `"\\ud800"` escape) in any text key.
    Happens: The open stops before any batch in one error naming file:line and the key, in the
        trainer's loader and the tools' reader alike.
    Do: Fix the record, or pass `--skip-bad-records`."""
    # A lone surrogate stops the open (before any batch) naming file:line and the key, in the
    # trainer's loader and the tools' reader alike.
    line = json.dumps(row)
    assert line.isascii() and "\\ud" in line
    path = _write(tmp_path / "u.jsonl", line)
    msg = _open_error(path, f"{key} cannot be encoded as UTF-8 (lone surrogate U+D")
    assert "\n" not in msg and msg.isascii(), msg  # one printable line
    with pytest.raises(ValueError, match=rf"u.jsonl:3: {key} cannot be encoded as UTF-8"):
        list(iter_records(path))


@pytest.mark.parametrize(
    "bad, needle",
    [
        (b"\xff", "not UTF-8 text (byte ff at byte 14 of the line: invalid start byte)"),
        (b"\xed\xa0\x80", "not UTF-8 text (byte ed at byte 14 of the line: invalid continuation"),
    ],
)
@pytest.mark.faults
def test_bytes_that_are_not_utf8_are_refused_naming_the_line(tmp_path, bad, needle):
    """Fault: A training line holding bytes that are not UTF-8 (or a surrogate encoded as UTF-8).
    Happens: One error naming file:line and the byte, from the index build, the tools' record
        reader and the raw-row reader.
    Do: Re-encode the file as UTF-8, or pass `--skip-bad-records`."""
    # Invalid bytes (and a surrogate encoded as UTF-8) in a line: an error naming file:line, from
    # the index build, the tools' record reader and the raw-row reader (which read text before).
    path = tmp_path / "b.jsonl"
    line = b'{"query": "caf' + bad + b'", "pos": ["p"], "task": "SQuAD"}'
    path.write_bytes(b"\n".join([GOOD_LINE.encode()] * 2 + [line, GOOD_LINE.encode()]) + b"\n")
    _open_error(path, needle)
    for read in (iter_records, iter_jsonl):
        with pytest.raises(ValueError, match=rf"b.jsonl:3: {needle[:12]}"):
            list(read(path))


@pytest.mark.faults
def test_text_that_cannot_be_encoded_is_skipped_and_counted(tmp_path):
    """Fault: Records that cannot be encoded, with `--skip-bad-records`.
    Happens: They are skipped and counted with their file:line; the other records train.
    Do: Read the count in the log; fix the source when it is large."""
    # With skip_bad_records both kinds are skipped and counted; the other records train.
    path = tmp_path / "mixed.jsonl"
    lines = [
        GOOD_LINE.encode(),
        json.dumps(dict(GOOD, task="SQuAD", neg=["x" + SURROGATE])).encode(),
        b'{"query": "\xc3", "pos": ["p"], "task": "SQuAD"}',
        json.dumps(dict(GOOD, task="SQuAD", query="caf\u00e9 \U0001f600")).encode(),
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    data = build_train_data(
        [str(path)], None, skip_bad_records=True, global_batch_size=2, micro_batch_size=1
    )
    (source,) = data.sources
    assert (source.stats.read, source.stats.skipped) == (2, 2)
    assert [r.query for r in source] == [GOOD["query"], "caf\u00e9 \U0001f600"]
    errors = source.stats.errors
    assert errors[0].startswith(f"{path}:2: key 'neg' item 0 cannot be encoded as UTF-8"), errors
    assert errors[1].startswith(f"{path}:3: not UTF-8 text"), errors
    stats = ReadStats()
    assert len(list(iter_records(path, skip_bad_records=True, stats=stats))) == 2
    assert (stats.read, stats.skipped) == (2, 2)
