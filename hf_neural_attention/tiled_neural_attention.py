"""Neural attention in pure PyTorch: tiled, online softmax, scores recomputed in backward.

Implements the kernel contract of ``docs/design.md`` (shared helpers in ``kernels_neural_attention.py``) as a
``torch.autograd.Function``:

- queries are processed in blocks; for each query block the key blocks are visited in order with an online
  (running max / running sum) softmax accumulated in fp32 (fp64 when an input is fp64);
- a ``score_bias`` (T5's position bias) is added to each tile's scores, in both passes; its gradient is the scores',
  summed over the dims it broadcasts along;
- only the output and the per-row softmax statistics (maximum, log denominator) are kept for backward; scores are
  recomputed tile by tile in backward (flash-attention style: ``D_i = rowsum(dO * O)``, ``dS = P * (dP - D)``);
- causal tiles above the diagonal and tiles whose mask is all False are skipped;
- a query row whose keys are all masked gives exact zeros and zero gradients;
- dropout on the probabilities uses one ``torch.Generator`` per tile, seeded ``generator_seed + tile index``,
  regenerated in backward (the pattern depends on the block size);
- no atomics, fixed loop order: bitwise deterministic for a given block size and thread count.

Work inside a tile is batched over ``batch * heads`` with ``bmm``. The hidden units are laid out as
``(batch*heads, hidden, block_q, block_k)`` so every elementwise pass runs over contiguous key positions.

The per-pair MLP of a tile is computed by a *scorer* (see :class:`TileScorer`): the PyTorch scorers below by
default, or one returned by a ``scorer_factory`` hook (``cpp_neural_attention.neural_attention_cpp`` plugs its C++
scorers in that way; this file never imports it).

This file travels with Hub checkpoints: it imports only torch, the standard library and ``kernels_neural_attention``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import Tensor

from .kernels_neural_attention import (
    ACTIVATIONS,
    as_4d,
    autocast_off,
    centre_hidden,
    check_kernel_inputs,
    check_sinks,
    check_softcap,
    empty_attention,
    fold_causal_into_mask,
    keeps_differentiable_inputs,
    kernel_op,
    once_differentiable_always,
    seed_tensor,
    sink_grad,
    sink_rows,
    source_tag,
    sum_to_bias_shape,
    visible_rows,
    weight_grad,
    zero_unseen_operands,
)

__all__ = ["ScorerFactory", "TileScorer", "choose_block_size", "neural_attention_tiled", "tiled_ops"]

# Elements (fp32) of the largest hidden-sized temporary of one tile: ~4 MiB, so a handful of them sit in L2/L3.
_TILE_BUDGET = 1 << 20
_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


# --------------------------------------------------------------------------------------------------------------
# activations and their derivatives
# --------------------------------------------------------------------------------------------------------------
def _act_(x: Tensor, name: str) -> Tensor:
    """Activation of a scratch tile, in place where PyTorch has an in-place form."""
    if name == "relu":
        return x.relu_()
    if name == "gelu":
        return torch.nn.functional.gelu(x)
    if name == "silu":
        return torch.nn.functional.silu(x, inplace=True)
    if name == "tanh":
        return x.tanh_()
    raise ValueError(f"unknown activation {name!r}; expected one of {ACTIVATIONS}")


def _act_grad(pre: Tensor, name: str) -> Tensor:
    """Derivative of the activation at ``pre`` (relu: 0 at 0, like PyTorch)."""
    if name == "relu":
        return (pre > 0).to(pre.dtype)
    if name == "gelu":
        cdf = torch.erf(pre * _INV_SQRT2).add_(1.0).mul_(0.5)
        pdf = torch.exp(pre * pre * -0.5).mul_(_INV_SQRT_2PI)
        return cdf.add_(pdf.mul_(pre))
    if name == "silu":
        s = torch.sigmoid(pre)
        return s * (1.0 + pre * (1.0 - s))
    if name == "tanh":
        t = torch.tanh(pre)
        return 1.0 - t * t
    raise ValueError(f"unknown activation {name!r}; expected one of {ACTIVATIONS}")


# --------------------------------------------------------------------------------------------------------------
# block size
# --------------------------------------------------------------------------------------------------------------
def _pow2_floor(x: float) -> int:
    return 1 << max(int(math.floor(math.log2(max(x, 1.0)))), 0)


def _pow2_ceil(x: int) -> int:
    return 1 << max(int(math.ceil(math.log2(max(x, 1)))), 0)


def choose_block_size(
    groups: int, hidden: int, q_len: int, k_len: int, *, budget: int | None = None
) -> tuple[int, int]:
    """``(block_q, block_k)`` such that one hidden-sized tile, ``groups * hidden * block_q * block_k`` elements,
    stays near ``budget`` (default 2**20 fp32 elements = 4 MiB): small enough for the caches, large enough for the
    per-op Python overhead to vanish. ``groups`` is batch * heads."""
    budget = _TILE_BUDGET if budget is None else budget
    pairs = max(budget // max(groups * hidden, 1), 256)
    side = min(_pow2_floor(math.sqrt(pairs)), 128)
    block_q = max(min(side, _pow2_ceil(q_len)), 1)
    # short query blocks (decoding) take longer key blocks
    block_k = max(min(_pow2_floor(pairs / block_q), side if block_q == side else 1024, _pow2_ceil(k_len)), 1)
    return block_q, block_k


# --------------------------------------------------------------------------------------------------------------
# scorers: the per-pair MLP on a tile, and its backward
# --------------------------------------------------------------------------------------------------------------
class TileScorer(Protocol):
    """The per-pair MLP on tiles. ``At``/``Bt`` are ``(G, hidden, len)`` (G = batch*heads), tiles are the query
    rows ``i0:i1`` against the key columns ``j0:j1``."""

    tile_width: int  # fp32 elements per pair of the largest temporary: sizes the tiles (choose_block_size)

    def scores(self, i0: int, i1: int, j0: int, j1: int) -> Tensor:
        """``(G, i1-i0, j1-j0)`` scores, a fresh tensor the caller may modify."""

    def scores_for_backward(self, i0: int, i1: int, j0: int, j1: int) -> tuple[Tensor, Any]:
        """Scores and whatever :meth:`backward` needs of the same tile."""

    def backward(self, cache: Any, ds: Tensor, i0: int, i1: int, j0: int, j1: int) -> None:
        """Accumulate the tile's gradients from ``ds = dL/dscore`` ``(G, i1-i0, j1-j0)``."""

    def grads(self) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
        """``(dAt, dBt, parameter grads)``: ``(dw,)`` (paper) or ``(dw3, dW2, db2)`` (authors), per group."""


