"""README.md for neural-attention checkpoints: metadata, settings, how to load, citation.

Installed as the model card writer of the Hub classes when hf-neural-attention is imported, so ``save_pretrained``
and ``push_to_hub`` write it. Not copied with checkpoints.
"""

import logging
import os
import re
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from .configuration_neural_attention import CONFIG_PREFIX, NeuralAttentionConfig, read_from_config
from .hub_classes import is_hub_class, stock_class_of
from .patching import neural_settings, unwrap_model

logger = logging.getLogger(__name__)

TAGS = ["neural-attention", "hf-neural-attention"]
PAPER_ID = "2502.17206"
CITATION = """@article{digiugno2025neural,
  title   = {Neural Attention: A Novel Mechanism for Enhanced Expressive Power in Transformer Models},
  author  = {DiGiugno, Andrew and Mahmood, Ausif},
  journal = {arXiv preprint arXiv:2502.17206},
  year    = {2025}
}"""
_PIPELINE_TAGS = {"ForCausalLM": "text-generation", "ForSequenceClassification": "text-classification",
                  "ForImageClassification": "image-classification"}
_AUTO_CLASSES = {"ForCausalLM": "AutoModelForCausalLM",
                 "ForSequenceClassification": "AutoModelForSequenceClassification",
                 "ForImageClassification": "AutoModelForImageClassification"}


def _hub_id(name: str | None) -> str | None:
    """``name`` if it looks like a Hub repository id (``org/name`` or ``name``), not a local path."""
    if not name or os.path.isabs(name) or name.startswith((".", "~")) or os.path.exists(name) or name.count("/") > 1:
        return None
    return name


def _task_suffix(model: Any) -> str | None:
    return next((suffix for suffix in _PIPELINE_TAGS if type(model).__name__.endswith(suffix)), None)


def _pipeline_tag(model: Any, suffix: str | None) -> str | None:
    """The task of a head (by its class's suffix); a bare single-tower model (GPT-2, ViT, BERT, Llama ``...Model``)
    extracts features of its input. Encoder-decoders (T5) and composite models (CLIP: sub-configs per tower) are not
    tagged: their task is not the bare model's."""
    if suffix is not None:
        return _PIPELINE_TAGS[suffix]
    config = model.config
    if (not type(model).__name__.endswith("Model") or getattr(config, "is_encoder_decoder", False)
            or getattr(config, "sub_configs", None)):
        return None
    return {"input_ids": "feature-extraction", "pixel_values": "image-feature-extraction"}.get(
        getattr(model, "main_input_name", None))


