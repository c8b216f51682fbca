"""Runs under the reference venv (transformers 4.42.4, tokenizers 0.19.1: what NV-Embed's released
code needs), never under the project's own environment; the compatibility tests call it as a
subprocess. It imports nothing from megatron_nvembed: it is the client side of an exported model.

  python reference_client.py build-tokenizer SPM_MODEL OUT_DIR
      Mistral-7B-v0.1's tokenizer folder from its SentencePiece model: tokenizer.json made by
      transformers 4.42's own slow->fast converter (LlamaTokenizerFast, legacy=True: how the
      model repository's tokenizer.json was made), with the repository's tokenizer_config.json
      and special_tokens_map.json settings (BOS on, EOS off, legacy true, class LlamaTokenizer).
  python reference_client.py encode JOBS.json
      JOBS.json: {"jobs": [{"model_dir", "out", "requests": [{"name", "texts", "instruction",
      "max_length"}]}]}. Each model folder is loaded with AutoModel.from_pretrained(".",
      trust_remote_code=True) from inside it (so the released code's `text_config._name_or_path`
      "." resolves to it); each request runs the model's own `encode(texts, instruction=...,
      max_length=...)` and records what `encode` fed the model: per text the token ids and pool
      mask (padding removed), and the embeddings (L2-normalised, as NV-Embed's users do). A
      folder that fails to load records `load_error` (the tests decide whether that was due).
"""

from __future__ import annotations

import json
import os
import shutil
import sys


def build_tokenizer(spm_model: str, out_dir: str) -> None:
    from transformers import LlamaTokenizerFast

    os.makedirs(out_dir, exist_ok=True)
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "legacy": True,
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": None,
        "sp_model_kwargs": {},
        "spaces_between_special_tokens": False,
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    work = out_dir + ".work"
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    shutil.copyfile(spm_model, os.path.join(work, "tokenizer.model"))
    with open(os.path.join(work, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    fast = LlamaTokenizerFast.from_pretrained(work, from_slow=True, legacy=True)
    fast.backend_tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
    shutil.copyfile(spm_model, os.path.join(out_dir, "tokenizer.model"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
        json.dump(special, f, indent=2)
    shutil.rmtree(work)


def encode(jobs_file: str) -> None:
    with open(jobs_file) as f:
        jobs = json.load(f)["jobs"]
    for job in jobs:
        _encode_one(job["model_dir"], job["requests"], job["out"])


def _encode_one(model_dir: str, requests: list, out_file: str) -> None:
    import numpy as np
    import torch
    from transformers import AutoModel

    os.chdir(os.path.abspath(model_dir))
    out = {}
    try:
        model = AutoModel.from_pretrained(".", trust_remote_code=True).eval().float()
    except Exception as err:  # the test decides whether a failure was expected
        out["load_error"] = np.array(f"{type(err).__name__}: {err}")
        np.savez(out_file, **out)
        return
    seen = []
    original = model.forward

    def recording_forward(*args, **kwargs):
        seen.append({k: kwargs[k].clone() for k in ("input_ids", "attention_mask", "pool_mask")})
        return original(*args, **kwargs)

    model.forward = recording_forward
    for item in requests:
        seen.clear()
        with torch.no_grad():
            emb = model.encode(
                item["texts"], instruction=item["instruction"], max_length=item["max_length"]
            )
        emb = torch.nn.functional.normalize(emb.float(), dim=-1)
        (feed,) = seen
        lengths = feed["attention_mask"].sum(1).tolist()
        name = item["name"]
        out[f"{name}/embeddings"] = emb.numpy()
        out[f"{name}/ids"] = np.array(
            [json.dumps(r[:n]) for r, n in zip(feed["input_ids"].tolist(), lengths)]
        )
        out[f"{name}/pool"] = np.array(
            [json.dumps(r[:n]) for r, n in zip(feed["pool_mask"].tolist(), lengths)]
        )
    np.savez(out_file, **out)


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    {"build-tokenizer": build_tokenizer, "encode": encode}[command](*args)
