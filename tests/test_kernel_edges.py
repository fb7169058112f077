"""Edges of the kernel contract, the same for every fused kernel: second derivatives, empty inputs, a mask together
with ``causal``, the dropout range, and A / B with large opposite offsets (fp32 cancellation)."""

from __future__ import annotations

import gc
import importlib.util

import pytest
import torch

from hf_neural_attention import NeuralAttentionConfig, NeuralScorer, neural_attention_forward
from hf_neural_attention.cpp_neural_attention import neural_attention_cpp
from hf_neural_attention.fused_cpp_neural_attention import neural_attention_fused_cpp
from hf_neural_attention.tiled_neural_attention import neural_attention_tiled
from tests.reference import causal_visible, drawn_seed, kernel_reference
from tests.test_masks import _inputs as _masks_inputs
from tests.test_masks import _layer
from tests.test_scorer_math import ScoredLayer

KERNELS = {"tiled": neural_attention_tiled, "cpp": neural_attention_cpp, "fused-cpp": neural_attention_fused_cpp}
if importlib.util.find_spec("triton") is not None:  # under TRITON_INTERPRET=1 (conftest) on CPU tensors
    from hf_neural_attention.triton_neural_attention import neural_attention_triton

    KERNELS["triton"] = neural_attention_triton
NAMES = ("query_hidden", "key_hidden", "value", "output_weight", "second_weight", "second_bias")


