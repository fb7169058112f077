"""Every mask form transformers hands the function, causality, padding, fully masked rows."""

from __future__ import annotations

import copy

import pytest
import torch

from hf_neural_attention import NeuralAttentionConfig, NeuralScorer, neural_attention_forward, patch_model
from tests.models import random_ids, tiny_bert, tiny_gpt2
from tests.reference import attention_from_scores, causal_visible, drawn_seed, paper_scores, smallest_visible_hidden
from tests.test_scorer_math import (
    HAS_TRITON,
    KERNEL_CASES,
    ScoredLayer,
    assert_matches,
    largest_entry,
    reference_weights,
)

BACKENDS = ["eager", "tiled", "cpp"] + (["triton"] if HAS_TRITON else [])  # the models are float32


def _layer(backend: str, dtype: torch.dtype, heads: int = 2, head_dim: int = 8, causal: bool = False) -> ScoredLayer:
    return ScoredLayer(NeuralScorer(head_dim, heads, NeuralAttentionConfig(proj_dim=3, backend=backend)).to(dtype),
                       is_causal=causal)


def _inputs(batch: int, heads: int, q_len: int, k_len: int, head_dim: int = 8, dtype: torch.dtype = torch.float64):
    seed = drawn_seed()
    print(f"random inputs: seed {seed}")  # shown with a failure, to reproduce it
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, n, head_dim, generator=g, dtype=torch.float64).to(dtype)
            for n in (q_len, k_len, k_len)]


def _expected(layer: ScoredLayer, query, key, value, visible):
    """The float64 reference from the very values the kernel saw: ``(out (batch, heads, q_len, v_dim), leaves)``."""
    scorer = copy.deepcopy(layer.neural_scorer).double()
    leaves = [t.detach().double().requires_grad_() for t in (query, key, value)]
    expected, _ = attention_from_scores(paper_scores(*leaves[:2], reference_weights(scorer), "relu"), leaves[2],
                                        visible)
    return expected, leaves + list(scorer.parameters())


@pytest.mark.parametrize(("backend", "dtype"), KERNEL_CASES)
def test_bool_additive_and_none_masks_agree(backend, dtype):
    layer = _layer(backend, dtype, causal=True)
    query, key, value = _inputs(2, 2, 6, 6, dtype=dtype)
    visible = causal_visible(6, 6).expand(2, 1, 6, 6).clone()
    visible[0, :, :, :2] = False  # left padding on sample 0
    visible[0, :, :2, 0] = True  # keep every row non-empty for the float/bool comparison below
    additive = torch.zeros(visible.shape, dtype=dtype).masked_fill(~visible, torch.finfo(dtype).min)
    out_bool, _ = neural_attention_forward(layer, query, key, value, visible)
    out_float, _ = neural_attention_forward(layer, query, key, value, additive)
    torch.testing.assert_close(out_bool, out_float, rtol=0, atol=0)
    assert_matches(out_bool.transpose(1, 2), _expected(layer, query, key, value, visible)[0], "output")
    # No mask on a causal module means causal (SDPA's is_causal), equal to the explicit causal bool mask.
    out_none, _ = neural_attention_forward(layer, query, key, value, None)
    out_causal, _ = neural_attention_forward(layer, query, key, value, causal_visible(6, 6)[None, None])
    torch.testing.assert_close(out_none, out_causal, rtol=0, atol=1e-12)


