"""Causal language modelling with neural attention (arXiv 2502.17206) or dot-product attention, on Trainer.

With no arguments (and no network) it runs the embedded default: a small GPT-2 trained from scratch on the bundled
Wikipedia excerpt, once with neural attention in layer 0 and once with dot-product attention, and prints the
comparison. The real thing::

    accelerate launch recipes/run_clm.py --model_name_or_path openai-community/gpt2 \\
        --dataset_name wikitext --dataset_config_name wikitext-103-raw-v1 --neural_layers 0 --proj_dim 2 \\
        --output_dir out/gpt2-neural --push_to_hub --hub_model_id me/gpt2-neural

The paper's regime (train from scratch; the authors used 8 layers, 512 wide, 1024-token windows)::

    accelerate launch recipes/run_clm.py --from_scratch --n_layer 8 --n_embd 512 --n_head 8 --block_size 1024 \\
        --tokenizer_vocab_size 0 --dataset_name wikitext --dataset_config_name wikitext-103-raw-v1 ...

Metrics: eval loss, perplexity = exp(eval nll: the loss without label smoothing), next-token accuracy on the
validation blocks, and the strided sliding-window perplexity of the test split (see ``common/sliding_window.py`` for
how it differs from the authors').
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

import datasets
import torch
import transformers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerBase,
    TrainingArguments,
    default_data_collator,
    set_seed,
)

from hf_neural_attention import NeuralAttentionTrainer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import bundled  # noqa: E402
from common import run as run_steps  # noqa: E402
from common.ab import main_entry  # noqa: E402
from common.attention import (  # noqa: E402
    AttentionArguments,
    apply_attention,
    count_scorer_parameters,
    validate_attention_args,
)
from common.cli import flag_is_true, given_flags, parse_with_presets  # noqa: E402
from common.metrics import (  # noqa: E402
    causal_lm_metrics,
    causal_lm_per_block,
    load_metric,
    perplexity_from_loss,
)
from common.offline import check_model_reachable, load_named_dataset  # noqa: E402
from common.sliding_window import sliding_window_nll  # noqa: E402
from common.splits import hold_out_validation  # noqa: E402

logger = logging.getLogger(__name__)

LOCAL_DATA_HINT = (
    "point at local files with --train_file/--validation_file/--test_file (.txt, .txt.gz, .json, .jsonl or .csv), "
    "or leave out --dataset_name to use the bundled Wikipedia excerpt"
)


@dataclass
class ModelArguments:
    """Which model to start from, or the sizes of one trained from scratch."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Pretrained checkpoint (Hub id or folder). Without it: train from scratch."}
    )
    from_scratch: bool = field(
        default=False,
        metadata={"help": "Random init. With --model_name_or_path its config is the starting point for sizes."},
    )
    n_layer: int | None = field(default=None, metadata={"help": "From scratch: decoder layers (paper: 8)."})
    n_embd: int | None = field(default=None, metadata={"help": "From scratch: width (paper: 512)."})
    n_head: int | None = field(default=None, metadata={"help": "From scratch: attention heads."})
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "Tokenizer (default: the model's, or the bundled GPT-2 tokenizer)."}
    )
    tokenizer_vocab_size: int | None = field(
        default=None,
        metadata={"help": "From scratch only: retrain the tokenizer's byte-level BPE on the training text to this "
                  "vocabulary size (the 50k GPT-2 embedding dominates a tiny model's cost). 0 or unset: keep it."},
    )


@dataclass
class DataArguments:
    """Where the text comes from and how it is cut into training blocks."""

    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset, e.g. wikitext."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "e.g. wikitext-103-raw-v1."})
    train_file: str | None = field(default=None, metadata={"help": "Local .txt[.gz]/.json[l]/.csv file."})
    validation_file: str | None = field(default=None, metadata={"help": "Local validation file."})
    test_file: str | None = field(default=None, metadata={"help": "Local test file (sliding-window perplexity)."})
    text_column_name: str = field(default="text", metadata={"help": "Column holding the text."})
    validation_split_percentage: int = field(
        default=5, metadata={"help": "Share of train used for validation when there is no validation split."}
    )
    block_size: int | None = field(
        default=None, metadata={"help": "Training block length in tokens (default: model maximum, at most 1024)."}
    )
    max_train_lines: int | None = field(
        default=None, metadata={"help": "Read only the first N rows of the training text (quick runs)."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep this many training blocks."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep this many validation blocks."})
    max_test_tokens: int | None = field(
        default=None, metadata={"help": "Cap on test tokens for the sliding-window perplexity."}
    )
    sliding_window_stride: int | None = field(
        default=None, metadata={"help": "Stride of the test sliding window (default: block_size // 2)."}
    )
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for tokenizing."})


