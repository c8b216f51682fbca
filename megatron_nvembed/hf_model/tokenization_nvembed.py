"""The tokenizer of an NV-Embed-format model, read from its files exactly as they are written.

Self-contained (transformers + tokenizers): it is copied next to exported weights, imported by
`modeling_nvembed.py`, and is also the one tokenizer loader of the megatron_nvembed package
(training, `tools/embed.py`, `tools/evaluate_mteb.py`), so every path tokenises alike.

Why not `AutoTokenizer`: transformers 5's `LlamaTokenizer` rebuilds a Mistral / Llama tokenizer's
pre-tokeniser instead of running the normaliser stored in `tokenizer.json`, and then gives one
"▁" fewer than SentencePiece (and than transformers 4.x, which NV-Embed's released code runs
under) whenever a text, or the text after a special token, starts with a space. Reading
`tokenizer.json` as a plain fast tokenizer runs the stored normaliser, model and post-processor
unchanged, under transformers 4.42 and 5 alike.

The one adjustment transformers 4.x's Llama tokenizer makes is kept: it derives the
post-processor from `add_bos_token` / `add_eos_token` in `tokenizer_config.json` (defaults: BOS
on, EOS off), so this loader does the same for tokenizers of that class.
"""

from __future__ import annotations

import json
import os

from tokenizers import Tokenizer, processors
from transformers import PreTrainedTokenizerFast

_LLAMA_CLASSES = (
    "LlamaTokenizer",
    "LlamaTokenizerFast",
    "CodeLlamaTokenizer",
    "CodeLlamaTokenizerFast",
)
_SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token")


def _locate(name_or_path: str, filename: str, required: bool) -> str | None:
    """The local path of `filename` in a model folder (or a cached hub repository)."""
    if os.path.isdir(name_or_path):
        path = os.path.join(name_or_path, filename)
        if os.path.isfile(path):
            return path
        if required:
            raise FileNotFoundError(
                f"{path}: missing; an NV-Embed-format tokenizer is defined by its tokenizer.json "
                "(the fast tokenizer file transformers publishes with Mistral / Llama models)"
            )
        return None
    from transformers.utils import cached_file

    return cached_file(name_or_path, filename, _raise_exceptions_for_missing_entries=required)


def _read_json(path: str | None) -> dict:
    if path is None:
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _content(value) -> str | None:
    """A special token as written in the config files: a string or `{"content": ...}`."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _llama_post_processor(tok: Tokenizer, bos: str, eos: str, add_bos: bool, add_eos: bool):
    """BOS / EOS placement of a Llama-class tokenizer from its two config switches."""
    single = ([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else [])
    pair = single + ([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos else [])
    special = []
    for flag, token in ((add_bos, bos), (add_eos, eos)):
        if flag:
            token_id = tok.token_to_id(token)
            if token_id is None:
                raise ValueError(f"special token {token!r} is not in the tokenizer's vocabulary")
            special.append((token, token_id))
    return processors.TemplateProcessing(
        single=" ".join(single), pair=" ".join(pair), special_tokens=special
    )


def pad_token_id(tokenizer) -> int | None:
    """The id rows are padded with: the tokenizer's pad token, else its EOS.

    Mistral / Llama tokenizers ship without a pad token and NV-Embed pads with EOS; the pad id
    never reaches pooling or attention (the attention mask is 0 there). The one place this
    fallback is decided: `load_tokenizer` sets it, and the training package pads with it.

    Returns:
        The id, or None when the tokenizer has neither a pad nor an EOS token.
    """
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return tokenizer.eos_token_id


def load_tokenizer(name_or_path: str | os.PathLike) -> PreTrainedTokenizerFast:
    """Loads the tokenizer of a model folder for NV-Embed-style embedding.

    Reads `tokenizer.json` unchanged, special tokens from `tokenizer_config.json` and
    `special_tokens_map.json`; pad = EOS when no pad token is set; right padding. Needs no
    remote code and never asks for it.

    Args:
        name_or_path: a folder holding `tokenizer.json` (or a cached hub repository id).

    Raises:
        FileNotFoundError: naming the missing `tokenizer.json`.
        ValueError: naming a config file that is not valid JSON.
    """
    name_or_path = str(name_or_path)
    tokenizer_file = _locate(name_or_path, "tokenizer.json", required=True)
    config = _read_json(_locate(name_or_path, "tokenizer_config.json", required=False))
    special_map = _read_json(_locate(name_or_path, "special_tokens_map.json", required=False))
    try:
        backend = Tokenizer.from_file(tokenizer_file)
    except Exception as err:  # the tokenizers library raises plain Exceptions
        raise ValueError(f"{tokenizer_file}: not a readable tokenizer file ({err})") from err
    special = {k: _content(special_map.get(k, config.get(k))) for k in _SPECIAL}
    if config.get("tokenizer_class") in _LLAMA_CLASSES and special["bos_token"]:
        backend.post_processor = _llama_post_processor(
            backend,
            special["bos_token"],
            special["eos_token"],
            bool(config.get("add_bos_token", True)),
            bool(config.get("add_eos_token", False)),
        )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        **{k: v for k, v in special.items() if v is not None},
        padding_side="right",
        clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
    )
    if tok.pad_token is None:
        tok.pad_token_id = pad_token_id(tok)
    tok.name_or_path = name_or_path
    return tok
