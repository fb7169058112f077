"""Families whose model code branches on the attention implementation's name ("eager" / "sdpa").

Once patched, such a model runs on "neural_attention", so its own code takes the branch for other kernels: the
mask it builds, the keys it selects and the queries it keeps must still come out as under its old implementation,
for the unpatched layers bit for bit. Residual mode starts as exact dot-product attention, so a model patched in
it must also give the stock model's logits.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from hf_neural_attention import NeuralAttentionConfig, patch_model, set_backend
from hf_neural_attention.configuration_neural_attention import FALLBACK_CONFIG_ATTRIBUTE
from hf_neural_attention.patching import find_attention_modules

VOCAB = 99
RESIDUAL = NeuralAttentionConfig(mode="residual")


def _fallback(model) -> str | None:
    """The fallback recorded on the model's config, which decides the masks it builds."""
    return getattr(model.config, FALLBACK_CONFIG_ATTRIBUTE, None)


def _config(model_type: str, **settings):
    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"transformers {__import__('transformers').__version__} has no {model_type}")
    return AutoConfig.for_model(model_type, **settings)


def _ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


SEQ2SEQ = dict(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
               decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
               pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1, dropout=0.0,
               attention_dropout=0.0, activation_dropout=0.0)


@pytest.mark.parametrize(("model_type", "extra"), [
    ("bigbird_pegasus", dict(attention_type="original_full")),  # its encoder adds the mask to scores itself
    ("nllb-moe", dict(num_experts=4, expert_capacity=8)),  # its router reads padding from the mask
])
def test_eager_model_builds_eager_masks(model_type: str, extra: dict):
    """A model on eager (these have no SDPA) gets eager's additive mask, which code outside attention reads: a bool
    mask's True (visible) was added to BigBirdPegasus' scores as 1 and taken as padding by NLLB-MoE's router."""
    stock = AutoModelForSeq2SeqLM.from_config(_config(model_type, **SEQ2SEQ, **extra)).eval()
    assert stock.config._attn_implementation == "eager"
    patched = patch_model(copy.deepcopy(stock), layers=[-1], config=RESIDUAL)  # the last decoder layer only
    assert _fallback(patched) == "eager"
    inputs = dict(input_ids=_ids(2, 10), attention_mask=torch.tensor([[1] * 7 + [0] * 3, [1] * 10]),
                  decoder_input_ids=_ids(2, 5, seed=2))
    with torch.no_grad():
        expected = stock(**inputs, output_hidden_states=True)
        got = patched(**inputs, output_hidden_states=True)
    torch.testing.assert_close(got.encoder_last_hidden_state, expected.encoder_last_hidden_state, rtol=0, atol=0)
    torch.testing.assert_close(got.decoder_hidden_states[1], expected.decoder_hidden_states[1], rtol=0, atol=0)
    torch.testing.assert_close(got.logits, expected.logits, rtol=0, atol=1e-6)


