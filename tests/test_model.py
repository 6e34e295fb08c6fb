"""The network against the method's equations, on tiny random towers."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from mst_clipiqa.losses import LossConfig, iqa_loss, pairwise_ranking_loss
from mst_clipiqa.model import (
    MSTCLIPIQA,
    GatedFusion,
    ModelConfig,
    PromptEncoder,
    PromptHead,
    TemplateHead,
    prompt_attention,
)


def make(tiny_clip, variant: str) -> MSTCLIPIQA:
    coarse, fine = tiny_clip
    return MSTCLIPIQA(ModelConfig(coarse_encoder=coarse, fine_encoder=fine, variant=variant))


@pytest.mark.parametrize("variant", ["template", "prompt"])
def test_forward_shapes(tiny_clip, variant):
    model = make(tiny_clip, variant)
    pixels = torch.randn(3, 3, 224, 224)
    output = model(pixels, ["a red circle", "a blue square on grass", ""])
    score = output.score
    assert score.shape == (3,) and output.gate.shape == (3, 64)
    assert torch.isfinite(score).all()
    coarse_embeds, fine_embeds = model.encoder(pixels)
    assert coarse_embeds.shape == fine_embeds.shape == (3, 64)
    if variant == "template":
        assert ((score >= 1) & (score <= 5)).all()


@pytest.mark.parametrize("variant", ["template", "prompt"])
def test_gradients_reach_exactly_the_trainable_parameters(tiny_clip, variant):
    model = make(tiny_clip, variant)
    model.train()
    for frozen in model.frozen_modules():
        assert not frozen.training and all(not m.training for m in frozen.modules())
        assert all(not p.requires_grad for p in frozen.parameters())
    model(torch.randn(4, 3, 224, 224), ["a", "b c", "d e f", "g"]).score.sum().backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {n for n, _ in model.named_parameters() if n.startswith(("fusion.", "head."))}
    assert trainable == expected
    for name, p in model.named_parameters():
        if name in trainable:
            # alpha starts at 0, so the attention weights get no gradient on the first step; alpha itself does.
            if variant == "prompt" and name.startswith("head.attn."):
                continue
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_variant_a_trainable_count_with_512_wide_embeddings(tiny_clip_512):
    coarse, fine = tiny_clip_512
    model = MSTCLIPIQA(ModelConfig(coarse_encoder=coarse, fine_encoder=fine, variant="template"))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 722_561


def test_gated_fusion_matches_hand_computation():
    fusion = GatedFusion(dim=2, hidden=1)
    with torch.no_grad():
        fusion.hidden.weight.copy_(torch.tensor([[1.0, -1.0, 0.5, 2.0]]))
        fusion.hidden.bias.fill_(0.1)
        fusion.gate.weight.copy_(torch.tensor([[1.0], [-2.0]]))
        fusion.gate.bias.copy_(torch.tensor([0.0, 0.5]))
        fusion.proj_coarse.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
        fusion.proj_coarse.bias.copy_(torch.tensor([0.0, 1.0]))
        fusion.proj_fine.weight.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
        fusion.proj_fine.bias.copy_(torch.tensor([-1.0, 0.0]))
    coarse_embeds, fine_embeds = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, -1.0]])
    h = max(0.0, 1 * 1 - 1 * 2 + 0.5 * 3 + 2 * -1 + 0.1)  # relu(-1.4) = 0
    g = [1 / (1 + math.exp(-(1.0 * h))), 1 / (1 + math.exp(-(-2.0 * h + 0.5)))]
    coarse = [1.0, 2 * 2.0 + 1]
    fine = [-1.0 - 1, 3.0]
    expected = [g[i] * coarse[i] + (1 - g[i]) * fine[i] for i in range(2)]
    z, gate = fusion(coarse_embeds, fine_embeds)
    torch.testing.assert_close(gate, torch.tensor([g]))
    torch.testing.assert_close(z, torch.tensor([expected]))


def test_template_head_matches_hand_computation():
    templates = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0], [3.0, 4.0]])  # normalised inside
    head = TemplateHead(templates, tau_init=2.0)
    z = torch.tensor([[2.0, 0.0]])  # unit direction (1, 0)
    cos = [1.0, 0.0, -1.0, 0.0, 0.6]
    weights = [math.exp(2.0 * c) for c in cos]
    expected = sum((k + 1) * w for k, w in enumerate(weights)) / sum(weights)
    torch.testing.assert_close(head(z), torch.tensor([expected]))
    assert head.tau.requires_grad and head.tau.item() == 2.0


def test_prompt_head_matches_hand_computation_and_masks_padding():
    torch.manual_seed(0)
    head = PromptHead(dim=2, text_dim=2, num_heads=1, hidden=2)
    assert head.alpha.item() == 0.0
    with torch.no_grad():
        head.attn.in_proj_weight.copy_(torch.eye(2).repeat(3, 1))  # q, k, v projections = identity
        head.attn.in_proj_bias.zero_()
        head.attn.out_proj.weight.copy_(torch.eye(2))
        head.attn.out_proj.bias.zero_()
        head.alpha.fill_(0.5)
        head.w1.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        head.w1.bias.zero_()
        head.w2.weight.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
        head.w2.bias.zero_()
        head.out.weight.copy_(torch.tensor([[1.0, -1.0]]))
        head.out.bias.fill_(0.25)
    z = torch.tensor([[1.0, 0.0]])
    tokens = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [9.0, 9.0]]])  # the third is padding
    mask = torch.tensor([[True, True, False]])
    logits = [(1.0 * 1 + 0 * 0) / math.sqrt(2), (1.0 * 0 + 0 * 2) / math.sqrt(2)]
    w = [math.exp(x) / sum(math.exp(y) for y in logits) for x in logits]
    attended = [w[0] * 1.0 + w[1] * 0.0, w[0] * 0.0 + w[1] * 2.0]
    zp = [1.0 + 0.5 * attended[0], 0.0 + 0.5 * attended[1]]
    gelu = [0.5 * x * (1 + math.erf(x / math.sqrt(2))) for x in zp]
    hidden = [gelu[0] + zp[1], gelu[1] + zp[0]]
    expected = hidden[0] - hidden[1] + 0.25
    torch.testing.assert_close(head(z, tokens, mask), torch.tensor([expected]))
    changed = tokens.clone()
    changed[0, 2] = -5.0
    torch.testing.assert_close(head(z, changed, mask), torch.tensor([expected]))


@pytest.mark.parametrize("text_dim", [32, 48], ids=["same width", "other width"])
def test_prompt_attention_is_multihead_attention_in_another_order(text_dim):
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(32, 4, kdim=text_dim, vdim=text_dim, batch_first=True).double()
    with torch.no_grad():
        for parameter in attn.parameters():
            parameter.normal_()  # biases too: b_k must cancel and b_v carry through
    z, states = torch.randn(5, 32, dtype=torch.float64), torch.randn(5, 7, text_dim, dtype=torch.float64)
    mask = torch.arange(7)[None] < torch.tensor([[7], [1], [3], [6], [2]])
    expected = attn(z[:, None], states, states, key_padding_mask=~mask, need_weights=False)[0][:, 0]
    got = prompt_attention(attn, z, states, mask)
    torch.testing.assert_close(got, expected)
    # The same gradients for every weight.
    expected_grads = torch.autograd.grad(expected.square().sum(), list(attn.parameters()))
    got_grads = torch.autograd.grad(got.square().sum(), list(attn.parameters()))
    for name, want, have in zip([n for n, _ in attn.named_parameters()], expected_grads, got_grads):
        if name == "in_proj_bias":  # b_k cancels: its gradient is 0 in both, up to rounding in the reference
            want, have = want.view(3, -1)[[0, 2]], have.view(3, -1)[[0, 2]]
        torch.testing.assert_close(have, want, msg=name)
    padding = states.clone()
    padding[1, 1:] = 1e3
    torch.testing.assert_close(prompt_attention(attn, z, padding, mask), got)  # padding never counts


def test_loss_matches_hand_computation():
    score = torch.tensor([1.0, 2.0, 2.5])
    mos = torch.tensor([1.0, 3.0, 3.0])
    mse = ((0.0) ** 2 + 1.0**2 + 0.5**2) / 3
    # ordered pairs with different MOS: (0,1), (0,2), (1,0), (2,0); hinge relu(-sign(m_i-m_j)(s_i-s_j) + 0.1)
    pairs = [
        max(0, -(-1) * (1 - 2) + 0.1),
        max(0, -(-1) * (1 - 2.5) + 0.1),
        max(0, -(1) * (2 - 1) + 0.1),
        max(0, -(1) * (2.5 - 1) + 0.1),
    ]
    rank = sum(pairs) / 4
    torch.testing.assert_close(pairwise_ranking_loss(score, mos, 0.1), torch.tensor(rank))
    total = iqa_loss(score, mos, LossConfig(rank_weight=2.0, margin=0.1))
    torch.testing.assert_close(total, torch.tensor(mse + 2 * rank))
    torch.testing.assert_close(iqa_loss(score, mos, LossConfig(rank_weight=0.0)), torch.tensor(mse))


def test_ranking_loss_of_equal_mos_is_zero_with_a_graph():
    score = torch.tensor([1.0, 2.0], requires_grad=True)
    loss = pairwise_ranking_loss(score, torch.tensor([3.0, 3.0]), 0.1)
    loss.backward()
    assert loss.item() == 0.0 and score.grad is not None


def test_long_and_empty_prompts(tiny_clip):
    model = make(tiny_clip, "prompt")
    with pytest.warns(UserWarning, match="truncated"):
        states, mask = model.prompt_encoder(["word " * 200, ""])
    assert states.shape[1] == 77 and mask[0].all() and mask[1].sum() == 2


def padded_and_cut_by_hand(tokenizer, prompts: list[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and mask as built before the tokenizer's own padding and truncation were used: each prompt whole,
    an over-long one cut to its first max_tokens - 1 tokens and its EOS, then padded with the pad id."""
    ids = tokenizer(prompts, truncation=False, padding=False)["input_ids"]
    ids = [seq[: max_tokens - 1] + seq[-1:] if len(seq) > max_tokens else seq for seq in ids]
    length = max(len(seq) for seq in ids)
    padding = [length - len(seq) for seq in ids]
    input_ids = torch.tensor([seq + [tokenizer.pad_token_id] * pad for seq, pad in zip(ids, padding)])
    mask = torch.tensor([[1] * len(seq) + [0] * pad for seq, pad in zip(ids, padding)])
    return input_ids, mask