ScorerFactory = Callable[..., "TileScorer | None"]
"""``factory(At, Bt, w, W2, b2, activation, need_grad) -> TileScorer | None`` (``None``: use the PyTorch scorer).
``w`` is ``(G, hidden)`` (paper) or ``(G, hidden2)`` (authors), ``W2`` ``(G, hidden2, hidden)``, ``b2``
``(G, hidden2)``, ``W2``/``b2`` ``None`` for ``mlp="paper"``; all in the compute dtype, contiguous."""


class _Scratch:
    """Hidden-sized tile buffers reused from tile to tile instead of a fresh multi-MiB tensor per tile and pass; with
    the in-place relu gradient, backward holds one ``(G, hidden, bq, bk)`` tile instead of two."""

    def __init__(self, dtype: torch.dtype, device: torch.device):
        self.dtype, self.device, self.buffers = dtype, device, {}

    def get(self, name: str, shape: tuple[int, ...]) -> Tensor:
        """An uninitialised contiguous tensor of ``shape``; valid until the next ``get`` of the same name."""
        numel = math.prod(shape)
        buffer = self.buffers.get(name)
        if buffer is None or buffer.numel() < numel:
            buffer = self.buffers[name] = torch.empty(numel, dtype=self.dtype, device=self.device)
        return buffer[:numel].view(shape)


class _PaperScorer:
    """``score_ij = sum_m w_m act(A_im + B_jm)`` on tiles; ``At``/``Bt`` are ``(G, hidden, len)``."""

    def __init__(self, At: Tensor, Bt: Tensor, w: Tensor, activation: str, need_grad: bool):
        self.At, self.Bt, self.act = At, Bt, activation
        self.scratch = _Scratch(At.dtype, At.device)
        self.w_row = w.unsqueeze(1)  # (G, 1, hidden)
        self.G, self.K = w.shape
        self.tile_width = self.K
        if need_grad:
            self.GA = torch.zeros_like(At)
            self.GB = torch.zeros_like(Bt)
            self.dw = torch.zeros_like(w) if activation != "relu" else None

    def _pre(self, name: str, i0: int, i1: int, j0: int, j1: int) -> Tensor:
        """``A_i + B_j`` of the tile, ``(G, hidden, bq, bk)``, in the scratch buffer ``name``."""
        out = self.scratch.get(name, (self.G, self.K, i1 - i0, j1 - j0))
        return torch.add(self.At[:, :, i0:i1, None], self.Bt[:, :, None, j0:j1], out=out)

    def _project(self, h: Tensor) -> Tensor:
        """``w . h`` over the hidden axis: ``(G, hidden, bq, bk) -> (G, bq, bk)``."""
        G, K, bq, bk = h.shape
        return torch.bmm(self.w_row, h.view(G, K, bq * bk)).view(G, bq, bk)

    def scores(self, i0: int, i1: int, j0: int, j1: int) -> Tensor:
        # the very arithmetic of scores_for_backward: backward's P = exp(s - max - log(denom)) must meet forward's
        # row statistics exactly.
        # (The signed-max form, w max(a, -b) + w b, saves a pass but cancels on large scores: dV was off by 5e-4
        # relative at |s| ~ 3000; the fused kernels use it in both passes, centred.)
        return self._project(_act_(self._pre("pre", i0, i1, j0, j1), self.act))

    def scores_for_backward(self, i0: int, i1: int, j0: int, j1: int):
        pre = self._pre("pre", i0, i1, j0, j1)
        if self.act == "relu":
            h = pre.relu_()  # 1[h > 0] == 1[pre > 0]: h alone suffices for backward
            return self._project(h), h
        h = _act_(self.scratch.get("act", pre.shape).copy_(pre), self.act)
        return self._project(h), (pre, h)

    def backward(self, cache, ds: Tensor, i0: int, i1: int, j0: int, j1: int) -> None:
        if self.act == "relu":  # the gradient overwrites h in place (h is not needed afterwards)
            g = torch.ops.aten.threshold_backward.grad_input(ds.unsqueeze(1), cache, 0.0, grad_input=cache)
        else:
            pre, h = cache
            bq, bk = i1 - i0, j1 - j0
            self.dw += torch.bmm(h.view(self.G, self.K, bq * bk), ds.reshape(self.G, bq * bk, 1)).squeeze(-1)
            g = _act_grad(pre, self.act).mul_(ds.unsqueeze(1))
        self.GA[:, :, i0:i1] += g.sum(-1)
        self.GB[:, :, j0:j1] += g.sum(-2)

    def grads(self):
        w = self.w_row.squeeze(1)
        dA = self.GA * w[:, :, None]
        dB = self.GB * w[:, :, None]
        if self.act == "relu":
            # sum_ij dS relu(a+b) = sum_i a * GA + sum_j b * GB  (relu(x) = x * 1[x > 0])
            dw = (self.At * self.GA).sum(-1) + (self.Bt * self.GB).sum(-1)
        else:
            dw = self.dw
        return dA, dB, (dw,)


