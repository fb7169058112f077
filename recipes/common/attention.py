"""Neural-attention command-line arguments and applying them to a model (the A/B arm's only difference)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from hf_neural_attention import (
    NeuralAttentionConfig,
    neural_layers,
    patch_model,
    patching,
    scorer_parameters,
    set_backend,
)
from hf_neural_attention.configuration_neural_attention import (
    ACTIVATIONS,
    BACKENDS,
    MLP_PRECISIONS,
    MLP_VARIANTS,
    MODES,
)
from hf_neural_attention.cpp_neural_attention import cpp_available
from hf_neural_attention.fused_cpp_neural_attention import fused_cpp_available
from hf_neural_attention.patching import neural_settings

logger = logging.getLogger(__name__)

ARMS = ("neural", "dot")


@dataclass
class AttentionArguments:
    """Which attention the run uses and the neural scorer's settings (see ``NeuralAttentionConfig``)."""

    attention: str = field(
        default="neural",
        metadata={
            "help": "neural: patch --neural_layers with neural attention; dot: stock dot-product attention; "
            "ab: run both arms one after the other (outputs in <output_dir>/neural and <output_dir>/dot) and "
            "print the comparison. Running the script with no arguments at all means --attention ab.",
            "choices": ["neural", "dot", "ab"],
        },
    )
    neural_layers: list[str] = field(
        default_factory=lambda: ["0"],
        metadata={"help": "Layers to patch: ints (negative count from the end) or 'all'. The paper: 0."},
    )
    proj_dim: int | None = field(
        default=None, metadata={"help": "d' (query/key projection size); default head_dim // 32, at least 2."}
    )
    hidden_dim: int | None = field(default=None, metadata={"help": "Hidden width of the paper MLP (default d')."})
    mlp: str = field(default="paper", metadata={"choices": list(MLP_VARIANTS)})
    activation: str = field(default="relu", metadata={"choices": list(ACTIVATIONS)})
    share_across_heads: bool | None = field(
        default=None,
        metadata={"help": "True (or the bare flag): one scorer for all heads; False: one per head. Default: per head "
                          "for the paper MLP, shared for the authors'.", "nargs": "?", "const": True},
    )
    neural_mode: str = field(
        default="replace",
        metadata={"help": "replace (the paper) or residual (q.k + MLP, starts equal to the base model).",
                  "choices": list(MODES)},
    )
    neural_backend: str = field(default="auto", metadata={"choices": list(BACKENDS)})
    mlp_precision: str = field(
        default="fp32",
        metadata={"help": "fp16: the Triton kernel scores pairs in packed fp16 (paper MLP with relu; GPU only, "
                          "faster at d' 8..16); the other backends always compute in fp32.",
                  "choices": list(MLP_PRECISIONS)},
    )


def resolve_layers(spec: list[str] | str, num_layers: int) -> list[int]:
    """Turn ``["0", "-1"]`` / ``"all"`` into sorted layer indices, or raise ``ValueError`` before any training (the
    rules are patch_model's, ``hf_neural_attention.patching.resolve_layers``; only the command line's text is
    parsed here)."""
    items = [spec] if isinstance(spec, str) else list(spec)
    if len(items) == 1 and str(items[0]).lower() == "all":
        return list(range(num_layers))
    try:
        indices = [int(item) for item in items]
    except ValueError:
        raise ValueError(f"--neural_layers takes integers or 'all', got {' '.join(map(str, items))!r}.") from None
    try:
        return patching.resolve_layers(indices, num_layers)
    except ValueError as error:
        raise ValueError(f"--neural_layers {' '.join(map(str, items))}: {error}") from None


def neural_config_kwargs(args: AttentionArguments) -> dict[str, Any]:
    """The ``NeuralAttentionConfig`` keyword arguments that the command line sets."""
    return {
        "proj_dim": args.proj_dim,
        "hidden_dim": args.hidden_dim,
        "mlp": args.mlp,
        "activation": args.activation,
        "share_across_heads": args.share_across_heads,
        "mode": args.neural_mode,
        "backend": args.neural_backend,
        "mlp_precision": args.mlp_precision,
    }


def validate_attention_args(args: AttentionArguments, num_layers: int) -> list[int]:
    """Check layers and scorer settings against the model's depth; returns the resolved layers."""
    layers = resolve_layers(args.neural_layers, num_layers)
    if args.attention == "neural":
        NeuralAttentionConfig(**neural_config_kwargs(args))  # raises with the bad setting named
        if args.neural_backend == "triton" and not torch.cuda.is_available():
            raise ValueError("--neural_backend triton needs a CUDA GPU, and this machine has none; use "
                             "--neural_backend auto (the fused C++ kernel on CPU).")
    return layers


def apply_attention(model: Any, args: AttentionArguments, layers: list[int]) -> Any:
    """Patch ``layers`` with neural attention for the neural arm; the dot arm keeps the stock model.

    A neural checkpoint (``--model_name_or_path`` saved by a neural run) keeps its own neural layers and settings
    in the neural arm (only ``--neural_backend`` applies); the dot arm refuses it, which would otherwise train and
    report a neural model as dot-product.
    """
    present = [index for index, _ in neural_layers(model)]
    if present and args.attention != "neural":
        raise ValueError(f"The model given by --model_name_or_path has neural layers {present}; the dot-product arm "
                         "needs a stock checkpoint. Evaluate or continue it with --attention neural.")
    if args.attention != "neural":
        return model
    settings = NeuralAttentionConfig(**neural_config_kwargs(args))
    if present:
        logger.warning("The model already has neural layers %s: kept with the checkpoint's settings (--neural_layers "
                       "and the scorer flags are not applied; --neural_backend %s is).", present, settings.backend)
        set_backend(model, settings.backend)
        settings = neural_settings(model)[1]
    else:
        model = patch_model(model, layers=layers, config=settings)
    if settings.backend in ("auto", "cpp") and not torch.cuda.is_available():
        # build (first run on a machine) or load the C++ kernel now: 10-60 s that would otherwise be counted in the
        # neural arm's train_runtime and not in the dot arm's
        load_kernel = fused_cpp_available if settings.mlp == "paper" else cpp_available
        load_kernel()
    return model


def count_scorer_parameters(model: Any) -> int:
    """Number of scalars in the model's neural scorers (0 for a dot-product model)."""
    return sum(t.numel() for t in scorer_parameters(model).values())
