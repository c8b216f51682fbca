"""Training loop on CPU under gloo: exact resume, resharded resume, stage hand-off, LoRA keeps the
base frozen, non-finite steps, interrupted saves.

Two module fixtures start one group of processes each (2 gloo processes for the DP scenarios,
1 for the others) and run every scenario inside it, calling `train()` many times (importing
megatron-core dominates the cost of a process); each test then asserts on its scenario's files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from megatron_nvembed.testing import (
    run_distributed,
    tiny_training_config,
    write_synthetic_retrieval,
)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return write_synthetic_retrieval(
        tmp_path_factory.mktemp("syn"), num_topics=8, train_per_topic=12
    )


_cfg = tiny_training_config


def _set_tracker(root: Path, iteration: int) -> None:
    (root / "latest_checkpointed_iteration.txt").write_text(str(iteration))


def _load_state(root):
    """{name: tensor} of a checkpoint loaded at TP = PP = 1 (adapters kept unmerged)."""
    from megatron_nvembed.checkpoint.store import load_checkpoint, read_config, read_lora
    from megatron_nvembed.core.config import ParallelConfig
    from megatron_nvembed.model.build import build_model
    from megatron_nvembed.model.lora import apply_lora

    cfg = read_config(root)
    cfg.parallel = ParallelConfig(1, 1)
    model = build_model(cfg)
    lora = read_lora(root)
    if lora is not None:
        apply_lora(model, lora["rank"], lora["alpha"], 0.0)
    load_checkpoint(model, root, merge_adapters=False)
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "extra_state" not in k}


def _resume_worker(rank, world, data, tmp):
    from megatron_nvembed.training.trainer import train

    tmp = Path(tmp)
    # Initial weights: a short from-scratch run (full fine-tuning).
    base = train(_cfg(data, train_iters=2, save=str(tmp / "base")))
    assert base.iteration == 2
    lora_cfg = dict(
        pretrained_checkpoint=str(tmp / "base"),
        **{
            "lora.rank": 4,
            "lora.alpha": 8.0,
            "lora.dropout": 0.1,
            "model.model.hidden_dropout": 0.1,
        },
    )
    straight = train(_cfg(data, save=str(tmp / "straight"), save_interval=3, **lora_cfg))
    # Resume from the iteration-3 checkpoint of a copy of the run.
    if rank == 0:
        shutil.copytree(tmp / "straight", tmp / "resumed")
        shutil.rmtree(tmp / "resumed" / "iter_0000006")
        _set_tracker(tmp / "resumed", 3)
    torch.distributed.barrier()
    resumed = train(
        _cfg(
            data, save=str(tmp / "resumed"), load=str(tmp / "resumed"), save_interval=3, **lora_cfg
        )
    )
    base_state = _load_state(tmp / "base")  # collective: every rank loads
    final_state = _load_state(tmp / "straight")
    if rank == 0:
        (tmp / "losses.json").write_text(
            json.dumps(
                {
                    "straight": straight.losses,
                    "resumed": resumed.losses,
                }
            )
        )
        frozen_same, head_move, lora_b = True, float("inf"), 0.0
        for name, value in final_state.items():
            if name.startswith("pooling."):  # the least-moved tensor, relative to its size
                change = (value - base_state[name]).abs().max()
                head_move = min(head_move, float(change / value.abs().max().clamp(min=1e-30)))
            elif ".lora_B" in name:  # zero at the start
                lora_b = max(lora_b, float(value.abs().max()))
            elif ".lora_A" not in name:
                key = name.replace(".base.", ".")
                frozen_same &= torch.equal(value, base_state[key])
        (tmp / "lora.json").write_text(
            json.dumps({"frozen_same": frozen_same, "head_move": head_move, "lora_b": lora_b})
        )


def test_resume_at_n_logs_the_same_losses_and_lora_keeps_the_base_frozen(runs_2):
    """DP=2, LoRA with dropout, GradCache: a 6-iteration run resumed at 3 logs the same losses
    for iterations 4-6 (model, optimizer, scheduler, RNG, data position restored; exact up to
    1e-6 relative, observed bit-identical), and after training only the adapters and the pooling
    head moved (adapters' B from zero to > 1e-3, every head tensor by > 1e-4 of its size; the
    frozen base is bit-identical)."""
    tmp_path = runs_2["_resume_worker"]
    losses = json.loads((tmp_path / "losses.json").read_text())
    straight = {int(k): v for k, v in losses["straight"].items()}
    resumed = {int(k): v for k, v in losses["resumed"].items()}
    assert sorted(resumed) == [4, 5, 6]
    for it in (4, 5, 6):
        assert resumed[it] == pytest.approx(straight[it], rel=1e-6, abs=0)
    flags = json.loads((tmp_path / "lora.json").read_text())
    assert flags["frozen_same"]
    # Adam moves each trained weight by about the learning rate (2e-3 at the peak) per step, so 6
    # steps move every head tensor by >~1e-3 of its size and the adapters' B (zero at the start)
    # to ~1e-2: thresholds 10x below that and far above float noise (~1e-7).
    assert flags["head_move"] > 1e-4, flags
    assert flags["lora_b"] > 1e-3, flags


def _reshard_worker(rank, world, data, tmp):
    from megatron_nvembed.training.trainer import train

    tmp = Path(tmp)
    # Straight DP=2 run saving at 3 and 6; its iteration-3 checkpoint is then resumed at other
    # layouts (each train() call builds its own process groups).
    straight = train(_cfg(data, save=str(tmp / "dp2"), save_interval=3))
    if rank == 0:
        shutil.rmtree(tmp / "dp2" / "iter_0000006")
        _set_tracker(tmp / "dp2", 3)
    out = {"straight": straight.losses}
    for tp, pp in ((2, 1), (1, 2)):
        target = tmp / f"tp{tp}pp{pp}"
        if rank == 0:
            shutil.copytree(tmp / "dp2", target)
        torch.distributed.barrier()
        resumed = train(
            _cfg(
                data,
                save=str(target),
                load=str(target),
                save_interval=3,
                **{
                    "model.parallel.tensor_model_parallel_size": tp,
                    "model.parallel.pipeline_model_parallel_size": pp,
                },
            )
        )
        out[f"tp{tp}pp{pp}"] = resumed.losses
    if rank == world - 1:
        (tmp / "reshard.json").write_text(json.dumps(out))


def test_resume_at_another_tp_pp_dp_layout(runs_2):
    """A checkpoint saved at DP=2 (distributed optimizer) resumes at TP=2 x DP=1 and at PP=2 x
    DP=1: model and optimizer state reshard, the data position carries over, and (no dropout)
    the losses of iterations 4-6 match the straight DP=2 run within 1e-4 relative (reduction
    order differs between layouts)."""
    tmp_path = runs_2["_reshard_worker"]
    out = json.loads((tmp_path / "reshard.json").read_text())
    straight = {int(k): v for k, v in out["straight"].items()}
    for layout in ("tp2pp1", "tp1pp2"):
        got = {int(k): v for k, v in out[layout].items()}
        assert sorted(got) == [4, 5, 6], layout
        for it in (4, 5, 6):
            assert got[it] == pytest.approx(straight[it], rel=1e-4), (layout, it)


def _handoff_worker(rank, world, data, tmp):
    from megatron_nvembed.checkpoint.store import load_checkpoint, read_config
    from megatron_nvembed.core.parallel import initialize_model_parallel
    from megatron_nvembed.model.build import build_model
    from megatron_nvembed.training.recipes import get_recipe
    from megatron_nvembed.training.setup import build_model as build_training_model
    from megatron_nvembed.training.start import model_config, resolve_start
    from megatron_nvembed.training.trainer import train

    tmp = Path(tmp)
    stage1 = _cfg(data, save=str(tmp / "stage1"), **{"lora.rank": 4, "lora.alpha": 8.0})
    train(stage1)
    stage2 = get_recipe("tiny", 2)
    stage2.data.train_data = [data["train_pairs"]]
    stage2.checkpoint.pretrained_checkpoint = str(tmp / "stage1")
    stage2.data.global_batch_size, stage2.data.micro_batch_size = 8, 2
    stage2.optimizer.train_iters, stage2.optimizer.lr_warmup_iters, stage2.logging.log_interval = (
        3,
        1,
        1,
    )
    stage2.checkpoint.save = str(tmp / "stage2")
    stage2.logging.log_json = str(tmp / "stage2.jsonl")
    # The stage-2 model as training starts == the stage-1 result with its adapters merged.
    start = resolve_start(stage2)
    model_cfg = model_config(stage2, start)
    pg = initialize_model_parallel(1, 1, seed=stage2.seed)
    fresh = build_training_model(stage2, model_cfg, pg, start)
    # the adapters the model carries, observed: the rank of every lora_A ([r, in])
    lora = {"ranks": sorted({p.shape[0] for n, p in fresh.named_parameters() if "lora_A" in n})}
    merged = build_model(read_config(tmp / "stage1"), pg)
    load_checkpoint(merged, tmp / "stage1")
    ids = torch.randint(3, 50, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    fresh.eval()
    merged.eval()
    with torch.no_grad():
        diff = float((fresh(ids, mask) - merged(ids, mask)).abs().max())
    result = train(stage2)
    if rank == 0:
        (tmp / "handoff.json").write_text(
            json.dumps(
                {
                    "diff": diff,
                    "lora": lora,
                    "iteration": result.iteration,
                }
            )
        )


def test_stage1_to_stage2_handoff(runs_2):
    """Stage 2 starts from the stage-1 weights with the stage-1 adapters merged (embeddings equal
    within 1e-6), trains new adapters, and scores each query against its own 1 + K candidates
    only (in-batch negatives off: candidates per query == 1 + K in the log)."""
    tmp_path = runs_2["_handoff_worker"]
    out = json.loads((tmp_path / "handoff.json").read_text())
    assert out["diff"] < 1e-6
    assert out["lora"]["ranks"] == [8] and out["iteration"] == 3
    records = [json.loads(line) for line in (tmp_path / "stage2.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2, 3]
    # train_pairs records carry one hard negative: K = 3 slots, 1 present -> 2 candidates.
    assert all(r["candidates_per_query"] == 2.0 for r in records)
    assert all(r["in_batch_pool_queries"] == 0 for r in records)


def _guard_worker(rank, world, data, tmp):
    from megatron_nvembed.loss import contrastive
    from megatron_nvembed.training import checkpointing
    from megatron_nvembed.training.trainer import train

    tmp = Path(tmp)
    original = contrastive.ContrastiveLoss.forward
    calls = {"n": 0}

    def nan_on_some_calls(self, *args, **kwargs):
        calls["n"] += 1
        loss = original(self, *args, **kwargs)
        return loss * float("nan") if calls["n"] in (2, 3) else loss

    contrastive.ContrastiveLoss.forward = nan_on_some_calls
    try:
        # One schedule (--lr-decay-iters 6) for this run and the resumes below, which go to 6.
        result = train(_cfg(data, train_iters=5, lr_decay_iters=6, save=str(tmp / "guard")))
    finally:
        contrastive.ContrastiveLoss.forward = original
    out = {"skipped": result.skipped, "losses": result.losses}
    # Too many in a row: abort with an error naming the flag.
    contrastive.ContrastiveLoss.forward = lambda self, *a, **k: (
        original(self, *a, **k) * float("nan")
    )
    try:
        train(_cfg(data, train_iters=5, max_nonfinite_steps=2))
        out["abort"] = None
    except RuntimeError as err:
        out["abort"] = str(err)
    finally:
        contrastive.ContrastiveLoss.forward = original
    # A save that fails midway is never what --load picks.
    real_save = checkpointing.save_checkpoint

    def failing_save(*args, write_files=None, **kwargs):
        def broken(tmp_dir):
            raise OSError("disk full (simulated)")

        return real_save(*args, write_files=broken, **kwargs)

    checkpointing.save_checkpoint = failing_save
    from megatron_nvembed.checkpoint.store import CheckpointSaveError

    try:
        train(
            _cfg(
                data,
                train_iters=6,
                lr_decay_iters=6,
                save=str(tmp / "guard"),
                load=str(tmp / "guard"),
            )
        )
        out["save_error"] = None
    except CheckpointSaveError as err:
        out["save_error"] = str(err)
    finally:
        checkpointing.save_checkpoint = real_save
    out["tracker"] = (tmp / "guard" / "latest_checkpointed_iteration.txt").read_text()
    resumed = train(
        _cfg(
            data, train_iters=6, lr_decay_iters=6, save=str(tmp / "guard"), load=str(tmp / "guard")
        )
    )
    out["resumed_from"] = min(resumed.losses)
    (tmp / "guard.json").write_text(json.dumps(out))


def test_nonfinite_steps_are_skipped_then_abort_and_interrupted_save_is_not_loaded(runs_1):
    """Non-finite losses skip their steps (counted, NaN logged) and N in a row abort with an
    error naming --max-nonfinite-steps; a save that fails midway leaves the tracker on the
    previous checkpoint, which is what the next run resumes from."""
    tmp_path = runs_1["_guard_worker"]
    out = json.loads((tmp_path / "guard.json").read_text())
    assert out["skipped"] == 2
    losses = {int(k): v for k, v in out["losses"].items()}
    assert [k for k, v in losses.items() if v != v] == [2, 3]
    assert "--max-nonfinite-steps 2" in out["abort"]
    assert "simulated" in out["save_error"]
    assert out["tracker"] == "5"
    assert out["resumed_from"] == 6


def _grad_cache_switch_worker(rank, world, data, tmp):
    from megatron_nvembed.training.trainer import train

    tmp = Path(tmp)
    out = {}
    # One micro-batch per rank: the direct path's pool is the whole global batch too.
    for name, grad_cache, mbs in (("gc", True, 4), ("direct", False, 4), ("direct_mb2", False, 2)):
        log = tmp / f"{name}.jsonl"
        result = train(
            _cfg(
                data, train_iters=3, grad_cache=grad_cache, micro_batch_size=mbs, log_json=str(log)
            )
        )
        out[name] = {
            "losses": result.losses,
            # Global rank 0 writes the JSON log (complete once its train() returned).
            "pool": [json.loads(x)["in_batch_pool_queries"] for x in log.read_text().splitlines()]
            if rank == 0
            else [],
        }
    # Every optional loss term on (no dropout: the two paths then compute the same thing).
    objectives = {
        "matryoshka_dims": [64, 32, 16],
        "matryoshka_weights": [1.0, 0.5, 0.25],
        "query_query_negatives": True,
        "document_document_negatives": True,
        "lora.dropout": 0.0,
        "model.model.hidden_dropout": 0.0,
        "model.model.attention_dropout": 0.0,
    }
    # ... and distillation: the records carry teacher scores (seeded, one per text)
    g = torch.Generator().manual_seed(5)
    scored = tmp / f"scored_rank{rank}.jsonl"
    lines = []
    for line in Path(data["train"]).read_text().splitlines():
        rec = json.loads(line)
        rec["pos_scores"] = (torch.randn(len(rec["pos"]), generator=g) * 4).tolist()
        rec["neg_scores"] = (torch.randn(len(rec["neg"]), generator=g) * 4).tolist()
        lines.append(json.dumps(rec))
    scored.write_text("\n".join(lines) + "\n")
    objectives |= {"train_data": [str(scored)], "distill_weight": 0.5, "distill_temperature": 2.0}
    for name, grad_cache, mbs in (("obj_gc_mb2", True, 2), ("obj_direct", False, 4)):
        cfg = _cfg(data, train_iters=3, grad_cache=grad_cache, micro_batch_size=mbs, **objectives)
        out[name] = {"losses": train(cfg).losses}
    try:  # distillation without teacher scores in the data is refused before the model
        train(_cfg(data, train_iters=2, distill_weight=0.5))
        out["unscored"] = "accepted"
    except ValueError as err:
        out["unscored"] = str(err)
    if rank == 0:  # the rank that read the logs
        (tmp / "switch.json").write_text(json.dumps(out))


def test_grad_cache_switch(runs_2):
    """DP=2, global batch 8. With one micro-batch per rank, GradCache and the direct path train
    identically (losses equal within 1e-5 relative over 3 steps: the same pool, the same
    gradients). With the direct path and 2 micro-batches per rank the in-batch pool is one
    micro-batch per rank x 2 ranks = 4 queries, as the log reports; GradCache's is all 8."""
    tmp_path = runs_2["_grad_cache_switch_worker"]
    out = json.loads((tmp_path / "switch.json").read_text())
    for it in ("1", "2", "3"):
        assert out["direct"]["losses"][it] == pytest.approx(out["gc"]["losses"][it], rel=1e-5)
    assert out["gc"]["pool"] == [8, 8, 8]
    assert out["direct"]["pool"] == [8, 8, 8]
    assert out["direct_mb2"]["pool"] == [4, 4, 4]


