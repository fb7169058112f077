"""patch_model / unpatch_model on GPT-2, ViT, Llama (grouped-query attention) and BERT."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    BloomConfig,
    BloomForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GPT2Model,
    PretrainedConfig,
    ResNetConfig,
    ResNetModel,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from hf_neural_attention import (
    ATTENTION_NAME,
    NeuralAttentionConfig,
    NeuralAttentionGPT2Config,
    NeuralAttentionGPT2ForCausalLM,
    find_attention_modules,
    neural_attention_forward,
    neural_layers,
    patch_model,
    scorer_parameters,
    unpatch_model,
)
from hf_neural_attention.patching import unwrap_model
from tests.models import (
    random_ids,
    random_pixels,
    sharpen_scorers,
    tiny_bert,
    tiny_diffusion_gemma,
    tiny_gpt2,
    tiny_gpt2_config,
    tiny_llama,
    tiny_vit,
    tiny_vit_config,
)
from tests.reference import attention_from_scores, causal_visible, drawn_seed, paper_scores
from tests.test_scorer_math import reference_weights

NO_DROPOUT = dict(attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)


def _hidden_states(model, ids):
    with torch.no_grad():
        return model(ids, output_hidden_states=True).hidden_states


def test_patch_is_in_place_and_selects_the_layers():
    model = tiny_gpt2()
    assert patch_model(model, layers=[0, -1]) is model
    assert neural_layers(model) == [(0, "transformer.h.0.attn"), (2, "transformer.h.2.attn")]
    assert model.config._attn_implementation == ATTENTION_NAME
    assert model.config.neural_attention_layers == [0, 2]
    assert model.config.neural_attention_proj_dim is None and model.config.neural_attention_mlp == "paper"
    assert [i for i, _ in neural_layers(patch_model(tiny_vit(), layers="all"))] == [0, 1, 2]
    # through torch.compile's wrapper: names in the model inside (no _orig_mod. prefix)
    assert neural_layers(torch.compile(model)) == [(0, "transformer.h.0.attn"), (2, "transformer.h.2.attn")]


def test_unpatched_layers_are_bit_identical_to_the_unpatched_model():
    reference = tiny_gpt2()
    model = patch_model(copy.deepcopy(reference), layers=[-1])
    ids = random_ids(2, 10)
    before, after = _hidden_states(reference, ids), _hidden_states(model, ids)
    for layer in range(3):  # embeddings and the outputs of layers 0 and 1: bitwise
        assert torch.equal(before[layer], after[layer])
    assert not torch.equal(before[3], after[3])
    # The function itself sends unpatched modules to SDPA untouched.
    module = find_attention_modules(model)[0][1]
    q, k, v = (torch.randn(2, 4, 7, 8) for _ in range(3))
    mask = torch.ones(2, 1, 7, 7, dtype=torch.bool).tril()
    got, _ = neural_attention_forward(module, q, k, v, mask, dropout=0.0, scaling=0.3)
    want, _ = sdpa_attention_forward(module, q, k, v, mask, dropout=0.0, scaling=0.3)
    assert torch.equal(got, want)


@pytest.mark.parametrize("reorder_and_upcast_attn", [False, True])
def test_eager_models_keep_eager_in_unpatched_layers(reorder_and_upcast_attn):
    """Unpatched layers keep eager (including GPT-2's upcast path); patched layers really are neural."""
    reference = tiny_gpt2(reorder_and_upcast_attn=reorder_and_upcast_attn)
    reference.set_attn_implementation("eager")
    model = patch_model(copy.deepcopy(reference), layers=[-1])
    ids = random_ids(2, 9)
    before, after = _hidden_states(reference, ids), _hidden_states(model, ids)
    for layer in range(3):
        assert torch.equal(before[layer], after[layer])
    assert (before[3] - after[3]).abs().max() > 1e-3
    unpatch_model(model)
    assert model.config._attn_implementation == "eager"
    assert torch.equal(_hidden_states(model, ids)[3], before[3])


@pytest.mark.parametrize("family", ["gpt2", "vit"])
def test_residual_mode_at_init_equals_the_unpatched_model(family):
    reference = tiny_gpt2() if family == "gpt2" else tiny_vit()
    inputs = random_ids(2, 11) if family == "gpt2" else random_pixels(2)
    model = patch_model(copy.deepcopy(reference), layers="all", mode="residual")
    with torch.no_grad():
        want = reference(inputs).logits
        got = model(inputs).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_unpatched_layers_keep_causality_the_model_passes_per_call():
    # CLIP's attention class serves the causal text tower and the bidirectional vision tower, so it passes
    # is_causal=True per call (no module attribute) and, without padding, no mask: the eager fallback once built
    # no causal mask from it and let the text tower's unpatched layers see future tokens
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=16, attn_implementation="eager")
    stock = CLIPTextModel(config).eval()
    model = patch_model(copy.deepcopy(stock), layers=[0], mode="residual")  # residual at init: the stock function
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = stock(ids, output_attentions=True)
        got = model(ids, output_attentions=True)
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, rtol=0, atol=1e-6)
    for layer in range(2):
        assert got.attentions[layer].triu(1).abs().max() == 0, layer
    torch.testing.assert_close(got.attentions[1], want.attentions[1], rtol=0, atol=1e-6)


@pytest.mark.parametrize(("mode", "mlp"), [("replace", "paper"), ("residual", "paper"), ("replace", "authors")])
def test_gradients_reach_every_scorer_parameter(mode, mlp):
    # proj_dim 8: the authors' last hidden layer has 4 ReLU units (at d'=2 it has one, which can start dead).
    model = patch_model(tiny_gpt2(**NO_DROPOUT), layers=[0, 1], mode=mode, mlp=mlp, proj_dim=8).train()
    ids = random_ids(2, 8)
    for _ in range(2):  # residual mode: the zero-initialised output weight opens the path after one step
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        with torch.no_grad():
            for p in scorer_parameters(model).values():
                p -= 0.5 * p.grad
    params = scorer_parameters(model)
    assert len(params) == 2 * (7 + (mode == "residual") + 2 * (mlp == "authors"))
    for name, p in params.items():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().max() > 0, name


