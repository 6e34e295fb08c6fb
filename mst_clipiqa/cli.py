"""Command line: `mst-clipiqa {fit,validate,test,predict}` (LightningCLI) plus `demo`."""

from __future__ import annotations

import sys
from collections.abc import Callable

from jsonargparse import set_parsing_settings
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

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
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.net.variant", "data.need_prompt", compute_fn=lambda variant: variant == "prompt")
        parser.link_arguments("model.net.coarse_encoder", "data.preprocess_from")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/srcc",
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                "checkpoint.filename": "best-epoch{epoch:02d}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )


def demo_command(argv: list[str]) -> None:
    from mst_clipiqa.demo import main as demo_main

    demo_main(argv)


COMMANDS: dict[str, Callable[[list[str]], None]] = {"demo": demo_command}


def main(args: list[str] | None = None) -> None:
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] in COMMANDS:
        COMMANDS[argv[0]](argv[1:])
        return
    MSTCLIPIQACLI(args=args)


if __name__ == "__main__":
    main()
