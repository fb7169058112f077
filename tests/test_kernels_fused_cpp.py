"""The fully fused C++ CPU kernel (``fused_cpp_neural_attention``) against the float64 reference."""

from __future__ import annotations

import pytest
import torch

from hf_neural_attention import cpp_neural_attention, fused_cpp_neural_attention
from hf_neural_attention.fused_cpp_neural_attention import BLOCK, neural_attention_fused_cpp
from tests.reference import bias_in_layout, fresh_seed, kernel_reference

pytestmark = pytest.mark.skipif(
    not fused_cpp_neural_attention.fused_cpp_available(), reason="fused C++ extension not built (no compiler?)"
)

ACTS = ("relu", "gelu", "silu", "tanh")


def _inputs(b, h, lq, lk, hidden, v_dim=16, per_head=True, dot=False, seed=0):
    g = torch.Generator().manual_seed(fresh_seed(seed))

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).requires_grad_()

    args = {
        "query_hidden": rnd(b, h, lq, hidden, scale=0.7),
        "key_hidden": rnd(b, h, lk, hidden, scale=0.7),
        "value": rnd(b, h, lk, v_dim),
        "output_weight": rnd(h if per_head else 1, hidden),
    }
    if dot:
        args["dot_query"] = rnd(b, h, lq, 8, scale=0.5)
        args["dot_key"] = rnd(b, h, lk, 8, scale=0.5)
    return args


def _check(args, *, tol=2e-5, **kw):
    out = neural_attention_fused_cpp(**args, **kw)
    ref = kernel_reference(*(args[k] for k in ("query_hidden", "key_hidden", "value", "output_weight")),
                           dot_query=args.get("dot_query"), dot_key=args.get("dot_key"),
                           score_bias=args.get("score_bias"), **kw)  # fmt: skip
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    names = list(args)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad(out, [args[k] for k in names], grad)
    want = torch.autograd.grad(ref, [args[k] for k in names], grad.double())
    for name, x, y in zip(names, got, want, strict=True):
        assert x.shape == args[name].shape, name
        assert torch.isfinite(x).all(), name
        y = y.double()
        scale = max(y.abs().max().item(), 1.0)
        torch.testing.assert_close(x.double(), y, atol=tol * scale, rtol=tol, msg=lambda m, n=name: f"{n}: {m}")
    return out, got


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("lq,lk", [(1, 1), (1, 9), (7, 7), (7, 13), (130, 130), (130, 77), (70, 150)])
@pytest.mark.parametrize("causal", [False, True])
def test_matches_reference(activation, lq, lk, causal):
    _check(_inputs(2, 3, lq, lk, 5), activation=activation, causal=causal)


@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("v_dim", [131, 512])
def test_wide_value_heads(activation, v_dim):
    # Gemma 4's global layers have heads of 512: P @ V and dV over rows wider than any vector block, and an odd width
    _check(_inputs(1, 2, 70, 75, 4, v_dim=v_dim), activation=activation, causal=True)


@pytest.mark.parametrize("per_head", [True, False])
@pytest.mark.parametrize("hidden", [1, 4, 16, 33])
def test_weights_shared_and_per_head(per_head, hidden):
    _check(_inputs(2, 3, 67, 67, hidden, per_head=per_head), causal=True)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_residual_dot_term(causal, activation):
    _check(_inputs(2, 2, 130, 140, 4, dot=True), activation=activation, causal=causal, dot_scale=0.37)


@pytest.mark.parametrize("per_head", [True, False])
def test_relu_zero_and_negative_output_weights(per_head):
    # relu runs in signed-max form (inputs scaled by |w|, signs separate): units with w = 0 must still get their
    # weight gradient, and negative units must subtract
    args = _inputs(2, 3, 70, 90, 6, per_head=per_head, seed=5)
    with torch.no_grad():
        args["output_weight"][..., 1] = 0.0
        args["output_weight"][..., 2] = -args["output_weight"][..., 2].abs()
        args["output_weight"][..., 3] = args["output_weight"][..., 3].abs()
    _, grads = _check(args, causal=True)
    assert grads[3][..., 1].abs().min() > 0  # dL/dw for the zero unit is not lost


