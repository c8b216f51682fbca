"""tools/merge_checkpoints.py on tiny checkpoints built in the test (no hub).

Two tiny models (`tiny_model_config`, latent head) with different weights in every tensor are
saved, A at TP=2 (two processes, two shards) and B at TP=1, with the same tokenizer files.
Proves, through the tool's `main(argv)` in this process:
- linear with --weights 1 3 and slerp with --slerp-t 0.3: every parameter of the output, loaded
  at TP=1, equals a plain-torch merge of the inputs' parameters (linear: 0.25 A + 0.75 B;
  slerp: the explicit-angle formula with `torch.acos` in float64), max |diff| <= 1e-6 (fp32);
  the output is iteration 0 at TP=PP=1 with A's model config and tokenizer files, no LoRA;
- export-hf (tools/convert_checkpoint.py `main`) runs on the output and its weights equal the
  merged model's;
- two LoRA checkpoints (same rank / alpha, different adapters) merge factor by factor into a
  LoRA checkpoint (lora.json kept, loadable with adapters and merged on load); LoRA in one input
  only and adapters of another rank are refused;
- bad input, each exit code 2 with one `error:` line naming the flag / path / field, and nothing
  written: a config mismatch (field and both values), a --weights count that does not match or
  a NaN weight, --weights with slerp, --slerp-t with linear or outside [0, 1], slerp of 3, one
  input, a missing input, a folder that is no checkpoint, a non-empty --save without
  --overwrite (and --overwrite replaces it), a --save inside an input;
- `--help` imports no torch.

Run alone: pytest tests/functional/test_merge_checkpoints.py
"""

import json
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_nvembed.testing import (
    build_word_tokenizer,
    init_single_process_megatron,
    run_distributed,
    tiny_model_config,
)

ROOT = Path(__file__).resolve().parents[2]
TEXTS = ["how do plants make food", "the sky is blue"]
TOL = 1e-6


def _tool(name):
    return runpy.run_path(str(ROOT / "tools" / name))["main"]


def _run(capsys, *argv, tool="merge_checkpoints.py"):
    """The tool's `main` in this process: (exit code, its `error:` lines)."""
    code = _tool(tool)([str(a) for a in argv])
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.startswith("error:")]


def _params(root, *, lora=None):
    """{name: tensor} of checkpoint `root` loaded at TP=1 (adapters kept when `lora`)."""
    from megatron_nvembed.checkpoint.store import load_checkpoint, read_config
    from megatron_nvembed.core.config import ParallelConfig
    from megatron_nvembed.model.build import build_model
    from megatron_nvembed.model.lora import apply_lora

    cfg = read_config(root)
    cfg.parallel = ParallelConfig(1, 1)
    model = build_model(cfg, init_single_process_megatron())
    if lora is not None:
        apply_lora(model, lora["rank"], lora["alpha"])
    load_checkpoint(model, root, merge_adapters=lora is None)
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _slerp_reference(a, b, t):
    x, y = a.reshape(-1).double(), b.reshape(-1).double()
    cos = torch.clamp(torch.dot(x, y) / (x.norm() * y.norm()), -1.0, 1.0)
    omega = torch.acos(cos)
    if torch.sin(omega) < 1e-6:  # colinear (e.g. the zero rows only): linear
        return ((1 - t) * x + t * y).reshape(a.shape)
    s = torch.sin(omega)
    return (torch.sin((1 - t) * omega) / s * x + torch.sin(t * omega) / s * y).reshape(a.shape)


def _max_diff(got, want):
    assert set(got) == set(want)
    return max((got[k].double() - want[k].double()).abs().max().item() for k in want)


