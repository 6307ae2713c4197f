"""The public functional API (docs/api.md) and the dispatch to backends.

Every public function validates its arguments here (clear ``ValueError``/``TypeError`` naming the
argument), normalises them, picks a backend (:func:`ddpm_fast.backends.resolve_backend`) and calls
that backend's function of the same name.

Backend interface (one function per op, identical for "reference", "native" and "triton"; the
compiled ops are registered as ``ddpm_fast::<op>``, the Triton ones as ``ddpm_fast_triton::<op>``):

* tensors all on one device ``D``, any strides, dtypes fp32/fp16/bf16 (fp64 where the backend
  says so in ``supports_dtype``); ``model_output`` may differ in dtype from the sample;
* ``t``, ``prev_t``, ``next_t``: ``(B,)`` int64 tensors on ``D`` (``B`` = the sample's batch);
  ``prev_t < 0`` means "past the end": ``abar_prev = 1`` for DDPM, ``final_alpha_cumprod`` for DDIM;
* ``alphas_cumprod``: the schedule's ``(T,)`` float64 table on ``D``; kernels derive every
  coefficient of a row from ``abar[t]`` and ``abar[prev_t]`` in float64 and round to fp32 after;
* ``noise``: a tensor of the sample's shape, or ``None``; ``seed``: an int64 tensor on ``D`` of
  shape ``(1,)`` (one seed) or ``(B,)`` (per-row seeds), or ``None``; ``offset``: a ``(1,)`` int64
  tensor on ``D`` (or ``None`` with ``seed``). At most one of ``noise``/``seed`` is given; neither
  means the op draws no noise (the dispatch layer has checked that none is needed);
* options are plain Python values, already validated; the seven every step shares (clipping,
  thresholding, ``guidance_scale``, ``return_x0``) arrive whole as one
  :class:`ddpm_fast.step_options.StepOptions` ``opts``, ``out`` apart.

Signatures::

    gaussian_noise(shape, seed, offset, dtype) -> Tensor                 # on seed's device
    q_sample(x0, t, alphas_cumprod, noise, seed, offset) -> x_t          # grad in x0
    ddpm_step(model_output, t, prev_t, x_t, alphas_cumprod, noise, seed, offset, *,
              prediction_type, variance_type, opts, out)
        -> (x_prev, x0_hat or None)                                      # grad in model_output, x_t
    ddim_step(model_output, t, prev_t, x_t, alphas_cumprod, noise, seed, offset, *, eta,
              prediction_type, use_clipped_model_output, final_alpha_cumprod, opts, out)
        -> (x_prev, x0_hat or None)
    ddim_reverse_step(model_output, t, next_t, x_t, alphas_cumprod, *, prediction_type,
              use_clipped_model_output, opts, out) -> (x_next, x0_hat or None)
    diffusion_loss(model_output, x0, t, alphas_cumprod, noise, seed, offset, *, target,
              snr_gamma) -> (B,) float32 per-sample losses               # grad in model_output
    vlb_loss(model_output, x0, x_t, t, alphas_cumprod, *, prediction_type, variance_type)
        -> (B,) float32 bits/dim                                         # grad in model_output

``variance_type`` reaching a backend is one of ``fixed_small``, ``fixed_small_log``,
``fixed_large``, ``fixed_large_log``, ``learned`` (the extra channels are a *log*-variance, the
improved-diffusion meaning; the drop-in scheduler converts diffusers' variance) and
``learned_range``. With ``guidance_scale`` set, ``model_output`` has ``2B`` rows (unconditional
first). With ``out`` given, the backend writes ``x_prev`` into it (``out`` may be ``x_t``) and
returns it.

Device-tensor timesteps are not range-checked on the host (that would be a device sync): set
``DDPM_FAST_DEBUG_CHECKS=1`` (or :func:`set_debug_checks`) to check them at the price of a sync.
Every backend gives a NaN row instead for a row whose ``t`` lies outside ``[0, T)``, whose
``prev_t`` is ``>= T``, or whose ``next_t`` lies outside ``[0, T)``: every output of that row
(``x_prev``/``x_next``, ``x0_hat``, the per-sample loss, its gradient) is NaN and no table is read
outside its bounds. The registered ops refuse an ``out`` that is expanded or shares only part of
its memory with an input (``out`` may be exactly ``x_t``). docs/errors.md has every rule.

The fast path (docs/compile.md has the whole story): a Python int ``t``/``prev_t``/``seed``/``offset``
becomes a cached int64 tensor (:func:`_int64_fill`; no allocation after the first call with that
value), the backend resolution and the schedule's device table are cached, and nothing on the path
reads a tensor value on the host except a CPU ``t`` tensor's range check. While ``torch.compile``
traces (``torch.compiler.is_compiling()``) the same functions run without the caches (ints become
tensors inside the graph, so a changing int ``t`` or ``offset`` is one symbolic input, not a
recompile) and without host reads of tensor values (a tensor ``t`` is range-checked by the kernels,
which give NaN rows for an out-of-range ``t``).
"""
from __future__ import annotations

import math
import os
from typing import Optional, Tuple, Union

import torch

from ._tensors import _check_device, _has_internal_overlap, _same_view, _shares_memory
from .backends import backends, resolve_backend
from .nvtx import range_for_op
from .schedule import NoiseSchedule
from .step_options import StepOptions

__all__ = [
    "gaussian_noise", "q_sample", "ddpm_step", "ddim_step", "ddim_reverse_step", "diffusion_loss",
    "vlb_loss", "hybrid_loss", "backends", "set_debug_checks",
    "PREDICTION_TYPES", "VARIANCE_TYPES", "LOSS_TARGETS", "REDUCTIONS",
]

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned",
                  "learned_range")
