"""NVTX ranges that make a profile read like the algorithm (``q_sample``, ``step t=...``, ``loss bwd``).

Ranges are emitted only while profiling is switched on, by :func:`profiling` (a context manager)
or the environment variable ``DDPM_FAST_NVTX=1`` (read at import). Switched off, a range costs
one global read. While on, each range is both an NVTX range (seen by Nsight Systems / ``nsys``)
and a ``torch.profiler`` ``record_function`` range (seen in the Chrome trace of
``python -m ddpm_fast profile``). Never inside a ``torch.compile``d graph: while Dynamo traces,
ranges are skipped, so they cause no graph break. On a CPU-only torch ``torch.cuda.nvtx`` raises
("NVTX functions not installed"): the first failure switches the NVTX half off for good (the
``record_function`` half keeps working) and :func:`status` says why.

Usage::

    from ddpm_fast.nvtx import profiling, nvtx_range, range_for_op

    with profiling():                      # or DDPM_FAST_NVTX=1
        with nvtx_range(f"step t={t}"):
            ...

    @range_for_op("q_sample")               # applied to the public ops in ddpm_fast.ops
    def q_sample(...): ...
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Callable, Optional, TypeVar

import torch

__all__ = ["profiling", "nvtx_range", "range_for_op", "is_enabled", "set_enabled", "status", "range_names"]

F = TypeVar("F", bound=Callable)

_ENV_VAR = "DDPM_FAST_NVTX"
_enabled: bool = os.environ.get(_ENV_VAR, "").strip().lower() not in ("", "0", "false", "no", "off")
_nvtx_ok: Optional[bool] = None        # None: not tried yet; False: torch.cuda.nvtx raised once
_nvtx_reason: str = "not tried yet"
_range_names: set = set()              # names of the ranges emitted so far (profile tells them from ops)


_is_compiling = torch.compiler.is_compiling  # True while Dynamo traces (torch >= 2.6 has it)


def is_enabled() -> bool:
    """Whether ranges are being emitted now."""
    return _enabled


def set_enabled(enabled: bool) -> bool:
    """Switch ranges on or off; returns the previous setting."""
    global _enabled
    previous, _enabled = _enabled, bool(enabled)
    return previous


def range_names() -> frozenset:
    """The names of every range emitted (while profiling was on) in this process."""
    return frozenset(_range_names)


def status() -> dict:
    """``{"enabled": bool, "nvtx": bool or None, "reason": str}`` (``nvtx`` None until first used)."""
    return {"enabled": _enabled, "nvtx": _nvtx_ok, "reason": _nvtx_reason}


@contextlib.contextmanager
def profiling(enabled: bool = True):
    """Emit ranges inside this block (nestable; the previous setting is restored on exit)."""
    previous = set_enabled(enabled)
    try:
        yield
    finally:
        set_enabled(previous)


def _nvtx_push(name: str) -> bool:
    """Push an NVTX range; False (and NVTX disabled for good) when this torch cannot."""
    global _nvtx_ok, _nvtx_reason
    if _nvtx_ok is False:
        return False
    try:
        torch.cuda.nvtx.range_push(name)
    except Exception as e:  # CPU-only torch: RuntimeError "NVTX functions not installed"
        _nvtx_ok, _nvtx_reason = False, f"torch.cuda.nvtx unusable: {type(e).__name__}: {e}"
        return False
    if _nvtx_ok is None:
        _nvtx_ok, _nvtx_reason = True, "torch.cuda.nvtx works"
    return True


class nvtx_range(contextlib.ContextDecorator):
    """A named range: a context manager or a decorator. A no-op unless profiling is on, and
    skipped while ``torch.compile`` traces."""

    __slots__ = ("name", "_pushed", "_record")

    def __init__(self, name: str):
        self.name = name
        self._pushed = False
        self._record = None

    def __enter__(self):
        if not _enabled or _is_compiling():
            return self
        _range_names.add(self.name)
        self._pushed = _nvtx_push(self.name)
        self._record = torch.autograd.profiler.record_function(self.name)
        self._record.__enter__()
        return self

    def __exit__(self, *exc):
        if self._record is not None:
            record, self._record = self._record, None
            record.__exit__(*exc)
        if self._pushed:
            self._pushed = False
            try:
                torch.cuda.nvtx.range_pop()
            except Exception:
                pass
        return False

    # ContextDecorator calls _recreate_cm per call so that one decorated function is reentrant.
    def _recreate_cm(self):
        return nvtx_range(self.name)


def range_for_op(name: str) -> Callable[[F], F]:
    """Decorator for the public ops: wraps each call in ``nvtx_range(name)`` while profiling is
    on. Off, the wrapper costs one global read and a call."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if not _enabled:
                return fn(*args, **kwargs)
            with nvtx_range(name):
                return fn(*args, **kwargs)

        wrapper.__wrapped_op_name__ = name
        return wrapper  # type: ignore[return-value]

    return decorate
