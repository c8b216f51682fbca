#!/usr/bin/env python3
"""The JSONL training-data index (`data/jsonl_index.py`): first build, later starts, memory.

  python bench/data_index.py [--sizes 1000000 10000000] [--work /tmp]
        [--before DIR --before-up-to 1000000] [--opens 3]
        [--output bench/results/data-index-cpu.json]

Per size N: writes a synthetic JSONL of N records (Table 6 task names, 5% with an instruction
instead, 10% with teacher scores, 1-2 positives and 0-3 hard negatives of 12-30 words: about
450 bytes a record), then measures, each in a fresh Python process (`_child`):
- build: `load_dataset_spec` with no index yet (parse, validate, write the index): seconds,
  records/s, peak RSS (the kernel's VmHWM) and the RSS before the call (imports);
- open (`--opens` times): `load_dataset_spec` with the index present, the "second start": time
  from the call to a usable source, then 1,000 random records read (`source[i]`, `counts(i)`),
  then the sampler's first global batch of 128 (`BlendedSampler`: one permutation of the N
  records, a torch tensor) read; peak RSS, and RSS split into anonymous memory (the process's
  own) and file-backed pages (the mapped index, shared by every rank of the machine through the
  page cache);
- the index's size on disk;
- with `--trainer K`: K starts of the trainer on the data and K on a 1,000-record file, alternating
  (`examples/pretrain_nvembed.sh --recipe tiny`, 2 gloo processes, `--data-cache-path` holding
  the indexes): seconds from launch to the first iteration's log record; the small file's starts
  are the trainer's fixed start-up on this machine;
- with `--before DIR` (a checkout of the code before the index, e.g. `git archive`), for sizes up
  to `--before-up-to`: an open with that code (which read and validated every record at every
  start), for comparison.

The data's page cache is warm (the file was just written): a cold start adds reading the first
and last MiB of each data file (its key) and the index pages the sampler touches. The data goes
under `--work` and is deleted at the end (10M records is about 4.5 GB), unless `--keep`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["MSMARCO", "NaturalQuestions", "HotpotQA", "FEVER", "SQuAD", "FiQA2018", "StackExchange"]
POOL = 200_000  # distinct texts records are assembled from
CHUNK = 100_000


# ------------------------------------------------------------------------------ synthetic data


def _texts(rng: np.random.Generator, n: int, low: int, high: int) -> list[str]:
    """`n` texts of `low`..`high` Zipf-distributed lowercase words (no JSON escaping needed)."""
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    vocab = sorted(
        {"".join(rng.choice(letters, size=int(k))) for k in rng.integers(2, 10, size=4000)}
    )
    words = np.asarray(vocab)
    lengths = rng.integers(low, high + 1, size=n)
    picks = np.minimum(rng.zipf(1.3, size=int(lengths.sum())), len(words)) - 1
    out, pos = [], 0
    for k in lengths:
        out.append(" ".join(words[picks[pos : pos + k]]))
        pos += k
    return out


def write_records(path: Path, n: int, seed: int = 0) -> None:
    """`n` valid training records as JSONL (see the module docstring)."""
    rng = np.random.default_rng(seed)
    queries = _texts(rng, POOL, 6, 12)
    passages = _texts(rng, POOL, 12, 30)
    with open(path, "w", encoding="utf-8") as f:
        for start in range(0, n, CHUNK):
            m = min(CHUNK, n - start)
            q = rng.integers(0, POOL, size=m)
            p = rng.integers(0, POOL, size=(m, 5))
            n_pos = 1 + (rng.random(m) < 0.2)
            n_neg = rng.integers(0, 4, size=m)
            kind = rng.random(m)
            task = rng.integers(0, len(TASKS), size=m)
            lines = []
            for i in range(m):
                texts = [passages[j] for j in p[i]]
                pos, neg = texts[: n_pos[i]], texts[2 : 2 + n_neg[i]]
                rec = f'{{"query": "{queries[q[i]]}", "pos": {json.dumps(pos)}, "neg": {json.dumps(neg)}'
                if kind[i] < 0.05:
                    rec += ', "instruction": "Given a question, retrieve passages that answer it"'
                else:
                    rec += f', "task": "{TASKS[task[i]]}"'
                if kind[i] > 0.9:
                    rec += f', "pos_scores": {[1.5] * len(pos)}, "neg_scores": {[0.25] * len(neg)}'
                lines.append(f'{rec}, "id": {start + i}}}\n')
            f.write("".join(lines))


# --------------------------------------------------------------------------- one measurement


def _status() -> dict:
    """RSS figures of this process from /proc/self/status, in MiB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[key] = round(int(value.split()[0]) / 1024, 1)
    return out


