"""Fused Triton GPU backend for Neural Attention (arXiv 2502.17206).

Implements the KERNEL CONTRACT of ``docs/design.md``::

    neural_attention_triton(query_hidden, key_hidden, value, output_weight,
                            second_weight=None, second_bias=None, *, activation="relu",
                            mask=None, causal=False, dot_query=None, dot_key=None,
                            dot_scale=1.0, dropout_p=0.0, generator_seed=None) -> Tensor

as a ``torch.autograd.Function`` with Triton forward and backward kernels (flash-attention style):

* forward: grid (query block, batch*heads); loop over key blocks; the per-pair MLP is evaluated on the
  (BLOCK_M, BLOCK_N) tile from the low-rank projections ``A`` (query side) and ``B`` (key side); online
  softmax in fp32; only ``O`` and the per-row log-sum-exp are stored (memory O(n * block)).
* backward: scores are recomputed tile by tile. Split scheme: one kernel over key blocks produces
  dB / dV / dK and per-program partial sums of the scorer-weight gradients (one slot per (batch*head,
  key block)); one kernel over query blocks produces dA / dQ. The partial sums are reduced in a fixed order
  with torch afterwards: no atomics, so two backward runs are bitwise identical.
* dropout: ``tl.rand(seed, (bh * q_len + i) * k_len + j)``; backward regenerates the same mask.

This file travels with Hub checkpoints: it imports only torch, stdlib, its flat sibling
``kernels_neural_attention`` and (optionally) triton, and importing it never fails when triton is missing
(``TRITON_AVAILABLE`` is then False).
"""

from __future__ import annotations

import math
import os

import torch

from .kernels_neural_attention import relu_weight_grad

try:  # triton is optional: importing this module must never fail without it
    import triton
    import triton.language as tl

    TRITON_AVAILABLE = True
except ImportError:  # pragma: no cover - exercised only on machines without triton
    triton = None
    tl = None
    TRITON_AVAILABLE = False

__all__ = ["TRITON_AVAILABLE", "neural_attention_triton", "triton_is_usable"]

_ACTIVATIONS = {"relu": 0, "gelu": 1, "silu": 2, "tanh": 3}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_is_usable(tensor: torch.Tensor | None = None) -> bool:
    """True when triton is importable and ``tensor`` lives on CUDA (or TRITON_INTERPRET=1 is set)."""
    if not TRITON_AVAILABLE:
        return False
    if _interpreting():
        return True
    if tensor is None:
        return torch.cuda.is_available()
    return tensor.is_cuda


# ----------------------------------------------------------------------------------------------------------
# Triton kernels
#
# Shapes inside a program: a tile is (BLOCK_M query rows) x (BLOCK_N key columns); A / B are the contiguous
# (batch*heads, len, HID) projections, per-head weights are read at W + h * w_hs (w_hs = 0 when shared).
# The three kernels share one leading argument list (tensors, lengths, strides, scalars: see `_launch_args`)
# and one set of constexprs. Argument lists are kept on few lines on purpose (`ruff format` would explode them).
# ----------------------------------------------------------------------------------------------------------
# fmt: off