def check_tokenize_against_the_hand_made_padding(encoder: PromptEncoder) -> None:
    limit = encoder.max_tokens
    at_limit = " ".join(["a"] * (limit - 2))  # one token per word: `limit` tokens with BOS and EOS
    assert len(encoder.tokenizer(at_limit)["input_ids"]) == limit
    batches = {
        "short": ["a fox", "", "two cats"],
        "at the limit": [at_limit, "a fox"],
        "over the limit": ["word " * 200, "a fox", at_limit + " and more words", ""],
    }
    for name, prompts in batches.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ids, mask = encoder.tokenize(prompts)
        want_ids, want_mask = padded_and_cut_by_hand(encoder.tokenizer, prompts, limit)
        assert torch.equal(ids, want_ids) and torch.equal(mask, want_mask), name
        assert ids.dtype == want_ids.dtype and mask.dtype == want_mask.dtype, name
        truncated = [str(w.message) for w in caught if "truncated" in str(w.message)]
        assert truncated == ([f"2 prompt(s) exceed {limit} tokens and were truncated, e.g. {prompts[0][:80]!r}"]
                             if name == "over the limit" else []), name  # fmt: skip


def test_tokenize_pads_and_truncates_as_by_hand(tiny_clip):
    """The tokenizer's own padding and truncation give the ids and mask of padding and cutting by hand, at the
    limit of CLIP's context and at a shorter one (the tiny towers' byte tokenizer: one token per character)."""
    encoder = PromptEncoder(ModelConfig(coarse_encoder=tiny_clip[0], fine_encoder=tiny_clip[1], variant="prompt"))
    check_tokenize_against_the_hand_made_padding(encoder)
    encoder.max_tokens = 12
    check_tokenize_against_the_hand_made_padding(encoder)


