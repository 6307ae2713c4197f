"""Backend registry: which implementations exist, which are available, and how one is chosen.

A backend is a module exposing ``NAME``, ``availability() -> {device_type: (bool, reason)}``,
``supports_dtype(device_type, dtype) -> bool`` and one function per op with the normalised
signatures documented in :mod:`ddpm_fast.ops`. Modules are imported lazily, the first time a
backend is asked for, so a missing compiler or Triton costs nothing until used.
"""
from __future__ import annotations

import importlib
import os
from typing import Dict, Optional, Tuple

import torch

__all__ = ["BACKEND_NAMES", "backends", "resolve_backend", "BackendUnavailable"]

BACKEND_NAMES = ("reference", "native", "triton")
_MODULES = {
    "reference": "ddpm_fast._reference_backend",
    "native": "ddpm_fast._native_backend",
    "triton": "ddpm_fast.triton",
}
# Preference order of backend=None, per device type (docs/api.md).
_PREFERENCE = {"cuda": ("native", "triton", "reference"), "cpu": ("native", "reference")}
_loaded: Dict[str, object] = {}
_load_errors: Dict[str, str] = {}


class BackendUnavailable(RuntimeError):
    """Raised when a backend asked for by name cannot run the given tensors."""


def _load(name: str):
    if name in _loaded:
        return _loaded[name]
    if name in _load_errors:
        return None
    try:
        mod = importlib.import_module(_MODULES[name])
    except Exception as e:  # ImportError, a broken extension, a torch mismatch: report, keep going
        _load_errors[name] = f"{type(e).__name__}: {e}"
        return None
    _loaded[name] = mod
    return mod


def _availability(name: str) -> Dict[str, Tuple[bool, str]]:
    mod = _load(name)
    if mod is None:
        reason = _load_errors.get(name, "not loaded")
        return {"cpu": (False, reason), "cuda": (False, reason)}
    return mod.availability()


def backends() -> Dict[str, dict]:
    """``{name: {"available": {device_type: bool}, "reason": str}}`` for every backend."""
    out = {}
    for name in BACKEND_NAMES:
        av = _availability(name)
        reasons = [f"{dev}: {why}" for dev, (ok, why) in av.items() if why]
        out[name] = {"available": {dev: ok for dev, (ok, _) in av.items()},
                     "reason": "; ".join(reasons) if reasons else "available"}
    return out


def resolve_backend(backend: Optional[str], device: torch.device, dtype: torch.dtype):
    """The backend module to run tensors of ``device``/``dtype``: an explicit name wins over
    ``DDPM_FAST_BACKEND``, which wins over the preference order. An explicit name that cannot
    run them raises :class:`BackendUnavailable` with the reason."""
    explicit = backend
    if explicit is None:
        explicit = os.environ.get("DDPM_FAST_BACKEND") or None
        if explicit is not None and explicit not in BACKEND_NAMES:
            raise ValueError(f"DDPM_FAST_BACKEND must be one of {BACKEND_NAMES}, got {explicit!r}")
    dev = device.type
    if explicit is not None:
        if explicit not in BACKEND_NAMES:
            raise ValueError(f"backend must be one of {BACKEND_NAMES} or None, got {explicit!r}")
        mod = _load(explicit)
        if mod is None:
            raise BackendUnavailable(f"backend {explicit!r} is not available: {_load_errors[explicit]}")
        ok, why = mod.availability().get(dev, (False, f"no {dev} support"))
        if not ok:
            raise BackendUnavailable(f"backend {explicit!r} is not available on {dev}: {why}")
        if not mod.supports_dtype(dev, dtype):
            raise BackendUnavailable(f"backend {explicit!r} does not support dtype {dtype} on {dev}")
        return mod
    for name in _PREFERENCE.get(dev, ("reference",)):
        mod = _load(name)
        if mod is None:
            continue
        ok, _ = mod.availability().get(dev, (False, ""))
        if ok and mod.supports_dtype(dev, dtype):
            return mod
    return _load("reference")
