"""Collation: queries get their task's instruction (masked out of pooling), candidates are
[positive, sampled negatives, empty masked fillers], flags combine the dataset and stage switches,
candidate hashes are equal exactly for equal texts; the loss inputs come as one `LossInputs` with
every field filled; `--train-data` parsing and loading.

Run alone: pytest tests/unit/test_data_collate.py
"""

import json

import pytest

from megatron_nvembed.data.blending import Slot
from megatron_nvembed.data.collate import collate
from megatron_nvembed.data.loading import in_batch_flag, load_records, parse_data_paths
from megatron_nvembed.data.records import Record
from megatron_nvembed.testing import build_word_tokenizer

R1 = Record(
    "what is a cat", ["a cat is an animal", "cats purr"], ["dogs bark", "fish swim"], "SQuAD"
)
R2 = Record(
    "label this", ["positive"], [], "ImdbClassification", extra={"in_batch_negatives": False}
)


@pytest.fixture(scope="module")
def tok():
    words = " ".join([R1.query, *R1.pos, *R1.neg, R2.query, *R2.pos])
    return build_word_tokenizer(
        [
            words,
            "Instruct: Given a question, retrieve passages that answer "
            "the question\nQuery: Classify the sentiment expressed in the "
            "given movie review text from the IMDB dataset",
        ]
    )


def test_collate_layout(tok):
    slots = [Slot(0, 0, 1, (1,)), Slot(1, 0, 0, ())]
    b = collate(slots, [[R1], [R2]], tok, num_negatives=2, dataset_in_batch=[True, False])
    assert b.candidates["input_ids"].shape[0] == 2 * 3
    inputs = b.loss_inputs  # built here, once, every field filled
    assert inputs.candidate_mask.tolist() == [[True, True, False], [True, False, False]]
    assert inputs.in_batch.tolist() == [True, False]
    assert inputs.query_ids.shape == (2,) and inputs.teacher_scores.shape == (2, 3)
    assert inputs.document_ids.tolist() == [[0, 0, 0], [0, 0, 0]]  # R1, R2 carry no ids
    # positive 1 of R1 is "cats purr"; negative 1 is "fish swim"
    first = tok.decode(b.candidates["input_ids"][0][b.candidates["attention_mask"][0].bool()])
    assert "cats purr" in first and "fish swim" in tok.decode(b.candidates["input_ids"][1])
    n_instr = len(
        tok.tokenize(
            "Instruct: Given a question, retrieve passages that answer the question\nQuery: "
        )
    )
    assert b.query["pool_mask"][0, :n_instr].sum() == 0 and b.query["pool_mask"][0, n_instr] == 1
    # the two empty fillers hash equal; different texts do not
    ids = inputs.candidate_ids
    assert ids[0, 2] == ids[1, 1] and ids[0, 0] != ids[0, 1]


def test_parse_data_paths_and_loading(tmp_path):
    assert parse_data_paths(["a", "b"]) == [(1.0, "a"), (1.0, "b")]
    assert parse_data_paths(["0.3", "a", "0.7", "b"]) == [(0.3, "a"), (0.7, "b")]
    with pytest.raises(ValueError, match="--train-data"):
        parse_data_paths(["0.3", "a", "0.7"])
    d = tmp_path / "ds"
    d.mkdir()
    (d / "x.jsonl").write_text(json.dumps(R2.to_json()) + "\n")
    recs = load_records(str(d))
    assert len(recs) == 1 and in_batch_flag(recs) is False
    with pytest.raises(FileNotFoundError, match="--train-data"):
        load_records(str(tmp_path / "missing"))


def test_load_datasets_folder(tmp_path):
    import datasets

    datasets.Dataset.from_list([R1.to_json()]).save_to_disk(str(tmp_path / "hf"))
    assert load_records(str(tmp_path / "hf"))[0].pos == R1.pos
