"""Command line of the training entry point: `--recipe NAME` plus Megatron-LM's flag names.

Every flag defaults to "not given"; the recipe supplies the value unless the flag is given, so
`--recipe nvembed_mistral_7b_stage1 --lr 1e-5` changes exactly the learning rate.
"""

from __future__ import annotations

import argparse
import sys

from megatron_nvembed.training.config import TrainingConfig
from megatron_nvembed.training.recipes import RECIPES, get_recipe

# flag -> TrainingConfig attribute path ("model.model.hidden_dropout"), type
_FLAGS: list[tuple[str, str, type, str]] = [
    (
        "--tensor-model-parallel-size",
        "model.parallel.tensor_model_parallel_size",
        int,
        "ranks splitting each layer",
    ),
    (
        "--pipeline-model-parallel-size",
        "model.parallel.pipeline_model_parallel_size",
        int,
        "pipeline stages",
    ),
    ("--micro-batch-size", "micro_batch_size", int, "queries per micro-batch per DP rank"),
    ("--global-batch-size", "global_batch_size", int, "queries per optimizer step, all ranks"),
    ("--train-iters", "train_iters", int, "optimizer steps"),
    ("--lr", "lr", float, "peak learning rate"),
    ("--min-lr", "min_lr", float, "learning rate at the end of the decay"),
    ("--lr-warmup-iters", "lr_warmup_iters", int, "linear warm-up steps"),
    ("--lr-decay-iters", "lr_decay_iters", int, "decay steps (default --train-iters)"),
    ("--lr-decay-style", "lr_decay_style", str, "linear, cosine or constant"),
    ("--weight-decay", "weight_decay", float, "Adam(W) weight decay"),
    ("--adam-beta1", "adam_beta1", float, "Adam(W) first-moment decay"),
    ("--adam-beta2", "adam_beta2", float, "Adam(W) second-moment decay"),
    ("--adam-eps", "adam_eps", float, "Adam(W) denominator epsilon"),
    ("--clip-grad", "clip_grad", float, "gradient-norm clipping (0: off)"),
    ("--seed", "seed", int, "seed of initialisation, data order and dropout"),
    ("--hidden-dropout", "model.model.hidden_dropout", float, "dropout after attention and MLP"),
    (
        "--attention-dropout",
        "model.model.attention_dropout",
        float,
        "dropout on the attention probabilities",
    ),
    (
        "--recompute-granularity",
        "model.model.recompute_granularity",
        str,
        "activation recompute: full or selective",
    ),
    (
        "--recompute-num-layers",
        "model.model.recompute_num_layers",
        int,
        "layers per recomputed chunk with --recompute-granularity full",
    ),
    ("--attention-backend", "model.model.attention_backend", str, "auto, te, sdpa or local"),
    ("--save", "save", str, "checkpoint directory to write"),
    ("--load", "load", str, "checkpoint directory to resume from (if it holds one)"),
    ("--save-interval", "save_interval", int, "iterations between checkpoints"),
    ("--log-interval", "log_interval", int, "iterations between log lines"),
    ("--log-json", "log_json", str, "append one JSON object per logged iteration to this file"),
    ("--stage", "stage", int, "1 (in-batch + hard negatives) or 2 (in-batch off)"),
    ("--lora-rank", "lora.rank", int, "LoRA rank (0: full fine-tuning)"),
    ("--lora-alpha", "lora.alpha", float, "LoRA scale: adapter output times alpha / rank"),
    ("--lora-dropout", "lora.dropout", float, "dropout on the LoRA adapter input"),
    ("--temperature", "temperature", float, "softmax temperature of the contrastive loss"),
    (
        "--false-negative-margin",
        "false_negative_margin",
        float,
        "exclude negatives scoring above this fraction of the positive's score",
    ),
    (
        "--batch-composition",
        "batch_composition",
        str,
        "systematic or multinomial (datasets blended in every global batch by weight), or "
        "homogeneous (each global batch from one dataset, drawn by weight)",
    ),
    (
        "--distill-weight",
        "distill_weight",
        float,
        "weight of the KL term towards the records' teacher scores (pos_scores / neg_scores; "
        "0: off)",
    ),
    (
        "--distill-temperature",
        "distill_temperature",
        float,
        "temperature of the teacher scores in the distillation term",
    ),
    (
        "--pretrained-checkpoint",
        "pretrained_checkpoint",
        str,
        "initial weights (import-hf output or a stage-1 save); optimizer state not loaded",
    ),
    ("--tokenizer", "tokenizer", str, "tokenizer directory (default: the checkpoint's)"),
    ("--num-negatives", "num_negatives", int, "hard negatives per query"),
    ("--seq-length", "seq_length", int, "token limit per text"),
    (
        "--length-bucket-size",
        "length_bucket_size",
        int,
        "rows per forward call when a micro-batch's texts are run in length-sorted buckets, each "
        "padded to its own longest text (0: queries in one call, candidates in another)",
    ),
    (
        "--max-nonfinite-steps",
        "max_nonfinite_steps",
        int,
        "non-finite losses in a row before aborting (each skips its step)",
    ),
    ("--eval-interval", "eval_interval", int, "iterations between validations"),
    (
        "--eval-instruction",
        "eval_instruction",
        str,
        "query instruction for --eval-data (a task definition, or a complete prefix starting "
        "with 'Instruct:')",
    ),
    (
        "--query-template",
        "query_template",
        str,
        "the model's query prefix, {instruction} replaced by the task definition (default: the "
        "checkpoint's; NV-Embed's 'Instruct: {instruction}\\nQuery: ' for a new model); saved with "
        "the model and written into exports' prompts",
    ),
    ("--eval-batch-size", "eval_batch_size", int, "texts per forward call in validation"),
    (
        "--eval-iters",
        "eval_iters",
        int,
        "validation batches of --eval-batch-size queries per set (default: every query)",
    ),
    ("--tensorboard-dir", "tensorboard_dir", str, "write the log's scalars for TensorBoard here"),
    ("--wandb-project", "wandb_project", str, "log the log's scalars to this W&B project"),
    ("--wandb-exp-name", "wandb_exp_name", str, "W&B run name"),
    ("--wandb-save-dir", "wandb_save_dir", str, "W&B run folder (default: --save/wandb)"),
    ("--exit-interval", "exit_interval", int, "save and exit at a multiple of this iteration"),
    (
        "--exit-duration-in-mins",
        "exit_duration_in_mins",
        float,
        "save and exit after this many minutes of training",
    ),
]


