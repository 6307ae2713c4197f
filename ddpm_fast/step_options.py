"""The options every step shares, as one frozen value: clipping, dynamic thresholding,
classifier-free guidance and whether ``x0_hat`` is returned.

The three steps (``ddpm_step``, ``ddim_step``, ``ddim_reverse_step``) take these seven options
with the same meaning, and every compiled op schema ends with them in the order of
:data:`StepOptions.SCHEMA_ORDER`. Layers below the public functions pass a :class:`StepOptions`
whole instead of spelling the seven out: adding an option means adding a field here (with its
schema position) and the kernels' use of it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Tuple

__all__ = ["StepOptions"]


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """Already validated options of a step (:mod:`ddpm_fast.ops` checks them and builds this)."""
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    guidance_scale: Optional[float] = None
    return_x0: bool = False

    #: the options' order at the end of every step op's schema (csrc/torch_bindings.cpp, the
    #: Triton registrations): the fields, in declaration order.
    SCHEMA_ORDER = ("clip_sample", "clip_sample_range", "thresholding", "dynamic_thresholding_ratio",
                    "sample_max_value", "guidance_scale", "return_x0")
    #: the options of a scheduler's config (diffusers' names), read by :meth:`from_config`.
    CONFIG_FIELDS = ("clip_sample", "clip_sample_range", "thresholding", "dynamic_thresholding_ratio",
                     "sample_max_value")

    def __post_init__(self):
        # plain Python types, as a schema takes them (a numpy float or a 0-d tensor would not trace)
        object.__setattr__(self, "clip_sample", bool(self.clip_sample))
        object.__setattr__(self, "thresholding", bool(self.thresholding))
        object.__setattr__(self, "return_x0", bool(self.return_x0))
        for name in ("clip_sample_range", "dynamic_thresholding_ratio", "sample_max_value"):
            object.__setattr__(self, name, float(getattr(self, name)))
        if self.guidance_scale is not None:
            object.__setattr__(self, "guidance_scale", float(self.guidance_scale))

    @classmethod
    def from_config(cls, config: Any, **overrides) -> "StepOptions":
        """The clipping and thresholding options of a scheduler config (a mapping or an object with
        those attributes, as diffusers' ``FrozenDict``; an absent one takes its default, as for a
        scheduler whose config has no thresholding), plus ``overrides`` (e.g. ``guidance_scale``)."""
        defaults = cls()
        if isinstance(config, Mapping):
            values = {k: config.get(k, getattr(defaults, k)) for k in cls.CONFIG_FIELDS}
        else:
            values = {k: getattr(config, k, getattr(defaults, k)) for k in cls.CONFIG_FIELDS}
        values.update(overrides)
        return cls(**values)

    @classmethod
    def from_schema_args(cls, args: Tuple) -> "StepOptions":
        """The options from the tail of a step op's arguments (the last ``len(SCHEMA_ORDER)``)."""
        n = len(cls.SCHEMA_ORDER)
        return cls(**dict(zip(cls.SCHEMA_ORDER, tuple(args)[-n:])))

    def schema_args(self) -> Tuple:
        """The options as the trailing positional arguments of a step op, in schema order."""
        return tuple(getattr(self, k) for k in self.SCHEMA_ORDER)

    def clip_options(self) -> dict:
        """The clipping and thresholding options (:data:`CONFIG_FIELDS`) as keywords of the public
        step functions."""
        return {k: getattr(self, k) for k in self.CONFIG_FIELDS}

    def math(self) -> dict:
        """The options that change a step's result (all but ``return_x0``), as keywords of the
        reference step functions (:mod:`ddpm_fast.reference`)."""
        return {k: getattr(self, k) for k in self.SCHEMA_ORDER if k != "return_x0"}

    def replace(self, **changes) -> "StepOptions":
        return dataclasses.replace(self, **changes)
