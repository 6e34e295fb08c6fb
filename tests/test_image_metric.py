"""`MSTCLIPIQAScore`, the torchmetrics metric for pipelines that generate images: it scores tensors as the scorer
scores the same images from files, its gradient with respect to the pixels is right, and it gathers every rank's
scores under DDP."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from scripts.models import trained_module
from torchmetrics.utilities.data import dim_zero_cat

from mst_clipiqa import MSTCLIPIQAScore
from mst_clipiqa.data.preprocess import ClipPreprocess, load_pixels
from mst_clipiqa.errors import BadImageError, BadModelError, BadRowError
from mst_clipiqa.hub.pretrained import save_pretrained
from mst_clipiqa.model import ModelConfig
from mst_clipiqa.scoring.image_metric import clip_pixel_values
from mst_clipiqa.scoring.scorer import load_scorer
from mst_clipiqa.training.lit_module import MSTCLIPIQAModule

SIZES = [(224, 224), (300, 500), (500, 300), (160, 200), (97, 131)]
"""(height, width): as is, down in both orientations, up, and up from an odd size."""
VARIANTS = ("template", "prompt")


@pytest.fixture(scope="module")
def models(tiny_clip, tmp_path_factory) -> dict[str, Path]:
    """variant → its saved model folder."""
    root = tmp_path_factory.mktemp("models")
    # Head A's temperature starts where the demo config puts it for random towers (3): the paper's 100, made for real
    # CLIP's close template embeddings, saturates on random ones and makes scores jump with invisible pixel changes.
    modules = {variant: trained_module(tiny_clip, variant, tau_init=3.0) for variant in VARIANTS}
    return {variant: save_pretrained(module, root / variant) for variant, module in modules.items()}


def drawn_images(height: int, width: int, count: int, seed: int) -> np.ndarray:
    """(count, H, W, 3) uint8: smooth colour fields, the last one with strong pixel noise on top (the hardest case for
    a resize)."""
    rng = np.random.default_rng(seed)
    images = []
    for k in range(count):
        coarse = rng.integers(0, 256, (max(2, height // 16), max(2, width // 16), 3), dtype=np.uint8)
        image = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), dtype=np.int64)
        if k == count - 1:
            image = image + rng.integers(-40, 41, image.shape)
        images.append(np.clip(image, 0, 255).astype(np.uint8))
    return np.stack(images)


def as_tensor(images: np.ndarray) -> torch.Tensor:
    """8-bit (B, H, W, 3) → float (B, 3, H, W) in [0, 1], as a generator's pipeline hands them over."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255


def test_scores_agree_with_scoring_the_same_images_from_files(models, demo_data, tmp_path):
    folder = models["template"]
    scorer = load_scorer(folder, device="cpu", precision="32")
    metric = MSTCLIPIQAScore(folder)
    low, high = metric.mos_range
    batches = [drawn_images(h, w, 3, seed) for seed, (h, w) in enumerate(SIZES)]
    batches += [np.array(Image.open(path))[None] for path in sorted((Path(demo_data) / "images").iterdir())[:4]]
    files = []
    for b, batch in enumerate(batches):
        metric.update(as_tensor(batch))
        for i, image in enumerate(batch):
            files.append(tmp_path / f"{b}-{i}.png")
            Image.fromarray(image).save(files[-1])

    scores = metric.compute()["scores"]
    expected = torch.tensor(scorer.score(files))
    assert scores.shape == expected.shape == (len(files),)
    # Pillow rounds each resize pass to 8 bits, the tensors keep the exact values: 1% of the MOS range is the promise.
    assert (scores - expected).abs().max() < 0.01 * (high - low)
    assert scores.std() > 0.02 * (high - low)  # the images score differently: the comparison can fail
    # A 224x224 image is not resized: the same pixels as from its file, up to float rounding.
    torch.testing.assert_close(scores[:3], expected[:3], rtol=0, atol=1e-4)


def test_preprocessing_matches_the_files_to_8_bit_rounding(tiny_clip, tmp_path):
    preprocess = ClipPreprocess.from_pretrained(tiny_clip[0])
    std = torch.tensor(preprocess.image_std).view(3, 1, 1)
    for seed, (height, width) in enumerate(SIZES):
        images = drawn_images(height, width, 2, seed)
        for image, pixels in zip(images, clip_pixel_values(as_tensor(images), preprocess)):
            Image.fromarray(image).save(tmp_path / "image.png")
            # In 8-bit units: at most Pillow's rounding, once per resize pass.
            difference = ((pixels - load_pixels(tmp_path / "image.png", preprocess)) * std * 255).abs()
            assert difference.max() <= 1.1, (height, width)


