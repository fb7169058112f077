"""``NeuralAttentionTrainer``: a ``Trainer`` whose checkpoints and model card keep the neural layers loadable.

``Trainer.push_to_hub`` writes its own README.md (results, hyper-parameters) over the card that the model's
``save_pretrained`` wrote. This subclass merges the two, so ``trainer.push_to_hub()`` uploads one card with the
settings, loading instructions and citation as well as the training summary. A model without a neural-attention Hub
class (Llama, BERT, ...) is saved by its stock ``save_pretrained``, from which its own class cannot rebuild the neural
layers: every save then also writes the scorers as an adapter (``save_neural_adapter``), which the card's loading
instructions use. So does every save of a PEFT model (even of a Hub class): PEFT saves only its own adapter, without
the scorers unless they are in ``modules_to_save``, and a fresh patch would draw other initial weights. Resuming
(``resume_from_checkpoint``) and ``load_best_model_at_end`` load the scorers back from that adapter.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from transformers import PreTrainedModel, Trainer

from .adapters import WEIGHTS_NAME, restore_neural_adapter_weights, save_neural_adapter
from .hub_classes import is_hub_class
from .model_card import merge_training_card
from .patching import adapter_only_saver, neural_settings, unwrap_model

logger = logging.getLogger(__name__)


class NeuralAttentionTrainer(Trainer):
    """A ``transformers.Trainer``; saving, loading checkpoints and the model card differ (see the module docstring)."""

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict=state_dict)
        wrapped = self.accelerator.unwrap_model(self.model)
        model = unwrap_model(wrapped)
        if (not self.args.should_save or not isinstance(model, PreTrainedModel) or neural_settings(model) is None
                or (is_hub_class(type(model)) and adapter_only_saver(wrapped) is None)):
            return  # a user's own module, the dot-product arm, or a Hub class (its checkpoint rebuilds the layers)
        # Trainer hands _save the gathered state dict where the parameters are sharded (DeepSpeed ZeRO-3, FSDP's
        # full state dict), keyed as `wrapped`'s; {} when ZeRO-3 was told not to gather (a sharded checkpoint)
        if state_dict is not None and not state_dict:
            logger.warning("The weights were saved as a sharded DeepSpeed checkpoint (stage3_gather_16bit_weights_on_"
                           "model_save is false): no adapter was written beside them. Save one with "
                           "save_neural_adapter(model, directory, state_dict=...) from the gathered weights, or from "
                           "a model loaded from the checkpoint.")
            return
        try:
            save_neural_adapter(wrapped, output_dir if output_dir is not None else self.args.output_dir,
                                state_dict=state_dict)
        except ValueError as error:  # the weights are saved: a missing adapter must not end the training run
            logger.warning("No adapter was written beside the weights: %s", error)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        self._restore_scorers(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        super()._load_best_model()
        self._restore_scorers(self.state.best_model_checkpoint)

    def _restore_scorers(self, checkpoint: str) -> None:
        """Load a PEFT model's scorers from the adapter ``_save`` wrote: Trainer loads PEFT's own adapter only,
        which holds them only if they are in ``modules_to_save``; they would restart from their initial weights
        (under their trained optimizer state). DeepSpeed and FSDP checkpoints hold every weight."""
        wrapped = self.accelerator.unwrap_model(self.model)
        model = unwrap_model(wrapped)
        if (adapter_only_saver(wrapped) is None or neural_settings(model) is None or self.is_deepspeed_enabled
                or self.is_fsdp_enabled):
            return
        if not os.path.isfile(os.path.join(checkpoint, WEIGHTS_NAME)):
            logger.warning("%s has no %s (not written by NeuralAttentionTrainer?): the scorers keep their current "
                           "weights, not the checkpoint's.", checkpoint, WEIGHTS_NAME)
            return
        restore_neural_adapter_weights(wrapped, checkpoint)

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        super().create_model_card(*args, **kwargs)
        if not self.is_world_process_zero():
            return
        wrapped = self.accelerator.unwrap_model(self.model)
        model = unwrap_model(wrapped)  # the model _save wrote an adapter for
        if neural_settings(model) is None:
            return  # the dot-product arm of an A/B run: the stock card is right
        merge_training_card(model, os.path.join(self.args.output_dir, "README.md"), repo_id=self.hub_model_id,
                            peft=adapter_only_saver(wrapped) is not None)
