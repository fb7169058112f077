"""The neural scorer: parameters, initialisation and the math of Neural Attention, in one place.

Per head (or shared by all heads), for a query ``q_i`` and a key ``k_j`` of ``head_dim`` channels::

    q'_i = P_q q_i + c_q,   k'_j = P_k k_j + c_k                    head_dim -> d'
    pre_ij = W_h [q'_i ; k'_j] + b_h = A_i + B_j                      2d' -> hidden
    A_i = (W_hq P_q) q_i + (W_hq c_q + b_h),   B_j = (W_hk P_k) k_j + W_hk c_k
    score_ij = w_a . act(pre_ij)                                      mlp="paper"
    score_ij = w_3 . relu(W_2 relu(pre_ij) + b_2)                     mlp="authors"
    score_ij = scaling * q_i . k_j + g * (the above)                  mode="residual" (our addition)

Splitting ``W_h = [W_hq | W_hk]`` makes the first layer cost one small projection per token instead of one per
pair; only ``act`` and the output layer run per pair. The output bias of the paper (``b_a``) is left out: softmax
is invariant to a constant added to a whole row, so it can never change attention.

This file travels with Hub checkpoints: it imports only torch, transformers and flat siblings.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as hf_init

from .configuration_neural_attention import NeuralAttentionConfig

ACTIVATION_FUNCTIONS = {
    "relu": F.relu,
    "gelu": F.gelu,  # exact (erf) GELU
    "silu": F.silu,
    "tanh": torch.tanh,
}


def _linear_default_bound(fan_in: int) -> float:
    """Bound of PyTorch's default ``nn.Linear`` init, ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` (weights and biases)."""
    return 1.0 / math.sqrt(fan_in)


ScorerOperands = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]
"""``(query_hidden A, key_hidden B, output_weight, second_weight, second_bias)``: see ``NeuralScorer.forward``."""