def test_loss_objectives_train_alike_with_and_without_grad_cache(runs_2):
    """DP=2, Matryoshka widths 64/32/16, query-query and document-document negatives,
    distillation towards the records' teacher scores, no dropout: GradCache over 2 micro-batches
    per rank (queries, their hashes and teacher scores taken from both micro-batches) trains as
    the direct path with one micro-batch per rank (losses equal within 1e-5 relative over 3
    steps), and the objectives change the loss. --distill-weight on data without teacher scores
    is refused, naming the flag."""
    out = json.loads((runs_2["_grad_cache_switch_worker"] / "switch.json").read_text())
    for it in ("1", "2", "3"):
        assert out["obj_gc_mb2"]["losses"][it] == pytest.approx(
            out["obj_direct"]["losses"][it], rel=1e-5
        )
    # the objectives add weighted terms of the order of the loss itself (widths 32 and 16 at
    # 0.5 and 0.25, two more negative kinds, distillation), far above float noise
    assert abs(out["obj_direct"]["losses"]["1"] - out["direct"]["losses"]["1"]) > 1e-3
    assert out["unscored"].startswith("--distill-weight 0.5: no record of --train-data")


def _recompute_worker(rank, world, data, tmp):
    from megatron_nvembed.training.trainer import train

    out = {}
    for name in ("none", "full", "selective"):
        granularity = None if name == "none" else name
        result = train(
            _cfg(
                data,
                train_iters=2,
                grad_cache=False,
                **{"model.model.recompute_granularity": granularity},
            )
        )
        out[name] = result.losses
    (Path(tmp) / "recompute.json").write_text(json.dumps(out))


