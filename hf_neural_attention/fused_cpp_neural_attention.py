"""Fully fused C++ neural attention on CPU (forward and backward), compiled on first use.

``neural_attention_fused_cpp`` implements the kernel contract of ``docs/design.md`` for the common case --
``mlp="paper"``, fp32 arithmetic (bf16 / fp16 inputs are cast), any activation, optional bool mask (any broadcast
strides) or causal, optional residual dot term, optional score bias (broadcast along any dims), optional dropout
(hashed per-query and per-key keys decide, so every pass regenerates the same mask whatever the block size) --
entirely in C++; every other case (``mlp="authors"``, float64, no compiler) is delegated to
:func:`cpp_neural_attention.neural_attention_cpp`.

Layout of the work (flash-attention 2 style, no atomics):

- forward: ``at::parallel_for`` over (batch*heads x query blocks); a block's scores against all the keys it can
  see (``block x k_len`` fp32 scratch per thread, so memory stays O(n * block)) are computed by vectorised loops over
  key positions, the residual dot term and ``P @ V`` by ATen's BLAS (``cpublas::gemm``, single-threaded inside
  the parallel region); softmax in fp32 per row; only the output and each row's maximum and log denominator are
  kept (apart: under a -1e9 bias their sum would round the denominator away);
- backward pass 1, over (batch*heads x query blocks): recomputes ``P``, ``dS = P * (dO V^T - D)``, writes
  ``dA``, ``d dot_query``, per-(group, block) partial ``output_weight`` gradients and, for a score bias that needs
  one, dS itself (its gradient, summed where the bias broadcasts; a bias shared by the batch has this pass run a
  few batch rows at a time, each run adding its dS to the same buffer, which so stays bounded, see
  ``bias_grad_rows``);
- backward pass 2, over (batch*heads x key blocks): recomputes the transposed tile, writes ``dB``, ``dV``,
  ``d dot_key``;
- the weight-gradient partials are summed in a fixed order afterwards: results are bitwise reproducible;
- relu (the paper's activation) instead scores in signed-max form (one max and one add per hidden unit, see
  ``relu_row``) and, when batch*heads >= threads, runs its backward in one pass per (batch, head) group
  (``backward_relu_single_pass``). Which backward runs depends on the thread count, so relu gradients are
  bitwise reproducible for a given thread count and agree to rounding across thread counts.

Causal: a query block only visits keys ``< i1``, a key block only queries ``>= j0``. A row whose keys are all
masked gives zero output and zero gradients.

The C++ source is ``fused_cpp_source_neural_attention.py``; this file builds it, prepares its operands (the relu
signed-max form, visible rows) and wraps it as custom ops and an autograd function.

This file travels with Hub checkpoints: it imports only torch, the standard library and flat siblings.
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor

from .cpp_build_neural_attention import OPENMP_FLAGS, extension_is_built, load_extension
from .cpp_neural_attention import neural_attention_cpp
from .fused_cpp_source_neural_attention import SOURCE as _SOURCE
from .kernels_neural_attention import (
    ACTIVATION_CODES,
    as_4d,
    autocast_off,
    bias_grad_rows,
    check_kernel_inputs,
    check_sinks,
    fold_causal_into_mask,
    fold_sinks,
    keeps_differentiable_inputs,
    kernel_op,
    once_differentiable_always,
    relu_grads,
    relu_signed_max_operands,
    seed_tensor,
    sink_grad,
    sink_rows,
    source_tag,
    sum_to_bias_shape,
    visible_rows,
    weight_grad,
    zero_invisible_rows,
    zero_unseen_operands,
)

__all__ = ["fused_cpp_available", "fused_cpp_is_built", "neural_attention_fused_cpp"]

_FUNCTIONS = ["fused_forward", "fused_backward"]
_PREFIX = "neural_attention_fused_cpu"
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BLOCK = 64

_lock = threading.Lock()
_state: dict = {}


_CFLAGS = _LDFLAGS = OPENMP_FLAGS  # at::parallel_for is serial without OpenMP (see cpp_build_neural_attention)


def _module():
    return load_extension(_PREFIX, _SOURCE, _FUNCTIONS, _state, _lock, _CFLAGS, _LDFLAGS)


@torch.compiler.assume_constant_result  # torch.compile runs it (lock, build) once and keeps the answer
def fused_cpp_available() -> bool:
    """Whether the fused C++ kernel can be used, compiling it on the first call unless it is cached."""
    return _module() is not None


def fused_cpp_is_built() -> bool:
    """Whether the fused C++ kernel is usable without compiling (loaded, or cached on disk). Never compiles."""
    return extension_is_built(_PREFIX, _SOURCE, _state, _CFLAGS + _LDFLAGS)


def _use_single_pass(groups: int) -> bool:
    """relu backward in one pass per (batch, head) group when the groups keep every thread busy; else two passes
    (over query blocks, then key blocks) that parallelise within a group."""
    return groups >= torch.get_num_threads()


# the ops' names carry this file's and the kernel source's hash: a Hub checkpoint's copy of another version must not
# reuse them
_OP_TAG = source_tag(__file__, text=_SOURCE)


def _forward_fake(A, Bt, V, w, dq, dk, mask, bias, cvec, batch, heads, causal, dot_scale, act, block, dropout_p,
                  seed):  # fmt: skip
    return V.new_empty(A.shape[0], A.shape[1], V.shape[2]), V.new_empty(2, A.shape[0], A.shape[1])


@kernel_op(f"fused_cpp_forward_{_OP_TAG}", _forward_fake)
def _fused_forward(
    A: Tensor, Bt: Tensor, V: Tensor, w: Tensor, dq: Tensor | None, dk: Tensor | None, mask: Tensor | None,
    bias: Tensor | None, cvec: Tensor, batch: int, heads: int, causal: bool, dot_scale: float, act: int, block: int,
    dropout_p: float, seed: Tensor,
) -> tuple[Tensor, Tensor]:
    """``(out, stats)``: ``(G, q_len, v_dim)`` and ``(2, G, q_len)`` fp32 (each row's maximum, +inf where it sees no
    key, and log denominator), for ``A`` ``(G, q_len, hidden)``, ``Bt`` ``(G, hidden, k_len)``, ``V``
    ``(G, k_len, v_dim)`` (``G = batch * heads``); ``bias``: a 4-D fp32 score bias ``(batch|1, heads|1, q_len|1,
    k_len|1)``."""
    out, stats = _module().fused_forward(
        A, Bt, V, w, dq, dk, mask, bias, cvec, batch, heads, causal, dot_scale, act, block, dropout_p, int(seed)
    )
    return out, stats


def _backward_fake(A, At, B, Bt, V, w, dq, dk, mask, bias, bias_grad, bias_rows, cvec, stats, dO, D, batch, heads,
                   causal, dot_scale, act, block, dropout_p, seed):  # fmt: skip
    G, q_len, hidden = A.shape
    k_len, v_dim = B.shape[1], V.shape[2]
    dd = dq.shape[-1] if dq is not None else 0
    return (V.new_empty(G, q_len, hidden), V.new_empty(G, k_len, hidden), V.new_empty(G, k_len, v_dim),
            V.new_empty(G, hidden), V.new_empty((G, q_len, dd) if dd else (0,)),
            V.new_empty((G, k_len, dd) if dd else (0,)),
            V.new_empty(min(bias_rows, batch) * heads if bias is not None and bias_grad else 0, q_len,
                        k_len))  # fmt: skip


@kernel_op(f"fused_cpp_backward_{_OP_TAG}", _backward_fake)
def _fused_backward(
    A: Tensor, At: Tensor, B: Tensor, Bt: Tensor, V: Tensor, w: Tensor, dq: Tensor | None, dk: Tensor | None,
    mask: Tensor | None, bias: Tensor | None, bias_grad: bool, bias_rows: int, cvec: Tensor, stats: Tensor, dO: Tensor,
    D: Tensor, batch: int, heads: int, causal: bool, dot_scale: float, act: int, block: int, dropout_p: float,
    seed: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(dA, dB, dV, dw, d dot_query, d dot_key, dS)`` (the dot term's empty without it; ``dS``, empty unless
    ``bias_grad``, is the score bias's gradient before the caller sums it where the bias broadcasts, ``(rows * heads,
    q_len, k_len)``: ``rows = min(bias_rows, batch)`` batch rows per run of the query-side pass, each run adding its
    dS to the last's, see ``bias_grad_rows``); relu returns raw sums instead of ``dA``, ``dB``, ``dw``
    (see :class:`_FusedFunction`). The relu pass count is chosen here, from the thread count at run time (which a
    traced graph cannot read) and the groups one run covers."""
    groups = min(bias_rows, batch) * heads if bias is not None and bias_grad else A.shape[0]
    grads = _module().fused_backward(
        A, At, B, Bt, V, w, dq, dk, mask, bias, bias_grad, bias_rows, cvec, stats, dO, D, batch, heads, causal,
        dot_scale, act, block, _use_single_pass(groups), dropout_p, int(seed),
    )  # fmt: skip
    return tuple(grads)


