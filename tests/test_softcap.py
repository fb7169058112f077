"""Logit soft-capping (Gemma 2's ``attn_logit_softcapping``): the neural scores become ``cap * tanh(score / cap)``
before the bias and the mask, on the materialising path and in the tiled kernel (``auto`` picks it for such a layer);
the other fused kernels refuse it."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM

from hf_neural_attention import NeuralAttentionConfig, NeuralScorer, neural_attention_forward, patch_model, set_backend
from hf_neural_attention.tiled_neural_attention import neural_attention_tiled
from tests.models import loss_and_grads, random_ids, sharpen_scorers
from tests.reference import drawn_seed, kernel_reference
from tests.test_generation import _generate
from tests.test_scorer_math import ScoredLayer, assert_matches, largest_entry

CAP = 1.5  # below the scores drawn here: the cap bends most of them


def _kernel_inputs(authors: bool, dot: bool, seed: int, batch=2, heads=3, q_len=9, k_len=11, hidden=4):
    print(f"random inputs: seed {seed}")  # shown with a failure, to reproduce it
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).requires_grad_()

    args = {"query_hidden": rnd(batch, heads, q_len, hidden), "key_hidden": rnd(batch, heads, k_len, hidden),
            "value": rnd(batch, heads, k_len, 5)}  # fmt: skip
    if authors:
        args.update(output_weight=rnd(heads, 2, scale=3.0), second_weight=rnd(heads, 2, hidden),
                    second_bias=rnd(heads, 2))  # fmt: skip
    else:
        args["output_weight"] = rnd(heads, hidden, scale=3.0)
    if dot:
        args.update(dot_query=rnd(batch, heads, q_len, 6), dot_key=rnd(batch, heads, k_len, 6))
    return args


POSITIONAL = ("query_hidden", "key_hidden", "value", "output_weight", "second_weight", "second_bias")


def _call(function, tensors: dict, **options):
    """``function`` with the kernel's positional tensors from ``tensors`` and the rest of them as keywords."""
    return function(*(tensors.get(name) for name in POSITIONAL),
                    **{k: v for k, v in tensors.items() if k not in POSITIONAL}, **options)  # fmt: skip


