"""Watching a run, end to end at DP=2 under gloo: TensorBoard event files and an offline W&B run
hold the JSON log's values, the iteration line and record carry consumed samples / elapsed /
ETA, `--eval-iters` bounds the validation's query batches, `--exit-interval` and
`--exit-duration-in-mins` save and stop cleanly.

One module fixture starts one group of 2 processes and runs every scenario in it (importing
megatron-core dominates a process's cost); each test asserts on its scenario's files. W&B runs
with WANDB_MODE=offline (no network).

Run alone: python3 -m pytest -q -n 0 tests/distributed/test_training_monitoring.py
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
from pathlib import Path

import pytest
import torch

from megatron_nvembed.testing import (
    run_distributed,
    tiny_training_config,
    write_synthetic_retrieval,
)

pytest.importorskip("tensorboard")
pytest.importorskip("wandb")

_GLOBAL_BATCH = 8  # tiny_training_config's


def _sinks_worker(rank, world, data, tmp):
    from megatron_nvembed.training import validation
    from megatron_nvembed.training.trainer import train

    tmp = Path(tmp)
    for key, value in {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_CONSOLE": "off",
        "WANDB_CONFIG_DIR": str(tmp / "wandb_config"),
        "WANDB_CACHE_DIR": str(tmp / "wandb_cache"),
        "WANDB_DATA_DIR": str(tmp / "wandb_data"),
    }.items():
        os.environ[key] = value
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, rec):
            lines.append(rec.getMessage())

    trainer_log = logging.getLogger("megatron_nvembed.training")  # the loop and its log
    trainer_log.setLevel(logging.INFO)
    trainer_log.addHandler(Collect())
    batches: list[int] = []  # batches per embedding call: queries, corpus, per validation
    real_embed = validation.embed_microbatches

    def counting(model, microbatches, pg):
        batches.append(len(microbatches))
        return real_embed(model, microbatches, pg)

    validation.embed_microbatches = counting
    try:
        result = train(
            tiny_training_config(
                data,
                train_iters=4,
                eval_interval=2,
                eval_data=[data["eval"]],
                eval_instruction=data["instruction"],
                eval_batch_size=4,
                eval_iters=1,
                log_json=str(tmp / "log.jsonl"),
                tensorboard_dir=str(tmp / "tb"),
                wandb_project="nvembed-test",
                wandb_exp_name="sinks",
                wandb_save_dir=str(tmp / "wandb"),
            )
        )
    finally:
        validation.embed_microbatches = real_embed
    if rank == 0:  # global rank 0 prints the iteration lines
        (tmp / "out.json").write_text(
            json.dumps(
                {
                    "lines": [x for x in lines if x.startswith("iteration ")],
                    "batches": batches,
                    "exit_reason": result.exit_reason,
                }
            )
        )


def _exit_worker(rank, world, data, tmp):
    from megatron_nvembed.training.trainer import train

    tmp = Path(tmp)
    out = {}
    by_interval = train(
        tiny_training_config(data, train_iters=6, exit_interval=3, save=str(tmp / "interval"))
    )
    out["interval"] = [by_interval.iteration, by_interval.exit_reason, sorted(by_interval.losses)]
    by_time = train(
        tiny_training_config(
            data, train_iters=6, exit_duration_in_mins=0.0001, save=str(tmp / "duration")
        )
    )
    out["duration"] = [by_time.iteration, by_time.exit_reason, sorted(by_time.losses)]
    if rank == 0:
        (tmp / "out.json").write_text(json.dumps(out))


_WORKERS = ("_sinks_worker", "_exit_worker")


def _run_workers(rank, world, data, tmp):
    for name in _WORKERS:
        folder = Path(tmp) / name
        folder.mkdir(parents=True, exist_ok=True)
        globals()[name](rank, world, data, str(folder))
        torch.distributed.barrier()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    data = write_synthetic_retrieval(
        tmp_path_factory.mktemp("syn"), num_topics=8, train_per_topic=12
    )
    root = tmp_path_factory.mktemp("monitoring")
    run_distributed(_run_workers, 2, data, str(root))
    return {name: root / name for name in _WORKERS}


def _records(folder: Path) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(x) for x in (folder / "log.jsonl").read_text().splitlines()]
    return [r for r in rows if "eval" not in r], [r for r in rows if "eval" in r]


def _expected_scalars(folder: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} from the JSON log, by the sinks' naming rule."""
    from megatron_nvembed.training.sinks import scalars

    train_rows, eval_rows = _records(folder)
    out: dict[str, dict[int, float]] = {}
    for row in train_rows + eval_rows:
        for tag, value in scalars(row).items():
            out.setdefault(tag, {})[row["iteration"]] = value
    return out


