"""Embedding tokenisation: instruction + text + end token, the tokenizer's own special tokens,
right padding, and the pool mask that leaves the instruction out of pooling (with NV-Embed's exact
off-by-one).

Two end-token conventions, told apart by what the tokenizer itself adds (`special_token_layout`):
- NV-Embed (Mistral / Llama tokenizers: BOS added, nothing appended): the EOS token's text is
  appended to every text, as NV-Embed's released code does. Truncation keeps the first
  `max_length` tokens (BOS included), as its `truncation=True` does: a truncated text loses its EOS.
- Qwen3-Embedding (no BOS; its tokenizer's post-processor appends `<|endoftext|>`): nothing is
  appended, and truncation cuts the text, never the appended token, as the tokenizer's own
  `truncation=True` does, so the last token (the one last-token pooling reads) is always it.

See shared/reference/nvembed-format.md: `pool_mask = attention_mask`, then the first
`len(tokenizer.tokenize(instruction))` positions are zeroed; that count excludes BOS, so BOS and
all but the last instruction token are masked. `convention="exact"` masks the leading special
tokens and every instruction token instead. Truncated texts are counted.

Right padding is the layout of the whole package; a tokenizer saved with left padding (as
Qwen3-Embedding's is) gives the same pooled state under a causal mask: RoPE attention depends on
relative positions only, and the padding is masked out (tested against transformers with left
padding in tests/functional/test_qwen3_embedding.py).
"""

from __future__ import annotations

import torch

# The one tokenizer loader (tokenizer.json read unchanged; see its module) and the one pad-token
# rule: they ship inside exports too, so training, tools/embed.py, tools/evaluate_mteb.py and the
# exported model's `encode` tokenise and pad alike.
from megatron_nvembed.hf_model.tokenization_nvembed import (
    load_tokenizer,  # noqa: F401 - re-exported
    pad_token_id,
)

POOL_MASK_CONVENTIONS = ("nvembed", "exact")


def special_token_layout(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a single text by itself (its
    post-processor): ([BOS], []) for Mistral / Llama, ([], [<|endoftext|>]) for Qwen3-Embedding.

    Raises:
        ValueError: the tokenizer inserts special tokens inside the text (not a prefix/suffix).
    """
    probe = "a b"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return list(full[:start]), list(full[start + len(plain) :])
    raise ValueError(
        f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r}: its special tokens are not a "
        "prefix and a suffix of the text; embedding tokenisation supports only those"
    )


def appended_end_text(tokenizer) -> str:
    """The text appended to every row: the EOS token's text where the tokenizer appends nothing
    itself (NV-Embed), "" where its post-processor appends its end token (Qwen3-Embedding).

    Raises:
        ValueError: the tokenizer appends nothing and has no eos_token.
    """
    return _end_text(tokenizer, special_token_layout(tokenizer)[1])


def _end_text(tokenizer, suffix: list[int]) -> str:
    if suffix:
        return ""
    if tokenizer.eos_token is None:
        raise ValueError("the tokenizer has no eos_token; NV-Embed appends one to every text")
    return tokenizer.eos_token


def tokenize_for_embedding(
    tokenizer,
    texts: list[str],
    instructions: list[str] | str | None = None,
    *,
    max_length: int = 512,
    pad_to_multiple_of: int | None = 8,
    convention: str = "nvembed",
) -> tuple[dict[str, torch.Tensor], int]:
    """Tokenises a batch for `NVEmbedModel`.

    Args:
        tokenizer: a transformers tokenizer (pad token defaults to EOS); the special tokens it adds
            by itself decide the end-token convention (see the module docstring).
        texts: the texts.
        instructions: one instruction for all, one per text, or None (documents). An instruction
            is the complete prefix, e.g. `"Instruct: ...\\nQuery: "` (see `templates`).
        max_length: truncation length in tokens (special tokens and EOS included).
        pad_to_multiple_of: pad the batch to its longest row rounded up to this, capped at
            `max_length` (None: to the longest row exactly).
        convention: `"nvembed"` (default, NV-Embed's off-by-one) or `"exact"`.

    Returns:
        ({"input_ids", "attention_mask", "pool_mask"}, each [b, s] int64 with s = the longest row
        rounded up as above; number of texts cut at `max_length`).

    Raises:
        ValueError: unknown convention, bad lengths, or a count of instructions that does not
            match the texts.
    """
    if convention not in POOL_MASK_CONVENTIONS:
        raise ValueError(
            f"pool-mask convention must be one of {POOL_MASK_CONVENTIONS}, got {convention!r}"
        )
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 (BOS and EOS), got {max_length}")
    if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of must be >= 1 or None, got {pad_to_multiple_of}")
    if not texts:
        raise ValueError("tokenize_for_embedding: no texts")
    if instructions is None or isinstance(instructions, str):
        instructions = [instructions or ""] * len(texts)
    if len(instructions) != len(texts):
        raise ValueError(f"{len(instructions)} instructions for {len(texts)} texts")
    prefix, suffix = special_token_layout(tokenizer)
    if max_length <= len(prefix) + len(suffix):
        raise ValueError(
            f"max_length {max_length} leaves no room for text beside the tokenizer's "
            f"{len(prefix) + len(suffix)} special tokens"
        )
    end = _end_text(tokenizer, suffix)  # "" when the tokenizer appends its end token itself
    full = [ins + t + end for ins, t in zip(instructions, texts)]
    # One pass without truncation: the lengths give the truncation count. Cutting the id list at
    # max_length equals the tokenizer's own truncation when it only prepends (BOS); when it
    # appends, the text is cut before the appended tokens, which stay, as its truncation does.
    rows = tokenizer(full, add_special_tokens=True)["input_ids"]
    truncated = sum(len(r) > max_length for r in rows)
    if suffix:
        keep = max_length - len(suffix)
        rows = [r if len(r) <= max_length else r[:keep] + suffix for r in rows]
    else:
        rows = [r[:max_length] for r in rows]
    pad_id = pad_token_id(tokenizer)
    width = max(len(r) for r in rows)
    if pad_to_multiple_of:
        width = min(-(-width // pad_to_multiple_of) * pad_to_multiple_of, max_length)
    ids = torch.full((len(texts), width), pad_id, dtype=torch.long)  # [b, s]
    mask = torch.zeros(len(texts), width, dtype=torch.long)  # [b, s]
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    pool = mask.clone()  # [b, s]
    # "exact" also removes the last instruction token (NV-Embed's count omits the leading BOS)
    extra = len(prefix) if convention == "exact" else 0
    n_tokens: dict[str, int] = {}  # a micro-batch usually shares a few instructions
    for i, ins in enumerate(instructions):
        if ins:
            if ins not in n_tokens:
                n_tokens[ins] = len(tokenizer.tokenize(ins))
            pool[i, : n_tokens[ins] + extra] = 0
    return {"input_ids": ids, "attention_mask": mask, "pool_mask": pool}, truncated
