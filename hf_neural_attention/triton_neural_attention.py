"""Fused Triton GPU backend for Neural Attention (arXiv 2502.17206).

Implements the KERNEL CONTRACT of ``docs/design.md``::

    neural_attention_triton(query_hidden, key_hidden, value, output_weight,
                            second_weight=None, second_bias=None, *, activation="relu",
                            mask=None, causal=False, dot_query=None, dot_key=None,
                            dot_scale=1.0, dropout_p=0.0, generator_seed=None, score_bias=None,
                            sinks=None, softcap=None) -> Tensor

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
* ``softcap`` (Gemma 2): a constexpr branch caps each tile's scores before the bias and the mask, and the backward
  multiplies dS by the cap's slope on its way to the MLP and the dot term. ``sinks`` (gpt-oss): folded into each
  row's finished softmax on the host (``fold_sinks``, O(n)), so the kernels' backward recomputes sink-inclusive
  probabilities; the sinks' own gradient is ``sink_grad``'s, on the host.

The kernels themselves (device code) are in ``triton_kernels_neural_attention.py``; this file chooses their launch
settings, prepares their operands, launches them and wraps them as custom ops and an autograd function.

This file travels with Hub checkpoints: it imports only torch, stdlib and its flat siblings
``kernels_neural_attention`` / ``triton_kernels_neural_attention``, and importing it never fails when triton is
missing (``TRITON_AVAILABLE`` is then False).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from .kernels_neural_attention import (
    ACTIVATION_CODES,
    as_4d,
    autocast_off,
    bias_grad_rows,
    check_kernel_inputs,
    check_sinks,
    check_softcap,
    empty_attention,
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
from .triton_kernels_neural_attention import (
    AUTHORS_GEMM_FROM,
    HALF_MMA_FROM,
    HALF_MMA_UNTIL,
    TRITON_AVAILABLE,
    bwd_kv_kernel,
    bwd_q_kernel,
    fwd_kernel,
    tl,
    triton,
)

__all__ = ["TRITON_AVAILABLE", "neural_attention_triton", "triton_is_usable"]


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
        if hidden <= AUTHORS_GEMM_FROM.value and width <= 256:  # 32 x 32 at width 512: 100 KiB shared (sm_86)
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


def _launch_settings(cfg: dict, *, authors: bool, has_dot: bool, has_mask: bool, has_bias: bool, fp32: bool,
                     width: int, q_len: int, hidden: int, interp: bool) -> dict:
    """{"": forward, "bwd_": backward} (BLOCK_M, BLOCK_N, num_warps, unroll): the caller's choice (``cfg``'s
    ``block_m``, ``bwd_block_m``, ...), else the defaults of `_default_launch`; validated against ``half_mlp``."""
    half = bool(cfg.get("half_mlp"))
    if half and (authors or cfg["activation"] != "relu"):
        what = "the authors' MLP" if authors else f"activation={cfg['activation']!r}"
        raise ValueError(f"half_mlp=True packs the paper MLP's relu units (its signed-max form); it does not apply to "
                         f"{what}: leave half_mlp unset")
    # the widest tiles only where they do not spill registers (sm_90): relu without the dot term, and at most one of a
    # mask, a score bias and dropout
    extras = has_mask + has_bias + (float(cfg["dropout_p"]) > 0.0)
    lean = cfg["activation"] == "relu" and not has_dot and extras <= 1
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
        # the kernels unroll at most hidden_pad units
        if half and min(launch[prefix][3], _pow2(hidden)) > 8:
            raise ValueError(f"half_mlp=True sums at most 8 units in fp16 (its operands reach 2^12); got "
                             f"{prefix}unroll={launch[prefix][3]} with d'={hidden}: pass {prefix}unroll <= 8")
    return launch


def _scorer_operands(query_hidden, key_hidden, output_weight, second_weight, second_bias, cfg, launch, visible,
                     device):  # fmt: skip
    """The scorer's kernel tensors and their strides.

    Returns ((A, B, Ck, W, W2, B2, Scale), (q_pad, k_pad), (a_bs, b_bs, w_hs, w2_hs, b2_hs), hidden2). Paper MLP:
    A, B, Ck, W, Scale from `_paper_operands` (q_pad / k_pad the padded lengths), W2 / B2 unused dummies, hidden2 1.
    Authors' MLP: A, B ``(batch*heads, len, hidden)`` contiguous, q_pad / k_pad = q_len / k_len, Ck a dummy, Scale
    ones. a_bs / b_bs: A's / B's per-(batch, head) strides; w*_hs: the weights' per-head strides (0: shared).
    """
    batch, heads, q_len, hidden = query_hidden.shape
    k_len = key_hidden.shape[2]
    if second_weight is not None:  # the authors' MLP
        hidden2 = second_weight.shape[-2]
        W, w_hs = _head_weight(output_weight, heads, "output_weight", (hidden2,))
        W2, w2_hs = _head_weight(second_weight, heads, "second_weight", (hidden2, hidden))
        if second_bias is None:
            B2, b2_hs = torch.zeros(1, hidden2, device=device, dtype=torch.float32), 0
        else:
            B2, b2_hs = _head_weight(second_bias, heads, "second_bias", (hidden2,))
        A = zero_invisible_rows(query_hidden, visible[0]).contiguous()
        B = zero_invisible_rows(key_hidden, visible[1]).contiguous()
        Scale = torch.ones(batch * heads, device=device, dtype=torch.float32)
        return (A, B, W, W, W2, B2, Scale), (q_len, k_len), (q_len * hidden, k_len * hidden, w_hs, w2_hs, b2_hs), \
            hidden2  # fmt: skip
    hidden_pad = _pow2(hidden)
    W, w_hs = _head_weight(output_weight, heads, "output_weight", (hidden,))
    length_pad = max(max(launch[""][:2]), max(launch["bwd_"][:2]))  # every block the kernels step by
    A, B, Ck, W, Scale = _paper_operands(query_hidden, key_hidden, W, cfg["activation"] == "relu", hidden_pad,
                                         length_pad, visible, bool(cfg.get("half_mlp")))  # fmt: skip
    q_pad, k_pad = A.shape[-1], B.shape[-1]
    strides = (hidden_pad * q_pad, hidden_pad * k_pad, 0 if w_hs == 0 else hidden_pad, 0, 0)
    return (A, B, Ck, W, W, W, Scale), (q_pad, k_pad), strides, 1


def _optional_operands(dot_query, dot_key, mask, score_bias, shape, dummy):
    """(DQ, DK, Mask, Bias) and (dd, dot strides, mask strides, bias strides) for the optional inputs; ``dummy`` (never
    read, zero strides) stands in for each one absent. ``shape`` = (batch, heads, q_len, k_len): the mask and a 4-D
    ``score_bias`` are expanded to it; the bias is read in its own dtype (16-bit stays 16-bit; float64 becomes fp32)."""
    DQ, DK, dd, dot_strides = dummy, dummy, 1, (0,) * 6
    if dot_query is not None:
        DQ = _last_dim_contiguous(dot_query)
        DK = _last_dim_contiguous(dot_key.to(DQ.dtype))
        dd, dot_strides = DQ.shape[-1], (*DQ.stride()[:3], *DK.stride()[:3])
    Mask, mask_strides = dummy, (0, 0, 0, 0)
    if mask is not None:
        Mask = mask.to(device=dummy.device, dtype=torch.uint8).expand(*shape)
        mask_strides = Mask.stride()
    Bias, bias_strides = dummy, (0, 0, 0, 0)
    if score_bias is not None:  # added in fp32
        if score_bias.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            score_bias = score_bias.float()
        Bias = score_bias.expand(*shape)
        bias_strides = Bias.stride()
    return (DQ, DK, Mask, Bias), (dd, dot_strides, mask_strides, bias_strides)


def _launch_args(query_hidden, key_hidden, value, output_weight, second_weight, second_bias, dot_query, dot_key,
                 mask, cfg, visible=(None, None), score_bias=None):
    """Kernel-ready tensors, the leading scalar arguments shared by the three kernels, and the constexprs.

    Returns (tensors, scalars, constexprs, launch): tensors = (A, B, Ck, V, W, W2, B2, DQ, DK, Mask, Bias, Scale)
    (see `_scorer_operands` and `_optional_operands`); scalars = (H, Lq, Lk, LqP, LkP, A / B per-(batch, head)
    strides, V/DQ/DK/Mask/Bias strides, per-head weight strides, dot_scale, dropout_p, dropout_scale, seed, softcap
    (1.0 when there is none: CAP is then False and the kernels never read it)); launch
    = `_launch_settings`' {"": forward, "bwd_": backward} (BLOCK_M, BLOCK_N, num_warps, unroll).
    """
    batch, heads, q_len, hidden = query_hidden.shape
    k_len, v_dim = key_hidden.shape[2], value.shape[-1]
    authors, has_dot, half = second_weight is not None, dot_query is not None, bool(cfg.get("half_mlp"))
    interp = _interpreting()
    width = _pow2(max(v_dim, dot_query.shape[-1] if has_dot else 1))
    launch = _launch_settings(cfg, authors=authors, has_dot=has_dot, has_mask=mask is not None,
                              has_bias=score_bias is not None, fp32=value.dtype == torch.float32, width=width,
                              q_len=q_len, hidden=hidden, interp=interp)  # fmt: skip
    value, dot_query, dot_key = zero_unseen_operands(value, dot_query, dot_key, *visible)
    V = _last_dim_contiguous(value)
    (A, Bk, Ck, W, W2, B2, Scale), (q_pad, k_pad), scorer_strides, hidden2 = _scorer_operands(
        query_hidden, key_hidden, output_weight, second_weight, second_bias, cfg, launch, visible, V.device)
    (DQ, DK, Mask, Bias), (dd, dot_strides, mask_strides, bias_strides) = _optional_operands(
        dot_query, dot_key, mask, score_bias, (batch, heads, q_len, k_len), A)
    a_bs, b_bs, w_hs, w2_hs, b2_hs = scorer_strides

    bm, bn, _, unroll = launch[""]
    dropout_p = float(cfg["dropout_p"])
    dropout_scale = 0.0 if dropout_p >= 1.0 else 1.0 / (1.0 - dropout_p)
    low = V.dtype if V.dtype in (torch.bfloat16, torch.float16) else torch.float32
    # tensor-core products need dims of 16 at least: the authors' MLP from AUTHORS_GEMM_FROM on multiplies (pairs,
    # HIDP) by (HIDP, HID2P), the half MLP's backward (16-bit inputs, d' in [HALF_MMA_FROM, HALF_MMA_UNTIL]) its
    # masked dS (rows, cols) by (cols, HIDP)
    half_mma = half and HALF_MMA_FROM.value <= hidden <= HALF_MMA_UNTIL.value and low != torch.float32
    mma_sums = (authors and hidden > AUTHORS_GEMM_FROM.value) or half_mma
    mma_pad = 16 if mma_sums else 1
    hidden_pad = _pow2(hidden)
    constexprs = dict(
        HID=hidden, HIDP=max(hidden_pad, mma_pad), HID2=hidden2, HID2P=_pow2(hidden2, mma_pad), AUTHORS=authors,
        ACT=ACTIVATION_CODES[cfg["activation"]], DV=v_dim, DVP=_pow2(v_dim, 16), DD=dd, DDP=_pow2(dd, 16),
        HAS_DOT=has_dot, HAS_MASK=mask is not None, HAS_BIAS=score_bias is not None, CAUSAL=bool(cfg["causal"]),
        DROPOUT=dropout_p > 0.0, DOT_DTYPE=_TL_DTYPES[low], UPCAST=interp, UNROLL=min(unroll, hidden_pad), HALF=half,
        CAP=cfg.get("softcap") is not None, BLOCK_M=bm, BLOCK_N=bn,
    )  # fmt: skip
    scalars = (heads, q_len, k_len, q_pad, k_pad, a_bs, b_bs, *V.stride()[:3], *dot_strides, *mask_strides,
               *bias_strides, w_hs, w2_hs, b2_hs, float(cfg["dot_scale"]), dropout_p, dropout_scale,
               int(cfg["seed"]), float(cfg.get("softcap") or 1.0))  # fmt: skip
    return (A, Bk, Ck, V, W, W2, B2, DQ, DK, Mask, Bias, Scale), scalars, constexprs, launch


def _backward_constexprs(constexprs: dict, launch: tuple[int, int, int, int]) -> tuple[dict, dict]:
    """Constexprs of the key-side and the query-side backward kernels for ``launch`` = (own, step, num_warps,
    unroll): each kernel owns blocks of ``own`` positions (keys / queries) and steps over the other side by ``step``;
    the kernels name the query block BLOCK_M and the key block BLOCK_N."""
    own, step, _, unroll = launch
    # (at most the units the operands are padded to: HIDP may be wider, padded for the tensor cores)
    query_side = dict(constexprs, BLOCK_M=own, BLOCK_N=step, UNROLL=min(unroll, _pow2(constexprs["HID"])))
    return dict(query_side, BLOCK_M=step, BLOCK_N=own), query_side


COMPILE_OPTIONS = {"enable_fp_fusion": True}
"""Triton compile options of every launch. FMA contraction is pinned on: the kernels' instruction counts and error
analysis assume it, and Triton 3.10 turns it off by default (3.9 warns)."""

_LAUNCH_KEYS = ("block_m", "block_n", "num_warps", "unroll", "bwd_block_m", "bwd_block_n", "bwd_num_warps",
                "bwd_unroll", "half_mlp")
# the ops' names carry the kernel's source hash: a Hub checkpoint's copy of another version must not reuse them
_OP_TAG = source_tag(__file__, Path(__file__).with_name("triton_kernels_neural_attention.py"))


def _config(activation: str, causal: bool, dot_scale: float, dropout_p: float, seed: torch.Tensor, softcap: float,
            launch: list[int]) -> dict:
    """The host-side settings ``_launch_args`` reads; ``softcap`` 0 for none; ``launch`` lists ``_LAUNCH_KEYS``, -1 for
    the default."""
    tuning = {key: (None if value < 0 else value) for key, value in zip(_LAUNCH_KEYS, launch, strict=True)}
    return dict(activation=activation, causal=causal, dot_scale=dot_scale, dropout_p=dropout_p, seed=int(seed),
                softcap=softcap or None, **tuning)


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
    causal: bool, dot_scale: float, dropout_p: float, seed: torch.Tensor, softcap: float, launch: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, stats)``: ``(batch, heads, q_len, v_dim)`` fp32 and the row statistics, fp32: ``(1, batch * heads,
    q_len)``, the log-sum-exp, or with a ``score_bias`` ``(2, batch * heads, q_len)``, the row max and the log
    denominator (see `fwd_kernel`).

    The output stays fp32 (the caller rounds it): the backward's delta = rowsum(dO * O) needs the unrounded O, or
    sum_j dS_ij = 0 breaks by O's rounding error (bf16: the scorer's bias gradients, which live on that
    cancellation, came out several times (up to ~10x) further from the fp32 truth than the other backends' did under
    bf16 autocast). For the same reason P enters ``P @ V`` as two 16-bit MMA operands when the values are 16-bit
    (one more MMA per tile): with P rounded once to bf16, O's error of ~2^-9 still reached the scorer's weight
    gradients, amplified by the mean of the hidden activations (on a 9 x 17 test tile 0.5% of the largest entry;
    split, nothing beyond the gradient's own rounding to bf16). Inference too, so that an output does not depend on
    whether gradients are enabled (reentrant activation checkpointing runs the forward without, then again with)."""
    cfg = _config(activation, causal, dot_scale, dropout_p, seed, softcap, launch)
    batch, heads, q_len, _ = query_hidden.shape
    # rows no pair sees are zeroed in the scorer's operands: garbage there must not reach visible rows or dw
    visible = visible_rows(mask, causal, q_len, key_hidden.shape[2], value.device)
    tensors, scalars, constexprs, launch_ = _launch_args(query_hidden, key_hidden, value, output_weight, second_weight,
                                                         second_bias, dot_query, dot_key, mask, cfg, visible,
                                                         score_bias)  # fmt: skip
    Out = torch.empty(batch, heads, q_len, value.shape[-1], device=value.device, dtype=torch.float32)
    stats = torch.empty(1 if score_bias is None else 2, batch * heads, q_len, device=value.device, dtype=torch.float32)
    grid = (triton.cdiv(q_len, constexprs["BLOCK_M"]), batch * heads)
    fwd_kernel[grid](*tensors, *scalars, Out, stats[0], stats[-1], *Out.stride()[:3], num_warps=launch_[""][2],
                      **constexprs, **COMPILE_OPTIONS)  # fmt: skip
    return Out, stats