class _AuthorsScorer:
    """``score_ij = w3 . relu(W2 relu(A_i + B_j) + b2)`` on tiles."""

    def __init__(self, At: Tensor, Bt: Tensor, w3: Tensor, W2: Tensor, b2: Tensor, need_grad: bool):
        self.At, self.Bt = At, Bt
        self.w3_row = w3.unsqueeze(1)  # (G, 1, H2)
        self.W2, self.b2 = W2, b2.unsqueeze(-1)  # (G, H2, K), (G, H2, 1)
        self.G, self.K = At.shape[0], At.shape[1]
        self.tile_width = self.K + W2.shape[1]
        if need_grad:
            self.GA = torch.zeros_like(At)
            self.GB = torch.zeros_like(Bt)
            self.dw3 = torch.zeros_like(w3)
            self.dW2 = torch.zeros_like(W2)
            self.db2 = torch.zeros_like(b2)

    def _forward(self, i0, i1, j0, j1):
        n = (i1 - i0) * (j1 - j0)
        h1 = (self.At[:, :, i0:i1, None] + self.Bt[:, :, None, j0:j1]).relu_().view(self.G, self.K, n)
        h2 = torch.baddbmm(self.b2, self.W2, h1).relu_()
        s = torch.bmm(self.w3_row, h2).view(self.G, i1 - i0, j1 - j0)
        return s, (h1, h2)

    def scores(self, i0, i1, j0, j1):
        return self._forward(i0, i1, j0, j1)[0]

    def scores_for_backward(self, i0, i1, j0, j1):
        return self._forward(i0, i1, j0, j1)

    def backward(self, cache, ds, i0, i1, j0, j1):
        h1, h2 = cache
        n = (i1 - i0) * (j1 - j0)
        ds = ds.reshape(self.G, 1, n)
        self.dw3 += torch.bmm(h2, ds.transpose(1, 2)).squeeze(-1)
        dz = torch.ops.aten.threshold_backward(self.w3_row.transpose(1, 2) * ds, h2, 0.0)  # (G, H2, n)
        self.dW2 += torch.bmm(dz, h1.transpose(1, 2))
        self.db2 += dz.sum(-1)
        dh1 = torch.bmm(self.W2.transpose(1, 2), dz)
        g = torch.ops.aten.threshold_backward.grad_input(dh1, h1, 0.0, grad_input=dh1)
        g = g.view(self.G, self.K, i1 - i0, j1 - j0)
        self.GA[:, :, i0:i1] += g.sum(-1)
        self.GB[:, :, j0:j1] += g.sum(-2)

    def grads(self):
        return self.GA, self.GB, (self.dw3, self.dW2, self.db2)


# --------------------------------------------------------------------------------------------------------------
# masks per tile
# --------------------------------------------------------------------------------------------------------------
def _tile_of(t: Tensor, i0: int, i1: int, j0: int, j1: int) -> Tensor:
    """The view of ``t`` ``(batch|1, heads|1, q_len|1, k_len|1)`` (a mask, a score bias or its gradient) that
    covers query rows ``i0:i1`` and keys ``j0:j1``, broadcast dims left at size 1."""
    rows = slice(i0, i1) if t.shape[2] > 1 else slice(None)
    cols = slice(j0, j1) if t.shape[3] > 1 else slice(None)
    return t[:, :, rows, cols]


class _TileMasks:
    """For a tile: ``False`` (skip: nothing visible), ``None`` (everything visible) or a bool tensor
    broadcastable to ``(G, bq, bk)``."""

    def __init__(self, mask: Tensor | None, causal: bool, batch: int, heads: int, device: torch.device):
        self.causal = causal and mask is None
        self.batch, self.heads, self.device = batch, heads, device
        self.mask = None
        if mask is not None:  # bool, broadcastable to (batch, heads, q_len, k_len): checked by the entry point
            self.mask = as_4d(mask)

    def __call__(self, i0: int, i1: int, j0: int, j1: int):
        if self.causal:
            if j0 > i1 - 1:
                return False
            if j1 - 1 <= i0:
                return None
            rows = torch.arange(i0, i1, device=self.device).unsqueeze(1)
            cols = torch.arange(j0, j1, device=self.device).unsqueeze(0)
            return (cols <= rows).unsqueeze(0)
        if self.mask is None:
            return None
        m = _tile_of(self.mask, i0, i1, j0, j1)
        if not bool(m.any()):
            return False
        if bool(m.all()):
            return None
        if m.shape[0] == 1 and m.shape[1] == 1:
            return m[0]
        return m.expand(self.batch, self.heads, i1 - i0, j1 - j0).reshape(self.batch * self.heads, i1 - i0, j1 - j0)


