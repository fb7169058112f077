"""Hub classes: config fields, every construction path, save/load round trips, remote code, push_to_hub, errors."""

import ast
import copy
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers.utils.hub
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    GPT2Config,
    GPT2DoubleHeadsModel,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    GPT2Model,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
)
from transformers.testing_utils import CaptureLogger

import hf_neural_attention as hna
from hf_neural_attention import (
    NeuralAttentionGPT2Config,
    NeuralAttentionGPT2ForCausalLM,
    NeuralAttentionGPT2Model,
    NeuralAttentionViTConfig,
    NeuralAttentionViTModel,
    NeuralScorer,
    neural_layers,
    patch_model,
    unpatch_model,
)
from hf_neural_attention.backend_neural_attention import FALLBACK_ATTRIBUTE, choose_backend
from hf_neural_attention.modeling_neural_attention import find_self_attention_modules
from tests.models import random_ids, sharpen_scorers, tiny_gpt2, tiny_gpt2_config, tiny_llama, tiny_vit_config

PACKAGE_DIR = Path(hna.__file__).parent
TRAVELLING = {
    "fused_cpp_neural_attention.py",
    "fused_cpp_source_neural_attention.py",
    "configuration_neural_attention.py",
    "modeling_neural_attention.py",
    "backend_neural_attention.py",
    "scoring_neural_attention.py",
    "kernels_neural_attention.py",
    "tiled_neural_attention.py",
    "cpp_build_neural_attention.py",
    "cpp_neural_attention.py",
    "triton_neural_attention.py",
    "triton_kernels_neural_attention.py",
}
SEQ = 8


# accelerate's device_map for gpt2_config(): layer 0 (the patched one) offloaded to disk, the rest on the CPU
OFFLOAD_LAYER_0 = {"transformer.wte": "cpu", "transformer.wpe": "cpu", "transformer.drop": "cpu",
                   "transformer.h.0": "disk", "transformer.h.1": "cpu", "transformer.ln_f": "cpu", "lm_head": "cpu"}


# --- tiny models --------------------------------------------------------------------------------------------------
def gpt2_config(**overrides) -> GPT2Config:
    values = dict(n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=32, bos_token_id=0, eos_token_id=0,
                  pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, num_labels=3)
    return GPT2Config(**{**values, **overrides})


def vit_config(**overrides) -> ViTConfig:
    values = dict(image_size=8, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, num_labels=3)
    return ViTConfig(**{**values, **overrides})


def make_inputs(family: str) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    if family == "vit":
        return {"pixel_values": torch.randn(2, 3, 8, 8, generator=generator)}
    return {"input_ids": torch.randint(1, 100, (2, SEQ), generator=generator)}


STOCK = {
    "gpt2-lm": (GPT2LMHeadModel, gpt2_config, AutoModelForCausalLM),
    "gpt2-cls": (GPT2ForSequenceClassification, gpt2_config, AutoModelForSequenceClassification),
    "vit": (ViTForImageClassification, vit_config, AutoModelForImageClassification),
    "vit-body": (ViTModel, vit_config, AutoModel),
}
FAMILY_HEADS = {  # the Auto classes a checkpoint of either family names in auto_map (any head loads from any other)
    "gpt2": {"AutoConfig", "AutoModel", "AutoModelForCausalLM", "AutoModelForSequenceClassification"},
    "vit": {"AutoConfig", "AutoModel", "AutoModelForImageClassification"},
}


def patched(kind: str, layers=(0,), **settings) -> torch.nn.Module:
    stock_class, config_fn, _ = STOCK[kind]
    torch.manual_seed(0)
    model = stock_class(config_fn()).eval()
    return patch_model(model, layers=list(layers), proj_dim=4, **settings)


def logits(model, kind: str) -> torch.Tensor:
    """The model's output on fixed inputs: logits of a head, the last hidden state of a bare model."""
    with torch.no_grad():
        out = model(**make_inputs(kind.split("-")[0]))
    return out.logits if "logits" in out else out.last_hidden_state


def scorers(model) -> list[NeuralScorer]:
    return [m for m in model.modules() if isinstance(m, NeuralScorer)]


def written_files(kind: str) -> set[str]:
    extra = {"generation_config.json"} if kind == "gpt2-lm" else set()
    return {"README.md", "config.json", "model.safetensors"} | TRAVELLING | extra


# --- config classes ------------------------------------------------------------------------------------------------
def test_config_classes_have_unique_types_and_typed_fields():
    assert NeuralAttentionGPT2Config.model_type == "neural_attention_gpt2" != GPT2Config.model_type
    assert NeuralAttentionViTConfig.model_type == "neural_attention_vit" != ViTConfig.model_type
    config = NeuralAttentionGPT2Config(n_layer=3, neural_attention_layers=[0, 2], neural_attention_proj_dim=4)
    assert config.neural_attention_settings().proj_dim == 4
    assert isinstance(AutoConfig.for_model("neural_attention_gpt2"), NeuralAttentionGPT2Config)
    with pytest.raises(ValueError, match="neural_attention_proj_dim"):
        config.neural_attention_proj_dim = "four"
    assert config.neural_attention_proj_dim == 4
    for bad in ({"neural_attention_layers": [3]}, {"neural_attention_mlp": "deep"}, {"neural_attention_layers": []},
                {"neural_attention_layers": [1, 0]}, {"neural_attention_layers": "0"},
                {"neural_attention_backend": 3}):
        with pytest.raises(ValueError, match=next(iter(bad))) as caught:
            NeuralAttentionGPT2Config(n_layer=3, **bad)
        assert isinstance(caught.value.__cause__, StrictDataclassError)  # the strict validator's report is kept


def test_config_from_newer_version_warns_and_ignores_unknown_keys(tmp_path, caplog):
    NeuralAttentionGPT2Config(n_layer=2).save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    data.update(neural_attention_version="9.1.0", neural_attention_future_knob=3)
    (tmp_path / "config.json").write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING):
        config = AutoConfig.from_pretrained(tmp_path)
    assert "neural_attention_future_knob" in caplog.text and "9.1.0" in caplog.text
    assert not hasattr(config, "neural_attention_future_knob")
    assert config.to_dict()["neural_attention_version"] == hna.__version__


# --- construction paths --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["gpt2-lm", "gpt2-cls", "vit", "vit-body"])
def test_every_construction_path_has_the_scorer(kind):
    stock_class, config_fn, auto_class = STOCK[kind]
    hub_class = hna.hub_class_for(stock_class)
    hub_config_class = hub_class.config_class
    config = hub_config_class(**config_fn().to_dict(), neural_attention_layers=[1], neural_attention_proj_dim=4)
    for model in (hub_class(copy.deepcopy(config)), auto_class.from_config(copy.deepcopy(config))):
        assert type(model) is hub_class
        assert model.config._attn_implementation == hna.ATTENTION_NAME
        modules = find_self_attention_modules(model)
        assert [i for i, (_, m) in enumerate(modules) if hasattr(m, "neural_scorer")] == [1]
        for scorer in scorers(model):
            for name, param in scorer.named_parameters():
                assert torch.isfinite(param).all() and param.abs().max() > 0, name