@pytest.mark.parametrize(("backend", "dtype"), KERNEL_CASES)
def test_fully_masked_rows_are_finite_zeros_with_finite_gradients(backend, dtype):
    layer = _layer(backend, dtype)
    visible = torch.ones(2, 1, 5, 7, dtype=torch.bool)
    visible[0, :, 1] = False  # one query row sees nothing
    visible[1] = False  # a whole sample sees nothing
    # inputs redrawn until no visible pair meets a relu within 1e-5 of its kink: fp32 rounding may put such a pair
    # on the other side than float64 (Triton, TEST_SEED=481: a whole dS_ij w_m term, 4e-2 of the largest entry)
    weights = reference_weights(layer.neural_scorer)
    for _ in range(100):
        query, key, value = (t.requires_grad_() for t in _inputs(2, 2, 5, 7, dtype=dtype))
        if dtype == torch.float64 or smallest_visible_hidden(query, key, weights, visible) > 1e-5:
            break
    else:
        raise AssertionError("no draw of 100 keeps every visible pair 1e-5 away from a relu kink")
    out, _ = neural_attention_forward(layer, query, key, value, visible)
    assert torch.isfinite(out).all()
    assert out[0, 1].abs().max() == 0 and out[1].abs().max() == 0  # out is (batch, q_len, heads, v_dim)
    upstream = torch.randn(out.shape, dtype=torch.float64)
    grads = torch.autograd.grad(out, [query, key, value, *layer.neural_scorer.parameters()], upstream.to(dtype))
    assert grads[0][1].abs().max() == 0  # nothing flows into queries that saw nothing
    expected, leaves = _expected(layer, query, key, value, visible)
    assert_matches(out.transpose(1, 2), expected, "output")
    want = torch.autograd.grad(expected, leaves, upstream.transpose(1, 2))
    for index, (got, reference) in enumerate(zip(grads, want, strict=True)):
        assert_matches(got, reference, f"leaf {index}", floor=largest_entry(want))


@pytest.mark.parametrize("probabilities", [False, True], ids=["fused", "output_attentions"])
@pytest.mark.parametrize(("backend", "dtype"), KERNEL_CASES)
def test_keys_a_minus_inf_position_bias_hides_are_masked_and_a_row_it_hides_is_zeros(backend, dtype, probabilities):
    # T5-style position_bias with no mask: -inf hides a key from every backend, the materialising one too (which is
    # also what any backend runs for output_attentions): a row it hides entirely gives zeros, not softmax's 0 / 0
    layer = _layer(backend, dtype)
    weights = reference_weights(layer.neural_scorer)
    for _ in range(100):
        query, key, value = (t.requires_grad_() for t in _inputs(2, 2, 5, 7, dtype=dtype))
        bias = torch.randn(1, 2, 5, 7, dtype=torch.float64).to(dtype)
        bias[:, :, 1] = float("-inf")  # one query row sees nothing
        bias[:, 1, 3, :4] = float("-inf")  # part of another row, one head
        visible = ~torch.isneginf(bias)
        if dtype == torch.float64 or smallest_visible_hidden(query, key, weights, visible) > 1e-5:
            break
    else:
        raise AssertionError("no draw of 100 keeps every visible pair 1e-5 away from a relu kink")
    out, attentions = neural_attention_forward(layer, query, key, value, None, position_bias=bias,
                                               output_attentions=probabilities)
    assert (attentions is not None) == probabilities
    assert torch.isfinite(out).all() and out[:, 1].abs().max() == 0  # out is (batch, q_len, heads, v_dim)
    upstream = torch.randn(out.shape, dtype=torch.float64)
    grads = torch.autograd.grad(out, [query, key, value, *layer.neural_scorer.parameters()], upstream.to(dtype))
    scorer = copy.deepcopy(layer.neural_scorer).double()
    leaves = [t.detach().double().requires_grad_() for t in (query, key, value)]
    scores = paper_scores(*leaves[:2], reference_weights(scorer), "relu") + bias.double().masked_fill(~visible, 0)
    expected, _ = attention_from_scores(scores, leaves[2], visible)
    assert_matches(out.transpose(1, 2), expected, "output")
    want = torch.autograd.grad(expected, leaves + list(scorer.parameters()), upstream.transpose(1, 2))
    for index, (got, reference) in enumerate(zip(grads, want, strict=True)):
        assert_matches(got, reference, f"leaf {index}", floor=largest_entry(want))


