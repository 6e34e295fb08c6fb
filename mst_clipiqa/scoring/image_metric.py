"""`MSTCLIPIQAScore`, a torchmetrics metric for pipelines that generate images: scores of image tensors from a trained
model, and, with gradients, a differentiable quality reward. Images are preprocessed in torch on their own device, as
`ClipPreprocess` does from files.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from mst_clipiqa.data.preprocess import ClipPreprocess
from mst_clipiqa.errors import BadImageError, BadModelError, BadRowError
from mst_clipiqa.hub.pretrained import from_pretrained
from mst_clipiqa.model import MSTCLIPIQA, freeze
from mst_clipiqa.scoring.scorer import TrainedModelView
from mst_clipiqa.training.lit_module import MSTCLIPIQAModule

_RESIZE_MODES = {Image.Resampling.BILINEAR: "bilinear", Image.Resampling.BICUBIC: "bicubic"}
"""Pillow filters that torch's antialiased interpolation reproduces (same kernels, same support)."""


def clip_pixel_values(images: Tensor, preprocess: ClipPreprocess) -> Tensor:
    """CLIP preprocessing of (B, 3, H, W) float images in [0, 1], in torch, on their device and differentiable:
    `ClipPreprocess` without the 8-bit rounding. Pillow resizes width then height, clipping after each pass; torch's
    antialiased filters use Pillow's kernels, so the same two clipped passes differ only by that rounding."""
    mode = _RESIZE_MODES.get(preprocess.resample)
    if mode is None:
        raise ValueError(f"cannot preprocess tensors with Pillow resampling filter {preprocess.resample}")
    height, width = images.shape[-2:]
    new_width, new_height = preprocess.resized_size(width, height)
    pixels = images
    if new_width != width:
        pixels = F.interpolate(pixels, size=(height, new_width), mode=mode, antialias=True).clamp(0, 1)
    if new_height != height:
        pixels = F.interpolate(pixels, size=(new_height, new_width), mode=mode, antialias=True).clamp(0, 1)
    crop_h, crop_w = preprocess.crop_size
    top, left = (new_height - crop_h) // 2, (new_width - crop_w) // 2
    # Negative padding crops; where the crop box reaches outside the image it pads zeros, as Pillow's crop does.
    pixels = F.pad(pixels, (-left, left + crop_w - new_width, -top, top + crop_h - new_height))  # (B, 3, crop)
    mean = torch.tensor(preprocess.image_mean, dtype=pixels.dtype, device=pixels.device).view(3, 1, 1)
    std = torch.tensor(preprocess.image_std, dtype=pixels.dtype, device=pixels.device).view(3, 1, 1)
    return (pixels - mean) / std