LEARNED_VARIANCE_TYPES = ("learned", "learned_range")
LOSS_TARGETS = PREDICTION_TYPES  # a loss regresses the output onto what the model predicts: the same names
REDUCTIONS = ("mean", "sum", "none")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# prev_t may be any negative value: every negative value means "past the end" (the final step).
_PAST_END = -(2 ** 62)

_debug_checks = os.environ.get("DDPM_FAST_DEBUG_CHECKS", "") not in ("", "0")


_CPU = torch.device("cpu")


_is_compiling = torch.compiler.is_compiling  # True while Dynamo traces (torch >= 2.6 has it)


def set_debug_checks(enabled: bool) -> None:
    """Check device-tensor timesteps against the schedule on every call (costs a device sync)."""
    global _debug_checks
    _debug_checks = bool(enabled)


# --------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------
def _check_tensor(name: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{name} must have a batch dimension, got a 0-d tensor")
    return x


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def _check_schedule(schedule) -> NoiseSchedule:
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule must be a ddpm_fast.NoiseSchedule, got {type(schedule).__name__}")
    return schedule


def _check_same_device(device: torch.device, **tensors) -> None:
    for name, x in tensors.items():
        if x is not None and x.device != device:
            raise ValueError(f"{name} is on {x.device} but the sample is on {device}: "
                             "all tensors must be on one device")


def _check_shape(shape) -> Tuple[int, ...]:
    """A shape as a non-empty tuple of non-negative ints (``TypeError`` for floats, strings and
    bools, as torch raises; ``ValueError`` for negative sizes or ``()``)."""
    from .noise import _shape_tuple

    dims = _shape_tuple(shape)
    if len(dims) == 0:
        raise ValueError("shape must be a non-empty sequence of non-negative ints, got ()")
    return dims


class _HostSteps:
    """Timestep values known on the host (no device sync): ``lo``/``hi`` and, for per-row CPU
    tensors, the values themselves (``None`` for one value broadcast over the batch)."""

    __slots__ = ("values", "lo", "hi")

    def __init__(self, values: Optional[torch.Tensor], lo: int, hi: int):
        self.values, self.lo, self.hi = values, lo, hi

    def shifted(self, delta: int) -> "_HostSteps":
        return _HostSteps(None if self.values is None else self.values + delta, self.lo + delta, self.hi + delta)

    def as_list(self, batch: int):
        return [int(self.lo)] * batch if self.values is None else self.values.tolist()


def _any_ge(a: _HostSteps, b: _HostSteps, batch: int) -> bool:
    """Whether a >= b in some row (ranges first; one vectorised comparison when they overlap)."""
    if a.hi < b.lo:
        return False
    if a.values is None and b.values is None:
        return a.lo >= b.lo
    if batch <= 64:  # a Python comparison is cheaper than a tensor op for a small batch
        return any(x >= y for x, y in zip(a.as_list(batch), b.as_list(batch)))
    av = a.values if a.values is not None else a.lo
    bv = b.values if b.values is not None else b.lo
    return bool((torch.as_tensor(av) >= bv).any())


def _check_order(earlier_name: str, earlier: Optional[_HostSteps], later_name: str,
                 later: Optional[_HostSteps], batch: int) -> None:
    """Raise unless ``earlier < later`` in every row (checked only where both are on the host)."""
    if earlier is not None and later is not None and _any_ge(earlier, later, batch):
        raise ValueError(f"{earlier_name} must be smaller than {later_name} in every row, got "
                         f"{earlier_name}={earlier.as_list(batch)} {later_name}={later.as_list(batch)}")


def _range_error(name, low, T, lo, hi):
    lo, hi = int(lo), int(hi)  # while Dynamo traces, a SymInt: int() makes it printable (error path only)
    lo_txt = "any negative value (the final step)" if low == _PAST_END else low
    return ValueError(f"{name} must lie in [{lo_txt}, {T}) for this schedule, got values in [{lo}, {hi}]")


def _timesteps(name: str, t, batch: int, device: torch.device, T: int, *, low: int = 0,
               compiling: Optional[bool] = None) -> Tuple[torch.Tensor, Optional[_HostSteps]]:
    """Normalise a timestep argument to a ``(B,)`` int64 tensor on ``device``. Returns it and,
    when its values are known on the host without a device sync, a :class:`_HostSteps`.
    ``compiling``: :func:`_is_compiling` when the caller has it (one call per op), else None."""
    if type(t) is int:  # the fast path of a sampling loop: a cached tensor (a SymInt while tracing)
        if t < low or t >= T:
            raise _range_error(name, low, T, t, t)
        if batch == 0:  # an empty batch: no row, none needs noise, no order to check
            return torch.empty((0,), dtype=torch.int64, device=device), _HostSteps(torch.empty(0, dtype=torch.int64), 0, -1)
        return _int64_fill(t, batch, device, compiling), _HostSteps(None, t, t)
    if isinstance(t, bool):
        raise TypeError(f"{name} must be an int or an int64 tensor, got bool")
    if isinstance(t, int):
        return _timesteps(name, int(t), batch, device, T, low=low, compiling=compiling)
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be an int or an int64 tensor, got {type(t).__name__}")
    if t.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be an int64 tensor, got dtype {t.dtype}")
    if compiling is None:
        compiling = _is_compiling()
    if t.dim() == 0:
        if t.device.type == "cpu":
            if not compiling:
                return _timesteps(name, int(t), batch, device, T, low=low)
            t = t.to(device)  # no host read while tracing: the kernels check the range
        _check_same_device(device, **{name: t})
        host, t = None, t.to(torch.int64).expand(batch)
    elif t.dim() == 1 and t.shape[0] == batch:
        if t.device.type == "cpu" and device.type == "cpu" and not compiling:
            t = t.to(torch.int64)
            if batch == 0:  # an empty batch: no value to check, none needs noise
                return t.contiguous(), _HostSteps(t, 0, -1)
            lo, hi = int(t.min()), int(t.max())
            if lo < low or hi >= T:
                raise _range_error(name, low, T, lo, hi)
            return t.contiguous(), _HostSteps(t, lo, hi)
        _check_same_device(device, **{name: t})
        host, t = None, t.to(torch.int64)
    else:
        raise ValueError(f"{name} must be an int, a 0-d tensor or a ({batch},) tensor, got shape "
                         f"{tuple(t.shape)}")
    if _debug_checks and not compiling and t.numel() > 0:
        lo, hi = int(t.min()), int(t.max())
        if lo < low or hi >= T:
            raise _range_error(name, low, T, lo, hi)
    return t.contiguous(), host


def _noise_args(noise, seed, offset, shape, device, *, needed: Optional[bool], what: str,
                compiling: Optional[bool] = None):
    """Validate and normalise ``noise``/``seed``/``offset``. ``needed``: True, False or None
    (unknown on the host). Returns ``(noise, seed, offset)`` normalised for a backend."""
    if noise is not None and seed is not None:
        raise ValueError("give exactly one of noise and seed, not both")
    if noise is not None:
        if not isinstance(noise, torch.Tensor):
            raise TypeError(f"noise must be a torch.Tensor, got {type(noise).__name__}")
        if tuple(noise.shape) != tuple(shape):
            raise ValueError(f"noise must have the sample's shape {tuple(shape)}, got {tuple(noise.shape)}")
        if noise.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"noise must be a floating tensor, got {noise.dtype}")
        _check_same_device(device, noise=noise)
        return noise, None, None
    if seed is None:
        if needed is False:
            return None, None, None
        if needed is None:
            raise ValueError(f"noise and seed are both None, and {what} may need noise (its timesteps are "
                             "a device tensor, not known on the host): give noise= or seed=")
        raise ValueError(f"noise and seed are both None, but {what} needs noise: give noise= or seed=")
    return None, _seed_tensor(seed, shape[0], device, compiling), _offset_tensor(offset, device, compiling)


