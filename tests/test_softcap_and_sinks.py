"""Two score features that every backend has (the materialising path, the tiled kernels, the fused C++ kernel and the
Triton kernel, under its interpreter here):

- logit soft-capping (Gemma 2's ``attn_logit_softcapping``): the neural scores become ``cap * tanh(score / cap)``
  before the bias and the mask;
- attention sinks (gpt-oss' per-head ``s_aux``, Inkling 2's per-token ``sinks``): one more logit per query row in the
  softmax's denominator, with no value.
"""

from __future__ import annotations

import copy
import functools
import importlib.util

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM, GptOssConfig, GptOssForCausalLM

from hf_neural_attention import NeuralAttentionConfig, NeuralScorer, neural_attention_forward, patch_model, set_backend
from hf_neural_attention.cpp_neural_attention import neural_attention_cpp
from hf_neural_attention.fused_cpp_neural_attention import neural_attention_fused_cpp
from hf_neural_attention.tiled_neural_attention import neural_attention_tiled
from hf_neural_attention.triton_neural_attention import neural_attention_triton
from tests.models import loss_and_grads, random_ids, sharpen_scorers
from tests.reference import drawn_seed, kernel_reference
from tests.test_generation import _generate
from tests.test_scorer_math import ScoredLayer, assert_matches, largest_entry

CAP = 1.5  # below the scores drawn here: the cap bends most of them
POSITIONAL = ("query_hidden", "key_hidden", "value", "output_weight", "second_weight", "second_bias")
SINK_SHAPES = ("per head", "per token")  # (1, heads, 1, 1), (batch, heads, q_len, 1)
HAS_TRITON = importlib.util.find_spec("triton") is not None
KERNELS = {"tiled": functools.partial(neural_attention_tiled, block_size=4),  # several query and key tiles
           "cpp": functools.partial(neural_attention_cpp, block_size=4),  # the same tiles, the MLP in C++
           "fused-cpp": neural_attention_fused_cpp,  # sinks folded in on the host; a cap runs the C++ tiled loop
           # the cap in the kernels, the sinks folded in on the host (fp32 only)
           "triton": functools.partial(neural_attention_triton, block_m=16, block_n=16)}
# (q_len, k_len): Triton's tiles are 16 wide at least, so its inputs are longer to span two query and key blocks
LENGTHS = {"triton": (19, 21)}


