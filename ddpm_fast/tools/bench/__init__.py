"""``python -m ddpm_fast bench``: every op, every provider, side by side in one run.

Organised by op (:mod:`.specs`: one spec per op with its traffic, inputs and providers), with
timing (:mod:`.timing`: round-robin rounds, paired ratios) and reporting (:mod:`.report`: plain
words, the targets' verdicts, the README table, the plot) apart; :mod:`.harness` runs the cases.
The issues' targets live beside the benchmarks, in ``benchmarks/targets.json`` of the source tree
(``--targets`` reads another file); without one the run reports figures and no verdicts.

Providers of each op, measured on the same inputs in one process:

* library, fused: ``native`` and ``triton`` through the public ops with ``backend=...`` (skipped
  with the reason :func:`ddpm_fast.backends` gives when not available; Triton on CPU only runs in
  its interpreter, which is not worth timing);
* the specification: ``reference`` (the public ops with ``backend="reference"``, eager) and
  ``reference+compile`` (``torch.compile`` of the reference backend's function);
* what users write today: diffusers' ``DDPMScheduler.step`` / ``DDIMScheduler.step`` with their
  own ``randn``, ``torch.randn_like`` + diffusers' ``add_noise``, the eager training step
  ``randn_like`` + ``add_noise`` + ``mse_loss`` + ``backward``, a plain-torch training loop.

A case (op, shape, dtype) is timed in rounds: each round takes one sample of every provider and of
a same-size ``dst.copy_(src)``, the order rotating; a sample is an inner loop lasting at least
``min_sample_s`` (on CPU the fastest of three such timings). Each row reports the median time per call with its quartiles, the achieved
bandwidth of the op's minimal traffic, its share of the same-size copy, and how the fastest library
provider stands against it in words ("3.10x faster"), from the per-round ratios. A target gets a
verdict only when the quartiles of those ratios lie on one side of it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence, Tuple

import torch

from .harness import COPY, machine_info, run_benchmarks
from .report import (DEFAULT_TARGETS, check_targets, format_markdown, format_table, load_targets, plot, rank,
                     verdict, words)
from .specs import (ALL_PROVIDERS, CUDA_LARGE_SHAPE, DEFAULT_SHAPES, DTYPES, LIBRARY_PROVIDERS, OFFSET,
                    OP_DESCRIPTIONS, OPS, PROVIDERS, QUICK_SHAPES, SEED, SPECS, TRAFFIC, OpSpec, ProviderSkip,
                    Traffic, _library_backend, dtype_name, inputs_for, make_runner, op_bytes, shape_str, shapes_for)
from .timing import _sync, measure_copy, paired_ratios, pin_malloc, ratio_summary, time_fn, time_group

_inputs = inputs_for  # the name profile.py and older callers use

__all__ = [
    "OPS", "SPECS", "OpSpec", "TRAFFIC", "Traffic", "PROVIDERS", "LIBRARY_PROVIDERS", "DEFAULT_SHAPES",
    "CUDA_LARGE_SHAPE", "QUICK_SHAPES", "DTYPES", "ProviderSkip", "make_runner", "time_fn", "time_group",
    "paired_ratios", "ratio_summary", "op_bytes", "measure_copy", "machine_info", "run_benchmarks", "check_targets",
    "load_targets", "verdict", "words", "format_table", "format_markdown", "plot", "main",
]


def parse_shape(text: str) -> Tuple[int, ...]:
    parts = [p for p in text.replace(",", "x").replace("(", "").replace(")", "").split("x") if p.strip()]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must look like 64x3x32x32 or 64,3,32,32, got {text!r}") from None
    if not shape or any(s <= 0 for s in shape):
        raise argparse.ArgumentTypeError(f"shape must be positive ints, got {text!r}")
    return shape


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ddpm_fast bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="device to measure (default: cuda when available, else cpu)")
    p.add_argument("--quick", action="store_true",
                   help="a small set: shapes 10000x2 and 64x3x32x32 (training_loss: 1024x2), fp32, 15 rounds; "
                        "reference+compile is skipped unless --compile is given")
    p.add_argument("--ops", nargs="+", choices=OPS, default=None, metavar="OP",
                   help=f"ops to measure, of: {', '.join(OPS)} (default: all)")
    p.add_argument("--dtype", nargs="+", choices=tuple(DTYPES), default=None, metavar="DTYPE",
                   help="dtypes, of: fp32 bf16 fp16 fp64 (default: fp32 bf16; --quick: fp32)")
    p.add_argument("--shapes", nargs="+", type=parse_shape, default=None, metavar="SHAPE",
                   help="sample shapes like 64x3x32x32, for every op (default: 10000x2 4x4x64x64 64x3x32x32, plus "
                        f"{shape_str(CUDA_LARGE_SHAPE)} on CUDA; training_loss: the demo's 1024x2)")
    p.add_argument("--providers", nargs="+", choices=ALL_PROVIDERS, default=None, metavar="PROVIDER",
                   help=f"only these providers, of: {', '.join(repr(p) for p in ALL_PROVIDERS)}")
    p.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="include reference+compile (the default, except with --quick)")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip reference+compile")
    p.add_argument("--repeats", type=int, default=None, help="rounds per case (default 30; --quick 15)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up calls per provider (default 3; --quick 2)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default 1 on CPU: the figures are one core's; on CUDA torch's default)")
    p.add_argument("--targets", metavar="PATH", default=None,
                   help="targets file (default: benchmarks/targets.json of the source tree, when there is one)")
    p.add_argument("--no-pin-malloc", dest="pin_malloc", action="store_false",
                   help="leave glibc's mmap/trim thresholds dynamic (default on CPU: pinned, so that a provider's "
                        "allocations cost the same whatever ran before it)")
    p.add_argument("--json", metavar="PATH", help="write every figure, sample and the machine info as JSON")
    p.add_argument("--markdown", metavar="PATH", help="write the targets' table (ratios only) as Markdown ('-': stdout)")
    p.add_argument("--plot", metavar="PNG", help="draw GB/s per op and provider across sizes (matplotlib)")
    p.add_argument("--from-json", metavar="PATH",
                   help="report a saved run instead of measuring (with --plot and/or --markdown)")
    return p


def _write_markdown(data: dict, path: str) -> None:
    text = format_markdown(data) + "\n"
    if path == "-":
        sys.stdout.write(text)
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    print(f"wrote {path}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.from_json:
        if not (args.plot or args.markdown):
            print("--from-json needs --plot PNG and/or --markdown PATH", file=sys.stderr)
            return 2
        with open(args.from_json) as f:
            data = json.load(f)
        if args.markdown:
            _write_markdown(data, args.markdown)
        if args.plot:
            print(f"wrote {plot(data, args.plot)}")
        return 0

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: this torch has no CUDA device", file=sys.stderr)
        return 2
    threads = args.threads if args.threads is not None else (1 if device.type == "cpu" else torch.get_num_threads())
    torch.set_num_threads(max(1, threads))
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = 0.0
    cores = os.cpu_count() or 1
    if device.type == "cpu" and load > 0.5 * cores:
        print(f"note: load average {load:.1f} on {cores} cores: other jobs are running. The ratios pair the "
              "providers within each round; the absolute times will drift", file=sys.stderr)

    malloc = (pin_malloc() if args.pin_malloc else "glibc thresholds left dynamic (--no-pin-malloc)") \
        if device.type == "cpu" else "unchanged (CUDA)"
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
    repeats = args.repeats or (15 if quick else 30)
    # CPU: short timings, the fastest of three per sample, so that another job's time slice lands on
    # one timing and not on the sample; CUDA: a sample spans enough launches to hide the synchronize.
    min_sample_s = 2e-3 if device.type == "cuda" else 2e-4
    best_of = 1 if device.type == "cuda" else 3
    warmup = args.warmup if args.warmup is not None else (2 if quick else 3)
    budget_s = 1.5 if quick else 4.0

    def log(s):
        print(s, file=sys.stderr, flush=True)

    data = run_benchmarks(ops, shapes, dtypes, device, providers=args.providers, compile=compile_, warmup=warmup,
                          repeats=repeats, min_sample_s=min_sample_s, budget_s=budget_s, best_of=best_of,
                          max_retries=0 if quick else 1, quick=quick, explicit_shapes=bool(args.shapes), log=log)
    data["argv"] = list(argv if argv is not None else sys.argv[1:])
    data["settings"]["malloc"] = malloc
    targets_path = args.targets or DEFAULT_TARGETS
    specs = load_targets(targets_path)
    data["targets_file"] = os.path.relpath(targets_path) if specs else None
    data["target_specs"] = specs
    data["targets"] = check_targets(data, specs)
    print(format_table(data))
    print(f"\n({data['elapsed_s']:.1f} s)")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(data, f, indent=1)
        print(f"wrote {args.json}")
    if args.markdown:
        _write_markdown(data, args.markdown)
    if args.plot:
        print(f"wrote {plot(data, args.plot)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
