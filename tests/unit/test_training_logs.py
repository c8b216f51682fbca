"""Watching a run, the pure parts: the score margins of validation (hand-computed, from the score
matrix and from a top-k search), the record -> scalar tags every sink writes, the iteration
line's new fields, the new flags and their errors, and the missing-package error of a sink.

Run alone: python3 -m pytest -q -n 0 tests/unit/test_training_logs.py
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from megatron_nvembed.evaluation.metrics import score_margins
from megatron_nvembed.evaluation.retrieval_eval import evaluate_embeddings
from megatron_nvembed.training.arguments import parse_args
from megatron_nvembed.training.sinks import Sinks, require_sink_packages, scalars


def test_score_margins_hand_computed():
    # q1: relevant d1, d2 (mean 0.7); negatives d3 0.5, d4 0.1 -> hardest 0.2, mean 0.4.
    # q2: relevant d3 (0.2); negatives 0.9, 0.3, 0.1 -> hardest -0.7, mean 0.2 - 1.3 / 3.
    # q3: no relevant document (judged 0 only) -> left out.
    scores = np.array([[0.9, 0.5, 0.5, 0.1], [0.9, 0.3, 0.2, 0.1], [1.0, 0.0, 0.0, 0.0]])
    qrels = {"q1": {"d1": 1, "d2": 2}, "q2": {"d3": 1, "d1": 0}, "q3": {"d1": 0}}
    # d2 scores 0.5 for q1: relevant, so not a negative.
    got = score_margins(scores, ["q1", "q2", "q3"], ["d1", "d2", "d3", "d4"], qrels)
    assert got["score_margin_hardest"] == pytest.approx(((0.7 - 0.5) + (0.2 - 0.9)) / 2)
    assert got["score_margin_mean"] == pytest.approx(((0.7 - 0.3) + (0.2 - 1.3 / 3)) / 2)
    # validation's path: a top-k search over embeddings whose dot products are `scores`
    # (query i = unit vector i, document j = column j), no score matrix: the same (1e-6)
    found = evaluate_embeddings(
        np.eye(3, dtype=np.float32),
        scores.T.astype(np.float32),
        ["q1", "q2", "q3"],
        qrels,
        corpus_ids=["d1", "d2", "d3", "d4"],
        ks=(1,),
    )
    for key, value in got.items():
        assert found[key] == pytest.approx(value, abs=1e-6), key


def test_scalars_are_the_records_numbers_by_json_key():
    record = {
        "iteration": 7,
        "loss": float("nan"),
        "lr": 1e-3,
        "grad_norm": None,
        "peak_memory_kind": "process_max_rss",
        "in_batch_pool_queries": 16,
        "flag": True,
    }
    got = scalars(record)
    assert set(got) == {"loss", "lr", "in_batch_pool_queries"}
    assert got["loss"] != got["loss"] and got["in_batch_pool_queries"] == 16.0
    nested = scalars({"iteration": 2, "eval": {"set": {"ndcg_at_10": 0.5, "num_queries": 4}}})
    assert nested == {"eval/set/ndcg_at_10": 0.5, "eval/set/num_queries": 4.0}


def test_sinks_get_the_same_record_and_all_close():
    class Recorder:
        def __init__(self):
            self.seen, self.closed = [], False

        def write(self, record, step):
            self.seen.append((record, step))

        def close(self):
            self.closed = True

    a, b = Recorder(), Recorder()
    sinks = Sinks([a, b])
    sinks.write({"iteration": 3, "loss": 1.0}, 3)
    sinks.close()
    assert a.seen == b.seen == [({"iteration": 3, "loss": 1.0}, 3)]
    assert a.closed and b.closed


def test_log_line_has_consumed_samples_elapsed_and_eta():
    from megatron_nvembed.training.metrics import log_line

    cfg = parse_args(["--recipe", "tiny", "--train-data", "a.jsonl", "--train-iters", "100"])
    record = {
        "iteration": 40,
        "loss": 2.5,
        "lr": 1e-3,
        "grad_norm": 1.5,
        "tokens_per_s": 1000.0,
        "padded_tokens_per_s": 1500.0,
        "sequences_per_s": 10.0,
        "iteration_time_s": 0.5,
        "tflops": 0.01,
        "mfu": None,
        "peak_memory_gib": 0.4,
        "skipped_iterations": 0,
        "consumed_samples": 40 * cfg.data.global_batch_size,
        "elapsed_s": 3725.4,
        "eta_s": 30.0,
    }
    line = log_line(record, None, cfg)
    assert f"consumed samples {40 * cfg.data.global_batch_size}" in line
    assert "elapsed 1:02:05" in line and "ETA 0:00:30" in line


def test_new_flags_reach_the_config():
    cfg = parse_args(
        [
            "--train-data",
            "a.jsonl",
            "--tensorboard-dir",
            "tb",
            "--wandb-project",
            "p",
            "--wandb-exp-name",
            "e",
            "--wandb-save-dir",
            "w",
            "--exit-interval",
            "5",
            "--exit-duration-in-mins",
            "1.5",
            "--eval-interval",
            "2",
            "--eval-data",
            "beir",
            "--eval-iters",
            "3",
        ]
    )
    assert (cfg.logging.tensorboard_dir, cfg.logging.wandb_project, cfg.logging.wandb_exp_name) == (
        "tb",
        "p",
        "e",
    )
    assert (
        cfg.logging.wandb_save_dir,
        cfg.checkpoint.exit_interval,
        cfg.checkpoint.exit_duration_in_mins,
    ) == ("w", 5, 1.5)
    assert cfg.evaluation.eval_iters == 3


@pytest.mark.parametrize(
    "extra, flag",
    [
        (["--exit-interval", "0"], "--exit-interval"),
        (["--exit-duration-in-mins", "0"], "--exit-duration-in-mins"),
        (["--eval-iters", "2"], "--eval-iters"),
        (["--wandb-exp-name", "e"], "--wandb-exp-name"),
        (["--wandb-save-dir", "w"], "--wandb-save-dir"),
    ],
)
def test_bad_monitoring_flags_name_the_flag(extra, flag):
    with pytest.raises(ValueError, match=flag):
        parse_args(["--train-data", "a.jsonl", *extra])


@pytest.mark.parametrize(
    "flag, package", [("--tensorboard-dir", "tensorboard"), ("--wandb-project", "wandb")]
)
def test_missing_sink_package_names_the_flag_and_extra(monkeypatch, flag, package):
    cfg = parse_args(["--train-data", "a.jsonl", flag, "x"])
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a)
    )
    with pytest.raises(ValueError, match=rf"{flag} needs the {package} package.*\[{package}\]"):
        require_sink_packages(cfg.logging)
