"""hf-neural-attention: Neural Attention (DiGiugno & Mahmood, arXiv 2502.17206) for Hugging Face Transformers.

Importing the package registers the ``"neural_attention"`` attention implementation (function and mask builder).
"""

from .backend_neural_attention import ATTENTION_NAME, neural_attention_forward
from .configuration_neural_attention import NeuralAttentionConfig
from .patching import find_attention_modules, neural_layers, patch_model, scorer_parameters, unpatch_model
from .scoring_neural_attention import NeuralScorer

__version__ = "0.1.0"

__all__ = [
    "ATTENTION_NAME",
    "NeuralAttentionConfig",
    "NeuralScorer",
    "find_attention_modules",
    "neural_attention_forward",
    "neural_layers",
    "patch_model",
    "scorer_parameters",
    "unpatch_model",
]
