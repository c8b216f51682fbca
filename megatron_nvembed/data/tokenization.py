"""NV-Embed tokenisation: instruction + text + EOS, BOS from the tokenizer, right padding, and
the pool mask that leaves the instruction out of pooling (with NV-Embed's exact off-by-one).

See shared/reference/nvembed-format.md: `pool_mask = attention_mask`, then the first
`len(tokenizer.tokenize(instruction))` positions are zeroed; that count excludes BOS, so BOS and
all but the last instruction token are masked. `convention="exact"` masks BOS and every
instruction token instead.
"""

from __future__ import annotations

import torch


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
        tokenizer: a transformers tokenizer that adds BOS (pad token defaults to EOS).
        texts: the texts.
        instructions: one instruction for all, one per text, or None (documents).
        max_length: truncation length in tokens (BOS and EOS included).
        pad_to_multiple_of: pad the batch to its longest row rounded up to this (None: exact).
        convention: `"nvembed"` (default, NV-Embed's off-by-one) or `"exact"`.

    Returns:
        ({"input_ids", "attention_mask", "pool_mask"} each [b, s] int64, number of truncated texts).

    Raises:
        ValueError: unknown convention, or a count of instructions that does not match the texts.
    """
    if convention not in ("nvembed", "exact"):
        raise ValueError(f"pool-mask convention must be 'nvembed' or 'exact', got {convention!r}")
    if instructions is None or isinstance(instructions, str):
        instructions = [instructions or ""] * len(texts)
    if len(instructions) != len(texts):
        raise ValueError(f"{len(instructions)} instructions for {len(texts)} texts")
    eos = tokenizer.eos_token
    full = [ins + t + eos for ins, t in zip(instructions, texts)]
    lengths = [len(ids) for ids in tokenizer(full, add_special_tokens=True)["input_ids"]]
    truncated = sum(n > max_length for n in lengths)
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    batch = tokenizer(full, truncation=True, max_length=max_length, add_special_tokens=True)
    width = max(len(ids) for ids in batch["input_ids"])
    if pad_to_multiple_of:
        width = min(-(-width // pad_to_multiple_of) * pad_to_multiple_of, max(width, max_length))
    ids = torch.full((len(texts), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(texts), width, dtype=torch.long)
    for i, row in enumerate(batch["input_ids"]):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    pool = mask.clone()
    for i, ins in enumerate(instructions):
        if ins:
            n = len(tokenizer.tokenize(ins))
            pool[i, : n + (1 if convention == "exact" else 0)] = 0
    return {"input_ids": ids, "attention_mask": mask, "pool_mask": pool}, truncated
