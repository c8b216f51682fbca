"""Quickstart: the whole NV-Embed recipe at toy scale on CPU, with the commands a cluster run uses.

1. Data: a synthetic retrieval task (query words and document words of a topic never overlap, so
   an untrained model ranks near chance), its held-out BEIR split, and a word-level tokenizer.
2. A tiny random Mistral in transformers' format stands in for the pretrained LLM;
   `tools/convert_checkpoint.py import-hf` turns it into a megatron checkpoint with a new
   latent-attention pooling head.
3. Retrieval on the held-out split before training (`tools/evaluate_mteb.py --beir-dir`).
4. Stage 1 (`examples/pretrain_nvembed.sh --recipe tiny`): 2 processes, in-batch + hard
   negatives over the whole global batch (GradCache), full fine-tuning.
5. Stage 2 (`--recipe tiny --stage 2`): from the stage-1 weights, LoRA rank 8, a two-dataset
   blend, in-batch negatives off.
6. `export-hf` (LoRA merged) and retrieval on the held-out split with the exported model.

Each step prints its log path when it starts, then its progress lines as they come (training
iterations, evaluation progress and results; Python warnings and progress bars only go to the
log, which holds the full output), then its wall time. At the end: nDCG@10 before / after next to
the nDCG@10 of a random ranking (chance) and what the two stages' losses mean.

Writes `$OUT_DIR/summary.json` with `ndcg_at_10_before`, `ndcg_at_10_after` and
`ndcg_at_10_chance`.
Run: bash examples/quickstart.sh   (or: python examples/quickstart.py --out-dir quickstart_out)

One file on purpose: a user reads the whole recipe, data to evaluation, top to bottom; `main`
calls the steps in order (`make_data`, `import_base`, `evaluate`, `train`, `export`,
`write_summary`, `report`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import queue
import re
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# This checkout's package, for this process and (PYTHONPATH below) every step it runs, also when
# another checkout is the one installed in the environment.
sys.path.insert(0, str(ROOT))

# Echo filter: lines of a step that only go to its log. Python warnings (the "file:line:
# XWarning: ..." line and the indented source line after it), progress bars (tqdm redraws),
# blank lines, megatron-core's INFO chatter and torch's C++ W/I log lines.
_WARNING_LINE = re.compile(r"^\S.*:\d+: [A-Za-z]*Warning: ")
_PROGRESS_BAR = re.compile(r"\d+%\|.*\|| \d+(\.\d+)?(it|s)/(s|it)\]|\[A$")
_NOISE = re.compile(r"^\s*$|^(\S+ )?\S+ INFO megatron\.core\.|^\[?[WI]\d{4} \d\d:\d\d:\d\d")
# The "[date] time INFO logger: " prefix of logging lines, dropped from the echo.
_INFO_PREFIX = re.compile(r"^(\d{4}-\d\d-\d\d )?\d\d:\d\d:\d\d(,\d+)? INFO [\w.]+: ")
# A logging record anywhere in a line (a progress bar redraws without a newline, so a record
# logged meanwhile is printed on the bar's line).
_RECORD = re.compile(r"(\d{4}-\d\d-\d\d )?\d\d:\d\d:\d\d(,\d+)? (INFO|WARNING|ERROR) [\w.]+: ")
# A step that prints no progress line for this long gets a line saying it is still running.
HEARTBEAT_SECONDS = 30.0


def _echo_filter():
    """Returns `show(line) -> str | None`: the text to echo for a raw output line, or None."""
    after_warning = False

    def show(line: str) -> str | None:
        nonlocal after_warning
        if after_warning and line[:1].isspace():  # the source line printed under a warning
            after_warning = False
            return None
        after_warning = bool(_WARNING_LINE.match(line))
        if _PROGRESS_BAR.search(line):
            record = _RECORD.search(line)
            if record is None or _PROGRESS_BAR.search(line[record.start() :]):
                return None
            line = line[record.start() :]
        if after_warning or _NOISE.match(line):
            return None
        return _INFO_PREFIX.sub("", line.rstrip())

    return show


def run(name: str, cmd: list[str], log: Path, env: dict | None = None) -> float:
    """Runs one step: prints its log path and command, streams its progress lines (the full
    output goes to `log`), prints its wall time. Exits with the log's tail if the step fails."""
    print(f"-- {name}: log {log}", flush=True)
    print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    child_env = {**os.environ, **(env or {})}
    child_env["PYTHONUNBUFFERED"] = "1"  # lines reach the log and the echo as they are printed
    child_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p
    )
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=child_env,
        text=True,
        encoding="utf-8",
        errors="replace",
        bufsize=1,
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def pump():  # a thread, so that a silent step still gets its heartbeat line
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    show = _echo_filter()
    last_echo = start
    with open(log, "w", encoding="utf-8") as f:
        while True:
            try:
                line = lines.get(timeout=1.0)
            except queue.Empty:
                line = ""
            now = time.perf_counter()
            if line is None:
                break
            if line:
                f.write(line)
                f.flush()
                text = show(line)
                if text is not None:
                    print(f"  [{now - start:6.1f}s] {text}", flush=True)
                    last_echo = now
            if now - last_echo >= HEARTBEAT_SECONDS:
                print(
                    f"  [{now - start:6.1f}s] still running: no progress line for "
                    f"{now - last_echo:.0f}s (full output so far: {log})",
                    flush=True,
                )
                last_echo = now
    returncode = proc.wait()
    seconds = time.perf_counter() - start
    if returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-30:]
        sys.exit(f"step {name} failed (exit {returncode}), see {log}:\n" + "\n".join(tail))
    print(f"  done in {seconds:.1f}s", flush=True)
    return seconds