@dataclass
class RecipeArguments:
    """Recipe-level switches."""

    smoke: bool = field(default=False, metadata={"help": "Tiny sizes and a few steps (CI)."})


SCRATCH_SIZES = [  # only when no --model_name_or_path gives the sizes
    "--n_layer", "4", "--n_embd", "128", "--n_head", "4", "--block_size", "128", "--tokenizer_vocab_size", "8192",
]
SCRATCH_PRESET = [
    "--learning_rate", "2e-3", "--warmup_steps", "30", "--lr_scheduler_type", "cosine", "--weight_decay", "0.1",
    "--max_steps", "600", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "32",
    "--eval_steps", "100", "--logging_steps", "50",
]
PRETRAINED_PRESET = ["--learning_rate", "5e-5", "--num_train_epochs", "1", "--eval_steps", "500"]
SMOKE_SIZES = ["--n_layer", "2", "--n_embd", "32", "--n_head", "2", "--tokenizer_vocab_size", "300"]
SMOKE_PRESET = [
    "--block_size", "32", "--max_train_lines", "600", "--max_train_samples", "64", "--max_eval_samples", "16",
    "--max_test_tokens", "400",
    "--max_steps", "4", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8",
    "--eval_steps", "2", "--logging_steps", "1", "--warmup_steps", "0",
]


def parse_args(argv: list[str]) -> tuple[Any, ...]:
    """Parse ``argv`` over the recipe's presets (base, then regime, then smoke); user flags win."""
    flags = given_flags(argv)
    base = ["--output_dir", "out/clm", "--do_train", "True", "--do_eval", "True", "--do_predict", "True",
            "--eval_strategy", "steps", "--save_strategy", "steps", "--save_steps", "500", "--save_total_limit", "2"]
    # by value, not presence: --smoke False / --from_scratch False turn the presets off
    pretrained = "model_name_or_path" in flags and not flag_is_true(argv, "from_scratch")
    presets = [base, PRETRAINED_PRESET if pretrained else SCRATCH_PRESET]
    if "model_name_or_path" not in flags:
        presets.append(SCRATCH_SIZES)
    if flag_is_true(argv, "smoke"):
        presets.append(SMOKE_PRESET + ([] if "model_name_or_path" in flags else SMOKE_SIZES))
    types = (ModelArguments, DataArguments, AttentionArguments, RecipeArguments, TrainingArguments)
    return parse_with_presets(types, presets, argv)


# --- data ------------------------------------------------------------------------------------------------------------


def _file_builder(path: str) -> str:
    name = path.lower().removesuffix(".gz")
    for ext, builder in ((".txt", "text"), (".jsonl", "json"), (".json", "json"), (".csv", "csv")):
        if name.endswith(ext):
            return builder
    raise ValueError(f"Unsupported data file {path!r}: use .txt, .json, .jsonl or .csv (optionally .gz).")