class MSTCLIPIQAScore(TrainedModelView, Metric):
    """Quality of images, on the MOS scale a trained MST-CLIPIQA model was trained on.

        metric = MSTCLIPIQAScore("my-model").to("cuda")     # a saved folder, a hub repo id, a .ckpt or a module
        metric.update(images, prompts=prompts)              # float (B, 3, H, W) in [0, 1]; prompts: prompt head only
        metric.compute()                                    # {"mean": tensor(52.1), "scores": tensor([...])}

    As torchmetrics' `CLIPImageQualityAssessment`: `compute` returns the scores of every image seen since the last
    `reset`, gathered from every rank under DDP (in rank order). Calling the metric, ``metric(images)``, adds the
    batch and returns its own result; when the images require grad, its scores carry the graph back to the pixels,
    so that ``-metric(images)["scores"].mean()`` is a loss for fine-tuning a generator.

    Args:
        model: a saved model folder, a Hugging Face Hub repo id or a Lightning .ckpt (loaded with `from_pretrained`),
            or an already loaded `MSTCLIPIQAModule`. The metric freezes it (no gradients to its weights, eval
            mode): it judges, it does not train. It is not part of the metric's `state_dict` or `parameters()`,
            and it follows the metric's `.to(...)`.
        revision: branch, tag or commit of a hub repo.
        kwargs: torchmetrics' `Metric` options (`sync_on_compute`, `compute_on_cpu`, `process_group`, ...).

    Returns (from `compute` and from calling the metric):
        A dict: ``mean``, the mean score (NaN when no image was seen), and ``scores``, each image's score in the
        order they came (a single image's as a 0-d tensor: torchmetrics squeezes one-element results).

    Raises:
        BadModelError: the loaded module has no MOS range (it was never trained).
    """

    is_differentiable = True
    higher_is_better = True
    full_state_update = False

    scores: list[Tensor]

    def __init__(self, model: str | os.PathLike | MSTCLIPIQAModule, *, revision: str | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        if isinstance(model, str | os.PathLike):
            model = from_pretrained(model, revision=revision)
        elif not isinstance(model, MSTCLIPIQAModule):
            raise TypeError(
                f"model must be a saved model's path or hub id, or an MSTCLIPIQAModule; got {type(model).__name__}"
            )
        if not model.net.has_mos_range:
            raise BadModelError("the model has no MOS range to score on: train it first or load a trained model")
        # A submodule, so that every move of the metric moves the towers too; `named_modules`, `train` and the two
        # hooks keep them out of the metric's (and its owner's) parameters, train() and state_dict.
        self.model = freeze(model)
        self.register_state_dict_post_hook(_leave_out_model)
        self.register_load_state_dict_pre_hook(_keep_model)
        config = model.net_config
        self.preprocess = ClipPreprocess.from_pretrained(config.coarse_encoder, revision=config.revision)
        self.add_state("scores", [], dist_reduce_fx="cat")

    @property
    def _net(self) -> MSTCLIPIQA:
        return self.model.net

    def update(self, images: Tensor, prompts: Sequence[str] | None = None) -> None:
        """Score a batch of images.

        Args:
            images: (B, 3, H, W) floats in [0, 1], any size; 8-bit images as ``uint8_images / 255``.
            prompts: the generation prompt of each image; required by the prompt head (variant B), ignored (with a
                warning) by the template head.

        Raises:
            BadImageError: the images are not a float (B, 3, H, W) batch with values in [0, 1].
            BadRowError: the prompt head and no prompt, a blank one, or not one per image.
        """
        _check_images(images)
        if not len(images):
            return
        count = len(images)
        if self.needs_prompt and prompts is not None and (isinstance(prompts, str) or len(prompts) != count):
            given = "one string" if isinstance(prompts, str) else f"{len(prompts)} prompts"
            raise BadRowError(f"{count} images need {count} prompts, one per image; got {given}")
        named = "image {} of the batch".format
        prompts = self._head_prompts(range(count), prompts, 4, name=named, ask="pass prompts, one per image")
        net = self.model.net
        # Autograd only when someone can use it; without it the towers compute their activations in place.
        with torch.set_grad_enabled(torch.is_grad_enabled() and images.requires_grad):
            pixel_values = clip_pixel_values(images, self.preprocess).to(net.encoder.coarse.dtype)
            # The towers themselves: TwoStreamEncoder.forward runs without autograd.
            output = net(
                prompts=prompts,
                coarse_embeds=net.encoder.coarse(pixel_values=pixel_values).image_embeds,  # (B, D)
                fine_embeds=net.encoder.fine(pixel_values=pixel_values).image_embeds,  # (B, D)
            )
            self.scores.append(net.to_mos(output.score))  # (B,)

    def forward(self, images: Tensor, prompts: Sequence[str] | None = None) -> dict[str, Tensor]:
        """Add the batch to the state and return its own result, differentiable as described above."""
        result = super().forward(images, prompts)
        # Only the returned result keeps the graph: a state holding it would keep every batch's activations alive.
        self.scores = [score.detach() for score in self.scores]
        return result

    def compute(self) -> dict[str, Tensor]:
        """The mean score and every image's score, over all ranks."""
        scores = dim_zero_cat(self.scores) if len(self.scores) else torch.empty(0, device=self.device)
        return {"mean": scores.mean(), "scores": scores}

    def named_modules(
        self, memo: set[nn.Module] | None = None, prefix: str = "", remove_duplicate: bool = True
    ) -> Iterator[tuple[str, nn.Module]]:
        """nn.Module's, less the frozen model and its modules, whose parameters are not the metric's."""
        memo = set() if memo is None else memo
        if remove_duplicate:
            if self in memo:
                return
            memo.add(self)
        yield prefix, self
        for name, child in self.named_children():
            if child is not self.model:
                yield from child.named_modules(memo, f"{prefix}.{name}" if prefix else name, remove_duplicate)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"  # without the towers' modules, as they are not the metric's

    def train(self, mode: bool = True) -> MSTCLIPIQAScore:
        """The metric's mode; the model stays in eval mode (no dropout: it judges, it does not train)."""
        super().train(mode)
        self.model.eval()
        return self


def _leave_out_model(metric: MSTCLIPIQAScore, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """State-dict post-hook: the towers are not saved with the metric, nor with a module that holds it."""
    for key in [key for key in state_dict if key.startswith(f"{prefix}model.")]:
        del state_dict[key]


def _keep_model(
    metric: MSTCLIPIQAScore,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: Any,
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    """Load-state-dict pre-hook: the towers' own tensors stand in for the ones a state dict lacks, and towers a state
    dict brings are unexpected keys."""
    model_prefix = f"{prefix}model."
    unexpected_keys.extend(key for key in state_dict if key.startswith(model_prefix))
    state_dict.update(metric.model.state_dict(prefix=model_prefix, keep_vars=True))


def _check_images(images: Tensor) -> None:
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
        described = (
            f"{images.dtype} of shape {tuple(images.shape)}" if isinstance(images, Tensor) else type(images).__name__
        )
        raise BadImageError(
            f"images must be a float tensor of shape (B, 3, H, W) with values in [0, 1]; got {described} "
            "(8-bit images: images.float() / 255)"
        )
    if images.numel():
        low, high = images.detach().aminmax()
        low, high = low.item(), high.item()  # one synchronisation: a wrong range is the commonest mistake
        if not (low >= 0 and high <= 1):
            raise BadImageError(
                f"images must have values in [0, 1]; got values from {low:.4g} to {high:.4g} "
                "(outputs in [-1, 1]: (images + 1) / 2; 8-bit values: images / 255; then .clamp(0, 1))"
            )