_FILL_CACHE: dict = {}
_FILL_CACHE_SIZE = 4096       # entries; cleared when full
_FILL_CACHE_MAX_ROWS = 1024   # longer fills are made each call (their cost is small beside the op's)


def _int64_fill(value: int, n: int, device: torch.device, compiling: Optional[bool] = None) -> torch.Tensor:
    """A ``(n,)`` int64 tensor holding ``value`` on ``device``, read-only for backends: the
    normalised form of an int ``t``, ``seed`` or ``offset``. Cached by ``(value, n, device)``, so
    a sampling loop's timesteps and offsets are allocated (and, on CUDA, filled) once; the
    cached tensors are made outside inference mode (autograd may save them for a backward). Not
    cached while Dynamo traces (the fill is a graph op over a symbolic int), while a CUDA graph is
    being captured, or for long fills. On CUDA the key holds the current stream: a tensor is only
    reused on the stream whose queue filled it."""
    if compiling is None:
        compiling = _is_compiling()
    if compiling or n > _FILL_CACHE_MAX_ROWS:
        return torch.full((n,), value, dtype=torch.int64, device=device)
    if device == _CPU:  # (a comparison costs less than device.type or hashing the device)
        key = (value, n)
    elif device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            return torch.full((n,), value, dtype=torch.int64, device=device)
        key = (value, n, device, torch.cuda.current_stream(device).cuda_stream)
    else:
        key = (value, n, device)
    cached = _FILL_CACHE.get(key)
    if cached is None:
        if len(_FILL_CACHE) >= _FILL_CACHE_SIZE:
            _FILL_CACHE.clear()
        with torch.inference_mode(False):
            cached = torch.full((n,), value, dtype=torch.int64, device=device)
        _FILL_CACHE[key] = cached
    return cached


def _int64_scalar(value: int, device: torch.device) -> torch.Tensor:
    """A ``(1,)`` int64 tensor holding ``value`` on ``device`` (a seed or an offset)."""
    return _int64_fill(value, 1, device)


def _seed_tensor(seed, batch: int, device: torch.device, compiling: Optional[bool] = None) -> torch.Tensor:
    if type(seed) is int and 0 <= seed < 2 ** 63:  # the fast path
        return _int64_fill(seed, 1, device, compiling)
    if isinstance(seed, bool):
        raise TypeError("seed must be an int or an int64 tensor, got bool")
    if isinstance(seed, int):
        if not 0 <= seed < 2 ** 63:
            raise ValueError(f"seed must lie in [0, 2**63), got {int(seed)}")
        return _int64_fill(seed, 1, device, compiling)
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64:
            raise TypeError(f"seed must be an int64 tensor, got dtype {seed.dtype}")
        if seed.dim() == 0:
            _check_int64_range("seed", seed)
            return seed.reshape(1).to(device)
        if seed.dim() == 1 and seed.shape[0] == batch:
            if seed.device.type != "cpu":
                _check_same_device(device, seed=seed)
            _check_int64_range("seed", seed)
            return seed.to(device)
        raise ValueError(f"seed must be an int, a 0-d int64 tensor or a ({batch},) int64 tensor of per-row "
                         f"seeds, got shape {tuple(seed.shape)}")
    raise TypeError(f"seed must be an int or an int64 tensor, got {type(seed).__name__}")


def _check_int64_range(name: str, x: torch.Tensor) -> None:
    """Seeds and offsets lie in [0, 2^63): an int64 tensor can only break that by a negative value.
    Checked on the host for a CPU tensor (cheap, no sync); a device tensor only under debug checks
    (a sync): unchecked, a negative device value is read as its 64-bit two's-complement pattern, the
    same on every backend."""
    if x.numel() == 0 or (x.device.type != "cpu" and not _debug_checks) or _is_compiling():
        return  # (no host read while Dynamo traces)
    lo = x.item() if x.numel() == 1 else int(x.min())   # item(): the per-step 0-d offset, cheaply
    if lo < 0:
        raise ValueError(f"{name} must lie in [0, 2**63), got a tensor holding {lo}")


