"""Hub model classes: GPT-2 and ViT whose chosen self-attention layers score query/key pairs neurally.

``NeuralAttentionGPT2ForCausalLM``, ``NeuralAttentionGPT2ForSequenceClassification``,
``NeuralAttentionViTForImageClassification`` and the bare ``NeuralAttentionGPT2Model`` / ``NeuralAttentionViTModel`` are
the stock classes plus one ``NeuralScorer`` per layer named by ``config.neural_attention_layers``. Every way of
building them ends with the scorers in place and the model on the ``"neural_attention"`` implementation: ``__init__``
from a config, ``from_pretrained`` of one of our checkpoints or of a plain GPT-2/ViT checkpoint (scorers freshly
initialised, pretrained weights untouched), ``from_config``.

This file travels with Hub checkpoints (``trust_remote_code``): it imports only torch, transformers and flat
siblings, so a reader without hf-neural-attention installed can load the model.
"""

import inspect
import os
from collections.abc import Callable
from functools import cache
from typing import Any

import torch
import transformers
from torch import nn
from transformers import (
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    GPT2Model,
    PreTrainedModel,
    ViTForImageClassification,
    ViTModel,
)

from .backend_neural_attention import ATTENTION_NAME, FALLBACK_ATTRIBUTE, SCORER_ATTRIBUTE
from .configuration_neural_attention import (
    CONFIG_PREFIX,
    FALLBACK_CONFIG_ATTRIBUTE,
    KERNEL_CHOICES,
    PACKAGE_VERSION,
    NeuralAttentionGPT2Config,
    NeuralAttentionViTConfig,
    check_setting_names,
    read_from_config,
)
from .scoring_neural_attention import NeuralScorer

FALLBACK_IMPLEMENTATIONS = ("sdpa", "eager")
"""Implementations a neural model may be asked for: they become the fallback of its unpatched layers."""

ModelCardWriter = Callable[..., Any]
_model_card_writer: ModelCardWriter | None = None


def register_model_card_writer(writer: ModelCardWriter | None) -> None:
    """Install the function ``save_pretrained``/``push_to_hub`` call to write README.md (hf-neural-attention does this
    on import; a reader without the package saves without a card)."""
    global _model_card_writer
    _model_card_writer = writer


# --- finding and equipping the self-attention layers (hf_neural_attention.patching uses these too) --------------
@cache
def _goes_through_attention_interface(cls: type) -> bool:
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    return "ALL_ATTENTION_FUNCTIONS" in source


# module names of cross-attention (BERT/GPT-2 crossattention, Whisper/BART encoder_attn, T5-family EncDecAttention)
_CROSS_ATTENTION_NAMES = ("crossattention", "cross_attention", "cross_attn", "encoder_attn", "encdecattention")


def _is_cross_attention(name: str, module: nn.Module) -> bool:
    if getattr(module, "is_cross_attention", False):
        return True
    lowered = name.lower()
    return any(part in lowered for part in _CROSS_ATTENTION_NAMES)


@cache
def _attends_over_depth(cls: type) -> bool:
    """Attention over each token's stacked layer outputs (Inkling 2's attention residuals, ``forward(block_states,
    ...)``): its sequence is the layers and its one head the hidden size, not a self-attention over tokens."""
    try:
        parameters = list(inspect.signature(cls.forward).parameters)
    except (TypeError, ValueError):
        return False
    return parameters[1:2] == ["block_states"]


def _is_self_attention(name: str, module: nn.Module) -> bool:
    return not _is_cross_attention(name, module) and not _attends_over_depth(type(module))


def find_self_attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Self-attention modules on transformers' attention interface, in layer order; index = layer number."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if _goes_through_attention_interface(type(module)) and _is_self_attention(name, module)
    ]


def find_other_attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The other modules on transformers' attention interface (cross-attention, attention over layer outputs): never
    patched, but once their model is switched to the neural attention function they dispatch through it, to the
    fallback they record."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if _goes_through_attention_interface(type(module)) and not _is_self_attention(name, module)
    ]


def head_shape(module: nn.Module, model_config: Any) -> tuple[int, int]:
    """``(head_dim, num_query_heads)`` of an attention module."""
    num_heads = (
        getattr(module, "num_heads", None)
        or getattr(module, "num_attention_heads", None)
        or getattr(getattr(module, "config", None), "num_attention_heads", None)
        or getattr(model_config, "num_attention_heads", None)
    )
    # qk_head_dim first: under multi-head latent attention (DeepSeek-V2/V3, ...) head_dim is the value's or the
    # rotary part's size, not the queries' and keys'
    head_dim = (getattr(module, "qk_head_dim", None) or getattr(module, "head_dim", None)
                or getattr(module, "attention_head_size", None))
    if head_dim is None and num_heads:
        hidden = getattr(model_config, "hidden_size", None)
        head_dim = hidden // num_heads if hidden else None
    if not head_dim or not num_heads:
        raise ValueError(f"Cannot tell the head shape of {type(module).__name__} (no head_dim/num_heads).")
    return int(head_dim), int(num_heads)