def test_preprocessing_gradient(tmp_path):
    """torch.autograd.gradcheck in float64 on tiny images: both resize passes, a crop and the zero padding of a crop
    wider than the resized image."""
    preprocess = ClipPreprocess(shortest_edge=8, crop_size=(6, 10))
    generator = torch.Generator().manual_seed(0)
    for shape in [(1, 3, 5, 9), (2, 3, 12, 7)]:  # up to 8x14 and cropped; down to 13x8 and padded to width 10
        # Mid-grey values: no resized pixel reaches the clipping at 0 or 1, where the derivative jumps.
        images = (0.3 + 0.4 * torch.rand(shape, generator=generator, dtype=torch.float64)).requires_grad_()
        assert torch.autograd.gradcheck(lambda x: clip_pixel_values(x, preprocess), images)


@pytest.mark.parametrize(("variant", "dtype", "tolerance"), [("prompt", torch.float64, 1e-3), ("template", None, 1e-2)])
def test_score_gradient_matches_finite_differences(models, variant, dtype, tolerance):
    """d(score)/d(images) along random directions against central differences of the metric itself. The step,
    3e-3, is short enough that no ReLU of the fusion changes sign across it for the initial weights tried (seeds
    0-3; 1e-2 crossed one with seed 0), and long enough that float32 rounding stays under the tolerance (1e-3 did
    not, for the template head, which computes in float32; the prompt head runs in float64 here)."""
    metric = MSTCLIPIQAScore(models[variant])
    if dtype is not None:
        metric.to(dtype)
        assert next(metric.model.parameters()).dtype == dtype  # the model follows the metric
    dtype = dtype or torch.float32
    prompts = ["a red cube", "two cats"] if variant == "prompt" else None
    generator = torch.Generator().manual_seed(0)
    images = (0.25 + 0.5 * torch.rand(2, 3, 40, 56, generator=generator, dtype=dtype)).requires_grad_()

    result = metric(images, prompts)
    result["scores"].sum().backward()
    assert not any(score.requires_grad for score in metric.scores)  # the state keeps values, not the graph
    assert images.grad.abs().sum() > 0

    step = 3e-3
    for _ in range(2):
        direction = torch.randn(images.shape, generator=generator, dtype=dtype)
        direction /= direction.norm()
        with torch.no_grad():
            metric.update(images + step * direction, prompts)
            metric.update(images - step * direction, prompts)
        numeric = (metric.scores[-2].double() - metric.scores[-1].double()).sum() / (2 * step)
        analytic = (images.grad * direction).sum().double()
        torch.testing.assert_close(numeric, analytic, rtol=tolerance, atol=1e-3)


def test_compute_reset_and_what_stays_out_of_the_state(models):
    metric = MSTCLIPIQAScore(models["template"])
    first, second = as_tensor(drawn_images(300, 200, 2, 0)), as_tensor(drawn_images(180, 240, 3, 1))
    metric.update(first)
    alone = metric.compute()["scores"].clone()
    metric.update(second.requires_grad_())  # update never builds a graph, whatever the images
    result = metric.compute()
    assert result["scores"].shape == (5,) and not result["scores"].requires_grad
    torch.testing.assert_close(result["scores"][:2], alone)
    torch.testing.assert_close(result["mean"], result["scores"].mean())

    batch = metric(first)  # the batch's own result; the state gets it too
    torch.testing.assert_close(batch["scores"], alone)
    assert metric.compute()["scores"].shape == (7,)

    metric.reset()
    assert metric.scores == []
    with pytest.warns(UserWarning, match="compute.*before the ``update``"):
        empty = metric.compute()
    assert empty["scores"].shape == (0,) and empty["mean"].isnan()

    # The frozen model is neither state nor parameter, nor trained by train().
    assert metric.state_dict() == {} and list(metric.parameters()) == []
    metric.train()
    assert not metric.model.training and not any(p.requires_grad for p in metric.model.parameters())
    assert metric._reductions["scores"] is dim_zero_cat and metric.higher_is_better and not metric.full_state_update


