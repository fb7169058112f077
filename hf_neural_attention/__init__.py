"""hf-neural-attention: Neural Attention (DiGiugno & Mahmood, arXiv 2502.17206) for Hugging Face Transformers.

Importing the package registers the ``"neural_attention"`` attention implementation (function and mask builder),
registers the Hub config/model classes with transformers' Auto classes (so checkpoints load without
``trust_remote_code``) and installs the model-card writer used by ``save_pretrained``/``push_to_hub``.
"""

import sys

import transformers
from transformers import AutoConfig

from . import modeling_neural_attention as _modeling
from .adapters import load_neural_adapter, save_neural_adapter
from .backend_neural_attention import ATTENTION_NAME, neural_attention_forward
from .configuration_neural_attention import (
    PACKAGE_VERSION,
    NeuralAttentionConfig,
    NeuralAttentionGPT2Config,
    NeuralAttentionViTConfig,
)
from .hub_classes import adopt_hub_class, hub_class_for, restore_stock_class
from .model_card import build_model_card, write_model_card
from .modeling_neural_attention import (
    NeuralAttentionGPT2ForCausalLM,
    NeuralAttentionGPT2ForSequenceClassification,
    NeuralAttentionGPT2Model,
    NeuralAttentionViTForImageClassification,
    NeuralAttentionViTModel,
)
from .patching import (
    find_attention_modules,
    neural_layers,
    patch_model,
    scorer_parameters,
    set_backend,
    unpatch_model,
)
from .scoring_neural_attention import NeuralScorer
from .trainer import NeuralAttentionTrainer

__version__ = PACKAGE_VERSION


def _register_auto_classes() -> None:
    """Make ``AutoConfig``/``AutoModelFor...`` resolve our model types (idempotent)."""
    for config_class, heads in _modeling._AUTO_MAP_FOR.items():
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        for auto_name, model_class in heads.items():
            getattr(transformers, auto_name).register(config_class, model_class, exist_ok=True)


def _register_model_card_writer() -> None:
    """Give ``save_pretrained`` our card writer: in our modeling file, and in the copies of it that remote code loaded
    before this import (``transformers_modules.<checkpoint>.modeling_neural_attention``), whose models are Hub-class
    models all the same and would otherwise save without a card."""
    for name, module in list(sys.modules.items()):
        remote_copy = name.startswith("transformers_modules.") and name.endswith(".modeling_neural_attention")
        if module is _modeling or (remote_copy and hasattr(module, "register_model_card_writer")):
            module.register_model_card_writer(write_model_card)


_register_auto_classes()
_register_model_card_writer()

__all__ = [
    "ATTENTION_NAME",
    "NeuralAttentionConfig",
    "NeuralAttentionGPT2Config",
    "NeuralAttentionGPT2ForCausalLM",
    "NeuralAttentionGPT2ForSequenceClassification",
    "NeuralAttentionGPT2Model",
    "NeuralAttentionTrainer",
    "NeuralAttentionViTConfig",
    "NeuralAttentionViTForImageClassification",
    "NeuralAttentionViTModel",
    "NeuralScorer",
    "__version__",
    "adopt_hub_class",
    "build_model_card",
    "find_attention_modules",
    "hub_class_for",
    "load_neural_adapter",
    "neural_attention_forward",
    "neural_layers",
    "patch_model",
    "restore_stock_class",
    "save_neural_adapter",
    "scorer_parameters",
    "set_backend",
    "unpatch_model",
    "write_model_card",
]
