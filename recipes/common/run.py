"""The steps every recipe's run shares: train (with resume), then record, print and publish the results."""

from __future__ import annotations

from typing import Any

from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from common.report import eval_curve, final_metrics_line, write_results


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