def load_raw_text(data_args: DataArguments) -> datasets.DatasetDict:
    """Raw text splits (train, validation, maybe test), from the Hub, local files, or the bundled excerpt."""
    if data_args.dataset_name:
        raw = load_named_dataset(data_args.dataset_name, data_args.dataset_config_name, LOCAL_DATA_HINT)
    elif data_args.train_file:
        files = {"train": data_args.train_file}
        if data_args.validation_file:
            files["validation"] = data_args.validation_file
        if data_args.test_file:
            files["test"] = data_args.test_file
        builders = {_file_builder(path) for path in files.values()}
        if len(builders) != 1:
            raise ValueError(f"--train_file/--validation_file/--test_file must share one format, got {builders}.")
        empty = [f"--{split}_file {path}" for split, path in files.items()
                 if os.path.isfile(path) and os.path.getsize(path) == 0]  # fmt: skip
        if empty:  # datasets' own error ("Instruction 'test' corresponds to no data!") names no flag
            raise ValueError(f"{', '.join(empty)}: empty file(s); give files with text, or leave the flag out.")
        raw = datasets.load_dataset(builders.pop(), data_files=files)
    elif data_args.validation_file or data_args.test_file:
        raise ValueError("--validation_file/--test_file need --train_file as well.")
    else:
        logger.info("No --dataset_name or --train_file: using the bundled Wikipedia excerpt (recipes/data).")
        raw = datasets.load_dataset("text", data_files=bundled.wikitext_excerpt_files())
    if not isinstance(raw, datasets.DatasetDict):
        raw = datasets.DatasetDict({"train": raw})
    if "train" not in raw:
        raise ValueError(f"The dataset has no 'train' split (splits: {sorted(raw)}).")
    for split, dataset in raw.items():
        if data_args.text_column_name not in dataset.column_names:
            raise ValueError(
                f"The {split!r} split has no text column {data_args.text_column_name!r} (columns: "
                f"{dataset.column_names}). Pass --text_column_name with the column that holds the text."
            )
    if data_args.max_train_lines is not None:
        raw["train"] = raw["train"].select(range(min(data_args.max_train_lines, len(raw["train"]))))
    if "validation" not in raw:
        raw["train"], raw["validation"] = hold_out_validation(
            raw["train"], data_args.validation_split_percentage, "--validation_file"
        )
    return raw


def _with_newline(lines: list[str | None]) -> list[str]:
    return [(line or "") if (line or "").endswith("\n") else (line or "") + "\n" for line in lines]


BYTE_LEVEL_FLOOR = 257
"""The smallest vocabulary a retrained GPT-2 BPE has: its 256 byte tokens and ``<|endoftext|>`` (a smaller
``--tokenizer_vocab_size`` was silently raised to it)."""


def retrained_tokenizer(
    base: PreTrainedTokenizerBase, raw_train: datasets.Dataset, text_column: str, vocab_size: int,
    training_args: TrainingArguments,
) -> PreTrainedTokenizerBase:
    """The base tokenizer's byte-level BPE retrained on the training text (cached; computed once per node)."""
    # the column too: one data set's fingerprint covers all its columns, and each holds other text
    key = hashlib.sha256(f"{base.name_or_path}|{vocab_size}|{raw_train._fingerprint}|{text_column}".encode()
                         ).hexdigest()[:16]
    cache = Path(bundled._cache_root()) / f"bpe-{vocab_size}-{key}"
    with training_args.main_process_first(desc="tokenizer training"):
        if (cache / "tokenizer_config.json").is_file():
            return AutoTokenizer.from_pretrained(str(cache))
        texts = raw_train[text_column]
        batches = (_with_newline(texts[i : i + 1000]) for i in range(0, len(texts), 1000))
        tokenizer = base.train_new_from_iterator(batches, vocab_size=vocab_size)
        staging = cache.with_name(cache.name + f".tmp{os.getpid()}")
        tokenizer.save_pretrained(str(staging))
        try:
            staging.rename(cache)
        except OSError:  # another process saved it first
            pass
        # Reload from disk so that every run (and both A/B arms) tokenizes with an identical object, which lets
        # `datasets` reuse its cached tokenization.
        return AutoTokenizer.from_pretrained(str(cache)) if cache.is_dir() else tokenizer


