"""Tiny models built from configs (no downloads): one per family the tests patch."""

from __future__ import annotations

import torch
from transformers import (
    BertConfig,
    BertModel,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    T5Config,
    T5ForConditionalGeneration,
    ViTConfig,
    ViTForImageClassification,
)

VOCAB = 97


def tiny_gpt2_config(**overrides) -> GPT2Config:
    settings = dict(n_layer=3, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=0,
                    eos_token_id=0, pad_token_id=0)
    settings.update(overrides)
    return GPT2Config(**settings)


def tiny_gpt2(seed: int = 0, **overrides) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(tiny_gpt2_config(**overrides)).eval()


def tiny_vit_config(**overrides) -> ViTConfig:
    settings = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48, image_size=8,
                    patch_size=2, num_channels=1, num_labels=10)
    settings.update(overrides)
    return ViTConfig(**settings)


def tiny_vit(seed: int = 0, **overrides) -> ViTForImageClassification:
    torch.manual_seed(seed)
    return ViTForImageClassification(tiny_vit_config(**overrides)).eval()


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """Grouped-query attention: 4 query heads share 2 key/value heads."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def tiny_mistral(seed: int = 0, sliding_window: int = 4, layers: int = 1) -> MistralForCausalLM:
    """Sliding-window attention in every layer (and grouped-query attention)."""
    torch.manual_seed(seed)
    config = MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                           sliding_window=sliding_window, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return MistralForCausalLM(config).eval()


def tiny_gemma3(seed: int = 0) -> Gemma3ForCausalLM:
    """Layer 0 slides over 4 tokens, layer 1 attends to everything (Gemma 3's interleaving)."""
    torch.manual_seed(seed)
    config = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                              sliding_window=4, layer_types=["sliding_attention", "full_attention"],
                              bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return Gemma3ForCausalLM(config).eval()


def tiny_diffusion_gemma(seed: int = 0) -> PreTrainedModel:
    """DiffusionGemmaForBlockDiffusion: a causal encoder and a decoder attending to every key (its mask is ``None``
    although its layers pass a sliding window), a 1-layer vision tower; the decoder keeps ``self.text_config``."""
    from transformers.models.diffusion_gemma import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    torch.manual_seed(seed)
    text = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, max_position_embeddings=64, sliding_window=4,
                layer_types=["sliding_attention", "full_attention"], num_experts=2, top_k_experts=1,
                moe_intermediate_size=16)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=2, head_dim=8)
    return DiffusionGemmaForBlockDiffusion(DiffusionGemmaConfig(text_config=text, vision_config=vision)).eval()


def tiny_bert(seed: int = 0) -> BertModel:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=64)
    return BertModel(config).eval()


def tiny_t5(seed: int = 0) -> T5ForConditionalGeneration:
    """Encoder-decoder whose self-attention layers pass a relative position bias (a real score bias)."""
    torch.manual_seed(seed)
    config = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                      dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0)
    return T5ForConditionalGeneration(config)


def random_ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def random_pixels(batch: int, seed: int = 1, channels: int = 1, size: int = 8) -> torch.Tensor:
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))


SHARPEN = 50.0


def sharpen_scorers(model: torch.nn.Module, factor: float = SHARPEN) -> torch.nn.Module:
    """Scale every scorer's down-projections P_q, P_k by ``factor`` (in place; returns the model).

    The tiny models' queries and keys (init std 0.02) are so small that freshly initialised scorers see almost only
    their biases: every relu unit has one sign across a whole row, the scores hardly depend on q and k, and the bias
    gradients of the units (sums of dS over a softmax row) cancel to rounding noise. Scaled, the scores depend on q and
    k, kinks fall inside rows, and the neural layers move a model's outputs well beyond rounding.
    """
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".neural_scorer." in f".{name}" and name.endswith("down_weight"):
                parameter.mul_(factor)
    return model


def loss_and_grads(models: dict[str, torch.nn.Module], ids: torch.Tensor) -> dict[str, tuple[torch.Tensor, list]]:
    """Each language model's loss on ``ids`` (as its own labels) and its parameters' gradients, by name."""
    results = {}
    for name, model in models.items():
        loss = model(ids, labels=ids).loss
        loss.backward()
        results[name] = (loss.detach(), [p.grad for p in model.parameters()])
    return results
