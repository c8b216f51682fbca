"""`--train-data` loading: every source kind gives back exactly the records written, errors name
the file and line (or row), and the per-dataset `in_batch_negatives` flag follows its documented
precedence.

- JSONL (single file and a folder, blank lines, re-read by byte offset, picklable), Parquet via
  pyarrow (null `neg` = no negatives), a `datasets` save_to_disk folder, and a `datasets` name
  (the call and its split, also as `name:split`, checked with a stand-in loader; an unreachable
  name fails offline with an error naming `--train-data`);
- a `DatasetDict.save_to_disk` folder (train + validation, written by `datasets` here): its train
  rows by default, its validation rows as `folder:validation`, also weighted and through
  `build_train_data`; an unknown split and a DatasetDict without "train" are errors naming the
  folder and listing its splits; a split on a source without splits is an error; a path holding
  ":" that exists as given is read as that path;
- `datasets` rows with a missing column or a wrong type: errors naming the folder, row and key,
  "missing key" apart from "must be a string, got int";
- per-record counts (positives, negatives) match the records;
- `skip_bad_records` skips and counts malformed lines and records without a positive;
- in_batch_negatives: records' value, sidecar `<path>.meta.json`, argument override, and the
  errors for disagreeing records, a contradicting sidecar and an unknown sidecar key;
- `parse_data_paths` pairs and its errors naming `--train-data`.

Run alone: pytest tests/unit/test_data_loading.py
"""

import json
import pickle

import pytest

from megatron_nvembed.data.loading import (
    in_batch_flag,
    load_dataset_spec,
    load_records,
    parse_data_paths,
)
from megatron_nvembed.data.records import Record, iter_records

ROWS = [
    {
        "query": f"q{i}",
        "pos": [f"p{i}"] * (1 + i % 2),
        "neg": [f"n{i}_{j}" for j in range(i % 4)],
        "task": "MSMARCO",
        "id": i,
    }
    for i in range(10)
]


def _write(path, rows, blank_every=0):
    lines = []
    for i, r in enumerate(rows):
        lines.append(json.dumps(r))
        if blank_every and i % blank_every == 0:
            lines.append("")
    path.write_text("\n".join(lines) + "\n")
    return path


def _same(source, rows):
    assert len(source) == len(rows)
    for i, row in enumerate(rows):
        rec = source[i]
        assert rec.to_json() == row
        assert source.counts(i) == (len(row["pos"]), len(row["neg"]))


def test_jsonl_file_and_folder(tmp_path):
    src = load_dataset_spec(str(_write(tmp_path / "a.jsonl", ROWS, blank_every=3)))
    _same(src, ROWS)
    assert src[-1].query == "q9" and src.in_batch_negatives is True
    assert list(src) == list(iter_records(tmp_path / "a.jsonl"))
    again = pickle.loads(pickle.dumps(src))  # e.g. for DataLoader workers: reopens its files
    _same(again, ROWS)
    with pytest.raises(IndexError):
        src[10]
    folder = tmp_path / "folder"
    folder.mkdir()
    _write(folder / "b.jsonl", ROWS[5:])
    _write(folder / "a.jsonl", ROWS[:5])
    (folder / "notes.txt").write_text("ignored")
    _same(load_dataset_spec(str(folder)), ROWS)  # files in name order
    (folder / "c.parquet").write_bytes(b"")
    with pytest.raises(ValueError, match="mixes Parquet and JSONL"):
        load_dataset_spec(str(folder))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="--train-data: no .jsonl"):
        load_dataset_spec(str(empty))


def test_parquet_and_datasets_folder(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [dict(r, neg=r["neg"] or None) for r in ROWS]  # null neg, as pandas writes it
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    src = load_dataset_spec(str(tmp_path / "a.parquet"))
    assert len(src) == 10 and src[0].neg == [] and src[3].neg == ["n3_0", "n3_1", "n3_2"]
    assert [src.counts(i) for i in range(10)] == [(len(r["pos"]), len(r["neg"])) for r in ROWS]
    bad = [dict(ROWS[0]), dict(ROWS[1], pos=[])]
    pq.write_table(pa.Table.from_pylist(bad), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"bad.parquet: row 2: record has no positive"):
        load_dataset_spec(str(tmp_path / "bad.parquet"))
    assert len(load_dataset_spec(str(tmp_path / "bad.parquet"), skip_bad_records=True)) == 1

    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "hf"))
    _same(load_dataset_spec(str(tmp_path / "hf")), ROWS)


def _save_dataset_dict(path, **splits):
    datasets = pytest.importorskip("datasets")
    dd = datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()})
    dd.save_to_disk(str(path))
    return path


