"""Adapter-size checkpoints: scorer weights + a small config naming the base model, round-tripped and checked."""

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel, GPT2Model, ViTConfig, ViTForImageClassification

import hf_neural_attention as hna
from hf_neural_attention import load_neural_adapter, patch_model, save_neural_adapter
from hf_neural_attention.adapters import CONFIG_NAME, WEIGHTS_NAME


def tiny_gpt2(model_class=GPT2LMHeadModel):
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=32, bos_token_id=0,
                        eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return model_class(config).eval()


IDS = torch.randint(1, 100, (2, 8), generator=torch.Generator().manual_seed(1))


def output(model) -> torch.Tensor:
    with torch.no_grad():
        result = model(IDS)
    return result.logits if hasattr(result, "logits") else result.last_hidden_state


def trained_adapter(tmp_path, model_class=GPT2LMHeadModel):
    model = patch_model(tiny_gpt2(model_class), layers=[1], proj_dim=4, mode="residual")
    with torch.no_grad():  # pretend training moved the scorer away from its (zero-output) init
        for name, param in model.named_parameters():
            if ".neural_scorer." in name:
                param.add_(0.1)
    save_neural_adapter(model, tmp_path, base_model="me/base", revision="abc123")
    return model


@pytest.mark.parametrize("model_class", [GPT2LMHeadModel, GPT2Model])
def test_adapter_round_trip(tmp_path, model_class):
    model = trained_adapter(tmp_path, model_class)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    metadata = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert metadata["base_model"] == "me/base" and metadata["base_model_revision"] == "abc123"
    assert metadata["layers"] == [1] and metadata["settings"]["mode"] == "residual"
    assert metadata["model_class"] == model_class.__name__
    assert metadata["format_version"] == 1 and "names_relative_to" not in metadata  # readable by 0.1.0
    weights = load_file(tmp_path / WEIGHTS_NAME)
    assert weights and all(".neural_scorer." in k and not k.startswith("transformer.") for k in weights)

    base = tiny_gpt2(model_class)
    restored = load_neural_adapter(base, tmp_path)
    assert restored is base
    assert torch.equal(output(restored), output(model))
    original, loaded = model.state_dict(), restored.state_dict()
    assert original.keys() == loaded.keys() and all(torch.equal(original[k], loaded[k]) for k in original)


def test_adapter_from_a_gpt2_lm_loads_into_the_bare_model(tmp_path):
    trained_adapter(tmp_path, GPT2LMHeadModel)
    base = load_neural_adapter(tiny_gpt2(GPT2Model), tmp_path)
    assert base.h[1].attn.neural_scorer is not None


def test_adapter_loaded_by_name_uses_the_recorded_class(tmp_path):
    model = trained_adapter(tmp_path / "adapter")
    tiny_gpt2().save_pretrained(tmp_path / "base")
    restored = load_neural_adapter(str(tmp_path / "base"), tmp_path / "adapter", revision=None)
    assert torch.equal(output(restored), output(model))


def test_adapter_of_a_compiled_model_records_the_model_class(tmp_path):
    model = patch_model(tiny_gpt2(), layers=[1], proj_dim=4)
    save_neural_adapter(torch.compile(model), tmp_path / "adapter", base_model="me/base")
    assert json.loads((tmp_path / "adapter" / CONFIG_NAME).read_text())["model_class"] == "GPT2LMHeadModel"
    tiny_gpt2().save_pretrained(tmp_path / "base")
    restored = load_neural_adapter(str(tmp_path / "base"), tmp_path / "adapter", revision=None)
    assert type(restored).__name__ == "NeuralAttentionGPT2ForCausalLM"  # the LM head was kept
    assert torch.equal(output(restored), output(model))


