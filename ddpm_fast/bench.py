"""``python -m ddpm_fast bench``: every op, every provider, side by side in one run.

Providers of each op (``PROVIDERS``), measured on the same inputs in one process:

* library, fused: ``native`` and ``triton`` through the public ops with ``backend=...`` (skipped
  with the reason :func:`ddpm_fast.backends` gives when not available; Triton on CPU only runs in
  its interpreter, which is not worth timing);
* the specification: ``reference`` (the public ops with ``backend="reference"``, eager) and
  ``reference+compile`` (``torch.compile`` of the reference backend's function);
* what users write today: diffusers' ``DDPMScheduler.step`` / ``DDIMScheduler.step`` with their
  own ``randn``, ``torch.randn_like`` + diffusers' ``add_noise``, and the eager training step
  ``randn_like`` + ``add_noise`` + ``mse_loss`` + ``backward``.

Every row reports the median time, the achieved bandwidth of the op's *minimal* traffic
(``TRAFFIC``: what a single fused pass must read and write, noise made in registers) and its
percentage of the copy bandwidth measured in the same run (``dst.copy_(src)`` of a large tensor),
and the speed-up of the fastest library provider over it. The same provider table feeds the
pytest-benchmark suite in ``benchmarks/`` (:func:`make_runner`).

Timing: warm-up calls, then ``repeats`` samples of an inner loop calibrated to last at least
``min_sample_s`` each (``torch.cuda.synchronize`` after each sample on CUDA); the median of the
samples is reported. CPU figures drift between runs: compare ratios measured in one run.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .nvtx import nvtx_range
from .step_options import StepOptions

__all__ = [
    "OPS", "TRAFFIC", "PROVIDERS", "LIBRARY_PROVIDERS", "DEFAULT_SHAPES", "CUDA_LARGE_SHAPE", "QUICK_SHAPES",
    "DTYPES", "ProviderSkip", "make_runner", "time_fn", "time_group", "op_bytes", "measure_copy", "machine_info",
    "run_benchmarks", "check_targets", "TARGETS", "format_table", "plot", "main",
]

# --------------------------------------------------------------------------------------------
# the ops, their minimal traffic, their providers
# --------------------------------------------------------------------------------------------
OPS = ("gaussian_noise", "q_sample", "ddpm_step", "ddim_step", "train", "vlb_loss")


@dataclass(frozen=True)
class Traffic:
    """Minimal traffic of an op in units of one sample tensor (``numel * itemsize`` bytes)."""
    reads: int
    writes: int
    what: str


TRAFFIC: Dict[str, Traffic] = {
    "gaussian_noise": Traffic(0, 1, "write the noise"),
    "q_sample": Traffic(1, 1, "read x0; write x_t (noise made in registers)"),
    "ddpm_step": Traffic(2, 1, "read model_output, x_t; write x_prev"),
    "ddim_step": Traffic(2, 1, "read model_output, x_t; write x_prev"),
    "train": Traffic(5, 2, "q_sample: read x0, write x_t; loss fwd: read model_output, x0; "
                           "loss bwd: read model_output, x0, write grad (noise regenerated, never stored)"),
    "vlb_loss": Traffic(4, 0, "read model_output (2C channels), x0, x_t; write B losses"),
}
COPY_TRAFFIC = Traffic(1, 1, "dst.copy_(src): read src, write dst")

OP_DESCRIPTIONS = {
    "gaussian_noise": "REFERENCE §3 noise of the sample's shape",
    "q_sample": "x_t = sqrt(abar_t) x0 + sqrt(1-abar_t) eps, per-sample t, noise from (seed, offset)",
    "ddpm_step": "DDPM step t=500 -> 499, epsilon, fixed_small, clip_sample, noise from (seed, offset)",
    "ddim_step": "DDIM step t=480 -> 460, eta=0, epsilon, clip_sample",
    "train": "q_sample + simple epsilon loss forward + backward, per-sample t",
    "vlb_loss": "VLB term in bits/dim, learned_range, per-sample t, forward only",
}

LIBRARY_PROVIDERS = ("native", "triton")
_COMMON = ("native", "triton", "reference", "reference+compile")
PROVIDERS: Dict[str, Tuple[str, ...]] = {
    "gaussian_noise": _COMMON + ("torch.randn",),
    "q_sample": _COMMON + ("randn_like+add_noise",),
    "ddpm_step": _COMMON + ("diffusers DDPM.step",),
    "ddim_step": _COMMON + ("diffusers DDIM.step",),
    "train": _COMMON + ("randn+add_noise+mse+bwd",),
    "vlb_loss": _COMMON,
}
ALL_PROVIDERS = tuple(dict.fromkeys(p for ps in PROVIDERS.values() for p in ps))

DEFAULT_SHAPES: Tuple[Tuple[int, ...], ...] = ((10000, 2), (4, 4, 64, 64), (64, 3, 32, 32))
CUDA_LARGE_SHAPE: Tuple[int, ...] = (64, 4, 256, 256)        # 16.8M elements
QUICK_SHAPES: Tuple[Tuple[int, ...], ...] = ((10000, 2), (64, 3, 32, 32))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

SEED, OFFSET = 1234, 7
DDPM_T = 500
DDIM_STEPS, DDIM_INDEX = 50, 25


class ProviderSkip(Exception):
    """A provider that cannot run here; the message is the reason."""


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def shape_str(shape: Sequence[int]) -> str:
    return "x".join(str(s) for s in shape)


def parse_shape(text: str) -> Tuple[int, ...]:
    parts = [p for p in text.replace(",", "x").replace("(", "").replace(")", "").split("x") if p.strip()]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must look like 64x3x32x32 or 64,3,32,32, got {text!r}") from None
    if not shape or any(s <= 0 for s in shape):
        raise argparse.ArgumentTypeError(f"shape must be positive ints, got {text!r}")
    return shape


def op_bytes(op: str, shape: Sequence[int], dtype: torch.dtype) -> int:
    """Bytes a single fused pass of ``op`` must move for a sample of ``shape``/``dtype``."""
    tr = COPY_TRAFFIC if op == "copy" else TRAFFIC[op]
    n = math.prod(shape)
    return (tr.reads + tr.writes) * n * torch.empty((), dtype=dtype).element_size()


# --------------------------------------------------------------------------------------------
# inputs and runners
# --------------------------------------------------------------------------------------------
def _schedule():
    from .schedule import NoiseSchedule
    return NoiseSchedule.from_name("linear", 1000)


_INPUT_CACHE: Dict[tuple, dict] = {}


def _inputs(op: str, shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device) -> dict:
    """The inputs of one (op, shape, dtype), shared by its providers (the last set is cached:
    every provider of a group sees the same tensors, and 16M-element inputs are made once)."""
    key = (op, tuple(shape), dtype, str(device))
    if key not in _INPUT_CACHE:
        _INPUT_CACHE.clear()
        _INPUT_CACHE[key] = _make_inputs(op, shape, dtype, device)
    return dict(_INPUT_CACHE[key])


def _make_inputs(op: str, shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    B = shape[0]
    x = torch.randn(shape, generator=g).clamp_(-1, 1)
    d = {"x0": x.to(device, dtype)}
    d["x_t"] = torch.randn(shape, generator=g).to(device, dtype)
    if op == "vlb_loss":
        if len(shape) < 2:
            raise ProviderSkip("vlb_loss needs a channel dimension")
        mo_shape = (shape[0], 2 * shape[1]) + tuple(shape[2:])
        d["model_output"] = (0.5 * torch.randn(mo_shape, generator=g)).to(device, dtype)
    else:
        d["model_output"] = torch.randn(shape, generator=g).to(device, dtype)
    d["t_rows"] = torch.randint(0, 1000, (B,), generator=g).to(device)
    d["seed"] = torch.tensor(SEED, dtype=torch.int64, device=device)
    d["offset"] = torch.tensor(OFFSET, dtype=torch.int64, device=device)
    return d


def _library_backend(provider: str, device: torch.device, dtype: torch.dtype):
    from .backends import BackendUnavailable, resolve_backend
    if provider == "triton" and device.type == "cpu":
        raise ProviderSkip("Triton runs CPU tensors only in its interpreter (TRITON_INTERPRET=1): not timed")
    try:
        return resolve_backend(provider, device, dtype)
    except BackendUnavailable as e:
        raise ProviderSkip(str(e)) from None


def _reference_module():
    try:
        return importlib.import_module("ddpm_fast._reference_backend")
    except Exception as e:
        raise ProviderSkip(f"reference backend not importable: {type(e).__name__}: {e}") from None


def _diffusers():
    try:
        return importlib.import_module("diffusers")
    except Exception as e:
        raise ProviderSkip(f"diffusers not importable: {type(e).__name__}: {e}") from None


def _ddim_timesteps():
    """DDIM's (t, prev_t) as diffusers' leading spacing gives them for 50 of 1000 steps."""
    step = 1000 // DDIM_STEPS
    t = (DDIM_STEPS - 1 - DDIM_INDEX) * step
    return t, t - step


# the public defaults (StepOptions()), as the backend functions take them
_DDPM_OPTS = dict(prediction_type="epsilon", variance_type="fixed_small", opts=StepOptions(), out=None)
_DDIM_OPTS = dict(eta=0.0, prediction_type="epsilon", use_clipped_model_output=False, final_alpha_cumprod=1.0,
                  opts=StepOptions(), out=None)


def _public_runner(op: str, backend: str, d: dict, shape, dtype, device) -> Callable[[], object]:
    from . import ops
    sched = _schedule()
    x0, x_t, mo, t_rows, seed, offset = d["x0"], d["x_t"], d["model_output"], d["t_rows"], d["seed"], d["offset"]
    B = shape[0]
    if op == "gaussian_noise":
        return lambda: ops.gaussian_noise(shape, seed, offset, device=device, dtype=dtype, backend=backend)
    if op == "q_sample":
        return lambda: ops.q_sample(x0, t_rows, sched, seed=seed, offset=offset, backend=backend)
    if op == "ddpm_step":
        t = torch.full((B,), DDPM_T, dtype=torch.int64, device=device)
        return lambda: ops.ddpm_step(mo, t, x_t, sched, seed=seed, offset=offset, backend=backend)
    if op == "ddim_step":
        tv, pv = _ddim_timesteps()
        t = torch.full((B,), tv, dtype=torch.int64, device=device)
        pt = torch.full((B,), pv, dtype=torch.int64, device=device)
        return lambda: ops.ddim_step(mo, t, x_t, sched, prev_t=pt, backend=backend)
    if op == "train":
        mo = mo.detach().clone().requires_grad_(True)

        def train():
            with nvtx_range("train: q_sample"):
                xt = ops.q_sample(x0, t_rows, sched, seed=seed, offset=offset, backend=backend)
            with nvtx_range("train: loss fwd"):
                loss = ops.diffusion_loss(mo, x0, t_rows, sched, seed=seed, offset=offset, backend=backend)
            with nvtx_range("train: loss bwd"):
                loss.backward()
            mo.grad = None
            return xt
        return train
    if op == "vlb_loss":
        return lambda: ops.vlb_loss(mo, x0, x_t, t_rows, sched, backend=backend)
    raise ValueError(f"unknown op {op!r}")


def _compiled_reference_runner(op: str, d: dict, shape, dtype, device) -> Callable[[], object]:
    ref = _reference_module()
    sched = _schedule()
    table = sched.table(device)
    x0, x_t, mo, t_rows = d["x0"], d["x_t"], d["model_output"], d["t_rows"]
    seed, offset = d["seed"].reshape(1), d["offset"].reshape(1)
    B = shape[0]
    if op == "gaussian_noise":
        fn = torch.compile(lambda s, o: ref.gaussian_noise(shape, s, o, dtype), dynamic=False)
        args = (seed, offset)
    elif op == "q_sample":
        fn = torch.compile(lambda x, t: ref.q_sample(x, t, table, None, seed, offset), dynamic=False)
        args = (x0, t_rows)
    elif op == "ddpm_step":
        t = torch.full((B,), DDPM_T, dtype=torch.int64, device=device)
        fn = torch.compile(lambda m, tt, x: ref.ddpm_step(m, tt, tt - 1, x, table, None, seed, offset, **_DDPM_OPTS)[0],
                           dynamic=False)
        args = (mo, t, x_t)
    elif op == "ddim_step":
        tv, pv = _ddim_timesteps()
        t = torch.full((B,), tv, dtype=torch.int64, device=device)
        pt = torch.full((B,), pv, dtype=torch.int64, device=device)
        fn = torch.compile(lambda m, tt, ptt, x: ref.ddim_step(m, tt, ptt, x, table, None, None, None,
                                                               **_DDIM_OPTS)[0], dynamic=False)
        args = (mo, t, pt, x_t)
    elif op == "train":
        mo = mo.detach().clone().requires_grad_(True)

        def fwd(m, x, t):
            xt = ref.q_sample(x, t, table, None, seed, offset)
            loss = ref.diffusion_loss(m, x, t, table, None, seed, offset, target="epsilon", snr_gamma=None)
            return xt, loss.mean()
        compiled = torch.compile(fwd, dynamic=False)

        def train():
            with nvtx_range("train: q_sample + loss fwd (compiled)"):
                xt, loss = compiled(mo, x0, t_rows)
            with nvtx_range("train: loss bwd"):
                loss.backward()
            mo.grad = None
            return xt
        fn, args = train, ()
    elif op == "vlb_loss":
        fn = torch.compile(lambda m, x, xt, t: ref.vlb_loss(m, x, xt, t, table, prediction_type="epsilon",
                                                            variance_type="learned_range"), dynamic=False)
        args = (mo, x0, x_t, t_rows)
    else:
        raise ValueError(f"unknown op {op!r}")
    run = (lambda: fn(*args)) if args else fn
    try:
        run()  # compile now: a failure is a skip reason, and compile time stays out of the timing
    except ProviderSkip:
        raise
    except Exception as e:
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise ProviderSkip(f"torch.compile failed here: {type(e).__name__}: {msg}") from None
    return run


def _user_runner(op: str, provider: str, d: dict, shape, dtype, device) -> Callable[[], object]:
    x0, x_t, mo, t_rows = d["x0"], d["x_t"], d["model_output"], d["t_rows"]
    if provider == "torch.randn":
        return lambda: torch.randn(shape, device=device, dtype=dtype)
    diffusers = _diffusers()
    if provider == "randn_like+add_noise":
        sched = diffusers.DDPMScheduler()
        return lambda: sched.add_noise(x0, torch.randn_like(x0), t_rows)
    if provider == "diffusers DDPM.step":
        sched = diffusers.DDPMScheduler()
        return lambda: sched.step(mo, DDPM_T, x_t).prev_sample
    if provider == "diffusers DDIM.step":
        sched = diffusers.DDIMScheduler()
        sched.set_timesteps(DDIM_STEPS)
        tv = int(sched.timesteps[DDIM_INDEX])
        if (tv, tv - 1000 // DDIM_STEPS) != _ddim_timesteps():
            raise ProviderSkip(f"diffusers' DDIM timesteps changed ({tv}): not the step the library runs")
        return lambda: sched.step(mo, tv, x_t, eta=0.0).prev_sample
    if provider == "randn+add_noise+mse+bwd":
        import torch.nn.functional as F
        sched = diffusers.DDPMScheduler()
        mo = mo.detach().clone().requires_grad_(True)

        def train():
            with nvtx_range("train: q_sample"):
                noise = torch.randn_like(x0)
                xt = sched.add_noise(x0, noise, t_rows)
            with nvtx_range("train: loss fwd"):
                loss = F.mse_loss(mo.float(), noise.float(), reduction="mean")
            with nvtx_range("train: loss bwd"):
                loss.backward()
            mo.grad = None
            return xt
        return train
    raise ValueError(f"unknown provider {provider!r} for {op}")


def make_runner(op: str, provider: str, shape: Sequence[int], dtype: torch.dtype,
                device="cpu", *, sync: bool = False) -> Callable[[], object]:
    """A zero-argument callable running ``op`` once with ``provider`` on prepared inputs of
    ``shape``/``dtype``. Raises :class:`ProviderSkip` (with the reason) when the provider cannot
    run here. ``sync=True`` adds a CUDA synchronize after each call (for timers that do not)."""
    if op not in PROVIDERS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    if provider not in PROVIDERS[op]:
        raise ValueError(f"provider must be one of {PROVIDERS[op]} for {op}, got {provider!r}")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ProviderSkip("CUDA is not available to this torch")
    shape = tuple(int(s) for s in shape)
    d = _inputs(op, shape, dtype, device)
    if provider in ("native", "triton", "reference"):
        if provider == "reference":
            _reference_module()
        _library_backend(provider, device, dtype)
        run = _public_runner(op, provider, d, shape, dtype, device)
    elif provider == "reference+compile":
        run = _compiled_reference_runner(op, d, shape, dtype, device)
    else:
        run = _user_runner(op, provider, d, shape, dtype, device)
    if sync and device.type == "cuda":
        inner = run

        def run():
            out = inner()
            torch.cuda.synchronize()
            return out
    return run


# --------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device="cpu", *, warmup: int = 3, repeats: int = 15,
            min_sample_s: float = 2e-3, budget_s: float = 3.0) -> dict:
    """Median seconds per call of ``fn``: ``warmup`` calls, then ``repeats`` samples of an inner
    loop of calls lasting at least ``min_sample_s`` each (fewer samples when one would blow
    ``budget_s``). CUDA is synchronised around each sample."""
    device = torch.device(device)
    for _ in range(max(warmup, 1)):
        fn()
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    one = max(time.perf_counter() - t0, 1e-7)
    inner = max(1, int(math.ceil(min_sample_s / one)))
    repeats = max(3, min(repeats, int(budget_s / (one * inner)) or 3))
    samples = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        _sync(device)
        samples.append((time.perf_counter() - t0) / inner)
    return {"median_s": statistics.median(samples), "min_s": min(samples), "max_s": max(samples),
            "repeats": repeats, "inner": inner}


def time_group(fns: Dict[str, Callable[[], object]], device="cpu", *, warmup: int = 3, repeats: int = 15,
               min_sample_s: float = 2e-3, budget_s: float = 3.0) -> Dict[str, dict]:
    """Like :func:`time_fn` for several callables at once, sampled round-robin (one sample of
    each per round), so that a load spike from other processes hits every provider alike and the
    ratios between them stay meaningful on a shared machine."""
    device = torch.device(device)
    inner, one = {}, {}
    for name, fn in fns.items():
        # warm-up; the last call calibrates the inner loop. A slow provider stops warming up
        # once a quarter of the budget is spent (at least two calls: the first pays one-time costs).
        spent = 0.0
        for i in range(max(warmup, 2)):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            dt = time.perf_counter() - t0
            spent += dt
            if i >= 1 and spent > budget_s / 4:
                break
        one[name] = max(dt, 1e-7)
        inner[name] = max(1, int(math.ceil(min_sample_s / one[name])))
    per_round = sum(one[n] * inner[n] for n in fns) or 1e-7
    rounds = max(3, min(repeats, int(budget_s / per_round)))
    samples: Dict[str, List[float]] = {n: [] for n in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(inner[name]):
                fn()
            _sync(device)
            samples[name].append((time.perf_counter() - t0) / inner[name])
    return {n: {"median_s": statistics.median(v), "min_s": min(v), "max_s": max(v), "repeats": rounds,
                "inner": inner[n]} for n, v in samples.items()}


def measure_copy(device="cpu", *, numel: Optional[int] = None, dtype=torch.float32, warmup: int = 3,
                 repeats: int = 15, budget_s: float = 3.0) -> dict:
    """Copy bandwidth (read + write bytes per second) of ``dst.copy_(src)``; by default a tensor
    well past the last-level cache (64 MiB on CPU, 1 GiB on CUDA)."""
    device = torch.device(device)
    if numel is None:
        numel = (1 << 28) if device.type == "cuda" else (1 << 24)
    src = torch.randn(numel, dtype=torch.float32, device=device).to(dtype)
    dst = torch.empty_like(src)
    tm = time_fn(lambda: dst.copy_(src), device, warmup=warmup, repeats=repeats, budget_s=budget_s)
    nbytes = 2 * numel * src.element_size()
    return {"numel": numel, "dtype": dtype_name(dtype), "bytes": nbytes, "ms": tm["median_s"] * 1e3,
            "gbps": nbytes / tm["median_s"] / 1e9, "repeats": tm["repeats"]}


# --------------------------------------------------------------------------------------------
# machine info
# --------------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device) -> dict:
    device = torch.device(device)
    info = {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_model(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        info["load_average"] = list(os.getloadavg())  # other jobs on the machine while this ran
    except (AttributeError, OSError):
        pass
    try:
        from . import __version__
        info["ddpm_fast"] = __version__
    except Exception:
        pass
    for mod in ("diffusers", "triton"):
        try:
            info[mod] = importlib.import_module(mod).__version__
        except Exception:
            info[mod] = None
    try:
        from .backends import backends
        info["backends"] = backends()
    except Exception as e:
        info["backends"] = f"{type(e).__name__}: {e}"
    return info


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------
def run_benchmarks(ops: Sequence[str], shapes: Sequence[Tuple[int, ...]], dtypes: Sequence[torch.dtype],
                   device="cpu", *, providers: Optional[Sequence[str]] = None, compile: bool = True,
                   warmup: int = 3, repeats: int = 15, min_sample_s: float = 2e-3, budget_s: float = 3.0,
                   noisy_spread: float = 1.5, max_retries: int = 2,
                   log: Callable[[str], None] = lambda s: None) -> dict:
    """Measure every (op, shape, dtype, provider) plus the copy bandwidth; returns the JSON dict.
    The providers of one (op, shape, dtype) are sampled round-robin (:func:`time_group`); the
    copy bandwidth is measured before and after, and the larger is the ceiling."""
    device = torch.device(device)
    t_start = time.perf_counter()
    copy_before = measure_copy(device, warmup=warmup, repeats=repeats, budget_s=budget_s)
    log(f"copy bandwidth: {copy_before['gbps']:.1f} GB/s ({copy_before['bytes'] / 2**20:.0f} MiB moved by "
        "dst.copy_(src), read + write)")
    results: List[dict] = []
    for op in ops:
        for shape in shapes:
            for dtype in dtypes:
                group, fns = [], {}
                nbytes = op_bytes(op, shape, dtype)
                for provider in PROVIDERS[op]:
                    if providers is not None and provider not in providers:
                        continue
                    row = {"op": op, "shape": list(shape), "numel": math.prod(shape), "dtype": dtype_name(dtype),
                           "provider": provider,
                           "kind": "library" if provider in LIBRARY_PROVIDERS else "baseline", "bytes": nbytes}
                    group.append(row)
                    if provider == "reference+compile" and not compile:
                        row.update(status="skipped", reason="torch.compile not asked for (--compile)")
                        continue
                    try:
                        fns[provider] = make_runner(op, provider, shape, dtype, device)
                    except ProviderSkip as e:
                        row.update(status="skipped", reason=str(e))
                    except Exception as e:  # a provider failing must not lose the rest of the run
                        row.update(status="error", reason=f"{type(e).__name__}: {str(e)[:300]}")
                # a provider that raises while timed is dropped from the group, the rest re-timed
                while fns:
                    try:
                        times = time_group(fns, device, warmup=warmup, repeats=repeats,
                                           min_sample_s=min_sample_s, budget_s=budget_s)
                        break
                    except Exception as e:
                        bad = _first_failing(fns)
                        for row in group:
                            if row["provider"] == bad:
                                row.update(status="error", reason=f"{type(e).__name__}: {str(e)[:300]}")
                        fns.pop(bad)
                else:
                    times = {}
                # Another job's burst can cover a whole group: when the median of some provider
                # sits far above its fastest sample, time the group again (twice at most) and
                # keep the steadier measurement.
                tries = 1
                while times and fns and tries < 1 + max_retries and _spread(times) > noisy_spread:
                    log(f"  (noisy: median/min {_spread(times):.1f}, timing the group again)")
                    again = time_group(fns, device, warmup=1, repeats=repeats, min_sample_s=min_sample_s,
                                       budget_s=budget_s)
                    tries += 1
                    if _spread(again) < _spread(times):
                        times = again
                fns.clear()
                for row in group:
                    tm = times.get(row["provider"])
                    if tm is None:
                        continue
                    s = tm["median_s"]
                    row.update(status="ok", ms=s * 1e3, ms_min=tm["min_s"] * 1e3, ms_max=tm["max_s"] * 1e3,
                               repeats=tm["repeats"], inner=tm["inner"], gbps=nbytes / s / 1e9, tries=tries,
                               noisy=tm["median_s"] > noisy_spread * tm["min_s"])
                for row in group:
                    log(f"  {op:15s} {shape_str(shape):14s} {dtype_name(dtype):5s} {row['provider']:24s} "
                        + (f"{row['ms']:9.4f} ms" if row["status"] == "ok" else f"{row['status']}: {row['reason']}"))
                _rank(group)
                results.extend(group)
    copy_after = measure_copy(device, warmup=warmup, repeats=repeats, budget_s=budget_s)
    copy = dict(max((copy_before, copy_after), key=lambda c: c["gbps"]))
    copy["gbps_before"], copy["gbps_after"] = copy_before["gbps"], copy_after["gbps"]
    log(f"copy bandwidth after: {copy_after['gbps']:.1f} GB/s; ceiling used: {copy['gbps']:.1f} GB/s")
    for row in results:
        if row["status"] == "ok":
            row["pct_copy"] = 100.0 * row["gbps"] / copy["gbps"]
    return {
        "schema": 1,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(device),
        "settings": {"warmup": warmup, "repeats": repeats, "min_sample_s": min_sample_s, "budget_s": budget_s,
                     "compile": compile, "seed": SEED, "offset": OFFSET, "timing": "median of round-robin samples",
                     "noisy_spread": noisy_spread, "max_retries": max_retries},
        "copy": copy,
        "traffic": {op: {"reads": tr.reads, "writes": tr.writes, "what": tr.what} for op, tr in TRAFFIC.items()},
        "ops": {op: OP_DESCRIPTIONS[op] for op in ops},
        "results": results,
        "elapsed_s": time.perf_counter() - t_start,
    }


def _spread(times: Dict[str, dict]) -> float:
    return max(t["median_s"] / t["min_s"] for t in times.values())


def _first_failing(fns: Dict[str, Callable[[], object]]) -> str:
    for name, fn in fns.items():
        try:
            fn()
        except Exception:
            return name
    return next(iter(fns))


def _rank(group: List[dict]) -> None:
    """Mark the fastest library provider of a group (``best``) and each row's ``speedup``: its
    time over the best's. Without a fused provider, the eager reference stands in."""
    ok = [r for r in group if r["status"] == "ok"]
    lib = [r for r in ok if r["kind"] == "library"]
    pool = lib or [r for r in ok if r["provider"] == "reference"]
    if not pool:
        return
    best = min(pool, key=lambda r: r["ms"])
    for r in ok:
        r["best"] = best["provider"]
        r["speedup"] = r["ms"] / best["ms"]


