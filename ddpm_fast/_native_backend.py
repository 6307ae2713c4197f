"""The "native" backend: fused C++ (CPU) and CUDA kernels of the compiled extension ``ddpm_fast._C``.

The ops are registered with torch as ``torch.ops.ddpm_fast.<op>`` (schemas in
``csrc/torch_bindings.cpp``; fake tensors and autograd in :mod:`ddpm_fast._native_ops`). This module
adapts them to the backend interface of :mod:`ddpm_fast.ops`. It always imports: when the extension
is missing, failed to build or was built against another torch, :func:`availability` says why.

``out=``: written in place by the ``*_out`` ops (``out`` may be ``x_t``), except when autograd
needs the graph, where the functional op runs and ``out`` receives a copy.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Tuple

import torch

from ._op_glue import run_step

NAME = "native"

_HERE = os.path.dirname(os.path.abspath(__file__))
_state: Dict[str, object] = {"loaded": None, "reason": "", "info": {}}


def _build_record() -> dict:
    path = os.path.join(_HERE, "_native_build.json")
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _load() -> bool:
    if _state["loaded"] is not None:
        return bool(_state["loaded"])
    record = _build_record()
    reason = ""
    if record and not record.get("built", False):
        reason = (f"the native extension failed to build: {record.get('error', 'unknown error')} "
                  "(reinstall with `pip install --no-build-isolation -e .` to see the compiler output)")
    elif record and record.get("torch_version") != torch.__version__:
        reason = (f"the native extension was built against torch {record.get('torch_version')} but torch "
                  f"{torch.__version__} is running: rebuild it (`pip install --no-build-isolation -e .`)")
    if not reason:
        try:
            from . import _C  # noqa: F401  (loading it registers the torch.ops.ddpm_fast ops)
            from . import _native_ops  # noqa: F401  (fake tensors and autograd)
            _state["info"] = dict(_C.build_info())
            built_for = _state["info"].get("torch_version")
            if built_for not in (None, "unknown", torch.__version__):
                reason = (f"the native extension was built against torch {built_for} but torch {torch.__version__} "
                          "is running: rebuild it (`pip install --no-build-isolation -e .`)")
        except ImportError as e:
            if not record:
                reason = ("the native extension is not built (install with `pip install --no-build-isolation -e .`; "
                          f"DDPM_FAST_SKIP_NATIVE unset): {e}")
            else:
                reason = f"the native extension does not load ({e}); a torch mismatch? rebuild it"
        except Exception as e:  # a broken library: report, keep the other backends working
            reason = f"the native extension does not load: {type(e).__name__}: {e}"
    _state["loaded"] = not reason
    _state["reason"] = reason
    return not reason


def build_info() -> dict:
    """What the extension was built with (version, compiler, CPU instruction sets, CUDA archs)."""
    _load()
    return dict(_state["info"]) if _state["loaded"] else {"available": False, "reason": _state["reason"]}


def availability() -> Dict[str, Tuple[bool, str]]:
    if not _load():
        return {"cpu": (False, str(_state["reason"])), "cuda": (False, str(_state["reason"]))}
    info = _state["info"]
    if not info.get("cuda", False):
        cuda = (False, "the native extension was built without CUDA (CPU-only torch or no nvcc at build time)")
    elif not torch.cuda.is_available():
        cuda = (False, "torch.cuda.is_available() is False")
    else:
        cuda = (True, "")
    return {"cpu": (True, ""), "cuda": cuda}


def supports_dtype(device_type: str, dtype: torch.dtype) -> bool:
    if dtype in (torch.float32, torch.float16, torch.bfloat16):
        return True
    return dtype == torch.float64 and device_type == "cpu"


def _ops():
    return torch.ops.ddpm_fast


def gaussian_noise(shape, seed, offset, dtype):
    return _ops().gaussian_noise(list(shape), seed, offset, dtype)


def q_sample(x0, t, alphas_cumprod, noise, seed, offset):
    return _ops().q_sample(x0, t, alphas_cumprod, noise, seed, offset)


def _step(name, args, model_output, x_t, opts, out):
    ops = _ops()
    return run_step(getattr(ops, name), getattr(ops, name + "_out"), args + opts.schema_args(),
                    model_output=model_output, x_t=x_t, return_x0=opts.return_x0, out=out)


def ddpm_step(model_output, t, prev_t, x_t, alphas_cumprod, noise, seed, offset, *, prediction_type, variance_type,
              opts, out):
    args = (model_output, t, prev_t, x_t, alphas_cumprod, noise, seed, offset, prediction_type, variance_type)
    return _step("ddpm_step", args, model_output, x_t, opts, out)


def ddim_step(model_output, t, prev_t, x_t, alphas_cumprod, noise, seed, offset, *, eta, prediction_type,
              use_clipped_model_output, final_alpha_cumprod, opts, out):
    args = (model_output, t, prev_t, x_t, alphas_cumprod, noise, seed, offset, float(eta), prediction_type,
            use_clipped_model_output, float(final_alpha_cumprod))
    return _step("ddim_step", args, model_output, x_t, opts, out)


def ddim_reverse_step(model_output, t, next_t, x_t, alphas_cumprod, *, prediction_type, use_clipped_model_output,
                      opts, out):
    args = (model_output, t, next_t, x_t, alphas_cumprod, prediction_type, use_clipped_model_output)
    return _step("ddim_reverse_step", args, model_output, x_t, opts, out)


def diffusion_loss(model_output, x0, t, alphas_cumprod, noise, seed, offset, *, target, snr_gamma):
    return _ops().diffusion_loss(model_output, x0, t, alphas_cumprod, noise, seed, offset, target,
                                 None if snr_gamma is None else float(snr_gamma))


def vlb_loss(model_output, x0, x_t, t, alphas_cumprod, *, prediction_type, variance_type):
    return _ops().vlb_loss(model_output, x0, x_t, t, alphas_cumprod, prediction_type, variance_type)
