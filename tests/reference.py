"""Independent float64 references of Neural Attention, written straight from the equations (no code shared
with the package): the paper's equation on the concatenation ``[q'_i ; k'_j]``, and the authors' released 3-layer
formulation as ``nn.Linear`` layers over a materialised ``(batch, heads, q_len, k_len, 2d')`` tensor."""

from __future__ import annotations

import os
import zlib

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}

SEED_OFFSET = int(os.environ.get("TEST_SEED") or int.from_bytes(os.urandom(3), "little"))
"""Drawn per test session (pytest prints it above its result line): ``TEST_SEED=<n>`` replays a session's inputs."""


def fresh_seed(seed: int) -> int:
    """A test's own ``seed`` moved by this session's ``SEED_OFFSET``: fresh inputs every run, reproducible."""
    return seed + 1000 * SEED_OFFSET


_DRAWS: dict[str, int] = {}


def drawn_seed() -> int:
    """A new seed at every call, from ``SEED_OFFSET``, the running test's id and how many seeds it drew before:
    fresh every session, and ``TEST_SEED`` replays a test's draws whether it runs alone or in the whole suite.

    Also seeds torch's global generator with it, as ``torch.seed()`` (which it replaced) did: the test's later
    global draws (upstream gradients, weights) are fresh too, and replayed with the rest."""
    test = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0]  # "path::name[params] (call)"
    count = _DRAWS.get(test, 0)
    _DRAWS[test] = count + 1
    seed = zlib.crc32(f"{SEED_OFFSET}:{test}:{count}".encode()) % 2**31
    torch.manual_seed(seed)
    return seed


