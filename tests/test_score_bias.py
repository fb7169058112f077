"""An additive score bias (T5's relative position bias, ALiBi, soft masks) in the memory-bounded kernels.

Every kernel that takes ``score_bias`` is checked against the float64 materialising reference
(``tests.reference.kernel_reference``), forward and every gradient including the bias's own, on fresh random inputs;
then inside a patched T5, where the auto backend now takes a fused path for the biased self-attention layers.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

from hf_neural_attention import backend_neural_attention as backend
from hf_neural_attention import patch_model, set_backend
from hf_neural_attention.cpp_neural_attention import cpp_available, neural_attention_cpp
from hf_neural_attention.fused_cpp_neural_attention import neural_attention_fused_cpp
from hf_neural_attention.tiled_neural_attention import neural_attention_tiled
from hf_neural_attention.triton_neural_attention import triton_is_usable
from tests.models import tiny_t5
from tests.reference import fresh_seed, kernel_reference

torch.set_num_threads(1)

needs_cpp = pytest.mark.skipif(os.environ.get("NEURAL_ATTENTION_NO_CPP") == "1" or not cpp_available(),
                               reason="C++ scorer not built (no compiler, or NEURAL_ATTENTION_NO_CPP=1)")

KERNELS = {
    "tiled": neural_attention_tiled,
    "cpp": pytest.param(neural_attention_cpp, marks=needs_cpp),
    "fused-cpp": pytest.param(neural_attention_fused_cpp, marks=needs_cpp),  # the authors' MLP: the tiled C++ path
}  # the Triton kernel's bias tests: test_kernels_triton.py
# every fused backend inside a model; triton on CPU tensors under its interpreter (TRITON_INTERPRET=1, conftest.py)
MODEL_BACKENDS = ["tiled", "auto", pytest.param("triton", marks=pytest.mark.skipif(
    not triton_is_usable(torch.empty(0)), reason="triton is not installed (or TRITON_INTERPRET=0 without CUDA)"))]
DIFFERENTIABLE = ("A", "B", "V", "w", "W2", "b2", "dq", "dk", "bias")


def make_inputs(seed: int, *, b: int = 2, h: int = 3, q_len: int = 11, k_len: int = 13, hidden: int = 4,
                mlp: str = "paper", dot: bool = False, bias_shape: tuple[int, ...] = (1, 3, 11, 13),
                dtype: torch.dtype = torch.float32, bias_dtype: torch.dtype | None = None
                ) -> tuple[dict[str, torch.Tensor | None], torch.Generator]:
    """Random kernel inputs (every one a leaf that requires grad) and the generator that drew them."""
    g = torch.Generator().manual_seed(fresh_seed(seed))

    def rnd(*shape: int, scale: float = 1.0, dt: torch.dtype = dtype) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(dt).requires_grad_()

    t = {"A": rnd(b, h, q_len, hidden), "B": rnd(b, h, k_len, hidden), "V": rnd(b, h, k_len, 5), "W2": None,
         "b2": None, "dq": None, "dk": None}
    if mlp == "paper":
        t["w"] = rnd(h, hidden)
    else:
        t["w"], t["W2"], t["b2"] = rnd(h, 2), rnd(h, 2, hidden), rnd(h, 2, scale=0.5)
    if dot:
        t["dq"], t["dk"] = rnd(b, h, q_len, 6, scale=0.5), rnd(b, h, k_len, 6, scale=0.5)
    t["bias"] = rnd(*bias_shape, scale=2.0, dt=bias_dtype or dtype)  # large enough to reorder the scores
    return t, g


def run(kernel, t: dict, **kwargs) -> torch.Tensor:
    return kernel(t["A"], t["B"], t["V"], t["w"], t["W2"], t["b2"], dot_query=t["dq"], dot_key=t["dk"],
                  score_bias=t["bias"], **kwargs)


def reference(t: dict, **kwargs) -> torch.Tensor:
    kwargs = {k: v for k, v in kwargs.items() if k != "block_size"}
    return kernel_reference(t["A"], t["B"], t["V"], t["w"], t["W2"], t["b2"], dot_query=t["dq"], dot_key=t["dk"],
                            score_bias=t["bias"], **kwargs)


def check_against_reference(kernel, t: dict, g: torch.Generator, *, tolerance: float, **kwargs) -> torch.Tensor:
    """Forward and every gradient within ``tolerance`` (relative to each tensor's largest reference value)."""
    out = run(kernel, t, **kwargs)
    ref = reference(t, **kwargs)
    assert out.dtype == t["V"].dtype and out.shape == ref.shape
    scale = max(ref.abs().max().item(), 1.0)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=tolerance * scale)
    grad_out = torch.randn(out.shape, generator=g, dtype=torch.float64)
    names = [name for name in DIFFERENTIABLE if t[name] is not None]
    got = torch.autograd.grad(out, [t[n] for n in names], grad_out.to(out.dtype))
    want = torch.autograd.grad(ref, [t[n] for n in names], grad_out)
    for name, a, b in zip(names, got, want, strict=True):
        assert a.dtype == t[name].dtype and a.shape == t[name].shape, name
        b = b.double()  # the reference's gradients come back in the inputs' dtypes
        scale = max(b.abs().max().item(), 1.0)
        torch.testing.assert_close(a.double(), b, rtol=0, atol=tolerance * scale, msg=lambda m, n=name: f"{n}: {m}")
    return out