@pytest.mark.parametrize("family", ["gpt2", "vit"])
def test_output_attentions_returns_neural_probabilities(family):
    model = tiny_gpt2() if family == "gpt2" else tiny_vit()
    stock = copy.deepcopy(model)
    stock.set_attn_implementation("eager")
    inputs = random_ids(2, 7) if family == "gpt2" else random_pixels(2)
    patch_model(model, layers=[1])  # on SDPA, which returns no probabilities
    with torch.no_grad():
        attentions = model(inputs, output_attentions=True).attentions
        stock_attentions = stock(inputs, output_attentions=True).attentions
    # one per layer, in layer order: attentions[i] is layer i (unpatched layers report their eager probabilities)
    assert len(attentions) == len(stock_attentions) == 3
    torch.testing.assert_close(attentions[0], stock_attentions[0], rtol=0, atol=1e-6)  # before the neural layer
    assert not torch.allclose(attentions[1], stock_attentions[1], atol=1e-3)
    rows = attentions[1].sum(-1)
    torch.testing.assert_close(rows, torch.ones_like(rows), rtol=0, atol=1e-5)
    if family == "gpt2":  # causal: nothing above the diagonal
        assert attentions[1].triu(1).abs().max() == 0


def test_unpatch_restores_the_original_model_exactly():
    reference = tiny_gpt2()
    model = copy.deepcopy(reference)
    ids = random_ids(2, 6)
    patch_model(model, layers=[0, 2], proj_dim=4)
    unpatch_model(model)
    assert type(model) is GPT2LMHeadModel and type(model.config) is type(reference.config)
    assert model.config._attn_implementation == "sdpa"
    assert not any(k.startswith("neural_attention") for k in model.config.to_dict())
    assert model.state_dict().keys() == reference.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values(),
                                                  strict=True))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    assert model.config.to_diff_dict() == reference.config.to_diff_dict()


def test_train_and_eval_modes_agree_without_dropout():
    model = patch_model(tiny_gpt2(**NO_DROPOUT), layers=[0])
    ids = random_ids(2, 9)
    with torch.no_grad():
        eval_logits = model.eval()(ids).logits
        train_logits = model.train()(ids).logits
    torch.testing.assert_close(train_logits, eval_logits, rtol=0, atol=1e-6)


def test_attention_dropout_is_applied_in_training_only():
    model = patch_model(tiny_gpt2(attn_pdrop=0.5, resid_pdrop=0.0, embd_pdrop=0.0), layers=[0])
    ids = random_ids(1, 9)
    with torch.no_grad():
        a, b = model.train()(ids).logits, model(ids).logits
        c, d = model.eval()(ids).logits, model(ids).logits
    assert (a - b).abs().max() > 1e-4
    assert torch.equal(c, d)


@pytest.mark.parametrize("backend", ["eager", "tiled", "cpp"])
def test_attention_dropout_drops_at_the_models_rate_and_rescales_what_it_keeps(backend):
    # value = identity: the output rows are the dropped-out probabilities themselves, to compare pair by pair with
    # the same call without dropout (a kept pair is P / (1 - p), a dropped one 0)
    rate = 0.4
    model = patch_model(tiny_gpt2(attn_pdrop=rate, resid_pdrop=0.0, embd_pdrop=0.0), layers=[0], backend=backend)
    layer = model.transformer.h[0].attn
    generator = torch.Generator().manual_seed(drawn_seed())
    query, key = (torch.randn(2, 4, 40, 8, generator=generator) for _ in range(2))
    value = torch.eye(40).expand(2, 4, 40, 40)
    with torch.no_grad():
        plain, _ = neural_attention_forward(layer, query, key, value, None, dropout=0.0)
        dropped, _ = neural_attention_forward(layer, query, key, value, None, dropout=rate)
    plain, dropped = plain.transpose(1, 2), dropped.transpose(1, 2)  # (batch, heads, q_len, k_len)
    visible = causal_visible(40, 40).expand_as(plain)
    kept = dropped != 0
    assert not (kept & ~visible).any()
    torch.testing.assert_close(dropped[kept], plain[kept] / (1 - rate), rtol=1e-5, atol=0)
    share = kept[visible].float().mean().item()  # 6560 visible pairs: the kept share's std is 0.006
    assert abs(share - (1 - rate)) < 0.03, share


@pytest.mark.parametrize("backend", ["auto", "eager", "tiled", "cpp"])
def test_output_attentions_are_the_neural_layers_probabilities(backend):
    # the probabilities returned equal the float64 reference of the scorer's equation on the layer's own q and k, and
    # are the ones the output was computed with (heads, rows and keys in place)
    model = patch_model(tiny_gpt2(), layers=[0], backend=backend)
    layer = model.transformer.h[0].attn
    sharpen_scorers(model)
    generator = torch.Generator().manual_seed(drawn_seed())
    query, key, value = (torch.randn(2, 4, 9, 8, generator=generator) for _ in range(3))
    with torch.no_grad():
        out, probabilities = neural_attention_forward(layer, query, key, value, None, dropout=0.0,
                                                      output_attentions=True)
    scorer = copy.deepcopy(layer.neural_scorer).double()
    _, expected = attention_from_scores(paper_scores(query.double(), key.double(), reference_weights(scorer), "relu"),
                                        value.double(), causal_visible(9, 9))
    torch.testing.assert_close(probabilities.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.transpose(1, 2), probabilities @ value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("backend", ["auto", "eager", "tiled", "cpp"])
def test_gradient_checkpointing_replays_the_same_dropout(backend, use_reentrant):
    # the recomputed forward must draw the dropout pattern of the first one, or the gradients are of another model
    ids, results = random_ids(2, 11), []
    for checkpointing in (False, True):
        model = patch_model(tiny_gpt2(attn_pdrop=0.3, resid_pdrop=0.0, embd_pdrop=0.0), layers=[0, 2],
                            backend=backend).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
        torch.manual_seed(3)
        loss = model(ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), {name: p.grad for name, p in model.named_parameters()}))
    (loss, grads), (checkpointed_loss, checkpointed_grads) = results
    assert torch.equal(loss, checkpointed_loss)
    for name, grad in grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("backend", ["eager", "tiled", "cpp"])
