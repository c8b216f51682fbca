"""Command line of the training entry point: `--recipe NAME` plus Megatron-LM's flag names.

The flags are generated from `TrainingConfig`'s fields (`utils.options.option`: flag, type, help);
nothing here names a setting. Every flag defaults to "not given"; the recipe supplies the value
unless the flag is given, so `--recipe nvembed_mistral_7b_stage1 --lr 1e-5` changes exactly the
learning rate.
"""

from __future__ import annotations

import argparse
import sys

from megatron_nvembed.training.config import TrainingConfig
from megatron_nvembed.training.recipes import RECIPES, get_recipe
from megatron_nvembed.utils.options import field_type, option_of, walk_options


def _add_flag(parser, path: str, cls: type, f) -> None:
    """The flag of one config field; its dest is the field's dotted path in `TrainingConfig`."""
    opt, kind = option_of(f), field_type(cls, f.name)
    if kind.base is bool:
        parser.add_argument(
            opt.flag, dest=path, action=argparse.BooleanOptionalAction, default=None, help=opt.help
        )
        if opt.negative:
            parser.add_argument(
                opt.negative, dest=path, action="store_false", help=f"the opposite of {opt.flag}"
            )
        return
    parser.add_argument(
        opt.flag,
        dest=path,
        type=kind.base,  # bounds and finiteness: `check_options`, naming the flag
        nargs="+" if kind.is_list else None,
        default=None,
        metavar=opt.flag.lstrip("-").split("-")[-1].upper(),
        help=opt.help,
    )


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
    groups = {}  # one --help section per config section
    for path, cls, f in walk_options(TrainingConfig):
        section = path.split(".")[0] if "." in path else "run"
        if section not in groups:
            groups[section] = parser.add_argument_group(
                f"{section} (TrainingConfig.{section})" if section != "run" else "run"
            )
        _add_flag(groups[section], path, cls, f)
    parser.add_argument(
        "--check-args",
        action="store_true",
        help="check the flags and that the input paths exist, then exit without training "
        "(0: fine, 2: an error naming the flag); examples/pretrain_nvembed.sh runs this before "
        "starting torchrun",
    )
    if recipe is not None:
        _annotate_with_recipe(parser, get_recipe(recipe, stage), recipe)
    return parser


def _shown(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if value is None or value == []:
        return "not set"
    if isinstance(value, list):
        return " ".join(map(str, value))
    return repr(value) if isinstance(value, str) else str(value)


def _annotate_with_recipe(parser: argparse.ArgumentParser, cfg: TrainingConfig, asked: str) -> None:
    name = cfg.recipe if cfg.recipe != "custom" else asked
    paths = {path for path, _, _ in walk_options(TrainingConfig)}
    seen = set()
    for action in parser._actions:
        if action.dest not in paths or action.dest in seen:
            continue  # --recipe, --check-args, --help; --fp32 shares --bf16's dest
        seen.add(action.dest)
        action.help = f"{action.help or ''} (recipe {name}: {_shown(_get(cfg, action.dest))})"


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


def _get(cfg, path: str):
    for name in path.split("."):
        cfg = getattr(cfg, name)
    return cfg


def _set(cfg, path: str, value) -> None:
    *parents, leaf = path.split(".")
    for name in parents:
        cfg = getattr(cfg, name)
    setattr(cfg, leaf, value)


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
    values = vars(args)
    cfg = get_recipe(args.recipe, values.get("stage"))
    for path, _, _ in walk_options(TrainingConfig):
        if values.get(path) is not None:
            _set(cfg, path, values[path])
    return cfg.validate()
