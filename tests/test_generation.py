"""KV-cache decoding: one query against every cached key, several new queries against a cache, dynamic and static
caches, padded batches, every backend (Triton interpreted on CPU)."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

from hf_neural_attention import NeuralAttentionConfig, patch_model
from tests.models import random_ids, sharpen_scorers, tiny_gpt2, tiny_llama

BACKENDS = ["eager", "tiled", "cpp"] + (["triton"] if importlib.util.find_spec("triton") is not None else [])


def _generate(model, ids, **kwargs):
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False, output_scores=True, return_dict_in_generate=True,
                             pad_token_id=0, **kwargs)
    return out.sequences, torch.stack(out.scores)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mlp", ["paper", "authors"])
def test_generate_with_cache_equals_without(backend, mlp):
    model = sharpen_scorers(patch_model(tiny_gpt2(), layers=[0, -1],
                                        config=NeuralAttentionConfig(backend=backend, proj_dim=4, mlp=mlp)))
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


@pytest.mark.parametrize("backend", BACKENDS)
def test_left_padded_batch_generates_like_single_prompts(backend):
    model = sharpen_scorers(patch_model(tiny_gpt2(), layers=[0, -1],
                                        config=NeuralAttentionConfig(backend=backend, proj_dim=4)))
    short, long = random_ids(1, 3, seed=5), random_ids(1, 6, seed=6)
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), long])
    attention_mask = (torch.arange(6) >= torch.tensor([[3], [0]])).long()
    together, together_scores = _generate(model, batch, attention_mask=attention_mask)
    alone, alone_scores = _generate(model, short)
    assert torch.equal(together[0, 3:], alone[0])
    # the scores, not just the greedy tokens: a dropped padding mask barely moves the argmax of a tiny model
    torch.testing.assert_close(together_scores[:, 0], alone_scores[:, 0], rtol=1e-5, atol=1e-5)
    long_alone, long_alone_scores = _generate(model, long)
    torch.testing.assert_close(together_scores[:, 1], long_alone_scores[:, 0], rtol=1e-5, atol=1e-5)


def _prefill_then_decode(model, ids, attention_mask, position_ids, prefill: int):
    """Logits of one pass over everything, and of a prefill followed by one token at a time against the cache."""
    with torch.no_grad():
        full = model(ids, attention_mask=attention_mask, position_ids=position_ids).logits.float()
        out = model(ids[:, :prefill], attention_mask=attention_mask[:, :prefill],
                    position_ids=position_ids[:, :prefill], use_cache=True)
        cache, steps = out.past_key_values, []
        for t in range(prefill, ids.shape[1]):
            out = model(ids[:, t:t + 1], attention_mask=attention_mask[:, :t + 1],
                        position_ids=position_ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits.float())
    return full, torch.cat(steps, 1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mlp", ["paper", "authors"])
def test_bfloat16_decoding_matches_a_full_pass(backend, mlp):
    """A bf16 model (weights and activations), left-padded: prefill, then one token at a time against the cache,
    gives the logits of one pass over everything (equal in the measurement: every row is computed alike), and those
    stay within bf16 rounding of the fp32 model's."""
    torch.manual_seed(0)
    model = sharpen_scorers(patch_model(tiny_gpt2(), layers=[0, -1],
                                        config=NeuralAttentionConfig(backend=backend, proj_dim=4, mlp=mlp)))
    silenced = copy.deepcopy(model)  # scores 0 (uniform attention in the neural layers)
    with torch.no_grad():
        for factor, scored in ((5.0 if mlp == "authors" else 1.0, model), (0.0, silenced)):
            for name, parameter in scored.named_parameters():  # authors x5: its scores moved the logits too little
                if name.endswith("neural_scorer.output_weight"):
                    parameter.mul_(factor)
    ids = random_ids(2, 11, seed=8)
    attention_mask = torch.ones_like(ids)
    attention_mask[0, :3] = 0
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    fp32, _ = _prefill_then_decode(model, ids, attention_mask, position_ids, 7)
    without_scores, _ = _prefill_then_decode(silenced, ids, attention_mask, position_ids, 7)
    full, decoded = _prefill_then_decode(model.to(torch.bfloat16), ids, attention_mask, position_ids, 7)
    scale = fp32.abs().max().item()
    torch.testing.assert_close(decoded, full[:, 7:], rtol=0, atol=2e-3 * scale)
    torch.testing.assert_close(full, fp32, rtol=0, atol=1e-2 * scale)  # 4.6e-3 measured
    # the neural scores move the logits by 4e-2 (paper) / 2.4e-2 (authors) of their largest: beyond the tolerances
    assert (fp32 - without_scores).abs().max() > 2 * 1e-2 * scale


