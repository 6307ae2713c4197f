"""Putting the drop-in schedulers into diffusers pipelines: :func:`swap_schedulers` and
:func:`from_diffusers`.

Why a helper: a pipeline takes whatever scheduler it is given, except where its constructor
rebuilds it. diffusers' ``DDIMPipeline.__init__`` runs ``DDIMScheduler.from_config(scheduler.config)``
with diffusers' own class, so ``DDIMPipeline(unet, scheduler=ddpm_fast.DDIMScheduler())`` silently
runs diffusers' scheduler, and so does every pipeline loaded by ``from_pretrained`` (the loader
calls the constructor). ``swap_schedulers(pipe)`` after construction replaces every diffusers
DDPM/DDIM-family scheduler of the pipeline by ours, built from its config.
"""
from __future__ import annotations

import inspect
import re
import warnings
from typing import Dict, Set

__all__ = ["swap_schedulers", "from_diffusers", "rebuilds_scheduler"]

# the diffusers classes we replace, by name (ours have the same names and configs)
_FAMILY = ("DDPMScheduler", "DDIMScheduler", "DDIMInverseScheduler", "DDPMParallelScheduler",
           "DDIMParallelScheduler")
_REBUILD = re.compile(r"\b\w*Scheduler\s*\.\s*from_config\s*\(\s*scheduler\b")
_warned: Set[type] = set()
_rebuilds_cache: Dict[type, bool] = {}


def _ours():
    from . import (DDIMInverseScheduler, DDIMParallelScheduler, DDIMScheduler, DDPMParallelScheduler,
                   DDPMScheduler)
    return {c.__name__: c for c in (DDPMScheduler, DDIMScheduler, DDIMInverseScheduler, DDPMParallelScheduler,
                                    DDIMParallelScheduler)}


def _is_diffusers_family(obj) -> bool:
    cls = type(obj)
    if cls.__name__ not in _FAMILY or not cls.__module__.startswith("diffusers."):
        return False
    try:
        import diffusers
    except Exception:  # pragma: no cover - the object came from diffusers, so it imports
        return False
    return getattr(diffusers, cls.__name__, None) is cls  # exactly diffusers' class, not a subclass


def from_diffusers(scheduler):
    """Ours of the same class, built from ``scheduler.config``, for a diffusers DDPM/DDIM-family
    scheduler (``DDPMScheduler``, ``DDIMScheduler``, ``DDIMInverseScheduler``,
    ``DDPMParallelScheduler``, ``DDIMParallelScheduler``); anything else is returned as it is."""
    if not _is_diffusers_family(scheduler):
        return scheduler
    return _ours()[type(scheduler).__name__].from_config(scheduler.config)


def rebuilds_scheduler(pipeline_cls) -> bool:
    """Whether ``pipeline_cls.__init__`` rebuilds the scheduler it is given with a class of its own
    (``SomeScheduler.from_config(scheduler.config)``, as ``DDIMPipeline`` does)."""
    cached = _rebuilds_cache.get(pipeline_cls)
    if cached is None:
        try:
            src = inspect.getsource(pipeline_cls.__init__)
        except (OSError, TypeError):
            src = ""
        cached = _rebuilds_cache[pipeline_cls] = bool(_REBUILD.search(src))
    return cached


def swap_schedulers(pipe, *, warn: bool = True):
    """Replace every diffusers DDPM/DDIM-family scheduler held by the pipeline ``pipe`` (every
    component in ``pipe.components``: ``scheduler``, ``inverse_scheduler``, ...) by ours of the same
    class and config; returns ``pipe``. Other components and other scheduler families stay.

    With ``warn``: warns once per pipeline class whose constructor rebuilds its scheduler
    (``DDIMPipeline``): constructing that pipeline again (``from_pretrained``, ``from_pipe``,
    ``Cls(**pipe.components)``) brings diffusers' class back, so call this after each
    construction; and warns when nothing was replaced."""
    components = getattr(pipe, "components", None)
    if not isinstance(components, dict):
        raise TypeError(f"swap_schedulers takes a diffusers pipeline (an object with .components), got "
                        f"{type(pipe).__name__}; for one scheduler use ddpm_fast.schedulers.from_diffusers")
    swapped = []
    for name, component in components.items():
        ours = from_diffusers(component)
        if ours is not component:
            setattr(pipe, name, ours)
            swapped.append(name)
    if warn:
        cls = type(pipe)
        if not swapped and not any(type(c).__name__ in _FAMILY and type(c).__module__.startswith("ddpm_fast")
                                   for c in components.values()):
            warnings.warn(f"swap_schedulers: {cls.__name__} holds no diffusers DDPM/DDIM-family scheduler; nothing "
                          "was replaced", UserWarning, stacklevel=2)
        elif rebuilds_scheduler(cls) and cls not in _warned:
            _warned.add(cls)
            warnings.warn(f"{cls.__name__}.__init__ rebuilds its scheduler with diffusers' own class: constructing it "
                          "again (from_pretrained, from_pipe, {0}(**pipe.components)) brings diffusers' scheduler "
                          "back; call ddpm_fast.swap_schedulers(pipe) after each construction".format(cls.__name__),
                          UserWarning, stacklevel=2)
    return pipe
