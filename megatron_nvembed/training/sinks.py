"""Where the training scalars go: the JSON log (`--log-json`), TensorBoard (`--tensorboard-dir`)
and Weights & Biases (`--wandb-project`).

The loop builds one record per logged iteration (`metrics.log_record`) and one per validation
(`{"iteration", "eval": {set: metrics}}`); `Sinks.write(record, step)` hands that same record to
every configured sink, so the JSON log, TensorBoard and W&B always carry the same values. A
scalar's TensorBoard tag / W&B key is its JSON key, nested keys joined by "/"
(`loss`, `tokens_per_s`, `eval/<set>/ndcg_at_10`).

Only the reporting rank (the last rank: last pipeline stage, where the loss is known) creates
sinks; the others get an empty `Sinks`. `require_sink_packages` runs on every rank before any
work, so a missing package stops all ranks alike with the flag and the extra to install.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Protocol

# flag -> (config attribute, importable package, setup.py extra)
_OPTIONAL = {
    "--tensorboard-dir": ("tensorboard_dir", "tensorboard", "tensorboard"),
    "--wandb-project": ("wandb_project", "wandb", "wandb"),
}


class Sink(Protocol):
    def write(self, record: dict, step: int) -> None: ...

    def close(self) -> None: ...


def scalars(record: dict, prefix: str = "") -> dict[str, float]:
    """The record's numbers by tag: nested keys joined with "/"; `iteration` (the step), strings,
    booleans and nulls are left out. Non-finite values (a skipped step's NaN loss) are kept."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if not prefix and key == "iteration":
            continue
        tag = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(scalars(value, f"{tag}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[tag] = float(value)
    return out


def require_sink_packages(cfg) -> None:
    """Checks that the packages of the sinks a `LoggingConfig` requests are installed (call on
    every rank).

    Raises:
        ValueError: naming the flag and the extra that installs the package (bad input: the
            entry point reports it in one line with exit code 2).
    """
    for flag, (attr, package, extra) in _OPTIONAL.items():
        if getattr(cfg, attr) and importlib.util.find_spec(package) is None:
            raise ValueError(
                f"{flag} needs the {package} package: pip install 'megatron_nvembed[{extra}]' "
                f"(or pip install {package})"
            )


class JsonLinesSink:
    """`--log-json`: one JSON object per record, appended and flushed."""

    def __init__(self, path: str):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "a", encoding="utf-8")

    def write(self, record: dict, step: int) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class TensorBoardSink:
    """`--tensorboard-dir`: `add_scalar(tag, value, step)` per scalar (stored as float32)."""

    def __init__(self, log_dir: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=log_dir)

    def write(self, record: dict, step: int) -> None:
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """`--wandb-project`: one W&B run per `train()` call; `WANDB_MODE=offline` (read by W&B
    itself) keeps it on disk, to be uploaded later with `wandb sync`."""

    def __init__(self, project: str, name: str | None, save_dir: str | None, config: dict):
        import wandb

        if save_dir is not None:
            Path(save_dir).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=project, name=name, dir=save_dir, config=config)

    def write(self, record: dict, step: int) -> None:
        self.run.log(scalars(record), step=step)

    def close(self) -> None:
        self.run.finish()


class Sinks:
    """The configured sinks behind one `write(record, step)` / `close()`."""

    def __init__(self, sinks: list[Sink] | None = None):
        self.sinks = list(sinks or [])

    def write(self, record: dict, step: int) -> None:
        for sink in self.sinks:
            sink.write(record, step)

    def close(self) -> None:
        errors = []
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as err:  # close every sink even if one fails
                errors.append(err)
        self.sinks = []
        if errors:
            raise errors[0]


def build_sinks(cfg) -> Sinks:
    """The sinks `cfg` (a `TrainingConfig`) asks for (`--log-json`, `--tensorboard-dir`,
    `--wandb-project`: its `logging` section); call on the reporting rank only."""
    log, save = cfg.logging, cfg.checkpoint.save
    sinks: list[Sink] = []
    if log.log_json:
        sinks.append(JsonLinesSink(log.log_json))
    if log.tensorboard_dir:
        sinks.append(TensorBoardSink(log.tensorboard_dir))
    if log.wandb_project:
        save_dir = log.wandb_save_dir or (os.path.join(save, "wandb") if save else None)
        sinks.append(WandbSink(log.wandb_project, log.wandb_exp_name, save_dir, cfg.to_dict()))
    return Sinks(sinks)