def _complete_scores(s: Tensor, dqs: Tensor | None, dkf: Tensor | None, bias: Tensor | None, tm: Tensor | None,
                     i0: int, i1: int, j0: int, j1: int, batch: int, heads: int, softcap: float = 0.0,
                     slope: bool = False) -> Tensor | None:
    """The tile's logits from its MLP scores ``s`` ``(G, bq, bk)``, in place: plus the residual mode's scaled ``q.k``
    (``dqs`` ``(G, q_len, d)``, ``dkf`` ``(G, k_len, d)``), capped to ``softcap * tanh(s / softcap)`` (Gemma 2's
    logit soft-capping; 0: none), plus the tile's part of ``bias`` ``(batch|1, heads|1, q_len|1, k_len|1)``
    (broadcast through a ``(batch, heads, bq, bk)`` view: no copy of the bias per tile), -inf where the tile mask
    ``tm`` (None: all visible) is False. The same in both passes: backward recomputes them.

    Returns, with ``slope`` and a cap, the cap's derivative ``1 - tanh^2`` ``(G, bq, bk)`` (what the gradient of the
    capped logits is multiplied by on its way to the MLP and the dot term; not to the bias, added after), else None.
    """
    if dqs is not None:
        s.baddbmm_(dqs[:, i0:i1], dkf[:, j0:j1].transpose(1, 2))
    derivative = None
    if softcap:
        s.div_(softcap).tanh_()
        if slope:
            derivative = 1.0 - s.square()
        s.mul_(softcap)
    if bias is not None:
        s.view(batch, heads, i1 - i0, j1 - j0).add_(_tile_of(bias, i0, i1, j0, j1))
    if tm is not None:
        s.masked_fill_(~tm, -math.inf)
    return derivative



def _accumulate_bias_grad(dbias: Tensor, ds: Tensor, i0: int, i1: int, j0: int, j1: int, batch: int,
                          heads: int) -> None:
    """Add a tile's score gradient ``ds`` ``(G, bq, bk)`` to ``dbias`` (the bias's shape), summed over the dims the
    bias broadcasts along."""
    g = sum_to_bias_shape(ds.view(batch, heads, i1 - i0, j1 - j0), dbias.shape)
    _tile_of(dbias, i0, i1, j0, j1).add_(g)


def _dropout_keep(seed: int, tile: int, shape: tuple[int, ...], p: float, dtype: torch.dtype,
                  device: torch.device) -> Tensor:
    """The tile's scaled keep-mask: a CPU ``torch.Generator`` seeded ``seed + tile`` (the same pattern on every
    device)."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed((seed + tile) % (1 << 63))
    keep = torch.rand(shape, generator=gen, dtype=torch.float32) >= p
    return keep.to(device=device, dtype=dtype).mul_(1.0 / (1.0 - p))


# --------------------------------------------------------------------------------------------------------------
# the autograd function
# --------------------------------------------------------------------------------------------------------------
def _compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """fp64 when an input is fp64 (gradcheck), else fp32."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _operands(A, B, V, w, W2, b2, dq, dk, dot_scale: float, cdt: torch.dtype):
    """The tiles' operands in the compute dtype: ``At`` ``(G, hidden, q_len)``, ``Bt`` ``(G, hidden, k_len)``,
    ``Vf`` ``(G, k_len, v_dim)``, per-group weights ``(G, ...)`` and the scaled dot operands (or ``None``)."""
    batch, heads, q_len, hidden = A.shape
    k_len, v_dim = B.shape[2], V.shape[3]
    G = batch * heads

    def per_group(p):  # (heads or 1, ...) -> (G, ...)
        return p.to(cdt).unsqueeze(0).expand(batch, heads, *p.shape[1:]).reshape(G, *p.shape[1:]).contiguous()

    At = A.to(cdt).reshape(G, q_len, hidden).transpose(1, 2).contiguous()
    Bt = B.to(cdt).reshape(G, k_len, hidden).transpose(1, 2).contiguous()
    Vf = V.to(cdt).reshape(G, k_len, v_dim)
    W2g = per_group(W2) if W2 is not None else None
    b2g = per_group(b2) if b2 is not None else None
    dqs = (dq.to(cdt) * dot_scale).reshape(G, q_len, -1) if dq is not None else None
    dkf = dk.to(cdt).reshape(G, k_len, -1) if dk is not None else None
    return At, Bt, Vf, per_group(w), W2g, b2g, dqs, dkf


