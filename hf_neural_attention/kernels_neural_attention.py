"""Fused CPU neural attention: tiled, online softmax, scores recomputed in backward.

Implements the kernel contract of ``docs/design.md`` as a ``torch.autograd.Function``:

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

This file travels with Hub checkpoints: it imports only torch and the standard library.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

__all__ = [
    "ACTIVATIONS",
    "ScorerFactory",
    "TileScorer",
    "as_4d",
    "bias_grad_rows",
    "causal_mask",
    "centre_hidden",
    "check_kernel_inputs",
    "choose_block_size",
    "empty_attention",
    "fold_causal_into_mask",
    "neural_attention_tiled",
    "relu_signed_max_operands",
    "kernel_op",
    "once_differentiable_always",
    "relu_weight_grad",
    "seed_tensor",
    "sum_to_bias_shape",
    "tiled_ops",
    "visible_rows",
    "zero_invisible_rows",
]

ACTIVATIONS = ("relu", "gelu", "silu", "tanh")


def as_4d(t: Tensor) -> Tensor:
    """A mask or score bias broadcastable to ``(batch, heads, q_len, k_len)`` as a 4-D view: leading size-1 dims added
    (its gradient then comes back in the caller's shape)."""
    return t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))


def visible_rows(
    mask: Tensor | None, causal: bool, q_len: int, k_len: int, device: torch.device | str | None = None
) -> tuple[Tensor | None, Tensor | None]:
    """Which queries see at least one key, and which keys at least one query sees.

    ``mask``: bool, broadcastable to ``(batch, heads, q_len, k_len)``, True = may attend (None: every pair);
    ``causal``: query i sees keys j <= i as well. Returns ``(query_visible, key_visible)``, bool ``(b|1, h|1, q_len,
    1)`` and ``(b|1, h|1, k_len, 1)`` (they broadcast against ``(batch, heads, len, hidden)``), or None where every
    row is visible; on ``device`` (default: the mask's). The other rows get no gradient and must not
    touch any visible one: the relu helpers below zero them, so garbage in a padded or masked row (even NaN) stays
    out of the centring and the weight gradient.
    """
    if mask is None:
        if not causal or k_len <= q_len:
            return None, None
        return None, (torch.arange(k_len, device=device) < q_len).view(1, 1, k_len, 1)
    mask = as_4d(mask)
    # an expanded view (stride 0) holds one slice per broadcast dim: reduce that, not the expansion
    mask = mask[tuple(slice(0, 1) if stride == 0 else slice(None) for stride in mask.stride())]
    if device is not None:
        mask = mask.to(device)
    pairs = mask.expand(*mask.shape[:2], q_len, k_len)
    if causal:
        pairs = pairs & causal_mask(q_len, k_len, mask.device)
    return pairs.any(-1).unsqueeze(-1), pairs.any(-2).unsqueeze(-1)


def empty_attention(tensors: tuple[Tensor | None, ...]) -> Tensor:
    """Output of a call with ``q_len``, ``k_len`` or ``batch * heads`` zero: ``(batch, heads, q_len, v_dim)`` zeros,
    kept in the autograd graph (every input that requires grad gets a zero gradient, not ``None``: DDP's unused
    parameter check and ``autograd.grad`` expect one). ``tensors``: ``(query_hidden, key_hidden, value, *optional
    differentiable inputs or None)``."""
    query_hidden, _, value = tensors[:3]
    batch, heads, q_len, _ = query_hidden.shape
    out = value.new_zeros(batch, heads, q_len, value.shape[-1])
    anchor = sum((t.sum() * 0).to(out.dtype) for t in tensors if t is not None and t.requires_grad)
    return out + anchor if torch.is_tensor(anchor) else out


def fold_causal_into_mask(
    mask: Tensor | None, causal: bool, q_len: int, k_len: int
) -> tuple[Tensor | None, bool]:
    """``(mask, causal)`` with both constraints in the mask when a caller passes both (the contract applies both);
    unchanged otherwise. The mask broadcasts to ``(batch|1, heads|1, q_len, k_len)``."""
    if mask is None or not causal:
        return mask, causal
    return mask & causal_mask(q_len, k_len, mask.device), False