def _case(kernel: str, *rest):
    marks = [pytest.mark.triton, pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")]
    return pytest.param(kernel, *rest, marks=marks if kernel == "triton" else [])


# --- the tiled kernel against the float64 reference -----------------------------------------------------------------
def _kernel_inputs(authors: bool, dot: bool, seed: int, kernel: str, batch=2, heads=3, hidden=4) -> dict:
    q_len, k_len = LENGTHS.get(kernel, (9, 11))
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


def _call(function, tensors: dict, **options):
    """``function`` with the kernel's positional tensors from ``tensors`` and the rest of them as keywords."""
    return function(*(tensors.get(name) for name in POSITIONAL),
                    **{k: v for k, v in tensors.items() if k not in POSITIONAL}, **options)  # fmt: skip


def _assert_matches_reference(kernel, leaves: dict, dtype: torch.dtype, without: dict, **options) -> None:
    """``kernel`` against the float64 reference, forward and every gradient, on ``leaves`` (float64) cast to
    ``dtype``; the feature must move the reference's output (``without``: the reference on the same inputs without
    it)."""
    inputs = {name: t.detach().to(dtype).requires_grad_() for name, t in leaves.items()}
    out = _call(kernel, inputs, **options)
    expected = _call(kernel_reference, leaves, **options)
    assert (expected - _call(kernel_reference, **without)).abs().max() > 0.05  # the feature matters here
    assert_matches(out, expected, "out")
    gradient = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    got = torch.autograd.grad(out, list(inputs.values()), gradient.to(dtype))
    want = torch.autograd.grad(expected, list(leaves.values()), gradient)
    floor = largest_entry(want)
    for name, x, y in zip(leaves, got, want, strict=True):
        assert x.shape == y.shape, name
        assert_matches(x, y, name, floor=floor)


# (with a cap, the fused C++ kernel runs its C++ tiled loop: the "cpp" cases, float64 included)
CAP_CASES = [_case(kernel, dtype) for kernel in KERNELS for dtype in (torch.float64, torch.float32)
             if kernel != "triton" or dtype == torch.float32]


@pytest.mark.parametrize(("kernel", "dtype"), CAP_CASES)
@pytest.mark.parametrize("authors", [False, True])
@pytest.mark.parametrize("dot", [False, True])
@pytest.mark.parametrize("extras", ["causal", "mask+bias"])
def test_the_kernels_cap_scores_as_the_float64_reference(kernel, authors, dot, extras, dtype):
    leaves = _kernel_inputs(authors, dot, drawn_seed(), kernel)
    q_len, k_len = leaves["query_hidden"].shape[2], leaves["key_hidden"].shape[2]
    g = torch.Generator().manual_seed(1)
    options = {"dot_scale": 0.4} if dot else {}
    if extras == "causal":
        options["causal"] = True
    else:
        options["mask"] = torch.rand(2, 1, q_len, k_len, generator=g) > 0.3
        leaves["score_bias"] = torch.randn(1, 3, q_len, k_len, generator=g, dtype=torch.float64).requires_grad_()
    _assert_matches_reference(KERNELS[kernel], leaves, dtype, {"tensors": leaves, **options}, softcap=CAP, **options)


# (with a cap, or in float64, the fused C++ kernel runs its C++ tiled loop: the "cpp" cases; Triton takes no float64)
SINK_CASES = [_case(kernel, extras, dtype) for kernel in KERNELS
              for extras in ("causal", "mask+bias", "mask+bias+cap") for dtype in (torch.float64, torch.float32)
              if (kernel != "fused-cpp" or extras != "mask+bias+cap") and (kernel == "tiled" or kernel == "cpp"
                                                                           or dtype == torch.float32)]


@pytest.mark.parametrize(("kernel", "extras", "dtype"), SINK_CASES)
@pytest.mark.parametrize("authors", [False, True])
@pytest.mark.parametrize("sink_shape", SINK_SHAPES)
def test_the_kernels_add_sinks_as_the_float64_reference(kernel, authors, sink_shape, extras, dtype):
    leaves = _kernel_inputs(authors, False, drawn_seed(), kernel)
    q_len, k_len = leaves["query_hidden"].shape[2], leaves["key_hidden"].shape[2]
    g = torch.Generator().manual_seed(2)
    # logits of 2..4, of the order of the scores: the sinks take a real share of every row
    shape = (1, 3, 1, 1) if sink_shape == "per head" else (2, 3, q_len, 1)
    sinks = 2.0 + 2.0 * torch.rand(shape, generator=g, dtype=torch.float64)
    leaves["sinks"] = sinks.requires_grad_()
    options = {}
    if extras == "causal":
        options["causal"] = True
    else:
        mask = torch.rand(2, 1, q_len, k_len, generator=g) > 0.3
        mask[1, :, 4] = False  # a row no key is visible to: all its weight on the sink
        options.update(mask=mask, **({"softcap": CAP} if extras.endswith("cap") else {}))
        leaves["score_bias"] = torch.randn(1, 3, q_len, k_len, generator=g, dtype=torch.float64).requires_grad_()
    without = {"tensors": {k: v for k, v in leaves.items() if k != "sinks"}, **options}
    _assert_matches_reference(KERNELS[kernel], leaves, dtype, without, **options)


# --- the attention function ------------------------------------------------------------------------------------------
def _layer(backend: str) -> ScoredLayer:
    return ScoredLayer(NeuralScorer(8, 2, NeuralAttentionConfig(proj_dim=4, backend=backend)), is_causal=True)


@pytest.mark.parametrize("backend", ["eager", "tiled", "auto", "probabilities"])
@pytest.mark.parametrize("feature", ["softcap", "s_aux", "sinks", "softcap+s_aux"])
def test_every_path_of_the_attention_function_computes_the_features_as_by_hand(backend, feature):
    scorer = NeuralScorer(8, 2, NeuralAttentionConfig(proj_dim=4, backend="auto" if backend == "probabilities" else
                                                      backend)).double()  # fmt: skip
    with torch.no_grad():  # scores well beyond the cap
        scorer.output_weight.mul_(4.0)
    g = torch.Generator().manual_seed(drawn_seed())
    query, key, value = (torch.randn(2, 2, n, 8, generator=g, dtype=torch.float64, requires_grad=True)
                         for n in (5, 7, 7))  # fmt: skip
    mask = torch.rand(2, 1, 5, 7, generator=g) > 0.3
    kwargs, leaves = {}, [query, key, *scorer.parameters()]
    logits = scorer.scores(query, key, 8**-0.5)
    if "softcap" in feature:
        kwargs["softcap"] = CAP
        capped = CAP * torch.tanh(logits / CAP)
        assert (capped - logits).abs().max() > 0.1
        logits = capped
    logits = logits.masked_fill(~mask, float("-inf"))
    if "s_aux" in feature or "sinks" in feature:  # gpt-oss' per-head (heads,), Inkling 2's per-token
        name = "s_aux" if "s_aux" in feature else "sinks"
        shape = (2,) if name == "s_aux" else (2, 2, 5, 1)
        kwargs[name] = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
        leaves.append(kwargs[name])
        column = kwargs[name].reshape(1, 2, 1, 1).expand(2, 2, 5, 1) if name == "s_aux" else kwargs[name]
        probabilities = torch.softmax(torch.cat([logits, column], -1), -1)[..., :-1]  # as gpt-oss' eager attention
    else:
        probabilities = torch.softmax(logits, -1)
    out, weights = neural_attention_forward(ScoredLayer(scorer, is_causal=False), query, key, value, mask,
                                            output_attentions=backend == "probabilities", **kwargs)
    torch.testing.assert_close(out.transpose(1, 2), probabilities @ value, rtol=1e-9, atol=1e-10)
    if backend == "probabilities":
        torch.testing.assert_close(weights, probabilities, rtol=1e-9, atol=1e-10)
    got = torch.autograd.grad(out.transpose(1, 2).sum(), leaves)
    want = torch.autograd.grad((probabilities @ value).sum(), leaves)
    assert want[-1].abs().max() > 1e-3  # the last leaf (a sink, or a scorer weight) has a gradient worth checking
    for x, y in zip(got, want, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-8, atol=1e-10)


@pytest.mark.triton
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("feature", ["softcap", "s_aux", "sinks", "softcap+s_aux"])
def test_the_triton_backend_computes_the_features_as_eager(feature):
    layers = {backend: _layer(backend) for backend in ("eager", "triton")}
    layers["triton"].load_state_dict(layers["eager"].state_dict())
    with torch.no_grad():  # scores well beyond the cap
        for layer in layers.values():
            layer.neural_scorer.output_weight.mul_(4.0)
    g = torch.Generator().manual_seed(drawn_seed())
    query, key, value = (torch.randn(2, 2, n, 8, generator=g) for n in (5, 7, 7))
    mask = torch.rand(2, 1, 5, 7, generator=g) > 0.3
    mask[0, :, 2] = False  # a row no key is visible to
    kwargs = {"softcap": CAP} if "softcap" in feature else {}
    if "s_aux" in feature:
        kwargs["s_aux"] = 1.0 + torch.rand(2, generator=g)
    elif "sinks" in feature:
        kwargs["sinks"] = 1.0 + torch.rand(2, 2, 5, 1, generator=g)
    results = {}
    for backend, layer in layers.items():
        leaves = {name: t.clone().requires_grad_() for name, t in (("query", query), ("key", key), ("value", value),
                                                                   *kwargs.items()) if torch.is_tensor(t)}
        call = {**kwargs, **{name: leaves[name] for name in kwargs if name in leaves}}
        out, _ = neural_attention_forward(layer, leaves["query"], leaves["key"], leaves["value"], mask, **call)
        grads = torch.autograd.grad(out.square().sum(), [*leaves.values(), *layer.parameters()])
        results[backend] = (out, grads)
    out, grads = results["triton"]
    floor = largest_entry(results["eager"][1])
    assert_matches(out, results["eager"][0], "out")
    for got, want in zip(grads, results["eager"][1], strict=True):
        assert_matches(got, want, "gradient", floor=floor)


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf"), True, "50"])
def test_a_cap_that_is_not_a_positive_number_is_refused(value):
    query = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="softcap must be a positive number"):
        neural_attention_forward(_layer("auto"), query, query, query, None, softcap=value)
    with pytest.raises(ValueError, match="softcap must be a positive number"):
        neural_attention_tiled(query[..., :2], query[..., :2], query, torch.ones(2, 2), softcap=value)


