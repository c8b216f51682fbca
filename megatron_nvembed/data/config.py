"""`DataConfig`: what a training run reads and how it batches it (`--train-data` and friends)."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_nvembed.utils.options import check_options, option

BATCH_COMPOSITIONS = ("systematic", "multinomial", "homogeneous")
"""How datasets make up a global batch (`--batch-composition`; `data/blending.py`)."""


@dataclass
class DataConfig:
    """The training data, its tokenisation limits and the batch sizes."""

    train_data: list[str] = option(
        default_factory=list,
        flag="--train-data",
        help="paths, or weight/path pairs: 0.3 a.jsonl 0.7 b.jsonl (as Megatron's --data-path)",
    )
    tokenizer: str | None = option(
        None, "--tokenizer", "tokenizer directory (default: the checkpoint's)"
    )
    num_negatives: int = option(7, "--num-negatives", "hard negatives per query (K)", min=0)
    seq_length: int = option(512, "--seq-length", "token limit per text (right padding)", min=1)
    micro_batch_size: int = option(
        4, "--micro-batch-size", "queries per micro-batch per DP rank", min=1
    )
    global_batch_size: int = option(
        128, "--global-batch-size", "queries per optimizer step, all ranks", min=1
    )
    pack_sequences: bool = option(
        False,
        "--pack-sequences",
        "pack several texts per row (at most --seq-length tokens), each attending only to "
        "itself, so the backbone skips padding (THD layout on te / sdpa, a block mask on local)",
    )
    length_bucket_size: int = option(
        0,
        "--length-bucket-size",
        "rows per forward call when a micro-batch's texts are run in length-sorted buckets, each "
        "padded to its own longest text (0: queries in one call, candidates in another)",
        min=0,
    )
    skip_bad_records: bool = option(
        False,
        "--skip-bad-records",
        "skip (and count) malformed records instead of stopping at the first",
    )
    data_cache_path: str | None = option(
        None,
        "--data-cache-path",
        "folder for the JSONL training files' indexes, built once and reused until a file "
        "changes (default: beside each file; a read-only data folder: the system temporary "
        "folder, with a warning)",
    )
    batch_composition: str = option(
        "systematic",
        "--batch-composition",
        "systematic or multinomial (datasets blended in every global batch by weight), or "
        "homogeneous (each global batch from one dataset, drawn by weight)",
        choices=BATCH_COMPOSITIONS,
    )

    def validate(self) -> DataConfig:
        """Checks every field; returns self.

        Raises:
            ValueError: naming the flag.
        """
        check_options(self)
        if not self.train_data:
            raise ValueError("--train-data is required (paths, or weight/path pairs)")
        if self.length_bucket_size and self.pack_sequences:
            raise ValueError(
                "--length-bucket-size and --pack-sequences are two answers to padding; pick one "
                "(packing removes more of it)"
            )
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"--global-batch-size ({self.global_batch_size}) must be a multiple of "
                f"--micro-batch-size ({self.micro_batch_size})"
            )
        return self