@pytest.mark.parametrize("single_pass", [True, False])
@pytest.mark.parametrize("kind", ["causal", "mask", "dot", "causal-more-keys"])
def test_relu_backward_single_and_two_pass(monkeypatch, single_pass, kind):
    # relu's backward runs in one pass per (batch, head) group when there are at least as many groups as threads,
    # else in the two passes the other activations use: both against the reference
    monkeypatch.setattr(fused_cpp_neural_attention, "_use_single_pass", lambda groups: single_pass)
    lq, lk = (20, 150) if kind == "causal-more-keys" else (150, 2 * BLOCK + 9)
    args = _inputs(2, 2, lq, lk, 5, dot=kind == "dot", seed=9)
    if kind == "mask":
        mask = torch.rand(2, 1, lq, lk, generator=torch.Generator().manual_seed(3)) > 0.4
        mask[0, 0, 7] = False
        _check(args, mask=mask)
    else:
        _check(args, causal=True, **({"dot_scale": 0.3} if kind == "dot" else {}))


BIAS_CASES = [  # (bias shape, masking, activation, dot) for (2, 3, 70, 2 * BLOCK + 9): every way a bias broadcasts
    ((1, 3, 70, 137), "causal", "relu", False),  # T5: one bias for the batch
    ((2, 3, 70, 137), "mask", "gelu", True),  # per example and head
    ((2, 1, 1, 137), "causal", "relu", True),  # per key (a soft padding mask)
    ((70, 1), "mask", "silu", False),  # 2-D, per query (softmax-invariant: its gradient is 0)
    ((137,), "none", "relu", False),  # 1-D: per key for every row
]


@pytest.mark.parametrize("single_pass", [True, False])
@pytest.mark.parametrize("case", BIAS_CASES, ids=[f"{'x'.join(map(str, c[0]))}-{c[1]}-{c[2]}" for c in BIAS_CASES])
def test_score_bias_fused_matches_reference(monkeypatch, single_pass, case):
    # the bias joins each score row in all three tile builders (query-major, key-major, the relu single pass); its
    # gradient is dS, written by pass 1 or the single pass and summed where it broadcasts
    monkeypatch.setattr(fused_cpp_neural_attention, "_use_single_pass", lambda groups: single_pass)
    calls = _spy(monkeypatch)
    shape, masking, activation, dot = case
    args = _inputs(2, 3, 70, 2 * BLOCK + 9, 5, dot=dot, seed=30 + BIAS_CASES.index(case))
    g = torch.Generator().manual_seed(fresh_seed(40 + BIAS_CASES.index(case)))
    args["score_bias"] = (torch.randn(*shape, generator=g) * 2.0).requires_grad_()  # enough to reorder the scores
    kw = {"activation": activation, **({"dot_scale": 0.3} if dot else {})}
    if masking == "mask":  # a padding mask with a fully masked row
        mask = torch.rand(2, 1, 70, 2 * BLOCK + 9, generator=g) > 0.4
        mask[0, 0, 7] = False
        kw["mask"] = mask
    out, grads = _check(args, causal=masking == "causal", **kw)
    assert calls == []  # fused, not handed to the tiled path
    if masking == "mask":
        assert (out[0, :, 7] == 0).all()
        if shape[0] == 2:  # its own bias row gets no gradient
            assert (grads[-1][0, :, 7] == 0).all()


def test_score_bias_fused_rows_a_large_negative_bias_covers():
    # a row a -1e9 bias covers entirely has its maximum near -1e9, where max + log(denominator) rounds to max in
    # fp32: the row statistics are kept apart (else P = 1 at every key, gradients k times too large). Against fp32
    # materialising attention, which sees the same rounded scores.
    args = _inputs(2, 2, 9, 70, 4, seed=47)
    bias = torch.zeros(2, 1, 9, 70)
    bias[0, :, 2] = -1e9
    bias[1, :, :, :5] = -1e9  # left padding as a float mask
    args["score_bias"] = bias.requires_grad_()
    out = neural_attention_fused_cpp(**args)
    pre = args["query_hidden"][:, :, :, None, :] + args["key_hidden"][:, :, None, :, :]
    scores = (torch.relu(pre) * args["output_weight"][None, :, None, None, :]).sum(-1) + bias
    expected = torch.softmax(scores, -1) @ args["value"]
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    names = list(args)
    got = torch.autograd.grad(out, [args[n] for n in names], grad)
    want = torch.autograd.grad(expected, [args[n] for n in names], grad)
    for name, x, y in zip(names, got, want, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-5 * max(y.abs().max().item(), 1.0), msg=name)