# (device type, op, shape or "large", dtype, what, threshold): the issues' targets, checked on
# whatever this run measured. "x" targets: the baseline's time over the best library provider's;
# "%copy" targets: the best library provider's share of the copy bandwidth.
TARGETS = (
    ("cpu", "ddpm_step", (64, 3, 32, 32), "fp32", "x diffusers DDPM.step", 10.0),
    ("cpu", "q_sample", (64, 3, 32, 32), "fp32", "x randn_like+add_noise", 3.0),
    ("cpu", "train", (64, 3, 32, 32), "fp32", "x randn+add_noise+mse+bwd", 2.0),
    ("cuda", "q_sample", "large", "fp32", "%copy", 85.0),
    ("cuda", "ddpm_step", "large", "fp32", "%copy", 85.0),
    ("cuda", "q_sample", "large", "bf16", "%copy", 75.0),
    ("cuda", "ddpm_step", "large", "bf16", "%copy", 75.0),
    ("cuda", "ddpm_step", (4, 4, 64, 64), "fp32", "x diffusers DDPM.step", 10.0),
)


def check_targets(data: dict) -> List[dict]:
    """The targets of the issues that this run measured, with the figure and whether it is met."""
    out = []
    dev = data["machine"]["device"]
    rows = [r for r in data["results"] if r["status"] == "ok"]
    for tdev, op, shape, dt, what, threshold in TARGETS:
        if tdev != dev:
            continue
        group = [r for r in rows if r["op"] == op and r["dtype"] == dt
                 and (r["numel"] >= 16 * 2**20 if shape == "large" else tuple(r["shape"]) == shape)]
        lib = [r for r in group if r["kind"] == "library"]
        if not lib:
            continue
        best = min(lib, key=lambda r: r["ms"])
        shape_txt = shape_str(best["shape"])
        if what == "%copy":
            value = best["pct_copy"]
            text = f"{op} {shape_txt} {dt}: {best['provider']} at {value:.1f}% of copy (target >= {threshold:.0f}%)"
        else:
            base = [r for r in group if r["provider"] == what[2:] and r["shape"] == best["shape"]]
            if not base:
                continue
            value = base[0]["ms"] / best["ms"]
            text = (f"{op} {shape_txt} {dt}: {best['provider']} {value:.2f}x faster than {what[2:]} "
                    f"(target >= {threshold:.0f}x)")
        out.append({"op": op, "shape": best["shape"], "dtype": dt, "provider": best["provider"], "what": what,
                    "value": value, "target": threshold, "met": value >= threshold, "text": text})
    return out


