"""``python -m ddpm_fast {demo,info,bench,profile,sample,gpucheck}``."""
from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
from typing import List, Optional

USAGE = """usage: python -m ddpm_fast COMMAND [options]

commands:
  demo      train a small model on a 2-D toy mixture and sample it (the main job; --help for options);
            demo --digits: a small image DDPM on scikit-learn's digits with a quality figure
  info      version, torch, devices, backends and why each is (un)available
  bench     time every op against the reference, torch.compile and diffusers (--help for options)
  profile   run ops under torch.profiler and write a Chrome trace (--help for options)
  sample    sample N images from a diffusers UNet2DModel folder, sharded under torchrun (--help for options)
  gpucheck  on a GPU machine: build, GPU test lanes, sanitizers, bench, ncu into one folder (docs/gpu.md)
"""

_SUBCOMMANDS = {"demo": "ddpm_fast.tools.demo", "bench": "ddpm_fast.tools.bench", "profile": "ddpm_fast.tools.profile",
                "sample": "ddpm_fast.distributed", "gpucheck": "ddpm_fast.tools.gpucheck"}


def info(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ddpm_fast info",
                                     description="Print the version, torch, devices and backends.")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = parser.parse_args(argv)
    import torch

    import ddpm_fast

    report = {
        "ddpm_fast": ddpm_fast.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "devices": ["cpu"] + [f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count())],
        "cpu_threads": torch.get_num_threads(),
        "backends": ddpm_fast.backends(),
    }
    try:
        native = importlib.import_module("ddpm_fast.backends.native")
        build_info = getattr(native, "build_info", None)
        report["native_build"] = build_info() if build_info is not None else None
    except Exception as e:  # the reason is already in backends()
        report["native_build"] = f"unavailable ({type(e).__name__})"
    report["native_kernels"] = _native_kernels(report["native_build"])
    try:
        import triton

        report["triton"] = triton.__version__
    except Exception:
        report["triton"] = None
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    for key in ("ddpm_fast", "python", "torch", "torch_cuda", "cuda_available", "cpu_threads", "triton"):
        print(f"{key:>15}: {report[key]}")
    print(f"{'devices':>15}: {', '.join(report['devices'])}")
    print(f"{'native build':>15}: {report['native_build']}")
    for i, line in enumerate(report["native_kernels"]):
        print(f"{'native kernels' if i == 0 else '':>15}: {line}")
    print("backends:")
    for name, entry in report["backends"].items():
        avail = ", ".join(f"{dev}={'yes' if ok else 'no'}" for dev, ok in entry["available"].items())
        print(f"  {name:<10} {avail:<22} {entry['reason']}")
    return 0


def _native_kernels(build) -> List[str]:
    """Where the native kernels came from (installed, or built at first use, with the paths), or
    why they are missing and how to get them."""
    if not isinstance(build, dict):
        return [f"unavailable: {build}"]
    if not build.get("available", True):
        return [f"CPU and CUDA unavailable: {build.get('reason')}",
                "to get them: a C++ compiler and ninja, then `python -m ddpm_fast._build` (or reinstall with "
                "`pip install --no-build-isolation -e .` where torch is installed); docs/install.md"]
    origin = build.get("origin", {})
    where = {"installed": "installed with the package (built at install)", "jit": "built at first use"}
    lines = [f"CPU: {where.get(origin.get('cpu'), origin.get('cpu'))}, for torch {build.get('torch_version')}: "
             f"{origin.get('cpu_library')}"]
    if origin.get("cpu") == "jit" and origin.get("installed_state"):
        lines.append(f"     (the installed extension is {origin['installed_state']})")
    if build.get("cuda"):
        lines.append(f"CUDA: {where.get(origin.get('cuda'), origin.get('cuda'))}, archs "
                     f"{origin.get('cuda_archs') or 'torch default'}: {origin.get('cuda_library')}")
    else:
        reason = build.get("cuda_reason", "")
        loud = "FAILED: " if ("failed" in reason or "does not load" in reason) else ""
        lines.append(f"CUDA: {loud}{reason}")
    return lines


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "info":
        return info(rest)
    if command in _SUBCOMMANDS:
        return int(importlib.import_module(_SUBCOMMANDS[command]).main(rest) or 0)
    print(f"unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
