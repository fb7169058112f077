"""Switch a patched stock model instance to its Hub class and back, in place.

``patch_model`` calls ``adopt_hub_class`` so that a patched ``GPT2LMHeadModel`` *is* a
``NeuralAttentionGPT2ForCausalLM`` (and its config a ``NeuralAttentionGPT2Config``): ``save_pretrained`` and
``push_to_hub`` then write ``model_type: neural_attention_gpt2``, ``auto_map`` and the code files. ``unpatch_model``
calls ``restore_stock_class``. Classes without a Hub class (Llama, BERT, subclasses of the stock classes, ...) keep
their class; ``save_neural_adapter`` covers those.
"""

from torch import nn
from transformers import (
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    GPT2Model,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
)

from .configuration_neural_attention import PACKAGE_VERSION, NeuralAttentionGPT2Config, NeuralAttentionViTConfig
from .modeling_neural_attention import (
    NeuralAttentionGPT2ForCausalLM,
    NeuralAttentionGPT2ForSequenceClassification,
    NeuralAttentionGPT2Model,
    NeuralAttentionViTForImageClassification,
    NeuralAttentionViTModel,
)

HUB_CLASS_FOR: dict[type, type] = {
    GPT2LMHeadModel: NeuralAttentionGPT2ForCausalLM,
    GPT2ForSequenceClassification: NeuralAttentionGPT2ForSequenceClassification,
    GPT2Model: NeuralAttentionGPT2Model,
    ViTForImageClassification: NeuralAttentionViTForImageClassification,
    ViTModel: NeuralAttentionViTModel,
}
STOCK_CLASS_FOR: dict[type, type] = {hub: stock for stock, hub in HUB_CLASS_FOR.items()}
STOCK_CLASS_BY_NAME: dict[str, str] = {hub.__name__: stock.__name__ for stock, hub in HUB_CLASS_FOR.items()}
HUB_CONFIG_FOR: dict[type, type] = {GPT2Config: NeuralAttentionGPT2Config, ViTConfig: NeuralAttentionViTConfig}
STOCK_CONFIG_FOR: dict[type, type] = {hub: stock for stock, hub in HUB_CONFIG_FOR.items()}

# a checkpoint's remote code defines its own copies of our classes (in transformers_modules.<repo>.
# modeling_neural_attention): a model loaded that way before the plugin is imported is one of ours all the same
_OUR_FILES = (".modeling_neural_attention", ".configuration_neural_attention")
_OURS_BY_NAME: dict[str, type] = {cls.__name__: cls for cls in [*STOCK_CLASS_FOR, *STOCK_CONFIG_FOR]}

_STASH = "_neural_attention_stock_model_type"
"""Where an instance-level ``model_type`` (set by transformers when a config is read from a file) waits while
the config wears the Hub class, whose class-level ``model_type`` must show through."""
_HUB_ONLY_FIELDS = ("neural_attention_base_model", "neural_attention_version", "_neural_attention_source_type")


def hub_class_for(model_class: type) -> type | None:
    """The Hub class of a stock model class, or ``None``."""
    return HUB_CLASS_FOR.get(model_class)


def _canonical(cls: type) -> type:
    """Our class for a remote-code copy of it (same name, from a file of the same name), else ``cls``."""
    if cls.__module__.endswith(_OUR_FILES):
        return _OURS_BY_NAME.get(cls.__name__, cls)
    return cls


def stock_class_of(model_class: type) -> type | None:
    """The stock class of a Hub class (or of a remote-code copy of one), or ``None`` for any other class."""
    return STOCK_CLASS_FOR.get(_canonical(model_class))


def is_hub_class(model_class: type) -> bool:
    """Whether ``model_class`` is one of the Hub classes (the plugin's or a checkpoint's remote-code copy)."""
    return stock_class_of(model_class) is not None


