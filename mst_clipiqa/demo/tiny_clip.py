"""Randomly initialised CLIP checkpoints, saved to disk and loaded like real ones.

Tiny ones, loaded by path: the offline demo and the tests use them, through the same `from_pretrained` code path as
the OpenAI weights, with no download. And checkpoints of the exact shapes of openai/clip-vit-base-patch32 and -patch16,
written as a Hugging Face hub cache so that configs naming those ids load them offline: speed and memory measurements
of the real architectures. Scores from either are meaningless.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPModel

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
PREPROCESSOR_CONFIG = {
    "crop_size": {"height": 224, "width": 224},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": CLIP_MEAN,
    "image_std": CLIP_STD,
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
    text = dict(text, vocab_size=vocab_size, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
                pad_token_id=vocab_size - 1)
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
    common = dict(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_attention_heads=4,
                  num_hidden_layers=layers, hidden_act="quick_gelu", projection_dim=projection_dim,
                  initializer_factor=5.0)
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


OPENAI_PATCHES = {"openai/clip-vit-base-patch32": 32, "openai/clip-vit-base-patch16": 16}
"""The hub ids the configs name, by the patch size of their image tower."""
VIT_B_VISION = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_attention_heads=12,
    num_hidden_layers=12,
    image_size=224,
    hidden_act="quick_gelu",
    projection_dim=512,
)
"""The image tower of both (ViT-B), but for its patch size."""
VIT_B_TEXT = dict(
    hidden_size=512,
    intermediate_size=2048,
    num_attention_heads=8,
    num_hidden_layers=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=512,
)
"""The text tower of both, but for its vocabulary."""


def build_random_hub_cache(cache_dir: str | Path, *, seed: int = 0) -> Path:
    """Write random-weight CLIPs of the shapes of `OPENAI_PATCHES` as a Hugging Face hub cache; returns `cache_dir`.

    With ``HF_HUB_CACHE=cache_dir HF_HUB_OFFLINE=1``, ``from_pretrained("openai/clip-vit-base-patch32")`` then loads
    one (see `write_hub_snapshot`), so configs naming those ids run unchanged, offline: time and memory are the real
    models', scores mean nothing. The shapes are OpenAI's (`VIT_B_VISION` with patch 32 or 16, `VIT_B_TEXT`); the
    vocabulary is the byte-level tokenizer's 514 tokens instead of 49,408, which changes the size of one embedding
    table only. Both snapshots hold about 480 MB of float32 weights each.

    Args:
        cache_dir: the hub cache folder (what ``HF_HUB_CACHE`` names); created if needed.
        seed: seed of the patch-32 weights; the patch-16 weights use ``seed + 1``.
    """
    cache_dir = Path(cache_dir)
    for offset, (repo_id, patch_size) in enumerate(OPENAI_PATCHES.items()):
        write_hub_snapshot(cache_dir, repo_id, VIT_B_TEXT, dict(VIT_B_VISION, patch_size=patch_size), seed + offset)
    return cache_dir


def write_hub_snapshot(cache_dir: str | Path, repo_id: str, text: dict, vision: dict, seed: int) -> Path:
    """A random CLIP of the given tower configs (`CLIPTextConfig` and `CLIPVisionConfig` fields) as `repo_id` in a
    Hugging Face hub cache; returns its snapshot folder.

    The repository gets ``snapshots/<commit>/`` (config, float32 safetensors, the tokenizer of `write_byte_tokenizer`,
    CLIP's preprocessor config) and ``refs/main`` naming the commit, the layout the hub's offline mode reads. The
    commit is a hash of the configs and the seed: the same arguments give the same commit (and so the same feature
    cache namespaces), and a complete snapshot is reused. The snapshot is written to a temporary folder and renamed
    into place, so an interrupted build is redone, never read.
    """
    spec = json.dumps({"text": text, "vision": vision, "seed": seed}, sort_keys=True)
    commit = hashlib.sha1(spec.encode()).hexdigest()  # 40 hex digits, as the hub's commit ids
    repo = Path(cache_dir) / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    if not (snapshot / "model.safetensors").is_file():
        temporary = repo / f".tmp-{uuid.uuid4().hex}"
        _save_clip(temporary, text, vision, vision["projection_dim"], seed)
        shutil.rmtree(snapshot, ignore_errors=True)
        snapshot.parent.mkdir(parents=True, exist_ok=True)
        os.replace(temporary, snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot
