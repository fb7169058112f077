"""``NeuralAttentionTrainer``: a ``Trainer`` whose checkpoints and model card keep the neural layers loadable.

``Trainer.push_to_hub`` writes its own README.md (results, hyper-parameters) over the card that the model's
``save_pretrained`` wrote. This subclass merges the two, so ``trainer.push_to_hub()`` uploads one card with the
settings, loading instructions and citation as well as the training summary. A model without a neural-attention Hub
class (Llama, BERT, ...) is saved by its stock ``save_pretrained``, from which its own class cannot rebuild the neural
layers: every save then also writes the scorers as an adapter (``save_neural_adapter``), which the card's loading
instructions use. So does every save of a PEFT model (even of a Hub class): PEFT saves only its own adapter, without
the scorers unless they are in ``modules_to_save``, and a fresh patch would draw other initial weights. Resuming
(``resume_from_checkpoint``) and ``load_best_model_at_end`` load the scorers back from that adapter, and load the
weights a checkpoint keeps under legacy names (ViT's) under the names the model has.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
from collections.abc import Iterable
from typing import Any

from safetensors import safe_open
from transformers import PreTrainedModel, Trainer
from transformers.trainer_utils import HubStrategy

from .adapters import CONFIG_NAME as ADAPTER_CONFIG
from .adapters import WEIGHTS_NAME as ADAPTER_WEIGHTS
from .adapters import restore_neural_adapter_weights, save_neural_adapter
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

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """Trainer's push of each save (``hub_strategy="every_save"``) copies the files it knows from the checkpoint
        and uploads the output folder: the code files a Hub class's checkpoint loads with (its config.json names
        them in ``auto_map``), the neural adapter and our card stayed behind, and those commits did not load."""
        # only for a push that happens (Trainer skips one while the last is uploading this folder): else the folder
        # would hold this save's adapter beside the last one's weights
        idle = self.args.hub_always_push or self.push_in_progress is None or self.push_in_progress.is_done()
        if self.is_world_process_zero() and self.args.hub_strategy != HubStrategy.END and idle:
            names = [os.path.basename(path) for path in glob.glob(os.path.join(checkpoint_folder, "*.py"))]
            names += [ADAPTER_WEIGHTS, ADAPTER_CONFIG]
            if not os.path.isfile(os.path.join(self.args.output_dir, "README.md")):  # Trainer's card, once written
                names.append("README.md")
            for name in names:
                source = os.path.join(checkpoint_folder, name)
                if os.path.isfile(source):
                    shutil.copy(source, os.path.join(self.args.output_dir, name))
        super()._push_from_checkpoint(checkpoint_folder)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        self._load_renamed_weights(resume_from_checkpoint, model if model is not None else self.model)
        self._restore_scorers(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        super()._load_best_model()
        self._load_renamed_weights(self.state.best_model_checkpoint, self.model)
        self._restore_scorers(self.state.best_model_checkpoint)

    def _load_renamed_weights(self, checkpoint: str, model: Any) -> None:
        """Load the weights a checkpoint keeps under legacy names: transformers 5 saves ViT's ``vit.layers.*`` as
        ``vit.encoder.layer.*``, and Trainer's own load matches names on disk only (transformers issue #43701), so a
        resumed run went on from its initial encoder (and ``load_best_model_at_end`` mixed two checkpoints)."""
        target = self.accelerator.unwrap_model(model)
        if (self.is_deepspeed_enabled or self.is_fsdp_enabled or not isinstance(target, PreTrainedModel)
                or adapter_only_saver(target) is not None):
            return  # their own checkpoint formats; a PEFT model loads its adapter alone
        own, state = target.state_dict(), {}
        for path in sorted(glob.glob(os.path.join(checkpoint, "model*.safetensors"))):  # one file, or the shards
            with safe_open(path, framework="pt") as weights:
                for key, name in checkpoint_names(target, weights.keys()).items():
                    if key != name and key not in own and name in own:
                        state[name] = weights.get_tensor(key)
        if state:
            target.load_state_dict(state, strict=False)

    def _restore_scorers(self, checkpoint: str) -> None:
        """Load a PEFT model's scorers from the adapter ``_save`` wrote: Trainer loads PEFT's own adapter only,
        which holds them only if they are in ``modules_to_save``; they would restart from their initial weights
        (under their trained optimizer state). DeepSpeed and FSDP checkpoints hold every weight."""
        wrapped = self.accelerator.unwrap_model(self.model)
        model = unwrap_model(wrapped)
        if (adapter_only_saver(wrapped) is None or neural_settings(model) is None or self.is_deepspeed_enabled
                or self.is_fsdp_enabled):
            return
        if not os.path.isfile(os.path.join(checkpoint, ADAPTER_WEIGHTS)):
            logger.warning("%s has no %s (not written by NeuralAttentionTrainer?): the scorers keep their current "
                           "weights, not the checkpoint's.", checkpoint, ADAPTER_WEIGHTS)
            return
        restore_neural_adapter_weights(wrapped, checkpoint)

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        # transformers takes the empty _name_or_path of a model built from a config for its base model ("a
        # fine-tuned version of [](https://huggingface.co/)"); a folder it does not take, and the card then says the
        # model was trained from scratch
        config = getattr(unwrap_model(self.accelerator.unwrap_model(self.model)), "config", None)
        from_scratch = (not args and kwargs.get("finetuned_from") is None and self.is_world_process_zero()
                        and getattr(config, "_name_or_path", None) == "")
        if from_scratch:
            os.makedirs(self.args.output_dir, exist_ok=True)
            config._name_or_path = self.args.output_dir
        try:
            super().create_model_card(*args, **kwargs)
        finally:
            if from_scratch:
                config._name_or_path = ""
        if not self.is_world_process_zero():
            return
        wrapped = self.accelerator.unwrap_model(self.model)
        model = unwrap_model(wrapped)  # the model _save wrote an adapter for
        if neural_settings(model) is None:
            return  # the dot-product arm of an A/B run: the stock card is right
        merge_training_card(model, os.path.join(self.args.output_dir, "README.md"), repo_id=self.hub_model_id,
                            peft=adapter_only_saver(wrapped) is not None)


def checkpoint_names(model: PreTrainedModel, keys: Iterable[str]) -> dict[str, str]:
    """Each checkpoint key with the name ``from_pretrained`` loads it under in ``model`` (transformers' renamings for
    its family; a key a converter would merge with others keeps its name)."""
    keys = list(keys)
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key
    except ImportError:  # a transformers without weight conversions loads every key under its own name
        return {key: key for key in keys}
    renamings = [item for item in get_model_conversion_mapping(model) if isinstance(item, WeightRenaming)]
    if not renamings:
        return {key: key for key in keys}
    meta = model.state_dict()
    return {key: rename_source_key(key, renamings, [], model.base_model_prefix, meta)[0] for key in keys}