def test_a_module_holding_the_metric_neither_saves_counts_nor_trains_the_towers_but_moves_them(models):
    """As a LightningModule holds it: the towers stay out of its state_dict (a strict load still takes it), its
    parameters, buffers and modules, and its train(); its .to() moves them."""
    owner = torch.nn.Module()
    owner.head = torch.nn.Linear(2, 1)
    owner.quality = MSTCLIPIQAScore(models["template"])
    model = owner.quality.model
    assert set(owner.state_dict()) == {"head.weight", "head.bias"}
    assert owner.load_state_dict(owner.state_dict()) is not None  # strict: no missing key for the towers
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\).*quality\.model\."):  # nor are towers loaded
        owner.load_state_dict({**owner.state_dict(), **model.state_dict(prefix="quality.model.")})
    assert len(list(owner.parameters())) == 2 and list(owner.buffers()) == []
    assert not any(module is model for module in owner.modules())
    owner.train()
    assert owner.quality.training and not model.training
    owner.to(torch.float64)
    assert {p.dtype for p in model.parameters()} == {torch.float64}


def test_bad_input_gets_one_clear_error(models, tiny_clip):
    template = MSTCLIPIQAScore(models["template"])
    images = as_tensor(drawn_images(64, 64, 2, 0))
    with pytest.raises(BadImageError, match=r"float tensor of shape \(B, 3, H, W\).*torch.uint8"):
        template.update((images * 255).to(torch.uint8))
    with pytest.raises(BadImageError, match=r"shape \(3, 64, 64\)"):
        template.update(images[0])
    with pytest.raises(BadImageError, match=r"values in \[0, 1\]; got values from -1 to 1.*\(images \+ 1\) / 2"):
        template.update(images * 2 - 1)
    with pytest.warns(UserWarning, match="does not read prompts"):
        template.update(images, prompts=["a", "b"])

    prompt = MSTCLIPIQAScore(models["prompt"])
    assert prompt.needs_prompt
    with pytest.raises(BadRowError, match="prompt head .* pass prompts, one per image"):
        prompt.update(images)
    with pytest.raises(BadRowError, match="2 images need 2 prompts, one per image; got 1 prompts"):
        prompt.update(images, ["a red cube"])
    with pytest.raises(BadRowError, match="no prompt for image 1 of the batch"):
        prompt.update(images, ["a red cube", " "])
    assert prompt.scores == []  # nothing was half-added

    untrained = MSTCLIPIQAModule(net=ModelConfig(coarse_encoder=tiny_clip[0], fine_encoder=tiny_clip[1]))
    with pytest.raises(BadModelError, match="no MOS range"):
        MSTCLIPIQAScore(untrained)
    with pytest.raises(TypeError, match="saved model's path or hub id, or an MSTCLIPIQAModule"):
        MSTCLIPIQAScore(untrained.net)


def rank_scores(rank: int, folder: str, shares: list[list[torch.Tensor]], rendezvous: str, out: str) -> None:
    """One rank of the DDP test: score this rank's batches, compute (which gathers), save the result."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    try:
        metric = MSTCLIPIQAScore(folder)
        for images in shares[rank]:
            metric.update(images)
        torch.save(metric.compute(), f"{out}-{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_compute_gathers_every_ranks_scores_under_ddp(models, tmp_path):
    """2 gloo processes with uneven shares (3 images in two batches, 1 image) get the 4 scores of one process."""
    folder = str(models["template"])
    shares = [
        [as_tensor(drawn_images(300, 200, 2, 0)), as_tensor(drawn_images(224, 224, 1, 1))],
        [as_tensor(drawn_images(100, 150, 1, 2))],
    ]
    args = (folder, shares, str(tmp_path / "rendezvous"), str(tmp_path / "result"))
    # Forked, as DataLoader workers are: the ranks start with everything imported (a fresh interpreter takes ~15 s).
    mp.start_processes(rank_scores, args=args, nprocs=2, start_method="fork")

    one_process = MSTCLIPIQAScore(folder)
    for images in shares[0] + shares[1]:  # rank order: what the gather concatenates
        one_process.update(images)
    expected = one_process.compute()
    for rank in range(2):
        result = torch.load(tmp_path / f"result-{rank}.pt")
        torch.testing.assert_close(result["scores"], expected["scores"], rtol=0, atol=1e-5)
        torch.testing.assert_close(result["mean"], expected["mean"], rtol=0, atol=1e-5)
