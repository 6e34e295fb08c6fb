"""MST-CLIPIQA, top to bottom in the order data flows.

    image ─ CLIP preprocessing (data/preprocess.py), one tensor shared by both streams
      ├─ coarse stream: frozen CLIP image tower, patch 32 → coarse_embeds = image_embeds   (semantics)
      └─ fine stream:   frozen CLIP image tower, patch 16 → fine_embeds = image_embeds     (texture, artifacts)
    GatedFusion(coarse_embeds, fine_embeds) → z
    TemplateHead(z)            → score    variant A: "a photo with {bad..perfect} quality"
    PromptHead(z, prompt)      → score    variant B: cross-attention over the generation prompt's tokens
    score on the head's internal 1..5 scale ↔ the MOS scale of the training data (linear)

`MSTCLIPIQA` holds the whole path, including the MOS scale its scores map onto, and takes either pixels or the
frozen towers' outputs computed earlier (the feature cache). Everything here is a plain `nn.Module` and runs
without Lightning.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection, CLIPVisionModelWithProjection
from transformers.activations import QuickGELUActivation
from transformers.utils import logging as hf_logging

from mst_clipiqa.errors import BadModelError

QUALITY_LEVELS = ("bad", "poor", "fair", "good", "perfect")
INTERNAL_LOW, INTERNAL_HIGH = 1.0, 5.0
"""The head's own scale: the template head's expected level lies in [1, 5]; head B trains on the same scale."""


@dataclass
class ModelConfig:
    """The network: which frozen CLIP towers to use and the shape of the trainable parts."""

    coarse_encoder: str = "openai/clip-vit-base-patch32"
    """Coarse stream (semantics): CLIP checkpoint, Hugging Face id or local path. Also supplies the text tower."""
    fine_encoder: str = "openai/clip-vit-base-patch16"
    """Fine stream (texture and artifacts): CLIP checkpoint, Hugging Face id or local path."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of both checkpoints; None takes the default branch."""
    variant: Literal["template", "prompt"] = "template"
    """Head: 'template' (A, quality templates, no prompt needed) or 'prompt' (B, cross-attends to the prompt)."""
    fusion_dim: int = 128
    """Width of the gated fusion's bottleneck."""
    template: str = "a photo with {} quality"
    """Quality template of head A; filled with bad, poor, fair, good, perfect."""
    tau_init: float = 100.0
    """Initial (learnable) softmax temperature of head A."""
    num_heads: int = 8
    """Attention heads of head B's cross-attention."""
    head_hidden: int = 512
    """Hidden width of head B's GELU + linear regressor."""
    max_prompt_tokens: int = 77
    """Prompts are truncated to this many tokens (CLIP's context length), with a warning."""
    draft_decode: bool = False
    """Decode JPEGs at reduced size (Pillow draft mode, faster, slightly different pixels). Part of the model so
    that training, evaluation and scoring always decode the same way."""


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' per-load reports: loading one tower of a full CLIP checkpoint lists every key of the
    other tower as unexpected, which is expected here."""
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar()


class InPlaceQuickGELU(nn.Module):
    """CLIP's QuickGELU, x * sigmoid(1.702 x), rewritten as silu(1.702 x) / 1.702 and computed in place.

    The MLP activations are the largest tensors of a tower (tokens x 3072). The stock version makes three new ones
    per layer; this one writes over its input, which nothing else reads: same function up to float rounding, less
    memory traffic, so the towers run faster, on a CPU most of all (docs/PERFORMANCE.md). With gradients on, the
    input must stay intact for backward, so the stock formula runs.
    """

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled():
            return x * torch.sigmoid(1.702 * x)
        return F.silu(x.mul_(1.702), inplace=True).div_(1.702)


@contextmanager
def loading_checkpoint(name: str, config: ModelConfig) -> Iterator[None]:
    """Load from the CLIP checkpoint `name` quietly; one that cannot be loaded (a mistyped folder, a hub id the hub
    does not have or cannot be asked for) is a `BadModelError` naming the setting that gave it."""
    try:
        with quiet_transformers():
            yield
    except (OSError, ValueError) as err:
        setting = "coarse_encoder" if name == config.coarse_encoder else "fine_encoder"
        found = Path(name).expanduser().exists()
        why = "not a CLIP checkpoint folder" if found else "no such folder, nor a model the Hugging Face Hub gave"
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BadModelError(
            f"model.net.{setting} {name}: {why} ({detail}); give the folder of a CLIP checkpoint or a hub id such as "
            "openai/clip-vit-base-patch32"
        ) from err


def load_tower(cls: type, name: str, config: ModelConfig) -> nn.Module:
    """One CLIP tower (image or text) of the checkpoint `name`, frozen, with its QuickGELU computed in place."""
    with loading_checkpoint(name, config):
        tower = cls.from_pretrained(name, revision=config.revision, attn_implementation="sdpa")
    for module in tower.modules():
        if isinstance(getattr(module, "activation_fn", None), QuickGELUActivation):
            module.activation_fn = InPlaceQuickGELU()
    return freeze(tower)


def load_tokenizer(config: ModelConfig):
    with loading_checkpoint(config.coarse_encoder, config):
        return AutoTokenizer.from_pretrained(config.coarse_encoder, revision=config.revision)


def freeze(module: nn.Module) -> nn.Module:
    """Turn off gradients and put in eval mode: frozen towers never train and never use dropout."""
    module.requires_grad_(False)
    return module.eval()


CPU_BATCH = 8
"""Largest batch the frozen image towers run at on a CPU. The MLP activations of 8 ViT-B/16 images (8 x 197 x 3072
floats) stay under glibc's largest mmap threshold (32 MB), so freed buffers are reused instead of mapped and
page-faulted afresh at every call; larger batches run further from the matmul bound (docs/PERFORMANCE.md)."""
GPU_BATCH = 256
"""Images per batch when scoring on a GPU: large enough to keep the towers busy, small enough for any GPU's memory
(docs/PERFORMANCE.md)."""


def prefers_bf16(device: torch.device) -> bool:
    """The frozen towers run under bf16 autocast on a GPU that supports it, in float32 elsewhere: the feature cache
    encodes so, and scoring does so by default."""
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


class TwoStreamEncoder(nn.Module):
    """The two frozen CLIP image towers. Both read the same 224x224 preprocessed image."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.coarse = load_tower(CLIPVisionModelWithProjection, config.coarse_encoder, config)
        self.fine = load_tower(CLIPVisionModelWithProjection, config.fine_encoder, config)
        self.dim = self.coarse.config.projection_dim
        self.compiled_batch: int | None = None  # see compile_towers
        if self.fine.config.projection_dim != self.dim:
            raise ValueError(
                f"the two encoders project to different widths: {config.coarse_encoder} → {self.dim}, "
                f"{config.fine_encoder} → {self.fine.config.projection_dim}"
            )

    def compile_towers(self) -> None:
        """Compile both towers with torch.compile for the batch size of the next call, weights frozen into the graph
        (inductor's `freezing`: constant folding, fused bias and activation). Inference only. Batches of another size
        (a last, partial one) run eagerly rather than compile again; a new dtype or device does compile again."""
        for tower in (self.coarse, self.fine):
            tower.compile(dynamic=False, options={"freezing": True})
        self.compiled_batch = 0  # the next call sets it

    @torch.no_grad()
    def forward(self, pixel_values: Tensor) -> tuple[Tensor, Tensor]:
        coarse, fine = self.coarse, self.fine
        if self.compiled_batch is not None:
            self.compiled_batch = self.compiled_batch or len(pixel_values)
            if len(pixel_values) != self.compiled_batch:
                coarse, fine = coarse.forward, fine.forward  # eager: skips the compiled call
        coarse_embeds = coarse(pixel_values=pixel_values).image_embeds  # (B, D)
        fine_embeds = fine(pixel_values=pixel_values).image_embeds  # (B, D)
        return coarse_embeds, fine_embeds


