"""The toy BPE tokenizer and NV-Embed tokenisation on it.

- `build_toy_tokenizer`: BOS added and EOS not, pad = EOS, right padding, ASCII without `<unk>`,
  and a `save_pretrained` folder that `AutoTokenizer` reloads offline to the same ids;
- `tokenize_for_embedding`: the single tokenizer pass cut at `max_length` equals the tokenizer's
  own truncation (ids compared exactly); dynamic padding to the micro-batch's longest row rounded
  up to 8 and capped at `max_length`; the pool mask of both conventions on a hand-checked
  SentencePiece-style example, where the instruction's trailing "▁" merges into the first query
  word; one instruction per text or one for all; bad arguments name the argument;
- `pad_token_id`, the one pad-token rule: the tokenizer's pad token, else EOS, else None; rows
  are padded with it.
(The word-level hand-built layout checks are in test_tokenization.py.)

Run alone: pytest tests/unit/test_data_tokenization.py
"""

import pytest
import torch

from megatron_nvembed.data.tokenization import pad_token_id, tokenize_for_embedding
from megatron_nvembed.data.toy_tokenizer import build_toy_tokenizer

INSTR = "Instruct: Given a question, retrieve passages that answer the question\nQuery: "
CORPUS = [
    INSTR + "what is a cat",
    "a cat is an animal that purrs and sleeps most of the day",
    "dogs bark at the mail carrier every morning",
    "the question was answered by a short passage",
] * 20


@pytest.fixture(scope="module")
def tok():
    return build_toy_tokenizer(CORPUS, vocab_size=300)


def test_toy_tokenizer_specials_and_offline_reload(tok, tmp_path, monkeypatch):
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 2)
    assert tok.padding_side == "right" and len(tok) <= 300
    ids = tok("a cat")["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.eos_token_id not in ids  # BOS yes, EOS no
    unseen = "Zebra quux 42!"  # characters never seen in training: printable ASCII still encodes
    assert tok.unk_token_id not in tok(unseen)["input_ids"]
    assert tok.decode(tok(unseen)["input_ids"], skip_special_tokens=True) == unseen
    build_toy_tokenizer(CORPUS, vocab_size=300, save_dir=tmp_path / "tok")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    for text in CORPUS[:4] + [unseen]:
        assert again(text)["input_ids"] == tok(text)["input_ids"]
    assert again.pad_token == "</s>" and again.padding_side == "right"
    with pytest.raises(ValueError, match="vocab_size"):
        build_toy_tokenizer(CORPUS, vocab_size=20)


def test_single_pass_truncation_equals_tokenizer_truncation(tok):
    texts = [CORPUS[1], "a cat", CORPUS[2] + " " + CORPUS[1]]
    for max_length in (4, 9, 16, 64):
        batch, cut = tokenize_for_embedding(
            tok, texts, INSTR, max_length=max_length, pad_to_multiple_of=None
        )
        want = tok([INSTR + t + "</s>" for t in texts], truncation=True, max_length=max_length)
        full = tok([INSTR + t + "</s>" for t in texts])["input_ids"]
        assert cut == sum(len(r) > max_length for r in full)
        for i, row in enumerate(want["input_ids"]):
            n = int(batch["attention_mask"][i].sum())
            assert batch["input_ids"][i, :n].tolist() == row


def test_dynamic_padding_multiple_of_8_capped(tok):
    short = ["a cat", "dogs bark"]
    longest = max(len(tok(t + "</s>")["input_ids"]) for t in short)
    batch, _ = tokenize_for_embedding(tok, short)
    assert batch["input_ids"].shape[1] == -(-longest // 8) * 8 and longest % 8 != 0
    assert batch["input_ids"].dtype == torch.int64 and batch["attention_mask"].dtype == torch.int64
    exact, _ = tokenize_for_embedding(tok, short, pad_to_multiple_of=None)
    assert exact["input_ids"].shape[1] == longest
    b16, _ = tokenize_for_embedding(tok, short, pad_to_multiple_of=16)
    assert b16["input_ids"].shape[1] == 16
    # a micro-batch longer than max_length: width is max_length, not rounded past it
    capped, cut = tokenize_for_embedding(tok, [CORPUS[1]] * 2, INSTR, max_length=21)
    assert capped["input_ids"].shape[1] == 21 and cut == 2
    assert capped["attention_mask"].sum(1).tolist() == [21, 21]
    padded_rows = batch["input_ids"][batch["attention_mask"] == 0]
    assert (padded_rows == tok.eos_token_id).all()  # right padding with pad = EOS


def test_pool_mask_conventions_on_sentencepiece_style_tokens(tok):
    alone = tok.tokenize(INSTR)
    n = len(alone)
    # the instruction alone ends in a bare "▁" (the space after "Query:") ...
    assert alone[-2:] == ["Query:", "▁"]
    batch, _ = tokenize_for_embedding(tok, ["what is a cat"], INSTR, pad_to_multiple_of=None)
    toks = tok.convert_ids_to_tokens(batch["input_ids"][0].tolist())
    # ... which in context merges into the first query word: BOS + (n - 1) instruction tokens
    assert toks[n - 1] == "Query:" and toks[n] == "▁what" and toks[-1] == "</s>"
    pool = batch["pool_mask"][0].tolist()
    # NV-Embed's rule zeroes positions [0, n): BOS and the n - 1 in-context instruction tokens
    assert pool == [0] * n + [1] * (len(toks) - n)
    exact, _ = tokenize_for_embedding(
        tok, ["what is a cat"], INSTR, pad_to_multiple_of=None, convention="exact"
    )
    # "exact" zeroes one more position, here the first query word
    assert exact["pool_mask"][0].tolist() == [0] * (n + 1) + [1] * (len(toks) - n - 1)
    assert (batch["attention_mask"] == 1).all()  # attention still sees every token


def test_instruction_per_text_and_errors(tok):
    other = "Instruct: Retrieve semantically similar text.\nQuery: "
    batch, _ = tokenize_for_embedding(tok, ["a cat", "a cat", "a cat"], [INSTR, other, ""])
    n1, n2 = len(tok.tokenize(INSTR)), len(tok.tokenize(other))
    pool = batch["pool_mask"]
    assert pool[0, :n1].sum() == 0 and pool[0, n1] == 1
    assert pool[1, :n2].sum() == 0 and pool[1, n2] == 1
    assert torch.equal(pool[2], batch["attention_mask"][2])  # no instruction: pool everything
    with pytest.raises(ValueError, match="instructions for"):
        tokenize_for_embedding(tok, ["a", "b"], ["x"])
    with pytest.raises(ValueError, match="max_length"):
        tokenize_for_embedding(tok, ["a"], max_length=1)
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        tokenize_for_embedding(tok, ["a"], pad_to_multiple_of=0)
    with pytest.raises(ValueError, match="no texts"):
        tokenize_for_embedding(tok, [])


def test_pad_token_falls_back_to_eos(tok):
    from transformers import PreTrainedTokenizerFast

    def variant(**specials):
        return PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, **specials)

    no_pad = variant(bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    assert no_pad.pad_token_id is None and pad_token_id(no_pad) == tok.eos_token_id
    batch, _ = tokenize_for_embedding(no_pad, ["a cat", "a cat is an animal that purrs"])
    assert (batch["input_ids"][batch["attention_mask"] == 0] == tok.eos_token_id).all()
    own_pad = variant(bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>")
    assert pad_token_id(own_pad) == tok.unk_token_id  # a pad token of its own wins
    assert pad_token_id(variant(unk_token="<unk>")) is None