class _FusedFunction(torch.autograd.Function):
    """Inputs are flattened to G = batch * heads groups: A (G, q_len, K) and Bt (G, K, k_len) for the kernels.

    relu runs in signed-max form (``relu_signed_max_operands``; ``relu_row`` in the C++ source): the kernels get A
    and -B centred and scaled per unit, the signs of w and the per-key constant cvec (G, k_len); their backward
    returns the raw sums sum_j relu'(pre_ij) dS_ij (and over i for B), which this function turns into dA = raw w,
    dB = raw w and, since relu(x) = x relu'(x), dw = sum_i A_i raw_i + sum_j B_j raw_j (``relu_grads``).
    """

    @staticmethod
    @autocast_off
    @keeps_differentiable_inputs  # for the second-derivative error (see once_differentiable_always)
    def forward(ctx, A, B, V, w, dq, dk, bias, sinks, mask, cfg):
        batch, heads, q_len, hidden = A.shape
        k_len, v_dim = B.shape[2], V.shape[3]
        G = batch * heads
        wg = w.reshape(-1, hidden).expand(heads, hidden).unsqueeze(0).expand(batch, heads, hidden)
        wg = wg.reshape(G, hidden).contiguous()
        relu = cfg["act"] == ACTIVATION_CODES["relu"]
        # rows no pair sees are zeroed (garbage there, even NaN, must not reach visible rows or dw)
        q_vis, k_vis = visible_rows(mask, cfg["causal"], q_len, k_len, A.device)
        if relu:
            a, b, sign, ck = relu_signed_max_operands(A, B, w.reshape(-1, hidden), q_vis, k_vis)
            kernel_w = sign.expand(heads, hidden).unsqueeze(0).expand(batch, heads, hidden).reshape(G, hidden)
            Ak, Bk, cvec = a.reshape(G, q_len, hidden), b.reshape(G, k_len, hidden), ck.reshape(G, k_len)
            # (a reshape of a transposed view may stay strided; the C++ side wants contiguous fp32)
            Ak, kernel_w, cvec = Ak.contiguous(), kernel_w.contiguous(), cvec.contiguous()
        else:
            Af = zero_invisible_rows(A, q_vis).reshape(G, q_len, hidden)
            Bf = zero_invisible_rows(B, k_vis).reshape(G, k_len, hidden)
            cvec = wg.new_empty(0)
            kernel_w, Ak, Bk = wg, Af.contiguous(), Bf
        Bt = Bk.transpose(1, 2).contiguous()
        V, dq, dk = zero_unseen_operands(V, dq, dk, q_vis, k_vis)
        Vf = V.reshape(G, k_len, v_dim).contiguous()
        dqf = dq.reshape(G, q_len, -1).contiguous() if dq is not None else None
        dkf = dk.reshape(G, k_len, -1).contiguous() if dk is not None else None
        out, stats = _fused_forward(
            Ak, Bt, Vf, kernel_w, dqf, dkf, mask, bias, cvec, batch, heads, cfg["causal"], cfg["dot_scale"],
            cfg["act"], cfg["block"], cfg["dropout_p"], cfg["seed"],
        )  # fmt: skip
        sink = None
        if sinks is not None:  # on the host, O(n): the kernel's backward then recomputes sink-inclusive probabilities
            sink = sink_rows(sinks, batch, heads, q_len)
            out, row_max, log_denom = fold_sinks(out, stats[0], stats[1], sink)
            stats = torch.stack([row_max, log_denom])
        ctx.cfg = cfg
        ctx.shape = (batch, heads, q_len, k_len, hidden, v_dim)
        ctx.sinks_shape = None if sinks is None else sinks.shape
        ctx.save_for_backward(Ak, Bt, Vf, kernel_w, dqf, dkf, mask, bias, out, stats, w, cvec, A, B, q_vis, k_vis,
                              sink)  # fmt: skip
        ctx.dot_shapes = (dq.shape if dq is not None else None, dk.shape if dk is not None else None)
        return out.view(batch, heads, q_len, v_dim)

    @staticmethod
    @once_differentiable_always  # the C++ backward is not differentiable: a second derivative must raise
    @autocast_off
    def backward(ctx, grad_out):
        Ak, Bt, Vf, kernel_w, dqf, dkf, mask, bias, out, stats, w, cvec, A, B, q_vis, k_vis, sink = ctx.saved_tensors
        bias_grad = bias is not None and ctx.needs_input_grad[6]  # no (G, q_len, k_len) buffer for a fixed bias
        cfg = ctx.cfg
        batch, heads, q_len, k_len, hidden, v_dim = ctx.shape
        G = batch * heads
        dO = grad_out.reshape(G, q_len, v_dim).to(torch.float32).contiguous()
        D = (dO * out).sum(-1).contiguous()
        At = Ak.transpose(1, 2).contiguous()
        Bk = Bt.transpose(1, 2).contiguous()
        rows = bias_grad_rows(batch, heads, q_len, k_len, bias.shape) if bias_grad else batch
        dA, dB, dV, dw, ddq, ddk, dS = _fused_backward(
            Ak, At, Bk, Bt, Vf, kernel_w, dqf, dkf, mask, bias, bias_grad, rows, cvec, stats, dO, D, batch, heads,
            cfg["causal"], cfg["dot_scale"], cfg["act"], cfg["block"], cfg["dropout_p"], cfg["seed"],
        )  # fmt: skip
        if cfg["act"] == ACTIVATION_CODES["relu"]:  # raw sums -> gradients (see the class docstring)
            raw_q, raw_k = dA.view(batch, heads, q_len, hidden), dB.view(batch, heads, k_len, hidden)
            dA, dB, dw = relu_grads(A, B, raw_q, raw_k, w.reshape(-1, hidden), q_vis, k_vis)
        dw = weight_grad(dw.reshape(G, hidden), batch, heads, w.shape, dw.dtype)
        dq_shape, dk_shape = ctx.dot_shapes
        ddq_o = ddq.view(dq_shape) if dq_shape is not None else None
        ddk_o = ddk.view(dk_shape) if dk_shape is not None else None
        dbias = sum_to_bias_shape(dS.view(-1, heads, q_len, k_len), bias.shape) if bias_grad else None
        dsinks = None
        if sink is not None and ctx.needs_input_grad[7]:
            dsinks = sink_grad(sink, stats[0], stats[1], D, ctx.sinks_shape, batch)
        return (
            dA.view(batch, heads, q_len, hidden),
            dB.view(batch, heads, k_len, hidden),
            dV.view(batch, heads, k_len, v_dim),
            dw,
            ddq_o,
            ddk_o,
            dbias,
            dsinks,
            None,
            None,
        )