def _offset_tensor(offset, device: torch.device, compiling: Optional[bool] = None) -> torch.Tensor:
    if type(offset) is int and 0 <= offset < 2 ** 63:  # the fast path
        return _int64_fill(offset, 1, device, compiling)
    if isinstance(offset, bool):
        raise TypeError("offset must be an int or a 0-d int64 tensor, got bool")
    if isinstance(offset, int):
        if not 0 <= offset < 2 ** 63:
            raise ValueError(f"offset must lie in [0, 2**63), got {int(offset)}")
        return _int64_fill(offset, 1, device, compiling)
    if isinstance(offset, torch.Tensor):
        if offset.dtype != torch.int64 or offset.numel() != 1:
            raise ValueError(f"offset must be an int or a 0-d int64 tensor, got {offset.dtype} of shape "
                             f"{tuple(offset.shape)}")
        _check_int64_range("offset", offset)
        return offset.reshape(1).to(device)
    raise TypeError(f"offset must be an int or a 0-d int64 tensor, got {type(offset).__name__}")


def _indexed_seed(seed, sample_index, noise, batch: int, device: torch.device):
    """``seed`` unchanged without ``sample_index``; with it, the ``(B,)`` per-row seeds
    :func:`ddpm_fast.noise.row_seeds` of the rows' global indices (docs/distributed.md), so row
    ``b``'s noise is a pure function of ``(seed, offset, sample_index[b])``."""
    if sample_index is None:
        return seed
    if noise is not None:
        raise ValueError("sample_index keys the noise drawn from seed=; it cannot be combined with noise=")
    if seed is None:
        raise ValueError("sample_index needs seed= (the run's seed; the rows' noise is keyed by seed and index)")
    if isinstance(seed, torch.Tensor) and seed.dim() != 0:
        raise ValueError(f"with sample_index, seed must be an int or a 0-d int64 tensor (one seed for the run), "
                         f"got shape {tuple(seed.shape)}")
    if not isinstance(sample_index, torch.Tensor):
        raise TypeError(f"sample_index must be a (B,) int64 tensor, got {type(sample_index).__name__}")
    if sample_index.dtype != torch.int64:
        raise TypeError(f"sample_index must be an int64 tensor, got dtype {sample_index.dtype}")
    if tuple(sample_index.shape) != (batch,):
        raise ValueError(f"sample_index must have shape ({batch},) (one global index per row), got "
                         f"{tuple(sample_index.shape)}")
    if sample_index.device.type != "cpu":
        _check_same_device(device, sample_index=sample_index)
    if (sample_index.device.type == "cpu" or _debug_checks) and batch and not _is_compiling() \
            and int(sample_index.min()) < 0:  # (no host read while Dynamo traces)
        raise ValueError(f"sample_index must lie in [0, 2**63), got a minimum of {int(sample_index.min())}")
    from .noise import row_seeds

    seed_t = _seed_tensor(seed, batch, sample_index.device if not isinstance(seed, torch.Tensor) else seed.device)
    return row_seeds(seed_t.reshape(()), sample_index)


