"""The run: every (op, shape, dtype) case of the specs, its providers and a same-size copy timed
round-robin (:func:`~.timing.time_group`), into one JSON-able dict."""
from __future__ import annotations

import datetime as _dt
import importlib
import math
import os
import platform
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .report import NOISY_SPREAD, rank
from .specs import OP_DESCRIPTIONS, SPECS, TRAFFIC, ProviderSkip, dtype_name, make_runner, op_bytes, shape_str
from .timing import clock_for, copy_runner, measure_copy, quantile, time_group

COPY = "__copy__"  # the same-size copy timed in every case's rounds


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> List[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [f for f in ("avx2", "fma", "avx512f", "avx512bw", "avx512dq", "avx512vl") if f in have]
    except OSError:
        pass
    return []


def machine_info(device) -> dict:
    device = torch.device(device)
    info = {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_model(),
        "cpu_model": _cpu_model(),
        "cpu_flags": _cpu_flags(),
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
        from ... import __version__
        info["ddpm_fast"] = __version__
    except Exception:
        pass
    for mod in ("diffusers", "triton"):
        try:
            info[mod] = importlib.import_module(mod).__version__
        except Exception:
            info[mod] = None
    try:
        from ...backends import backends
        info["backends"] = backends()
    except Exception as e:
        info["backends"] = f"{type(e).__name__}: {e}"
    try:
        from ...backends.native import build_info
        info["native_build"] = build_info()
    except Exception as e:
        info["native_build"] = f"{type(e).__name__}: {e}"
    return info


def _spread(tm: dict) -> float:
    return (tm["p75_s"] - tm["p25_s"]) / tm["median_s"] if tm["median_s"] > 0 else float("inf")


def _worst_spread(times: Dict[str, dict]) -> float:
    return max(_spread(t) for t in times.values())


def _first_failing(fns: Dict[str, Callable[[], object]]) -> str:
    for name, fn in fns.items():
        try:
            fn()
        except Exception:
            return name
    return next(iter(fns))


def _time_case(fns, device, *, log, max_retries: int, **kw) -> Tuple[Dict[str, dict], int, Dict[str, str]]:
    """Time one case; a provider that raises while timed is dropped (its error returned) and the rest
    timed again; a case noisier than NOISY_SPREAD is timed again (max_retries) and the steadier kept."""
    errors: Dict[str, str] = {}
    times: Dict[str, dict] = {}
    while any(name != COPY for name in fns):
        try:
            times = time_group(fns, device, **kw)
            break
        except Exception as e:
            bad = _first_failing(fns)
            errors[bad] = f"{type(e).__name__}: {str(e)[:300]}"
            fns.pop(bad)
    tries = 1
    while times and tries < 1 + max_retries and _worst_spread(times) > NOISY_SPREAD:
        log(f"  (noisy: p25-p75 spans {100 * _worst_spread(times):.0f}% of a median, timing the case again)")
        again = time_group(fns, device, **dict(kw, warmup=1))
        tries += 1
        if _worst_spread(again) < _worst_spread(times):
            times = again
    return times, tries, errors


def run_benchmarks(ops: Sequence[str], shapes: Sequence[Tuple[int, ...]], dtypes: Sequence[torch.dtype],
                   device="cpu", *, providers: Optional[Sequence[str]] = None, compile: bool = True,
                   warmup: int = 3, repeats: int = 30, min_sample_s: float = 2e-3, budget_s: float = 3.0,
                   max_retries: int = 1, quick: bool = False, explicit_shapes: bool = False, best_of: int = 1,
                   log: Callable[[str], None] = lambda s: None) -> dict:
    """Measure every (op, shape, dtype, provider) plus a same-size copy per case and the large copy
    bandwidth; returns the JSON dict. ``shapes`` apply to every op unless an op has its own
    (training_loss: the demo's 2-D batch) and the shapes were not asked for (``explicit_shapes``)."""
    from .specs import shapes_for
    device = torch.device(device)
    t_start = time.perf_counter()
    copy_before = measure_copy(device, warmup=warmup, repeats=15, budget_s=budget_s)
    log(f"copy bandwidth: {copy_before['gbps']:.1f} GB/s ({copy_before['bytes'] / 2**20:.0f} MiB moved by "
        "dst.copy_(src), read + write)")
    results: List[dict] = []
    clock = clock_for(device, torch.get_num_threads())
    timing_kw = dict(warmup=warmup, repeats=repeats, min_sample_s=min_sample_s, budget_s=budget_s, best_of=best_of,
                     clock=clock)
    for op in ops:
        spec = SPECS[op]
        for shape in shapes_for(op, shapes, quick=quick, explicit=explicit_shapes):
            for dtype in dtypes:
                group, fns = [], {}
                nbytes = op_bytes(op, shape, dtype)
                for provider in spec.providers:
                    if providers is not None and provider not in providers:
                        continue
                    row = {"op": op, "shape": list(shape), "numel": math.prod(shape), "dtype": dtype_name(dtype),
                           "provider": provider, "kind": spec.kind(provider), "bytes": nbytes}
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
                if fns:
                    fns[COPY] = copy_runner(shape, dtype, device)
                times, tries, errors = _time_case(fns, device, log=log, max_retries=max_retries, **timing_kw)
                copy_tm = times.get(COPY)
                copy_bytes = op_bytes("copy", shape, dtype)
                for row in group:
                    if row["provider"] in errors:
                        row.update(status="error", reason=errors[row["provider"]])
                    tm = times.get(row["provider"])
                    if tm is None:
                        continue
                    s = tm["median_s"]
                    row.update(status="ok", ms=s * 1e3, ms_p25=tm["p25_s"] * 1e3, ms_p75=tm["p75_s"] * 1e3,
                               ms_min=tm["min_s"] * 1e3, ms_max=tm["max_s"] * 1e3, repeats=tm["repeats"],
                               inner=tm["inner"], gbps=nbytes / s / 1e9, tries=tries,
                               noisy=_spread(tm) > NOISY_SPREAD, samples_ms=[x * 1e3 for x in tm["samples"]])
                    if copy_tm is not None:
                        pct = [100.0 * (nbytes / a) / (copy_bytes / c)
                               for a, c in zip(tm["samples"], copy_tm["samples"])]
                        row.update(pct_copy=100.0 * (nbytes / s) / (copy_bytes / copy_tm["median_s"]),
                                   pct_copy_p25=quantile(pct, 0.25), pct_copy_p75=quantile(pct, 0.75),
                                   copy_ms=copy_tm["median_s"] * 1e3)
                for row in group:
                    log(f"  {op:14s} {shape_str(shape):12s} {dtype_name(dtype):5s} {row['provider']:24s} "
                        + (f"{row['ms']:9.4f} ms" if row["status"] == "ok" else f"{row['status']}: {row['reason']}"))
                rank(group)
                results.extend(group)
    copy_after = measure_copy(device, warmup=warmup, repeats=15, budget_s=budget_s)
    copy = dict(max((copy_before, copy_after), key=lambda c: c["gbps"]))
    copy["gbps_before"], copy["gbps_after"] = copy_before["gbps"], copy_after["gbps"]
    log(f"copy bandwidth after: {copy_after['gbps']:.1f} GB/s")
    return {
        "schema": 2,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(device),
        "settings": {"warmup": warmup, "repeats": repeats, "min_sample_s": min_sample_s, "budget_s": budget_s,
                     "best_of": best_of, "clock": clock.__name__, "compile": compile, "quick": quick,
                     "timing": "round-robin rounds, order rotating; a sample = the fastest of best_of timings; "
                     "median per call, p25-p75; ratios paired within a round", "noisy_spread": NOISY_SPREAD,
                     "max_retries": max_retries},
        "copy": copy,
        "traffic": {op: {"reads": tr.reads, "writes": tr.writes, "what": tr.what} for op, tr in TRAFFIC.items()},
        "ops": {op: OP_DESCRIPTIONS[op] for op in ops},
        "results": results,
        "elapsed_s": time.perf_counter() - t_start,
    }