class NeuralScorer(nn.Module):
    """Scores every query/key pair of one attention layer with a small MLP.

    Weights carry a leading head axis of size ``num_heads`` (per-head weights) or 1 (shared by all heads), so the
    same code serves both through broadcasting.

    Args:
        head_dim: channels per head of the queries and keys it scores.
        num_heads: query heads of the layer (keys are repeated to match under grouped-query attention).
        settings: the scorer's settings (``NeuralAttentionConfig``).
    """

    def __init__(self, head_dim: int, num_heads: int, settings: NeuralAttentionConfig) -> None:
        super().__init__()
        settings.validate()
        self.settings = settings
        self.head_dim = head_dim
        self.num_heads = num_heads
        self.proj_dim = settings.resolved_proj_dim(head_dim)
        self.hidden_dims = settings.resolved_hidden_dims(head_dim)
        self.weight_heads = 1 if settings.resolved_share_across_heads() else num_heads
        self.activation_name = settings.resolved_activation()
        self.residual = settings.mode == "residual"

        heads, proj, hidden = self.weight_heads, self.proj_dim, self.hidden_dims[0]
        self.query_down_weight = nn.Parameter(torch.empty(heads, proj, head_dim))  # P_q
        self.query_down_bias = nn.Parameter(torch.empty(heads, proj))  # c_q
        self.key_down_weight = nn.Parameter(torch.empty(heads, proj, head_dim))  # P_k
        self.key_down_bias = nn.Parameter(torch.empty(heads, proj))  # c_k
        self.hidden_weight = nn.Parameter(torch.empty(heads, hidden, 2 * proj))  # W_h = [W_hq | W_hk]
        self.hidden_bias = nn.Parameter(torch.empty(heads, hidden))  # b_h
        if settings.mlp == "authors":
            second = self.hidden_dims[1]
            self.second_weight = nn.Parameter(torch.empty(heads, second, hidden))  # W_2
            self.second_bias = nn.Parameter(torch.empty(heads, second))  # b_2
        else:
            self.register_parameter("second_weight", None)
            self.register_parameter("second_bias", None)
        self.output_weight = nn.Parameter(torch.empty(heads, self.hidden_dims[-1]))  # w_a (w_3)
        if self.residual:
            self.gate = nn.Parameter(torch.empty(heads))  # g
        else:
            self.register_parameter("gate", None)
        if not any(p.is_meta for p in self.parameters()):
            self.reset_parameters()

    @staticmethod
    def weight_layout(settings: NeuralAttentionConfig, head_dim: int) -> dict[str, Any]:
        """What ``settings`` make of a scorer's weights for heads of ``head_dim``, defaults resolved."""
        return {
            "proj_dim": settings.resolved_proj_dim(head_dim),
            "hidden_dims": settings.resolved_hidden_dims(head_dim),
            "share_across_heads": settings.resolved_share_across_heads(),
            "mlp": settings.mlp,
            "activation": settings.resolved_activation(),
            "mode": settings.mode,
        }

    # --- initialisation -------------------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """PyTorch's default ``nn.Linear`` init for every layer (what the authors' code relies on).

        transformers' ``normal(0, initializer_range)`` would make scores nearly constant at step 0 (uniform
        attention, vanishing gradients). In ``mode="residual"`` the output weights are zero and the gate one, so
        the layer starts out exactly as dot-product attention. Uses ``transformers.initialization`` so that, inside
        ``from_pretrained``, weights that were loaded (flagged ``_is_hf_initialized``) are left untouched.
        """
        for weight, bias, fan_in in (
            (self.query_down_weight, self.query_down_bias, self.head_dim),
            (self.key_down_weight, self.key_down_bias, self.head_dim),
            (self.hidden_weight, self.hidden_bias, 2 * self.proj_dim),
            (self.second_weight, self.second_bias, self.hidden_dims[0]),
        ):
            if weight is None:
                continue
            bound = _linear_default_bound(fan_in)
            hf_init.uniform_(weight, -bound, bound)
            hf_init.uniform_(bias, -bound, bound)
        if self.residual:
            hf_init.zeros_(self.output_weight)
            hf_init.ones_(self.gate)
        else:
            bound = _linear_default_bound(self.hidden_dims[-1])
            hf_init.uniform_(self.output_weight, -bound, bound)

    # --- the first layer, split -----------------------------------------------------------------------------
    def first_layer(self, query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token halves of the first layer's pre-activation, ``pre_ij = A_i + B_j``.

        ``W_h P_q`` is folded into one ``(hidden, head_dim)`` projection per head, so queries and keys are read once.

        Args:
            query: ``(batch, heads, q_len, head_dim)``.
            key: ``(batch, heads, k_len, head_dim)`` (already repeated to ``heads`` under GQA).

        Returns:
            ``A``: ``(batch, heads, q_len, hidden)`` and ``B``: ``(batch, heads, k_len, hidden)``, in the inputs'
            dtype promoted to at least fp32 (fp32 for bf16 / fp16 inputs, fp64 for fp64).
        """
        compute_dtype = torch.promote_types(query.dtype, torch.float32)
        w_hq, w_hk = self.hidden_weight.to(compute_dtype).split(self.proj_dim, dim=-1)  # (H, M, d') each
        query_weight = w_hq @ self.query_down_weight.to(compute_dtype)  # (H, M, head_dim)
        key_weight = w_hk @ self.key_down_weight.to(compute_dtype)
        query_bias = (w_hq @ self.query_down_bias.to(compute_dtype).unsqueeze(-1)).squeeze(-1)
        query_bias = query_bias + self.hidden_bias.to(compute_dtype)  # (H, M)
        key_bias = (w_hk @ self.key_down_bias.to(compute_dtype).unsqueeze(-1)).squeeze(-1)
        query_hidden = query.to(compute_dtype) @ query_weight.transpose(-1, -2) + query_bias[:, None, :]
        key_hidden = key.to(compute_dtype) @ key_weight.transpose(-1, -2) + key_bias[:, None, :]
        return query_hidden, key_hidden

    # --- the per-pair head ----------------------------------------------------------------------------------
    def output_side_weights(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Weights applied per pair after the first layer: ``(output_weight, second_weight, second_bias)``.

        Shapes ``(weight_heads, hidden_last)``, ``(weight_heads, hidden2, hidden)``, ``(weight_heads, hidden2)``;
        in residual mode the gate is folded into the output weight (``g * w_a``).
        """
        output_weight = self.output_weight
        if self.gate is not None:
            output_weight = output_weight * self.gate[:, None]
        return output_weight, self.second_weight, self.second_bias

    def forward(self, query: torch.Tensor, key: torch.Tensor) -> ScorerOperands:
        """The operands every backend consumes: ``(A, B, output_weight, second_weight, second_bias)``.

        ``A``, ``B`` as in :meth:`first_layer`, the weights as in :meth:`output_side_weights`. Backends go through
        this call rather than reading the parameters: module hooks (accelerate's offloading brings offloaded weights
        in around ``forward``) then see every use of them.
        """
        return (*self.first_layer(query, key), *self.output_side_weights())

    def pair_scores(
        self,
        pre_activation: torch.Tensor,
        output_weight: torch.Tensor,
        second_weight: torch.Tensor | None,
        second_bias: torch.Tensor | None,
    ) -> torch.Tensor:
        """The MLP after its first layer, applied to materialised pairs, with the weights :meth:`forward` returned.

        Args:
            pre_activation: ``(batch, heads, q_len, k_len, hidden)``, i.e. ``A_i + B_j``.

        Returns:
            Neural scores ``(batch, heads, q_len, k_len)`` (gate included in residual mode).
        """
        hidden = ACTIVATION_FUNCTIONS[self.activation_name](pre_activation)
        if second_weight is not None:
            batch, heads, q_len, k_len, width = hidden.shape
            flat = hidden.reshape(batch, heads, q_len * k_len, width)
            flat = flat @ second_weight.to(flat.dtype).transpose(-1, -2) + second_bias.to(flat.dtype)[:, None, :]
            hidden = F.relu(flat).reshape(batch, heads, q_len, k_len, second_weight.shape[-2])  # not -1: 0 pairs
        return (hidden * output_weight.to(hidden.dtype)[None, :, None, None, :]).sum(-1)

    def scores(self, query: torch.Tensor, key: torch.Tensor, scaling: float) -> torch.Tensor:
        """Full attention logits, materialising every pair (the ``eager`` path and ``output_attentions``).

        Args:
            query: ``(batch, heads, q_len, head_dim)``; key: ``(batch, heads, k_len, head_dim)``.
            scaling: the layer's dot-product scale, used only in residual mode.

        Returns:
            ``(batch, heads, q_len, k_len)`` logits in fp32 (or fp64 for fp64 inputs), before masking.
        """
        query_hidden, key_hidden, *weights = self(query, key)  # under autocast in 16 bits, as for every backend
        compute_dtype = torch.promote_types(query.dtype, torch.float32)
        # the per-pair MLP and the dot term in fp32, as the fused kernels compute them: autocast would run them in
        # 16 bits here only (a device without autocast, such as meta, needs no guard and refuses one)
        device = query.device.type
        autocast_on = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
        with torch.autocast(device, enabled=False) if autocast_on else contextlib.nullcontext():
            pre_activation = (query_hidden.to(compute_dtype)[:, :, :, None, :]
                              + key_hidden.to(compute_dtype)[:, :, None, :, :])  # fmt: skip
            logits = self.pair_scores(pre_activation, *weights)
            if self.residual:
                logits = logits + scaling * (query.to(compute_dtype) @ key.to(compute_dtype).transpose(-1, -2))
        return logits

    def extra_repr(self) -> str:
        s = self.settings
        return (
            f"head_dim={self.head_dim}, heads={self.num_heads}, proj_dim={self.proj_dim}, "
            f"hidden={self.hidden_dims}, mlp={s.mlp}, activation={self.activation_name}, "
            f"shared={self.weight_heads == 1}, mode={s.mode}, backend={s.backend}"
        )
