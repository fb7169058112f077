"""Recipes: metrics against hand-computed values, input errors before training, smoke runs end to end
(single process and 2-process ``accelerate launch`` on CPU with resume), and compare.py's outputs."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
sys.path.insert(0, str(RECIPES))
sys.path.insert(0, str(REPO))

from common import bundled  # noqa: E402
from common.attention import resolve_layers  # noqa: E402
from common.cli import parse_with_presets  # noqa: E402
from common.metrics import causal_lm_metrics, causal_lm_per_block, classification_metrics, load_metric  # noqa: E402
from common.offline import OfflineResourceError, hub_reachable  # noqa: E402
from common.report import FINAL_PREFIX, comparison_table  # noqa: E402
from common.sliding_window import sliding_window_nll, window_plan  # noqa: E402

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
       "TOKENIZERS_PARALLELISM": "false"}
DDP_CONFIG = RECIPES / "configs" / "cpu_ddp_2proc.yaml"


def final_metrics(output: str) -> dict:
    lines = [line for line in output.splitlines() if line.startswith(FINAL_PREFIX)]
    assert lines, output[-3000:]
    return json.loads(lines[-1][len(FINAL_PREFIX):])


def launch(args: list[str], distributed: bool = False, timeout: int = 240) -> str:
    prefix = ["accelerate", "launch", "--config_file", str(DDP_CONFIG)] if distributed else [sys.executable]
    done = subprocess.run(prefix + args, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done.stdout


# --- metrics, by hand ---------------------------------------------------------------------------------------------


def test_accuracy_metric_matches_hand_values():
    accuracy = load_metric("accuracy")
    assert accuracy.compute(predictions=[0, 1, 1, 2], references=[0, 1, 2, 2]) == {"accuracy": 0.75}
    assert accuracy.compute(predictions=[0, 1, 1, 2], references=[0, 1, 2, 2], normalize=False)["accuracy"] == 3
    weighted = accuracy.compute(predictions=[0, 1, 1, 2], references=[0, 1, 2, 2], sample_weight=[1, 1, 2, 0])
    assert weighted["accuracy"] == pytest.approx(0.5)  # (1 + 1) / 4


def test_perplexity_metric_matches_hand_values():
    perplexity = load_metric("perplexity")
    result = perplexity.compute(nll_sum=[2.0, 4.0], token_count=[1, 2])
    assert result["nll"] == pytest.approx(2.0) and result["tokens"] == 3
    assert result["perplexity"] == pytest.approx(math.exp(2.0))
    with pytest.raises(ValueError, match="at least one scored token"):
        perplexity.compute(nll_sum=[0.0], token_count=[0])


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_the_recipes_losses_are_trainers_per_sample_with_label_smoothing_and_ignored_labels(smoothing):
    from transformers import EvalPrediction
    from transformers.modeling_outputs import CausalLMOutput
    from transformers.trainer_pt_utils import LabelSmoother

    generator = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(3, 7, 11, generator=generator), torch.randint(0, 11, (3, 7), generator=generator)
    labels[0, 3:] = -100  # padding: a shorter block
    per_block = causal_lm_per_block(smoothing)(logits, labels)
    metrics = causal_lm_metrics()(EvalPrediction(predictions=tuple(t.numpy() for t in per_block),
                                                 label_ids=labels.numpy()))
    smoothed = LabelSmoother(smoothing)(CausalLMOutput(logits=logits), labels, shift_labels=True)
    plain = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1))
    assert metrics["loss"] == pytest.approx(smoothed.item() if smoothing else plain.item(), rel=1e-5)
    assert metrics["nll"] == pytest.approx(plain.item(), rel=1e-5)
    shifted_hits = (logits[:, :-1].argmax(-1) == labels[:, 1:])[labels[:, 1:] != -100]
    assert metrics["accuracy"] == pytest.approx(shifted_hits.float().mean().item())

    images = torch.randn(5, 4, generator=generator)
    classes = torch.randint(0, 4, (5,), generator=generator)
    metrics = classification_metrics(smoothing)(EvalPrediction(predictions=images.numpy(), label_ids=classes.numpy()))
    expected = LabelSmoother(smoothing)({"logits": images}, classes[:, None])  # Trainer's (labels with a class dim)
    assert metrics["loss"] == pytest.approx(expected.item(), rel=1e-6)
    assert metrics["accuracy"] == pytest.approx((images.argmax(-1) == classes).float().mean().item())


def test_window_plan_scores_every_token_once():
    assert window_plan(10, 4, 2) == [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
    for n, length, stride in [(10, 4, 2), (37, 8, 3), (37, 8, 7), (5, 8, 4), (8, 8, 1)]:
        plan = window_plan(n, length, stride)
        scored = [t for _, end, first in plan for t in range(first, end)]
        assert scored == list(range(1, n))
        assert all(0 <= begin < first and end - begin == min(length, n) for begin, end, first in plan)
    with pytest.raises(ValueError, match="stride must be in 1..max_length-1"):
        window_plan(10, 4, 4)


class _UniformLM(torch.nn.Module):
    """Uniform next-token distribution: every token costs log(vocab) nats."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids, attention_mask=None):
        return type("Out", (), {"logits": torch.zeros(*input_ids.shape, self.vocab)})()


@pytest.mark.parametrize("world_size", [1, 2])
def test_sliding_window_nll_hand_value(world_size):
    ids = torch.arange(23) % 7
    totals = [sliding_window_nll(_UniformLM(7), ids, max_length=6, stride=4, batch_size=2, rank=r,
                                 world_size=world_size) for r in range(world_size)]
    assert sum(t[1] for t in totals) == 22
    assert sum(t[0] for t in totals) == pytest.approx(22 * math.log(7))


