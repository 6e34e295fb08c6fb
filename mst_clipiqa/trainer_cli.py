"""The Trainer's commands, `mst-clipiqa {fit,validate,test,predict}`: LightningCLI with this package's model, data
module, checkpointing and W&B reporting."""

from __future__ import annotations

from pathlib import Path

from jsonargparse import set_parsing_settings
from lightning.pytorch.cli import LightningCLI

from mst_clipiqa.callbacks import SaveConfigToWandb, WandbEvaluationLogger
from mst_clipiqa.checkpoints import ResumingModelCheckpoint, read_checkpoint, resolve_ckpt_path
from mst_clipiqa.data.datamodule import IQADataModule
from mst_clipiqa.lit_module import MSTCLIPIQAModule

# Field docstrings of the config dataclasses become each option's --help text.
set_parsing_settings(docstring_parse_attribute_docstrings=True)


class MSTCLIPIQACLI(LightningCLI):
    """LightningCLI with the model's choices passed on to the data, and checkpoints ranked by validation SRCC."""

    def __init__(self, args: list[str] | None = None, run: bool = True, **kwargs):
        super().__init__(
            MSTCLIPIQAModule,
            IQADataModule,
            args=args,
            run=run,
            seed_everything_default=0,
            save_config_callback=SaveConfigToWandb,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.net.variant", "data.need_prompt", compute_fn=lambda variant: variant == "prompt")
        parser.link_arguments("model.net.coarse_encoder", "data.preprocess_from")
        parser.link_arguments("model.net.draft_decode", "data.draft_decode")
        parser.add_lightning_class_args(ResumingModelCheckpoint, "checkpoint")
        # Idle unless the run logs to W&B (see experiments/wandb.yaml).
        parser.add_lightning_class_args(WandbEvaluationLogger, "wandb_eval")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/srcc",
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                "checkpoint.filename": "best-epoch{epoch:02d}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )

    def parse_arguments(self, parser, args) -> None:
        """Parse; then a ``--ckpt_path`` file is read with weights_only=True and, if damaged or tampered, refused by
        name before Lightning reads it (to take its hyperparameters, then to restore it)."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and Path(ckpt_path).is_file():
            read_checkpoint(ckpt_path)

    def before_fit(self) -> None:
        """``--ckpt_path last`` finds this run's newest checkpoint in any earlier version folder (see
        `mst_clipiqa.checkpoints`), and Lightning loads checkpoints with weights_only=True whatever torch's default."""
        config = self.config_init[self.subcommand]
        config["ckpt_path"] = resolve_ckpt_path(config.get("ckpt_path"), self.trainer, self.model, self.datamodule)
        if config.get("weights_only") is None:
            config["weights_only"] = True

    before_validate = before_test = before_predict = before_fit
