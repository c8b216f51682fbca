"""`bench/train_step.py`: its batches, its layouts (the trainer's own settings) and its paired
run, in-process on CPU (fp32, one gloo process, TP = PP = DP = 1).

Proves:
- the synthetic micro-batches are the trainer's `EmbeddingBatch`: each kind right-padded to its
  longest text rounded up to 8 (pad512: to the cap), the instruction out of the pool mask,
  candidate ids hashed from the real tokens (equal whatever the padding);
- each layout is the trainer's `plan_micro_batch` with the trainer's settings: pad512 computes
  rows x cap in two calls, packed one call of exactly the real tokens (THD), buckets fewer
  positions than padded, which is the baseline's layout; a bucketed and packed run together is
  refused by `TrainingConfig.validate`;
- the paired ratio is the median of per-step ratios, not the ratio of medians;
- a whole run (`main`, 1 layer, 1 step, GradCache on and off) writes a report in which every
  implementation saw the same real tokens, ours and the baseline embed batch 0 alike within 1e-5
  (shared weights), and the losses are finite; `--compare-layouts` reports pad512 and packed
  alike within 1e-5.

Run alone: pytest tests/unit/test_bench_layouts.py
"""

import importlib.util
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench"
TOL = 1e-5  # fp32: the same function computed in another order


@pytest.fixture(scope="module")
def bench():
    # Loading train_step puts bench/ on sys.path: its helper modules import by name below.
    spec = importlib.util.spec_from_file_location("bench_train_step", BENCH / "train_step.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def shape(bench):
    from _step_impls import Shape

    return Shape(
        batch_size=3, negatives=2, micro_batches=2, query_len=(4, 10), passage_len=(6, 40),
        instruction_len=(1, 3), max_length=32, vocab_size=128, seed=0,
    )  # fmt: skip


def test_micro_batches_are_collated_as_the_trainer_does(bench, shape):
    from _step_impls import micro_batch, synthetic_texts

    step = synthetic_texts(shape, 0)
    assert len(step) == shape.micro_batches and step != synthetic_texts(shape, 1)
    queries, passages, cut = step[0]
    assert max(len(t) for t, _ in queries + passages) <= shape.max_length
    mb = micro_batch(queries, passages, cut, shape.max_length, to_cap=False)
    wide = micro_batch(queries, passages, cut, shape.max_length, to_cap=True)
    for part, texts in ((mb.query, queries), (mb.candidates, passages)):
        longest = max(len(t) for t, _ in texts)
        assert part["input_ids"].shape == (len(texts), min(-(-longest // 8) * 8, 32))
        assert part["attention_mask"].sum(1).tolist() == [len(t) for t, _ in texts]
    skip = [s for _, s in queries]
    assert (mb.query["attention_mask"].sum(1) - mb.query["pool_mask"].sum(1)).tolist() == skip
    assert wide.query["input_ids"].shape[1] == wide.candidates["input_ids"].shape[1] == 32
    ids = mb.loss_inputs.candidate_ids
    assert ids.shape == mb.loss_inputs.candidate_mask.shape == (3, 3)
    assert ids.equal(wide.loss_inputs.candidate_ids)  # hashes of the real tokens only


def test_layouts_are_the_trainers_plans(bench, shape):
    from _step_impls import LAYOUTS, layout_plan, micro_batch, synthetic_texts

    from megatron_nvembed.data.config import DataConfig
    from megatron_nvembed.training.config import TrainingConfig

    cfg = TrainingConfig(
        data=DataConfig(train_data=["synthetic"], seq_length=32, length_bucket_size=4)
    )
    queries, passages, cut = synthetic_texts(shape, 0)[0]
    real = sum(len(t) for t, _ in queries + passages)
    plans = {
        layout: layout_plan(cfg, cfg.model, layout, thd=True)(
            micro_batch(queries, passages, cut, 32, to_cap=layout == "pad512")
        )
        for layout in LAYOUTS
    }
    assert sum(plans["padded"].lengths) == sum(plans["packed"].lengths) == real
    pad512 = plans["pad512"]
    assert [c["input_ids"].shape for c in pad512.calls] == [(3, 32), (9, 32)]
    assert pad512.positions == 12 * 32
    assert len(plans["packed"].calls) == 1 and "segment_ids" in plans["packed"].calls[0]
    assert plans["packed"].positions == real  # THD: no padding computed
    assert len(plans["padded"].calls) == 2
    assert len(plans["buckets"].calls) > 2
    assert real <= plans["buckets"].positions < plans["padded"].positions < pad512.positions
    with pytest.raises(ValueError, match="pick one"):
        replace(cfg, data=replace(cfg.data, pack_sequences=True)).validate()


def test_paired_ratio_is_the_median_of_step_ratios(bench):
    # 100 tokens a step; a is twice as fast on steps 1 and 2, slower on a noisy step 3.
    a = [dict(tokens=100, seconds=s, cpu_seconds=s) for s in (1.0, 1.0, 4.0)]
    b = [dict(tokens=100, seconds=s, cpu_seconds=2 * s) for s in (2.0, 2.0, 2.0)]
    out = bench.compare(a, b, None, None)
    assert out["tokens_per_s_paired"] == 2.0  # ratios 2, 2, 0.5
    assert out["tokens_per_cpu_s_paired"] == 4.0
    assert out["parity_max_abs"] is None


def _run(bench, tmp_path, name, *flags):
    out = tmp_path / f"{name}.json"
    small = ["--preset", "tiny", "--layers", "1", "--batch-size", "2", "--negatives", "1"]
    small += ["--length-scale", "0.2", "--steps", "1", "--warmup", "0"]
    small += ["--threads", str(torch.get_num_threads())]  # main sets it for the process
    assert bench.main([*small, *flags, "--output", str(out)]) == 0
    assert out.with_suffix(".md").read_text().startswith(f"`{name}.json`")
    return json.loads(out.read_text())


def test_a_paired_run_reports_every_implementation_on_the_same_batches(bench, tmp_path):
    report = _run(bench, tmp_path, "paired")
    results = report["results"]
    assert set(results) == {"ours-gc-off", "ours-gc-on", "baseline"}
    assert len({r["real_tokens_per_step"] for r in results.values()}) == 1
    assert all(math.isfinite(x) for r in results.values() for x in r["losses"])
    assert results["ours-gc-on"]["grad_cache"] and results["ours-gc-off"]["layout"] == "buckets"
    assert set(report["ratios"]) == {"ours-gc-off / baseline", "ours-gc-on / baseline"}
    for ratio in report["ratios"].values():
        assert ratio["parity_max_abs"] <= TOL
        assert ratio["tokens_per_s_paired"] > 0

    layouts = _run(bench, tmp_path, "layouts", "--compare-layouts", "--grad-cache", "off")
    assert set(layouts["results"]) == {"pad512-gc-off", "packed-gc-off"}
    assert layouts["ratios"]["packed-gc-off / pad512-gc-off"]["parity_max_abs"] <= TOL
    assert layouts["results"]["packed-gc-off"]["padding_fraction"] == 0
