"""pytest-benchmark suite: ``pytest benchmarks --benchmark-only`` (not part of the default ``pytest tests``).

The providers, inputs and traffic table are those of ``ddpm_fast.tools.bench`` (``python -m ddpm_fast
bench``), imported, not repeated. Options: ``--bench-device cpu|cuda`` (default: cuda when
available), ``--bench-dtype fp32 bf16``, ``--bench-large`` (add the >= 16M-element shape; on by
default on CUDA). Each benchmark's ``extra_info`` carries the op's minimal bytes and the achieved
GB/s, so ``--benchmark-json`` output holds the same figures as ``bench --json``.
"""
import pytest
import torch


def pytest_addoption(parser):
    group = parser.getgroup("ddpm_fast benchmarks")
    group.addoption("--bench-device", default=None, choices=("cpu", "cuda"),
                    help="device to benchmark (default: cuda when available, else cpu)")
    group.addoption("--bench-dtype", nargs="+", default=None, choices=("fp32", "bf16", "fp16"),
                    help="dtypes to benchmark (default: fp32 bf16)")
    group.addoption("--bench-large", action="store_true", default=None,
                    help="add the >= 16M-element shape (default: on CUDA only)")


def _device(config):
    name = config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _shapes(config, device):
    from ddpm_fast.tools.bench import CUDA_LARGE_SHAPE, DEFAULT_SHAPES
    large = config.getoption("--bench-large")
    if large is None:
        large = device.type == "cuda"
    return list(DEFAULT_SHAPES) + ([CUDA_LARGE_SHAPE] if large else [])


def pytest_generate_tests(metafunc):
    from ddpm_fast.tools.bench import DTYPES, SPECS, shape_str, shapes_for
    config = metafunc.config
    device = _device(config)
    if "bench_dtype" in metafunc.fixturenames:
        names = config.getoption("--bench-dtype") or ["fp32", "bf16"]
        metafunc.parametrize("bench_dtype", [DTYPES[n] for n in names], ids=names)
    if "bench_shape" in metafunc.fixturenames:
        shapes = _shapes(config, device)
        metafunc.parametrize("bench_shape", shapes, ids=[shape_str(s) for s in shapes])
    if "bench_case" in metafunc.fixturenames:  # (op, provider, shape): each op at its own shapes
        cases = [(op, provider, shape) for op, spec in SPECS.items() for shape in shapes_for(op, _shapes(config, device))
                 for provider in spec.providers]
        metafunc.parametrize("bench_case", cases,
                             ids=[f"{op}-{p.replace(' ', '_').replace(',', '')}-{shape_str(s)}" for op, p, s in cases])


@pytest.fixture
def bench_device(request):
    device = _device(request.config)
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("--bench-device cuda: no CUDA device")
    return device


def pytest_collection_modifyitems(config, items):
    """A bare ``pytest`` from the repository root would collect this folder too: skip the
    benchmarks unless they were asked for (a path under benchmarks/, or --benchmark-only)."""
    asked = any("benchmarks" in str(a) for a in config.args)
    try:
        asked = asked or bool(config.getoption("--benchmark-only"))
    except ValueError:
        pass
    if asked:
        return
    here = str(__import__("os").path.dirname(__file__))
    skip = pytest.mark.skip(reason="benchmarks run when asked for: pytest benchmarks --benchmark-only")
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(skip)
