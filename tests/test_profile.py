"""`python -m ddpm_fast profile`, the NVTX ranges of ddpm_fast.nvtx, and the standalone CUDA
benchmark's compilation (csrc/bench/, nvcc without a GPU)."""
import glob
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from ddpm_fast import nvtx
from ddpm_fast.tools import profile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------------------------
# profile
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def profile_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("profile")
    rc = profile.main(["--device", "cpu", "--op", "q_sample", "train", "sample", "--shape", "4x2x4x4",
                       "--iters", "2", "--steps", "3", "--top", "5", "--provider", "reference", "--out", str(out)])
    assert rc == 0
    with open(out / "summary.json") as f:
        return json.load(f), out


def test_profile_writes_a_chrome_trace_per_op(profile_run):
    summary, out = profile_run
    assert [s["op"] for s in summary["ops"]] == ["q_sample", "train", "sample"]
    for s in summary["ops"]:
        assert s["status"] == "ok"
        assert os.path.dirname(s["trace"]) == str(out)
        with open(s["trace"]) as f:
            trace = json.load(f)
        names = {e.get("name", "") for e in trace["traceEvents"]}
        assert f"[{s['op']}]" in names, s["op"]  # the op's range, from ddpm_fast.nvtx


def test_profile_trace_reads_like_the_algorithm(profile_run):
    summary, _ = profile_run
    by_op = {s["op"]: s for s in summary["ops"]}
    with open(by_op["train"]["trace"]) as f:
        names = {e.get("name", "") for e in json.load(f)["traceEvents"]}
    assert {"train: q_sample", "train: loss fwd", "train: loss bwd"} <= names
    with open(by_op["sample"]["trace"]) as f:
        names = {e.get("name", "") for e in json.load(f)["traceEvents"]}
    steps = sorted(n for n in names if n.startswith("step t="))
    assert len(steps) == 3 and "model" in names


def test_profile_figures(profile_run):
    summary, _ = profile_run
    copy = summary["copy"]["gbps"]
    assert copy > 0
    for s in summary["ops"]:
        assert s["ms"] > 0 and s["bytes"] > 0
        assert math.isclose(s["gbps"], s["bytes"] / (s["ms"] * 1e-3) / 1e9, rel_tol=1e-9)
        assert math.isclose(s["pct_copy"], 100 * s["gbps"] / copy, rel_tol=1e-9)
        assert s["top"], s["op"]
        assert all(e["us_per_run"] > 0 and not e["name"].startswith("[") and not e["name"].startswith("step t=")
                   for e in s["top"])
        times = [e["self_us_total"] for e in s["top"]]
        assert times == sorted(times, reverse=True)
    by_op = {s["op"]: s for s in summary["ops"]}
    n = 4 * 2 * 4 * 4
    assert by_op["q_sample"]["bytes"] == 2 * n * 4
    assert by_op["sample"]["bytes"] == 3 * 3 * n * 4  # 3 steps x (read model_output, x_t; write x_prev)


def test_profile_skips_an_unavailable_provider(tmp_path, capsys):
    rc = profile.main(["--device", "cpu", "--op", "q_sample", "--shape", "4x2", "--provider", "triton",
                       "--iters", "1", "--out", str(tmp_path)])
    assert rc == 0
    assert "skipped" in capsys.readouterr().out
    with open(tmp_path / "summary.json") as f:
        assert json.load(f)["ops"][0]["status"] == "skipped"


def test_profile_cli_help():
    text = profile.build_parser().format_help()
    assert "--op" in text and "--out" in text and "--shape" in text


# --------------------------------------------------------------------------------------------
# NVTX ranges
# --------------------------------------------------------------------------------------------
def _profiled_names(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events()}


@nvtx.range_for_op("unit_test_op")
def _decorated(x, *, k=1):
    """doc"""
    return x * k


def test_range_for_op_keeps_the_function():
    assert _decorated(torch.ones(2), k=3).tolist() == [3.0, 3.0]
    assert _decorated.__name__ == "_decorated" and _decorated.__doc__ == "doc"