def test_bfloat16_model_tracks_float64(backend):
    """A patched model cast to bf16: the neural layer's output is within 1e-2 (of its largest entry) of the same
    layer in float64 on the same input, forward and input gradient (measured: 2.3e-3 and 3.9e-3), while the neural
    scores move them 8x / 30x more than that; the whole model trains with finite gradients. (The model's logits are
    no test of the layer: in a tiny random GPT-2 bf16 rounding elsewhere outweighs it.)"""
    model = sharpen_scorers(patch_model(tiny_gpt2(), layers=[0], backend=backend), 30.0).to(torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in scorer_parameters(model).values())
    attention = model.transformer.h[0].attn
    attention64 = copy.deepcopy(attention).double()
    silenced64 = copy.deepcopy(attention64)  # scores 0: uniform attention
    with torch.no_grad():
        silenced64.neural_scorer.output_weight.zero_()
    hidden = torch.randn(2, 13, 32, generator=torch.Generator().manual_seed(5)).bfloat16().requires_grad_()
    hidden64 = hidden.detach().double().requires_grad_()
    upstream = torch.randn(2, 13, 32, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    out, out64, silenced = attention(hidden)[0], attention64(hidden64)[0], silenced64(hidden64)[0]
    assert out.dtype == torch.bfloat16
    (grad,) = torch.autograd.grad(out, [hidden], upstream.bfloat16())
    (grad64,) = torch.autograd.grad(out64, [hidden64], upstream)
    (silenced_grad,) = torch.autograd.grad(silenced, [hidden64], upstream)
    for value, value64, without_scores in ((out, out64, silenced), (grad, grad64, silenced_grad)):
        tolerance = 1e-2 * value64.abs().max()
        assert (value.double() - value64).abs().max() < tolerance
        assert (without_scores - value64).abs().max() > 5 * tolerance

    ids = random_ids(2, 12)
    model.train()
    model(ids, labels=ids).loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in scorer_parameters(model).values())


def test_works_after_loading_a_saved_stock_checkpoint(tmp_path):
    tiny_gpt2().save_pretrained(tmp_path)
    model = patch_model(GPT2LMHeadModel.from_pretrained(tmp_path), layers=[0])
    with torch.no_grad():
        assert torch.isfinite(model(random_ids(1, 5)).logits).all()


def test_grouped_query_attention_llama_matches_repeated_keys():
    reference = tiny_llama()
    model = patch_model(copy.deepcopy(reference), layers=[0], backend="eager")
    module = find_attention_modules(model)[0][1]
    assert module.num_key_value_groups == 2
    q = torch.randn(1, 4, 6, 8)
    k, v = torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    grouped, _ = neural_attention_forward(module, q, k, v, None)
    repeated, _ = neural_attention_forward(module, q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), None)
    assert torch.equal(grouped, repeated)
    ids = random_ids(2, 7)
    with torch.no_grad():
        assert (model(ids).logits - reference(ids).logits).abs().max() > 1e-4


def test_multi_head_latent_attention_scores_queries_of_qk_head_dim():
    """DeepSeek-V3's attention: queries and keys of qk_nope + qk_rope = 12 channels, values of 6, head_dim (4)
    neither; the fused backends agree with eager on logits and gradients."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(0)
    config = DeepseekV3Config(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=4,
                              intermediate_size=64, moe_intermediate_size=16, vocab_size=97, q_lora_rank=16,
                              kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=6, head_dim=4,
                              n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
                              n_group=1, topk_group=1)
    reference = DeepseekV3ForCausalLM(config).eval()
    ids = random_ids(2, 7)
    results = {}
    for backend in ("eager", "tiled", "cpp"):
        torch.manual_seed(1)
        model = patch_model(copy.deepcopy(reference), layers=[0], proj_dim=4, backend=backend)
        assert find_attention_modules(model)[0][1].neural_scorer.head_dim == 12
        logits = model(ids).logits
        logits.square().mean().backward()
        results[backend] = logits.detach(), {k: p.grad for k, p in scorer_parameters(model).items()}
    with torch.no_grad():
        assert (results["eager"][0] - reference(ids).logits).abs().max() > 1e-4
    for backend in ("tiled", "cpp"):
        torch.testing.assert_close(results[backend][0], results["eager"][0], rtol=1e-5, atol=1e-6)
        for name, grad in results["eager"][1].items():
            torch.testing.assert_close(results[backend][1][name], grad, rtol=1e-4, atol=1e-4 * grad.abs().max())


@pytest.mark.parametrize("storage", [torch.uint8, torch.float8_e4m3fn])
def test_scorers_of_quantized_projections_compute_in_the_models_floating_dtype(storage):
    """bitsandbytes / fp8 checkpoints hold q_proj's weight as uint8 / fp8: storage, not a dtype to train a scorer in."""
    for dtype in (torch.float32, torch.bfloat16):
        model = tiny_llama().to(dtype)
        for _, module in find_attention_modules(model):  # the module keeps no floating parameter: the model's dtype
            for projection in (module.q_proj, module.k_proj, module.v_proj, module.o_proj):
                projection.weight = torch.nn.Parameter(projection.weight.detach().to(storage), requires_grad=False)
        patch_model(model, layers=[0, 1], proj_dim=4)
        assert {p.dtype for p in scorer_parameters(model).values()} == {dtype}