def _check_float(name: str, value, *, low=None, high=None, allow_none=False):
    if type(value) is float and (low is None or value >= low) and (high is None or value <= high) \
            and value == value:  # the fast path (value == value: not NaN)
        return value
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if math.isnan(value) or (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must lie in [{low}, {high}], got {value}")
    return value


def _check_bool(name: str, value) -> bool:
    if value is True or value is False:
        return value
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def _sample_shape_checks(model_output, x_t, *, channels_factor: int, guidance: bool, mo_name="model_output",
                         x_name="x_t"):
    """Check model_output's shape against the sample's: C or 2C channels (learned variance),
    B or 2B rows (guidance)."""
    B = x_t.shape[0]
    exp = list(x_t.shape)
    if channels_factor == 2:
        if x_t.dim() < 2:
            raise ValueError(f"learned variance types need a channel dimension (dim 1); {x_name} has shape "
                             f"{tuple(x_t.shape)}")
        exp[1] *= 2
    if guidance:
        exp[0] = 2 * B
    if list(model_output.shape) != exp:
        why = []
        if channels_factor == 2:
            why.append("twice the sample's channels (learned variance)")
        if guidance:
            why.append("2B rows, unconditional then conditional (guidance_scale)")
        extra = f" ({', '.join(why)})" if why else ""
        raise ValueError(f"{mo_name} must have shape {tuple(exp)}{extra}, got {tuple(model_output.shape)}")


def _check_out(out, x_t, **inputs):
    """``out`` must match ``x_t`` (shape, dtype, device), be writable element by element (not
    expanded, not a leaf that requires grad, not an inference tensor outside inference mode) and may
    be exactly one of the inputs (``out=x_t`` updates in place) but must not share part of its memory
    with ``x_t`` or another input (``inputs``: name -> tensor)."""
    if out is None:
        return None
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    if out.shape != x_t.shape or out.dtype != x_t.dtype or out.device != x_t.device:
        raise ValueError(f"out must match x_t (shape {tuple(x_t.shape)}, {x_t.dtype}, {x_t.device}), got "
                         f"shape {tuple(out.shape)}, {out.dtype}, {out.device}")
    if torch.compiler.is_compiling():  # traced: aliasing is the compiler's (no storage to look at)
        return out
    if _has_internal_overlap(out):
        raise ValueError(f"out must be writable element by element, but several of its elements share one "
                         f"memory location (an expanded view, strides {tuple(out.stride())}): give a tensor "
                         "with memory of its own")
    if out.requires_grad and out.is_leaf and torch.is_grad_enabled():
        raise ValueError("out is a leaf tensor that requires grad, which cannot be written in place: detach it, "
                         "or call under torch.no_grad()")
    if out.is_inference() and not torch.is_inference_mode_enabled():
        raise ValueError("out is an inference tensor, which can be written only under torch.inference_mode()")
    for name, x in (("x_t", x_t), *inputs.items()):
        if x is None or x is out or not torch._C._overlaps(out, x):   # the usual cases: one C call
            continue
        if not _same_view(out, x) and _shares_memory(out, x):
            raise ValueError(f"out shares part of its memory with {name} (a shifted or sliced view of the same "
                             f"storage), which would make the step read values it already wrote: give out={name} "
                             "itself for an in-place update, or a tensor of its own")
    return out


def _threshold_args(clip_sample, clip_sample_range, thresholding, dynamic_thresholding_ratio, sample_max_value):
    return dict(
        clip_sample=_check_bool("clip_sample", clip_sample),
        clip_sample_range=_check_float("clip_sample_range", clip_sample_range, low=0.0),
        thresholding=_check_bool("thresholding", thresholding),
        dynamic_thresholding_ratio=_check_float("dynamic_thresholding_ratio", dynamic_thresholding_ratio,
                                                low=0.0, high=1.0),
        sample_max_value=_check_positive("sample_max_value", sample_max_value),
    )


def _check_positive(name: str, value) -> float:
    """A number > 0 (sample_max_value: thresholding divides by clamp(s, 1, sample_max_value), so 0
    would make every row NaN; values in (0, 1) are well defined: s = sample_max_value)."""
    value = _check_float(name, value, low=0.0)
    if value <= 0.0:
        raise ValueError(f"{name} must be positive, got {value}")
    return value


def _dtype_for_backend(x, *others):
    """The dtype a backend must support: float64 if any input is, else the sample's."""
    if x.dtype is torch.float64:
        return x.dtype
    for o in others:
        if o.dtype is torch.float64:
            return o.dtype
    return x.dtype


def _table(schedule: NoiseSchedule, device: torch.device, compiling: bool) -> torch.Tensor:
    """The schedule's float64 ``alphas_cumprod`` on ``device`` (the CPU table itself, else the
    schedule's cached device copy; made outside the traced code when Dynamo traces)."""
    if device == _CPU:
        return schedule.alphas_cumprod
    if compiling:
        _cache_device_table(schedule, device)
    return schedule.table(device)


def _cache_device_table(schedule: NoiseSchedule, device: torch.device) -> bool:
    schedule.to(device)  # fills the schedule's device cache, which the traced code then reads
    return True


_cache_device_table = torch.compiler.assume_constant_result(_cache_device_table)


def _check_on_device(device: torch.device, name: str, x: torch.Tensor) -> None:
    if x.device != device:
        _check_same_device(device, **{name: x})


def _noise_needed(noise, seed, host: Optional[_HostSteps]) -> Optional[bool]:
    """Whether a DDPM step needs noise (some row has ``t > 0``); decided (so read) only when
    neither ``noise`` nor ``seed`` is given: a traced int ``t`` then adds no guard on its value."""
    if noise is not None or seed is not None:
        return True
    return None if host is None else host.hi > 0


# --------------------------------------------------------------------------------------------
# public ops
# --------------------------------------------------------------------------------------------
@range_for_op("gaussian_noise")
def gaussian_noise(shape, seed, offset=0, *, device=None, dtype: torch.dtype = torch.float32,
                   backend: Optional[str] = None) -> torch.Tensor:
    """Standard normal noise of ``shape`` under the docs/noise.md contract: a pure function of
    ``(seed, offset, index)``. ``seed`` may be a ``(shape[0],)`` int64 tensor of per-row seeds."""
    shape = _check_shape(shape)
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"dtype must be a floating dtype, got {dtype}")
    if device is None:
        device = seed.device if isinstance(seed, torch.Tensor) else _CPU
    else:
        device = _check_device("device", device)
    compiling = _is_compiling()
    seed_t = _seed_tensor(seed, shape[0], device, compiling)
    offset_t = _offset_tensor(offset, device, compiling)
    impl = resolve_backend(backend, device, dtype, compiling)
    return impl.gaussian_noise(shape, seed_t, offset_t, dtype)


@range_for_op("q_sample")
def q_sample(x0, t, schedule, noise=None, *, seed=None, offset=0, sample_index=None, backend: Optional[str] = None):
    """``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` with per-row ``t``; ``eps`` is ``noise`` or
    the docs/noise.md noise of ``(seed, offset)`` (with ``sample_index``, a ``(B,)`` int64 tensor of the rows'
    global indices: row ``b``'s noise keyed by ``(seed, offset, sample_index[b])``, see
    docs/distributed.md). Differentiable in ``x0``."""
    x0 = _check_tensor("x0", x0)
    schedule = _check_schedule(schedule)
    dev, shape, compiling = x0.device, x0.shape, _is_compiling()
    tt, _ = _timesteps("t", t, shape[0], dev, schedule.num_timesteps, compiling=compiling)
    if sample_index is not None:
        seed = _indexed_seed(seed, sample_index, noise, shape[0], dev)
    noise, seed_t, offset_t = _noise_args(noise, seed, offset, shape, dev, needed=True, what="q_sample",
                                          compiling=compiling)
    impl = resolve_backend(backend, dev, x0.dtype, compiling)
    return impl.q_sample(x0, tt, _table(schedule, dev, compiling), noise, seed_t, offset_t)


_STEP_OPTIONS: dict = {}