def test_attention_implementation_requests_keep_the_scorer(tmp_path):
    patched("gpt2-lm").save_pretrained(tmp_path)
    reference = logits(AutoModelForCausalLM.from_pretrained(tmp_path), "gpt2-lm")
    for request in ("eager", "sdpa", hna.ATTENTION_NAME):
        model = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=request).eval()
        assert model.config._attn_implementation == hna.ATTENTION_NAME and len(scorers(model)) == 1
        torch.testing.assert_close(logits(model, "gpt2-lm"), reference)
    model.set_attn_implementation("eager")
    assert model.config._attn_implementation == hna.ATTENTION_NAME
    assert {m.neural_attention_fallback for _, m in find_self_attention_modules(model)} == {"eager"}
    for bad in ("flash_attention_2", "flex_attention"):
        with pytest.raises(ValueError, match="bypass the neural scorer"):
            model.set_attn_implementation(bad)
        with pytest.raises(ValueError, match="bypass the neural scorer"):
            AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=bad)
    assert model.config._attn_implementation == hna.ATTENTION_NAME


def test_patch_switches_class_in_place_and_unpatch_restores_the_stock_model():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(gpt2_config()).eval()
    config_before, reference = model.config.to_dict(), logits(model, "gpt2-lm")
    patch_model(model, layers=[0], proj_dim=4)
    assert type(model) is NeuralAttentionGPT2ForCausalLM and type(model.config) is NeuralAttentionGPT2Config
    assert model.config.model_type == "neural_attention_gpt2"
    unpatch_model(model)
    assert type(model) is GPT2LMHeadModel and type(model.config) is GPT2Config
    assert model.config.to_dict() == config_before
    assert torch.equal(logits(model, "gpt2-lm"), reference)


# --- round trips ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["gpt2", "vit"])
def test_a_bare_model_switched_in_place_still_returns_hidden_states_and_attentions(family):
    # transformers looks up what a model can capture by its class's name, registered when an instance is built: the
    # Hub class a patched bare model switches to (and the stock class it is unpatched to) may never have been built
    from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY

    head_kind, _, bare_class, bare_hub_class, _ = BODIES[family]
    layers = STOCK[head_kind][1]().num_hidden_layers
    model = bare_class._from_config(STOCK[head_kind][1](), attn_implementation="eager").eval()  # eager: attentions
    for switch_to, switch in ((bare_hub_class, lambda m: patch_model(m, layers=[0], proj_dim=4)),
                              (bare_class, unpatch_model)):
        dict.pop(_CAN_RECORD_REGISTRY, str(switch_to), None)  # as in a process that never built one
        switch(model)
        assert type(model) is switch_to
        with torch.no_grad():
            out = model(**make_inputs(family), output_hidden_states=True, output_attentions=True)
        assert out.hidden_states is not None and len(out.hidden_states) == layers + 1, switch_to
        assert out.attentions is not None and len(out.attentions) == layers, switch_to


@pytest.mark.parametrize("kind", ["gpt2-lm", "gpt2-cls", "vit", "vit-body"])
def test_save_load_round_trip(kind, tmp_path):
    model = patched(kind, layers=[1])
    expected = logits(model, kind)
    model.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == written_files(kind)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == model.config.model_type and config["neural_attention_layers"] == [1]
    assert set(config["auto_map"]) == FAMILY_HEADS[kind.split("-")[0]]

    loaded = STOCK[kind][2].from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    assert loaded.config._attn_implementation == hna.ATTENTION_NAME
    assert torch.equal(logits(loaded, kind), expected)
    original, reloaded = model.state_dict(), loaded.state_dict()
    assert original.keys() == reloaded.keys()
    assert all(torch.equal(original[k], reloaded[k]) for k in original)


BODIES = {  # family: (a head's kind, its body's attribute, bare stock class, bare Hub class, the head loaded from bare)
    "gpt2": ("gpt2-lm", "transformer", GPT2Model, NeuralAttentionGPT2Model, "gpt2-cls"),
    "vit": ("vit", "vit", ViTModel, NeuralAttentionViTModel, "vit"),
}


@pytest.mark.parametrize("family", BODIES)
def test_automodel_loads_the_body_of_a_neural_head_and_a_head_loads_a_patched_bare_model(family, tmp_path):
    head_kind, body_attribute, bare_class, bare_hub_class, other_head = BODIES[family]
    model = patched(head_kind, layers=[1])
    model.save_pretrained(tmp_path / "head")
    body = AutoModel.from_pretrained(tmp_path / "head").eval()
    assert type(body) is bare_hub_class and len(scorers(body)) == 1
    inputs = make_inputs(family)
    with torch.no_grad():
        torch.testing.assert_close(body(**inputs).last_hidden_state,
                                   getattr(model, body_attribute)(**inputs).last_hidden_state, rtol=0, atol=0)
    # a bare model patched on its own gets the Hub class too, loads back, loads under a head, and comes back stock
    # when unpatched
    torch.manual_seed(0)
    bare = patch_model(bare_class(STOCK[head_kind][1]()).eval(), layers=[0], proj_dim=4)
    assert type(bare) is bare_hub_class
    features = {"gpt2": "feature-extraction", "vit": "image-feature-extraction"}[family]
    assert hna.build_model_card(bare).data.pipeline_tag == features  # the Hub's widget and search
    bare.save_pretrained(tmp_path / "bare")
    reloaded = AutoModel.from_pretrained(tmp_path / "bare").eval()
    assert type(reloaded) is bare_hub_class
    head = STOCK[other_head][2].from_pretrained(tmp_path / "bare").eval()
    assert type(head) is hna.hub_class_for(STOCK[other_head][0]) and len(scorers(head)) == 1
    with torch.no_grad():
        expected = bare(**inputs).last_hidden_state
        torch.testing.assert_close(reloaded(**inputs).last_hidden_state, expected, rtol=0, atol=0)
        torch.testing.assert_close(getattr(head, body_attribute)(**inputs).last_hidden_state, expected, rtol=0, atol=0)
    unpatch_model(bare)
    assert type(bare) is bare_class and "auto_map" not in bare.config.to_dict()