def format_table(data: dict) -> str:
    copy = data["copy"]
    m = data["machine"]
    load = m.get("load_average")
    load_txt = f", load average {load[0]:.1f} (other jobs)" if load else ""
    lines = [f"ddpm_fast bench: {m['device']} ({m['device_name']}), torch {m['torch']}, {m['threads']} threads"
             f"{load_txt}",
             f"copy bandwidth {copy['gbps']:.2f} GB/s (dst.copy_(src), {copy['bytes'] / 2**20:.0f} MiB moved; "
             f"{copy.get('gbps_before', copy['gbps']):.1f} before, {copy.get('gbps_after', copy['gbps']):.1f} after "
             "the run, the larger is the ceiling)",
             "GB/s = the op's minimal traffic (bench.TRAFFIC) / median time; providers sampled round-robin",
             "speedup = this provider's time / the fastest library provider's (native, triton; the eager "
             "reference when neither runs)",
             "~ = noisy: the median is over 1.5x the fastest sample even after timing the group again "
             "(other jobs were running)", ""]
    hdr = f"{'op':15s} {'shape':12s} {'dtype':5s} {'provider':24s} {'ms':>9s} {'GB/s':>8s} {'%copy':>7s} {'speedup':>8s}"
    lines += [hdr, "-" * len(hdr)]
    prev = None
    for r in data["results"]:
        key = (r["op"], tuple(r["shape"]), r["dtype"])
        head = (f"{r['op']:15s} {shape_str(r['shape']):12s} {r['dtype']:5s}" if key != prev else " " * 34)
        if prev is not None and key != prev:
            lines.append("")
        prev = key
        if r["status"] == "ok":
            sp = "best" if r.get("best") == r["provider"] else f"{r['speedup']:.2f}x" if "speedup" in r else ""
            mark = "  ~" if r.get("noisy") else ""
            lines.append(f"{head} {r['provider']:24s} {r['ms']:9.4f} {r['gbps']:8.2f} {r['pct_copy']:6.1f}% {sp:>8s}"
                         f"{mark}")
        else:
            lines.append(f"{head} {r['provider']:24s} {r['status']}: {r['reason'][:90]}")
    targets = data.get("targets")
    if targets is None:
        targets = check_targets(data)
    if targets:
        lines += ["", "targets (one run; CPU ratios drift with the machine's load):"]
        lines += [f"  [{'met' if t['met'] else 'NOT met'}] {t['text']}" for t in targets]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# the plot