def tokenize_and_group(
    raw: datasets.DatasetDict, tokenizer: PreTrainedTokenizerBase, data_args: DataArguments, block_size: int,
    training_args: TrainingArguments,
) -> datasets.DatasetDict:
    """Tokenize each line (newline kept), concatenate, and cut into ``block_size`` blocks with labels."""
    column = data_args.text_column_name

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        return tokenizer(_with_newline(batch[column]), return_attention_mask=False)

    def group(batch: dict[str, list]) -> dict[str, list]:
        ids = list(chain.from_iterable(batch["input_ids"]))
        usable = len(ids) // block_size * block_size
        blocks = [ids[i : i + block_size] for i in range(0, usable, block_size)]
        return {"input_ids": blocks, "attention_mask": [[1] * block_size for _ in blocks],
                "labels": [list(b) for b in blocks]}

    with training_args.main_process_first(desc="tokenizing"):
        splits = datasets.DatasetDict({k: raw[k] for k in ("train", "validation")})
        tokenized = splits.map(tokenize, batched=True, remove_columns=splits["train"].column_names,
                               num_proc=data_args.preprocessing_num_workers, desc="tokenizing")
        grouped = tokenized.map(group, batched=True, batch_size=1000, remove_columns=["input_ids"],
                                num_proc=data_args.preprocessing_num_workers, desc=f"grouping into {block_size}")
    for split, limit in (("train", data_args.max_train_samples), ("validation", data_args.max_eval_samples)):
        if limit is not None:
            grouped[split] = grouped[split].select(range(min(limit, len(grouped[split]))))
        if len(grouped[split]) == 0:
            raise ValueError(f"The {split!r} split is shorter than one block of {block_size} tokens.")
    return grouped


def test_token_stream(
    raw: datasets.DatasetDict, tokenizer: PreTrainedTokenizerBase, data_args: DataArguments
) -> tuple[str, torch.Tensor]:
    """The test split (or validation when there is none) as one token stream, tokenized like training."""
    split = "test" if "test" in raw else "validation"
    ids: list[int] = []
    for start in range(0, len(raw[split]), 1000):
        lines = _with_newline(raw[split][start : start + 1000][data_args.text_column_name])
        ids.extend(chain.from_iterable(tokenizer(lines, return_attention_mask=False)["input_ids"]))
        if data_args.max_test_tokens is not None and len(ids) >= data_args.max_test_tokens:
            ids = ids[: data_args.max_test_tokens]
            break
    return split, torch.tensor(ids, dtype=torch.long)


# --- model -----------------------------------------------------------------------------------------------------------


def load_tokenizer(model_args: ModelArguments) -> PreTrainedTokenizerBase:
    """The user's tokenizer, the pretrained model's, or the bundled GPT-2 tokenizer."""
    name = model_args.tokenizer_name or model_args.model_name_or_path
    if name is None:
        return AutoTokenizer.from_pretrained(bundled.gpt2_tokenizer_dir())
    check_model_reachable(name, "pass a local folder with --tokenizer_name / --model_name_or_path")
    flag = "--tokenizer_name" if model_args.tokenizer_name else "--model_name_or_path"
    no_tokenizer = f"{flag} {name} holds no usable tokenizer"
    fix = "pass a folder or Hub id that has one with --tokenizer_name."
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as error:
        if not os.path.isdir(name):  # a Hub id: transformers' own message says what is wrong
            raise
        first_line = (str(error).splitlines() or [""])[0]
        raise ValueError(f"{no_tokenizer} ({type(error).__name__}: {first_line}); {fix}") from error
    if len(tokenizer) < 2:  # transformers builds an empty tokenizer from a folder with a config but no vocabulary
        raise ValueError(f"{no_tokenizer} ({len(tokenizer)} token(s)); {fix}")
    return tokenizer


def base_config(model_args: ModelArguments) -> transformers.PretrainedConfig:
    """The model's config (pretrained) or a GPT-2 config with the from-scratch sizes (vocab set later)."""
    if model_args.model_name_or_path:
        sizes = [f"--{name}" for name in ("n_layer", "n_embd", "n_head") if getattr(model_args, name) is not None]
        if sizes and not model_args.from_scratch:
            raise ValueError(f"{' / '.join(sizes)} size a model trained from scratch; with --model_name_or_path the "
                             "checkpoint's sizes hold. Add --from_scratch (its config, new weights), or drop them.")
        check_model_reachable(model_args.model_name_or_path, "pass a local checkpoint folder to --model_name_or_path")
        config = AutoConfig.from_pretrained(model_args.model_name_or_path)
    else:
        config = GPT2Config()
    if model_args.from_scratch or not model_args.model_name_or_path:
        for name in ("n_layer", "n_embd", "n_head"):
            if getattr(model_args, name) is not None:
                setattr(config, name, getattr(model_args, name))
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(
                f"--n_embd {config.hidden_size} is not divisible by --n_head {config.num_attention_heads}."
            )
    return config


