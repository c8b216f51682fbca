#!/usr/bin/env python3
"""Convert checkpoints between transformers / NV-Embed format and megatron_nvembed.

  import-hf  --hf-dir SRC --save DST [--tensor-model-parallel-size N]
             [--pipeline-model-parallel-size M] [--pooling latent|mean|eos|self-attention]
             [--mask-type bidirectional|causal] [--pooling-num-latents R]
             [--pooling-num-attention-heads H] [--pooling-head-dim D]
             [--dtype bfloat16|float16|float32] [--overwrite]
  export-hf  --load SRC --hf-dir DST [--dtype bfloat16|float16|float32]
             [--format nvembed|sentence-transformers] [--overwrite]
  merge-lora --load SRC --save DST [--peft-dir DIR --peft-base-model BASE
             [--peft-target nvembed|mistral]] [--overwrite]

Every output folder (DST, DIR) must be new or empty: an existing non-empty one is refused
(exit code 2) unless --overwrite is given, and then replaced whole, swapped in only once the
conversion has succeeded. An output that is SRC, lies inside SRC or holds SRC is always refused,
as is an output path that is a file or a symbolic link. These checks run before anything is read.

import-hf reads Mistral/Llama (`*ForCausalLM` or bare `*Model`) and NV-Embed checkpoints and
writes a checkpoint sharded for the requested TP/PP (it runs TP x PP processes on this machine),
in the source's dtype unless --dtype is given; export-hf writes the checkpoint's dtype unless
--dtype is given. Every conversion holds one parameter (or one layer) at a time.
A source without a pooling head gets a new, seeded one: --pooling picks its type and
--pooling-num-latents / --pooling-num-attention-heads / --pooling-head-dim its size (NV-Embed's
512 / 8 / model width by default); for a source that has a head these flags are errors.
export-hf writes NV-Embed's HF format, loadable offline with
`AutoModel.from_pretrained(DST, trust_remote_code=True)` (transformers 4.42 and 5, NV-Embed's
released code, sentence-transformers: docs/conversion.md); a relocatable folder with the
tokenizer files copied unchanged; any saved TP/PP layout is resharded; LoRA adapters in SRC are
merged into the exported weights.
merge-lora folds a training checkpoint's LoRA adapters into the base weights and writes a plain
checkpoint (tokenizer copied, optimizer state dropped); --peft-dir also writes the adapters in
PEFT's format for the model the LoRA run started from, BASE (hub id or path, recorded as given):
--peft-target nvembed (default) for an export-hf of that checkpoint, trained pooling head
included; mistral for a plain transformers MistralModel with the same backbone weights.
"""

import argparse
import sys

_OVERWRITE_HELP = (
    "replace an existing non-empty output folder whole (swapped in once the conversion has "
    "succeeded); never allows writing over or inside the source"
)


def _add_import_hf(sub) -> None:
    imp = sub.add_parser("import-hf", help="transformers / NV-Embed -> megatron_nvembed")
    imp.add_argument(
        "--hf-dir",
        required=True,
        help="transformers folder: config.json, *.safetensors, tokenizer.json (Mistral / Llama "
        "decoder or NV-Embed)",
    )
    imp.add_argument(
        "--save",
        required=True,
        help="checkpoint folder to write: new or empty unless --overwrite; never --hf-dir, "
        "inside it or around it",
    )
    imp.add_argument(
        "--tensor-model-parallel-size", type=int, default=1, help="TP of the written shards"
    )
    imp.add_argument(
        "--pipeline-model-parallel-size", type=int, default=1, help="PP of the written shards"
    )
    imp.add_argument(
        "--pooling",
        choices=["latent", "mean", "eos", "self-attention"],
        help="pooling head (default: the source's, else latent); a source with a head keeps it",
    )
    imp.add_argument(
        "--mask-type",
        choices=["bidirectional", "causal"],
        help="attention mask (default: the source's, else bidirectional)",
    )
    imp.add_argument("--seed", type=int, default=1234, help="initialisation of a new pooling head")
    # Megatron's --num-attention-heads / the paper's "latents", prefixed like --pooling: these
    # size the pooling head only, never the decoder.
    imp.add_argument(
        "--pooling-num-latents",
        type=int,
        default=None,
        help="latent array rows of a new latent head (default 512, NV-Embed's)",
    )
    imp.add_argument(
        "--pooling-num-attention-heads",
        type=int,
        default=None,
        help="attention heads of a new latent or self-attention head (default 8); divisible by "
        "--tensor-model-parallel-size",
    )
    imp.add_argument(
        "--pooling-head-dim",
        type=int,
        default=None,
        help="width of each of those heads (default: the model width, as NV-Embed)",
    )
    imp.add_argument(
        "--dtype",
        default=None,
        choices=["bfloat16", "float16", "float32"],
        help="dtype of the checkpoint's weights (default: the source's, e.g. bfloat16 for a "
        "bf16 model; training keeps fp32 master weights in its optimizer whatever the dtype)",
    )
    imp.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)


