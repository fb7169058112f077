"""What every neural attention kernel shares: the kernel contract's helpers (tiled, fused C++ and Triton alike).

The contract (``docs/design.md``): ``query_hidden`` A ``(batch, heads, q_len, hidden)`` and ``key_hidden`` B
``(batch, heads, k_len, hidden)`` (the scorer's first layer, split per token), ``value`` ``(batch, heads, k_len,
v_dim)``, the per-pair MLP's weights, an optional bool ``mask`` / ``causal`` flag, ``score_bias``, residual-mode dot
operands and dropout; out ``(batch, heads, q_len, v_dim)``. This file holds the parts every kernel does the same way:

- which rows a mask leaves visible, and zeroing the others (garbage there, even NaN, must not reach anything);
- centring A and B, and the relu identities (signed-max operands, the weight gradient from the input gradients'
  raw sums) of ``docs/design.md``;
- the input checks, the dropout seed, the score bias's gradient buffer, the custom-op wrapper torch.compile sees,
  autocast and second-derivative guards.

The kernels themselves live in ``tiled_neural_attention.py`` (PyTorch), ``cpp_neural_attention.py`` /
``fused_cpp_neural_attention.py`` (C++) and ``triton_neural_attention.py``.

This file travels with Hub checkpoints: it imports only torch and the standard library.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "ACTIVATION_CODES",
    "ACTIVATIONS",
    "as_4d",
    "autocast_off",
    "bias_grad_rows",
    "causal_mask",
    "centre_hidden",
    "check_kernel_inputs",
    "check_sinks",
    "check_softcap",
    "empty_attention",
    "fold_causal_into_mask",
    "fold_sinks",
    "kernel_op",
    "keeps_differentiable_inputs",
    "once_differentiable_always",
    "relu_grads",
    "relu_signed_max_operands",
    "seed_tensor",
    "sink_grad",
    "sink_rows",
    "source_tag",
    "sum_to_bias_shape",
    "visible_rows",
    "weight_grad",
    "zero_invisible_rows",
    "zero_unseen_operands",
]

# --------------------------------------------------------------------------------------------------------------
# masks and visible rows, centring, the relu identities
# --------------------------------------------------------------------------------------------------------------
ACTIVATIONS = ("relu", "gelu", "silu", "tanh")
ACTIVATION_CODES = {name: code for code, name in enumerate(ACTIVATIONS)}
"""How the compiled kernels (C++, Triton) name an activation."""


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


def check_sinks(sinks: Tensor | None, batch: int, heads: int, q_len: int) -> None:
    """Refuse attention-sink logits that are not a float tensor broadcastable to ``(batch, heads, q_len, 1)``."""
    if sinks is None:
        return
    full = (batch, heads, q_len, 1)
    if (not torch.is_tensor(sinks) or not sinks.is_floating_point() or sinks.dim() != 4
            or any(size not in (1, want) for size, want in zip(sinks.shape, full, strict=True))):
        what = f"a {sinks.dtype} tensor of shape {tuple(sinks.shape)}" if torch.is_tensor(sinks) else repr(sinks)
        raise ValueError(f"sinks must be float logits of shape (batch|1, heads|1, q_len|1, 1), broadcastable to {full} "
                         f"(gpt-oss: its per-head sinks as (1, heads, 1, 1)); got {what}.")


def sink_rows(sinks: Tensor, batch: int, heads: int, q_len: int) -> Tensor:
    """Attention-sink logits ``(batch|1, heads|1, q_len|1, 1)`` as one per query row, ``(batch * heads, q_len)``."""
    return sinks.expand(batch, heads, q_len, 1).reshape(batch * heads, q_len)


def fold_sinks(out: Tensor, row_max: Tensor, log_denom: Tensor, sink: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Attention sinks folded into a finished softmax, for a kernel without them: ``(out, row_max, log_denom)``.

    ``out`` ``(G, q_len, v_dim)``; ``row_max``, ``log_denom`` ``(G, q_len)``: each row's score maximum (not finite for
    a row no key is visible to, which keeps its zero output) and log softmax denominator; ``sink`` ``(G, q_len)``
    (`sink_rows`). A sink is one more term ``exp(sink)`` in the denominator, with no value: ``out`` is scaled by the
    share the keys keep, ``sigmoid(lse - sink)``, and the statistics become the larger denominator's, from which a
    kernel's backward recomputes the (sink-inclusive) probabilities; add `sink_grad` to its gradients.
    """
    seen = torch.isfinite(row_max)
    new_max = torch.where(seen, torch.maximum(row_max, sink), row_max)
    shift = torch.where(seen, row_max - new_max, 0.0)  # <= 0: no overflow below
    new_log = torch.where(seen, torch.logaddexp(shift + log_denom, sink - new_max), log_denom)
    keep = torch.where(seen, torch.exp(shift + log_denom - new_log), 1.0)
    return out * keep.unsqueeze(-1), new_max, new_log