def build_scorer(module: nn.Module, model: nn.Module, settings: Any) -> NeuralScorer:
    """A fresh scorer for the self-attention ``module`` of ``model``: its head shape, ``settings`` (a
    ``NeuralAttentionConfig``), on the module's device and compute dtype (``scorer_placement``)."""
    head_dim, num_heads = head_shape(module, model.config)
    return NeuralScorer(head_dim, num_heads, settings).to(**scorer_placement(module, model))


def neural_settings(model: nn.Module) -> tuple[list[int], Any] | None:
    """``(patched layer indices, their shared settings)`` as the modules carry them, or ``None`` when no layer
    carries a scorer (whatever ``neural_attention_*`` fields the config may still hold)."""
    scorers = [(index, getattr(module, SCORER_ATTRIBUTE, None)) for index, (_, module)
               in enumerate(find_self_attention_modules(model))]  # fmt: skip
    layers = [index for index, scorer in scorers if scorer is not None]
    if not layers:
        return None
    return layers, scorers[layers[0]][1].settings


def scorer_placement(module: nn.Module, model: nn.Module) -> dict[str, Any]:
    """``device`` and ``dtype`` for the scorer of an attention module: its parameters' device, and the dtype of its
    first 16-bit-or-wider floating parameter. Quantized projections (bitsandbytes' uint8, fp8 checkpoints) are
    storage, not a compute dtype: the model's first such parameter, else torch's default dtype, is taken instead.

    A module whose weights accelerate offloads (``device_map`` with ``"cpu"`` / ``"disk"``) holds them on the meta
    device between calls: its scorer is placed, with real weights, where its hook runs it (``execution_device``).
    """
    first = next(module.parameters(), None)
    placement = {"device": first.device} if first is not None else {}
    if first is not None and first.device.type == "meta":
        hook = getattr(module, "_hf_hook", None)
        if getattr(hook, "execution_device", None) is not None:
            placement = {"device": torch.device(hook.execution_device)}
    for parameters in (module.parameters(), model.parameters()):
        computable = next((p for p in parameters if p.is_floating_point() and p.element_size() >= 2), None)
        if computable is not None:
            return {**placement, "dtype": computable.dtype}
    return {**placement, "dtype": torch.get_default_dtype()}


def attach_scorers(model: PreTrainedModel, fallback: str) -> None:
    """Give every layer named by ``model.config`` a ``NeuralScorer`` and put the model on ``"neural_attention"``.

    Layers that already carry a scorer keep it. Works on the meta device (``from_pretrained``): scorers are then
    created empty and initialised or loaded by transformers afterwards.

    Raises:
        ValueError: the config records no neural layers, or names layers the model does not have. Checked before
            anything is modified.
    """
    recorded = read_from_config(model.config)
    if recorded is None:
        raise ValueError(
            f"{type(model).__name__} needs config.neural_attention_layers (e.g. [0]); build its config with "
            f"{type(model).config_class.__name__}(..., neural_attention_layers=[0]), or patch a stock model "
            "with patch_model."
        )
    layers, settings = recorded
    if sorted(set(layers)) != list(layers):  # from_pretrained's keyword arguments reach the config unvalidated
        raise ValueError(f"config.neural_attention_layers must be sorted and without repeats, got {layers}; pass "
                         f"{sorted(set(layers))}.")
    modules = find_self_attention_modules(model)
    bad = [i for i in layers if not 0 <= i < len(modules)]
    if bad:
        raise ValueError(
            f"config.neural_attention_layers={layers} names layers {bad} that this model does not have: it has "
            f"{len(modules)} self-attention layers (valid indices 0..{len(modules) - 1}). Fix the config."
        )
    for index in layers:
        module = modules[index][1]
        if getattr(module, SCORER_ATTRIBUTE, None) is not None:
            continue
        setattr(module, SCORER_ATTRIBUTE, build_scorer(module, model, settings))
    set_fallback(model, fallback)
    model.config._attn_implementation_internal = ATTENTION_NAME
    name_fallbacks(model)
    # a stock parent's or sub-model's set_attn_implementation("sdpa") would otherwise route past the scorers
    register_keep_neural_attention_hook(model)


def set_fallback(model: nn.Module, fallback: str) -> None:
    """Set the implementation the model's unpatched layers use (``"sdpa"`` or ``"eager"``), cross-attention too."""
    for _, module in find_self_attention_modules(model) + find_other_attention_modules(model):
        setattr(module, FALLBACK_ATTRIBUTE, fallback)


