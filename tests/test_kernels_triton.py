"""Tests of the fused Triton backend against the float64 materialising ``tests.reference.kernel_reference``.

Without CUDA the kernels run on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1), which is
slow: shapes are tiny and the block size is 16 so that odd sizes still span several blocks.
"""

import importlib
import os
import sys

import pytest
import torch

from tests.reference import bias_in_layout, drawn_seed, fresh_seed, kernel_reference

_CUDA = torch.cuda.is_available()
_MODULE = "hf_neural_attention.triton_neural_attention"
_KERNELS = "hf_neural_attention.triton_kernels_neural_attention"

# TRITON_INTERPRET must be set before triton / the kernels are imported (jit decides at decoration time).
# It is restored right after import so that it does not leak into other test modules of the session.
_saved_env = os.environ.get("TRITON_INTERPRET")
if not _CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
try:
    triton = pytest.importorskip("triton")
    tk = importlib.import_module(_KERNELS)
    if not _CUDA and type(tk.fwd_kernel).__name__ != "InterpretedFunction":  # imported earlier without it
        tk = importlib.reload(sys.modules[_KERNELS])
        importlib.reload(sys.modules[_MODULE])  # the launcher holds the kernels it imported
    tna = importlib.import_module(_MODULE)
finally:
    if _saved_env is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _saved_env

tl = triton.language
pytestmark = pytest.mark.triton
neural_attention_triton = tna.neural_attention_triton
DEVICE = "cuda" if _CUDA else "cpu"
BLOCK = dict(block_m=16, block_n=16)


@pytest.fixture(autouse=True)
def _interpret_env(monkeypatch):
    if not _CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