def causal_mask(q_len: int, k_len: int, device: torch.device | str | None = None) -> Tensor:
    """Upper-left aligned causal visibility ``(q_len, k_len)``: key j visible to query i iff j <= i."""
    rows = torch.arange(q_len, device=device)[:, None]
    return torch.arange(k_len, device=device)[None, :] <= rows


def centre_hidden(
    query_hidden: Tensor, key_hidden: Tensor, query_visible: Tensor | None, key_visible: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Differentiable ``(A + mu, B - mu)``, mu the mean of B over the visible keys (per batch, head, unit), in the
    inputs' dtype (fp64 stays fp64). Every pre-activation ``A_i + B_j`` is unchanged, and so are the gradients of A
    and B (their sums over the pairs are equal), but large opposite offsets of A and B no longer cancel in fp32
    inside the kernels (the relu scorer's max and per-key constant, and dw). Rows no pair sees are zeroed first, so
    garbage there (even NaN) cannot reach mu; they come out as the finite ``+-mu`` and get no gradient."""
    A = zero_invisible_rows(query_hidden, query_visible)
    B = zero_invisible_rows(key_hidden, key_visible)
    mu = _key_mean(B, key_visible)
    return A + mu, B - mu


def zero_invisible_rows(x: Tensor, visible: Tensor | None) -> Tensor:
    """x (..., len, hidden) with the rows ``visible`` (from :func:`visible_rows`; None: all) marks False set to 0."""
    return x if visible is None else torch.where(visible, x, 0.0)


def _key_mean(B: Tensor, key_visible: Tensor | None) -> Tensor:
    """Mean of B over the visible keys (dim -2; B already zero at the others), keepdim."""
    if key_visible is None:
        return B.mean(dim=-2, keepdim=True)
    return B.sum(dim=-2, keepdim=True) / key_visible.sum(dim=-2, keepdim=True).clamp_min(1)


def _centred(A: Tensor, B: Tensor, query_visible: Tensor | None, key_visible: Tensor | None) -> tuple[Tensor, Tensor]:
    """fp32 (A + mu, B - mu), mu the mean of B over the visible keys, rows no pair sees zero: pre = A + B unchanged,
    large opposite offsets of A and B removed before anything multiplies or compares them."""
    A, B = centre_hidden(A.float(), B.float(), query_visible, key_visible)
    return zero_invisible_rows(A, query_visible), zero_invisible_rows(B, key_visible)


def relu_signed_max_operands(
    query_hidden: Tensor,
    key_hidden: Tensor,
    output_weight: Tensor,
    query_visible: Tensor | None = None,
    key_visible: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Operands of ``score_ij = sum_m w_m relu(A_im + B_jm)`` in signed-max form (fused C++ and Triton kernels).

    With mu_m the mean of B_m over the visible keys (per batch, head), s_m = |w_m| and sg_m = sign(w_m) (s_m = 1,
    sg_m = 0 where |w_m| is below the smallest normal float: such a unit scores 0):

        w_m relu(A_m + B_m) = sg_m max(a_m, b_m) + w_m (B_m - mu_m),   a_m = s_m (A_m + mu_m),
        b_m = -s_m (B_m - mu_m),   relu'(A_m + B_m) = [a_m > b_m].

    A unit then costs a pair 2 operations (a max and a multiply-add) instead of 3, the last term summed over units
    is one constant per key, and the relu mask needs no addition. Centring keeps the max and the constant small
    when A and B carry large opposite offsets (fp32 cancellation); a subnormal s would quantise a and b and break the
    mask. ``query_hidden`` A ``(batch, heads, q_len, hidden)``, ``key_hidden`` B ``(batch, heads, k_len, hidden)``,
    ``output_weight`` w ``(heads or 1, hidden)``; visibility from :func:`visible_rows`. Returns fp32
    ``(a, b, sg (heads or 1, hidden), ck (batch, heads, k_len) = sum_m w_m (B_m - mu_m))``, zero at invisible rows.
    """
    w = output_weight.float()
    w = torch.where(w.abs() < torch.finfo(torch.float32).tiny, 0.0, w)
    A, B = _centred(query_hidden, key_hidden, query_visible, key_visible)
    w4 = w.view(1, -1, 1, w.shape[-1])
    scale = torch.where(w4 == 0, 1.0, w4.abs())
    return A * scale, B * -scale, torch.sign(w), (B * w4).sum(dim=-1)


def relu_weight_grad(
    query_hidden: Tensor,
    key_hidden: Tensor,
    raw_query: Tensor,
    raw_key: Tensor,
    query_visible: Tensor | None = None,
    key_visible: Tensor | None = None,
) -> Tensor:
    """dL/dw of ``score_ij = sum_k w_k relu(A_ik + B_jk)`` from the raw sums the input gradients need anyway.

    ``query_hidden`` A ``(..., q_len, hidden)``, ``key_hidden`` B ``(..., k_len, hidden)``; ``raw_query``
    G_ik = sum_j relu'(pre_ijk) dS_ij and ``raw_key`` H_jk = sum_i relu'(pre_ijk) dS_ij (fp32, shaped like A / B;
    dA = G w, dB = H w). Since relu(x) = x relu'(x), dw_k = sum_i A_ik G_ik + sum_j B_jk H_jk: no reduction per
    tile. B is centred (pre = (A + mu) + (B - mu), and sum_i G = sum_j H) so that large opposite offsets of A and
    B do not cancel in fp32; rows no pair sees (``visible_rows``; G and H are 0 there) are left out, so garbage in
    them does not reach dw. Returns ``(..., hidden)`` fp32.
    """
    A, B = _centred(query_hidden, key_hidden, query_visible, key_visible)
    return (A * raw_query).sum(dim=-2) + (B * raw_key).sum(dim=-2)

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
# custom ops: what torch.compile must not trace into
# --------------------------------------------------------------------------------------------------------------
OP_NAMESPACE = "hf_neural_attention"


def kernel_op(name: str, fake: Callable) -> Callable[[Callable], Callable]:
    """Decorator: register the function as the torch custom op ``hf_neural_attention::<name>`` (schema inferred from
    its type hints, ``fake`` giving its output shapes; it must not mutate its inputs) and return a caller that runs
    the function directly in eager mode and the op under torch.compile.

    Why: a compiled C++ (pybind) function, a Triton launch or a loop over tiles cannot be traced, or only into one
    graph per sequence length; as an op of known output shapes the kernel becomes one opaque node, and
    ``torch.compile(fullgraph=True)`` gets through the model. Eager calls skip the dispatcher (and its overhead).

    ``name`` carries a version or source hash: the plugin and the copy of it a Hub checkpoint carries may both be
    imported in one process; the second import reuses the op of an identical first one, and a changed kernel needs a
    new name.
    """

    def wrap(impl: Callable) -> Callable:
        namespace = getattr(torch.ops, OP_NAMESPACE)
        if not hasattr(namespace, name):
            torch.library.custom_op(f"{OP_NAMESPACE}::{name}", impl, mutates_args=()).register_fake(fake)
        op = getattr(namespace, name).default

        @functools.wraps(impl)
        def call(*args):
            return op(*args) if torch.compiler.is_compiling() else impl(*args)

        call.op = op
        return call

    return wrap


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


def _add_bias_tile(s: Tensor, bias: Tensor, i0: int, i1: int, j0: int, j1: int, batch: int, heads: int) -> None:
    """Add the tile's part of ``bias`` ``(batch|1, heads|1, q_len|1, k_len|1)`` to the scores ``s`` ``(G, bq, bk)``,
    in place, broadcasting through a ``(batch, heads, bq, bk)`` view (no copy of the bias per tile)."""
    s.view(batch, heads, i1 - i0, j1 - j0).add_(_tile_of(bias, i0, i1, j0, j1))


def sum_to_bias_shape(grad: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """A score gradient ``grad`` ``(batch, heads, q_len, k_len)`` (or a tile of it) summed over the dims a 4-D bias
    ``shape`` ``(batch|1, heads|1, q_len|1, k_len|1)`` broadcasts along (fixed-order torch sums: deterministic)."""
    summed = [d for d in range(4) if shape[d] == 1 and grad.shape[d] != 1]
    return grad.sum(summed, keepdim=True) if summed else grad


#: A score bias shared across the batch (T5's relative position bias) gets its gradient from the fused kernels as
#: dS added into an fp32 ``(rows, heads, q_len, k_len)`` buffer by launches of ``rows`` batch rows each (then summed
#: over its rows): the buffer holds at most this many bytes, or one batch row where that is larger.
BIAS_GRAD_BUFFER_BYTES = 256 << 20


def bias_grad_rows(batch: int, heads: int, q_len: int, k_len: int, bias_shape: torch.Size | tuple[int, ...]) -> int:
    """How many batch rows one backward launch writes dS for: all of them for a bias with its own batch dim (its
    gradient is that big anyway), else as many as fit in ``BIAS_GRAD_BUFFER_BYTES`` (at least one): a bias
    ``(1, heads, q_len, k_len)`` trained at batch 8 would otherwise take an 8x larger buffer than its gradient."""
    if bias_shape[0] != 1:
        return batch
    return max(1, min(batch, BIAS_GRAD_BUFFER_BYTES // max(heads * q_len * k_len * 4, 1)))


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


def seed_tensor(dropout_p: float, generator_seed: int | Tensor | None, bound: int = 1 << 62) -> Tensor:
    """The dropout seed as a 0-d int64 CPU tensor: ``generator_seed`` (an int or a 0-d tensor, kept to 63 bits), else
    one draw in ``[0, bound)`` from torch's default generator -- only when dropout is on, so that calls without
    dropout leave the caller's random stream alone. A tensor, not an int: under torch.compile an int would need an
    ``.item()``, which breaks the graph."""
    if generator_seed is None:
        if dropout_p > 0.0:
            return torch.randint(0, bound, (), dtype=torch.int64)
        return torch.zeros((), dtype=torch.int64)
    if isinstance(generator_seed, Tensor):
        return generator_seed.to(device="cpu", dtype=torch.int64).reshape(()) & ((1 << 63) - 1)
    return torch.tensor(int(generator_seed) & ((1 << 63) - 1), dtype=torch.int64)


# --------------------------------------------------------------------------------------------------------------
# the autograd function
# --------------------------------------------------------------------------------------------------------------
def autocast_off(method: Callable) -> Callable:
    """Run an autograd Function's ``forward`` / ``backward`` with autocast disabled on its tensors' device.

    The kernels choose their own compute dtype (fp32 accumulation); under ``torch.autocast`` the matmuls inside
    them would otherwise be cast to bf16 / fp16 while their fp32 accumulators stay fp32, which makes in-place
    ``baddbmm_`` fail and would change the numerics of the host-side GEMMs.
    """

    @functools.wraps(method)
    def wrapper(ctx, *args):
        device = next((a.device.type for a in args if isinstance(a, Tensor)), "cpu")
        with torch.autocast(device_type=device, enabled=False):
            return method(ctx, *args)

    return wrapper


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
                   activation: str, causal: bool, dot_scale: float, dropout_p: float, seed: Tensor,
                   block: list[int]) -> tuple[Tensor, Tensor]:
    """``(out, stats)``: ``(G, q_len, v_dim)`` and ``(G, q_len, 2)`` in the compute dtype (``G = batch * heads``).

    ``stats[..., 0]`` is each row's score maximum, ``stats[..., 1]`` the log of its softmax denominator (``+inf`` for
    a row no key is visible to). Kept apart, not summed into one log-sum-exp: a large negative score bias (a float
    mask of -1e9) puts the maximum where adding ``log(denom)`` rounds away, and backward's probabilities would be
    ``denom`` times too large."""
    batch, heads, q_len, _ = A.shape
    k_len, v_dim = B.shape[2], V.shape[3]
    G, dev = batch * heads, A.device
    cdt = _compute_dtype(A, B, V, w, W2, b2, dq, dk, bias)
    At, Bt, Vf, wg, W2g, b2g, dqs, dkf = _operands(A, B, V, w, W2, b2, dq, dk, dot_scale, cdt)
    dot = dqs is not None
    scorer = _make_scorer(factory, activation, At, Bt, wg, W2g, b2g, need_grad=False)
    q_blocks, k_blocks = _blocks(block, G, scorer.tile_width, q_len, k_len)
    tile_masks = _TileMasks(mask, causal, batch, heads, dev)
    p, seed = dropout_p, int(seed)

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
            if dot:
                s.baddbmm_(dqs[:, i0:i1], dkf[:, j0:j1].transpose(1, 2))
            if bias is not None:
                _add_bias_tile(s, bias, i0, i1, j0, j1, batch, heads)
            if tm is not None:
                s.masked_fill_(~tm, -math.inf)
            m_new = torch.maximum(m, s.amax(-1))
            m_safe_new = m_new.masked_fill(m_new == -math.inf, 0.0)
            pr = torch.exp_(s.sub_(m_safe_new.unsqueeze(-1)))
            alpha = torch.exp(m_safe - m_safe_new).masked_fill_(m == -math.inf, 0.0)
            denom = denom.mul_(alpha).add_(pr.sum(-1))
            if p > 0.0:
                pr = pr.mul_(_dropout_keep(seed, qi * len(k_blocks) + kj, pr.shape, p, cdt, dev))
            acc = acc.mul_(alpha.unsqueeze(-1)).baddbmm_(pr, Vf[:, j0:j1])
            m, m_safe = m_new, m_safe_new
        visible = denom > 0
        tiny = torch.finfo(cdt).tiny
        out[:, i0:i1] = torch.where(visible.unsqueeze(-1), acc / denom.clamp_min(tiny).unsqueeze(-1), 0.0)
        stats[:, i0:i1, 0] = m_safe
        stats[:, i0:i1, 1] = torch.where(visible, torch.log(denom.clamp_min(tiny)), math.inf)
    return out, stats


def _tiled_backward(factory: ScorerFactory | None, A: Tensor, B: Tensor, V: Tensor, w: Tensor, W2: Tensor | None,
                    b2: Tensor | None, dq: Tensor | None, dk: Tensor | None, mask: Tensor | None, bias: Tensor | None,
                    bias_grad: bool, out: Tensor, stats: Tensor, grad_out: Tensor, activation: str, causal: bool,
                    dot_scale: float, dropout_p: float, seed: Tensor, block: list[int]) -> tuple[Tensor, ...]:
    """Gradients of ``A, B, V, w, W2, b2, dq, dk, bias``, each shaped and typed like its input (empty for an absent
    one, and for the bias unless ``bias_grad``: a mask-derived bias or a fixed ALiBi buffer needs none); the scores
    are recomputed tile by tile. The bias's gradient is the scores' (summed where it broadcasts)."""
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
            if dot:
                s.baddbmm_(dqs[:, i0:i1], dkf[:, j0:j1].transpose(1, 2))
            if bias is not None:
                _add_bias_tile(s, bias, i0, i1, j0, j1, batch, heads)
            if tm is not None:
                s.masked_fill_(~tm, -math.inf)
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
            scorer.backward(cache, ds, i0, i1, j0, j1)
            if dot:
                ddq[:, i0:i1].baddbmm_(ds, dkf[:, j0:j1])
                ddk[:, j0:j1].baddbmm_(ds.transpose(1, 2), dqs[:, i0:i1])

    def per_param(g, like):  # (G, ...) -> (heads or 1, ...)
        g = g.view(batch, heads, *g.shape[1:]).sum(0)
        if like.shape[0] == 1 and heads != 1:
            g = g.sum(0, keepdim=True)
        return g.to(like.dtype).contiguous()

    dAt, dBt, dparams = scorer.grads()
    absent = [A.new_empty(0) for _ in range(5)]  # distinct tensors: an op's outputs may not alias each other
    return (
        dAt.transpose(1, 2).reshape(batch, heads, q_len, hidden).to(A.dtype).contiguous(),
        dBt.transpose(1, 2).reshape(batch, heads, k_len, hidden).to(B.dtype).contiguous(),
        dV.view(batch, heads, k_len, v_dim).to(V.dtype),
        per_param(dparams[0], w),
        per_param(dparams[1], W2) if W2 is not None else absent[0],
        per_param(dparams[2], b2) if b2 is not None else absent[1],
        (ddq * dot_scale).view(dq.shape).to(dq.dtype).contiguous() if dot else absent[2],
        ddk.view(dk.shape).to(dk.dtype).contiguous() if dot else absent[3],
        dbias.to(bias.dtype) if dbias is not None else absent[4],
    )


def _forward_fake(A, B, V, w, W2, b2, dq, dk, mask, bias, *args):
    cdt = _compute_dtype(A, B, V, w, W2, b2, dq, dk, bias)
    G, q_len = A.shape[0] * A.shape[1], A.shape[2]
    return V.new_empty(G, q_len, V.shape[3], dtype=cdt), V.new_empty(G, q_len, 2, dtype=cdt)


def _backward_fake(A, B, V, w, W2, b2, dq, dk, mask, bias, bias_grad, *args):
    return tuple(A.new_empty(0) if t is None else torch.empty_like(t, memory_format=torch.contiguous_format)
                 for t in (A, B, V, w, W2, b2, dq, dk, bias if bias_grad else None))  # fmt: skip


_FILE_TAG = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]
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
                "ops; call kernels_neural_attention.tiled_ops(scorer_factory) once before compiling."
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
                    dq: Tensor | None, dk: Tensor | None, mask: Tensor | None, bias: Tensor | None, activation: str,
                    causal: bool, dot_scale: float, dropout_p: float, seed: Tensor,
                    block: list[int]) -> tuple[Tensor, Tensor]:
            return _tiled_forward(scorer_factory, A, B, V, w, W2, b2, dq, dk, mask, bias, activation, causal,
                                  dot_scale, dropout_p, seed, block)  # fmt: skip

        def backward(A: Tensor, B: Tensor, V: Tensor, w: Tensor, W2: Tensor | None, b2: Tensor | None,
                     dq: Tensor | None, dk: Tensor | None, mask: Tensor | None, bias: Tensor | None, bias_grad: bool,
                     out: Tensor, stats: Tensor, grad_out: Tensor, activation: str, causal: bool, dot_scale: float,
                     dropout_p: float, seed: Tensor, block: list[int]
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
            return _tiled_backward(scorer_factory, A, B, V, w, W2, b2, dq, dk, mask, bias, bias_grad, out, stats,
                                   grad_out, activation, causal, dot_scale, dropout_p, seed, block)  # fmt: skip

        _TILED_OPS[scorer_factory] = (kernel_op(f"tiled_forward_{tag}", _forward_fake)(forward),
                                      kernel_op(f"tiled_backward_{tag}", _backward_fake)(backward))  # fmt: skip
    return _TILED_OPS[scorer_factory]


tiled_ops()  # the PyTorch scorers' ops, registered at import (not while torch.compile traces a call)


SECOND_DERIVATIVE_ERROR = (
    b"neural attention's fused backends (tiled, cpp, triton) have no second derivative (a gradient penalty, "
    b"create_graph=True, differentiated again): patch with backend='eager', which has them (trying to "
    b"differentiate twice a function that was marked with @once_differentiable)"
)


def once_differentiable_always(backward: Callable) -> Callable:
    """``once_differentiable``, also when the incoming gradient does not depend on the output, and with an error
    that names the fix.

    ``once_differentiable`` marks the gradients it returns as non-differentiable only when some incoming gradient
    requires grad: for ``out.sum()`` under ``create_graph=True`` they came back outside the graph, so a gradient
    penalty silently lost its second-order term. Here every gradient of a ``create_graph=True`` backward carries the
    error node, and differentiating it raises ``RuntimeError`` (torch's generic message did not say what to do).
    """

    @functools.wraps(backward)
    def wrapper(ctx: Any, *grad_outputs: Any) -> Any:
        with torch.no_grad():
            grads = backward(ctx, *grad_outputs)
        if not torch.is_grad_enabled():
            return grads  # a plain backward: first order only
        outputs = grads if isinstance(grads, tuple) else (grads,)
        error = torch._C._functions.DelayedError(SECOND_DERIVATIVE_ERROR, len(outputs))
        marked = error(*[None if g is None else g.detach().requires_grad_() for g in outputs])
        marked = marked if isinstance(marked, tuple) else (marked,)
        return marked if isinstance(grads, tuple) else marked[0]

    return wrapper


class _NeuralAttentionFunction(torch.autograd.Function):
    """Saves the inputs, the output and each row's softmax statistics; both passes are custom ops
    (:func:`tiled_ops`)."""

    @staticmethod
    @autocast_off
    def forward(ctx, A, B, V, w, W2, b2, dq, dk, mask, bias, cfg):
        inputs = (A, B, V, w, W2, b2, dq, dk)
        settings = (cfg["activation"], cfg["causal"], cfg["dot_scale"], cfg["dropout_p"], cfg["seed"], cfg["block"])
        forward_op, _ = cfg["ops"]
        out, stats = forward_op(*inputs, mask, bias, *settings)
        ctx.save_for_backward(*inputs, mask, bias, out, stats)
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
        *inputs, mask, bias, out, stats = ctx.saved_tensors
        _, backward_op = ctx.ops
        bias_grad = bias is not None and ctx.needs_input_grad[9]
        *grads, dbias = backward_op(*inputs, mask, bias, bias_grad, out, stats, grad_out.contiguous(), *ctx.settings)
        return (*(None if t is None else g for t, g in zip(inputs, grads, strict=True)), None,
                dbias if bias_grad else None, None)


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


def _with_heads_dim(name: str, weight: Tensor, heads: int, tail: tuple[int, ...]) -> Tensor:
    """``weight`` as ``(heads or 1, *tail)`` (a view: gradients keep the caller's shape); else ``ValueError``."""
    if weight.dim() == len(tail):
        weight = weight.unsqueeze(0)
    if weight.dim() != len(tail) + 1 or weight.shape[0] not in (1, heads) or tuple(weight.shape[1:]) != tail:
        raise ValueError(f"{name} must have shape (heads or 1, {', '.join(map(str, tail))}) or "
                         f"({', '.join(map(str, tail))}), got {tuple(weight.shape)}")
    return weight


def check_kernel_inputs(
    query_hidden: Tensor,
    key_hidden: Tensor,
    value: Tensor,
    output_weight: Tensor,
    second_weight: Tensor | None,
    second_bias: Tensor | None,
    activation: str,
    mask: Tensor | None,
    dot_query: Tensor | None,
    dot_key: Tensor | None,
    dropout_p: float,
    score_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Validate the kernel contract's inputs (``ValueError`` / ``TypeError`` naming the problem) and return the
    weights as ``(heads or 1, ...)`` views. Every kernel calls it first: the C++ kernels index the tensors directly,
    and a mismatch there reads or writes out of bounds."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    if query_hidden.dim() != 4 or key_hidden.dim() != 4 or value.dim() != 4:
        raise ValueError("query_hidden, key_hidden and value must be 4-D (batch, heads, len, dim)")
    if (second_weight is None) != (second_bias is None):
        raise ValueError("second_weight and second_bias go together (mlp='authors')")
    if (dot_query is None) != (dot_key is None):
        raise ValueError("dot_query and dot_key go together (mode='residual')")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if second_weight is not None and activation != "relu":
        raise ValueError('mlp="authors" uses relu only')
    tensors = {"query_hidden": query_hidden, "key_hidden": key_hidden, "value": value, "output_weight": output_weight,
               "second_weight": second_weight, "second_bias": second_bias, "dot_query": dot_query, "dot_key": dot_key,
               "mask": mask, "score_bias": score_bias}
    for name, tensor in tensors.items():
        if tensor is None:
            continue
        if tensor.device != value.device:  # the C++ kernels would read a device pointer on the host
            raise ValueError(f"{name} is on {tensor.device} but value is on {value.device}; move every input to "
                             "one device")
        if name != "mask" and not tensor.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point tensor (fp32, bf16, fp16 or fp64), got {tensor.dtype}")
    batch, heads, q_len, hidden = query_hidden.shape
    k_len = key_hidden.shape[2]
    if hidden == 0:
        raise ValueError("query_hidden and key_hidden have 0 hidden units; the scorer needs at least 1")
    if key_hidden.shape[:2] != (batch, heads) or key_hidden.shape[3] != hidden:
        raise ValueError(
            f"key_hidden {tuple(key_hidden.shape)} does not match query_hidden {tuple(query_hidden.shape)}"
        )
    if value.shape[:3] != (batch, heads, k_len):
        raise ValueError(f"value {tuple(value.shape)} does not match key_hidden {tuple(key_hidden.shape)}")
    if second_weight is not None and second_weight.dim() not in (2, 3):
        raise ValueError(
            f"second_weight must have shape (heads or 1, hidden2, {hidden}), got {tuple(second_weight.shape)}"
        )
    width = hidden if second_weight is None else second_weight.shape[-2]
    if second_weight is not None:
        second_weight = _with_heads_dim("second_weight", second_weight, heads, (width, hidden))
        second_bias = _with_heads_dim("second_bias", second_bias, heads, (width,))
    output_weight = _with_heads_dim("output_weight", output_weight, heads, (width,))
    if dot_query is not None and (dot_query.shape[:3] != (batch, heads, q_len) or dot_key.shape[:3] != (
            batch, heads, k_len) or dot_query.shape[3] != dot_key.shape[3]):  # fmt: skip
        raise ValueError(f"dot_query {tuple(dot_query.shape)} / dot_key {tuple(dot_key.shape)} do not match "
                         f"(batch, heads, q_len | k_len, head_dim) = ({batch}, {heads}, {q_len} | {k_len}, ...)")
    if mask is not None and mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (True = may attend), got {mask.dtype}")
    for name, tensor in (("mask", mask), ("score_bias", score_bias)):
        if tensor is None:
            continue
        if tensor.dim() > 4:
            raise ValueError(f"{name} must have at most 4 dims (batch, heads, q_len, k_len), got {tensor.dim()}")
        full = (batch, heads, q_len, k_len)
        padded = (1,) * (4 - tensor.dim()) + tuple(tensor.shape)
        if any(size not in (1, want) for size, want in zip(padded, full, strict=True)):
            raise ValueError(f"{name} {tuple(tensor.shape)} does not broadcast to (batch, heads, q_len, k_len) = "
                             f"{full}; each dim must be 1 or that size")
    return output_weight, second_weight, second_bias


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
) -> Tensor:
    """Neural attention, tiled over query and key blocks with an online softmax (pure PyTorch).

    See the kernel contract in ``docs/design.md``: ``query_hidden`` ``(b, h, q_len, hidden)``, ``key_hidden``
    ``(b, h, k_len, hidden)``, ``value`` ``(b, h, k_len, v_dim)`` -> ``(b, h, q_len, v_dim)``. ``score_bias``
    (float, broadcastable to ``(b, h, q_len, k_len)``; T5's position bias, ALiBi) is added to every score, read tile
    by tile, and gets its gradient. ``block_size`` overrides the automatic ``(block_q, block_k)`` (an int sets both);
    the dropout pattern depends on it. ``scorer_factory`` supplies another implementation of the per-pair MLP (see
    :data:`ScorerFactory`).
    """
    output_weight, second_weight, second_bias = check_kernel_inputs(
        query_hidden, key_hidden, value, output_weight, second_weight, second_bias, activation, mask, dot_query,
        dot_key, dropout_p, score_bias,
    )  # fmt: skip
    batch, heads, q_len, _ = query_hidden.shape
    k_len = key_hidden.shape[2]
    if q_len == 0 or k_len == 0 or batch * heads == 0:
        return empty_attention((query_hidden, key_hidden, value, output_weight, second_weight, second_bias,
                                dot_query, dot_key, score_bias))  # fmt: skip
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
    cfg = {
        "ops": tiled_ops(scorer_factory),
        "activation": activation,
        "causal": bool(causal) and mask is None,
        "dot_scale": float(dot_scale),
        "dropout_p": float(dropout_p),
        "seed": seed_tensor(dropout_p, generator_seed),
        "block": block,
    }
    # rows no pair sees get no gradient; zeroed (differentiably), garbage there (even NaN) cannot reach dw
    query_visible, key_visible = visible_rows(mask, cfg["causal"], q_len, k_len, query_hidden.device)
    # centred in the kernel's compute dtype (after the cast: bf16 offsets would round first; fp64 if any input is)
    cdt = _compute_dtype(query_hidden, key_hidden, value, output_weight, second_weight, second_bias, dot_query, dot_key,
                         score_bias)
    query_hidden, key_hidden = centre_hidden(query_hidden.to(cdt), key_hidden.to(cdt), query_visible, key_visible)
    value = zero_invisible_rows(value, key_visible)  # P @ V would take 0 * NaN from keys no query sees
    if dot_query is not None:  # dS^T @ dot_query would carry a masked query's garbage into every key's gradient
        dot_query, dot_key = zero_invisible_rows(dot_query, query_visible), zero_invisible_rows(dot_key, key_visible)
    return _NeuralAttentionFunction.apply(
        query_hidden, key_hidden, value, output_weight, second_weight, second_bias, dot_query, dot_key, mask,
        score_bias, cfg,
    )

