"""trainer.push_to_hub() with NeuralAttentionTrainer uploads one card: our sections plus the training summary."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.hf_api import DEFAULT_IGNORE_PATTERNS
from huggingface_hub.utils import filter_repo_objects
from transformers import AutoModelForCausalLM, TrainingArguments

from hf_neural_attention import NeuralAttentionTrainer, patch_model
from tests.models import random_ids, tiny_gpt2
from tests.test_hub import fake_hub_upload
from tests.test_trainer_smoke import _ListDataset


def fake_upload_folder(capture_dir: Path, uploaded: list[str]):
    """``HfApi.upload_folder`` without the network: the files it selects (its own filter) are copied."""

    def upload_folder(self, *, repo_id, folder_path, ignore_patterns=None, **kwargs):
        folder = Path(folder_path)
        files = [str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()]
        for name in filter_repo_objects(files, ignore_patterns=[*(ignore_patterns or []), *DEFAULT_IGNORE_PATTERNS]):
            (capture_dir / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(folder / name, capture_dir / name)
            uploaded.append(name)

    return upload_folder


def test_trainer_push_to_hub_keeps_the_neural_attention_card(tmp_path, monkeypatch):
    uploaded = fake_hub_upload(monkeypatch, tmp_path / "hub")  # create_repo (Trainer init)
    monkeypatch.setattr(HfApi, "upload_folder", fake_upload_folder(tmp_path / "hub", uploaded))
    model = patch_model(tiny_gpt2(), layers=[0], proj_dim=4, backend="eager")
    ids = random_ids(8, 12)
    rows = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4,
                             report_to=[], save_strategy="no", use_cpu=True, push_to_hub=True,
                             hub_model_id="me/gpt2-neural", disable_tqdm=True)
    trainer = NeuralAttentionTrainer(model=model.train(), args=args, train_dataset=_ListDataset(rows))
    trainer.train()
    trainer.push_to_hub(finetuned_from="openai-community/gpt2")

    assert {"README.md", "config.json", "model.safetensors", "modeling_neural_attention.py"} <= set(uploaded)
    card = ModelCard.load(tmp_path / "hub" / "README.md")
    assert {"neural-attention", "hf-neural-attention"} <= set(card.data.tags)
    for text in ('from_pretrained("me/gpt2-neural", trust_remote_code=True)', "`proj_dim` | `4`",
                 "@article{digiugno2025neural", "## Training", "#### Training hyperparameters"):
        assert text in card.text, text
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hub").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model.eval()(ids).logits, rtol=0, atol=0)


def test_a_model_without_a_hub_class_is_pushed_with_its_adapter_and_a_card_that_loads_it(tmp_path, monkeypatch):
    """A patched Llama keeps its stock class, whose checkpoint cannot rebuild the neural layers: every save also
    writes the scorers as an adapter, and the card's loading instructions (followed here on the uploaded files)
    give back the trained model."""
    from transformers import LlamaForCausalLM

    from hf_neural_attention import load_neural_adapter
    from tests.models import tiny_llama

    uploaded = fake_hub_upload(monkeypatch, tmp_path / "hub")
    monkeypatch.setattr(HfApi, "upload_folder", fake_upload_folder(tmp_path / "hub", uploaded))
    model = patch_model(tiny_llama(), layers=[0], proj_dim=4, backend="eager")
    ids = random_ids(8, 12)
    rows = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], save_strategy="steps", save_steps=1, use_cpu=True,
                             push_to_hub=True, hub_model_id="me/llama-neural", hub_strategy="end", disable_tqdm=True)
    trainer = NeuralAttentionTrainer(model=model.train(), args=args, train_dataset=_ListDataset(rows))
    trainer.train()
    assert (tmp_path / "out" / "checkpoint-1" / "neural_adapter.safetensors").is_file()  # every checkpoint too
    trainer.push_to_hub()

    assert {"README.md", "model.safetensors", "neural_adapter.safetensors", "neural_adapter_config.json"} <= set(
        uploaded)
    card = ModelCard.load(tmp_path / "hub" / "README.md").text
    assert "trust_remote_code" not in card and "## Training" in card
    for text in ('load_neural_adapter(LlamaForCausalLM.from_pretrained("me/llama-neural"),',
                 'snapshot_download("me/llama-neural", allow_patterns=["neural_adapter*"]))'):
        assert text in card, text
    loaded = load_neural_adapter(LlamaForCausalLM.from_pretrained(tmp_path / "hub"), tmp_path / "hub").eval()
    with torch.no_grad():
        trained = model.eval()(ids).logits
        assert (trained - tiny_llama()(ids).logits).abs().max() > 1e-3  # trained: the scorers moved from their init
        torch.testing.assert_close(loaded(ids).logits, trained, rtol=0, atol=0)


def test_a_users_own_module_around_a_patched_model_trains_and_saves(tmp_path):
    """Trainer on a plain nn.Module (a custom head around a patched GPT2Model): its checkpoints are Trainer's own
    state dicts, with no adapter to write (there is no transformers model at the top to record)."""
    from torch import nn
    from transformers import GPT2Config, GPT2Model

    class Classifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = patch_model(GPT2Model(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50)), layers=[0],
                                    proj_dim=2, backend="tiled")
            self.head = nn.Linear(32, 3)

        def forward(self, input_ids, labels):
            logits = self.head(self.body(input_ids).last_hidden_state[:, -1])
            return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}

    rows = [{"input_ids": torch.randint(0, 50, (8,)), "labels": torch.tensor(1)} for _ in range(4)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, save_steps=1,
                             report_to=[], use_cpu=True, disable_tqdm=True)
    NeuralAttentionTrainer(model=Classifier(), args=args, train_dataset=_ListDataset(rows)).train()
    saved = {path.name for path in (tmp_path / "checkpoint-1").iterdir()}
    assert "model.safetensors" in saved and "neural_adapter.safetensors" not in saved


@pytest.mark.parametrize("modules_to_save", [None, ["neural_scorer"]], ids=["frozen-scorers", "trained-scorers"])
def test_a_peft_model_is_pushed_with_the_scorers_and_a_card_that_loads_base_scorers_and_lora(
    tmp_path, monkeypatch, modules_to_save
):
    """PEFT's save writes only its adapter: without modules_to_save the (frozen, randomly initialised) scorers were in
    no file at all, and the card told to load a Hub-class checkpoint the repo does not hold. Every save now writes
    the neural adapter too, and the card's recipe (followed here on the uploaded files) gives back the model."""
    peft = pytest.importorskip("peft")
    from transformers import GPT2LMHeadModel

    from hf_neural_attention import load_neural_adapter

    tiny_gpt2().save_pretrained(tmp_path / "base")  # the base checkpoint, as on the Hub
    uploaded = fake_hub_upload(monkeypatch, tmp_path / "hub")
    monkeypatch.setattr(HfApi, "upload_folder", fake_upload_folder(tmp_path / "hub", uploaded))
    base = patch_model(GPT2LMHeadModel.from_pretrained(tmp_path / "base"), layers=[0], proj_dim=4, backend="eager")
    model = peft.get_peft_model(base, peft.LoraConfig(target_modules=["c_attn"], modules_to_save=modules_to_save))
    ids = random_ids(8, 12)
    rows = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4,
                             learning_rate=5e-2, report_to=[], save_strategy="no", use_cpu=True, push_to_hub=True,
                             hub_model_id="me/gpt2-lora-neural", hub_strategy="end", disable_tqdm=True)
    trainer = NeuralAttentionTrainer(model=model.train(), args=args, train_dataset=_ListDataset(rows))
    trainer.train()
    trainer.push_to_hub()

    assert {"README.md", "adapter_model.safetensors", "neural_adapter.safetensors"} <= set(uploaded)
    card = ModelCard.load(tmp_path / "hub" / "README.md").text
    assert "trust_remote_code" not in card and "## Training" in card
    for text in ('load_neural_adapter(GPT2LMHeadModel.from_pretrained("<base-model>"),',
                 'snapshot_download("me/gpt2-lora-neural", allow_patterns=["neural_adapter*"]))',
                 'PeftModel.from_pretrained(model, "me/gpt2-lora-neural")'):
        assert text in card, text
    loaded = load_neural_adapter(GPT2LMHeadModel.from_pretrained(tmp_path / "base"), tmp_path / "hub")
    loaded = peft.PeftModel.from_pretrained(loaded, tmp_path / "hub").eval()
    with torch.no_grad():
        trained = model.eval()(ids).logits
        assert (trained - GPT2LMHeadModel.from_pretrained(tmp_path / "base")(ids).logits).abs().max() > 1e-3
        torch.testing.assert_close(loaded(ids).logits, trained, rtol=0, atol=0)


