"""The backends (``reference``, ``native``, ``triton``: one subpackage or module each) and their
registry: which implementations exist, which are available, and how one is chosen.

``ddpm_fast.backends`` is both this package and the public function :func:`backends` (the package
is callable: ``ddpm_fast.backends()`` returns the availability report).

A backend is a module exposing ``NAME``, ``availability() -> {device_type: (bool, reason)}``,
``supports_dtype(device_type, dtype) -> bool`` and one function per op with the normalised
signatures documented in :mod:`ddpm_fast.ops`. Modules are imported lazily, the first time a
backend is asked for, so a missing compiler or Triton costs nothing until used.

:func:`resolve_backend` is on every op's path: a resolution is cached per ``(backend, the
DDPM_FAST_BACKEND variable, device, dtype)`` (one dict lookup after the first call). While
``torch.compile`` traces, the resolution (with any import it needs) runs outside the traced code
(:func:`torch.compiler.assume_constant_result`), so a compiled function may be the first
ddpm_fast call of a process; the module chosen is fixed in the compiled graph.
"""
from __future__ import annotations

import importlib
import os
import sys
import types
from typing import Dict, Optional, Tuple

import torch

__all__ = ["BACKEND_NAMES", "backends", "resolve_backend", "BackendUnavailable"]

BACKEND_NAMES = ("reference", "native", "triton")
_MODULES = {
    "reference": "ddpm_fast.backends.reference",
    "native": "ddpm_fast.backends.native",
    "triton": "ddpm_fast.backends.triton",
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


_resolved: Dict[tuple, object] = {}
_ENV_VAR = "DDPM_FAST_BACKEND"


def _env_backend() -> Optional[str]:
    return os.environ.get(_ENV_VAR)


if isinstance(getattr(os.environ, "_data", None), dict) and hasattr(os.environ, "encodekey"):
    # os.environ.get is three Python-level calls (Mapping.get, __getitem__, encodekey): read the
    # mapping's own dict (kept current by os.environ[...] = and putenv through os.environ).
    _ENV_DATA, _ENV_KEY = os.environ._data, os.environ.encodekey(_ENV_VAR)

    def _env_backend() -> Optional[str]:  # noqa: F811
        value = _ENV_DATA.get(_ENV_KEY)
        return None if value is None else os.environ.decodevalue(value)


_is_compiling = torch.compiler.is_compiling  # True while Dynamo traces (torch >= 2.6 has it)


def resolve_backend(backend: Optional[str], device: torch.device, dtype: torch.dtype,
                    compiling: Optional[bool] = None):
    """The backend module to run tensors of ``device``/``dtype``: an explicit name wins over
    ``DDPM_FAST_BACKEND``, which wins over the preference order. An explicit name that cannot
    run them raises :class:`BackendUnavailable` with the reason. ``compiling``: the caller's
    ``torch.compiler.is_compiling()`` (asked here when None)."""
    if compiling or (compiling is None and _is_compiling()):
        return _loaded[_resolve_while_tracing(backend, device, dtype)]
    env = _env_backend() if backend is None else None
    key = (backend, env, device, dtype)
    mod = _resolved.get(key)
    if mod is None:
        mod = _resolve(backend, env, device, dtype)
        # Availability is fixed once a module has loaded, except the Triton interpreter's CPU
        # availability (TRITON_INTERPRET), which is read on every call.
        if not (mod.NAME == "triton" and device.type == "cpu"):
            _resolved[key] = mod
    return mod


def _resolve_while_tracing(backend, device, dtype) -> str:
    """The name of the backend :func:`resolve_backend` picks (its module is then in ``_loaded``)."""
    env = _env_backend() if backend is None else None
    mod = _resolve(backend, env, device, dtype)
    prepare = getattr(mod, "_load", None)  # a backend's own lazy imports (Triton's kernel modules)
    if prepare is not None:
        prepare()
    return mod.NAME


# Dynamo calls it with the constant arguments while tracing instead of tracing into it (the import
# machinery is not traceable) and keeps the name it returns as a constant; the traced code then
# reads the loaded module from ``_loaded``.
_resolve_while_tracing = torch.compiler.assume_constant_result(_resolve_while_tracing)


def _resolve(backend: Optional[str], env: Optional[str], device: torch.device, dtype: torch.dtype):
    explicit = backend
    if explicit is None:
        explicit = env or None
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


class _CallablePackage(types.ModuleType):
    """``ddpm_fast.backends()`` is the public availability report, and ``ddpm_fast.backends`` is
    also the package holding the backends: calling the package calls :func:`backends`."""

    def __call__(self) -> Dict[str, dict]:
        return backends()


sys.modules[__name__].__class__ = _CallablePackage