def _like_or_empty(tensor: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0) if tensor is None else torch.empty_like(tensor, memory_format=torch.contiguous_format)


def _backward_fake(query_hidden, key_hidden, value, output_weight, second_weight, second_bias, dot_query, dot_key,
                   score_bias, mask, Out, stats, grad_out, activation, causal, dot_scale, dropout_p, seed, softcap,
                   bias_grad, launch):  # fmt: skip
    return tuple(_like_or_empty(t, value) for t in (query_hidden, key_hidden, value, output_weight, second_weight,
                                                   second_bias, dot_query, dot_key,
                                                   score_bias if bias_grad else None))  # fmt: skip


@kernel_op(f"triton_backward_{_OP_TAG}", _backward_fake)
def _triton_backward(
    query_hidden: torch.Tensor, key_hidden: torch.Tensor, value: torch.Tensor, output_weight: torch.Tensor,
    second_weight: torch.Tensor | None, second_bias: torch.Tensor | None, dot_query: torch.Tensor | None,
    dot_key: torch.Tensor | None, score_bias: torch.Tensor | None, mask: torch.Tensor | None, Out: torch.Tensor,
    stats: torch.Tensor, grad_out: torch.Tensor, activation: str, causal: bool, dot_scale: float, dropout_p: float,
    seed: torch.Tensor, softcap: float, bias_grad: bool, launch: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor]:
    """Gradients of the nine differentiable inputs, each shaped and typed like its input (empty for an absent
    one, and for ``score_bias`` unless ``bias_grad``: a mask-derived bias or a fixed ALiBi buffer needs none). The
    kernels' operands are rebuilt from the inputs (O(n * hidden), as in the forward) rather than kept. The bias's
    gradient is dS, written whole into an fp32 ``(rows, heads, q_len, k_len)`` buffer, then summed over the dims the
    bias broadcasts along (``bias_grad_rows``: all rows in one launch, unless the bias is shared across the batch and
    the whole batch's dS would pass ``BIAS_GRAD_BUFFER_BYTES``: then launches of ``rows`` batch rows add to it)."""
    cfg = _config(activation, causal, dot_scale, dropout_p, seed, softcap, launch)
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
    bwd_kv_kernel[(n_blocks_n, batch * heads)](*lead, dB, dV, dDK, *parts, n_blocks_n, num_warps=num_warps,
                                                **kv_ce, **COMPILE_OPTIONS)  # fmt: skip
    # the query side in launches of `rows` batch rows. One launch (all rows) stores dS whole (causal: the tiles the
    # loop skips have dS = 0 and are never written, so zeros); several (a bias shared by the batch) add theirs to the
    # same zeroed (rows, heads, q, k) buffer, which so stays bounded
    rows = bias_grad_rows(batch, heads, q_len, k_len, score_bias.shape) if bias_grad else batch
    ce["BIAS_ACC"] = rows < batch
    dS = ((torch.zeros if cfg["causal"] or rows < batch else torch.empty)(rows, heads, q_len, k_len, **f32)
          if bias_grad else dA)  # fmt: skip
    for b0 in range(0, batch, rows):
        bwd_q_kernel[(triton.cdiv(q_len, own), min(rows, batch - b0) * heads)](
            *lead, dA, dDQ, dS, b0 * heads, num_warps=num_warps, **ce, **COMPILE_OPTIONS)

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