@pytest.mark.parametrize("backend", ["eager", "tiled", "cpp", "auto"])
def test_a_real_additive_bias_is_added_to_the_scores(backend):
    """A float mask with finite non-zero entries (e.g. ALiBi, T5's position bias) is a bias, added to the scores, and
    gets its gradient: on every backend (the fused ones read it tile by tile)."""
    layer = _layer(backend, torch.float64)
    query, key, value = (t.requires_grad_() for t in _inputs(2, 2, 5, 7))
    bias = torch.randn(1, 2, 5, 7, dtype=torch.float64, requires_grad=True)
    out, _ = neural_attention_forward(layer, query, key, value, bias)
    scores = paper_scores(query, key, reference_weights(layer.neural_scorer), "relu") + bias
    expected, _ = attention_from_scores(scores, value, None)
    torch.testing.assert_close(out.transpose(1, 2), expected, rtol=1e-9, atol=1e-10)
    upstream = torch.randn(expected.shape, dtype=torch.float64)
    got = torch.autograd.grad(out.transpose(1, 2), (query, key, value, bias), upstream)
    want = torch.autograd.grad(expected, (query, key, value, bias), upstream)
    for name, a, b in zip(("query", "key", "value", "bias"), got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9, msg=name)


@pytest.mark.parametrize("backend", ["eager", "tiled", "cpp", "auto"])
@pytest.mark.parametrize("shape", [(2, 1, 4, 7), (2, 3, 5, 7), (3, 1, 5, 7), (2, 1, 5, 6)])
def test_a_mask_of_another_shape_is_the_same_value_error_on_every_backend(backend, shape):
    # the materialising backend failed in torch's broadcasting (a RuntimeError naming no mask) where the fused ones
    # said what was wrong
    layer = _layer(backend, torch.float32)
    query, key, value = _inputs(2, 2, 5, 7, dtype=torch.float32)
    for mask in (torch.ones(shape, dtype=torch.bool), torch.zeros(shape)):
        with pytest.raises(ValueError, match=r"does not broadcast to \(batch, heads, q_len, k_len\) = \(2, 2, 5, 7\)"):
            neural_attention_forward(layer, query, key, value, mask)


@pytest.mark.parametrize("backend", BACKENDS)
def test_causality_future_tokens_never_change_past_logits(backend):
    model = patch_model(tiny_gpt2(), layers=[0], config=NeuralAttentionConfig(backend=backend))
    ids = random_ids(2, 12)
    changed = ids.clone()
    changed[:, 7:] = random_ids(2, 5, seed=9)
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=1e-6)
    assert (a[:, 7:] - b[:, 7:]).abs().max() > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("side", ["left", "right"])  # right: pads come after every real token (and stay unseen)
def test_padding_gives_the_unpadded_logits_on_real_tokens(backend, side):
    model = patch_model(tiny_gpt2(), layers=[0, 2], config=NeuralAttentionConfig(backend=backend))
    short, long = random_ids(1, 5, seed=3), random_ids(1, 9, seed=4)
    pad = torch.zeros(1, 4, dtype=torch.long)
    padded = torch.cat([pad, short], 1) if side == "left" else torch.cat([short, pad], 1)
    mask = (torch.arange(9) >= 4) if side == "left" else (torch.arange(9) < 5)
    attention_mask = torch.stack([mask.long(), torch.ones(9, dtype=torch.long)])
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # a direct call does not derive them
    with torch.no_grad():
        batched = model(torch.cat([padded, long]), attention_mask=attention_mask, position_ids=position_ids).logits
        alone_short = model(short).logits
        alone_long = model(long).logits
    assert torch.isfinite(batched).all()
    torch.testing.assert_close(batched[0, mask], alone_short[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batched[1], alone_long[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bidirectional_padding_gives_the_unpadded_outputs(backend):
    """BERT-style (every token sees every other): a dropped padding mask would let real tokens see the pads."""
    model = patch_model(tiny_bert(), layers=[0, 1], config=NeuralAttentionConfig(backend=backend))
    short, long = random_ids(1, 5, seed=3), random_ids(1, 9, seed=4)
    padded = torch.cat([short, torch.zeros(1, 4, dtype=torch.long)], 1)
    attention_mask = torch.stack([(torch.arange(9) < 5).long(), torch.ones(9, dtype=torch.long)])
    with torch.no_grad():
        batched = model(torch.cat([padded, long]), attention_mask=attention_mask).last_hidden_state
        alone_short, alone_long = model(short).last_hidden_state, model(long).last_hidden_state
    torch.testing.assert_close(batched[0, :5], alone_short[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batched[1], alone_long[0], rtol=1e-5, atol=1e-5)
