"""Settings of the neural scorer (`NeuralAttentionConfig`).

Also the transformers config classes of Hub checkpoints (``NeuralAttentionGPT2Config``, ``NeuralAttentionViTConfig``).

This file travels with Hub checkpoints (``trust_remote_code``): it imports only the standard library, torch,
transformers (and its dependency huggingface_hub) and flat siblings.
"""

# No `from __future__ import annotations`: strict dataclasses validate field types only from real annotations.
import contextlib
import dataclasses
import difflib
import functools
import json
import logging
import operator
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from huggingface_hub.dataclasses import strict  # a dependency of transformers, present wherever it is
from huggingface_hub.errors import StrictDataclassError
from transformers import GPT2Config, ViTConfig

MIN_PROJ_DIM = 2
"""Floor of the default projected size d'. The authors' rule ``head_dim // 32`` gives 0 below head_dim 32."""

MLP_VARIANTS = ("paper", "authors")
ACTIVATIONS = ("relu", "gelu", "silu", "tanh")
MODES = ("replace", "residual")
BACKENDS = ("auto", "eager", "tiled", "cpp", "triton")
MLP_PRECISIONS = ("fp32", "fp16")
KERNEL_CHOICES = ("backend", "mlp_precision")
"""The settings that pick how the scores are computed (which kernel, the precision of its per-pair MLP), not what the
scorers are: a resumed run or a loaded checkpoint may change them."""