def _row_statistics(stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(row_max, log_denom)`` ``(batch * heads, q_len)`` of the forward's ``stats``: its two rows, or the
    log-sum-exp and zeros (+inf, not finite, where no key is visible)."""
    return (stats[0], stats[1]) if stats.shape[0] == 2 else (stats[0], torch.zeros_like(stats[0]))


def _with_sinks(Out: torch.Tensor, stats: torch.Tensor, sink: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward's ``(Out, stats)`` with the attention sinks ``sink`` ``(batch * heads, q_len)`` folded in
    (`fold_sinks`), the statistics in the kernels' layout (one row, the log-sum-exp, or two)."""
    batch, heads, q_len, v_dim = Out.shape
    out, row_max, log_denom = fold_sinks(Out.view(batch * heads, q_len, v_dim), *_row_statistics(stats), sink)
    stats = torch.stack([row_max, log_denom]) if stats.shape[0] == 2 else (row_max + log_denom).unsqueeze(0)
    return out.view(batch, heads, q_len, v_dim), stats


class _NeuralAttentionTriton(torch.autograd.Function):
    """The three Triton kernels as two custom ops (``_triton_forward``, ``_triton_backward``): torch.compile keeps
    them as opaque calls instead of tracing the host-side launch code. Attention sinks are folded in around them."""

    @staticmethod
    @autocast_off
    @keeps_differentiable_inputs  # for the second-derivative error (see once_differentiable_always)
    def forward(ctx, query_hidden, key_hidden, value, output_weight, second_weight, second_bias, dot_query, dot_key,
                score_bias, sinks, mask, cfg):  # fmt: skip
        inputs = (query_hidden, key_hidden, value, output_weight, second_weight, second_bias, dot_query, dot_key,
                  score_bias)  # fmt: skip
        settings = (cfg["activation"], cfg["causal"], cfg["dot_scale"], cfg["dropout_p"], cfg["seed"],
                    cfg["softcap"])  # fmt: skip
        Out, stats = _triton_forward(*inputs, mask, *settings, cfg["launch"])
        sink = None
        if sinks is not None:  # O(n) on the host; the backward kernels then recompute sink-inclusive probabilities
            sink = sink_rows(sinks.float(), *query_hidden.shape[:3])
            Out, stats = _with_sinks(Out, stats, sink)
        ctx.save_for_backward(*inputs, mask, Out, stats, sink)
        ctx.settings, ctx.launch = settings, cfg["launch"]
        ctx.sinks_shape, ctx.sinks_dtype = (None, None) if sinks is None else (sinks.shape, sinks.dtype)
        return Out if Out.dtype == value.dtype else Out.to(value.dtype)  # no no-op .to(): see _NeuralAttentionFunction

    @staticmethod
    @once_differentiable_always  # the backward kernels are not differentiable: a second derivative must raise
    @autocast_off
    def backward(ctx, grad_out):
        *inputs, mask, Out, stats, sink = ctx.saved_tensors
        bias_grad = inputs[8] is not None and ctx.needs_input_grad[8]  # no (b, h, q, k) buffer for a fixed bias
        grads = _triton_backward(*inputs, mask, Out, stats, grad_out, *ctx.settings, bias_grad, ctx.launch)
        grads = (*grads[:8], grads[8] if bias_grad else None)
        dsinks = None
        if sink is not None and ctx.needs_input_grad[9]:
            batch, heads, q_len, _ = Out.shape
            D = (grad_out.float() * Out).sum(-1).reshape(batch * heads, q_len)
            dsinks = sink_grad(sink, *_row_statistics(stats), D, ctx.sinks_shape, batch).to(ctx.sinks_dtype)
        return (*(None if t is None else g for t, g in zip(inputs, grads, strict=True)), dsinks, None, None)


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
    sinks: torch.Tensor | None = None,
    softcap: float | None = None,
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
    ``softcap`` (Gemma 2): the scores become ``softcap * tanh(score / softcap)`` before the bias and the mask.
    ``sinks`` ``(batch|1, heads|1, q_len|1, 1)`` (gpt-oss, Inkling 2): one more logit per query row in the softmax's
    denominator, with no value; folded in on the host, with its gradient.
    Returns (batch, heads, q_len, v_dim) in value's dtype.
    """
    if not TRITON_AVAILABLE:
        raise RuntimeError("neural_attention_triton needs the `triton` package (pip install triton)")
    # shapes, mask dtype, dropout range: the contract's checks, shared with every kernel (ValueError / TypeError)
    check_kernel_inputs(query_hidden, key_hidden, value, output_weight, second_weight, second_bias, activation, mask,
                        dot_query, dot_key, dropout_p, score_bias)  # fmt: skip
    check_softcap(softcap)
    batch, heads, q_len, hidden = query_hidden.shape
    check_sinks(sinks, batch, heads, q_len)
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
              score_bias, sinks)  # fmt: skip
    if q_len == 0 or k_len == 0 or batch * heads == 0:
        return empty_attention(inputs)
    if score_bias is not None:
        score_bias = as_4d(score_bias)
    tuning = (block_m, block_n, num_warps, unroll, bwd_block_m, bwd_block_n, bwd_num_warps, bwd_unroll,
              1 if half_mlp else None)
    cfg = dict(activation=activation, causal=bool(causal), dot_scale=float(dot_scale), dropout_p=float(dropout_p),
               seed=seed_tensor(dropout_p, generator_seed, bound=2**31 - 1), softcap=float(softcap or 0.0),
               launch=[-1 if setting is None else int(setting) for setting in tuning])  # fmt: skip
    return _NeuralAttentionTriton.apply(*inputs[:8], score_bias, sinks, mask, cfg)