def sink_grad(sink: Tensor, row_max: Tensor, log_denom: Tensor, D: Tensor, sinks_shape: torch.Size,
              batch: int) -> Tensor:
    """The loss's gradient in the sink logits, in their shape ``sinks_shape`` ``(batch|1, heads|1, q_len|1, 1)``:
    per row ``-p_sink * D`` with ``D = rowsum(dO * O)`` and ``p_sink = exp(sink - row_max - log_denom)`` from the
    sink-inclusive statistics (`fold_sinks`'; 0 where no key is visible: zero output), summed where the sinks
    broadcast. ``sink``, ``row_max``, ``log_denom``, ``D``: ``(batch * heads, q_len)``."""
    exponent = torch.where(torch.isfinite(row_max), sink - row_max - log_denom, -math.inf)
    per_row = -torch.exp(exponent) * D
    return sum_to_bias_shape(per_row.view(batch, -1, per_row.shape[-1], 1), sinks_shape)


def check_softcap(softcap: float | None) -> None:
    """Refuse a logit soft-cap (``softcap * tanh(score / softcap)``, Gemma 2's) that is not a positive finite number;
    ``None`` is no cap."""
    if softcap is None:
        return
    if isinstance(softcap, bool) or not isinstance(softcap, int | float) or not math.isfinite(softcap) or softcap <= 0:
        raise ValueError(f"softcap must be a positive number (Gemma 2 uses 50.0), or None for no cap; got {softcap!r}")


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