def test_a_bare_single_tower_model_card_names_feature_extraction():
    # the Hub's widget and search: a patched bare BERT or Llama (families that keep their own class) extracts features
    # like the bare GPT-2 / ViT Hub classes; an encoder-decoder (T5Model) or a two-tower model (CLIPModel) gets no tag
    from transformers import CLIPConfig, CLIPModel, T5Model

    from tests.models import tiny_bert, tiny_t5

    for bare in (tiny_bert(), tiny_llama().model):
        assert hna.build_model_card(patch_model(bare, layers=[0], proj_dim=4)).data.pipeline_tag == "feature-extraction"
    tower = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    clip = CLIPModel(CLIPConfig(text_config=dict(tower, vocab_size=97, max_position_embeddings=16),
                                vision_config=dict(tower, image_size=8, patch_size=4), projection_dim=8))
    for bare in (T5Model(tiny_t5().config), clip):
        assert hna.build_model_card(patch_model(bare, layers=[0], proj_dim=4)).data.pipeline_tag is None


@pytest.mark.parametrize("backend", ["auto", "eager"])
def test_a_neural_layer_offloaded_by_accelerate_is_brought_in_for_its_forward(backend, tmp_path):
    # accelerate moves offloaded weights in around a module's forward: the scorer must be called, not read
    model = patched("gpt2-lm", layers=[0], backend=backend)
    expected = logits(model, "gpt2-lm")
    model.save_pretrained(tmp_path / "saved")
    offloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", device_map=OFFLOAD_LAYER_0,
                                                     offload_folder=tmp_path / "offload").eval()
    assert scorers(offloaded)[0].hidden_weight.is_meta  # really offloaded
    assert torch.equal(logits(offloaded, "gpt2-lm"), expected)


def test_an_offloaded_layer_is_patched_with_real_scorers_and_an_offloaded_scorer_saves_its_adapter(tmp_path):
    # patch_model put a new scorer on the meta device with its offloaded layer (the forward failed, and
    # load_neural_adapter's copy into it did nothing); save_neural_adapter read the meta tensors of an offloaded one
    from hf_neural_attention.adapters import adapter_state_dict

    model = patched("gpt2-lm")
    model.save_pretrained(tmp_path / "saved")
    torch.manual_seed(0)
    GPT2LMHeadModel(gpt2_config()).save_pretrained(tmp_path / "base")  # the weights `model` was patched from
    offloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", device_map=OFFLOAD_LAYER_0,
                                                     offload_folder=tmp_path / "offload").eval()
    hna.save_neural_adapter(offloaded, tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "neural_adapter.safetensors")
    expected = adapter_state_dict(model)
    assert saved.keys() == expected.keys() and all(torch.equal(saved[k], expected[k]) for k in saved)

    base = GPT2LMHeadModel.from_pretrained(tmp_path / "base", device_map=OFFLOAD_LAYER_0,
                                           offload_folder=tmp_path / "offload_base").eval()
    assert base.transformer.h[0].attn.c_attn.weight.is_meta  # really offloaded
    hna.load_neural_adapter(base, tmp_path / "adapter")
    assert not scorers(base)[0].hidden_weight.is_meta
    assert torch.equal(logits(base, "gpt2-lm"), logits(model, "gpt2-lm"))


def test_patching_on_load_with_the_neural_layer_offloaded_to_disk_gives_its_scorers_weights(tmp_path):
    # the offload map is built from the checkpoint, which has no scorer: the first forward failed on the missing key,
    # and a save after writing config.json and the code files
    torch.manual_seed(0)
    GPT2LMHeadModel(gpt2_config()).save_pretrained(tmp_path / "base")
    model = NeuralAttentionGPT2ForCausalLM.from_pretrained(
        tmp_path / "base", neural_attention_layers=[0], neural_attention_proj_dim=4, device_map=OFFLOAD_LAYER_0,
        offload_folder=tmp_path / "offload").eval()  # fmt: skip
    assert scorers(model)[0].hidden_weight.is_meta  # really offloaded
    out = logits(model, "gpt2-lm")
    model.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    weights = scorers(reloaded)[0]
    assert torch.isfinite(weights.hidden_weight).all() and weights.hidden_weight.abs().sum() > 0  # its own init
    torch.testing.assert_close(logits(reloaded, "gpt2-lm"), out, rtol=0, atol=0)


def test_scorers_started_afresh_at_load_with_their_layer_offloaded_to_disk_run(tmp_path):
    # ignore_mismatched_sizes with other settings: the offload map held the checkpoint's scorer weights, of the old
    # shapes (transformers' own heads fail the same way when offloaded)
    patched("gpt2-lm").save_pretrained(tmp_path / "saved")  # proj_dim 4
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path / "saved", neural_attention_proj_dim=8, ignore_mismatched_sizes=True, device_map=OFFLOAD_LAYER_0,
        offload_folder=tmp_path / "offload").eval()  # fmt: skip
    assert scorers(model)[0].hidden_weight.is_meta and scorers(model)[0].proj_dim == 8
    assert torch.isfinite(logits(model, "gpt2-lm")).all()


@pytest.mark.parametrize("switched", ["sub-model", "shared config"])
def test_a_loaded_model_keeps_its_scorers_when_a_stock_relative_switches_attention(switched, tmp_path):
    # from_pretrained builds the Hub class without patch_model: it must guard its forward the same way. A stock
    # parent (an encoder-decoder holding it) switches by writing the shared config, as the second case does.
    patched("gpt2-lm").save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    expected = logits(loaded, "gpt2-lm")
    if switched == "sub-model":
        loaded.transformer.set_attn_implementation("sdpa")
    else:
        loaded.config._attn_implementation_internal = "sdpa"
    assert loaded.config._attn_implementation == "sdpa"
    assert torch.equal(logits(loaded, "gpt2-lm"), expected)
    assert loaded.config._attn_implementation == hna.ATTENTION_NAME


def test_a_saved_backend_that_cannot_run_here_names_the_load_time_override(tmp_path, monkeypatch):
    patched("gpt2-lm", backend="cpp").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"from_pretrained\(\.\.\., neural_attention_backend='auto'\)"):
        choose_backend("cpp", torch.empty(1, device="meta"), needs_probabilities=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # a CPU machine: no CUDA tensor for Triton
    with pytest.raises(ValueError, match=r"backend='triton' needs triton and a CUDA tensor.*backend='auto'"):
        choose_backend("triton", torch.empty(1), needs_probabilities=False)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, neural_attention_backend="auto")
    assert {scorer.settings.backend for scorer in scorers(loaded)} == {"auto"}
    assert loaded.config.neural_attention_backend == "auto"