def test_score_bias_fused_dropout_pattern_bf16_and_fixed_bias():
    args = _inputs(1, 2, 70, 80, 4, seed=48)
    g = torch.Generator().manual_seed(fresh_seed(49))
    bias = torch.randn(1, 2, 70, 80, generator=g)
    # the same seed drops the same pairs with and without a bias (the bias moves P, not the keep decision)
    keep = _recovered_keep(args, 0.3, 7, causal=True)
    eye = torch.eye(80).expand(1, 2, 80, 80)
    with torch.no_grad():
        biased = neural_attention_fused_cpp(args["query_hidden"], args["key_hidden"], eye, args["output_weight"],
                                            causal=True, dropout_p=0.3, generator_seed=7, score_bias=bias)
    assert torch.equal(keep, biased != 0)
    # a bf16 bias (read in fp32) gets its gradient back in bf16; a bias that needs none changes no other gradient
    learned = bias.bfloat16().requires_grad_()
    out = neural_attention_fused_cpp(**args, causal=True, score_bias=learned)
    grad = torch.randn(out.shape, generator=g)
    *rest, dbias = torch.autograd.grad(out, [*args.values(), learned], grad)
    assert dbias.dtype == torch.bfloat16 and dbias.shape == learned.shape
    fixed = neural_attention_fused_cpp(**args, causal=True, score_bias=learned.detach())
    assert torch.equal(out, fixed)
    for a, b in zip(rest, torch.autograd.grad(fixed, list(args.values()), grad), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("masking", ["mask", "causal"])
@pytest.mark.parametrize("activation,single_pass", [("relu", True), ("relu", False), ("gelu", False)])
def test_score_bias_shared_by_the_batch_gets_its_gradient_a_few_rows_at_a_time(monkeypatch, rows, masking,
                                                                                activation, single_pass):
    # dS of a bias shared by the batch is written `rows` examples per run of the query-side pass (or the relu single
    # pass) and summed between runs (a buffer bounded by BIAS_GRAD_BUFFER_BYTES, not batch times the gradient): 3
    # examples in runs of 1, or of 2 and a remainder of 1 (causal: the pairs above the diagonal stay zero in every
    # run); against the reference and against a single run, with dropout (keyed by the global group: the same
    # pattern in every run)
    from hf_neural_attention import kernels_neural_attention

    groups = []  # what the pass choice is told: the groups one run covers (as many threads as it can keep busy)
    monkeypatch.setattr(fused_cpp_neural_attention, "_use_single_pass", lambda n: groups.append(n) or single_pass)
    calls = _spy(monkeypatch)
    g = torch.Generator().manual_seed(fresh_seed(52))
    args = _inputs(3, 2, 70, 2 * BLOCK + 9, 4, dot=True, seed=53)
    args["score_bias"] = (torch.randn(1, 2, 70, 2 * BLOCK + 9, generator=g) * 2.0).requires_grad_()
    mask = torch.rand(3, 1, 70, 2 * BLOCK + 9, generator=g) > 0.3
    mask[1, 0, 7] = False  # a fully masked row
    kw = dict(activation=activation, dot_scale=0.3, **({"mask": mask} if masking == "mask" else {"causal": True}))
    grad = torch.randn(3, 2, 70, 16, generator=g)
    runs = {}
    for budget in (kernels_neural_attention.BIAS_GRAD_BUFFER_BYTES, rows * 2 * 70 * (2 * BLOCK + 9) * 4):
        monkeypatch.setattr(kernels_neural_attention, "BIAS_GRAD_BUFFER_BYTES", budget)
        out = neural_attention_fused_cpp(**args, **kw, dropout_p=0.2, generator_seed=5)
        runs[budget] = torch.autograd.grad(out, list(args.values()), grad)
    assert kernels_neural_attention.bias_grad_rows(3, 2, 70, 2 * BLOCK + 9, (1, 2, 1, 1)) == rows
    assert groups == [3 * 2, rows * 2]
    whole, chunked = runs.values()
    for name, x, y in zip(args, chunked, whole, strict=True):  # only the bias's gradient is summed differently
        if name == "score_bias":
            torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-6)
        else:
            assert torch.equal(x, y), name
    _check(args, **kw)  # and without dropout against the float64 reference
    assert calls == []