class GatedFusion(nn.Module):
    """GFF: a per-dimension gate decides how much of each stream enters the fused feature.

    h = ReLU(W_h [f_c; f_f] + b_h);  g = sigmoid(W_g h + b_g);  z = g * (W_c f_c + b_c) + (1 - g) * (W_f f_f + b_f)

    with the paper's f_c = `coarse_embeds` and f_f = `fine_embeds`.
    """

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.hidden = nn.Linear(2 * dim, hidden)
        self.gate = nn.Linear(hidden, dim)
        self.proj_coarse = nn.Linear(dim, dim)
        self.proj_fine = nn.Linear(dim, dim)

    def forward(self, coarse_embeds: Tensor, fine_embeds: Tensor) -> tuple[Tensor, Tensor]:
        """Returns the fused feature z (B, D) and the gate g (B, D): g = 1 means all coarse."""
        h = F.relu(self.hidden(torch.cat([coarse_embeds, fine_embeds], dim=-1)))  # (B, 2D) → (B, hidden)
        g = torch.sigmoid(self.gate(h))  # (B, D)
        z = g * self.proj_coarse(coarse_embeds) + (1 - g) * self.proj_fine(fine_embeds)  # (B, D)
        return z, g


class TemplateHead(nn.Module):
    """Variant A: p = softmax(tau * cos(z, t_k)) over the five quality templates; score = sum_k p_k * k."""

    def __init__(self, template_embeds: Tensor, tau_init: float):
        super().__init__()
        # Frozen and recomputed from the text tower at construction, so kept out of checkpoints.
        self.register_buffer("templates", F.normalize(template_embeds, dim=-1), persistent=False)  # (K, D)
        self.register_buffer("levels", torch.arange(1, len(template_embeds) + 1, dtype=torch.float32), persistent=False)
        self.tau = nn.Parameter(torch.tensor(float(tau_init)))

    def forward(self, z: Tensor) -> Tensor:
        # fp32 even under autocast: tau ~ 100 turns bf16 rounding of the cosines into visible score steps.
        with torch.autocast(device_type=z.device.type, enabled=False):
            cos = F.normalize(z.float(), dim=-1) @ self.templates.T  # (B, K)
            p = torch.softmax(self.tau * cos, dim=-1)  # (B, K)
            return p @ self.levels  # (B,)


