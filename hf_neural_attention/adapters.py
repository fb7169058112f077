"""Adapter-size checkpoints: only the scorer weights plus a small config naming the base model.

For large base models there is no need to store (or push) the whole model: ``save_neural_adapter`` writes

- ``neural_adapter.safetensors``: every scorer parameter, named relative to the base model
  (``model.base_model``: ``h.0.attn.neural_scorer.query_down_weight`` for any GPT-2 head), or to the whole model
  where a task head holds attention layers of its own (ViTMAE's pre-training decoder), and
- ``neural_adapter_config.json``: layers, settings, base model id and revision, model class, package version.

``load_neural_adapter`` patches a base model with those settings and loads the weights, after checking everything
(names, shapes, values) so that a bad adapter leaves the model untouched. Works for every model ``patch_model``
supports, including those without a Hub class.
"""

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import PreTrainedModel

from .backend_neural_attention import SCORER_ATTRIBUTE
from .configuration_neural_attention import KERNEL_CHOICES, PACKAGE_VERSION, NeuralAttentionConfig, _version_tuple
from .hub_classes import stock_class_of
from .modeling_neural_attention import head_shape, is_offloaded, is_sharded
from .patching import (
    check_is_model,
    find_attention_modules,
    neural_settings,
    patch_model,
    required_neural_settings,
    resolve_layers,
    unpatch_model,
    unwrap_model,
)
from .scoring_neural_attention import NeuralScorer

WEIGHTS_NAME = "neural_adapter.safetensors"
CONFIG_NAME = "neural_adapter_config.json"
FORMAT = "hf-neural-attention-adapter"
FORMAT_VERSION = 1
# names relative to the whole model: written as format 2, so that a version reading only format 1 refuses it clearly
WHOLE_MODEL_FORMAT_VERSION = 2

logger = logging.getLogger(__name__)


def _base(model: PreTrainedModel) -> torch.nn.Module:
    return getattr(model, "base_model", model)


def _names_root(model: PreTrainedModel) -> tuple[torch.nn.Module, bool]:
    """``(module the scorer names and layer indices are relative to, whether it is the whole model)``: the base
    model, so that an adapter fits every head on it, unless a patched layer lies in a task head (ViTMAE's
    pre-training decoder); then the whole model, or its scorer would be left out."""
    base = _base(model)
    in_base = [module for _, module in find_attention_modules(base)]
    everywhere = [module for _, module in find_attention_modules(model)]
    # the base model's layers come first, so a layer's index is the same counted in either
    outside = everywhere[len(in_base):] if everywhere[: len(in_base)] == in_base else everywhere
    if base is model or not any(getattr(module, SCORER_ATTRIBUTE, None) is not None for module in outside):
        return base, False
    return model, True


def _active_scorer(scorer: torch.nn.Module) -> torch.nn.Module:
    """The scorer that runs: PEFT's ``modules_to_save=["neural_scorer"]`` wraps it with the frozen original and one
    trained copy per adapter (``original_module``, ``modules_to_save[<adapter>]``)."""
    copies = getattr(scorer, "modules_to_save", None)
    if not isinstance(copies, torch.nn.ModuleDict):
        return scorer
    active = getattr(scorer, "active_adapter", None)
    active = active[0] if isinstance(active, list | tuple) and active else active  # PEFT's [] means "none active"
    if getattr(scorer, "disable_adapters", False) or not isinstance(active, str) or active not in copies:
        return scorer.original_module
    return copies[active]


def _running_scorers(model: PreTrainedModel) -> dict[str, torch.nn.Module]:
    """The scorers that run (see ``_active_scorer``), by the prefix of their parameters' names in an adapter."""
    scorers = {}
    for name, module in find_attention_modules(_names_root(unwrap_model(model))[0]):
        scorer = getattr(module, SCORER_ATTRIBUTE, None)
        if scorer is not None:
            scorers[f"{name}.{SCORER_ATTRIBUTE}"] = _active_scorer(scorer)
    return scorers


def _adapter_parameters(model: PreTrainedModel) -> dict[str, torch.nn.Parameter]:
    """The parameters of the scorers that run, by their names in an adapter."""
    return {f"{prefix}.{name}": param for prefix, scorer in _running_scorers(model).items()
            for name, param in scorer.named_parameters()}  # fmt: skip