@pytest.mark.parametrize("sinks", [torch.zeros(3), torch.zeros(1, 2, 4, 2), torch.zeros(2, 2, 4, 1),
                                   torch.ones(2).int()])  # 3 heads, 2 per row, a batch of 2 (of 1), integers
def test_sinks_of_another_shape_or_dtype_are_refused(sinks):
    query = torch.randn(1, 2, 4, 8)
    message = r"sinks must be float logits of shape \(batch\|1, heads\|1, q_len\|1, 1\)"
    for keyword in ("s_aux", "sinks"):
        with pytest.raises(ValueError, match=message):
            neural_attention_forward(_layer("auto"), query, query, query, None, **{keyword: sinks})


def test_per_head_sinks_mean_the_same_under_either_keyword():
    layer, query, sinks = _layer("auto"), torch.randn(1, 2, 4, 8), torch.tensor([1.0, -2.0])
    out = {keyword: neural_attention_forward(layer, query, query, query, None, **{keyword: sinks})[0]
           for keyword in ("s_aux", "sinks")}  # fmt: skip
    torch.testing.assert_close(out["sinks"], out["s_aux"], rtol=0, atol=0)


# --- Gemma 2 and gpt-oss ---------------------------------------------------------------------------------------------
SIZES = {"vocab_size": 97, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 64, "sliding_window": 4}


