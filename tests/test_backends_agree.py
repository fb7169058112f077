"""Every backend gives the same model: logits and a few training steps of patched GPT-2 and ViT."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

from hf_neural_attention import NeuralAttentionConfig, patch_model, scorer_parameters
from tests.models import random_ids, random_pixels, tiny_gpt2, tiny_vit

BACKENDS = ["eager", "tiled", "cpp"]
HAS_TRITON = importlib.util.find_spec("triton") is not None


def _patched(base, backend: str, mlp: str):
    torch.manual_seed(123)  # the same scorer initialisation for every backend
    return patch_model(copy.deepcopy(base), layers=[0, -1],
                       config=NeuralAttentionConfig(proj_dim=4, mlp=mlp, backend=backend))


def _train(model, inputs, steps: int = 3) -> list[torch.Tensor]:
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        optimizer.zero_grad()
        if "pixel_values" in inputs:
            loss = model(**inputs).loss
        else:
            loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        optimizer.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("family", ["gpt2", "vit"])
@pytest.mark.parametrize("mlp", ["paper", "authors"])
def test_backends_agree_on_logits_and_training(family, mlp):
    if family == "gpt2":
        base = tiny_gpt2(attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
        ids = random_ids(2, 21)
        attention_mask = torch.ones_like(ids)
        attention_mask[0, :5] = 0  # padding, so the mask path is exercised too
        inputs = {"input_ids": ids, "attention_mask": attention_mask}
    else:
        base = tiny_vit(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        inputs = {"pixel_values": random_pixels(3), "labels": torch.tensor([1, 4, 7])}

    models = {backend: _patched(base, backend, mlp) for backend in BACKENDS}
    with torch.no_grad():
        logits = {b: m.eval()(**inputs).logits for b, m in models.items()}
    for backend in BACKENDS[1:]:
        torch.testing.assert_close(logits[backend], logits["eager"], rtol=1e-5, atol=1e-5)

    trained = {b: _train(m, inputs) for b, m in models.items()}
    for backend in BACKENDS[1:]:
        for got, want in zip(trained[backend], trained["eager"], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    fresh = scorer_parameters(_patched(base, "tiled", mlp))
    assert any(not torch.equal(p, fresh[name]) for name, p in scorer_parameters(models["tiled"]).items())


@pytest.mark.triton
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_backend_agrees_inside_gpt2():
    """The Triton kernel (interpreted on CPU in CI) inside a real model: logits and gradients."""
    base = tiny_gpt2(attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, n_layer=2)
    ids = random_ids(2, 9)
    attention_mask = torch.ones_like(ids)
    attention_mask[1, :3] = 0
    results = {}
    for backend in ("eager", "triton"):
        model = _patched(base, backend, "paper").train()
        loss = model(input_ids=ids, attention_mask=attention_mask, labels=ids).loss
        loss.backward()
        results[backend] = (loss.detach(), {k: p.grad for k, p in scorer_parameters(model).items()})
    torch.testing.assert_close(results["triton"][0], results["eager"][0], rtol=1e-5, atol=1e-5)
    for name, grad in results["eager"][1].items():
        torch.testing.assert_close(results["triton"][1][name], grad, rtol=1e-4, atol=1e-5)