def adopt_hub_class(model: nn.Module) -> bool:
    """Switch a patched stock model (and its config) to the Hub classes, in place.

    Returns:
        Whether the model was switched (``False`` for classes without a Hub class, or already switched).
    """
    if any(is_hub_class(cls) for cls in type(model).__mro__):  # a Hub class, or a user's subclass of one
        return False
    hub_class = HUB_CLASS_FOR.get(type(model))
    config = getattr(model, "config", None)
    # a stock class may hold a Hub config, built from one (GPT2LMHeadModel(patched.config)): it saves only as the
    # Hub class its config names (a stock class without one, GPT2DoubleHeadsModel, as a stock config)
    is_hub_config = _canonical(type(config)) in STOCK_CONFIG_FOR
    if hub_class is None and is_hub_config:
        _restore_stock_config(config)
    hub_config = type(config) if is_hub_config else HUB_CONFIG_FOR.get(type(config))
    if hub_class is None or hub_config is None:
        return False
    if not is_hub_config:
        if "model_type" in config.__dict__:
            stock_type = config.__dict__.pop("model_type")
            object.__setattr__(config, _STASH, stock_type)
        config.__class__ = hub_config
        if config.__dict__.get("architectures"):  # the base checkpoint's: for a config saved on its own, this class
            config.__dict__["architectures"] = [hub_class.__name__]
        name = getattr(config, "_name_or_path", "") or None
        config.neural_attention_base_model = name
    config.neural_attention_version = PACKAGE_VERSION
    model.__class__ = hub_class
    _register_output_capture(model)
    return True


def restore_stock_class(model: nn.Module) -> bool:
    """Undo ``adopt_hub_class`` (also turns a model built as a Hub class into the stock class).

    Expects the ``neural_attention_*`` settings already cleared from the config (``unpatch_model`` does it).

    Returns:
        Whether the model was switched back.
    """
    stock_class = stock_class_of(type(model))
    if stock_class is None:
        return False
    _restore_stock_config(model.config)
    model.__class__ = stock_class
    _register_output_capture(model)
    return True


def _restore_stock_config(config: object) -> None:
    """Turn a Hub config (``NeuralAttentionGPT2Config``) into its stock class in place; others are left alone."""
    stock_config = STOCK_CONFIG_FOR.get(_canonical(type(config)))
    if stock_config is None:
        return
    for name in _HUB_ONLY_FIELDS:
        config.__dict__.pop(name, None)
    if _STASH in config.__dict__:
        config.__dict__["model_type"] = config.__dict__.pop(_STASH)
    _drop_our_auto_map(config)
    if config.__dict__.get("architectures"):
        config.__dict__["architectures"] = [
            STOCK_CLASS_BY_NAME.get(name, name) for name in config.__dict__["architectures"]
        ]
    config.__class__ = stock_config


def _register_output_capture(model: nn.Module) -> None:
    """Let ``output_hidden_states`` / ``output_attentions`` work on a model whose class was switched in place.

    transformers records which outputs a model can capture in a registry keyed by the class's name, filled by
    ``post_init`` when an instance is built; a class an instance was switched to may never have been built, and a bare
    model (``GPT2Model``, ``ViTModel``) then silently returns ``hidden_states=None``.
    """
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
    except ImportError:  # a transformers without the registry captures outputs otherwise
        return
    # dict.__setitem__: the key is the class's str() in every version (5.24 wraps the assignment, 5.20 does not)
    dict.__setitem__(_CAN_RECORD_REGISTRY, str(type(model)), getattr(model, "_can_record_outputs", None))


def _drop_our_auto_map(config: object) -> None:
    """Remove the ``auto_map`` entries ``save_pretrained`` added for our classes (the stock class has none)."""
    auto_map = config.__dict__.get("auto_map")
    if not isinstance(auto_map, dict):
        return
    ours = ("configuration_neural_attention.", "modeling_neural_attention.")
    kept = {key: value for key, value in auto_map.items() if not str(value).startswith(ours)}
    if kept:
        config.__dict__["auto_map"] = kept
    else:
        del config.__dict__["auto_map"]
