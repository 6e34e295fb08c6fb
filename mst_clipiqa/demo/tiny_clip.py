"""Tiny randomly initialised CLIP checkpoints, saved to disk and loaded by path like real ones: the offline demo and
the tests use them through the same `from_pretrained` code as the OpenAI weights, with no download. Their scores
mean nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPModel
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

PREPROCESSOR_CONFIG = {
    "crop_size": {"height": 224, "width": 224},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": OPENAI_CLIP_MEAN,
    "image_std": OPENAI_CLIP_STD,
    "image_processor_type": "CLIPImageProcessor",
    "resample": 3,
    "rescale_factor": 1 / 255,
    "size": {"shortest_edge": 224},
}
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for raw bytes (the GPT-2 / CLIP mapping)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def write_byte_tokenizer(path: Path) -> int:
    """A CLIP tokenizer with no merges: every character is a token. Returns the vocabulary size."""
    alphabet = _byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet] + [BOS, EOS]
    (path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (path / "merges.txt").write_text("#version: 0.2\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": EOS,
        "unk_token": EOS,
        "model_max_length": 77,
        "do_lower_case": True,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return len(tokens)


def _save_clip(path: Path, text: dict, vision: dict, projection_dim: int, seed: int) -> None:
    """Save a randomly initialised CLIPModel with the byte tokenizer and CLIP's preprocessor config into `path`.

    The text config gets the tokenizer's vocabulary size and special token ids.
    """
    path.mkdir(parents=True, exist_ok=True)
    vocab_size = write_byte_tokenizer(path)
    text = dict(
        text,
        vocab_size=vocab_size,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    torch.manual_seed(seed)
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)
    CLIPModel(config).save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2))


def build_tiny_clip(
    path: str | Path,
    *,
    patch_size: int = 32,
    projection_dim: int = 64,
    hidden_size: int = 64,
    layers: int = 2,
    seed: int = 0,
) -> Path:
    """Save a tiny random CLIP (224x224 input, the given patch size) with tokenizer and preprocessor config."""
    path = Path(path)
    if (path / "model.safetensors").exists():
        return path
    # projection_dim goes into the sub-configs too: the single-tower classes read it from there. At the default
    # initialisation a 2-layer tower's output is almost all class embedding, the same for every image; a 5x larger
    # init lets the image through, so the demo has something to learn from.
    common = dict(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_attention_heads=4,
        num_hidden_layers=layers,
        hidden_act="quick_gelu",
        projection_dim=projection_dim,
        initializer_factor=5.0,
    )
    text = dict(common, max_position_embeddings=77)
    vision = dict(common, image_size=224, patch_size=patch_size)
    _save_clip(path, text, vision, projection_dim, seed)
    return path


def build_tiny_pair(folder: str | Path, *, projection_dim: int = 64, seed: int = 0) -> tuple[Path, Path]:
    """Coarse (patch 32) and fine (patch 16) tiny checkpoints under `folder`."""
    folder = Path(folder)
    coarse = build_tiny_clip(folder / "tiny-clip-b32", patch_size=32, projection_dim=projection_dim, seed=seed)
    fine = build_tiny_clip(folder / "tiny-clip-b16", patch_size=16, projection_dim=projection_dim, seed=seed + 1)
    return coarse, fine
