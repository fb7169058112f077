"""Fused Triton GPU backend for Neural Attention (arXiv 2502.17206).

Implements the KERNEL CONTRACT of ``docs/design.md``::

    neural_attention_triton(query_hidden, key_hidden, value, output_weight,
                            second_weight=None, second_bias=None, *, activation="relu",
                            mask=None, causal=False, dot_query=None, dot_key=None,
                            dot_scale=1.0, dropout_p=0.0, generator_seed=None, score_bias=None) -> Tensor

as a ``torch.autograd.Function`` with Triton forward and backward kernels (flash-attention style):

* forward: grid (query block, batch*heads); loop over key blocks; the per-pair MLP is evaluated on the
  (BLOCK_M, BLOCK_N) tile from the low-rank projections ``A`` (query side) and ``B`` (key side); online
  softmax in fp32; only ``O`` and the per-row log-sum-exp are stored (memory O(n * block)); a ``score_bias`` tile
  is loaded next to the mask tile and added to the scores (the row max and log denominator then stored apart).
* backward: scores are recomputed tile by tile. Split scheme: one kernel over key blocks produces
  dB / dV / dK and per-program partial sums of the scorer-weight gradients (one slot per (batch*head,
  key block)); one kernel over query blocks produces dA / dQ. The partial sums are reduced in a fixed order
  with torch afterwards: no atomics, so two backward runs are bitwise identical. A score bias's gradient is dS:
  the query-side kernel writes it whole, torch sums it where the bias broadcasts.
* dropout: ``tl.rand(seed, (bh * q_len + i) * k_len + j)``; backward regenerates the same mask.

This file travels with Hub checkpoints: it imports only torch, stdlib, its flat sibling
``kernels_neural_attention`` and (optionally) triton, and importing it never fails when triton is missing
(``TRITON_AVAILABLE`` is then False).
"""

from __future__ import annotations

import math
import os

import torch

from .kernels_neural_attention import (
    ACTIVATION_CODES,
    as_4d,
    autocast_off,
    bias_grad_rows,
    check_kernel_inputs,
    empty_attention,
    kernel_op,
    once_differentiable_always,
    relu_grads,
    relu_signed_max_operands,
    seed_tensor,
    source_tag,
    sum_to_bias_shape,
    visible_rows,
    weight_grad,
    zero_invisible_rows,
    zero_unseen_operands,
)

try:  # triton is optional: importing this module must never fail without it
    import triton
    import triton.language as tl

    TRITON_AVAILABLE = True
except ImportError:  # pragma: no cover - exercised only on machines without triton
    triton = None
    tl = None
    TRITON_AVAILABLE = False

__all__ = ["TRITON_AVAILABLE", "neural_attention_triton", "triton_is_usable"]

# authors' MLP: from this width on (d' > 8) its second layer runs as a tensor-core GEMM (see `_authors_layers`)
_AUTHORS_GEMM_FROM = tl.constexpr(8) if TRITON_AVAILABLE else None
# half_mlp with 16-bit inputs: for d' in [_HALF_MMA_FROM, _HALF_MMA_UNTIL] the backward sums its relu masks on the
# tensor cores (see `_tile_mlp_backward`). Narrower, the per-unit MMAs cost more than the reductions they replace
# (sm_90 SASS); wider, the d' one-hots of (cols, d') each that stay in shared memory outgrow it (d' = 64: 284 KB).
_HALF_MMA_FROM = tl.constexpr(8) if TRITON_AVAILABLE else None
_HALF_MMA_UNTIL = tl.constexpr(16) if TRITON_AVAILABLE else None


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


def triton_is_preferred(query: torch.Tensor) -> bool:
    """Whether ``backend="auto"`` runs the kernel for ``query`` ``(batch, heads, q_len, head_dim)``: usable
    (:func:`triton_is_usable`) and, on CUDA, a GPU of compute capability 8.0 or newer (A100, RTX 30xx, L4, H100 and
    later), which the tiles are laid out and compile-tested for, or heads of at most 64. On a T4 (7.5) every default
    launch at 64 fits its 64 KiB of shared memory (48 KiB at most); at 128, six of 54 variants need up to 80 KiB, and
    at 256 they all need 96 KiB: launches that fail, so ``auto`` takes the tiled kernel there (benchmarks/README.md,
    session 18)."""
    if not triton_is_usable(query):
        return False
    # get_device_properties: torch.compile folds it to a constant
    return not query.is_cuda or query.shape[-1] <= 64 or torch.cuda.get_device_properties(query.device).major >= 8


