"""Switch a patched stock model instance to its Hub class and back (filled in by the Hub classes)."""

from __future__ import annotations

from torch import nn

_HUB_CLASS_FOR: dict[type, type] = {}


def adopt_hub_class(model: nn.Module) -> None:
    """Switch ``model`` (in place) to the Hub class registered for its stock class, if any."""
    hub_class = _HUB_CLASS_FOR.get(type(model))
    if hub_class is not None:
        model.__class__ = hub_class


def restore_stock_class(model: nn.Module) -> None:
    """Undo ``adopt_hub_class``."""
    for stock, hub in _HUB_CLASS_FOR.items():
        if type(model) is hub:
            model.__class__ = stock