@pytest.mark.parametrize("layout", ["permuted", "expanded", "3-d", "float16", "bfloat16"])
def test_score_bias_fused_layouts_and_dtypes(monkeypatch, layout):
    # biases as callers hand them over: T5's permuted view, an expanded (stride 0) parameter, 3-D, 16-bit
    calls = _spy(monkeypatch)
    args = _inputs(2, 2, 70, 80, 4, seed=50)
    g = torch.Generator().manual_seed(fresh_seed(51))
    leaf, bias = bias_in_layout(layout, g, 2, 2, 70, 80)
    out = neural_attention_fused_cpp(**args, causal=True, score_bias=bias)
    ref = kernel_reference(*args.values(), causal=True, score_bias=bias)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)
    grad = torch.randn(out.shape, generator=g)
    got = torch.autograd.grad(out, [*args.values(), leaf], grad)
    want = torch.autograd.grad(ref, [*args.values(), leaf], grad.double())
    for x, y in zip(got, want, strict=True):
        scale = max(y.double().abs().max().item(), 1.0)
        # a 16-bit bias's gradient comes back rounded to its dtype (the reference's too, maybe 1 ulp apart)
        tol = max(2e-5, torch.finfo(y.dtype).eps)
        assert x.dtype == y.dtype and x.shape == y.shape
        torch.testing.assert_close(x.double(), y.double(), atol=tol * scale, rtol=tol)
    assert calls == []


def test_relu_large_opposite_offsets_stay_accurate():
    # A and B with large opposite offsets (pre = A + B stays O(1)): B is centred before the signed-max transform
    args = _inputs(1, 2, 64, 64, 16, seed=4)
    with torch.no_grad():
        args["query_hidden"] += 1000.0
        args["key_hidden"] -= 1000.0
    _check(args, causal=True, tol=2e-5)


def _recovered_keep(args, p, seed, **kw):
    """The kernel's keep mask: with value = identity its output is the dropped, rescaled probability matrix."""
    b, h, _, _ = args["query_hidden"].shape
    lk = args["key_hidden"].shape[2]
    eye = torch.eye(lk).expand(b, h, lk, lk)
    with torch.no_grad():
        probs = neural_attention_fused_cpp(args["query_hidden"], args["key_hidden"], eye, args["output_weight"],
                                           dropout_p=p, generator_seed=seed, **kw)  # fmt: skip
    return probs != 0