def _model_owners(model: nn.Module) -> list[tuple[str, PreTrainedModel]]:
    """``(prefix, sub-model)`` of every ``PreTrainedModel`` in ``model`` (itself included), outermost first."""
    return [(prefix, sub) for prefix, sub in model.named_modules() if isinstance(sub, PreTrainedModel)]


def _is_within(name: str, prefix: str) -> bool:
    """Whether the module named ``name`` lies inside the one named ``prefix`` (``""`` is the root)."""
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


def _innermost_owner(name: str, owners: list[tuple[str, PreTrainedModel]]) -> tuple[str, PreTrainedModel] | None:
    """The innermost of ``owners`` (from :func:`_model_owners`) holding the module named ``name``, or ``None``."""
    found = None
    for prefix, sub in owners:  # outermost first, so the last that holds it
        if _is_within(name, prefix):
            found = (prefix, sub)
    return found


def keep_neural_attention(model: nn.Module, attn_implementation: str | dict | None) -> None:
    """Apply an ``attn_implementation`` request to a model with neural layers without dropping them.

    ``"sdpa"`` / ``"eager"`` become what the unpatched layers use; the model stays on ``"neural_attention"``.

    Raises:
        ValueError: for flash/flex/paged or other kernels, which would bypass the scorer.
    """
    requested = attn_implementation.get("") if isinstance(attn_implementation, dict) else attn_implementation
    fallback = _requested_fallback(requested)
    if requested in FALLBACK_IMPLEMENTATIONS:
        # each (sub-)model as the stock call left it: a dict request sets a composite's towers apart (vision on
        # eager, language model on sdpa), and each attention module takes its innermost model's. The attention
        # modules of a patched model all carry the attribute: no walk through their source code, so the patch's
        # forward pre-hook can call this under torch.compile
        owners = _model_owners(model)
        for name, module in model.named_modules():
            if hasattr(module, FALLBACK_ATTRIBUTE):
                owner = _innermost_owner(name, owners)
                own = owner[1].config._attn_implementation if owner is not None else None
                setattr(module, FALLBACK_ATTRIBUTE, own if own in FALLBACK_IMPLEMENTATIONS else fallback)
        # a sub-model's config of its own (T5's decoder stack) was switched too: left there, its layers ran the
        # stock kernel on masks generate built for the model's implementation (a static cache's bool mask, added
        # to eager's scores as 0 / 1)
        for _, sub in owners:
            if sub.config._attn_implementation in FALLBACK_IMPLEMENTATIONS:
                sub.config._attn_implementation_internal = ATTENTION_NAME
    model.config._attn_implementation_internal = ATTENTION_NAME
    name_fallbacks(model)


def name_fallbacks(model: nn.Module) -> None:
    """Record on every config in ``model`` that is on ``"neural_attention"`` its layers' fallback
    (``FALLBACK_CONFIG_ATTRIBUTE``), which decides the mask transformers builds under that config: eager's additive
    one or SDPA's.

    A (sub-)model's config takes the fallback of the attention modules it is the innermost model of, else of the
    first one inside it (a composite's); a config only layers hold (``EncoderDecoderModel``'s encoder layers), theirs.
    """
    # no dict keyed by id(config): inside a compiled graph (the patch's hook after a stock switch) torch 2.9 gives
    # other ids, and every config fell back to "sdpa"
    owners = _model_owners(model)
    layers = [(name, module) for name, module in model.named_modules() if hasattr(module, FALLBACK_ATTRIBUTE)]
    innermost = []  # each layer's innermost model, found once (a loop: dynamo cannot trace := in a comprehension)
    for name, _ in layers:
        owner = _innermost_owner(name, owners)
        innermost.append(owner[0] if owner is not None else None)
    for prefix, sub in owners:  # outermost first: an inner model sharing the config (llama.model) has the last word
        within = [(module, inner) for (name, module), inner in zip(layers, innermost, strict=True)
                  if _is_within(name, prefix)]  # fmt: skip
        own = [module for module, inner in within if inner == prefix] or [module for module, _ in within]
        if sub.config._attn_implementation == ATTENTION_NAME:
            setattr(sub.config, FALLBACK_CONFIG_ATTRIBUTE, getattr(own[0], FALLBACK_ATTRIBUTE) if own else "sdpa")
    for _, module in layers:  # a config only layers hold (EncoderDecoderModel's encoder layers)
        held = getattr(module, "config", None)
        if getattr(held, "_attn_implementation", None) == ATTENTION_NAME and not any(
                held is sub.config for _, sub in owners):
            setattr(held, FALLBACK_CONFIG_ATTRIBUTE, getattr(module, FALLBACK_ATTRIBUTE))


