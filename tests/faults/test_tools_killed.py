"""A conversion killed at a random moment (SIGKILL; the seed is printed, `FAULTS_SEED=N`
replays it), then rerun with --overwrite: the rerun's output equals an uninterrupted run's, file
for file, and nothing of the killed run is left beside it. Between the kill and the rerun the
output is absent or already complete (a kill after the final rename), never partial.
import-hf stands for the three commands: they share the write-beside-then-swap routine
(`fileio.atomic_dir`), whose refusals and overwrite are tested in
tests/functional/test_conversion.py. (Mining, prepare_data and the corpus encoder have their own
kill-and-rerun tests: tests/functional/test_mining.py, tests/unit/test_prepare_data.py,
tests/functional/test_embed_tool.py.)
The tools' worker processes (`core/launch.run_distributed`) die with the tool: a SIGKILLed tool
leaves none writing on, nor one waiting for ever on the tool's rendezvous store.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from megatron_nvembed.testing import build_word_tokenizer, save_tiny_hf_decoder
from megatron_nvembed.utils.checksums import MANIFEST

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.faults


def _convert(*args) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "tools" / "convert_checkpoint.py"), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
    )


def _finish(proc) -> str:
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out[-3000:]
    return out


def _files(folder: Path) -> dict[str, object]:
    """Each file's SHA-256; for torch's `.metadata`, which also records the folder it was
    written in, what it says of the shards (tensor and byte layouts, storage places); for the
    manifest, its entries but that of `.metadata` (whose bytes hold that folder)."""
    out: dict[str, object] = {}
    for p in sorted(folder.rglob("*")):
        if not p.is_file():
            continue
        if p.name == ".metadata":
            import pickle

            md = pickle.loads(p.read_bytes())  # written by the runs above
            out[str(p.relative_to(folder))] = (md.state_dict_metadata, md.storage_data)
        elif p.name == MANIFEST:
            files = json.loads(p.read_text())["files"]
            files.pop(".metadata", None)  # (a tokenizer folder's manifest has none)
            out[str(p.relative_to(folder))] = files
        else:
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _killed_then_rerun(rng, seed, command, source, out_flag, straight: Path, out: Path) -> None:
    started = time.time()
    _finish(_convert(command, *source, out_flag, straight))
    duration = time.time() - started
    killed = _convert(command, *source, out_flag, out)
    time.sleep(rng.uniform(0.2, 0.9) * duration)
    killed.kill()
    # A hang guard only: the pipe closes once the tool's worker processes have ended too.
    killed.communicate(timeout=300)
    # Whatever moment the kill hit, the output is absent or complete: a kill after the swap
    # leaves the finished folder, and a user reruns with --overwrite to be sure.
    assert not out.exists() or _files(out) == _files(straight), f"{command}, seed {seed}"
    _finish(_convert(command, *source, out_flag, out, "--overwrite"))
    assert _files(out) == _files(straight), f"{command}, seed {seed}"
    left = sorted(p.name for p in out.parent.iterdir() if out.name in p.name)
    lock = f".{out.name}.nvembed-lock"  # the output's lock file: kept, its owner cleared
    assert left == [lock, out.name], (left, seed)
    assert (out.parent / lock).read_text() == "", seed


def test_conversion_killed_then_rerun_equals_an_uninterrupted_run(tmp_path):
    """Fault: `import-hf` (or export-hf, merge-lora: the same write routine) SIGKILLed at a random
        moment (`FAULTS_SEED=N` replays).
    Happens: The output is absent or complete, never partial; a rerun with `--overwrite` equals an
        uninterrupted run file for file and leaves nothing of the killed run.
    Do: Rerun the command with `--overwrite`."""
    seed = int(os.environ.get("FAULTS_SEED", random.randrange(2**31)))
    print(f"FAULTS_SEED={seed}")
    rng = random.Random(seed)
    tokenizer = build_word_tokenizer(["how do plants make food", "the sky is blue"])
    hf = save_tiny_hf_decoder(tmp_path / "mistral", tokenizer, "mistral")
    _killed_then_rerun(
        rng, seed, "import-hf", ("--hf-dir", hf), "--save", tmp_path / "ckpt", tmp_path / "ckpt2"
    )


_SLEEPING_WORKERS = """
import os, signal, sys, time
from megatron_nvembed.core.launch import run_distributed

def worker(rank, world, folder):
    # torch.multiprocessing.spawn asks for SIGINT at its parent's death; a worker inside a long
    # C++ call (a store wait, a shard write) or one catching KeyboardInterrupt goes on regardless
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with open(os.path.join(folder, f"{rank}.pid.tmp"), "w") as f:
        f.write(str(os.getpid()))
    os.rename(os.path.join(folder, f"{rank}.pid.tmp"), os.path.join(folder, f"{rank}.pid"))
    time.sleep(3600)

if __name__ == "__main__":
    run_distributed(worker, 2, sys.argv[1])
"""


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_workers_of_a_sigkilled_tool_end_with_it(tmp_path):
    """Fault: A tool is SIGKILLed while its worker processes run (even workers deaf to SIGINT, or
        inside a C++ call).
    Happens: Every worker ends with it (Linux's parent-death signal, SIGKILL), so none writes on
        or waits for ever on the tool's rendezvous store.
    Do: Rerun the command."""
    # Two workers that would sleep an hour, deaf to SIGINT; SIGKILL of their parent ends both.
    # The polls are hang guards: each step is awaited, never timed.
    script = tmp_path / "sleeping_workers.py"
    script.write_text(_SLEEPING_WORKERS)
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path)], cwd=ROOT)
    try:
        pid_files = [tmp_path / f"{rank}.pid" for rank in range(2)]
        for _ in range(1200):  # up to 10 minutes for the workers to start
            if all(p.exists() for p in pid_files) or proc.poll() is not None:
                break
            time.sleep(0.5)
        assert proc.poll() is None, f"the launcher ended early: {proc.returncode}"
        pids = [int(p.read_text()) for p in pid_files]
        assert all(psutil.Process(pid).ppid() == proc.pid for pid in pids)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        for _ in range(240):  # the kernel signals them at once; 2 minutes is the guard
            if all(_gone(pid) for pid in pids):
                break
            time.sleep(0.5)
        left = [pid for pid in pids if not _gone(pid)]
        assert not left, f"workers {left} outlived their SIGKILLed parent"
    finally:
        for pid_file in tmp_path.glob("*.pid"):
            try:
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass
        if proc.poll() is None:
            proc.kill()