def _tiny_llava():
    """Llava with a 2-layer CLIP vision tower and a 2-layer Llama language model."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=8, patch_size=4, projection_dim=32)
    text = LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=64, vocab_size=100, pad_token_id=0)
    return LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, image_token_id=99,
                                                     vision_feature_layer=-1)).eval()


def test_the_towers_of_a_composite_model_keep_their_own_implementations():
    """Llava with its vision tower on eager and its language model on sdpa: patching a language layer leaves the
    vision layers on eager (bit for bit), and unpatching restores both."""
    model = _tiny_llava()
    model.set_attn_implementation({"vision_config": "eager", "text_config": "sdpa"})

    def implementations():
        return model.config.vision_config._attn_implementation, model.config.text_config._attn_implementation

    pixels = torch.randn(1, 3, 8, 8)
    tower = model.model.vision_tower
    with torch.no_grad():
        before = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]
    patch_model(model, layers=[2], proj_dim=4)  # the language model's first layer
    assert {m.neural_attention_fallback for _, m in find_attention_modules(tower)} == {"eager"}
    with torch.no_grad():
        assert torch.equal(tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-1], before)
    unpatch_model(model)
    assert implementations() == ("eager", "sdpa")
    assert model.config._attn_implementation == "sdpa"  # Llava's own value (its language model's), as before


def test_a_per_tower_request_after_patching_keeps_each_towers_kernel():
    """set_attn_implementation({"vision_config": "eager", "text_config": "sdpa"}) after patching the language model:
    the vision tower's layers keep eager, bit for bit, and unpatching leaves it on eager (the hook once gave every
    layer the top-level request, sdpa)."""
    model = _tiny_llava()
    pixels, request = torch.randn(1, 3, 8, 8), {"": "sdpa", "vision_config": "eager", "text_config": "sdpa"}
    model.set_attn_implementation(request)

    def tower_output():
        with torch.no_grad():
            return model.model.vision_tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]

    eager_tower = tower_output()
    patch_model(model, layers=[2], proj_dim=4)
    model.set_attn_implementation(request)
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 5, 6]]))  # the hook applies the request
    assert {m.neural_attention_fallback for _, m in find_attention_modules(model.model.vision_tower)} == {"eager"}
    assert {m.neural_attention_fallback for _, m in find_attention_modules(model.model.language_model)} == {"sdpa"}
    assert torch.equal(tower_output(), eager_tower)
    unpatch_model(model)
    assert (model.config.vision_config._attn_implementation, model.config.text_config._attn_implementation) == (
        "eager", "sdpa")


def test_encoder_layers_holding_a_config_of_their_own_are_switched_too():
    """EncoderDecoderModel(encoder=..., decoder=...) gives its encoder a new config object and leaves the encoder's
    layers holding the old one: set_attn_implementation misses them, and a patched encoder layer skipped its scorer
    (the logits did not move). unpatch_model switches them back."""
    from transformers import BertConfig, BertModel, EncoderDecoderModel, GPT2Config

    torch.manual_seed(0)
    encoder = BertModel(BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=32,
                                   vocab_size=50))
    decoder = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, add_cross_attention=True))
    model = EncoderDecoderModel(encoder=encoder, decoder=decoder).eval()
    layer = find_attention_modules(model)[0][1]
    assert layer.config is not model.encoder.config  # the situation under test
    ids = random_ids(1, 5)
    with torch.no_grad():
        before = model(input_ids=ids, decoder_input_ids=ids).logits
        sharpen_scorers(patch_model(model, layers=[0], proj_dim=2))
        assert layer.config._attn_implementation == "neural_attention"
        assert (model(input_ids=ids, decoder_input_ids=ids).logits - before).abs().max() > 1e-5  # 3e-4; bypassed: 0
        unpatch_model(model)
        assert layer.config._attn_implementation == "sdpa"
        assert torch.equal(model(input_ids=ids, decoder_input_ids=ids).logits, before)


def test_bert_encoder_is_bidirectional_and_trains():
    model = patch_model(tiny_bert(), layers=[0]).train()
    ids = random_ids(2, 8)
    changed = ids.clone()
    changed[:, -1] = (ids[:, -1] + 1) % 90 + 1
    with torch.no_grad():
        a, b = model.eval()(ids).last_hidden_state, model(changed).last_hidden_state
    assert (a[:, 0] - b[:, 0]).abs().max() > 1e-5  # the first token sees the last one
    model.train()(ids).last_hidden_state.sum().backward()
    assert all(p.grad is not None for p in scorer_parameters(model).values())


# --- bad input ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("layers", "error", "message"),
    [
        ([3], ValueError, "out of range"),
        ([-4], ValueError, "out of range"),
        ([0, -3], ValueError, "more than once"),
        ([], ValueError, "empty"),
        ("first", ValueError, "'all'"),
        (1.0, TypeError, "int"),
        ([0, "1"], TypeError, "ints"),
        ({0: 1}, TypeError, "int"),
        (torch.tensor([True, False]), TypeError, r"bool tensor \(a mask\?\).*nonzero"),  # it read as [1, 0]
        (torch.tensor(True), TypeError, "bool tensor"),
        ([torch.tensor(False)], TypeError, "ints"),
    ],
)
def test_bad_layer_selections_are_refused_and_leave_the_model_untouched(layers, error, message):
    model = tiny_gpt2()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=message):
        patch_model(model, layers=layers)
    assert model.config._attn_implementation == "sdpa" and neural_layers(model) == []
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    ("settings", "error", "message"),
    [
        (dict(proj_dim=0), ValueError, "proj_dim"),
        (dict(hidden_dim=2.5), TypeError, "hidden_dim"),
        (dict(mlp="deep"), ValueError, "mlp"),
        (dict(activation="swish"), ValueError, "activation"),
        (dict(mode="additive"), ValueError, "mode"),
        (dict(backend="cuda"), ValueError, "backend"),
        (dict(mlp="authors", hidden_dim=4), ValueError, "hidden_dim"),
        (dict(share_across_heads="yes"), TypeError, "share_across_heads"),
        (dict(mlp_precision="bf16"), ValueError, "mlp_precision"),
        (dict(mlp_precision="fp16", activation="gelu"), ValueError, r"mlp_precision='fp16'.*activation='gelu'"),
        (dict(mlp_precision="fp16", mlp="authors"), ValueError, r"mlp_precision='fp16'.*mlp='authors'"),
        (dict(proj_dim=True), TypeError, "proj_dim"),
        (dict(proj_dim=torch.tensor(True)), TypeError, "proj_dim"),
        (dict(proj_dims=8), TypeError, r"unknown setting\(s\) \['proj_dims'\].*did you mean proj_dim\?"),
    ],
)
def test_bad_settings_are_refused(settings, error, message):
    model = tiny_gpt2()
    with pytest.raises(error, match=message):
        patch_model(model, layers=[0], **settings)
    assert type(model) is GPT2LMHeadModel and not neural_layers(model)


def test_integer_settings_of_other_integer_types_are_stored_as_int():
    import numpy as np

    model = patch_model(tiny_gpt2(), layers=[0], proj_dim=np.int64(4), hidden_dim=torch.tensor(3))
    assert model.config.neural_attention_proj_dim == 4 and type(model.config.neural_attention_proj_dim) is int
    assert type(model.config.neural_attention_hidden_dim) is int
    assert json.loads(model.config.to_json_string())["neural_attention_hidden_dim"] == 3


def test_the_settings_object_passed_in_is_copied():
    settings = NeuralAttentionConfig(proj_dim=4)
    model = patch_model(tiny_gpt2(), layers=[0], config=settings)
    settings.proj_dim, settings.backend = 8, "eager"  # the next arm of a sweep
    scorer = find_attention_modules(model)[0][1].neural_scorer
    assert (scorer.settings.proj_dim, scorer.settings.backend) == (4, "auto")
    assert model.config.neural_attention_proj_dim == 4


def test_patching_a_patched_layer_again_is_an_error_but_other_layers_can_be_added():
    model = patch_model(tiny_gpt2(), layers=[0])
    with pytest.raises(ValueError, match="already patched"):
        patch_model(model, layers=[0, 1])
    with pytest.raises(ValueError, match=r"different settings \(proj_dim=None, not 8\)"):
        patch_model(model, layers=[1], proj_dim=8)
    patch_model(model, layers=[1])
    assert [i for i, _ in neural_layers(model)] == [0, 1] and model.config.neural_attention_layers == [0, 1]


def test_models_without_patchable_attention_are_refused():
    with pytest.raises(ValueError, match="no self-attention module"):
        patch_model(ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8], depths=[1])), layers=[0])
    bloom = BloomForCausalLM(BloomConfig(n_layer=1, hidden_size=16, n_head=2, vocab_size=20))  # ALiBi, own code
    with pytest.raises(ValueError, match="computes the scores in its own code.*ALiBi"):
        patch_model(bloom, layers=[0])
    with pytest.raises(TypeError, match="PreTrainedModel"):
        patch_model(torch.nn.Linear(2, 2), layers=[0])
    for not_a_model in ("gpt2", None):
        with pytest.raises(TypeError, match="unpatch_model expects a model"):
            unpatch_model(not_a_model)


def test_patching_leaves_a_config_shared_with_another_model_alone():
    # transformers hands one config object to every model built from it (an A/B set-up does exactly this)
    config = tiny_gpt2().config
    neural, dot = GPT2LMHeadModel(config).eval(), GPT2LMHeadModel(config).eval()
    assert neural.config is dot.config is config
    before = config.to_dict()
    patch_model(neural, layers=[0])
    assert config.to_dict() == before and type(config).__name__ == "GPT2Config"
    assert dot.config is config and type(dot) is GPT2LMHeadModel and neural_layers(dot) == []
    assert neural.config is not config and neural.config.neural_attention_layers == [0]
    assert all(module.config is neural.config for module in neural.modules() if "config" in module.__dict__)
    patch_model(dot, layers=[1])  # its own layers and settings, not [0, 1]
    assert dot.config.neural_attention_layers == [1] and neural.config.neural_attention_layers == [0]


def test_patching_copies_a_config_that_only_the_caller_holds(tmp_path):
    # the A/B set-up written in the other order: the dot-product model is built from the config after patching
    config = tiny_gpt2_config()
    before = config.to_dict()
    neural = patch_model(GPT2LMHeadModel(config), layers=[0])
    assert neural.config is not config and type(config) is GPT2Config and config.to_dict() == before
    dot = GPT2LMHeadModel(config).eval()
    dot.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is GPT2LMHeadModel
    ids = random_ids(1, 6)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, dot(ids).logits, rtol=0, atol=0)


def _config_tree(config: PretrainedConfig) -> set[int]:
    """ids of ``config`` and of every sub-config in it."""
    found = {id(config)}
    for value in vars(config).values():
        if isinstance(value, PretrainedConfig):
            found |= _config_tree(value)
    return found


@pytest.mark.parametrize("dot_first", [False, True])
@pytest.mark.parametrize("part", ["encoder", "decoder", "transformer"])
def test_patching_a_tower_or_sub_model_leaves_the_callers_config_alone(part, dot_first):
    """The A/B pair built from one config object with the neural arm's patch in a tower of a composite (a
    VisionEncoderDecoderModel's ViT encoder or GPT-2 decoder) or in a sub-model (GPT2LMHeadModel.transformer): the
    caller's config, and the dot-product arm built from it before or after, stay stock (they had the tower's
    settings, attention implementation and config class written into them, or patching was refused); the patched
    model holds one consistent copy."""
    from transformers import VisionEncoderDecoderConfig, VisionEncoderDecoderModel

    if part == "transformer":
        config, build = tiny_gpt2_config(), GPT2LMHeadModel
    else:
        config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(tiny_vit_config(), tiny_gpt2_config())
        build = VisionEncoderDecoderModel
    neural = build(config)  # (VisionEncoderDecoderModel writes tie_word_embeddings into the config it is given)
    dot = build(config) if dot_first else None
    before = config.to_dict()
    classes = {name: type(value) for name, value in vars(config).items() if isinstance(value, PretrainedConfig)}
    patch_model(getattr(neural, part), layers=[0], proj_dim=4)
    assert config.to_dict() == before and type(config) is type(build(config).config)
    assert {name: type(value) for name, value in vars(config).items() if isinstance(value, PretrainedConfig)} == classes
    dot = dot or build(config)
    assert neural_layers(dot) == [] and dot.config is config  # the dot-product arm
    assert neural.config is not config and len(neural_layers(neural)) == 1
    tree = _config_tree(neural.config)
    assert all(id(held) in tree for module in neural.modules() for held in module.__dict__.values()
               if isinstance(held, PretrainedConfig))  # fmt: skip
    if part != "transformer":  # the composite saves its towers' configs from its own
        assert getattr(neural.config, part) is getattr(neural, part).config


@pytest.mark.parametrize("wrapper", ["compile", "peft", "peft-tuner"])
def test_patching_a_wrapped_model_patches_the_model_inside(tmp_path, wrapper):
    """torch.compile's and PEFT's wrappers: the transformers model inside gets the Hub class, so its checkpoint
    reloads with its scorers."""
    model = tiny_gpt2()
    if wrapper == "compile":
        wrapped = torch.compile(model)
    else:
        peft = pytest.importorskip("peft")
        wrapped = peft.get_peft_model(model, peft.LoraConfig(target_modules=["c_attn"]))
    patched_wrapper = wrapped.base_model if wrapper == "peft-tuner" else wrapped  # PeftModel or its LoraModel
    assert patch_model(patched_wrapper, layers=[0]) is patched_wrapper
    assert unwrap_model(wrapped) is model and type(model).__name__ == "NeuralAttentionGPT2ForCausalLM"
    saved = wrapped.merge_and_unload() if wrapper != "compile" else model
    saved.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(model) and neural_layers(reloaded) == [(0, "transformer.h.0.attn")]
    ids = random_ids(1, 6)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, saved.eval()(ids).logits, rtol=0, atol=1e-6)


def test_patching_a_data_parallel_wrapper_is_refused_with_the_order_to_follow():
    wrapped = torch.nn.DataParallel(tiny_gpt2())
    with pytest.raises(ValueError, match="already wrapped in DataParallel.*patch the model first, then wrap it"):
        patch_model(wrapped, layers=[0])
    assert neural_layers(wrapped.module) == [] and type(wrapped.module) is GPT2LMHeadModel


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo")
def test_patching_a_fully_sharded_model_is_refused():
    # FSDP2 swaps the classes of the modules it shards instead of wrapping them: no wrapper to see, but new
    # parameters inside a sharded block would be left out of its shards and its gradient reduction
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if dist.is_initialized():
        pytest.skip("a process group is already set up in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = tiny_gpt2()
        mesh = init_device_mesh("cpu", (1,))
        fully_shard(model.transformer.h[1], mesh=mesh)  # one block: the model itself keeps its class
        with pytest.raises(ValueError, match=r"FSDP2 \(fully_shard\).*patch the model first, then wrap it"):
            patch_model(model, layers=[0])
        assert neural_layers(model) == [] and type(model) is GPT2LMHeadModel
    finally:
        dist.destroy_process_group()


def test_every_reference_to_the_config_moves_to_the_models_copy():
    # DiffusionGemma's decoder builds its masks from self.text_config, a second reference to a sub-config: left on
    # the caller's config it would describe the old attention implementation; the model must still compute what it
    # computed (residual mode starts at the stock model), padding and the decoder's all-keys attention included
    model = tiny_diffusion_gemma()
    stock_config = model.config
    ids, canvas = random_ids(2, 8), random_ids(2, 6, seed=2)
    padding = torch.ones(2, 8, dtype=torch.long)
    padding[1, :3] = 0
    decoder_padding = torch.cat([padding, torch.ones(2, 6, dtype=torch.long)], dim=1)
    inputs = dict(input_ids=ids, attention_mask=padding, decoder_input_ids=canvas,
                  decoder_attention_mask=decoder_padding)
    unpadded = dict(input_ids=ids, decoder_input_ids=canvas)  # the decoder's mask is None: every key
    with torch.no_grad():
        stock, stock_unpadded = model(**inputs).logits, model(**unpadded).logits
    names = [name for name, _ in find_attention_modules(model)]
    layers = [i for i, name in enumerate(names) if "vision" not in name]
    patch_model(model, layers=layers, proj_dim=4, mode="residual")
    assert [name for _, name in neural_layers(model)] == [names[i] for i in layers]
    tree = {id(model.config), *(id(value) for value in vars(model.config).values())}
    held = [(name, attr) for name, module in model.named_modules() for attr, value in vars(module).items()
            if isinstance(value, PretrainedConfig)]
    assert ("model.decoder", "text_config") in held
    for name, attr in held:
        assert id(getattr(model.get_submodule(name), attr)) in tree, f"{name}.{attr} still holds the caller's config"
    assert model.model.decoder.text_config._attn_implementation == ATTENTION_NAME
    assert stock_config.text_config._attn_implementation != ATTENTION_NAME
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, stock, rtol=0, atol=1e-5)
        torch.testing.assert_close(model(**unpadded).logits, stock_unpadded, rtol=0, atol=1e-5)


def test_t5_cross_attention_is_not_a_layer():
    from transformers import T5Config, T5ForConditionalGeneration

    model = T5ForConditionalGeneration(T5Config(vocab_size=97, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                                num_decoder_layers=3, num_heads=4))
    names = [name for name, _ in find_attention_modules(model)]
    assert len(names) == 5 and all(name.endswith("SelfAttention") for name in names), names


def test_a_sub_model_called_alone_after_a_stock_switch_keeps_its_scorers():
    model = patch_model(tiny_llama(), layers=[0], proj_dim=4)
    ids = random_ids(2, 6)
    with torch.no_grad():
        patched = model.model(ids).last_hidden_state
        model.set_attn_implementation("sdpa")  # then the sub-model first, before any call of the parent
        torch.testing.assert_close(model.model(ids).last_hidden_state, patched, rtol=0, atol=1e-6)
    assert model.config._attn_implementation == ATTENTION_NAME


def test_set_attn_implementation_keeps_the_neural_layers_of_models_without_a_hub_class():
    model = tiny_llama()
    stock = copy.deepcopy(model)
    ids = random_ids(2, 6)
    patch_model(model, layers=[0], proj_dim=4)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        patched = model(ids).logits
        model.set_attn_implementation("eager")  # the stock method: would route every layer past the scorer
        after = model(ids).logits
        assert model.config._attn_implementation == ATTENTION_NAME
        torch.testing.assert_close(after, patched, rtol=0, atol=1e-5)  # the unpatched layer now eager
        assert not torch.allclose(after, stock(ids).logits, atol=1e-4)
        model.model.set_attn_implementation("sdpa")  # through the sub-model that shares the config
        torch.testing.assert_close(model(ids).logits, patched, rtol=0, atol=1e-5)
    assert all(getattr(m, "neural_attention_fallback", None) == "sdpa" for _, m in find_attention_modules(model))
    assert all(getattr(m, "neural_attention_fallback", None) == "sdpa" for _, m in find_attention_modules(twin))
    model.set_attn_implementation("flex_attention")
    with pytest.raises(ValueError, match="bypass the neural scorer"):
        model(ids)
    model.set_attn_implementation("sdpa")
    unpatch_model(model)  # removes the hook: the stock model switches freely again
    model.set_attn_implementation("eager")
    with torch.no_grad():
        assert model.config._attn_implementation == "eager"
        torch.testing.assert_close(model(ids).logits, stock(ids).logits, rtol=0, atol=1e-5)


def test_a_model_transformers_will_not_switch_is_refused_before_anything_changes():
    # transformers decides whether set_attn_implementation may switch a class by reading the source of its module; a
    # class defined in a notebook has none, and it only warns: the scorers were attached, the switch was not made
    namespace: dict = {}
    exec("from transformers import GPT2LMHeadModel\nclass NotebookLM(GPT2LMHeadModel): pass", namespace)
    notebook_class = namespace["NotebookLM"]
    # transformers caches its answer on the class, and a subclass inherits the stock class's once a stock GPT-2 was
    # switched in this process: as in a fresh one, NotebookLM's own answer is asked for
    notebook_class._can_set_attn_implementation_cached_value = None
    model = notebook_class(tiny_gpt2_config())
    config, state = model.config, {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="will not switch NotebookLM.*Nothing was changed"):
        patch_model(model, layers=[0])
    assert neural_layers(model) == [] and model.config is config and config._attn_implementation == "sdpa"
    assert model.state_dict().keys() == state.keys() and not hasattr(model.transformer.h[0].attn, "neural_scorer")
    assert patch_model(tiny_gpt2(), layers=[0]) is not None  # a stock class is switched as before


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_unpatching_a_model_never_patched_changes_nothing(implementation):
    model = tiny_gpt2()
    model.set_attn_implementation(implementation)
    ids = random_ids(2, 8)
    before = model(ids).logits
    assert unpatch_model(model) is model
    assert type(model) is GPT2LMHeadModel and model.config._attn_implementation == implementation
    torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)


def test_unpatch_keeps_the_implementation_set_after_patching():
    # README: set_attn_implementation after patching sets what the unpatched layers use; unpatching keeps it (a
    # composite's own value restored by unpatch_model once overrode it with the value from before patching)
    model = patch_model(tiny_gpt2(), layers=[0])
    assert model.config._attn_implementation == ATTENTION_NAME
    model.set_attn_implementation("eager")
    unpatch_model(model)
    assert type(model) is GPT2LMHeadModel and model.config._attn_implementation == "eager"


def test_a_patched_sub_model_keeps_sharing_its_parents_config(tmp_path):
    from hf_neural_attention import NeuralAttentionGPT2ForCausalLM

    model = tiny_gpt2(**NO_DROPOUT)
    reference = copy.deepcopy(model)
    ids = random_ids(2, 7)
    probe = torch.nn.Sequential(model.transformer, torch.nn.Linear(32, 2))  # another holder, without a config
    patch_model(model.transformer, layers=[0], proj_dim=4)
    assert model.config is model.transformer.config and model.config.neural_attention_layers == [0]
    assert model.config._attn_implementation == ATTENTION_NAME and probe[0] is model.transformer
    with torch.no_grad():
        patched = model(ids).logits
        model.set_attn_implementation("eager")  # the parent's stock method, on the shared config
        torch.testing.assert_close(model(ids).logits, patched, rtol=0, atol=1e-6)
        assert model.config._attn_implementation == ATTENTION_NAME
        model.set_attn_implementation("sdpa")  # and back, for the bit-exact comparisons below
        torch.testing.assert_close(model(ids).logits, patched, rtol=0, atol=1e-6)
    model.save_pretrained(tmp_path)
    loaded = NeuralAttentionGPT2ForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=1e-6)
    unpatch_model(model)  # through the parent
    assert model.config._attn_implementation == "sdpa"
    assert not any(k.startswith("neural_attention") for k in model.config.to_dict())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


@pytest.mark.parametrize("patched_through", ["parent", "sub-model"])
def test_unpatching_a_sub_model_restores_its_parents(patched_through, tmp_path):
    # the parent shares the sub-model's config: left with the Hub class and a cleared config it could not be saved
    model = tiny_gpt2(**NO_DROPOUT)
    reference = copy.deepcopy(model)
    ids = random_ids(2, 7)
    patch_model(model if patched_through == "parent" else model.transformer, layers=[0, 1], proj_dim=4)
    unpatch_model(model.transformer)
    assert type(model) is GPT2LMHeadModel and type(model.config) is type(reference.config)
    assert model.config._attn_implementation == "sdpa" and not model._forward_pre_hooks
    assert not any(k.startswith("neural_attention") for k in model.config.to_dict())
    assert model.config.to_diff_dict() == reference.config.to_diff_dict()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    model.save_pretrained(tmp_path)
    assert type(GPT2LMHeadModel.from_pretrained(tmp_path)) is GPT2LMHeadModel


def test_unpatching_a_wrapper_restores_every_model_inside_it(tmp_path):
    # a user's plain nn.Module around patched models: each inner model gets its stock class and config back
    wrapper = torch.nn.ModuleDict({"lm": tiny_gpt2(**NO_DROPOUT), "vision": tiny_vit()})
    wrapper["lm"].set_attn_implementation("eager")  # each model returns to its own implementation
    reference = copy.deepcopy(wrapper)
    patch_model(wrapper["lm"], layers=[0], proj_dim=4)
    patch_model(wrapper["vision"], layers=[1], proj_dim=4)
    unpatch_model(wrapper)
    for name in ("lm", "vision"):
        model, stock = wrapper[name], reference[name]
        assert type(model) is type(stock) and type(model.config) is type(stock.config)
        assert model.config.to_diff_dict() == stock.config.to_diff_dict()
        assert model.config._attn_implementation == stock.config._attn_implementation
    ids, pixels = random_ids(2, 7), random_pixels(2)
    with torch.no_grad():
        assert torch.equal(wrapper["lm"](ids).logits, reference["lm"](ids).logits)
        assert torch.equal(wrapper["vision"](pixels).logits, reference["vision"](pixels).logits)
    wrapper["lm"].save_pretrained(tmp_path)
    assert type(GPT2LMHeadModel.from_pretrained(tmp_path)) is GPT2LMHeadModel


def test_unpatching_one_of_two_models_built_from_one_config_leaves_the_other_alone(tmp_path):
    config = NeuralAttentionGPT2Config(**tiny_gpt2_config(**NO_DROPOUT).to_dict(), neural_attention_layers=[0],
                                       neural_attention_proj_dim=4)
    first, second = NeuralAttentionGPT2ForCausalLM(config).eval(), NeuralAttentionGPT2ForCausalLM(config).eval()
    assert first.config is second.config  # transformers hands both the one object
    ids = random_ids(2, 7)
    with torch.no_grad():
        before = second(ids).logits
    unpatch_model(first)
    assert type(first) is GPT2LMHeadModel and first.config is not config
    assert type(second.config) is NeuralAttentionGPT2Config and second.config.neural_attention_layers == [0]
    with torch.no_grad():
        assert torch.equal(second(ids).logits, before)
    second.save_pretrained(tmp_path)
    assert torch.equal(NeuralAttentionGPT2ForCausalLM.from_pretrained(tmp_path).eval()(ids).logits, before)


def test_unpatching_a_sub_model_refuses_when_its_parent_has_other_neural_layers():
    model = tiny_gpt2(n_layer=2)
    model.side = GPT2Model(model.config)  # a second sub-model on the same config: layers 2 and 3 of the parent
    patch_model(model, layers=[0, 3], proj_dim=4)
    before = [m for m in model.modules() if getattr(m, "neural_scorer", None) is not None]
    with pytest.raises(ValueError, match=r"unpatch_model\(NeuralAttentionGPT2ForCausalLM\) instead"):
        unpatch_model(model.transformer)
    assert [m for m in model.modules() if getattr(m, "neural_scorer", None) is not None] == before


def test_integer_like_layer_indices_are_accepted():
    numpy = pytest.importorskip("numpy")
    model = patch_model(tiny_gpt2(), layers=numpy.array([0, 2]))
    patch_model(model, layers=torch.tensor(1))
    assert model.config.neural_attention_layers == [0, 1, 2]


def test_set_backend_switches_every_neural_layer_and_the_recorded_setting(tmp_path):
    from hf_neural_attention import set_backend

    model = patch_model(tiny_gpt2(**NO_DROPOUT), layers=[0, 2], proj_dim=4)
    ids = random_ids(2, 9)
    with torch.no_grad():
        auto = model(ids).logits
        set_backend(model, "eager")
        assert model.config.neural_attention_backend == "eager"
        assert all(m.neural_scorer.settings.backend == "eager" for _, m in find_attention_modules(model)
                   if hasattr(m, "neural_scorer"))  # fmt: skip
        torch.testing.assert_close(model(ids).logits, auto, rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path)
    assert type(model).from_pretrained(tmp_path).config.neural_attention_backend == "eager"
    with pytest.raises(ValueError, match="backend"):
        set_backend(model, "cuda")
    assert model.config.neural_attention_backend == "eager"  # a refused switch changes nothing
    with pytest.raises(ValueError, match="no neural layers"):
        set_backend(tiny_gpt2(), "tiled")


def test_set_backend_switches_the_mlp_precision_with_the_backend(tmp_path):
    from hf_neural_attention import set_backend

    model = patch_model(tiny_gpt2(), layers=[0, 2], proj_dim=4)
    set_backend(model, "tiled", mlp_precision="fp16")
    assert model.config.neural_attention_mlp_precision == "fp16" and model.config.neural_attention_backend == "tiled"
    assert {m.neural_scorer.settings.mlp_precision for _, m in find_attention_modules(model)
            if hasattr(m, "neural_scorer")} == {"fp16"}  # fmt: skip
    set_backend(model, "eager")  # None keeps the precision
    assert model.config.neural_attention_mlp_precision == "fp16"
    model.save_pretrained(tmp_path)
    assert type(model).from_pretrained(tmp_path).config.neural_attention_mlp_precision == "fp16"

    authors = patch_model(tiny_gpt2(), layers=[0], proj_dim=4, mlp="authors")
    with pytest.raises(ValueError, match=r"mlp_precision='fp16'.*mlp='authors'"):
        set_backend(authors, "triton", mlp_precision="fp16")
    assert authors.config.neural_attention_mlp_precision == "fp32"  # a refused switch changes nothing
    assert authors.config.neural_attention_backend == "auto"


def test_patching_an_encoder_decoder_tower_leaves_the_config_its_layers_were_built_with_alone():
    """EncoderDecoderModel(encoder=BertModel(cfg), ...) gives the encoder a config of its own and leaves its layers
    holding cfg, outside the composite's config: patching the encoder must copy that one too (it switched cfg to
    the plugin's attention implementation, so a stock BertModel(cfg) built after ran through the plugin)."""
    from transformers import BertConfig, BertLMHeadModel, BertModel, EncoderDecoderModel

    settings = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48)
    encoder_config = BertConfig(**settings)
    model = EncoderDecoderModel(encoder=BertModel(encoder_config),
                                decoder=BertLMHeadModel(BertConfig(**settings, is_decoder=True,
                                                                   add_cross_attention=True)))  # fmt: skip
    assert model.encoder.encoder.config is encoder_config is not model.encoder.config
    before = (encoder_config.to_dict(), encoder_config._attn_implementation)
    patch_model(model.encoder, layers=[0], proj_dim=4)
    assert (encoder_config.to_dict(), encoder_config._attn_implementation) == before
    assert BertModel(encoder_config).config._attn_implementation == before[1]
    assert model.encoder.encoder.config is not encoder_config
    assert model.encoder.encoder.config._attn_implementation == ATTENTION_NAME  # the patched layers dispatch to it
    ids = random_ids(2, 6)
    with torch.no_grad():
        patched = model.encoder(ids).last_hidden_state
        unpatch_model(model.encoder)
        assert not torch.allclose(model.encoder(ids).last_hidden_state, patched, atol=1e-6)