def test_adapter_of_a_peft_model_holds_the_trained_scorers_under_base_model_names(tmp_path):
    """LoRA with ``modules_to_save=["neural_scorer"]``: PEFT trains a copy of each scorer beside the frozen original;
    the adapter holds the copy, named as for the bare model, and loads into a plain base model."""
    peft = pytest.importorskip("peft")
    plain = patch_model(tiny_gpt2(), layers=[1], proj_dim=4)
    save_neural_adapter(plain, tmp_path / "plain")
    wrapped = peft.get_peft_model(patch_model(tiny_gpt2(), layers=[1], proj_dim=4),
                                  peft.LoraConfig(target_modules=["c_attn"], modules_to_save=["neural_scorer"]))
    with torch.no_grad():  # what training does: only the adapter's copy moves
        for name, param in wrapped.named_parameters():
            if ".neural_scorer.modules_to_save." in name:
                param.add_(0.1)
    save_neural_adapter(wrapped, tmp_path / "peft")
    metadata = json.loads((tmp_path / "peft" / CONFIG_NAME).read_text())
    assert metadata["model_class"] == "GPT2LMHeadModel" and metadata["layers"] == [1]
    assert sorted(load_file(tmp_path / "peft" / WEIGHTS_NAME)) == sorted(load_file(tmp_path / "plain" / WEIGHTS_NAME))
    restored = load_neural_adapter(tiny_gpt2(), tmp_path / "peft")
    torch.testing.assert_close(output(restored), output(wrapped), rtol=0, atol=1e-6)  # LoRA starts at zero
    assert not torch.allclose(output(restored), output(plain), atol=1e-4)
    # a second adapter without scorer copies made active: PEFT runs the original scorers, and so does the adapter
    wrapped.add_adapter("other", peft.LoraConfig(target_modules=["c_attn"]))
    wrapped.set_adapter("other")
    save_neural_adapter(wrapped, tmp_path / "other")
    original, saved = load_file(tmp_path / "plain" / WEIGHTS_NAME), load_file(tmp_path / "other" / WEIGHTS_NAME)
    assert saved.keys() == original.keys() and all(torch.equal(saved[name], original[name]) for name in saved)