@dataclass
class NeuralAttentionConfig:
    """How a patched attention layer scores query/key pairs.

    Per head, ``q' = P_q q + c_q`` and ``k' = P_k k + c_k`` map ``head_dim -> proj_dim``; then
    ``score_ij = w_a . act(W_h [q'_i ; k'_j] + b_h)`` (``mlp="paper"``). The paper's output bias ``b_a`` is omitted:
    softmax ignores a constant added to a whole row, so it could never change attention.

    Args:
        proj_dim: d', the projected size of queries and keys. ``None`` follows the authors' code,
            ``head_dim // 32``, floored at ``MIN_PROJ_DIM`` (2): 2 for GPT-2 and ViT-Base (head_dim 64).
        hidden_dim: width of the hidden layer of the ``"paper"`` MLP. ``None`` means ``proj_dim`` (the authors'
            first hidden width). Must be ``None`` for ``mlp="authors"``, whose widths are fixed.
        mlp: ``"paper"``: one hidden layer, the equation above. ``"authors"``: the released variant,
            ``Linear(2d'->d') -> ReLU -> Linear(d'->max(d'//2, 1)) -> ReLU -> Linear(->1)``.
        activation: hidden activation of the ``"paper"`` MLP: ``relu`` | ``gelu`` | ``silu`` | ``tanh``.
            The ``"authors"`` MLP always uses ReLU.
        share_across_heads: one set of scorer weights for all heads (``True``) or one per head (``False``).
            ``None``: per head for ``"paper"``, shared for ``"authors"`` (as in their code).
        mode: ``"replace"`` (the paper: the neural score replaces ``q.k``) or ``"residual"`` (our addition, not
            in the paper): ``score = scaling * q.k + g * MLP(...)`` with the MLP output weights zero-initialised,
            so a patched pretrained model starts out computing what it computed before (bit for bit on ``"eager"``
            over an eager model; to fp32 rounding, ~1e-7, on the fused kernels, which sum in another order).
        backend: ``"auto"`` picks the fused path that applies: Triton on CUDA (on cards older than compute capability
            8.0, such as the T4, only for heads of at most 64; wider ones take ``"tiled"``); on CPU the C++ kernel
            (compiled once on first use, about a minute; set ``NEURAL_ATTENTION_NO_CPP=1`` to skip it), else the pure
            PyTorch ``"tiled"`` kernel (also for float64 inputs); the materialising ``"eager"`` path only where
            attention probabilities are requested. A real additive bias (T5's position bias) takes the same path: every
            fused kernel adds it to its scores. ``"eager"``, ``"tiled"``, ``"cpp"`` or ``"triton"`` force one.
        mlp_precision: ``"fp32"`` (default): every backend evaluates the per-pair MLP in fp32. ``"fp16"`` (paper MLP
            with relu only) lets the Triton kernel evaluate it in packed fp16, two pairs per instruction, and, for
            bf16 / fp16 inputs at 8 <= d' <= 16, sum the backward's relu masks on the tensor cores (dS rounded to
            bf16 there, as flash attention's backward rounds it); softmax, ``P @ V`` and every accumulator stay
            fp32. Fewer GPU instructions per pair, at fp16 precision of the scores (``benchmarks/README.md``). The
            other backends always compute in fp32.
    """

    proj_dim: int | None = None
    hidden_dim: int | None = None
    mlp: str = "paper"
    activation: str = "relu"
    share_across_heads: bool | None = None
    mode: str = "replace"
    backend: str = "auto"
    mlp_precision: str = "fp32"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError``/``TypeError`` naming the bad setting and what is valid."""
        for name in ("proj_dim", "hidden_dim"):
            value = getattr(self, name)
            if value is None:
                continue
            try:  # numpy / 0-d tensor integers too, stored as a plain int (they go into JSON configs)
                if isinstance(value, bool) or getattr(value, "dtype", None) == torch.bool:
                    raise TypeError
                value = operator.index(value)
            except TypeError:
                raise TypeError(f"NeuralAttentionConfig.{name} must be an int or None, got {value!r}.") from None
            object.__setattr__(self, name, value)
            if value < 1:
                raise ValueError(f"NeuralAttentionConfig.{name} must be >= 1 (or None for the default), got {value}.")
        for name, allowed in (("mlp", MLP_VARIANTS), ("activation", ACTIVATIONS), ("mode", MODES),
                              ("backend", BACKENDS), ("mlp_precision", MLP_PRECISIONS)):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"NeuralAttentionConfig.{name}={value!r} is not supported; choose one of {allowed}.")
        if self.share_across_heads is not None and not isinstance(self.share_across_heads, bool):
            raise TypeError(
                "NeuralAttentionConfig.share_across_heads must be True, False or None, "
                f"got {self.share_across_heads!r}."
            )
        if self.mlp == "authors":
            if self.hidden_dim is not None:
                raise ValueError(
                    "NeuralAttentionConfig.hidden_dim must be None with mlp='authors' (its widths are fixed to "
                    "proj_dim and proj_dim // 2); use mlp='paper' to choose the hidden width."
                )
            if self.activation != "relu":
                raise ValueError("mlp='authors' uses ReLU only; set activation='relu' or use mlp='paper'.")
        if self.mlp_precision == "fp16" and (self.mlp != "paper" or self.activation != "relu"):
            raise ValueError(
                f"NeuralAttentionConfig.mlp_precision='fp16' packs the relu units of the paper MLP; it does not apply "
                f"to mlp={self.mlp!r} with activation={self.activation!r}. Use mlp_precision='fp32', or mlp='paper' "
                "with activation='relu'."
            )

    # --- resolved sizes -------------------------------------------------------------------------------------
    def resolved_proj_dim(self, head_dim: int) -> int:
        """d' for a layer whose heads have ``head_dim`` channels."""
        if self.proj_dim is not None:
            return self.proj_dim
        return max(head_dim // 32, MIN_PROJ_DIM)

    def resolved_hidden_dims(self, head_dim: int) -> tuple[int, ...]:
        """Widths of the hidden layers: ``(hidden,)`` for ``"paper"``, ``(d', max(d'//2, 1))`` for ``"authors"``."""
        proj_dim = self.resolved_proj_dim(head_dim)
        if self.mlp == "authors":
            return (proj_dim, max(proj_dim // 2, 1))
        return (self.hidden_dim if self.hidden_dim is not None else proj_dim,)

    def resolved_share_across_heads(self) -> bool:
        """Whether one scorer serves every head: as given, else per head for ``"paper"`` and shared for
        ``"authors"`` (their code)."""
        if self.share_across_heads is not None:
            return self.share_across_heads
        return self.mlp == "authors"

    def resolved_activation(self) -> str:
        """The activation that runs: ``"relu"`` for ``"authors"`` (their MLP has no other), else ``activation``."""
        return "relu" if self.mlp == "authors" else self.activation

    # --- (de)serialisation ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The fields as given (``None`` not resolved), by name."""
        return dataclasses.asdict(self)

    def to_json_string(self) -> str:
        """``to_dict`` as JSON, keys sorted."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "NeuralAttentionConfig":
        """Build from a dict; unknown keys raise ``ValueError`` naming them (callers may filter first)."""
        if isinstance(data, cls):
            return dataclasses.replace(data)
        if not isinstance(data, dict):
            raise TypeError(f"Expected a dict of NeuralAttentionConfig fields, got {type(data).__name__}.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown NeuralAttentionConfig field(s) {unknown}; valid fields are {sorted(known)}.")
        return cls(**data)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """The settings' names, in declaration order."""
        return tuple(f.name for f in dataclasses.fields(cls))


# --- where a patched model records its settings ------------------------------------------------------------------
CONFIG_PREFIX = "neural_attention_"
"""Prefix of the flat fields a patched model's config carries: ``neural_attention_layers`` plus one
``neural_attention_<field>`` per ``NeuralAttentionConfig`` field. Flat, typed JSON values keep ``config.json``
readable and diffable."""


def record_on_config(model_config: Any, layers: list[int], settings: NeuralAttentionConfig) -> None:
    """Write the neural layers and settings onto a transformers config (in place)."""
    setattr(model_config, CONFIG_PREFIX + "layers", sorted(layers))
    for name, value in settings.to_dict().items():
        setattr(model_config, CONFIG_PREFIX + name, value)


def read_from_config(model_config: Any) -> tuple[list[int], NeuralAttentionConfig] | None:
    """The ``(layers, settings)`` recorded on a config, or ``None`` when it records no neural layers."""
    layers = getattr(model_config, CONFIG_PREFIX + "layers", None)
    if not layers:
        return None
    values = {name: getattr(model_config, CONFIG_PREFIX + name) for name in NeuralAttentionConfig.field_names()
              if hasattr(model_config, CONFIG_PREFIX + name)}
    return list(layers), NeuralAttentionConfig(**values)


FALLBACK_CONFIG_ATTRIBUTE = "_neural_attention_fallback"
"""Recorded on every config on ``"neural_attention"``: what the unpatched layers under it run (``sdpa`` / ``eager``).
The mask builder is handed only the config, and must build the mask that implementation expects: code outside the
attention function reads it too. Not folded into the implementation's name, which must stay a plain ``str``
(torch.compile before 2.13 cannot trace a subclass). The Hub config classes keep it off disk."""


def clear_from_config(model_config: Any) -> None:
    """Remove every ``neural_attention_*`` field from a config (in place), and the fallback recorded beside them."""
    for name in ("layers", *NeuralAttentionConfig.field_names()):
        if hasattr(model_config, CONFIG_PREFIX + name):
            delattr(model_config, CONFIG_PREFIX + name)
    model_config.__dict__.pop(FALLBACK_CONFIG_ATTRIBUTE, None)


SCORER_ATTRIBUTE = "neural_scorer"
"""Where a patched attention module holds its ``NeuralScorer``."""


def _model_saving(config: Any) -> torch.nn.Module | None:
    """The model whose ``save_pretrained`` is writing ``config``, or ``None`` for a config saved on its own.
    transformers hands a config no reference to its model: the caller's frames are searched (a few levels up) for
    the ``save_pretrained`` of a model holding this very config."""
    frame = sys._getframe(2)
    for _ in range(8):
        if frame is None:
            break
        if frame.f_code.co_name == "save_pretrained":
            model = frame.f_locals.get("model_to_save", frame.f_locals.get("self"))
            if isinstance(model, torch.nn.Module) and getattr(model, "config", None) is config:
                return model
        frame = frame.f_back
    return None


# --- Hub config classes ----------------------------------------------------------------------------------------
# Below: transformers config classes for checkpoints that carry neural layers. They subclass the model's own config
# with a *unique* ``model_type``: re-using "gpt2"/"vit" would make a load without remote code silently return a stock
# model and drop the scorer weights.
PACKAGE_VERSION = "0.2.0"
"""Version of hf-neural-attention; stamped on every saved config as ``neural_attention_version``."""

_logger = logging.getLogger(__name__)


def _version_tuple(version: str) -> tuple[int, ...]:
    """``"1.2.3rc1" -> (1, 2, 3)``; unparsable parts count as 0."""
    parts = []
    for piece in str(version).split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit()) or "0"
        parts.append(int(digits))
    return tuple(parts)


def closest_name(name: str, names: list[str] | tuple[str, ...]) -> str | None:
    """The one of ``names`` a misspelt ``name`` most likely meant (difflib's closest match), or ``None``."""
    close = difflib.get_close_matches(name, names, n=1)
    return close[0] if close else None


def check_setting_names(kwargs: dict[str, Any], where: str) -> None:
    """Refuse ``neural_attention_*`` keywords that name no setting, suggesting the closest one.

    Raises:
        ValueError: a keyword starting with ``neural_attention_`` that is not a ``NeuralAttentionConfigMixin`` field.
    """
    known = [f.name for f in dataclasses.fields(NeuralAttentionConfigMixin)]
    for key in kwargs:
        if key.startswith(CONFIG_PREFIX) and key not in known:
            close = closest_name(key, known)
            hint = f" Did you mean {close}?" if close else ""
            raise ValueError(f"{where} got {key}={kwargs[key]!r}, which is not a neural-attention setting.{hint} "
                             f"The settings are {', '.join(known)}.")


class _DropTypeWarning(logging.Filter):
    """Drops transformers' "You are using a model of type `<plain>` to instantiate a model of type `<ours>`"."""

    def __init__(self, plain_type: str, own_type: str) -> None:
        super().__init__()
        self.message = f"You are using a model of type `{plain_type}` to instantiate a model of type `{own_type}`"

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.message)


@contextlib.contextmanager
def _quiet_type_warning(plain_type: str, own_type: str):
    """While loading a config: no warning that a ``plain_type`` checkpoint builds our ``own_type`` config."""
    where = logging.getLogger("transformers.configuration_utils")
    drop = _DropTypeWarning(plain_type, own_type)
    where.addFilter(drop)
    try:
        yield
    finally:
        where.removeFilter(drop)


@dataclass(kw_only=True)
class NeuralAttentionConfigMixin:
    """The neural-attention fields shared by every Hub config class (flat, typed, validated).

    Attributes:
        neural_attention_layers: indices of the self-attention layers that score neurally (sorted, non-negative);
            the paper uses ``[0]``.
        neural_attention_proj_dim .. neural_attention_mlp_precision: the ``NeuralAttentionConfig`` fields, one by
            one (see its docstring): d', hidden width, MLP variant, activation, weight sharing, mode, backend, the
            precision of the per-pair MLP on GPU.
        neural_attention_base_model: Hub id (or path) of the plain checkpoint the model started from, if known; the
            model card names it as ``base_model``.
        neural_attention_version: version of hf-neural-attention that wrote the config. A config written by a newer
            major/minor version loads with a warning; ``neural_attention_*`` keys this version does not know are
            ignored with a warning.
    """

    neural_attention_layers: list[int] = field(default_factory=lambda: [0])
    neural_attention_proj_dim: int | None = None
    neural_attention_hidden_dim: int | None = None
    neural_attention_mlp: str = "paper"
    neural_attention_activation: str = "relu"
    neural_attention_share_across_heads: bool | None = None
    neural_attention_mode: str = "replace"
    neural_attention_backend: str = "auto"
    neural_attention_mlp_precision: str = "fp32"
    neural_attention_base_model: str | None = None
    neural_attention_version: str = PACKAGE_VERSION

    def __post_init__(self, **kwargs: Any) -> None:
        # The type named by the file this config was read from (``"gpt2"`` for a plain checkpoint); kept off disk.
        source_type = kwargs.pop("model_type", None)
        unknown = sorted(key for key in kwargs if key.startswith(CONFIG_PREFIX))
        if unknown:
            _logger.warning(
                "Ignoring neural-attention setting(s) %s unknown to hf-neural-attention %s (written by version %s); "
                "upgrade hf-neural-attention to use them.", unknown, PACKAGE_VERSION, self.neural_attention_version,
            )
            for key in unknown:
                kwargs.pop(key)
        super().__post_init__(**kwargs)
        self._neural_attention_source_type = source_type
        if _version_tuple(self.neural_attention_version)[:2] > _version_tuple(PACKAGE_VERSION)[:2]:
            _logger.warning(
                "This config was written by hf-neural-attention %s, newer than the installed %s: settings it added "
                "are ignored and results may differ. Upgrade with `pip install -U hf-neural-attention`.",
                self.neural_attention_version, PACKAGE_VERSION,
            )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, **kwargs: Any) -> Any:
        """``PreTrainedConfig.from_pretrained`` without transformers' warning about a checkpoint of another type where
        that type is our stock one: a plain GPT-2 / ViT checkpoint is the documented start of a neural model
        (``from_pretrained("gpt2", neural_attention_layers=[0])``)."""
        plain = next(base for base in cls.__mro__ if not issubclass(base, NeuralAttentionConfigMixin))
        with _quiet_type_warning(plain.model_type, cls.model_type):
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> Any:
        """``PreTrainedConfig.from_dict`` (which ``from_pretrained`` and ``AutoConfig`` call), refusing a misspelt
        ``neural_attention_*`` keyword: transformers would drop it silently, or hand it to the model's ``__init__``.
        Keys of config.json are not checked here (a newer version's are ignored with a warning, see above)."""
        check_setting_names(kwargs, f"{cls.__name__}.from_pretrained")
        return super().from_dict(config_dict, **kwargs)

    def neural_attention_settings(self) -> NeuralAttentionConfig:
        """The scorer settings held by the flat fields, validated."""
        return NeuralAttentionConfig(**{name: getattr(self, CONFIG_PREFIX + name)
                                        for name in NeuralAttentionConfig.field_names()})

    def validate_neural_attention(self) -> None:
        """Strict-dataclass class validator: settings valid and layers within the model."""
        try:
            self.neural_attention_settings()
        except ValueError as error:  # name the flat field the user wrote, not NeuralAttentionConfig's
            raise ValueError(str(error).replace("NeuralAttentionConfig.", CONFIG_PREFIX)) from error
        layers = self.neural_attention_layers
        num_layers = self.num_hidden_layers
        if not layers:
            raise ValueError("neural_attention_layers is empty; name at least one layer (the paper uses [0]).")
        if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers):
            raise ValueError(f"neural_attention_layers must hold non-negative ints, got {layers}.")
        if sorted(set(layers)) != list(layers):
            raise ValueError(f"neural_attention_layers must be sorted and without repeats, got {layers}.")
        if num_layers is not None and layers[-1] >= num_layers:
            raise ValueError(
                f"neural_attention_layers={layers} names layers this model does not have: it has {num_layers} "
                f"layers (valid indices 0..{num_layers - 1}). Fix neural_attention_layers in config.json."
            )

    def save_pretrained(self, save_directory: Any, push_to_hub: bool = False, **kwargs: Any) -> None:
        """Write config.json, unless a model without neural scorers is saving it (see ``check_saved_with_scorers``)."""
        self.check_saved_with_scorers()
        super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)

    def check_saved_with_scorers(self) -> None:
        """Refuse a config that a model without scorers saves: a stock class built from a neural config
        (``GPT2LMHeadModel(patched.config)``) runs dot-product attention, and its checkpoint would name neural layers
        without their weights. A config saved on its own, or by a model with scorers, passes."""
        model = _model_saving(self)
        if model is None or any(hasattr(module, SCORER_ATTRIBUTE) for module in model.modules()):
            return
        plain = next(cls for cls in type(self).__mro__ if not issubclass(cls, NeuralAttentionConfigMixin))
        raise ValueError(
            f"Not saving: this {type(self).__name__} names neural layers {self.neural_attention_layers}, but the "
            f"{type(model).__name__} saving it has no neural scorers (a stock class built from it runs dot-product "
            "attention in every layer), so the checkpoint would not load. For a neural model, patch it (patch_model) "
            f"or build it with AutoModelFor...from_config(config); for a dot-product one, build it from a plain "
            f"{plain.__name__} (the config the neural model was patched from)."
        )

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        for key in [key for key in output if key.startswith("_" + CONFIG_PREFIX)]:  # bookkeeping, kept off disk
            del output[key]
        output["neural_attention_version"] = PACKAGE_VERSION  # the writer's version
        return output