def test_dataset_dict_folder_default_and_selected_split(tmp_path):
    dd = _save_dataset_dict(tmp_path / "dd", train=ROWS[:6], validation=ROWS[6:])
    assert (dd / "dataset_dict.json").is_file()  # what used to be read as a JSON record file
    train = load_dataset_spec(str(dd))
    _same(train, ROWS[:6])
    assert train.name == f"{dd}:train"
    val = load_dataset_spec(f"{dd}:validation")
    _same(val, ROWS[6:])
    assert val.name == f"{dd}:validation"
    _same(load_dataset_spec(str(dd), split="validation"), ROWS[6:])
    _same(load_dataset_spec(f"{dd}:train"), ROWS[:6])
    # weights keep working next to a split suffix
    jsonl = _write(tmp_path / "b.jsonl", ROWS[:2])
    pairs = parse_data_paths(["0.3", f"{dd}:validation", "0.7", str(jsonl)])
    assert pairs == [(0.3, f"{dd}:validation"), (0.7, str(jsonl))]
    assert [r.query for r in load_records(pairs[0][1])] == [r["query"] for r in ROWS[6:]]

    from megatron_nvembed.data.pipeline import build_train_data
    from megatron_nvembed.data.toy_tokenizer import build_toy_tokenizer

    tok = build_toy_tokenizer([r["query"] for r in ROWS], vocab_size=300)
    data = build_train_data(
        [f"{dd}:validation", str(dd)], tok, global_batch_size=4, micro_batch_size=2
    )
    assert [r.query for r in data.sources[0]] == [r["query"] for r in ROWS[6:]]
    assert [r.query for r in data.sources[1]] == [r["query"] for r in ROWS[:6]]
    assert len(next(iter(data))) == 2


def test_dataset_dict_split_errors(tmp_path):
    dd = _save_dataset_dict(tmp_path / "dd", train=ROWS[:6], validation=ROWS[6:])
    with pytest.raises(ValueError, match=r"dd has no split 'test' \(splits: train, validation\)"):
        load_dataset_spec(f"{dd}:test")
    with pytest.raises(ValueError, match=r"names split 'validation' but 'train' was asked"):
        load_dataset_spec(f"{dd}:validation", split="train")
    no_train = _save_dataset_dict(tmp_path / "nt", validation=ROWS[:2], test=ROWS[2:4])
    with pytest.raises(
        ValueError,
        match=r"nt is a `datasets` DatasetDict without a 'train' split.*validation, test",
    ):
        load_dataset_spec(str(no_train))
    _same(load_dataset_spec(f"{no_train}:test"), ROWS[2:4])
    # a split on a source that has none: an error, not silently the whole file
    jsonl = _write(tmp_path / "a.jsonl", ROWS[:2])
    with pytest.raises(ValueError, match=r"a.jsonl is no `datasets` DatasetDict folder"):
        load_dataset_spec(f"{jsonl}:train")
    import datasets

    datasets.Dataset.from_list(ROWS[:3]).save_to_disk(str(tmp_path / "plain"))
    with pytest.raises(ValueError, match=r"plain is no `datasets` DatasetDict folder"):
        load_dataset_spec(f"{tmp_path / 'plain'}:train")
    with pytest.raises(FileNotFoundError, match=r"--train-data: .*missing.jsonl:train does not"):
        load_dataset_spec(f"{tmp_path / 'missing.jsonl'}:train")
    # a path that exists as given wins over the split syntax
    odd = _write(tmp_path / "odd:train", ROWS[:4])
    _same(load_dataset_spec(str(odd)), ROWS[:4])


def test_datasets_rows_missing_key_and_wrong_type(tmp_path):
    datasets = pytest.importorskip("datasets")
    no_query = [{k: v for k, v in r.items() if k != "query"} for r in ROWS[:3]]
    datasets.Dataset.from_list(no_query).save_to_disk(str(tmp_path / "nq"))
    with pytest.raises(ValueError, match=r"nq: row 1: missing key 'query'$"):
        load_dataset_spec(str(tmp_path / "nq"))
    int_task = [dict(r, task=5) for r in ROWS[:3]]
    _save_dataset_dict(tmp_path / "it", train=ROWS[:3], validation=int_task)
    with pytest.raises(
        ValueError, match=r"it:validation: row 1: key 'task' must be a string, got int$"
    ):
        load_dataset_spec(f"{tmp_path / 'it'}:validation")
    path = _write(tmp_path / "m.jsonl", [ROWS[0], {k: v for k, v in ROWS[1].items() if k != "pos"}])
    with pytest.raises(ValueError, match=r"m.jsonl:2: record has no positive \(missing key 'pos'"):
        load_dataset_spec(str(path))