def _step_options(clip: dict, guidance_scale, return_x0: bool, compiling: bool) -> StepOptions:
    """The :class:`StepOptions` of validated options, cached by their values (building one costs
    several microseconds; a loop passes the same options every step). Built afresh while tracing."""
    if compiling:
        return StepOptions(**clip, guidance_scale=guidance_scale, return_x0=return_x0)
    key = (*clip.values(), guidance_scale, return_x0)
    opts = _STEP_OPTIONS.get(key)
    if opts is None:
        if len(_STEP_OPTIONS) >= 256:
            _STEP_OPTIONS.clear()
        opts = _STEP_OPTIONS[key] = StepOptions(**clip, guidance_scale=guidance_scale, return_x0=return_x0)
    return opts


def _step_common(model_output, x_t, schedule, guidance_scale, channels_factor, t, return_x0, out, clip_opts):
    """Validation shared by the three steps: tensors, schedule, guidance shape, the clipping and
    thresholding options, ``return_x0``, ``out`` and ``t``. Returns the normalised values with
    ``compiling``, the sample's device and its shape (each read once: a tensor attribute costs
    more than a local)."""
    model_output = _check_tensor("model_output", model_output)
    x_t = _check_tensor("x_t", x_t)
    schedule = _check_schedule(schedule)
    dev, shape = x_t.device, x_t.shape
    _check_on_device(dev, "model_output", model_output)
    guidance_scale = _check_float("guidance_scale", guidance_scale, allow_none=True)
    if channels_factor != 1 or guidance_scale is not None or model_output.shape != shape:
        _sample_shape_checks(model_output, x_t, channels_factor=channels_factor,
                             guidance=guidance_scale is not None)
    compiling = _is_compiling()
    # the backends take the shared options whole (StepOptions) and out apart
    opts = dict(opts=_step_options(_threshold_args(*clip_opts), guidance_scale, _check_bool("return_x0", return_x0),
                                   compiling),
                out=_check_out(out, x_t, model_output=model_output))
    tt, t_host = _timesteps("t", t, shape[0], dev, schedule.num_timesteps, compiling=compiling)
    return model_output, x_t, schedule, opts, tt, t_host, compiling, dev, shape


@range_for_op("ddpm_step")
def ddpm_step(model_output, t, x_t, schedule, *, prev_t=None, prediction_type="epsilon",
              variance_type="fixed_small", clip_sample=True, clip_sample_range=1.0, thresholding=False,
              dynamic_thresholding_ratio=0.995, sample_max_value=1.0, guidance_scale=None, noise=None,
              seed=None, offset=0, return_x0=False, out=None, backend: Optional[str] = None):
    """One reverse DDPM step (Ho et al. Algorithm 2, diffusers' order) from ``t`` to ``prev_t``
    (``t - 1`` when None; a negative ``prev_t`` means the final step, ``abar_prev = 1``). Returns ``x_prev`` or ``(x_prev, x0_hat)``.
    Noise is added where ``t > 0``. ``variance_type="learned"`` reads the extra channels as a
    log-variance (improved-diffusion)."""
    _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    _check_choice("variance_type", variance_type, VARIANCE_TYPES)
    factor = 2 if variance_type in LEARNED_VARIANCE_TYPES else 1
    model_output, x_t, schedule, opts, tt, t_host, compiling, dev, shape = _step_common(
        model_output, x_t, schedule, guidance_scale, factor, t, return_x0, out,
        (clip_sample, clip_sample_range, thresholding, dynamic_thresholding_ratio, sample_max_value))
    B, T = shape[0], schedule.num_timesteps
    if prev_t is None:
        if t_host is not None and t_host.values is None:  # one host value: t - 1 from the cache
            pt = _int64_fill(t_host.lo - 1, B, dev, compiling)
        else:
            pt = tt - 1
        pt_host = None if t_host is None else t_host.shifted(-1)
    else:
        pt, pt_host = _timesteps("prev_t", prev_t, B, dev, T, low=_PAST_END, compiling=compiling)
        _check_order("prev_t", pt_host, "t", t_host, B)
    noise, seed_t, offset_t = _noise_args(noise, seed, offset, shape, dev, needed=_noise_needed(noise, seed, t_host),
                                          what="ddpm_step", compiling=compiling)
    impl = resolve_backend(backend, dev, _dtype_for_backend(x_t, model_output), compiling)
    x_prev, x0_hat = impl.ddpm_step(model_output, tt, pt, x_t, _table(schedule, dev, compiling), noise, seed_t,
                                    offset_t, prediction_type=prediction_type, variance_type=variance_type, **opts)
    return (x_prev, x0_hat) if return_x0 else x_prev


@range_for_op("ddim_step")
def ddim_step(model_output, t, x_t, schedule, *, prev_t, eta=0.0, prediction_type="epsilon",
              use_clipped_model_output=False, final_alpha_cumprod=1.0, clip_sample=True, clip_sample_range=1.0,
              thresholding=False, dynamic_thresholding_ratio=0.995, sample_max_value=1.0, guidance_scale=None,
              noise=None, seed=None, offset=0, return_x0=False, out=None, backend: Optional[str] = None):
    """One DDIM step (Song et al.) from ``t`` to ``prev_t`` (negative: the final step, with
    ``abar_prev = final_alpha_cumprod``). Noise only when ``eta > 0``; ``eta`` in [0, 1]."""
    _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    model_output, x_t, schedule, opts, tt, t_host, compiling, dev, shape = _step_common(
        model_output, x_t, schedule, guidance_scale, 1, t, return_x0, out,
        (clip_sample, clip_sample_range, thresholding, dynamic_thresholding_ratio, sample_max_value))
    eta = _check_float("eta", eta, low=0.0, high=1.0)
    final_alpha_cumprod = _check_float("final_alpha_cumprod", final_alpha_cumprod, low=0.0, high=1.0)
    use_clipped_model_output = _check_bool("use_clipped_model_output", use_clipped_model_output)
    B, T = shape[0], schedule.num_timesteps
    pt, pt_host = _timesteps("prev_t", prev_t, B, dev, T, low=_PAST_END, compiling=compiling)
    _check_order("prev_t", pt_host, "t", t_host, B)
    noise, seed_t, offset_t = _noise_args(noise, seed, offset, shape, dev, needed=eta > 0, what="ddim_step",
                                          compiling=compiling)
    impl = resolve_backend(backend, dev, _dtype_for_backend(x_t, model_output), compiling)
    x_prev, x0_hat = impl.ddim_step(model_output, tt, pt, x_t, _table(schedule, dev, compiling), noise, seed_t,
                                    offset_t, eta=eta, prediction_type=prediction_type,
                                    use_clipped_model_output=use_clipped_model_output,
                                    final_alpha_cumprod=final_alpha_cumprod, **opts)
    return (x_prev, x0_hat) if return_x0 else x_prev