def _gemma2() -> Gemma2ForCausalLM:
    torch.manual_seed(0)
    return Gemma2ForCausalLM(Gemma2Config(**SIZES, intermediate_size=64, attn_logit_softcapping=0.5))


def _gpt_oss() -> GptOssForCausalLM:
    torch.manual_seed(0)
    model = GptOssForCausalLM(GptOssConfig(**SIZES, intermediate_size=32, num_local_experts=2, num_experts_per_tok=1))
    with torch.no_grad():  # sinks that take a real share of each row (initialised near 0, they would take little)
        for layer in model.model.layers:
            layer.self_attn.sinks.copy_(torch.tensor([2.0, -1.0, 0.5, 3.0]))
    return model


def _without_the_feature(model):
    """A copy of ``model`` without its cap (Gemma 2) or with sinks that take nothing (gpt-oss)."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if getattr(module, "attn_logit_softcapping", None) is not None:
            module.attn_logit_softcapping = None
        if isinstance(getattr(module, "sinks", None), torch.nn.Parameter):
            module.sinks.data.fill_(-1e4)
    return model


@pytest.mark.parametrize("build", [_gemma2, _gpt_oss])
def test_models_train_alike_on_every_backend_with_the_feature_and_the_feature_matters(build):
    base = sharpen_scorers(patch_model(build(), layers=[0, 1], backend="eager"), 5.0)  # a sliding and a full layer
    models = {"eager": base}
    fused = ("tiled", "cpp", "auto")  # auto: cpp (Gemma 2: its C++ tiled loop, gpt-oss: the fused kernel)
    for backend in fused:
        models[backend] = copy.deepcopy(base)
        set_backend(models[backend], backend)
    ids = random_ids(2, 9)
    results = loss_and_grads(models, ids)
    for name in fused:
        torch.testing.assert_close(results[name][0], results["eager"][0], rtol=1e-5, atol=1e-6)
        for got, want in zip(results[name][1], results["eager"][1], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        assert (_without_the_feature(base)(ids).logits - base(ids).logits).abs().max() > 1e-3
    sink_grads = [p.grad for n, p in models["auto"].named_parameters() if n.endswith("self_attn.sinks")]
    assert all(grad.abs().max() > 1e-4 for grad in sink_grads)  # gpt-oss' sinks learn


@pytest.mark.parametrize("build", [_gemma2, _gpt_oss])
@pytest.mark.parametrize("backend", ["auto", "eager"])
def test_models_with_the_feature_decode_with_their_caches_as_without(build, backend):
    model = patch_model(build(), layers=[0, 1], config=NeuralAttentionConfig(proj_dim=4, backend=backend))
    ids = random_ids(1, 7)
    cached, cached_scores = _generate(model, ids, use_cache=True)
    uncached, uncached_scores = _generate(model, ids, use_cache=False)
    assert torch.equal(cached, uncached)
    torch.testing.assert_close(cached_scores, uncached_scores, rtol=1e-5, atol=1e-5)
