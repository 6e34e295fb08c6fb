"""What the package relies on of its libraries beyond their public API (mst_clipiqa/internals.py) is where it expects
it: a release of argparse or jsonargparse that moves a parser's options or words its parse errors differently, or of
Lightning that changes its checkpoint format, fails here, by name, rather than as a wrong or missing "did you mean" or
a member checkpoint of `benchmark --together` that nothing can load."""

from __future__ import annotations

from argparse import ArgumentError
from dataclasses import dataclass
from typing import Literal

import pytest
from jsonargparse import ActionConfigFile, ArgumentParser

from mst_clipiqa.internals import ParseFailure, lightning_checkpoint, option_actions, parse_failure


def test_options_are_found():
    fit = ArgumentParser(prog="fit")
    fit.add_argument("--precision", type=Literal["32", "bf16"], default="32")
    fit.add_argument("--epochs", type=int, default=1)

    actions = option_actions(fit)
    assert {"--precision", "--epochs", "-h", "--help"} <= set(actions)
    assert actions["--epochs"].dest == "epochs"


@dataclass
class Net:
    width: int = 1


def fit_parser() -> ArgumentParser:
    """A parser like the command line's: a config file, a positional, a required option, typed options, a group."""
    parser = ArgumentParser(prog="fit", exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_argument("model", type=str)
    parser.add_argument("--out", type=str, required=True)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--precision", type=Literal["32", "bf16"] | None, default=None)
    parser.add_argument("--variants", type=Literal["template", "prompt"], nargs="+", default=["template"])
    parser.add_class_arguments(Net, "net")
    return parser


def message_of(parser: ArgumentParser, args: list[str]) -> str:
    with pytest.raises(ArgumentError) as error:
        parser.parse_args(args)
    return error.value.message


def test_what_a_parse_error_is_about_is_read_from_its_words(tmp_path):
    def config(text: str) -> str:
        path = tmp_path / f"config-{len(list(tmp_path.iterdir()))}.yaml"
        path.write_text(text)
        return str(path)

    def failure(*args: str, parser: ArgumentParser | None = None) -> ParseFailure:
        return parse_failure(message_of(parser or fit_parser(), list(args)))

    given = ("m", "--out", "o")
    assert failure("--out", "o") == ParseFailure(missing=("model",))
    assert failure("m") == ParseFailure(missing=("out",))
    assert failure(*given, "--epohcs", "2", "--net.widht=3") == ParseFailure(
        unrecognized=("--epohcs", "2", "--net.widht=3")
    )
    assert failure(*given, "--config", config("net:\n  widht: 3\n")) == ParseFailure(unknown_key="net.widht")
    assert failure(*given, "--config", config("epohcs: 3\n")) == ParseFailure(unknown_key="epohcs")
    assert failure(*given, "--config", config("epochs: [3\n")) == ParseFailure(unreadable_config=True)

    refused = failure(*given, "--epochs", "many")
    assert (refused.key, refused.value) == ("epochs", "many") and refused.detail.startswith("Expected a <class 'int'>")
    assert refused.choices == ()
    refused = failure(*given, "--precision", "bf61")  # a Union's message, the value on its last line
    assert (refused.key, refused.value, refused.choices) == ("precision", "bf61", ("32", "bf16"))
    refused = failure(*given, "--variants", "template", "promt")  # one element of a list
    assert (refused.key, refused.value, refused.choices) == ("variants", "promt", ("template", "prompt"))

    top = ArgumentParser(prog="top", exit_on_error=False)
    top.add_argument("--config", action=ActionConfigFile)
    top.add_subcommands().add_subcommand("fit", fit_parser())
    subcommand_key = failure("fit", *given, "--config", config("net:\n  widht: 3\n"), parser=top)
    assert subcommand_key == ParseFailure(unknown_key="net.widht")
    before_subcommand = failure("--config", config("epohcs: 3\n"), "fit", *given, parser=top)
    assert before_subcommand == ParseFailure(unknown_key="epohcs")

    assert parse_failure("something else entirely") == ParseFailure()


def test_a_hand_built_checkpoint_is_one_lightning_loads(tiny_clip, tmp_path):
    import warnings

    import lightning as L
    import torch
    from scripts.runs import embedding_rows
    from torch.utils.data import DataLoader

    from mst_clipiqa.data.datamodule import IQADataModule
    from mst_clipiqa.hub.saved_model import SavedModel
    from mst_clipiqa.model import ModelConfig
    from mst_clipiqa.training.lit_module import MSTCLIPIQAModule

    module = MSTCLIPIQAModule(net=ModelConfig(coarse_encoder=tiny_clip[0], fine_encoder=tiny_clip[1]))
    module.net.set_mos_range(1.0, 5.0)
    weights = {f"net.{name}": value + 0.5 for name, value in module.net.saved_state().items() if name != "mos_range"}
    weights["net.mos_range"] = module.net.mos_range
    data = {"source": "demo", "root": "d", "protocol": "scene", "split_index": 2}
    path = tmp_path / "member.ckpt"
    torch.save(
        lightning_checkpoint(
            weights, epoch=3, global_step=40, hparams=dict(module.hparams), datamodule_hparams=data,
            callbacks={"ModelCheckpoint": {"monitor": "val/srcc", "best_model_score": 0.5}},
        ),
        path,
    )  # fmt: skip

    loaded = MSTCLIPIQAModule.load_from_checkpoint(path, weights_only=True)
    for name, value in weights.items():
        assert torch.equal(loaded.state_dict()[name], value), name
    assert IQADataModule.load_from_checkpoint(path, weights_only=True).hparams.split_index == 2
    assert SavedModel.read(path).training["validation"]["best"] == 0.5
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # about a test set this small
        trainer.test(module, DataLoader(embedding_rows(8), batch_size=8), ckpt_path=path, verbose=False)
    assert all(torch.equal(module.state_dict()[name], value) for name, value in weights.items())