def build_model_card(model: Any, repo_id: str | None = None, peft: bool = False, title: str | None = None
                     ) -> ModelCard:
    """The card of a neural-attention model (Hub class or patched model).

    Args:
        model: the model; its scorers carry the neural layers and settings (read from its config only where no
            layer carries a scorer).
        repo_id: where it is pushed, used in the loading snippets (``"<repo-id>"`` when unknown).
        title: the card's heading when ``repo_id`` is unknown (``write_model_card``: the folder's name); default
            the model's class.
        peft: the checkpoint is a PEFT adapter beside a neural-attention adapter (``NeuralAttentionTrainer`` on a
            PEFT model), not the model's weights.
    """
    # the scorers' own settings: a stock-class model's save never checks its config against them (a hand edit)
    recorded = neural_settings(unwrap_model(model)) or read_from_config(model.config)
    layers, settings = recorded if recorded is not None else ([], NeuralAttentionConfig())
    base_model = _hub_id(getattr(model.config, CONFIG_PREFIX + "base_model", None))
    suffix = _task_suffix(model)
    tags = list(TAGS) + [t for t in (getattr(model, "model_tags", None) or []) if t not in TAGS]
    data = ModelCardData(
        library_name="transformers",
        tags=tags,
        base_model=base_model,
        pipeline_tag=_pipeline_tag(model, suffix),
    )
    repo = repo_id or "<repo-id>"
    rows = "\n".join(f"| `{name}` | `{value!r}` |" for name, value in settings.to_dict().items())
    body = f"""
# {repo_id.split("/")[-1] if repo_id else title or type(model).__name__}

{type(model).__name__} with **Neural Attention** ([arXiv:{PAPER_ID}](https://arxiv.org/abs/{PAPER_ID})): in the
self-attention layers listed below, a small MLP scores every query/key pair instead of the dot product.
{"Fine-tuned from [" + base_model + "](https://huggingface.co/" + base_model + ")." if base_model else ""}

## Neural-attention settings

| setting | value |
|---|---|
| `layers` | `{layers!r}` |
{rows}

## How to load

{_loading_section(model, repo, suffix, peft)}

## Citation

```bibtex
{CITATION}
```
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def _loading_section(model: Any, repo: str, suffix: str | None, peft: bool = False) -> str:
    """How to load the checkpoint: through the Auto classes for a Hub class (remote code without the plugin), else
    through the adapter files that ``NeuralAttentionTrainer`` saves beside the weights; for a PEFT checkpoint, the
    base model patched by the neural adapter, then PEFT's adapter on top."""
    if peft:
        base = _hub_id(getattr(model.config, "_name_or_path", None)) or "<base-model>"
        stock = (stock_class_of(type(model)) or type(model)).__name__
        return f"""This repository holds a PEFT adapter (`adapter_model.safetensors`) and the neural-attention scorers
(`neural_adapter.safetensors`, `neural_adapter_config.json`), not the base model's weights. With hf-neural-attention
and PEFT installed (`pip install hf-neural-attention peft`), patch the base model with the scorers, then put PEFT's
adapter on top:

```python
from huggingface_hub import snapshot_download
from peft import PeftModel
from transformers import {stock}
from hf_neural_attention import load_neural_adapter

model = load_neural_adapter({stock}.from_pretrained("{base}"),
                            snapshot_download("{repo}", allow_patterns=["neural_adapter*"]))
model = PeftModel.from_pretrained(model, "{repo}")
```"""
    if is_hub_class(type(model)):  # a Hub class: its checkpoint rebuilds the neural layers
        auto_class = _AUTO_CLASSES.get(suffix, "AutoModel") if suffix else "AutoModel"
        return f"""Without hf-neural-attention installed (the code ships with the checkpoint):

```python
from transformers import {auto_class}
model = {auto_class}.from_pretrained("{repo}", trust_remote_code=True)
```

With hf-neural-attention installed (`pip install hf-neural-attention`), no remote code needed:

```python
import hf_neural_attention  # registers the classes with the Auto classes
from transformers import {auto_class}
model = {auto_class}.from_pretrained("{repo}")
```"""
    name = type(model).__name__
    return f"""{name} has no neural-attention model class, so `{name}.from_pretrained` alone loads this checkpoint
without its neural layers (it reports their weights as unexpected keys). The scorers also ship as an adapter
(`neural_adapter.safetensors`, `neural_adapter_config.json`); with hf-neural-attention installed
(`pip install hf-neural-attention`):

```python
from huggingface_hub import snapshot_download
from transformers import {name}
from hf_neural_attention import load_neural_adapter

model = load_neural_adapter({name}.from_pretrained("{repo}"),
                            snapshot_download("{repo}", allow_patterns=["neural_adapter*"]))
```"""


def is_our_card(path: str | os.PathLike) -> bool:
    """Whether the README.md at ``path`` is a card this package wrote (tagged ``hf-neural-attention``)."""
    try:
        return "hf-neural-attention" in (ModelCard.load(path).data.tags or [])
    except Exception:  # unreadable metadata: somebody else's file
        return False


def write_model_card(model: Any, save_directory: str | os.PathLike, repo_id: str | None = None) -> Path:
    """Write ``README.md`` into ``save_directory``; returns its path.

    A README.md already there that is not one of our cards (the user's own) is kept, with a warning: stock
    ``save_pretrained`` never touches it either. ``build_model_card(model)`` gives ours to merge by hand.
    """
    path = Path(save_directory) / "README.md"
    if path.is_file() and not is_our_card(path):
        logger.warning("%s is not a model card of hf-neural-attention; kept it (build_model_card(model) gives ours).",
                       path)
        return path
    build_model_card(model, repo_id=repo_id, title=Path(save_directory).resolve().name).save(path)
    return path


def _as_subsection(text: str) -> str:
    """The Trainer's card body without its editor comment and title, headings one level down."""
    lines = re.sub(r"<!--.*?-->", "", text, flags=re.S).strip().splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    return "\n".join("#" + line if line.startswith("#") else line for line in lines).strip()


def merge_training_card(model: Any, readme_path: str | os.PathLike, repo_id: str | None = None,
                        peft: bool = False) -> Path:
    """Fold the card ``Trainer.create_model_card`` wrote at ``readme_path`` into ours, in place.

    Keeps our metadata and sections (settings, how to load, citation) and appends the Trainer's text (results,
    hyper-parameters) under "Training"; metadata only the Trainer knows (datasets, model-index, …) is kept too.
    """
    path = Path(readme_path)
    ours = build_model_card(model, repo_id=repo_id, peft=peft)
    if path.is_file():
        theirs = ModelCard.load(path)
        merged = ours.data.to_dict()
        for key, value in theirs.data.to_dict().items():
            if key == "tags":
                merged["tags"] = list(dict.fromkeys([*(merged.get("tags") or []), *(value or [])]))
            elif merged.get(key) in (None, [], "") and value not in (None, [], ""):
                merged[key] = value
        body = ours.text.rstrip() + "\n\n## Training\n\n" + _as_subsection(theirs.text) + "\n"
        ours = ModelCard(f"---\n{ModelCardData(**merged).to_yaml()}\n---\n{body}")
    ours.save(path)
    return path