@range_for_op("ddim_reverse_step")
def ddim_reverse_step(model_output, t, x_t, schedule, *, next_t, eta=0.0, prediction_type="epsilon",
                      use_clipped_model_output=False, clip_sample=True, clip_sample_range=1.0,
                      thresholding=False, dynamic_thresholding_ratio=0.995, sample_max_value=1.0,
                      guidance_scale=None, return_x0=False, out=None, backend: Optional[str] = None,
                      noise=None, seed=None, offset=None, final_alpha_cumprod=None):
    """DDIM inversion (``ddim_reverse_sample``): ``x_t`` to ``x_next`` with ``abar_next`` of the next
    larger timestep. Deterministic: ``eta`` must be 0, ``noise`` and ``seed`` None (these keywords,
    ``offset`` and ``final_alpha_cumprod`` are accepted for symmetry with ``ddim_step`` and unused)."""
    for name, value in (("noise", noise), ("seed", seed)):
        if value is not None:
            raise ValueError(f"{name} must be None: DDIM inversion draws no noise")
    _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    model_output, x_t, schedule, opts, tt, t_host, compiling, dev, shape = _step_common(
        model_output, x_t, schedule, guidance_scale, 1, t, return_x0, out,
        (clip_sample, clip_sample_range, thresholding, dynamic_thresholding_ratio, sample_max_value))
    eta = _check_float("eta", eta, low=0.0, high=0.0)
    use_clipped_model_output = _check_bool("use_clipped_model_output", use_clipped_model_output)
    B, T = shape[0], schedule.num_timesteps
    nt, nt_host = _timesteps("next_t", next_t, B, dev, T, compiling=compiling)
    _check_order("t", t_host, "next_t", nt_host, B)
    impl = resolve_backend(backend, dev, _dtype_for_backend(x_t, model_output), compiling)
    x_next, x0_hat = impl.ddim_reverse_step(model_output, tt, nt, x_t, _table(schedule, dev, compiling),
                                            prediction_type=prediction_type,
                                            use_clipped_model_output=use_clipped_model_output, **opts)
    return (x_next, x0_hat) if return_x0 else x_next