def test_travelling_files_import_only_torch_transformers_and_siblings():
    allowed = {"torch", "transformers", "huggingface_hub", "triton"} | set(sys.stdlib_module_names)
    for name in TRAVELLING:
        tree = ast.parse((PACKAGE_DIR / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.level == 1 and f"{node.module}.py" in TRAVELLING, (name, node.module)
            elif isinstance(node, ast.ImportFrom):
                assert node.module.split(".")[0] in allowed, (name, node.module)
            elif isinstance(node, ast.Import):
                assert all(alias.name.split(".")[0] in allowed for alias in node.names), name


# --- plain checkpoint + settings -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["gpt2-lm", "vit"])
def test_plain_checkpoint_plus_settings(kind, tmp_path):
    stock_class, config_fn, _ = STOCK[kind]
    torch.manual_seed(0)
    stock = stock_class(config_fn())
    stock.save_pretrained(tmp_path)
    hub_class = hna.hub_class_for(stock_class)
    model = hub_class.from_pretrained(tmp_path, neural_attention_layers=[0], neural_attention_proj_dim=4)
    assert model.config.neural_attention_base_model == str(tmp_path)
    pretrained, loaded = stock.state_dict(), model.state_dict()
    assert all(torch.equal(pretrained[k], loaded[k]) for k in pretrained)
    assert set(loaded) - set(pretrained) == {k for k in loaded if ".neural_scorer." in k}
    (scorer,) = scorers(model)
    for name, param in scorer.named_parameters():  # PyTorch default nn.Linear init: U(-1/sqrt(fan_in), ...)
        fan_in = {"output_weight": 4, "hidden_weight": 8, "hidden_bias": 8}.get(name, scorer.head_dim)
        bound = fan_in ** -0.5
        assert torch.isfinite(param).all() and param.abs().max() <= bound, name
        assert param.std() > bound / 4, name  # spread out, not normal(0, 0.02) nor zeros

    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    inputs = make_inputs("vit" if kind == "vit" else "gpt2")
    labels = inputs["input_ids"] if kind != "vit" else torch.tensor([0, 1])
    before = scorer.hidden_weight.detach().clone()
    loss = model(**inputs, labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss) and scorer.hidden_weight.grad.abs().sum() > 0
    optimizer.step()
    assert not torch.equal(before, scorer.hidden_weight)


@pytest.mark.parametrize("load", ["hub class", "auto model", "auto config", "hub config"])
def test_a_misspelt_setting_at_load_is_refused_naming_the_setting_it_resembles(load, tmp_path):
    plain, neural = tmp_path / "plain", tmp_path / "neural"
    GPT2LMHeadModel(gpt2_config()).save_pretrained(plain)
    patched("gpt2-lm").save_pretrained(neural)
    call = {"hub class": lambda **kw: NeuralAttentionGPT2ForCausalLM.from_pretrained(plain, **kw),
            "auto model": lambda **kw: AutoModelForCausalLM.from_pretrained(neural, **kw),  # would fail in __init__
            "auto config": lambda **kw: AutoConfig.from_pretrained(neural, **kw),  # would drop it silently
            "hub config": lambda **kw: NeuralAttentionGPT2Config.from_pretrained(plain, **kw)}[load]
    for typo, meant in (("neural_attention_layer", "neural_attention_layers"),
                        ("neural_attention_backnd", "neural_attention_backend")):
        with pytest.raises(ValueError, match=f"got {typo}=.*not a neural-attention setting. Did you mean {meant}\\?"):
            call(**{typo: "tiled"})
    loaded = call(neural_attention_backend="tiled")  # the right spelling still loads
    assert (loaded if load.endswith("config") else loaded.config).neural_attention_backend == "tiled"


def test_a_plain_checkpoint_of_the_stock_type_loads_into_a_hub_class_without_the_other_type_warning(tmp_path):
    GPT2LMHeadModel(gpt2_config()).save_pretrained(tmp_path / "gpt2")
    ViTForImageClassification(vit_config()).save_pretrained(tmp_path / "vit")
    config_logger = transformers.utils.logging.get_logger("transformers.configuration_utils")
    verbosity = transformers.utils.logging.get_verbosity()  # conftest keeps transformers to errors
    transformers.utils.logging.set_verbosity_warning()
    try:
        with CaptureLogger(config_logger) as captured:
            NeuralAttentionGPT2ForCausalLM.from_pretrained(tmp_path / "gpt2", neural_attention_layers=[0])
        assert "to instantiate a model of type" not in captured.out
        with CaptureLogger(config_logger) as captured:  # another type still gets transformers' warning (seen here)
            NeuralAttentionGPT2Config.from_pretrained(tmp_path / "vit")
    finally:
        transformers.utils.logging.set_verbosity(verbosity)
    assert "You are using a model of type `vit` to instantiate a model of type `neural_attention_gpt2`" in captured.out


# --- without the plugin ----------------------------------------------------------------------------------------
REMOTE_LOADER = textwrap.dedent("""
    import importlib.abc, importlib.util, json, sys
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "hf_neural_attention":
                raise ModuleNotFoundError("hf_neural_attention is blocked in this test")
    sys.meta_path.insert(0, Block())
    try:
        importlib.util.find_spec("hf_neural_attention")
        raise SystemExit("hf_neural_attention is importable")
    except ModuleNotFoundError:
        pass
    import torch
    import transformers
    from safetensors.torch import load_file, save_file
    jobs = json.loads(sys.argv[1])
    for job in jobs:
        auto = getattr(transformers, job["auto"])
        try:  # a unique model_type: without remote code the load fails loudly, never a silent stock model
            auto.from_pretrained(job["dir"], trust_remote_code=False)
            raise SystemExit("loaded without trust_remote_code")
        except ValueError as error:
            assert "trust_remote_code" in str(error), error
        model = auto.from_pretrained(job["dir"], trust_remote_code=True, **job["kwargs"]).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        assert model.config._attn_implementation == "neural_attention"
        with torch.no_grad():
            out = model(**load_file(job["inputs"]), output_hidden_states=True)
        out = out.hidden_states[-1] if job["read"] == "body" else getattr(out, job["read"])
        save_file({"logits": out.contiguous()}, job["out"])
    assert not any(name.startswith("hf_neural_attention") for name in sys.modules)
""")


def fake_hub_upload(monkeypatch, capture_dir: Path) -> list[str]:
    """Intercept the two network calls of push_to_hub; files it would upload are copied to ``capture_dir``."""
    uploaded: list[str] = []

    def create_repo(self, repo_id, **kwargs):
        return SimpleNamespace(repo_id=repo_id)

    def create_commit(self, repo_id, operations, **kwargs):
        for operation in operations:
            target = capture_dir / operation.path_in_repo
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(operation.path_or_fileobj, target)
            uploaded.append(operation.path_in_repo)
        return SimpleNamespace(commit_url="https://example.invalid/commit", oid="0" * 40)

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    return uploaded


def test_push_to_hub_uploads_what_save_pretrained_writes(tmp_path, monkeypatch):
    model = patched("gpt2-lm")
    model.config.neural_attention_base_model = "openai-community/gpt2"
    uploaded = fake_hub_upload(monkeypatch, tmp_path / "hub")
    model.push_to_hub("me/gpt2-neural", tags=["my-tag"])
    model.save_pretrained(tmp_path / "saved")
    assert sorted(uploaded) == sorted(p.name for p in (tmp_path / "saved").iterdir())

    card = ModelCard.load(tmp_path / "hub" / "README.md")
    assert card.data.library_name == "transformers" and card.data.base_model == "openai-community/gpt2"
    assert {"neural-attention", "hf-neural-attention", "my-tag"} <= set(card.data.tags)
    for text in ('from_pretrained("me/gpt2-neural", trust_remote_code=True)', "import hf_neural_attention",
                 "arXiv:2502.17206", "`proj_dim` | `4`", "@article{digiugno2025neural"):
        assert text in card.text, text
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hub")
    assert torch.equal(logits(loaded, "gpt2-lm"), logits(model, "gpt2-lm"))


@pytest.mark.slow
def test_load_without_the_plugin_in_a_fresh_process(tmp_path, monkeypatch):
    jobs, expected = [], []  # each job loads a folder under an Auto class in the fresh process; `read` picks the output

    def job(folder: Path, family: str, auto: str, read: str, want: torch.Tensor, **kwargs) -> None:
        jobs.append({"dir": str(folder), "auto": auto, "read": read, "kwargs": kwargs,
                     "inputs": str(tmp_path / f"{family}-in.safetensors"), "out": str(tmp_path / f"{len(jobs)}.st")})
        expected.append((f"{auto} from {folder.name}", want))

    def body_output(model, family: str) -> torch.Tensor:  # the last layer's hidden states, before any final norm
        with torch.no_grad():
            return model(**make_inputs(family), output_hidden_states=True).hidden_states[-1]

    for family in ("gpt2", "vit"):
        save_file(make_inputs(family), str(tmp_path / f"{family}-in.safetensors"))
        head_kind = BODIES[family][0]
        model = patched(head_kind, layers=[0, 1])
        folder = tmp_path / head_kind
        if family == "gpt2":  # what push_to_hub uploads, loaded back
            fake_hub_upload(monkeypatch, folder)
            model.push_to_hub("me/neural")
        else:
            model.save_pretrained(folder)
        job(folder, family, STOCK[head_kind][2].__name__, "logits", logits(model, head_kind))
        job(folder, family, "AutoModel", "body", body_output(model, family))  # the body alone
        # a bare model's checkpoint under a (new) head
        torch.manual_seed(0)
        bare = patch_model(BODIES[family][2](STOCK[head_kind][1]()).eval(), layers=[1], proj_dim=4)
        bare.save_pretrained(tmp_path / f"{family}-bare")
        other = BODIES[family][4]
        job(tmp_path / f"{family}-bare", family, STOCK[other][2].__name__, "body", body_output(bare, family),
            **({"pad_token_id": 0} if family == "gpt2" else {}))
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PYTHON", "HF_"))}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"), HF_MODULES_CACHE=str(tmp_path / "modules"),
               OMP_NUM_THREADS="1", PYTHONNOUSERSITE="1")
    result = subprocess.run([sys.executable, "-c", REMOTE_LOADER, json.dumps(jobs)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for job_spec, (what, want) in zip(jobs, expected, strict=True):
        assert torch.equal(load_file(job_spec["out"])["logits"], want), what


REMOTE_THEN_PLUGIN = textwrap.dedent("""
    import importlib.abc, sys
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "hf_neural_attention":
                raise ModuleNotFoundError("hf_neural_attention is blocked until the model is loaded")
    blocker = Block()
    sys.meta_path.insert(0, blocker)
    import torch
    from transformers import AutoModelForCausalLM, GPT2LMHeadModel
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    sys.meta_path.remove(blocker)
    import hf_neural_attention as hna  # imported after the remote-code load: the model is one of its Hub classes
    from hf_neural_attention.hub_classes import is_hub_class
    assert is_hub_class(type(model)), type(model)
    assert "trust_remote_code=True" in hna.build_model_card(model).text
    model.save_pretrained(sys.argv[2] + "-neural")  # with our card, as the plugin's own classes save
    with open(sys.argv[2] + "-neural/README.md") as card:
        assert "hf-neural-attention" in card.read()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    hna.unpatch_model(model)
    assert type(model) is GPT2LMHeadModel and type(model.config).__name__ == "GPT2Config", type(model)
    model.save_pretrained(sys.argv[2])
    stock = GPT2LMHeadModel.from_pretrained(sys.argv[2]).eval()
    with torch.no_grad():
        assert torch.equal(stock(ids).logits, model(ids).logits)
    print("ok")
""")


@pytest.mark.slow
def test_a_model_loaded_by_remote_code_before_the_plugin_is_imported_is_one_of_its_hub_classes(tmp_path):
    # the card's first snippet, then `import hf_neural_attention`: the model's classes are remote-code copies of ours,
    # which the plugin once did not recognise (wrong card, and unpatch_model left a Hub class that could not save)
    patched("gpt2-lm").save_pretrained(tmp_path / "neural")
    env = {key: value for key, value in os.environ.items() if not key.startswith("HF_")}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"), HF_MODULES_CACHE=str(tmp_path / "modules"),
               OMP_NUM_THREADS="1")
    command = [sys.executable, "-c", REMOTE_THEN_PLUGIN, str(tmp_path / "neural"), str(tmp_path / "stock")]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


# --- bad inputs ----------------------------------------------------------------------------------------------------
def _edit_config(folder: Path, **changes) -> None:
    data = json.loads((folder / "config.json").read_text())
    data.update(changes)
    (folder / "config.json").write_text(json.dumps(data))


def _edit_weights(folder: Path, edit) -> None:
    weights = load_file(folder / "model.safetensors")
    edit(weights)
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})


