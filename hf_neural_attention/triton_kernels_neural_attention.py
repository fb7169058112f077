"""The Triton kernels of the fused GPU backend (device code); ``triton_neural_attention.py`` launches them.

Three kernels: ``fwd_kernel`` (grid: query block x batch*heads; loops over key blocks with an online softmax),
``bwd_kv_kernel`` (grid: key block x batch*heads; dB, dV, the dot term's dK and per-program partial sums of the
scorer-weight gradients) and ``bwd_q_kernel`` (grid: query block x batch*heads; dA, dQ and a score bias's dS). The
``@triton.jit`` helpers above them score a tile (the per-pair MLP from the query-side ``A`` and key-side ``B``),
mask it, add a score bias, draw dropout and run the MLP's backward on a tile.

This file travels with Hub checkpoints: it imports only (optionally) triton, and importing it never fails when triton
is missing (``TRITON_AVAILABLE`` is then False, and no kernel is defined).
"""

from __future__ import annotations

try:  # triton is optional: importing this module must never fail without it
    import triton
    import triton.language as tl

    TRITON_AVAILABLE = True
except ImportError:  # pragma: no cover - exercised only on machines without triton
    triton = None
    tl = None
    TRITON_AVAILABLE = False

# authors' MLP: from this width on (d' > 8) its second layer runs as a tensor-core GEMM (see `_authors_layers`)
AUTHORS_GEMM_FROM = tl.constexpr(8) if TRITON_AVAILABLE else None
# half_mlp with 16-bit inputs: for d' in [HALF_MMA_FROM, HALF_MMA_UNTIL] the backward sums its relu masks on the
# tensor cores (see `_tile_mlp_backward`). Narrower, the per-unit MMAs cost more than the reductions they replace
# (sm_90 SASS); wider, the d' one-hots of (cols, d') each that stay in shared memory outgrow it (d' = 64: 284 KB).
HALF_MMA_FROM = tl.constexpr(8) if TRITON_AVAILABLE else None
HALF_MMA_UNTIL = tl.constexpr(16) if TRITON_AVAILABLE else None


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
    def _tanh(x):
        """tanh(x) to a few ulp without libdevice, which the interpreter lacks: (1 - e) / (1 + e), e = exp(-2|x|) (one
        ex2, one approximate division), which cancels near 0, where the odd Taylor series to x^7 takes over (its
        truncation error below 1e-9 relative for |x| < 1/8). 3.3e-7 relative at most on the interpreter."""
        ax = tl.abs(x)
        e = _exp(-2.0 * ax)
        x2 = x * x
        near_zero = ax * (1.0 + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333 + x2 * -0.05396825396825397)))
        t = tl.where(ax < 0.125, near_zero, tl.fdiv(1.0 - e, 1.0 + e, approx=True))
        return tl.where(x < 0.0, -t, t)

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

        HAS_BIAS: (row max, log denominator, delta) instead, kept apart (see `fwd_kernel`).
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
        W2[r]  (HIDP,)); for narrow MLPs (see `AUTHORS_GEMM_FROM`)."""
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
        `AUTHORS_GEMM_FROM` picks the form). z, which decides the relu kinks of the forward and both backward
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
        if AUTHORS and HID > AUTHORS_GEMM_FROM:
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
                         dot_scale, mlp_inv, dropout_p, dropout_scale, seed, softcap, HID: tl.constexpr,
                         HIDP: tl.constexpr, HID2: tl.constexpr, HID2P: tl.constexpr, AUTHORS: tl.constexpr,
                         ACT: tl.constexpr, HAS_DOT: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr,
                         CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, DOT_DTYPE: tl.constexpr, UPCAST: tl.constexpr,
                         UNROLL: tl.constexpr, HALF: tl.constexpr, CAP: tl.constexpr, KEY_ROWS: tl.constexpr,
                         BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
        """Recompute P of one (ROWS, COLS) tile from the stored row statistics (`_row_stats`); return (P after dropout,
        dS = dL/dscores, dS before the cap = dS * (1 - tanh^2): what reaches the MLP and the dot term; dS itself
        without CAP). The score bias, added after the cap, takes dS.

        (ROWS, COLS) = (BLOCK_K, BLOCK_Q) when KEY_ROWS, else (BLOCK_Q, BLOCK_K).
        """
        s = _tile_scores(A_base, B_base, Ck_base, W_base, W2_base, B2_base, q, k, offs_q, offs_k, Lq, Lk, LqP, LkP,
                         dot_scale, mlp_inv, ROWS, COLS, HID, HIDP, HID2, HID2P, AUTHORS, ACT, HAS_DOT, DOT_DTYPE,
                         UPCAST, UNROLL, HALF, KEY_ROWS)
        if CAP:
            t = _tanh(s * (1.0 / softcap))  # (a scalar reciprocal: no division per pair)
            s = softcap * t
        s = _add_bias(s, Bias_base, sxq, sxk, start_q, start_k, offs_q, offs_k, Lq, Lk, HAS_BIAS, KEY_ROWS)
        # rows with no visible key (and rows past Lq) have lse = +inf: p = 0 there without a mask
        s = _masked(s, float("-inf"), start_q, start_k, offs_q, offs_k, Lq, Lk, Mask_base, smq, smk, CAUSAL,
                    HAS_MASK, BLOCK_Q, BLOCK_K, KEY_ROWS)  # before exp: scores of padded keys may be large
        if KEY_ROWS:
            if HAS_BIAS:  # (s - max) first: exact where a huge negative bias covers the row (see `fwd_kernel`)
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
        if CAP:
            ds_score = ds * (1.0 - t * t)
        else:
            ds_score = ds
        return pd, ds, ds_score

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
        if AUTHORS and HID > AUTHORS_GEMM_FROM:  # GEMMs over the tile's pairs on the tensor cores
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
        elif HALF and HID >= HALF_MMA_FROM and HID <= HALF_MMA_UNTIL and DOT_DTYPE != tl.float32:
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
                    # HALF (relu, d' < HALF_MMA_FROM): the fp16 operands back in fp32, the arithmetic as without HALF
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
    def fwd_kernel(A, B, Ck, V, W, W2, B2, DQ, DK, Mask, Bias, Scale, H, Lq, Lk, LqP, LkP, sab, sbb, svb, svh, svl,
                    sqb, sqh, sql, skb, skh, skl, smb, smh, smq, smk, sxb, sxh, sxq, sxk, w_hs, w2_hs, b2_hs,
                    dot_scale, dropout_p, dropout_scale, seed, softcap, Out, LSE, LogL, sob, soh, sol,
                    HID: tl.constexpr, HIDP: tl.constexpr, HID2: tl.constexpr, HID2P: tl.constexpr,
                    AUTHORS: tl.constexpr, ACT: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr,
                    DD: tl.constexpr, DDP: tl.constexpr, HAS_DOT: tl.constexpr, HAS_MASK: tl.constexpr,
                    HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, DOT_DTYPE: tl.constexpr,
                    UPCAST: tl.constexpr, UNROLL: tl.constexpr, HALF: tl.constexpr, CAP: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
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
            if CAP:  # Gemma 2's soft-capping: of the neural (+ dot) score, before the bias and the mask
                s = softcap * _tanh(s * (1.0 / softcap))
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
    def bwd_kv_kernel(A, B, Ck, V, W, W2, B2, DQ, DK, Mask, Bias, Scale, H, Lq, Lk, LqP, LkP, sab, sbb, svb, svh,
                       svl, sqb, sqh, sql, skb, skh, skl, smb, smh, smq, smk, sxb, sxh, sxq, sxk, w_hs, w2_hs, b2_hs,
                       dot_scale, dropout_p, dropout_scale, seed, softcap, DO, sdob, sdoh, sdol, LSE, LogL, Delta, dB,
                       dV, dDK,
                       dW_part, dW2_part, dB2_part, n_blocks_n,
                       HID: tl.constexpr, HIDP: tl.constexpr, HID2: tl.constexpr, HID2P: tl.constexpr,
                       AUTHORS: tl.constexpr, ACT: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr,
                       DD: tl.constexpr, DDP: tl.constexpr, HAS_DOT: tl.constexpr, HAS_MASK: tl.constexpr,
                       HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, DOT_DTYPE: tl.constexpr,
                       UPCAST: tl.constexpr, UNROLL: tl.constexpr, HALF: tl.constexpr, CAP: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
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
            pd, _ds_bias, ds = _tile_probs_grad(A_base, B_base, Ck_base, W_base, W2_base, B2_base, Mask_base, smq, smk,
                                                Bias_base, sxq, sxk, q, k, v, do, lse, log_l, delta, start_m,
                                                pid_n * BLOCK_N, offs_m, offs_n, Lq, Lk, LqP, LkP, bh, dot_scale,
                                                mlp_inv, dropout_p, dropout_scale, seed, softcap, HID, HIDP, HID2,
                                                HID2P, AUTHORS, ACT, HAS_DOT, HAS_MASK, HAS_BIAS, CAUSAL, DROPOUT,
                                                DOT_DTYPE, UPCAST, UNROLL, HALF, CAP, True, BLOCK_M, BLOCK_N, BLOCK_N,
                                                BLOCK_M)
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
    def bwd_q_kernel(A, B, Ck, V, W, W2, B2, DQ, DK, Mask, Bias, Scale, H, Lq, Lk, LqP, LkP, sab, sbb, svb, svh,
                      svl, sqb, sqh, sql, skb, skh, skl, smb, smh, smq, smk, sxb, sxh, sxq, sxk, w_hs, w2_hs, b2_hs,
                      dot_scale, dropout_p, dropout_scale, seed, softcap, DO, sdob, sdoh, sdol, LSE, LogL, Delta, dA,
                      dDQ, dBias,
                      bh_start, HID: tl.constexpr, HIDP: tl.constexpr, HID2: tl.constexpr, HID2P: tl.constexpr,
                      AUTHORS: tl.constexpr, ACT: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr,
                      DD: tl.constexpr, DDP: tl.constexpr, HAS_DOT: tl.constexpr, HAS_MASK: tl.constexpr,
                      HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, DOT_DTYPE: tl.constexpr,
                      UPCAST: tl.constexpr, UNROLL: tl.constexpr, HALF: tl.constexpr, CAP: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
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
            pd, ds_bias, ds = _tile_probs_grad(A_base, B_base, Ck_base, W_base, W2_base, B2_base, Mask_base, smq, smk,
                                               Bias_base, sxq, sxk, q, k, v, do, lse, log_l, delta, pid_m * BLOCK_M,
                                               start_n, offs_m, offs_n, Lq, Lk, LqP, LkP, bh, dot_scale, mlp_inv,
                                               dropout_p, dropout_scale, seed, softcap, HID, HIDP, HID2, HID2P,
                                               AUTHORS, ACT, HAS_DOT, HAS_MASK, HAS_BIAS, CAUSAL, DROPOUT, DOT_DTYPE,
                                               UPCAST, UNROLL, HALF, CAP, False, BLOCK_M, BLOCK_N, BLOCK_M, BLOCK_N)
            if HAS_DOT:
                dq += _mm(ds, k, DOT_DTYPE, UPCAST)
            if BIAS_GRAD:  # dL/dbias = dS (after the cap): written per (batch*head), summed where the bias broadcasts
                ds_ptrs = _pair_ptrs(dBias + (bh - bh_start) * Lq * Lk, Lk, 1, pid_m * BLOCK_M, start_n, offs_m, offs_n,
                                     False)  # fmt: skip
                in_range = (offs_m[:, None] < Lq) & (offs_n[None, :] < Lk)
                if BIAS_ACC:  # one program per slot in a launch, launches in order: no race, deterministic
                    tl.store(ds_ptrs, ds_bias + tl.load(ds_ptrs, mask=in_range, other=0.0), mask=in_range)
                else:
                    tl.store(ds_ptrs, ds_bias, mask=in_range)
            da, dw_unused, dw2_unused, db2_unused = _tile_mlp_backward(
                ds, A_base, B_base, W_base, W2_base, B2_base, offs_m, offs_n, Lq, Lk, LqP, LkP, da, dw_unused,
                dw2_unused, db2_unused, HID, HIDP, HID2, HID2P, AUTHORS, ACT, False, UNROLL, HALF, False, BLOCK_M,
                BLOCK_N, DOT_DTYPE, UPCAST)

        _store_tile(dA + bh * Lq * HID, offs_m, Lq, HID, da, HID, HIDP)
        if HAS_DOT:
            _store_tile(dDQ + bh * Lq * DD, offs_m, Lq, DD, dq * dot_scale, DD, DDP)

# fmt: on

if not TRITON_AVAILABLE:  # the launcher imports these names whether or not triton is there (it never launches then)
    fwd_kernel = bwd_kv_kernel = bwd_q_kernel = None
