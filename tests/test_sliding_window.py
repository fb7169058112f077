"""Sliding-window layers (Mistral, Gemma 3): the window transformers draws into the mask, decoding with its caches."""

from __future__ import annotations

import copy

import pytest
import torch

from hf_neural_attention import NeuralAttentionConfig, neural_attention_forward, patch_model, set_backend
from tests.models import loss_and_grads, random_ids, tiny_gemma3, tiny_mistral
from tests.test_generation import _generate
from tests.test_masks import BACKENDS, _inputs, _layer
from tests.test_scorer_math import HAS_TRITON, KERNEL_CASES

WINDOW = 4


@pytest.mark.parametrize("backend", BACKENDS)
def test_tokens_outside_the_window_never_change_the_logits(backend):
    # one layer, window 4: position i sees i-3..i, so changing tokens 0..2 may change positions 0..5 only
    model = patch_model(tiny_mistral(sliding_window=WINDOW), layers=[0], config=NeuralAttentionConfig(backend=backend))
    ids = random_ids(2, 12)
    changed = ids.clone()
    changed[:, :3] = random_ids(2, 3, seed=9)
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, 6:], b[:, 6:], rtol=0, atol=1e-6)
    assert (a[:, 3:6] - b[:, 3:6]).abs().amax(-1).min() > 1e-4  # each of them sees a changed token


def test_neural_probabilities_cover_exactly_the_keys_the_stock_model_attends_to():
    stock = tiny_mistral(sliding_window=WINDOW, layers=2)
    stock.set_attn_implementation("eager")
    model = patch_model(copy.deepcopy(stock), layers=[0], config=NeuralAttentionConfig(backend="eager"))
    ids = random_ids(2, 10)
    attention_mask = torch.ones(2, 10, dtype=torch.long)
    attention_mask[0, :3] = 0  # left padding on top of the window
    with torch.no_grad():
        neural = model(ids, attention_mask=attention_mask, output_attentions=True).attentions
        reference = stock(ids, attention_mask=attention_mask, output_attentions=True).attentions
    rows = attention_mask.bool()[:, None, :, None]  # padded query rows: stock softmax spreads them, ours are zero
    for layer in (0, 1):  # layer 1 keeps the stock eager attention: its probabilities differ, not their support
        assert torch.equal((neural[layer] > 0) & rows, (reference[layer] > 0) & rows)
    assert not (neural[0] > 0)[..., 5:, :1].any()  # the window really cuts


@pytest.mark.parametrize("backend", ["tiled", "cpp"] + (["triton"] if HAS_TRITON else []))
def test_fused_backends_equal_the_materialising_one_in_training(backend):
    base = patch_model(tiny_mistral(sliding_window=WINDOW, layers=2), layers=[0, 1], backend="eager")
    models = {"eager": base, backend: copy.deepcopy(base)}
    set_backend(models[backend], backend)
    grads = loss_and_grads(models, random_ids(2, 11))
    torch.testing.assert_close(grads[backend][0], grads["eager"][0], rtol=1e-5, atol=1e-6)
    for fused, eager in zip(grads[backend][1], grads["eager"][1], strict=True):
        torch.testing.assert_close(fused, eager, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(("backend", "dtype"), KERNEL_CASES)
def test_a_direct_call_without_mask_applies_the_band(backend, dtype):
    layer = _layer(backend, dtype, causal=True)
    query, key, value = _inputs(2, 2, 7, 7, dtype=dtype)
    rows, cols = torch.arange(7)[:, None], torch.arange(7)[None, :]
    band = ((cols <= rows) & (cols > rows - 3))[None, None]
    out, _ = neural_attention_forward(layer, query, key, value, None, sliding_window=3)
    expected, _ = neural_attention_forward(layer, query, key, value, band)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    wide, _ = neural_attention_forward(layer, query, key, value, None, sliding_window=7)  # cuts nothing
    causal, _ = neural_attention_forward(layer, query, key, value, None)
    torch.testing.assert_close(wide, causal, rtol=0, atol=0)
    assert (out - causal).abs().max() > 1e-6
    with pytest.raises(NotImplementedError, match="pass the 4-D mask"):  # one query, 7 keys: which ones is unclear
        neural_attention_forward(layer, query[:, :, -1:], key, value, None, sliding_window=3)


@pytest.mark.parametrize(("backend", "dtype"), KERNEL_CASES)
def test_a_bidirectional_layer_without_mask_sees_every_key(backend, dtype):
    # as under eager and SDPA, which take the window from the mask only (DiffusionGemma's decoder passes None for
    # attention over every key while its layers pass a window; tests/test_patching.py runs that model)
    layer = _layer(backend, dtype, causal=False)
    query, key, value = _inputs(2, 2, 5, 9, dtype=dtype)
    windowed, _ = neural_attention_forward(layer, query, key, value, None, sliding_window=3)
    full, _ = neural_attention_forward(layer, query, key, value, None)
    torch.testing.assert_close(windowed, full, rtol=0, atol=0)
    band = torch.ones(1, 1, 5, 9, dtype=torch.bool).triu(-2).tril(2)  # a window drawn into a mask still applies
    banded, _ = neural_attention_forward(layer, query, key, value, band, sliding_window=3)
    assert (banded - full).abs().max() > 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cache_implementation", [None, "static"])
def test_decoding_past_the_window_equals_recomputing_everything(backend, cache_implementation):
    # 6 prompt tokens + 8 new ones: the sliding caches drop keys the window no longer sees
    model = patch_model(tiny_mistral(sliding_window=WINDOW, layers=2), layers=[0, 1],
                        config=NeuralAttentionConfig(backend=backend, proj_dim=4))
    ids = random_ids(2, 6)
    cached, cached_scores = _generate(model, ids, use_cache=True, cache_implementation=cache_implementation)
    uncached, uncached_scores = _generate(model, ids, use_cache=False)
    assert torch.equal(cached, uncached)
    torch.testing.assert_close(cached_scores, uncached_scores, rtol=1e-5, atol=1e-5)


def test_gemma3_sliding_and_full_layers_decode_with_their_caches():
    model = patch_model(tiny_gemma3(), layers=[0, 1], config=NeuralAttentionConfig(proj_dim=4))
    ids = random_ids(1, 7)
    cached, cached_scores = _generate(model, ids, use_cache=True)
    uncached, uncached_scores = _generate(model, ids, use_cache=False)
    assert torch.equal(cached, uncached)
    torch.testing.assert_close(cached_scores, uncached_scores, rtol=1e-5, atol=1e-5)
