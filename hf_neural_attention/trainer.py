"""``NeuralAttentionTrainer``: a ``Trainer`` whose model card keeps the neural-attention sections.

``Trainer.push_to_hub`` writes its own README.md (results, hyper-parameters) over the card that the model's
``save_pretrained`` wrote. This subclass merges the two, so ``trainer.push_to_hub()`` uploads one card with the
settings, loading instructions and citation as well as the training summary.
"""

from __future__ import annotations

import os
from typing import Any

from transformers import Trainer

from .model_card import merge_training_card
from .patching import neural_settings


class NeuralAttentionTrainer(Trainer):
    """A ``transformers.Trainer``; only ``create_model_card`` differs (see the module docstring)."""

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        super().create_model_card(*args, **kwargs)
        if not self.is_world_process_zero():
            return
        model = self.accelerator.unwrap_model(self.model)
        if neural_settings(model) is None:
            return  # the dot-product arm of an A/B run: the stock card is right
        merge_training_card(model, os.path.join(self.args.output_dir, "README.md"), repo_id=self.hub_model_id)
