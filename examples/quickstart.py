"""Quickstart: a tiny NV-Embed-style model on CPU, end to end from text to embeddings.

Builds a tiny word-level tokenizer and a tiny bidirectional model with a latent-attention head
(all local, no downloads), embeds a few queries (with an NV-Embed instruction, masked out of
pooling) and passages under 2 gloo processes at tensor-parallel size 2, checks that the result
equals a single-device transformers reference, and writes `$OUT_DIR/summary.json`.

Run: bash examples/quickstart.sh   (or: python examples/quickstart.py --out-dir quickstart_out)
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

QUERIES = [
    "how do plants make food",
    "what is the capital of france",
    "why is the sky blue",
]
PASSAGES = [
    "plants make food from sunlight water and air by photosynthesis",
    "paris is the capital and largest city of france",
    "the sky looks blue because air scatters blue light more than red light",
]
INSTRUCTION = "Instruct: Given a question, retrieve passages that answer the question\nQuery: "


def _worker(rank: int, world_size: int, out_dir: str, tok_dir: str) -> None:
    from transformers import AutoTokenizer

    from megatron_nvembed.conversion import hf_mapping as hm
    from megatron_nvembed.data.tokenization import tokenize_for_embedding
    from megatron_nvembed.model.build import build_model
    from megatron_nvembed.parallel import initialize_model_parallel
    from megatron_nvembed.testing import randomized_reference, tiny_model_config

    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    pg = initialize_model_parallel(tensor_model_parallel_size=world_size, seed=0)
    cfg = tiny_model_config(pooling="latent", tp=world_size, vocab_size=len(tokenizer))
    # The reference stands in for a pretrained checkpoint: its weights are loaded into the
    # tensor-parallel model through the same map the checkpoint importer uses.
    ref = randomized_reference(cfg, seed=0)
    model = build_model(cfg, pg)
    hm.load_hf_into_model(
        model, ref.hf_state_dict(), cfg, rank, 0, backbone_prefix="embedding_model."
    )
    model.eval()
    q, _ = tokenize_for_embedding(tokenizer, QUERIES, INSTRUCTION)
    p, _ = tokenize_for_embedding(tokenizer, PASSAGES)
    start = time.perf_counter()
    with torch.no_grad():
        q_emb, p_emb = model(**q), model(**p)
        q_ref, p_ref = ref(**q), ref(**p)
    seconds = time.perf_counter() - start
    if rank != 0:
        return
    diff = max((q_emb - q_ref).abs().max().item(), (p_emb - p_ref).abs().max().item())
    scores = (q_emb @ p_emb.T).tolist()
    summary = {
        "tensor_model_parallel_size": world_size,
        "embedding_dim": q_emb.shape[1],
        "queries": QUERIES,
        "passages": PASSAGES,
        "scores": scores,
        "max_abs_diff_vs_reference": diff,
        "seconds": seconds,
    }
    print(
        f"embedded {len(QUERIES)} queries + {len(PASSAGES)} passages at TP={world_size} "
        f"in {seconds:.2f}s; max |diff| vs single-device reference = {diff:.2e}"
    )
    print("query x passage cosine scores (untrained tiny model):")
    for text, row in zip(QUERIES, scores):
        print(f"  {text[:36]:<36} " + " ".join(f"{s:+.3f}" for s in row))
    tmp = os.path.join(out_dir, ".summary.json.tmp")
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=2)
    os.replace(tmp, os.path.join(out_dir, "summary.json"))
    if diff > 1e-5:
        raise SystemExit(f"parity check failed: {diff:.2e} > 1e-5")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default=os.environ.get("OUT_DIR", "quickstart_out"))
    parser.add_argument("--nproc", type=int, default=2, help="gloo processes (= TP size)")
    args = parser.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    from megatron_nvembed.testing import build_word_tokenizer, run_distributed

    with tempfile.TemporaryDirectory() as tok_dir:
        build_word_tokenizer(QUERIES + PASSAGES + [INSTRUCTION]).save_pretrained(tok_dir)
        run_distributed(_worker, args.nproc, args.out_dir, tok_dir)
    print(f"wrote {os.path.join(args.out_dir, 'summary.json')}")


if __name__ == "__main__":
    main()