def test_bad_checkpoints_fail_clearly(tmp_path):
    model = patched("gpt2-lm")
    model.save_pretrained(tmp_path / "good")

    def variant(name: str) -> Path:
        folder = tmp_path / name
        shutil.copytree(tmp_path / "good", folder)
        return folder

    folder = variant("layers")
    _edit_config(folder, neural_attention_layers=[0, 7])
    with pytest.raises(ValueError, match=r"layers this model does not have"):
        AutoModelForCausalLM.from_pretrained(folder)

    folder = variant("typed")
    _edit_config(folder, neural_attention_proj_dim="eight")
    with pytest.raises(ValueError, match="neural_attention_proj_dim"):
        AutoModelForCausalLM.from_pretrained(folder)

    folder = variant("missing")
    _edit_weights(folder, lambda w: w.pop("transformer.h.0.attn.neural_scorer.hidden_weight"))
    with pytest.raises(ValueError, match="scorer weights missing"):
        AutoModelForCausalLM.from_pretrained(folder)

    folder = variant("nan")
    _edit_weights(folder, lambda w: w["transformer.h.0.attn.neural_scorer.output_weight"].fill_(float("nan")))
    with pytest.raises(ValueError, match="non-finite scorer weights"):
        AutoModelForCausalLM.from_pretrained(folder)

    folder = variant("shape")
    _edit_config(folder, neural_attention_proj_dim=2)
    with pytest.raises(ValueError, match="other shapes than the config.*ignore_mismatched_sizes=True"):
        AutoModelForCausalLM.from_pretrained(folder)

    folder = variant("truncated")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(SafetensorError, match="deserializing header"):  # not a half-loaded model
        AutoModelForCausalLM.from_pretrained(folder)

    folder = variant("extra")
    _edit_config(folder, neural_attention_layers=[1])
    with pytest.raises(ValueError, match="scorer weights"):
        AutoModelForCausalLM.from_pretrained(folder)