@pytest.mark.parametrize("patched", [True, False], ids=["neural", "dot"])
def test_the_card_of_a_model_trained_from_scratch_says_so(tmp_path, patched):
    # transformers took the empty _name_or_path of a model built from a config for its base model: "This model is a
    # fine-tuned version of [](https://huggingface.co/)"
    model = tiny_gpt2()
    if patched:
        patch_model(model, layers=[0], proj_dim=4)
    rows = [{"input_ids": row, "labels": row} for row in random_ids(4, 12)]
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=4,
                             report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    trainer = NeuralAttentionTrainer(model=model.train(), args=args, train_dataset=_ListDataset(rows))
    trainer.train()
    trainer.create_model_card()
    card = (tmp_path / "out" / "README.md").read_text()
    assert "This model was trained from scratch" in card and "fine-tuned version of []" not in card
    assert model.config._name_or_path == ""


def test_a_push_at_every_save_uploads_what_loads_the_checkpoint(tmp_path, monkeypatch):
    # Trainer's push of each save copied only the files it knows: config.json named our code files in auto_map, but
    # the commit held none of them (nor the card), so it did not load with trust_remote_code
    from concurrent.futures import Future

    uploads: list[set[str]] = []

    def upload_folder(self, *, repo_id, folder_path, ignore_patterns=None, **kwargs):
        folder = Path(folder_path)
        files = [str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()]
        uploads.append(set(filter_repo_objects(files, ignore_patterns=[*(ignore_patterns or []),
                                                                      *DEFAULT_IGNORE_PATTERNS])))
        done = Future()
        done.set_result(None)
        return done

    fake_hub_upload(monkeypatch, tmp_path / "hub")  # create_repo
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    model = patch_model(tiny_gpt2(), layers=[0], proj_dim=4)
    rows = [{"input_ids": row, "labels": row} for row in random_ids(4, 12)]
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=1, save_steps=1, per_device_train_batch_size=4,
                             report_to=[], use_cpu=True, push_to_hub=True, hub_model_id="me/every-save",
                             hub_strategy="every_save", disable_tqdm=True)
    trainer = NeuralAttentionTrainer(model=model.train(), args=args, train_dataset=_ListDataset(rows))
    trainer.train()
    assert {"config.json", "model.safetensors", "modeling_neural_attention.py", "configuration_neural_attention.py",
            "README.md"} <= uploads[0]
    # while the last push still uploads the folder, Trainer skips the next one: nothing of its save may enter it
    later = tmp_path / "out" / "checkpoint-9"
    later.mkdir()
    (later / "neural_adapter.safetensors").write_bytes(b"step 9")
    trainer.push_in_progress = SimpleNamespace(is_done=lambda: False)
    trainer._push_from_checkpoint(str(later))
    assert not (tmp_path / "out" / "neural_adapter.safetensors").exists() and len(uploads) == 1