def test_patching_inside_a_peft_wrapper_warns_and_its_trained_scorers_round_trip_through_the_adapter(tmp_path, caplog):
    """``patch_model`` after ``get_peft_model``: the scorers train, but PEFT's own save leaves them out (silently,
    until a user's reload gave other outputs); the warning names the save that keeps them."""
    peft = pytest.importorskip("peft")
    wrapped = peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(target_modules=["c_attn"], fan_in_fan_out=True))
    with caplog.at_level("WARNING", logger="hf_neural_attention.patching"):
        assert patch_model(wrapped, layers=[0], proj_dim=4) is wrapped
    assert "inside a PEFT wrapper" in caplog.text and "save_neural_adapter" in caplog.text
    scorers = [p for name, p in wrapped.named_parameters() if ".neural_scorer." in name]
    assert scorers and all(p.requires_grad for p in scorers)
    before = [p.detach().clone() for p in scorers]
    optimizer = torch.optim.SGD([p for p in wrapped.parameters() if p.requires_grad], lr=0.5)
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
    wrapped(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    assert not all(torch.equal(p, old) for p, old in zip(scorers, before, strict=True))  # (b_a's gradient is 0)
    wrapped.save_pretrained(tmp_path / "lora")
    save_neural_adapter(wrapped, tmp_path / "scorers")
    restored = peft.PeftModel.from_pretrained(load_neural_adapter(tiny_gpt2(), tmp_path / "scorers"), tmp_path / "lora")
    torch.testing.assert_close(output(restored), output(wrapped), rtol=0, atol=1e-6)
    untrained = peft.PeftModel.from_pretrained(patch_model(tiny_gpt2(), layers=[0], proj_dim=4), tmp_path / "lora")
    assert not torch.allclose(output(untrained), output(wrapped), atol=1e-4)  # what PEFT's save alone gives back
    caplog.clear()
    with caplog.at_level("WARNING", logger="hf_neural_attention.patching"):
        patch_model(tiny_gpt2(), layers=[0])
    assert "PEFT" not in caplog.text and "adapters" not in caplog.text  # a bare model: no warning
    # adapters loaded through transformers' own integration: what its add_adapter does (peft.inject_adapter_in_model,
    # then the flag; transformers 5.24 asks for a peft release newer than any yet), after which its save_pretrained
    # stores the adapters alone. The warning says so, not "inside a PEFT wrapper", whose advice does not apply
    integrated = tiny_gpt2()
    peft.inject_adapter_in_model(peft.LoraConfig(target_modules=["c_attn"], fan_in_fan_out=True), integrated)
    integrated._hf_peft_config_loaded = True
    with caplog.at_level("WARNING", logger="hf_neural_attention.patching"):
        patch_model(integrated, layers=[0])
    assert "adapters loaded through transformers" in caplog.text and "PEFT wrapper" not in caplog.text


def test_set_backend_through_peft_switches_every_copy_of_the_scorers(tmp_path):
    # it switched PEFT's modules_to_save wrapper only: the copy merge_and_unload keeps ran the old backend under a
    # config naming the new one, and save_pretrained refused the model
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from hf_neural_attention import set_backend
    from hf_neural_attention.scoring_neural_attention import NeuralScorer

    model = peft.get_peft_model(patch_model(tiny_gpt2(), layers=[0], proj_dim=4), peft.LoraConfig(
        target_modules=["c_attn"], fan_in_fan_out=True, modules_to_save=["neural_scorer"]))
    set_backend(model, "eager")
    copies = [module for module in model.modules() if isinstance(module, NeuralScorer)]
    assert len(copies) == 2 and {scorer.settings.backend for scorer in copies} == {"eager"}
    merged = model.merge_and_unload()
    merged.save_pretrained(tmp_path)
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config.neural_attention_backend == "eager"


def test_a_resumed_peft_run_loads_its_scorers_from_the_adapter_the_trainer_saved(tmp_path):
    """Trainer restores PEFT's adapter only: scorers patched after get_peft_model (not in modules_to_save) restarted
    from their initial weights, under their trained optimizer state, and the resumed run silently differed."""
    peft = pytest.importorskip("peft")
    from transformers import TrainingArguments

    from hf_neural_attention import NeuralAttentionTrainer, set_backend
    from hf_neural_attention.adapters import adapter_state_dict, restore_neural_adapter_weights
    from tests.test_trainer_smoke import _ListDataset

    rows = [{"input_ids": row, "labels": row} for row in torch.randint(1, 100, (8, 12), generator=torch.Generator()
                                                                        .manual_seed(2))]  # fmt: skip

    def train(resume: str | None = None) -> dict[str, torch.Tensor]:
        model = peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
        patch_model(model, layers=[0], proj_dim=4)
        args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=4, save_steps=2, learning_rate=1e-2,
                                 per_device_train_batch_size=4, report_to=[], use_cpu=True, disable_tqdm=True)
        trainer = NeuralAttentionTrainer(model=model.train(), args=args, train_dataset=_ListDataset(rows))
        trainer.train(resume_from_checkpoint=resume)
        return adapter_state_dict(model)

    uninterrupted = train()
    resumed = train(resume=str(tmp_path / "run" / "checkpoint-2"))
    assert uninterrupted.keys() == resumed.keys()
    assert all(torch.equal(uninterrupted[name], resumed[name]) for name in uninterrupted)
    # a run with other layers, or other settings whose weights have the same shapes (gelu), is refused
    for layers, activation in (([1], "relu"), ([0], "gelu")):
        other = peft.get_peft_model(patch_model(tiny_gpt2(), layers=layers, proj_dim=4, activation=activation),
                                    peft.LoraConfig(target_modules=["c_attn"], fan_in_fan_out=True))
        before = adapter_state_dict(other)
        with pytest.raises(ValueError, match=r"was saved with layers \[0\] .*no scorer weight was changed"):
            restore_neural_adapter_weights(other, tmp_path / "run" / "checkpoint-2")
        assert all(torch.equal(before[name], value) for name, value in adapter_state_dict(other).items())
    set_backend(model_like := peft.get_peft_model(patch_model(tiny_gpt2(), layers=[0], proj_dim=4), peft.LoraConfig(
        target_modules=["c_attn"], fan_in_fan_out=True)), "eager")  # how the scorers run is no setting of the run
    restore_neural_adapter_weights(model_like, tmp_path / "run" / "checkpoint-2")
    saved = load_file(tmp_path / "run" / "checkpoint-2" / WEIGHTS_NAME)
    assert all(torch.equal(saved[name], value) for name, value in adapter_state_dict(model_like).items())