def test_sub_models_sharing_one_config_with_their_parent_are_refused():
    from transformers import BertConfig, BertModel, PreTrainedModel

    class DualEncoder(PreTrainedModel):
        config_class = BertConfig
        _supports_sdpa = True

        def __init__(self, config):
            super().__init__(config)
            self.query, self.document = BertModel(config), BertModel(config)

    dual = DualEncoder(tiny_bert().config).eval()
    assert dual.query.config is dual.document.config is dual.config
    with pytest.raises(ValueError, match="config of its own"):
        patch_model(dual.query, layers=[0])
    assert neural_layers(dual) == [] and not hasattr(dual.config, "neural_attention_layers")
    dual.query.config = copy.deepcopy(dual.query.config)  # the fix the message names
    for module in dual.query.modules():
        if "config" in module.__dict__:
            module.config = dual.query.config
    patch_model(dual.query, layers=[0])
    assert [i for i, _ in neural_layers(dual.query)] == [0] and neural_layers(dual.document) == []
    assert not hasattr(dual.document.config, "neural_attention_layers")


_WITHOUT_TRITON_SCRIPT = """
import importlib.abc, sys

class NoTriton(importlib.abc.MetaPathFinder):  # as on a machine where triton is not installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "triton":
            raise ModuleNotFoundError("No module named 'triton'")

sys.meta_path.insert(0, NoTriton())
import torch
from hf_neural_attention import patch_model, set_backend
from hf_neural_attention.triton_neural_attention import TRITON_AVAILABLE, triton_is_usable
from tests.models import random_ids, tiny_gpt2

assert not TRITON_AVAILABLE and not triton_is_usable() and "triton" not in sys.modules
model = patch_model(tiny_gpt2(), layers=[0])
ids = random_ids(2, 7)
outputs = {}
for backend in ("auto", "tiled", "cpp", "eager"):
    set_backend(model, backend)
    model(ids, labels=ids).loss.backward()
    outputs[backend] = model(ids).logits.detach()
for backend, logits in outputs.items():
    torch.testing.assert_close(logits, outputs["eager"], rtol=1e-5, atol=1e-6)
set_backend(model, "triton")
try:
    model(ids)
except ValueError as error:
    assert "triton" in str(error), error
else:
    raise AssertionError("backend='triton' ran without triton")
print("without triton ok")
"""