def test_tokenize_pads_and_truncates_as_by_hand_with_clip_bpe(tiny_clip):
    """The same with CLIP's own BPE tokenizer, where the Hugging Face cache holds it (tests never download)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained("openai/clip-vit-base-patch32")
    except OSError:
        pytest.skip("CLIP's tokenizer (openai/clip-vit-base-patch32) is not in the Hugging Face cache")
    encoder = PromptEncoder(ModelConfig(coarse_encoder=tiny_clip[0], fine_encoder=tiny_clip[1], variant="prompt"))
    encoder.tokenizer = tokenizer
    check_tokenize_against_the_hand_made_padding(encoder)
    encoder.max_tokens = 12
    check_tokenize_against_the_hand_made_padding(encoder)


def test_towers_compute_what_stock_transformers_computes(tiny_clip):
    """The in-place QuickGELU is the stock activation up to float rounding, with gradients off (in place) and on."""
    from transformers import CLIPTextModel, CLIPVisionModelWithProjection

    from mst_clipiqa.model import InPlaceQuickGELU

    model = make(tiny_clip, "prompt")
    layers = [m for m in model.modules() if isinstance(m, InPlaceQuickGELU)]
    assert len(layers) == 3 * 2  # two layers in each of the two image towers and the text tower
    pixels = torch.randn(2, 3, 224, 224)
    stock = CLIPVisionModelWithProjection.from_pretrained(tiny_clip[1]).eval()
    want = stock(pixel_values=pixels).image_embeds
    with torch.inference_mode():
        got_in_place = model.encoder.fine(pixel_values=pixels).image_embeds
    got_with_grad = model.encoder.fine(pixel_values=pixels.requires_grad_()).image_embeds
    got_with_grad.sum().backward()  # the in-place path would break autograd here
    assert pixels.grad is not None and torch.isfinite(pixels.grad).all()
    torch.testing.assert_close(got_in_place, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_with_grad, want, rtol=0, atol=0)

    text = CLIPTextModel.from_pretrained(tiny_clip[0]).eval()
    states, mask = model.prompt_encoder(["a red circle on grass", "noise"])
    ids, _ = model.prompt_encoder.tokenize(["a red circle on grass", "noise"])
    want_text = text(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    torch.testing.assert_close(states, want_text, rtol=1e-5, atol=1e-5)

    x = torch.randn(1000) * 4
    with torch.no_grad():
        y = x.clone()
        out = InPlaceQuickGELU()(y)
    assert out.data_ptr() == y.data_ptr()  # written over its input
    torch.testing.assert_close(out, x * torch.sigmoid(1.702 * x), rtol=1e-6, atol=1e-6)