def _keep_neural_attention_hook(model: nn.Module, args: tuple) -> None:
    """Forward pre-hook of a patched model: a stock ``set_attn_implementation("sdpa" | "eager")`` -- on a model
    without a Hub class (Llama, BERT), on a parent sharing the config, or on a sub-model -- would route
    every layer past its scorer; the request is applied to the unpatched layers instead and the model switched back
    (flash / flex kernels raise ``ValueError``). Runs on every forward: the common path is one attribute read, and
    nothing in it stops torch.compile."""
    current = model.config._attn_implementation
    if current == ATTENTION_NAME:
        return
    if any(getattr(module, SCORER_ATTRIBUTE, None) is not None for module in model.modules()):  # not unpatched since
        keep_neural_attention(model, current)


def register_keep_neural_attention_hook(model: nn.Module) -> None:
    """Register :func:`_keep_neural_attention_hook` once on ``model`` and on every model inside it that holds neural
    layers (``patch_model`` and every Hub-class build): a sub-model (``llama.model``) may be called on its own after
    a stock ``set_attn_implementation`` on its parent. A sub-model without scorers (a composite's unpatched vision
    tower) gets none: its hook would search it for scorers on every forward."""
    for module in model.modules():
        if module is model or (isinstance(module, PreTrainedModel) and any(
                getattr(inner, SCORER_ATTRIBUTE, None) is not None for inner in module.modules())):
            if not any(is_keep_neural_attention_hook(hook) for hook in module._forward_pre_hooks.values()):
                module.register_forward_pre_hook(_keep_neural_attention_hook)


def is_keep_neural_attention_hook(hook: Any) -> bool:
    """Whether ``hook`` is that hook, from this file or from a Hub checkpoint's copy of it (remote code)."""
    return getattr(hook, "__name__", None) == _keep_neural_attention_hook.__name__ and getattr(
        hook, "__module__", "").endswith("modeling_neural_attention")


def _requested_fallback(requested: Any, config: Any = None) -> str:
    """Map an ``attn_implementation`` request onto the fallback of unpatched layers; refuse fused kernels.
    ``"neural_attention"`` keeps the fallback ``config`` records (a Hub class built from a patched model's config)."""
    if isinstance(requested, dict):
        requested = requested.get("")
    if requested == ATTENTION_NAME:
        return getattr(config, FALLBACK_CONFIG_ATTRIBUTE, "sdpa")
    if requested is None:
        return "sdpa"
    if requested in FALLBACK_IMPLEMENTATIONS:
        return requested
    raise ValueError(
        f"attn_implementation={requested!r} would bypass the neural scorer. Neural-attention models run on "
        f"{ATTENTION_NAME!r}: call model.set_attn_implementation('sdpa') (or 'eager'), which chooses what their "
        "unpatched layers use, or unpatch_model (from hf_neural_attention) for a stock model that can run "
        "flash/flex kernels."
    )


def scorer_state_names(model: nn.Module) -> list[str]:
    """State-dict names of every scorer parameter."""
    return [name for name, _ in model.named_parameters() if f".{SCORER_ATTRIBUTE}." in f".{name}"]