class PromptHead(nn.Module):
    """Variant B: z' = z + alpha * MHA(q=z, K=V=prompt tokens); score = w_o(GELU(W_1 z') + W_2 z').

    Unlike the reference implementation, padding tokens are masked out of the attention. The attention's weights
    live in an `nn.MultiheadAttention` (`attn`); `prompt_attention` computes its output.
    """

    def __init__(self, dim: int, text_dim: int, num_heads: int, hidden: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, num_heads, kdim=text_dim, vdim=text_dim, batch_first=True)
        self.alpha = nn.Parameter(torch.zeros(()))  # starts as identity: the head first learns from z alone
        self.w1 = nn.Linear(dim, hidden)
        self.w2 = nn.Linear(dim, hidden)
        self.out = nn.Linear(hidden, 1)

    def forward(self, z: Tensor, prompt_states: Tensor, prompt_mask: Tensor) -> Tensor:
        """z (B, D); prompt_states (B, L, Dt); prompt_mask (B, L), True where a real token is."""
        z = z + self.alpha * prompt_attention(self.attn, z, prompt_states, prompt_mask)  # (B, D)
        return self.out(F.gelu(self.w1(z)) + self.w2(z)).squeeze(-1)  # (B,)


def prompt_attention(attn: nn.MultiheadAttention, z: Tensor, states: Tensor, mask: Tensor) -> Tensor:
    """``attn(z[:, None], states, states, key_padding_mask=~mask)[0][:, 0]``: one query per row, the same equations,
    without projecting the L tokens.

    Per head h (width d_h), with S the tokens: the logits q_h . (S W_k,h^T + b_k,h) / sqrt(d_h) are
    (q_h W_k,h) . S / sqrt(d_h) plus q_h . b_k,h, the same for every token, which the softmax cancels; and the output
    sum_l a_l (S_l W_v,h^T + b_v,h) is (sum_l a_l S_l) W_v,h^T + b_v,h, as the weights a sum to 1. So the query is
    projected into the tokens' space instead of the L tokens into the query's: the key and value projections cost
    D * Dt per row instead of L * D * Dt each, for two products over the tokens in their own width (H * L * Dt each);
    for L = 77 at the default widths, about 25 times fewer multiplications in the attention. Dropout inside the
    attention is not supported (the head has none).

    Args:
        attn: the attention's weights (embed_dim D, num_heads H, kdim = vdim = Dt).
        z: (B, D) queries; states: (B, L, Dt) tokens; mask: (B, L), True where a real token is.

    Returns:
        (B, D): the attention's output, after its output projection.
    """
    if attn.dropout or attn.bias_k is not None or attn.in_proj_bias is None:
        raise ValueError("prompt_attention computes attention without dropout, with input biases, without bias_k/v")
    batch, dim, heads = z.shape[0], attn.embed_dim, attn.num_heads
    if attn.in_proj_weight is not None:  # one packed projection: query, key and value of the same width
        w_q, w_k, w_v = attn.in_proj_weight.chunk(3)  # (D, D) each
    else:
        w_q, w_k, w_v = attn.q_proj_weight, attn.k_proj_weight, attn.v_proj_weight  # (D, D), (D, Dt), (D, Dt)
    b_q, _, b_v = attn.in_proj_bias.chunk(3)  # b_k cancels in the softmax
    head_dim, text_dim = dim // heads, states.shape[-1]
    q = F.linear(z, w_q, b_q).view(batch, heads, head_dim)  # (B, H, d_h)
    q_in_tokens = torch.einsum("bhe,het->bht", q, w_k.view(heads, head_dim, text_dim))  # (B, H, Dt): q_h W_k,h
    logits = torch.einsum("bht,blt->bhl", q_in_tokens, states) / math.sqrt(head_dim)  # (B, H, L)
    weights = logits.masked_fill(~mask[:, None, :], float("-inf")).softmax(dim=-1)  # (B, H, L)
    mixed = torch.einsum("bhl,blt->bht", weights, states)  # (B, H, Dt): sum_l a_l S_l
    values = torch.einsum("bht,het->bhe", mixed, w_v.view(heads, head_dim, text_dim))  # (B, H, d_h)
    return attn.out_proj(values.reshape(batch, dim) + b_v)  # (B, D)


