"""A few Trainer steps on tiny patched GPT-2 and ViT models lower the training loss."""

from __future__ import annotations

import pytest
import torch
from transformers import Trainer, TrainingArguments

from hf_neural_attention import patch_model, scorer_parameters
from tests.models import VOCAB, tiny_gpt2, tiny_vit


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, rows: list[dict]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        return self.rows[index]


def _train(model, rows, tmp_path, steps: int = 60) -> list[float]:
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=8,
                             learning_rate=1e-2, lr_scheduler_type="constant", logging_steps=1, report_to=[],
                             save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0)
    trainer = Trainer(model=model.train(), args=args, train_dataset=_ListDataset(rows))
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_trainer_lowers_the_loss_of_a_patched_gpt2(tmp_path):
    model = patch_model(tiny_gpt2(), layers=[0])
    before = {k: v.detach().clone() for k, v in scorer_parameters(model).items()}
    generator = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(64):  # counting sequences modulo the vocabulary: learnable in a few steps
        start = int(torch.randint(1, VOCAB, (1,), generator=generator))
        ids = (torch.arange(16) + start) % (VOCAB - 1) + 1
        rows.append({"input_ids": ids, "labels": ids})
    losses = _train(model, rows, tmp_path)
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses
    assert all(not torch.equal(before[k], v) for k, v in scorer_parameters(model).items())


def test_trainer_lowers_the_loss_of_a_patched_vit(tmp_path):
    model = patch_model(tiny_vit(), layers=[0])
    generator = torch.Generator().manual_seed(0)
    rows = []
    templates = torch.randn(10, 1, 8, 8, generator=generator)  # one fixed pattern per class, plus noise
    for index in range(64):
        label = index % 10
        pixels = templates[label] + 0.3 * torch.randn(1, 8, 8, generator=generator)
        rows.append({"pixel_values": pixels, "labels": torch.tensor(label)})
    losses = _train(model, rows, tmp_path)
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses


def test_a_resumed_vit_run_loads_the_weights_its_checkpoint_keeps_under_legacy_names(tmp_path):
    # transformers 5 saves ViT's vit.layers.* as vit.encoder.layer.*, and Trainer's load matches names on disk only:
    # a resumed run went on from its initial encoder, without a word but a warning
    from hf_neural_attention import NeuralAttentionTrainer

    generator = torch.Generator().manual_seed(0)
    rows = [{"pixel_values": torch.randn(1, 8, 8, generator=generator), "labels": torch.tensor(i % 3)}
            for i in range(16)]

    def train(patched: bool, resume: str | None = None) -> dict[str, torch.Tensor]:
        model = tiny_vit()
        if patched:
            patch_model(model, layers=[0], proj_dim=4)
        args = TrainingArguments(output_dir=str(tmp_path / f"run-{patched}"), max_steps=4, save_steps=2,
                                 per_device_train_batch_size=4, learning_rate=1e-2, report_to=[], use_cpu=True,
                                 seed=0, disable_tqdm=True)
        NeuralAttentionTrainer(model=model.train(), args=args, train_dataset=_ListDataset(rows)).train(
            resume_from_checkpoint=resume)
        return {name: value.detach().clone() for name, value in model.state_dict().items()}

    for patched in (False, True):  # the dot-product arm of the recipes, and the neural one
        uninterrupted = train(patched)
        resumed = train(patched, resume=str(tmp_path / f"run-{patched}" / "checkpoint-2"))
        assert all(torch.equal(uninterrupted[name], resumed[name]) for name in uninterrupted), patched


def test_label_smoothing_shifts_the_labels_of_a_neural_language_model_as_of_the_stock_one(tmp_path):
    # Trainer shifts the labels for label smoothing only for class names in transformers' causal-LM table: the Hub
    # class a patched GPT-2 becomes was missing there, so the neural arm learnt to copy its input token
    from transformers.trainer_pt_utils import LabelSmoother

    stock = tiny_gpt2().eval()
    neural = patch_model(tiny_gpt2(), layers=[0]).eval()
    assert type(neural).__name__ == "NeuralAttentionGPT2ForCausalLM"
    args = TrainingArguments(output_dir=str(tmp_path), label_smoothing_factor=0.1, report_to=[], use_cpu=True)
    ids = torch.randint(1, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    for model in (stock, neural):
        loss = Trainer(model=model, args=args).compute_loss(model, {"input_ids": ids, "labels": ids})
        with torch.no_grad():
            outputs = model(ids)
        # by hand: next-token targets, (1 - eps) * nll + eps * mean over the vocabulary of -log p
        log_p = outputs.logits[:, :-1].float().log_softmax(-1)
        nll = -log_p.gather(-1, ids[:, 1:, None]).squeeze(-1)
        expected = (0.9 * nll + 0.1 * -log_p.mean(-1)).mean()
        assert loss.item() == pytest.approx(expected.item(), rel=1e-5), type(model).__name__
        assert loss.item() == pytest.approx(LabelSmoother(0.1)(outputs, ids, shift_labels=True).item(), rel=1e-5)