def build_model(
    model_args: ModelArguments, config: transformers.PretrainedConfig, tokenizer: PreTrainedTokenizerBase,
    block_size: int,
) -> torch.nn.Module:
    """A pretrained model, or a fresh one sized by ``config`` for ``tokenizer`` and ``block_size``."""
    if model_args.model_name_or_path and not model_args.from_scratch:
        model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path)
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer))
    else:
        config.vocab_size = len(tokenizer)
        config.n_positions = max(getattr(config, "n_positions", 0) if model_args.model_name_or_path else 0,
                                 block_size)
        config.bos_token_id = config.eos_token_id = tokenizer.eos_token_id
        model = AutoModelForCausalLM.from_config(config) if model_args.model_name_or_path else GPT2LMHeadModel(config)
    if getattr(model, "loss_type", None) is None:
        # transformers derives it from the class name, and "GPT2LMHeadModel" names no loss: Trainer then counts the
        # unshifted labels (block_size per row, not block_size - 1) and every loss came out (T - 1) / T too low, in
        # both arms, unlike the same weights reloaded as a ...ForCausalLM class
        model.loss_type = "ForCausalLM"
    return model


# --- one run ---------------------------------------------------------------------------------------------------------


def run(argv: list[str]) -> dict[str, Any]:
    """Train, evaluate and save one arm; returns its results record."""
    start = time.time()
    model_args, data_args, attn_args, _, training_args = parse_args(argv)
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())
    datasets.utils.logging.set_verbosity(training_args.get_process_log_level())
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)

    # Everything that can be wrong with the inputs is checked before training starts.
    if model_args.tokenizer_vocab_size and model_args.model_name_or_path and not model_args.from_scratch:
        raise ValueError("--tokenizer_vocab_size retrains the tokenizer: only valid when training from scratch.")
    if model_args.tokenizer_vocab_size and model_args.tokenizer_vocab_size < BYTE_LEVEL_FLOOR:
        raise ValueError(f"--tokenizer_vocab_size {model_args.tokenizer_vocab_size} is below what a byte-level BPE "
                         f"holds before any merge ({BYTE_LEVEL_FLOOR}: 256 bytes and <|endoftext|>); give at least "
                         f"{BYTE_LEVEL_FLOOR}, or 0 to keep the tokenizer.")
    config = base_config(model_args)
    layers = validate_attention_args(attn_args, config.num_hidden_layers)
    raw = load_raw_text(data_args)

    tokenizer = load_tokenizer(model_args)
    if model_args.tokenizer_vocab_size:
        tokenizer = retrained_tokenizer(tokenizer, raw["train"], data_args.text_column_name,
                                        model_args.tokenizer_vocab_size, training_args)
    max_positions = getattr(config, "n_positions", 1024)
    block_size = data_args.block_size or min(max_positions, 1024)
    check_data_limits(data_args, block_size, training_args)
    if model_args.model_name_or_path and not model_args.from_scratch and block_size > max_positions:
        raise ValueError(f"--block_size {block_size} exceeds the model's {max_positions} positions.")
    data = tokenize_and_group(raw, tokenizer, data_args, block_size, training_args)
    test_split, test_ids = test_token_stream(raw, tokenizer, data_args)
    if training_args.do_predict and test_ids.numel() < 2:
        raise ValueError(f"The {test_split} split has {test_ids.numel()} token(s): the sliding-window perplexity "
                         "scores each token after the first. Give a longer --test_file, or --do_predict False.")

    set_seed(training_args.seed)  # same base initialisation in both arms for a given seed
    model = build_model(model_args, config, tokenizer, block_size)
    model = apply_attention(model, attn_args, layers)
    n_params = sum(p.numel() for p in model.parameters())
    n_scorer = count_scorer_parameters(model)
    logger.info("attention=%s layers=%s parameters=%d (scorer %d)", attn_args.attention, layers, n_params, n_scorer)

    trainer = NeuralAttentionTrainer(
        model=model,
        args=training_args,
        train_dataset=data["train"] if training_args.do_train else None,
        eval_dataset=data["validation"] if training_args.do_eval else None,
        processing_class=tokenizer,
        data_collator=default_data_collator,
        compute_metrics=causal_lm_metrics(),
        preprocess_logits_for_metrics=causal_lm_per_block(training_args.label_smoothing_factor),
    )
    metrics: dict[str, Any] = {"n_parameters": n_params, "n_scorer_parameters": n_scorer,
                               "n_processes": training_args.world_size}
    if training_args.do_train:
        metrics.update(run_steps.train(trainer, training_args))
    if training_args.do_eval:
        eval_metrics = trainer.evaluate()
        eval_metrics["eval_perplexity"] = perplexity_from_loss(eval_metrics["eval_nll"])  # eval_loss if unsmoothed
        metrics.update(eval_metrics)
    if training_args.do_predict:
        metrics.update(sliding_window_metrics(trainer, test_ids, block_size, data_args, test_split))
    metrics["wall_time"] = time.time() - start
    trainer.save_metrics("all", metrics)

    record = {"recipe": "clm", "attention": attn_args.attention, "seed": training_args.seed,
              "neural_layers": layers if attn_args.attention == "neural" else [], "metrics": metrics,
              "argv": argv}
    card = {"finetuned_from": model_args.model_name_or_path, "tasks": "text-generation",
            "tags": ["neural-attention"] if attn_args.attention == "neural" else ["dot-product-attention"],
            "dataset": data_args.dataset_name or ("local files" if data_args.train_file else "wikitext excerpt")}
    return run_steps.publish(trainer, training_args, record, card)