def _brought_in(scorer: torch.nn.Module) -> contextlib.AbstractContextManager:
    """Within it, the weights of a scorer accelerate offloads (``device_map`` with ``"cpu"`` / ``"disk"``: meta
    tensors between calls) are real, on the CPU."""
    if not is_offloaded(scorer):
        return contextlib.nullcontext()
    from accelerate.utils import align_module_device  # installed wherever its hooks are

    return align_module_device(scorer, "cpu")


def adapter_state_dict(model: PreTrainedModel, state_dict: dict[str, torch.Tensor] | None = None
                       ) -> dict[str, torch.Tensor]:
    """Scorer parameters of ``model`` named relative to its base model (or the whole model, see ``_names_root``;
    detached, contiguous, on CPU); through torch.compile's and PEFT's wrappers, the weights of the scorers that
    run.

    Args:
        state_dict: the full state dict of ``model`` (keys as in ``model.state_dict()``): the source of the values
            where the parameters are sharded (DeepSpeed ZeRO-3: ``accelerator.get_state_dict(model)``, which
            ``Trainer`` passes to ``_save``).

    Raises:
        ValueError: a scorer parameter is sharded and no ``state_dict`` is given, or ``state_dict`` lacks it.
    """
    check_is_model(model)
    # the names state_dict() gives: FSDP's and activation checkpointing's wrappers drop their prefixes there
    full_names = {id(param): name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")
                  for name, param in model.named_parameters(remove_duplicate=False)}
    state, shapes = {}, {}
    for prefix, scorer in _running_scorers(model).items():
        if not any(True for _ in scorer.parameters()):
            raise ValueError(
                f"{prefix} holds no parameters of its own: FSDP with use_orig_params=False flattened them into its "
                "wrapper's. Wrap with use_orig_params=True (accelerate's default) to save the adapter; nothing was "
                "written."
            )
        # named before the weights are brought in, which may swap in other parameter objects
        owned = {name: full_names.get(id(param)) for name, param in scorer.named_parameters()}
        with _brought_in(scorer):
            for name, param in scorer.named_parameters():
                state[f"{prefix}.{name}"] = _adapter_value(f"{prefix}.{name}", param, owned[name], state_dict)
        shapes.update({f"{prefix}.{name}": shape for name, shape in _declared_shapes(scorer).items()})
    # what the loaders would refuse is not written: a diverged model's NaN, a state_dict of another model
    _check_weights_fit(state, shapes, "The scorer weights to save", f"{type(unwrap_model(model)).__name__}'s scorers "
                       "(weights", "Nothing was written: pass the state dict of this model, and save a model whose "
                       "training did not diverge")
    return state


def _declared_shapes(scorer: NeuralScorer) -> dict[str, torch.Size]:
    """The whole shape of each of ``scorer``'s parameters, from its settings: a sharded parameter's own shape is its
    shard's (ZeRO-3: empty; FSDP1: a flat slice)."""
    with torch.device("meta"):
        return {name: param.shape for name, param in
                NeuralScorer(scorer.head_dim, scorer.num_heads, scorer.settings).named_parameters()}


def _adapter_value(key: str, param: torch.nn.Parameter, full_name: str | None,
                   state_dict: dict[str, torch.Tensor] | None) -> torch.Tensor:
    """What ``adapter_state_dict`` stores for the scorer parameter ``key`` (``full_name`` in ``state_dict``)."""
    if state_dict is None:
        if is_sharded(param):
            raise ValueError(
                f"Scorer parameter {key} is sharded (DeepSpeed ZeRO-3 or FSDP2): this process does not hold its "
                "value. Pass the gathered state dict, save_neural_adapter(model, directory, "
                "state_dict=accelerator.get_state_dict(model)), or save inside "
                "deepspeed.zero.GatheredParameters(scorer parameters). Nothing was written."
            )
        value = param
    elif full_name in state_dict:
        value = state_dict[full_name]
    elif not is_sharded(param):  # left out of it (Trainer's ZeRO-3 save of a PEFT model drops frozen parameters),
        value = param  # but whole here: small ones stay whole under ZeRO-3
    else:
        raise ValueError(f"The state dict given has no entry {full_name!r} for scorer parameter {key}, which is "
                         "sharded here (frozen parameters left out?); nothing was written.")
    if value.device.type == "meta":
        raise ValueError(f"Scorer parameter {key} is on the meta device: the model was built without weights "
                         "(init_empty_weights, device='meta'). Load or initialise its weights first; nothing was "
                         "written.")
    return value.detach().contiguous().cpu()