@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("single_pass", [True, False])
def test_dropout_matches_reference_with_recovered_mask(monkeypatch, activation, single_pass):
    monkeypatch.setattr(fused_cpp_neural_attention, "_use_single_pass", lambda groups: single_pass)
    p, seed = 0.3, 1234
    args = _inputs(2, 2, 70, BLOCK + 11, 5, seed=13)
    keep = _recovered_keep(args, p, seed, causal=True, activation=activation)
    visible = torch.ones(70, BLOCK + 11, dtype=torch.bool).tril()
    frac = keep[..., visible].float().mean().item()
    assert 0.6 < frac < 0.8, frac  # about 1 - p of the visible pairs are kept
    # with real values and the same seed: the reference with that mask, forward and every gradient
    out = neural_attention_fused_cpp(**args, causal=True, activation=activation, dropout_p=p, generator_seed=seed)
    ref = kernel_reference(*(args[k] for k in ("query_hidden", "key_hidden", "value", "output_weight")),
                           causal=True, activation=activation, keep=keep.double() / (1 - p))  # fmt: skip
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)
    names = list(args)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad(out, [args[k] for k in names], grad)
    want = torch.autograd.grad(ref, [args[k] for k in names], grad.double())
    for name, x, y in zip(names, got, want, strict=True):
        y = y.double()
        scale = max(y.abs().max().item(), 1.0)
        torch.testing.assert_close(x.double(), y, atol=2e-5 * scale, rtol=2e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_dropout_seeded_deterministic_and_unbiased():
    args = _inputs(1, 2, 40, 40, 3, seed=21)
    plain = neural_attention_fused_cpp(**args, causal=True)
    a = neural_attention_fused_cpp(**args, causal=True, dropout_p=0.25, generator_seed=11)
    b = neural_attention_fused_cpp(**args, causal=True, dropout_p=0.25, generator_seed=11)
    c = neural_attention_fused_cpp(**args, causal=True, dropout_p=0.25, generator_seed=12)
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.testing.assert_close(neural_attention_fused_cpp(**args, causal=True, dropout_p=0.0), plain, rtol=0, atol=0)
    with torch.no_grad():  # E[dropout(P)] = P: the mean over seeds approaches the plain output
        mean = sum(neural_attention_fused_cpp(**args, causal=True, dropout_p=0.25, generator_seed=s)
                   for s in range(400)) / 400  # fmt: skip
    assert (mean - plain).abs().max() < 0.15 * plain.abs().max()


def test_draws_from_the_global_generator_only_with_dropout():
    # a draw without dropout would shift the caller's random stream, so results would depend on whether a compiler
    # was there (the tiled and eager paths draw nothing then)
    args = _inputs(1, 2, 9, 9, 3, seed=22)
    for dropout_p, draws in ((0.0, False), (0.3, True)):
        torch.manual_seed(5)
        expected = torch.rand(4)
        torch.manual_seed(5)
        neural_attention_fused_cpp(**args, causal=True, dropout_p=dropout_p)
        assert torch.equal(torch.rand(4), expected) != draws, dropout_p


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_run_fused_in_fp32(monkeypatch, dtype):
    # autocast hands bf16 / fp16 projections and values with fp32 weights: the fused kernel takes them (no
    # delegation), computes in fp32 and returns value's dtype; gradients come back in each input's dtype
    calls = _spy(monkeypatch)
    args = _inputs(2, 2, 70, 90, 5, dot=True, seed=8)
    low = {k: (v.detach().to(dtype) if k != "output_weight" else v.detach()).requires_grad_() for k, v in args.items()}
    out = neural_attention_fused_cpp(**low, causal=True, dot_scale=0.3)
    assert not calls and out.dtype == dtype
    ref = kernel_reference(*(low[k] for k in ("query_hidden", "key_hidden", "value", "output_weight")),
                           dot_query=low["dot_query"], dot_key=low["dot_key"], causal=True, dot_scale=0.3)  # fmt: skip
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3  # the output rounded to dtype; fp32 inside
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    got = torch.autograd.grad(out, list(low.values()), grad)
    want = torch.autograd.grad(ref, list(low.values()), grad.double())
    for name, x, y in zip(low, got, want, strict=True):
        assert x.dtype == low[name].dtype, name
        y = y.double()
        scale = max(y.abs().max().item(), 1.0)
        torch.testing.assert_close(x.double(), y, atol=tol * scale, rtol=tol, msg=lambda m, n=name: f"{n}: {m}")


def test_causal_more_keys_than_queries():
    # upper-left aligned: keys >= q_len are never visible, their gradients are zero
    args = _inputs(1, 2, 20, 3 * BLOCK + 5, 3)
    _, grads = _check(args, causal=True)
    assert grads[1][:, :, 20:].abs().max() == 0 and grads[2][:, :, 20:].abs().max() == 0


def test_padding_mask_broadcast():
    b, lq, lk = 3, 130, 130
    lengths = torch.tensor([130, 64, 1])
    mask = (torch.arange(lk)[None, :] < lengths[:, None])[:, None, None, :]  # (b, 1, 1, lk): strides 0
    _check(_inputs(b, 2, lq, lk, 6), mask=mask)
    causal_pad = mask & torch.ones(lq, lk, dtype=torch.bool).tril()
    _check(_inputs(b, 2, lq, lk, 6, dot=True), mask=causal_pad, activation="silu")


def test_full_mask_per_head_and_2d_mask():
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(2, 3, 70, 90, generator=g) > 0.4
    _check(_inputs(2, 3, 70, 90, 4), mask=mask, activation="tanh")
    _check(_inputs(2, 3, 70, 90, 4), mask=mask[0, 0])  # (q_len, k_len)


def test_fully_masked_rows_zero():
    args = _inputs(2, 2, 9, 11, 4, dot=True)
    mask = torch.ones(2, 1, 9, 11, dtype=torch.bool)
    mask[0, :, 3] = False
    mask[1, :, :] = False
    out, grads = _check(args, mask=mask)
    assert out[0, :, 3].abs().max() == 0 and out[1].abs().max() == 0
    dA, dq = grads[0], grads[4]
    assert dA[0, :, 3].abs().max() == 0 and dA[1].abs().max() == 0 and dq[1].abs().max() == 0
    assert all(g[1].abs().max() == 0 for g in (grads[1], grads[2], grads[5]))


def test_deterministic():
    args = _inputs(2, 3, 150, 150, 8, dot=True)

    def run():
        out = neural_attention_fused_cpp(**args, causal=True, activation="gelu")
        grads = torch.autograd.grad(out, list(args.values()), torch.ones_like(out))
        return (out, *grads)

    first, second = run(), run()
    for x, y in zip(first, second, strict=True):
        assert torch.equal(x, y)


def test_matches_cpp_backend():
    args = _inputs(1, 4, 200, 200, 8)
    fused = neural_attention_fused_cpp(**args, causal=True)
    cpp = cpp_neural_attention.neural_attention_cpp(**args, causal=True)
    torch.testing.assert_close(fused, cpp, atol=1e-5, rtol=1e-5)


def _spy(monkeypatch):
    calls = []
    original = cpp_neural_attention.neural_attention_cpp

    def spy(*a, **k):
        calls.append(k)
        return original(*a, **k)

    monkeypatch.setattr(fused_cpp_neural_attention, "neural_attention_cpp", spy)
    return calls


def test_delegates_unsupported_cases(monkeypatch):
    calls = _spy(monkeypatch)
    args = _inputs(1, 2, 10, 10, 4)
    # authors MLP
    w2 = torch.randn(2, 2, 4)
    b2 = torch.randn(2, 2)
    a = dict(args, output_weight=torch.randn(2, 2))
    out = neural_attention_fused_cpp(*a.values(), w2, b2)
    assert len(calls) == 1
    ref = kernel_reference(*a.values(), w2, b2)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    # float64
    a64 = {k: v.detach().double().requires_grad_() for k, v in args.items()}
    out = neural_attention_fused_cpp(**a64, causal=True)
    assert len(calls) == 2 and out.dtype == torch.float64
    torch.testing.assert_close(out, kernel_reference(*a64.values(), causal=True))
    # the fused path itself does not delegate, dropout included
    neural_attention_fused_cpp(**args, causal=True)
    neural_attention_fused_cpp(**args, causal=True, dropout_p=0.1, generator_seed=0)
    assert len(calls) == 2


def test_empty_and_bad_activation():
    args = _inputs(1, 2, 0, 5, 3)
    assert neural_attention_fused_cpp(**args).shape == (1, 2, 0, 16)
    with pytest.raises(ValueError, match="swish"):
        neural_attention_fused_cpp(**_inputs(1, 1, 3, 3, 2), activation="swish")


def test_imports_only_torch_stdlib_and_flat_siblings():
    import ast
    import sys
    from pathlib import Path

    path = Path(fused_cpp_neural_attention.__file__)
    allowed = {"torch"} | set(sys.stdlib_module_names)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            assert node.level == 1 and (path.parent / f"{node.module}.py").is_file(), node.module
        elif isinstance(node, ast.ImportFrom):
            assert node.module.split(".")[0] in allowed, node.module
        elif isinstance(node, ast.Import):
            assert all(alias.name.split(".")[0] in allowed for alias in node.names)


@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("garbage", [1e6, float("nan")])
def test_rows_no_pair_sees_do_not_matter(activation, garbage):
    # padded / masked keys and fully masked queries may hold anything (a preallocated buffer): they must not move the
    # centring of the signed-max form or the weight gradient; the reference sees zeros there
    args = _inputs(2, 2, 37, 45, 4, seed=9)
    mask = torch.ones(2, 1, 37, 45, dtype=torch.bool)
    mask[0, :, :, 40:] = False  # padded keys of batch 0
    mask[1, :, 5] = False  # a fully masked query of batch 1
    clean = {k: v.detach().clone() for k, v in args.items()}
    with torch.no_grad():
        args["key_hidden"][0, :, 40:] = garbage
        args["query_hidden"][1, :, 5] = garbage
    out = neural_attention_fused_cpp(**args, activation=activation, mask=mask)
    clean = {k: v.requires_grad_() for k, v in clean.items()}
    ref = kernel_reference(*clean.values(), activation=activation, mask=mask)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad(out, list(args.values()), grad)
    want = torch.autograd.grad(ref, list(clean.values()), grad.double())
    for name, x, y in zip(args, got, want, strict=True):
        assert torch.isfinite(x).all(), name
        y = y.double()
        torch.testing.assert_close(x.double(), y, atol=2e-5 * max(1.0, y.abs().max().item()), rtol=2e-5)


def test_relu_subnormal_output_weights():
    # |w| below the smallest normal float: the unit scores (practically) 0, and its weight gradient still needs the
    # exact relu mask (scaled by a subnormal |w|, the operands would lose it)
    args = _inputs(2, 2, 40, 40, 5, seed=11)
    with torch.no_grad():
        args["output_weight"][0, 1] = 3e-45
        args["output_weight"][1, 2] = -3e-45
    _check(args, causal=True)


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_strided_inputs_from_the_attention_layout(activation):
    # the usual hand-over from (batch, len, heads, dim) projections: batch 1, transposed views (not contiguous)
    g = torch.Generator().manual_seed(13)
    q = torch.randn(1, 33, 2, 4, generator=g).transpose(1, 2).requires_grad_()
    k = torch.randn(1, 40, 2, 4, generator=g).transpose(1, 2).requires_grad_()
    v = torch.randn(1, 40, 2, 8, generator=g).transpose(1, 2).requires_grad_()
    w = torch.randn(2, 4, generator=g).requires_grad_()
    args = {"query_hidden": q, "key_hidden": k, "value": v, "output_weight": w}
    assert not q.is_contiguous()
    _check(args, activation=activation, causal=True)


def test_the_cpp_entry_points_refuse_inconsistent_shapes():
    # the public functions validate first; the ops and extension functions below them index raw pointers, so they
    # check every size they read themselves (a direct call, or a bug above them, must not read out of bounds)
    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape)

    G, q_len, k_len, hidden, v_dim, batch, heads = 2, 9, 70, 4, 3, 1, 2
    mask = torch.ones(batch, heads, q_len, k_len, dtype=torch.bool)
    good = [rand(G, q_len, hidden), rand(G, hidden, k_len), rand(G, k_len, v_dim), rand(G, hidden), None, None, mask,
            rand(1, heads, q_len, k_len), rand(G, k_len), batch, heads, False, 1.0, 0, 64, 0.0, torch.tensor(1)]
    fused_cpp_neural_attention._fused_forward(*good)
    for index, bad, message in [
        (2, rand(G, k_len - 1, v_dim), r"V has shape \[2, 69, 3\], expected \[2, 70, 3\]"),
        (6, torch.ones(batch, 1, q_len, k_len, dtype=torch.bool), r"mask has shape \[1, 1, 9, 70\], expected"),
        (7, rand(1, heads, q_len, k_len - 1), r"score_bias has shape \[1, 2, 9, 69\], which does not broadcast"),
        (7, rand(heads, q_len, k_len), "score_bias must be a 4-D fp32 CPU tensor"),
        (7, rand(1, heads, q_len, k_len).double(), "score_bias must be a 4-D fp32 CPU tensor"),
        (3, rand(G, hidden + 1), r"w has shape \[2, 5\], expected \[2, 4\]"),
        (4, rand(G, q_len, 5), "dot_query and dot_key go together"),
        (8, rand(G, k_len + 1), "cvec has shape"),
        (14, 0, "block must be >= 1"),
        (0, rand(G, q_len), "must be 3-D"),
    ]:
        args = list(good)
        args[index] = bad
        with pytest.raises(RuntimeError, match=message):
            fused_cpp_neural_attention._fused_forward(*args)
    assert cpp_neural_attention.cpp_available()  # builds the tiled kernels' C++ scorers (as the fused one, above)
    module = cpp_neural_attention._cpp_module()
    At, Bt, w = rand(G, hidden, q_len), rand(G, hidden, k_len), rand(G, hidden)
    module.paper_scores(At, Bt, w, 0, 0, q_len, 0, k_len)
    with pytest.raises(RuntimeError, match=r"tile \[0, 10\) x \[0, 70\) outside the 9 x 70 pairs"):
        module.paper_scores(At, Bt, w, 0, 0, q_len + 1, 0, k_len)
    with pytest.raises(RuntimeError, match=r"dS has shape \[2, 9, 69\], expected \[2, 9, 70\]"):
        module.paper_backward(At, Bt, rand(G, q_len, k_len - 1), torch.zeros_like(At), torch.zeros_like(Bt),
                              torch.zeros_like(w), 0, 0, q_len, 0, k_len)
    with pytest.raises(RuntimeError, match="hidden2 a multiple of 4"):
        module.authors_scores(At, Bt, rand(G, 3, hidden), rand(G, 3), rand(G, 3), 0, q_len, 0, k_len)