def _blocks(block: list[int], G: int, tile_width: int, q_len: int, k_len: int):
    """The query and key blocks ``[(start, end), ...]``: ``block`` = ``[bq, bk]``, or ``[-1, -1]`` for automatic."""
    bq, bk = block if block[0] > 0 else choose_block_size(G, tile_width, q_len, k_len)
    q_blocks = [(i, min(i + bq, q_len)) for i in range(0, q_len, bq)]
    return q_blocks, [(j, min(j + bk, k_len)) for j in range(0, k_len, bk)]


def _tiled_forward(factory: ScorerFactory | None, A: Tensor, B: Tensor, V: Tensor, w: Tensor, W2: Tensor | None,
                   b2: Tensor | None, dq: Tensor | None, dk: Tensor | None, mask: Tensor | None, bias: Tensor | None,
                   sinks: Tensor | None, activation: str, causal: bool, dot_scale: float, dropout_p: float,
                   seed: Tensor, block: list[int], softcap: float) -> tuple[Tensor, Tensor]:
    """``(out, stats)``: ``(G, q_len, v_dim)`` and ``(G, q_len, 2)`` in the compute dtype (``G = batch * heads``).

    ``stats[..., 0]`` is each row's score maximum, ``stats[..., 1]`` the log of its softmax denominator (``+inf`` for
    a row no key is visible to). Kept apart, not summed into one log-sum-exp: a large negative score bias (a float
    mask of -1e9) puts the maximum where adding ``log(denom)`` rounds away, and backward's probabilities would be
    ``denom`` times too large. ``sinks`` (attention sinks, gpt-oss): one more logit per row in the denominator, with
    no value: folded in after the keys, as a key of value zero."""
    batch, heads, q_len, _ = A.shape
    k_len, v_dim = B.shape[2], V.shape[3]
    G, dev = batch * heads, A.device
    cdt = _compute_dtype(A, B, V, w, W2, b2, dq, dk, bias, sinks)
    At, Bt, Vf, wg, W2g, b2g, dqs, dkf = _operands(A, B, V, w, W2, b2, dq, dk, dot_scale, cdt)
    scorer = _make_scorer(factory, activation, At, Bt, wg, W2g, b2g, need_grad=False)
    q_blocks, k_blocks = _blocks(block, G, scorer.tile_width, q_len, k_len)
    tile_masks = _TileMasks(mask, causal, batch, heads, dev)
    p, seed = dropout_p, int(seed)
    sink = None if sinks is None else sink_rows(sinks.to(cdt), batch, heads, q_len)  # (G, q_len)

    out = torch.zeros(G, q_len, v_dim, dtype=cdt, device=dev)
    stats = torch.empty(G, q_len, 2, dtype=cdt, device=dev)
    for qi, (i0, i1) in enumerate(q_blocks):
        m = torch.full((G, i1 - i0), -math.inf, dtype=cdt, device=dev)
        m_safe = torch.zeros_like(m)
        denom = torch.zeros_like(m)
        acc = torch.zeros(G, i1 - i0, v_dim, dtype=cdt, device=dev)
        for kj, (j0, j1) in enumerate(k_blocks):
            tm = tile_masks(i0, i1, j0, j1)
            if tm is False:
                continue
            s = scorer.scores(i0, i1, j0, j1)
            _complete_scores(s, dqs, dkf, bias, tm, i0, i1, j0, j1, batch, heads, softcap)
            m_new = torch.maximum(m, s.amax(-1))
            m_safe_new = m_new.masked_fill(m_new == -math.inf, 0.0)
            pr = torch.exp_(s.sub_(m_safe_new.unsqueeze(-1)))
            alpha = torch.exp(m_safe - m_safe_new).masked_fill_(m == -math.inf, 0.0)
            denom = denom.mul_(alpha).add_(pr.sum(-1))
            if p > 0.0:
                pr = pr.mul_(_dropout_keep(seed, qi * len(k_blocks) + kj, pr.shape, p, cdt, dev))
            acc = acc.mul_(alpha.unsqueeze(-1)).baddbmm_(pr, Vf[:, j0:j1])
            m, m_safe = m_new, m_safe_new
        if sink is not None:  # (a row no key is visible to: all weight on the sink, zero output as without one)
            m_new = torch.maximum(m, sink[:, i0:i1])
            m_safe_new = m_new.masked_fill(m_new == -math.inf, 0.0)
            alpha = torch.exp(m_safe - m_safe_new).masked_fill_(m == -math.inf, 0.0)
            denom = denom.mul_(alpha).add_(torch.exp(sink[:, i0:i1] - m_safe_new))
            acc = acc.mul_(alpha.unsqueeze(-1))
            m_safe = m_safe_new
        visible = denom > 0
        tiny = torch.finfo(cdt).tiny
        out[:, i0:i1] = torch.where(visible.unsqueeze(-1), acc / denom.clamp_min(tiny).unsqueeze(-1), 0.0)
        stats[:, i0:i1, 0] = m_safe
        stats[:, i0:i1, 1] = torch.where(visible, torch.log(denom.clamp_min(tiny)), math.inf)
    return out, stats