def save_neural_adapter(
    model: PreTrainedModel, save_directory: str | os.PathLike, base_model: str | os.PathLike | None = None,
    revision: str | None = None, *, state_dict: dict[str, torch.Tensor] | None = None,
) -> list[Path]:
    """Write the scorer weights and settings of a patched model to ``save_directory``.

    Args:
        model: a patched model (``patch_model``) or a Hub-class model.
        base_model: Hub id or path of the base checkpoint; default: the config's ``neural_attention_base_model`` or
            ``_name_or_path``.
        revision: revision (commit, tag, branch) of the base checkpoint the adapter was trained from.
        state_dict: the full state dict of ``model`` (keys as in ``model.state_dict()``), where its parameters are
            sharded (DeepSpeed ZeRO-3, FSDP2); see ``adapter_state_dict``.

    Returns:
        The two files written.

    Raises:
        ValueError: the model has no neural layers; a scorer is sharded and no ``state_dict`` holds it; the weights
            to save would not load (non-finite, of other shapes, on the meta device). Nothing is written then.
        TypeError: ``base_model`` or ``revision`` is not a str (or a path).
    """
    weights = adapter_state_dict(model, state_dict)  # before anything is written: it may refuse
    model = unwrap_model(model)  # torch.compile's or PEFT's wrapper: record the model's own class
    layers, settings = required_neural_settings(model)
    base_model = (base_model or getattr(model.config, "neural_attention_base_model", None)
                  or getattr(model.config, "_name_or_path", None) or None)
    if isinstance(base_model, os.PathLike):
        base_model = os.fspath(base_model)
    for name, value in (("base_model", base_model), ("revision", revision)):
        if value is not None and not isinstance(value, str):
            raise TypeError(f"{name} must be a Hub id or a path (a str), got {type(value).__name__}; nothing was "
                            "written.")
    model_class = stock_class_of(type(model)) or type(model)
    whole_model = _names_root(model)[1]
    metadata = {
        "format": FORMAT,
        "format_version": WHOLE_MODEL_FORMAT_VERSION if whole_model else FORMAT_VERSION,
        "neural_attention_version": PACKAGE_VERSION,
        "base_model": base_model,
        "base_model_revision": revision,
        "model_class": model_class.__name__,
        "layers": layers,
        # settings added after 0.1.0 only where they differ from their default: 0.1.0 refuses unknown ones
        "settings": {name: value for name, value in settings.to_dict().items()
                     if not (name == "mlp_precision" and value == "fp32")},
    }
    if whole_model:
        metadata["names_relative_to"] = "model"
    config_text = json.dumps(metadata, indent=2, sort_keys=True) + "\n"
    directory = Path(save_directory)
    directory.mkdir(parents=True, exist_ok=True)
    # both files written beside their final names, then renamed over them: a save that fails while writing (a full
    # disk) leaves the adapter already there as it was, and no partial file
    partial = {name: directory / f".{name}.partial" for name in (WEIGHTS_NAME, CONFIG_NAME)}
    try:
        save_file(weights, str(partial[WEIGHTS_NAME]), metadata={"format": "pt"})
        partial[CONFIG_NAME].write_text(config_text)
        for name, path in partial.items():
            os.replace(path, directory / name)
    finally:
        for path in partial.values():
            path.unlink(missing_ok=True)
    return [directory / WEIGHTS_NAME, directory / CONFIG_NAME]


def restore_neural_adapter_weights(model: PreTrainedModel, adapter_directory: str | os.PathLike) -> None:
    """Copy an adapter's weights into the scorers ``model`` already has (a resumed run of the same model).

    Raises:
        ValueError: the adapter was saved with other layers or settings (the backend and ``mlp_precision`` aside),
            or its weights do not fit the scorers (names, shapes, values); no scorer weight is changed then.
    """
    metadata = read_adapter_config(adapter_directory)
    weights = _read_weights(Path(adapter_directory) / WEIGHTS_NAME)
    layers, settings = neural_settings(unwrap_model(model)) or ([], None)
    def what_is_computed(config: NeuralAttentionConfig) -> dict[str, Any]:
        return {name: value for name, value in config.to_dict().items() if name not in KERNEL_CHOICES}

    if (settings is None or metadata["layers"] != layers
            or what_is_computed(metadata["settings"]) != what_is_computed(settings)):
        raise ValueError(
            f"Adapter {adapter_directory} was saved with layers {metadata['layers']} and settings "
            f"{metadata['settings']}; this model has layers {layers} and settings {settings}. Resume with the settings "
            "of the run that saved it; no scorer weight was changed."
        )
    params = _adapter_parameters(model)
    if any(param.is_meta for param in params.values()):
        raise ValueError("This model's scorers are offloaded (accelerate's device_map holds them on the meta device): "
                         "their weights cannot be replaced in place. Load the model without offloading them.")
    _check_weights_fit(weights, {name: param.shape for name, param in params.items()}, f"Adapter {adapter_directory}",
                       "this model's scorers (weights", "Resume with the settings of the run that saved it; no scorer "
                       "weight was changed")
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor.to(device=params[name].device, dtype=params[name].dtype))