def _value_errors(cls: type) -> type:
    """Make the strict dataclass report an invalid field as a ``ValueError``: at construction (and so on load from
    config.json), on assignment and on ``validate()`` (which transformers' save calls).

    huggingface_hub's strict dataclasses raise their own ``StrictDataclassError`` (not a ``ValueError``); callers of
    a config expect the standard type, with the message saying which field is wrong and how to fix it.
    """
    strict_init, strict_setattr = cls.__init__, cls.__setattr__

    @functools.wraps(strict_init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        try:
            strict_init(self, *args, **kwargs)
        except StrictDataclassError as error:
            raise ValueError(
                f"Invalid {cls.__name__}: {error}\nFix the value passed to the constructor (or in config.json)."
            ) from error

    @functools.wraps(strict_setattr)
    def __setattr__(self, name: str, value: Any) -> None:
        try:
            strict_setattr(self, name, value)
        except StrictDataclassError as error:
            raise ValueError(f"Invalid value for {cls.__name__}.{name}: {error}") from error

    strict_validate = cls.validate

    @functools.wraps(strict_validate)
    def validate(self) -> None:  # transformers' save_pretrained calls it
        try:
            strict_validate(self)
        except StrictDataclassError as error:
            raise ValueError(f"Invalid {cls.__name__}: {error}") from error

    cls.__init__, cls.__setattr__, cls.validate = __init__, __setattr__, validate
    return cls


@_value_errors
@strict
class NeuralAttentionGPT2Config(NeuralAttentionConfigMixin, GPT2Config):
    """``GPT2Config`` plus the neural-attention fields (see ``NeuralAttentionConfigMixin``).

    Example: ``NeuralAttentionGPT2Config(n_layer=2, neural_attention_layers=[0], neural_attention_proj_dim=8)``.
    """

    model_type = "neural_attention_gpt2"


@_value_errors
@strict
class NeuralAttentionViTConfig(NeuralAttentionConfigMixin, ViTConfig):
    """``ViTConfig`` plus the neural-attention fields (see ``NeuralAttentionConfigMixin``)."""

    model_type = "neural_attention_vit"