def _tiled_backward(factory: ScorerFactory | None, A: Tensor, B: Tensor, V: Tensor, w: Tensor, W2: Tensor | None,
                    b2: Tensor | None, dq: Tensor | None, dk: Tensor | None, mask: Tensor | None, bias: Tensor | None,
                    sinks: Tensor | None, bias_grad: bool, out: Tensor, stats: Tensor, grad_out: Tensor,
                    activation: str, causal: bool, dot_scale: float, dropout_p: float, seed: Tensor, block: list[int],
                    softcap: float) -> tuple[Tensor, ...]:
    """Gradients of ``A, B, V, w, W2, b2, dq, dk, bias, sinks``, each shaped and typed like its input (empty for an
    absent one, and for the bias unless ``bias_grad``: a mask-derived bias or a fixed ALiBi buffer needs none); the
    scores are recomputed tile by tile. The bias's gradient is the scores' (summed where it broadcasts); a sink's is
    ``-p_sink * D`` per row (``D = rowsum(dO * O)``: the sink has no value), summed where it broadcasts."""
    batch, heads, q_len, hidden = A.shape
    k_len, v_dim = B.shape[2], V.shape[3]
    G, dev = batch * heads, A.device
    cdt = out.dtype
    At, Bt, Vf, wg, W2g, b2g, dqs, dkf = _operands(A, B, V, w, W2, b2, dq, dk, dot_scale, cdt)
    dot = dqs is not None
    dO = grad_out.to(cdt).reshape(G, q_len, v_dim)
    D = (dO * out).sum(-1)  # (G, q_len)
    scorer = _make_scorer(factory, activation, At, Bt, wg, W2g, b2g, need_grad=True)
    q_blocks, k_blocks = _blocks(block, G, scorer.tile_width, q_len, k_len)
    tile_masks = _TileMasks(mask, causal, batch, heads, dev)
    p, seed = dropout_p, int(seed)

    dV = torch.zeros(G, k_len, v_dim, dtype=cdt, device=dev)
    ddq = torch.zeros_like(dqs) if dot else None
    ddk = torch.zeros_like(dkf) if dot else None
    dbias = torch.zeros(bias.shape, dtype=cdt, device=dev) if bias is not None and bias_grad else None
    for qi, (i0, i1) in enumerate(q_blocks):
        dO_i, D_i = dO[:, i0:i1], D[:, i0:i1, None]
        max_i, log_denom_i = stats[:, i0:i1, 0:1], stats[:, i0:i1, 1:2]
        for kj, (j0, j1) in enumerate(k_blocks):
            tm = tile_masks(i0, i1, j0, j1)
            if tm is False:
                continue
            s, cache = scorer.scores_for_backward(i0, i1, j0, j1)
            cap_slope = _complete_scores(s, dqs, dkf, bias, tm, i0, i1, j0, j1, batch, heads, softcap, slope=True)
            pr = torch.exp_(s.sub_(max_i).sub_(log_denom_i))
            dp = torch.bmm(dO_i, Vf[:, j0:j1].transpose(1, 2))
            if p > 0.0:
                keep = _dropout_keep(seed, qi * len(k_blocks) + kj, pr.shape, p, cdt, dev)
                dV[:, j0:j1].baddbmm_((pr * keep).transpose(1, 2), dO_i)
                dp.mul_(keep)
            else:
                dV[:, j0:j1].baddbmm_(pr.transpose(1, 2), dO_i)
            ds = pr.mul_(dp.sub_(D_i))
            if dbias is not None:
                _accumulate_bias_grad(dbias, ds, i0, i1, j0, j1, batch, heads)
            if cap_slope is not None:  # from the capped logits to the MLP's scores (and the dot term)
                ds.mul_(cap_slope)
            scorer.backward(cache, ds, i0, i1, j0, j1)
            if dot:
                ddq[:, i0:i1].baddbmm_(ds, dkf[:, j0:j1])
                ddk[:, j0:j1].baddbmm_(ds.transpose(1, 2), dqs[:, i0:i1])

    dsinks = None
    if sinks is not None:  # from the row statistics, which include the sink
        dsinks = sink_grad(sink_rows(sinks.to(cdt), batch, heads, q_len), stats[..., 0], stats[..., 1], D,
                           sinks.shape, batch)
    dAt, dBt, dparams = scorer.grads()
    absent = [A.new_empty(0) for _ in range(6)]  # distinct tensors: an op's outputs may not alias each other
    return (
        dAt.transpose(1, 2).reshape(batch, heads, q_len, hidden).to(A.dtype).contiguous(),
        dBt.transpose(1, 2).reshape(batch, heads, k_len, hidden).to(B.dtype).contiguous(),
        dV.view(batch, heads, k_len, v_dim).to(V.dtype),
        weight_grad(dparams[0], batch, heads, w.shape, w.dtype),
        weight_grad(dparams[1], batch, heads, W2.shape, W2.dtype) if W2 is not None else absent[0],
        weight_grad(dparams[2], batch, heads, b2.shape, b2.dtype) if b2 is not None else absent[1],
        (ddq * dot_scale).view(dq.shape).to(dq.dtype).contiguous() if dot else absent[2],
        ddk.view(dk.shape).to(dk.dtype).contiguous() if dot else absent[3],
        dbias.to(bias.dtype) if dbias is not None else absent[4],
        dsinks.to(sinks.dtype) if dsinks is not None else absent[5],
    )