def read_ndcg(eval_dir: Path) -> float:
    summary = json.loads((eval_dir / "summary.json").read_text())
    return float(summary["tasks"]["eval"]["ndcg_at_10"])


def chance_ndcg_at_10(beir_dir: Path, split: str = "test") -> dict:
    """Expected nDCG@10 of a uniformly random ranking of the whole corpus, averaged over the
    queries of `qrels/<split>.tsv` (relevance > 0 counts as relevant, gain 1).

    Exact: each rank holds a relevant document with probability R/N (R relevant of N documents),
    so E[DCG@10] = (R/N) * sum_{i=1..min(10,N)} 1/log2(i+1), and the ideal DCG@10 is constant.
    """
    with open(beir_dir / "corpus.jsonl", encoding="utf-8") as f:
        n_docs = sum(1 for line in f if line.strip())
    relevant: dict[str, int] = {}
    with open(beir_dir / "qrels" / f"{split}.tsv", encoding="utf-8") as f:
        next(f)  # header
        for line in f:
            if not line.strip():
                continue
            query_id, _, score = line.rstrip("\n").split("\t")
            relevant.setdefault(query_id, 0)
            if float(score) > 0:
                relevant[query_id] += 1
    discounts = [1.0 / math.log2(i + 1) for i in range(1, min(10, n_docs) + 1)]
    per_query = [
        (r / n_docs) * sum(discounts) / sum(discounts[: min(r, 10)]) for r in relevant.values() if r
    ]
    return {
        "ndcg_at_10": sum(per_query) / len(per_query),
        "documents": n_docs,
        "queries": len(per_query),
        "relevant_per_query": sorted(set(relevant.values())),
    }


def read_log(path: Path) -> list[dict]:
    """The training log's per-iteration rows (those with a loss)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if "loss" in r]


def candidates(rows: list[dict]) -> dict | None:
    """Candidates each query's softmax ran over (the log's per-iteration mean): min, max and
    mean over the logged iterations; None when the log does not record them."""
    values = [r["candidates_per_query"] for r in rows if r.get("candidates_per_query")]
    if not values:
        return None
    return {"min": min(values), "max": max(values), "mean": sum(values) / len(values)}


@dataclass
class Quickstart:
    """What the steps share: the output folder, the training processes, each step's seconds."""

    out: Path
    nproc: int
    py: str = sys.executable
    timings: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    """`write_synthetic_retrieval`'s paths and instruction."""

    @property
    def logs(self) -> Path:
        return self.out / "logs"

    def run(self, key: str, name: str, cmd: list[str], env: dict | None = None) -> None:
        """Runs a step (`run`), its log `logs/<key>.log`, its seconds as `timings[key]`."""
        self.timings[key] = run(name, cmd, self.logs / f"{key}.log", env)