# dest -> TrainingConfig attribute path of the flags added by hand in `build_parser`.
_OTHER_PATHS: dict[str, str] = {
    "train_data": "train_data",
    "eval_data": "eval_data",
    "bf16": "model.model.bf16",
    "grad_cache": "grad_cache",
    "in_batch_negatives": "in_batch",
    "use_distributed_optimizer": "use_distributed_optimizer",
    "skip_bad_records": "skip_bad_records",
    "pack_sequences": "pack_sequences",
    "override_opt_param_scheduler": "override_opt_param_scheduler",
    "matryoshka_dims": "matryoshka_dims",
    "matryoshka_weights": "matryoshka_weights",
    "query_query_negatives": "query_query_negatives",
    "document_document_negatives": "document_document_negatives",
}


def _paths() -> dict[str, str]:
    """argparse dest -> TrainingConfig attribute path, for every flag a recipe supplies."""
    return {flag.lstrip("-").replace("-", "_"): path for flag, path, _, _ in _FLAGS} | _OTHER_PATHS


def build_parser(recipe: str | None = None, stage: int | None = None) -> argparse.ArgumentParser:
    """The flags; with `recipe` each flag's help ends with that recipe's value
    ("(recipe nvembed_mistral_7b_stage1: 2e-05)"), which `--help --recipe NAME` shows.

    Raises:
        ValueError: unknown `recipe` (naming --recipe).
    """
    parser = argparse.ArgumentParser(
        prog="pretrain_nvembed.py",
        # argparse's generated usage lists every flag (50 lines) above each error message.
        usage="%(prog)s [--recipe NAME] [--FLAG VALUE ...]  (--help: every flag)",
        description="Contrastive training of NV-Embed-style embedding models on Megatron-core. "
        "Flags left out take the recipe's value; --help --recipe NAME shows NAME's values.",
    )
    parser.add_argument(
        "--recipe",
        default="tiny",
        help=f"one of {sorted(RECIPES)} (or a name without _stageN plus --stage)",
    )
    for flag, _, kind, help_text in _FLAGS:
        parser.add_argument(flag, type=kind, default=None, help=help_text)
    parser.add_argument(
        "--train-data",
        nargs="+",
        default=None,
        help="paths, or weight/path pairs: 0.3 a.jsonl 0.7 b.jsonl",
    )
    parser.add_argument("--eval-data", nargs="+", default=None, help="BEIR-format folders")
    parser.add_argument(
        "--bf16",
        action="store_true",
        default=None,
        help="bfloat16 parameters and compute (GPU; CPU runs stay float32)",
    )
    parser.add_argument(
        "--fp32", dest="bf16", action="store_false", help="float32 even if the recipe says bf16"
    )
    parser.add_argument(
        "--grad-cache",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="in-batch negatives over the whole global batch (GradCache)",
    )
    parser.add_argument(
        "--in-batch-negatives",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="score other queries' candidates too (default: on in stage 1, off in stage 2)",
    )
    parser.add_argument(
        "--matryoshka-dims",
        nargs="+",
        type=int,
        default=None,
        help="train the embedding's prefixes too: the loss summed over these widths, each "
        "prefix L2-normalised (e.g. 4096 2048 1024 512 256; docs/loss.md)",
    )
    parser.add_argument(
        "--matryoshka-weights",
        nargs="+",
        type=float,
        default=None,
        help="one weight per --matryoshka-dims width (default 1 each)",
    )
    parser.add_argument(
        "--query-query-negatives",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="other in-batch queries are negatives too (needs in-batch negatives)",
    )
    parser.add_argument(
        "--document-document-negatives",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="in-batch documents are negatives of the query's positive too, scored against "
        "it (needs in-batch negatives)",
    )
    parser.add_argument(
        "--use-distributed-optimizer",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="shard optimizer state over DP ranks",
    )
    parser.add_argument(
        "--pack-sequences",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="pack several texts per row (at most --seq-length tokens), each attending only to "
        "itself, so the backbone skips padding (THD layout on te / sdpa, a block mask on local)",
    )
    parser.add_argument(
        "--override-opt-param-scheduler",
        action="store_true",
        default=None,
        help="on resume, use the schedule flags (--lr, --min-lr, --lr-warmup-iters, "
        "--lr-decay-iters / --train-iters, --lr-decay-style, --weight-decay) instead of the "
        "checkpoint's, from the resumed iteration on; without it different values are refused",
    )
    parser.add_argument(
        "--skip-bad-records",
        action="store_true",
        default=None,
        help="skip (and count) malformed records instead of stopping at the first",
    )
    parser.add_argument(
        "--check-args",
        action="store_true",
        help="check the flags and that the input paths exist, then exit without training "
        "(0: fine, 2: an error naming the flag); examples/pretrain_nvembed.sh runs this before "
        "starting torchrun",
    )
    if recipe is not None:
        _annotate_with_recipe(parser, recipe, stage)
    return parser