def _check_weights_fit(weights: dict[str, torch.Tensor], expected: dict[str, torch.Size], source: str, target: str,
                       advice: str) -> None:
    """Raise ``ValueError`` "<source> does not fit <target> ...). <advice>." for weights missing, unexpected, of other
    shapes, not floating point or not finite."""
    not_float = sorted(k for k, tensor in weights.items() if not tensor.is_floating_point())
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    mismatched = sorted(k for k in set(expected) & set(weights) if weights[k].shape != expected[k])
    non_finite = sorted(k for k, tensor in weights.items()
                        if tensor.is_floating_point() and not torch.isfinite(tensor).all())  # fmt: skip
    dtype = weights[not_float[0]].dtype if not_float else None
    problems = [f"{label}: {names}" for label, names in (
        (f"not floating point ({dtype})", not_float), ("missing", missing), ("unexpected", unexpected),
        ("wrong shape", mismatched), ("non-finite", non_finite),
    ) if names]
    if problems:
        raise ValueError(f"{source} does not fit {target} " + "; ".join(problems) + f"). {advice}.")


def read_adapter_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The adapter's config, validated (format, settings); warns for a newer package version."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise ValueError(f"No {CONFIG_NAME} in {directory}: not a neural-attention adapter folder.")
    try:
        metadata = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); the adapter is corrupt.") from error
    if not isinstance(metadata, dict):
        raise ValueError(f"{path} holds a JSON {type(metadata).__name__}, not an object: not a {FORMAT} config.")
    if metadata.get("format") != FORMAT or not isinstance(metadata.get("layers"), list):
        raise ValueError(f"{path} is not a {FORMAT} config (format={metadata.get('format')!r}).")
    version = metadata.get("format_version", 0)
    if isinstance(version, bool) or not isinstance(version, int):
        raise ValueError(f"{path}: format_version must be an integer, got {version!r}; the adapter is corrupt.")
    if version > WHOLE_MODEL_FORMAT_VERSION:
        raise ValueError(f"{path} uses adapter format {metadata['format_version']}; this hf-neural-attention "
                         f"({PACKAGE_VERSION}) reads formats up to {WHOLE_MODEL_FORMAT_VERSION}. Upgrade "
                         "hf-neural-attention.")
    if metadata.get("names_relative_to", "base_model") not in ("base_model", "model"):
        raise ValueError(f"{path}: names_relative_to must be 'base_model' or 'model', got "
                         f"{metadata['names_relative_to']!r}; the adapter is corrupt.")
    written_by = metadata.get("neural_attention_version", "0")
    if _version_tuple(written_by)[:2] > _version_tuple(PACKAGE_VERSION)[:2]:
        logger.warning("Adapter written by hf-neural-attention %s, newer than the installed %s.", written_by,
                       PACKAGE_VERSION)
    settings = metadata.get("settings", {})
    if not isinstance(settings, dict):
        raise ValueError(f"{path}: 'settings' must be a JSON object, got {settings!r}; the adapter is corrupt.")
    unknown = sorted(set(settings) - set(NeuralAttentionConfig.field_names()))
    if unknown:  # settings a newer version added, as for a Hub config: they cannot be honoured here
        logger.warning("Ignoring adapter setting(s) %s unknown to hf-neural-attention %s (written by %s); upgrade "
                       "hf-neural-attention to use them.", unknown, PACKAGE_VERSION, written_by)
    metadata["settings"] = NeuralAttentionConfig(**{k: v for k, v in settings.items() if k not in unknown})
    return metadata


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ValueError(f"No {WEIGHTS_NAME} in {path.parent}: the adapter has no scorer weights.")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as error:  # safetensors raises its own error types for truncated/garbled files
        raise ValueError(f"{path} cannot be read ({error}); the adapter weights are corrupt.") from error


