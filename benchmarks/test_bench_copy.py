"""The copy-bandwidth ceiling of the bench table (``dst.copy_(src)``), at each benchmarked size and
past the last-level cache, so the op benchmarks can be read as a share of it."""
import math

import pytest
import torch

from ddpm_fast.tools.bench import dtype_name, op_bytes, shape_str


def _copy(benchmark, shape, dtype, device):
    src = torch.randn(shape, device=device).to(dtype)
    dst = torch.empty_like(src)
    nbytes = op_bytes("copy", shape, dtype)
    if device.type == "cuda":
        def fn():
            dst.copy_(src)
            torch.cuda.synchronize()
    else:
        def fn():
            dst.copy_(src)
    benchmark.extra_info.update(op="copy", shape=list(shape), dtype=dtype_name(dtype), device=device.type,
                                bytes=nbytes)
    benchmark(fn)
    if benchmark.stats is not None:
        benchmark.extra_info["gbps_median"] = nbytes / benchmark.stats.stats.median / 1e9


def test_copy_same_size(benchmark, bench_shape, bench_dtype, bench_device):
    benchmark.group = f"copy {shape_str(bench_shape)} {dtype_name(bench_dtype)}"
    _copy(benchmark, bench_shape, bench_dtype, bench_device)


def test_copy_large(benchmark, bench_device):
    numel = (1 << 28) if bench_device.type == "cuda" else (1 << 24)
    benchmark.group = "copy large"
    _copy(benchmark, (numel,), torch.float32, bench_device)