def test_comparison_table_mean_and_spread():
    runs = [{"attention": arm, "seed": s, "metrics": {"m": v}}
            for arm, s, v in [("neural", 0, 1.0), ("neural", 1, 3.0), ("dot", 0, 2.0), ("dot", 1, 2.0)]]
    table = comparison_table(runs, ["m"])
    assert "| neural | 2 ± 1.414 |" in table and "| dot | 2 ± 0 |" in table
    assert "| neural - dot | 0 ± 1.414 |" in table  # the per-seed differences -2 and 1: mean and spread


def test_comparison_table_pairs_seeds_and_says_when_a_seed_has_no_value():
    # a diverged seed (NaN): the difference is over the seeds both arms have, not the difference of unpaired means
    runs = [{"attention": arm, "seed": s, "metrics": {"m": v}}
            for arm, s, v in [("neural", 0, 1.0), ("neural", 1, float("nan")), ("neural", 2, 5.0),
                              ("dot", 0, 2.0), ("dot", 1, 2.0), ("dot", 2, 3.0)]]  # fmt: skip
    table = comparison_table(runs, ["m"])
    assert "| neural | 3 ± 2.828 (2 of 3) |" in table and "| dot | 2.333 ± 0.5774 |" in table
    assert "| neural - dot | 0.5 ± 2.121 (2 of 3) |" in table  # seeds 0 and 2: -1 and 2
    single = comparison_table([{"attention": "neural", "seed": 42, "metrics": {"m": 1.0}},
                               {"attention": "dot", "seed": 42, "metrics": {"m": 2.5}}], ["m"])
    assert single.splitlines()[-1] == "| neural - dot | -1.5 |"


def test_bundled_tokenizer_and_digits():
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(bundled.gpt2_tokenizer_dir())("Hello world")["input_ids"] == [15496, 995]
    digits = bundled.load_digits()
    assert sum(len(s["label"]) for s in digits.values()) == 1797 and digits["train"]["image"].shape[1:] == (8, 8)


# --- clear errors before any training ------------------------------------------------------------------------------