def _annotate_with_recipe(parser: argparse.ArgumentParser, recipe: str, stage: int | None) -> None:
    cfg = get_recipe(recipe, stage)
    name = cfg.recipe if cfg.recipe != "custom" else recipe
    paths = _paths()
    seen = set()
    for action in parser._actions:
        path = paths.get(action.dest)
        if path is None or action.dest in seen:  # --fp32 shares --bf16's dest
            continue
        seen.add(action.dest)
        value = cfg
        try:
            for attr in path.split("."):
                value = getattr(value, attr)
        except AttributeError:
            continue  # a flag whose config field this recipe's config does not carry
        if isinstance(value, bool):
            shown = "on" if value else "off"
        elif value is None or value == []:
            shown = "not set"
        elif isinstance(value, list):
            shown = " ".join(map(str, value))
        else:
            shown = repr(value) if isinstance(value, str) else str(value)
        action.help = f"{action.help or ''} (recipe {name}: {shown})".lstrip()


def parser_for(argv: list[str]) -> argparse.ArgumentParser:
    """`build_parser` for this command line: with `-h` / `--help`, annotated with the values of
    the `--recipe` (and `--stage`) given.

    Raises:
        ValueError: unknown --recipe, or --stage contradicting it.
    """
    if not {"-h", "--help"} & set(argv):
        return build_parser()
    pre = argparse.ArgumentParser(add_help=False)  # never prints: the full parser does
    pre.add_argument("--recipe", default="tiny", help=argparse.SUPPRESS)
    pre.add_argument("--stage", type=int, default=None, help=argparse.SUPPRESS)
    try:
        known, _ = pre.parse_known_args(argv)
    except SystemExit:  # a malformed --stage: the full parser reports it
        return build_parser()
    return build_parser(known.recipe, known.stage)


def _set(cfg, path: str, value) -> None:
    *parents, leaf = path.split(".")
    obj = cfg
    for name in parents:
        obj = getattr(obj, name)
    setattr(obj, leaf, value)


def parse_args(argv=None) -> TrainingConfig:
    """Flags -> validated TrainingConfig (recipe values unless a flag is given).

    Raises:
        SystemExit (argparse) / ValueError naming the flag.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    return config_from_args(parser_for(argv).parse_args(argv))


def config_from_args(args: argparse.Namespace) -> TrainingConfig:
    """Parsed flags -> validated TrainingConfig (recipe values unless a flag is given).

    Raises:
        ValueError naming the flag.
    """
    cfg = get_recipe(args.recipe, args.stage)
    values = vars(args)
    for flag, path, _, _ in _FLAGS:
        value = values[flag.lstrip("-").replace("-", "_")]
        if value is not None:
            _set(cfg, path, value)
    for name, path in _OTHER_PATHS.items():
        if values[name] is not None:
            _set(cfg, path, values[name])
    return cfg.validate()
