"""The config layer of the drop-in schedulers: diffusers' own when it is importable, else a small
built-in one with the same methods and the same ``scheduler_config.json`` files.

With diffusers the schedulers are ``SchedulerMixin``/``ConfigMixin`` subclasses, so its pipelines
accept them, its loader saves and loads them and its config files load as they are. Without it
(or with ``DDPM_FAST_NO_DIFFUSERS=1``) the built-in layer gives ``config`` (a frozen dict whose
keys are also attributes), ``register_to_config``, ``from_config``, ``load_config``,
``save_pretrained`` and local ``from_pretrained``, writing diffusers' file format.
"""
from __future__ import annotations

import functools
import inspect
import json
import os
from collections import OrderedDict
from dataclasses import fields
from typing import Any, List, Optional, Tuple

import numpy as np
import torch

__all__ = ["USING_DIFFUSERS", "CONFIG_NAME", "ConfigMixin", "SchedulerMixin", "FrozenDict", "register_to_config",
           "BaseOutput", "KARRAS_COMPATIBLES", "BASES"]

CONFIG_NAME = "scheduler_config.json"


def _diffusers_parts():
    if os.environ.get("DDPM_FAST_NO_DIFFUSERS", "") not in ("", "0"):
        return None
    try:
        from diffusers.configuration_utils import ConfigMixin, FrozenDict, register_to_config
        from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
        from diffusers.utils import BaseOutput
    except Exception:  # not installed, or broken: the built-in layer works alike
        return None
    return ConfigMixin, FrozenDict, register_to_config, SchedulerMixin, BaseOutput, \
        [e.name for e in KarrasDiffusionSchedulers]


_DIFFUSERS = _diffusers_parts()
USING_DIFFUSERS = _DIFFUSERS is not None


class _OwnFrozenDict(OrderedDict):
    """A read-only dict whose keys are also attributes (diffusers' ``FrozenDict``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for key, value in self.items():
            object.__setattr__(self, key, value)
        object.__setattr__(self, "_frozen", True)

    def _readonly(self, *args, **kwargs):
        raise Exception(f"You cannot modify a {type(self).__name__} (it is frozen)")

    __delitem__ = setdefault = pop = update = _readonly

    def __reduce__(self):  # pickle/deepcopy: rebuild from the items (setitem after init is refused)
        return (type(self), (list(self.items()),))

    def __setattr__(self, name, value):
        if getattr(self, "_frozen", False):
            self._readonly()
        super().__setattr__(name, value)

    def __setitem__(self, name, value):
        if getattr(self, "_frozen", False):
            self._readonly()
        super().__setitem__(name, value)


def _jsonable(value):
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    return value


class _OwnConfigMixin:
    """The part of diffusers' ``ConfigMixin``/``SchedulerMixin`` the schedulers use."""

    config_name = CONFIG_NAME
    ignore_for_config: List[str] = []
    _deprecated_kwargs: List[str] = []
    _compatibles: List[str] = []
    has_compatibles = True

    @property
    def config(self) -> _OwnFrozenDict:
        return self._internal_dict

    def register_to_config(self, **kwargs):
        internal = dict(getattr(self, "_internal_dict", {}) or {})
        internal.update(kwargs)
        self._internal_dict = _OwnFrozenDict(internal)

    @classmethod
    def _init_keys(cls):
        params = inspect.signature(cls.__init__).parameters
        return [k for k in params if k != "self" and k not in cls.ignore_for_config
                and params[k].kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)]

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs: bool = False, **kwargs):
        config = dict(config or {})
        config.update(kwargs)
        keys = set(cls._init_keys()) | set(cls._deprecated_kwargs)
        init = {k: v for k, v in config.items() if k in keys}
        unused = {k: v for k, v in config.items() if k not in keys and not k.startswith("_")}
        obj = cls(**init)
        return (obj, unused) if return_unused_kwargs else obj

    @classmethod
    def load_config(cls, pretrained_model_name_or_path, subfolder: Optional[str] = None, **kwargs) -> dict:
        path = os.fspath(pretrained_model_name_or_path)
        if subfolder:
            path = os.path.join(path, subfolder)
        if os.path.isdir(path):
            path = os.path.join(path, cls.config_name)
        if not os.path.isfile(path):
            raise EnvironmentError(f"no {cls.config_name} at {path!r} (without diffusers installed only local "
                                   "directories and files can be loaded)")
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path=None, subfolder: Optional[str] = None,
                        return_unused_kwargs: bool = False, **kwargs):
        config = cls.load_config(pretrained_model_name_or_path, subfolder=subfolder)
        return cls.from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def to_json_string(self) -> str:
        config = {k: _jsonable(v) for k, v in self.config.items() if k != "_use_default_values"}
        config["_class_name"] = type(self).__name__
        config.setdefault("_diffusers_version", "0.0.0")
        return json.dumps(dict(sorted(config.items())), indent=2) + "\n"

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        if push_to_hub:
            raise NotImplementedError("push_to_hub needs diffusers installed")
        save_directory = os.fspath(save_directory)
        if os.path.isfile(save_directory):
            raise AssertionError(f"save_directory ({save_directory}) should be a directory, not a file")
        os.makedirs(save_directory, exist_ok=True)
        with open(os.path.join(save_directory, self.config_name), "w", encoding="utf-8") as f:
            f.write(self.to_json_string())

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"


def _own_register_to_config(init):
    """Record the ``__init__`` arguments (defaults filled in, ``ignore_for_config`` and extra
    ``**kwargs`` left out) as the config, as diffusers' decorator does."""

    @functools.wraps(init)
    def inner(self, *args, **kwargs):
        bound = inspect.signature(init).bind(self, *args, **kwargs)
        bound.apply_defaults()
        params = inspect.signature(init).parameters
        ignore = set(getattr(self, "ignore_for_config", []))
        config = {k: v for k, v in bound.arguments.items()
                  if k != "self" and k not in ignore and params[k].kind != inspect.Parameter.VAR_KEYWORD}
        self.register_to_config(**config)
        init(self, *args, **kwargs)

    return inner


class _OwnBaseOutput(OrderedDict):
    """diffusers' ``BaseOutput``: a dataclass that is also an ordered dict and a tuple of its
    non-None fields (``out.prev_sample``, ``out["prev_sample"]``, ``out[0]``, ``out.to_tuple()``)."""

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                OrderedDict.__setitem__(self, f.name, value)

    def __getitem__(self, k):
        if isinstance(k, str):
            return OrderedDict.__getitem__(self, k)
        return self.to_tuple()[k]

    def __setattr__(self, name, value):
        if name in self.keys() and value is not None:
            OrderedDict.__setitem__(self, name, value)
        object.__setattr__(self, name, value)

    def to_tuple(self) -> Tuple[Any, ...]:
        return tuple(self[k] for k in self.keys())


if USING_DIFFUSERS:
    ConfigMixin, FrozenDict, register_to_config, SchedulerMixin, BaseOutput, KARRAS_COMPATIBLES = _DIFFUSERS
    BASES: tuple = (SchedulerMixin, ConfigMixin)
else:
    ConfigMixin = SchedulerMixin = _OwnConfigMixin
    FrozenDict = _OwnFrozenDict
    register_to_config = _own_register_to_config
    BaseOutput = _OwnBaseOutput
    KARRAS_COMPATIBLES = []
    BASES = (_OwnConfigMixin,)