@pytest.fixture
def no_training(monkeypatch):
    """Fail loudly if a recipe gets as far as building a Trainer."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("training started before the input error was reported")

    monkeypatch.setattr(transformers.Trainer, "__init__", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub_reachable.cache_clear()
    yield
    hub_reachable.cache_clear()


def test_resolve_layers():
    assert resolve_layers(["0", "-1"], 4) == [0, 3] and resolve_layers(["all"], 3) == [0, 1, 2]
    with pytest.raises(ValueError, match="--neural_layers 4: Layer 4 is out of range: this model has 4"):
        resolve_layers(["4"], 4)
    with pytest.raises(ValueError, match=r"--neural_layers 3 -1: Layers \[3\] are selected more than once"):
        resolve_layers(["3", "-1"], 4)  # as patch_model refuses it (merged before)
    with pytest.raises(ValueError, match="takes integers or 'all', got 'first'"):
        resolve_layers(["first"], 4)


@pytest.mark.parametrize("recipe", ["run_clm", "run_image_classification"])
def test_do_eval_false_turns_the_presets_evaluation_off(recipe):
    # the presets set an eval strategy, for which TrainingArguments turned do_eval back on: an untrained model was
    # evaluated and reported
    module = __import__(recipe)
    training_args = module.parse_args(["--smoke", "--do_eval", "False"])[-1]
    assert training_args.do_eval is False and training_args.eval_strategy.value == "no"
    training_args = module.parse_args(["--smoke", "--do_eval", "False", "--eval_strategy", "steps"])[-1]
    assert training_args.eval_strategy.value == "steps"  # the user's own strategy wins (and Trainer evaluates)


@pytest.mark.parametrize("recipe", ["run_clm", "run_image_classification"])
def test_switches_set_false_stay_off_and_bare_switches_turn_on(recipe):
    # the presets were chosen by the flag's presence: --smoke False trained the tiny smoke model for 4 steps, and
    # --from_scratch False fine-tuned a pretrained model at the from-scratch learning rate and length
    module = __import__(recipe)
    for argv in (["--smoke", "False"], ["--smoke=false"]):
        assert module.parse_args(argv)[-1].max_steps == module.parse_args([])[-1].max_steps
    assert module.parse_args(["--smoke", "True"])[-1].max_steps == 4
    pretrained = ["--model_name_or_path", "some/checkpoint"]
    expected = module.parse_args(pretrained)[-1]
    got = module.parse_args([*pretrained, "--from_scratch", "False"])[-1]
    assert (got.learning_rate, got.max_steps, got.num_train_epochs) == (
        expected.learning_rate, expected.max_steps, expected.num_train_epochs)
    scratch = module.parse_args([*pretrained, "--from_scratch"])[-1]
    assert scratch.learning_rate != expected.learning_rate
    # a switch whose default is None ("per MLP") takes the bare form like the others
    shares = [module.parse_args(argv)[2].share_across_heads for argv in (
        [], ["--share_across_heads"], ["--share_across_heads", "False"])]
    assert shares == [None, True, False]


def test_clm_input_errors(tmp_path, no_training):
    import run_clm

    base = ["--smoke", "--output_dir", str(tmp_path / "out")]
    with pytest.raises(ValueError, match="--neural_layers 5: Layer 5 is out of range: this model has 2 self-attention"):
        run_clm.run(base + ["--neural_layers", "5"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"content": "no text column here"}\n' * 4)
    with pytest.raises(ValueError, match="no text column 'text'.*--text_column_name"):
        run_clm.run(base + ["--train_file", str(bad)])
    with pytest.raises(OfflineResourceError, match="needs the network.*--train_file"):
        run_clm.run(base + ["--dataset_name", "someone/not-a-cached-dataset"])
    # limits that used to fail only after training (its results lost) or be replaced silently
    with pytest.raises(AssertionError, match="training started"):  # no test pass: its stride is not checked
        run_clm.run(base + ["--sliding_window_stride", "32", "--do_predict", "False"])
    for flags, message in ((["--sliding_window_stride", "32"], r"--sliding_window_stride 32 must be in 1\.\.31"),
                           (["--sliding_window_stride", "0"], r"--sliding_window_stride 0 must be in 1\.\.31"),
                           (["--max_test_tokens", "1"], "--max_test_tokens 1 leaves nothing"),
                           (["--max_train_samples", "0"], "--max_train_samples 0 leaves nothing"),
                           (["--max_train_lines", "0"], "--max_train_lines 0 leaves nothing"),
                           (["--block_size", "0"], "--block_size 0: a block needs at least 2 tokens"),
                           (["--block_size", "1"], "--block_size 1: a block needs at least 2 tokens"),
                           (["--tokenizer_vocab_size", "50"], r"--tokenizer_vocab_size 50 is below .* \(257: 256"),
                           (["--mlp", "authors", "--mlp_precision", "fp16"], r"mlp_precision='fp16'.*mlp='authors'"),
                           ):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            run_clm.run(base + flags)
    with pytest.raises(ValueError, match=r"/nope/model does not exist \(a local path, not a Hub id\)"):
        run_clm.run(base + ["--model_name_or_path", str(tmp_path / "nope" / "model")])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--neural_backend triton needs a CUDA GPU.*--neural_backend auto"):
            run_clm.run(base + ["--neural_backend", "triton"])
    from common.ab import run_ab

    with pytest.raises(ValueError, match="names one arm's checkpoint.*--resume_from_checkpoint latest"):
        run_ab(base + ["--attention", "ab", "--resume_from_checkpoint", str(tmp_path / "out" / "neural" / "ckpt")],
               run_clm.run, run_clm.parse_args, "clm", "language modelling")
    (tmp_path / "out" / "neural" / "checkpoint-2").mkdir(parents=True)  # one arm's: refused before it reruns
    with pytest.raises(ValueError, match=r"no checkpoint of the dot arm in .*out/\{dot\}"):
        run_ab(base + ["--attention", "ab", "--resume_from_checkpoint", "latest"], run_clm.run, run_clm.parse_args,
               "clm", "language modelling")
    with pytest.raises(ValueError, match="--n_layer / --n_head size a model trained from scratch.*--from_scratch"):
        run_clm.run(base + ["--model_name_or_path", str(tmp_path / "some" / "model"), "--n_layer", "6", "--n_head",
                            "2"])
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"--test_file .*empty\.txt: empty file\(s\)"):
        run_clm.run(base + ["--test_file", str(empty), "--train_file", str(RECIPES / "data" /
                                                                          "wikitext_excerpt_train.txt.gz")])
    newline = tmp_path / "newline.txt"
    newline.write_text("\n")
    with pytest.raises(ValueError, match=r"test split has [01] token\(s\).*longer --test_file"):
        run_clm.run(base + ["--test_file", str(newline), "--train_file", str(RECIPES / "data" /
                                                                            "wikitext_excerpt_train.txt.gz"),
                            "--validation_file", str(RECIPES / "data" / "wikitext_excerpt_validation.txt.gz")])
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2)).save_pretrained(tmp_path / "no_tokenizer")
    with pytest.raises(ValueError, match="holds no usable tokenizer.*--tokenizer_name"):
        run_clm.run(base + ["--model_name_or_path", str(tmp_path / "no_tokenizer")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="--tokenizer_name .*/empty holds no usable tokenizer"):
        run_clm.run(base + ["--tokenizer_name", str(tmp_path / "empty")])
    # too little training data to hold out a validation split, or a share that holds out nothing / everything
    one_line = tmp_path / "one_line.txt"
    one_line.write_text("a single line of training text\n")
    with pytest.raises(ValueError, match=r"has 1 row\(s\): too few to hold out 5% .*--validation_file"):
        run_clm.run(base + ["--train_file", str(one_line)])
    lines = tmp_path / "lines.txt"
    lines.write_text("a line of training text\n" * 20)
    for share in ("0", "100"):
        with pytest.raises(ValueError, match=f"--validation_split_percentage {share} must lie strictly between"):
            run_clm.run(base + ["--train_file", str(lines), "--validation_split_percentage", share])


def test_image_input_errors(tmp_path, no_training):
    import run_image_classification as run_image
    from PIL import Image

    base = ["--smoke", "--output_dir", str(tmp_path / "out")]
    with pytest.raises(ValueError, match="Image size 8 is not divisible by the patch size 3"):
        run_image.run(base + ["--patch_size", "3"])
    with pytest.raises(ValueError, match="--hidden_size size a model trained from scratch.*--from_scratch"):
        run_image.run(base + ["--model_name_or_path", str(tmp_path / "vit"), "--hidden_size", "64"])
    with pytest.raises(ValueError, match="--neural_layers -3: Layer -3 is out of range"):
        run_image.run(base + ["--neural_layers", "-3"])
    with pytest.raises(ValueError, match="No label column 'nope'"):
        run_image.run(base + ["--label_column_name", "nope"])
    flat = tmp_path / "flat"  # images without class folders: no label column
    flat.mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(flat / f"{i}.png")
    with pytest.raises(ValueError, match="no label column"):
        run_image.run(base + ["--train_dir", str(flat)])
    with pytest.raises(OfflineResourceError, match="needs the network.*--train_dir"):
        run_image.run(base + ["--dataset_name", "someone/not-a-cached-dataset"])
    for flag in ("--max_train_samples", "--max_eval_samples"):
        with pytest.raises(ValueError, match=f"{flag} 0 leaves nothing"):
            run_image.run(base + [flag, "0"])
    labelled = tmp_path / "labelled"  # class folders, no validation folder: validation is held out of train
    for label in ("a", "b"):
        (labelled / label).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(labelled / label / f"{i}.png")
    with pytest.raises(ValueError, match="--validation_split_percentage 0 must lie strictly between.*--validation_dir"):
        run_image.run(base + ["--train_dir", str(labelled), "--validation_split_percentage", "0"])


# --- end to end ----------------------------------------------------------------------------------------------------


def _check_saved(output_dir: Path, auto_class: str, hub_class: str) -> None:
    import transformers

    import hf_neural_attention  # noqa: F401  (registers the Hub classes)

    assert (output_dir / "model.safetensors").is_file()
    config = json.loads((output_dir / "config.json").read_text())
    assert config.get("neural_attention_layers") == [0] and "auto_map" in config
    model = getattr(transformers, auto_class).from_pretrained(output_dir)
    assert type(model).__name__ == hub_class
    assert (output_dir / "README.md").is_file()  # model card


@pytest.mark.parametrize(
    "script, auto_class, hub_class, metric",
    [
        ("run_clm.py", "AutoModelForCausalLM", "NeuralAttentionGPT2ForCausalLM", "test_sliding_perplexity"),
        ("run_image_classification.py", "AutoModelForImageClassification",
         "NeuralAttentionViTForImageClassification", "test_accuracy"),
    ],
)
def test_smoke_end_to_end_then_two_process_resume(tmp_path, script, auto_class, hub_class, metric):
    single = tmp_path / "single"
    out = launch([str(RECIPES / script), "--smoke", "--output_dir", str(single), "--save_strategy", "steps",
                  "--save_steps", "2"])
    metrics = final_metrics(out)
    assert metrics["n_processes"] == 1 and metrics["n_scorer_parameters"] > 0 and math.isfinite(metrics[metric])
    assert json.loads((single / "trainer_state.json").read_text())["global_step"] == 4
    _check_saved(single, auto_class, hub_class)

    # the saved neural checkpoint evaluated again: it keeps its neural layers (patching them again once failed deep
    # inside) and gives the final evaluation's loss; the dot arm refuses it instead of reporting it as dot-product
    again = final_metrics(launch([str(RECIPES / script), "--smoke", "--output_dir", str(tmp_path / "again"),
                                  "--model_name_or_path", str(single), "--do_train", "False", "--do_predict", "False"]))
    assert again["eval_loss"] == pytest.approx(metrics["eval_loss"], rel=1e-6)
    assert again["n_scorer_parameters"] == metrics["n_scorer_parameters"]
    refused = subprocess.run([sys.executable, str(RECIPES / script), "--smoke", "--output_dir", str(tmp_path / "dot"),
                              "--model_name_or_path", str(single), "--attention", "dot"], cwd=REPO, env=ENV,
                             capture_output=True, text=True, timeout=240)  # fmt: skip
    assert refused.returncode != 0 and "needs a stock checkpoint" in refused.stderr, refused.stderr[-2000:]

    # 2 processes (gloo), resuming the single run's step-2 checkpoint, training on to step 6. 13 evaluation samples in
    # batches of 5 per process: accelerate fills the last batch up with samples from the split's start
    ddp = tmp_path / "ddp"
    uneven = ["--max_eval_samples", "13", "--per_device_eval_batch_size", "5"]
    out = launch([str(RECIPES / script), "--smoke", "--output_dir", str(ddp), "--max_steps", "6",
                  "--resume_from_checkpoint", str(single / "checkpoint-2"), *uneven], distributed=True)
    ddp_metrics = final_metrics(out)
    assert ddp_metrics["n_processes"] == 2 and set(ddp_metrics) == set(metrics)
    state = json.loads((ddp / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    logged = [e["step"] for e in state["log_history"] if "loss" in e]
    assert logged[0] == 1 and logged[-1] == 6  # history carried over from the checkpoint, continued from 3
    _check_saved(ddp, auto_class, hub_class)

    # ... and its losses are those of the same weights evaluated in one process: Trainer's own loss counted the
    # samples that filled the last batch up (the accuracy, gathered per sample, never did)
    alone = final_metrics(launch([str(RECIPES / script), "--smoke", "--output_dir", str(tmp_path / "alone"),
                                  "--model_name_or_path", str(ddp), "--do_train", "False", *uneven,
                                  *(["--do_predict", "False"] if script == "run_clm.py" else [])]))
    compared = [key for key in ("eval_loss", "eval_nll", "eval_accuracy", "test_loss", "test_accuracy") if key in alone]
    assert len(compared) == (3 if script == "run_clm.py" else 4)
    for key in compared:
        assert ddp_metrics[key] == pytest.approx(alone[key], rel=1e-6), key


@pytest.mark.parametrize("script, samples", [("run_image_classification.py", "40"), ("run_clm.py", "20")])
def test_a_run_resumed_halfway_ends_with_the_weights_of_an_uninterrupted_one(tmp_path, script, samples):
    # the image augmentation's generator was not in the checkpoint: the resumed run drew the first half's crops again
    flags = ["--smoke", "--max_steps", "12", "--save_strategy", "steps", "--save_steps", "6", "--do_predict", "False",
             "--max_train_samples", samples]  # 5 batches an epoch: the resume starts inside the second epoch
    launch([str(RECIPES / script), *flags, "--output_dir", str(tmp_path / "full")])
    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-6", tmp_path / "resumed" / "checkpoint-6")
    launch([str(RECIPES / script), *flags, "--output_dir", str(tmp_path / "resumed"), "--resume_from_checkpoint",
            "latest"])
    full, resumed = (load_file(tmp_path / run / "model.safetensors") for run in ("full", "resumed"))
    assert full.keys() == resumed.keys()
    for name in full:
        torch.testing.assert_close(resumed[name], full[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("workers", [0, 2])
def test_augmentations_depend_on_the_epoch_and_the_sample_not_on_the_worker(workers):
    from common.images import Augmentation, bundled_digits, make_transform, with_sample_index
    from transformers import ViTImageProcessor

    digits = with_sample_index(bundled_digits()["train"].select(range(12)))
    processor = ViTImageProcessor(size={"height": 8, "width": 8}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    augmentation = Augmentation("crop", seed=42)
    digits.set_transform(make_transform(processor, "image", "label", None, augmentation))
    plain = bundled_digits()["train"].select(range(12))
    plain.set_transform(make_transform(processor, "image", "label", None, None))

    def epoch(dataset, epoch_index):  # the pixels of every sample, in order
        augmentation.epoch = epoch_index
        loader = torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=workers,
                                             collate_fn=lambda batch: batch[0]["pixel_values"])
        return torch.stack(list(loader))

    first, again, second = epoch(digits, 0), epoch(digits, 0), epoch(digits, 1)
    expected = torch.stack([digits[i]["pixel_values"] for i in range(12)])  # epoch 1 is set: drawn in this process
    assert torch.equal(second, expected) and torch.equal(first, again)
    assert not torch.equal(first, second)  # a new epoch, new crops
    moved = [not torch.equal(first[i], plain[i]["pixel_values"]) for i in range(12)]
    assert 3 <= sum(moved) < 12  # crops by up to one pixel: most samples moved, some by (0, 0)


def test_compare_two_seeds_writes_csv_table_and_plots(tmp_path):
    import csv

    import compare
    from PIL import Image

    out = tmp_path / "cmp"
    compare.main(["--recipe", "image", "--seeds", "0", "1", "--output_dir", str(out), "--",
                  "--smoke", "--max_steps", "2", "--eval_steps", "1", "--do_predict", "False",
                  "--report_to", "none"])
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert sorted((r["attention"], r["seed"]) for r in rows) == [("dot", "0"), ("dot", "1"), ("neural", "0"),
                                                                 ("neural", "1")]
    table = (out / "results.md").read_text()
    assert "| neural |" in table and "| dot |" in table and "| neural - dot |" in table and " ± " in table
    for name in ("eval_loss", "eval_accuracy"):
        with Image.open(out / f"curve_{name}.png") as image:
            assert image.format == "PNG" and image.size[0] > 100


def test_compare_refuses_results_of_other_arguments_and_arms_get_their_own_hub_repos(tmp_path):
    import compare
    from common.cli import canonical_flags, comparable_flags, flag_value, with_arm_hub_id

    out = tmp_path / "cmp"
    arguments = ["--recipe", "image", "--seeds", "0", "--arms", "dot", "--output_dir", str(out), "--", "--smoke",
                 "--max_steps", "1", "--do_predict", "False", "--report_to", "none"]
    compare.main(arguments)
    compare.main(arguments)  # the same arguments: the stored results are reused
    respelled = arguments[:-6] + ["--report_to=none", "--do_predict", "False", "--max_steps=1"]
    compare.main(respelled)  # the same settings spelled otherwise: reused too
    with pytest.raises(SystemExit, match="--metrics eval_acuracy: no run reported it.*eval_accuracy"):
        compare.main(arguments[:8] + ["--metrics", "eval_loss", "eval_acuracy"] + arguments[8:])
    with pytest.raises(SystemExit, match="holds results made with other recipe arguments.*--overwrite"):
        compare.main(arguments[:-6] + ["--max_steps", "2", "--do_predict", "False", "--report_to", "none"])
    # a run made under another launcher (2 processes: twice the global batch) does not pool with the others
    recipe_args = arguments[arguments.index("--") + 1:]
    record = json.loads((out / "dot" / "seed_0" / "recipe_results.json").read_text())
    record.update(seed=1, argv=compare.arm_arguments(str(out), recipe_args, "dot", 1)[0])
    record["metrics"]["n_processes"] = 2
    (out / "dot" / "seed_1").mkdir()
    (out / "dot" / "seed_1" / "recipe_results.json").write_text(json.dumps(record))
    with pytest.raises(SystemExit, match=r"different numbers of processes \[1, 2\]"):
        compare.main([*arguments[:3], "0", "1", *arguments[4:]])
    assert with_arm_hub_id(["--smoke", "--hub_model_id", "me/a"], "dot") == ["--smoke", "--hub_model_id", "me/a-dot"]
    assert canonical_flags(["--neural_layers", "0", "-1", "--smoke"]) == {"neural_layers": "0 -1", "smoke": "True"}
    assert comparable_flags(["--smoke", "--learning_rate", "1e-3"]) == comparable_flags(
        ["--learning_rate=0.001", "--smoke", "true"])
    assert comparable_flags(["--dataset_config_name", "1"]) != comparable_flags(["--dataset_config_name", "1.0"])
    # --push_to_hub without an id: transformers would name both arms' repos after their folder, seed_<N>
    arms = [compare.arm_arguments(str(tmp_path / "exp"), ["--push_to_hub"], arm, 3)[0] for arm in ("neural", "dot")]
    assert [flag_value(argv, "hub_model_id") for argv in arms] == ["exp-neural-seed3", "exp-dot-seed3"]
    assert with_arm_hub_id(["--hub_model_id=me/run"], "neural-seed0") == ["--hub_model_id", "me/run-neural-seed0"]
    assert with_arm_hub_id(["--smoke"], "dot") == ["--smoke"]


def test_the_retrained_tokenizer_is_cached_per_text_column(tmp_path, monkeypatch):
    # one data set's fingerprint covers every column: a run on column "b" got the BPE trained on column "a"
    import datasets
    import run_clm
    from common import bundled
    from transformers import AutoTokenizer, TrainingArguments

    monkeypatch.setenv("HF_NEURAL_ATTENTION_CACHE", str(tmp_path / "cache"))
    base = AutoTokenizer.from_pretrained(bundled.gpt2_tokenizer_dir())
    rows = datasets.Dataset.from_dict({"a": ["the cat sat on the mat"] * 50, "b": ["xyzqj qjxyz zzqj"] * 50})
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True)
    vocabularies = [run_clm.retrained_tokenizer(base, rows, column, 300, args).get_vocab() for column in ("a", "b")]
    assert vocabularies[0] != vocabularies[1]


def test_an_ab_run_names_its_arms_repos_after_its_folder_and_reads_resume_true_as_latest(tmp_path):
    # without --hub_model_id every A/B run pushed to <user>/neural and <user>/dot; --resume_from_checkpoint True (a
    # single run's "latest") was refused as one arm's checkpoint
    import run_clm
    from common.ab import run_ab
    from common.cli import flag_value

    class FirstArm(Exception):
        pass

    arms = []

    def first_arm(argv: list[str]) -> None:
        arms.append(argv)
        raise FirstArm

    with pytest.raises(FirstArm):
        run_ab(["--smoke", "--push_to_hub", "--output_dir", str(tmp_path / "exp")], first_arm, run_clm.parse_args,
               "clm", "language modelling")
    assert flag_value(arms[0], "hub_model_id") == "exp-neural"
    with pytest.raises(ValueError, match="latest: no checkpoint of the neural and dot arm"):
        run_ab(["--smoke", "--output_dir", str(tmp_path / "new"), "--resume_from_checkpoint", "True"], first_arm,
               run_clm.parse_args, "clm", "language modelling")


def test_resuming_with_other_attention_or_size_flags_is_refused_before_training(tmp_path):
    # Trainer loads a checkpoint's weights non-strictly and its optimizer state by position: with other flags a
    # resumed run trained relu weights as gelu, failed inside the optimizer (--attention dot) or ran out of memory
    # (--neural_layers 1)
    import run_clm

    first = ["--smoke", "--save_steps", "2", "--do_predict", "False", "--report_to", "none"]
    run_clm.run(first + ["--output_dir", str(tmp_path / "first")])
    checkpoint = str(tmp_path / "first" / "checkpoint-2")
    resume = first + ["--output_dir", str(tmp_path / "resumed"), "--resume_from_checkpoint", checkpoint]
    for flags, message in ((["--activation", "gelu"], "activation 'relu' there, 'gelu' here"),
                           (["--neural_layers", "1"], r"layers \[0\] there, \[1\] here"),
                           (["--attention", "dot"], r"layers \[0\] there, None here"),
                           (["--n_embd", "64"], r"c_attn\.weight \(32, 96\) there, \(64, 192\) here"),
                           (["--n_layer", "3"], "n_layer 2 there, 3 here"),
                           (["--n_head", "4"], "n_head 2 there, 4 here")):  # every weight's shape alike
        with pytest.raises(ValueError, match=f"written by a run with other flags: .*{message}.*another --output_dir"):
            run_clm.run(resume + flags)
    assert not (tmp_path / "resumed").exists() or not any((tmp_path / "resumed").glob("checkpoint-*"))
    record = run_clm.run(resume)  # the same flags resume
    assert record["metrics"]["train_runtime"] > 0


def test_a_resume_check_compares_vit_weights_under_the_names_the_model_loads_them_by(tmp_path):
    # a ViT checkpoint holds vit.layers.* as vit.encoder.layer.*: compared by name, no encoder weight was, and a
    # resume with another --intermediate_size crashed inside the optimizer
    from common.run import check_resumable

    from tests.models import tiny_vit

    tiny_vit(intermediate_size=48).save_pretrained(tmp_path)
    check_resumable(tiny_vit(intermediate_size=48), str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    del config["intermediate_size"]  # left to the weights' shapes
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"vit\.layers\.0\.\S+ \(48, 32\) there, \(64, 32\) here"):
        check_resumable(tiny_vit(intermediate_size=64), str(tmp_path))


def test_a_resume_check_ignores_the_package_version_and_kernel_choices(tmp_path):
    # a checkpoint of an older release records another version and lacks later settings (their defaults hold); the
    # backend and MLP precision pick kernels: none of these blocks a resume, a changed setting still does
    from common.run import check_resumable

    from hf_neural_attention import patch_model
    from tests.models import tiny_gpt2

    model = patch_model(tiny_gpt2(), layers=[0], proj_dim=4)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(neural_attention_version="0.0.1", neural_attention_backend="tiled")
    for later in ("neural_attention_mode", "neural_attention_mlp_precision"):
        config.pop(later, None)
    (tmp_path / "config.json").write_text(json.dumps(config))
    check_resumable(model, str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({**config, "neural_attention_mode": "residual"}))
    with pytest.raises(ValueError, match="mode 'residual' there, 'replace' here"):
        check_resumable(model, str(tmp_path))


def test_resume_latest_without_checkpoints_names_the_save_strategy(tmp_path):
    import run_image_classification as run_image

    with pytest.raises(ValueError, match="no checkpoint in .*--save_strategy steps\\|epoch; this run saves with 'no'"):
        run_image.run(["--smoke", "--output_dir", str(tmp_path / "out"), "--save_strategy", "no",
                       "--resume_from_checkpoint", "latest", "--report_to", "none"])


def test_quick_benchmark_runs_write_where_nothing_kept_lives():
    # the quick runs of bench_compile / bench_end_to_end wrote results/<name>_quick.csv, which the README cites
    import argparse

    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_end_to_end

    for quick, expected in ((True, REPO / "benchmarks" / "results" / "quick" / "compile.csv"),
                            (False, REPO / "benchmarks" / "results" / "compile.csv")):
        args = argparse.Namespace(quick=quick, output=None, steps=None)
        bench_end_to_end.fill_defaults(args, {"steps": 1}, {"steps": 2}, "compile")
        assert args.output == expected and args.steps == (1 if quick else 2)
    assert "benchmarks/results/quick/" in (REPO / ".gitignore").read_text().split()  # never a kept result


@pytest.mark.parametrize("flags", [["--backends", "tiled", "--modes", "forward"],
                                   ["--position-bias", "--backends", "sdpa", "tiled", "eager"],
                                   ["--softcap", "5", "--sinks", "--backends", "sdpa", "tiled", "cpp", "fused-cpp",
                                    "cpp-authors", "eager"]])
def test_bench_attention_writes_every_output(tmp_path, flags):
    # without the sdpa row (no ratio to print); with a score bias in every variant, forward and backward; with a cap
    # and sinks in every neural variant
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_attention.py"), "--seq-lens", "64",
                           "--dims", "2", "--reps", "1", "--no-memory", "--output", str(tmp_path), *flags], cwd=REPO,
                          env=ENV, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert {"bench_attention.csv", "bench_attention.md", "environment.json"} <= {p.name for p in tmp_path.iterdir()}
    rows = (tmp_path / "bench_attention.csv").read_text().splitlines()[1:]
    after = flags[flags.index("--backends") + 1:]
    backends = after[: next((i for i, flag in enumerate(after) if flag.startswith("--")), len(after))]
    assert len(rows) == len(backends) * (1 if "--modes" in flags else 2) and all(",ok," in row for row in rows)


@pytest.mark.parametrize("script, flags, message", [
    ("bench_attention.py", ["--reps", "0"], "argument --reps: 0 must be at least 1"),
    ("bench_attention.py", ["--softcap", "0"], "--softcap must be a positive number"),
    ("bench_end_to_end.py", ["--steps", "0"], "argument --steps: 0 must be at least 1"),
    ("bench_compile.py", ["--device", "gpu"], "--device gpu: not a device name"),
    pytest.param("bench_end_to_end.py", ["--device", "cuda"], "sees no CUDA GPU; use --device cpu",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")),
])
def test_benchmarks_refuse_bad_flags_before_running(script, flags, message):
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *flags], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and message in done.stderr, done.stderr[-3000:]  # argparse's usage-error status


def test_push_to_hub_uploads_hub_classes_and_model_card(tmp_path, monkeypatch):
    """--push_to_hub: intercept only the Hub calls, then load the folder that would have been uploaded."""
    import run_image_classification as run_image
    import transformers
    import transformers.trainer

    uploads: list[dict] = []

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            return type("RepoUrl", (), {"repo_id": repo_id})()

        def upload_folder(self, repo_id, folder_path, **kwargs):
            uploads.append({"repo_id": repo_id, "files": sorted(os.listdir(folder_path)), "path": folder_path})
            if kwargs.get("run_as_future"):  # the Trainer's push of each saved checkpoint runs in the background
                from concurrent.futures import Future

                done = Future()
                done.set_result(None)
                return done
            return None

    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: FakeApi())
    out = tmp_path / "push"
    run_image.run(["--smoke", "--max_steps", "1", "--output_dir", str(out), "--push_to_hub", "--hub_model_id",
                   "me/vit-neural", "--do_predict", "False", "--report_to", "none"])
    final = uploads[-1]
    assert final["repo_id"] == "me/vit-neural" and Path(final["path"]) == out
    assert {"config.json", "model.safetensors", "README.md", "modeling_neural_attention.py"} <= set(final["files"])
    assert "neural-attention" in (out / "README.md").read_text()
    _check_saved(out, "AutoModelForImageClassification", "NeuralAttentionViTForImageClassification")


def test_accelerate_configs_load_and_scorer_sits_inside_a_wrapped_block():
    """Every shipped config parses; FSDP wraps `_no_split_modules`, and each scorer weight lives inside one."""
    from accelerate.commands.config.config_args import load_config_from_file
    from transformers import GPT2Config, GPT2LMHeadModel, ViTConfig, ViTForImageClassification

    from hf_neural_attention import NeuralAttentionConfig, patch_model, scorer_parameters

    configs = {p.name: load_config_from_file(str(p)) for p in (RECIPES / "configs").glob("*.yaml")}
    assert {"cpu_ddp_2proc.yaml", "fsdp.yaml", "deepspeed_zero2.yaml", "deepspeed_zero3.yaml"} <= set(configs)
    assert configs["fsdp.yaml"].fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert "fsdp_transformer_layer_cls_to_wrap" not in configs["fsdp.yaml"].fsdp_config  # -> _no_split_modules

    models = [
        GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16)),
        ViTForImageClassification(ViTConfig(image_size=8, patch_size=2, hidden_size=32, num_hidden_layers=2,
                                            num_attention_heads=2, intermediate_size=64, num_labels=3)),
    ]
    for model in models:
        patch_model(model, layers=[0, -1], config=NeuralAttentionConfig())
        blocks = {name for name, module in model.named_modules()
                  if type(module).__name__ in set(model._no_split_modules)}
        names = list(scorer_parameters(model))
        assert names
        for name in names:
            assert any(name.startswith(block + ".") for block in blocks), (name, sorted(blocks))


def test_sliding_window_matches_full_sequence_loss_and_is_batch_invariant():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=64)).eval()
    ids = torch.randint(0, 50, (20,))
    with torch.no_grad():
        full = model(input_ids=ids[None], labels=ids[None]).loss.item()
    nll, tokens = sliding_window_nll(model, ids, max_length=32, stride=8)  # one window covers everything
    assert tokens == 19 and nll / tokens == pytest.approx(full, rel=1e-5)
    one = sliding_window_nll(model, ids, max_length=6, stride=4, batch_size=1)
    three = sliding_window_nll(model, ids, max_length=6, stride=4, batch_size=3)
    assert one[1] == three[1] == 19 and one[0] == pytest.approx(three[0], rel=1e-6)


@pytest.mark.parametrize("recipe", ["run_clm.py", "run_image_classification.py"])
def test_ab_mode_runs_both_arms_and_prints_the_comparison(tmp_path, recipe):
    """The embedded default's path (``--attention ab``), at smoke size: two arms, one table, scorers only in one."""
    out = launch([str(RECIPES / recipe), "--attention", "ab", "--smoke", "--output_dir", str(tmp_path)])
    records = [json.loads(line[len(FINAL_PREFIX):]) for line in out.splitlines() if line.startswith(FINAL_PREFIX)]
    assert [r["n_scorer_parameters"] > 0 for r in records] == [True, False]
    assert "Neural vs dot-product attention" in out
    table = out[out.index("Neural vs dot-product attention"):]
    assert "| neural |" in table and "| dot |" in table and "| neural - dot |" in table
    assert (tmp_path / "neural").is_dir() and (tmp_path / "dot").is_dir()