def test_mask_kind_follows_every_switch(tmp_path):
    """The fallback is recorded beside the implementation's name: by patching, a later switch, loading, a Hub class
    built from a patched config; kept by deep copies, never saved, removed by unpatching. Eager's mask is additive
    float, SDPA's bool."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    from hf_neural_attention import unpatch_model
    from tests.models import tiny_gpt2

    def mask_dtype(model) -> torch.dtype:
        builder = ALL_MASK_ATTENTION_FUNCTIONS[model.config._attn_implementation]
        return builder(batch_size=1, q_length=3, kv_length=3, attention_mask=torch.tensor([[False, True, True]]),
                       dtype=torch.float32, config=model.config).dtype

    model = tiny_gpt2()
    model.set_attn_implementation("eager")
    patch_model(model, layers=[0])
    assert type(model.config._attn_implementation) is str  # torch.compile before 2.13 traces no str subclass
    assert _fallback(model) == "eager" and mask_dtype(model) == torch.float32
    assert _fallback(copy.deepcopy(model)) == "eager"
    model.set_attn_implementation("sdpa")
    assert _fallback(model) == "sdpa" and mask_dtype(model) == torch.bool
    model.save_pretrained(tmp_path)
    assert FALLBACK_CONFIG_ATTRIBUTE not in (tmp_path / "config.json").read_text()
    loaded = type(model).from_pretrained(tmp_path, attn_implementation="eager")
    assert _fallback(loaded) == "eager" and mask_dtype(loaded) == torch.float32
    for built in (type(loaded)(copy.deepcopy(loaded.config)),  # a Hub class from a patched config: its fallback
                  type(loaded).from_pretrained(tmp_path, config=copy.deepcopy(loaded.config))):
        assert _fallback(built) == "eager"
        assert built.transformer.h[1].attn.neural_attention_fallback == "eager"
    unpatch_model(model)
    assert model.config._attn_implementation == "sdpa" and _fallback(model) is None


def test_gemma4_kv_shared_layers_keep_the_last_queries_causal():
    """Gemma 4 keeps only the last ``logits_to_keep`` queries before its KV-shared layers, and under any
    implementation not named "sdpa" relies on the mask to keep them causal: a skipped (``None``) causal mask made
    them attend upper-left aligned, losing keys (logits 0.34 off)."""
    config = _config("gemma4_text", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                     layer_types=["full_attention"] * 4, num_kv_shared_layers=2, vocab_size_per_layer_input=VOCAB,
                     hidden_size_per_layer_input=8, pad_token_id=0)
    stock = AutoModelForCausalLM.from_config(config).eval()
    patched = patch_model(copy.deepcopy(stock), layers=[0], config=RESIDUAL)
    ids = _ids(2, 10)
    with torch.no_grad():
        full, kept = patched(ids).logits, patched(ids, logits_to_keep=3).logits
        expected = stock(ids).logits
    torch.testing.assert_close(kept, full[:, -3:], rtol=0, atol=1e-5)
    torch.testing.assert_close(full, expected, rtol=0, atol=1e-5)


def _deepseek_sparse():
    config = _config("deepseek_v32", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64, n_routed_experts=4,
                     num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1, first_k_dense_replace=0,
                     n_group=1, topk_group=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=4,
                     qk_nope_head_dim=8, v_head_dim=6, head_dim=4, index_topk=4, index_n_heads=2, index_head_dim=8,
                     pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return AutoModelForCausalLM.from_config(config).eval()


def test_sparse_attention_keeps_its_key_selection():
    """DeepSeek sparse attention folds its indexer's top-k keys into the mask only under eager / SDPA and otherwise
    passes them as ``indices``, which the attention function now folds: every layer attended to all keys before (the
    unpatched layer 0 was 1e-2 off)."""
    stock = _deepseek_sparse()
    ids = _ids(2, 10)  # longer than index_topk = 4: the selection drops keys
    last = patch_model(copy.deepcopy(stock), layers=[-1])
    every = patch_model(copy.deepcopy(stock), layers="all", config=RESIDUAL)
    with torch.no_grad():
        expected = stock(ids, output_hidden_states=True)
        torch.testing.assert_close(last(ids, output_hidden_states=True).hidden_states[1], expected.hidden_states[1],
                                   rtol=0, atol=0)
        torch.testing.assert_close(every(ids).logits, expected.logits, rtol=0, atol=1e-5)
        generated = every.generate(ids, max_new_tokens=4, do_sample=False)  # decoding: one query, cached keys
        torch.testing.assert_close(generated, stock.generate(ids, max_new_tokens=4, do_sample=False))


def test_block_sparse_selection_is_refused():
    """MiniMax-M3 selects key blocks (``block_indices``) with its own indexer, folded only under eager / SDPA: refused
    before anything changes (it was accepted, and every layer then attended to all keys)."""
    if "minimax_m3_vl" not in CONFIG_MAPPING:
        pytest.skip("this transformers has no minimax_m3_vl")
    from transformers.models.minimax_m3_vl import MiniMaxM3VLTextConfig, MiniMaxM3VLTextModel

    config = MiniMaxM3VLTextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2, dense_intermediate_size=32,
        shared_intermediate_size=16, rotary_dim=4, index_n_heads=2, index_head_dim=8, index_block_size=2,
        index_topk_blocks=2, index_local_blocks=1, mlp_layer_types=["dense", "sparse"],
        layer_types=["full_attention", "minimax_m3_sparse"], max_position_embeddings=64, bos_token_id=0,
        eos_token_id=0, pad_token_id=0)
    model = MiniMaxM3VLTextModel(config).eval()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="block-sparsely"):
        patch_model(model, layers=[0])
    assert model.config._attn_implementation == "sdpa"
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())


@pytest.mark.parametrize("model_type", ["inkling2_text", "inkling2_loop_text"])
def test_attention_over_depth_is_not_a_layer_and_per_token_sinks(model_type):
    """Inkling 2 runs attention over each token's layer outputs through the attention interface (its "attention
    residuals": the sequence is the layers). Those modules are not layers: ``layers="all"`` patched them, and the
    first forward failed on their shapes. Its self-attention computes attention sinks per token, which every kernel
    takes (``tests/test_softcap_and_sinks.py``): the same logits as the eager path."""
    config = _config(model_type, vocab_size=VOCAB, unpadded_vocab_size=VOCAB, hidden_size=32,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                     swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=8, sliding_window_size=4,
                     d_rel=4, rel_extent=8, moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2,
                     n_layers_per_attn_res_block=1, max_position_embeddings=64, pad_token_id=0, eos_token_id=2)
    stock = AutoModelForCausalLM.from_config(config).eval()
    names = [name for name, _ in find_attention_modules(stock)]
    assert names and all(name.endswith("self_attn") for name in names), names
    ids = _ids(2, 8)
    with torch.no_grad():
        reference = stock(ids).logits
    residual = patch_model(copy.deepcopy(stock), layers="all", mode="residual")  # starts as the stock model
    with_sinks = patch_model(copy.deepcopy(stock), layers="all", backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(residual(ids).logits, reference, rtol=1e-5, atol=1e-5)
        logits = {}
        for backend in ("eager", "auto"):
            set_backend(with_sinks, backend)
            logits[backend] = with_sinks(ids).logits
        torch.testing.assert_close(logits["auto"], logits["eager"], rtol=1e-5, atol=1e-5)
        sink_weights = with_sinks.get_submodule(names[0]).sink_proj.weight
        sink_weights.mul_(20.0)  # the sinks' logits reach the output
        assert (with_sinks(ids).logits - logits["auto"]).abs().max() > 1e-4


def test_a_scorer_called_with_other_heads_is_refused_naming_the_module():
    """The net under layer discovery: a patched module that calls attention with heads its scorer was not built for
    (attention over something other than tokens) gets a ValueError, not a shape error deep in the scorer."""
    from hf_neural_attention import NeuralScorer, neural_attention_forward
    from tests.test_scorer_math import ScoredLayer

    layer = ScoredLayer(NeuralScorer(8, 2, NeuralAttentionConfig(proj_dim=4)), is_causal=False)
    query = torch.randn(1, 1, 5, 32)  # one head of the hidden size, as Inkling 2's attention residuals call it
    with pytest.raises(ValueError, match="ScoredLayer called attention with 1 heads of size 32.*not a multi-head "
                                         "self-attention over tokens"):
        neural_attention_forward(layer, query, query, query, None)


def test_a_learned_position_bias_starting_at_zero_gets_its_gradient():
    """Swin (and BEiT) hand attention their relative position bias as a float mask, a learned table that starts at
    zeros: taken for a plain visibility mask, it was cut out of autograd and never left zero in training."""
    from transformers import SwinConfig, SwinForImageClassification

    config = SwinConfig(embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=2, image_size=16, patch_size=2,
                        num_channels=3, num_labels=5, drop_path_rate=0.0)
    stock = SwinForImageClassification(config).eval()
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    table = "swin.encoder.layers.0.blocks.0.attention.relative_position_bias.relative_position_bias_table"
    model = patch_model(stock, layers=[0])
    assert not dict(model.named_parameters())[table].any()
    grads = {}
    for backend in ("eager", "cpp"):
        set_backend(model, backend)
        model.zero_grad(set_to_none=True)
        model(pixel_values=pixels).logits.square().sum().backward()
        grads[backend] = dict(model.named_parameters())[table].grad
        assert grads[backend] is not None and grads[backend].abs().max() > 0
    torch.testing.assert_close(grads["cpp"], grads["eager"], rtol=1e-4, atol=1e-5 * grads["eager"].abs().max())