def make_data(q: Quickstart) -> dict:
    """Step 1: the synthetic data, its tokenizer and the tiny HF decoder; returns the held-out
    split's chance nDCG@10 (`chance_ndcg_at_10`)."""
    print("== 1. synthetic retrieval data, held-out split, tokenizer; tiny HF decoder", flush=True)
    start = time.perf_counter()
    from transformers.utils import logging as hf_logging

    from megatron_nvembed.testing import save_tiny_hf_decoder, write_synthetic_retrieval

    hf_logging.disable_progress_bar()
    q.data = write_synthetic_retrieval(q.out / "data")
    save_tiny_hf_decoder(q.out / "hf_base", q.data["tokenizer"])
    chance = chance_ndcg_at_10(Path(q.data["eval"]))
    q.timings["data"] = time.perf_counter() - start
    print(f"  done in {q.timings['data']:.1f}s", flush=True)
    return chance


def import_base(q: Quickstart) -> None:
    """Step 2: the HF decoder as a megatron checkpoint with a latent-attention head."""
    print("== 2. import the HF decoder as a megatron checkpoint with a latent-attention head")
    hf, save = str(q.out / "hf_base"), str(q.out / "ckpt" / "base")
    cmd = [q.py, "tools/convert_checkpoint.py", "import-hf", "--hf-dir", hf, "--save", save]
    q.run("import_hf", "import-hf", cmd + ["--pooling", "latent"])


def evaluate(q: Quickstart, name: str, model: Path) -> float:
    """Held-out retrieval of `model` (`tools/evaluate_mteb.py --beir-dir`), into `OUT/name`;
    returns its nDCG@10."""
    output = q.out / name
    cmd = [q.py, "tools/evaluate_mteb.py", "--model", str(model), "--beir-dir", q.data["eval"]]
    cmd += ["--instruction", q.data["instruction"], "--output", str(output)]
    q.run(name, name.replace("_", "-"), cmd)
    return read_ndcg(output)


def train(q: Quickstart, stage: int, start_from: str, train_data: list[str]) -> None:
    """Stage `stage` of the tiny recipe (`examples/pretrain_nvembed.sh`), from checkpoint
    `OUT/ckpt/<start_from>` into `OUT/ckpt/stage<stage>`, its log `OUT/stage<stage>.jsonl`."""
    cmd = ["bash", "examples/pretrain_nvembed.sh", "--recipe", "tiny"]
    cmd += ["--stage", str(stage)] if stage != 1 else []
    cmd += ["--pretrained-checkpoint", str(q.out / "ckpt" / start_from)]
    cmd += ["--train-data", *train_data, "--save", str(q.out / "ckpt" / f"stage{stage}")]
    cmd += ["--log-json", str(q.out / f"stage{stage}.jsonl")]
    env = {"NPROC_PER_NODE": str(q.nproc), "PYTHON": q.py}
    q.run(f"stage{stage}", f"stage {stage}", cmd, env)


def export(q: Quickstart) -> None:
    """Step 6's export: the stage-2 checkpoint (LoRA merged) in the NV-Embed HF format."""
    load, hf = str(q.out / "ckpt" / "stage2"), str(q.out / "hf_final")
    cmd = [q.py, "tools/convert_checkpoint.py", "export-hf", "--load", load, "--hf-dir", hf]
    q.run("export_hf", "export-hf", cmd + ["--dtype", "float32"])


def write_summary(q: Quickstart, before: float, after: float, chance: dict, wall: float) -> dict:
    """`OUT/summary.json` (written atomically): nDCG@10 before / after / chance, the stages'
    losses and candidates per query, the steps' seconds; returns it."""
    rows1, rows2 = read_log(q.out / "stage1.jsonl"), read_log(q.out / "stage2.jsonl")
    s1, s2 = [r["loss"] for r in rows1], [r["loss"] for r in rows2]
    summary = {
        "ndcg_at_10_before": before,
        "ndcg_at_10_after": after,
        "ndcg_at_10_chance": chance["ndcg_at_10"],
        "chance": {
            "what": "expected nDCG@10 of a uniformly random ranking of the held-out corpus (exact)",
            **{k: v for k, v in chance.items() if k != "ndcg_at_10"},
        },
        "stage1_loss_first_last": [s1[0], s1[-1]],
        "stage2_loss_first_last": [s2[0], s2[-1]],
        "stage2_loss_logged": s2,
        "candidates_per_query": {"stage1": candidates(rows1), "stage2": candidates(rows2)},
        "processes": q.nproc,
        "seconds": {k: round(v, 1) for k, v in q.timings.items()},
        "total_seconds": round(time.perf_counter() - wall, 1),
        "exported_model": str(q.out / "hf_final"),
    }
    tmp = q.out / ".summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(q.out / "summary.json")
    return summary