def test_iteration_record_and_line_carry_samples_elapsed_and_eta(runs):
    """Every logged iteration (1-4, global batch 8): consumed_samples == iteration x 8,
    elapsed_s grows, eta_s == iteration_time_s x (train_iters - iteration) (0 at the end), and
    the printed line shows the same consumed samples, elapsed and ETA."""
    folder = runs["_sinks_worker"]
    train_rows, _ = _records(folder)
    assert [r["iteration"] for r in train_rows] == [1, 2, 3, 4]
    for r in train_rows:
        assert r["consumed_samples"] == r["iteration"] * _GLOBAL_BATCH
        assert r["eta_s"] == pytest.approx(r["iteration_time_s"] * (4 - r["iteration"]))
    elapsed = [r["elapsed_s"] for r in train_rows]
    assert all(b > a > 0 for a, b in zip(elapsed, elapsed[1:]))
    assert train_rows[-1]["eta_s"] == 0
    lines = json.loads((folder / "out.json").read_text())["lines"]
    assert len(lines) == 4
    for line, r in zip(lines, train_rows):
        assert line.startswith(f"iteration      {r['iteration']}/4 | consumed samples ")
        assert f" | consumed samples {r['consumed_samples']} | elapsed " in line
        assert " | ETA " in line
    assert " | ETA 0:00:00 | " in lines[-1]


def test_eval_iters_bounds_validation_and_margins_are_logged(runs):
    """--eval-iters 1 with --eval-batch-size 4: each validation (iterations 2 and 4) embeds one
    batch of 4 queries (of the set's 16) and the whole 16-document corpus (4 batches); the
    record reports 4 queries, recall@1 and both score margins (hardest <= mean: the hardest
    negative scores at least the mean negative)."""
    folder = runs["_sinks_worker"]
    out = json.loads((folder / "out.json").read_text())
    assert out["batches"] == [1, 4, 1, 4]
    _, eval_rows = _records(folder)
    assert [r["iteration"] for r in eval_rows] == [2, 4]
    for row in eval_rows:
        m = row["eval"]["eval"]
        assert m["num_queries"] == 4
        assert 0.0 <= m["recall_at_1"] <= m["recall_at_10"] <= 1.0
        assert m["score_margin_hardest"] <= m["score_margin_mean"]


def test_tensorboard_holds_the_json_logs_scalars(runs):
    """Read back with TensorBoard's EventAccumulator: every scalar of the JSON log (training and
    validation records) is there under its JSON key at its iteration, equal within float32
    precision (TensorBoard stores float32: 1e-6 relative)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder = runs["_sinks_worker"]
    expected = _expected_scalars(folder)
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "tflops", "peak_memory_gib"} <= set(expected)
    assert {"consumed_samples", "elapsed_s", "eta_s", "in_batch_pool_queries"} <= set(expected)
    assert "eval/eval/ndcg_at_10" in expected and "eval/eval/score_margin_hardest" in expected
    acc = EventAccumulator(str(folder / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == set(expected)
    for tag, by_step in expected.items():
        got = {e.step: e.value for e in acc.Scalars(tag)}
        assert sorted(got) == sorted(by_step), tag
        for step, value in by_step.items():
            assert got[step] == pytest.approx(value, rel=1e-6, abs=1e-30), (tag, step)


def _wandb_records(path: Path):
    """The protobuf records of a `.wandb` file (W&B's LevelDB-log framing: a 7-byte file header,
    32 KiB blocks, each chunk a 7-byte header crc32 / length / type)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending, out = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk  # full / first | middle / last
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(pending)
            out.append(rec)
    return out


def test_wandb_offline_run_holds_the_json_logs_scalars(runs):
    """WANDB_MODE=offline: the run folder under --wandb-save-dir has a `.wandb` file whose
    history rows, read with W&B's own protobuf records, hold every scalar of the JSON log under
    its JSON key at its iteration (exact: W&B keeps float64), with the run name given."""
    folder = runs["_sinks_worker"]
    runs_found = list((folder / "wandb" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs_found) == 1
    records = _wandb_records(runs_found[0])
    names = [r.run.display_name for r in records if r.WhichOneof("record_type") == "run"]
    assert "sinks" in names
    history: dict[str, dict[int, float]] = {}
    for rec in records:
        if rec.WhichOneof("record_type") != "history":
            continue
        step = rec.history.step.num
        for item in rec.history.item:
            key = item.key or "/".join(item.nested_key)
            if key.startswith("_"):
                continue  # W&B's own (_step, _runtime, _timestamp)
            history.setdefault(key, {})[step] = json.loads(item.value_json)
    expected = _expected_scalars(folder)
    assert set(history) == set(expected)
    for tag, by_step in expected.items():
        assert sorted(history[tag]) == sorted(by_step), tag
        for step, value in by_step.items():
            got = float(history[tag][step])
            assert got == value or (math.isnan(got) and math.isnan(value)), (tag, step)


def test_exit_interval_and_exit_duration_save_and_stop(runs):
    """--exit-interval 3 (of 6 iterations) stops after iteration 3 with exit_reason
    "exit_interval" and a checkpoint at 3 (the tracker names it); --exit-duration-in-mins 0.0001
    is already exceeded at the first check, so the run stops after iteration 1 with
    "exit_duration" and a checkpoint at 1. Both return normally on both ranks (the spawned
    processes exit 0, or the fixture would raise)."""
    folder = runs["_exit_worker"]
    out = json.loads((folder / "out.json").read_text())
    assert out["interval"] == [3, "exit_interval", [1, 2, 3]]
    assert (folder / "interval" / "latest_checkpointed_iteration.txt").read_text() == "3"
    assert (folder / "interval" / "iter_0000003").is_dir()
    assert out["duration"] == [1, "exit_duration", [1]]
    assert (folder / "duration" / "latest_checkpointed_iteration.txt").read_text() == "1"
    assert (folder / "duration" / "iter_0000001").is_dir()