def child(mode: str, data: str, cache: str | None) -> dict:
    """One measurement in this (fresh) process; `mode` "build" or "open"."""
    import inspect

    from megatron_nvembed.data.loading import load_dataset_spec

    kwargs = {}
    if "data_cache_path" in inspect.signature(load_dataset_spec).parameters:
        kwargs["data_cache_path"] = cache  # the code before the index has no such argument
    before = _status()
    t0 = time.perf_counter()
    source = load_dataset_spec(data, **kwargs)
    t1 = time.perf_counter()
    out = {"seconds_to_usable": round(t1 - t0, 3), "records": len(source), "rss_before": before}
    out["rss_usable"] = _status()
    if mode == "build":
        out["records_per_second"] = round(len(source) / (t1 - t0), 1)
        return out
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for i in rng.integers(0, len(source), size=1000):
        source.counts(int(i))
        source[int(i)]
    out["random_read_us"] = round((time.perf_counter() - t0) / 1000 * 1e6, 1)
    out["rss_after_reads"] = _status()
    from megatron_nvembed.data.blending import BlendedSampler  # imports torch: timed apart

    t0 = time.perf_counter()
    sampler = BlendedSampler.for_sources([source], [1.0], global_batch_size=128, micro_batch_size=4)
    for micro in sampler.next_micro_batches():
        for slot in micro:
            source[slot.index]
    out["first_global_batch_seconds"] = round(time.perf_counter() - t0, 3)
    out["rss_after_first_batch"] = _status()
    return out


def _run_child(mode: str, data: Path, cache: Path, pythonpath: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "_child", mode, str(data), str(cache)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{mode} of {data} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
        )
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["process_seconds"] = round(time.perf_counter() - t0, 2)  # interpreter and imports too
    return out


# ------------------------------------------------------------------------------------- driver