def test_activation_recompute_leaves_training_unchanged(runs_1):
    """--recompute-granularity full and selective train exactly as without recompute (losses of
    2 steps equal within 1e-6 relative; the second step depends on the first step's gradients)."""
    tmp_path = runs_1["_recompute_worker"]
    out = json.loads((tmp_path / "recompute.json").read_text())
    for name in ("full", "selective"):
        for it in ("1", "2"):
            assert out[name][it] == pytest.approx(out["none"][it], rel=1e-6), name


def _validation_worker(rank, world, data, tmp):
    from megatron_nvembed.checkpoint.store import load_checkpoint, read_config
    from megatron_nvembed.core.parallel import initialize_model_parallel
    from megatron_nvembed.data.tokenization import load_tokenizer, tokenize_for_embedding
    from megatron_nvembed.evaluation.beir import load_beir
    from megatron_nvembed.evaluation.metrics import retrieval_metrics
    from megatron_nvembed.model.build import build_model
    from megatron_nvembed.training.trainer import train

    tmp = Path(tmp)
    cfg = _cfg(
        data,
        train_iters=4,
        eval_interval=2,
        eval_data=[data["eval"]],
        eval_instruction=data["instruction"],
        save=str(tmp / "ckpt"),
        log_json=str(tmp / "log.jsonl"),
    )
    result = train(cfg)
    # Independent computation from the saved final checkpoint.
    pg = initialize_model_parallel(1, 1)
    model = build_model(read_config(tmp / "ckpt"), pg)
    load_checkpoint(model, tmp / "ckpt")
    model.eval()
    tok = load_tokenizer(cfg.data.tokenizer)
    beir = load_beir(data["eval"])

    def embed(texts, instruction):
        enc, _ = tokenize_for_embedding(
            tok,
            texts,
            [instruction] * len(texts) if instruction else None,
            max_length=cfg.data.seq_length,
        )
        with torch.no_grad():
            return model(**enc).numpy()

    # --eval-instruction is a task definition: queries get it as training queries do
    prefix = f"Instruct: {data['instruction']}\nQuery: "
    q, d = embed(beir.queries, prefix), embed(beir.corpus, "")
    expected = retrieval_metrics(q @ d.T, beir.query_ids, beir.corpus_ids, beir.qrels)
    logged = [json.loads(x) for x in (tmp / "log.jsonl").read_text().splitlines()]
    evals = [r for r in logged if "eval" in r]
    (tmp / "validation.json").write_text(
        json.dumps(
            {
                "evals": evals,
                "result": result.evals,
                "expected": expected,
            }
        )
    )