def bias_in_layout(layout: str, g: torch.Generator, batch: int, heads: int, q_len: int, k_len: int,
                   device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """A random score bias as callers hand them over: ``(the leaf that gets the gradient, the tensor the kernel is
    given)``. ``permuted``: T5's ``compute_bias``, a ``(1, q, k, heads)`` lookup permuted to ``(1, heads, q, k)``;
    ``expanded``: a per-key parameter expanded (stride 0, no copy) to ``(batch, heads, q, k)``; ``3-d``: ``(heads, q,
    k)``; a dtype name: ``(1, heads, q, k)`` in that dtype."""
    if layout == "permuted":
        leaf = torch.randn(1, q_len, k_len, heads, generator=g).to(device).requires_grad_()
        return leaf, leaf.permute(0, 3, 1, 2)
    if layout == "expanded":
        leaf = torch.randn(1, 1, 1, k_len, generator=g).to(device).requires_grad_()
        return leaf, leaf.expand(batch, heads, q_len, k_len)
    if layout == "3-d":
        leaf = torch.randn(heads, q_len, k_len, generator=g).to(device).requires_grad_()
        return leaf, leaf
    leaf = torch.randn(1, heads, q_len, k_len, generator=g).to(device, getattr(torch, layout)).requires_grad_()
    return leaf, leaf


def paper_hidden(query: torch.Tensor, key: torch.Tensor, weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """``W_h [P_q q_i + c_q ; P_k k_j + c_k] + b_h`` per head, materialising the concat: ``(b, h, lq, lk, M)``.

    query ``(b, h, lq, d)``, key ``(b, h, lk, d)``; weights carry a leading head axis (size h or 1):
    ``P_q, P_k: (H, d', d)``, ``c_q, c_k: (H, d')``, ``W_h: (H, M, 2d')``, ``b_h: (H, M)`` (and ``w_a: (H, M)``).
    """
    heads = query.shape[1]
    w = {k: v.expand(heads, *v.shape[1:]) for k, v in weights.items()}
    q_proj = torch.einsum("bhid,hpd->bhip", query, w["P_q"]) + w["c_q"][None, :, None, :]
    k_proj = torch.einsum("bhjd,hpd->bhjp", key, w["P_k"]) + w["c_k"][None, :, None, :]
    lq, lk = q_proj.shape[2], k_proj.shape[2]
    pairs = torch.cat(
        [q_proj[:, :, :, None, :].expand(-1, -1, -1, lk, -1), k_proj[:, :, None, :, :].expand(-1, -1, lq, -1, -1)],
        dim=-1,
    )  # (b, h, lq, lk, 2d')
    return torch.einsum("bhijc,hmc->bhijm", pairs, w["W_h"]) + w["b_h"][None, :, None, None, :]


def paper_scores(query: torch.Tensor, key: torch.Tensor, weights: dict[str, torch.Tensor], activation: str
                 ) -> torch.Tensor:
    """``score_ij = w_a . act(W_h [P_q q_i + c_q ; P_k k_j + c_k] + b_h)`` per head (shapes: ``paper_hidden``).
    Returns ``(b, h, lq, lk)``."""
    w_a = weights["w_a"].expand(query.shape[1], -1)
    return torch.einsum("bhijm,hm->bhij", ACTIVATIONS[activation](paper_hidden(query, key, weights)), w_a)


def smallest_visible_hidden(query: torch.Tensor, key: torch.Tensor, weights: dict[str, torch.Tensor],
                            visible: torch.Tensor | None = None) -> float:
    """The smallest ``|W_h [q'_i ; k'_j] + b_h|`` over visible pairs (``visible`` broadcastable to ``(b, h, lq,
    lk)``), in float64 from the values given. Within fp32 rounding of 0 a kernel may put a pair on the other side of
    the relu kink than float64: a whole ``dS_ij w_m`` term off in every gradient through relu', not a rounding."""
    weights64 = {k: v.detach().double() for k, v in weights.items()}
    hidden = paper_hidden(query.detach().double(), key.detach().double(), weights64)
    seen = torch.ones_like(hidden, dtype=torch.bool) if visible is None else visible[..., None].expand_as(hidden)
    return hidden.abs()[seen].min().item() if seen.any() else float("inf")


class AuthorsScorer(nn.Module):
    """The authors' formulation: shared ``Linear(d->d')`` projections of q and k, then on ``[q'_i ; k'_j]``:
    ``Linear(2d'->d') -> ReLU -> Linear(d'->d'/2) -> ReLU -> Linear(d'/2->1)``, all kept for autograd."""

    def __init__(self, head_dim: int, proj_dim: int) -> None:
        super().__init__()
        self.query_projection = nn.Linear(head_dim, proj_dim)
        self.key_projection = nn.Linear(head_dim, proj_dim)
        second = max(proj_dim // 2, 1)
        self.mlp = nn.Sequential(nn.Linear(2 * proj_dim, proj_dim), nn.ReLU(), nn.Linear(proj_dim, second), nn.ReLU(),
                                 nn.Linear(second, 1))

    def pairs(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """``[q'_i ; k'_j]`` for every pair: ``(b, h, lq, lk, 2d')``."""
        q_proj, k_proj = self.query_projection(query), self.key_projection(key)
        lq, lk = q_proj.shape[2], k_proj.shape[2]
        return torch.cat(
            [q_proj.unsqueeze(3).expand(-1, -1, -1, lk, -1), k_proj.unsqueeze(2).expand(-1, -1, lq, -1, -1)], dim=-1
        )

    def forward(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.pairs(query, key)).squeeze(-1)

    def second_layer_mixed_rows(self, query: torch.Tensor, key: torch.Tensor, visible: torch.Tensor | None = None
                                ) -> torch.Tensor:
        """Per second-layer unit, the fraction of query rows on whose visible keys (``visible`` broadcastable to
        ``(b, h, lq, lk)``, default all) it is active on some and not on others (only there does it change attention:
        softmax ignores a shift of a whole row): ``(d'/2,)``."""
        active = self.mlp[:3](self.pairs(query, key)) > 0  # (b, h, lq, lk, d'/2)
        seen = torch.ones_like(active) if visible is None else visible[..., None].expand_as(active)
        return ((active & seen).any(-2) & (~active & seen).any(-2)).double().flatten(0, -2).mean(0)

    def smallest_visible_preactivation(self, query: torch.Tensor, key: torch.Tensor,
                                       visible: torch.Tensor | None = None) -> float:
        """The smallest ``|input|`` of either ReLU over visible pairs. Within rounding of 0, float32 may put the pair
        on the other side of the kink than float64: its gradient then differs by a whole term, not by rounding."""
        pairs = self.pairs(query, key)
        smallest = float("inf")
        for pre in (self.mlp[:1](pairs), self.mlp[:3](pairs)):
            seen = torch.ones_like(pre, dtype=torch.bool) if visible is None else visible[..., None].expand_as(pre)
            smallest = min(smallest, pre.abs()[seen].min().item())
        return smallest


def attention_from_scores(scores: torch.Tensor, value: torch.Tensor, visible: torch.Tensor | None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over visible keys (fully masked rows: zeros) and ``@ value``. Returns ``(out, probabilities)``."""
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    probabilities = torch.softmax(scores, dim=-1)
    probabilities = torch.nan_to_num(probabilities, nan=0.0)  # rows with no visible key
    return probabilities @ value, probabilities


def causal_visible(q_len: int, k_len: int) -> torch.Tensor:
    """Upper-left aligned causal mask: key j visible to query i iff j <= i."""
    return torch.arange(k_len)[None, :] <= torch.arange(q_len)[:, None]


def kernel_reference(query_hidden: torch.Tensor, key_hidden: torch.Tensor, value: torch.Tensor,
                     output_weight: torch.Tensor, second_weight: torch.Tensor | None = None,
                     second_bias: torch.Tensor | None = None, *, activation: str = "relu",
                     mask: torch.Tensor | None = None, causal: bool = False, dot_query: torch.Tensor | None = None,
                     dot_key: torch.Tensor | None = None, dot_scale: float = 1.0, keep: torch.Tensor | None = None,
                     score_bias: torch.Tensor | None = None, softcap: float | None = None,
                     sinks: torch.Tensor | None = None) -> torch.Tensor:
    """The fused-kernel contract of ``docs/design.md`` in float64, materialising ``(b, h, lq, lk, hidden)``.

    Same arguments as the kernels (``A = query_hidden``, ``B = key_hidden``; per-head weights with a leading
    heads-or-1 axis, or without it). ``mlp="authors"`` when ``second_weight`` is given (relu layers). Query rows
    with no visible key give zero output. ``keep``: optional dropout multiplier broadcastable to
    ``(b, h, lq, lk)``, applied to the probabilities as given -- the CALLER applies the ``1 / (1 - p)``
    scaling (pass ``keep_mask / (1 - p)``). ``softcap``: scores (dot term included) become
    ``softcap * tanh(score / softcap)`` before the bias. ``sinks`` ``(b|1, h|1, lq|1, 1)``: one more logit per row in
    the softmax, with no value (attention sinks). Returns ``(b, h, lq, v_dim)`` float64, differentiable w.r.t. every
    input.
    """
    w = output_weight.double()
    w = w[None] if w.dim() == 1 else w
    pre = query_hidden.double()[:, :, :, None, :] + key_hidden.double()[:, :, None, :, :]  # (b, h, lq, lk, hidden)
    if second_weight is None:
        scores = (ACTIVATIONS[activation](pre) * w[None, :, None, None, :]).sum(-1)
    else:
        w2 = second_weight.double()
        z = torch.einsum("bhijm,hrm->bhijr", torch.relu(pre), w2[None] if w2.dim() == 2 else w2)
        if second_bias is not None:
            z = z + second_bias.double().reshape(-1, w2.shape[-2])[None, :, None, None, :]
        scores = (torch.relu(z) * w[None, :, None, None, :]).sum(-1)
    if dot_query is not None:
        scores = scores + dot_scale * dot_query.double() @ dot_key.double().transpose(-1, -2)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if score_bias is not None:
        scores = scores + score_bias.double()
    lq, lk = scores.shape[-2:]
    valid = torch.ones(lq, lk, dtype=torch.bool, device=scores.device).expand_as(scores)
    if mask is not None:
        valid = valid & mask.to(scores.device)
    if causal:
        valid = valid & causal_visible(lq, lk).to(scores.device)
    scores = scores.masked_fill(~valid, float("-inf"))
    scores = torch.where(valid.any(-1, keepdim=True), scores, torch.zeros_like(scores))  # no NaN rows
    if sinks is not None:  # a row no key is visible to puts all its weight on the sink: zero output
        sink = sinks.double().expand(*scores.shape[:-1], 1)
        scores = torch.where(valid.any(-1, keepdim=True), scores, float("-inf"))
        probabilities = torch.softmax(torch.cat([scores, sink], -1), -1)[..., :-1] * valid
    else:
        probabilities = torch.softmax(scores, -1) * valid
    if keep is not None:
        probabilities = probabilities * keep.to(probabilities)
    return probabilities @ value.double()