def _reduce(per_sample: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return per_sample
    if reduction == "sum":
        return per_sample.sum()
    return per_sample.mean()


_LOSS_WHAT = {target: f"diffusion_loss with target={target!r}" for target in LOSS_TARGETS}


def _check_snr_gamma(snr_gamma):
    if snr_gamma is None:
        return None
    snr_gamma = _check_float("snr_gamma", snr_gamma, low=0.0, allow_none=True)
    if snr_gamma is not None and snr_gamma <= 0:
        raise ValueError(f"snr_gamma must be positive, got {snr_gamma}")
    return snr_gamma


@range_for_op("loss fwd")
def diffusion_loss(model_output, x0, t, schedule, *, target="epsilon", noise=None, seed=None, offset=0,
                   snr_gamma=None, reduction="mean", sample_index=None, backend: Optional[str] = None):
    """The simple loss ``w(t) * mean((target - model_output)^2)`` per sample (fp32), reduced over
    the batch. ``target``: ``epsilon``, ``sample`` (x0) or ``v_prediction``; the noise is the one
    :func:`q_sample` drew with the same ``(seed, offset)`` (and ``sample_index``).
    ``snr_gamma``: min-SNR-gamma weights. Differentiable in ``model_output``."""
    # The validation and normalisation of the other ops, with the helpers' usual outcome tested
    # inline (each helper call costs ~0.1-0.2 us; the overhead budget of the op is ~10 us) and the
    # helpers called, in the same order, only where they may raise. Also inlined below for a
    # training step's usual call (an int t, seed= and offset=): _timesteps, _noise_args,
    # _dtype_for_backend, _reduce.
    if target not in LOSS_TARGETS or reduction not in REDUCTIONS:
        _check_choice("target", target, LOSS_TARGETS)
        _check_choice("reduction", reduction, REDUCTIONS)
    if not (isinstance(model_output, torch.Tensor) and isinstance(x0, torch.Tensor)
            and isinstance(schedule, NoiseSchedule) and model_output.dtype in _FLOAT_DTYPES
            and x0.dtype in _FLOAT_DTYPES and model_output.dim() and x0.dim()):
        _check_tensor("model_output", model_output)
        _check_tensor("x0", x0)
        _check_schedule(schedule)
    dev, shape, compiling = x0.device, x0.shape, _is_compiling()
    if model_output.device != dev:
        _check_same_device(dev, model_output=model_output)
    if model_output.shape != shape:
        raise ValueError(f"model_output must have x0's shape {tuple(shape)}, got {tuple(model_output.shape)}")
    if snr_gamma is not None:
        snr_gamma = _check_snr_gamma(snr_gamma)
    B = shape[0]
    if type(t) is int and 0 <= t < schedule.num_timesteps and B:  # _timesteps' int path, inlined
        tt = _int64_fill(t, B, dev, compiling)
    else:
        tt, _ = _timesteps("t", t, B, dev, schedule.num_timesteps, compiling=compiling)
    if sample_index is not None and (seed is not None or target != "sample"):
        seed = _indexed_seed(seed, sample_index, noise, B, dev)
    if noise is None and seed is not None:  # _noise_args with a seed, inlined
        seed_t, offset_t = _seed_tensor(seed, B, dev, compiling), _offset_tensor(offset, dev, compiling)
    else:
        noise, seed_t, offset_t = _noise_args(noise, seed, offset, shape, dev, needed=target != "sample",
                                              what=_LOSS_WHAT[target], compiling=compiling)
    dtype = x0.dtype  # _dtype_for_backend(x0, model_output), inlined
    if model_output.dtype is torch.float64:
        dtype = torch.float64
    impl = resolve_backend(backend, dev, dtype, compiling)
    per_sample = impl.diffusion_loss(model_output, x0, tt, _table(schedule, dev, compiling), noise, seed_t,
                                     offset_t, target=target, snr_gamma=snr_gamma)
    if reduction == "mean":
        return per_sample.mean()
    return _reduce(per_sample, reduction)


def _vlb_common(model_output, x0, schedule, prediction_type, variance_type, reduction, variance_types):
    """Validation shared by vlb_loss and hybrid_loss: options, tensors, schedule, 2C channels."""
    _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    _check_choice("variance_type", variance_type, variance_types)
    _check_choice("reduction", reduction, REDUCTIONS)
    model_output = _check_tensor("model_output", model_output)
    x0 = _check_tensor("x0", x0)
    schedule = _check_schedule(schedule)
    _check_on_device(x0.device, "model_output", model_output)
    factor = 2 if variance_type in LEARNED_VARIANCE_TYPES else 1
    _sample_shape_checks(model_output, x0, channels_factor=factor, guidance=False, x_name="x0")
    return model_output, x0, schedule


@range_for_op("vlb_loss fwd")
def vlb_loss(model_output, x0, x_t, t, schedule, *, prediction_type="epsilon", variance_type="learned_range",
             reduction="mean", backend: Optional[str] = None):
    """The variational-bound term per sample, in bits per dimension: ``KL(q(x_{t-1}|x_t,x0) ||
    p(x_{t-1}|x_t))`` for ``t > 0``, the discretized decoder NLL at ``t = 0``. ``model_output``
    has ``2C`` channels for learned variance types. Differentiable in ``model_output``."""
    model_output, x0, schedule = _vlb_common(model_output, x0, schedule, prediction_type, variance_type,
                                             reduction, VARIANCE_TYPES)
    x_t = _check_tensor("x_t", x_t)
    dev, compiling = x0.device, _is_compiling()
    _check_on_device(dev, "x_t", x_t)
    if x_t.shape != x0.shape:
        raise ValueError(f"x_t must have x0's shape {tuple(x0.shape)}, got {tuple(x_t.shape)}")
    tt, _ = _timesteps("t", t, x0.shape[0], dev, schedule.num_timesteps, compiling=compiling)
    impl = resolve_backend(backend, dev, _dtype_for_backend(x0, model_output, x_t), compiling)
    per_sample = impl.vlb_loss(model_output, x0, x_t, tt, _table(schedule, dev, compiling),
                               prediction_type=prediction_type, variance_type=variance_type)
    return _reduce(per_sample, reduction)


@range_for_op("hybrid_loss fwd")
def hybrid_loss(model_output, x0, t, schedule, *, noise=None, seed=None, offset=0, prediction_type="epsilon",
                variance_type="learned_range", snr_gamma=None, reduction="mean", sample_index=None,
                backend: Optional[str] = None):
    """improved DDPM's hybrid loss (``RESCALED_MSE``): the simple loss on the first ``C`` channels
    plus ``T/1000`` times the VLB term, which sees the predicted mean through a stop-gradient (it
    trains the variance channels only) and rebuilds ``x_t`` from the same noise (``sample_index``:
    as in :func:`q_sample`).

    Validated and normalised once; the three backend calls (simple loss, q_sample, VLB term) share
    ``t``, the noise arguments, the table and the backend."""
    model_output, x0, schedule = _vlb_common(model_output, x0, schedule, prediction_type, variance_type,
                                             reduction, LEARNED_VARIANCE_TYPES)
    snr_gamma = _check_snr_gamma(snr_gamma)
    dev, compiling = x0.device, _is_compiling()
    tt, _ = _timesteps("t", t, x0.shape[0], dev, schedule.num_timesteps, compiling=compiling)
    seed = _indexed_seed(seed, sample_index, noise, x0.shape[0], dev)
    noise, seed_t, offset_t = _noise_args(noise, seed, offset, x0.shape, dev, needed=True, what="hybrid_loss",
                                          compiling=compiling)
    impl = resolve_backend(backend, dev, _dtype_for_backend(x0, model_output), compiling)
    abar = _table(schedule, dev, compiling)
    C = x0.shape[1]
    prediction, variance = model_output[:, :C], model_output[:, C:]
    simple = impl.diffusion_loss(prediction, x0, tt, abar, noise, seed_t, offset_t, target=prediction_type,
                                 snr_gamma=snr_gamma)
    with torch.no_grad():
        x_t = impl.q_sample(x0, tt, abar, noise, seed_t, offset_t)
    frozen = torch.cat([prediction.detach(), variance], dim=1)
    vlb = impl.vlb_loss(frozen, x0, x_t, tt, abar, prediction_type=prediction_type, variance_type=variance_type)
    return _reduce(simple + (schedule.num_timesteps / 1000.0) * vlb, reduction)
