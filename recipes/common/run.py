"""The steps every recipe's run shares: train (with resume), then record, print and publish the results."""

from __future__ import annotations

import glob
import json
import os
from typing import Any

import torch
from safetensors import safe_open
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from common.report import eval_curve, final_metrics_line, write_results
from hf_neural_attention.configuration_neural_attention import CONFIG_PREFIX, KERNEL_CHOICES, NeuralAttentionConfig
from hf_neural_attention.trainer import checkpoint_names

_SIZE_FIELDS = ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_size",
                "intermediate_size", "image_size", "patch_size", "num_channels")


def _recorded_attention(config: dict[str, Any]) -> dict[str, Any]:
    """The neural layers and the settings that shape or use the scorers, as a config dict records them (a setting a
    checkpoint of an older version lacks: its default; the package version and base model are left out)."""
    layers = config.get(CONFIG_PREFIX + "layers")
    if layers is None:
        return {"layers": None}
    defaults = NeuralAttentionConfig().to_dict()
    return {"layers": layers, **{name: config.get(CONFIG_PREFIX + name, defaults[name])
                                 for name in NeuralAttentionConfig.field_names() if name not in KERNEL_CHOICES}}


def check_resumable(model: torch.nn.Module, checkpoint: str) -> None:
    """Raise ``ValueError`` when ``checkpoint`` was written by a run with other attention or size flags than the one
    resuming it. Trainer loads a checkpoint's weights non-strictly and its optimizer state by position: such a run
    trained on with settings the weights were not made for (--activation), failed deep in the optimizer
    (--attention) or ran out of memory (--neural_layers)."""
    config_path = os.path.join(checkpoint, "config.json")
    if not os.path.isfile(config_path):
        return  # no model checkpoint to compare with: Trainer's own checks apply
    with open(config_path, encoding="utf-8") as f:
        saved = json.load(f)
    there = _recorded_attention(saved)
    here = _recorded_attention(json.loads(json.dumps(model.config.to_dict(), default=str)))
    problems = [f"{name} {there.get(name)!r} there, {here.get(name)!r} here"
                for name in dict.fromkeys([*there, *here]) if there.get(name) != here.get(name)]  # fmt: skip
    # the sizes the shapes below cannot show (the depth: the layers both have are alike; the head count: the same
    # projections), under the names config.json uses (GPT-2's n_layer, n_head are aliases)
    for field in _SIZE_FIELDS:
        key = model.config.attribute_map.get(field, field)
        if key in saved and saved[key] != getattr(model.config, field, None):
            problems.append(f"{key} {saved[key]!r} there, {getattr(model.config, field, None)!r} here")
    # the weights, compared by shape under the names the model loads them by (a checkpoint holds ViT's under their
    # legacy names, vit.encoder.layer.* for vit.layers.*)
    own = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    for path in sorted(glob.glob(os.path.join(checkpoint, "model*.safetensors"))):
        with safe_open(path, framework="pt") as weights:
            shapes = {key: tuple(weights.get_slice(key).get_shape()) for key in weights.keys()}  # noqa: SIM118
        for key, name in checkpoint_names(model, shapes).items():
            if name in own and own[name] != shapes[key]:
                problems.append(f"{name} {shapes[key]} there, {own[name]} here")
    if problems:
        shown = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
        raise ValueError(
            f"--resume_from_checkpoint {checkpoint} was written by a run with other flags: {shown}. Resume with "
            "that run's flags (--attention, --neural_layers, the scorer settings, the model sizes), or start anew "
            "in another --output_dir."
        )


def train(trainer: Trainer, training_args: TrainingArguments) -> dict[str, Any]:
    """``trainer.train`` honouring ``--resume_from_checkpoint PATH|latest``, then save model and state; its metrics."""
    resume = training_args.resume_from_checkpoint
    if resume in ("True", "true", "latest"):
        resume = get_last_checkpoint(training_args.output_dir)
        if resume is None:
            strategy = training_args.save_strategy.value
            every = f" every {training_args.save_steps} steps" if strategy == "steps" else ""
            raise ValueError(f"--resume_from_checkpoint {training_args.resume_from_checkpoint}: no checkpoint "
                             f"in {training_args.output_dir}. Checkpoints are written by --save_strategy steps|epoch; "
                             f"this run saves with {strategy!r}{every}, so a shorter earlier run wrote none.")
    if isinstance(resume, str):
        check_resumable(trainer.model, resume)
    result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model()  # safetensors; a patched model saves as the Hub class
    trainer.save_state()
    return result.metrics


def publish(trainer: Trainer, training_args: TrainingArguments, record: dict[str, Any], card: dict[str, Any]
            ) -> dict[str, Any]:
    """Add the eval curve to ``record``, write it and the final-metrics line (main process), then push to the Hub
    (``--push_to_hub``) or write the model card locally. Returns ``record``."""
    record["eval_curve"] = eval_curve(trainer.state.log_history)
    if trainer.is_world_process_zero():
        write_results(training_args.output_dir, record)
        print(final_metrics_line(record["metrics"]), flush=True)
    if training_args.push_to_hub:
        trainer.push_to_hub(**card)
    elif trainer.is_world_process_zero():
        trainer.create_model_card(**card)
    return record
