"""Settings of the neural scorer (`NeuralAttentionConfig`).

This file travels with Hub checkpoints (``trust_remote_code``): it imports only the standard library, torch,
transformers and flat siblings.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

MIN_PROJ_DIM = 2
"""Floor of the default projected size d'. The authors' rule ``head_dim // 32`` gives 0 below head_dim 32."""

MLP_VARIANTS = ("paper", "authors")
ACTIVATIONS = ("relu", "gelu", "silu", "tanh")
MODES = ("replace", "residual")
BACKENDS = ("auto", "eager", "tiled", "triton")


@dataclass
class NeuralAttentionConfig:
    """How a patched attention layer scores query/key pairs.

    Per head, ``q' = P_q q + c_q`` and ``k' = P_k k + c_k`` map ``head_dim -> proj_dim``; then
    ``score_ij = w_a . act(W_h [q'_i ; k'_j] + b_h)`` (``mlp="paper"``). The paper's output bias ``b_a`` is omitted:
    softmax ignores a constant added to a whole row, so it could never change attention.

    Args:
        proj_dim: d', the projected size of queries and keys. ``None`` follows the authors' code,
            ``head_dim // 32``, floored at ``MIN_PROJ_DIM`` (2): 2 for GPT-2 and ViT-Base (head_dim 64).
        hidden_dim: width of the hidden layer of the ``"paper"`` MLP. ``None`` means ``proj_dim`` (the authors'
            first hidden width). Must be ``None`` for ``mlp="authors"``, whose widths are fixed.
        mlp: ``"paper"``: one hidden layer, the equation above. ``"authors"``: the released variant,
            ``Linear(2d'->d') -> ReLU -> Linear(d'->max(d'//2, 1)) -> ReLU -> Linear(->1)``.
        activation: hidden activation of the ``"paper"`` MLP: ``relu`` | ``gelu`` | ``silu`` | ``tanh``.
            The ``"authors"`` MLP always uses ReLU.
        share_across_heads: one set of scorer weights for all heads (``True``) or one per head (``False``).
            ``None``: per head for ``"paper"``, shared for ``"authors"`` (as in their code).
        mode: ``"replace"`` (the paper: the neural score replaces ``q.k``) or ``"residual"`` (our addition, not
            in the paper): ``score = scaling * q.k + g * MLP(...)`` with the MLP output weights zero-initialised,
            so a patched pretrained model starts out computing exactly what it computed before.
        backend: ``"auto"`` picks the fused path that applies (Triton on CUDA, tiled on CPU) and the
            materialising ``"eager"`` path only where attention probabilities are requested; ``"eager"``,
            ``"tiled"`` or ``"triton"`` force one.
    """

    proj_dim: int | None = None
    hidden_dim: int | None = None
    mlp: str = "paper"
    activation: str = "relu"
    share_across_heads: bool | None = None
    mode: str = "replace"
    backend: str = "auto"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError``/``TypeError`` naming the bad setting and what is valid."""
        for name in ("proj_dim", "hidden_dim"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"NeuralAttentionConfig.{name} must be an int or None, got {value!r}.")
            if value < 1:
                raise ValueError(f"NeuralAttentionConfig.{name} must be >= 1 (or None for the default), got {value}.")
        for name, allowed in (("mlp", MLP_VARIANTS), ("activation", ACTIVATIONS), ("mode", MODES),
                              ("backend", BACKENDS)):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"NeuralAttentionConfig.{name}={value!r} is not supported; choose one of {allowed}.")
        if self.share_across_heads is not None and not isinstance(self.share_across_heads, bool):
            raise TypeError(
                f"NeuralAttentionConfig.share_across_heads must be True, False or None, got {self.share_across_heads!r}."
            )
        if self.mlp == "authors":
            if self.hidden_dim is not None:
                raise ValueError(
                    "NeuralAttentionConfig.hidden_dim must be None with mlp='authors' (its widths are fixed to "
                    "proj_dim and proj_dim // 2); use mlp='paper' to choose the hidden width."
                )
            if self.activation != "relu":
                raise ValueError("mlp='authors' uses ReLU only; set activation='relu' or use mlp='paper'.")

    # --- resolved sizes -------------------------------------------------------------------------------------
    def resolved_proj_dim(self, head_dim: int) -> int:
        """d' for a layer whose heads have ``head_dim`` channels."""
        if self.proj_dim is not None:
            return self.proj_dim
        return max(head_dim // 32, MIN_PROJ_DIM)

    def resolved_hidden_dims(self, head_dim: int) -> tuple[int, ...]:
        """Widths of the hidden layers: ``(hidden,)`` for ``"paper"``, ``(d', max(d'//2, 1))`` for ``"authors"``."""
        proj_dim = self.resolved_proj_dim(head_dim)
        if self.mlp == "authors":
            return (proj_dim, max(proj_dim // 2, 1))
        return (self.hidden_dim if self.hidden_dim is not None else proj_dim,)

    def resolved_share_across_heads(self) -> bool:
        if self.share_across_heads is not None:
            return self.share_across_heads
        return self.mlp == "authors"

    # --- (de)serialisation ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NeuralAttentionConfig:
        """Build from a dict; unknown keys raise ``ValueError`` naming them (callers may filter first)."""
        if isinstance(data, cls):
            return dataclasses.replace(data)
        if not isinstance(data, dict):
            raise TypeError(f"Expected a dict of NeuralAttentionConfig fields, got {type(data).__name__}.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown NeuralAttentionConfig field(s) {unknown}; valid fields are {sorted(known)}.")
        return cls(**data)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))


# --- where a patched model records its settings ------------------------------------------------------------------
CONFIG_PREFIX = "neural_attention_"
"""Prefix of the flat fields a patched model's config carries: ``neural_attention_layers`` plus one
``neural_attention_<field>`` per ``NeuralAttentionConfig`` field. Flat, typed JSON values keep ``config.json``
readable and diffable."""


def record_on_config(model_config: Any, layers: list[int], settings: NeuralAttentionConfig) -> None:
    """Write the neural layers and settings onto a transformers config (in place)."""
    setattr(model_config, CONFIG_PREFIX + "layers", sorted(layers))
    for name, value in settings.to_dict().items():
        setattr(model_config, CONFIG_PREFIX + name, value)


def read_from_config(model_config: Any) -> tuple[list[int], NeuralAttentionConfig] | None:
    """The ``(layers, settings)`` recorded on a config, or ``None`` when it records no neural layers."""
    layers = getattr(model_config, CONFIG_PREFIX + "layers", None)
    if not layers:
        return None
    values = {name: getattr(model_config, CONFIG_PREFIX + name) for name in NeuralAttentionConfig.field_names()
              if hasattr(model_config, CONFIG_PREFIX + name)}
    return list(layers), NeuralAttentionConfig(**values)


def clear_from_config(model_config: Any) -> None:
    """Remove every ``neural_attention_*`` field from a config (in place)."""
    for name in ("layers", *NeuralAttentionConfig.field_names()):
        if hasattr(model_config, CONFIG_PREFIX + name):
            delattr(model_config, CONFIG_PREFIX + name)