if TRITON_AVAILABLE:

    @triton.jit
    def _act_fwd(x, ACT: tl.constexpr):
        if ACT == 0:
            y = tl.maximum(x, 0.0)
        elif ACT == 1:  # exact (erf) GELU, like torch.nn.functional.gelu's default
            y = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
        elif ACT == 2:
            y = x * tl.sigmoid(x)
        else:  # tanh(x) = 2 sigmoid(2x) - 1 (no tl.tanh in the portable language / interpreter)
            y = 2.0 * tl.sigmoid(2.0 * x) - 1.0
        return y

    @triton.jit
    def _act_fwd_bwd(x, ACT: tl.constexpr):
        """Returns (act(x), act'(x))."""
        if ACT == 0:
            y = tl.maximum(x, 0.0)
            dy = tl.where(x > 0.0, 1.0, 0.0)
        elif ACT == 1:
            cdf = 0.5 * (1.0 + tl.erf(x * 0.7071067811865476))
            y = x * cdf
            dy = cdf + x * 0.3989422804014327 * tl.exp(-0.5 * x * x)
        elif ACT == 2:
            sg = tl.sigmoid(x)
            y = x * sg
            dy = sg * (1.0 + x * (1.0 - sg))
        else:
            y = 2.0 * tl.sigmoid(2.0 * x) - 1.0
            dy = 1.0 - y * y
        return y, dy

    @triton.jit
    def _mm(a, b, DOT_DTYPE: tl.constexpr, UPCAST: tl.constexpr):
        """a @ b with operands rounded to DOT_DTYPE (fp32 accumulation).

        UPCAST (interpreter only): the interpreter's tl.dot mishandles bf16 operands, so they are rounded to
        DOT_DTYPE and multiplied in fp32 -- numerically what the tensor cores do.
        """
        a = a.to(DOT_DTYPE)
        b = b.to(DOT_DTYPE)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        return tl.dot(a, b, input_precision="ieee")

    # ---------------------------------------------------------------------------------------- tile access
    @triton.jit
    def _tile_ptrs(base, offs, L, stride, C: tl.constexpr, CP: tl.constexpr):
        """Pointers to rows ``offs`` of an (L, C) matrix (row stride ``stride``), padded to CP columns; + bounds."""
        offs_c = tl.arange(0, CP)
        return base + offs[:, None] * stride + offs_c[None, :], (offs[:, None] < L) & (offs_c[None, :] < C)

    @triton.jit
    def _load_tile(base, offs, L, stride, C: tl.constexpr, CP: tl.constexpr):
        """(len(offs), CP) tile in the tensor's dtype; zeros out of bounds."""
        ptrs, ok = _tile_ptrs(base, offs, L, stride, C, CP)
        return tl.load(ptrs, mask=ok, other=0.0)

    @triton.jit
    def _load_dot_tile(base, offs, L, stride, ROWS: tl.constexpr, DD: tl.constexpr, DDP: tl.constexpr,
                       HAS_DOT: tl.constexpr):
        """Rows of dot_query / dot_key (zeros, never used, without the residual dot term)."""
        if HAS_DOT:
            x = _load_tile(base, offs, L, stride, DD, DDP)
        else:
            x = tl.zeros((ROWS, DDP), dtype=base.dtype.element_ty)
        return x

    @triton.jit
    def _store_tile(base, offs, L, stride, x, C: tl.constexpr, CP: tl.constexpr):
        ptrs, ok = _tile_ptrs(base, offs, L, stride, C, CP)
        tl.store(ptrs, x.to(base.dtype.element_ty), mask=ok)

    @triton.jit
    def _load_col(base, offs, L, col, HID: tl.constexpr, COL_MAJOR: tl.constexpr):
        """Column ``col`` (zeros from HID on) at rows ``offs`` of an (L, HID) matrix stored row- or column-major."""
        ok = offs < L * (col < HID)  # (a scalar test: the interpreter's col may be a plain int)
        if COL_MAJOR:  # contiguous: one wide load per thread instead of a stride-HID gather
            x = tl.load(base + col * L + offs, mask=ok, other=0.0)
        else:
            x = tl.load(base + offs * HID + col, mask=ok, other=0.0)
        return x.to(tl.float32)

    @triton.jit
    def _row_stats(LSE, Delta, bh, offs_m, Lq):
        """(log-sum-exp, delta = rowsum(dO * O)) of the query rows ``offs_m``; +inf / 0 out of bounds."""
        m_ok = offs_m < Lq
        return (tl.load(LSE + bh * Lq + offs_m, mask=m_ok, other=float("inf")),
                tl.load(Delta + bh * Lq + offs_m, mask=m_ok, other=0.0))

    @triton.jit
    def _head_bases(A, B, V, W, W2, B2, DQ, DK, Mask, H, Lq, Lk, svb, svh, sqb, sqh, skb, skh, smb, smh,
                    w_hs, w2_hs, b2_hs, HID: tl.constexpr):
        """(bh, b, h) of this program (axis 1 = batch*heads) and the per-(batch, head) base pointers."""
        bh = tl.program_id(1).to(tl.int64)
        b = bh // H
        h = bh % H
        return (bh, b, h, A + bh * Lq * HID, B + bh * Lk * HID, V + b * svb + h * svh, W + h * w_hs, W2 + h * w2_hs,
                B2 + h * b2_hs, DQ + b * sqb + h * sqh, DK + b * skb + h * skh, Mask + b * smb + h * smh)

    # ---------------------------------------------------------------------------------------- per-pair MLP
    @triton.jit
    def _paper_pre(A_base, B_base, offs_m, offs_n, Lq, Lk, m, HID: tl.constexpr, COL_MAJOR: tl.constexpr):
        """Hidden unit m before the activation on the tile: A[i, m] + B[j, m], (BM, BN); zeros for m >= HID."""
        return (_load_col(A_base, offs_m, Lq, m, HID, COL_MAJOR)[:, None]
                + _load_col(B_base, offs_n, Lk, m, HID, COL_MAJOR)[None, :])

    @triton.jit
    def _authors_h1(A_base, B_base, offs_m, offs_n, Lq, Lk, HID: tl.constexpr, HIDP: tl.constexpr):
        """Authors' first layer on the tile: relu(A_i + B_j), (BM, BN, HIDP)."""
        a = _load_tile(A_base, offs_m, Lq, HID, HID, HIDP).to(tl.float32)
        b = _load_tile(B_base, offs_n, Lk, HID, HID, HIDP).to(tl.float32)
        return tl.maximum(a[:, None, :] + b[None, :, :], 0.0)

    @triton.jit
    def _authors_z(h1, W2_base, B2_base, r, HID: tl.constexpr, HIDP: tl.constexpr):
        """Authors' second layer, unit r, before its relu: (z_r = W2[r] . h1 + b2[r]  (BM, BN), W2[r]  (HIDP,))."""
        offs_h = tl.arange(0, HIDP)
        w2r = tl.load(W2_base + r * HID + offs_h, mask=offs_h < HID, other=0.0).to(tl.float32)
        return tl.sum(h1 * w2r[None, None, :], axis=2) + tl.load(B2_base + r).to(tl.float32), w2r

    @triton.jit
    def _tile_scores(A_base, B_base, W_base, W2_base, B2_base, q, k, offs_m, offs_n, Lq, Lk, dot_scale,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HID: tl.constexpr, HIDP: tl.constexpr,
                     HID2: tl.constexpr, AUTHORS: tl.constexpr, ACT: tl.constexpr, HAS_DOT: tl.constexpr,
                     DOT_DTYPE: tl.constexpr, UPCAST: tl.constexpr, UNROLL: tl.constexpr, COL_MAJOR: tl.constexpr):
        """Unmasked fp32 scores of the (BM, BN) tile: per-pair MLP (paper / authors) + dot_scale * q @ k^T."""
        s = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if AUTHORS:
            h1 = _authors_h1(A_base, B_base, offs_m, offs_n, Lq, Lk, HID, HIDP)
            for r in tl.static_range(HID2):
                z, _w2r = _authors_z(h1, W2_base, B2_base, r, HID, HIDP)
                s += tl.load(W_base + r).to(tl.float32) * tl.maximum(z, 0.0)
        else:
            # a runtime loop, UNROLL units per iteration: fully unrolled, the hoisted column loads spill registers;
            # units m >= HID (the last iteration's tail) have w = 0 and zero inputs
            for m0 in range(0, HID, UNROLL):
                for u in tl.static_range(UNROLL):
                    m = m0 + u
                    s += tl.load(W_base + m, mask=m < HID, other=0.0).to(tl.float32) * _act_fwd(
                        _paper_pre(A_base, B_base, offs_m, offs_n, Lq, Lk, m, HID, COL_MAJOR), ACT)
        if HAS_DOT:
            s += dot_scale * _mm(q, tl.trans(k), DOT_DTYPE, UPCAST)
        return s

    @triton.jit
    def _tile_mask(offs_m, offs_n, Lq, Lk, Mask_base, smq, smk, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr):
        """True where query i may attend key j: in bounds, causal (j <= i), bool mask."""
        valid = (offs_m[:, None] < Lq) & (offs_n[None, :] < Lk)
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None])
        if HAS_MASK:
            mv = tl.load(Mask_base + offs_m[:, None] * smq + offs_n[None, :] * smk, mask=valid, other=0)
            valid = valid & (mv != 0)
        return valid

    @triton.jit
    def _masked(x, fill, start_m, start_n, offs_m, offs_n, Lq, Lk, Mask_base, smq, smk, CAUSAL: tl.constexpr,
                HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """x with ``fill`` where query i may not attend key j. Tiles wholly inside both lengths and below the
        causal diagonal (the bulk of a long sequence) skip the mask arithmetic: a scalar test per tile."""
        if HAS_MASK:
            x = tl.where(_tile_mask(offs_m, offs_n, Lq, Lk, Mask_base, smq, smk, CAUSAL, HAS_MASK), x, fill)
        else:
            partial = (start_m + BLOCK_M > Lq) | (start_n + BLOCK_N > Lk)
            if CAUSAL:
                partial = partial | (start_n + BLOCK_N - 1 > start_m)
            if partial:
                x = tl.where(_tile_mask(offs_m, offs_n, Lq, Lk, Mask_base, smq, smk, CAUSAL, HAS_MASK), x, fill)
        return x

    @triton.jit
    def _dropout_keep(seed, bh, offs_m, offs_n, Lq, Lk, dropout_p):
        """Dropout keep-mask of the tile from tl.rand(seed, (bh * Lq + i) * Lk + j) (same in forward and backward)."""
        rows = bh * Lq + offs_m.to(tl.int64)
        lin = rows[:, None] * Lk + offs_n[None, :].to(tl.int64)
        return tl.rand(seed, lin) >= dropout_p

    @triton.jit
    def _tile_probs_grad(A_base, B_base, W_base, W2_base, B2_base, Mask_base, smq, smk, q, k, v, do, lse, delta,
                         start_m, start_n, offs_m, offs_n, Lq, Lk, bh, dot_scale, dropout_p, dropout_scale, seed,
                         HID: tl.constexpr, HIDP: tl.constexpr, HID2: tl.constexpr, AUTHORS: tl.constexpr,
                         ACT: tl.constexpr, HAS_DOT: tl.constexpr, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr,
                         DROPOUT: tl.constexpr, DOT_DTYPE: tl.constexpr, UPCAST: tl.constexpr,
                    UNROLL: tl.constexpr, COL_MAJOR: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """Recompute P of one tile from the stored log-sum-exp; return (P after dropout, dS = dL/dscores)."""
        s = _tile_scores(A_base, B_base, W_base, W2_base, B2_base, q, k, offs_m, offs_n, Lq, Lk, dot_scale,
                         BLOCK_M, BLOCK_N, HID, HIDP, HID2, AUTHORS, ACT, HAS_DOT, DOT_DTYPE, UPCAST, UNROLL, COL_MAJOR)
        # rows with no visible key (and rows past Lq) have lse = +inf: p = 0 there without a mask
        s = _masked(s, float("-inf"), start_m, start_n, offs_m, offs_n, Lq, Lk, Mask_base, smq, smk, CAUSAL,
                    HAS_MASK, BLOCK_M, BLOCK_N)  # before exp: scores of padded keys may be large
        p = tl.exp(s - lse[:, None])
        dp = _mm(do, tl.trans(v), DOT_DTYPE, UPCAST)
        if DROPOUT:
            keep = _dropout_keep(seed, bh, offs_m, offs_n, Lq, Lk, dropout_p)
            pd = tl.where(keep, p * dropout_scale, 0.0)
            dp = tl.where(keep, dp * dropout_scale, 0.0)
        else:
            pd = p
        ds = p * (dp - delta[:, None])
        return pd, ds

    @triton.jit
    def _tile_mlp_backward(ds, A_base, B_base, W_base, W2_base, B2_base, offs_m, offs_n, Lq, Lk, da, db, dw, dw2, db2,
                           HID: tl.constexpr, HIDP: tl.constexpr, HID2: tl.constexpr, HID2P: tl.constexpr,
                           AUTHORS: tl.constexpr, ACT: tl.constexpr, NEED_DA: tl.constexpr, NEED_DB: tl.constexpr,
                           NEED_DW: tl.constexpr, UNROLL: tl.constexpr, COL_MAJOR: tl.constexpr):
        """Back-propagate dS of a tile through the per-pair MLP, accumulating into the given accumulators.

        da: (BM, HIDP), db: (BN, HIDP); dw: (HIDP,) [paper] / (HID2P,) [authors, w3];
        dw2: (HID2P, HIDP) and db2: (HID2P,) [authors only]. Returns (da, db, dw, dw2, db2).
        Paper MLP with relu: da / db are without the w_m factor and dw stays untouched (see `_relu_grads`).
        """
        offs_h = tl.arange(0, HIDP)
        if AUTHORS:
            offs_r = tl.arange(0, HID2P)
            h1 = _authors_h1(A_base, B_base, offs_m, offs_n, Lq, Lk, HID, HIDP)
            dh1 = tl.zeros_like(h1)
            for r in tl.static_range(HID2):
                z, w2r = _authors_z(h1, W2_base, B2_base, r, HID, HIDP)
                g = tl.where(z > 0.0, ds * tl.load(W_base + r).to(tl.float32), 0.0)  # dL/dz_r
                if NEED_DW:
                    dw += tl.where(offs_r == r, tl.sum(tl.sum(ds * tl.maximum(z, 0.0), axis=1), axis=0), 0.0)
                    db2 += tl.where(offs_r == r, tl.sum(tl.sum(g, axis=1), axis=0), 0.0)
                    row = tl.sum(tl.sum(g[:, :, None] * h1, axis=1), axis=0)  # (HIDP,)
                    dw2 += tl.where(offs_r[:, None] == r, row[None, :], 0.0)
                if NEED_DA or NEED_DB:
                    dh1 += g[:, :, None] * w2r[None, None, :]
            if NEED_DA or NEED_DB:
                dpre = tl.where(h1 > 0.0, dh1, 0.0)
                if NEED_DA:
                    da += tl.sum(dpre, axis=1)
                if NEED_DB:
                    db += tl.sum(dpre, axis=0)
        else:
            for m0 in range(0, HID, UNROLL):  # as in _tile_scores; tail units (m >= HID) land in padded columns
                for u in tl.static_range(UNROLL):
                    m = m0 + u
                    pre = _paper_pre(A_base, B_base, offs_m, offs_n, Lq, Lk, m, HID, COL_MAJOR)
                    if ACT == 0:
                        # relu: da / db leave out the factor w_m and no dw is reduced here; the host applies w_m
                        # and gets dw_m = sum_ij relu'(pre) ds (A_im + B_jm) from them (relu(x) = x relu'(x))
                        dpre = tl.where(pre > 0.0, ds, 0.0)
                    else:
                        f, fp = _act_fwd_bwd(pre, ACT)
                        if NEED_DW:
                            dw += tl.where(offs_h == m, tl.sum(tl.sum(ds * f, axis=1), axis=0), 0.0)
                        dpre = ds * (tl.load(W_base + m, mask=m < HID, other=0.0).to(tl.float32) * fp)
                    if NEED_DA:
                        da += tl.where(offs_h[None, :] == m, tl.sum(dpre, axis=1)[:, None], 0.0)
                    if NEED_DB:
                        db += tl.where(offs_h[None, :] == m, tl.sum(dpre, axis=0)[:, None], 0.0)
        return da, db, dw, dw2, db2

    # ---------------------------------------------------------------------------------------- kernels
    @triton.jit
    def _fwd_kernel(A, B, V, W, W2, B2, DQ, DK, Mask, H, Lq, Lk, svb, svh, svl, sqb, sqh, sql, skb, skh, skl,
                    smb, smh, smq, smk, w_hs, w2_hs, b2_hs, dot_scale, dropout_p, dropout_scale, seed,
                    Out, LSE, sob, soh, sol,
                    HID: tl.constexpr, HIDP: tl.constexpr, HID2: tl.constexpr, HID2P: tl.constexpr,
                    AUTHORS: tl.constexpr, ACT: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr,
                    DD: tl.constexpr, DDP: tl.constexpr, HAS_DOT: tl.constexpr, HAS_MASK: tl.constexpr,
                    CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, DOT_DTYPE: tl.constexpr, UPCAST: tl.constexpr,
                    UNROLL: tl.constexpr, COL_MAJOR: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """Forward. Grid (cdiv(Lq, BLOCK_M), batch*heads): one program per BLOCK_M query rows of one head.

        Loops over key blocks (causal: only up to the diagonal) with an online fp32 softmax. Writes Out
        (batch, heads, Lq, DV) in Out's dtype and LSE (batch*heads, Lq) fp32 (+inf for rows with no visible key).
        """
        pid_m = tl.program_id(0)
        bh, b, h, A_base, B_base, V_base, W_base, W2_base, B2_base, DQ_base, DK_base, Mask_base = _head_bases(
            A, B, V, W, W2, B2, DQ, DK, Mask, H, Lq, Lk, svb, svh, sqb, sqh, skb, skh, smb, smh, w_hs, w2_hs, b2_hs,
            HID)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        q = _load_dot_tile(DQ_base, offs_m, Lq, sql, BLOCK_M, DD, DDP, HAS_DOT)

        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, DVP), dtype=tl.float32)
        hi = Lk
        if CAUSAL:  # tiles entirely above the diagonal are skipped
            hi = tl.minimum(Lk, (pid_m + 1) * BLOCK_M)
        for start_n in range(0, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            k = _load_dot_tile(DK_base, offs_n, Lk, skl, BLOCK_N, DD, DDP, HAS_DOT)
            s = _tile_scores(A_base, B_base, W_base, W2_base, B2_base, q, k, offs_m, offs_n, Lq, Lk, dot_scale,
                             BLOCK_M, BLOCK_N, HID, HIDP, HID2, AUTHORS, ACT, HAS_DOT, DOT_DTYPE, UPCAST, UNROLL,
                             COL_MAJOR)
            s = _masked(s, float("-inf"), pid_m * BLOCK_M, start_n, offs_m, offs_n, Lq, Lk, Mask_base, smq, smk,
                        CAUSAL, HAS_MASK, BLOCK_M, BLOCK_N)
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if DROPOUT:
                keep = _dropout_keep(seed, bh, offs_m, offs_n, Lq, Lk, dropout_p)
                p = tl.where(keep, p * dropout_scale, 0.0)
            v = _load_tile(V_base, offs_n, Lk, svl, DV, DVP)
            acc = acc * alpha[:, None] + _mm(p, v, DOT_DTYPE, UPCAST)
            m_i = m_new

        has_any = l_i > 0.0
        m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
        out = tl.where(has_any[:, None], acc / tl.where(has_any, l_i, 1.0)[:, None], 0.0)
        lse = tl.where(has_any, m_safe + tl.log(tl.where(has_any, l_i, 1.0)), float("inf"))
        tl.store(LSE + bh * Lq + offs_m, lse, mask=offs_m < Lq)
        _store_tile(Out + b * sob + h * soh, offs_m, Lq, sol, out, DV, DVP)

    @triton.jit
    def _bwd_kv_kernel(A, B, V, W, W2, B2, DQ, DK, Mask, H, Lq, Lk, svb, svh, svl, sqb, sqh, sql, skb, skh, skl,
                       smb, smh, smq, smk, w_hs, w2_hs, b2_hs, dot_scale, dropout_p, dropout_scale, seed,
                       DO, sdob, sdoh, sdol, LSE, Delta, dB, dV, dDK, dW_part, dW2_part, dB2_part, n_blocks_n,
                       HID: tl.constexpr, HIDP: tl.constexpr, HID2: tl.constexpr, HID2P: tl.constexpr,
                       AUTHORS: tl.constexpr, ACT: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr,
                       DD: tl.constexpr, DDP: tl.constexpr, HAS_DOT: tl.constexpr, HAS_MASK: tl.constexpr,
                       CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, DOT_DTYPE: tl.constexpr, UPCAST: tl.constexpr,
                    UNROLL: tl.constexpr, COL_MAJOR: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """Backward, key side. Grid (n_blocks_n = cdiv(Lk, BLOCK_N), batch*heads): one program per key block.

        Loops over query blocks (causal: from the diagonal on), recomputing P. Writes fp32 dB (batch*heads, Lk,
        HID), dV (.., Lk, DV), dDK (.., Lk, DD; residual dot term only) and, in slot bh * n_blocks_n + n, this
        program's partial weight gradients: dW_part (HID [paper] / HID2 [authors]), dW2_part (HID2, HID) and
        dB2_part (HID2) [authors only].
        """
        pid_n = tl.program_id(0)
        bh, b, h, A_base, B_base, V_base, W_base, W2_base, B2_base, DQ_base, DK_base, Mask_base = _head_bases(
            A, B, V, W, W2, B2, DQ, DK, Mask, H, Lq, Lk, svb, svh, sqb, sqh, skb, skh, smb, smh, w_hs, w2_hs, b2_hs,
            HID)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        v = _load_tile(V_base, offs_n, Lk, svl, DV, DVP)
        k = _load_dot_tile(DK_base, offs_n, Lk, skl, BLOCK_N, DD, DDP, HAS_DOT)

        dv = tl.zeros((BLOCK_N, DVP), dtype=tl.float32)
        dk = tl.zeros((BLOCK_N, DDP), dtype=tl.float32)
        db = tl.zeros((BLOCK_N, HIDP), dtype=tl.float32)
        da_unused = tl.zeros((BLOCK_M, HIDP), dtype=tl.float32)
        if AUTHORS:
            dw = tl.zeros((HID2P,), dtype=tl.float32)
        else:
            dw = tl.zeros((HIDP,), dtype=tl.float32)
        dw2 = tl.zeros((HID2P, HIDP), dtype=tl.float32)
        db2 = tl.zeros((HID2P,), dtype=tl.float32)

        lo = 0
        if CAUSAL:  # query blocks entirely above the diagonal see none of these keys
            lo = ((pid_n * BLOCK_N) // BLOCK_M) * BLOCK_M
        for start_m in range(lo, Lq, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            q = _load_dot_tile(DQ_base, offs_m, Lq, sql, BLOCK_M, DD, DDP, HAS_DOT)
            do = _load_tile(DO + b * sdob + h * sdoh, offs_m, Lq, sdol, DV, DVP)
            lse, delta = _row_stats(LSE, Delta, bh, offs_m, Lq)
            pd, ds = _tile_probs_grad(A_base, B_base, W_base, W2_base, B2_base, Mask_base, smq, smk, q, k, v, do, lse,
                                      delta, start_m, pid_n * BLOCK_N,
                                      offs_m, offs_n, Lq, Lk, bh, dot_scale, dropout_p, dropout_scale, seed,
                                      HID, HIDP, HID2, AUTHORS, ACT, HAS_DOT, HAS_MASK, CAUSAL, DROPOUT, DOT_DTYPE,
                                      UPCAST, UNROLL, COL_MAJOR, BLOCK_M, BLOCK_N)
            dv += _mm(tl.trans(pd), do, DOT_DTYPE, UPCAST)
            if HAS_DOT:
                dk += _mm(tl.trans(ds), q, DOT_DTYPE, UPCAST)
            da_unused, db, dw, dw2, db2 = _tile_mlp_backward(
                ds, A_base, B_base, W_base, W2_base, B2_base, offs_m, offs_n, Lq, Lk, da_unused, db, dw, dw2, db2,
                HID, HIDP, HID2, HID2P, AUTHORS, ACT, False, True, True, UNROLL, COL_MAJOR)

        _store_tile(dV + bh * Lk * DV, offs_n, Lk, DV, dv, DV, DVP)
        if HAS_DOT:
            _store_tile(dDK + bh * Lk * DD, offs_n, Lk, DD, dk * dot_scale, DD, DDP)
        _store_tile(dB + bh * Lk * HID, offs_n, Lk, HID, db, HID, HIDP)
        slot = bh * n_blocks_n + pid_n
        if AUTHORS:
            offs_r = tl.arange(0, HID2P)
            tl.store(dW_part + slot * HID2 + offs_r, dw, mask=offs_r < HID2)
            tl.store(dB2_part + slot * HID2 + offs_r, db2, mask=offs_r < HID2)
            _store_tile(dW2_part + slot * HID2 * HID, offs_r, HID2, HID, dw2, HID, HIDP)
        else:
            offs_h = tl.arange(0, HIDP)
            tl.store(dW_part + slot * HID + offs_h, dw, mask=offs_h < HID)

    @triton.jit
    def _bwd_q_kernel(A, B, V, W, W2, B2, DQ, DK, Mask, H, Lq, Lk, svb, svh, svl, sqb, sqh, sql, skb, skh, skl,
                      smb, smh, smq, smk, w_hs, w2_hs, b2_hs, dot_scale, dropout_p, dropout_scale, seed,
                      DO, sdob, sdoh, sdol, LSE, Delta, dA, dDQ,
                      HID: tl.constexpr, HIDP: tl.constexpr, HID2: tl.constexpr, HID2P: tl.constexpr,
                      AUTHORS: tl.constexpr, ACT: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr,
                      DD: tl.constexpr, DDP: tl.constexpr, HAS_DOT: tl.constexpr, HAS_MASK: tl.constexpr,
                      CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, DOT_DTYPE: tl.constexpr, UPCAST: tl.constexpr,
                    UNROLL: tl.constexpr, COL_MAJOR: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """Backward, query side. Grid (cdiv(Lq, BLOCK_M), batch*heads): one program per query block.

        Loops over key blocks (causal: up to the diagonal), recomputing P. Writes fp32 dA (batch*heads, Lq, HID)
        and dDQ (.., Lq, DD; residual dot term only).
        """
        pid_m = tl.program_id(0)
        bh, b, h, A_base, B_base, V_base, W_base, W2_base, B2_base, DQ_base, DK_base, Mask_base = _head_bases(
            A, B, V, W, W2, B2, DQ, DK, Mask, H, Lq, Lk, svb, svh, sqb, sqh, skb, skh, smb, smh, w_hs, w2_hs, b2_hs,
            HID)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        q = _load_dot_tile(DQ_base, offs_m, Lq, sql, BLOCK_M, DD, DDP, HAS_DOT)
        do = _load_tile(DO + b * sdob + h * sdoh, offs_m, Lq, sdol, DV, DVP)
        lse, delta = _row_stats(LSE, Delta, bh, offs_m, Lq)

        dq = tl.zeros((BLOCK_M, DDP), dtype=tl.float32)
        da = tl.zeros((BLOCK_M, HIDP), dtype=tl.float32)
        db_unused = tl.zeros((BLOCK_N, HIDP), dtype=tl.float32)
        dw_unused = tl.zeros((HIDP,), dtype=tl.float32)
        dw2_unused = tl.zeros((HID2P, HIDP), dtype=tl.float32)
        db2_unused = tl.zeros((HID2P,), dtype=tl.float32)
        hi = Lk
        if CAUSAL:
            hi = tl.minimum(Lk, (pid_m + 1) * BLOCK_M)
        for start_n in range(0, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            v = _load_tile(V_base, offs_n, Lk, svl, DV, DVP)
            k = _load_dot_tile(DK_base, offs_n, Lk, skl, BLOCK_N, DD, DDP, HAS_DOT)
            pd, ds = _tile_probs_grad(A_base, B_base, W_base, W2_base, B2_base, Mask_base, smq, smk, q, k, v, do, lse,
                                      delta, pid_m * BLOCK_M, start_n,
                                      offs_m, offs_n, Lq, Lk, bh, dot_scale, dropout_p, dropout_scale, seed,
                                      HID, HIDP, HID2, AUTHORS, ACT, HAS_DOT, HAS_MASK, CAUSAL, DROPOUT, DOT_DTYPE,
                                      UPCAST, UNROLL, COL_MAJOR, BLOCK_M, BLOCK_N)
            if HAS_DOT:
                dq += _mm(ds, k, DOT_DTYPE, UPCAST)
            da, db_unused, dw_unused, dw2_unused, db2_unused = _tile_mlp_backward(
                ds, A_base, B_base, W_base, W2_base, B2_base, offs_m, offs_n, Lq, Lk, da, db_unused, dw_unused,
                dw2_unused, db2_unused, HID, HIDP, HID2, HID2P, AUTHORS, ACT, True, False, False, UNROLL, COL_MAJOR)

        _store_tile(dA + bh * Lq * HID, offs_m, Lq, HID, da, HID, HIDP)
        if HAS_DOT:
            _store_tile(dDQ + bh * Lq * DD, offs_m, Lq, DD, dq * dot_scale, DD, DDP)

# fmt: on


# ----------------------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------------------

_TL_DTYPES = {}
if TRITON_AVAILABLE:
    _TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _pow2(n: int, minimum: int = 1) -> int:
    return max(minimum, triton.next_power_of_2(max(int(n), 1)))


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _default_launch(authors: bool, hidden: int, interpreting: bool, backward: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, unroll) for the forward kernel or the two backward kernels.

    ``unroll``: hidden units per iteration of the paper MLP's loop (ignored by the authors' MLP).

    The fastest of ``benchmarks/bench_triton_gpu.py --tune`` on an H100 (bf16, causal, n = 4096, 12 heads of 64;
    benchmarks/results/gpu_h100/run3 for the paper MLP, run2 for the authors').
    """
    if interpreting:
        return 16, 16, 4, 1
    if authors:  # the authors' MLP keeps (BM, BN, hidden) tiles live: smaller tiles
        if hidden <= 8:
            return 32, 32, 4, 1
        return (16, 32, 8, 1) if backward else (32, 32, 8, 1)
    return (32, 32, 4, 2) if backward else (64, 32, 4, 2)


def _default_col_major(hidden: int) -> bool:
    """Paper MLP: read A / B from column-major copies (contiguous per-unit loads); measured to pay from d' = 16
    (backward -9%), a tie at d' = 2."""
    return hidden > 4


def _head_weight(w: torch.Tensor, heads: int, name: str, tail: tuple[int, ...]) -> tuple[torch.Tensor, int]:
    """fp32 contiguous copy with a leading heads-or-1 dim; returns (tensor, per-head element stride)."""
    if w.dim() == len(tail):
        w = w.unsqueeze(0)
    if w.dim() != len(tail) + 1 or tuple(w.shape[1:]) != tail or w.shape[0] not in (1, heads):
        raise ValueError(f"{name} must have shape (heads or 1, {', '.join(map(str, tail))}); got {tuple(w.shape)}")
    w = w.detach().to(torch.float32).contiguous()
    return w, (0 if w.shape[0] == 1 else math.prod(tail))


def _reduce_weight_grad(part: torch.Tensor, batch: int, heads: int, meta) -> torch.Tensor:
    """part: (batch*heads, n_blocks, *tail) per-program partial sums -> gradient shaped like the weight.

    meta = (weight.dim(), weight.shape[0], weight.dtype). Fixed-order torch reductions: deterministic.
    """
    w_dim, w_heads, w_dtype = meta
    g = part.view(batch, heads, *part.shape[1:]).sum(dim=2).sum(dim=0)  # (heads, *tail)
    if w_dim == g.dim() - 1:  # weight given without the heads dim
        g = g.sum(dim=0)
    elif w_heads == 1:
        g = g.sum(dim=0, keepdim=True)
    return g.to(w_dtype)


def _relu_grads(A, Bk, dA_raw, dB_raw, W, heads):
    """Finish the relu paper-MLP gradients the kernels leave raw (without the output weight w).

    A: (batch, heads, q_len, hidden), Bk: (batch, heads, k_len, hidden); dA_raw / dB_raw (fp32, same shapes) hold
    sum_j relu'(pre_ij) dS_ij and sum_i relu'(pre_ij) dS_ij; W: (heads or 1, hidden) fp32. Returns (dA, dB,
    per-(batch*head) dw partials shaped (batch*heads, 1, hidden)); dw from ``relu_weight_grad``.
    """
    batch, _, _, hidden = A.shape
    w = W.view(1, -1, 1, hidden)
    dw = relu_weight_grad(A, Bk, dA_raw, dB_raw)  # (batch, heads, hidden)
    return dA_raw * w, dB_raw * w, dw.reshape(batch * heads, 1, hidden)


def _launch_args(query_hidden, key_hidden, value, output_weight, second_weight, second_bias, dot_query, dot_key,
                 mask, cfg):
    """Kernel-ready tensors, the leading scalar arguments shared by the three kernels, and the constexprs.

    Returns (tensors, scalars, constexprs, launch): tensors = (A, B, V, W, W2, B2, DQ, DK, Mask) with fp32
    per-head weights and dummies (never read) for absent optional inputs; scalars = (H, Lq, Lk, V/DQ/DK/Mask
    strides, per-head weight strides, dot_scale, dropout_p, dropout_scale, seed); launch = {"": forward,
    "bwd_": backward} (BLOCK_M, BLOCK_N, num_warps, unroll), the user's choice or the defaults. With the paper MLP
    and ``col_major``, A and B are (batch, heads, hidden, len) contiguous.
    """
    batch, heads, q_len, hidden = query_hidden.shape
    k_len, v_dim = key_hidden.shape[2], value.shape[-1]
    authors, has_dot = second_weight is not None, dot_query is not None
    col_major = not authors and bool(_default_col_major(hidden) if cfg.get("col_major") is None else cfg["col_major"])
    if col_major:  # (batch, heads, hidden, len) contiguous; the backward pass views them back
        A, Bk = query_hidden.transpose(-1, -2).contiguous(), key_hidden.transpose(-1, -2).contiguous()
    else:
        A, Bk = query_hidden.contiguous(), key_hidden.contiguous()
    V = _last_dim_contiguous(value)
    if authors:
        hidden2 = second_weight.shape[-2]
        W, w_hs = _head_weight(output_weight, heads, "output_weight", (hidden2,))
        W2, w2_hs = _head_weight(second_weight, heads, "second_weight", (hidden2, hidden))
        if second_bias is None:
            B2, b2_hs = torch.zeros(1, hidden2, device=V.device, dtype=torch.float32), 0
        else:
            B2, b2_hs = _head_weight(second_bias, heads, "second_bias", (hidden2,))
    else:
        hidden2 = 1
        W, w_hs = _head_weight(output_weight, heads, "output_weight", (hidden,))
        W2, w2_hs, B2, b2_hs = W, 0, W, 0  # unused dummies
    DQ, DK, dd, dot_strides = A, A, 1, (0,) * 6  # dummies, never read
    if has_dot:
        DQ = _last_dim_contiguous(dot_query)
        DK = _last_dim_contiguous(dot_key.to(DQ.dtype))
        dd, dot_strides = DQ.shape[-1], (*DQ.stride()[:3], *DK.stride()[:3])
    Mask, mstrides = A, (0, 0, 0, 0)
    if mask is not None:
        Mask = mask.to(device=V.device, dtype=torch.uint8).expand(batch, heads, q_len, k_len)
        mstrides = Mask.stride()

    interp = _interpreting()
    launch = {}
    for prefix, backward in (("", False), ("bwd_", True)):
        defaults = dict(zip(("block_m", "block_n", "num_warps", "unroll"),
                            _default_launch(authors, hidden, interp, backward), strict=True))
        # backward: its own setting, else the caller's forward setting, else its default
        launch[prefix] = tuple(next((v for v in (cfg.get(prefix + key), cfg.get(key)) if v is not None), default)
                               for key, default in defaults.items())
    bm, bn, _, unroll = launch[""]
    dropout_p = float(cfg["dropout_p"])
    dropout_scale = 0.0 if dropout_p >= 1.0 else 1.0 / (1.0 - dropout_p)
    low = V.dtype if V.dtype in (torch.bfloat16, torch.float16) else torch.float32
    constexprs = dict(
        HID=hidden, HIDP=_pow2(hidden), HID2=hidden2, HID2P=_pow2(hidden2), AUTHORS=authors,
        ACT=_ACTIVATIONS[cfg["activation"]], DV=v_dim, DVP=_pow2(v_dim, 16), DD=dd, DDP=_pow2(dd, 16),
        HAS_DOT=has_dot, HAS_MASK=mask is not None, CAUSAL=bool(cfg["causal"]), DROPOUT=dropout_p > 0.0,
        DOT_DTYPE=_TL_DTYPES[low], UPCAST=interp, UNROLL=min(unroll, _pow2(hidden)), COL_MAJOR=col_major,
        BLOCK_M=bm, BLOCK_N=bn,
    )  # fmt: skip
    scalars = (heads, q_len, k_len, *V.stride()[:3], *dot_strides, *mstrides, w_hs, w2_hs, b2_hs,
               float(cfg["dot_scale"]), dropout_p, dropout_scale, int(cfg["seed"]))  # fmt: skip
    return (A, Bk, V, W, W2, B2, DQ, DK, Mask), scalars, constexprs, launch


class _NeuralAttentionTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query_hidden, key_hidden, value, output_weight, second_weight, second_bias, dot_query, dot_key,
                mask, cfg):  # fmt: skip
        tensors, scalars, constexprs, launch = _launch_args(query_hidden, key_hidden, value, output_weight,
                                                            second_weight, second_bias, dot_query, dot_key, mask,
                                                            cfg)  # fmt: skip
        batch, heads, q_len, _ = query_hidden.shape
        Out = torch.empty(batch, heads, q_len, value.shape[-1], device=value.device, dtype=value.dtype)
        LSE = torch.empty(batch * heads, q_len, device=value.device, dtype=torch.float32)
        grid = (triton.cdiv(q_len, constexprs["BLOCK_M"]), batch * heads)
        _fwd_kernel[grid](*tensors, *scalars, Out, LSE, *Out.stride()[:3], num_warps=launch[""][2], **constexprs)

        ctx.save_for_backward(*tensors, Out, LSE)
        ctx.scalars, ctx.constexprs, ctx.bwd_launch = scalars, constexprs, launch["bwd_"]
        has_dot = dot_query is not None
        ctx.dtypes = (query_hidden.dtype, key_hidden.dtype, value.dtype, dot_query.dtype if has_dot else None,
                      dot_key.dtype if has_dot else None)  # fmt: skip
        ctx.weight_meta = tuple(
            None if w is None else (w.dim(), w.shape[0], w.dtype) for w in (output_weight, second_weight, second_bias)
        )
        return Out

    @staticmethod
    def backward(ctx, grad_out):
        *tensors, Out, LSE = ctx.saved_tensors
        A, Bk, V = tensors[:3]
        block_m, block_n, num_warps, unroll = ctx.bwd_launch
        ce = dict(ctx.constexprs, BLOCK_M=block_m, BLOCK_N=block_n, UNROLL=min(unroll, ctx.constexprs["HIDP"]))
        authors, has_dot, hidden, hidden2, dd = ce["AUTHORS"], ce["HAS_DOT"], ce["HID"], ce["HID2"], ce["DD"]
        if ce["COL_MAJOR"]:
            A, Bk = A.transpose(-1, -2), Bk.transpose(-1, -2)  # (batch, heads, len, hidden) views
        batch, heads, q_len, _ = A.shape
        k_len = Bk.shape[2]

        dO = _last_dim_contiguous(grad_out.to(V.dtype))
        delta = (dO.float() * Out.float()).sum(-1).reshape(batch * heads, q_len).contiguous()
        n_blocks_n = triton.cdiv(k_len, ce["BLOCK_N"])
        f32 = dict(device=V.device, dtype=torch.float32)
        dA = torch.empty(batch, heads, q_len, hidden, **f32)
        dB = torch.empty(batch, heads, k_len, hidden, **f32)
        dV = torch.empty(batch, heads, k_len, ce["DV"], **f32)
        dDQ = torch.empty(batch, heads, q_len, dd, **f32) if has_dot else dA
        dDK = torch.empty(batch, heads, k_len, dd, **f32) if has_dot else dB
        dW_part = torch.empty(batch * heads, n_blocks_n, hidden2 if authors else hidden, **f32)
        dW2_part = torch.empty(batch * heads, n_blocks_n, hidden2, hidden, **f32) if authors else dW_part
        dB2_part = torch.empty(batch * heads, n_blocks_n, hidden2, **f32) if authors else dW_part

        lead = (*tensors, *ctx.scalars, dO, *dO.stride()[:3], LSE, delta)
        launch = dict(num_warps=num_warps, **ce)
        parts = (dW_part, dW2_part, dB2_part)
        _bwd_kv_kernel[(n_blocks_n, batch * heads)](*lead, dB, dV, dDK, *parts, n_blocks_n, **launch)
        _bwd_q_kernel[(triton.cdiv(q_len, ce["BLOCK_M"]), batch * heads)](*lead, dA, dDQ, **launch)

        qh_dt, kh_dt, v_dt, dq_dt, dk_dt = ctx.dtypes
        w_meta, w2_meta, b2_meta = ctx.weight_meta
        if not authors and ce["ACT"] == _ACTIVATIONS["relu"]:
            dA, dB, dW_part = _relu_grads(A, Bk, dA, dB, tensors[3], heads)
        g_w = _reduce_weight_grad(dW_part, batch, heads, w_meta)
        g_w2 = _reduce_weight_grad(dW2_part, batch, heads, w2_meta) if authors else None
        g_b2 = _reduce_weight_grad(dB2_part, batch, heads, b2_meta) if authors and b2_meta is not None else None
        g_dq = dDQ.to(dq_dt) if has_dot else None
        g_dk = dDK.to(dk_dt) if has_dot else None
        return dA.to(qh_dt), dB.to(kh_dt), dV.to(v_dt), g_w, g_w2, g_b2, g_dq, g_dk, None, None


def _empty_attention(tensors):
    """q_len == 0 or k_len == 0: every row is fully masked -> zeros (kept in the autograd graph).

    tensors: (query_hidden, key_hidden, value, *optional differentiable inputs or None).
    """
    query_hidden, _, value = tensors[:3]
    batch, heads, q_len, _ = query_hidden.shape
    out = value.new_zeros(batch, heads, q_len, value.shape[-1])
    anchor = sum((t.sum() * 0).to(out.dtype) for t in tensors if t is not None and t.requires_grad)
    return out + anchor if torch.is_tensor(anchor) else out


def neural_attention_triton(
    query_hidden: torch.Tensor,
    key_hidden: torch.Tensor,
    value: torch.Tensor,
    output_weight: torch.Tensor,
    second_weight: torch.Tensor | None = None,
    second_bias: torch.Tensor | None = None,
    *,
    activation: str = "relu",
    mask: torch.Tensor | None = None,
    causal: bool = False,
    dot_query: torch.Tensor | None = None,
    dot_key: torch.Tensor | None = None,
    dot_scale: float = 1.0,
    dropout_p: float = 0.0,
    generator_seed: int | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    unroll: int | None = None,
    bwd_block_m: int | None = None,
    bwd_block_n: int | None = None,
    bwd_num_warps: int | None = None,
    bwd_unroll: int | None = None,
    col_major: bool | None = None,
) -> torch.Tensor:
    """Fused Triton Neural Attention (see the KERNEL CONTRACT in docs/design.md).

    Extra keyword-only tuning knobs (not part of the contract): ``block_m`` / ``block_n`` (powers of two,
    >= 16), ``num_warps`` and ``unroll`` (paper MLP: hidden units per loop iteration, a power of two) of the
    forward kernel; ``bwd_*`` the same for the two backward kernels (``None``: the forward setting where one is
    given); ``col_major`` (paper MLP: the kernels read A / B from column-major copies). ``None``: the tuned default
    for this MLP and d'. Returns (batch, heads, q_len, v_dim) in value's dtype.
    """
    if not TRITON_AVAILABLE:
        raise RuntimeError("neural_attention_triton needs the `triton` package (pip install triton)")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}; got {activation!r}")
    authors = second_weight is not None
    if authors and activation != "relu":
        raise ValueError('mlp="authors" (second_weight given) uses relu activations only')
    if query_hidden.dim() != 4 or key_hidden.dim() != 4 or value.dim() != 4:
        raise ValueError("query_hidden, key_hidden and value must be 4-D (batch, heads, len, dim)")
    batch, heads, q_len, hidden = query_hidden.shape
    if key_hidden.shape[:2] != (batch, heads) or key_hidden.shape[-1] != hidden:
        raise ValueError(
            f"key_hidden shape {tuple(key_hidden.shape)} does not match query_hidden {tuple(query_hidden.shape)}"
        )
    k_len = key_hidden.shape[2]
    if value.shape[:3] != (batch, heads, k_len):
        raise ValueError(f"value shape {tuple(value.shape)} does not match key_hidden {tuple(key_hidden.shape)}")
    if (dot_query is None) != (dot_key is None):
        raise ValueError("dot_query and dot_key must be given together")
    if dot_query is not None and (
        dot_query.shape[:3] != (batch, heads, q_len)
        or dot_key.shape[:3] != (batch, heads, k_len)
        or dot_query.shape[-1] != dot_key.shape[-1]
    ):
        raise ValueError("dot_query / dot_key shapes do not match (batch, heads, q_len|k_len, head_dim)")
    if mask is not None:
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor (True = may attend); got {mask.dtype}")
        if mask.dim() > 4:
            raise ValueError("mask must be broadcastable to (batch, heads, q_len, k_len)")
        torch.broadcast_shapes(mask.shape, (batch, heads, q_len, k_len))
    if not (0.0 <= dropout_p <= 1.0):
        raise ValueError(f"dropout_p must be in [0, 1]; got {dropout_p}")
    if value.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"value dtype {value.dtype} is not supported (float32, bfloat16, float16)")
    for bs in (block_m, block_n, bwd_block_m, bwd_block_n):
        if bs is not None and (bs < 16 or bs & (bs - 1)):
            raise ValueError("block sizes must be powers of two >= 16")
    for u in (unroll, bwd_unroll):
        if u is not None and (u < 1 or u & (u - 1)):
            raise ValueError("unroll must be a power of two >= 1")

    inputs = (query_hidden, key_hidden, value, output_weight, second_weight, second_bias, dot_query, dot_key)
    if q_len == 0 or k_len == 0:
        return _empty_attention(inputs)
    if dropout_p > 0.0 and generator_seed is None:
        generator_seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    cfg = dict(activation=activation, causal=bool(causal), dot_scale=float(dot_scale), dropout_p=float(dropout_p),
               seed=int(generator_seed or 0) & 0x7FFFFFFFFFFFFFFF, block_m=block_m, block_n=block_n,
               num_warps=num_warps, unroll=unroll, bwd_block_m=bwd_block_m, bwd_block_n=bwd_block_n,
               bwd_num_warps=bwd_num_warps, bwd_unroll=bwd_unroll, col_major=col_major)  # fmt: skip
    return _NeuralAttentionTriton.apply(*inputs, mask, cfg)