def padding_with_a_fully_masked_row(b: int, q_len: int, k_len: int) -> torch.Tensor:
    mask = torch.ones(b, 1, q_len, k_len, dtype=torch.bool)
    mask[1, :, :, : k_len // 3] = False  # left padding
    mask[0, :, 4] = False  # a query that sees nothing
    return mask


CASES = [  # (bias shape, mask, mlp, dot, block): every way a bias broadcasts, with and without masks
    ((1, 3, 11, 13), "causal", "paper", False, (4, 5)),  # T5: one bias for the batch
    ((2, 3, 11, 13), "padding", "paper", True, (8, 8)),  # per example and head
    ((2, 1, 11, 13), "none", "authors", False, (3, 16)),  # per example, shared by the heads
    ((11, 13), "padding", "paper", False, None),  # 2-D: every example and head
    ((2, 1, 1, 13), "causal", "authors", True, (5, 4)),  # per key (a soft padding mask)
    ((1, 3, 11, 1), "none", "paper", False, (4, 4)),  # per query (softmax-invariant: its gradient is 0)
]


@pytest.mark.parametrize("kernel", KERNELS.values(), ids=KERNELS.keys())
@pytest.mark.parametrize("case", CASES, ids=[f"{'x'.join(map(str, c[0]))}-{c[1]}-{c[2]}" for c in CASES])
def test_score_bias_matches_the_reference_forward_and_backward(kernel, case):
    bias_shape, mask_kind, mlp, dot, block = case
    t, g = make_inputs(CASES.index(case), bias_shape=bias_shape, mlp=mlp, dot=dot)
    mask = padding_with_a_fully_masked_row(2, 11, 13) if mask_kind == "padding" else None
    tiled = kernel in (neural_attention_tiled, neural_attention_cpp)  # the others pick their own blocks
    out = check_against_reference(kernel, t, g, tolerance=2e-5, mask=mask, causal=mask_kind == "causal",
                                  dot_scale=0.3, **({"block_size": block} if tiled else {}))
    if mask is not None:  # the query that sees nothing: zero output
        assert torch.equal(out[0, :, 4], torch.zeros_like(out[0, :, 4]))
        if bias_shape[0] == 2 and len(bias_shape) == 4 and bias_shape[2] == 11:  # its own bias row: no gradient
            (dbias,) = torch.autograd.grad(run(kernel, t, mask=mask, dot_scale=0.3).sum(), [t["bias"]])
            assert torch.equal(dbias[0, :, 4], torch.zeros_like(dbias[0, :, 4]))


@pytest.mark.parametrize("kernel", [neural_attention_tiled, pytest.param(neural_attention_cpp, marks=needs_cpp)],
                         ids=["tiled", "cpp"])
def test_score_bias_gradcheck_float64(kernel):
    t, _ = make_inputs(40, b=1, h=2, q_len=5, k_len=6, hidden=3, bias_shape=(1, 2, 5, 6), dtype=torch.float64)
    mask = torch.tensor([[True] * 6, [False] * 6, [True, False] * 3, [True] * 6, [False] * 5 + [True]])

    def f(A, B, V, w, bias):
        return kernel(A, B, V, w, activation="gelu", mask=mask, score_bias=bias, block_size=(2, 4))

    assert torch.autograd.gradcheck(f, (t["A"], t["B"], t["V"], t["w"], t["bias"]))


@pytest.mark.parametrize("bias_dtype", [torch.float32, torch.bfloat16])
def test_score_bias_with_bf16_inputs(bias_dtype):
    """bf16 inputs, fp32 accumulation: within 2e-2 of the float64 reference of the same rounded inputs, forward and
    every gradient; the bias's gradient comes back in the bias's dtype."""
    t, g = make_inputs(41, q_len=33, k_len=40, hidden=8, dot=True, bias_shape=(1, 3, 33, 40),
                       dtype=torch.bfloat16, bias_dtype=bias_dtype)
    check_against_reference(neural_attention_tiled, t, g, tolerance=2e-2, causal=True, block_size=(8, 16))


@pytest.mark.parametrize("kernel", KERNELS.values(), ids=KERNELS.keys())
@pytest.mark.parametrize("fill", [-1e9, torch.finfo(torch.float32).min / 4])
def test_rows_a_large_negative_bias_covers_match_fp32_materialising_attention(kernel, fill):
    # masks written as additive floats (-1e9 for padding) are a real bias to the backend. A row that such values cover
    # entirely has its maximum near -1e9, where adding log(denominator) to it rounds away in fp32: backward must not
    # rebuild the probabilities from a single log-sum-exp. Compared with the materialising computation in fp32, which
    # sees the same rounded scores (a float64 reference would not).
    t, g = make_inputs(45, q_len=6, k_len=9, bias_shape=(2, 1, 6, 9))
    with torch.no_grad():
        t["bias"][0, :, 2] = fill  # a row covered entirely: uniform over its keys, as in the eager path
        t["bias"][1, :, :, :3] = fill  # left padding
    out = run(kernel, t)
    pre = t["A"][:, :, :, None, :] + t["B"][:, :, None, :, :]
    scores = (torch.relu(pre) * t["w"][None, :, None, None, :]).sum(-1) + t["bias"]
    expected = torch.softmax(scores, -1) @ t["V"]
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    grad_out = torch.randn(out.shape, generator=g)
    names = ["A", "B", "V", "w", "bias"]
    got = torch.autograd.grad(out, [t[n] for n in names], grad_out)
    want = torch.autograd.grad(expected, [t[n] for n in names], grad_out)
    for name, a, b in zip(names, got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * max(b.abs().max().item(), 1.0), msg=name)


def test_a_fixed_bias_gets_no_gradient_computed_and_changes_nothing_else():
    # a bias that does not require grad (a float mask, an ALiBi buffer): the backward op computes no bias-sized
    # gradient, and everything else is as with a bias that requires one
    from hf_neural_attention.tiled_neural_attention import tiled_ops

    t, g = make_inputs(46, bias_shape=(2, 3, 11, 13))
    forward_op, backward_op = tiled_ops()
    inputs = [None if t[n] is None else t[n].detach() for n in ("A", "B", "V", "w", "W2", "b2", "dq", "dk")]
    settings = ("relu", True, 1.0, 0.0, torch.tensor(0), [4, 8], 0.0)  # no soft-cap
    out, stats = forward_op(*inputs, None, t["bias"].detach(), None, *settings)  # (None: no attention sinks)
    grad_out = torch.randn(out.shape, generator=g)
    *with_bias, dbias, _ = backward_op(*inputs, None, t["bias"].detach(), None, True, out, stats, grad_out, *settings)
    *fixed, no_dbias, _ = backward_op(*inputs, None, t["bias"].detach(), None, False, out, stats, grad_out, *settings)
    assert dbias.shape == t["bias"].shape and no_dbias.numel() == 0
    assert all(torch.equal(a, b) for a, b in zip(with_bias, fixed, strict=True))
    fixed = dict(t, bias=t["bias"].detach())
    out = run(neural_attention_tiled, fixed, causal=True)
    assert torch.equal(out, run(neural_attention_tiled, t, causal=True))
    names = ["A", "B", "V", "w"]
    grad_out = torch.randn(out.shape, generator=g)
    got = torch.autograd.grad(out, [t[n] for n in names], grad_out)
    want = torch.autograd.grad(run(neural_attention_tiled, t, causal=True), [t[n] for n in names], grad_out)
    for name, a, b in zip(names, got, want, strict=True):
        assert torch.equal(a, b), name


def test_score_bias_input_errors():
    t, _ = make_inputs(42)
    with pytest.raises(ValueError, match=r"score_bias \(1, 3, 11, 12\) does not broadcast to .* \(2, 3, 11, 13\)"):
        run(neural_attention_tiled, dict(t, bias=torch.zeros(1, 3, 11, 12)))
    with pytest.raises(TypeError, match="score_bias must be a floating-point tensor"):
        run(neural_attention_tiled, dict(t, bias=torch.zeros(1, 3, 11, 13, dtype=torch.int64)))
    with pytest.raises(ValueError, match="score_bias must have at most 4 dims"):
        run(neural_attention_tiled, dict(t, bias=torch.zeros(1, 1, 3, 11, 13)))


# --- inside a model: T5's self-attention passes its relative position bias ---------------------------------------
@pytest.mark.parametrize("fused", MODEL_BACKENDS)
def test_a_patched_t5_takes_a_fused_path_and_agrees_with_the_materialising_one(monkeypatch, fused):
    model = patch_model(tiny_t5(), layers=[0, 1, 2, 3], proj_dim=4)  # encoder and decoder self-attention
    g = torch.Generator().manual_seed(fresh_seed(43))
    ids = torch.randint(1, 97, (2, 9), generator=g)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0
    labels = torch.randint(1, 97, (2, 6), generator=g)
    chosen = []
    choose = backend.choose_backend
    monkeypatch.setattr(backend, "choose_backend", lambda *a, **k: chosen.append(choose(*a, **k)) or chosen[-1])

    def loss_and_grads(name: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        set_backend(model, name)
        model.zero_grad()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    eager_loss, eager_grads = loss_and_grads("eager")
    assert set(chosen) == {"eager"}
    # the learned position bias gets its gradient through the fused paths too
    assert any("relative_attention_bias" in name for name in eager_grads)
    chosen.clear()
    loss, grads = loss_and_grads(fused)
    assert "eager" not in chosen and len(chosen) >= 4, chosen
    torch.testing.assert_close(loss, eager_loss, rtol=0, atol=1e-5)
    assert grads.keys() == eager_grads.keys()
    for param, grad in grads.items():  # relative to each gradient's largest entry (some are ~1e-3)
        scale = max(eager_grads[param].abs().max().item(), 1e-3)
        torch.testing.assert_close(grad, eager_grads[param], rtol=0, atol=1e-4 * scale, msg=param)


@pytest.mark.parametrize("fused", MODEL_BACKENDS)
def test_a_patched_t5_generates_the_same_tokens_on_the_fused_path(fused):
    # decoding with a cache: the decoder's position bias is (1, heads, 1, k_len), one query row per step
    model = patch_model(tiny_t5(seed=1), layers=[0, 1, 2, 3], proj_dim=4).eval()
    # fixed inputs, checked for no near-tie between the two best tokens at any step (fresh ones could hold one,
    # where fp32 summation order alone picks the token)
    ids = torch.randint(1, 97, (2, 7), generator=torch.Generator().manual_seed(44))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    tokens = {}
    for name in ("eager", fused):
        set_backend(model, name)
        tokens[name] = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert torch.equal(tokens[fused], tokens["eager"])


def test_a_float_padding_mask_of_minus_1e9_trains_like_eager():
    # transformers' older additive masks use -1e9 for padding: the backend passes such a mask to the kernels as a real
    # bias, and a left-padded causal row then has no visible key but finite scores near -1e9
    from hf_neural_attention import neural_attention_forward
    from tests.models import tiny_gpt2

    model = patch_model(tiny_gpt2(), layers=[0], proj_dim=4)
    module = model.transformer.h[0].attn
    g = torch.Generator().manual_seed(fresh_seed(47))
    query, key, value = (torch.randn(2, module.num_heads, 7, module.head_dim, generator=g).requires_grad_()
                         for _ in range(3))
    visible = torch.ones(2, 1, 7, 7, dtype=torch.bool).tril()
    visible[1, :, :, :3] = False  # left padding: the padded queries see nothing
    mask = torch.zeros(2, 1, 7, 7).masked_fill(~visible, -1e9)
    results = {}
    for name in ("eager", "auto"):
        set_backend(model, name)
        out, _ = neural_attention_forward(module, query, key, value, mask, scaling=module.head_dim**-0.5)
        grads = torch.autograd.grad(out, (query, key, value, *module.neural_scorer.parameters()),
                                    torch.ones_like(out))
        results[name] = (out, grads)
    torch.testing.assert_close(results["auto"][0], results["eager"][0], rtol=0, atol=1e-5)
    for index, (a, b) in enumerate(zip(results["auto"][1], results["eager"][1], strict=True)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * max(b.abs().max().item(), 1.0), msg=f"input {index}")