def relu_grads(
    query_hidden: Tensor,
    key_hidden: Tensor,
    raw_query: Tensor,
    raw_key: Tensor,
    output_weight: Tensor,
    query_visible: Tensor | None = None,
    key_visible: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dA, dB, dw)`` of ``score_ij = sum_k w_k relu(A_ik + B_jk)`` from the raw sums a relu kernel leaves.

    ``query_hidden`` A ``(batch, heads, q_len, hidden)``, ``key_hidden`` B ``(batch, heads, k_len, hidden)``;
    ``raw_query`` G_ik = sum_j relu'(pre_ijk) dS_ij and ``raw_key`` H_jk = sum_i relu'(pre_ijk) dS_ij (fp32, shaped
    like A / B); ``output_weight`` w ``(heads or 1, hidden)``. dA = G w, dB = H w and, since relu(x) = x relu'(x),
    dw_k = sum_i A_ik G_ik + sum_j B_jk H_jk: no reduction per tile. B is centred (pre = (A + mu) + (B - mu), and
    sum_i G = sum_j H) so that large opposite offsets of A and B do not cancel in fp32; rows no pair sees
    (``visible_rows``; G and H are 0 there) are left out, so garbage in them does not reach dw. Returns fp32 dA, dB
    and dw ``(batch, heads, hidden)`` per (batch, head) group (:func:`weight_grad` sums it to the weight's shape).
    """
    A, B = _centred(query_hidden, key_hidden, query_visible, key_visible)
    w = output_weight.float().reshape(1, -1, 1, A.shape[-1])
    return raw_query * w, raw_key * w, (A * raw_query).sum(dim=-2) + (B * raw_key).sum(dim=-2)


def weight_grad(
    grad: Tensor, batch: int, heads: int, shape: torch.Size | tuple[int, ...], dtype: torch.dtype
) -> Tensor:
    """A scorer weight's gradient from its per-group sums: ``grad`` ``(batch * heads, *tail)`` -> ``shape``, which is
    ``(heads, *tail)``, ``(1, *tail)`` (shared by the heads) or ``tail`` (given without the heads dim), in ``dtype``.
    Fixed-order torch sums: deterministic."""
    g = grad.reshape(batch, heads, *grad.shape[1:]).sum(dim=0)  # (heads, *tail)
    if len(shape) == g.dim() - 1:
        g = g.sum(dim=0)
    elif shape[0] == 1:
        g = g.sum(dim=0, keepdim=True)
    return g.to(dtype).reshape(shape).contiguous()


def zero_unseen_operands(
    value: Tensor,
    dot_query: Tensor | None,
    dot_key: Tensor | None,
    query_visible: Tensor | None,
    key_visible: Tensor | None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``value`` ``(batch, heads, k_len, v_dim)`` and the residual mode's ``dot_query`` / ``dot_key`` ``(batch, heads,
    q_len | k_len, head_dim)`` (or None) with the rows no pair sees set to 0: a fully masked row's ``P @ V`` would
    take 0 * NaN from a key no query sees, and ``dS^T @ dot_query`` would carry a masked query's garbage into every
    key's gradient."""
    value = zero_invisible_rows(value, key_visible)
    if dot_query is None:
        return value, None, None
    return value, zero_invisible_rows(dot_query, query_visible), zero_invisible_rows(dot_key, key_visible)



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


def source_tag(*paths: str | Path, text: str = "") -> str:
    """12 hex digits naming a kernel's source: its ``paths`` (the kernel's files), this file (whose helpers the
    kernel runs) and ``text`` (e.g. a C++ source). Custom op names carry it: the plugin and a Hub checkpoint's copy of
    another version may both be imported in one process, and an op name must not be reused for other code (see
    :func:`kernel_op`)."""
    digest = hashlib.sha256()
    for path in (*paths, __file__):
        digest.update(Path(path).read_bytes())
    digest.update(text.encode())
    return digest.hexdigest()[:12]

# --------------------------------------------------------------------------------------------------------------
# the score bias's gradient and the dropout seed
# --------------------------------------------------------------------------------------------------------------
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
# autograd plumbing every kernel shares
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



SECOND_DERIVATIVE_ERROR = (
    b"neural attention's fused backends (tiled, cpp, triton) have no second derivative (a gradient penalty, "
    b"create_graph=True, differentiated again): patch with backend='eager', which has them (trying to "
    b"differentiate twice a function that was marked with @once_differentiable)"
)


def keeps_differentiable_inputs(forward: Callable) -> Callable:
    """Decorates an autograd Function's ``forward``: one empty 0-d token per input that requires grad stays on
    ``ctx``, whose graph leads to that input, for `once_differentiable_always` to tie its error node to.

    Tokens, not the inputs: a plain ``ctx`` attribute is no saved tensor, so the inputs themselves would stay alive
    under activation checkpointing (which frees or offloads saved tensors only), after the fused C++ kernel's
    forward replaced them by zeroed copies, and after backward for as long as the output lives."""

    @functools.wraps(forward)
    def wrapper(ctx: Any, *args: Any) -> Any:
        with torch.enable_grad():  # (forward runs without grad mode: the tokens need their graph)
            ctx.differentiable_inputs = tuple(a.narrow(-1, 0, 0).sum() if a.dim() else a * 0 for a in args
                                              if isinstance(a, Tensor) and a.requires_grad)  # fmt: skip
        return forward(ctx, *args)

    return wrapper


def once_differentiable_always(backward: Callable) -> Callable:
    """``once_differentiable``, also when the incoming gradient does not depend on the output, also under
    ``torch.autograd.grad``, and with an error that names the fix.

    Under ``create_graph=True`` every gradient the backward returns comes out of an error node, and differentiating it
    raises ``RuntimeError``. ``once_differentiable`` has two gaps this closes, each of which silently lost a gradient
    penalty's second-order term: it marks the gradients only when some incoming gradient requires grad (not for
    ``out.sum()``), and its error node's inputs are detached copies, so ``torch.autograd.grad(penalty, params)``
    found no path through the node and never ran it. Here the node also takes tokens of the forward's inputs that
    require grad (`keeps_differentiable_inputs`) and the incoming gradients: every path from a gradient back to the
    graph runs it.
    """

    @functools.wraps(backward)
    def wrapper(ctx: Any, *grad_outputs: Any) -> Any:
        with torch.no_grad():
            grads = backward(ctx, *grad_outputs)
        if not torch.is_grad_enabled():
            return grads  # a plain backward: first order only
        outputs = grads if isinstance(grads, tuple) else (grads,)
        anchors = [*getattr(ctx, "differentiable_inputs", ()),
                   *(g for g in grad_outputs if isinstance(g, Tensor) and g.requires_grad)]  # fmt: skip
        error = torch._C._functions.DelayedError(SECOND_DERIVATIVE_ERROR, len(outputs) + len(anchors))
        marked = error(*[None if g is None else g.detach().requires_grad_() for g in outputs], *anchors)
        marked = (marked if isinstance(marked, tuple) else (marked,))[: len(outputs)]
        return marked if isinstance(grads, tuple) else marked[0]

    return wrapper


# --------------------------------------------------------------------------------------------------------------
# the contract's input checks
# --------------------------------------------------------------------------------------------------------------
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