def test_in_training_validation_matches_an_independent_computation(runs_1):
    """--eval-interval 2 over 4 steps validates at iterations 2 and 4 (log-json records with
    nDCG@10 / recall@10 / recall@100 / MRR@10); the iteration-4 numbers equal metrics computed
    independently from the saved final checkpoint, queries prefixed "Instruct: {definition}\\n
    Query: " as in training (1e-6 absolute)."""
    tmp_path = runs_1["_validation_worker"]
    out = json.loads((tmp_path / "validation.json").read_text())
    assert [r["iteration"] for r in out["evals"]] == [2, 4]
    final = out["evals"][-1]["eval"]["eval"]
    for key in ("ndcg_at_10", "recall_at_10", "recall_at_100", "mrr_at_10"):
        assert final[key] == pytest.approx(out["expected"][key], abs=1e-6), key


_DP2_WORKERS = ("_resume_worker", "_reshard_worker", "_handoff_worker", "_grad_cache_switch_worker")
_SINGLE_WORKERS = ("_guard_worker", "_recompute_worker", "_validation_worker")


def _run_workers(rank, world, data, tmp, names):
    for name in names:
        folder = Path(tmp) / name
        folder.mkdir(parents=True, exist_ok=True)
        globals()[name](rank, world, data, str(folder))
        torch.distributed.barrier()


@pytest.fixture(scope="module")
def runs_2(synthetic, tmp_path_factory):
    """One group of 2 gloo processes runs every DP=2 scenario (importing megatron-core dominates
    a process's cost); each scenario writes into its own folder."""
    root = tmp_path_factory.mktemp("dp2")
    run_distributed(_run_workers, 2, synthetic, str(root), _DP2_WORKERS)
    return {name: root / name for name in _DP2_WORKERS}


@pytest.fixture(scope="module")
def runs_1(synthetic, tmp_path_factory):
    """One process runs every single-process scenario."""
    root = tmp_path_factory.mktemp("single")
    run_distributed(_run_workers, 1, synthetic, str(root), _SINGLE_WORKERS)
    return {name: root / name for name in _SINGLE_WORKERS}
