"""Python overhead of the public ops: each public op against its registered op called directly.

The public op (``ddpm_fast.q_sample`` ...) validates, normalises (an int ``t`` to a ``(B,)`` int64
tensor, ``seed``/``offset`` to int64 tensors, the schedule to its float64 table), picks a backend
and calls ``torch.ops.ddpm_fast.<op>``. The difference between the two, on 4-element fp32 tensors
(where the kernel itself costs almost nothing), is that overhead. Each public call takes a new
``t`` and ``offset`` (cycling through 50 values, as a sampling loop does); the direct call gets
tensors built beforehand. One thread; time is the calling thread's CPU time
(``time.thread_time``), which time slices given to other processes do not inflate, and the
variants are sampled round-robin; an overhead is the median over rounds of the difference.

Columns: ``public``; ``direct``, the registered op as users call it (``torch.ops.ddpm_fast.<op>``,
through its autograd kernel); ``below``, the same call below autograd
(``torch._C._AutoDispatchBelowAutograd``: the kernel alone). The steps and ``vlb_loss`` have Python
autograd formulas, whose torch.library layer costs about as much as a small step; the public ops
skip it when no graph can be recorded, so for them ``public - direct`` can be negative and
``public - below`` is the Python dispatch layer's own cost.

    python benchmarks/overhead.py              # the table (add --json out.json, --ops q_sample ...)

Needs the native extension (the registered ops are its ops).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Callable, Dict, Tuple

import torch

import ddpm_fast

SHAPE = (4, 1)          # 4 elements: B = 4 rows of 1 channel
STEPS = 50              # the public calls cycle through 50 (t, offset) pairs


def _native_ok() -> Tuple[bool, str]:
    info = ddpm_fast.backends()["native"]
    return bool(info["available"]["cpu"]), info["reason"]


def cases() -> Dict[str, Tuple[Callable[[int], object], Callable[[int], object]]]:
    """``{op: (public(i), direct(i))}``: call ``i`` of a 50-step loop through the public op and
    through ``torch.ops.ddpm_fast`` with the arguments the public op normalises to."""
    ops = torch.ops.ddpm_fast
    S = ddpm_fast.NoiseSchedule.from_name("linear", 1000)
    abar = S.table("cpu")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=g)
    mo = torch.randn(SHAPE, generator=g)
    mo2 = torch.randn(SHAPE[0], 2 * SHAPE[1], generator=g)
    x0 = x.clamp(-1, 1)
    B = SHAPE[0]
    ts = [900 - 15 * i for i in range(STEPS)]          # 900 .. 165, a 50-step DDIM-like loop
    tt = torch.full((B,), 500, dtype=torch.int64)
    pt = torch.full((B,), 480, dtype=torch.int64)
    nt = torch.full((B,), 520, dtype=torch.int64)
    seed = torch.tensor([1], dtype=torch.int64)
    off = torch.tensor([7], dtype=torch.int64)
    clip = (True, 1.0, False, 0.995, 1.0, None, False)
    T = float(S.num_timesteps) / 1000.0

    def hybrid_direct(i):
        C = SHAPE[1]
        simple = ops.diffusion_loss(mo2[:, :C], x0, tt, abar, None, seed, off, "epsilon", None)
        x_t = ops.q_sample(x0, tt, abar, None, seed, off)
        frozen = torch.cat([mo2[:, :C].detach(), mo2[:, C:]], dim=1)
        vlb = ops.vlb_loss(frozen, x0, x_t, tt, abar, "epsilon", "learned_range")
        return (simple + T * vlb).mean()

    return {
        "gaussian_noise": (
            lambda i: ddpm_fast.gaussian_noise(SHAPE, 1, i),
            lambda i: ops.gaussian_noise(list(SHAPE), seed, off, torch.float32)),
        "q_sample": (
            lambda i: ddpm_fast.q_sample(x0, ts[i], S, seed=1, offset=i),
            lambda i: ops.q_sample(x0, tt, abar, None, seed, off)),
        "ddpm_step": (
            lambda i: ddpm_fast.ddpm_step(mo, ts[i], x, S, seed=1, offset=i),
            lambda i: ops.ddpm_step(mo, tt, tt - 1, x, abar, None, seed, off, "epsilon", "fixed_small", *clip)),
        "ddim_step": (
            lambda i: ddpm_fast.ddim_step(mo, ts[i], x, S, prev_t=ts[i] - 15),
            lambda i: ops.ddim_step(mo, tt, pt, x, abar, None, None, None, 0.0, "epsilon", False, 1.0, *clip)),
        "ddim_reverse_step": (
            lambda i: ddpm_fast.ddim_reverse_step(mo, ts[i], x, S, next_t=ts[i] + 15),
            lambda i: ops.ddim_reverse_step(mo, tt, nt, x, abar, "epsilon", False, *clip)),
        "diffusion_loss": (
            lambda i: ddpm_fast.diffusion_loss(mo, x0, ts[i], S, seed=1, offset=i),
            lambda i: ops.diffusion_loss(mo, x0, tt, abar, None, seed, off, "epsilon", None).mean()),
        "vlb_loss": (
            lambda i: ddpm_fast.vlb_loss(mo2, x0, x, ts[i], S),
            lambda i: ops.vlb_loss(mo2, x0, x, tt, abar, "epsilon", "learned_range").mean()),
        "hybrid_loss": (
            lambda i: ddpm_fast.hybrid_loss(mo2, x0, ts[i], S, seed=1, offset=i),
            hybrid_direct),
    }


def _loop_us(fn: Callable[[int], object], calls: int) -> float:
    t0 = _clock()
    for k in range(calls):
        fn(k % STEPS)
    return (_clock() - t0) / calls * 1e6


_clock = time.thread_time


def _below_autograd(fn: Callable[[int], object]) -> Callable[[int], object]:
    def below(i):
        with torch._C._AutoDispatchBelowAutograd():
            return fn(i)
    return below


def measure(rounds: int = 15, calls: int = 200, only=None) -> Dict[str, dict]:
    """Per op: median microseconds a call of the public op, the direct op and the direct op below
    autograd, and the medians over rounds of the differences (round-robin: each round times every
    op's three variants back to back, in a rotating order)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _measure(rounds, calls, only)
    finally:
        torch.set_num_threads(threads)


def _measure(rounds, calls, only):
    table = {k: (pub, direct, _below_autograd(direct)) for k, (pub, direct) in cases().items()
             if only is None or k in only}
    with torch.no_grad():
        for fns in table.values():  # warm-up: backends resolved, caches filled
            for fn in fns:
                _loop_us(fn, STEPS)
        samples = {k: [] for k in table}
        for r in range(rounds):
            for name, fns in table.items():
                order = [(r + j) % 3 for j in range(3)]
                us = [0.0, 0.0, 0.0]
                for j in order:
                    us[j] = _loop_us(fns[j], calls)
                samples[name].append(us)
    out = {}
    for name, s in samples.items():
        over = sorted(p - d for p, d, _ in s)
        layer = sorted(p - b for p, _, b in s)
        out[name] = {"public_us": statistics.median(p for p, _, _ in s),
                     "direct_us": statistics.median(d for _, d, _ in s),
                     "below_us": statistics.median(b for _, _, b in s),
                     "overhead_us": statistics.median(over),
                     "overhead_iqr_us": (over[len(over) // 4], over[(3 * len(over)) // 4]),
                     "python_layer_us": statistics.median(layer)}
    return out


def format_table(res: Dict[str, dict]) -> str:
    lines = [f"Python overhead, {SHAPE} fp32, CPU, 1 thread, thread CPU time, median of round-robin rounds "
             "(us a call)",
             f"{'op':<20}{'public':>9}{'direct':>9}{'below':>9}{'pub-dir':>9}  {'(IQR)':>13}{'pub-below':>11}"]
    for name, r in res.items():
        lo, hi = r["overhead_iqr_us"]
        lines.append(f"{name:<20}{r['public_us']:>9.1f}{r['direct_us']:>9.1f}{r['below_us']:>9.1f}"
                     f"{r['overhead_us']:>9.1f}  {lo:>6.1f}..{hi:<6.1f}{r['python_layer_us']:>11.1f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--calls", type=int, default=200, help="calls per timed loop")
    p.add_argument("--ops", nargs="+", default=None)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    ok, why = _native_ok()
    if not ok:
        print(f"the native backend is unavailable ({why}): nothing to compare against")
        return 1
    res = measure(a.rounds, a.calls, a.ops)
    print(format_table(res))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"shape": list(SHAPE), "dtype": "float32", "threads": 1, "torch": torch.__version__,
                       "results": res}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
