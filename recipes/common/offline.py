"""Loading a named Hub dataset or model with a clear message when the network is not there."""

from __future__ import annotations

import os
import socket
from functools import lru_cache
from typing import Any

import datasets

HUB_HOST = "huggingface.co"


class OfflineResourceError(RuntimeError):
    """A named Hub resource was requested but cannot be fetched (offline, and not in the local cache)."""


def hub_offline_requested() -> bool:
    """True when the user asked for offline mode (``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE``)."""
    return any(
        os.environ.get(name, "").upper() in {"1", "ON", "YES", "TRUE"}
        for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


@lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the Hub opens within ``timeout`` seconds (checked once per process)."""
    if hub_offline_requested():
        return False
    try:
        with socket.create_connection((HUB_HOST, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _is_local(path: str | None) -> bool:
    return bool(path) and os.path.exists(path)


def offline_message(kind: str, name: str, local_hint: str) -> str:
    """The error text for a Hub resource that cannot be fetched."""
    return (
        f"The {kind} {name!r} is not a local path and the Hugging Face Hub is not reachable "
        f"(no network, or HF_HUB_OFFLINE=1), and it is not in the local cache. Fetching it needs the network. "
        f"Either run where https://{HUB_HOST} is reachable (or pre-download it into the cache), or {local_hint}."
    )


def _use_cache_only() -> None:
    """Switch this process's Hub clients to cache-only mode so that an offline lookup fails at once (no retries)."""
    import huggingface_hub.constants

    os.environ["HF_HUB_OFFLINE"] = "1"
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    if hasattr(datasets.config, "HF_HUB_OFFLINE"):
        datasets.config.HF_HUB_OFFLINE = True


def load_named_dataset(name: str, config_name: str | None, local_hint: str, **kwargs: Any) -> datasets.DatasetDict:
    """``datasets.load_dataset(name, config_name)`` that turns an offline failure into one clear error."""
    offline = not _is_local(name) and not hub_reachable()
    if offline:
        _use_cache_only()
    try:
        return datasets.load_dataset(name, config_name, **kwargs)
    except Exception as error:  # datasets raises several types (ConnectionError, FileNotFoundError, ...)
        if offline:
            raise OfflineResourceError(offline_message("dataset", name, local_hint)) from error
        raise


def check_model_reachable(name_or_path: str, local_hint: str) -> None:
    """Fail early when a Hub model id cannot be fetched: offline and absent from the local cache; or when a local
    path (absolute, ``./``, ``~``, or with more than one ``/``, which no Hub id has) does not exist."""
    if _is_local(name_or_path):
        return
    if os.path.isabs(name_or_path) or name_or_path.startswith((".", "~")) or name_or_path.count("/") > 1:
        raise ValueError(f"{name_or_path} does not exist (a local path, not a Hub id); {local_hint}.")
    if hub_reachable():
        return
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name_or_path, "config.json")
    if not isinstance(cached, str):
        raise OfflineResourceError(offline_message("model", name_or_path, local_hint))