def test_every_cpu_backend_runs_where_triton_is_not_installed():
    # the Triton launcher is imported on every fused call; without triton it must import all the same (it once
    # imported kernel names that only exist when triton does, and every neural forward failed)
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run([sys.executable, "-c", _WITHOUT_TRITON_SCRIPT], cwd=Path(__file__).resolve().parents[1],
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "without triton ok" in done.stdout


@pytest.mark.parametrize("tower", ["language_model", "vision_tower"])
@pytest.mark.parametrize("vision,text", [("sdpa", "eager"), ("eager", "sdpa")])
def test_unpatching_a_composite_one_of_whose_towers_was_patched_restores_every_tower(tower, vision, text):
    # the composite's own layers were not all under the patch: its other tower once followed the patched one's
    # fallback (a tower on eager beside one on sdpa: both ended on one of them)
    def implementations(model):
        config = model.config
        return (config._attn_implementation, config.vision_config._attn_implementation,
                config.text_config._attn_implementation)

    model = _tiny_llava()
    model.set_attn_implementation({"vision_config": vision, "text_config": text})
    before = implementations(model)
    patch_model(getattr(model.model, tower), layers=[0], proj_dim=4)
    assert ATTENTION_NAME in implementations(model)
    unpatch_model(model)
    assert implementations(model) == before