def _span(c: dict) -> str:
    return f"{c['min']:g}" if c["min"] == c["max"] else f"{c['min']:g}-{c['max']:g}"


def report(out: Path, summary: dict, chance: dict) -> None:
    """The closing table (nDCG@10: chance, before, after) and what the stages' losses mean."""
    from megatron_nvembed.training.recipes import get_recipe

    before, after = summary["ndcg_at_10_before"], summary["ndcg_at_10_after"]
    s1, s2 = summary["stage1_loss_first_last"], summary["stage2_loss_logged"]
    c1, c2 = summary["candidates_per_query"]["stage1"], summary["candidates_per_query"]["stage2"]
    batch = get_recipe("tiny", stage=2).data.global_batch_size
    print()
    print("| held-out retrieval | nDCG@10 |")
    print("|---|---|")
    print(f"| random ranking (chance) | {chance['ndcg_at_10']:.4f} |")
    print(f"| before training | {before:.4f} |")
    print(f"| after stage 1 + stage 2 | {after:.4f} |")
    print(
        f"chance: each of the {chance['queries']} held-out queries has "
        f"{'/'.join(map(str, chance['relevant_per_query']))} relevant documents among "
        f"{chance['documents']}; a random ranking's expected nDCG@10 is "
        f"{chance['ndcg_at_10']:.4f}, so 'before' is near chance and 1.0 is perfect."
    )
    print(f"stage-1 loss {s1[0]:.3f} -> {s1[-1]:.3f}; stage-2 loss {s2[0]:.3f} -> {s2[-1]:.3f}")
    counts = ""
    if c1 and c2:
        counts = (
            f" ({_span(c2)} candidates per query, mean per logged iteration, against "
            f"{_span(c1)} in stage 1; a model that scores all candidates alike has loss "
            f"ln({c2['mean']:.3g}) = {math.log(c2['mean']):.2f} in stage 2 against "
            f"ln({c1['mean']:.3g}) = {math.log(c1['mean']):.2f} in stage 1)"
        )
    print(
        "why stage 2's loss is small: in-batch negatives are off in stage 2, so each query is "
        "scored against its own positive and hard negatives only, not also against every other "
        f"query's candidates in the global batch of {batch} as in stage 1{counts}; the softmax "
        "has a much smaller denominator, and stage 2 starts from stage-1 weights that already "
        "rank the topics apart."
    )
    print(
        f"why it may rise: each logged value is the mean loss of one global batch of {batch} "
        f"new queries ({', '.join(f'{v:.4f}' for v in s2)}); a few harder batches move it up "
        f"and down without the training diverging; held-out nDCG@10 is what counts."
    )
    print(f"wrote {out / 'summary.json'} ({summary['total_seconds']}s in all)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default=os.environ.get("OUT_DIR", "quickstart_out"))
    parser.add_argument("--nproc", type=int, default=2, help="training processes (gloo on CPU)")
    args = parser.parse_args()
    q = Quickstart(out=Path(args.out_dir).resolve(), nproc=args.nproc)
    q.logs.mkdir(parents=True, exist_ok=True)
    wall = time.perf_counter()

    chance = make_data(q)
    import_base(q)
    print("== 3. held-out retrieval before training")
    before = evaluate(q, "eval_before", q.out / "ckpt" / "base")
    print(
        f"  nDCG@10 before training: {before:.4f} "
        f"(a random ranking scores {chance['ndcg_at_10']:.4f})",
        flush=True,
    )
    print(f"== 4. stage 1: {args.nproc} processes, in-batch + hard negatives, GradCache")
    train(q, 1, "base", [q.data["train"]])
    print("== 5. stage 2: from stage 1, LoRA rank 8, two-dataset blend, in-batch negatives off")
    train(q, 2, "stage1", ["0.5", q.data["train"], "0.5", q.data["train_pairs"]])
    print("== 6. export to the NV-Embed HF format (LoRA merged) and evaluate it")
    export(q)
    after = evaluate(q, "eval_after", q.out / "hf_final")

    report(q.out, write_summary(q, before, after, chance, wall), chance)
    if not (after >= 0.6 and after >= before + 0.2):
        sys.exit(
            f"quickstart check failed: nDCG@10 {before:.3f} -> {after:.3f} "
            "(expected >= 0.6 and at least +0.2)"
        )


if __name__ == "__main__":
    main()