def test_adapter_from_a_state_dict_without_the_frozen_scorers_takes_them_from_the_model(tmp_path):
    # Trainer's ZeRO-3 save of a PEFT model gathers only the trainable parameters (exclude_frozen_parameters): frozen
    # scorers, whole on every rank, come from the model (they were once refused, and no adapter was written)
    peft = pytest.importorskip("peft")
    wrapped = peft.get_peft_model(patch_model(tiny_gpt2(), layers=[1], proj_dim=4),
                                  peft.LoraConfig(target_modules=["c_attn"]))
    trainable = {name: p.detach() for name, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable and not any(".neural_scorer." in name for name in trainable)
    save_neural_adapter(wrapped, tmp_path / "partial", state_dict=trainable)
    save_neural_adapter(wrapped, tmp_path / "whole")
    partial, whole = load_file(tmp_path / "partial" / WEIGHTS_NAME), load_file(tmp_path / "whole" / WEIGHTS_NAME)
    assert partial.keys() == whole.keys() and all(torch.equal(partial[k], whole[k]) for k in whole)
    # a state dict's own values win where it has them (it is the gathered copy of sharded ones)
    name = next(n for n, _ in wrapped.named_parameters() if ".neural_scorer." in n)
    save_neural_adapter(wrapped, tmp_path / "given", state_dict={name: torch.full_like(dict(
        wrapped.named_parameters())[name], 7.0)})  # fmt: skip
    assert any(torch.all(t == 7.0) for t in load_file(tmp_path / "given" / WEIGHTS_NAME).values())


@pytest.mark.parametrize("recorded", ["MyCustomLM", "logging", "GPT2Config", 5])
def test_adapter_naming_a_class_transformers_lacks_is_refused_by_name(tmp_path, recorded):
    # not a model class: a name transformers lacks, or one of its modules, configs, or not a name at all (the
    # adapter's config is a file anyone may edit: these raised AttributeError / TypeError)
    trained_adapter(tmp_path / "adapter")
    config_path = tmp_path / "adapter" / CONFIG_NAME
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "model_class": recorded}))
    with pytest.raises(ValueError, match=f"saved from a {recorded!r}.*load_neural_adapter\\(model, directory\\)"):
        load_neural_adapter(str(tmp_path / "base"), tmp_path / "adapter")


@pytest.mark.parametrize("call", ["save_neural_adapter", "load_neural_adapter", "set_backend", "neural_layers"])
def test_a_name_where_a_model_belongs_is_a_type_error_saying_so(tmp_path, call):
    trained_adapter(tmp_path)
    arguments = {"save_neural_adapter": ("gpt2", tmp_path / "out"), "load_neural_adapter": (123, tmp_path),
                 "set_backend": ("gpt2", "auto"), "neural_layers": ("gpt2",)}[call]
    with pytest.raises(TypeError, match=r"Expected a model \(a torch nn.Module"):
        getattr(hna, call)(*arguments)


