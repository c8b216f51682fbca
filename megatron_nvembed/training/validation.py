"""In-training validation: every `--eval-interval` iterations, retrieval metrics on held-out
BEIR-format folders (`--eval-data`), queries with `--eval-instruction`, documents without.

Per set: nDCG@10, recall@1/10/100, MRR@10, the score margins (mean relevant-document score minus
the hardest / the mean negative score) and `num_queries`, by `evaluation/retrieval_eval.py:
evaluate_embeddings`: an exact top-k search of the query embeddings over the corpus embeddings
(no [queries x corpus] score matrix), then `ranking_metrics` and `search_margins` (the numbers of
`retrieval_metrics` / `score_margins` on the dense score matrix). `--eval-iters N` scores only the
first N x `--eval-batch-size` queries of each set (in file order); the corpus is embedded whole
every time, since a ranking needs every document.

Every rank embeds the whole (small) validation set with the training model in eval mode (no
dropout, so the training RNG streams are untouched and resumption stays exact); pipeline stages
run megatron-core's forward-only schedule. The last rank computes the metrics and shares them.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.distributed as dist

from megatron_nvembed.core.config import DEFAULT_QUERY_TEMPLATE
from megatron_nvembed.core.logging_utils import get_logger
from megatron_nvembed.data.buckets import length_grouped_batches
from megatron_nvembed.data.templates import query_instruction
from megatron_nvembed.data.tokenization import tokenize_for_embedding
from megatron_nvembed.evaluation.beir import load_beir
from megatron_nvembed.evaluation.metrics import MARGINS
from megatron_nvembed.evaluation.retrieval_eval import evaluate_embeddings
from megatron_nvembed.model.inference import embed_microbatches
from megatron_nvembed.training.config import EvaluationConfig

logger = get_logger(__name__)


METRICS = ("ndcg_at_10", "recall_at_1", "recall_at_10", "recall_at_100", "mrr_at_10")


class Validator:
    """Callable `(iteration) -> {folder name: metrics}` (same dict on every rank)."""

    def __init__(
        self,
        cfg: EvaluationConfig,
        max_length: int,
        tokenizer,
        model,
        pg,
        query_template: str = DEFAULT_QUERY_TEMPLATE,
    ):
        from pathlib import Path

        self.cfg, self.tokenizer, self.model, self.pg = cfg, tokenizer, model, pg
        self.max_length = max_length
        self.sets = {Path(p).name: load_beir(p) for p in cfg.eval_data}
        for p, data in zip(cfg.eval_data, self.sets.values()):
            if not data.query_ids or not data.corpus:
                raise ValueError(f"--eval-data {p}: no judged query or no document")
        # a task definition goes into the model's template; a complete "Instruct:" prefix is kept
        self.instruction = (
            query_instruction("", cfg.eval_instruction, template=query_template)
            if cfg.eval_instruction
            else ""
        )
        self.device = next(model.parameters()).device
        # --eval-iters: query batches per set (None: all).
        self.max_queries = None if cfg.eval_iters is None else cfg.eval_iters * cfg.eval_batch_size

    def _encode(self, texts: list[str], instruction: str) -> np.ndarray | None:
        # Length-grouped batches (characters stand in for tokens: no second tokenisation).
        groups = length_grouped_batches([len(t) for t in texts], self.cfg.eval_batch_size)
        order = [i for idx in groups for i in idx]
        batches = []
        for idx in groups:
            enc, _ = tokenize_for_embedding(
                self.tokenizer,
                [texts[i] for i in idx],
                [instruction] * len(idx) if instruction else None,
                max_length=self.max_length,
            )
            batches.append({k: v.to(self.device) for k, v in enc.items()})
        outs = embed_microbatches(self.model, batches, self.pg)
        if outs is None:
            return None
        emb = torch.cat(outs).float().cpu().numpy()
        result = np.empty_like(emb)
        result[np.array(order)] = emb
        return result

    def __call__(self, iteration: int) -> dict:
        start = time.perf_counter()
        metrics = {}
        for name, data in self.sets.items():
            query_ids = data.query_ids[: self.max_queries]
            q = self._encode(data.queries[: self.max_queries], self.instruction)
            d = self._encode(data.corpus, "")
            if q is not None:
                m = evaluate_embeddings(
                    q, d, query_ids, data.qrels, corpus_ids=data.corpus_ids, ks=(1, 10, 100)
                )
                metrics[name] = {k: m[k] for k in (*METRICS, *MARGINS)}
                metrics[name]["num_queries"] = len(query_ids)
        box = [metrics]
        dist.broadcast_object_list(box, src=dist.get_world_size() - 1)
        metrics = box[0]
        if dist.get_rank() == 0:  # the output a user watches, on several nodes too
            for name, m in metrics.items():
                logger.info(
                    "validation iteration %d | %s | %d queries | nDCG@10 %.4f | MRR@10 %.4f | "
                    "recall@1 %.4f | recall@10 %.4f | recall@100 %.4f | margin hardest %+.4f "
                    "mean %+.4f | %.1f s",
                    iteration,
                    name,
                    m["num_queries"],
                    m["ndcg_at_10"],
                    m["mrr_at_10"],
                    m["recall_at_1"],
                    m["recall_at_10"],
                    m["recall_at_100"],
                    m["score_margin_hardest"],
                    m["score_margin_mean"],
                    time.perf_counter() - start,
                )
        return metrics