# ----------------------------------------------------------------------------------------------------------
# Triton kernels
#
# Orientation: every kernel works on tiles whose ROWS are the positions its program owns and whose columns are the
# positions it loops over: forward and query-side backward own BLOCK_M queries (tile (BLOCK_M, BLOCK_N)); the key-side
# backward owns BLOCK_N keys (tile (BLOCK_N, BLOCK_M), KEY_ROWS=True). The per-unit reductions of the backward pass
# (dA over keys, dB over queries) then always run along axis 1: inside a warp when the owned rows are at least
# 16 x num_warps (see `_mma_zeros`).
#
# Operands: paper MLP: A / B as fp32 (batch*heads, HIDP, LqP / LkP) column-major copies, lengths padded to LqP / LkP
# (whole blocks) and hidden units to HIDP with zeros, so per-unit column loads need no masks; for relu centred and
# scaled for the signed-max form, with the per-key constant Ck (see `_paper_operands`). Authors' MLP: A / B
# (batch*heads, len, HID) row-major.
# Per-head weights are read at W + h * w_hs (w_hs = 0 when shared). The three kernels share one leading argument list
# (tensors, lengths, strides, scalars: see `_launch_args`) and one set of constexprs. Argument lists are kept on few
# lines on purpose (`ruff format` would explode them).
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
    def _exp(x):
        """exp(x) as one hardware ex2 (as flash attention does): tl.exp compiles to about twice the instructions."""
        return tl.exp2(x * 1.4426950408889634)

    @triton.jit
    def _mm_acc(a, b, acc, DOT_DTYPE: tl.constexpr, UPCAST: tl.constexpr):
        """acc + a @ b with operands rounded to DOT_DTYPE (fp32 accumulation), accumulated in the MMA itself (no
        second accumulator tile in registers); acc None: a @ b.

        UPCAST (interpreter only): the interpreter's tl.dot mishandles bf16 operands, so they are rounded to
        DOT_DTYPE and multiplied in fp32 -- numerically what the tensor cores do.
        """
        return tl.dot(_rounded(a, DOT_DTYPE, UPCAST), _rounded(b, DOT_DTYPE, UPCAST), acc, input_precision="ieee")

    @triton.jit
    def _mm(a, b, DOT_DTYPE: tl.constexpr, UPCAST: tl.constexpr):
        """a @ b with operands rounded to DOT_DTYPE (fp32 accumulation): `_mm_acc` without an accumulator."""
        return _mm_acc(a, b, None, DOT_DTYPE, UPCAST)

    @triton.jit
    def _mm_fp32(a, b, UPCAST: tl.constexpr):
        """a @ b at about fp32 precision on the tensor cores (three tf32 products: hi*hi + hi*lo + lo*hi), whatever
        the inputs' dtype: for GEMMs inside the scorer, whose rounding to bf16 would move relu kinks."""
        a = a.to(tl.float32)
        b = b.to(tl.float32)
        if UPCAST:  # the interpreter multiplies in fp32
            return tl.dot(a, b, input_precision="ieee")
        return tl.dot(a, b, input_precision="tf32x3")

    @triton.jit
    def _rounded(x, DTYPE: tl.constexpr, UPCAST: tl.constexpr):
        """x rounded to DTYPE, to nearest even as the GPU converts. UPCAST (the interpreter): held in fp32, and the
        rounding to bf16 done on the bits: the interpreter's fp32 -> bf16 cast truncates (triton 3.9), a bias of about
        -2^-9 that adds up over a sum of products where the GPU's rounding errors cancel (through the backward's delta,
        8x the GPU's error in a scorer weight's gradient)."""
        if UPCAST:
            x = x.to(tl.float32)
            if DTYPE == tl.bfloat16:  # (finite x; inf stays inf)
                bits = x.to(tl.uint32, bitcast=True)
                bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
                return bits.to(tl.float32, bitcast=True)
            return x.to(DTYPE).to(tl.float32)
        return x.to(DTYPE)

    @triton.jit
    def _bf16_operand(x, UPCAST: tl.constexpr):
        """x rounded to bf16, an MMA operand (UPCAST, the interpreter: held in fp32, see `_rounded`)."""
        return _rounded(x, tl.bfloat16, UPCAST)

    @triton.jit
    def _relu_masked(a, b, x, UPCAST: tl.constexpr):
        """where(a > b, x, 0) for fp16 operands a, b and 16-bit x, broadcast to (ROWS, COLS).

        As PTX, one packed compare (all ones / zeros per half) and one AND per two pairs: tl.where compiles to a
        packed compare, a select per pair and a byte permute per two (sm_90 SASS).
        """
        if UPCAST:  # (the interpreter runs no PTX)
            return tl.where(a > b, x, 0.0)
        return tl.inline_asm_elementwise("{ .reg .b32 m; set.gt.u32.f16x2 m, $1, $2; and.b32 $0, m, $3; }",
                                         "=r,r,r,r", [a, b, x], dtype=x.dtype, is_pure=True, pack=2)

    @triton.jit
    def _mma_zeros(ROWS: tl.constexpr, COLS: tl.constexpr, UPCAST: tl.constexpr):
        """fp32 zeros (ROWS, COLS) born from one small tensor-core dot, to start a score tile from.

        Why: triton lays out a tile built by broadcasting with a whole warp along each row (a thread holds 1 column
        of ROWS / num_warps rows), so every hidden unit costs a thread ~ROWS / num_warps + 1 loads for as many pairs,
        and each row reduction crosses 32 lanes. Born from a dot, the tile takes the MMA layout (a thread holds 2
        rows per 16 x COLS / 4 columns; reductions along a row cross 4 lanes): in the sm_90 SASS the forward issues
        about half the instructions per tile. The dot costs one (ROWS, 16) x (16, COLS) MMA per tile; fp16 operands,
        which every tensor-core GPU (sm_70 on) multiplies, whatever the inputs' dtype.
        """
        return _mm(tl.zeros((ROWS, 16), dtype=tl.float32), tl.zeros((16, COLS), dtype=tl.float32), tl.float16,
                   UPCAST)

    @triton.jit
    def _pair_index(offs_q, offs_k, KEY_ROWS: tl.constexpr):
        """(query, key) positions expanded to the tile's orientation: keys as rows when KEY_ROWS."""
        if KEY_ROWS:  # (assign, then one return: the compiler wants one return type per function)
            qi, kj = offs_q[None, :], offs_k[:, None]
        else:
            qi, kj = offs_q[:, None], offs_k[None, :]
        return qi, kj

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
    def _row_stats(LSE, LogL, Delta, bh, offs_m, Lq, HAS_BIAS: tl.constexpr):
        """(log-sum-exp, 0, delta = rowsum(dO * O)) of the query rows ``offs_m``; +inf / 0 out of bounds.

        HAS_BIAS: (row max, log denominator, delta) instead, kept apart (see `_fwd_kernel`).
        """
        m_ok = offs_m < Lq
        if HAS_BIAS:
            log_l = tl.load(LogL + bh * Lq + offs_m, mask=m_ok, other=0.0)
        else:
            log_l = tl.zeros(offs_m.shape, dtype=tl.float32)
        return (tl.load(LSE + bh * Lq + offs_m, mask=m_ok, other=float("inf")), log_l,
                tl.load(Delta + bh * Lq + offs_m, mask=m_ok, other=0.0))

    @triton.jit
    def _head_bases(A, B, Ck, V, W, W2, B2, DQ, DK, Mask, Bias, H, LkP, sab, sbb, svb, svh, sqb, sqh, skb, skh, smb,
                    smh, sxb, sxh, w_hs, w2_hs, b2_hs, bh_start=0):
        """(bh, b, h) of this program (axis 1 = batch*heads from row ``bh_start`` on) and the per-(batch, head) base
        pointers."""
        bh = tl.program_id(1).to(tl.int64) + bh_start
        b = bh // H
        h = bh % H
        return (bh, b, h, A + bh * sab, B + bh * sbb, Ck + bh * LkP, V + b * svb + h * svh, W + h * w_hs,
                W2 + h * w2_hs, B2 + h * b2_hs, DQ + b * sqb + h * sqh, DK + b * skb + h * skh,
                Mask + b * smb + h * smh, Bias + b * sxb + h * sxh)

    # ---------------------------------------------------------------------------------------- per-pair MLP
    @triton.jit
    def _to_fp32_opaque(x):
        """fp16 -> fp32 as inline PTX (a plain cast the compiler folds into the compare after it, which is then an
        fp16 compare and a select per pair instead of one FSET)."""
        return tl.inline_asm_elementwise("cvt.f32.f16 $0, $1;", "=r,h", [x], dtype=tl.float32, is_pure=True, pack=1)

    @triton.jit
    def _paper_unit(A_base, B_base, offs_q, offs_k, LqP, LkP, m, KEY_ROWS: tl.constexpr, FP32: tl.constexpr = False,
                    UPCAST: tl.constexpr = False):
        """Hidden unit m's operands on the tile: (A[i, m], B[j, m]) expanded to broadcast against each other.

        Unmasked loads: the copies are padded to whole blocks and HIDP units (see `_paper_operands`).
        """
        a = tl.load(A_base + m * LqP + offs_q)
        b = tl.load(B_base + m * LkP + offs_k)
        if FP32 and UPCAST:  # (the interpreter runs no PTX)
            a, b = a.to(tl.float32), b.to(tl.float32)
        elif FP32:  # before the broadcast: one conversion per loaded value, not per pair
            a, b = _to_fp32_opaque(a), _to_fp32_opaque(b)
        if KEY_ROWS:
            a, b = a[None, :], b[:, None]
        else:
            a, b = a[:, None], b[None, :]
        return a, b

    @triton.jit
    def _authors_h1(A_base, B_base, offs_q, offs_k, Lq, Lk, HID: tl.constexpr, HIDP: tl.constexpr,
                    KEY_ROWS: tl.constexpr):
        """Authors' first layer on the tile: relu(A_i + B_j), (ROWS, COLS, HIDP)."""
        a = _load_tile(A_base, offs_q, Lq, HID, HID, HIDP).to(tl.float32)
        b = _load_tile(B_base, offs_k, Lk, HID, HID, HIDP).to(tl.float32)
        if KEY_ROWS:
            h1 = tl.maximum(b[:, None, :] + a[None, :, :], 0.0)
        else:
            h1 = tl.maximum(a[:, None, :] + b[None, :, :], 0.0)
        return h1

    @triton.jit
    def _authors_z(h1, W2_base, B2_base, r, HID: tl.constexpr, HIDP: tl.constexpr):
        """Authors' second layer, unit r, before its relu, on the CUDA cores: (z_r = W2[r] . h1 + b2[r]  (ROWS, COLS),
        W2[r]  (HIDP,)); for narrow MLPs (see `_AUTHORS_GEMM_FROM`)."""
        offs_h = tl.arange(0, HIDP)
        w2r = tl.load(W2_base + r * HID + offs_h, mask=offs_h < HID, other=0.0).to(tl.float32)
        return tl.sum(h1 * w2r[None, None, :], axis=2) + tl.load(B2_base + r).to(tl.float32), w2r

    @triton.jit
    def _authors_layers(A_base, B_base, W_base, W2_base, B2_base, offs_q, offs_k, Lq, Lk, ROWS: tl.constexpr,
                        COLS: tl.constexpr, HID: tl.constexpr, HIDP: tl.constexpr, HID2: tl.constexpr,
                        HID2P: tl.constexpr, DOT_DTYPE: tl.constexpr, UPCAST: tl.constexpr, KEY_ROWS: tl.constexpr):
        """Authors' MLP on the tile's ROWS * COLS pairs, its second layer as one tensor-core GEMM over the pairs.

        Returns (h1 = relu(A_i + B_j)  (ROWS * COLS, HIDP), z = h1 W2^T + b2  (ROWS * COLS, HID2P), w3 (HID2P,),
        W2 (HID2P, HIDP)), zero-padded (HIDP, HID2P >= 16: the MMA minimum). A pair costs HID * HID2 multiply-adds
        here: on the CUDA cores, one unit at a time, they were most of the kernel's instructions from d' = 16 on
        (sm_90 SASS, fwd + bwd per pair: 6025 -> 1909 at d' = 16; at d' = 4 the padding to 16 dominates, 599 -> 1536:
        `_AUTHORS_GEMM_FROM` picks the form). z, which decides the relu kinks of the forward and both backward
        kernels, is computed at fp32 precision (`_mm_fp32`); the gradient GEMMs round to the inputs' dtype.
        """
        offs_h = tl.arange(0, HIDP)
        offs_r = tl.arange(0, HID2P)
        r_ok = offs_r < HID2
        w3 = tl.load(W_base + offs_r, mask=r_ok, other=0.0)
        w2 = tl.load(W2_base + offs_r[:, None] * HID + offs_h[None, :], mask=r_ok[:, None] & (offs_h[None, :] < HID),
                     other=0.0)
        b2 = tl.load(B2_base + offs_r, mask=r_ok, other=0.0)
        h1 = tl.reshape(_authors_h1(A_base, B_base, offs_q, offs_k, Lq, Lk, HID, HIDP, KEY_ROWS), (ROWS * COLS, HIDP))
        z = _mm_fp32(h1, tl.trans(w2), UPCAST) + b2[None, :]
        return h1, z, w3, w2

    @triton.jit
    def _tile_scores(A_base, B_base, Ck_base, W_base, W2_base, B2_base, q, k, offs_q, offs_k, Lq, Lk, LqP, LkP,
                     dot_scale, mlp_inv, ROWS: tl.constexpr, COLS: tl.constexpr, HID: tl.constexpr,
                     HIDP: tl.constexpr, HID2: tl.constexpr, HID2P: tl.constexpr, AUTHORS: tl.constexpr,
                     ACT: tl.constexpr, HAS_DOT: tl.constexpr, DOT_DTYPE: tl.constexpr, UPCAST: tl.constexpr,
                     UNROLL: tl.constexpr, HALF: tl.constexpr, KEY_ROWS: tl.constexpr):
        """Unmasked fp32 scores of the (ROWS, COLS) tile: per-pair MLP (paper / authors) + dot_scale * q . k.

        HALF (paper MLP, relu): the fp16 operands of `_paper_operands`, scaled by 1 / mlp_inv; each loop iteration's
        UNROLL units are summed in fp16, two pairs per instruction (HMNMX2 + HFMA2 on sm_90), the iterations in
        fp32.
        """
        if AUTHORS and HID > _AUTHORS_GEMM_FROM:
            _h1, z, w3, _w2 = _authors_layers(A_base, B_base, W_base, W2_base, B2_base, offs_q, offs_k, Lq, Lk, ROWS,
                                              COLS, HID, HIDP, HID2, HID2P, DOT_DTYPE, UPCAST, KEY_ROWS)
            s = tl.reshape(tl.sum(tl.maximum(z, 0.0) * w3[None, :], axis=1), (ROWS, COLS))
        elif AUTHORS:  # (its (ROWS, COLS, HIDP) first layer picks its own layout)
            s = tl.zeros((ROWS, COLS), dtype=tl.float32)
            h1 = _authors_h1(A_base, B_base, offs_q, offs_k, Lq, Lk, HID, HIDP, KEY_ROWS)
            for r in tl.static_range(HID2):
                z, _w2r = _authors_z(h1, W2_base, B2_base, r, HID, HIDP)
                s += tl.load(W_base + r).to(tl.float32) * tl.maximum(z, 0.0)
        elif HALF:
            s = _mma_zeros(ROWS, COLS, UPCAST)
            for m0 in range(0, HID, UNROLL):
                for u in tl.static_range(UNROLL):
                    w = tl.load(W_base + m0 + u).to(tl.float16)
                    a, b = _paper_unit(A_base, B_base, offs_q, offs_k, LqP, LkP, m0 + u, KEY_ROWS)
                    if u == 0:
                        part = w * tl.maximum(a, b)
                    else:
                        part = tl.fma(w, tl.maximum(a, b), part)
                s += part.to(tl.float32)
            ck = tl.load(Ck_base + offs_k)
            if KEY_ROWS:
                s = tl.fma(s, mlp_inv, ck[:, None])
            else:
                s = tl.fma(s, mlp_inv, ck[None, :])
        else:
            s = _mma_zeros(ROWS, COLS, UPCAST)
            # a runtime loop, UNROLL units per iteration: fully unrolled, the hoisted column loads spill registers;
            # units m >= HID (the last iteration's tail) are zero padding (w = 0, A = B = 0)
            for m0 in range(0, HID, UNROLL):
                for u in tl.static_range(UNROLL):
                    w = tl.load(W_base + m0 + u)
                    a, b = _paper_unit(A_base, B_base, offs_q, offs_k, LqP, LkP, m0 + u, KEY_ROWS)
                    if ACT == 0:
                        # signed-max form (see `_paper_operands`; w here is sign(w)): 2 operations per pair instead
                        # of 3; the per-key constant Ck is added once below
                        # (explicit fma: triton >= 3.10 stops contracting a * b + c by default)
                        s = tl.fma(w, tl.maximum(a, b), s)
                    else:
                        s = tl.fma(w, _act_fwd(a + b, ACT), s)
            if ACT == 0:
                ck = tl.load(Ck_base + offs_k)
                if KEY_ROWS:
                    s += ck[:, None]
                else:
                    s += ck[None, :]
        if HAS_DOT:
            if KEY_ROWS:
                s += dot_scale * _mm(k, tl.trans(q), DOT_DTYPE, UPCAST)
            else:
                s += dot_scale * _mm(q, tl.trans(k), DOT_DTYPE, UPCAST)
        return s

    @triton.jit
    def _pair_ptrs(base, sq, sk, start_q, start_k, offs_q, offs_k, KEY_ROWS: tl.constexpr):
        """Pointers to the tile's pairs (i, j) of a (q_len, k_len) matrix with strides (sq, sk), in the tile's
        orientation: the tile's corner as a 64-bit offset, the pairs relative to it in 32 bits (a per-pair int32
        i * sq wraps once q_len * k_len passes 2^31, at n = 46341 with contiguous rows)."""
        corner = base + tl.cast(start_q, tl.int64) * sq + tl.cast(start_k, tl.int64) * sk
        li, lj = _pair_index(offs_q - start_q, offs_k - start_k, KEY_ROWS)
        return corner + li * sq + lj * sk

    @triton.jit
    def _tile_mask(start_q, start_k, offs_q, offs_k, Lq, Lk, Mask_base, smq, smk, CAUSAL: tl.constexpr,
                   HAS_MASK: tl.constexpr, KEY_ROWS: tl.constexpr):
        """True where query i may attend key j: in bounds, causal (j <= i), bool mask."""
        qi, kj = _pair_index(offs_q, offs_k, KEY_ROWS)
        valid = (qi < Lq) & (kj < Lk)
        if CAUSAL:
            valid = valid & (kj <= qi)
        if HAS_MASK:
            mv = tl.load(_pair_ptrs(Mask_base, smq, smk, start_q, start_k, offs_q, offs_k, KEY_ROWS), mask=valid,
                         other=0)
            valid = valid & (mv != 0)
        return valid

    @triton.jit
    def _masked(x, fill, start_q, start_k, offs_q, offs_k, Lq, Lk, Mask_base, smq, smk, CAUSAL: tl.constexpr,
                HAS_MASK: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, KEY_ROWS: tl.constexpr):
        """x with ``fill`` where query i may not attend key j. Tiles wholly inside both lengths and below the
        causal diagonal (the bulk of a long sequence) skip the mask arithmetic: a scalar test per tile."""
        if HAS_MASK:
            x = tl.where(_tile_mask(start_q, start_k, offs_q, offs_k, Lq, Lk, Mask_base, smq, smk, CAUSAL, HAS_MASK,
                                    KEY_ROWS), x, fill)
        else:
            partial = (start_q + BLOCK_Q > Lq) | (start_k + BLOCK_K > Lk)
            if CAUSAL:
                partial = partial | (start_k + BLOCK_K - 1 > start_q)
            if partial:
                x = tl.where(_tile_mask(start_q, start_k, offs_q, offs_k, Lq, Lk, Mask_base, smq, smk, CAUSAL,
                                        HAS_MASK, KEY_ROWS), x, fill)
        return x

    @triton.jit
    def _add_bias(s, Bias_base, sxq, sxk, start_q, start_k, offs_q, offs_k, Lq, Lk, HAS_BIAS: tl.constexpr,
                  KEY_ROWS: tl.constexpr):
        """s plus the tile's score bias (read in its own dtype, added in fp32; zeros out of bounds): what the scores
        are before masking, in the forward and in both backward recomputes."""
        if HAS_BIAS:
            qi, kj = _pair_index(offs_q, offs_k, KEY_ROWS)
            ptrs = _pair_ptrs(Bias_base, sxq, sxk, start_q, start_k, offs_q, offs_k, KEY_ROWS)
            s += tl.load(ptrs, mask=(qi < Lq) & (kj < Lk), other=0.0).to(tl.float32)
        return s

    @triton.jit
    def _dropout_keep(seed, bh, offs_q, offs_k, Lq, Lk, dropout_p, KEY_ROWS: tl.constexpr):
        """Dropout keep-mask of the tile from tl.rand(seed, (bh * Lq + i) * Lk + j) (same in forward and backward)."""
        qi, kj = _pair_index(offs_q.to(tl.int64), offs_k.to(tl.int64), KEY_ROWS)
        return tl.rand(seed, (bh * Lq + qi) * Lk + kj) >= dropout_p

    @triton.jit
    def _tile_probs_grad(A_base, B_base, Ck_base, W_base, W2_base, B2_base, Mask_base, smq, smk, Bias_base, sxq, sxk,
                         q, k, v, do, lse, log_l, delta, start_q, start_k, offs_q, offs_k, Lq, Lk, LqP, LkP, bh,
                         dot_scale, mlp_inv, dropout_p, dropout_scale, seed, HID: tl.constexpr, HIDP: tl.constexpr,
                         HID2: tl.constexpr, HID2P: tl.constexpr, AUTHORS: tl.constexpr, ACT: tl.constexpr,
                         HAS_DOT: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr,
                         CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, DOT_DTYPE: tl.constexpr, UPCAST: tl.constexpr,
                         UNROLL: tl.constexpr, HALF: tl.constexpr, KEY_ROWS: tl.constexpr, BLOCK_Q: tl.constexpr,
                         BLOCK_K: tl.constexpr,
                         ROWS: tl.constexpr, COLS: tl.constexpr):
        """Recompute P of one (ROWS, COLS) tile from the stored row statistics (`_row_stats`); return (P after dropout,
        dS = dL/dscores).

        (ROWS, COLS) = (BLOCK_K, BLOCK_Q) when KEY_ROWS, else (BLOCK_Q, BLOCK_K).
        """
        s = _tile_scores(A_base, B_base, Ck_base, W_base, W2_base, B2_base, q, k, offs_q, offs_k, Lq, Lk, LqP, LkP,
                         dot_scale, mlp_inv, ROWS, COLS, HID, HIDP, HID2, HID2P, AUTHORS, ACT, HAS_DOT, DOT_DTYPE,
                         UPCAST, UNROLL, HALF, KEY_ROWS)
        s = _add_bias(s, Bias_base, sxq, sxk, start_q, start_k, offs_q, offs_k, Lq, Lk, HAS_BIAS, KEY_ROWS)
        # rows with no visible key (and rows past Lq) have lse = +inf: p = 0 there without a mask
        s = _masked(s, float("-inf"), start_q, start_k, offs_q, offs_k, Lq, Lk, Mask_base, smq, smk, CAUSAL,
                    HAS_MASK, BLOCK_Q, BLOCK_K, KEY_ROWS)  # before exp: scores of padded keys may be large
        if KEY_ROWS:
            if HAS_BIAS:  # (s - max) first: exact where a huge negative bias covers the row (see `_fwd_kernel`)
                p = _exp((s - lse[None, :]) - log_l[None, :])
            else:
                p = _exp(s - lse[None, :])
            dp = _mm(v, tl.trans(do), DOT_DTYPE, UPCAST)
            delta2 = delta[None, :]
        else:
            if HAS_BIAS:
                p = _exp((s - lse[:, None]) - log_l[:, None])
            else:
                p = _exp(s - lse[:, None])
            dp = _mm(do, tl.trans(v), DOT_DTYPE, UPCAST)
            delta2 = delta[:, None]
        if DROPOUT:
            keep = _dropout_keep(seed, bh, offs_q, offs_k, Lq, Lk, dropout_p, KEY_ROWS)
            pd = tl.where(keep, p * dropout_scale, 0.0)
            dp = tl.where(keep, dp * dropout_scale, 0.0)
        else:
            pd = p
        ds = p * (dp - delta2)
        return pd, ds

    @triton.jit
    def _tile_mlp_backward(ds, A_base, B_base, W_base, W2_base, B2_base, offs_q, offs_k, Lq, Lk, LqP, LkP, d_own,
                           dw, dw2, db2, HID: tl.constexpr, HIDP: tl.constexpr, HID2: tl.constexpr,
                           HID2P: tl.constexpr, AUTHORS: tl.constexpr, ACT: tl.constexpr, NEED_DW: tl.constexpr,
                           UNROLL: tl.constexpr, HALF: tl.constexpr, KEY_ROWS: tl.constexpr, ROWS: tl.constexpr,
                           COLS: tl.constexpr, DOT_DTYPE: tl.constexpr, UPCAST: tl.constexpr):
        """Back-propagate dS of a (ROWS, COLS) tile through the per-pair MLP, accumulating into the given accumulators.

        d_own: (ROWS, HIDP), the gradient of the rows' own projection (dA in the query-side kernel, dB in the key-side
        one): a sum along axis 1. dw: (HIDP,) [paper] / (HID2P,) [authors, w3]; dw2: (HID2P, HIDP) and db2: (HID2P,)
        [authors only]. Returns (d_own, dw, dw2, db2).
        Paper MLP with relu: d_own is without the w_m factor and dw stays untouched (see ``relu_grads``).
        """
        offs_h = tl.arange(0, HIDP)
        if AUTHORS and HID > _AUTHORS_GEMM_FROM:  # GEMMs over the tile's pairs on the tensor cores
            h1, z, w3, w2 = _authors_layers(A_base, B_base, W_base, W2_base, B2_base, offs_q, offs_k, Lq, Lk, ROWS,
                                            COLS, HID, HIDP, HID2, HID2P, DOT_DTYPE, UPCAST, KEY_ROWS)
            ds = tl.reshape(ds, (ROWS * COLS,))
            g = tl.where(z > 0.0, ds[:, None] * w3[None, :], 0.0)  # dL/dz  (ROWS * COLS, HID2P)
            if NEED_DW:
                dw += tl.sum(ds[:, None] * tl.maximum(z, 0.0), axis=0)
                db2 += tl.sum(g, axis=0)
                dw2 += _mm(tl.trans(g), h1, DOT_DTYPE, UPCAST)  # gradients: the inputs' precision, like dV
            dpre = tl.where(h1 > 0.0, _mm(g, w2, DOT_DTYPE, UPCAST), 0.0)  # dL/d(A_i + B_j)
            d_own += tl.sum(tl.reshape(dpre, (ROWS, COLS, HIDP)), axis=1)
        elif AUTHORS:  # narrow MLPs: one second-layer unit at a time on the CUDA cores
            offs_r = tl.arange(0, HID2P)
            h1 = _authors_h1(A_base, B_base, offs_q, offs_k, Lq, Lk, HID, HIDP, KEY_ROWS)
            dh1 = tl.zeros_like(h1)
            for r in tl.static_range(HID2):
                z, w2r = _authors_z(h1, W2_base, B2_base, r, HID, HIDP)
                g = tl.where(z > 0.0, ds * tl.load(W_base + r).to(tl.float32), 0.0)  # dL/dz_r
                if NEED_DW:
                    dw += tl.where(offs_r == r, tl.sum(tl.sum(ds * tl.maximum(z, 0.0), axis=1), axis=0), 0.0)
                    db2 += tl.where(offs_r == r, tl.sum(tl.sum(g, axis=1), axis=0), 0.0)
                    row = tl.sum(tl.sum(g[:, :, None] * h1, axis=1), axis=0)  # (HIDP,)
                    dw2 += tl.where(offs_r[:, None] == r, row[None, :], 0.0)
                dh1 += g[:, :, None] * w2r[None, None, :]
            d_own += tl.sum(tl.where(h1 > 0.0, dh1, 0.0), axis=1)
        elif HALF and HID >= _HALF_MMA_FROM and HID <= _HALF_MMA_UNTIL and DOT_DTYPE != tl.float32:
            # Per unit m, the masked dS tile times a (COLS, HIDP) one-hot of column m on the tensor cores: the sum
            # along the tile's columns and its placement into column m of d_own in one MMA (otherwise a multiply-add
            # per pair, a cross-lane reduction and a one-hot update of d_own per unit). relu'(A_i + B_j) = [a > b] on
            # the fp16 operands: the forward's own compare. dS enters as bf16: rounded once for bf16 inputs (relative
            # 2^-8, as flash attention rounds it for its dq / dk, and this kernel for the dot term's), as hi + lo
            # parts (16 bits) for fp16 inputs; 1.0 * part is exact and the sums are fp32. (fp32 inputs keep the
            # exact fp32 sums below.) The unit loop unrolls at compile time, so its one-hots are constants.
            ds_hi = _bf16_operand(ds, UPCAST)
            ds_lo = _bf16_operand(ds - ds_hi.to(tl.float32), UPCAST)
            for m in tl.static_range(HID):
                a, b = _paper_unit(A_base, B_base, offs_q, offs_k, LqP, LkP, m, KEY_ROWS)
                onehot = _bf16_operand(tl.broadcast_to((offs_h[None, :] == m).to(tl.float32), (COLS, HIDP)), UPCAST)
                d_own = tl.dot(_relu_masked(a, b, ds_hi, UPCAST), onehot, d_own, input_precision="ieee")
                if DOT_DTYPE == tl.float16:
                    d_own = tl.dot(_relu_masked(a, b, ds_lo, UPCAST), onehot, d_own, input_precision="ieee")
        else:
            for m0 in range(0, HID, UNROLL):  # as in _tile_scores; tail units (m >= HID) are zero padding
                for u in tl.static_range(UNROLL):
                    m = m0 + u
                    # HALF (relu, d' < _HALF_MMA_FROM): the fp16 operands back in fp32, the arithmetic as without HALF
                    a, b = _paper_unit(A_base, B_base, offs_q, offs_k, LqP, LkP, m, KEY_ROWS, HALF, UPCAST)
                    if ACT == 0:
                        # relu: d_own leaves out the factor w_m and no dw is reduced here; the host applies w_m
                        # and gets dw_m = sum_ij relu'(pre) ds (A_im + B_jm) from them (relu(x) = x relu'(x))
                        # relu'(A + B) = [a > b] for the scaled copies; times the 0 / 1 float, the compare and
                        # the sum's add compile to FSET + FFMA (sm_90), where tl.where costs FSETP + FSEL + FADD
                        dpre = ds * (a > b).to(tl.float32)
                    else:
                        f, fp = _act_fwd_bwd(a + b, ACT)
                        if NEED_DW:
                            dw += tl.where(offs_h == m, tl.sum(tl.sum(ds * f, axis=1), axis=0), 0.0)
                        dpre = ds * (tl.load(W_base + m) * fp)
                    # into column m: one multiply-add per element (a select and an add would be two)
                    d_own = tl.fma((offs_h[None, :] == m).to(tl.float32), tl.sum(dpre, axis=1)[:, None], d_own)
        return d_own, dw, dw2, db2

    # ---------------------------------------------------------------------------------------- kernels
    @triton.jit
    def _fwd_kernel(A, B, Ck, V, W, W2, B2, DQ, DK, Mask, Bias, Scale, H, Lq, Lk, LqP, LkP, sab, sbb, svb, svh, svl,
                    sqb, sqh, sql, skb, skh, skl, smb, smh, smq, smk, sxb, sxh, sxq, sxk, w_hs, w2_hs, b2_hs,
                    dot_scale, dropout_p, dropout_scale, seed, Out, LSE, LogL, sob, soh, sol,
                    HID: tl.constexpr, HIDP: tl.constexpr, HID2: tl.constexpr, HID2P: tl.constexpr,
                    AUTHORS: tl.constexpr, ACT: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr,
                    DD: tl.constexpr, DDP: tl.constexpr, HAS_DOT: tl.constexpr, HAS_MASK: tl.constexpr,
                    HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, DOT_DTYPE: tl.constexpr,
                    UPCAST: tl.constexpr, UNROLL: tl.constexpr, HALF: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr):
        """Forward. Grid (cdiv(Lq, BLOCK_M), batch*heads): one program per BLOCK_M query rows of one head.

        Loops over key blocks (causal: only up to the diagonal) with an online fp32 softmax. Writes Out
        (batch, heads, Lq, DV) in Out's dtype and LSE (batch*heads, Lq) fp32 (+inf for rows with no visible key).
        HAS_BIAS: LSE holds the row max and LogL (batch*heads, Lq) the log denominator, kept apart: a row that a
        large finite negative bias covers (a -1e9 float mask) has max + log(denominator) == max in fp32, and P
        recomputed from their sum would be 1 at every key instead of 1 / k.
        With 16-bit values P enters `P @ V` as two 16-bit parts, P rounded and its rounding error, so that Out is
        P @ V to about fp32 precision (see `_triton_forward`).
        """
        pid_m = tl.program_id(0)
        (bh, b, h, A_base, B_base, Ck_base, V_base, W_base, W2_base, B2_base, DQ_base, DK_base, Mask_base,
         Bias_base) = _head_bases(A, B, Ck, V, W, W2, B2, DQ, DK, Mask, Bias, H, LkP, sab, sbb, svb, svh, sqb, sqh, skb,
                                  skh, smb, smh, sxb, sxh, w_hs, w2_hs, b2_hs)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        q = _load_dot_tile(DQ_base, offs_m, Lq, sql, BLOCK_M, DD, DDP, HAS_DOT)
        mlp_inv = tl.load(Scale + bh)

        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, DVP), dtype=tl.float32)
        hi = Lk
        if CAUSAL:  # tiles entirely above the diagonal are skipped
            hi = tl.minimum(Lk, (pid_m + 1) * BLOCK_M)
        for start_n in range(0, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            k = _load_dot_tile(DK_base, offs_n, Lk, skl, BLOCK_N, DD, DDP, HAS_DOT)
            s = _tile_scores(A_base, B_base, Ck_base, W_base, W2_base, B2_base, q, k, offs_m, offs_n, Lq, Lk, LqP,
                             LkP, dot_scale, mlp_inv, BLOCK_M, BLOCK_N, HID, HIDP, HID2, HID2P, AUTHORS, ACT, HAS_DOT,
                             DOT_DTYPE, UPCAST, UNROLL, HALF, False)
            s = _add_bias(s, Bias_base, sxq, sxk, pid_m * BLOCK_M, start_n, offs_m, offs_n, Lq, Lk, HAS_BIAS, False)
            s = _masked(s, float("-inf"), pid_m * BLOCK_M, start_n, offs_m, offs_n, Lq, Lk, Mask_base, smq, smk,
                        CAUSAL, HAS_MASK, BLOCK_M, BLOCK_N, False)
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = _exp(m_i - m_safe)
            p = _exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if DROPOUT:
                keep = _dropout_keep(seed, bh, offs_m, offs_n, Lq, Lk, dropout_p, False)
                p = tl.where(keep, p * dropout_scale, 0.0)
            v = _load_tile(V_base, offs_n, Lk, svl, DV, DVP)
            p_hi = _rounded(p, DOT_DTYPE, UPCAST)
            acc = _mm_acc(p_hi, v, acc * alpha[:, None], DOT_DTYPE, UPCAST)
            if DOT_DTYPE != tl.float32:  # P's rounding error, itself rounded: P @ V to about 2^-16
                acc = _mm_acc(p - p_hi.to(tl.float32), v, acc, DOT_DTYPE, UPCAST)
            m_i = m_new

        has_any = l_i > 0.0
        m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
        out = tl.where(has_any[:, None], acc / tl.where(has_any, l_i, 1.0)[:, None], 0.0)
        log_l = tl.log(tl.where(has_any, l_i, 1.0))
        if HAS_BIAS:
            tl.store(LSE + bh * Lq + offs_m, tl.where(has_any, m_safe, float("inf")), mask=offs_m < Lq)
            tl.store(LogL + bh * Lq + offs_m, log_l, mask=offs_m < Lq)
        else:
            tl.store(LSE + bh * Lq + offs_m, tl.where(has_any, m_safe + log_l, float("inf")), mask=offs_m < Lq)
        _store_tile(Out + b * sob + h * soh, offs_m, Lq, sol, out, DV, DVP)

    @triton.jit
    def _bwd_kv_kernel(A, B, Ck, V, W, W2, B2, DQ, DK, Mask, Bias, Scale, H, Lq, Lk, LqP, LkP, sab, sbb, svb, svh,
                       svl, sqb, sqh, sql, skb, skh, skl, smb, smh, smq, smk, sxb, sxh, sxq, sxk, w_hs, w2_hs, b2_hs,
                       dot_scale, dropout_p, dropout_scale, seed, DO, sdob, sdoh, sdol, LSE, LogL, Delta, dB, dV, dDK,
                       dW_part, dW2_part, dB2_part, n_blocks_n,
                       HID: tl.constexpr, HIDP: tl.constexpr, HID2: tl.constexpr, HID2P: tl.constexpr,
                       AUTHORS: tl.constexpr, ACT: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr,
                       DD: tl.constexpr, DDP: tl.constexpr, HAS_DOT: tl.constexpr, HAS_MASK: tl.constexpr,
                       HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, DOT_DTYPE: tl.constexpr,
                       UPCAST: tl.constexpr, UNROLL: tl.constexpr, HALF: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr):
        """Backward, key side. Grid (n_blocks_n = cdiv(Lk, BLOCK_N), batch*heads): one program per key block.

        Loops over query blocks (causal: from the diagonal on), recomputing P^T as (BLOCK_N keys, BLOCK_M queries)
        tiles. Writes fp32 dB (batch*heads, Lk, HID), dV (.., Lk, DV), dDK (.., Lk, DD; residual dot term only) and,
        in slot bh * n_blocks_n + n, this program's partial weight gradients: dW_part (HID [paper] / HID2 [authors]),
        dW2_part (HID2, HID) and dB2_part (HID2) [authors only].
        """
        pid_n = tl.program_id(0)
        (bh, b, h, A_base, B_base, Ck_base, V_base, W_base, W2_base, B2_base, DQ_base, DK_base, Mask_base,
         Bias_base) = _head_bases(A, B, Ck, V, W, W2, B2, DQ, DK, Mask, Bias, H, LkP, sab, sbb, svb, svh, sqb, sqh, skb,
                                  skh, smb, smh, sxb, sxh, w_hs, w2_hs, b2_hs)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mlp_inv = tl.load(Scale + bh)
        v = _load_tile(V_base, offs_n, Lk, svl, DV, DVP)
        k = _load_dot_tile(DK_base, offs_n, Lk, skl, BLOCK_N, DD, DDP, HAS_DOT)

        dv = tl.zeros((BLOCK_N, DVP), dtype=tl.float32)
        dk = tl.zeros((BLOCK_N, DDP), dtype=tl.float32)
        db = tl.zeros((BLOCK_N, HIDP), dtype=tl.float32)
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
            lse, log_l, delta = _row_stats(LSE, LogL, Delta, bh, offs_m, Lq, HAS_BIAS)
            pd, ds = _tile_probs_grad(A_base, B_base, Ck_base, W_base, W2_base, B2_base, Mask_base, smq, smk,
                                      Bias_base, sxq, sxk, q, k, v, do, lse, log_l, delta, start_m, pid_n * BLOCK_N,
                                      offs_m, offs_n, Lq, Lk, LqP, LkP, bh, dot_scale, mlp_inv, dropout_p,
                                      dropout_scale, seed, HID, HIDP, HID2, HID2P, AUTHORS, ACT, HAS_DOT, HAS_MASK,
                                      HAS_BIAS, CAUSAL, DROPOUT, DOT_DTYPE, UPCAST, UNROLL, HALF, True, BLOCK_M,
                                      BLOCK_N, BLOCK_N, BLOCK_M)
            dv += _mm(pd, do, DOT_DTYPE, UPCAST)
            if HAS_DOT:
                dk += _mm(ds, q, DOT_DTYPE, UPCAST)
            db, dw, dw2, db2 = _tile_mlp_backward(
                ds, A_base, B_base, W_base, W2_base, B2_base, offs_m, offs_n, Lq, Lk, LqP, LkP, db, dw, dw2, db2,
                HID, HIDP, HID2, HID2P, AUTHORS, ACT, True, UNROLL, HALF, True, BLOCK_N, BLOCK_M, DOT_DTYPE, UPCAST)

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
    def _bwd_q_kernel(A, B, Ck, V, W, W2, B2, DQ, DK, Mask, Bias, Scale, H, Lq, Lk, LqP, LkP, sab, sbb, svb, svh,
                      svl, sqb, sqh, sql, skb, skh, skl, smb, smh, smq, smk, sxb, sxh, sxq, sxk, w_hs, w2_hs, b2_hs,
                      dot_scale, dropout_p, dropout_scale, seed, DO, sdob, sdoh, sdol, LSE, LogL, Delta, dA, dDQ, dBias,
                      bh_start, HID: tl.constexpr, HIDP: tl.constexpr, HID2: tl.constexpr, HID2P: tl.constexpr,
                      AUTHORS: tl.constexpr, ACT: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr,
                      DD: tl.constexpr, DDP: tl.constexpr, HAS_DOT: tl.constexpr, HAS_MASK: tl.constexpr,
                      HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, DOT_DTYPE: tl.constexpr,
                      UPCAST: tl.constexpr, UNROLL: tl.constexpr, HALF: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr,
                      BIAS_GRAD: tl.constexpr, BIAS_ACC: tl.constexpr):
        """Backward, query side. Grid (cdiv(Lq, BLOCK_M), rows): one program per query block of batch*heads rows
        bh_start .. bh_start + rows.

        Loops over key blocks (causal: up to the diagonal), recomputing P. Writes fp32 dA (batch*heads, Lq, HID),
        dDQ (.., Lq, DD; residual dot term only) and, BIAS_GRAD, dBias (rows, Lq, Lk) = dS of this launch's rows, the
        score bias's gradient before the host sums it over the dims the bias broadcasts along (tiles the causal loop
        skips stay as the host zeroed them); BIAS_ACC: added to dBias (a bias shared by the batch, its rows in
        several launches that add to one zeroed buffer), else stored.
        """
        pid_m = tl.program_id(0)
        (bh, b, h, A_base, B_base, Ck_base, V_base, W_base, W2_base, B2_base, DQ_base, DK_base, Mask_base,
         Bias_base) = _head_bases(A, B, Ck, V, W, W2, B2, DQ, DK, Mask, Bias, H, LkP, sab, sbb, svb, svh, sqb, sqh, skb,
                                  skh, smb, smh, sxb, sxh, w_hs, w2_hs, b2_hs, bh_start)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        q = _load_dot_tile(DQ_base, offs_m, Lq, sql, BLOCK_M, DD, DDP, HAS_DOT)
        do = _load_tile(DO + b * sdob + h * sdoh, offs_m, Lq, sdol, DV, DVP)
        lse, log_l, delta = _row_stats(LSE, LogL, Delta, bh, offs_m, Lq, HAS_BIAS)
        mlp_inv = tl.load(Scale + bh)

        dq = tl.zeros((BLOCK_M, DDP), dtype=tl.float32)
        da = tl.zeros((BLOCK_M, HIDP), dtype=tl.float32)
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
            pd, ds = _tile_probs_grad(A_base, B_base, Ck_base, W_base, W2_base, B2_base, Mask_base, smq, smk,
                                      Bias_base, sxq, sxk, q, k, v, do, lse, log_l, delta, pid_m * BLOCK_M, start_n,
                                      offs_m, offs_n, Lq, Lk, LqP, LkP, bh, dot_scale, mlp_inv, dropout_p,
                                      dropout_scale, seed, HID, HIDP, HID2, HID2P, AUTHORS, ACT, HAS_DOT, HAS_MASK,
                                      HAS_BIAS, CAUSAL, DROPOUT, DOT_DTYPE, UPCAST, UNROLL, HALF, False, BLOCK_M,
                                      BLOCK_N, BLOCK_M, BLOCK_N)
            if HAS_DOT:
                dq += _mm(ds, k, DOT_DTYPE, UPCAST)
            if BIAS_GRAD:  # dL/dbias = dS: written per (batch*head), summed where the bias broadcasts on the host
                ds_ptrs = _pair_ptrs(dBias + (bh - bh_start) * Lq * Lk, Lk, 1, pid_m * BLOCK_M, start_n, offs_m, offs_n,
                                     False)  # fmt: skip
                in_range = (offs_m[:, None] < Lq) & (offs_n[None, :] < Lk)
                if BIAS_ACC:  # one program per slot in a launch, launches in order: no race, deterministic
                    tl.store(ds_ptrs, ds + tl.load(ds_ptrs, mask=in_range, other=0.0), mask=in_range)
                else:
                    tl.store(ds_ptrs, ds, mask=in_range)
            da, dw_unused, dw2_unused, db2_unused = _tile_mlp_backward(
                ds, A_base, B_base, W_base, W2_base, B2_base, offs_m, offs_n, Lq, Lk, LqP, LkP, da, dw_unused,
                dw2_unused, db2_unused, HID, HIDP, HID2, HID2P, AUTHORS, ACT, False, UNROLL, HALF, False, BLOCK_M,
                BLOCK_N, DOT_DTYPE, UPCAST)

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


# Tiles of the paper MLP by ``width``, the widest head size a program keeps a tile row of (the value's, or the dot
# term's query / key, padded to a power of two: 64 for GPT-2, 128 for Llama, 256 for Gemma 3, 512 for Gemma 4's
# global layers), for 16-bit inputs (lean / other / with the dot term) and fp32 inputs; each (rows, columns[, rows the
# backward owns where fewer]). The P @ V accumulator and the value / output gradient tiles grow with the width, and
# the dot term adds two more as wide, so wider heads take fewer rows. From the sm_90 SASS (triton 3.9): the fewest
# instructions per pair without register spills (or with the fewest), each kernel's shared memory within the 99 KiB
# a program gets on sm_86 / sm_89 (RTX 30xx / 40xx, A10, L4; A100: 163 KiB, H100: 227 KiB). 128 x 32 tiles at
# width 256 asked for 104-118 KiB in the backward kernels and spilled 1.8-3 KiB per thread
# (benchmarks/results/sass_sm90/wide_heads*.csv, benchmarks/README.md).
_PAPER_TILES = {  # width: (lean, other, dot term, fp32)
    64: ((128, 32), (64, 32), (64, 32), (32, 32)),
    128: ((64, 64), (64, 32), (64, 32), (16, 32)),
    256: ((64, 32), (64, 32), (32, 32), (16, 32)),
    512: ((32, 32, 16), (32, 32, 16), (16, 16), (16, 16)),
}


def _default_launch(authors: bool, hidden: int, interpreting: bool, backward: bool, *, lean: bool = True,
                    dot: bool = False, fp32: bool = False, width: int = 64) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, unroll) for the forward kernel, or (own, step, num_warps, unroll) for the two
    backward kernels (each owns blocks of ``own`` positions -- queries or keys -- and steps over the other side).

    ``unroll``: hidden units per iteration of the paper MLP's loop (ignored by the authors' MLP). ``lean``: relu
    without the residual dot term and with at most one of a mask, a score bias and dropout; ``dot``: with the
    residual dot term; ``fp32``: fp32 inputs (their dots run on CUDA cores and take more registers); ``width``: the
    widest head size a tile row holds (the value's or the dot term's, a power of two; see ``_PAPER_TILES``; wider
    than 512 takes 512's tiles).

    Authors' MLP up to d' = 8: the tiles of the fastest ``benchmarks/bench_triton_gpu.py --tune`` launches on an H100
    (bf16, causal, n = 4096, 12 heads of 64; benchmarks/results/gpu_h100/run2; since then the key-side backward's
    tile is transposed, same size); wider, the GEMM form's from the SASS (not yet timed). Paper MLP at width 64: not
    yet timed on a GPU in this form; chosen from the sm_90 SASS (triton 3.6) as the fewest instructions per (pair,
    hidden unit) without register spills: 128 owned rows give a thread 4 rows x 8 columns of the MMA layout (12 column
    loads per unit for 32 pairs; 64 rows: 10 for 16); the heavier variants spill at 128 rows and take 64 (32 in fp32).
    Compiled with unit strides specialised, as the launcher does (triton 3.9, bf16, d' = 2 and 16), a mask or a
    score bias alone spills nothing at 128 rows and saves 4-22% of the instructions per pair against 64; the dot
    term, or two of mask, bias and dropout, spill there (``results/sass_sm90/score_bias.csv``, benchmarks/README.md).
    """
    if interpreting:
        return 16, 16, 4, 1
    if authors:  # the authors' MLP keeps (BM, BN, hidden) tiles live: smaller tiles
        if hidden <= _AUTHORS_GEMM_FROM.value and width <= 256:  # 32 x 32 at width 512: 100 KiB shared (sm_86)
            return 32, 32, 4, 1
        # the GEMM form, from the SASS (triton 3.6): 16 x 16 spills least of the tiles tried. Spill bytes per
        # thread, forward / key-side / query-side backward: sm_90 d' = 16: 0 / 320 / 0 (16 x 32: 72 / 1232 / 584),
        # d' = 32: 0 / 720 / 296 (544 / 1504 / 1112); sm_80 d' = 16: 208 / 376 / 0 (2304 / 2256 / 272). Instructions
        # per pair within 5% of 16 x 32 (fewer at d' = 32). Not yet timed on a GPU.
        return 16, 16, 4, 1
    tiles = _PAPER_TILES[min(max(width, 64), 512)]
    rows, cols, *backward_rows = tiles[3 if fp32 else 0 if lean else 2 if dot else 1]
    return (backward_rows[0] if backward and backward_rows else rows), cols, 4, 2


def _head_weight(w: torch.Tensor, heads: int, name: str, tail: tuple[int, ...]) -> tuple[torch.Tensor, int]:
    """fp32 contiguous copy with a leading heads-or-1 dim; returns (tensor, per-head element stride)."""
    if w.dim() == len(tail):
        w = w.unsqueeze(0)
    if w.dim() != len(tail) + 1 or tuple(w.shape[1:]) != tail or w.shape[0] not in (1, heads):
        raise ValueError(f"{name} must have shape (heads or 1, {', '.join(map(str, tail))}); got {tuple(w.shape)}")
    w = w.detach().to(torch.float32).contiguous()
    return w, (0 if w.shape[0] == 1 else math.prod(tail))


def _finite_abs_max(x: torch.Tensor) -> torch.Tensor:
    """max |x| over the finite entries of each (batch, head): ``(batch, heads, len, hidden)`` -> ``(batch, heads)``."""
    return torch.where(torch.isfinite(x), x.abs(), 0.0).amax(dim=(2, 3))


def _paper_operands(query_hidden, key_hidden, W, relu, hidden_pad, length_pad, visible=(None, None), half=False):
    """Kernel operands of the paper MLP: fp32 column-major A / B copies, the per-key constant and the kernel's w.

    query_hidden A (batch, heads, q_len, hidden), key_hidden B (batch, heads, k_len, hidden), W (heads or 1, hidden)
    fp32; ``visible`` = ``visible_rows(mask, causal, ...)``. Returns (a, b, Ck, W_kernel): a (batch*heads,
    hidden_pad, LqP), b (batch*heads, hidden_pad, LkP) zero-padded, the lengths rounded up to multiples of
    ``length_pad`` (so the kernels' per-unit column loads need no masks), Ck (batch*heads, LkP) and W_kernel (heads
    or 1, hidden_pad). relu: a, b, Ck and sign(w) of ``relu_signed_max_operands`` (the kernels compute
    sign(w) max(a, b) + Ck and read relu' = [a > b]); other activations: a = A, b = B, W itself, Ck empty. Rows no
    pair sees are zero. O(n * hidden) memory. ``half`` (relu only): a and b are fp16, each (batch, head) multiplied
    by a power of two that puts its largest finite magnitude in (2^11, 2^12] (fp16 sums of up to 8 units cannot
    overflow; an inf or NaN stays in its own head, as in fp32, and one head's large operands do not push another's
    towards fp16's subnormals). The fifth item is that factor's inverse per (batch, head) (1 without ``half``), a
    (batch*heads,) fp32 tensor: the kernels unscale on the device, no host sync.
    """
    batch, heads, q_len, hidden = query_hidden.shape
    k_len = key_hidden.shape[2]
    q_visible, k_visible = visible
    if relu:
        A, B, W, ck = relu_signed_max_operands(query_hidden, key_hidden, W, q_visible, k_visible)
    else:
        A = zero_invisible_rows(query_hidden.float(), q_visible)
        B = zero_invisible_rows(key_hidden.float(), k_visible)
    inverse = A.new_ones(batch * heads)
    if half:
        largest = torch.maximum(_finite_abs_max(A), _finite_abs_max(B))  # (batch, heads)
        # clamped: 2^±exponent stays a normal fp32 number (all-subnormal operands are ~0 in fp16 anyway)
        exponent = torch.where(largest > 0, torch.ceil(torch.log2(largest)) - 12, 0.0).clamp(-110, 116)
        scale = torch.exp2(-exponent)[:, :, None, None]
        A, B, inverse = A * scale, B * scale, torch.exp2(exponent).reshape(-1)
    rounded = lambda n: -(-n // length_pad) * length_pad  # noqa: E731
    dtype = torch.float16 if half else torch.float32
    a = A.new_zeros(batch * heads, hidden_pad, rounded(q_len), dtype=dtype)
    b = A.new_zeros(batch * heads, hidden_pad, rounded(k_len), dtype=dtype)
    a[:, :hidden, :q_len] = A.transpose(-1, -2).reshape(batch * heads, hidden, q_len)
    b[:, :hidden, :k_len] = B.transpose(-1, -2).reshape(batch * heads, hidden, k_len)
    Ck = A.new_zeros(batch * heads, b.shape[-1] if relu else 1)
    if relu:
        Ck[:, :k_len] = ck.reshape(batch * heads, k_len)
    W = torch.nn.functional.pad(W, (0, hidden_pad - hidden))  # zero weights for the padding units
    return a, b, Ck, W, inverse


def _launch_args(query_hidden, key_hidden, value, output_weight, second_weight, second_bias, dot_query, dot_key,
                 mask, cfg, visible=(None, None), score_bias=None):
    """Kernel-ready tensors, the leading scalar arguments shared by the three kernels, and the constexprs.

    Returns (tensors, scalars, constexprs, launch): tensors = (A, B, Ck, V, W, W2, B2, DQ, DK, Mask, Bias, Scale)
    with fp32 per-head weights and dummies (never read) for absent optional inputs (Scale: see ``half``
    of `_paper_operands`; Bias: ``score_bias`` (4-D) expanded to (batch, heads, Lq, Lk), an fp32 copy if it is
    float64); scalars = (H, Lq, Lk,
    LqP, LkP, A / B per-(batch, head) strides, V/DQ/DK/Mask/Bias strides, per-head weight strides, dot_scale,
    dropout_p, dropout_scale, seed); launch = {"": forward, "bwd_": backward} (BLOCK_M, BLOCK_N, num_warps,
    unroll), the user's choice or the defaults. Paper MLP: A, B, Ck from `_paper_operands` (LqP / LkP the padded
    lengths) and W padded to HIDP units; authors' MLP: A, B (batch*heads, len, hidden) contiguous, LqP / LkP = Lq / Lk.
    """
    batch, heads, q_len, hidden = query_hidden.shape
    k_len, v_dim = key_hidden.shape[2], value.shape[-1]
    authors, has_dot = second_weight is not None, dot_query is not None
    half = bool(cfg.get("half_mlp"))
    if half and (authors or cfg["activation"] != "relu"):
        what = "the authors' MLP" if authors else f"activation={cfg['activation']!r}"
        raise ValueError(f"half_mlp=True packs the paper MLP's relu units (its signed-max form); it does not apply to "
                         f"{what}: leave half_mlp unset")
    interp = _interpreting()
    # the widest tiles only where they do not spill registers (sm_90): relu without the dot term, and at most one of a
    # mask, a score bias and dropout
    extras = (mask is not None) + (score_bias is not None) + (float(cfg["dropout_p"]) > 0.0)
    lean = cfg["activation"] == "relu" and not has_dot and extras <= 1
    fp32 = value.dtype == torch.float32
    width = _pow2(max(v_dim, dot_query.shape[-1] if has_dot else 1))
    launch = {}
    for prefix, backward in (("", False), ("bwd_", True)):
        defaults = dict(zip(("block_m", "block_n", "num_warps", "unroll"), _default_launch(
            authors, hidden, interp, backward, lean=lean, dot=has_dot, fp32=fp32, width=width), strict=True))
        if not backward:  # decoding (q_len 1) and short prompts: no rows of pure padding (16: the MMA minimum)
            defaults["block_m"] = min(defaults["block_m"], _pow2(q_len, 16))
        if half and not interp:  # each loop iteration converts its fp16 sum to fp32: amortised over 8 units
            defaults["unroll"] = 8
        # backward: its own setting, else the caller's forward setting, else its default
        launch[prefix] = tuple(next((v for v in (cfg.get(prefix + key), cfg.get(key)) if v is not None), default)
                               for key, default in defaults.items())
    hidden_pad = _pow2(hidden)
    for prefix in ("", "bwd_"):  # the kernels unroll at most hidden_pad units
        if half and min(launch[prefix][3], hidden_pad) > 8:
            raise ValueError(f"half_mlp=True sums at most 8 units in fp16 (its operands reach 2^12); got "
                             f"{prefix}unroll={launch[prefix][3]} with d'={hidden}: pass {prefix}unroll <= 8")
    value, dot_query, dot_key = zero_unseen_operands(value, dot_query, dot_key, *visible)
    V = _last_dim_contiguous(value)
    if authors:
        hidden2 = second_weight.shape[-2]
        W, w_hs = _head_weight(output_weight, heads, "output_weight", (hidden2,))
        W2, w2_hs = _head_weight(second_weight, heads, "second_weight", (hidden2, hidden))
        if second_bias is None:
            B2, b2_hs = torch.zeros(1, hidden2, device=V.device, dtype=torch.float32), 0
        else:
            B2, b2_hs = _head_weight(second_bias, heads, "second_bias", (hidden2,))
        A = zero_invisible_rows(query_hidden, visible[0]).contiguous()
        Bk = zero_invisible_rows(key_hidden, visible[1]).contiguous()
        Ck, q_pad, k_pad = W, q_len, k_len  # Ck: an unused dummy
        Scale = torch.ones(batch * heads, device=V.device, dtype=torch.float32)
        a_bs, b_bs = q_len * hidden, k_len * hidden
    else:
        hidden2 = 1
        W, w_hs = _head_weight(output_weight, heads, "output_weight", (hidden,))
        length_pad = max(max(launch[""][:2]), max(launch["bwd_"][:2]))  # every block the kernels step by
        A, Bk, Ck, W, Scale = _paper_operands(query_hidden, key_hidden, W, cfg["activation"] == "relu", hidden_pad,
                                              length_pad, visible, half)  # fmt: skip
        w_hs = 0 if w_hs == 0 else hidden_pad
        W2, w2_hs, B2, b2_hs = W, 0, W, 0  # unused dummies
        q_pad, k_pad = A.shape[-1], Bk.shape[-1]
        a_bs, b_bs = hidden_pad * q_pad, hidden_pad * k_pad
    DQ, DK, dd, dot_strides = A, A, 1, (0,) * 6  # dummies, never read
    if has_dot:
        DQ = _last_dim_contiguous(dot_query)
        DK = _last_dim_contiguous(dot_key.to(DQ.dtype))
        dd, dot_strides = DQ.shape[-1], (*DQ.stride()[:3], *DK.stride()[:3])
    Mask, mstrides = A, (0, 0, 0, 0)
    if mask is not None:
        Mask = mask.to(device=V.device, dtype=torch.uint8).expand(batch, heads, q_len, k_len)
        mstrides = Mask.stride()
    Bias, bias_strides = A, (0, 0, 0, 0)
    if score_bias is not None:  # read in its own dtype (16-bit biases stay 16-bit), added in fp32
        if score_bias.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            score_bias = score_bias.float()
        Bias = score_bias.expand(batch, heads, q_len, k_len)
        bias_strides = Bias.stride()

    bm, bn, _, unroll = launch[""]
    dropout_p = float(cfg["dropout_p"])
    dropout_scale = 0.0 if dropout_p >= 1.0 else 1.0 / (1.0 - dropout_p)
    low = V.dtype if V.dtype in (torch.bfloat16, torch.float16) else torch.float32
    # tensor-core products need dims of 16 at least: the authors' MLP from _AUTHORS_GEMM_FROM on multiplies (pairs,
    # HIDP) by (HIDP, HID2P), the half MLP's backward (16-bit inputs, d' in [_HALF_MMA_FROM, _HALF_MMA_UNTIL]) its
    # masked dS (rows, cols) by (cols, HIDP)
    half_mma = half and _HALF_MMA_FROM.value <= hidden <= _HALF_MMA_UNTIL.value and low != torch.float32
    mma_sums = (authors and hidden > _AUTHORS_GEMM_FROM.value) or half_mma
    mma_pad = 16 if mma_sums else 1
    constexprs = dict(
        HID=hidden, HIDP=max(hidden_pad, mma_pad), HID2=hidden2, HID2P=_pow2(hidden2, mma_pad), AUTHORS=authors,
        ACT=ACTIVATION_CODES[cfg["activation"]], DV=v_dim, DVP=_pow2(v_dim, 16), DD=dd, DDP=_pow2(dd, 16),
        HAS_DOT=has_dot, HAS_MASK=mask is not None, HAS_BIAS=score_bias is not None, CAUSAL=bool(cfg["causal"]),
        DROPOUT=dropout_p > 0.0, DOT_DTYPE=_TL_DTYPES[low], UPCAST=interp, UNROLL=min(unroll, hidden_pad), HALF=half,
        BLOCK_M=bm, BLOCK_N=bn,
    )  # fmt: skip
    scalars = (heads, q_len, k_len, q_pad, k_pad, a_bs, b_bs, *V.stride()[:3], *dot_strides, *mstrides,
               *bias_strides, w_hs, w2_hs, b2_hs, float(cfg["dot_scale"]), dropout_p, dropout_scale,
               int(cfg["seed"]))  # fmt: skip
    return (A, Bk, Ck, V, W, W2, B2, DQ, DK, Mask, Bias, Scale), scalars, constexprs, launch


def _backward_constexprs(constexprs: dict, launch: tuple[int, int, int, int]) -> tuple[dict, dict]:
    """Constexprs of the key-side and the query-side backward kernels for ``launch`` = (own, step, num_warps,
    unroll): each kernel owns blocks of ``own`` positions (keys / queries) and steps over the other side by ``step``;
    the kernels name the query block BLOCK_M and the key block BLOCK_N."""
    own, step, _, unroll = launch
    # (at most the units the operands are padded to: HIDP may be wider, padded for the tensor cores)
    query_side = dict(constexprs, BLOCK_M=own, BLOCK_N=step, UNROLL=min(unroll, _pow2(constexprs["HID"])))
    return dict(query_side, BLOCK_M=step, BLOCK_N=own), query_side


_LAUNCH_KEYS = ("block_m", "block_n", "num_warps", "unroll", "bwd_block_m", "bwd_block_n", "bwd_num_warps",
                "bwd_unroll", "half_mlp")
# the ops' names carry the kernel's source hash: a Hub checkpoint's copy of another version must not reuse them
_OP_TAG = source_tag(__file__)


def _config(activation: str, causal: bool, dot_scale: float, dropout_p: float, seed: torch.Tensor,
            launch: list[int]) -> dict:
    """The host-side settings ``_launch_args`` reads; ``launch`` lists ``_LAUNCH_KEYS``, -1 for the default."""
    tuning = {key: (None if value < 0 else value) for key, value in zip(_LAUNCH_KEYS, launch, strict=True)}
    return dict(activation=activation, causal=causal, dot_scale=dot_scale, dropout_p=dropout_p, seed=int(seed),
                **tuning)


def _forward_fake(query_hidden, key_hidden, value, output_weight, second_weight, second_bias, dot_query, dot_key,
                  score_bias, *args):  # fmt: skip
    batch, heads, q_len, _ = query_hidden.shape
    return (value.new_empty(batch, heads, q_len, value.shape[-1], dtype=torch.float32),
            value.new_empty(1 if score_bias is None else 2, batch * heads, q_len, dtype=torch.float32))  # fmt: skip


@kernel_op(f"triton_forward_{_OP_TAG}", _forward_fake)
def _triton_forward(
    query_hidden: torch.Tensor, key_hidden: torch.Tensor, value: torch.Tensor, output_weight: torch.Tensor,
    second_weight: torch.Tensor | None, second_bias: torch.Tensor | None, dot_query: torch.Tensor | None,
    dot_key: torch.Tensor | None, score_bias: torch.Tensor | None, mask: torch.Tensor | None, activation: str,
    causal: bool, dot_scale: float, dropout_p: float, seed: torch.Tensor, launch: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, stats)``: ``(batch, heads, q_len, v_dim)`` fp32 and the row statistics, fp32: ``(1, batch * heads,
    q_len)``, the log-sum-exp, or with a ``score_bias`` ``(2, batch * heads, q_len)``, the row max and the log
    denominator (see `_fwd_kernel`).

    The output stays fp32 (the caller rounds it): the backward's delta = rowsum(dO * O) needs the unrounded O, or
    sum_j dS_ij = 0 breaks by O's rounding error (bf16: the scorer's bias gradients, which live on that
    cancellation, came out several times (up to ~10x) further from the fp32 truth than the other backends' did under
    bf16 autocast). For the same reason P enters ``P @ V`` as two 16-bit MMA operands when the values are 16-bit
    (one more MMA per tile): with P rounded once to bf16, O's error of ~2^-9 still reached the scorer's weight
    gradients, amplified by the mean of the hidden activations (on a 9 x 17 test tile 0.5% of the largest entry;
    split, nothing beyond the gradient's own rounding to bf16). Inference too, so that an output does not depend on
    whether gradients are enabled (reentrant activation checkpointing runs the forward without, then again with)."""
    cfg = _config(activation, causal, dot_scale, dropout_p, seed, launch)
    batch, heads, q_len, _ = query_hidden.shape
    # rows no pair sees are zeroed in the scorer's operands: garbage there must not reach visible rows or dw
    visible = visible_rows(mask, causal, q_len, key_hidden.shape[2], value.device)
    tensors, scalars, constexprs, launch_ = _launch_args(query_hidden, key_hidden, value, output_weight, second_weight,
                                                         second_bias, dot_query, dot_key, mask, cfg, visible,
                                                         score_bias)  # fmt: skip
    Out = torch.empty(batch, heads, q_len, value.shape[-1], device=value.device, dtype=torch.float32)
    stats = torch.empty(1 if score_bias is None else 2, batch * heads, q_len, device=value.device, dtype=torch.float32)
    grid = (triton.cdiv(q_len, constexprs["BLOCK_M"]), batch * heads)
    _fwd_kernel[grid](*tensors, *scalars, Out, stats[0], stats[-1], *Out.stride()[:3], num_warps=launch_[""][2],
                      **constexprs)  # fmt: skip
    return Out, stats


def _like_or_empty(tensor: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0) if tensor is None else torch.empty_like(tensor, memory_format=torch.contiguous_format)


def _backward_fake(query_hidden, key_hidden, value, output_weight, second_weight, second_bias, dot_query, dot_key,
                   score_bias, mask, Out, stats, grad_out, activation, causal, dot_scale, dropout_p, seed, bias_grad,
                   launch):  # fmt: skip
    return tuple(_like_or_empty(t, value) for t in (query_hidden, key_hidden, value, output_weight, second_weight,
                                                   second_bias, dot_query, dot_key,
                                                   score_bias if bias_grad else None))  # fmt: skip


@kernel_op(f"triton_backward_{_OP_TAG}", _backward_fake)
def _triton_backward(
    query_hidden: torch.Tensor, key_hidden: torch.Tensor, value: torch.Tensor, output_weight: torch.Tensor,
    second_weight: torch.Tensor | None, second_bias: torch.Tensor | None, dot_query: torch.Tensor | None,
    dot_key: torch.Tensor | None, score_bias: torch.Tensor | None, mask: torch.Tensor | None, Out: torch.Tensor,
    stats: torch.Tensor, grad_out: torch.Tensor, activation: str, causal: bool, dot_scale: float, dropout_p: float,
    seed: torch.Tensor, bias_grad: bool, launch: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor]:
    """Gradients of the nine differentiable inputs, each shaped and typed like its input (empty for an absent
    one, and for ``score_bias`` unless ``bias_grad``: a mask-derived bias or a fixed ALiBi buffer needs none). The
    kernels' operands are rebuilt from the inputs (O(n * hidden), as in the forward) rather than kept. The bias's
    gradient is dS, written whole into an fp32 ``(rows, heads, q_len, k_len)`` buffer, then summed over the dims the
    bias broadcasts along (``bias_grad_rows``: all rows in one launch, unless the bias is shared across the batch and
    the whole batch's dS would pass ``BIAS_GRAD_BUFFER_BYTES``: then launches of ``rows`` batch rows add to it)."""
    cfg = _config(activation, causal, dot_scale, dropout_p, seed, launch)
    batch, heads, q_len, _ = query_hidden.shape
    k_len = key_hidden.shape[2]
    visible = visible_rows(mask, causal, q_len, k_len, value.device)
    tensors, scalars, constexprs, launch_ = _launch_args(query_hidden, key_hidden, value, output_weight, second_weight,
                                                         second_bias, dot_query, dot_key, mask, cfg, visible,
                                                         score_bias)  # fmt: skip
    V = tensors[3]
    own, _, num_warps, _ = launch_["bwd_"]
    kv_ce, ce = _backward_constexprs(constexprs, launch_["bwd_"])
    ce["BIAS_GRAD"] = bias_grad = score_bias is not None and bias_grad
    authors, has_dot, hidden, hidden2, dd = ce["AUTHORS"], ce["HAS_DOT"], ce["HID"], ce["HID2"], ce["DD"]

    dO = _last_dim_contiguous(grad_out.to(V.dtype))
    delta = (dO.float() * Out.float()).sum(-1).reshape(batch * heads, q_len).contiguous()
    n_blocks_n = triton.cdiv(k_len, own)
    f32 = dict(device=V.device, dtype=torch.float32)
    dA = torch.empty(batch, heads, q_len, hidden, **f32)
    dB = torch.empty(batch, heads, k_len, hidden, **f32)
    dV = torch.empty(batch, heads, k_len, ce["DV"], **f32)
    dDQ = torch.empty(batch, heads, q_len, dd, **f32) if has_dot else dA
    dDK = torch.empty(batch, heads, k_len, dd, **f32) if has_dot else dB
    dW_part = torch.empty(batch * heads, n_blocks_n, hidden2 if authors else hidden, **f32)
    dW2_part = torch.empty(batch * heads, n_blocks_n, hidden2, hidden, **f32) if authors else dW_part
    dB2_part = torch.empty(batch * heads, n_blocks_n, hidden2, **f32) if authors else dW_part

    lead = (*tensors, *scalars, dO, *dO.stride()[:3], stats[0], stats[-1], delta)
    parts = (dW_part, dW2_part, dB2_part)
    _bwd_kv_kernel[(n_blocks_n, batch * heads)](*lead, dB, dV, dDK, *parts, n_blocks_n, num_warps=num_warps,
                                                **kv_ce)  # fmt: skip
    # the query side in launches of `rows` batch rows. One launch (all rows) stores dS whole (causal: the tiles the
    # loop skips have dS = 0 and are never written, so zeros); several (a bias shared by the batch) add theirs to the
    # same zeroed (rows, heads, q, k) buffer, which so stays bounded
    rows = bias_grad_rows(batch, heads, q_len, k_len, score_bias.shape) if bias_grad else batch
    ce["BIAS_ACC"] = rows < batch
    dS = ((torch.zeros if cfg["causal"] or rows < batch else torch.empty)(rows, heads, q_len, k_len, **f32)
          if bias_grad else dA)  # fmt: skip
    for b0 in range(0, batch, rows):
        _bwd_q_kernel[(triton.cdiv(q_len, own), min(rows, batch - b0) * heads)](
            *lead, dA, dDQ, dS, b0 * heads, num_warps=num_warps, **ce)

    if not authors and activation == "relu":  # the kernels leave the relu gradients raw (without w)
        W = output_weight.detach().reshape(-1, hidden)  # (heads or 1, hidden)
        dA, dB, dw = relu_grads(query_hidden, key_hidden, dA, dB, W, *visible)
        dW_part = dw.reshape(batch * heads, 1, hidden)

    def summed(part, weight):  # (batch * heads, key blocks, *tail) -> like the weight
        return weight_grad(part.sum(dim=1), batch, heads, weight.shape, weight.dtype)

    # every output a fresh tensor: a custom op's outputs may not alias its inputs or each other
    g_w = summed(dW_part, output_weight)
    g_w2 = summed(dW2_part, second_weight) if authors else value.new_empty(0)
    g_b2 = summed(dB2_part, second_bias) if second_bias is not None else value.new_empty(0)
    g_dq = dDQ.to(dot_query.dtype) if has_dot else value.new_empty(0)
    g_dk = dDK.to(dot_key.dtype) if has_dot else value.new_empty(0)
    g_bias = sum_to_bias_shape(dS, score_bias.shape).to(score_bias.dtype) if bias_grad else value.new_empty(0)
    return (dA.to(query_hidden.dtype), dB.to(key_hidden.dtype), dV.to(value.dtype), g_w.contiguous(),
            g_w2.contiguous(), g_b2.contiguous(), g_dq, g_dk, g_bias.contiguous())  # fmt: skip


class _NeuralAttentionTriton(torch.autograd.Function):
    """The three Triton kernels as two custom ops (``_triton_forward``, ``_triton_backward``): torch.compile keeps
    them as opaque calls instead of tracing the host-side launch code."""

    @staticmethod
    @autocast_off
    def forward(ctx, query_hidden, key_hidden, value, output_weight, second_weight, second_bias, dot_query, dot_key,
                score_bias, mask, cfg):  # fmt: skip
        inputs = (query_hidden, key_hidden, value, output_weight, second_weight, second_bias, dot_query, dot_key,
                  score_bias)  # fmt: skip
        settings = (cfg["activation"], cfg["causal"], cfg["dot_scale"], cfg["dropout_p"], cfg["seed"])
        Out, stats = _triton_forward(*inputs, mask, *settings, cfg["launch"])
        ctx.save_for_backward(*inputs, mask, Out, stats)
        ctx.settings, ctx.launch = settings, cfg["launch"]
        return Out if Out.dtype == value.dtype else Out.to(value.dtype)  # no no-op .to(): see _NeuralAttentionFunction

    @staticmethod
    @once_differentiable_always  # the backward kernels are not differentiable: a second derivative must raise
    @autocast_off
    def backward(ctx, grad_out):
        *inputs, mask, Out, stats = ctx.saved_tensors
        bias_grad = inputs[8] is not None and ctx.needs_input_grad[8]  # no (b, h, q, k) buffer for a fixed bias
        grads = _triton_backward(*inputs, mask, Out, stats, grad_out, *ctx.settings, bias_grad, ctx.launch)
        grads = (*grads[:8], grads[8] if bias_grad else None)
        return (*(None if t is None else g for t, g in zip(inputs, grads, strict=True)), None, None)


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
    generator_seed: int | torch.Tensor | None = None,
    score_bias: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    unroll: int | None = None,
    bwd_block_m: int | None = None,
    bwd_block_n: int | None = None,
    bwd_num_warps: int | None = None,
    bwd_unroll: int | None = None,
    half_mlp: bool = False,
) -> torch.Tensor:
    """Fused Triton Neural Attention (see the KERNEL CONTRACT in docs/design.md).

    Extra keyword-only tuning knobs (not part of the contract): ``block_m`` / ``block_n`` (powers of two,
    >= 16), ``num_warps`` and ``unroll`` (paper MLP: hidden units per loop iteration, a power of two) of the
    forward kernel; ``bwd_*`` the same for the two backward kernels (``None``: the forward setting where one is
    given; a backward program owns ``bwd_block_m`` positions -- queries in the query-side kernel, keys in the key-side
    one -- and steps over the other side by ``bwd_block_n``). ``None``: the default for this MLP and d'.
    ``half_mlp`` (paper MLP with relu): compute the scores' per-pair MLP in fp16, two pairs per instruction (each
    loop iteration's units summed in fp16, forward and the backward's recompute); with bf16 / fp16 inputs and
    8 <= d' <= 16 the backward's relu-mask gradient sums run on the tensor cores (per unit, the masked dS tile times
    a one-hot column, dS rounded to bf16: once for bf16 inputs, as hi + lo parts for fp16), otherwise in fp32. The
    softmax, ``P @ V`` and every accumulator stay fp32. Fewer instructions per pair, at fp16 precision of the scores
    (see benchmarks/README.md for the measured error).
    A ``score_bias`` (float, broadcastable to ``(batch, heads, q_len, k_len)``) is read tile by tile in its own dtype
    and added to the fp32 scores; its gradient, when it requires one, is dS, which the query-side backward writes
    whole and the host sums where the bias broadcasts: a ``(batch, heads, q_len, k_len)`` fp32 buffer, or for a bias
    shared by the batch (T5's) one of ``bias_grad_rows`` batch rows that launches of as many rows add to (at most
    ``BIAS_GRAD_BUFFER_BYTES``, or one row).
    Returns (batch, heads, q_len, v_dim) in value's dtype.
    """
    if not TRITON_AVAILABLE:
        raise RuntimeError("neural_attention_triton needs the `triton` package (pip install triton)")
    # shapes, mask dtype, dropout range: the contract's checks, shared with every kernel (ValueError / TypeError)
    check_kernel_inputs(query_hidden, key_hidden, value, output_weight, second_weight, second_bias, activation, mask,
                        dot_query, dot_key, dropout_p, score_bias)  # fmt: skip
    batch, heads, q_len, hidden = query_hidden.shape
    k_len = key_hidden.shape[2]
    if value.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"value dtype {value.dtype} is not supported (float32, bfloat16, float16)")
    blocks = {"block_m": block_m, "block_n": block_n, "bwd_block_m": bwd_block_m, "bwd_block_n": bwd_block_n}
    for name, size in blocks.items():
        if size is not None and (size < 16 or size & (size - 1)):
            raise ValueError(f"{name}={size}: block sizes must be powers of two >= 16 (16, 32, 64, ...), or None for "
                             "the tuned default")
    for u in (unroll, bwd_unroll):
        if u is not None and (u < 1 or u & (u - 1)):
            raise ValueError("unroll must be a power of two >= 1")

    inputs = (query_hidden, key_hidden, value, output_weight, second_weight, second_bias, dot_query, dot_key,
              score_bias)  # fmt: skip
    if q_len == 0 or k_len == 0 or batch * heads == 0:
        return empty_attention(inputs)
    if score_bias is not None:
        score_bias = as_4d(score_bias)
    tuning = (block_m, block_n, num_warps, unroll, bwd_block_m, bwd_block_n, bwd_num_warps, bwd_unroll,
              1 if half_mlp else None)
    cfg = dict(activation=activation, causal=bool(causal), dot_scale=float(dot_scale), dropout_p=float(dropout_p),
               seed=seed_tensor(dropout_p, generator_seed, bound=2**31 - 1),
               launch=[-1 if setting is None else int(setting) for setting in tuning])  # fmt: skip
    return _NeuralAttentionTriton.apply(*inputs[:8], score_bias, mask, cfg)