def test_datasets_name(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_list(ROWS[:3])

    with monkeypatch.context() as m:
        m.setattr(datasets, "load_dataset", fake_load)
        src = load_dataset_spec("someone/retrieval-set", split="dev")
        _same(load_dataset_spec("someone/retrieval-set:validation"), ROWS[:3])
        load_dataset_spec("someone/retrieval-set")
    assert calls == [
        ("someone/retrieval-set", "dev"),
        ("someone/retrieval-set", "validation"),
        ("someone/retrieval-set", "train"),
    ]
    _same(src, ROWS[:3])
    # for real, offline: the name cannot be reached, and the error says what was tried
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match=r"--train-data: someone/no-such-set is no local"):
        load_dataset_spec("someone/no-such-set")


def test_skip_bad_records_counts(tmp_path):
    path = tmp_path / "bad.jsonl"
    lines = [json.dumps(ROWS[0]), "{oops", json.dumps(dict(ROWS[1], pos=[])), json.dumps(ROWS[2])]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: malformed record"):
        load_dataset_spec(str(path))
    src = load_dataset_spec(str(path), skip_bad_records=True)
    assert (src.stats.read, src.stats.skipped) == (2, 2)
    assert [r.query for r in src] == ["q0", "q2"]
    assert "bad.jsonl:3: record has no positive" in src.stats.errors[1]
    path.write_text("\n\n")
    with pytest.raises(ValueError, match="no usable records"):
        load_dataset_spec(str(path))


def test_in_batch_negatives_precedence(tmp_path):
    off = [dict(r, in_batch_negatives=False) for r in ROWS[:3]]
    path = _write(tmp_path / "cls.jsonl", off)
    assert load_dataset_spec(str(path)).in_batch_negatives is False  # from the records
    assert load_dataset_spec(str(path), in_batch_negatives=True).in_batch_negatives is True
    mixed = _write(
        tmp_path / "mixed.jsonl", [ROWS[0], off[1], dict(ROWS[2], in_batch_negatives=True)]
    )
    with pytest.raises(ValueError, match=r"mixed.jsonl:3: in_batch_negatives=True but .*:2"):
        load_dataset_spec(str(mixed))
    plain = _write(tmp_path / "plain.jsonl", ROWS[:3])
    (tmp_path / "plain.jsonl.meta.json").write_text('{"in_batch_negatives": false, "name": "P"}')
    src = load_dataset_spec(str(plain))
    assert src.in_batch_negatives is False and src.name == "P"  # from the sidecar
    (tmp_path / "cls.jsonl.meta.json").write_text('{"in_batch_negatives": true}')
    with pytest.raises(ValueError, match=r"cls.jsonl.meta.json: in_batch_negatives=True contra"):
        load_dataset_spec(str(path))
    (tmp_path / "cls.jsonl.meta.json").write_text('{"in_batch": true}')
    with pytest.raises(ValueError, match=r"meta.json: unknown key 'in_batch'"):
        load_dataset_spec(str(path))
    bad_type = _write(tmp_path / "t.jsonl", [dict(ROWS[0], in_batch_negatives="no")])
    with pytest.raises(ValueError, match=r"t.jsonl:1: key 'in_batch_negatives'"):
        load_dataset_spec(str(bad_type))
    recs = [Record("q", ["p"], [], "MSMARCO", extra={"in_batch_negatives": False})]
    assert in_batch_flag(recs) is False and in_batch_flag(recs[:0]) is True


def test_load_records_and_parse_data_paths(tmp_path):
    recs = load_records(str(_write(tmp_path / "a.jsonl", ROWS)))
    assert [r.to_json() for r in recs] == ROWS
    assert parse_data_paths(["a", "b"]) == [(1.0, "a"), (1.0, "b")]
    assert parse_data_paths(["0.3", "a", "0.7", "b"]) == [(0.3, "a"), (0.7, "b")]
    for bad, msg in [
        (["0.3", "a", "0.7"], "weight/path pairs"),
        (["a", "0.7"], "mixes weights and paths"),
        (["-1", "a"], "bad weight '-1'"),
        (["x1", "a", "0.5"], "mixes weights"),
        (["0", "a", "0", "b"], "sum to zero"),
        ([], "no dataset"),
    ]:
        with pytest.raises(ValueError, match=f"--train-data: .*{msg}|--train-data: {msg}"):
            parse_data_paths(bad)
    with pytest.raises(FileNotFoundError, match="--train-data"):
        load_dataset_spec(str(tmp_path / "missing.jsonl"))