# --- the behaviour shared by all Hub classes ------------------------------------------------------------------
class NeuralAttentionModelMixin:
    """Keeps the neural layers in place on every construction path; put first in the bases of a Hub class."""

    _supports_attention_backend = False  # serving engines must not swap in their own attention
    _supports_flash_attn = False
    _supports_flex_attn = False

    def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
        # transformers checks the requested implementation in __init__: hand it the fallback, attach in post_init.
        config._attn_implementation_internal = _requested_fallback(config._attn_implementation, config)
        super().__init__(config, *args, **kwargs)

    def post_init(self) -> None:
        """Attach the scorers before transformers' init walk, so that the walk sees them."""
        attach_scorers(self, _requested_fallback(self.config._attn_implementation, self.config))
        super().post_init()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """transformers' init, then the scorers' own (PyTorch-default ``nn.Linear``) init.

        transformers hands inner models their own ``_init_weights``, which never knows the scorer; its
        ``reset_parameters`` skips tensors flagged as loaded, so a loaded scorer is left untouched.
        """
        super().initialize_weights()
        for module in self.modules():
            if isinstance(module, NeuralScorer):
                module.reset_parameters()

    def set_attn_implementation(self, attn_implementation: str | dict, allow_all_kernels: bool = False) -> None:
        """``"neural_attention"`` keeps things as they are; ``"sdpa"``/``"eager"`` set what unpatched layers use.

        Raises:
            ValueError: for flash/flex/paged or other kernels, which would bypass the scorer.
        """
        keep_neural_attention(self, attn_implementation)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *model_args: Any, **kwargs: Any) -> Any:
        """``PreTrainedModel.from_pretrained`` plus checks of the scorer weights.

        From one of our checkpoints, scorer weights must all be there, match the config and be finite; from a plain
        GPT-2/ViT checkpoint the scorers are initialised fresh and the checkpoint is recorded as the base model.

        With ``ignore_mismatched_sizes=True``, scorer weights whose shape the config (or a ``neural_attention_*``
        setting passed here) changes are initialised afresh, as transformers does for the other weights.

        Raises:
            ValueError: scorer weights missing, unexpected, of other shapes or non-finite in a neural-attention
                checkpoint; a ``neural_attention_*`` keyword that names no setting.
        """
        check_setting_names(kwargs, f"{cls.__name__}.from_pretrained")  # also where a config is passed
        want_info = kwargs.pop("output_loading_info", False)
        try:
            model, info = super().from_pretrained(
                pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
            )
        except RuntimeError as error:  # transformers' refusal of weights whose shapes differ (its report is logged)
            if "ignore_mismatched_sizes" not in str(error):
                raise
            raise ValueError(
                f"Cannot load {pretrained_model_name_or_path!r}: weights in the checkpoint have other shapes than the "
                f"config gives them (a setting passed to from_pretrained, such as num_labels or a {CONFIG_PREFIX}* "
                "one, or an edited config.json; the load report above names the weights). Drop such settings to load "
                "the trained weights, or pass "
                "ignore_mismatched_sizes=True to keep the rest of the checkpoint and start those weights afresh."
            ) from error
        source_type = getattr(model.config, "_neural_attention_source_type", None) or ""
        from_neural_checkpoint = source_type.startswith(CONFIG_PREFIX)
        _offload_fresh_scorers(model)
        _check_loaded_scorers(model, info, pretrained_model_name_or_path, from_neural_checkpoint,
                              fresh_on_mismatch=bool(kwargs.get("ignore_mismatched_sizes")))
        if not from_neural_checkpoint and model.config.neural_attention_base_model is None:
            model.config.neural_attention_base_model = str(pretrained_model_name_or_path)
        return (model, info) if want_info else model

    def save_pretrained(self, save_directory: Any, *args: Any, **kwargs: Any) -> None:
        """``PreTrainedModel.save_pretrained`` plus README.md (when hf-neural-attention is installed).

        A README.md already in the folder that is not a card of ours is kept. With ``push_to_hub=True``
        transformers uploads (from the saving rank, with every saving option); the upload carries the README.md the
        folder ends with, instead of transformers' generic card.

        Raises:
            ValueError: ``config.neural_attention_*`` no longer describes the scorers' weights (edited by hand), or
                scorer weights are non-finite (a diverged run) or absent (meta device): the checkpoint would not
                load as saved. Nothing is written.
        """
        check_config_describes_scorers(self)
        check_scorer_values(self, kwargs.get("state_dict"))
        siblings = _AUTO_MAP_FOR.get(type(self.config), {})
        if siblings and self._auto_class is not None:  # remote code loads any head (or the body) of the checkpoint
            auto_map = getattr(self.config, "auto_map", None) or {}
            self.config.auto_map = {**auto_map, **{auto: f"{cls.__module__.split('.')[-1]}.{cls.__name__}"
                                                   for auto, cls in siblings.items()}}
        readme = os.path.join(os.fspath(save_directory), "README.md")
        # transformers writes its generic card over README.md just before a push: keep what was there to restore
        self._readme_before_push = None
        if kwargs.get("push_to_hub") and _model_card_writer is not None and os.path.isfile(readme):
            with open(readme, encoding="utf-8") as handle:
                self._readme_before_push = handle.read()
        try:
            super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            self._readme_before_push = None
        is_main_process = kwargs.get("is_main_process", args[0] if args else True)
        saves_here = getattr(self, "should_save_on_this_rank", lambda main: main)(is_main_process)
        if _model_card_writer is not None and saves_here and not kwargs.get("push_to_hub"):
            _model_card_writer(self, save_directory)

    def _upload_modified_files(self, working_dir: Any, *args: Any, **kwargs: Any) -> Any:
        """transformers' upload step (``push_to_hub``, ``save_pretrained(push_to_hub=True)``), with the README.md
        it should carry: the folder's own from before the save, else the repository's existing card (which
        transformers fetched, as for a stock model), else our card instead of transformers' generic one. Our own
        cards are renewed; anybody else's is kept (``write_model_card``)."""
        if _model_card_writer is not None:
            readme = os.path.join(os.fspath(working_dir), "README.md")
            previous = getattr(self, "_readme_before_push", None)
            if previous is not None:
                with open(readme, "w", encoding="utf-8") as handle:
                    handle.write(previous)
            elif os.path.isfile(readme):
                with open(readme, encoding="utf-8") as handle:
                    generic = _GENERIC_CARD_TEXT in handle.read()
                if generic:
                    os.remove(readme)
            repo_id = args[0] if args else kwargs.get("repo_id")
            _model_card_writer(self, working_dir, repo_id=repo_id)
        return super()._upload_modified_files(working_dir, *args, **kwargs)

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> Any:
        """``PreTrainedModel.push_to_hub`` whose README.md is our model card (settings, loading, citation).

        Same keyword arguments: ``commit_message``, ``commit_description``, ``private``, ``token``, ``revision``,
        ``create_pr``, ``max_shard_size``, ``tags``. Replaces the repository's README.md.
        """
        if _model_card_writer is None:
            return super().push_to_hub(repo_id, **kwargs)
        unknown = sorted(set(kwargs) - _PUSH_ARGUMENTS)
        if unknown:
            raise TypeError(f"push_to_hub() got unexpected keyword argument(s) {unknown}.")
        return _push_with_card(self, repo_id, _model_card_writer, **kwargs)