def test_adapter_for_vit(tmp_path):
    torch.manual_seed(0)
    config = ViTConfig(image_size=8, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64, num_labels=3)
    model = patch_model(ViTForImageClassification(copy.deepcopy(config)).eval(), layers=[0], proj_dim=4)
    save_neural_adapter(model, tmp_path)
    torch.manual_seed(0)
    restored = load_neural_adapter(ViTForImageClassification(config).eval(), tmp_path)
    pixels = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(restored(pixels).logits, model(pixels).logits)


def _tiny_vit_mae():
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    torch.manual_seed(0)
    config = ViTMAEConfig(image_size=8, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=64, decoder_hidden_size=32, decoder_num_hidden_layers=2,
                          decoder_num_attention_heads=4, decoder_intermediate_size=64, mask_ratio=0.5)
    return ViTMAEForPreTraining(config).eval()


def test_adapter_holds_scorers_of_a_task_head_with_attention_layers(tmp_path):
    # ViTMAE's pre-training decoder lies outside model.base_model (the encoder): its scorers were once left out of
    # the adapter without a word, and the adapter then named a layer the base model does not have
    model = patch_model(_tiny_vit_mae(), layers=[0, -1], proj_dim=4)
    with torch.no_grad():  # stand-in for training: weights that a fresh patch would not give
        for name, param in model.named_parameters():
            if ".neural_scorer." in name:
                param.add_(0.1)
    save_neural_adapter(model, tmp_path)
    metadata = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert metadata["layers"] == [0, 3] and metadata["names_relative_to"] == "model"
    assert metadata["format_version"] == 2  # a reader of format 1 only refuses it instead of misreading the names
    names = sorted(load_file(tmp_path / WEIGHTS_NAME))
    assert names and {k.split(".")[0] for k in names} == {"vit", "decoder"}

    restored = load_neural_adapter(_tiny_vit_mae(), tmp_path)
    pixels, noise = torch.randn(2, 3, 8, 8), torch.rand(2, 4)  # noise fixes which patches are masked
    with torch.no_grad():
        want, got = model(pixels, noise=noise), restored(pixels, noise=noise)
    assert torch.equal(got.logits, want.logits)
    original, loaded = model.state_dict(), restored.state_dict()
    assert original.keys() == loaded.keys() and all(torch.equal(original[k], loaded[k]) for k in original)

    # only the encoder patched: names relative to the base model, as for any other model (format 1)
    encoder_patched = patch_model(_tiny_vit_mae(), layers=[1], proj_dim=4)
    save_neural_adapter(encoder_patched, tmp_path / "encoder")
    metadata = json.loads((tmp_path / "encoder" / CONFIG_NAME).read_text())
    assert metadata["format_version"] == 1 and "names_relative_to" not in metadata
    bare = type(encoder_patched.vit)(encoder_patched.config).eval()  # the base model alone, same weights
    bare.load_state_dict({k: v for k, v in encoder_patched.vit.state_dict().items() if ".neural_scorer." not in k})
    load_neural_adapter(bare, tmp_path / "encoder")
    with torch.no_grad():
        torch.testing.assert_close(bare(pixels, noise=noise).last_hidden_state,
                                   encoder_patched.vit(pixels, noise=noise).last_hidden_state, rtol=0, atol=0)


def test_adapter_of_a_newer_format_is_refused_by_name(tmp_path):
    trained_adapter(tmp_path)
    metadata = json.loads((tmp_path / CONFIG_NAME).read_text())
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**metadata, "format_version": 3}))
    with pytest.raises(ValueError, match="format 3.*Upgrade hf-neural-attention"):
        load_neural_adapter(tiny_gpt2(), tmp_path)
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**metadata, "names_relative_to": "head"}))
    with pytest.raises(ValueError, match="names_relative_to"):
        load_neural_adapter(tiny_gpt2(), tmp_path)


def _assert_untouched(model, reference_state):
    state = model.state_dict()
    assert state.keys() == reference_state.keys()
    assert not any(".neural_scorer." in k for k in state)
    assert getattr(model.config, "neural_attention_layers", None) is None