class PromptEncoder(nn.Module):
    """The coarse checkpoint's frozen CLIP text tower and tokenizer: prompt → token states and padding mask."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.tokenizer = load_tokenizer(config)
        self.text = load_tower(CLIPTextModel, config.coarse_encoder, config)
        self.dim = self.text.config.hidden_size
        self.max_tokens = min(config.max_prompt_tokens, self.text.config.max_position_embeddings)

    def tokenize(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Token ids (B, L) and attention mask (B, L), padded to the longest prompt; over-long prompts keep their
        first tokens and the EOS, with a warning."""
        prompts = list(prompts)
        tokens = self.tokenizer(
            prompts, padding="longest", truncation=True, max_length=self.max_tokens, return_tensors="pt"
        )
        # Only a prompt that fills the limit may have been cut: tokenize those again, whole, to know.
        full = [prompt for prompt, n in zip(prompts, tokens["attention_mask"].sum(1).tolist()) if n == self.max_tokens]
        if full:
            with quiet_transformers():  # the tokenizer's own over-length notice, reported below instead
                too_long = [p for p, ids in zip(full, self.tokenizer(full)["input_ids"]) if len(ids) > self.max_tokens]
            if too_long:
                warnings.warn(
                    f"{len(too_long)} prompt(s) exceed {self.max_tokens} tokens and were truncated, "
                    f"e.g. {too_long[0][:80]!r}",
                    stacklevel=2,
                )
        return tokens["input_ids"], tokens["attention_mask"]

    @torch.no_grad()
    def forward(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Returns last_hidden_state (B, L, Dt) and a bool mask (B, L), True on real tokens."""
        input_ids, mask = self.tokenize(prompts)
        device = next(self.text.parameters()).device
        states = self.text(input_ids=input_ids.to(device), attention_mask=mask.to(device)).last_hidden_state
        return states, mask.to(device).bool()


@torch.no_grad()
def template_embeddings(config: ModelConfig) -> Tensor:
    """CLIP text embeddings (K, D) of the quality templates, computed once with the coarse text tower."""
    tokenizer = load_tokenizer(config)
    text = load_tower(CLIPTextModelWithProjection, config.coarse_encoder, config)
    inputs = tokenizer([config.template.format(level) for level in QUALITY_LEVELS], padding=True, return_tensors="pt")
    return text(**inputs).text_embeds  # (K, D)


@dataclass
class QualityOutput:
    """What `MSTCLIPIQA` computes for a batch."""

    score: Tensor
    """(B,) quality on the head's internal 1..5 scale; `MSTCLIPIQA.to_mos` puts it on the MOS scale."""
    gate: Tensor
    """(B, D) the fusion's gate: 1 takes a dimension from the coarse stream alone, 0 from the fine stream alone."""


class MSTCLIPIQA(nn.Module):
    """Image (and prompt) → quality score, on the head's internal 1..5 scale and on the MOS scale it maps onto.

    `forward` takes pixels, or the frozen towers' outputs computed earlier: they never change, so training reads
    them from the feature cache instead of running the towers at every step.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.encoder = TwoStreamEncoder(config)
        self.fusion = GatedFusion(self.encoder.dim, config.fusion_dim)
        if config.variant == "template":
            self.prompt_encoder = None
            self.head = TemplateHead(template_embeddings(config), config.tau_init)
        elif config.variant == "prompt":
            self.prompt_encoder = PromptEncoder(config)
            self.head = PromptHead(self.encoder.dim, self.prompt_encoder.dim, config.num_heads, config.head_hidden)
        else:
            raise ValueError(f"unknown variant {config.variant!r}: choose 'template' or 'prompt'")
        # The data's MOS scale (low, high), mapped linearly onto the internal 1..5: NaN until training sets it from
        # its data, then kept with the trainable weights, so scores come back on the data's own scale.
        self.register_buffer("mos_range", torch.tensor([math.nan, math.nan], dtype=torch.float64))

    @property
    def needs_prompt(self) -> bool:
        return self.prompt_encoder is not None

    TRAINABLE = ("fusion", "head")
    """The parts that train. Everything else is a frozen CLIP tower, loaded by name from the config, never saved."""

    def frozen_modules(self) -> list[nn.Module]:
        return [module for name, module in self.named_children() if name not in self.TRAINABLE]

    def saved_state(self) -> dict[str, Tensor]:
        """What a checkpoint or a saved model keeps: the trainable parts' weights and the MOS scale."""
        kept = (*self.TRAINABLE, "mos_range")
        return {name: value for name, value in self.state_dict().items() if name.split(".", 1)[0] in kept}

    def train(self, mode: bool = True) -> MSTCLIPIQA:
        super().train(mode)
        for module in self.frozen_modules():
            module.eval()  # frozen towers stay in eval mode whatever the trainer asks
        return self

    def forward(
        self,
        pixel_values: Tensor | None = None,
        prompts: Sequence[str] | None = None,
        *,
        coarse_embeds: Tensor | None = None,
        fine_embeds: Tensor | None = None,
        prompt_states: Tensor | None = None,
        prompt_mask: Tensor | None = None,
    ) -> QualityOutput:
        """Scores of a batch of images, from their pixels or from their two embeddings.

        Args:
            pixel_values: (B, 3, 224, 224) preprocessed images; not read when both embeddings are given.
            prompts: the B generation prompts, for the prompt head (variant B); not read when their states are given.
            coarse_embeds: (B, D) the coarse tower's image_embeds of the images, with fine_embeds (B, D) the fine
                tower's, instead of pixel_values.
            prompt_states: (B, L, Dt) the text tower's last_hidden_state of the prompts, with prompt_mask (B, L),
                True on real tokens, instead of prompts.
        """
        if coarse_embeds is None or fine_embeds is None:
            if pixel_values is None:
                raise ValueError("MSTCLIPIQA needs pixel_values, or both coarse_embeds and fine_embeds")
            coarse_embeds, fine_embeds = self.encoder(pixel_values)  # (B, D) each
        z, gate = self.fusion(coarse_embeds, fine_embeds)  # (B, D) each
        if not self.needs_prompt:
            return QualityOutput(score=self.head(z), gate=gate)
        if prompt_states is None or prompt_mask is None:
            if prompts is None:
                raise ValueError("the prompt head (variant 'prompt') needs the generation prompt of every image")
            prompt_states, prompt_mask = self.prompt_encoder(prompts)  # (B, L, Dt), (B, L)
        return QualityOutput(score=self.head(z, prompt_states.to(z.dtype), prompt_mask), gate=gate)

    # ---- the MOS scale ---------------------------------------------------------------------------------------------

    @property
    def has_mos_range(self) -> bool:
        """Whether the MOS scale is set: by training, or loaded with the weights."""
        return not bool(torch.isnan(self.mos_range).any())

    def set_mos_range(self, low: float, high: float) -> None:
        """Map the internal 1..5 onto the MOS scale (low, high)."""
        if not high > low:
            raise ValueError(f"the training MOS must not all be equal (low={low}, high={high})")
        self.mos_range.copy_(torch.tensor([low, high], dtype=torch.float64))

    def to_internal(self, mos: Tensor) -> Tensor:
        """MOS → the internal scale, as training targets."""
        low, high = self.mos_range  # tensors, not floats: no wait for the device at every step
        return INTERNAL_LOW + (mos.float() - low) * (INTERNAL_HIGH - INTERNAL_LOW) / (high - low)

    def to_mos(self, score: Tensor) -> Tensor:
        """Scores on the internal scale → the MOS scale."""
        low, high = self.mos_range
        return low + (score.float() - INTERNAL_LOW) * (high - low) / (INTERNAL_HIGH - INTERNAL_LOW)
