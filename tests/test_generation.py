"""KV-cache decoding: one query against every cached key, dynamic and static caches, padded batches."""

from __future__ import annotations

import pytest
import torch

from hf_neural_attention import NeuralAttentionConfig, patch_model
from tests.models import random_ids, tiny_gpt2, tiny_llama

BACKENDS = ["eager", "tiled", "cpp"]


def _generate(model, ids, **kwargs):
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False, output_scores=True, return_dict_in_generate=True,
                             pad_token_id=0, **kwargs)
    return out.sequences, torch.stack(out.scores)


@pytest.mark.parametrize("backend", BACKENDS)
def test_generate_with_cache_equals_without(backend):
    model = patch_model(tiny_gpt2(), layers=[0, -1], config=NeuralAttentionConfig(backend=backend, proj_dim=4))
    ids = random_ids(2, 6)
    cached, cached_scores = _generate(model, ids, use_cache=True)
    uncached, uncached_scores = _generate(model, ids, use_cache=False)
    assert torch.equal(cached, uncached)
    torch.testing.assert_close(cached_scores, uncached_scores, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_static_cache_equals_dynamic_cache(backend):
    model = patch_model(tiny_gpt2(), layers=[0], config=NeuralAttentionConfig(backend=backend))
    ids = random_ids(1, 5)
    dynamic, dynamic_scores = _generate(model, ids)
    static, static_scores = _generate(model, ids, cache_implementation="static")
    assert torch.equal(dynamic, static)
    torch.testing.assert_close(dynamic_scores, static_scores, rtol=1e-5, atol=1e-5)


def test_left_padded_batch_generates_like_single_prompts():
    model = patch_model(tiny_gpt2(), layers=[0])
    short, long = random_ids(1, 3, seed=5), random_ids(1, 6, seed=6)
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), long])
    attention_mask = (torch.arange(6) >= torch.tensor([[3], [0]])).long()
    with torch.no_grad():
        together = model.generate(batch, attention_mask=attention_mask, max_new_tokens=6, do_sample=False,
                                  pad_token_id=0)
        alone = model.generate(short, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(together[0, 3:], alone[0])


def test_grouped_query_attention_decoding_llama():
    model = patch_model(tiny_llama(), layers=[0])
    ids = random_ids(2, 5)
    cached, cached_scores = _generate(model, ids, use_cache=True)
    uncached, uncached_scores = _generate(model, ids, use_cache=False)
    assert torch.equal(cached, uncached)
    torch.testing.assert_close(cached_scores, uncached_scores, rtol=1e-5, atol=1e-5)
