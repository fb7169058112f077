"""Image data for the classification recipe: sources, column checks, augmentations and the collator."""

from __future__ import annotations

import math
import os
import random
from collections.abc import Callable
from typing import Any

import datasets
import torch
from PIL import Image, ImageOps
from transformers import TrainerCallback

from common import bundled
from common.offline import load_named_dataset

LOCAL_IMAGES_HINT = (
    "point at local image folders (one sub-folder per class) with --train_dir/--validation_dir/--test_dir, "
    "or leave out --dataset_name to use the bundled UCI digits"
)
IMAGE_COLUMNS = ("image", "img", "pixel_values")
LABEL_COLUMNS = ("label", "labels", "fine_label")


def bundled_digits() -> datasets.DatasetDict:
    """The bundled 8x8 UCI digits as an image data set (fixed 80/10/10 split)."""
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=bundled.DIGIT_NAMES)})
    return datasets.DatasetDict({
        split: datasets.Dataset.from_dict(
            {"image": [Image.fromarray(a, mode="L") for a in part["image"]], "label": part["label"].tolist()},
            features=features,
        )
        for split, part in bundled.load_digits().items()
    })


def load_image_dataset(
    dataset_name: str | None, config_name: str | None, train_dir: str | None, validation_dir: str | None,
    test_dir: str | None,
) -> datasets.DatasetDict:
    """Hub data set by name, local image folders, or the bundled digits."""
    if dataset_name:
        raw = load_named_dataset(dataset_name, config_name, LOCAL_IMAGES_HINT)
    elif train_dir:
        files = {"train": train_dir, "validation": validation_dir, "test": test_dir}
        for split, folder in files.items():
            if folder and not os.path.isdir(folder):
                raise ValueError(f"--{split}_dir {folder!r} is not a folder.")
        raw = datasets.load_dataset(
            "imagefolder", data_files={k: os.path.join(v, "**") for k, v in files.items() if v}
        )
    elif validation_dir or test_dir:
        raise ValueError("--validation_dir/--test_dir need --train_dir as well.")
    else:
        raw = bundled_digits()
    return raw if isinstance(raw, datasets.DatasetDict) else datasets.DatasetDict({"train": raw})


def find_column(dataset: datasets.Dataset, wanted: str | None, candidates: tuple[str, ...], kind: str,
                feature_type: type, flag: str) -> str:
    """The column holding images/labels: the one asked for, a conventional name, or one with the right type."""
    columns = dataset.column_names
    if wanted:
        if wanted not in columns:
            raise ValueError(f"No {kind} column {wanted!r} in the data set (columns: {columns}); fix {flag}.")
        return wanted
    for name in candidates:
        if name in columns:
            return name
    typed = [name for name, feature in dataset.features.items() if isinstance(feature, feature_type)]
    if typed:
        return typed[0]
    raise ValueError(
        f"The data set has no {kind} column (looked for {list(candidates)} or a {feature_type.__name__} feature; "
        f"columns: {columns}). Name it with {flag}."
    )


def label_names(dataset: datasets.Dataset, column: str) -> list[str]:
    """Class names from a ``ClassLabel`` feature, else the sorted distinct values."""
    feature = dataset.features[column]
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    return [str(v) for v in sorted(set(dataset[column]))]


def pad_crop(image: Image.Image, pad: int, rng: random.Random) -> Image.Image:
    """Random translation by up to ``pad`` pixels: pad by reflection-free zeros, crop back to the original size."""
    if pad <= 0:
        return image
    width, height = image.size
    padded = ImageOps.expand(image, border=pad, fill=0)
    left, top = rng.randint(0, 2 * pad), rng.randint(0, 2 * pad)
    return padded.crop((left, top, left + width, top + height))


INDEX_COLUMN = "__augment_index__"
"""The column of sample indices an augmented split carries (`with_sample_index`, given before the split is shuffled
or cut: a row keeps its number in the data set): each sample's draws are seeded by it, so that they do not depend on
which process, DataLoader worker or resumed run transforms the sample."""


class Augmentation:
    """``none``, ``crop`` (random translation by 1/8 of the side) or ``crop_flip`` (plus horizontal flips).

    The draws for a sample are a function of ``(seed, epoch, sample index)``: the same in one process or several, in
    any DataLoader worker (a generator kept in the transform was copied into every worker, which then drew the same
    sequence), and after a resume (a generator's state was not in the checkpoint). ``epoch`` is set by
    `AugmentationEpoch`; DataLoader workers read it when they start, at every epoch unless they are persistent."""

    def __init__(self, kind: str, seed: int) -> None:
        self.kind, self.seed, self.epoch = kind, seed, 0

    def __call__(self, image: Image.Image, index: int) -> Image.Image:
        """``image`` (sample ``index`` of the split, `INDEX_COLUMN`) with this epoch's draws for it."""
        rng = random.Random(f"{self.seed}/{self.epoch}/{index}")  # str seeds hash with sha512: stable across runs
        if self.kind in ("crop", "crop_flip"):
            image = pad_crop(image, max(min(image.size) // 8, 1), rng)
        if self.kind == "crop_flip" and rng.random() < 0.5:
            image = ImageOps.mirror(image)
        return image


class AugmentationEpoch(TrainerCallback):
    """Tells an `Augmentation` the epoch Trainer starts (also where a resumed run starts)."""

    def __init__(self, augmentation: Augmentation) -> None:
        self.augmentation = augmentation

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # state.epoch is epoch + steps done / steps per epoch: a whole number at an epoch's start, or the fraction
        # a resumed checkpoint had reached within its epoch
        self.augmentation.epoch = math.floor(state.epoch + 1e-9)


def with_sample_index(dataset: datasets.Dataset) -> datasets.Dataset:
    """``dataset`` plus `INDEX_COLUMN`, each row's position (what `Augmentation` seeds its draws with)."""
    return dataset.add_column(INDEX_COLUMN, list(range(len(dataset))))


def make_transform(processor: Any, image_column: str, label_column: str, label_ids: dict[Any, int] | None,
                   augment: Augmentation | None) -> Callable[[dict], dict]:
    """A ``set_transform`` function: RGB conversion, optional augmentation (the split needs `with_sample_index`),
    the model's image processor."""

    def transform(batch: dict[str, list]) -> dict[str, Any]:
        images = [img.convert("RGB") for img in batch[image_column]]
        if augment is not None:
            images = [augment(img, index) for img, index in zip(images, batch[INDEX_COLUMN], strict=True)]
        labels = batch[label_column]
        if label_ids is not None:
            labels = [label_ids[str(v)] for v in labels]
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixels, "labels": torch.tensor(labels, dtype=torch.long)}

    return transform


def collate(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack transformed examples into a batch."""
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
        "labels": torch.stack([torch.as_tensor(e["labels"]) for e in examples]),
    }