def _inputs(batch=1, heads=2, q_len=6, k_len=9, hidden=4, authors=False, seed=None):
    seed = drawn_seed() if seed is None else seed
    print(f"random inputs: seed {seed}")  # shown with a failure, to reproduce it
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).requires_grad_()

    args = {"query_hidden": rnd(batch, heads, q_len, hidden), "key_hidden": rnd(batch, heads, k_len, hidden),
            "value": rnd(batch, heads, k_len, 5)}  # fmt: skip
    if authors:
        args.update(output_weight=rnd(heads, hidden // 2), second_weight=rnd(heads, hidden // 2, hidden),
                    second_bias=rnd(heads, hidden // 2))  # fmt: skip
    else:
        args["output_weight"] = rnd(heads, hidden)
    return args


def _reference(args, **kw):
    return kernel_reference(*(args.get(name) for name in NAMES), **kw)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("authors", [False, True])
def test_a_second_derivative_raises_instead_of_being_wrong(kernel, authors):
    # the backward passes are kernels autograd cannot differentiate; a gradient penalty must not train on garbage
    args = _inputs(authors=authors)
    out = KERNELS[kernel](**args, causal=True)
    # a loss whose gradient does depend on the output, and one whose gradient does not (out.sum(): the incoming
    # gradient is constant, and once_differentiable alone returned gradients outside the graph, silently)
    # Differentiated by .backward() and by autograd.grad towards an input, whose path back through the backward's
    # error node once_differentiable alone cut (its node took detached copies: autograd.grad never ran it and returned
    # the penalty's gradient without the kernel's second-order term, silently)
    for loss in ((out**2).sum(), out.sum()):
        for target in ("backward", "query_hidden", "output_weight", "value"):
            (grad_query,) = torch.autograd.grad(loss, args["query_hidden"], create_graph=True, retain_graph=True)
            assert grad_query.requires_grad
            with pytest.raises(RuntimeError, match="no second derivative.*backend='eager'"):
                if target == "backward":
                    grad_query.square().sum().backward()
                else:
                    torch.autograd.grad(grad_query.square().sum(), args[target])
    # first order, the gradients are what they were
    (plain,) = torch.autograd.grad(out.sum(), args["query_hidden"], retain_graph=True)
    (marked,) = torch.autograd.grad(out.sum(), args["query_hidden"], create_graph=True)
    assert not plain.requires_grad and torch.equal(plain, marked.detach())


@pytest.mark.parametrize("kernel", KERNELS)
def test_the_second_derivative_guard_keeps_no_input_alive(kernel):
    # the guard ties its error node to the inputs through empty tokens: holding the inputs themselves (or the copies a
    # kernel makes of them) kept them alive after backward for as long as the output lived, and under activation
    # checkpointing between the passes
    args = _inputs(k_len=9)
    leaf = torch.randn(1, 2, 9, 13, requires_grad=True)  # a shape no other tensor here has
    out = KERNELS[kernel](**{**args, "value": leaf * 1.0}, causal=True)  # an activation (non-leaf), as in a model
    out.sum().backward()
    gc.collect()
    held = [t for t in gc.get_objects() if issubclass(type(t), torch.Tensor) and t.shape == leaf.shape
            and t is not leaf and t is not leaf.grad]  # fmt: skip
    assert not held and out.grad_fn is not None


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("empty", ["q_len", "k_len", "batch"])
def test_empty_inputs_stay_in_the_graph_with_zero_gradients(kernel, empty):
    args = _inputs(**{empty: 0})
    out = KERNELS[kernel](**args)
    assert out.shape == (*args["query_hidden"].shape[:3], 5) and out.requires_grad
    grads = torch.autograd.grad(out.sum(), list(args.values()))
    for (name, tensor), grad in zip(args.items(), grads, strict=True):
        assert grad.shape == tensor.shape and not grad.any(), name


@pytest.mark.parametrize("backend", ["eager", "probabilities", *KERNELS])
@pytest.mark.parametrize("mlp", ["paper", "authors"])
@pytest.mark.parametrize("empty", ["q_len", "k_len", "batch"])
def test_an_empty_call_of_the_attention_function_returns_empty_on_every_path(backend, mlp, empty):
    # the materialising path (eager, and every backend's output_attentions) once failed in a reshape for the authors'
    # MLP: -1 cannot be inferred from zero pairs
    sizes = {"batch": 2, "q_len": 3, "k_len": 4, empty: 0}
    backends = {"probabilities": "auto", "fused-cpp": "auto", "cpp": "cpp", "tiled": "tiled", "triton": "triton"}
    scorer = NeuralScorer(8, 2, NeuralAttentionConfig(proj_dim=4, mlp=mlp, backend=backends.get(backend, backend)))
    query, key, value = (torch.randn(sizes["batch"], 2, sizes[n], 8, requires_grad=True)
                         for n in ("q_len", "k_len", "k_len"))  # fmt: skip
    out, weights = neural_attention_forward(ScoredLayer(scorer, is_causal=True), query, key, value, None,
                                            output_attentions=backend == "probabilities")  # fmt: skip
    assert out.shape == (sizes["batch"], sizes["q_len"], 2, 8)
    if backend == "probabilities":
        assert weights.shape == (sizes["batch"], 2, sizes["q_len"], sizes["k_len"])
    grads = torch.autograd.grad(out.sum(), [query, key, value, *scorer.parameters()], allow_unused=True)
    assert all(grad is None or not grad.any() for grad in grads)


@pytest.mark.parametrize("kernel", KERNELS)
def test_a_mask_and_causal_together_apply_both(kernel):
    args = _inputs(batch=2, q_len=7, k_len=7)
    mask = torch.rand(2, 1, 7, 7, generator=torch.Generator().manual_seed(3)) > 0.3
    out = KERNELS[kernel](**args, mask=mask, causal=True)
    expected = _reference(args, mask=mask & causal_visible(7, 7))
    torch.testing.assert_close(out.double(), expected, rtol=2e-5, atol=2e-6)
    gradient = torch.randn(out.shape, dtype=torch.float64)
    got = torch.autograd.grad(out, list(args.values()), gradient.float())
    want = torch.autograd.grad(expected, list(args.values()), gradient)
    for name, x, y in zip(args, got, want, strict=True):
        torch.testing.assert_close(x.double(), y.double(), rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dropout_p", [1.0, -0.1, 1.5])
def test_dropout_outside_zero_to_one_is_refused(kernel, dropout_p):
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\)"):
        KERNELS[kernel](**_inputs(), dropout_p=dropout_p)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("offset", [1e3, 1e5])
def test_large_opposite_offsets_of_a_and_b_do_not_cancel(kernel, offset):
    # pre = A + B stays O(1) while A and B are huge: uncentred fp32 arithmetic loses |offset| * 2^-24 per operation
    args = _inputs(q_len=16, k_len=16)
    with torch.no_grad():
        args["query_hidden"] += offset
        args["key_hidden"] -= offset
    out = KERNELS[kernel](**args, causal=True)
    expected = _reference(args, causal=True)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=2e-6)
    gradient = torch.randn(out.shape, dtype=torch.float64)
    got = torch.autograd.grad(out, list(args.values()), gradient.float())
    want = torch.autograd.grad(expected, list(args.values()), gradient)
    for name, x, y in zip(args, got, want, strict=True):
        torch.testing.assert_close(x.double(), y.double(), rtol=1e-4, atol=1e-5 * y.abs().max().item(), msg=name)


@pytest.mark.parametrize("kernel", KERNELS)
def test_garbage_in_rows_no_pair_sees_stays_there(kernel):
    # padded queries and keys may hold anything (NaN): they must not reach a visible row or a gradient, and a fully
    # masked query gives exact zeros. The fused kernel once returned NaN there (0 * NaN in P @ V), and every backend
    # let a masked row of the dot operands into all keys' gradients (dS^T @ dot_query)
    args = _inputs(q_len=6, k_len=9)
    g = torch.Generator().manual_seed(3)
    args["dot_query"] = torch.randn(1, 2, 6, 3, generator=g).requires_grad_()
    args["dot_key"] = torch.randn(1, 2, 9, 3, generator=g).requires_grad_()
    mask = torch.rand(1, 1, 6, 9, generator=g) > 0.3
    mask[..., 2, :] = False  # query 2 sees nothing
    mask[..., :, 6:] = False  # keys 6.. are seen by nobody
    mask[..., :, 0] = True
    mask[..., 2, 0] = False
    masked_query, unseen_keys = (slice(None), slice(None), 2), (slice(None), slice(None), slice(6, None))
    rows = {"query_hidden": masked_query, "dot_query": masked_query, "key_hidden": unseen_keys, "value": unseen_keys,
            "dot_key": unseen_keys}
    dirty = {name: tensor.detach().clone() for name, tensor in args.items()}
    for name, index in rows.items():
        dirty[name][index] = float("nan")
    dirty = {name: tensor.requires_grad_() for name, tensor in dirty.items()}
    out = KERNELS[kernel](**dirty, mask=mask)
    clean = KERNELS[kernel](**args, mask=mask)
    assert torch.isfinite(out).all() and not out[:, :, 2].any()
    torch.testing.assert_close(out, clean, rtol=1e-6, atol=1e-6)
    gradient = torch.randn(out.shape, generator=g)
    got = dict(zip(dirty, torch.autograd.grad(out, list(dirty.values()), gradient), strict=True))
    want = dict(zip(args, torch.autograd.grad(clean, list(args.values()), gradient), strict=True))
    for name in args:
        assert torch.isfinite(got[name]).all(), name
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5, msg=name)
        if name in rows:
            assert not got[name][rows[name]].any(), name


@pytest.mark.parametrize("kernel", KERNELS)
def test_inputs_that_do_not_fit_are_refused_by_name(kernel):
    # checked before any kernel runs: a larger mask once passed the check and failed deep inside (reshape / expand),
    # hidden 0 worked in some kernels and not others, and the C++ kernels would read another device's pointer
    args = {name: tensor.detach() for name, tensor in _inputs(batch=1, q_len=6, k_len=9).items()}
    for shape in ((3, 1, 6, 9), (2, 2, 6, 9), (1, 2, 6, 8)):
        with pytest.raises(ValueError, match=r"mask .* does not broadcast"):
            KERNELS[kernel](**args, mask=torch.ones(shape, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask is on meta"):
        KERNELS[kernel](**args, mask=torch.ones(1, 1, 6, 9, dtype=torch.bool, device="meta"))
    with pytest.raises(ValueError, match="0 hidden units"):
        KERNELS[kernel](**{**args, "query_hidden": args["query_hidden"][..., :0], "key_hidden": args["key_hidden"][
            ..., :0], "output_weight": args["output_weight"][..., :0]})  # fmt: skip
    for dtype in (torch.int64, torch.complex64):
        with pytest.raises(TypeError, match="value must be a floating-point tensor"):
            KERNELS[kernel](**{**args, "value": args["value"].to(dtype)})


def test_the_materialising_backend_has_second_derivatives():
    # what the error above points to: backend="eager" builds the scores with autograd, so gradient penalties work
    layer = _layer("eager", torch.float64, causal=True)
    query, key, value = (t.requires_grad_() for t in _masks_inputs(1, 2, 4, 4))

    def attention(query, key, value):
        return neural_attention_forward(layer, query, key, value, None)[0]

    assert torch.autograd.gradgradcheck(attention, (query, key, value))


def test_an_integer_four_d_mask_is_refused_with_the_fix():
    layer = _layer("auto", torch.float64)
    query, key, value = _masks_inputs(1, 2, 3, 3)
    with pytest.raises(TypeError, match=r"bool .* or additive float, got torch.int64.*mask.bool\(\)"):
        neural_attention_forward(layer, query, key, value, torch.ones(1, 1, 3, 3, dtype=torch.long))


@pytest.mark.parametrize("kernel", ["tiled", "cpp"])
def test_fp64_values_or_weights_keep_fp64_precision_with_fp32_hidden_inputs(kernel):
    # the kernel computes in fp64 when any input is fp64: centring A and B must not round them to fp32 first
    args = _inputs(q_len=9, k_len=9)
    args["value"] = args["value"].detach().double().requires_grad_()
    args["output_weight"] = args["output_weight"].detach().double().requires_grad_()
    out = KERNELS[kernel](**args, causal=True)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, _reference(args, causal=True), rtol=1e-12, atol=1e-13)
