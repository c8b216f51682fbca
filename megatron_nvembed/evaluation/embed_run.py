"""The embedding command (`tools/embed.py`): a JSONL file of texts embedded by any model format
in resumable shards (`retrieval.shards.encode_corpus`, data-parallel under torchrun), kept as a
shard folder (--output-dir) or written as one array (--output).

`embed_texts(args)` reads the model's query template and checks the input line by line before
the model loads; each line's "instruction" goes into that template (`retrieval.corpus.embed_row`).
"""

from __future__ import annotations

import argparse
import functools
import shutil
from pathlib import Path

from megatron_nvembed.evaluation.encoder import load_embedder, query_template_of
from megatron_nvembed.evaluation.encoder_flags import FlagError, embedder_kwargs
from megatron_nvembed.retrieval.corpus import JsonlCorpus, embed_row
from megatron_nvembed.retrieval.shards import (
    encode_corpus,
    single_array_size,
    write_single_array,
)
from megatron_nvembed.utils.diskspace import check_free_space
from megatron_nvembed.utils.locking import OutputLocked, rank0_output_lock


def _open_input(args: argparse.Namespace) -> JsonlCorpus:
    """--input checked line by line, definitions put into the model's own query template."""
    try:
        template = query_template_of(args.load)
    except (FileNotFoundError, ValueError) as err:
        raise FlagError(f"--load: {err}") from err
    try:
        return JsonlCorpus(args.input, functools.partial(embed_row, template=template))
    except (FileNotFoundError, ValueError) as err:
        raise FlagError(f"--input: {err}") from err


def _check_space(args: argparse.Namespace, rows: int, dim: int, folder: Path) -> None:
    """Refuses, before any text is embedded, outputs that cannot fit: the embeddings of the
    shards not yet on disk, and for --output the single array besides them."""
    missing = max(rows * dim * 4 - sum(p.stat().st_size for p in folder.glob("emb_*.npy")), 0)
    if args.output:  # the staging shards beside it and the array, named by the user's flag
        check_free_space(args.output, missing + single_array_size(rows, dim))
    else:
        check_free_space(folder, missing)


def embed_texts(args: argparse.Namespace) -> None:
    """Runs `tools/embed.py` (see its help for the flags and the files written): a collective
    under torchrun, every rank calls it with the same flags.

    Args:
        args: the tool's parsed flags (checked: `encoder_flags.check_encoder_flags`, --shard-size,
            --output's suffix).

    Raises:
        FlagError: --load or --input unusable, the output folder holds other files, other
            embeddings, or shards of another model than its `meta.json` says, or another job
            writes the output (naming the flag).
        DiskFullError: the outputs do not fit (before any text is embedded, when the free
            space is short already), or a write ran out of space.
    """
    corpus = _open_input(args)
    flag = "--output-dir" if args.output_dir else "--output"
    try:  # global rank 0, before the model loads (under torchrun its error ends the others)
        with rank0_output_lock(args.output_dir or args.output, flag):
            _embed(args, corpus)
    except OutputLocked as err:
        raise FlagError(str(err)) from err


def _embed(args: argparse.Namespace, corpus: JsonlCorpus) -> None:
    import torch.distributed as dist

    try:
        embedder = load_embedder(args.load, **embedder_kwargs(args))
    except (FileNotFoundError, ValueError) as err:
        raise FlagError(f"--load: {err}") from err
    folder = Path(args.output_dir or args.output + ".shards")
    _check_space(args, len(corpus), int(embedder.dim), folder)
    try:
        shards = encode_corpus(
            embedder,
            corpus,
            folder,
            shard_size=args.shard_size,
            instruction=None,  # each line's own
            on_mismatch="error" if args.output_dir else "clear",
        )
    except ValueError as err:
        raise FlagError(f"{'--output-dir' if args.output_dir else '--output'}: {err}") from err
    if embedder.is_main:
        if args.output:
            try:
                write_single_array(shards, args.output)
            except ValueError as err:  # a shard damaged since it was verified
                raise FlagError(f"--output: {err}") from err
        st = embedder.last_encode
        print(
            f"embedded {st.rows} texts ({st.computed_rows} computed now, "
            f"{st.passages_per_second:.1f} texts/s over {embedder.dp_size} data-parallel "
            f"ranks); {embedder.stats.truncated} truncated to {args.max_length} tokens on rank 0; "
            f"wrote {args.output or args.output_dir}"
        )
    if dist.is_initialized():
        dist.barrier()  # every rank is done with the shards (each opened them in encode_corpus)
    if embedder.is_main and args.output:
        shutil.rmtree(folder)