def check_config_describes_scorers(model: nn.Module) -> None:
    """Raise ``ValueError`` when ``config.neural_attention_*`` (what a checkpoint records) describes other weights
    than the scorers the layers carry -- a hand-edited field, which would write a checkpoint that does not load as
    saved. Fields compare resolved (``proj_dim=None`` is ``head_dim // 32``); the backend and MLP precision as given
    (a field edited by hand is not what runs: the checkpoint would load onto another kernel, or none)."""
    recorded = read_from_config(model.config)
    layers, carried = neural_settings(model) or ([], None)
    recorded_layers, recorded_settings = recorded if recorded is not None else ([], None)
    problems = [] if list(recorded_layers) == layers else [f"layers {list(recorded_layers)} (scorers in {layers})"]
    if carried is not None and recorded_settings is not None:  # what shapes or uses the weights, resolved
        scorer = getattr(find_self_attention_modules(model)[layers[0]][1], SCORER_ATTRIBUTE)
        actual = NeuralScorer.weight_layout(scorer.settings, scorer.head_dim)
        problems += [f"{name}={value!r} (the scorers have {actual[name]!r})" for name, value
                     in NeuralScorer.weight_layout(recorded_settings, scorer.head_dim).items() if value != actual[name]]
        problems += [f"{name}={getattr(recorded_settings, name)!r} (the scorers run {getattr(scorer.settings, name)!r})"
                     for name in KERNEL_CHOICES
                     if getattr(recorded_settings, name) != getattr(scorer.settings, name)]
    if problems:
        raise ValueError(
            f"config.{CONFIG_PREFIX}* no longer describes the scorers: " + "; ".join(problems) + ". Editing the "
            "config does not rebuild them; restore the field, or use set_backend(model, ...) / unpatch_model and "
            "patch_model from hf_neural_attention. Nothing was saved."
        )


def is_sharded(param: torch.Tensor) -> bool:
    """A parameter whose full value this process does not hold: DeepSpeed ZeRO-3's partition (an empty tensor
    with ``ds_shape``), or FSDP2's DTensor shard."""
    return hasattr(param, "ds_shape") and param.numel() == 0 or hasattr(param, "full_tensor")


def is_offloaded(module: nn.Module) -> bool:
    """Whether accelerate offloads ``module``'s weights (``device_map`` with ``"cpu"`` / ``"disk"``): its own hook
    brings them in around each call, and they are meta tensors between calls."""
    return bool(getattr(getattr(module, "_hf_hook", None), "offload", False))