@pytest.mark.parametrize("backend", BACKENDS)
def test_several_new_tokens_against_a_cache(backend):
    """Prefill, then 4 tokens at once against the cache (``q_len = 4 < k_len``, as in speculative decoding or a
    chunked prompt), with left padding: the logits of a single forward pass over everything."""
    model = sharpen_scorers(patch_model(tiny_gpt2(), layers=[0, -1],
                                        config=NeuralAttentionConfig(backend=backend, proj_dim=4)))
    ids = random_ids(2, 11, seed=8)
    attention_mask = torch.ones_like(ids)
    attention_mask[0, :3] = 0
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        full = model(ids, attention_mask=attention_mask, position_ids=position_ids).logits
        prefill = model(ids[:, :7], attention_mask=attention_mask[:, :7], position_ids=position_ids[:, :7],
                        use_cache=True)
        more = model(ids[:, 7:], attention_mask=attention_mask, position_ids=position_ids[:, 7:],
                     past_key_values=prefill.past_key_values, use_cache=True).logits
    real = attention_mask.bool()
    torch.testing.assert_close(prefill.logits[real[:, :7]], full[:, :7][real[:, :7]], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(more, full[:, 7:], rtol=1e-5, atol=1e-5)


def test_grouped_query_attention_decoding_llama():
    model = patch_model(tiny_llama(), layers=[0])
    ids = random_ids(2, 5)
    cached, cached_scores = _generate(model, ids, use_cache=True)
    uncached, uncached_scores = _generate(model, ids, use_cache=False)
    assert torch.equal(cached, uncached)
    torch.testing.assert_close(cached_scores, uncached_scores, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layers", [[0], [1]])
def test_an_encoder_patch_decodes_on_a_static_cache_after_switching_the_other_layers_to_eager(layers):
    """T5's decoder stack holds a config of its own, which a stock set_attn_implementation("eager") switched along;
    the patched model's hook put only the top config back, so the unpatched decoder ran stock eager attention on the
    bool mask generate builds ahead for a static cache (added to the scores as 0 / 1: padded slots attended)."""
    from tests.models import tiny_t5

    model = sharpen_scorers(patch_model(tiny_t5().eval(), layers=layers, proj_dim=3))  # encoder layers only
    model.set_attn_implementation("eager")
    ids = random_ids(2, 7)
    full, full_scores = _generate(model, ids, use_cache=False)
    static, static_scores = _generate(model, ids, cache_implementation="static")
    assert torch.equal(static, full)
    torch.testing.assert_close(static_scores, full_scores, rtol=1e-5, atol=1e-5)
    assert model.decoder.config._attn_implementation == model.config._attn_implementation == "neural_attention"
    assert model.decoder.block[0].layer[1].EncDecAttention.neural_attention_fallback == "eager"


def test_cross_attention_keeps_the_models_eager_implementation_bit_for_bit():
    """Cross-attention is never patched but runs through the neural attention function once the model is switched
    to it: it ran SDPA there (2e-7 from an eager model's), now the fallback it records."""
    import copy

    from hf_neural_attention import unpatch_model
    from tests.models import tiny_t5

    stock = tiny_t5().eval()
    stock.set_attn_implementation("eager")
    patched = patch_model(copy.deepcopy(stock), layers=[0])
    outputs = {}
    for name, model in (("stock", stock), ("patched", patched)):
        cross = model.decoder.block[0].layer[1].EncDecAttention
        hook = cross.register_forward_hook(lambda module, args, out, name=name: outputs.__setitem__(name, out[0]))
        with torch.no_grad():
            model(encoder_outputs=(stock.encoder(random_ids(2, 7)).last_hidden_state,),
                  decoder_input_ids=random_ids(2, 5, seed=3))
        hook.remove()
    assert torch.equal(outputs["patched"], outputs["stock"])
    unpatch_model(patched)
    assert not hasattr(patched.decoder.block[0].layer[1].EncDecAttention, "neural_attention_fallback")
