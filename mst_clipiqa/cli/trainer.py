"""The Trainer's commands, `mst-clipiqa {fit,validate,test,predict}`: LightningCLI with this package's model, data
module, checkpointing and W&B reporting."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jsonargparse import Namespace, set_parsing_settings
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from mst_clipiqa.cli.parse_errors import SuggestingErrors
from mst_clipiqa.data.datamodule import IQADataModule
from mst_clipiqa.errors import OptionError
from mst_clipiqa.scoring.predictions import PredictionWriter
from mst_clipiqa.training.callbacks import SaveConfigToWandb, WandbEvaluationLogger
from mst_clipiqa.training.checkpoints import ResumingModelCheckpoint, continue_run, read_checkpoint, resolve_ckpt_path
from mst_clipiqa.training.launch import check_world_size, take_launcher_options
from mst_clipiqa.training.lit_module import MSTCLIPIQAModule

NEED_WEIGHTS = ("validate", "test", "predict")
"""The commands that evaluate a trained model: without weights they would score with an untrained head."""

# Field docstrings of the config dataclasses become each option's --help text.
set_parsing_settings(docstring_parse_attribute_docstrings=True)


class ArgumentParser(SuggestingErrors, LightningArgumentParser):
    """LightningCLI's parser, whose errors say which option, key or value was probably meant."""


class MSTCLIPIQACLI(LightningCLI):
    """LightningCLI with the model's choices passed on to the data, and checkpoints ranked by validation SRCC.

    A parse error raises `argparse.ArgumentError` (`mst_clipiqa.cli.commands.main` reports it in one message) instead of
    printing the usage and exiting.
    """

    def __init__(self, args: list[str] | None = None, run: bool = True, **kwargs):
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
        parser.link_arguments("model.net.variant", "data.need_prompt", compute_fn=lambda variant: variant == "prompt")
        parser.link_arguments("model.net.coarse_encoder", "data.preprocess_from")
        parser.link_arguments("model.net.draft_decode", "data.draft_decode")
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
                # One device unless asked (every config says so too); a launcher's LT_DEVICES fills it in.
                "trainer.devices": 1,
            }
        )

    def parse_arguments(self, parser, args) -> None:
        """Parse; then a ``--ckpt_path`` file is read with weights_only=True and, if damaged or tampered, refused by
        name before Lightning reads it (to take its hyperparameters, then to restore it)."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if subcommand in NEED_WEIGHTS and not ckpt_path and not self.config[subcommand].get("model.init_from"):
            raise OptionError(
                f"{subcommand} needs trained weights: pass --ckpt_path (a .ckpt file of a fit, or last) or "
                "--model.init_from (a saved model folder or hub id)"
            )
        if ckpt_path and Path(ckpt_path).is_file():
            read_checkpoint(ckpt_path)

    def before_instantiate_classes(self) -> None:
        """Under `fabric run`, the launcher's options fill in the Trainer's left unset (see `training.launch`)."""
        defaults = self._parser(self.subcommand).get_defaults()
        take_launcher_options(self._get(self.config, "trainer"), defaults["trainer"])

    def after_instantiate_classes(self) -> None:
        """Under any launcher, stop before touching data unless the Trainer's devices and nodes are its processes."""
        strategy = self._get(self.config, "trainer")["strategy"]
        check_world_size(self.trainer.num_devices, self.trainer.num_nodes, strategy)

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
        configs = self.config[self.subcommand]["trainer"]["logger"]
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