def check_scorer_values(model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Raise ``ValueError`` where the scorer weights a save would write cannot load: non-finite (``from_pretrained``
    refuses them), or on the meta device (a model built without weights; transformers would fail after writing
    config.json). Values from ``state_dict`` where given (the gathered weights of a sharded model), else from the
    parameters; shards this process does not hold (DeepSpeed ZeRO-3, FSDP2) and accelerate's offloaded weights
    (which transformers saves from their offload) are not read."""
    names = set(scorer_state_names(model))
    if state_dict is not None:
        values = {name: state_dict[name] for name in names if name in state_dict}
    else:
        values = {name: param for name, param in model.named_parameters() if name in names and not is_sharded(param)}
    offloaded = [f"{name}." for name, module in model.named_modules() if is_offloaded(module)]
    meta = sorted(name for name, value in values.items()
                  if value.device.type == "meta" and not any(name.startswith(prefix) for prefix in offloaded))
    non_finite = sorted(name for name, value in values.items() if value.device.type != "meta"
                        and value.is_floating_point() and not torch.isfinite(value.detach()).all())
    if meta:
        raise ValueError(f"Scorer weights {meta} are on the meta device: the model was built without weights. Load "
                         "or initialise them first. Nothing was saved.")
    if non_finite:
        raise ValueError(f"Scorer weights {non_finite} are not finite (a diverged run?): from_pretrained refuses such "
                         "a checkpoint. Save an earlier state of the model. Nothing was saved.")


def _offload_fresh_scorers(model: nn.Module) -> None:
    """Give fresh scorers that accelerate offloads (``device_map`` with ``"disk"``) their initial weights.

    transformers offloads a layer's weights from the checkpoint: where that has no scorer (a plain checkpoint loaded
    into a Hub class) the offload map lacks them, and where the scorer is started afresh
    (``ignore_mismatched_sizes=True`` with other settings) it holds the checkpoint's, of other shapes; the first
    forward (or a save) fails. A fresh scorer's weights (its own init, in the model's dtype) are put into the map's
    in-memory part, where accelerate looks first. Trained weights that fit are left alone."""
    for module in model.modules():
        weights = getattr(getattr(module, "_hf_hook", None), "weights_map", None)
        if not isinstance(module, NeuralScorer) or not is_offloaded(module) or weights is None:
            continue
        loader, prefix = getattr(weights, "dataset", None), getattr(weights, "prefix", "")
        # one read of each entry (a disk-offloaded one is loaded from disk to be looked at)
        missing = [(name, param) for name, param in module.named_parameters(recurse=False)
                   if getattr(weights.get(name), "shape", None) != param.shape]
        if not missing or not isinstance(getattr(loader, "state_dict", None), dict):
            continue
        fresh = NeuralScorer(module.head_dim, module.num_heads, module.settings)
        for name, param in missing:
            loader.state_dict[prefix + name] = getattr(fresh, name).detach().to(param.dtype)
            loader.all_keys.append(prefix + name)


def _check_loaded_scorers(model: nn.Module, info: dict, source: Any, from_neural_checkpoint: bool,
                          fresh_on_mismatch: bool = False) -> None:
    """Raise ``ValueError`` for scorer weights missing, unexpected, of other shapes (unless the caller asked for those
    to start afresh: ``fresh_on_mismatch``) or non-finite after loading."""
    names = set(scorer_state_names(model))
    missing = sorted(k for k in info.get("missing_keys", ()) if k in names)
    unexpected = sorted(k for k in info.get("unexpected_keys", ()) if f".{SCORER_ATTRIBUTE}." in f".{k}")
    mismatched = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys", ())
                        if f".{SCORER_ATTRIBUTE}." in f".{k[0] if isinstance(k, tuple) else k}")
    problems = []
    # some scorer weights but not all: a broken neural checkpoint, whatever config the caller passed
    if missing and (from_neural_checkpoint or len(missing) < len(names)):
        problems.append(f"scorer weights missing from the checkpoint: {missing} (neural_attention_layers or other "
                        "settings overridden at load, naming scorers the checkpoint does not have? Else the "
                        "checkpoint is incomplete)")
    scorer_prefixes = {name.rsplit(".", 1)[0] for name in names}
    unknown = [k for k in unexpected if k.rsplit(".", 1)[0] in scorer_prefixes]
    if unknown:
        problems.append(f"scorer parameters the configured scorers do not have: {unknown} (settings overridden at "
                        "load, e.g. neural_attention_mode, that differ from the checkpoint's? Else a checkpoint of a "
                        f"newer hf-neural-attention than {PACKAGE_VERSION}: upgrade)")
    if len(unknown) < len(unexpected):
        problems.append("scorer weights for layers the config does not name: "
                        f"{[k for k in unexpected if k not in unknown]}")
    if mismatched and not fresh_on_mismatch:
        problems.append(f"scorer weights whose shapes do not match the config: {mismatched}")
    bad_values = [name for name, p in model.named_parameters()
                  if name in names and p.device.type != "meta" and not torch.isfinite(p).all()]
    if bad_values:
        problems.append(f"non-finite scorer weights: {bad_values}")
    if problems:
        raise ValueError(
            f"Cannot load {source!r} as {type(model).__name__}: " + "; ".join(problems) + ". The checkpoint is "
            "incomplete or does not match its config.json, or settings passed to from_pretrained differ from it; "
            "drop those, re-save it, or start from the base model with "
            "fresh scorers (from_pretrained(base_checkpoint, neural_attention_layers=[...]))."
        )


_GENERIC_CARD_TEXT = "This model card has been automatically generated."
"""In the card transformers writes before a push when the repository has none (``create_and_tag_model_card``)."""

_PUSH_ARGUMENTS = {"commit_message", "commit_description", "private", "token", "revision", "create_pr",
                   "max_shard_size", "tags"}


def _push_with_card(model: PreTrainedModel, repo_id: str, writer: ModelCardWriter, **kwargs: Any) -> Any:
    """What ``PushToHubMixin.push_to_hub`` does, with our README.md instead of the generic one."""
    import tempfile

    from huggingface_hub import HfApi

    check_config_describes_scorers(model)  # before the repository is created: a refused push leaves nothing behind
    check_scorer_values(model)
    tags = kwargs.pop("tags", None)
    if tags:
        model.add_model_tags(tags)
    token = kwargs.get("token")
    repo_id = HfApi().create_repo(repo_id, private=kwargs.get("private"), token=token, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as work_dir:
        model.save_pretrained(work_dir, max_shard_size=kwargs.get("max_shard_size", "50GB"))
        writer(model, work_dir, repo_id=repo_id)
        return model._upload_modified_files(  # the one network call besides create_repo
            work_dir,
            repo_id,
            files_timestamps={},
            commit_message=kwargs.get("commit_message"),
            token=token,
            create_pr=kwargs.get("create_pr", False),
            revision=kwargs.get("revision"),
            commit_description=kwargs.get("commit_description"),
        )


# --- the classes ----------------------------------------------------------------------------------------------
class NeuralAttentionGPT2ForCausalLM(NeuralAttentionModelMixin, GPT2LMHeadModel):
    """GPT-2 language model with neural attention in ``config.neural_attention_layers``."""

    config_class = NeuralAttentionGPT2Config


class NeuralAttentionGPT2ForSequenceClassification(NeuralAttentionModelMixin, GPT2ForSequenceClassification):
    """GPT-2 sequence classifier with neural attention in ``config.neural_attention_layers``."""

    config_class = NeuralAttentionGPT2Config


class NeuralAttentionViTForImageClassification(NeuralAttentionModelMixin, ViTForImageClassification):
    """ViT image classifier with neural attention in ``config.neural_attention_layers``."""

    config_class = NeuralAttentionViTConfig


class NeuralAttentionGPT2Model(NeuralAttentionModelMixin, GPT2Model):
    """The bare GPT-2 (hidden states; ``AutoModel``, feature extraction) with neural attention in
    ``config.neural_attention_layers``; loads the body of any neural GPT-2 checkpoint."""

    config_class = NeuralAttentionGPT2Config


class NeuralAttentionViTModel(NeuralAttentionModelMixin, ViTModel):
    """The bare ViT (patch features; ``AutoModel``, backbones) with neural attention in
    ``config.neural_attention_layers``; loads the body of any neural ViT checkpoint."""

    config_class = NeuralAttentionViTConfig


def _share_stock_weight_renaming(hub_class: type, stock_class: type) -> None:
    """Give ``hub_class`` the checkpoint key renaming transformers keeps for ``stock_class`` by class name.

    transformers (5.20+) renames legacy ViT keys (``encoder.layer.0.attention.attention.query``) to its current layout
    (``layers.0.attention.q_proj``) by looking up the class name ``ViTModel``: a ViT head finds it through its ``vit``
    sub-model, but the bare ``NeuralAttentionViTModel`` is the root and has another name. Registering it also covers
    the remote-code copy of the class (transformers applies user-registered mappings to custom code).
    """
    try:
        from transformers.conversion_mapping import (
            get_checkpoint_conversion_mapping,
            register_checkpoint_conversion_mapping,
        )
    except ImportError:  # a transformers without conversion mappings has no renaming to share
        return
    mapping = get_checkpoint_conversion_mapping(stock_class.__name__)
    if mapping is not None:
        register_checkpoint_conversion_mapping(hub_class.__name__, mapping, overwrite=True)


_share_stock_weight_renaming(NeuralAttentionViTModel, ViTModel)

# what each Auto class loads from a checkpoint of any head or of the bare model (save_pretrained writes them into
# auto_map for remote code, as the installed plugin registers them): a GPT-2 LM checkpoint gives a classifier, a ViT
# classifier checkpoint a backbone, and the other way round
_AUTO_MAP_FOR = {
    NeuralAttentionGPT2Config: {
        "AutoModel": NeuralAttentionGPT2Model,
        "AutoModelForCausalLM": NeuralAttentionGPT2ForCausalLM,
        "AutoModelForSequenceClassification": NeuralAttentionGPT2ForSequenceClassification,
    },
    NeuralAttentionViTConfig: {
        "AutoModel": NeuralAttentionViTModel,
        "AutoModelForImageClassification": NeuralAttentionViTForImageClassification,
    },
}


def _name_in_task_tables(auto_name: str, config_class: type, model_class: type) -> None:
    """Enter ``model_class``'s name in the table of model names behind the Auto class ``auto_name``
    (``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``, ...), where transformers looks up what kind of model a class is:
    Trainer's label smoothing shifts the labels only for a name in the causal-LM table (unshifted, a neural arm
    learnt to copy its input while the stock arm predicted the next token), and pipelines log an error for a name
    outside their task's table. Registering with the Auto class does not reach those tables."""
    mapping = getattr(getattr(transformers, auto_name, None), "_model_mapping", None)
    names = getattr(mapping, "_model_mapping", None)  # the OrderedDict model_type -> class name
    if isinstance(names, dict):
        names.setdefault(config_class.model_type, model_class.__name__)


for _config_class, _heads in _AUTO_MAP_FOR.items():
    _config_class.register_for_auto_class()
    for _auto_name, _model_class in _heads.items():
        _model_class.register_for_auto_class(_auto_name)
        _name_in_task_tables(_auto_name, _config_class, _model_class)