DAMAGE_MESSAGES = {  # the message names the problem (these raised AttributeError, TypeError or a bare range error)
    "integer": r"not floating point \(torch\.int64\)",
    "json-list": "holds a JSON list, not an object",
    "version-string": "format_version must be an integer, got '1'",
    "layers": r"saved for layers \[1, 7\], which GPT2LMHeadModel cannot hold.*base model it was trained on",
}


@pytest.mark.parametrize("damage", ["missing", "unexpected", "shape", "nan", "corrupt", "config", *DAMAGE_MESSAGES])
def test_bad_adapters_leave_the_model_untouched(tmp_path, damage):
    trained_adapter(tmp_path)
    weights = load_file(tmp_path / WEIGHTS_NAME)
    name = next(iter(weights))
    if damage == "missing":
        weights.pop(name)
    elif damage == "unexpected":
        weights[name.replace("h.1.", "h.0.")] = weights[name].clone()
    elif damage == "shape":
        weights[name] = weights[name][..., :1].contiguous()
    elif damage == "nan":
        weights[name] = torch.full_like(weights[name], float("nan"))
    elif damage == "integer":
        weights[name] = weights[name].round().long()
    save_file(weights, str(tmp_path / WEIGHTS_NAME))
    metadata = json.loads((tmp_path / CONFIG_NAME).read_text())
    if damage in ("json-list", "version-string", "layers"):
        changed = {"json-list": [metadata], "version-string": {**metadata, "format_version": "1"},
                   "layers": {**metadata, "layers": [1, 7]}}[damage]  # fmt: skip
        (tmp_path / CONFIG_NAME).write_text(json.dumps(changed))
    if damage == "corrupt":
        (tmp_path / WEIGHTS_NAME).write_bytes(b"garbage")
    if damage == "config":
        metadata = json.loads((tmp_path / CONFIG_NAME).read_text())
        metadata["settings"]["mlp"] = "deeper"
        (tmp_path / CONFIG_NAME).write_text(json.dumps(metadata))
    base = tiny_gpt2()
    reference = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError, match=DAMAGE_MESSAGES.get(damage)):
        load_neural_adapter(base, tmp_path)
    _assert_untouched(base, reference)
    assert type(base) is GPT2LMHeadModel and base.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("fault", ["nan", "state-dict-shape", "state-dict-integer", "revision", "meta"])
def test_a_refused_save_leaves_the_adapter_already_in_the_folder_loadable(tmp_path, fault):
    # every refusal comes before a byte is written: a save that failed midway once left new weights beside the old
    # config (a revision that was not a str failed in json.dumps after the weights were written)
    trained = trained_adapter(tmp_path)
    saved = {name: (tmp_path / name).read_bytes() for name in (WEIGHTS_NAME, CONFIG_NAME)}
    other = patch_model(tiny_gpt2(), layers=[1], proj_dim=4, mode="residual")
    key = next(name for name in other.state_dict() if ".neural_scorer." in name)
    arguments, message = {}, None
    if fault == "nan":  # a diverged run: the loaders refuse non-finite scorer weights, so the save does too
        with torch.no_grad():
            other.get_parameter(key).fill_(float("nan"))
        message = "non-finite"
    elif fault.startswith("state-dict"):
        state = dict(other.state_dict())
        state[key] = state[key][..., :1] if fault == "state-dict-shape" else state[key].long()
        arguments = {"state_dict": state}
        message = "wrong shape" if fault == "state-dict-shape" else r"not floating point \(torch.int64\)"
    elif fault == "revision":
        arguments = {"revision": 3}
        message = "revision must be a Hub id or a path"
    else:
        with torch.device("meta"):
            other = patch_model(GPT2LMHeadModel(tiny_gpt2().config), layers=[1], proj_dim=4, mode="residual")
        message = "meta device"
    with pytest.raises((ValueError, TypeError), match=message):
        save_neural_adapter(other, tmp_path, **arguments)
    assert {name: (tmp_path / name).read_bytes() for name in (WEIGHTS_NAME, CONFIG_NAME)} == saved
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(saved)
    torch.testing.assert_close(output(load_neural_adapter(tiny_gpt2(), tmp_path)), output(trained), rtol=0, atol=0)