# --- Trainer -------------------------------------------------------------------------------------------------------
class _TokenData(torch.utils.data.Dataset):
    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(3)
        self.rows = torch.randint(1, 100, (16, SEQ), generator=generator)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[index], "labels": self.rows[index]}


@pytest.mark.slow
def test_trainer_checkpoints_load_and_resume_exactly(tmp_path):
    from transformers import Trainer, TrainingArguments

    def run(output_dir: Path, resume: str | None = None) -> tuple[Trainer, dict[str, torch.Tensor]]:
        args = TrainingArguments(output_dir=str(output_dir), max_steps=4, save_steps=2, per_device_train_batch_size=4,
                                 learning_rate=1e-2, seed=0, data_seed=0, dataloader_num_workers=0, report_to=[],
                                 use_cpu=True, logging_steps=100, disable_tqdm=True)
        trainer = Trainer(model=patched("gpt2-lm"), args=args, train_dataset=_TokenData())
        trainer.train(resume_from_checkpoint=resume)
        return trainer, {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}

    trainer, final = run(tmp_path / "full")
    checkpoint = tmp_path / "full" / "checkpoint-2"
    loaded = AutoModelForCausalLM.from_pretrained(checkpoint)
    assert type(loaded) is NeuralAttentionGPT2ForCausalLM and len(scorers(loaded)) == 1
    saved = load_file(checkpoint / "model.safetensors")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in saved.items())

    resumed, resumed_final = run(tmp_path / "full", resume=str(checkpoint))
    assert resumed.state.global_step == trainer.state.global_step == 4
    assert final.keys() == resumed_final.keys()
    assert all(torch.equal(final[k], resumed_final[k]) for k in final)


@pytest.mark.parametrize("load", [AutoModelForCausalLM.from_pretrained, NeuralAttentionGPT2ForCausalLM.from_pretrained])
def test_a_setting_that_reshapes_the_scorers_at_load_is_refused_or_starts_them_afresh(tmp_path, load):
    model = patched("gpt2-lm")  # proj_dim 4
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="other shapes than the config.*neural_attention_.*ignore_mismatched_sizes"):
        load(tmp_path, neural_attention_proj_dim=2)
    with pytest.raises(ValueError, match="such as num_labels"):  # not only our settings reshape weights: a head's
        load(tmp_path, vocab_size=120)

    torch.manual_seed(0)
    fresh = load(tmp_path, neural_attention_proj_dim=2, ignore_mismatched_sizes=True)
    (scorer,) = scorers(fresh)
    assert scorer.settings.proj_dim == 2 and scorer.query_down_weight.shape[-2] == 2
    saved = load_file(tmp_path / "model.safetensors")
    state = fresh.state_dict()  # every other weight as saved
    assert all(torch.equal(state[k], v) for k, v in saved.items() if ".neural_scorer." not in k)
    # the scorers' own init (PyTorch's nn.Linear: uniform within 1 / sqrt(fan_in)), not transformers' N(0, 0.02)
    bound = 1 / scorer.query_down_weight.shape[-1] ** 0.5
    assert 0.5 * bound < scorer.query_down_weight.abs().max() <= bound
    fresh.save_pretrained(tmp_path / "resaved")  # the config describes the new scorers
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "resaved")
    torch.testing.assert_close(logits(again, "gpt2-lm"), logits(fresh, "gpt2-lm"), rtol=0, atol=0)


def test_newer_scorer_parameters_and_a_caller_built_config_fail_clearly(tmp_path):
    model = patched("gpt2-lm")
    model.save_pretrained(tmp_path / "newer")
    added = "transformer.h.0.attn.neural_scorer.temperature"  # a parameter a later version might add
    _edit_weights(tmp_path / "newer", lambda w: w.update({added: torch.ones(4)}))
    with pytest.raises(ValueError, match=rf"scorers do not have: \['{added}'\].*upgrade"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "newer")

    model.save_pretrained(tmp_path / "partial")
    _edit_weights(tmp_path / "partial", lambda w: w.pop("transformer.h.0.attn.neural_scorer.hidden_weight"))
    saved = json.loads((tmp_path / "partial" / "config.json").read_text())
    config = NeuralAttentionGPT2Config(**{k: v for k, v in saved.items() if k not in ("model_type", "auto_map")})
    assert getattr(config, "_neural_attention_source_type", None) is None  # the caller's own config object
    with pytest.raises(ValueError, match="scorer weights missing from the checkpoint"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "partial", config=config)


def test_config_edits_that_describe_the_same_weights_still_save(tmp_path):
    torch.manual_seed(0)  # head_dim 8: proj_dim None resolves to 2, per-head weights
    model = patch_model(GPT2LMHeadModel(gpt2_config()).eval(), layers=[0])
    model.config.neural_attention_proj_dim = 2
    model.config.neural_attention_share_across_heads = False
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(logits(loaded, "gpt2-lm"), logits(model, "gpt2-lm"), rtol=0, atol=0)


