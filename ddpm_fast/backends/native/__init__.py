"""The "native" backend: fused C++ (CPU) and CUDA kernels of the compiled extension.

Two libraries: ``ddpm_fast._C`` (the op schemas, the CPU kernels, autograd) and ``_C_cuda`` (the
CUDA kernels, for the CUDA dispatch key; a failure there leaves the CPU part working). Each comes
from the package when setup.py built it for this torch and these sources, else from a build at first
use (:mod:`ddpm_fast._build`; ``DDPM_FAST_NO_JIT=1`` refuses it). The ops are registered with torch as ``torch.ops.ddpm_fast.<op>`` (schemas in
``csrc/torch_bindings.cpp``; fake tensors and autograd in :mod:`ddpm_fast.backends.native._registration`). This module
adapts them to the backend interface of :mod:`ddpm_fast.ops`. It always imports: when the extension
is missing, failed to build or was built against another torch, :func:`availability` says why.

``out=``: written in place by the ``*_out`` ops (``out`` may be ``x_t``), except when autograd
needs the graph, where the functional op runs and ``out`` receives a copy.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import warnings
from typing import Dict, Optional, Tuple

import torch

from ... import _build
from .._op_glue import run_step

NAME = "native"

_HERE = _build.PKG_DIR  # the package's top folder, where the install puts _C*.so
_state: Dict[str, object] = {"loaded": None, "reason": "", "info": {}, "origin": {}, "cuda": False,
                             "cuda_reason": ""}
_GET_IT = ("`python -m ddpm_fast._build` builds it now (or, in a checkout, reinstall with torch present: "
           "`pip install --no-build-isolation -e .`)")


def _installed_file(name: str, record: dict, part: str) -> Optional[str]:
    """The library ``name`` (``_C`` / ``_C_cuda``) installed in the package, if any."""
    fname = (record.get(part) or {}).get("file")
    if fname and os.path.exists(os.path.join(_HERE, fname)):
        return os.path.join(_HERE, fname)
    if part == "cpu":  # a record of the older format, or none: whatever the import system finds
        spec = importlib.util.find_spec(f"ddpm_fast.{name}")
        if spec is not None and spec.origin and os.path.dirname(spec.origin) == _HERE:
            return spec.origin
    return None


def _installed(record: dict, part: str, sha: Optional[str]) -> Tuple[Optional[str], str]:
    """(path of the installed library of ``part`` if usable, else None; why not)."""
    path = _installed_file("_C" if part == "cpu" else "_C_cuda", record, part)
    entry = record.get(part)
    if entry is None and part == "cpu" and record:  # the older record: {"built", "torch_version", "error"}
        entry = {"attempted": True, "built": record.get("built", False), "error": record.get("error")}
    if not record and path is None:
        return None, ("not installed (it is built at install only where torch is importable then, "
                      "i.e. with --no-build-isolation)") if part == "cpu" else "not installed"
    if not record:
        entry = {"attempted": True, "built": True}
    if record.get("torch_version", torch.__version__) != torch.__version__:
        return None, f"installed for torch {record['torch_version']} but torch {torch.__version__} is running"
    if sha is not None and record.get("sources_sha") != sha:
        # a record without a hash (an older setup, or a library copied in by hand) cannot vouch
        # for the sources: with the sources at hand, rebuild rather than run stale kernels
        return None, ("the sources changed since it was installed" if record.get("sources_sha")
                      else "its record does not say which sources it was built from")
    if not entry or not entry.get("attempted"):
        return None, (entry or {}).get("why") or "not built at install"
    if not entry.get("built"):
        return None, f"its build at install failed: {entry.get('error') or 'unknown error'}"
    if path is None:
        return None, "its library is missing from the package"
    return path, ""


def _import_cpu(path: str, installed: bool):
    if installed:
        from ... import _C
    else:  # a build folder's _C.so, imported under the package's name
        spec = importlib.util.spec_from_file_location("ddpm_fast._C", path)
        _C = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(_C)
        sys.modules["ddpm_fast._C"] = _C
    from . import _registration  # noqa: F401  (fake tensors and autograd)
    return _C


def _loud(msg: str) -> None:
    warnings.warn(f"ddpm_fast: {msg}", RuntimeWarning, stacklevel=4)


def _cuda_wanted_now() -> bool:
    return bool(torch.version.cuda) and not _build.env_flag("DDPM_FAST_SKIP_CUDA") and (
        torch.cuda.is_available() or _build.env_flag("DDPM_FAST_FORCE_CUDA")) and _build.find_nvcc() is not None


def _load() -> bool:
    """Find the kernels: the installed ones when built for this torch and these sources, else a
    build at first use (JIT) into the build folder, unless DDPM_FAST_NO_JIT=1."""
    if _state["loaded"] is not None:
        return bool(_state["loaded"])
    _state["loaded"] = False
    root = _build.source_root()
    sha = _build.sources_sha(root) if root else None
    record = _build.installed_record()
    no_jit = _build.env_flag("DDPM_FAST_NO_JIT")
    cpu_path, why = _installed(record, "cpu", sha)
    origin = {"cpu": "installed", "cpu_library": cpu_path, "installed_record": record or None}
    jit: dict = {}
    failed_at_install = why.startswith("its build at install failed") and record.get("sources_sha") == sha
    if cpu_path is None:
        if root is None:
            _state["reason"] = f"the native extension is {why}, and this install has no sources to build it from"
        elif no_jit:
            _state["reason"] = (f"the native extension is {why}; DDPM_FAST_NO_JIT=1 refuses the first-use build: "
                                + _GET_IT)
        elif failed_at_install:
            _state["reason"] = f"the native CPU kernels failed to build at install: {record['cpu'].get('error')}"
            _loud(_state["reason"])
        else:
            try:
                jit = _build.build(root)  # the CUDA part too where a CUDA device and nvcc are there
            except Exception as e:  # no compiler, no ninja, an unwritable cache: report, keep going
                jit = {"cpu": {"built": False, "error": f"{type(e).__name__}: {e}"}}
            entry = jit.get("cpu", {})
            if entry.get("built"):
                cpu_path = entry["path"]
                origin.update(cpu="jit", cpu_library=cpu_path, build_dir=jit.get("build_dir"),
                              installed_state=why)
            else:
                _state["reason"] = (f"the native extension is {why}, and its build at first use failed: "
                                    f"{entry.get('error')} (`python -m ddpm_fast._build --force` retries)")
                _loud(_state["reason"])
    if cpu_path is None:
        return False
    try:
        _C = _import_cpu(cpu_path, installed=origin["cpu"] == "installed")
        _state["info"] = dict(_C.build_info())
    except Exception as e:  # a broken or mismatched library: report, keep the other backends working
        _state["reason"] = (f"the native extension at {cpu_path} does not load ({type(e).__name__}: {e}); "
                            "a torch mismatch? " + _GET_IT)
        _loud(_state["reason"])
        return False
    built_for = _state["info"].get("torch_version")
    if built_for not in (None, "unknown", torch.__version__):
        _state["reason"] = (f"the native extension was built against torch {built_for} but torch "
                            f"{torch.__version__} is running: " + _GET_IT)
        return False
    _state["loaded"] = True
    _state["origin"] = origin
    _load_cuda(root, sha, record, jit, origin, no_jit)
    return True


def _load_cuda(root, sha, record, jit, origin, no_jit) -> None:
    """The CUDA part (``_C_cuda``, registered for the CUDA dispatch key): the installed one, the one
    the first-use build made, or a first-use build of it alone; a failure leaves the CPU part."""
    if origin["cpu"] == "installed":
        path, why = _installed(record, "cuda", sha)
        installed = record.get("cuda") or {}
        entry = {"built": True, "path": path, "archs": installed.get("archs")} if path else {
            "built": False, "why": why, "error": installed.get("error")}
        src = "installed"
        if path is None and root is not None and not no_jit and _cuda_wanted_now() \
                and not installed.get("attempted"):
            try:
                entry = _build.build(root, want_cuda=None, parts=("cuda",)).get("cuda", {})
            except Exception as e:
                entry = {"attempted": True, "built": False, "error": f"{type(e).__name__}: {e}"}
            src = "jit"
    else:
        entry, src = jit.get("cuda", {}), "jit"
    if entry.get("built"):
        try:
            torch.ops.load_library(entry["path"])
            _state["cuda"] = True
            origin.update(cuda=src, cuda_library=entry["path"], cuda_archs=entry.get("archs"))
            return
        except Exception as e:
            _state["cuda_reason"] = f"the native CUDA library {entry['path']} does not load: {type(e).__name__}: {e}"
    elif entry.get("error"):
        _state["cuda_reason"] = f"the native CUDA kernels failed to build: {entry['error']}"
    else:
        _state["cuda_reason"] = f"the native CUDA kernels are not built: {entry.get('why') or 'not requested'}"
    origin["cuda"] = None
    if torch.version.cuda and ("failed" in _state["cuda_reason"] or "does not load" in _state["cuda_reason"]):
        _loud(_state["cuda_reason"] + " (the CPU kernels work)")


def build_info() -> dict:
    """What the extension was built with (version, compiler, CPU instruction sets, CUDA archs) and
    where its libraries came from (``origin``: installed, or built at first use, and the paths)."""
    _load()
    if not _state["loaded"]:
        return {"available": False, "reason": _state["reason"]}
    info = dict(_state["info"])
    origin = dict(_state["origin"])
    origin.pop("installed_record", None)
    info.update(cuda=bool(_state["cuda"]), cuda_archs=origin.get("cuda_archs") or "", origin=origin)
    if not _state["cuda"]:
        info["cuda_reason"] = _state["cuda_reason"]
    return info


def availability() -> Dict[str, Tuple[bool, str]]:
    if not _load():
        return {"cpu": (False, str(_state["reason"])), "cuda": (False, str(_state["reason"]))}
    if not _state["cuda"]:
        cuda = (False, str(_state["cuda_reason"]))
    elif not torch.cuda.is_available():
        cuda = (False, "torch.cuda.is_available() is False")
    else:
        cuda = (True, "")
    return {"cpu": (True, ""), "cuda": cuda}


def supports_dtype(device_type: str, dtype: torch.dtype) -> bool:
    if dtype in (torch.float32, torch.float16, torch.bfloat16):
        return True
    return dtype == torch.float64 and device_type == "cpu"


# The op namespace (its attributes resolve once the extension has loaded; every function below
# runs only after availability() said it had). Options arrive validated (floats as floats).
_ops = torch.ops.ddpm_fast

_BelowAutograd = getattr(torch._C, "_AutoDispatchBelowAutograd", None)
_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", None)
try:
    from torch.autograd import forward_ad as _forward_ad
except ImportError:  # pragma: no cover
    _forward_ad = None


def _call(op, args, *inputs):
    """``op(*args)``. The steps and ``vlb_loss`` have Python autograd formulas
    (:mod:`ddpm_fast.backends.native._registration`), and torch.library's Python autograd layer runs on every call,
    even where no graph can be recorded, where it only redispatches (about as long as the kernel
    of a small step). Where no graph can be recorded (grad mode off, or no differentiable input
    requiring grad; no forward-AD level, no functorch transform, not while Dynamo traces) the op
    runs below autograd instead: the same kernel, the same outputs."""
    if (_BelowAutograd is not None and not (torch.is_grad_enabled() and any(x is not None and x.requires_grad
                                                                             for x in inputs))
            and not torch.compiler.is_compiling() and not _functorch_active() and _forward_ad._current_level < 0):
        with _BelowAutograd():
            return op(*args)
    return op(*args)


if _BelowAutograd is None or _functorch_active is None or _forward_ad is None \
        or not hasattr(_forward_ad, "_current_level") or not hasattr(torch, "compiler"):
    def _call(op, args, *inputs):  # noqa: F811  (a torch without these hooks: always the plain call)
        return op(*args)


def gaussian_noise(shape, seed, offset, dtype):
    return _ops.gaussian_noise(list(shape), seed, offset, dtype)


def q_sample(x0, t, alphas_cumprod, noise, seed, offset):
    return _ops.q_sample(x0, t, alphas_cumprod, noise, seed, offset)


_SCHEMA_ARGS: Dict[int, tuple] = {}


def _schema_args(opts) -> tuple:
    """``opts.schema_args()``, kept per options object (the dispatch layer reuses one StepOptions
    for the same options, and the generic getattr loop costs about a microsecond a step). Keyed by
    ``id``, the entry holding the object itself, so an id is not reused while its entry lives."""
    entry = _SCHEMA_ARGS.get(id(opts))
    if entry is None or entry[0] is not opts:
        if len(_SCHEMA_ARGS) >= 256:
            _SCHEMA_ARGS.clear()
        entry = _SCHEMA_ARGS[id(opts)] = (opts, opts.schema_args())
    return entry[1]


def _step(name, args, model_output, x_t, noise, opts, out):
    schema = opts.schema_args() if torch.compiler.is_compiling() else _schema_args(opts)
    return run_step(getattr(_ops, name), getattr(_ops, name + "_out"), args + schema,
                    model_output=model_output, x_t=x_t, return_x0=opts.return_x0, out=out,
                    call=lambda op, a: _call(op, a, model_output, x_t, noise))


def ddpm_step(model_output, t, prev_t, x_t, alphas_cumprod, noise, seed, offset, *, prediction_type, variance_type,
              opts, out):
    args = (model_output, t, prev_t, x_t, alphas_cumprod, noise, seed, offset, prediction_type, variance_type)
    return _step("ddpm_step", args, model_output, x_t, noise, opts, out)


def ddim_step(model_output, t, prev_t, x_t, alphas_cumprod, noise, seed, offset, *, eta, prediction_type,
              use_clipped_model_output, final_alpha_cumprod, opts, out):
    args = (model_output, t, prev_t, x_t, alphas_cumprod, noise, seed, offset, eta, prediction_type,
            use_clipped_model_output, final_alpha_cumprod)
    return _step("ddim_step", args, model_output, x_t, noise, opts, out)


def ddim_reverse_step(model_output, t, next_t, x_t, alphas_cumprod, *, prediction_type, use_clipped_model_output,
                      opts, out):
    args = (model_output, t, next_t, x_t, alphas_cumprod, prediction_type, use_clipped_model_output)
    return _step("ddim_reverse_step", args, model_output, x_t, None, opts, out)


def diffusion_loss(model_output, x0, t, alphas_cumprod, noise, seed, offset, *, target, snr_gamma):
    op = _ops.diffusion_loss
    if not torch.compiler.is_compiling():
        # the op's C++ entry point, which OpOverloadPacket.__call__ calls from a Python frame of its
        # own (~0.5 us of a call on small tensors); Dynamo traces the packet itself
        op = getattr(op, "_op", op)
    return op(model_output, x0, t, alphas_cumprod, noise, seed, offset, target, snr_gamma)


def vlb_loss(model_output, x0, x_t, t, alphas_cumprod, *, prediction_type, variance_type):
    return _call(_ops.vlb_loss, (model_output, x0, x_t, t, alphas_cumprod, prediction_type, variance_type),
                 model_output, x0, x_t)