def test_a_save_failing_while_it_writes_leaves_the_adapter_there_and_no_partial_file(tmp_path, monkeypatch):
    trained = trained_adapter(tmp_path)
    saved = {name: (tmp_path / name).read_bytes() for name in (WEIGHTS_NAME, CONFIG_NAME)}

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", disk_full)  # the weights were written, the config is not
    with pytest.raises(OSError, match="No space left"):
        save_neural_adapter(patch_model(tiny_gpt2(), layers=[1], proj_dim=4, mode="residual"), tmp_path)
    monkeypatch.undo()
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == saved
    torch.testing.assert_close(output(load_neural_adapter(tiny_gpt2(), tmp_path)), output(trained), rtol=0, atol=0)


def test_a_path_names_the_base_model_as_a_str(tmp_path):
    model = patch_model(tiny_gpt2(), layers=[0])
    save_neural_adapter(model, tmp_path, base_model=tmp_path / "base")
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["base_model"] == str(tmp_path / "base")


def test_settings_added_after_0_1_are_written_only_off_their_default(tmp_path):
    """hf-neural-attention 0.1.0 refuses an adapter with settings it does not know: a default one is left out."""
    trained_adapter(tmp_path / "fp32")
    assert "mlp_precision" not in json.loads((tmp_path / "fp32" / CONFIG_NAME).read_text())["settings"]
    model = patch_model(tiny_gpt2(), layers=[1], proj_dim=4, mlp_precision="fp16")
    save_neural_adapter(model, tmp_path / "fp16")
    assert json.loads((tmp_path / "fp16" / CONFIG_NAME).read_text())["settings"]["mlp_precision"] == "fp16"
    restored = load_neural_adapter(tiny_gpt2(), tmp_path / "fp16")
    assert restored.config.neural_attention_mlp_precision == "fp16"


def test_settings_of_a_newer_version_are_ignored_with_a_warning(tmp_path, caplog):
    model = trained_adapter(tmp_path)
    metadata = json.loads((tmp_path / CONFIG_NAME).read_text())
    metadata["settings"]["future_knob"] = 3
    metadata["neural_attention_version"] = "9.0.0"
    (tmp_path / CONFIG_NAME).write_text(json.dumps(metadata))
    with caplog.at_level("WARNING", logger="hf_neural_attention.adapters"):
        restored = load_neural_adapter(tiny_gpt2(), tmp_path)
    assert "Ignoring adapter setting(s) ['future_knob']" in caplog.text and "newer than the installed" in caplog.text
    assert torch.equal(output(restored), output(model.eval()))


def test_leftover_config_fields_do_not_count_as_neural_layers(tmp_path):
    # a patched Llama (no Hub class) saved whole, then reloaded as the stock class: its scorers are dropped but the
    # config keeps its neural_attention_* fields; what is patched is what the modules carry
    from transformers import LlamaForCausalLM

    from hf_neural_attention import neural_layers
    from tests.models import random_ids, tiny_llama

    model = patch_model(tiny_llama(), layers=[0], proj_dim=4, mode="residual")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".neural_scorer." in name:
                param.add_(0.1)
    save_neural_adapter(model, tmp_path / "adapter", base_model="me/llama")
    model.save_pretrained(tmp_path / "full")
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "full").eval()
    assert neural_layers(reloaded) == [] and reloaded.config.neural_attention_layers == [0]
    with pytest.raises(ValueError, match="no neural layers"):
        save_neural_adapter(reloaded, tmp_path / "nothing")
    load_neural_adapter(reloaded, tmp_path / "adapter")
    assert [i for i, _ in neural_layers(reloaded)] == [0] and reloaded.config.neural_attention_layers == [0]
    ids = random_ids(2, 6)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
