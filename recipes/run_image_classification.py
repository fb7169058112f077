"""Image classification with a ViT using neural attention (arXiv 2502.17206) or dot-product attention, on Trainer.

With no arguments (and no network) it runs the embedded default: a small ViT trained from scratch on the bundled
8x8 UCI digits (patch 2), once with neural attention in layer 0 and once with dot-product attention, and prints the
comparison. The real thing::

    accelerate launch recipes/run_image_classification.py --dataset_name uoft-cs/cifar10 \\
        --model_name_or_path google/vit-base-patch16-224-in21k --neural_layers 0 --output_dir out/vit-cifar10

From scratch on CIFAR-100 (the paper's regime)::

    accelerate launch recipes/run_image_classification.py --dataset_name uoft-cs/cifar100 --from_scratch \\
        --patch_size 4 --hidden_size 512 --num_hidden_layers 8 --num_attention_heads 8 --output_dir out/vit-c100

Local data: ``--train_dir DIR`` (one sub-folder per class; optional ``--validation_dir`` / ``--test_dir``).
Metrics: eval loss and accuracy on the validation split, test loss and accuracy on the test split.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import datasets
import transformers
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    TrainingArguments,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
    set_seed,
)

from hf_neural_attention import NeuralAttentionTrainer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import run as run_steps  # noqa: E402
from common.ab import main_entry  # noqa: E402
from common.attention import (  # noqa: E402
    AttentionArguments,
    apply_attention,
    count_scorer_parameters,
    validate_attention_args,
)
from common.cli import flag_is_true, given_flags, parse_with_presets, strip_flag  # noqa: E402
from common.images import (  # noqa: E402
    IMAGE_COLUMNS,
    LABEL_COLUMNS,
    Augmentation,
    AugmentationEpoch,
    collate,
    find_column,
    label_names,
    load_image_dataset,
    make_transform,
    with_sample_index,
)
from common.metrics import classification_metrics  # noqa: E402
from common.offline import check_model_reachable  # noqa: E402
from common.splits import hold_out_validation  # noqa: E402

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    """Which ViT to start from, or the sizes of one trained from scratch."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Pretrained ViT (Hub id or folder). Without it: train from scratch."}
    )
    from_scratch: bool = field(
        default=False, metadata={"help": "Random init. With --model_name_or_path its config gives the sizes."}
    )
    image_processor_name: str | None = field(default=None, metadata={"help": "Default: the model's processor."})
    image_size: int | None = field(default=None, metadata={"help": "From scratch: input side (default: data's)."})
    patch_size: int | None = field(
        default=None, metadata={"help": "From scratch: patch side (default 2 up to 16-pixel images, else 4)."}
    )
    hidden_size: int | None = field(default=None, metadata={"help": "From scratch: width."})
    num_hidden_layers: int | None = field(default=None, metadata={"help": "From scratch: encoder layers."})
    num_attention_heads: int | None = field(default=None, metadata={"help": "From scratch: heads."})
    intermediate_size: int | None = field(
        default=None, metadata={"help": "From scratch: MLP width (default 4x --hidden_size)."}
    )