def _save_tiny(rank, world, root, seed, vocab_size):
    """A tiny model (`tiny_model_config`) at TP=`world`, every weight but the embedding moved
    by seeded noise (the layer norms too), saved to `root` (runs on each TP rank)."""
    from megatron_nvembed.checkpoint.store import save_checkpoint
    from megatron_nvembed.model.build import build_model

    pg = init_single_process_megatron(tp=world, seed=seed)
    cfg = tiny_model_config(tp=world, vocab_size=vocab_size)
    model = build_model(cfg, pg)
    with torch.no_grad():
        for i, (name, p) in enumerate(sorted(model.named_parameters())):
            if not name.startswith("embedding."):  # its padding rows stay zero
                g = torch.Generator().manual_seed(1000 * seed + i)
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    save_checkpoint(model, cfg, root, iteration=0)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A saved at TP=2 (two processes), B at TP=1 (this process), same tokenizer files."""
    from megatron_nvembed.checkpoint.store import TOKENIZER_DIR, store_tokenizer

    root = tmp_path_factory.mktemp("merge")
    tok = build_word_tokenizer(TEXTS)
    tok.save_pretrained(str(root / "tok"))
    run_distributed(_save_tiny, 2, str(root / "a"), 1, len(tok))
    _save_tiny(0, 1, str(root / "b"), 2, len(tok))
    for name in ("a", "b"):
        store_tokenizer(root / "tok", root / name / TOKENIZER_DIR)
    return root


@pytest.mark.functional
def test_linear_and_slerp_equal_plain_torch_and_export(ckpts, tmp_path, capsys):
    from safetensors.torch import load_file

    from megatron_nvembed.checkpoint.store import (
        TOKENIZER_DIR,
        latest_iteration,
        read_config,
        read_lora,
    )

    a, b = ckpts / "a", ckpts / "b"
    assert read_config(a).parallel.tensor_model_parallel_size == 2
    pa, pb = _params(a), _params(b)
    assert len(pa) == 28
    # every tensor differs, far above float noise (seeded inits and noise 0.05 N(0, 1) per model)
    assert min(float((pa[k] - pb[k]).abs().max()) for k in pa) > 1e-3

    out = tmp_path / "linear"
    code, errors = _run(capsys, "--load", a, b, "--save", out, "--weights", "1", "3")
    assert (code, errors) == (0, [])
    want = {k: 0.25 * pa[k].double() + 0.75 * pb[k].double() for k in pa}
    merged = _params(out)
    assert _max_diff(merged, want) <= TOL
    assert latest_iteration(out) == 0 and read_lora(out) is None
    cfg = read_config(out)
    assert (cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size) == (
        1,
        1,
    )
    cfg_a = read_config(a).to_dict()
    assert {k: v for k, v in cfg.to_dict().items() if k != "parallel"} == {
        k: v for k, v in cfg_a.items() if k != "parallel"
    }
    names = sorted(p.name for p in (a / TOKENIZER_DIR).iterdir())
    assert sorted(p.name for p in (out / TOKENIZER_DIR).iterdir()) == names
    for n in names:
        assert (out / TOKENIZER_DIR / n).read_bytes() == (a / TOKENIZER_DIR / n).read_bytes()
    assert not [p.name for p in out.iterdir() if p.name.startswith("optimizer")]
    # no temporary left beside, only the output's released lock (utils.locking)
    assert [p.name for p in tmp_path.glob(".linear.*")] == [".linear.nvembed-lock"]
    assert (tmp_path / ".linear.nvembed-lock").read_text() == ""

    t = 0.3
    out_s = tmp_path / "slerp"
    code, errors = _run(
        capsys, "--load", a, b, "--save", out_s, "--method", "slerp", "--slerp-t", t
    )
    assert (code, errors) == (0, [])
    want_s = {k: _slerp_reference(pa[k], pb[k], t) for k in pa}
    merged_s = _params(out_s)
    assert _max_diff(merged_s, want_s) <= TOL
    # slerp is not linear interpolation here (the tensors are far from colinear)
    lerp = {k: (1 - t) * pa[k].double() + t * pb[k].double() for k in pa}
    assert _max_diff(merged_s, lerp) > 1e-3

    hf = tmp_path / "hf"
    code, errors = _run(
        capsys,
        "export-hf",
        "--load",
        out,
        "--hf-dir",
        hf,
        "--dtype",
        "float32",
        tool="convert_checkpoint.py",
    )
    assert (code, errors) == (0, [])
    exported = load_file(hf / "model.safetensors")
    assert torch.equal(
        exported["embedding_model.embed_tokens.weight"],
        merged["embedding.word_embeddings.weight"][: cfg.model.vocab_size],
    )
    assert torch.equal(exported["latent_attention_model.latents"], merged["pooling.latents"])


@pytest.mark.functional
def test_lora_checkpoints_merge_as_stored(ckpts, tmp_path, capsys):
    from megatron_nvembed.checkpoint.store import read_lora, save_checkpoint
    from megatron_nvembed.model.lora import LoRAParallelLinear, apply_lora

    lora = {"rank": 4, "alpha": 8.0, "dropout": 0.1}
    from megatron_nvembed.checkpoint.store import load_checkpoint, read_config
    from megatron_nvembed.model.build import build_model

    for name, base, seed in (("la", ckpts / "b", 0), ("lb", ckpts / "b", 100)):
        cfg = read_config(base)
        model = build_model(cfg, init_single_process_megatron())
        load_checkpoint(model, base)
        apply_lora(model, lora["rank"], lora["alpha"], seed=seed)
        with torch.no_grad():
            for i, m in enumerate(x for x in model.modules() if isinstance(x, LoRAParallelLinear)):
                m.lora_B.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(seed + i))
        save_checkpoint(model, cfg, tmp_path / name, lora=lora)
        shutil.copytree(base / "tokenizer", tmp_path / name / "tokenizer")

    pa, pb = _params(tmp_path / "la", lora=lora), _params(tmp_path / "lb", lora=lora)
    assert len(pa) == 28 + 2 * 8  # A and B of 4 projections in 2 layers
    out = tmp_path / "lmerged"
    code, errors = _run(capsys, "--load", tmp_path / "la", tmp_path / "lb", "--save", out)
    assert (code, errors) == (0, [])
    assert read_lora(out) == lora
    want = {k: 0.5 * pa[k].double() + 0.5 * pb[k].double() for k in pa}
    assert _max_diff(_params(out, lora=lora), want) <= TOL
    # loadable into a plain model (adapters merged on load), as merge-lora / export-hf read it
    assert len(_params(out)) == 28

    # LoRA in one input only: refused, naming lora.json and merge-lora
    code, errors = _run(capsys, "--load", tmp_path / "la", ckpts / "b", "--save", tmp_path / "x")
    assert code == 2 and len(errors) == 1
    assert "lora.json" in errors[0] and "merge-lora" in errors[0]
    # adapters of another rank: refused, naming the file and both values
    shutil.copytree(tmp_path / "lb", tmp_path / "lc")
    lora_file = tmp_path / "lc" / "iter_0000000" / "lora.json"
    lora_file.write_text(json.dumps({**lora, "rank": 8}))
    code, errors = _run(
        capsys, "--load", tmp_path / "la", tmp_path / "lc", "--save", tmp_path / "x"
    )
    assert code == 2 and len(errors) == 1
    assert f"LoRA rank is 8 in {lora_file} but 4 in" in errors[0], errors[0]
    assert not (tmp_path / "x").exists()


@pytest.mark.functional
def test_bad_input_is_refused_before_anything_is_written(ckpts, tmp_path, capsys):
    a, b = ckpts / "a", ckpts / "b"
    other = tmp_path / "other"
    shutil.copytree(b, other)
    cfg_file = other / "iter_0000000" / "nvembed_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["model"]["rotary_base"] = 20000.0
    cfg_file.write_text(json.dumps(cfg))
    not_ckpt = tmp_path / "plain"
    not_ckpt.mkdir()
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("mine")
    out = tmp_path / "out"

    for argv, words in (
        (
            ("--load", a, other, "--save", out),
            f"--load {other}: model.rotary_base is 20000.0 in {cfg_file} but 10000.0 in the "
            f"first --load {a}",
        ),
        (("--load", a, b, "--save", out, "--weights", "1", "2", "3"), "--weights: 3 weights for 2"),
        (("--load", a, b, "--save", out, "--weights", "1", "nan"), "--weights: weight 2 is nan"),
        (("--load", a, b, "--save", out, "--method", "slerp", "--weights", "1", "2"), "--weights"),
        (
            ("--load", a, b, "--save", out, "--slerp-t", "0.5"),
            "--slerp-t applies to --method slerp",
        ),
        (("--load", a, b, "--save", out, "--method", "slerp", "--slerp-t", "2"), "--slerp-t"),
        (("--load", a, b, a, "--save", out, "--method", "slerp"), "exactly 2 checkpoints, got 3"),
        (("--load", a, "--save", out), "--load: give at least 2 checkpoints to merge, got 1"),
        (("--load", a, tmp_path / "nope", "--save", out), f"--load {tmp_path / 'nope'}: does not"),
        (("--load", a, not_ckpt, "--save", out), f"--load {not_ckpt}: not a megatron_nvembed"),
        (("--load", a, b, "--save", full), f"--save {full}: exists and is not empty"),
        (("--load", a, b, "--save", a / "merged", "--overwrite"), f"is inside --load {a}"),
    ):
        code, errors = _run(capsys, *argv)
        assert code == 2 and len(errors) == 1, (argv, errors)
        assert words in errors[0], errors[0]
    assert not out.exists() and not (a / "merged").exists()
    assert [p.name for p in full.iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "other", "plain"]

    code, errors = _run(capsys, "--load", a, b, "--save", full, "--overwrite")
    assert (code, errors) == (0, [])
    assert (
        not (full / "notes.txt").exists() and (full / "latest_checkpointed_iteration.txt").is_file()
    )


@pytest.mark.functional
def test_help_imports_no_torch():
    code = (
        "import runpy, sys\n"
        "sys.argv = ['merge_checkpoints.py', '--help']\n"
        "try:\n"
        f"    runpy.run_path({str(ROOT / 'tools' / 'merge_checkpoints.py')!r}, run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
        "assert 'torch' not in sys.modules\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("usage:") == 1 and "--slerp-t" in proc.stdout
