"""Every op x provider x shape x dtype of ``ddpm_fast.tools.bench`` under pytest-benchmark (each op at
its own shapes: training_loss at the demo's 2-D batch, the others at the bench's shapes).

    pytest benchmarks --benchmark-only --benchmark-group-by=group

A provider that cannot run here (backend not built, no diffusers, compile failure) is skipped
with its reason.
"""
import pytest

from ddpm_fast.tools.bench import ProviderSkip, dtype_name, make_runner, op_bytes, shape_str


def test_op(benchmark, bench_case, bench_dtype, bench_device):
    op, provider, bench_shape = bench_case
    try:
        fn = make_runner(op, provider, bench_shape, bench_dtype, bench_device, sync=True)
    except ProviderSkip as e:
        pytest.skip(f"{provider}: {e}")
    benchmark.group = f"{op} {shape_str(bench_shape)} {dtype_name(bench_dtype)}"
    nbytes = op_bytes(op, bench_shape, bench_dtype)
    benchmark.extra_info.update(op=op, provider=provider, shape=list(bench_shape), dtype=dtype_name(bench_dtype),
                                device=bench_device.type, bytes=nbytes)
    benchmark.pedantic(fn, warmup_rounds=2, rounds=20, iterations=1) if bench_device.type == "cuda" else benchmark(fn)
    stats = benchmark.stats
    if stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["gbps_median"] = nbytes / stats.stats.median / 1e9