# --------------------------------------------------------------------------------------------
def plot(data: dict, path: str) -> str:
    """Achieved GB/s per op and provider across sizes (log-log), one panel per op, the copy
    bandwidth of the same run as the ceiling. One legend for the figure: colour = provider,
    line style = dtype. Writes a PNG to ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    rows = [r for r in data["results"] if r.get("status") == "ok"]
    ops = [op for op in OPS if any(r["op"] == op for r in rows)] or ["(no results)"]
    ncols = min(3, len(ops))
    nrows = int(math.ceil(len(ops) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.8 * nrows + 1.2), squeeze=False)
    copy_gbps = data["copy"]["gbps"]
    providers = [p for p in ALL_PROVIDERS if any(r["provider"] == p for r in rows)]
    providers += [p for p in dict.fromkeys(r["provider"] for r in rows) if p not in providers]
    colors = {p: plt.cm.tab10(i % 10) for i, p in enumerate(providers)}
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    styles = dict(zip(dtypes, [("-", "o"), ("--", "s"), (":", "^"), ("-.", "d")]))
    for ax, op in zip(axes.flat, ops):
        for p in providers:
            for dt in dtypes:
                pts = sorted((r["numel"], r["gbps"]) for r in rows if r["op"] == op and r["provider"] == p
                             and r["dtype"] == dt)
                if not pts:
                    continue
                ls, mk = styles[dt]
                ax.plot([x for x, _ in pts], [y for _, y in pts], linestyle=ls, marker=mk, color=colors[p])
        ax.axhline(copy_gbps, color="black", linestyle="--", linewidth=1.2)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"{op}: {TRAFFIC[op].reads + TRAFFIC[op].writes} tensors moved" if op in TRAFFIC else op,
                     fontsize=10)
        ax.set_xlabel("elements per sample tensor")
        ax.set_ylabel("GB/s (minimal traffic)")
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(ops):]:
        ax.axis("off")
    handles = [Line2D([], [], color=colors[p], linewidth=2.5, label=p) for p in providers]
    if len(dtypes) > 1:
        handles += [Line2D([], [], color="gray", linestyle=styles[d][0], marker=styles[d][1], label=d) for d in dtypes]
    handles.append(Line2D([], [], color="black", linestyle="--", label=f"copy bandwidth {copy_gbps:.1f} GB/s"))
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8, frameon=False)
    m = data.get("machine", {})
    load = m.get("load_average")
    load_txt = f", load {load[0]:.1f}" if load else ""
    fig.suptitle(f"ddpm_fast bench: {m.get('device', '?')} {m.get('device_name', '')}, torch {m.get('torch', '?')}, "
                 f"{m.get('threads', '?')} threads{load_txt} ({data.get('created', '')})", fontsize=10)
    fig.tight_layout(rect=(0, 0.07 if nrows > 1 else 0.12, 1, 0.97))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ddpm_fast bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="device to measure (default: cuda when available, else cpu)")
    p.add_argument("--quick", action="store_true",
                   help="a small set, fast: shapes 10000x2 and 64x3x32x32, fp32, no torch.compile, few repeats")
    p.add_argument("--ops", nargs="+", choices=OPS, default=None, metavar="OP",
                   help=f"ops to measure, of: {', '.join(OPS)} (default: all)")
    p.add_argument("--dtype", nargs="+", choices=tuple(DTYPES), default=None, metavar="DTYPE",
                   help="dtypes, of: fp32 bf16 fp16 fp64 (default: fp32 bf16; --quick: fp32)")
    p.add_argument("--shapes", nargs="+", type=parse_shape, default=None, metavar="SHAPE",
                   help="sample shapes like 64x3x32x32 (default: 10000x2 4x4x64x64 64x3x32x32, plus "
                        f"{shape_str(CUDA_LARGE_SHAPE)} on CUDA)")
    p.add_argument("--providers", nargs="+", choices=ALL_PROVIDERS, default=None, metavar="PROVIDER",
                   help=f"only these providers, of: {', '.join(repr(p) for p in ALL_PROVIDERS)}")
    p.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="include reference+compile (default on, off with --quick)")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--repeats", type=int, default=None, help="timed samples per case (default 25; --quick 15)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up calls per case (default 3; --quick 2)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: the cores this process may use)")
    p.add_argument("--json", metavar="PATH", help="write every figure and the machine info as JSON")
    p.add_argument("--plot", metavar="PNG", help="draw GB/s per op and provider across sizes (matplotlib)")
    p.add_argument("--from-json", metavar="PATH", help="with --plot: plot this JSON instead of measuring")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.from_json:
        if not args.plot:
            print("--from-json needs --plot PNG", file=sys.stderr)
            return 2
        with open(args.from_json) as f:
            data = json.load(f)
        print(f"wrote {plot(data, args.plot)}")
        return 0

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: this torch has no CUDA device", file=sys.stderr)
        return 2
    threads = args.threads
    if threads is None:
        try:
            threads = len(os.sched_getaffinity(0))
        except AttributeError:
            threads = os.cpu_count() or 1
    torch.set_num_threads(max(1, threads))
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = 0.0
    if device.type == "cpu" and threads > 1 and load > (os.cpu_count() or 1) - 0.5:
        print(f"warning: load average {load:.1f} on {os.cpu_count()} cores: with {threads} threads a parallel "
              "region can wait a whole time slice for a descheduled thread; --threads 1 gives steadier ratios",
              file=sys.stderr)

    quick = args.quick
    ops = args.ops or list(OPS)
    dtypes = [DTYPES[d] for d in (args.dtype or (["fp32"] if quick else ["fp32", "bf16"]))]
    if args.shapes:
        shapes = args.shapes
    elif quick:
        shapes = list(QUICK_SHAPES)
    else:
        shapes = list(DEFAULT_SHAPES) + ([CUDA_LARGE_SHAPE] if device.type == "cuda" else [])
    compile_ = (not quick) if args.compile is None else args.compile
    # Short samples on CPU: a parallel region on a loaded machine now and then waits a whole
    # time slice for a descheduled thread, and the median is robust to that only when most samples
    # hold no such call. On CUDA a sample spans enough launches to hide the synchronize.
    repeats = args.repeats or (15 if quick else 25)
    min_sample_s = 2e-3 if device.type == "cuda" else 2e-4
    warmup = args.warmup if args.warmup is not None else (2 if quick else 3)
    budget_s = 1.5 if quick else 3.0

    def log(s):
        print(s, file=sys.stderr, flush=True)

    data = run_benchmarks(ops, shapes, dtypes, device, providers=args.providers, compile=compile_, warmup=warmup,
                          repeats=repeats, min_sample_s=min_sample_s, budget_s=budget_s,
                          max_retries=1 if quick else 2, log=log)
    data["settings"]["quick"] = quick
    data["argv"] = list(argv if argv is not None else sys.argv[1:])
    data["targets"] = check_targets(data)
    print(format_table(data))
    print(f"\n({data['elapsed_s']:.1f} s)")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(data, f, indent=1)
        print(f"wrote {args.json}")
    if args.plot:
        print(f"wrote {plot(data, args.plot)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