def _names_module(model: PreTrainedModel, metadata: dict[str, Any]) -> torch.nn.Module:
    """The module an adapter's names are relative to, in ``model`` (see ``_names_root``)."""
    return model if metadata.get("names_relative_to") == "model" else _base(model)


def _expected_shapes(model: PreTrainedModel, root: torch.nn.Module, layers: list[int],
                     settings: NeuralAttentionConfig) -> dict[str, torch.Size]:
    """Names and shapes the scorers of ``layers`` will have, relative to ``root`` (nothing is modified)."""
    modules = find_attention_modules(root)
    chosen = resolve_layers(layers, len(modules))
    expected = {}
    for index in chosen:
        name, module = modules[index]
        head_dim, num_heads = head_shape(module, model.config)
        with torch.device("meta"):
            scorer = NeuralScorer(head_dim, num_heads, settings)
        for param_name, param in scorer.named_parameters():
            expected[f"{name}.{SCORER_ATTRIBUTE}.{param_name}"] = param.shape
    return expected


def load_neural_adapter(
    model_or_name: PreTrainedModel | str | None, adapter_directory: str | os.PathLike, **from_pretrained_kwargs: Any
) -> PreTrainedModel:
    """Patch a base model with an adapter's settings and load its scorer weights.

    Args:
        model_or_name: a (stock, unpatched) model, the Hub id/path of the base checkpoint to load with the
            adapter's model class, or ``None`` for the base model (and revision) the adapter names.
        adapter_directory: folder written by ``save_neural_adapter``.
        from_pretrained_kwargs: passed to ``from_pretrained`` when a name is given (``revision`` defaults to the
            adapter's ``base_model_revision``).

    Returns:
        The patched model (the same object when a model was given).

    Raises:
        ValueError: corrupt or incomplete adapter, weights that do not fit the model (missing, unexpected or
            mis-shaped names, non-finite values), or a model already patched. The model is left untouched.
    """
    metadata = read_adapter_config(adapter_directory)
    weights = _read_weights(Path(adapter_directory) / WEIGHTS_NAME)
    layers, settings = metadata["layers"], metadata["settings"]

    if model_or_name is None or isinstance(model_or_name, str | os.PathLike):
        name = str(model_or_name or metadata.get("base_model") or "")
        if not name:
            raise ValueError("The adapter names no base model; pass the model or its Hub id.")
        recorded_class = metadata.get("model_class")
        model_class = transformers.AutoModel
        if recorded_class:  # a model class transformers exports, nothing else (the config is a file anyone may edit)
            found = getattr(transformers, recorded_class, None) if isinstance(recorded_class, str) else None
            model_class = found if isinstance(found, type) and issubclass(found, transformers.PreTrainedModel) else None
        if model_class is None:  # falling back to AutoModel would silently drop the task head
            raise ValueError(f"The adapter was saved from a {recorded_class!r}, not a model class transformers "
                             "provides; load the base model yourself and pass it: load_neural_adapter(model, "
                             "directory).")
        from_pretrained_kwargs.setdefault("revision", metadata.get("base_model_revision"))
        model = model_class.from_pretrained(name, **from_pretrained_kwargs)
    else:
        model = model_or_name
    given, model = model, unwrap_model(model)  # a PEFT / compiled model: its transformers model
    if neural_settings(model) is not None:
        raise ValueError("This model already has neural layers; load the adapter into the unpatched base model.")

    root = _names_module(model, metadata)
    try:
        expected = _expected_shapes(model, root, layers, settings)
    except ValueError as error:  # a layer this model does not have
        raise ValueError(f"Adapter {adapter_directory} was saved for layers {layers}, which "
                         f"{type(model).__name__} cannot hold ({error}). Load it into the base model it was trained "
                         "on; the model was not modified.") from error
    _check_weights_fit(weights, expected, f"Adapter {adapter_directory}", f"{type(model).__name__} (scorer weights",
                       "Check that it was saved from this base model; the model was not modified")

    patch_model(model, layers=layers, config=settings)
    try:
        params = dict(root.named_parameters())
        with torch.no_grad():
            for name, tensor in weights.items():
                params[name].copy_(tensor.to(device=params[name].device, dtype=params[name].dtype))
    except Exception:
        unpatch_model(model)
        raise
    if getattr(model.config, "neural_attention_base_model", None) is None and metadata.get("base_model"):
        if hasattr(type(model.config), "neural_attention_base_model"):
            model.config.neural_attention_base_model = metadata["base_model"]
    return given
