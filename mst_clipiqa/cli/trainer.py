"""The Trainer's commands, `mst-clipiqa {fit,validate,test,predict}`: LightningCLI with this package's model, data
module, checkpointing and W&B reporting."""

from __future__ import annotations

import inspect
import logging
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

from jsonargparse import Namespace, set_parsing_settings
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.strategies import DDPStrategy

from mst_clipiqa.cli.parse_errors import NEED_WEIGHTS, SuggestingErrors, no_weights
from mst_clipiqa.data.datamodule import IQADataModule
from mst_clipiqa.hub.saved_model import SavedModel
from mst_clipiqa.model import ModelConfig
from mst_clipiqa.scoring.predictions import PredictionWriter
from mst_clipiqa.training.callbacks import SaveConfigToWandb, WandbEvaluationLogger
from mst_clipiqa.training.checkpoints import ResumingModelCheckpoint, continue_run, read_checkpoint, resolve_ckpt_path
from mst_clipiqa.training.launch import check_world_size, take_launcher_options
from mst_clipiqa.training.lit_module import MSTCLIPIQAModule, settings_from

TRAINER_DEFAULTS = {"devices": 1, "enable_model_summary": False}
"""Trainer options whose default here is not Lightning's: one device unless asked (a launcher's fills it in); no model
summary table (the module prints its trainable and frozen counts)."""

NOISE = (
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # torch's, about Lightning's own code
    r"Starting from v1\.9\.0, `tensorboardX` has been removed",  # logger=True without tensorboard: a CSVLogger
)
"""Third-party warnings that a user of the commands can do nothing about."""


def _no_tips(record: logging.LogRecord) -> bool:
    """A logging filter that drops Lightning's advertisements for its cloud services ("💡 Tip: ... litlogger")."""
    return not str(record.msg).startswith("💡 Tip:")


def quiet_third_party() -> None:
    """Keep a command's output to what its user needs; called as the command starts, for the process it runs."""
    for message in NOISE:
        warnings.filterwarnings("ignore", message=message)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_no_tips)


class ArgumentParser(SuggestingErrors, LightningArgumentParser):
    """LightningCLI's parser, whose errors say which option, key or value was probably meant."""


class MSTCLIPIQACLI(LightningCLI):
    """LightningCLI with checkpoints ranked by validation SRCC; a parse error raises `argparse.ArgumentError`, which
    `cli.commands.main` reports in one message."""

    def __init__(self, args: list[str] | None = None, run: bool = True, **kwargs):
        quiet_third_party()
        # Field docstrings of the config dataclasses become each option's --help text.
        set_parsing_settings(docstring_parse_attribute_docstrings=True)
        super().__init__(
            MSTCLIPIQAModule,
            IQADataModule,
            args=args,
            run=run,
            seed_everything_default=0,
            save_config_callback=SaveConfigToWandb,
            auto_configure_optimizers=False,
            parser_class=ArgumentParser,
            parser_kwargs={"exit_on_error": False},
            **kwargs,
        )

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(ResumingModelCheckpoint, "checkpoint")
        # Idle unless the run logs to W&B (see experiments/wandb.yaml).
        parser.add_lightning_class_args(WandbEvaluationLogger, "wandb_eval")
        parser.add_argument(
            "--predictions_path",
            type=str | None,
            default=None,
            help="File `predict` writes (.csv, .jsonl or .parquet, by extension): one row per image with its name, "
            "prompt, score, MOS and coarse share. Default: predictions.csv in the run's log folder.",
        )
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/srcc",
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                "checkpoint.filename": "best-epoch{epoch:02d}",
                "checkpoint.auto_insert_metric_name": False,
                **{f"trainer.{option}": value for option, value in TRAINER_DEFAULTS.items()},
            }
        )

    def parse_arguments(self, parser, args) -> None:
        """Parse; then a ``--ckpt_path`` file is read with weights_only=True and, if damaged or tampered, refused by
        name before Lightning reads it (to take its hyperparameters, then to restore it)."""
        with warnings.catch_warnings():
            # Every caller passes the command line as args=; Lightning warns that it is meant for Python callers.
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
            super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if subcommand in NEED_WEIGHTS and not ckpt_path and not self.config[subcommand].get("model.init_from"):
            raise no_weights(subcommand)
        if ckpt_path and Path(ckpt_path).is_file():
            read_checkpoint(ckpt_path)

    def before_instantiate_classes(self) -> None:
        """Under `fabric run`, the launcher's options fill in the Trainer's left unset (see `training.launch`); a
        fit from ``--model.init_from`` records the network settings the saved model puts in place (see
        `MSTCLIPIQAModule`), so that config.yaml reruns the run."""
        config = self._run_config()
        take_launcher_options(config["trainer"], self._trainer_defaults())
        init_from = config.get("model.init_from")
        if init_from:
            net = config["model.net"]
            resolved = settings_from(SavedModel.read(init_from).net, ModelConfig(**net.as_dict()), init_from)
            for key, value in asdict(resolved).items():
                net[key] = value

    def after_instantiate_classes(self) -> None:
        """Under any launcher, stop before touching data unless the Trainer's devices and nodes are its processes;
        a strategy left to "auto" is recorded as the one the Trainer chose where that is DDP."""
        trainer = self._run_config()["trainer"]
        check_world_size(self.trainer.num_devices, self.trainer.num_nodes, trainer["strategy"])
        if trainer["strategy"] == "auto" and isinstance(self.trainer.strategy, DDPStrategy):
            trainer["strategy"] = "ddp"  # what "auto" resolves to for several devices outside a notebook

    def _run_config(self) -> Namespace:
        """The parsed options of the command being run (the whole config without a subcommand)."""
        return self.config[self.subcommand] if self.subcommand else self.config

    def _trainer_defaults(self) -> dict[str, Any]:
        """Each Trainer option's default on this command line."""
        parameters = inspect.signature(self.trainer_class).parameters.items()
        return {name: parameter.default for name, parameter in parameters} | TRAINER_DEFAULTS

    def before_fit(self) -> None:
        """``--ckpt_path last`` finds this run's newest checkpoint in any earlier version folder, a fit from a
        checkpoint goes on in that run's folder and W&B run (see `training.checkpoints`), and Lightning loads
        checkpoints with weights_only=True whatever torch's default."""
        config = self.config_init[self.subcommand]
        config["ckpt_path"] = resolve_ckpt_path(config.get("ckpt_path"), self.trainer, self.model, self.datamodule)
        if self.subcommand == "fit":
            continue_run(self.trainer, config["ckpt_path"], self._logger_args())
        if config.get("weights_only") is None:
            config["weights_only"] = True

    before_validate = before_test = before_fit

    def _logger_args(self) -> list[dict[str, Any] | None]:
        """Each logger's init_args as configured; None for Lightning's default logger (``logger: true``)."""
        configs = self._run_config()["trainer"]["logger"]
        configs = configs if isinstance(configs, list) else [configs]
        return [
            config.init_args.as_dict() if isinstance(config, Namespace) and "init_args" in config else None
            for config in configs
        ]

    def before_predict(self) -> None:
        """As `before_fit`; then the predictions are written to ``--predictions_path`` (see `PredictionWriter`)."""
        self.before_fit()
        config = self.config_init[self.subcommand]
        self.trainer.callbacks.append(PredictionWriter(config.get("predictions_path")))
        if config.get("return_predictions") is None:
            config["return_predictions"] = False  # they are in the file: memory stays flat however many images
