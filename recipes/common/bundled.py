"""Paths to the real data bundled in ``recipes/data`` (see its README for provenance and licences)."""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
from pathlib import Path

import numpy as np

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
WIKITEXT_SPLITS = ("train", "validation", "test")
DIGITS_SPLIT_SEED = 0
"""Seed of the fixed 80/10/10 split of the digits (the data set has no official split)."""


def wikitext_excerpt_files() -> dict[str, str]:
    """``{split: path}`` of the gzipped WikiText-style excerpt, ready for ``load_dataset("text", data_files=...)``."""
    return {split: str(DATA_DIR / f"wikitext_excerpt_{split}.txt.gz") for split in WIKITEXT_SPLITS}


def _cache_root() -> Path:
    base = os.environ.get("HF_NEURAL_ATTENTION_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "hf_neural_attention"
    )
    return Path(base)


def gpt2_tokenizer_dir() -> str:
    """A folder that ``AutoTokenizer.from_pretrained`` loads as the bundled GPT-2 tokenizer.

    The vocabulary and merges ship gzipped; they are decompressed once into a cache folder keyed by the
    content hash of the bundled files (so an updated bundle never reuses a stale copy).
    """
    source = DATA_DIR / "gpt2_tokenizer"
    digest = hashlib.sha256()
    for name in ("vocab.json.gz", "merges.txt.gz", "tokenizer_config.json"):
        digest.update((source / name).read_bytes())
    target = _cache_root() / f"gpt2_tokenizer-{digest.hexdigest()[:12]}"
    if (target / "merges.txt").is_file():
        return str(target)
    staging = target.with_name(f"{target.name}.tmp{os.getpid()}")
    staging.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        with gzip.open(source / f"{name}.gz", "rb") as fin, open(staging / name, "wb") as fout:
            shutil.copyfileobj(fin, fout)
    shutil.copy(source / "tokenizer_config.json", staging / "tokenizer_config.json")
    try:
        staging.rename(target)  # atomic: concurrent processes (accelerate launch) race safely
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return str(target)


def load_digits() -> dict[str, dict[str, np.ndarray]]:
    """The UCI digits as ``{split: {"image": uint8 (n, 8, 8), "label": int64 (n,)}}`` with a fixed 80/10/10 split."""
    with np.load(DATA_DIR / "digits.npz", allow_pickle=False) as archive:
        images = np.clip(np.rint(archive["x"] * 255.0), 0, 255).astype(np.uint8)
        labels = archive["y"].astype(np.int64)
    order = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(labels))
    n_eval = len(labels) // 10
    parts = {"test": order[:n_eval], "validation": order[n_eval : 2 * n_eval], "train": order[2 * n_eval :]}
    return {split: {"image": images[idx], "label": labels[idx]} for split, idx in parts.items()}


DIGIT_NAMES = [str(d) for d in range(10)]