@pytest.mark.parametrize("precision", ["no", "bf16", "fp16"])
def test_the_accelerate_configs_mixed_precision_reaches_the_trainer(precision, monkeypatch, tmp_path):
    # accelerate launch exports the config's mixed_precision, which Trainer follows; DeepSpeed refuses to start when
    # TrainingArguments' flag disagrees (bf16.enabled against bf16=False), so the recipes preset the matching flag
    from transformers import TrainingArguments

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", precision)
    presets = [["--output_dir", str(tmp_path)]]
    (args,) = parse_with_presets((TrainingArguments,), presets, ["--report_to", "none"])
    assert (args.bf16, args.fp16) == (precision == "bf16", precision == "fp16")
    if precision == "bf16":  # the other precision asked for replaces the preset (both set would be a ValueError)
        for flag in (["--fp16", "True"], ["--fp16"], ["--fp16=true"]):
            (args,) = parse_with_presets((TrainingArguments,), presets, ["--report_to", "none", *flag])
            assert (args.bf16, args.fp16) == (False, True), flag
    if precision == "fp16":  # --bf16 False says nothing about fp16: the preset stays
        (args,) = parse_with_presets((TrainingArguments,), presets, ["--report_to", "none", "--bf16", "False"])
        assert (args.bf16, args.fp16) == (False, True)


