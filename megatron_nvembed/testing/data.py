"""Local data for tests and the quickstart: a word-level tokenizer and a synthetic retrieval task
(training records, BEIR folder) with its tokenizer."""

from __future__ import annotations


def build_word_tokenizer(texts: list[str]):
    """A whitespace word-level `PreTrainedTokenizerFast` over `texts`, adding BOS like Mistral's.

    Special tokens: `<unk>` 0, `<s>` 1 (BOS), `</s>` 2 (EOS, also the pad token); right padding.
    Saveable with `save_pretrained` and reloadable offline with `load_tokenizer`.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for t in texts for w in t.replace("\n", " ").split()} | {":"})
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({w: i + 3 for i, w in enumerate(words)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="</s>",
        padding_side="right",
    )


def _write_beir_split(folder, corpus: list[dict], queries: list[dict], qrels: list[tuple]):
    """`corpus.jsonl`, `queries.jsonl` and `qrels/test.tsv` (relevance 1 per (query id, document
    id) pair) in `folder`, as BEIR lays them out."""
    from pathlib import Path

    from megatron_nvembed.data.records import write_jsonl_atomic

    folder = Path(folder)
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    write_jsonl_atomic(folder / "corpus.jsonl", corpus)
    write_jsonl_atomic(folder / "queries.jsonl", queries)
    with open(folder / "qrels" / "test.tsv", "w", encoding="utf-8") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        for q, d in qrels:
            f.write(f"{q}\t{d}\t1\n")


def write_synthetic_retrieval(
    out_dir,
    num_topics: int = 16,
    train_per_topic: int = 24,
    eval_queries_per_topic: int = 2,
    eval_docs_per_topic: int = 2,
    num_negatives: int = 3,
    seed: int = 0,
) -> dict:
    """Writes a learnable synthetic retrieval task, its held-out BEIR split and a tokenizer.

    Each topic has its own query words and its own, disjoint, document words, plus filler words
    shared by all topics: a query and its relevant documents share no word, so an untrained
    model ranks near chance and a trained one has to learn the topic association.

    Files: `train.jsonl` (stage-1 records with an instruction and hard negatives from other
    topics), `train_pairs.jsonl` (stage-2 style: same task, no in-batch negatives),
    `eval/{corpus,queries}.jsonl` + `eval/qrels/test.tsv`, `tokenizer/`.

    Returns:
        {"train": path, "train_pairs": path, "eval": path, "tokenizer": path, "instruction": str}
    """
    import random
    from pathlib import Path

    from megatron_nvembed.data.records import write_jsonl_atomic

    rng = random.Random(seed)
    out = Path(out_dir)
    qwords = [[f"q{t}x{j}" for j in range(6)] for t in range(num_topics)]
    dwords = [[f"d{t}y{j}" for j in range(8)] for t in range(num_topics)]
    filler = [f"w{j}" for j in range(30)]
    instruction = "Given a question retrieve passages that answer it"

    def query(t):
        words = rng.sample(qwords[t], 3) + rng.sample(filler, 2)
        rng.shuffle(words)
        return " ".join(words)

    def doc(t):
        words = rng.sample(dwords[t], 4) + rng.sample(filler, 4)
        rng.shuffle(words)
        return " ".join(words)

    train, pairs = [], []
    for t in range(num_topics):
        for _ in range(train_per_topic):
            others = rng.sample([u for u in range(num_topics) if u != t], num_negatives)
            train.append(
                {
                    "query": query(t),
                    "pos": [doc(t)],
                    "neg": [doc(u) for u in others],
                    "task": "SyntheticQA",
                    "instruction": instruction,
                }
            )
            pairs.append(
                {
                    "query": query(t),
                    "pos": [doc(t)],
                    "neg": [doc(others[0])],
                    "task": "SyntheticQA",
                    "instruction": instruction,
                    "in_batch_negatives": False,
                }
            )
    rng.shuffle(train)
    rng.shuffle(pairs)
    write_jsonl_atomic(out / "train.jsonl", train)
    write_jsonl_atomic(out / "train_pairs.jsonl", pairs)
    corpus, queries, qrels = [], [], []
    for t in range(num_topics):
        for j in range(eval_docs_per_topic):
            corpus.append({"_id": f"d{t}-{j}", "text": doc(t)})
        for j in range(eval_queries_per_topic):
            queries.append({"_id": f"q{t}-{j}", "text": query(t)})
            qrels += [(f"q{t}-{j}", f"d{t}-{k}") for k in range(eval_docs_per_topic)]
    _write_beir_split(out / "eval", corpus, queries, qrels)
    texts = [instruction, "Instruct: Query:"] + [" ".join(w) for w in qwords + dwords] + filler
    tok = build_word_tokenizer(texts)
    tok.save_pretrained(str(out / "tokenizer"))
    return {
        "train": str(out / "train.jsonl"),
        "train_pairs": str(out / "train_pairs.jsonl"),
        "eval": str(out / "eval"),
        "tokenizer": str(out / "tokenizer"),
        "instruction": instruction,
    }
