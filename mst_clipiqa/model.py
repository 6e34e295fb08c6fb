"""MST-CLIPIQA, top to bottom in the order data flows.

    image ─ CLIP preprocessing (data/preprocess.py), one tensor shared by both streams
      ├─ coarse stream: frozen CLIP image tower, patch 32 → f_c = image_embeds   (semantics)
      └─ fine stream:   frozen CLIP image tower, patch 16 → f_f = image_embeds   (texture, artifacts)
    GatedFusion(f_c, f_f) → z
    TemplateHead(z)            → score    variant A: "a photo with {bad..perfect} quality"
    PromptHead(z, prompt)      → score    variant B: cross-attention over the generation prompt's tokens

Scores live on the head's internal scale (1..5); the LightningModule maps them to and from each data set's
own MOS scale. Everything here is a plain `nn.Module` and runs without Lightning.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection, CLIPVisionModelWithProjection
from transformers.activations import QuickGELUActivation
from transformers.utils import logging as hf_logging

QUALITY_LEVELS = ("bad", "poor", "fair", "good", "perfect")


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
    per layer; this one writes over its input, which nothing else reads. Same function up to float rounding; on the
    CPU both towers together score 4-7% more images per second (docs/PERFORMANCE.md). With gradients on, the input
    must stay intact for backward, so the stock formula runs.
    """

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled():
            return x * torch.sigmoid(1.702 * x)
        return F.silu(x.mul_(1.702), inplace=True).div_(1.702)


def load_tower(cls: type, name: str, config: ModelConfig) -> nn.Module:
    """One CLIP tower (image or text) of the checkpoint `name`, frozen, with its QuickGELU computed in place."""
    with quiet_transformers():
        tower = cls.from_pretrained(name, revision=config.revision, attn_implementation="sdpa")
    for module in tower.modules():
        if isinstance(getattr(module, "activation_fn", None), QuickGELUActivation):
            module.activation_fn = InPlaceQuickGELU()
    return freeze(tower)


def load_tokenizer(config: ModelConfig):
    with quiet_transformers():
        return AutoTokenizer.from_pretrained(config.coarse_encoder, revision=config.revision)


def freeze(module: nn.Module) -> nn.Module:
    """Turn off gradients and put in eval mode: frozen towers never train and never use dropout."""
    module.requires_grad_(False)
    return module.eval()


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
        f_c = coarse(pixel_values=pixel_values).image_embeds  # (B, D)
        f_f = fine(pixel_values=pixel_values).image_embeds  # (B, D)
        return f_c, f_f


class GatedFusion(nn.Module):
    """GFF: a per-dimension gate decides how much of each stream enters the fused feature.

    h = ReLU(W_h [f_c; f_f] + b_h);  g = sigmoid(W_g h + b_g);  z = g * (W_c f_c + b_c) + (1 - g) * (W_f f_f + b_f)
    """

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.hidden = nn.Linear(2 * dim, hidden)
        self.gate = nn.Linear(hidden, dim)
        self.proj_coarse = nn.Linear(dim, dim)
        self.proj_fine = nn.Linear(dim, dim)

    def forward(self, f_c: Tensor, f_f: Tensor) -> tuple[Tensor, Tensor]:
        """Returns the fused feature z (B, D) and the gate g (B, D): g = 1 means all coarse."""
        h = F.relu(self.hidden(torch.cat([f_c, f_f], dim=-1)))  # (B, 2D) → (B, hidden)
        g = torch.sigmoid(self.gate(h))  # (B, D)
        z = g * self.proj_coarse(f_c) + (1 - g) * self.proj_fine(f_f)  # (B, D)
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

    Unlike the reference implementation, padding tokens are masked out of the attention.
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
        attended, _ = self.attn(
            z.unsqueeze(1), prompt_states, prompt_states, key_padding_mask=~prompt_mask, need_weights=False
        )  # (B, 1, D)
        z = z + self.alpha * attended.squeeze(1)  # (B, D)
        return self.out(F.gelu(self.w1(z)) + self.w2(z)).squeeze(-1)  # (B,)


class PromptEncoder(nn.Module):
    """The coarse checkpoint's frozen CLIP text tower and tokenizer: prompt → token states and padding mask."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.tokenizer = load_tokenizer(config)
        self.text = load_tower(CLIPTextModel, config.coarse_encoder, config)
        self.dim = self.text.config.hidden_size
        self.max_tokens = min(config.max_prompt_tokens, self.text.config.max_position_embeddings)

    def tokenize(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """Token ids (B, L) and attention mask (B, L); over-long prompts keep their first tokens and the EOS."""
        with quiet_transformers():  # over-long prompts are reported below, once per batch
            ids = self.tokenizer(list(prompts), truncation=False, padding=False)["input_ids"]
        too_long = [i for i, seq in enumerate(ids) if len(seq) > self.max_tokens]
        if too_long:
            warnings.warn(
                f"{len(too_long)} prompt(s) exceed {self.max_tokens} tokens and were truncated, "
                f"e.g. {prompts[too_long[0]][:80]!r}",
                stacklevel=2,
            )
            ids = [seq[: self.max_tokens - 1] + seq[-1:] if len(seq) > self.max_tokens else seq for seq in ids]
        length = max(len(seq) for seq in ids)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([seq + [pad] * (length - len(seq)) for seq in ids])  # (B, L)
        mask = torch.tensor([[1] * len(seq) + [0] * (length - len(seq)) for seq in ids])  # (B, L)
        return input_ids, mask

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
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


class MSTCLIPIQA(nn.Module):
    """Image (and prompt) → quality score on the internal 1..5 scale.

    `forward` runs the whole path from pixels. Training from cached embeddings calls `score_embeddings` directly:
    the frozen towers' outputs never change, so they need computing only once per image.
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

    @property
    def needs_prompt(self) -> bool:
        return self.prompt_encoder is not None

    def frozen_modules(self) -> list[nn.Module]:
        return [m for m in (self.encoder, self.prompt_encoder) if m is not None]

    def train(self, mode: bool = True) -> MSTCLIPIQA:
        super().train(mode)
        for module in self.frozen_modules():
            module.eval()  # frozen towers stay in eval mode whatever the trainer asks
        return self

    def score_embeddings(
        self,
        f_c: Tensor,
        f_f: Tensor,
        prompt_states: Tensor | None = None,
        prompt_mask: Tensor | None = None,
        return_gate: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Fusion and head on the two streams' embeddings (B, D): returns scores (B,) [and the gate (B, D)]."""
        z, gate = self.fusion(f_c, f_f)
        if self.needs_prompt:
            if prompt_states is None or prompt_mask is None:
                raise ValueError("the prompt head needs prompt_states and prompt_mask")
            score = self.head(z, prompt_states.to(z.dtype), prompt_mask)
        else:
            score = self.head(z)
        return (score, gate) if return_gate else score

    def forward(self, pixel_values: Tensor, prompts: list[str] | None = None) -> Tensor:
        """pixel_values (B, 3, 224, 224), prompts (B strings, variant B only) → scores (B,)."""
        f_c, f_f = self.encoder(pixel_values)
        states = mask = None
        if self.needs_prompt:
            if prompts is None:
                raise ValueError("the prompt head (variant 'prompt') needs the generation prompt of every image")
            states, mask = self.prompt_encoder(prompts)
        return self.score_embeddings(f_c, f_f, states, mask)