@pytest.mark.parametrize(
    ("argv", "hidden", "intermediate"),
    [([], 64, 128), (["--hidden_size", "512"], 512, 2048), (["--hidden_size", "512", "--intermediate_size", "300"],
     512, 300), (["--smoke"], 16, 32), (["--smoke", "--hidden_size", "24"], 24, 96)],
)
def test_image_scratch_sizes_follow_a_given_width(argv, hidden, intermediate):
    # the documented CIFAR-100 command gives --hidden_size 512 alone: its MLP is 4x wide, not the preset's 128
    import run_image_classification as run_image

    model_args = run_image.parse_args(["--report_to", "none", *argv])[0]
    config = run_image.scratch_config(model_args, native_size=32, labels=["a", "b"])
    assert (config.hidden_size, config.intermediate_size) == (hidden, intermediate)


def test_clm_eval_loss_is_the_mean_next_token_loss(tmp_path):
    # a model built as GPT2LMHeadModel(config) names no loss type, and Trainer then divided the summed loss by the
    # unshifted label count: every loss came out (T - 1) / T too low, unlike the same weights reloaded
    from types import SimpleNamespace

    import run_clm
    from transformers import GPT2Config, Trainer, TrainingArguments

    class Vocabulary(SimpleNamespace):  # what build_model reads of a tokenizer
        def __len__(self) -> int:
            return 50

    model_args = run_clm.parse_args(["--report_to", "none", "--smoke"])[0]
    torch.manual_seed(0)
    scratch = run_clm.build_model(model_args, GPT2Config(n_layer=1, n_embd=16, n_head=2), Vocabulary(eos_token_id=0),
                                  block_size=8)  # fmt: skip
    scratch.save_pretrained(tmp_path / "stock")  # a stock GPT-2 checkpoint: --model_name_or_path's branch too
    model_args = run_clm.parse_args(["--report_to", "none", "--model_name_or_path", str(tmp_path / "stock")])[0]
    pretrained = run_clm.build_model(model_args, None, Vocabulary(eos_token_id=0), block_size=8)
    ids = torch.randint(0, 50, (4, 8), generator=torch.Generator().manual_seed(2))
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, per_device_eval_batch_size=4)
    for model in (scratch.eval(), pretrained.eval()):
        eval_loss = Trainer(model=model, args=args).evaluate([{"input_ids": row, "labels": row} for row in ids])
        with torch.no_grad():
            logits = model(ids).logits
        expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                     ids[:, 1:].reshape(-1))
        assert eval_loss["eval_loss"] == pytest.approx(expected.item(), rel=1e-5)