def _forward_fake(A, B, V, w, W2, b2, dq, dk, mask, bias, sinks, *args):
    cdt = _compute_dtype(A, B, V, w, W2, b2, dq, dk, bias, sinks)
    G, q_len = A.shape[0] * A.shape[1], A.shape[2]
    return V.new_empty(G, q_len, V.shape[3], dtype=cdt), V.new_empty(G, q_len, 2, dtype=cdt)


def _backward_fake(A, B, V, w, W2, b2, dq, dk, mask, bias, sinks, bias_grad, *args):
    return tuple(A.new_empty(0) if t is None else torch.empty_like(t, memory_format=torch.contiguous_format)
                 for t in (A, B, V, w, W2, b2, dq, dk, bias if bias_grad else None, sinks))  # fmt: skip


_FILE_TAG = source_tag(__file__)
_TILED_OPS: dict[ScorerFactory | None, tuple[Callable, Callable]] = {}


def tiled_ops(scorer_factory: ScorerFactory | None = None) -> tuple[Callable, Callable]:
    """The forward and backward of the tiled kernel with ``scorer_factory``'s scorers, as custom ops (created once
    per factory and kept, with the factory, for the process: pass long-lived factories, not one made per call;
    ``cpp_neural_attention`` makes its own at import). Inside an op the tile loops run eagerly: under torch.compile
    the kernel is one call, whatever the sequence lengths, instead of a graph unrolled per length."""
    if scorer_factory not in _TILED_OPS:
        if torch.compiler.is_compiling():
            raise RuntimeError(
                f"scorer_factory {scorer_factory!r} is first used inside torch.compile, which cannot register its "
                "ops; call tiled_neural_attention.tiled_ops(scorer_factory) once before compiling."
            )
        # one op pair per factory: module-level functions by name (stable across processes, for compile caches), any
        # other object (lambdas and closures of one module share a name) by identity
        qualname = getattr(scorer_factory, "__qualname__", "<object>")
        if scorer_factory is None:
            name = "torch"
        elif "<" in qualname:
            name = f"factory-{id(scorer_factory)}"
        else:
            name = f"{scorer_factory.__module__}.{qualname}"
        tag = hashlib.sha256(f"{_FILE_TAG}:{name}".encode()).hexdigest()[:12]

        def forward(A: Tensor, B: Tensor, V: Tensor, w: Tensor, W2: Tensor | None, b2: Tensor | None,
                    dq: Tensor | None, dk: Tensor | None, mask: Tensor | None, bias: Tensor | None,
                    sinks: Tensor | None, activation: str, causal: bool, dot_scale: float, dropout_p: float,
                    seed: Tensor, block: list[int], softcap: float) -> tuple[Tensor, Tensor]:
            return _tiled_forward(scorer_factory, A, B, V, w, W2, b2, dq, dk, mask, bias, sinks, activation, causal,
                                  dot_scale, dropout_p, seed, block, softcap)  # fmt: skip

        def backward(A: Tensor, B: Tensor, V: Tensor, w: Tensor, W2: Tensor | None, b2: Tensor | None,
                     dq: Tensor | None, dk: Tensor | None, mask: Tensor | None, bias: Tensor | None,
                     sinks: Tensor | None, bias_grad: bool, out: Tensor, stats: Tensor, grad_out: Tensor,
                     activation: str, causal: bool, dot_scale: float, dropout_p: float, seed: Tensor,
                     block: list[int], softcap: float
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
            return _tiled_backward(scorer_factory, A, B, V, w, W2, b2, dq, dk, mask, bias, sinks, bias_grad, out,
                                   stats, grad_out, activation, causal, dot_scale, dropout_p, seed, block,
                                   softcap)  # fmt: skip

        _TILED_OPS[scorer_factory] = (kernel_op(f"tiled_forward_{tag}", _forward_fake)(forward),
                                      kernel_op(f"tiled_backward_{tag}", _backward_fake)(backward))  # fmt: skip
    return _TILED_OPS[scorer_factory]


tiled_ops()  # the PyTorch scorers' ops, registered at import (not while torch.compile traces a call)




class _NeuralAttentionFunction(torch.autograd.Function):
    """Saves the inputs, the output and each row's softmax statistics; both passes are custom ops
    (:func:`tiled_ops`)."""

    @staticmethod
    @autocast_off
    @keeps_differentiable_inputs  # for the second-derivative error (see once_differentiable_always)
    def forward(ctx, A, B, V, w, W2, b2, dq, dk, mask, bias, sinks, cfg):
        inputs = (A, B, V, w, W2, b2, dq, dk)
        settings = (cfg["activation"], cfg["causal"], cfg["dot_scale"], cfg["dropout_p"], cfg["seed"], cfg["block"],
                    cfg["softcap"])
        forward_op, _ = cfg["ops"]
        out, stats = forward_op(*inputs, mask, bias, sinks, *settings)
        ctx.save_for_backward(*inputs, mask, bias, sinks, out, stats)
        ctx.settings, ctx.ops = settings, cfg["ops"]
        batch, heads, q_len, _ = A.shape
        out = out.view(batch, heads, q_len, V.shape[3])
        # no no-op .to(): under torch.compile, torch 2.11 gave the output's gradient to the wrong slot when the
        # Function returned the same tensor through it, and backward got zeros (pytorch/pytorch#180642)
        return out if out.dtype == V.dtype else out.to(V.dtype)

    @staticmethod
    @once_differentiable_always  # the backward op is not differentiable: a second derivative must raise
    @autocast_off
    def backward(ctx, grad_out):
        *inputs, mask, bias, sinks, out, stats = ctx.saved_tensors
        _, backward_op = ctx.ops
        bias_grad = bias is not None and ctx.needs_input_grad[9]
        *grads, dbias, dsinks = backward_op(*inputs, mask, bias, sinks, bias_grad, out, stats, grad_out.contiguous(),
                                            *ctx.settings)  # fmt: skip
        return (*(None if t is None else g for t, g in zip(inputs, grads, strict=True)), None,
                dbias if bias_grad else None, dsinks if sinks is not None else None, None)


def _make_scorer(factory: ScorerFactory | None, activation: str, At: Tensor, Bt: Tensor, wg: Tensor,
                 W2g: Tensor | None, b2g: Tensor | None, need_grad: bool) -> TileScorer:
    """The ``factory``'s scorer if it gives one, else the PyTorch scorer of the mlp."""
    if factory is not None:
        scorer = factory(At, Bt, wg, W2g, b2g, activation, need_grad)
        if scorer is not None:
            return scorer
    if W2g is not None:
        return _AuthorsScorer(At, Bt, wg, W2g, b2g, need_grad)
    return _PaperScorer(At, Bt, wg, activation, need_grad)




def neural_attention_tiled(
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
    block_size: int | tuple[int, int] | None = None,
    scorer_factory: ScorerFactory | None = None,
    softcap: float | None = None,
    sinks: Tensor | None = None,
) -> Tensor:
    """Neural attention, tiled over query and key blocks with an online softmax (pure PyTorch).

    See the kernel contract in ``docs/design.md``: ``query_hidden`` ``(b, h, q_len, hidden)``, ``key_hidden``
    ``(b, h, k_len, hidden)``, ``value`` ``(b, h, k_len, v_dim)`` -> ``(b, h, q_len, v_dim)``. ``score_bias``
    (float, broadcastable to ``(b, h, q_len, k_len)``; T5's position bias, ALiBi) is added to every score, read tile
    by tile, and gets its gradient. ``block_size`` overrides the automatic ``(block_q, block_k)`` (an int sets both);
    the dropout pattern depends on it. ``scorer_factory`` supplies another implementation of the per-pair MLP (see
    :data:`ScorerFactory`). ``softcap`` (Gemma 2's logit soft-capping) replaces each score by
    ``softcap * tanh(score / softcap)`` before the bias is added; ``sinks`` (attention sinks: gpt-oss per head,
    ``(1, heads, 1, 1)``; per query, ``(batch, heads, q_len, 1)``) add one logit per row to the softmax's denominator,
    with no value, and get their gradient.
    """
    output_weight, second_weight, second_bias = check_kernel_inputs(
        query_hidden, key_hidden, value, output_weight, second_weight, second_bias, activation, mask, dot_query,
        dot_key, dropout_p, score_bias,
    )  # fmt: skip
    batch, heads, q_len, _ = query_hidden.shape
    k_len = key_hidden.shape[2]
    check_sinks(sinks, batch, heads, q_len)
    if q_len == 0 or k_len == 0 or batch * heads == 0:  # (with sinks too: every row's weight on its sink)
        return empty_attention((query_hidden, key_hidden, value, output_weight, second_weight, second_bias,
                                dot_query, dot_key, score_bias, sinks))  # fmt: skip
    if score_bias is not None:
        score_bias = as_4d(score_bias)
    mask, causal = fold_causal_into_mask(mask, causal, q_len, k_len)
    if block_size is None:
        block = [-1, -1]
    elif isinstance(block_size, int):
        block = [int(block_size), int(block_size)]
    else:
        block = [int(block_size[0]), int(block_size[1])]
    if min(block) == 0 or (min(block) < 0 and block != [-1, -1]):
        raise ValueError(f"block_size must be positive, got {block_size}")
    check_softcap(softcap)
    cfg = {
        "ops": tiled_ops(scorer_factory),
        "activation": activation,
        "causal": bool(causal) and mask is None,
        "dot_scale": float(dot_scale),
        "dropout_p": float(dropout_p),
        "seed": seed_tensor(dropout_p, generator_seed),
        "block": block,
        "softcap": float(softcap or 0.0),
    }
    # rows no pair sees get no gradient; zeroed (differentiably), garbage there (even NaN) cannot reach dw
    query_visible, key_visible = visible_rows(mask, cfg["causal"], q_len, k_len, query_hidden.device)
    # centred in the kernel's compute dtype (after the cast: bf16 offsets would round first; fp64 if any input is)
    cdt = _compute_dtype(query_hidden, key_hidden, value, output_weight, second_weight, second_bias, dot_query, dot_key,
                         score_bias, sinks)
    query_hidden, key_hidden = centre_hidden(query_hidden.to(cdt), key_hidden.to(cdt), query_visible, key_visible)
    value, dot_query, dot_key = zero_unseen_operands(value, dot_query, dot_key, query_visible, key_visible)
    return _NeuralAttentionFunction.apply(
        query_hidden, key_hidden, value, output_weight, second_weight, second_bias, dot_query, dot_key, mask,
        score_bias, sinks, cfg,
    )
