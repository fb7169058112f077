"""`patch_model` / `unpatch_model`: put the neural scorer into chosen self-attention layers of a model.

Works on any transformers model whose attention modules go through ``ALL_ATTENTION_FUNCTIONS`` (GPT-2, ViT,
Llama, BERT, ...). A patched module carries its scorer as ``module.neural_scorer``; the model switches to the
``"neural_attention"`` implementation, which scores patched modules neurally and sends every other module to
the implementation the model had before (SDPA or eager), bit for bit.
"""

from __future__ import annotations

import copy
import gc
import inspect
import logging
import operator
from collections.abc import Iterable, Mapping, Sequence
from functools import cache
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from .backend_neural_attention import ATTENTION_NAME, FALLBACK_ATTRIBUTE, SCORER_ATTRIBUTE
from .configuration_neural_attention import (
    FALLBACK_CONFIG_ATTRIBUTE,
    NeuralAttentionConfig,
    clear_from_config,
    closest_name,
    record_on_config,
)
from .hub_classes import adopt_hub_class, is_hub_class, restore_stock_class
from .modeling_neural_attention import (
    FALLBACK_IMPLEMENTATIONS,
    build_scorer,
    find_other_attention_modules,
    find_self_attention_modules,
    head_shape,
    is_keep_neural_attention_hook,
    name_fallbacks,
    neural_settings,
    register_keep_neural_attention_hook,
    scorer_state_names,
)
from .scoring_neural_attention import NeuralScorer

logger = logging.getLogger(__name__)

PREVIOUS_IMPLEMENTATION_ATTRIBUTE = "_neural_attention_previous_implementation"  # on the patched model
LayerSelection = int | str | Iterable[int]