def test_a_hand_edited_config_is_refused_at_save_and_nothing_is_written(tmp_path):
    model = patched("gpt2-lm")
    model.config.neural_attention_proj_dim = 8  # does not rebuild the scorers (proj_dim 4)
    with pytest.raises(ValueError, match=r"proj_dim=8 \(the scorers have 4\).*Nothing was saved"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    model.config.neural_attention_proj_dim = 4
    model.config.neural_attention_layers = [0, 1]
    with pytest.raises(ValueError, match=r"layers \[0, 1\] \(scorers in \[0\]\)"):
        model.save_pretrained(tmp_path / "out")
    model.config.neural_attention_layers = [0]
    two = patched("gpt2-lm", layers=(0, 1))
    two.config.neural_attention_layers = [1, 0]  # the config validator refused it at save, after the code files
    with pytest.raises(ValueError, match=r"layers \[1, 0\] \(scorers in \[0, 1\]\)"):
        two.save_pretrained(tmp_path / "out")
    # the kernel choices too: the running model ignores the edit, and a checkpoint saying "triton" fails on CPU
    for field, value in (("backend", "triton"), ("mlp_precision", "fp16")):
        before = getattr(model.config, f"neural_attention_{field}")
        setattr(model.config, f"neural_attention_{field}", value)
        with pytest.raises(ValueError, match=rf"{field}='{value}' \(the scorers run '{before}'\).*set_backend"):
            model.save_pretrained(tmp_path / "out")
        setattr(model.config, f"neural_attention_{field}", before)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("layers", [[1, 0], [0, 0]])
def test_layers_passed_to_from_pretrained_unsorted_or_repeated_are_refused(tmp_path, layers):
    # keyword arguments reach the config after its validator ran: [0, 0] built one scorer and saved a config naming two
    STOCK["gpt2-lm"][0](STOCK["gpt2-lm"][1]()).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=rf"sorted and without repeats, got \{layers}; pass \{sorted(set(layers))}"):
        NeuralAttentionGPT2ForCausalLM.from_pretrained(tmp_path, neural_attention_layers=layers)


@pytest.mark.parametrize("fault", ["nan", "meta"])
def test_a_save_that_would_not_load_is_refused_and_the_checkpoint_there_is_kept(tmp_path, fault):
    # from_pretrained refuses non-finite scorer weights; transformers fails on meta weights after writing config.json
    model = patched("gpt2-lm")
    model.save_pretrained(tmp_path)
    files = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    if fault == "nan":  # a diverged run
        broken = copy.deepcopy(model)
        with torch.no_grad():
            broken.get_parameter("transformer.h.0.attn.neural_scorer.output_weight").fill_(float("nan"))
        message = r"not finite \(a diverged run\?\).*Nothing was saved"
    else:
        with torch.device("meta"):
            broken = type(model)(copy.deepcopy(model.config))
        message = "on the meta device.*Nothing was saved"
    with pytest.raises(ValueError, match=message):
        broken.save_pretrained(tmp_path)
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == files
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(logits(reloaded, "gpt2-lm"), logits(model, "gpt2-lm"), rtol=0, atol=0)


def test_a_push_with_a_hand_edited_config_is_refused_before_the_repository_is_created(tmp_path, monkeypatch):
    model = patched("gpt2-lm")
    uploaded, created = fake_hub_upload(monkeypatch, tmp_path / "hub"), []
    make_repo = HfApi.create_repo
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: created.append(repo_id) or make_repo(
        self, repo_id, **kw))
    model.config.neural_attention_proj_dim = 8
    with pytest.raises(ValueError, match=r"proj_dim=8 \(the scorers have 4\)"):
        model.push_to_hub("me/edited")
    assert created == [] and uploaded == []  # no empty repository left behind
    model.config.neural_attention_proj_dim = 4
    model.push_to_hub("me/edited")
    assert created == ["me/edited"] and "model.safetensors" in uploaded


def test_the_card_of_a_stock_class_model_states_the_scorers_settings_not_hand_edits():
    # a Llama keeps its class, whose save_pretrained never compares the config with the scorers: the card (written
    # by NeuralAttentionTrainer beside the adapter) takes the settings from the scorers, as the adapter does
    model = patch_model(tiny_llama(), layers=[1], proj_dim=4)
    model.config.neural_attention_mode = "residual"
    model.config.neural_attention_activation = "swish"  # not even valid: the card must still be written
    model.config.neural_attention_layers = [0]
    text = hna.build_model_card(model).text
    assert "| `layers` | `[1]` |" in text and "| `mode` | `'replace'` |" in text
    assert "| `activation` | `'relu'` |" in text and "| `proj_dim` | `4` |" in text


def test_save_pretrained_keeps_a_readme_of_the_users_and_renews_its_own(tmp_path, caplog):
    model = patched("gpt2-lm")
    (tmp_path / "README.md").write_text("# My model\n\nHand-written evaluation and license.\n")
    with caplog.at_level(logging.WARNING):
        model.save_pretrained(tmp_path)
    assert "Hand-written" in (tmp_path / "README.md").read_text() and "kept it" in caplog.text
    (tmp_path / "README.md").unlink()
    model.save_pretrained(tmp_path)
    text = ModelCard.load(tmp_path / "README.md").text  # no repo id yet: the folder's name heads the card
    assert f"\n# {tmp_path.name}\n" in text and 'from_pretrained("<repo-id>"' in text
    model.config.neural_attention_base_model = "me/other-base"
    model.save_pretrained(tmp_path)  # our own card is rewritten with the new settings
    assert ModelCard.load(tmp_path / "README.md").data.base_model == "me/other-base"


def test_save_pretrained_with_push_to_hub_uploads_what_it_saved_with_our_card(tmp_path, monkeypatch):
    model = patched("gpt2-lm")
    uploaded = fake_hub_upload(monkeypatch, tmp_path / "hub")
    model.save_pretrained(tmp_path / "local", push_to_hub=True, repo_id="me/gpt2-neural", max_shard_size="40KB")
    assert sorted(uploaded) == sorted(p.name for p in (tmp_path / "local").iterdir())
    assert sum(name.endswith(".safetensors") for name in uploaded) > 1  # the saving options reached the upload
    for folder in (tmp_path / "hub", tmp_path / "local"):
        card = ModelCard.load(folder / "README.md")
        assert "neural-attention" in card.data.tags and "arXiv:2502.17206" in card.text

    (tmp_path / "own").mkdir()
    (tmp_path / "own" / "README.md").write_text("# My own card\n")
    model.save_pretrained(tmp_path / "own", push_to_hub=True, repo_id="me/own")  # kept, and what is uploaded
    assert (tmp_path / "own" / "README.md").read_text() == "# My own card\n"
    assert (tmp_path / "hub" / "README.md").read_text() == "# My own card\n"

    uploaded.clear()
    model.save_pretrained(tmp_path / "other-rank", False, push_to_hub=True, repo_id="me/x")  # is_main_process=False
    assert uploaded == [] and not (tmp_path / "other-rank" / "README.md").exists()

    # a repository that already has a card of somebody else's keeps it, as a stock model's push does
    curated, load_file_card = "---\nlicense: mit\n---\n# Curated card\n", ModelCard.load

    def load(repo_id_or_path, *args, **kwargs):  # the repository's card; local files as usual
        return load_file_card(repo_id_or_path) if Path(repo_id_or_path).exists() else ModelCard(curated)

    monkeypatch.setattr(transformers.utils.hub.ModelCard, "load", load)
    model.save_pretrained(tmp_path / "curated", push_to_hub=True, repo_id="me/curated")
    assert "# Curated card" in (tmp_path / "hub" / "README.md").read_text()


