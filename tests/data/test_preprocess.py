"""CLIP preprocessing against transformers, mode conversion, draft decoding and decode errors."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mst_clipiqa.data.preprocess import ClipPreprocess, load_pixels, open_image, to_rgb
from mst_clipiqa.errors import BadImageError

try:  # transformers 5: the PIL backend, which CLIPImageProcessor itself resolves to without torchvision
    from transformers import CLIPImageProcessorPil as Reference
except ImportError:  # transformers 4: the slow processor is the PIL one
    from transformers import CLIPImageProcessor as Reference

# The preprocessor_config.json of openai/clip-vit-base-patch32, legacy integer sizes included.
OPENAI_CONFIG = {
    "crop_size": 224,
    "do_center_crop": True,
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "size": 224,
}


def _checkpoint(folder: Path, **overrides) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "preprocessor_config.json").write_text(json.dumps({**OPENAI_CONFIG, **overrides}))
    return folder


def _photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth gradients with noise: enough structure for resampling differences to show."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1), (x + y) % 97 * 2.6], axis=-1)
    noisy = base + rng.normal(0, 20, base.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def _reference(folder: Path, image: Image.Image) -> torch.Tensor:
    return Reference.from_pretrained(folder)(image, return_tensors="pt")["pixel_values"][0]


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> Path:
    return _checkpoint(tmp_path_factory.mktemp("clip"))


SIZES = [(224, 224), (640, 480), (480, 640), (100, 60), (60, 100), (17, 301), (225, 224), (1023, 767), (333, 999)]


@pytest.mark.parametrize(("width", "height"), SIZES)
def test_matches_clip_image_processor(clip_folder, width, height):
    image = _photo(width, height)
    ours = ClipPreprocess.from_pretrained(clip_folder)(image)
    assert ours.shape == (3, 224, 224) and ours.dtype == torch.float32
    assert (ours - _reference(clip_folder, image)).abs().max().item() < 1e-5


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "CMYK", "1"])
def test_matches_clip_image_processor_for_every_mode(clip_folder, mode):
    rgba = Image.fromarray(np.random.default_rng(3).integers(0, 256, (150, 260, 4), dtype=np.uint8), "RGBA")
    image = (rgba if "A" in mode else rgba.convert("RGB")).convert(mode)
    ours = ClipPreprocess.from_pretrained(clip_folder)(image)
    # Transparency is composited onto white (checked by hand in test_alpha_is_composited_onto_white), as recent
    # transformers' convert_to_rgb does; the reference's alpha handling differs in other versions and backends (with
    # transformers 5.17 and torchvision installed, by up to 3.7). So it gets the composited image and checks the rest.
    if "A" in mode:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    assert (ours - _reference(clip_folder, image)).abs().max().item() < 1e-5


def test_zero_padding_when_the_crop_exceeds_the_resize(tmp_path):
    folder = _checkpoint(tmp_path, size={"shortest_edge": 200}, crop_size={"height": 224, "width": 230})
    image = _photo(301, 250)
    ours = ClipPreprocess.from_pretrained(folder)(image)
    assert ours.shape == (3, 224, 230)
    assert (ours - _reference(folder, image)).abs().max().item() < 1e-5


def test_from_pretrained_reads_legacy_and_current_configs(tmp_path):
    legacy = ClipPreprocess.from_pretrained(_checkpoint(tmp_path / "legacy"))
    current = ClipPreprocess.from_pretrained(
        _checkpoint(tmp_path / "current", size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    )
    assert legacy == current == ClipPreprocess()


@pytest.mark.parametrize("override", [{"size": {"height": 224, "width": 224}}, {"do_center_crop": False}])
def test_from_pretrained_rejects_other_preprocessing(tmp_path, override):
    with pytest.raises(ValueError, match="unsupported preprocessing"):
        ClipPreprocess.from_pretrained(_checkpoint(tmp_path, **override))


def _save(image: Image.Image, path: Path, **params) -> Path:
    image.save(path, **params)
    return path


def _decoded(tmp_path: Path, image: Image.Image, suffix: str = ".png", **params) -> np.ndarray:
    decoded = open_image(_save(image, tmp_path / f"image{suffix}", **params))
    assert decoded.mode == "RGB"
    return np.asarray(decoded)


def _grey(values: list[int]) -> np.ndarray:
    return np.repeat(np.asarray(values, dtype=np.uint8)[None, :, None], 3, axis=2)


def test_grey_and_bilevel_modes(tmp_path):
    assert (_decoded(tmp_path, Image.fromarray(np.array([[0, 77, 255]], np.uint8))) == _grey([0, 77, 255])).all()
    bilevel = Image.fromarray(np.array([[0, 255, 0]], np.uint8)).convert("1")
    assert (_decoded(tmp_path, bilevel) == _grey([0, 255, 0])).all()


def test_alpha_is_composited_onto_white(tmp_path):
    rgba = np.array([[[200, 10, 30, 255], [200, 10, 30, 0], [0, 0, 0, 128]]], np.uint8)
    expected = np.array([[[200, 10, 30], [255, 255, 255], [127, 127, 127]]], np.uint8)
    assert np.abs(_decoded(tmp_path, Image.fromarray(rgba, "RGBA")).astype(int) - expected).max() <= 1
    la = Image.fromarray(rgba, "RGBA").convert("LA")
    grey = np.asarray(la)[..., 0]
    assert np.abs(_decoded(tmp_path, la)[0, :, 0].astype(int) - [grey[0, 0], 255, 127]).max() <= 1


def test_palette_with_and_without_transparency(tmp_path):
    palette = Image.new("P", (3, 1))
    palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255])
    palette.putdata([0, 1, 2])
    expected = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255]]], np.uint8)
    assert (_decoded(tmp_path, palette) == expected).all()
    expected[0, 1] = 255
    assert (_decoded(tmp_path, palette, transparency=1) == expected).all()
    assert open_image(_save(palette, tmp_path / "image.gif", transparency=1)).getpixel((1, 0)) == (255, 255, 255)
    # An alpha palette counts as transparency too (transformers would drop it and show the hidden colour).
    palette.putpalette([255, 0, 0, 255, 0, 255, 0, 0, 0, 0, 255, 255], "RGBA")
    assert to_rgb(palette).getpixel((1, 0)) == (255, 255, 255)


def test_cmyk(tmp_path):
    cmyk = Image.frombytes("CMYK", (3, 1), bytes([0, 0, 0, 0, 255, 0, 0, 0, 0, 0, 0, 255]))
    expected = np.array([[[255, 255, 255], [0, 255, 255], [0, 0, 0]]], np.uint8)
    assert (_decoded(tmp_path, cmyk, ".tif") == expected).all()


def test_16_bit_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32896, 65535]], np.uint16)
    image = Image.frombytes("I;16", (4, 1), values.astype("<u2").tobytes())
    assert Image.open(_save(image, tmp_path / "image.png")).mode == "I;16"
    assert (_decoded(tmp_path, image) == _grey([0, 1, 128, 255])).all()
    # A transparent grey value, stored in 16-bit units.
    assert open_image(_save(image, tmp_path / "t.png", transparency=257)).getpixel((1, 0)) == (255, 255, 255)


def test_32_bit_integer_mode(tmp_path):
    sixteen = Image.fromarray(np.array([[0, 1000, 65535, 70000]], np.int32))
    assert sixteen.mode == "I"
    assert (_decoded(tmp_path, sixteen, ".tif") == _grey([0, 4, 255, 255])).all()
    eight = Image.fromarray(np.array([[0, 100, 255]], np.int32))
    assert (_decoded(tmp_path, eight, ".tif") == _grey([0, 100, 255])).all()


def test_float_mode(tmp_path):
    fractions = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32))
    assert fractions.mode == "F"
    assert (_decoded(tmp_path, fractions, ".tif") == _grey([0, 128, 255])).all()
    levels = Image.fromarray(np.array([[-3.0, 100.4, 300.0]], np.float32))
    assert (_decoded(tmp_path, levels, ".tif") == _grey([0, 100, 255])).all()


def test_preprocess_converts_other_modes_itself():
    grey = Image.frombytes("I;16", (250, 240), np.arange(240 * 250, dtype="<u2").tobytes())
    preprocess = ClipPreprocess()
    assert torch.equal(preprocess(grey), preprocess(to_rgb(grey)))


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, displayed rotated by 90 degrees
    path = _save(_photo(40, 20), tmp_path / "rotated.jpg", exif=exif)
    assert open_image(path).size == (20, 40)


def test_sources(tmp_path):
    path = _save(_photo(230, 240), tmp_path / "image.png")
    data = path.read_bytes()
    expected = np.asarray(open_image(path))
    for source in (str(path), data, {"path": None, "bytes": data}, {"path": str(path), "bytes": None}):
        assert (np.asarray(open_image(source)) == expected).all()
    pixels = load_pixels(data, ClipPreprocess())
    assert pixels.shape == (3, 224, 224)
    with pytest.raises(BadImageError, match="not an image source"):
        open_image(42)


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(BadImageError, match="not found.*missing.jpg"):
        open_image(tmp_path / "missing.jpg")


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_truncated_file_is_an_error(tmp_path, suffix):
    full = _save(_photo(300, 300), tmp_path / f"full{suffix}").read_bytes()
    truncated = tmp_path / f"truncated{suffix}"
    truncated.write_bytes(full[: len(full) * 2 // 3])
    with pytest.raises(BadImageError, match=f"truncated{suffix}"):
        open_image(truncated)


def test_garbage_is_an_error(tmp_path):
    path = tmp_path / "garbage.jpg"
    path.write_bytes(b"not an image at all")
    with pytest.raises(BadImageError, match="garbage.jpg"):
        open_image(path)


@pytest.mark.parametrize("limit", [100 * 100 - 1, 100 * 100 // 3])  # Pillow warns above the limit, fails above twice it
def test_decompression_bomb_is_an_error(tmp_path, monkeypatch, limit):
    path = _save(_photo(100, 100), tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    with pytest.raises(BadImageError, match="decompression bomb.*bomb.png"):
        open_image(path)


def test_draft_decodes_large_jpegs_at_reduced_scale(tmp_path):
    path = _save(_photo(1000, 800), tmp_path / "large.jpg", quality=95)
    full, draft = open_image(path), open_image(path, draft=True)
    assert full.size == (1000, 800) and draft.size == (500, 400)
    preprocess = ClipPreprocess()
    full_pixels, draft_pixels = preprocess(full), preprocess(draft)
    assert draft_pixels.shape == (3, 224, 224)
    assert not torch.equal(full_pixels, draft_pixels)
    assert (full_pixels - draft_pixels).abs().mean().item() < 0.05


@pytest.mark.parametrize("size", [(900, 460), (460, 900), (448, 448), (2000, 1800), (300, 250)])
def test_draft_never_drops_below_224(tmp_path, size):
    path = _save(_photo(*size), tmp_path / "image.jpg")
    assert min(open_image(path, draft=True).size) >= 224


@pytest.mark.parametrize("name", ["image.png", "small.jpg"])
def test_draft_is_a_no_op_for_non_jpeg_and_small_jpeg(tmp_path, name):
    path = _save(_photo(1000, 800) if name.endswith(".png") else _photo(300, 260), tmp_path / name)
    assert np.array_equal(np.asarray(open_image(path, draft=True)), np.asarray(open_image(path)))
    assert load_pixels(path, ClipPreprocess(), draft=True).shape == (3, 224, 224)


def test_in_memory_images_are_converted(tmp_path):
    assert open_image(Image.new("LA", (5, 5), (0, 0))).getpixel((0, 0)) == (255, 255, 255)
    rgb = Image.new("RGB", (5, 5), (1, 2, 3))
    assert open_image(rgb) is rgb
    lazy = Image.open(io.BytesIO(_save(_photo(30, 30), tmp_path / "lazy.png").read_bytes()[:200]))
    with pytest.raises(BadImageError):
        open_image(lazy)