def neural_attention_fused_cpp(
    query_hidden: Tensor,
    key_hidden: Tensor,
    value: Tensor,
    output_weight: Tensor,
    second_weight: Tensor | None = None,
    second_bias: Tensor | None = None,
    *,
    activation: str = "relu",
    mask: Tensor | None = None,
    causal: bool = False,
    dot_query: Tensor | None = None,
    dot_key: Tensor | None = None,
    dot_scale: float = 1.0,
    dropout_p: float = 0.0,
    generator_seed: int | Tensor | None = None,
    score_bias: Tensor | None = None,
    sinks: Tensor | None = None,
    softcap: float | None = None,
) -> Tensor:
    """The kernel contract of ``docs/design.md``, fully fused in C++ for ``mlp="paper"`` (fp32 arithmetic for fp32 /
    bf16 / fp16 inputs, dropout and a ``score_bias`` included); every other case, a ``softcap`` included, runs
    :func:`cpp_neural_attention.neural_attention_cpp` (tiled, the MLP in C++).

    A ``score_bias`` (float, broadcastable to ``(b, h, q_len, k_len)``) is read in fp32 (a copy where it is not) and
    added to each score row; its gradient, when it requires one, is dS, written whole (``(b * h, q_len, k_len)``
    fp32, or ``bias_grad_rows`` batch rows at a time for a bias shared by the batch) and summed where the bias
    broadcasts. ``sinks`` (attention sinks, ``(b|1, h|1, q_len|1, 1)``) are folded into each row's finished softmax
    on the host (`fold_sinks`), and get their gradient there.

    Shapes: ``query_hidden`` ``(b, h, q_len, hidden)``, ``key_hidden`` ``(b, h, k_len, hidden)``, ``value``
    ``(b, h, k_len, v_dim)`` -> ``(b, h, q_len, v_dim)``.
    """

    def delegate():
        return neural_attention_cpp(
            query_hidden, key_hidden, value, output_weight, second_weight, second_bias,
            activation=activation, mask=mask, causal=causal, dot_query=dot_query, dot_key=dot_key,
            dot_scale=dot_scale, dropout_p=dropout_p, generator_seed=generator_seed, score_bias=score_bias,
            sinks=sinks, softcap=softcap,
        )  # fmt: skip

    # shapes, dtypes of masks and the dropout range (ValueError / TypeError); the delegated call above checks its own
    output_weight, second_weight, second_bias = check_kernel_inputs(
        query_hidden, key_hidden, value, output_weight, second_weight, second_bias, activation, mask, dot_query,
        dot_key, dropout_p, score_bias,
    )  # fmt: skip
    batch, heads, q_len, _ = query_hidden.shape
    k_len = key_hidden.shape[2]
    check_sinks(sinks, batch, heads, q_len)
    tensors = [query_hidden, key_hidden, value, output_weight, dot_query, dot_key, score_bias, sinks]
    if (
        second_weight is not None  # the authors' MLP
        or softcap is not None  # logit soft-capping (Gemma 2): the tiled loop has it
        or any(t is not None and (t.dtype not in _FLOAT_DTYPES or t.device.type != "cpu") for t in tensors)
        or q_len == 0
        or k_len == 0
        or batch * heads == 0
        or not fused_cpp_available()
    ):
        return delegate()
    mask, causal = fold_causal_into_mask(mask, causal, q_len, k_len)
    if mask is not None:
        mask = as_4d(mask).expand(batch, heads, q_len, k_len)  # raises if not broadcastable; strides may be 0
    cfg = {
        "causal": bool(causal),
        "dot_scale": float(dot_scale),
        "act": ACTIVATION_CODES[activation],
        "block": BLOCK,
        "dropout_p": float(dropout_p),
        # the pair's keep decision hashes (seed, index): a 63-bit seed, drawn from torch's generator when not given
        "seed": seed_tensor(dropout_p, generator_seed),
    }
    # bf16 / fp16 (autocast) inputs run in fp32, the precision every backend accumulates in: the casts are O(n d),
    # the attention O(n^2); gradients flow back through them in the inputs' dtypes
    fp32 = [None if t is None else t.float() for t in tensors]
    if score_bias is not None:  # 4-D: the kernel reads a broadcast dim with stride 0
        fp32[6] = as_4d(fp32[6])
    out = _FusedFunction.apply(*fp32, mask, cfg)  # (fp32 ends with the score bias and the sinks)
    return out.to(value.dtype)