def find_attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Self-attention modules that go through the attention interface, in layer order ``(name, module)``.

    Cross-attention modules are never included (they attend to another sequence), nor attention over layer outputs
    (Inkling 2's attention residuals): they are not "layers" here.
    """
    return find_self_attention_modules(model)


def resolve_layers(layers: LayerSelection, num_layers: int) -> list[int]:
    """Turn a selection (int, iterable of ints, or ``"all"``) into sorted non-negative layer indices."""
    if isinstance(layers, str):
        if layers != "all":
            raise ValueError(f"layers={layers!r} is not valid; use an int, a list of ints, or 'all'.")
        return list(range(num_layers))
    if _is_bool_tensor(layers):
        raise TypeError("layers got a bool tensor (a mask?); pass the layer indices, e.g. "
                        "layers=mask.nonzero().flatten().tolist().")
    if isinstance(layers, bool | Mapping) or not (isinstance(layers, Iterable) or hasattr(layers, "__index__")):
        raise TypeError(f"layers must be an int, a list of ints or 'all', got {type(layers).__name__}.")
    try:  # one integer-like (int, numpy / 0-d torch integer) or an iterable of them
        requested = [operator.index(layers)]
    except TypeError:
        try:
            requested = list(layers)
        except TypeError:  # e.g. a 0-d float tensor
            raise TypeError(f"layers must be an int, a list of ints or 'all', got {layers!r}.") from None
    if not requested:
        raise ValueError("layers is empty; choose at least one layer (e.g. layers=[0], the paper's default).")
    resolved = []
    for index in requested:
        try:  # ints and integer-likes (numpy / torch integers), never bools or floats
            index = None if isinstance(index, bool) or _is_bool_tensor(index) else operator.index(index)
        except TypeError:
            index = None
        if index is None:
            raise TypeError(f"Layer indices must be ints, got {requested!r}.")
        if not -num_layers <= index < num_layers:
            raise ValueError(
                f"Layer {index} is out of range: this model has {num_layers} self-attention layers "
                f"(valid indices {-num_layers}..{num_layers - 1})."
            )
        resolved.append(index % num_layers)
    duplicates = sorted({i for i in resolved if resolved.count(i) > 1})
    if duplicates:
        raise ValueError(f"Layers {duplicates} are selected more than once (negative indices count from the end).")
    return sorted(resolved)


def _is_bool_tensor(value: object) -> bool:
    """A torch bool tensor, which ``operator.index`` takes as 0 / 1 (``torch.tensor([True, False])`` is no layer
    list)."""
    return isinstance(value, torch.Tensor) and value.dtype == torch.bool


def check_is_model(model: Any) -> None:
    """``TypeError`` unless ``model`` is an ``nn.Module`` (a Hub id passed where the loaded model belongs)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected a model (a torch nn.Module, such as a transformers PreTrainedModel), got "
                        f"{type(model).__name__}; load it first (e.g. AutoModelForCausalLM.from_pretrained(...)).")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers model inside ``torch.compile``'s, PEFT's or a distributed wrapper (DDP, FSDP, DeepSpeed), or
    ``model`` itself: the model whose class, config and layers ``patch_model`` changes (the wrappers keep no class
    or config of their own that a checkpoint would record).

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` (every public function that takes a model checks it here).
    """
    check_is_model(model)
    while not isinstance(model, PreTrainedModel):
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        elif callable(getattr(model, "get_base_model", None)):  # peft.PeftModel
            model = model.get_base_model()
        elif hasattr(model, "peft_config") and isinstance(getattr(model, "model", None), nn.Module):  # LoraModel
            model = model.model
        elif _distributed_wrapper(model) is not None:
            model = getattr(model, "_fsdp_wrapped_module", None) or model.module
        else:
            break
    return model


def _distributed_wrapper(model: nn.Module) -> str | None:
    """The name of the data-parallel wrapper ``model`` is (DDP, DataParallel, FSDP v1, DeepSpeed), or ``None``."""
    if isinstance(model, nn.DataParallel | nn.parallel.DistributedDataParallel) or hasattr(
            model, "_fsdp_wrapped_module") or type(model).__name__ in ("DeepSpeedEngine", "PipelineEngine"):
        return type(model).__name__
    return None


def _fully_sharded(model: nn.Module) -> str | None:
    """``"FSDP2 (fully_shard)"`` if FSDP2 has sharded ``model`` or a module inside it, else ``None``: it swaps their
    classes in place instead of wrapping (no wrapper to find), but new parameters would not join the shards."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch built without distributed support
        return None
    return "FSDP2 (fully_shard)" if any(isinstance(m, FSDPModule) for m in model.modules()) else None


def _current_implementation(model: PreTrainedModel) -> str | None:
    return getattr(model.config, "_attn_implementation", None)


def _module_fallback(module: nn.Module, name: str, model_implementation: str | None) -> str:
    """The implementation an attention module keeps while it is not patched: the one of the (sub-)config it runs
    under (a composite's towers may differ: a vision tower on eager beside a language model on sdpa), SDPA when none
    is set.

    Raises:
        ValueError: a flash / flex / paged kernel, which the attention function cannot fall back to.
    """
    if model_implementation == ATTENTION_NAME or getattr(module, FALLBACK_ATTRIBUTE, None) is not None:
        # patched before; or built on "neural_attention" by a stock class from a Hub config, which records the
        # fallback its masks are built for
        recorded = getattr(getattr(module, "config", None), FALLBACK_CONFIG_ATTRIBUTE, None) or "sdpa"
        return getattr(module, FALLBACK_ATTRIBUTE, recorded)
    own = getattr(getattr(module, "config", None), "_attn_implementation", None) or model_implementation
    if own is None or own in FALLBACK_IMPLEMENTATIONS:
        return own or "sdpa"
    where = "the model" if own == model_implementation else name
    raise ValueError(
        f"patch_model needs the model on 'sdpa' or 'eager' attention, got {own!r} for {where} (flash/flex/paged "
        "kernels would bypass the scorer). Call model.set_attn_implementation('sdpa') first."
    )


@cache
def _passes_block_selection(cls: type) -> bool:
    """Whether an attention class hands the attention function a block-sparse key selection (MiniMax-M3's
    ``block_indices``), which only its own indexer can turn into a mask. DeepSeek sparse attention's ``indices`` are
    folded by the attention function instead (``backend_neural_attention._fold_key_selection``)."""
    try:
        return "block_indices=" in inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False


def patch_model(
    model: PreTrainedModel,
    layers: LayerSelection = 0,
    config: NeuralAttentionConfig | None = None,
    **settings,
) -> PreTrainedModel:
    """Put neural attention into the chosen self-attention layers of ``model``, in place.

    Args:
        model: a transformers model whose attention goes through the attention interface (GPT-2, ViT, Llama,
            BERT, ...), on the ``sdpa`` or ``eager`` implementation.
        layers: an int, a list of ints (negative counts from the end) or ``"all"``; the paper uses ``[0]``.
        config: the scorer's settings; ``None`` uses the defaults.
        **settings: ``NeuralAttentionConfig`` fields overriding ``config`` (``proj_dim=8``, ``mode="residual"``).

    Returns:
        The same model object, now on the ``"neural_attention"`` implementation. Unpatched layers keep their
        previous implementation bit for bit. Settings are recorded on ``model.config`` as ``neural_attention_*``.

    Raises:
        ValueError / TypeError: bad layers, settings or a model without patchable attention; patching a layer
        that is already patched; settings different from those of layers patched earlier.
    """
    wrapper = (_distributed_wrapper(model) or _fully_sharded(model)) if isinstance(model, nn.Module) else None
    if wrapper is not None:  # its gradient sync / shards were set up for the parameters that existed then
        raise ValueError(f"patch_model got a model already wrapped in {wrapper}, which would not synchronise or shard "
                         "the new scorers; patch the model first, then wrap it (or let Trainer / accelerate do it).")
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"patch_model expects a transformers PreTrainedModel, got {type(model).__name__}.")
    _patch(unwrap_model(model), layers, config, settings)
    saver = adapter_only_saver(model)
    # the new scorers train (they are created trainable), but such a save_pretrained writes only the adapters: a
    # hand-written loop would lose them at the save without a word
    if saver == "PEFT":
        logger.warning(
            "patch_model patched the model inside a PEFT wrapper: its new scorers train, but PEFT's save_pretrained "
            "will not store them. Save them with save_neural_adapter(model, directory) beside PEFT's adapter "
            "(NeuralAttentionTrainer does so at every save), or patch the base model before get_peft_model with "
            "modules_to_save=['neural_scorer'] in its config."
        )
    elif saver == "transformers":
        logger.warning(
            "patch_model patched a model with adapters loaded through transformers (add_adapter / load_adapter): its "
            "new scorers train, but its save_pretrained then stores the adapters alone. Save the scorers with "
            "save_neural_adapter(model, directory) (NeuralAttentionTrainer does so at every save)."
        )
    return model


def adapter_only_saver(model: nn.Module) -> str | None:
    """Whose ``save_pretrained`` writes only adapters, not the model's other weights (its scorers), for ``model`` or
    the model inside ``torch.compile``'s wrapper: ``"PEFT"`` for PEFT's ``PeftModel`` or one of its tuners
    (``LoraModel``), ``"transformers"`` for a model with adapters loaded through transformers' PEFT integration
    (``add_adapter`` / ``load_adapter``), else ``None``."""
    while isinstance(getattr(model, "_orig_mod", None), nn.Module):
        model = model._orig_mod
    if callable(getattr(model, "get_base_model", None)):
        return "PEFT"
    if hasattr(model, "peft_config") or getattr(model, "_hf_peft_config_loaded", False):
        return "transformers" if isinstance(model, PreTrainedModel) else "PEFT"
    return None


def _can_switch_implementation(cls: type) -> bool:
    """Whether ``set_attn_implementation`` switches a ``cls`` instance (transformers decides by reading the source of
    its module, and only warns where it cannot: the patch would then be half done)."""
    check = getattr(cls, "_can_set_attn_implementation", None)
    return True if check is None else bool(check())


def _patch_settings(config: NeuralAttentionConfig | None, settings: dict) -> NeuralAttentionConfig:
    """The validated settings ``patch_model`` was given: ``config`` overridden by keyword ``settings``, always a copy
    (the scorers must not follow later edits of the caller's object, the next arm of a sweep)."""
    if config is not None and not isinstance(config, NeuralAttentionConfig):
        raise TypeError(f"config must be a NeuralAttentionConfig, got {type(config).__name__}.")
    unknown = sorted(set(settings) - set(NeuralAttentionConfig.field_names()))
    if unknown:
        hints = [closest_name(name, NeuralAttentionConfig.field_names()) for name in unknown]
        guesses = "".join(f" ({name}: did you mean {hint}?)" for name, hint in zip(unknown, hints, strict=True)
                          if hint)  # fmt: skip
        raise TypeError(f"patch_model got unknown setting(s) {unknown}{guesses}; the settings are "
                        f"NeuralAttentionConfig's fields: {', '.join(NeuralAttentionConfig.field_names())}.")
    return NeuralAttentionConfig(**{**(config.to_dict() if config is not None else {}), **settings})


def _patch(model: nn.Module, layers: LayerSelection, config: NeuralAttentionConfig | None, settings: dict) -> None:
    """``patch_model`` on the unwrapped model: every check first, then the changes."""
    config = _patch_settings(config, settings)

    modules = find_attention_modules(model)
    if not modules:
        raise ValueError(
            f"{type(model).__name__} has no self-attention module that goes through transformers' attention "
            "interface: it has no attention, or computes the scores in its own code, which a scorer cannot replace "
            "(BLOOM, MPT and Falcon do, to add ALiBi; DeBERTa, for its relative positions). patch_model supports "
            "GPT-2, ViT and the other models whose attention calls ALL_ATTENTION_FUNCTIONS (Llama, BERT, T5, CLIP, "
            "Whisper, ...)."
        )
    chosen = resolve_layers(layers, len(modules))

    # What is patched is what the modules carry: neural_attention_* fields on the config can be left over (a patched
    # Llama saved, then reloaded as a stock LlamaForCausalLM, keeps them but not its scorers).
    present = [i for i, (_, module) in enumerate(modules) if getattr(module, SCORER_ATTRIBUTE, None) is not None]
    already = [i for i in chosen if i in present]
    if already:
        raise ValueError(
            f"Layers {already} are already patched; call unpatch_model(model) first to change them."
        )
    if present:
        existing = getattr(modules[present[0]][1], SCORER_ATTRIBUTE).settings
        before, now = existing.to_dict(), config.to_dict()
        if before != now:
            differences = ", ".join(f"{name}={before[name]!r}, not {now[name]!r}" for name in before
                                    if before[name] != now[name])  # fmt: skip
            raise ValueError(
                f"Layers {present} were patched with different settings ({differences}); all neural layers of a "
                "model share one NeuralAttentionConfig, stored as given (None is not resolved). Unpatch first, or "
                "pass the same settings."
            )

    implementation = _current_implementation(model)
    # cross-attention too: never patched, but it dispatches through the neural attention function once the model is
    # switched to it, and keeps its implementation there (else SDPA, not bit-equal to an eager model's)
    interface = modules + find_other_attention_modules(model)
    fallbacks = [_module_fallback(module, name, implementation) for name, module in interface]
    block_sparse = [name for name, module in interface
                    if getattr(module, "indexer", None) is not None and _passes_block_selection(type(module))]
    if block_sparse:
        raise ValueError(
            f"{block_sparse[0]} selects its keys block-sparsely (`block_indices`), which {type(model).__name__} folds "
            "into the attention mask only on 'eager' / 'sdpa': on 'neural_attention' every layer, patched or not, "
            "would attend to all keys. Neural attention cannot patch this model."
        )

    for index in chosen:
        name, module = modules[index]
        head_dim, num_heads = head_shape(module, model.config)
        if num_heads % max(getattr(module, "num_key_value_groups", 1), 1):
            raise ValueError(f"Layer {index} ({name}): heads are not a multiple of its key/value groups.")

    if implementation != ATTENTION_NAME and not _can_switch_implementation(type(model)):
        raise ValueError(
            f"transformers will not switch {type(model).__name__} to another attention implementation: it reads the "
            "source of the module that defines the class to decide, and could not (a class defined in a notebook or "
            "a REPL), or found an attention class there that does not call ALL_ATTENTION_FUNCTIONS. Define "
            f"{type(model).__name__} in a .py file, or patch a stock transformers class. Nothing was changed."
        )
    parents = _check_config_sharing(model)

    # All checks passed: from here on the model is modified. The caller may hold the config to build a stock model
    # from it (an A/B pair): the model and its parents (an LM head around it, the composite it is a tower of) get a
    # copy of the outermost config first
    _give_model_its_own_config(model, parents)
    for index in chosen:
        name, module = modules[index]
        setattr(module, SCORER_ATTRIBUTE, build_scorer(module, model, config))
    for (_, module), fallback in zip(interface, fallbacks, strict=True):
        setattr(module, FALLBACK_ATTRIBUTE, fallback)
    if implementation != ATTENTION_NAME:
        model.set_attn_implementation(ATTENTION_NAME)
        if _current_implementation(model) != ATTENTION_NAME:
            raise RuntimeError(
                f"transformers refused to switch {type(model).__name__} to {ATTENTION_NAME!r}; "
                "the scorer would be ignored."
            )
        # what unpatch_model restores on this config where its towers differ: a composite's own value need not be
        # any tower's
        model.__dict__[PREVIOUS_IMPLEMENTATION_ATTRIBUTE] = implementation
    # a module dispatches on the config it holds, which the switch may miss: EncoderDecoderModel gives its encoder a
    # config object of its own and leaves the encoder's layers holding the old one. Switched here too (unpatch_model
    # switches them back), or those layers would skip their scorers without a word.
    for _, module in modules:
        held = getattr(module, "config", None)
        if getattr(held, "_attn_implementation", ATTENTION_NAME) != ATTENTION_NAME:
            held._attn_implementation_internal = ATTENTION_NAME
    name_fallbacks(model)  # the masks the fallback implementations expect
    record_on_config(model.config, present + chosen, config)
    register_keep_neural_attention_hook(model)
    # a sub-model patched alone (llm.transformer) keeps its class: its parent holds the very config object, whose class
    # it is (a composite's decoder, whose config is a sub-config, does switch: the composite rebuilds it from that)
    parent_model = next((parent for parent in parents if isinstance(parent, PreTrainedModel)
                         and parent.__dict__.get("config") is model.config), None)  # fmt: skip
    if parent_model is None:
        adopt_hub_class(model)
    _warn_where_saving_needs_more(model, parents, parent_model, bool(present))


def _warn_where_saving_needs_more(model: nn.Module, parents: list[nn.Module], parent_model: nn.Module | None,
                                  adding: bool) -> None:
    """After a patch: warn where ``save_pretrained`` alone does not make a checkpoint that loads with its scorers (a
    tower of a composite, a model without a Hub class or a sub-model sharing its parent's config). ``adding``: the
    model had neural layers before (it was warned then)."""
    composite = next((parent for parent in parents if isinstance(parent, PreTrainedModel)
                      and parent.__dict__.get("config") is not model.config), None)  # fmt: skip
    if composite is not None and is_hub_class(type(model)) and not adding:
        logger.warning(
            "%s is a tower of %s, whose save_pretrained records it as model_type %r: that checkpoint loads only where "
            "hf_neural_attention is imported (trust_remote_code does not reach a composite's sub-configs). For users "
            "without the plugin, save the scorers with save_neural_adapter on the composite, beside the weights of "
            "an unpatched one.", type(model).__name__, type(composite).__name__, model.config.model_type)
    if adding or is_hub_class(type(model)):  # warned when the first layers were patched, or now a Hub class
        return
    reason = (f"a sub-model of {type(parent_model).__name__}, which shares its config" if parent_model is not None
              else "no neural-attention Hub class")
    logger.warning(
        "%s keeps its class (%s): its save_pretrained writes the scorer weights, but loading the checkpoint with "
        "%s.from_pretrained drops them (reported as unexpected keys). Save and load the scorers with "
        "save_neural_adapter / load_neural_adapter.", type(model).__name__, reason, type(model).__name__)


def _other_config_holders(model: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """Modules outside ``model`` that hold its config, or a config containing it as a sub-config:
    ``(parents, others)``, parents being those whose module tree contains ``model``.

    transformers hands one config object to every model built from it (``GPT2LMHeadModel(cfg)`` twice: one config),
    and a sub-model (``model.transformer``, a composite model's encoder) shares its parent's. Modules keep no link to
    their parent or to other holders: one pass over the garbage collector's objects finds them (once per patch).
    """
    target, inside = model.config, {id(module) for module in model.modules()}
    holders = [obj for obj in gc.get_objects()  # type(), not isinstance: no __class__ lookups on arbitrary objects
               if issubclass(type(obj), nn.Module) and id(obj) not in inside
               and _contains_config(obj.__dict__.get("config"), target)]  # fmt: skip
    parents, others = [], []
    for holder in holders:
        (parents if any(m is model for m in holder.modules()) else others).append(holder)
    return parents, others


def _contains_config(config: object, target: PretrainedConfig, depth: int = 4) -> bool:
    """Whether ``config`` is ``target`` or holds it as a sub-config (``encoder``, ``text_config``, ...)."""
    if config is target:
        return True
    if not isinstance(config, PretrainedConfig) or depth == 0:
        return False
    return any(_contains_config(value, target, depth - 1) for value in vars(config).values()
               if isinstance(value, PretrainedConfig))  # fmt: skip


def _check_config_sharing(model: nn.Module) -> list[nn.Module]:
    """The modules holding ``model``'s config whose module tree contains ``model`` (its parents: a sub-model's,
    a tower's composite, PEFT's wrappers). Patching writes to the config (layers, settings, attention
    implementation, class): the model and its parents get a copy first, since the caller may hold the config to
    build a stock model from it (an A/B pair).

    Raises:
        ValueError: the config is also held by another sub-model of a parent (siblings built from one config):
            the parent's copy would still be theirs, and patching would write the settings into it. (Models outside
            the parents, such as the other arm of an A/B pair, keep the old config.)
    """
    parents, others = _other_config_holders(model)
    in_parents = {id(module) for parent in parents for module in parent.modules()}
    siblings = [other for other in others if id(other) in in_parents]
    if siblings:
        raise ValueError(
            f"{type(model).__name__}'s config object is also held by {len(siblings)} other module(s) "
            f"(e.g. {type(siblings[0]).__name__}) inside its parent {type(parents[0]).__name__}: patching would "
            "write the neural-attention settings into their config too. Give the sub-model a config of its own first "
            "(sub_model.config = copy.deepcopy(sub_model.config), and its submodules' .config likewise), or patch "
            "the parent."
        )
    return parents


def _give_model_its_own_config(model: nn.Module, parents: Sequence[nn.Module] = ()) -> None:
    """Replace ``model.config`` by a copy, and with it the config of each parent holding it or a config containing it
    (``parents``: modules whose tree contains ``model``; a tower's config is a sub-config of its composite's, so the
    composite's whole config is copied). Every module in their trees that holds one of the copied configs is
    re-pointed, under any attribute name (DiffusionGemma's decoder builds its masks from ``self.text_config``: left
    on the old object, it would build them for the old attention implementation)."""
    roots = [parent for parent in parents if isinstance(parent.__dict__.get("config"), PretrainedConfig)]
    configs = [model.config] + [root.config for root in roots]
    # the config that holds the most of the others: the outermost (a composite's, which holds its towers')
    outer = max(configs, key=lambda config: sum(_contains_config(config, other) for other in configs))
    modules = {id(module): module for root in (model, *roots) for module in root.modules()}.values()
    held = [(module, name, config) for module in modules for name, config in list(module.__dict__.items())
            if isinstance(config, PretrainedConfig)]  # fmt: skip
    memo: dict[int, object] = {}
    copy.deepcopy(outer, memo)
    for _, _, config in held:  # configs outside the outermost one (EncoderDecoderModel's encoder layers keep the
        copy.deepcopy(config, memo)  # config the encoder was built with): copied too, one memo for all (no-op if in)
    for module, name, config in held:
        module.__dict__[name] = memo[id(config)]


def unpatch_model(model: nn.Module) -> nn.Module:
    """Remove every scorer and restore the model's previous attention implementation and class, in place.

    A sub-model (``model.transformer``) shares its parents' config: they are restored with it (class, config,
    attention implementation), since the settings they would keep describe layers that no longer exist. ``model``
    may also be any module holding patched models (a user's wrapper): every model inside it is restored.

    Raises:
        ValueError: a parent sharing the config still has neural layers outside ``model``; unpatch the parent.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"unpatch_model expects a model (an nn.Module), got {type(model).__name__}.")
    config = model.__dict__.get("config")
    holders, others = _other_config_holders(model) if isinstance(config, PretrainedConfig) else ([], [])
    inside_parents = {id(module) for parent in holders for module in parent.modules()}  # checked with the parents
    others = [other for other in others if id(other) not in inside_parents]
    if others:  # another model built from the same config object keeps its neural layers, and so its config
        if holders:
            raise ValueError(
                f"{type(model).__name__}'s config object is held by its parent {type(holders[0]).__name__} and by "
                f"{len(others)} other module(s) (e.g. {type(others[0]).__name__}); unpatching would strip their "
                "settings too. Give the model a config of its own first (copy.deepcopy), or unpatch the parent "
                "(nothing was changed)."
            )
        _give_model_its_own_config(model)
        config = model.config
    parents = [parent for parent in holders if parent.__dict__.get("config") is config]
    inside = {id(module) for module in model.modules()}
    for parent in parents:
        if any(id(module) not in inside and getattr(module, SCORER_ATTRIBUTE, None) is not None
               for module in parent.modules()):  # fmt: skip
            raise ValueError(
                f"{type(parent).__name__}, which shares this {type(model).__name__}'s config, has neural layers "
                f"outside it; unpatch_model({type(parent).__name__}) instead (nothing was changed)."
            )
    modules = find_attention_modules(model)
    # each model goes back to its own fallback (a wrapper may hold a GPT-2 on eager beside a Llama on sdpa); a model
    # never patched has none and keeps its implementation
    fallbacks = {id(module): getattr(module, FALLBACK_ATTRIBUTE) for _, module in modules
                 if hasattr(module, FALLBACK_ATTRIBUTE)}  # fmt: skip
    attention_ids = {id(module) for _, module in modules}
    for _, module in modules + find_other_attention_modules(model):
        if getattr(module, SCORER_ATTRIBUTE, None) is not None:
            delattr(module, SCORER_ATTRIBUTE)
        if hasattr(module, FALLBACK_ATTRIBUTE):
            delattr(module, FALLBACK_ATTRIBUTE)
    # every (sub-)model of the tree and its parents: a sub-model may have been patched on its own (model.transformer)
    cleared: set[int] = set()
    for module in [module for holder in [*parents, model] for module in holder.modules()]:
        for key, hook in list(module._forward_pre_hooks.items()):
            if is_keep_neural_attention_hook(hook):
                del module._forward_pre_hooks[key]
        held = module.__dict__.get("config")
        if isinstance(held, PretrainedConfig) and id(held) not in cleared:
            clear_from_config(held)
            cleared.add(id(held))
    outermost_first = sorted(parents, key=lambda parent: -sum(1 for _ in parent.modules()))
    # model.modules() too (outermost first): a plain nn.Module wrapping a patched model has no class of its own
    for holder in [*outermost_first, *model.modules()]:
        restore_stock_class(holder)
    for holder in [*outermost_first, model]:
        # outermost first: its switch reaches the sub-configs; a sub-model whose layers kept another implementation
        # (a composite's towers) is switched back after it
        for module in holder.modules():
            if not isinstance(module, PreTrainedModel):
                continue
            layers = [id(inner) for inner in module.modules() if id(inner) in attention_ids]
            own = [fallbacks[layer] for layer in layers if layer in fallbacks]
            current = _current_implementation(module)
            if current == ATTENTION_NAME:  # "sdpa" where no layer says: a stock class built from a patched config
                module.set_attn_implementation(own[0] if own else "sdpa")
            elif len(own) == len(layers) and len(set(own)) == 1 and current != own[0]:
                # a tower the composite's switch just moved (all its layers were under the patch); not a composite
                # of which one tower was patched, whose other towers would follow it
                module.set_attn_implementation(own[0])
            # where the towers' fallbacks differ (each gets its own after this), a composite's own value goes back
            # as it was: Llava's follows its language model, not the first tower's own[0]. Where they agree, own[0]
            # stands: it is what a set_attn_implementation after patching asked for
            previous = module.__dict__.pop(PREVIOUS_IMPLEMENTATION_ATTRIBUTE, None)
            if previous is not None and len(set(own)) > 1 and _current_implementation(module) != previous:
                module.config._attn_implementation_internal = previous
    for _, module in modules:  # configs only the layers hold (see _patch)
        held = getattr(module, "config", None)
        if getattr(held, "_attn_implementation", None) == ATTENTION_NAME:
            held._attn_implementation_internal = fallbacks.get(id(module), "sdpa")
    return model


def neural_layers(model: nn.Module) -> list[tuple[int, str]]:
    """``(layer index, module name)`` of every patched layer; names in the transformers model inside
    ``torch.compile``'s or PEFT's wrapper (``unwrap_model``), the model ``patch_model`` patched."""
    return [
        (index, name)
        for index, (name, module) in enumerate(find_attention_modules(unwrap_model(model)))
        if getattr(module, SCORER_ATTRIBUTE, None) is not None
    ]


def required_neural_settings(model: nn.Module) -> tuple[list[int], NeuralAttentionConfig]:
    """``neural_settings(model)``, or ``ValueError`` for a model without neural layers."""
    recorded = neural_settings(model)
    if recorded is None:
        raise ValueError("This model has no neural layers; patch it with patch_model(model, layers=...) first.")
    return recorded


def set_backend(model: nn.Module, backend: str, *, mlp_precision: str | None = None) -> None:
    """Switch the scoring backend of every neural layer, in place (e.g. to compare kernels on one loaded model).

    ``mlp_precision`` (``"fp32"`` / ``"fp16"``, see ``NeuralAttentionConfig``) switches the Triton kernel's
    per-pair arithmetic too; ``None`` keeps it. The scorers and the recorded ``neural_attention_backend`` /
    ``neural_attention_mlp_precision`` fields change together, so ``save_pretrained`` writes what runs. Weights are
    untouched.

    Raises:
        ValueError: the model has no neural layers, or the settings are not valid ``NeuralAttentionConfig`` ones;
            the model is then unchanged.
    """
    model = unwrap_model(model)
    layers, settings = required_neural_settings(model)
    changes = {"backend": backend} if mlp_precision is None else {"backend": backend, "mlp_precision": mlp_precision}
    switched = NeuralAttentionConfig(**{**settings.to_dict(), **changes})
    modules = find_attention_modules(model)
    for index in layers:
        held = getattr(modules[index][1], SCORER_ATTRIBUTE)
        # PEFT's modules_to_save wraps the scorer with its copies: each must switch, or the one merge_and_unload
        # keeps would run the old backend under a config naming the new one (which save_pretrained refuses)
        for scorer in {held, *(module for module in held.modules() if isinstance(module, NeuralScorer))}:
            scorer.settings = switched
    record_on_config(model.config, layers, switched)


def scorer_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every scorer parameter of ``model``, by its name in ``model.named_parameters()``
    (``transformer.h.0.attn.neural_scorer.hidden_weight``): for an optimizer's parameter groups, or to count them.

    Inside a PEFT wrapper with ``modules_to_save=["neural_scorer"]`` both the frozen original and the trained copy are
    listed. ``save_neural_adapter`` stores only the scorers that run, named relative to the bare model.
    """
    names = set(scorer_state_names(model))
    return {name: p for name, p in model.named_parameters() if name in names}
