"""Timing: round-robin samples of several callables, and the copy bandwidth.

One function times everything (:func:`time_group`; :func:`time_fn` is a group of one). A *round*
takes one sample of every callable, in an order that rotates from round to round (so no provider
always runs first, after the others have warmed or polluted the caches); a *sample* is the
fastest of ``best_of`` back-to-back timings of an inner loop of calls lasting at least
``min_sample_s``. On a machine shared with other jobs, a CPU case at one thread reads the thread's
CPU time, which another job's time slice does not advance; what remains (caches refilled after a
descheduling, a wall clock where several threads run) lands on one timing, and the fastest of three
keeps it out; a longer burst of load
lands on the samples of one round, all providers alike, so the ratio of two providers within a
round (:func:`paired_ratios`) stays meaningful where their absolute times do not, and the spread
of those ratios over the rounds says how far the run can be trusted.
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def quantile(values: Sequence[float], q: float) -> float:
    """The q-quantile with linear interpolation (as numpy's default)."""
    v = sorted(values)
    if not v:
        return float("nan")
    pos = q * (len(v) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def summary(samples: Sequence[float]) -> dict:
    """Median, quartiles, min and max of per-call times (seconds)."""
    return {"median_s": statistics.median(samples), "p25_s": quantile(samples, 0.25),
            "p75_s": quantile(samples, 0.75), "min_s": min(samples), "max_s": max(samples)}


def clock_for(device, threads: int) -> Callable[[], float]:
    """The clock of a case: on a CPU with one thread the calling thread's CPU time
    (``time.thread_time``: time slices given to other jobs do not count, the work of this one does);
    with more threads, or on a GPU, wall time (``time.perf_counter``)."""
    return time.thread_time if torch.device(device).type == "cpu" and threads == 1 else time.perf_counter


def time_group(fns: Dict[str, Callable[[], object]], device="cpu", *, warmup: int = 3, repeats: int = 15,
               min_sample_s: float = 2e-3, budget_s: float = 3.0, min_rounds: int = 5,
               best_of: int = 1, clock: Callable[[], float] = time.perf_counter) -> Dict[str, dict]:
    """Seconds per call of each callable, sampled round-robin: ``warmup`` calls each (a slow one
    stops after a quarter of the budget, at least two calls: the first pays one-time costs), then
    up to ``repeats`` rounds (fewer when a round would blow ``budget_s``, at least ``min_rounds``)
    of one sample of every callable, the order rotating by one each round; a sample is the fastest
    of ``best_of`` timings of ``inner`` calls, read on ``clock`` (:func:`clock_for`; the warm-up
    calibration uses wall time). CUDA is synchronised around each timing.

    Returns per name: ``samples`` (seconds per call, one per round, in round order), ``median_s``,
    ``p25_s``, ``p75_s``, ``min_s``, ``max_s``, ``repeats`` (rounds) and ``inner`` (calls per sample)."""
    device = torch.device(device)
    names = list(fns)
    inner, one = {}, {}
    for name in names:
        fn = fns[name]
        spent, dt = 0.0, 0.0
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
    best_of = max(1, int(best_of))
    per_round = best_of * sum(one[n] * inner[n] for n in names) or 1e-7
    rounds = max(min_rounds, min(repeats, int(budget_s / per_round)))
    samples: Dict[str, List[float]] = {n: [] for n in names}
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            fn, m = fns[name], inner[name]
            fastest = float("inf")
            for _ in range(best_of):
                _sync(device)
                t0 = clock()
                for _ in range(m):
                    fn()
                _sync(device)
                fastest = min(fastest, clock() - t0)
            samples[name].append(fastest / m)
    return {n: {"samples": v, **summary(v), "repeats": rounds, "inner": inner[n]} for n, v in samples.items()}


def time_fn(fn: Callable[[], object], device="cpu", *, warmup: int = 3, repeats: int = 15,
            min_sample_s: float = 2e-3, budget_s: float = 3.0) -> dict:
    """:func:`time_group` of one callable."""
    return time_group({"fn": fn}, device, warmup=warmup, repeats=repeats, min_sample_s=min_sample_s,
                      budget_s=budget_s, min_rounds=3)["fn"]


def paired_ratios(numerator: dict, denominator: dict) -> List[float]:
    """Per round, numerator's time over denominator's (two entries of one :func:`time_group`)."""
    return [a / b for a, b in zip(numerator["samples"], denominator["samples"]) if b > 0]


def ratio_summary(ratios: Sequence[float]) -> Optional[dict]:
    """Median and quartiles of paired ratios, or None without any."""
    if not ratios:
        return None
    return {"median": statistics.median(ratios), "p25": quantile(ratios, 0.25), "p75": quantile(ratios, 0.75),
            "rounds": len(ratios)}


def pin_malloc() -> str:
    """Pin glibc's mmap and trim thresholds (``mallopt``) so that tensors of up to 32 MiB come from a
    heap that stays mapped, as in a long-running training or sampling process. Left dynamic, the
    thresholds follow the process's allocation history, and a provider that allocates a few
    sample-size temporaries a call pays page faults or not depending on what ran before it (seen:
    diffusers' step at 64x3x32x32 2.05 ms in one run, 3.26 ms in another of the same code).
    Returns what was done, for the JSON."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        ok = libc.mallopt(M_MMAP_THRESHOLD, 32 << 20) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1
    except (OSError, AttributeError):
        ok = False
    return ("glibc mmap threshold 32 MiB, trim threshold 1 GiB (mallopt)" if ok
            else "allocator thresholds left as they were (no glibc mallopt)")


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
    return {"numel": numel, "dtype": str(dtype).replace("torch.", ""), "bytes": nbytes, "ms": tm["median_s"] * 1e3,
            "gbps": nbytes / tm["median_s"] / 1e9, "repeats": tm["repeats"]}


def copy_runner(shape, dtype: torch.dtype, device) -> Callable[[], object]:
    """``dst.copy_(src)`` of one sample tensor: the same-size copy timed beside each case (the
    ceiling its %copy is read against: in cache where the op's tensors are)."""
    src = torch.zeros(tuple(shape), dtype=dtype, device=device)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)