# ------------------------------------------------------------------------------------------------ helpers
def make_inputs(
    b=1, h=2, lq=5, lk=7, hidden=3, vdim=5, *, authors=False, shared=False, dot=0, dtype=torch.float32, seed=0,
    bias=None, bias_dtype=None,
):
    """Random kernel inputs, each a leaf that requires grad; ``bias``: the shape of a ``score_bias`` to add."""
    g = torch.Generator().manual_seed(fresh_seed(seed))

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(DEVICE, dtype).requires_grad_()

    hw = 1 if shared else h
    t = dict(A=r(b, h, lq, hidden), B=r(b, h, lk, hidden), V=r(b, h, lk, vdim))
    if authors:
        hidden2 = max(hidden // 2, 1)
        t.update(w=r(hw, hidden2), w2=r(hw, hidden2, hidden, scale=0.7), b2=r(hw, hidden2, scale=0.3))
    else:
        t.update(w=r(hw, hidden))
    if dot:
        t.update(dq=r(b, h, lq, dot, scale=0.5), dk=r(b, h, lk, dot, scale=0.5))
    if bias is not None:  # large enough to reorder the scores
        t["bias"] = (torch.randn(*bias, generator=g) * 2.0).to(DEVICE, bias_dtype or dtype).requires_grad_()
    return t


def run_kernel(t, **kw):
    return neural_attention_triton(
        t["A"],
        t["B"],
        t["V"],
        t["w"],
        t.get("w2"),
        t.get("b2"),
        dot_query=t.get("dq"),
        dot_key=t.get("dk"),
        score_bias=t.get("bias"),
        sinks=t.get("sinks"),
        **BLOCK,
        **kw,
    )


def run_reference(t, **kw):
    return kernel_reference(
        t["A"], t["B"], t["V"], t["w"], t.get("w2"), t.get("b2"), dot_query=t.get("dq"), dot_key=t.get("dk"),
        score_bias=t.get("bias"), sinks=t.get("sinks"), **kw,
    )


def op_inputs(t):
    """The kernel ops' nine differentiable inputs from ``t``, detached (``None`` where absent)."""
    return [None if t.get(n) is None else t[n].detach() for n in ("A", "B", "V", "w", "w2", "b2", "dq", "dk", "bias")]


# the ops' settings (activation, causal, dot_scale, dropout_p, seed, softcap: 0, none) and launch (16 x 16 forward
# tiles, else default)
OP_SETTINGS = ("relu", True, 1.0, 0.0, torch.tensor(0), 0.0, [16, 16, -1, -1, -1, -1, -1, -1, -1])


def grads(out, t, grad_out):
    names = list(t)
    gs = torch.autograd.grad(out, [t[n] for n in names], grad_out, allow_unused=True)
    return dict(zip(names, gs, strict=True))


def assert_close(actual, expected, tol, what):
    """max |actual - expected| <= tol * max(max |expected|, 1): relative to the tensor's largest entry (a gradient's
    small entries are sums that cancel), and to 1 for small tensors. The inputs are O(1), and so are the terms a
    gradient sums: one that is small, or zero in exact arithmetic (a query that sees a single key), still carries
    their rounding (a floor of 0.05 failed on 4 of 16 fresh seeds, fp32 and bf16 alike)."""
    assert actual is not None, f"{what}: no gradient"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = (actual.double() - expected.double()).abs().max().item()
    scale = max(expected.double().abs().max().item(), 1.0)
    assert err <= tol * scale, f"{what}: max abs err {err:.3e} > {tol:.1e} * {scale:.3g}"


FP32_TOL = 2e-5
FP16_TOL = 5e-3
BF16_TOL = 3e-2  # bf16 inputs/outputs and bf16 MMA operands (P, dS rounded to bf16), fp32 accumulation


def compare(out, t, ref, t_ref=None, tol=FP32_TOL):
    """The kernel's output (from inputs t) and every gradient against the reference's (from inputs t_ref, default t)."""
    assert out.dtype == t["V"].dtype
    assert_close(out, ref, tol, "output")
    gen = torch.Generator().manual_seed(123)
    grad_out = torch.randn(ref.shape, generator=gen).to(DEVICE, out.dtype)  # the reference gets the same values
    g = grads(out, t, grad_out)
    g_ref = grads(ref, t if t_ref is None else t_ref, grad_out.double())
    for name in t:
        assert_close(g[name], g_ref[name], tol, f"grad {name}")
        assert g[name].dtype == t[name].dtype
    return g


def check(t, tol=FP32_TOL, ref_kw=None, **kw):
    out = run_kernel(t, **kw)
    ref = run_reference(t, **(ref_kw if ref_kw is not None else kw))
    return out, compare(out, t, ref, tol=tol)


# ------------------------------------------------------------------------------------------------ tests
def test_triton_is_usable(monkeypatch):
    x = torch.zeros(1, device=DEVICE)
    assert tna.TRITON_AVAILABLE
    assert tna.triton_is_usable(x)
    # what backend='auto' takes: where usable; on CUDA, heads of 64, or wider on compute capability 8.0 or newer
    narrow, wide = torch.zeros(1, 1, 1, 64, device=DEVICE), torch.zeros(1, 1, 1, 128, device=DEVICE)
    assert tna.triton_is_preferred(narrow)
    assert tna.triton_is_preferred(wide) is (not _CUDA or torch.cuda.get_device_properties(wide.device).major >= 8)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not tna.triton_is_usable(torch.zeros(1))  # CPU tensor, no interpreter
    assert not tna.triton_is_preferred(torch.zeros(1, 1, 1, 64))


@pytest.mark.parametrize("lq,lk", [(1, 7), (5, 5), (17, 23)])
@pytest.mark.parametrize("causal", [False, True])
def test_paper_relu_odd_sizes(lq, lk, causal):
    t = make_inputs(lq=lq, lk=lk, hidden=3, vdim=5, seed=lq * 100 + lk)
    check(t, causal=causal)


@pytest.mark.parametrize("activation", ["gelu", "silu", "tanh"])
def test_paper_smooth_activations(activation):
    t = make_inputs(lq=17, lk=9, hidden=4, vdim=3, seed=7)
    check(t, activation=activation)


@pytest.mark.parametrize("shared", [False, True])
def test_authors_mlp(shared):
    t = make_inputs(b=2, lq=17, lk=20, hidden=5, vdim=4, authors=True, shared=shared, seed=11)
    check(t, causal=True)


@pytest.mark.parametrize("hidden", [1, 16, 19])
def test_authors_mlp_widths_mask_and_unequal_tiles(hidden):
    # the second layer runs as a GEMM over the tile's pairs with both widths padded to >= 16: widths below, at and
    # above 16 (19 pads to 32), a padding mask with a fully masked row, tiles whose rows and columns differ
    t = make_inputs(b=2, h=2, lq=19, lk=23, hidden=hidden, vdim=3, authors=True, seed=60 + hidden)
    mask = torch.rand(2, 1, 19, 23, generator=torch.Generator().manual_seed(3)) > 0.3
    mask[0, 0, 7] = False
    kw = dict(mask=mask.to(DEVICE), causal=True)
    out = neural_attention_triton(t["A"], t["B"], t["V"], t["w"], t["w2"], t["b2"], block_m=16, block_n=32,
                                  bwd_block_m=32, bwd_block_n=16, **kw)  # fmt: skip
    ref = run_reference(t, **kw)
    compare(out, t, ref)


def test_shared_weights_residual_dot_paper():
    t = make_inputs(b=2, h=3, lq=17, lk=19, hidden=2, vdim=6, shared=True, dot=8, seed=3)
    check(t, dot_scale=0.35)


@pytest.mark.parametrize("bm,bn", [(16, 32), (32, 16)])
def test_unequal_blocks_causal(bm, bn):
    t = make_inputs(lq=33, lk=41, hidden=2, vdim=3, dot=4, seed=bm)
    out = neural_attention_triton(
        t["A"], t["B"], t["V"], t["w"], causal=True, dot_query=t["dq"], dot_key=t["dk"], block_m=bm, block_n=bn,
        bwd_block_m=bn, bwd_block_n=bm,
    )
    ref = run_reference(t, causal=True)
    compare(out, t, ref)


@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("unroll,bwd_unroll", [(2, 4), (4, 1), (8, 2)])
def test_paper_unroll(activation, unroll, bwd_unroll):
    # hidden 3: unrolled iterations run past the last unit (padded units must contribute nothing); shared weights,
    # a padding mask with a fully masked row, causal, the residual dot term
    t = make_inputs(b=2, h=2, lq=19, lk=23, hidden=3, vdim=5, shared=True, dot=4, seed=17)
    mask = torch.rand(2, 1, 19, 23, generator=torch.Generator().manual_seed(2)) > 0.3
    mask[1, 0, 4] = False
    kw = dict(activation=activation, mask=mask.to(DEVICE), causal=True, dot_scale=0.4)
    check(t, unroll=unroll, bwd_unroll=bwd_unroll, ref_kw=kw, **kw)


@pytest.mark.parametrize("offset", [500.0, 5000.0])
def test_relu_large_opposite_offsets(offset):
    # the signed-max scores (forward) and the relu weight gradient (sum A dA_raw + sum B dB_raw on the host) work on
    # A + mu and B - mu: without the centring, large opposite offsets of A and B cancel in fp32
    t = make_inputs(lq=23, lk=29, hidden=4, vdim=3, seed=29)
    with torch.no_grad():
        t["A"] += offset
        t["B"] -= offset
    check(t, causal=True, ref_kw=dict(causal=True))


def test_relu_zero_and_negative_output_weights():
    # w_m = 0 contributes no score, but its gradient dw_m = sum relu'(A + B) dS (A + B) still needs the relu mask,
    # which the kernels read from copies scaled by |w_m| (by 1 where w_m = 0); negative w_m flip the signed max
    t = make_inputs(b=2, h=2, lq=21, lk=18, hidden=5, vdim=4, seed=41)
    with torch.no_grad():
        t["w"][0, 1] = 0.0
        t["w"][1, 3] = 0.0
        t["w"][:, 0] = -t["w"][:, 0].abs()
    check(t, causal=True, ref_kw=dict(causal=True))
    check(t)


@pytest.mark.parametrize("width", [128, 256, 512])
def test_wide_head_default_tiles(width):
    # the tiles a GPU launch takes by default for Llama's, Gemma 3's and Gemma 4's head sizes (64 x 64; 64 x 32;
    # 32 x 32 whose backward owns 16 rows): a value that pads to that width, n not a multiple of the tiles, causal
    # with a padding mask and a fully masked row
    (bm, bn, _, _), (own, step, _, _) = (tna._default_launch(False, 3, False, backward, width=width)
                                         for backward in (False, True))
    t = make_inputs(b=1, h=2, lq=70, lk=70, hidden=3, vdim=width - 3, seed=width)
    mask = torch.rand(1, 1, 70, 70, generator=torch.Generator().manual_seed(width)) > 0.2
    mask[0, 0, 40] = False
    kw = dict(mask=mask.to(DEVICE), causal=True)
    out = neural_attention_triton(t["A"], t["B"], t["V"], t["w"], block_m=bm, block_n=bn, bwd_block_m=own,
                                  bwd_block_n=step, **kw)  # fmt: skip
    compare(out, t, run_reference(t, **kw))


def test_separate_backward_blocks_causal():
    t = make_inputs(lq=41, lk=41, hidden=16, vdim=4, seed=23)
    check(t, causal=True, bwd_block_m=32, bwd_block_n=16, ref_kw=dict(causal=True))


def test_causal_kv_longer_than_q_with_dot():
    # upper-left aligned: key j visible to query i iff j <= i, also when k_len > q_len
    t = make_inputs(lq=5, lk=33, hidden=3, vdim=4, dot=4, seed=5)
    check(t, causal=True, dot_scale=0.5)


def test_padding_mask_and_fully_masked_rows():
    b, h, lq, lk = 2, 2, 17, 21
    t = make_inputs(b=b, h=h, lq=lq, lk=lk, hidden=3, vdim=5, seed=9)
    # (b, 1, 1, lk) padding mask (broadcast: stride 0) and a (b, 1, lq, lk) mask with fully masked rows
    keep = torch.ones(b, 1, 1, lk, dtype=torch.bool, device=DEVICE)
    keep[0, ..., 15:] = False
    keep[1, ..., :4] = False
    check(t, mask=keep)
    m = torch.rand(b, 1, lq, lk, generator=torch.Generator().manual_seed(1)).to(DEVICE) > 0.4
    m[0, 0, 3] = False
    m[1, 0, 16] = False
    out, g = check(t, mask=m)
    assert (out[0, :, 3] == 0).all() and (out[1, :, 16] == 0).all()
    assert (g["A"][0, :, 3] == 0).all() and (g["A"][1, :, 16] == 0).all()


def test_empty_rows_causal_kv_shorter_is_fine_and_all_masked():
    t = make_inputs(lq=5, lk=3, hidden=2, vdim=3, seed=13)
    check(t, mask=torch.zeros(1, 1, 5, 3, dtype=torch.bool, device=DEVICE))


def test_bf16_inputs():
    t = make_inputs(lq=17, lk=18, hidden=4, vdim=8, dot=16, dtype=torch.bfloat16, seed=21)
    check(t, tol=BF16_TOL, causal=True, dot_scale=0.25)


# Gemma 2's cap and gpt-oss' sinks in 16 bits, with every score term (the dot term, a bias, a padding mask with a row
# that sees no key) and the packed fp16 MLP; fp32 and the other kernels: tests/test_softcap_and_sinks.py
@pytest.mark.parametrize(("dtype", "tol"), [(torch.bfloat16, BF16_TOL), (torch.float16, FP16_TOL)])
@pytest.mark.parametrize("half_mlp", [False, True])
def test_cap_and_sinks_in_16_bits(dtype, tol, half_mlp):
    t = make_inputs(b=2, lq=17, lk=18, hidden=4, vdim=8, dot=16, dtype=dtype, seed=27, bias=(1, 2, 17, 18))
    g = torch.Generator().manual_seed(fresh_seed(28))
    t["sinks"] = (1.0 + torch.rand(1, 2, 1, 1, generator=g)).to(DEVICE, dtype).requires_grad_()
    mask = torch.rand(2, 1, 17, 18, generator=g) > 0.3
    mask[1, :, 5] = False
    kw = dict(mask=mask.to(DEVICE), softcap=1.5, dot_scale=0.25)
    out, grads_ = check(t, tol=tol, ref_kw=kw, half_mlp=half_mlp, unroll=4, bwd_unroll=2, **kw)
    assert (out[1, :, 5] == 0).all() and grads_["sinks"].abs().max() > 1e-3


def test_fp16_inputs_mixed_precision_hidden():
    # fp32 projections (A, B, weights) with a half-precision value / dot path
    t = make_inputs(lq=17, lk=18, hidden=4, vdim=8, dot=16, seed=23)
    for name in ("V", "dq", "dk"):
        t[name] = t[name].detach().half().requires_grad_()
    check(t, tol=FP16_TOL, dot_scale=0.25)


def test_noncontiguous_inputs_and_2d_mask():
    b, h, lq, lk = 2, 3, 9, 17
    t = make_inputs(b=b, h=h, lq=lq, lk=lk, hidden=2, vdim=5, dot=4, seed=25)
    # value / dot tensors as (batch, len, heads, dim).transpose(1, 2) views, like HF attention layers
    for name in ("V", "dq", "dk"):
        x = t[name].detach()
        t[name] = x.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
        assert not t[name].is_contiguous()
    m = torch.rand(lq, lk, generator=torch.Generator().manual_seed(2)).to(DEVICE) > 0.3
    check(t, mask=m)


# d' = 4: the per-unit form; d' = 16: the tensor-core GEMM form. Both within 1e-2 over seeds 22-26 since the forward
# writes an fp32 output for delta = rowsum(dO * O) (with the bf16 output, d' = 16 needed 0.15)
@pytest.mark.parametrize("hidden", [4, 16])
def test_bf16_authors(hidden):
    t = make_inputs(lq=9, lk=17, hidden=hidden, vdim=8, authors=True, dtype=torch.bfloat16, seed=22)
    check(t, tol=BF16_TOL)


def test_bf16_rounding_is_to_nearest_even():
    # the kernels' rounding to bf16 MMA operands, as the GPU converts; the interpreter's own fp32 -> bf16 cast
    # truncates, a bias that added up in the backward's delta: a test failed at 2x its tolerance on the interpreter
    # where the GPU's rounding stays inside it
    @triton.jit
    def round_kernel(X, Y, N: tl.constexpr):
        offs = tl.arange(0, N)
        tl.store(Y + offs, tk._rounded(tl.load(X + offs), tl.bfloat16, not _CUDA).to(tl.float32))

    g = torch.Generator().manual_seed(fresh_seed(91))
    x = torch.randn(4096, generator=g) * torch.exp(torch.randn(4096, generator=g) * 4)
    x[:6] = torch.tensor([0.0, -0.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8, -(1.0 + 2**-8), 1e-40])  # ties to even, subnormal
    x = x.to(DEVICE)
    y = torch.empty_like(x)
    round_kernel[(1,)](x, y, N=4096)
    assert torch.equal(y, x.to(torch.bfloat16).float())


@pytest.mark.parametrize("authors", [False, True])
def test_bf16_output_is_p_at_v_to_fp32_precision(authors):
    # with 16-bit values P enters P @ V as two parts, P rounded and its rounding error: the backward's
    # delta = rowsum(dO * O) must match the P it recomputes, or the scorer's weight gradients (sums of dS times
    # non-negative activations) take O's error times the activations' mean. P rounded once is off by up to 2^-9.
    t = make_inputs(lq=19, lk=37, hidden=4, vdim=8, authors=authors, dtype=torch.bfloat16, seed=93)
    inputs = op_inputs(t)
    out, _ = tna._triton_forward(*inputs, None, *OP_SETTINGS)  # fp32, before the rounding to bf16
    exact = kernel_reference(*inputs[:6], causal=True)
    assert (out.double() - exact).abs().max().item() <= 2e-5 * exact.abs().max().item()  # 2^-9: 100x that
    # the same output whether or not a backward can follow (reentrant checkpointing runs the forward both ways)
    with torch.no_grad():
        assert torch.equal(run_kernel(t, causal=True), out.to(torch.bfloat16))
    assert torch.equal(run_kernel(t, causal=True), out.to(torch.bfloat16))


def test_dropout_matches_reference_with_recovered_mask():
    b, h, lq, lk, p = 1, 2, 9, 17, 0.3
    t = make_inputs(b=b, h=h, lq=lq, lk=lk, hidden=3, vdim=4, seed=31)
    # with value = identity the output is the dropped-out, rescaled probability matrix itself
    eye = torch.eye(lk, device=DEVICE).expand(b, h, lk, lk)
    probs_drop = neural_attention_triton(t["A"], t["B"], eye, t["w"], dropout_p=p, generator_seed=1234, **BLOCK)
    keep = probs_drop.detach() != 0
    frac = keep.float().mean().item()
    assert 0.5 < frac < 0.9, frac
    # the kernel with real values and the same seed equals the reference with that mask (forward and grads)
    check(t, ref_kw=dict(keep=keep.double() / (1.0 - p)), dropout_p=p, generator_seed=1234)


def test_dropout_determinism_and_p0():
    t = make_inputs(lq=17, lk=17, hidden=2, vdim=4, seed=41)
    a = run_kernel(t, dropout_p=0.5, generator_seed=7)
    b = run_kernel(t, dropout_p=0.5, generator_seed=7)
    c = run_kernel(t, dropout_p=0.5, generator_seed=8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(run_kernel(t, dropout_p=0.0, generator_seed=7), run_kernel(t))


def test_backward_bitwise_deterministic():
    t = make_inputs(b=2, lq=17, lk=33, hidden=4, vdim=4, authors=True, shared=True, dot=16, seed=51)
    gen = torch.Generator().manual_seed(0)
    go = torch.randn(2, 2, 17, 4, generator=gen).to(DEVICE)
    g1 = grads(run_kernel(t, dot_scale=0.3), t, go)
    g2 = grads(run_kernel(t, dot_scale=0.3), t, go)
    for name in t:
        assert torch.equal(g1[name], g2[name]), name


def test_input_validation():
    t = make_inputs()
    with pytest.raises(TypeError, match="bool"):
        run_kernel(t, mask=torch.ones(1, 1, 5, 7, device=DEVICE))
    with pytest.raises(ValueError, match="swish"):
        run_kernel(t, activation="swish")
    with pytest.raises(ValueError, match="block_m"):
        neural_attention_triton(t["A"], t["B"], t["V"], t["w"], block_m=24)


def test_weight_without_heads_dim_and_empty_query():
    t = make_inputs(shared=True, seed=61)
    w_flat = t["w"].detach()[0].clone().requires_grad_()
    out_flat = neural_attention_triton(t["A"], t["B"], t["V"], w_flat, **BLOCK)
    out = run_kernel(t)
    assert torch.equal(out_flat, out)
    (g_flat,) = torch.autograd.grad(out_flat.sum(), [w_flat])
    (g,) = torch.autograd.grad(out.sum(), [t["w"]])
    assert g_flat.shape == w_flat.shape and torch.equal(g_flat, g[0])
    empty = neural_attention_triton(t["A"][:, :, :0], t["B"], t["V"], t["w"])
    assert empty.shape == (1, 2, 0, 5)


@pytest.mark.parametrize("mlp,activation,hidden", [("paper", "relu", 4), ("paper", "gelu", 4), ("authors", "relu", 4),
                                                   ("authors", "relu", 16)])
@pytest.mark.parametrize("garbage", [1e6, float("nan"), float("inf")])
def test_rows_no_pair_sees_do_not_matter(mlp, activation, hidden, garbage):
    # padded / masked keys, keys past the causal range and fully masked queries may hold anything (a preallocated
    # buffer): they must not move the centring of the signed-max form or any weight gradient (0 * inf is NaN)
    t = make_inputs(b=2, h=2, lq=21, lk=27, hidden=hidden, vdim=3, authors=mlp == "authors", seed=43)
    mask = torch.ones(2, 1, 21, 27, dtype=torch.bool)
    mask[0, :, :, 18:20] = False  # two masked keys of batch 0 (keys >= 21 are past the causal range anyway)
    mask[1, :, 5] = False  # a fully masked query of batch 1
    clean = {k: v.detach().clone().requires_grad_() for k, v in t.items()}
    with torch.no_grad():
        t["B"][0, :, 18:20] = garbage
        t["B"][:, :, 21:] = garbage
        t["A"][1, :, 5] = garbage
    kw = dict(activation=activation, mask=mask.to(DEVICE), causal=True)
    out = run_kernel(t, **kw)
    ref = run_reference(clean, **kw)
    compare(out, t, ref, clean)


def test_relu_subnormal_output_weights():
    # |w| below the smallest normal float: the unit scores (practically) 0, and its weight gradient still needs the
    # exact relu mask (scaled by a subnormal |w|, the operands would lose it)
    t = make_inputs(b=1, h=2, lq=20, lk=20, hidden=5, vdim=3, seed=47)
    with torch.no_grad():
        t["w"][0, 1] = 3e-45
        t["w"][1, 2] = -3e-45
    check(t, causal=True, ref_kw=dict(causal=True))


def test_default_forward_tile_fits_short_queries(monkeypatch):
    # decoding with a KV cache (q_len 1) must not run a 128-row tile of which one row is real: the default forward
    # block shrinks to the next power of two >= q_len (16 at least, the tensor-core minimum); explicit choices stand
    monkeypatch.setattr(tna, "_interpreting", lambda: False)  # the GPU defaults (host side only: nothing launches)
    cfg = dict(activation="relu", causal=False, dot_scale=1.0, dropout_p=0.0, seed=0)
    for q_len, expected in ((1, 16), (20, 32), (100, 128), (3000, 128)):
        t = make_inputs(lq=q_len, lk=50, hidden=4, dtype=torch.bfloat16)
        *_, launch = tna._launch_args(t["A"], t["B"], t["V"], t["w"], None, None, None, None, None, cfg)
        assert launch[""][0] == expected and launch["bwd_"][0] == 128, (q_len, launch)
    *_, launch = tna._launch_args(t["A"][:, :, :1], t["B"], t["V"], t["w"], None, None, None, None, None,
                                  dict(cfg, block_m=64))  # fmt: skip
    assert launch[""][0] == 64


def test_default_tile_rows_follow_the_register_budget(monkeypatch):
    # 128 owned rows where the sm_90 compile spills nothing (relu, no dot term, at most one of a mask, a score bias
    # and dropout), else 64; fp32 inputs 32 (benchmarks/README.md, results/sass_sm90/score_bias.csv)
    monkeypatch.setattr(tna, "_interpreting", lambda: False)  # the GPU defaults (host side only: nothing launches)
    t = make_inputs(lq=300, lk=300, hidden=4, dot=16, dtype=torch.bfloat16)
    mask = torch.ones(1, 1, 300, 300, dtype=torch.bool)
    bias = torch.zeros(1, 2, 300, 300, dtype=torch.bfloat16)
    for expected, kw in [(128, {}), (128, dict(mask=mask)), (128, dict(bias=bias)), (128, dict(dropout_p=0.1)),
                         (64, dict(mask=mask, bias=bias)), (64, dict(bias=bias, dropout_p=0.1)),
                         (64, dict(mask=mask, dropout_p=0.1)), (64, dict(dot=True)), (64, dict(activation="gelu")),
                         (32, dict(fp32=True))]:
        cfg = dict(activation=kw.get("activation", "relu"), causal=True, dot_scale=1.0,
                   dropout_p=kw.get("dropout_p", 0.0), seed=0)
        dot = (t["dq"], t["dk"]) if kw.get("dot") else (None, None)
        value = t["V"].float() if kw.get("fp32") else t["V"]
        *_, launch = tna._launch_args(t["A"], t["B"], value, t["w"], None, None, *dot, kw.get("mask"), cfg,
                                      score_bias=kw.get("bias"))  # fmt: skip
        assert launch[""][0] == launch["bwd_"][0] == expected, (kw.keys(), launch)


# ------------------------------------------------------------------------------ half_mlp (fp16 score arithmetic)
def _fp16_exact_inputs(seed, dtype, b=2, h=2, lq=19, lk=19, hidden=8, vdim=5):
    """Inputs whose scorer operands and fp16 partial sums are exact in fp16 (and bf16): A, B multiples of 1/8 in
    [-4, 4], each key-side column of B summing to zero (the centring then moves nothing), w = +-2^k, k in -3..0.
    The operands |w| A are multiples of 2^-6 below 4 in magnitude, a sum of 4 units stays within 16, where fp16's
    spacing is at most 2^-6: every fp16 sum of up to 4 units is exact. The half MLP must then match the float64
    reference to fp32 precision, forward and every gradient: no relu kink moves, so a wrong sign, scale, per-key
    constant or mask anywhere in it shows."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randint(-32, 33, (b, h, lq, hidden), generator=g) / 8
    B = torch.randint(-32, 33, (b, h, lk, hidden), generator=g) / 8
    B[:, :, 1::2] = -B[:, :, 0:lk - 1:2]  # mirrored pairs: column sums 0 (an odd last key is made 0)
    if lk % 2:
        B[:, :, -1] = 0.0
    w = torch.randint(-3, 1, (h, hidden), generator=g).float().exp2()
    w = w * (torch.randint(0, 2, (h, hidden), generator=g) * 2 - 1)
    V = torch.randn(b, h, lk, vdim, generator=g)
    return {name: x.to(DEVICE, dtype if name != "w" else torch.float32).requires_grad_()
            for name, x in dict(A=A, B=B, V=V, w=w).items()}  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("masking", ["causal", "padding"])
@pytest.mark.parametrize("hidden", [4, 8, 12])  # below / in [HALF_MMA_FROM, HALF_MMA_UNTIL]: fp32 / MMA sums
def test_half_mlp_matches_reference_on_fp16_exact_operands(dtype, masking, hidden):
    seed = drawn_seed()
    print(f"seed {seed}")
    t = _fp16_exact_inputs(seed, dtype, hidden=hidden)
    if masking == "causal":
        kw = dict(causal=True)
    else:  # every key visible to some query (the centring's mean stays 0), a fully masked query row
        m = torch.rand(2, 1, 19, 19, generator=torch.Generator().manual_seed(seed)) > 0.4
        m[:, :, 0] = True
        m[1, :, 7] = False
        kw = dict(mask=m.to(DEVICE))
    # unroll 4: the fp16 sums of 4 units (2 loop iterations over 8 units), as a GPU launch sums 8
    # 16-bit inputs round dS to bf16 for the relu-mask sums: bf16 inputs once, fp16 inputs as hi + lo parts (16
    # bits). fp16: 2e-3, the fp16 rounding of outputs and gradients (9.5e-4 at most over 50 seeds at d' = 8 and at
    # 12); dS as one bf16 part moved them by 2.7e-3 to 8.6e-3
    tol = {torch.float32: FP32_TOL, torch.float16: 2e-3, torch.bfloat16: BF16_TOL}[dtype]
    out, g = check(t, tol=tol, ref_kw=kw, half_mlp=True, unroll=4, bwd_unroll=2, **kw)
    if masking == "padding":
        assert (out[1, :, 7] == 0).all() and (g["A"][1, :, 7] == 0).all()


def test_half_mlp_scales_each_head_into_fp16_range_on_its_own():
    # head 0's operands reach 2^32 (fp16 overflows at 65504 unless they are scaled into range and unscaled after);
    # head 1's stay below 4: one scale for both would put their 2^-6 steps at 2^-28, below fp16's smallest subnormal
    # (head 0's scores reach ~1e10: its softmax is one-hot, and fp32 resolves its gradients no better than 1e-2, with
    # or without half_mlp; they are left out)
    t = _fp16_exact_inputs(11, torch.float32, b=2, lq=9, lk=9)
    with torch.no_grad():
        t["w"][0] *= 2.0**30
    out = run_kernel(t, half_mlp=True, unroll=4, bwd_unroll=2)
    ref = run_reference(t)
    assert_close(out, ref, FP32_TOL, "output")
    head1 = torch.zeros_like(ref)
    head1[:, 1] = torch.randn(head1[:, 1].shape, generator=torch.Generator().manual_seed(3))
    g, g_ref = grads(out, t, head1), grads(ref, t, head1.double())
    for name in ("A", "B", "V", "w"):
        assert_close(g[name][:, 1] if name != "w" else g[name][1], g_ref[name][:, 1] if name != "w" else g_ref[name][1],
                     FP32_TOL, f"head 1 grad {name}")


def test_half_mlp_keeps_a_non_finite_operand_in_its_own_head():
    # the scales come from the finite operands of each (batch, head): an inf in batch 1 leaves batch 0 as it was
    t = _fp16_exact_inputs(12, torch.float32, b=2, lq=9, lk=9)
    clean = run_kernel(t, half_mlp=True, unroll=4)
    with torch.no_grad():
        t["A"][1, 0, 3, 2] = float("inf")
    out = run_kernel(t, half_mlp=True, unroll=4)
    assert torch.equal(out[0], clean[0]) and torch.equal(out[1, 1], clean[1, 1])
    torch.testing.assert_close(out[1, 0], run_kernel(t, unroll=4)[1, 0], rtol=0, atol=FP16_TOL, equal_nan=True)


def test_half_mlp_gaussian_inputs_within_fp16_rounding():
    # generic operands round to fp16 (relative 2^-11) and so do the sums of 4 units: the output moves by that much.
    # Only the forward pass is compared: a pair whose relu input is within that rounding of 0 may flip its
    # relu'(.) in backward, a jump of dS_ij w_m in one gradient entry that max-error tolerances cannot bound.
    t = make_inputs(b=2, h=2, lq=21, lk=23, hidden=8, vdim=5, seed=43)
    out = run_kernel(t, causal=True, half_mlp=True, unroll=4)
    ref = run_reference(t, causal=True)
    assert_close(out, ref, FP16_TOL, "output")
    # fp16 arithmetic did run: the fp32 kernel (errors ~1e-7 here) is further from it than fp32 rounding
    assert (out - run_kernel(t, causal=True)).abs().max() > 1e-5


def test_half_mlp_input_validation():
    t = make_inputs(hidden=4)
    with pytest.raises(ValueError, match="activation='gelu'"):
        run_kernel(t, activation="gelu", half_mlp=True)
    with pytest.raises(ValueError, match="unroll=16 with d'=16: pass unroll <= 8"):
        run_kernel(make_inputs(hidden=16), half_mlp=True, unroll=16)
    with pytest.raises(ValueError, match="bwd_unroll=16 with d'=9: pass bwd_unroll <= 8"):
        run_kernel(make_inputs(hidden=9), half_mlp=True, unroll=8, bwd_unroll=16)
    run_kernel(t, half_mlp=True, unroll=16)  # d' = 4: the kernels unroll 4 units at most


def test_half_mlp_unroll_is_capped_at_the_padded_units():
    # d' = 8 with bf16 inputs pads the backward's gradient accumulator to 16 columns for the tensor cores; the unit
    # loops must still stop at the 8 units the operands are padded to (an unroll of 16 read past them: NaN)
    t = make_inputs(b=1, h=2, lq=21, lk=21, hidden=8, vdim=5, seed=44, dtype=torch.bfloat16)
    go = torch.randn(1, 2, 21, 5, generator=torch.Generator().manual_seed(5)).to(DEVICE, torch.bfloat16)
    capped = run_kernel(t, causal=True, half_mlp=True, unroll=16, bwd_unroll=16)
    exact = run_kernel(t, causal=True, half_mlp=True, unroll=8, bwd_unroll=8)
    assert torch.equal(capped, exact)
    for a, e in zip(grads(capped, t, go).values(), grads(exact, t, go).values(), strict=True):
        assert torch.equal(a, e)
    ta = make_inputs(hidden=4, authors=True)
    with pytest.raises(ValueError, match="authors' MLP"):
        run_kernel(ta, half_mlp=True)


# ------------------------------------------------------------------------------------------------ score bias
# A score bias (T5's relative position bias, ALiBi, soft masks) is read tile by tile and added to the fp32 scores in
# all three kernels; its gradient is dS, written by the query-side backward and summed on the host where it broadcasts.
def _padding_with_a_fully_masked_row(b, lq, lk):
    mask = torch.ones(b, 1, lq, lk, dtype=torch.bool)
    mask[1, :, :, : lk // 3] = False  # left padding
    mask[0, :, 4] = False  # a query that sees nothing
    return mask.to(DEVICE)


BIAS_CASES = [  # (bias shape, masking, authors' MLP, dot width): every way a bias broadcasts to (2, 2, 17, 23)
    ((1, 2, 17, 23), "causal", False, 0),  # T5: one bias for the batch
    ((2, 2, 17, 23), "padding", False, 16),  # per example and head
    ((2, 1, 17, 23), "none", True, 0),  # per example, shared by the heads
    ((17, 23), "padding", False, 0),  # 2-D: every example and head
    ((2, 1, 1, 23), "causal", True, 16),  # per key (a soft padding mask)
    ((1, 2, 17, 1), "none", False, 0),  # per query (softmax-invariant: its gradient is 0)
]


@pytest.mark.parametrize("case", BIAS_CASES, ids=[f"{'x'.join(map(str, c[0]))}-{c[1]}" for c in BIAS_CASES])
def test_score_bias_matches_the_reference(case):
    shape, masking, authors, dot = case
    t = make_inputs(b=2, lq=17, lk=23, hidden=4, authors=authors, dot=dot, bias=shape, seed=60 + BIAS_CASES.index(case))
    mask = _padding_with_a_fully_masked_row(2, 17, 23) if masking == "padding" else None
    out, g = check(t, mask=mask, causal=masking == "causal", dot_scale=0.3)
    assert g["bias"].shape == t["bias"].shape
    if mask is not None:  # the query that sees nothing: zero output and, where the bias has its own row, no gradient
        assert (out[0, :, 4] == 0).all()
        if shape[0] == 2:
            assert (g["bias"][0, :, 4] == 0).all()


@pytest.mark.parametrize("bias_dtype", [torch.float32, torch.bfloat16])
def test_score_bias_with_bf16_inputs(bias_dtype):
    # bf16 inputs and a bias in fp32 or bf16, fp32 accumulation; the bias's gradient comes back in its own dtype
    t = make_inputs(b=2, lq=17, lk=33, hidden=8, dot=16, dtype=torch.bfloat16, bias=(1, 2, 17, 33),
                    bias_dtype=bias_dtype, seed=70)
    check(t, tol=BF16_TOL, causal=True)


@pytest.mark.parametrize("fill", [-1e9, torch.finfo(torch.float32).min / 4])
def test_rows_a_large_negative_bias_covers_match_fp32_materialising_attention(fill):
    # a row that a -1e9 float mask covers entirely has its max near -1e9, where max + log(denominator) rounds to max
    # in fp32: the backward must rebuild P from the two kept apart (else P = 1 at every key, gradients k times too
    # large). Compared with fp32 materialising attention, which sees the same rounded scores.
    t = make_inputs(b=2, lq=6, lk=19, hidden=4, bias=(2, 1, 6, 19), seed=71)
    with torch.no_grad():
        t["bias"][0, :, 2] = fill  # a row covered entirely: uniform over its keys
        t["bias"][1, :, :, :3] = fill  # left padding
    out = run_kernel(t)
    pre = t["A"][:, :, :, None, :] + t["B"][:, :, None, :, :]
    scores = (torch.relu(pre) * t["w"][None, :, None, None, :]).sum(-1) + t["bias"]
    expected = torch.softmax(scores, -1) @ t["V"]
    assert_close(out, expected, 1e-5, "output")
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(fresh_seed(72))).to(DEVICE)
    got, want = grads(out, t, grad_out), grads(expected, t, grad_out)
    for name in t:
        assert_close(got[name], want[name], 1e-5, f"grad {name}")


def test_score_bias_with_half_mlp():
    # the bias joins the scores after the fp16 MLP is unscaled, in fp32: on fp16-exact operands still fp32-exact
    t = _fp16_exact_inputs(73, torch.bfloat16, hidden=8)
    t["bias"] = torch.randn(1, 2, 19, 19, generator=torch.Generator().manual_seed(74)).to(DEVICE).requires_grad_()
    check(t, tol=BF16_TOL, ref_kw=dict(causal=True), half_mlp=True, unroll=4, bwd_unroll=2, causal=True)


def test_score_bias_with_dropout_matches_reference_with_recovered_mask():
    b, h, lq, lk, p = 1, 2, 9, 17, 0.3
    t = make_inputs(b=b, h=h, lq=lq, lk=lk, hidden=3, vdim=4, bias=(1, h, lq, lk), seed=75)
    eye = torch.eye(lk, device=DEVICE).expand(b, h, lk, lk)  # value = identity: the output is the dropped-out P
    keep = neural_attention_triton(t["A"], t["B"], eye, t["w"], score_bias=t["bias"], dropout_p=p,
                                   generator_seed=99, **BLOCK).detach() != 0
    unbiased = neural_attention_triton(t["A"], t["B"], eye, t["w"], dropout_p=p, generator_seed=99, **BLOCK)
    assert torch.equal(keep, unbiased.detach() != 0)  # the bias does not change the dropout pattern
    check(t, ref_kw=dict(keep=keep.double() / (1.0 - p)), dropout_p=p, generator_seed=99)


def test_a_fixed_bias_gets_no_gradient_computed_and_changes_nothing_else():
    # a bias that needs no gradient (a float mask, an ALiBi buffer) gets no (batch, heads, q_len, k_len) dS buffer;
    # every other gradient is bitwise the one a bias that requires grad gives
    t = make_inputs(b=2, lq=17, lk=23, hidden=4, bias=(1, 2, 17, 23), seed=76)
    inputs, settings = op_inputs(t), OP_SETTINGS
    out, stats = tna._triton_forward(*inputs, None, *settings)
    assert stats.shape == (2, 2 * 2, 17)  # row max and log denominator
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(77)).to(DEVICE)
    *with_bias, dbias = tna._triton_backward(*inputs, None, out, stats, grad_out, *settings[:6], True, settings[6])
    *fixed, no_dbias = tna._triton_backward(*inputs, None, out, stats, grad_out, *settings[:6], False, settings[6])
    assert dbias.shape == t["bias"].shape and no_dbias.numel() == 0
    assert all(torch.equal(a, b) for a, b in zip(with_bias, fixed, strict=True))
    frozen = dict(t, bias=t["bias"].detach())
    g_frozen = grads(run_kernel(frozen, causal=True), {k: v for k, v in t.items() if k != "bias"}, grad_out)
    g_learned = grads(run_kernel(t, causal=True), t, grad_out)
    for name, g in g_frozen.items():
        assert torch.equal(g, g_learned[name]), name


def test_score_bias_backward_bitwise_deterministic():
    # the bias broadcasts over the batch: its gradient is a host-side sum over the per-example dS, in a fixed order
    t = make_inputs(b=3, lq=17, lk=33, hidden=4, bias=(1, 2, 17, 33), seed=78)
    go = torch.randn(3, 2, 17, 5, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    g1, g2 = grads(run_kernel(t, causal=True), t, go), grads(run_kernel(t, causal=True), t, go)
    for name in t:
        assert torch.equal(g1[name], g2[name]), name


@pytest.mark.parametrize("rows", [1, 2])
def test_a_bias_shared_by_the_batch_gets_its_gradient_a_few_rows_at_a_time(monkeypatch, rows):
    # dS of a bias shared by the batch is written `rows` examples per launch of the query-side kernel and summed
    # between launches (the buffer bounded by BIAS_GRAD_BUFFER_BYTES, not batch times the gradient): 3 examples in
    # launches of 1, or of 2 and a remainder of 1, with the dot term, a padding mask and a fully masked row
    from hf_neural_attention import kernels_neural_attention

    t = make_inputs(b=3, lq=17, lk=23, hidden=4, dot=16, bias=(1, 2, 17, 23), seed=83)
    mask = torch.ones(3, 1, 17, 23, dtype=torch.bool, device=DEVICE)
    mask[2, :, :, :5] = False
    mask[1, :, 6] = False
    go = torch.randn(3, 2, 17, 5, generator=torch.Generator().manual_seed(fresh_seed(84))).to(DEVICE)
    whole = grads(run_kernel(t, mask=mask, dot_scale=0.3), t, go)  # one launch: the whole batch's dS
    monkeypatch.setattr(kernels_neural_attention, "BIAS_GRAD_BUFFER_BYTES", rows * 2 * 17 * 23 * 4)
    assert kernels_neural_attention.bias_grad_rows(3, 2, 17, 23, t["bias"].shape) == rows
    check(t, mask=mask, dot_scale=0.3)  # against the float64 reference
    chunked = grads(run_kernel(t, mask=mask, dot_scale=0.3), t, go)
    for name in t:  # only the bias's gradient is summed differently
        if name == "bias":
            assert_close(chunked[name], whole[name], 1e-6, name)
        else:
            assert torch.equal(chunked[name], whole[name]), name


def test_pair_offsets_stay_exact_past_int32():
    # a (q_len, k_len) mask, bias or dS buffer has offsets i * k_len + j past 2^31 from n = 46341 on (a bias
    # (1, 1, n, n) of 4.3 GB in bf16): the tile's corner is offset in 64 bits, its pairs relative to it in 32
    @triton.jit
    def offsets(Out, start_q, start_k, sq, sk, BLOCK: tl.constexpr):
        r = tl.arange(0, BLOCK)
        ptrs = tk._pair_ptrs(tl.zeros((), tl.int64), sq, sk, start_q, start_k, start_q + r, start_k + r, False)
        tl.store(Out + r[:, None] * BLOCK + r[None, :], ptrs)

    n, start_q, start_k = 50_000, 46_336, 49_984
    out = torch.empty(16, 16, dtype=torch.int64, device=DEVICE)
    offsets[(1,)](out, start_q, start_k, n, 1, BLOCK=16)
    i = torch.arange(start_q, start_q + 16, dtype=torch.int64)[:, None]
    j = torch.arange(start_k, start_k + 16, dtype=torch.int64)[None, :]
    assert torch.equal(out.cpu(), i * n + j) and out.max().item() > 2**31


@pytest.mark.parametrize("layout", ["permuted", "expanded", "3-d", "float16", "float64"])
def test_score_bias_layouts_and_dtypes(layout):
    t = make_inputs(b=2, lq=17, lk=23, hidden=4, seed=80)
    leaf, bias = bias_in_layout(layout, torch.Generator().manual_seed(fresh_seed(81)), 2, 2, 17, 23, DEVICE)
    args = (t["A"], t["B"], t["V"], t["w"])
    out = neural_attention_triton(*args, causal=True, score_bias=bias, **BLOCK)
    ref = kernel_reference(*args, causal=True, score_bias=bias)
    assert_close(out, ref, FP32_TOL, "output")
    grad_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(82)).to(DEVICE)
    t = dict(t, bias=leaf)
    got, want = grads(out, t, grad_out), grads(ref, t, grad_out.double())
    for name in t:  # a 16-bit bias's gradient comes back rounded to its dtype (the reference's too, maybe 1 ulp apart)
        tol = max(FP32_TOL, torch.finfo(t[name].dtype).eps)
        assert_close(got[name], want[name], tol, f"grad {name}")
        assert got[name].dtype == t[name].dtype