@pytest.mark.parametrize("authors", [False, True])
@pytest.mark.parametrize("dot", [False, True])
@pytest.mark.parametrize("extras", ["causal", "mask+bias"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_tiled_kernel_caps_scores_as_the_float64_reference(authors, dot, extras, dtype):
    leaves = _kernel_inputs(authors, dot, drawn_seed())  # float64, the reference's
    g = torch.Generator().manual_seed(1)
    options = {"dot_scale": 0.4} if dot else {}
    if extras == "causal":
        options["causal"] = True
    else:
        options["mask"] = torch.rand(2, 1, 9, 11, generator=g) > 0.3
        leaves["score_bias"] = torch.randn(1, 3, 9, 11, generator=g, dtype=torch.float64).requires_grad_()
    inputs = {name: t.detach().to(dtype).requires_grad_() for name, t in leaves.items()}
    out = _call(neural_attention_tiled, inputs, softcap=CAP, block_size=4, **options)  # several tiles a row
    expected = _call(kernel_reference, leaves, softcap=CAP, **options)
    assert (expected - _call(kernel_reference, leaves, **options)).abs().max() > 0.1  # the cap bends these scores
    assert_matches(out, expected, "out")
    gradient = torch.randn(out.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(out, list(inputs.values()), gradient.to(dtype))
    want = torch.autograd.grad(expected, list(leaves.values()), gradient)
    floor = largest_entry(want)
    for name, x, y in zip(leaves, got, want, strict=True):
        assert_matches(x, y, name, floor=floor)


@pytest.mark.parametrize("backend", ["eager", "tiled", "auto", "probabilities"])
def test_every_path_of_the_attention_function_caps_the_scores_it_computes(backend):
    scorer = NeuralScorer(8, 2, NeuralAttentionConfig(proj_dim=4, backend="auto" if backend == "probabilities" else
                                                      backend)).double()  # fmt: skip
    with torch.no_grad():  # scores well beyond the cap
        scorer.output_weight.mul_(4.0)
    g = torch.Generator().manual_seed(drawn_seed())
    query, key, value = (torch.randn(2, 2, n, 8, generator=g, dtype=torch.float64, requires_grad=True)
                         for n in (5, 7, 7))  # fmt: skip
    mask = torch.rand(2, 1, 5, 7, generator=g) > 0.3
    layer = ScoredLayer(scorer, is_causal=False)
    out, weights = neural_attention_forward(layer, query, key, value, mask, softcap=CAP,
                                            output_attentions=backend == "probabilities")  # fmt: skip
    # by hand: the scorer's scores, capped, softmax over the visible keys
    logits = CAP * torch.tanh(scorer.scores(query, key, 8**-0.5) / CAP)
    probabilities = torch.softmax(logits.masked_fill(~mask, float("-inf")), -1)
    assert (logits - scorer.scores(query, key, 8**-0.5)).abs().max() > 0.1
    torch.testing.assert_close(out.transpose(1, 2), probabilities @ value, rtol=1e-9, atol=1e-10)
    if backend == "probabilities":
        torch.testing.assert_close(weights, probabilities, rtol=1e-9, atol=1e-10)
    got = torch.autograd.grad(out.transpose(1, 2).sum(), [query, key, *scorer.parameters()])
    want = torch.autograd.grad((probabilities @ value).sum(), [query, key, *scorer.parameters()])
    for x, y in zip(got, want, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_a_backend_without_the_cap_is_refused_naming_the_one_that_has_it(backend):
    layer = ScoredLayer(NeuralScorer(8, 2, NeuralAttentionConfig(proj_dim=4, backend=backend)), is_causal=True)
    query = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match=f"backend='{backend}' has no logit soft-capping.*backend='auto'"):
        neural_attention_forward(layer, query, query, query, None, softcap=CAP)


@pytest.mark.parametrize("softcap", [0.0, -1.0, float("nan"), float("inf"), True, "50"])
def test_a_cap_that_is_not_a_positive_number_is_refused(softcap):
    layer = ScoredLayer(NeuralScorer(8, 2, NeuralAttentionConfig(proj_dim=4)), is_causal=True)
    query = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="softcap must be a positive number"):
        neural_attention_forward(layer, query, query, query, None, softcap=softcap)
    with pytest.raises(ValueError, match="softcap must be a positive number"):
        neural_attention_tiled(query[..., :2], query[..., :2], query, torch.ones(2, 2), softcap=softcap)


def _gemma2(cap: float | None = 0.5) -> Gemma2ForCausalLM:
    torch.manual_seed(0)
    return Gemma2ForCausalLM(Gemma2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                          max_position_embeddings=64, sliding_window=4,
                                          attn_logit_softcapping=cap))  # fmt: skip


def test_gemma2_layers_train_alike_on_every_backend_that_caps_and_the_cap_matters():
    base = sharpen_scorers(patch_model(_gemma2(), layers=[0, 1], backend="eager"), 5.0)  # a sliding and a full layer
    models = {"eager": base}
    for backend in ("tiled", "auto"):
        models[backend] = copy.deepcopy(base)
        set_backend(models[backend], backend)
    ids = random_ids(2, 9)
    results = loss_and_grads(models, ids)
    for name in ("tiled", "auto"):
        torch.testing.assert_close(results[name][0], results["eager"][0], rtol=1e-5, atol=1e-6)
        for got, want in zip(results[name][1], results["eager"][1], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    uncapped = copy.deepcopy(base)
    for module in uncapped.modules():
        if hasattr(module, "attn_logit_softcapping"):
            module.attn_logit_softcapping = None
    with torch.no_grad():
        assert (uncapped(ids).logits - base(ids).logits).abs().max() > 1e-3  # the cap reaches the neural scores


@pytest.mark.parametrize("backend", ["auto", "eager"])
def test_gemma2_decodes_with_its_caches_as_without(backend):
    model = patch_model(_gemma2(), layers=[0, 1], config=NeuralAttentionConfig(proj_dim=4, backend=backend))
    ids = random_ids(1, 7)
    cached, cached_scores = _generate(model, ids, use_cache=True)
    uncached, uncached_scores = _generate(model, ids, use_cache=False)
    assert torch.equal(cached, uncached)
    torch.testing.assert_close(cached_scores, uncached_scores, rtol=1e-5, atol=1e-5)