def test_stride(data_args: DataArguments, block_size: int) -> int:
    """The test sliding window's stride: ``--sliding_window_stride``, default half a block."""
    stride = data_args.sliding_window_stride
    return max(block_size // 2, 1) if stride is None else stride


def check_data_limits(data_args: DataArguments, block_size: int, training_args: TrainingArguments) -> None:
    """Refuse, before anything trains, the limits that could only fail after it (``ValueError`` naming the flag);
    limits of a pass that does not run (``--do_predict False``, ...) are left alone."""
    if data_args.block_size is not None and data_args.block_size < 2:  # 0 once meant "the default", silently
        raise ValueError(f"--block_size {data_args.block_size}: a block needs at least 2 tokens (each scored token "
                         "follows another); leave it out for the model's maximum, at most 1024.")
    stride = test_stride(data_args, block_size)
    if training_args.do_predict and not 0 < stride < block_size:
        raise ValueError(f"--sliding_window_stride {stride} must be in 1..{block_size - 1} (below --block_size "
                         f"{block_size}: every scored token needs its predecessor inside the window).")
    for flag, value, least, used in (
        ("--max_train_lines", data_args.max_train_lines, 1, True),  # the tokenizer and the validation split read it
        ("--max_test_tokens", data_args.max_test_tokens, 2, training_args.do_predict),
        ("--max_train_samples", data_args.max_train_samples, 1, training_args.do_train),
        ("--max_eval_samples", data_args.max_eval_samples, 1, training_args.do_eval),
    ):
        if used and value is not None and value < least:
            raise ValueError(f"{flag} {value} leaves nothing to use; give at least {least} (or leave it out).")


def sliding_window_metrics(
    trainer: NeuralAttentionTrainer, test_ids: torch.Tensor, block_size: int, data_args: DataArguments, split: str
) -> dict[str, float]:
    """Strided sliding-window perplexity over the test stream, windows sharded across processes."""
    stride = test_stride(data_args, block_size)
    args = trainer.args
    nll, tokens = sliding_window_nll(
        trainer.model_wrapped, test_ids, max_length=block_size, stride=stride,
        batch_size=args.per_device_eval_batch_size, rank=args.process_index, world_size=args.world_size,
        device=args.device,
    )
    totals = torch.tensor([nll, float(tokens)], dtype=torch.float64, device=args.device)
    totals = trainer.accelerator.reduce(totals, reduction="sum").cpu()
    result = load_metric("perplexity").compute(nll_sum=[float(totals[0])], token_count=[int(totals[1])])
    return {"test_sliding_perplexity": result["perplexity"], "test_sliding_nll": result["nll"],
            "test_sliding_tokens": result["tokens"], "test_sliding_stride": stride,
            "test_sliding_window": block_size, "test_sliding_split": split}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Entry point: no arguments runs the embedded A/B default."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return main_entry(argv, run, parse_args, recipe="clm", task="causal LM", default_output_dir="out/clm-default-ab")


if __name__ == "__main__":
    main()
