"""``python -m ddpm_fast profile``: where an op's time goes, and how close it is to the memory limit.

For each chosen op (the ops of ``python -m ddpm_fast bench``, or ``sample``: a short DDPM sampling
loop over :func:`ddpm_fast.ops.ddpm_step` with a stand-in model) this

1. measures the copy bandwidth of this device (``dst.copy_(src)``), in the same run;
2. times the op without the profiler (median of repeats) and reports the bytes of its minimal
   traffic (``ddpm_fast.tools.bench.TRAFFIC``), the achieved GB/s and the % of the copy bandwidth;
3. runs it ``--iters`` times under ``torch.profiler`` with the NVTX / ``record_function`` ranges
   of :mod:`ddpm_fast.nvtx` switched on, writes a Chrome trace (open it in ``chrome://tracing`` or
   https://ui.perfetto.dev) and prints the top kernels (CUDA) or top operators (CPU) with their
   time per op call and ``GB/s*``: the op's minimal bytes over that entry's time per op call,
   which is the kernel's achieved bandwidth when one fused kernel does the whole op.

Works on CPU (operators instead of kernels). For Nsight Systems, run it under
``nsys profile -t cuda,nvtx python -m ddpm_fast profile ...``: the same ranges appear as NVTX.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from . import bench
from ..nvtx import nvtx_range, profiling
from ..nvtx import range_names as nvtx_range_names

__all__ = ["PROFILE_OPS", "profile_op", "main"]

PROFILE_OPS = bench.OPS + ("sample",)
_DEFAULT_OPS = ("q_sample", "ddpm_step", "train")


def _default_provider(device: torch.device, dtype: torch.dtype) -> str:
    from ..backends import resolve_backend
    name = resolve_backend(None, device, dtype).NAME
    if name == "triton" and device.type == "cpu":
        return "reference"
    return name


def _sampling_loop(provider: str, shape, dtype, device, steps: int) -> Callable[[], torch.Tensor]:
    """A short DDPM loop (``steps`` of 1000, leading spacing) over the public ddpm_step with a
    stand-in model (one elementwise op), each step in an ``step t=...`` range."""
    from .. import ops
    from ..schedule import NoiseSchedule, inference_timesteps

    if provider not in ("native", "triton", "reference"):
        raise bench.ProviderSkip(f"the sampling loop runs the library's ops: provider must be a backend, "
                                 f"got {provider!r}")
    bench._library_backend(provider, device, dtype)
    sched = NoiseSchedule.from_name("linear", 1000)
    ts = [int(t) for t in inference_timesteps(1000, steps)]
    prevs = ts[1:] + [-1]
    g = torch.Generator().manual_seed(0)
    x_init = torch.randn(shape, generator=g).to(device, dtype)
    seed = torch.tensor(bench.SEED, dtype=torch.int64, device=device)
    offsets = [torch.tensor(i, dtype=torch.int64, device=device) for i in range(len(ts))]

    def loop():
        x = x_init
        for i, (t, prev) in enumerate(zip(ts, prevs)):
            with nvtx_range(f"step t={t}"):
                with nvtx_range("model"):
                    model_output = x * 0.5
                x = ops.ddpm_step(model_output, t, x, sched, prev_t=prev, seed=seed, offset=offsets[i],
                                  backend=provider)
        return x
    loop.steps = len(ts)
    return loop


def _time(ev, attr_new: str, attr_old: str) -> float:
    v = getattr(ev, attr_new, None)
    if v is None:
        v = getattr(ev, attr_old, 0.0)
    return float(v or 0.0)


def profile_op(op: str, provider: str, shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device, *,
               iters: int, out_dir: str, copy_gbps: float, top: int = 10, steps: int = 10,
               repeats: int = 10) -> dict:
    """Profile one op; returns its summary (also what ``summary.json`` holds per op)."""
    if op == "sample":
        fn = _sampling_loop(provider, shape, dtype, device, steps)
        calls_per_run = fn.steps
        nbytes = bench.op_bytes("ddpm_step", shape, dtype) * calls_per_run
        traffic = f"{calls_per_run} x ddpm_step: " + bench.TRAFFIC["ddpm_step"].what + " (stand-in model not counted)"
    else:
        fn = bench.make_runner(op, provider, shape, dtype, device)
        calls_per_run = 1
        nbytes = bench.op_bytes(op, shape, dtype)
        traffic = bench.TRAFFIC[op].what
    tm = bench.time_fn(fn, device, warmup=2, repeats=repeats, budget_s=2.0)
    sec = tm["median_s"]
    gbps = nbytes / sec / 1e9

    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    outer = f"[{op}]"
    with profiling(), torch.profiler.profile(activities=activities) as prof:
        for _ in range(iters):
            with nvtx_range(outer):
                fn()
        bench._sync(device)
    os.makedirs(out_dir, exist_ok=True)
    trace = os.path.join(out_dir, f"trace_{op}_{provider.replace(' ', '_').replace('+', '_')}_"
                                  f"{bench.shape_str(shape)}_{bench.dtype_name(dtype)}_{device.type}.json")
    prof.export_chrome_trace(trace)

    on_gpu = device.type == "cuda"
    ranges = nvtx_range_names()
    entries = []
    for ev in prof.key_averages():
        name = ev.key
        if name in ranges or name.startswith("ProfilerStep"):
            continue  # our own ranges: they organise the trace, they are not work
        self_us = _time(ev, "self_device_time_total", "self_cuda_time_total") if on_gpu \
            else _time(ev, "self_cpu_time_total", "self_cpu_time_total")
        if self_us <= 0:
            continue
        entries.append({"name": name, "calls": int(ev.count), "self_us_total": self_us})
    entries.sort(key=lambda e: -e["self_us_total"])
    total_us = sum(e["self_us_total"] for e in entries) or 1.0
    bytes_per_run = nbytes
    for e in entries:
        per_run_s = e["self_us_total"] / iters * 1e-6
        e["us_per_run"] = per_run_s * 1e6
        e["pct_of_total"] = 100.0 * e["self_us_total"] / total_us
        # GB/s* only where an entry carries a real share of the op (else it is a tiny
        # bookkeeping op and the figure means nothing)
        e["gbps_star"] = bytes_per_run / per_run_s / 1e9 if per_run_s > 0 and e["pct_of_total"] >= 10 else None
        e["pct_copy_star"] = 100.0 * e["gbps_star"] / copy_gbps if e["gbps_star"] else None
    return {
        "op": op, "provider": provider, "shape": list(shape), "dtype": bench.dtype_name(dtype), "device": device.type,
        "iters": iters, "calls_per_run": calls_per_run, "bytes": nbytes, "traffic": traffic,
        "ms": sec * 1e3, "gbps": gbps, "pct_copy": 100.0 * gbps / copy_gbps, "trace": trace,
        "top": entries[:top], "kind": "kernels (device time)" if on_gpu else "operators (self CPU time)",
    }


def format_summary(s: dict, copy_gbps: float) -> str:
    lines = [f"{s['op']} [{s['provider']}] {bench.shape_str(s['shape'])} {s['dtype']} on {s['device']}: "
             f"{s['ms']:.4f} ms per run, {s['bytes'] / 1e6:.3f} MB minimal traffic ({s['traffic']}), "
             f"{s['gbps']:.2f} GB/s = {s['pct_copy']:.1f}% of copy ({copy_gbps:.1f} GB/s)",
             f"  trace: {s['trace']}",
             f"  top {s['kind']}, over {s['iters']} runs:",
             f"    {'name':58s} {'calls/run':>9s} {'us/run':>10s} {'%time':>6s} {'GB/s*':>9s} {'%copy*':>7s}"]
    for e in s["top"]:
        g = f"{e['gbps_star']:9.2f}" if e["gbps_star"] else f"{'':9s}"
        c = f"{e['pct_copy_star']:6.1f}%" if e["pct_copy_star"] else f"{'':7s}"
        name = e["name"] if len(e["name"]) <= 58 else e["name"][:55] + "..."
        lines.append(f"    {name:58s} {e['calls'] / s['iters']:9.1f} {e['us_per_run']:10.2f} {e['pct_of_total']:5.1f}% "
                     f"{g} {c}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ddpm_fast profile", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="GB/s* = the op's minimal bytes per run / that entry's time per run: the "
                                       "achieved bandwidth of a kernel that does the whole op alone.")
    p.add_argument("--op", nargs="+", choices=PROFILE_OPS, default=None, metavar="OP",
                   help=f"ops to profile, of: {', '.join(PROFILE_OPS)} (default: {' '.join(_DEFAULT_OPS)}); "
                        "'sample' is a short sampling loop")
    p.add_argument("--shape", type=bench.parse_shape, default=None,
                   help="sample shape like 64x3x32x32 (default: 64x3x32x32 on CPU, "
                        f"{bench.shape_str(bench.CUDA_LARGE_SHAPE)} on CUDA)")
    p.add_argument("--dtype", choices=tuple(bench.DTYPES), default="fp32")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.add_argument("--provider", "--backend", dest="provider", default=None,
                   help="a provider of bench (native, triton, reference, 'diffusers DDPM.step', ...); "
                        "default: the backend ddpm_fast picks for this device and dtype")
    p.add_argument("--iters", type=int, default=10, help="profiled runs per op (default 10)")
    p.add_argument("--steps", type=int, default=10, help="steps of the 'sample' loop (default 10)")
    p.add_argument("--top", type=int, default=10, help="entries to print per op (default 10)")
    p.add_argument("--out", default="ddpm_fast_profile", help="directory for traces and summary.json")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: this torch has no CUDA device", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = bench.DTYPES[args.dtype]
    shape = args.shape or (bench.CUDA_LARGE_SHAPE if device.type == "cuda" else (64, 3, 32, 32))
    ops = args.op or list(_DEFAULT_OPS)
    provider = args.provider or _default_provider(device, dtype)

    copy = bench.measure_copy(device, repeats=10, budget_s=2.0)
    print(f"copy bandwidth: {copy['gbps']:.2f} GB/s (dst.copy_(src), {copy['bytes'] / 2**20:.0f} MiB moved, "
          f"{device.type}: {bench.machine_info(device)['device_name']})")
    summaries, status = [], 0
    for op in ops:
        try:
            s = profile_op(op, provider, shape, dtype, device, iters=args.iters, out_dir=args.out,
                           copy_gbps=copy["gbps"], top=args.top, steps=args.steps)
        except bench.ProviderSkip as e:
            print(f"\n{op} [{provider}]: skipped: {e}")
            summaries.append({"op": op, "provider": provider, "status": "skipped", "reason": str(e)})
            continue
        except ValueError as e:
            print(f"\n{op} [{provider}]: {e}", file=sys.stderr)
            status = 2
            continue
        s["status"] = "ok"
        summaries.append(s)
        print()
        print(format_summary(s, copy["gbps"]))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "summary.json")
    with open(path, "w") as f:
        json.dump({"machine": bench.machine_info(device), "copy": copy, "ops": summaries}, f, indent=1)
    print(f"\nwrote {path}")
    return status


if __name__ == "__main__":
    sys.exit(main())