def _machine() -> dict:
    info = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    try:
        import psutil

        info["memory_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    return info


def measure(n: int, args) -> dict:
    folder = Path(tempfile.mkdtemp(prefix=f"bench_data_index_{n}_", dir=args.work))
    try:
        data, cache = folder / "train.jsonl", folder / "cache"
        t0 = time.perf_counter()
        write_records(data, n)
        row = {
            "records": n,
            "jsonl_mib": round(data.stat().st_size / 2**20, 1),
            "bytes_per_record": round(data.stat().st_size / n, 1),
            "generate_seconds": round(time.perf_counter() - t0, 1),
        }
        print(f"{n} records: {row['jsonl_mib']} MiB of JSONL", file=sys.stderr)
        row["build"] = _run_child("build", data, cache, ROOT)
        print(f"  build: {row['build']['seconds_to_usable']} s", file=sys.stderr)
        (index,) = cache.glob("*.nvembed-index")
        row["index_mib"] = round(index.stat().st_size / 2**20, 1)
        row["index_bytes_per_record"] = round(index.stat().st_size / n, 1)
        row["opens"] = [_run_child("open", data, cache, ROOT) for _ in range(args.opens)]
        times = sorted(o["seconds_to_usable"] for o in row["opens"])
        row["open_seconds_median"] = times[len(times) // 2]
        print(f"  opens: {times} s", file=sys.stderr)
        if args.trainer:
            small = folder / "small" / "train.jsonl"
            small.parent.mkdir()
            write_records(small, 1000)
            row["trainer_starts"] = []
            for _ in range(args.trainer):  # alternating: the machine's load hits both alike
                for name, path in ((f"{n} records", data), ("1000 records", small)):
                    start = _trainer_start(path, cache, folder, len(row["trainer_starts"]))
                    row["trainer_starts"].append(dict(start, data=name))
            print(f"  trainer: {row['trainer_starts']}", file=sys.stderr)
        if args.before and n <= args.before_up_to:
            row["before_open"] = _run_child("open", data, cache, Path(args.before).resolve())
            print(f"  before: {row['before_open']['seconds_to_usable']} s", file=sys.stderr)
        return row
    finally:
        if args.keep:
            print(f"  kept {folder}", file=sys.stderr)
        else:
            shutil.rmtree(folder, ignore_errors=True)


def _trainer_start(data: Path, cache: Path, folder: Path, attempt: int) -> dict:
    """One start of the trainer (`examples/pretrain_nvembed.sh --recipe tiny`, 2 gloo processes,
    indexes under `cache`): seconds from launch to its first iteration's log record, then the run
    is stopped (its whole process group killed, waited for)."""
    import signal

    from megatron_nvembed.testing import build_word_tokenizer

    tok_dir = folder / "tokenizer"
    if not tok_dir.exists():
        with open(data) as fh:
            texts = [json.loads(next(fh))["query"] for _ in range(200)]
        build_word_tokenizer(texts).save_pretrained(tok_dir)
    log = folder / f"start{attempt}.jsonl"
    cmd = ["bash", "examples/pretrain_nvembed.sh", "--recipe", "tiny", "--tokenizer", str(tok_dir)]
    cmd += ["--train-data", str(data), "--data-cache-path", str(cache), "--log-interval", "1"]
    cmd += ["--log-json", str(log), "--save", str(folder / f"ckpt{attempt}")]
    env = dict(os.environ, PYTHONPATH=str(ROOT), NPROC_PER_NODE="2")
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(folder / f"start{attempt}.err", "wb"),  # a file: a full pipe would stall it
        start_new_session=True,
    )
    while proc.poll() is None and not (log.exists() and log.read_text().strip()):
        time.sleep(0.1)
    seconds = time.perf_counter() - t0
    if proc.poll() is None:
        import psutil

        # torchrun's workers may run in process groups of their own: the whole tree is stopped
        tree = [proc.pid, *(c.pid for c in psutil.Process(proc.pid).children(recursive=True))]
        for pid in tree:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
        psutil.wait_procs([p for p in psutil.process_iter() if p.pid in tree], timeout=30)
    elif proc.returncode != 0:
        err = (folder / f"start{attempt}.err").read_text(errors="replace")
        raise SystemExit(f"trainer failed: {err[-3000:]}")
    return {"seconds_to_first_iteration": round(seconds, 1)}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_child"]:
        mode, data, cache = argv[1:4]
        print(json.dumps(child(mode, data, cache)))
        return 0
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    p.add_argument("--work", default=tempfile.gettempdir(), help="where the data is written")
    p.add_argument("--opens", type=int, default=3, help="later starts measured per size")
    p.add_argument("--before", help="PYTHONPATH of the code before the index (comparison)")
    p.add_argument("--before-up-to", type=int, default=1_000_000, help="largest size for it")
    p.add_argument("--keep", action="store_true", help="keep the generated data")
    p.add_argument(
        "--trainer",
        type=int,
        default=0,
        metavar="K",
        help="also start the trainer (tiny recipe, 2 processes) K times on the data and K times "
        "on 1,000 records (alternating): seconds to its first iteration, indexes present",
    )
    p.add_argument("--output")
    args = p.parse_args(argv)
    start = time.perf_counter()
    result = {
        "benchmark": "data-index",
        "rows": [measure(n, args) for n in args.sizes],
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": _machine(),
        "seconds": round(time.perf_counter() - start, 1),
        "command": " ".join(["data_index.py", *argv]),
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.output:
        from megatron_nvembed.utils.fileio import write_atomic

        write_atomic(args.output, text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
