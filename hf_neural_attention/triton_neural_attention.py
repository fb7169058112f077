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

This file travels with Hub checkpoints: it imports only torch, stdlib and (optionally) triton, and
importing it never fails when triton is missing (``TRITON_AVAILABLE`` is then False).
"""

from __future__ import annotations

import math
import os

import torch

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
# ----------------------------------------------------------------------------------------------------------

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

    @triton.jit
    def _load_col(base, offs, L, col, HID: tl.constexpr):
        return tl.load(base + offs * HID + col, mask=offs < L, other=0.0).to(tl.float32)

    @triton.jit
    def _load_rows(base, offs, L, HID: tl.constexpr, HIDP: tl.constexpr):
        offs_h = tl.arange(0, HIDP)
        ptrs = base + offs[:, None] * HID + offs_h[None, :]
        return tl.load(ptrs, mask=(offs[:, None] < L) & (offs_h[None, :] < HID), other=0.0).to(tl.float32)

    @triton.jit
    def _neural_scores(
        A_base,
        B_base,
        W_base,
        W2_base,
        B2_base,
        offs_m,
        offs_n,
        Lq,
        Lk,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        HID: tl.constexpr,
        HIDP: tl.constexpr,
        HID2: tl.constexpr,
        AUTHORS: tl.constexpr,
        ACT: tl.constexpr,
    ):
        s = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if AUTHORS:
            offs_h = tl.arange(0, HIDP)
            a = _load_rows(A_base, offs_m, Lq, HID, HIDP)
            b = _load_rows(B_base, offs_n, Lk, HID, HIDP)
            h1 = tl.maximum(a[:, None, :] + b[None, :, :], 0.0)  # (BM, BN, HIDP)
            for r in tl.static_range(HID2):
                w2r = tl.load(W2_base + r * HID + offs_h, mask=offs_h < HID, other=0.0).to(tl.float32)
                z = tl.sum(h1 * w2r[None, None, :], axis=2) + tl.load(B2_base + r).to(tl.float32)
                s += tl.load(W_base + r).to(tl.float32) * tl.maximum(z, 0.0)
        else:
            for m in tl.static_range(HID):
                a_m = _load_col(A_base, offs_m, Lq, m, HID)
                b_m = _load_col(B_base, offs_n, Lk, m, HID)
                w_m = tl.load(W_base + m).to(tl.float32)
                s += w_m * _act_fwd(a_m[:, None] + b_m[None, :], ACT)
        return s

    @triton.jit
    def _valid_pairs(offs_m, offs_n, Lq, Lk, Mask_base, smq, smk, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr):
        valid = (offs_m[:, None] < Lq) & (offs_n[None, :] < Lk)
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None])
        if HAS_MASK:
            mv = tl.load(Mask_base + offs_m[:, None] * smq + offs_n[None, :] * smk, mask=valid, other=0)
            valid = valid & (mv != 0)
        return valid

    @triton.jit
    def _dropout_keep(seed, bh, offs_m, offs_n, Lq, Lk, dropout_p):
        rows = bh * Lq + offs_m.to(tl.int64)
        lin = rows[:, None] * Lk + offs_n[None, :].to(tl.int64)
        return tl.rand(seed, lin) >= dropout_p

    @triton.jit
    def _fwd_kernel(
        A,
        B,
        V,
        W,
        W2,
        B2,
        DQ,
        DK,
        Mask,
        Out,
        LSE,
        H,
        Lq,
        Lk,
        svb,
        svh,
        svl,
        sob,
        soh,
        sol,
        sqb,
        sqh,
        sql,
        skb,
        skh,
        skl,
        smb,
        smh,
        smq,
        smk,
        w_hs,
        w2_hs,
        b2_hs,
        dot_scale,
        dropout_p,
        dropout_scale,
        seed,
        HID: tl.constexpr,
        HIDP: tl.constexpr,
        HID2: tl.constexpr,
        AUTHORS: tl.constexpr,
        ACT: tl.constexpr,
        DV: tl.constexpr,
        DVP: tl.constexpr,
        DD: tl.constexpr,
        DDP: tl.constexpr,
        HAS_DOT: tl.constexpr,
        HAS_MASK: tl.constexpr,
        CAUSAL: tl.constexpr,
        DROPOUT: tl.constexpr,
        DOT_DTYPE: tl.constexpr,
        UPCAST: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        b = bh // H
        h = bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_v = tl.arange(0, DVP)
        offs_d = tl.arange(0, DDP)
        A_base = A + bh * Lq * HID
        B_base = B + bh * Lk * HID
        V_base = V + b * svb + h * svh
        W_base = W + h * w_hs
        W2_base = W2 + h * w2_hs
        B2_base = B2 + h * b2_hs
        Mask_base = Mask + b * smb + h * smh

        if HAS_DOT:
            q = tl.load(
                DQ + b * sqb + h * sqh + offs_m[:, None] * sql + offs_d[None, :],
                mask=(offs_m[:, None] < Lq) & (offs_d[None, :] < DD),
                other=0.0,
            )

        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, DVP), dtype=tl.float32)

        hi = Lk
        if CAUSAL:  # tiles entirely above the diagonal are skipped
            hi = tl.minimum(Lk, (pid_m + 1) * BLOCK_M)
        for start_n in range(0, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            s = _neural_scores(
                A_base,
                B_base,
                W_base,
                W2_base,
                B2_base,
                offs_m,
                offs_n,
                Lq,
                Lk,
                BLOCK_M,
                BLOCK_N,
                HID,
                HIDP,
                HID2,
                AUTHORS,
                ACT,
            )
            if HAS_DOT:
                k = tl.load(
                    DK + b * skb + h * skh + offs_n[:, None] * skl + offs_d[None, :],
                    mask=(offs_n[:, None] < Lk) & (offs_d[None, :] < DD),
                    other=0.0,
                )
                s += dot_scale * _mm(q, tl.trans(k), DOT_DTYPE, UPCAST)
            valid = _valid_pairs(offs_m, offs_n, Lq, Lk, Mask_base, smq, smk, CAUSAL, HAS_MASK)
            s = tl.where(valid, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if DROPOUT:
                keep = _dropout_keep(seed, bh, offs_m, offs_n, Lq, Lk, dropout_p)
                p = tl.where(keep, p * dropout_scale, 0.0)
            v = tl.load(
                V_base + offs_n[:, None] * svl + offs_v[None, :],
                mask=(offs_n[:, None] < Lk) & (offs_v[None, :] < DV),
                other=0.0,
            )
            acc = acc * alpha[:, None] + _mm(p, v, DOT_DTYPE, UPCAST)
            m_i = m_new

        has_any = l_i > 0.0
        m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
        out = tl.where(has_any[:, None], acc / tl.where(has_any, l_i, 1.0)[:, None], 0.0)
        lse = tl.where(has_any, m_safe + tl.log(tl.where(has_any, l_i, 1.0)), float("inf"))
        tl.store(LSE + bh * Lq + offs_m, lse, mask=offs_m < Lq)
        tl.store(
            Out + b * sob + h * soh + offs_m[:, None] * sol + offs_v[None, :],
            out.to(Out.dtype.element_ty),
            mask=(offs_m[:, None] < Lq) & (offs_v[None, :] < DV),
        )

    @triton.jit
    def _probs_and_dscores(
        A_base,
        B_base,
        W_base,
        W2_base,
        B2_base,
        Mask_base,
        smq,
        smk,
        q,
        k,
        v,
        do,
        lse,
        delta,
        offs_m,
        offs_n,
        Lq,
        Lk,
        bh,
        dot_scale,
        dropout_p,
        dropout_scale,
        seed,
        HID: tl.constexpr,
        HIDP: tl.constexpr,
        HID2: tl.constexpr,
        AUTHORS: tl.constexpr,
        ACT: tl.constexpr,
        HAS_DOT: tl.constexpr,
        HAS_MASK: tl.constexpr,
        CAUSAL: tl.constexpr,
        DROPOUT: tl.constexpr,
        DOT_DTYPE: tl.constexpr,
        UPCAST: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        """Recompute P for one tile; return (P after dropout, dS)."""
        s = _neural_scores(
            A_base,
            B_base,
            W_base,
            W2_base,
            B2_base,
            offs_m,
            offs_n,
            Lq,
            Lk,
            BLOCK_M,
            BLOCK_N,
            HID,
            HIDP,
            HID2,
            AUTHORS,
            ACT,
        )
        if HAS_DOT:
            s += dot_scale * _mm(q, tl.trans(k), DOT_DTYPE, UPCAST)
        valid = _valid_pairs(offs_m, offs_n, Lq, Lk, Mask_base, smq, smk, CAUSAL, HAS_MASK)
        p = tl.where(valid, tl.exp(s - lse[:, None]), 0.0)
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
    def _mlp_backward(
        ds,
        A_base,
        B_base,
        W_base,
        W2_base,
        B2_base,
        offs_m,
        offs_n,
        Lq,
        Lk,
        da,
        db,
        dw,
        dw2,
        db2,
        HID: tl.constexpr,
        HIDP: tl.constexpr,
        HID2: tl.constexpr,
        HID2P: tl.constexpr,
        AUTHORS: tl.constexpr,
        ACT: tl.constexpr,
        NEED_DA: tl.constexpr,
        NEED_DB: tl.constexpr,
        NEED_DW: tl.constexpr,
    ):
        """Back-propagate dS of a tile through the per-pair MLP, accumulating into the given accumulators.

        da: (BM, HIDP), db: (BN, HIDP); dw: (HIDP,) [paper] / (HID2P,) [authors, w3];
        dw2: (HID2P, HIDP) and db2: (HID2P,) [authors only].
        """
        offs_h = tl.arange(0, HIDP)
        if AUTHORS:
            offs_r = tl.arange(0, HID2P)
            a = _load_rows(A_base, offs_m, Lq, HID, HIDP)
            b = _load_rows(B_base, offs_n, Lk, HID, HIDP)
            h1 = tl.maximum(a[:, None, :] + b[None, :, :], 0.0)  # (BM, BN, HIDP)
            dh1 = tl.zeros_like(h1)
            for r in tl.static_range(HID2):
                w2r = tl.load(W2_base + r * HID + offs_h, mask=offs_h < HID, other=0.0).to(tl.float32)
                z = tl.sum(h1 * w2r[None, None, :], axis=2) + tl.load(B2_base + r).to(tl.float32)
                w3r = tl.load(W_base + r).to(tl.float32)
                g = tl.where(z > 0.0, ds * w3r, 0.0)  # dL/dz_r
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
            for m in tl.static_range(HID):
                a_m = _load_col(A_base, offs_m, Lq, m, HID)
                b_m = _load_col(B_base, offs_n, Lk, m, HID)
                w_m = tl.load(W_base + m).to(tl.float32)
                f, fp = _act_fwd_bwd(a_m[:, None] + b_m[None, :], ACT)
                if NEED_DW:
                    dw += tl.where(offs_h == m, tl.sum(tl.sum(ds * f, axis=1), axis=0), 0.0)
                if NEED_DA or NEED_DB:
                    dpre = ds * (w_m * fp)
                    if NEED_DA:
                        da += tl.where(offs_h[None, :] == m, tl.sum(dpre, axis=1)[:, None], 0.0)
                    if NEED_DB:
                        db += tl.where(offs_h[None, :] == m, tl.sum(dpre, axis=0)[:, None], 0.0)
        return da, db, dw, dw2, db2

    @triton.jit
    def _bwd_kv_kernel(
        A,
        B,
        V,
        W,
        W2,
        B2,
        DQ,
        DK,
        Mask,
        DO,
        LSE,
        Delta,
        dB,
        dV,
        dDK,
        dW_part,
        dW2_part,
        dB2_part,
        H,
        Lq,
        Lk,
        n_blocks_n,
        svb,
        svh,
        svl,
        sdob,
        sdoh,
        sdol,
        sqb,
        sqh,
        sql,
        skb,
        skh,
        skl,
        smb,
        smh,
        smq,
        smk,
        w_hs,
        w2_hs,
        b2_hs,
        dot_scale,
        dropout_p,
        dropout_scale,
        seed,
        HID: tl.constexpr,
        HIDP: tl.constexpr,
        HID2: tl.constexpr,
        HID2P: tl.constexpr,
        AUTHORS: tl.constexpr,
        ACT: tl.constexpr,
        DV: tl.constexpr,
        DVP: tl.constexpr,
        DD: tl.constexpr,
        DDP: tl.constexpr,
        HAS_DOT: tl.constexpr,
        HAS_MASK: tl.constexpr,
        CAUSAL: tl.constexpr,
        DROPOUT: tl.constexpr,
        DOT_DTYPE: tl.constexpr,
        UPCAST: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        b = bh // H
        h = bh % H
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_v = tl.arange(0, DVP)
        offs_d = tl.arange(0, DDP)
        offs_h = tl.arange(0, HIDP)
        offs_r = tl.arange(0, HID2P)
        A_base = A + bh * Lq * HID
        B_base = B + bh * Lk * HID
        W_base = W + h * w_hs
        W2_base = W2 + h * w2_hs
        B2_base = B2 + h * b2_hs
        Mask_base = Mask + b * smb + h * smh
        DO_base = DO + b * sdob + h * sdoh
        n_ok = offs_n < Lk

        v = tl.load(
            V + b * svb + h * svh + offs_n[:, None] * svl + offs_v[None, :],
            mask=n_ok[:, None] & (offs_v[None, :] < DV),
            other=0.0,
        )
        k = tl.zeros((BLOCK_N, DDP), dtype=tl.float32)
        q = tl.zeros((BLOCK_M, DDP), dtype=tl.float32)
        if HAS_DOT:
            k = tl.load(
                DK + b * skb + h * skh + offs_n[:, None] * skl + offs_d[None, :],
                mask=n_ok[:, None] & (offs_d[None, :] < DD),
                other=0.0,
            ).to(tl.float32)

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
            m_ok = offs_m < Lq
            if HAS_DOT:
                q = tl.load(
                    DQ + b * sqb + h * sqh + offs_m[:, None] * sql + offs_d[None, :],
                    mask=m_ok[:, None] & (offs_d[None, :] < DD),
                    other=0.0,
                ).to(tl.float32)
            do = tl.load(
                DO_base + offs_m[:, None] * sdol + offs_v[None, :],
                mask=m_ok[:, None] & (offs_v[None, :] < DV),
                other=0.0,
            )
            lse = tl.load(LSE + bh * Lq + offs_m, mask=m_ok, other=float("inf"))
            delta = tl.load(Delta + bh * Lq + offs_m, mask=m_ok, other=0.0)
            pd, ds = _probs_and_dscores(
                A_base,
                B_base,
                W_base,
                W2_base,
                B2_base,
                Mask_base,
                smq,
                smk,
                q,
                k,
                v,
                do,
                lse,
                delta,
                offs_m,
                offs_n,
                Lq,
                Lk,
                bh,
                dot_scale,
                dropout_p,
                dropout_scale,
                seed,
                HID,
                HIDP,
                HID2,
                AUTHORS,
                ACT,
                HAS_DOT,
                HAS_MASK,
                CAUSAL,
                DROPOUT,
                DOT_DTYPE,
                UPCAST,
                BLOCK_M,
                BLOCK_N,
            )
            dv += _mm(tl.trans(pd), do, DOT_DTYPE, UPCAST)
            if HAS_DOT:
                dk += _mm(tl.trans(ds), q, DOT_DTYPE, UPCAST)
            da_unused, db, dw, dw2, db2 = _mlp_backward(
                ds,
                A_base,
                B_base,
                W_base,
                W2_base,
                B2_base,
                offs_m,
                offs_n,
                Lq,
                Lk,
                da_unused,
                db,
                dw,
                dw2,
                db2,
                HID,
                HIDP,
                HID2,
                HID2P,
                AUTHORS,
                ACT,
                False,
                True,
                True,
            )

        tl.store(
            dV + bh * Lk * DV + offs_n[:, None] * DV + offs_v[None, :], dv, mask=n_ok[:, None] & (offs_v[None, :] < DV)
        )
        if HAS_DOT:
            tl.store(
                dDK + bh * Lk * DD + offs_n[:, None] * DD + offs_d[None, :],
                dk * dot_scale,
                mask=n_ok[:, None] & (offs_d[None, :] < DD),
            )
        tl.store(
            dB + bh * Lk * HID + offs_n[:, None] * HID + offs_h[None, :],
            db,
            mask=n_ok[:, None] & (offs_h[None, :] < HID),
        )
        slot = bh * n_blocks_n + pid_n
        if AUTHORS:
            tl.store(dW_part + slot * HID2 + offs_r, dw, mask=offs_r < HID2)
            tl.store(dB2_part + slot * HID2 + offs_r, db2, mask=offs_r < HID2)
            tl.store(
                dW2_part + slot * HID2 * HID + offs_r[:, None] * HID + offs_h[None, :],
                dw2,
                mask=(offs_r[:, None] < HID2) & (offs_h[None, :] < HID),
            )
        else:
            tl.store(dW_part + slot * HID + offs_h, dw, mask=offs_h < HID)

    @triton.jit
    def _bwd_q_kernel(
        A,
        B,
        V,
        W,
        W2,
        B2,
        DQ,
        DK,
        Mask,
        DO,
        LSE,
        Delta,
        dA,
        dDQ,
        H,
        Lq,
        Lk,
        svb,
        svh,
        svl,
        sdob,
        sdoh,
        sdol,
        sqb,
        sqh,
        sql,
        skb,
        skh,
        skl,
        smb,
        smh,
        smq,
        smk,
        w_hs,
        w2_hs,
        b2_hs,
        dot_scale,
        dropout_p,
        dropout_scale,
        seed,
        HID: tl.constexpr,
        HIDP: tl.constexpr,
        HID2: tl.constexpr,
        HID2P: tl.constexpr,
        AUTHORS: tl.constexpr,
        ACT: tl.constexpr,
        DV: tl.constexpr,
        DVP: tl.constexpr,
        DD: tl.constexpr,
        DDP: tl.constexpr,
        HAS_DOT: tl.constexpr,
        HAS_MASK: tl.constexpr,
        CAUSAL: tl.constexpr,
        DROPOUT: tl.constexpr,
        DOT_DTYPE: tl.constexpr,
        UPCAST: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        b = bh // H
        h = bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_v = tl.arange(0, DVP)
        offs_d = tl.arange(0, DDP)
        offs_h = tl.arange(0, HIDP)
        A_base = A + bh * Lq * HID
        B_base = B + bh * Lk * HID
        W_base = W + h * w_hs
        W2_base = W2 + h * w2_hs
        B2_base = B2 + h * b2_hs
        Mask_base = Mask + b * smb + h * smh
        V_base = V + b * svb + h * svh
        m_ok = offs_m < Lq

        q = tl.zeros((BLOCK_M, DDP), dtype=tl.float32)
        k = tl.zeros((BLOCK_N, DDP), dtype=tl.float32)
        if HAS_DOT:
            q = tl.load(
                DQ + b * sqb + h * sqh + offs_m[:, None] * sql + offs_d[None, :],
                mask=m_ok[:, None] & (offs_d[None, :] < DD),
                other=0.0,
            ).to(tl.float32)
        do = tl.load(
            DO + b * sdob + h * sdoh + offs_m[:, None] * sdol + offs_v[None, :],
            mask=m_ok[:, None] & (offs_v[None, :] < DV),
            other=0.0,
        )
        lse = tl.load(LSE + bh * Lq + offs_m, mask=m_ok, other=float("inf"))
        delta = tl.load(Delta + bh * Lq + offs_m, mask=m_ok, other=0.0)

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
            n_ok = offs_n < Lk
            v = tl.load(
                V_base + offs_n[:, None] * svl + offs_v[None, :], mask=n_ok[:, None] & (offs_v[None, :] < DV), other=0.0
            )
            if HAS_DOT:
                k = tl.load(
                    DK + b * skb + h * skh + offs_n[:, None] * skl + offs_d[None, :],
                    mask=n_ok[:, None] & (offs_d[None, :] < DD),
                    other=0.0,
                ).to(tl.float32)
            pd, ds = _probs_and_dscores(
                A_base,
                B_base,
                W_base,
                W2_base,
                B2_base,
                Mask_base,
                smq,
                smk,
                q,
                k,
                v,
                do,
                lse,
                delta,
                offs_m,
                offs_n,
                Lq,
                Lk,
                bh,
                dot_scale,
                dropout_p,
                dropout_scale,
                seed,
                HID,
                HIDP,
                HID2,
                AUTHORS,
                ACT,
                HAS_DOT,
                HAS_MASK,
                CAUSAL,
                DROPOUT,
                DOT_DTYPE,
                UPCAST,
                BLOCK_M,
                BLOCK_N,
            )
            if HAS_DOT:
                dq += _mm(ds, k, DOT_DTYPE, UPCAST)
            da, db_unused, dw_unused, dw2_unused, db2_unused = _mlp_backward(
                ds,
                A_base,
                B_base,
                W_base,
                W2_base,
                B2_base,
                offs_m,
                offs_n,
                Lq,
                Lk,
                da,
                db_unused,
                dw_unused,
                dw2_unused,
                db2_unused,
                HID,
                HIDP,
                HID2,
                HID2P,
                AUTHORS,
                ACT,
                True,
                False,
                False,
            )

        tl.store(
            dA + bh * Lq * HID + offs_m[:, None] * HID + offs_h[None, :],
            da,
            mask=m_ok[:, None] & (offs_h[None, :] < HID),
        )
        if HAS_DOT:
            tl.store(
                dDQ + bh * Lq * DD + offs_m[:, None] * DD + offs_d[None, :],
                dq * dot_scale,
                mask=m_ok[:, None] & (offs_d[None, :] < DD),
            )


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


def _default_blocks(authors: bool, hidden: int, interpreting: bool) -> tuple[int, int]:
    if interpreting:
        return 16, 16
    if authors:  # the authors' MLP keeps (BM, BN, hidden) tiles live: smaller tiles
        return (32, 32) if hidden <= 8 else (16, 32)
    return 64, 64


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


class _NeuralAttentionTriton(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, query_hidden, key_hidden, value, output_weight, second_weight, second_bias, dot_query, dot_key, mask, cfg
    ):
        batch, heads, q_len, hidden = query_hidden.shape
        k_len = key_hidden.shape[2]
        v_dim = value.shape[-1]
        authors = second_weight is not None
        dev = value.device

        A = query_hidden.contiguous()
        Bk = key_hidden.contiguous()
        V = _last_dim_contiguous(value)
        if authors:
            hidden2 = second_weight.shape[-2]
            W, w_hs = _head_weight(output_weight, heads, "output_weight", (hidden2,))
            W2, w2_hs = _head_weight(second_weight, heads, "second_weight", (hidden2, hidden))
            if second_bias is None:
                B2, b2_hs = torch.zeros(1, hidden2, device=dev, dtype=torch.float32), 0
            else:
                B2, b2_hs = _head_weight(second_bias, heads, "second_bias", (hidden2,))
        else:
            hidden2 = 1
            W, w_hs = _head_weight(output_weight, heads, "output_weight", (hidden,))
            W2, w2_hs, B2, b2_hs = W, 0, W, 0  # unused dummies

        has_dot = dot_query is not None
        if has_dot:
            DQ = _last_dim_contiguous(dot_query)
            DK = _last_dim_contiguous(dot_key.to(DQ.dtype))
            dd = DQ.shape[-1]
        else:
            DQ = DK = A  # dummies, never read
            dd = 1
        if mask is not None:
            Mask = mask.to(device=dev, dtype=torch.uint8).expand(batch, heads, q_len, k_len)
            mstrides = Mask.stride()
        else:
            Mask = A
            mstrides = (0, 0, 0, 0)

        interp = _interpreting()
        bm, bn = cfg["block_m"], cfg["block_n"]
        if bm is None or bn is None:
            dbm, dbn = _default_blocks(authors, hidden, interp)
            bm, bn = bm or dbm, bn or dbn
        dropout_p = float(cfg["dropout_p"])
        dropout = dropout_p > 0.0
        dropout_scale = 0.0 if dropout_p >= 1.0 else 1.0 / (1.0 - dropout_p)
        seed = int(cfg["seed"])

        low = V.dtype if V.dtype in (torch.bfloat16, torch.float16) else torch.float32
        common = dict(
            HID=hidden,
            HIDP=_pow2(hidden),
            HID2=hidden2,
            AUTHORS=authors,
            ACT=_ACTIVATIONS[cfg["activation"]],
            DV=v_dim,
            DVP=_pow2(v_dim, 16),
            DD=dd,
            DDP=_pow2(dd, 16),
            HAS_DOT=has_dot,
            HAS_MASK=mask is not None,
            CAUSAL=bool(cfg["causal"]),
            DROPOUT=dropout,
            DOT_DTYPE=_TL_DTYPES[low],
            UPCAST=interp,
            BLOCK_M=bm,
            BLOCK_N=bn,
        )
        num_warps = cfg.get("num_warps") or 4

        Out = torch.empty(batch, heads, q_len, v_dim, device=dev, dtype=value.dtype)
        LSE = torch.empty(batch * heads, q_len, device=dev, dtype=torch.float32)
        grid = (triton.cdiv(q_len, bm), batch * heads)
        _fwd_kernel[grid](
            A,
            Bk,
            V,
            W,
            W2,
            B2,
            DQ,
            DK,
            Mask,
            Out,
            LSE,
            heads,
            q_len,
            k_len,
            V.stride(0),
            V.stride(1),
            V.stride(2),
            Out.stride(0),
            Out.stride(1),
            Out.stride(2),
            *(DQ.stride()[:3] if has_dot else (0, 0, 0)),
            *(DK.stride()[:3] if has_dot else (0, 0, 0)),
            *mstrides,
            w_hs,
            w2_hs,
            b2_hs,
            float(cfg["dot_scale"]),
            dropout_p,
            dropout_scale,
            seed,
            num_warps=num_warps,
            **common,
        )

        ctx.save_for_backward(
            A,
            Bk,
            V,
            W,
            W2,
            B2,
            DQ if has_dot else None,
            DK if has_dot else None,
            Mask if mask is not None else None,
            Out,
            LSE,
        )
        ctx.common = common
        ctx.meta = dict(
            batch=batch,
            heads=heads,
            q_len=q_len,
            k_len=k_len,
            hidden=hidden,
            hidden2=hidden2,
            v_dim=v_dim,
            dd=dd,
            mstrides=mstrides,
            w_hs=w_hs,
            w2_hs=w2_hs,
            b2_hs=b2_hs,
            dot_scale=float(cfg["dot_scale"]),
            dropout_p=dropout_p,
            dropout_scale=dropout_scale,
            seed=seed,
            num_warps=num_warps,
            authors=authors,
            has_dot=has_dot,
        )
        ctx.dtypes = (
            query_hidden.dtype,
            key_hidden.dtype,
            value.dtype,
            dot_query.dtype if has_dot else None,
            dot_key.dtype if has_dot else None,
        )
        ctx.weight_meta = tuple(
            None if w is None else (w.dim(), w.shape[0], w.dtype) for w in (output_weight, second_weight, second_bias)
        )
        return Out

    @staticmethod
    def backward(ctx, grad_out):
        A, Bk, V, W, W2, B2, DQ, DK, Mask, Out, LSE = ctx.saved_tensors
        mt = ctx.meta
        common = ctx.common
        batch, heads, q_len, k_len = mt["batch"], mt["heads"], mt["q_len"], mt["k_len"]
        hidden, hidden2, v_dim, dd = mt["hidden"], mt["hidden2"], mt["v_dim"], mt["dd"]
        authors, has_dot = mt["authors"], mt["has_dot"]
        dev = V.device
        bm, bn = common["BLOCK_M"], common["BLOCK_N"]
        w_meta, w2_meta, b2_meta = ctx.weight_meta

        dO = _last_dim_contiguous(grad_out.to(V.dtype))
        delta = (dO.float() * Out.float()).sum(-1).reshape(batch * heads, q_len).contiguous()
        if Mask is None:
            Mask = A
        if DQ is None:
            DQ = DK = A

        n_blocks_n = triton.cdiv(k_len, bn)
        f32 = dict(device=dev, dtype=torch.float32)
        dA = torch.empty(batch, heads, q_len, hidden, **f32)
        dB = torch.empty(batch, heads, k_len, hidden, **f32)
        dV = torch.empty(batch, heads, k_len, v_dim, **f32)
        dDQ = torch.empty(batch, heads, q_len, dd, **f32) if has_dot else dA
        dDK = torch.empty(batch, heads, k_len, dd, **f32) if has_dot else dB
        if authors:
            dW_part = torch.empty(batch * heads, n_blocks_n, hidden2, **f32)
            dW2_part = torch.empty(batch * heads, n_blocks_n, hidden2, hidden, **f32)
            dB2_part = torch.empty(batch * heads, n_blocks_n, hidden2, **f32)
        else:
            dW_part = torch.empty(batch * heads, n_blocks_n, hidden, **f32)
            dW2_part = dB2_part = dW_part
        strides = (
            V.stride(0),
            V.stride(1),
            V.stride(2),
            dO.stride(0),
            dO.stride(1),
            dO.stride(2),
            *(DQ.stride()[:3] if has_dot else (0, 0, 0)),
            *(DK.stride()[:3] if has_dot else (0, 0, 0)),
            *mt["mstrides"],
            mt["w_hs"],
            mt["w2_hs"],
            mt["b2_hs"],
            mt["dot_scale"],
            mt["dropout_p"],
            mt["dropout_scale"],
            mt["seed"],
        )
        kw = dict(common, HID2P=_pow2(hidden2))
        _bwd_kv_kernel[(n_blocks_n, batch * heads)](
            A,
            Bk,
            V,
            W,
            W2,
            B2,
            DQ,
            DK,
            Mask,
            dO,
            LSE,
            delta,
            dB,
            dV,
            dDK,
            dW_part,
            dW2_part,
            dB2_part,
            heads,
            q_len,
            k_len,
            n_blocks_n,
            *strides,
            num_warps=mt["num_warps"],
            **kw,
        )
        _bwd_q_kernel[(triton.cdiv(q_len, bm), batch * heads)](
            A,
            Bk,
            V,
            W,
            W2,
            B2,
            DQ,
            DK,
            Mask,
            dO,
            LSE,
            delta,
            dA,
            dDQ,
            heads,
            q_len,
            k_len,
            *strides,
            num_warps=mt["num_warps"],
            **kw,
        )

        qh_dt, kh_dt, v_dt, dq_dt, dk_dt = ctx.dtypes
        g_qh = dA.to(qh_dt)
        g_kh = dB.to(kh_dt)
        g_v = dV.to(v_dt)
        g_w = _reduce_weight_grad(dW_part, batch, heads, w_meta)
        g_w2 = g_b2 = None
        if authors:
            g_w2 = _reduce_weight_grad(dW2_part, batch, heads, w2_meta)
            if b2_meta is not None:
                g_b2 = _reduce_weight_grad(dB2_part, batch, heads, b2_meta)
        g_dq = dDQ.to(dq_dt) if has_dot else None
        g_dk = dDK.to(dk_dt) if has_dot else None
        return g_qh, g_kh, g_v, g_w, g_w2, g_b2, g_dq, g_dk, None, None


def _empty_attention(query_hidden, key_hidden, value, tensors):
    """q_len == 0 or k_len == 0: every row is fully masked -> zeros (kept in the autograd graph)."""
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
) -> torch.Tensor:
    """Fused Triton Neural Attention (see the KERNEL CONTRACT in docs/design.md).

    Extra keyword-only tuning knobs (not part of the contract): ``block_m`` / ``block_n`` (powers of two,
    >= 16) and ``num_warps``. Returns (batch, heads, q_len, v_dim) in value's dtype.
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
    for bs in (block_m, block_n):
        if bs is not None and (bs < 16 or bs & (bs - 1)):
            raise ValueError("block sizes must be powers of two >= 16")

    if q_len == 0 or k_len == 0:
        return _empty_attention(
            query_hidden,
            key_hidden,
            value,
            (query_hidden, key_hidden, value, output_weight, second_weight, second_bias, dot_query, dot_key),
        )
    if dropout_p > 0.0 and generator_seed is None:
        generator_seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    cfg = dict(
        activation=activation,
        causal=bool(causal),
        dot_scale=float(dot_scale),
        dropout_p=float(dropout_p),
        seed=int(generator_seed or 0) & 0x7FFFFFFFFFFFFFFF,
        block_m=block_m,
        block_n=block_n,
        num_warps=num_warps,
    )
    return _NeuralAttentionTriton.apply(
        query_hidden, key_hidden, value, output_weight, second_weight, second_bias, dot_query, dot_key, mask, cfg
    )