def _add_export_hf(sub) -> None:
    exp = sub.add_parser("export-hf", help="megatron_nvembed -> NV-Embed HF format")
    exp.add_argument("--load", required=True, help="checkpoint folder (any saved TP/PP layout)")
    exp.add_argument(
        "--hf-dir",
        required=True,
        help="NV-Embed-format folder to write: new or empty unless --overwrite; never --load, "
        "inside it or around it",
    )
    exp.add_argument(
        "--dtype",
        default=None,
        choices=["bfloat16", "float16", "float32"],
        help="dtype of the written weights (default: the checkpoint's)",
    )
    exp.add_argument(
        "--format",
        default="nvembed",
        choices=["nvembed", "sentence-transformers"],
        help="nvembed: NV-Embed's format, every head and mask (default); sentence-transformers: "
        "that library's native layout (plain transformers backbone + Pooling + Normalize, no "
        "remote code) for eos-pooled causal models such as a Qwen3-Embedding fine-tune",
    )
    exp.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)


def _add_merge_lora(sub) -> None:
    mrg = sub.add_parser("merge-lora", help="fold LoRA adapters into the base weights")
    mrg.add_argument("--load", required=True, help="training checkpoint with LoRA adapters")
    mrg.add_argument(
        "--save",
        required=True,
        help="plain checkpoint folder to write: new or empty unless --overwrite; never --load, "
        "inside it or around it",
    )
    mrg.add_argument(
        "--peft-dir",
        default=None,
        help="also write PEFT-format adapters to this folder: new or empty unless --overwrite; "
        "never --load, inside it or around it, nor --save or inside it",
    )
    mrg.add_argument(
        "--peft-base-model",
        default=None,
        help="with --peft-dir (required): the base model the adapters apply to, a hub id or a "
        "path, written as base_model_name_or_path (AutoPeftModel loads it from there)",
    )
    mrg.add_argument(
        "--peft-target",
        default=None,
        choices=["nvembed", "mistral"],
        help="nvembed: the exported NV-Embed model, trained pooling head included (default); "
        "mistral: a plain transformers MistralModel, backbone adapters only",
    )
    mrg.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)


def build_parser() -> argparse.ArgumentParser:
    """The command line: one subparser per subcommand."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_import_hf, _add_export_hf, _add_merge_lora):
        add(sub)
    return parser


def run_import_hf(args: argparse.Namespace) -> str:
    """import-hf (its output checks run first, before anything is read); returns the summary."""
    from megatron_nvembed.conversion.import_hf import import_hf

    cfg = import_hf(
        args.hf_dir,
        args.save,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        pooling=args.pooling,
        mask_type=args.mask_type,
        seed=args.seed,
        num_latents=args.pooling_num_latents,
        num_heads=args.pooling_num_attention_heads,
        head_dim=args.pooling_head_dim,
        overwrite=args.overwrite,
        dtype=args.dtype,
    )
    return (
        f"wrote {args.save} (TP={args.tensor_model_parallel_size}, "
        f"PP={args.pipeline_model_parallel_size}, pooling={cfg.pooling.type})"
    )


def run_export_hf(args: argparse.Namespace) -> str:
    """export-hf in this process at TP = PP = 1; returns the summary."""
    from megatron_nvembed.conversion.export_hf import check_export_paths, export_hf
    from megatron_nvembed.core.parallel import initialize_model_parallel

    # Before megatron-core is set up or anything is read (the library repeats it).
    check_export_paths(args.load, args.hf_dir, overwrite=args.overwrite)
    initialize_model_parallel(1, 1)
    export_hf(
        args.load, args.hf_dir, dtype=args.dtype, overwrite=args.overwrite, format=args.format
    )
    return f"wrote {args.hf_dir}"


def run_merge_lora(args: argparse.Namespace) -> str:
    """merge-lora in this process at TP = PP = 1; returns the summary."""
    from megatron_nvembed.conversion.merge_lora import (
        check_merge_lora_paths,
        merge_lora_checkpoint,
    )
    from megatron_nvembed.core.parallel import initialize_model_parallel

    # Before megatron-core is set up or anything is read (the library repeats it).
    check_merge_lora_paths(args.load, args.save, args.peft_dir, overwrite=args.overwrite)
    initialize_model_parallel(1, 1)
    lora = merge_lora_checkpoint(
        args.load,
        args.save,
        args.peft_dir,
        peft_base_model=args.peft_base_model,
        peft_target=args.peft_target,
        overwrite=args.overwrite,
    )
    return f"wrote {args.save} (LoRA rank {lora['rank']} merged)"


COMMANDS = {"import-hf": run_import_hf, "export-hf": run_export_hf, "merge-lora": run_merge_lora}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_nvembed.core.logging_utils import setup_logging

    setup_logging(note_kernels=True)
    from megatron_nvembed.utils.diskspace import DISK_FULL_EXIT, DiskFullError

    try:
        print(COMMANDS[args.command](args))
    except (FileNotFoundError, ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except DiskFullError as err:
        print(f"error: {err}", file=sys.stderr)
        return DISK_FULL_EXIT
    return 0


if __name__ == "__main__":
    sys.exit(main())
