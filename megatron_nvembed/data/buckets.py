"""Length bucketing: which rows of a batch run together in one forward call, and how wide.

One routine for every place that groups texts by length: the trainer's `--length-bucket-size`
(training/step.py), the corpus / MTEB encoder and in-training validation (evaluation/encoder.py,
training/validation.py) and the benchmark (bench/train_step.py).
"""

from __future__ import annotations


def length_grouped_batches(
    lengths: list[int], batch_size: int, max_tokens: int | None = None
) -> list[list[int]]:
    """Indices sorted by length, cut into batches of at most `batch_size` rows and, with
    `max_tokens`, at most `max_tokens` padded tokens (rows x the batch's longest row; a row
    longer than the budget goes alone).

    Without a budget the order is ascending (stable) and every batch but the last is full; with
    one it is descending, so the longest (most memory-hungry) batch runs first.

    Raises:
        ValueError: `batch_size` or `max_tokens` below 1.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_tokens is None:
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        width = max(longest, lengths[i])
        if current and (len(current) >= batch_size or (len(current) + 1) * width > max_tokens):
            batches.append(current)
            current, width = [], lengths[i]
        current.append(i)
        longest = width
    if current:
        batches.append(current)
    return batches


def bucket_width(longest: int, multiple: int, cap: int) -> int:
    """A bucket's padded width: its longest row rounded up to `multiple`, at most `cap`, >= 1."""
    return min(-(-max(longest, 1) // multiple) * multiple, cap)