def test_ranges_off_by_default_cost_nothing(monkeypatch):
    if os.environ.get("DDPM_FAST_NVTX", "") not in ("", "0"):
        pytest.skip("DDPM_FAST_NVTX is set in this environment")
    assert not nvtx.is_enabled()

    class Boom:
        def __init__(self, *a):
            raise AssertionError("a range was built while profiling is off")
    monkeypatch.setattr(nvtx, "nvtx_range", Boom)
    assert _decorated(torch.ones(1)).item() == 1.0  # the off path never touches nvtx_range
    monkeypatch.undo()
    assert "unit_test_op" not in _profiled_names(lambda: _decorated(torch.ones(1)))


def test_ranges_on_inside_profiling():
    with nvtx.profiling():
        assert nvtx.is_enabled()
        names = _profiled_names(lambda: _decorated(torch.ones(1)))
        with nvtx.nvtx_range("outer block"):
            names |= _profiled_names(lambda: None)
    assert "unit_test_op" in names
    assert not nvtx.is_enabled()


def test_profiling_nests_and_restores():
    with nvtx.profiling():
        with nvtx.profiling(False):
            assert not nvtx.is_enabled()
        assert nvtx.is_enabled()
    assert not nvtx.is_enabled()


def test_harmless_on_cpu_only_torch():
    """On a CPU-only torch torch.cuda.nvtx raises; the first failure disables NVTX, nothing else."""
    with nvtx.profiling():
        for _ in range(3):
            with nvtx.nvtx_range("cpu range"):
                pass
        st = nvtx.status()
    if not torch.cuda.is_available():
        try:
            torch.cuda.nvtx.range_push("probe")
            torch.cuda.nvtx.range_pop()
            works = True
        except Exception:
            works = False
        assert st["nvtx"] is works
        if not works:
            assert "unusable" in st["reason"]


def test_ranges_survive_exceptions_and_recursion():
    @nvtx.nvtx_range("recursive")
    def fact(n):
        if n == 0:
            raise ValueError("bottom")
        return n * fact(n - 1)

    with nvtx.profiling():
        with pytest.raises(ValueError, match="bottom"):
            fact(4)
        names = _profiled_names(lambda: _decorated(torch.ones(1)))
    assert "unit_test_op" in names


def test_ranges_skipped_inside_torch_compile():
    """Dynamo traces through a range without a graph break (fullgraph=True) while profiling is on."""
    def f(x):
        with nvtx.nvtx_range("inside compile"):
            return _decorated(x, k=2).sin()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="eager")
    x = torch.randn(8)
    with nvtx.profiling():
        torch.testing.assert_close(compiled(x), (2 * x).sin())


def test_env_var_switches_ranges_on():
    """DDPM_FAST_NVTX=1 (read at import) switches ranges on; unset, they are off (checked in process)."""
    code = "from ddpm_fast import nvtx; print(nvtx.is_enabled())"
    env = dict(os.environ, DDPM_FAST_NVTX="1")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "True", r.stderr


def test_lazy_export():
    import ddpm_fast
    assert ddpm_fast.profiling is nvtx.profiling


# --------------------------------------------------------------------------------------------
# the standalone CUDA benchmark compiles with nvcc (no GPU needed)
# --------------------------------------------------------------------------------------------
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found on PATH: the CUDA benchmark is not compiled")
def test_cuda_bench_compiles_with_nvcc(tmp_path):
    kernels = sorted(glob.glob(os.path.join(REPO, "csrc", "cuda", "*.cu")))
    exe = tmp_path / "ddpm_fast_cuda_bench"
    cmd = ["nvcc", "-std=c++17", "-O3", "-lineinfo", "-arch=sm_90", "-I", os.path.join(REPO, "csrc", "include"),
           os.path.join(REPO, "csrc", "bench", "cuda_bench.cu"), *kernels, "-o", str(exe)]
    if not kernels:
        cmd.insert(1, "-DDDPM_FAST_BENCH_COPY_ONLY")
        print("csrc/cuda/*.cu not present: compiling the copy-only benchmark")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    assert exe.exists() and os.path.getsize(exe) > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_profile_cuda_asked_for_without_cuda(tmp_path, capsys):
    assert profile.main(["--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "no CUDA device" in capsys.readouterr().err