def test_a_composite_with_patched_towers_round_trips_and_says_where_it_loads(tmp_path, caplog):
    # each tower takes its Hub class, and the composite saves its config (model_type neural_attention_vit /
    # neural_attention_gpt2): a checkpoint that loads where the plugin is imported, as the patch-time warning says
    from transformers import VisionEncoderDecoderConfig, VisionEncoderDecoderModel

    torch.manual_seed(0)
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(tiny_vit_config(), tiny_gpt2_config())
    model = VisionEncoderDecoderModel(config).eval()
    with caplog.at_level(logging.WARNING):
        patch_model(model.encoder, layers=[0], proj_dim=4)
        patch_model(model.decoder, layers=[1], proj_dim=4)
    for tower, model_type in (("NeuralAttentionViTModel", "neural_attention_vit"),
                              ("NeuralAttentionGPT2ForCausalLM", "neural_attention_gpt2")):  # fmt: skip
        assert f"{tower} is a tower of VisionEncoderDecoderModel" in caplog.text
        assert f"model_type {model_type!r}" in caplog.text
    assert "save_neural_adapter" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        patch_model(model.encoder, layers=[2], proj_dim=4)  # a layer more: said once already
    assert "is a tower of" not in caplog.text
    sharpen_scorers(model)
    pixels, ids = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)), random_ids(2, 5)
    model.save_pretrained(tmp_path)
    reloaded = VisionEncoderDecoderModel.from_pretrained(tmp_path).eval()
    assert neural_layers(reloaded) == neural_layers(model)
    with torch.no_grad():
        expected = model(pixel_values=pixels, decoder_input_ids=ids).logits
        torch.testing.assert_close(reloaded(pixel_values=pixels, decoder_input_ids=ids).logits, expected, rtol=0,
                                   atol=0)  # fmt: skip
        unpatch_model(model)
        assert not torch.allclose(model(pixel_values=pixels, decoder_input_ids=ids).logits, expected, atol=1e-3)


def test_patching_a_model_without_a_hub_class_says_how_to_save_it(caplog):
    with caplog.at_level(logging.WARNING):
        patch_model(tiny_llama(), layers=[0])
    assert "LlamaForCausalLM keeps its class (no neural-attention Hub class)" in caplog.text
    assert "save_neural_adapter" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        patched("gpt2-lm")
    assert "keeps its class" not in caplog.text
    parent = tiny_gpt2()
    with caplog.at_level(logging.WARNING):
        patch_model(parent.transformer, layers=[0])  # the sub-model alone: the parent keeps its stock class
    assert type(parent).__name__ == "GPT2LMHeadModel" and type(parent.transformer).__name__ == "GPT2Model"
    assert "GPT2Model keeps its class (a sub-model of GPT2LMHeadModel, which shares its config)" in caplog.text


def test_a_stock_class_built_from_a_hub_config_says_it_is_dot_product_and_saves_only_once_patched(tmp_path, caplog):
    hub = patched("gpt2-lm")
    stock = GPT2LMHeadModel(hub.config).eval()  # builds no scorers: dot-product attention everywhere
    with caplog.at_level(logging.WARNING):
        logits(stock, "gpt2-lm")
    assert "names neural layers [0], but the model running it has no neural scorers" in caplog.text
    with pytest.raises(ValueError, match=r"names neural layers \[0\], but the GPT2LMHeadModel saving it has no neural"):
        stock.save_pretrained(tmp_path / "stock")  # config.json would promise scorer weights it has not got
    assert not any((tmp_path / "stock").glob("*"))
    with pytest.raises(ValueError, match="the GPT2Model saving it has no neural scorers"):  # a bare body alike
        GPT2Model(hub.config).save_pretrained(tmp_path / "stock-body")
    hub.config.save_pretrained(tmp_path / "config")  # a config saved on its own
    # what does carry the scorers saves: the body of a patched model (a stock class), a subclass of a Hub class
    hub.transformer.save_pretrained(tmp_path / "body")
    assert [index for index, _ in neural_layers(AutoModel.from_pretrained(tmp_path / "body"))] == [0]

    class Subclass(NeuralAttentionGPT2ForCausalLM):
        pass

    mine = patch_model(Subclass(hub.config), layers=[1], proj_dim=4)
    assert type(mine.config) is NeuralAttentionGPT2Config
    mine.save_pretrained(tmp_path / "subclass")
    assert json.loads((tmp_path / "subclass" / "config.json").read_text())["model_type"] == "neural_attention_gpt2"
    # a patched pretrained model's config names its Hub class, so it saves on its own too
    GPT2LMHeadModel(gpt2_config()).save_pretrained(tmp_path / "plain")
    pretrained = patch_model(GPT2LMHeadModel.from_pretrained(tmp_path / "plain"), layers=[0])
    assert pretrained.config.architectures == ["NeuralAttentionGPT2ForCausalLM"]
    pretrained.config.save_pretrained(tmp_path / "pretrained-config")
    # built from the config of a model on eager, its unpatched layers keep eager (the masks are built for it)
    on_eager = patch_model(GPT2LMHeadModel(gpt2_config(attn_implementation="eager")), layers=[0])
    rebuilt = patch_model(GPT2LMHeadModel(on_eager.config), layers=[0], proj_dim=4)
    assert getattr(rebuilt.transformer.h[1].attn, FALLBACK_ATTRIBUTE) == "eager"

    patch_model(stock, layers=[1], proj_dim=4)  # now it has scorers: the Hub class its config names
    assert type(stock) is NeuralAttentionGPT2ForCausalLM and stock.config.neural_attention_layers == [1]
    stock.save_pretrained(tmp_path / "patched")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "patched")
    assert [index for index, _ in neural_layers(loaded)] == [1]
    torch.testing.assert_close(logits(loaded, "gpt2-lm"), logits(stock, "gpt2-lm"), rtol=0, atol=0)

    # a stock class without a Hub class records its scorers on a stock config, as Llama does
    heads = patch_model(GPT2DoubleHeadsModel(hub.config), layers=[0], proj_dim=4)
    assert type(heads.config) is GPT2Config and heads.config.neural_attention_layers == [0]
    heads.save_pretrained(tmp_path / "heads")
    assert json.loads((tmp_path / "heads" / "config.json").read_text())["model_type"] == "gpt2"
    assert type(hub.config) is NeuralAttentionGPT2Config and hub.config.neural_attention_layers == [0]
