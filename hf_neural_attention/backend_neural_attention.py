"""The attention function registered with transformers, and its dispatch per module.

Importing this file registers ``"neural_attention"`` with both ``AttentionInterface`` (the function) and
``AttentionMaskInterface`` (the mask builder of the fallback implementation; a name missing there would receive
``attention_mask=None`` even for padded batches). Modules that carry a scorer (``module.neural_scorer``) are scored
by it; every other module is sent, unchanged, to the implementation the model used before patching (SDPA or eager).

This file travels with Hub checkpoints: it imports only torch, transformers and flat siblings.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from torch import nn
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import eager_mask, sdpa_mask
from transformers.utils import logging

from .configuration_neural_attention import FALLBACK_CONFIG_ATTRIBUTE, SCORER_ATTRIBUTE

# imported here, not where first used: importing a kernel file registers its custom ops, which must not happen while
# torch.compile traces a first call (Triton's file is the exception: it imports triton, so it loads on demand)
from .fused_cpp_neural_attention import fused_cpp_available, neural_attention_fused_cpp
from .kernels_neural_attention import causal_mask, check_sinks, check_softcap
from .tiled_neural_attention import neural_attention_tiled

logger = logging.get_logger(__name__)

ATTENTION_NAME = "neural_attention"
FALLBACK_ATTRIBUTE = "neural_attention_fallback"
"""Set by the patcher on every attention module: the implementation unpatched modules keep (``sdpa``/``eager``)."""

_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # Triton and the C++ kernel compute in fp32

try:  # how transformers collects returned attention weights (read on every call of an unpatched layer too)
    from transformers.utils.output_capturing import _active_collector
except ImportError:  # older/newer transformers without the collector
    _active_collector = None


def _wants_attention_weights(kwargs: dict) -> bool:
    """Whether the caller collects attention probabilities (``output_attentions=True``).

    Models such as GPT-2 do not pass the flag down; transformers collects the returned weights through a
    context variable instead, which we read when it exists.
    """
    if kwargs.get("output_attentions"):
        return True
    if _active_collector is None:
        return False
    if torch.compiler.is_compiling() and not getattr(_active_collector, "compiling", True):
        return False  # nothing set it in this graph (no @capture_outputs: LongT5, ViTMAE); ContextVar.get won't trace
    collected = _active_collector.get()
    return isinstance(collected, dict) and "attentions" in collected


# --- masks ----------------------------------------------------------------------------------------------------
def _normalise_mask(
    attention_mask: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor, is_causal: bool
) -> tuple[torch.Tensor | None, bool, torch.Tensor | None]:
    """Bring the three mask forms transformers hands out to ``(bool_mask, causal, additive_bias)``.

    - ``None``: causality implied by the module, applied only for ``q_len > 1`` (SDPA's ``is_causal``
      semantics, upper-left aligned also when ``k_len > q_len``).
    - 4-D bool ``(batch|1, heads|1, q_len, k_len)``: True = may attend.
    - 4-D float additive (0 / large negative): turned into a bool mask; any other finite value is a real bias,
      returned as ``additive_bias`` (the kernels add it to the scores).
    """
    q_len, k_len = query.shape[-2], key.shape[-2]
    if attention_mask is None:
        return None, bool(is_causal and q_len > 1), None
    if type(attention_mask).__name__ == "BlockMask":
        raise NotImplementedError(
            "Neural attention does not support flex-attention BlockMasks; load the model with the default "
            "attention implementation and let patch_model select 'neural_attention'."
        )
    if attention_mask.dim() != 4:
        raise ValueError(
            f"Expected a 4-D attention mask (batch, heads, q_len, k_len), got shape {tuple(attention_mask.shape)}."
        )
    attention_mask = attention_mask[..., :k_len]
    full = (query.shape[0], query.shape[1], q_len, k_len)
    if any(size not in (1, want) for size, want in zip(attention_mask.shape, full, strict=True)):
        raise ValueError(  # every backend alike (the materialising one failed in torch's broadcasting)
            f"The attention mask {tuple(attention_mask.shape)} (keys cut to {k_len}) does not broadcast to (batch, "
            f"heads, q_len, k_len) = {full}; each dim must be 1 or that size."
        )
    if attention_mask.dtype == torch.bool:
        return attention_mask, False, None
    if not attention_mask.is_floating_point():
        raise TypeError(
            f"A 4-D attention mask must be bool (True = may attend) or additive float, got {attention_mask.dtype}; "
            "pass the model a 2-D (batch, k_len) 0/1 mask and let it build the 4-D one, or convert with mask.bool()."
        )
    visible = attention_mask > torch.finfo(attention_mask.dtype).min / 2
    bias = attention_mask.masked_fill(~visible, 0)
    # the usual 0 / dtype-min mask (eager's) is a plain visibility mask; under torch.compile the test would need the
    # values on the host, so there the zeros are added as a bias (same result, a load more per score tile). A bias
    # that needs a gradient stays one even at zero (Swin's and BEiT's position tables start at zeros)
    if not attention_mask.requires_grad and not torch.compiler.is_compiling() and not bias.any():
        return visible, False, None
    return visible, False, bias


def _fold_key_selection(
    attention_mask: torch.Tensor | None, indices: torch.Tensor, query: torch.Tensor, key: torch.Tensor, is_causal: bool
) -> torch.Tensor:
    """The 4-D mask with DeepSeek sparse attention's key selection in it (DeepSeek-V3.2, GLM-MoE-DSA, ...).

    ``indices`` ``(batch, q_len, top_k)`` are the keys each query may attend to. Those models fold them into the mask
    themselves only under ``"eager"`` / ``"sdpa"`` (else they pass them on for a sparse kernel): folded here the same
    way (bool mask: and-ed; additive: dtype minimum), for the patched and the unpatched layers alike.
    """
    q_len, k_len = query.shape[-2], key.shape[-2]
    dropped = torch.ones((indices.shape[0], q_len, k_len), dtype=torch.bool, device=indices.device)
    dropped = dropped.scatter(-1, indices.long(), False).unsqueeze(1)  # (batch, 1, q_len, k_len), True = not selected
    if attention_mask is None:  # what None meant: causal for q_len > 1 (see _normalise_mask)
        visible = ~dropped
        return visible & _causal_mask(q_len, k_len, query.device) if is_causal and q_len > 1 else visible
    if attention_mask.dtype == torch.bool:
        return attention_mask & ~dropped
    return attention_mask.masked_fill(dropped, torch.finfo(query.dtype).min)


def _causal_mask(q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    """Upper-left aligned causal mask ``(1, 1, q_len, k_len)``: key j visible to query i iff j <= i."""
    return causal_mask(q_len, k_len, device)[None, None]


def _apply_sliding_window(
    window: int, mask: torch.Tensor | None, causal: bool, q_len: int, k_len: int, device: torch.device,
    causal_layer: bool,
) -> tuple[torch.Tensor | None, bool]:
    """``(mask, causal)`` for a layer with a sliding window (Mistral, Gemma 2/3, ...).

    transformers draws the window into the 4-D mask it builds for the layer (the mask SDPA obeys too); a given mask
    is therefore used as is. Without one, a causal layer with ``q_len == k_len`` gets the band
    ``i - window < j <= i`` (transformers' definition); a bidirectional layer (``causal_layer=False``) sees every
    key, as under eager and SDPA, which take the window from the mask only (DiffusionGemma's decoder hands ``None``
    for attention over all keys).

    Raises:
        NotImplementedError: no mask, a window that would cut, and a causal layer called with ``q_len != k_len``
            (``causal`` is then False for a single query): which keys the window keeps is not defined by the call.
    """
    if mask is not None or window >= max(q_len, k_len) or not causal_layer:
        return mask, causal
    if not (causal and q_len == k_len):
        raise NotImplementedError(
            f"A sliding window of {window} with no attention mask, q_len={q_len}, k_len={k_len} and "
            f"{'causal' if causal else 'no causal'} masking: pass the 4-D mask transformers builds for the layer "
            "(models do this themselves)."
        )
    rows = torch.arange(q_len, device=device)[:, None]
    band = torch.arange(k_len, device=device)[None, :] > rows - window
    return _causal_mask(q_len, k_len, device) & band[None, None], False


# --- the materialising path -----------------------------------------------------------------------------------
def materialised_neural_attention(
    scorer: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    mask: torch.Tensor | None,
    causal: bool,
    bias: torch.Tensor | None,
    scaling: float,
    dropout_p: float,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores every pair at once (memory O(n^2 * hidden)); returns ``(out, probabilities)``.

    ``out`` is ``(batch, heads, q_len, v_dim)``, probabilities ``(batch, heads, q_len, k_len)``: the ones that
    multiplied ``value``, so after dropout when it is on (as transformers' eager path returns them).
    Fully masked query rows get all-zero probabilities, hence zero output. ``softcap``: Gemma 2's logit soft-capping,
    ``softcap * tanh(score / softcap)`` before the bias and the mask (as its eager attention does). ``sinks``
    ``(batch|1, heads|1, q_len|1, 1)``: attention sinks (gpt-oss), one more logit per row in the softmax, dropped
    after it.
    """
    logits = scorer.scores(query, key, scaling)  # fp32 (fp64 for fp64 inputs)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    if bias is not None:
        logits = logits + bias.to(logits.dtype)
    if causal:
        mask = _causal_mask(query.shape[-2], key.shape[-2], query.device)
    if bias is not None:  # a key the bias hides (-inf) is masked, as the fused kernels treat it: a row it hides
        seen = ~torch.isneginf(bias)  # entirely is zeros, not softmax's 0 / 0
        mask = seen if mask is None else mask & seen
    if mask is not None:
        logits = logits.masked_fill(~mask, torch.finfo(logits.dtype).min)
    if sinks is not None:
        sink_column = sinks.to(logits.dtype).expand(*logits.shape[:-1], 1)
        probabilities = torch.softmax(torch.cat([logits, sink_column], dim=-1), dim=-1)[..., :-1]
    else:
        probabilities = torch.softmax(logits, dim=-1)
    if mask is not None:
        probabilities = probabilities.masked_fill(~mask, 0.0)  # fully masked rows: zeros, not uniform
    if dropout_p > 0.0:
        probabilities = nn.functional.dropout(probabilities, p=dropout_p, training=True)
    probabilities = probabilities.to(value.dtype)
    return probabilities @ value, probabilities


# --- backend choice -------------------------------------------------------------------------------------------
_SWITCH_BACKEND = (" (a checkpoint keeps the backend it was saved with: load it with from_pretrained(..., "
                   "neural_attention_backend='auto'), or switch a model with hf_neural_attention.set_backend(model, "
                   "'auto'))")


def choose_backend(requested: str, query: torch.Tensor, *, needs_probabilities: bool) -> str:
    """The backend that will run: ``"eager"``, ``"tiled"``, ``"cpp"`` or ``"triton"``.

    ``auto`` takes the fused path that applies: Triton on CUDA when installed (on a GPU older than compute capability
    8.0 only for heads of at most 64: else the tiled kernel); on CPU the C++ kernel when it builds (compiled once, then
    cached), else the pure PyTorch tiled kernel; float64 inputs always take the tiled kernel (the fused ones compute in
    fp32). Every backend falls back to ``eager`` for a call that must return probabilities, since fused kernels never
    form the probability matrix.
    A real additive bias (T5's position bias), logit soft-capping (Gemma 2) and attention sinks (gpt-oss, Inkling 2)
    take the same path: every backend has them.
    """
    if needs_probabilities or requested == "eager":
        return "eager"
    from .triton_neural_attention import triton_is_preferred, triton_is_usable  # imports triton only here

    fused_dtype = query.dtype in _FUSED_DTYPES
    if requested == "triton":
        if not triton_is_usable(query):
            raise ValueError(
                "backend='triton' needs triton and a CUDA tensor (or TRITON_INTERPRET=1 for CPU tests); "
                f"install triton or use backend='auto'{_SWITCH_BACKEND}."
            )
        if not fused_dtype:
            raise ValueError(
                f"backend='triton' takes float32 / bfloat16 / float16 inputs, got {query.dtype}; "
                "use backend='tiled' (or 'auto', which picks it) for this dtype."
            )
        return "triton"
    if requested == "cpp" and query.device.type != "cpu":
        raise ValueError(
            f"backend='cpp' runs on CPU tensors, got a {query.device.type} tensor; use backend='auto' (Triton on "
            f"CUDA when installed, else 'tiled'){_SWITCH_BACKEND}, or move the model to the CPU."
        )
    if requested == "auto":
        if query.is_cuda:
            return "triton" if fused_dtype and triton_is_preferred(query) else "tiled"

        # float64 (e.g. gradcheck) goes to the tiled kernel, which keeps its precision. Only the fused extension is
        # built here (the one the paper MLP runs); the authors' MLP builds the tiled C++ scorer on its first call.
        return "cpp" if query.device.type == "cpu" and fused_dtype and fused_cpp_available() else "tiled"
    return requested


def _fallback_function(module: nn.Module) -> Callable:
    """The attention function an unpatched module keeps (recorded by the patcher; SDPA when absent)."""
    fallback = getattr(module, FALLBACK_ATTRIBUTE, "sdpa")
    if fallback == "eager":
        return _eager_fallback
    return sdpa_attention_forward


def _warn_if_built_by_a_stock_class(module: nn.Module) -> None:
    """Say so when a stock class was built from a Hub config (``GPT2LMHeadModel(patched.config)``): the config names
    neural layers, but only the Hub classes and ``patch_model`` build scorers, so every layer runs dot-product."""
    config = getattr(module, "config", None)
    if type(config).__name__.startswith("NeuralAttention") and getattr(config, "neural_attention_layers", None):
        logger.warning_once(
            f"{type(config).__name__} names neural layers {config.neural_attention_layers}, but the model running it "
            "has no neural scorers: a stock class built from it runs dot-product attention in every layer (and "
            "refuses save_pretrained). Build the model with AutoModelFor...from_config(config), or from a plain "
            "config for a dot-product model."
        )


def _is_causal(module: nn.Module, kwargs: dict) -> bool:
    """The call's ``is_causal`` where the model passes one (CLIP's attention serves a causal text tower and a
    bidirectional vision tower, so it says per call), else the module's attribute (GPT-2, Llama)."""
    is_causal = kwargs.get("is_causal")
    return bool(getattr(module, "is_causal", False) if is_causal is None else is_causal)


def _eager_fallback(module, query, key, value, attention_mask, **kwargs):
    """Run the model's own eager function with the additive mask it would have received."""
    q_len, k_len = query.shape[-2], key.shape[-2]
    mask, causal, _ = _normalise_mask(attention_mask, query, key, _is_causal(module, kwargs))
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        additive = attention_mask
    else:
        if causal:
            mask = _causal_mask(q_len, k_len, query.device)
        additive = None
        if mask is not None:
            additive = torch.zeros(mask.shape, dtype=query.dtype, device=query.device)
            additive = additive.masked_fill(~mask, torch.finfo(query.dtype).min)
    if getattr(module, "reorder_and_upcast_attn", False) and hasattr(module, "_upcast_and_reordered_attn"):
        # GPT-2's upcast path, which stock GPT-2 runs instead of the attention function under eager.
        return module._upcast_and_reordered_attn(query, key, value, additive)
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is None:
        raise NotImplementedError(f"No eager attention function found for {type(module).__name__}.")
    return eager(module, query, key, value, additive, **kwargs)


# --- the registered function ----------------------------------------------------------------------------------
def _unpatched_forward(module, query, key, value, attention_mask, **kwargs):
    """A module without a scorer: the implementation the model used before patching, or eager's for weights."""
    if not hasattr(module, FALLBACK_ATTRIBUTE):
        _warn_if_built_by_a_stock_class(module)
    if _wants_attention_weights(kwargs):
        # SDPA returns no weights and transformers drops the Nones: attentions[i] would no longer be layer i
        return _eager_fallback(module, query, key, value, attention_mask, **kwargs)
    return _fallback_function(module)(module, query, key, value, attention_mask, **kwargs)


def _check_scorer_fits(module: nn.Module, scorer: nn.Module, query: torch.Tensor) -> None:
    """Refuse a call with heads the scorer was not built for."""
    # per-head weights need the heads they were made for; weights shared by the heads only the head size
    if query.shape[-1] != scorer.head_dim or (query.shape[1] != scorer.num_heads and scorer.weight_heads != 1):
        raise ValueError(
            f"{type(module).__name__} called attention with {query.shape[1]} heads of size {query.shape[-1]}, but "
            f"its neural scorer was built for {scorer.num_heads} of size {scorer.head_dim}: this module is not a "
            "multi-head self-attention over tokens (e.g. attention over layers). Unpatch it (unpatch_model) and patch "
            "another layer."
        )


def _masking(
    module: nn.Module, query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None, kwargs: dict
) -> tuple[torch.Tensor | None, bool, torch.Tensor | None]:
    """``(bool_mask, causal, additive_bias)`` of a call: its mask, sliding window and position bias, combined.

    query ``(batch, heads, q_len, head_dim)``, key ``(batch, heads, k_len, head_dim)`` (kv heads already repeated).
    """
    is_causal = _is_causal(module, kwargs)
    mask, causal, bias = _normalise_mask(attention_mask, query, key, is_causal)
    if kwargs.get("sliding_window") is not None:
        mask, causal = _apply_sliding_window(int(kwargs["sliding_window"]), mask, causal, query.shape[-2],
                                             key.shape[-2], query.device, is_causal)  # fmt: skip
    position_bias = kwargs.get("position_bias")
    if position_bias is not None:
        bias = position_bias if bias is None else bias + position_bias
    return mask, causal, bias


def _cap_and_sinks(query: torch.Tensor, kwargs: dict) -> dict:
    """The call's soft-cap and attention-sink logits, checked, under the keywords of the kernels and of the
    materialising path; only those present (``query`` ``(batch, heads, q_len, head_dim)`` gives the sinks' shape)."""
    features = {"softcap": kwargs.get("softcap"), "sinks": _sink_logits(kwargs)}
    check_softcap(features["softcap"])
    check_sinks(features["sinks"], *query.shape[:3])
    return {name: value for name, value in features.items() if value is not None}


def _sink_logits(kwargs: dict) -> torch.Tensor | None:
    """The call's attention-sink logits (``s_aux``: gpt-oss and kin; ``sinks``: Inkling 2) as ``(batch|1, heads|1,
    q_len|1, 1)``: per-head ``(heads,)`` ones become ``(1, heads, 1, 1)``; per-token ones come in that shape."""
    sinks = kwargs.get("s_aux")
    if sinks is None:
        sinks = kwargs.get("sinks")
    if torch.is_tensor(sinks) and sinks.dim() == 1:
        return sinks.reshape(1, -1, 1, 1)
    return sinks


def _fused_kernel(backend: str, scorer: nn.Module) -> tuple[Callable, dict]:
    """The kernel function of a fused ``backend`` and the keyword options it takes from the scorer's settings."""
    if backend == "triton":
        from .triton_neural_attention import neural_attention_triton

        return neural_attention_triton, {"half_mlp": scorer.settings.mlp_precision == "fp16"}
    if backend == "cpp":
        # fully fused for the paper MLP (fp32 arithmetic, dropout and a score bias included); the authors MLP goes to
        # the tiled C++ path
        return neural_attention_fused_cpp, {}
    return neural_attention_tiled, {}


def neural_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers attention function: neural scoring for modules with a scorer, the fallback for the others.

    Args:
        query: ``(batch, heads, q_len, head_dim)``; key/value: ``(batch, kv_heads, k_len, head_dim)``.
        attention_mask: ``None``, 4-D bool (True = attend) or 4-D additive float.
        kwargs: ``dropout``, ``scaling``, ``is_causal`` and whatever the model passes.

    Returns:
        ``(out, weights)``: ``out`` is ``(batch, q_len, heads, v_dim)``; ``weights`` is
        ``(batch, heads, q_len, k_len)`` when attention probabilities are requested, else ``None``.
    """
    if kwargs.get("indices") is not None:  # sparse attention's key selection, which the model left to the kernel
        attention_mask = _fold_key_selection(attention_mask, kwargs["indices"], query, key, _is_causal(module, kwargs))
        kwargs["indices"] = None  # as the model passes it to eager / SDPA
    scorer = getattr(module, SCORER_ATTRIBUTE, None)
    if scorer is None:
        return _unpatched_forward(module, query, key, value, attention_mask, **kwargs)
    _check_scorer_fits(module, scorer, query)

    num_groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, num_groups), repeat_kv(value, num_groups)
    scaling = kwargs.get("scaling")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    mask, causal, bias = _masking(module, query, key, attention_mask, kwargs)
    dropout_p = float(kwargs.get("dropout", 0.0) or 0.0)
    extras = _cap_and_sinks(query, kwargs)

    needs_probabilities = _wants_attention_weights(kwargs)
    backend = choose_backend(scorer.settings.backend, query, needs_probabilities=needs_probabilities)
    if backend == "eager":
        out, probabilities = materialised_neural_attention(scorer, query, key, value, mask=mask, causal=causal,
                                                           bias=bias, scaling=scaling, dropout_p=dropout_p,
                                                           **extras)  # fmt: skip
        return out.transpose(1, 2).contiguous(), probabilities if needs_probabilities else None

    kernel, options = _fused_kernel(backend, scorer)
    options.update(extras)
    query_hidden, key_hidden, output_weight, second_weight, second_bias = scorer(query, key)  # a call: module hooks
    # a 0-d tensor, not an int: an .item() here would break a torch.compile graph
    seed = torch.randint(0, 2**62, (), dtype=torch.int64) if dropout_p > 0.0 else None
    out = kernel(
        query_hidden, key_hidden, value, output_weight, second_weight, second_bias,
        activation=scorer.activation_name, mask=mask, causal=causal,
        dot_query=query if scorer.residual else None, dot_key=key if scorer.residual else None, dot_scale=scaling,
        dropout_p=dropout_p, generator_seed=seed, score_bias=bias, **options,
    )  # fmt: skip
    return out.transpose(1, 2).contiguous(), None


def neural_attention_mask(**kwargs) -> torch.Tensor | None:
    """The 4-D mask a model on ``"neural_attention"`` builds: its fallback's (``FALLBACK_CONFIG_ATTRIBUTE``).

    Eager's additive float mask where the layers fall back to eager: code outside the attention function adds it to
    scores (BigBirdPegasus' block attention) or reads padding from it (NLLB-MoE's router), and took a bool mask's
    0 / 1 as visible / masked the wrong way round. Else SDPA's bool mask, or ``None`` for a causal call without
    padding (the kernels then skip the tiles above the diagonal) -- except under Gemma 4's KV-shared layers, which keep
    only the last queries after building the mask and, under any implementation not named ``"sdpa"``, rely on the
    mask to stay causal (a ``None`` mask then lost keys). Arguments are transformers' mask-interface keywords.
    """
    config = kwargs.get("config")
    padding = kwargs.get("attention_mask")
    if padding is not None and padding.dim() == 2 and "kv_length" in kwargs:
        # cut to the columns the mask reads (the same mask): inductor then knows every read in bounds and emits no
        # bounds check, which its C++ codegen can declare after use ("'tmp1' was not declared", decoding with padding)
        kwargs["attention_mask"] = padding[:, : kwargs.get("kv_offset", 0) + kwargs["kv_length"]]
    if getattr(config, FALLBACK_CONFIG_ATTRIBUTE, "sdpa") == "eager":
        return eager_mask(**kwargs)
    if getattr(config, "num_kv_shared_layers", 0):
        kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(**kwargs)


def register() -> None:
    """Register the function and its mask builder under ``ATTENTION_NAME`` (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, neural_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, neural_attention_mask)


register()
