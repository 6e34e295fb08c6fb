"""Models for the tests of saving, loading and scoring: made in memory, as training would leave them."""

from __future__ import annotations

import torch

from mst_clipiqa.model import ModelConfig
from mst_clipiqa.training.lit_module import MSTCLIPIQAModule


def trained_module(
    clip: tuple[str, str], variant: str = "template", mos_range=(20.0, 80.0), **net_options
) -> MSTCLIPIQAModule:
    """A module whose trainable weights differ from any fresh initialisation, as after training: its initial weights
    from seed 0 (the same whichever tests ran before), then perturbed. `net_options` go to its `ModelConfig`."""
    net = ModelConfig(coarse_encoder=clip[0], fine_encoder=clip[1], variant=variant, **net_options)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        module = MSTCLIPIQAModule(net=net)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for part in (module.net.fusion, module.net.head):
            for param in part.parameters():
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    module.net.set_mos_range(*mos_range)
    return module.eval()