@dataclass
class DataArguments:
    """Where the images come from and how they are augmented."""

    dataset_name: str | None = field(default=None, metadata={"help": "uoft-cs/cifar10, uoft-cs/cifar100, ..."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub data set config."})
    train_dir: str | None = field(default=None, metadata={"help": "Local image folder (class sub-folders)."})
    validation_dir: str | None = field(default=None, metadata={"help": "Local validation image folder."})
    test_dir: str | None = field(default=None, metadata={"help": "Local test image folder."})
    image_column_name: str | None = field(default=None, metadata={"help": "Default: image / img / Image feature."})
    label_column_name: str | None = field(
        default=None, metadata={"help": "Default: label / labels / fine_label (CIFAR-100) / ClassLabel feature."}
    )
    validation_split_percentage: int = field(
        default=10, metadata={"help": "Share of train held out when there is no validation split."}
    )
    augment: str = field(
        default="auto",
        metadata={"help": "auto: crop_flip for natural images, crop for the bundled digits.",
                  "choices": ["auto", "none", "crop", "crop_flip"]},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep this many training images."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep this many validation/test images."})


@dataclass
class RecipeArguments:
    """Recipe-level switches."""

    smoke: bool = field(default=False, metadata={"help": "Tiny sizes and a few steps (CI)."})


SCRATCH_SIZES = [  # only when no --model_name_or_path gives the sizes
    "--hidden_size", "64", "--num_hidden_layers", "4", "--num_attention_heads", "4", "--intermediate_size", "128",
]
SCRATCH_PRESET = [
    "--learning_rate", "3e-3", "--warmup_steps", "0.05", "--lr_scheduler_type", "cosine", "--weight_decay", "0.1",
    "--num_train_epochs", "80", "--per_device_train_batch_size", "64", "--per_device_eval_batch_size", "128",
    "--eval_strategy", "epoch", "--logging_strategy", "epoch", "--save_strategy", "steps", "--save_steps", "500",
    "--save_total_limit", "2",
]
PRETRAINED_PRESET = ["--learning_rate", "5e-5", "--num_train_epochs", "3", "--eval_strategy", "epoch",
                     "--save_strategy", "epoch", "--save_total_limit", "2"]
SMOKE_SIZES = ["--hidden_size", "16", "--num_hidden_layers", "2", "--num_attention_heads", "2",
               "--intermediate_size", "32"]
SMOKE_PRESET = [
    "--max_train_samples", "64", "--max_eval_samples", "32", "--max_steps", "4", "--per_device_train_batch_size",
    "8", "--per_device_eval_batch_size", "16", "--eval_strategy", "steps", "--eval_steps", "2",
    "--logging_strategy", "steps", "--logging_steps", "1", "--warmup_steps", "0",
]


def _sizes_for(sizes: list[str], flags: set[str]) -> list[str]:
    """``sizes`` without its ``--intermediate_size`` when the user sets ``--hidden_size`` alone: the MLP width then
    follows the width (4x, ``scratch_config``) instead of staying at the preset's."""
    if "hidden_size" not in flags or "intermediate_size" in flags:
        return sizes
    return strip_flag(sizes, "intermediate_size")


def parse_args(argv: list[str]) -> tuple[Any, ...]:
    """Parse ``argv`` over the recipe's presets (base, then regime, then smoke); user flags win."""
    flags = given_flags(argv)
    base = ["--output_dir", "out/image", "--do_train", "True", "--do_eval", "True", "--do_predict", "True",
            "--remove_unused_columns", "False"]
    # by value, not presence: --smoke False / --from_scratch False turn the presets off
    pretrained = "model_name_or_path" in flags and not flag_is_true(argv, "from_scratch")
    presets = [base, PRETRAINED_PRESET if pretrained else SCRATCH_PRESET]
    if "model_name_or_path" not in flags:
        presets.append(_sizes_for(SCRATCH_SIZES, flags))
    if flag_is_true(argv, "smoke"):
        presets.append(SMOKE_PRESET + ([] if "model_name_or_path" in flags else _sizes_for(SMOKE_SIZES, flags)))
    types = (ModelArguments, DataArguments, AttentionArguments, RecipeArguments, TrainingArguments)
    return parse_with_presets(types, presets, argv)


def prepare_splits(raw: datasets.DatasetDict, data_args: DataArguments) -> datasets.DatasetDict:
    """train / validation (held out from train if absent) / test (if present), truncated as asked."""
    if "train" not in raw:
        raise ValueError(f"The data set has no 'train' split (splits: {sorted(raw)}).")
    splits = datasets.DatasetDict(raw)
    if "validation" not in splits:
        splits["train"], splits["validation"] = hold_out_validation(
            splits["train"], data_args.validation_split_percentage, "--validation_dir"
        )
    for flag, limit in (("--max_train_samples", data_args.max_train_samples),
                        ("--max_eval_samples", data_args.max_eval_samples)):  # fmt: skip
        if limit is not None and limit < 1:  # an empty split breaks the pass that reads it (train, eval or test)
            raise ValueError(f"{flag} {limit} leaves nothing to use; give at least 1 (or leave it out).")
    limits = {"train": data_args.max_train_samples, "validation": data_args.max_eval_samples,
              "test": data_args.max_eval_samples}
    for split, limit in limits.items():
        if split in splits and limit is not None:
            splits[split] = splits[split].shuffle(seed=0).select(range(min(limit, len(splits[split]))))
    return splits


def scratch_config(model_args: ModelArguments, native_size: int, labels: list[str]) -> transformers.PretrainedConfig:
    """A ViT config for training from scratch (starting from the pretrained config if one is named)."""
    if model_args.model_name_or_path:
        check_model_reachable(model_args.model_name_or_path, "pass a local checkpoint folder to --model_name_or_path")
        config = AutoConfig.from_pretrained(model_args.model_name_or_path)
    else:
        config = ViTConfig()
        config.image_size = native_size
        config.patch_size = 2 if native_size <= 16 else 4
        config.num_channels = 3
    for name in ("image_size", "patch_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                 "intermediate_size"):
        if getattr(model_args, name) is not None:
            setattr(config, name, getattr(model_args, name))
    if model_args.intermediate_size is None and model_args.hidden_size is not None:
        config.intermediate_size = 4 * config.hidden_size
    config.num_labels = len(labels)
    config.id2label = dict(enumerate(labels))
    config.label2id = {name: i for i, name in enumerate(labels)}
    return config


def check_geometry(config: transformers.PretrainedConfig, processor: Any) -> None:
    """Image size divisible by the patch size, heads dividing the width, processor output matching the model."""
    image_size, patch_size = config.image_size, config.patch_size
    if image_size % patch_size:
        raise ValueError(
            f"Image size {image_size} is not divisible by the patch size {patch_size}: ViT cuts the image into "
            f"whole patches. Choose --image_size / --patch_size so that one divides the other."
        )
    if config.hidden_size % config.num_attention_heads:
        raise ValueError(f"--hidden_size {config.hidden_size} is not divisible by --num_attention_heads "
                         f"{config.num_attention_heads}.")
    size = getattr(processor, "size", None) or {}
    out = (size.get("height"), size.get("width")) if "height" in size else (size.get("shortest_edge"),) * 2
    crop = getattr(processor, "crop_size", None)
    if getattr(processor, "do_center_crop", False) and crop:
        out = (crop.get("height"), crop.get("width"))
    if out[0] is not None and tuple(out) != (image_size, image_size):
        raise ValueError(f"The image processor produces {out[0]}x{out[1]} images but the model expects "
                         f"{image_size}x{image_size}; pass a matching --image_processor_name (or, training from "
                         "scratch, --image_size).")


def run(argv: list[str]) -> dict[str, Any]:
    """Train, evaluate and save one arm; returns its results record."""
    start = time.time()
    model_args, data_args, attn_args, _, training_args = parse_args(argv)
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())
    datasets.utils.logging.set_verbosity(training_args.get_process_log_level())
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)

    # Everything that can be wrong with the inputs is checked before training starts.
    bundled_data = not (data_args.dataset_name or data_args.train_dir)
    raw = load_image_dataset(data_args.dataset_name, data_args.dataset_config_name, data_args.train_dir,
                             data_args.validation_dir, data_args.test_dir)
    kind = data_args.augment if data_args.augment != "auto" else ("crop" if bundled_data else "crop_flip")
    if kind != "none" and "train" in raw:  # before any shuffle or selection: no copy of the split (and its images)
        raw["train"] = with_sample_index(raw["train"])
    splits = prepare_splits(raw, data_args)
    train = splits["train"]
    image_column = find_column(train, data_args.image_column_name, IMAGE_COLUMNS, "image", datasets.Image,
                               "--image_column_name")
    label_column = find_column(train, data_args.label_column_name, LABEL_COLUMNS, "label", datasets.ClassLabel,
                               "--label_column_name")
    for split, dataset in splits.items():
        for column in (image_column, label_column):
            if column not in dataset.column_names:
                raise ValueError(f"The {split!r} split lacks column {column!r} (columns: {dataset.column_names}).")
    labels = label_names(train, label_column)
    label_ids = None if isinstance(train.features[label_column], datasets.ClassLabel) else {
        name: i for i, name in enumerate(labels)}
    native_size = max(train[0][image_column].size)

    pretrained = bool(model_args.model_name_or_path) and not model_args.from_scratch
    sizes = [f"--{name}" for name in ("image_size", "patch_size", "hidden_size", "num_hidden_layers",
                                      "num_attention_heads", "intermediate_size")
             if getattr(model_args, name) is not None]  # fmt: skip
    if pretrained and sizes:
        raise ValueError(f"{' / '.join(sizes)} size a model trained from scratch; with --model_name_or_path the "
                         "checkpoint's sizes hold. Add --from_scratch (its config, new weights), or drop them.")
    if pretrained:
        check_model_reachable(model_args.model_name_or_path, "pass a local checkpoint folder to --model_name_or_path")
        config = AutoConfig.from_pretrained(model_args.model_name_or_path)
    else:
        config = scratch_config(model_args, native_size, labels)
    processor_name = model_args.image_processor_name or (model_args.model_name_or_path if pretrained else None)
    if processor_name:
        processor = AutoImageProcessor.from_pretrained(processor_name)
    else:
        processor = ViTImageProcessor(size={"height": config.image_size, "width": config.image_size},
                                      image_mean=[0.5] * 3, image_std=[0.5] * 3)
    check_geometry(config, processor)
    layers = validate_attention_args(attn_args, config.num_hidden_layers)

    augmentation = Augmentation(kind, training_args.seed) if kind != "none" else None
    if augmentation is not None:
        if training_args.dataloader_persistent_workers and training_args.dataloader_num_workers > 0:
            logger.warning("Persistent DataLoader workers keep the augmentation of the epoch they started in: every "
                           "epoch sees the same crops. Leave out --dataloader_persistent_workers to vary them.")
    for split in splits:
        splits[split].set_transform(make_transform(processor, image_column, label_column, label_ids,
                                                   augmentation if split == "train" else None))

    set_seed(training_args.seed)  # same base initialisation in both arms for a given seed
    if pretrained:
        model = AutoModelForImageClassification.from_pretrained(
            model_args.model_name_or_path, num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={n: i for i, n in enumerate(labels)}, ignore_mismatched_sizes=True)
    else:
        model = ViTForImageClassification(config)
    model = apply_attention(model, attn_args, layers)
    n_params = sum(p.numel() for p in model.parameters())
    n_scorer = count_scorer_parameters(model)
    logger.info("attention=%s layers=%s parameters=%d (scorer %d)", attn_args.attention, layers, n_params, n_scorer)

    trainer = NeuralAttentionTrainer(
        model=model,
        args=training_args,
        train_dataset=splits["train"] if training_args.do_train else None,
        eval_dataset=splits["validation"] if training_args.do_eval else None,
        processing_class=processor,
        data_collator=collate,
        compute_metrics=classification_metrics(training_args.label_smoothing_factor),
        callbacks=[AugmentationEpoch(augmentation)] if augmentation is not None else None,
    )
    metrics: dict[str, Any] = {"n_parameters": n_params, "n_scorer_parameters": n_scorer,
                               "n_processes": training_args.world_size}
    if training_args.do_train:
        metrics.update(run_steps.train(trainer, training_args))
    if training_args.do_eval:
        metrics.update(trainer.evaluate())
    if training_args.do_predict and "test" in splits:
        metrics.update(trainer.predict(splits["test"], metric_key_prefix="test").metrics)
    metrics["wall_time"] = time.time() - start
    trainer.save_metrics("all", metrics)

    record = {"recipe": "image", "attention": attn_args.attention, "seed": training_args.seed,
              "neural_layers": layers if attn_args.attention == "neural" else [], "metrics": metrics,
              "argv": argv}
    card = {"finetuned_from": model_args.model_name_or_path, "tasks": "image-classification",
            "tags": ["neural-attention"] if attn_args.attention == "neural" else ["dot-product-attention"],
            "dataset": data_args.dataset_name or ("local images" if data_args.train_dir else "UCI digits")}
    return run_steps.publish(trainer, training_args, record, card)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Entry point: no arguments runs the embedded A/B default."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return main_entry(argv, run, parse_args, recipe="image", task="image classification",
                      default_output_dir="out/image-default-ab")


if __name__ == "__main__":
    main()
