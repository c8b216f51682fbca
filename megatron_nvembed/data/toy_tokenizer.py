"""A small BPE tokenizer trained locally, shaped like Mistral's: SentencePiece-style word marks
("▁"), `<unk>` / `<s>` / `</s>`, BOS added and EOS not, pad = EOS, right padding.

For tests, the quickstart and experiments without hub access; `save_pretrained` writes a folder
that `data.tokenization.load_tokenizer` loads offline.
"""

from __future__ import annotations

import os
import string
from collections.abc import Iterable

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")


def build_toy_tokenizer(
    texts: Iterable[str], vocab_size: int = 512, save_dir: str | os.PathLike | None = None
):
    """Trains a BPE tokenizer on `texts` and wraps it as a transformers fast tokenizer.

    The alphabet is printable ASCII plus every character of `texts` (so any ASCII text encodes
    without `<unk>`); merges fill the vocabulary up to `vocab_size`.

    Args:
        texts: training texts (iterated once).
        vocab_size: the vocabulary size, special tokens and alphabet included.
        save_dir: when given, the tokenizer is also saved there with `save_pretrained`.

    Returns:
        A `transformers.PreTrainedTokenizerFast`: ids `<unk>` 0, `<s>` 1 (BOS), `</s>` 2 (EOS and
        pad); it adds BOS to every sequence, never EOS; padding side right.

    Raises:
        ValueError: `vocab_size` too small for the special tokens and the alphabet.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(set(string.printable) - set(string.whitespace) | {"▁", "\n"})
    if vocab_size < len(SPECIAL_TOKENS) + len(alphabet):
        raise ValueError(
            f"vocab_size {vocab_size} is below the {len(SPECIAL_TOKENS) + len(alphabet)} "
            "special tokens and ASCII characters"
        )
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    # Metaspace turns spaces into "▁" word marks as SentencePiece does, so "Query: " ends in its
    # own "▁" token like Mistral's tokenizer and decode() restores the spaces; newlines stay
    # tokens of their own (as in Mistral's vocabulary) instead of merging into words.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split("\n", behavior="isolated"),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first"),
        ]
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator((t for t in texts), trainer=trainer)
    bos_id = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos_id)]
    )
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="</s>",
        padding_side="right",
        model_max_length=512,
    )
    if save_dir is not None:
        out.save_pretrained(str(save_dir))
    return out
