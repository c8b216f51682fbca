"""NV-Embed tokenisation: BOS + instruction + text + EOS, right padding to a multiple of 8, and the
pool mask with NV-Embed's off-by-one (or the exact variant), checked on a hand-built example.

Run alone: pytest tests/unit/test_tokenization.py
"""

import pytest

from megatron_nvembed.data.tokenization import tokenize_for_embedding
from megatron_nvembed.testing import build_word_tokenizer

INSTR = "Instruct: find it\nQuery: "


@pytest.fixture(scope="module")
def tok():
    return build_word_tokenizer(["a b c d e f", INSTR])


def test_layout_and_nvembed_pool_mask(tok):
    batch, truncated = tokenize_for_embedding(tok, ["a b c", "d"], [INSTR, ""])
    ids = batch["input_ids"].tolist()
    n_instr = len(tok.tokenize(INSTR))  # "Instruct", ":", "find", "it", "Query", ":" = 6
    assert n_instr == 6
    assert ids[0][0] == tok.bos_token_id
    assert ids[0][1 + n_instr + 3] == tok.eos_token_id  # BOS + instruction + 3 words, then EOS
    assert batch["input_ids"].shape[1] == 16  # 11 tokens rounded up to a multiple of 8
    assert batch["attention_mask"][0].sum() == 11 and batch["attention_mask"][1].sum() == 3
    assert ids[1][3:] == [tok.pad_token_id] * 13  # right padding with EOS as pad
    pool = batch["pool_mask"].tolist()
    # BOS and the first 5 instruction tokens out; the last instruction token stays (off-by-one)
    assert pool[0][:11] == [0] * 6 + [1] * 5
    assert pool[1][:3] == [1, 1, 1]  # documents pool everything, BOS included
    assert truncated == 0


def test_exact_convention_and_truncation(tok):
    batch, truncated = tokenize_for_embedding(
        tok, ["a b c d e f"], INSTR, max_length=10, convention="exact"
    )
    assert truncated == 1 and batch["attention_mask"].sum() == 10
    assert batch["pool_mask"][0].tolist()[:10] == [0] * 7 + [1] * 3
    with pytest.raises(ValueError, match="convention"):
        tokenize_for_embedding(tok, ["a"], convention="other")
