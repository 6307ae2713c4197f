"""benchmarks/gpu_check.sh (ddpm_fast/tools/gpucheck.py): its plumbing, and the GPU lane it runs.

Part 1, the plumbing (runs everywhere, CI included): the dry mode's output layout and reasons, the
usage errors, and the pure functions that read what the tools print (junit XML, compute-sanitizer,
ncu CSV, the bench's JSON and its flags).

Part 2, the GPU lane (skipped without a CUDA device; ``gpu_check.sh`` selects these with the other
GPU tests of tests/): every op of every library backend on CUDA against the reference, the noise
known answers on the device, the CUDA-graph ``sample()`` drawing fresh noise on every replay, no host
sync per step (``torch.cuda.set_sync_debug_mode("error")``), an out-of-range device ``t`` giving NaN
rows, indices past 2^31. ``DDPM_FAST_GPU_LANE_ON_CPU=1`` runs the device-independent part of the
lane on the CPU (native backend) to check the lane's own logic where no GPU is lent.

Tolerances (by the sample's dtype; as tests/test_native.py): fp32 1e-5 absolute + 1e-5 relative (the
noise of two backends agrees within 1e-5, both compute in fp32 from the same float64 coefficients);
fp16/bf16: the two fp32 results each rounded once may land one unit in the last place apart
(2^-10, 2^-7 relative).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import math
import tarfile

import pytest
import torch

import ddpm_fast as F
from ddpm_fast.tools import gpucheck as G
from ddpm_fast.noise import gaussian_noise_reference, normals_at

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")


# ================================================================================================
# part 1: the plumbing
# ================================================================================================
def _run_script(*args, timeout=240):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the dry run where torch sees no device")
def test_dry_run_writes_the_layout_and_every_step_skips_with_its_reason(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    r = _run_script("--dry", "--out", str(out), "--work", str(work))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # what the device tool brings back: at most 8 files, flat
    files = sorted(os.listdir(out))
    assert {"summary.txt", "gpu_check.json", "logs.tar.gz"} <= set(files), files
    assert len(files) <= 8 and all(os.path.isfile(out / f) for f in files), files
    assert set(files) <= set(G.OUT_FILES), files
    rep = json.loads((out / "gpu_check.json").read_text())
    assert rep["mode"] == "dry" and rep["exit_code"] == 0
    names = [s["name"] for s in rep["steps"]]
    assert names == list(G.STEPS), names
    for s in rep["steps"]:
        if s["name"] == "env":
            assert s["status"] == "ok"
            continue
        assert s["status"] == "skipped" and len(s["reason"]) > 10, s
    by = {s["name"]: s for s in rep["steps"]}
    # the plans are there even when skipped: the build for the device's arch with the cores as jobs
    assert "TORCH_CUDA_ARCH_LIST=" in by["build"]["command"] and "MAX_JOBS=" in by["build"]["command"]
    assert "--gpucheck-select" in by["lane-cuda"]["command"]
    assert "tests/triton" in by["lane-triton"]["command"]
    assert "--device cuda" in by["bench"]["command"] and "bench.json" in by["bench"]["command"]
    # the GPU selection, collected on this machine, holds this file's GPU lane
    ids = by["lane-cuda"]["details"]["collected_here"]["ids"]
    mine = [i for i in ids if i.startswith("tests/test_gpu_check.py::")]
    assert mine and all("every_op" in i or "test_lane_" in i for i in mine), mine
    assert not any("test_dry_run" in i or "nvcc" in i for i in ids), ids
    assert len(ids) > len(mine)
    assert rep["dry_checks"]["gpu_tests_selected"] == len(ids)
    # every target named, none measured
    assert rep["targets"] and all(t["verdict"] == "not measured" for t in rep["targets"])
    summary = (out / "summary.txt").read_text()
    for name in G.STEPS:
        assert name in summary
    assert "verdict: DRY RUN OK" in summary and "verdict: DRY RUN OK" in r.stdout
    assert len(summary.splitlines()) <= 40  # one screen
    with tarfile.open(out / "logs.tar.gz") as tar:
        members = tar.getnames()
    assert "logs/env.txt" in members and "logs/summary.txt" in members, members


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what happens where torch sees no device")
def test_plain_run_where_torch_sees_no_device_runs_dry_and_exits_3(tmp_path):
    """Through the CLI subcommand: without --dry and without a device, the dry run runs and the
    exit status (3) says that nothing was checked."""
    r = subprocess.run([sys.executable, "-m", "ddpm_fast", "gpucheck", "--out", str(tmp_path), "--no-collect",
                        "--skip", "bench"], capture_output=True, text=True, timeout=240, cwd=ROOT,
                       env=dict({k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, PYTHONPATH=ROOT))
    assert r.returncode == G.EXIT_NO_GPU, r.stdout[-2000:] + r.stderr[-2000:]
    assert "NO GPU" in r.stdout
    rep = json.loads((tmp_path / "gpu_check.json").read_text())
    assert rep["mode"] == "dry"
    assert next(s for s in rep["steps"] if s["name"] == "bench")["reason"].startswith("not selected")


def test_junit_counts(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text('<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="4" failures="1" errors="0" '
                   'skipped="1"><testcase classname="tests.test_a" name="test_ok"/>'
                   '<testcase classname="tests.test_a" name="test_bad"><failure message="boom"/></testcase>'
                   '<testcase classname="tests.test_a" name="test_skip"><skipped message="needs X"/></testcase>'
                   '<testcase classname="tests.test_a" name="test_ok2"/></testsuite></testsuites>')
    j = G.parse_junit(str(xml))
    assert (j["tests"], j["passed"], j["failures"], j["skipped"]) == (4, 2, 1, 1)
    assert j["failed"] == ["tests.test_a::test_bad"] and j["skip_reasons"] == {"needs X": 1}
    assert "error" in G.parse_junit(str(tmp_path / "missing.xml"))


def test_progress_file_says_what_ran_and_what_was_running(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in [
        {"start": "t::a"}, {"nodeid": "t::a", "when": "call", "outcome": "passed"},
        {"start": "t::b"}, {"start": "t::b"}, {"nodeid": "t::b", "when": "call", "outcome": "failed"},
        {"nodeid": "t::b", "when": "call", "outcome": "failed"},   # xdist: worker and controller both write
        {"start": "t::c"}, {"nodeid": "t::c", "when": "setup", "outcome": "skipped"},
        {"start": "t::d"}, "not json"]) + "\n")
    assert G.read_progress(str(f)) == {"passed": 1, "failed": ["t::b"], "skipped": 1, "running": ["t::d"]}
    assert G.read_progress(str(tmp_path / "none")) == {"passed": 0, "failed": [], "skipped": 0, "running": []}


def test_a_lane_past_its_deadline_is_killed_and_reported_incomplete_or_failed(tmp_path):
    """The orchestration without pytest: a step's process group is killed at its deadline, and the
    lane is 'incomplete' (no failure seen, the running test named) or 'failed' (a failure seen)."""
    args = G.build_parser().parse_args(["--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")])
    args.argv = []
    check = G.Check(args)
    progress = tmp_path / "work" / "lane-triton.progress"
    progress.write_text(json.dumps({"start": "tests/x.py::test_slow"}) + "\n")
    p = G.Proc(["bash", "-c", "sleep 60 & sleep 60"], check.logfile("lane-triton.log"), dict(os.environ))
    rc = p.wait(0.5)
    assert rc == 124 and p.timed_out and p.p.poll() is not None
    check.record_lane("lane-triton", p, rc)
    step = check.steps[-1]
    assert step["status"] == "incomplete" and "test_slow" in step["reason"], step
    with open(progress, "a") as f:
        f.write(json.dumps({"nodeid": "tests/x.py::test_bad", "when": "call", "outcome": "failed"}) + "\n")
    check.record_lane("lane-triton", p, rc)
    assert check.steps[-1]["status"] == "failed" and "test_bad" in check.steps[-1]["reason"]
    assert (tmp_path / "out" / "logs.tar.gz").exists()


SANITIZER_CLEAN = ("========= COMPUTE-SANITIZER\nSUBSET PASSED 24 checks on native, triton\n"
                   "========= ERROR SUMMARY: 0 errors\n")
SANITIZER_OOB = ("========= COMPUTE-SANITIZER\n========= Invalid __global__ read of size 8 bytes\n"
                 "=========     at q_sample_kernel(QSampleArgs)+0x1c0\n"
                 "SUBSET PASSED 24 checks on native\n========= ERROR SUMMARY: 3 errors\n")
SANITIZER_REFUSED = ("========= COMPUTE-SANITIZER\n========= Error: Device not supported\n"
                     "RuntimeError: CUDA error: unspecified launch failure (error 999)\n")


def test_sanitizer_output():
    assert G.parse_sanitizer(0, SANITIZER_CLEAN) == ("passed", "0 errors")
    status, reason = G.parse_sanitizer(7, SANITIZER_OOB)
    assert status == "failed" and "3 error" in reason and "Invalid __global__ read" in reason
    assert G.parse_sanitizer(1, SANITIZER_REFUSED)[0] == "unavailable"
    assert G.parse_sanitizer(1, "SUBSET FAILED 2 of 24 checks\n========= ERROR SUMMARY: 0 errors\n")[0] == "failed"
    assert G.parse_sanitizer(0, "SUBSET SKIPPED: no library backend\n========= ERROR SUMMARY: 0 errors")[0] == \
        "unavailable"
    assert G.parse_sanitizer(1, "Traceback ...\nImportError: x")[0] == "error"
    race = SANITIZER_CLEAN.replace("0 errors", "1 errors").replace(
        "SUBSET", "========= Error: Race reported between Write access at 0x10 in loss_kernel\nSUBSET")
    assert G.parse_sanitizer(7, race)[0] == "failed"


def test_ncu_csv():
    text = ('==PROF== Connected to process 1\n'
            '"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size",'
            '"Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"\n'
            '"0","1","python3","h","q_sample_kernel<float>(QSampleArgs)","1","7","(256, 1, 1)","(65536, 1, 1)","0",'
            '"9.0","Command line profiler metrics","dram__throughput.avg.pct_of_peak_sustained_elapsed","%","91.25"\n'
            '"0","1","python3","h","q_sample_kernel<float>(QSampleArgs)","1","7","(256, 1, 1)","(65536, 1, 1)","0",'
            '"9.0","Command line profiler metrics","gpu__time_duration.sum","usecond","31,04"\n'
            '"1","1","python3","h","_q_sample_kernel","1","7","(128, 1, 1)","(16384, 1, 1)","0","9.0",'
            '"Command line profiler metrics","dram__bytes_read.sum","Mbyte","67.11"\n')
    k = G.parse_ncu_csv(text)
    assert [x["kernel"] for x in k] == ["q_sample_kernel<float>(QSampleArgs)", "_q_sample_kernel"]
    assert k[0]["metrics"]["dram__throughput.avg.pct_of_peak_sustained_elapsed"]["value"] == 91.25
    assert k[0]["metrics"]["gpu__time_duration.sum"]["unit"] == "usecond"
    assert G.parse_ncu_csv("==ERROR== LibraryNotLoaded") == []


def test_bench_flags_are_negotiated():
    help_text = "usage: bench [--device {cpu,cuda}] [--ops OP [OP ...]] [--json PATH]\n  --no-compile\n"
    argv, notes = G.negotiate_bench_args([("--device", ["cuda"]), ("--ops", ["q_sample"]), ("--plot", ["a.png"]),
                                          ("--no-compile", []), ("--json", ["b.json"])], help_text)
    assert argv == ["--device", "cuda", "--ops", "q_sample", "--no-compile", "--json", "b.json"]
    assert len(notes) == 1 and "--plot" in notes[0]
    # an argparse rejection drops that argument (a flag, or one value of a flag)
    cmd = ["py", "-m", "ddpm_fast", "bench", "--device", "cuda", "--no-compile", "--dtype", "fp32", "bf16"]
    fixed, note = G.drop_rejected_arg(cmd, "bench: error: unrecognized arguments: --no-compile")
    assert fixed == ["py", "-m", "ddpm_fast", "bench", "--device", "cuda", "--dtype", "fp32", "bf16"] and note
    fixed, note = G.drop_rejected_arg(cmd, "error: argument --dtype: invalid choice: 'bf16' (choose from 'fp32')")
    assert fixed == cmd[:-1] and "bf16" in note
    assert G.drop_rejected_arg(cmd, "error: something else")[0] is None


def _row(op, shape, dtype, provider, ms, kind="library", pct=None, gbps=None):
    r = {"op": op, "shape": list(shape), "numel": math.prod(shape), "dtype": dtype, "provider": provider,
         "kind": kind, "status": "ok", "ms": ms}
    if pct is not None:
        r["pct_copy"], r["gbps"] = pct, gbps or pct * 43.0
    return r


def test_bench_verdicts_read_the_rows():
    large = (64, 4, 256, 256)
    data = {"copy": {"gbps": 4300.0}, "results": [
        _row("q_sample", large, "fp32", "native", 0.05, pct=90.0),
        _row("q_sample", large, "fp32", "triton", 0.06, pct=80.0),
        _row("ddpm_step", large, "fp32", "triton", 0.09, pct=70.0),
        _row("q_sample", large, "bf16", "native", 0.03, pct=60.0),
        _row("ddpm_step", (4, 4, 64, 64), "fp32", "native", 0.01),
        _row("ddpm_step", (4, 4, 64, 64), "fp32", "diffusers DDPM.step", 0.25, kind="baseline"),
        {"op": "ddpm_step", "shape": list(large), "dtype": "bf16", "provider": "native", "status": "error",
         "reason": "boom", "kind": "library"},
    ]}
    v = {t["name"]: t for t in G.bench_verdicts(data)}
    q32 = next(t for n, t in v.items() if n.startswith("q_sample") and "fp32" in n)
    assert q32["verdict"] == "met" and q32["value"] == 90.0 and "native" in q32["text"]
    s32 = next(t for n, t in v.items() if n.startswith("ddpm_step >=") and "fp32" in n)
    assert s32["verdict"] == "NOT met" and s32["value"] == 70.0
    assert next(t for n, t in v.items() if n.startswith("q_sample") and "bf16" in n)["verdict"] == "reported"
    assert next(t for n, t in v.items() if n.startswith("ddpm_step >=") and "bf16" in n)["verdict"] == "not measured"
    d = next(t for n, t in v.items() if "diffusers" in n)
    assert d["verdict"] == "reported" and abs(d["value"] - 25.0) < 1e-9 and "25.00x faster" in d["text"]
    # the bench's own threshold for the diffusers comparison is used when it states one
    data["targets"] = [{"op": "ddpm_step", "shape": [4, 4, 64, 64], "dtype": "fp32", "what": "x diffusers DDPM.step",
                        "target": 30.0}]
    d = next(t for t in G.bench_verdicts(data) if "diffusers" in t["name"])
    assert d["verdict"] == "NOT met" and d["threshold"] == 30.0
    assert all(t["verdict"] == "not measured" and "why" in t["text"] for t in G.bench_verdicts(None, "why"))


# ================================================================================================
# part 2: the GPU lane
# ================================================================================================
ON_CPU = os.environ.get("DDPM_FAST_GPU_LANE_ON_CPU", "") == "1"
DEV = torch.device("cpu" if ON_CPU else "cuda")
needs_cuda = pytest.mark.skipif(not ON_CPU and not torch.cuda.is_available(),
                                reason="needs a CUDA device (none visible to torch): the GPU lane of "
                                       "benchmarks/gpu_check.sh")
cuda_only = pytest.mark.skipif(ON_CPU or not torch.cuda.is_available(),
                               reason="needs a CUDA device (not the CPU self-check of the lane)")

TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2.0 ** -10, 1e-5), torch.bfloat16: (2.0 ** -7, 1e-5)}
SCHED = F.NoiseSchedule.from_name("linear", 1000)
COSINE = F.NoiseSchedule.from_name("squaredcos_cap_v2", 1000)
PREDICTIONS = ("epsilon", "sample", "v_prediction")
VARIANCES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")
CLIPS = {"none": dict(clip_sample=False), "clip": dict(clip_sample=True, clip_sample_range=1.5),
         "threshold": dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=2.5)}
OPS = ("gaussian_noise", "q_sample", "ddpm_step", "ddim_step", "ddim_reverse_step", "diffusion_loss", "vlb_loss",
       "hybrid_loss")


def variants(backend, *axes):
    """The cross product of the option axes for compiled-once kernels (native); for Triton, which
    compiles (and autotunes) one kernel per constexpr combination at first use, a covering set: every
    value of every axis at least once (tests/triton has the full product)."""
    import itertools
    if backend != "triton":
        return list(itertools.product(*axes))
    n = max(len(a) for a in axes)
    return list(dict.fromkeys(tuple(a[(i + k) % len(a)] for k, a in enumerate(axes)) for i in range(n)))


def _lane_backends():
    out = []
    info = F.backends()
    for name in ("native", "triton"):
        ok = info[name]["available"].get(DEV.type, False)
        marks = [] if ok else [pytest.mark.skip(reason=f"backend {name!r} unavailable on {DEV.type}: "
                                                       f"{info[name]['reason']}")]
        out.append(pytest.param(name, marks=marks, id=name))
    return out


BACKENDS = _lane_backends()


def close(got, want, dtype=None, what=""):
    dtype = dtype or want.dtype
    rtol, atol = TOL.get(dtype, TOL[torch.float32])
    assert got.shape == want.shape, (what, got.shape, want.shape)
    torch.testing.assert_close(got.detach().double().cpu(), want.detach().double().cpu(), rtol=rtol, atol=atol,
                               equal_nan=True, msg=lambda m: f"{what}: {m}")


def rnd(*shape, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEV)


def T(*values):
    return torch.tensor(values, dtype=torch.int64, device=DEV)


def step_inputs(shape, variance, dtype, guidance=False, seed=1):
    mo_shape = list(shape)
    learned = variance in ("learned", "learned_range")
    if learned:
        mo_shape[1] *= 2
    if guidance:
        mo_shape[0] *= 2
    mo = rnd(*mo_shape, seed=seed, scale=2.0).float()
    if learned:
        C = shape[1]
        v = torch.rand(mo[:, C:].shape, generator=torch.Generator().manual_seed(seed + 1)).to(DEV)
        mo[:, C:] = v * 2 - 1 if variance == "learned_range" else mo[:, C:] - 3
    return mo.to(dtype), rnd(*shape, seed=seed + 2, scale=2.0, dtype=dtype)


def both(fn, backend, *args, **kw):
    return fn(*args, backend=backend, **kw), fn(*args, backend="reference", **kw)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_op_matches_reference_on_the_device(backend, op, dtype):
    """Every public op, its variants, and its gradients on the device against the reference."""
    t = T(999, 0, 437)
    if op == "gaussian_noise":
        for shape, seed in (((3, 5, 7), 0x123456789AB), ((4, 33), T(7, 1 << 40, 3, 12345)), ((1,), 0)):
            got = F.gaussian_noise(shape, seed, offset=11, device=DEV, dtype=dtype, backend=backend)
            want = gaussian_noise_reference(shape, seed.cpu() if isinstance(seed, torch.Tensor) else seed, 11,
                                            dtype=torch.float64).to(dtype)
            close(got, want, dtype, f"noise {shape}")
    elif op == "q_sample":
        x0 = rnd(3, 5, 7, 9, dtype=dtype).requires_grad_()
        for kw in (dict(seed=5, offset=3), dict(seed=T(1, 2, 3), offset=1), dict(noise=rnd(3, 5, 7, 9, seed=4,
                                                                                           dtype=dtype))):
            a, b = both(F.q_sample, backend, x0, t, SCHED, **kw)
            close(a, b, dtype, f"q_sample {list(kw)}")
        x0s = rnd(6, 8, dtype=dtype).t()   # non-contiguous
        close(*both(F.q_sample, backend, x0s, T(*range(0, 1000, 125)), SCHED, seed=2), dtype, "q_sample strided")
        grads = []
        for b in (backend, "reference"):
            x = x0.detach().clone().requires_grad_()
            F.q_sample(x, t, SCHED, seed=5, backend=b).pow(2).sum().backward()
            grads.append(x.grad)
        close(*grads, dtype, "q_sample grad")
    elif op == "ddpm_step":
        for pred, var, clip in variants(backend, PREDICTIONS, VARIANCES, tuple(CLIPS)):
            mo, xt = step_inputs((3, 2, 5, 7), var, dtype)
            a, b = both(F.ddpm_step, backend, mo, t, xt, SCHED, prediction_type=pred, variance_type=var,
                        seed=T(3, 4, 5), offset=1, return_x0=True, **CLIPS[clip])
            close(a[0], b[0], dtype, f"ddpm {pred} {var} {clip}")
            close(a[1], b[1], dtype, f"ddpm x0 {pred} {var} {clip}")
        for var in ("fixed_small", "learned_range"):   # guidance, respaced, explicit noise
            mo, xt = step_inputs((2, 3, 4, 5), var, dtype, guidance=True)
            sched = COSINE.respace(F.space_timesteps(1000, "50"))
            close(*both(F.ddpm_step, backend, mo, T(49, 10), xt, sched, prev_t=T(40, -1), variance_type=var,
                        guidance_scale=7.5, noise=rnd(2, 3, 4, 5, seed=9, dtype=dtype), thresholding=True,
                        sample_max_value=3.0), dtype, f"ddpm guidance {var}")
        mo, xt = step_inputs((2, 2, 3, 3), "learned_range", dtype)
        leaves = {}
        for b in (backend, "reference"):
            m, x = mo.clone().requires_grad_(), xt.clone().requires_grad_()
            prev, x0 = F.ddpm_step(m, T(600, 1), x, SCHED, variance_type="learned_range", seed=T(4, 5), offset=1,
                                   return_x0=True, backend=b)
            (prev.float().sin().sum() + (x0.float() * 0.5).sum()).backward()
            leaves[b] = (m.grad, x.grad)
        for g1, g2 in zip(leaves[backend], leaves["reference"]):
            close(g1, g2, dtype, "ddpm grad")
        out = xt.clone()   # in place
        F.ddpm_step(mo[:, :2], T(600, 1), out, SCHED, seed=2, out=out, backend=backend)
        close(out, F.ddpm_step(mo[:, :2], T(600, 1), xt, SCHED, seed=2, backend="reference"), dtype, "ddpm out=x_t")
    elif op == "ddim_step":
        for pred, eta, use_clipped, clip in variants(backend, PREDICTIONS, (0.0, 0.7), (False, True), tuple(CLIPS)):
            mo, xt = step_inputs((3, 2, 5, 7), "fixed_small", dtype)
            a, b = both(F.ddim_step, backend, mo, t, xt, SCHED, prev_t=T(979, -1, 400), eta=eta,
                        prediction_type=pred, use_clipped_model_output=use_clipped, seed=T(1, 2, 3), offset=2,
                        return_x0=True, final_alpha_cumprod=float(SCHED.alphas_cumprod[0]), **CLIPS[clip])
            close(a[0], b[0], dtype, f"ddim {pred} {eta} {use_clipped} {clip}")
            close(a[1], b[1], dtype, f"ddim x0 {pred} {eta} {use_clipped} {clip}")
        mo, xt = step_inputs((2, 3, 4, 4), "fixed_small", dtype, guidance=True)
        close(*both(F.ddim_step, backend, mo, T(500, 20), xt, SCHED, prev_t=T(480, 0), eta=0.5, seed=4,
                    guidance_scale=3.0), dtype, "ddim guidance")
    elif op == "ddim_reverse_step":
        for pred, use_clipped in variants(backend, PREDICTIONS, (False, True)):
            mo, xt = step_inputs((3, 2, 5, 7), "fixed_small", dtype)
            a, b = both(F.ddim_reverse_step, backend, mo, T(10, 0, 400), xt, SCHED, next_t=T(30, 20, 999),
                        prediction_type=pred, use_clipped_model_output=use_clipped, return_x0=True)
            close(a[0], b[0], dtype, f"reverse {pred} {use_clipped}")
            close(a[1], b[1], dtype, f"reverse x0 {pred} {use_clipped}")
    elif op == "diffusion_loss":
        x0 = rnd(4, 3, 5, 7, dtype=dtype, seed=3)
        tt = T(0, 10, 500, 999)
        w = torch.tensor([0.3, -1.0, 2.0, 0.5], device=DEV)
        for target, gamma in variants(backend, PREDICTIONS, (None, 5.0)):
            ms = [rnd(4, 3, 5, 7, dtype=dtype, seed=4).requires_grad_() for _ in range(2)]
            losses = [F.diffusion_loss(m, x0, tt, SCHED, target=target, snr_gamma=gamma, seed=T(1, 2, 3, 4),
                                       offset=6, reduction="none", backend=b)
                      for m, b in zip(ms, (backend, "reference"))]
            close(losses[0], losses[1], torch.float32, f"loss {target} {gamma}")
            for lo in losses:
                (lo * w).sum().backward()
            close(ms[0].grad, ms[1].grad, dtype, f"loss grad {target} {gamma}")
        long_x0 = rnd(2, 2, 70001, dtype=dtype, seed=5)   # rows reduced in several blocks
        long_mo = rnd(2, 2, 70001, dtype=dtype, seed=6)
        close(*both(F.diffusion_loss, backend, long_mo, long_x0, T(3, 900), SCHED, seed=1, reduction="none"),
              torch.float32, "loss long rows")
    elif op == "vlb_loss":
        # The decoder NLL at t = 0 cancels in fp32 (improved-diffusion's form, kept by the reference);
        # a kernel may evaluate it in a stable form, so the loss is held to the float64 reference: at
        # least as close to it as the fp32 reference is, plus 1e-5 of its scale.
        x0 = (torch.rand(4, 2, 4, 5, generator=torch.Generator().manual_seed(2)) * 2 - 1).to(dtype).to(DEV)
        tt = T(0, 1, 300, 999)
        xt = F.q_sample(x0, tt, SCHED, seed=5, backend="reference")
        for pred, var in variants(backend, PREDICTIONS, VARIANCES):
            mo, _ = step_inputs((4, 2, 4, 5), var, dtype)
            mo = (mo.float() * 0.3).to(dtype)
            kw = dict(prediction_type=pred, variance_type=var, reduction="none")
            ms = [mo.clone().requires_grad_() for _ in range(2)]
            got, want = [F.vlb_loss(m, x0, xt, tt, SCHED, backend=b, **kw) for m, b in zip(ms, (backend, "reference"))]
            want64 = F.vlb_loss(mo.double(), x0.double(), xt.double(), tt, SCHED, backend="reference", **kw)
            ref_err = (want.detach().double() - want64).abs()
            err = (got.detach().double() - want64).abs()
            assert bool((err <= ref_err + 1e-5 * want64.abs().clamp(min=1.0)).all()), \
                (f"vlb {pred} {var}", got, want, want64)
            got.sum().backward()
            want.sum().backward()
            g, r = ms[0].grad.double(), ms[1].grad.double()
            rtol = TOL[dtype][0]
            assert bool(((g - r).abs() <= 1e-5 * max(1.0, float(r.abs().max())) + rtol * r.abs()).all()), \
                f"vlb grad {pred} {var}: worst {float((g - r).abs().max()):.3g}"
    elif op == "hybrid_loss":
        x0 = (torch.rand(2, 3, 4, 5, generator=torch.Generator().manual_seed(1)) * 2 - 1).to(dtype).to(DEV)
        res = []
        for b in (backend, "reference"):
            mo = (rnd(2, 6, 4, 5, seed=2, dtype=dtype) * 0.5).requires_grad_()
            loss = F.hybrid_loss(mo, x0, T(0, 600), SCHED, seed=3, offset=1, backend=b)
            loss.backward()
            res.append((loss.detach(), mo.grad))
        assert abs(float(res[0][0]) - float(res[1][0])) <= 1e-4 * max(1.0, abs(float(res[1][0])))
        close(res[0][1], res[1][1], dtype, "hybrid grad")


@needs_cuda
@pytest.mark.parametrize("backend", BACKENDS)
def test_lane_noise_known_answers_on_the_device(backend):
    """The frozen noise contract's known answers, drawn on the device (docs/noise.md)."""
    got = F.gaussian_noise((4,), 0, offset=0, device=DEV, backend=backend).cpu()
    want = [0.9911375, -0.9246628, -0.6176091, -0.4820683]
    assert max(abs(a - b) for a, b in zip(got.tolist(), want)) < 1e-5, got
    got = F.gaussian_noise((6,), 0x123456789AB, offset=7, device=DEV, backend=backend).cpu()
    want = [1.6177623, 0.6978294, 0.6346602, -0.0150390, -1.1643815, -2.3782302]
    assert max(abs(a - b) for a, b in zip(got.tolist(), want)) < 1e-5, got
    # row 0 does not depend on the batch size; per-row seeds restart the index
    a = F.gaussian_noise((1, 37), 9, offset=2, device=DEV, backend=backend)
    b = F.gaussian_noise((5, 37), 9, offset=2, device=DEV, backend=backend)
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
    per = F.gaussian_noise((3, 37), T(9, 9, 4), offset=2, device=DEV, backend=backend)
    torch.testing.assert_close(per[0], a[0], rtol=0, atol=0)
    torch.testing.assert_close(per[1], a[0], rtol=0, atol=0)
    # the far end of the uniforms: a large draw is finite, and standard
    z = F.gaussian_noise((1 << 22 if DEV.type == "cuda" else 1 << 14,), 99, offset=0, device=DEV, backend=backend)
    assert bool(torch.isfinite(z).all())
    tol = 10 / math.sqrt(z.numel())   # ten standard errors
    assert abs(float(z.mean())) < tol and abs(float(z.std()) - 1) < tol


@cuda_only
@pytest.mark.parametrize("backend", BACKENDS)
def test_lane_out_of_range_device_t_gives_nan_rows(backend):
    """A device-tensor t (or prev_t) outside the table is not checked on the host (that would be a
    sync): its row comes out NaN, the other rows are untouched, nothing reads outside the table."""
    x0, mo = rnd(3, 2, 4, 5, seed=1).clamp(-1, 1), rnd(3, 2, 4, 5, seed=2)
    bad = T(5, 1000, 10 ** 12)
    for t in (bad, T(5, -1, -(10 ** 12))):
        x = F.q_sample(x0, t, SCHED, seed=1, backend=backend)
        assert bool(torch.isfinite(x[0]).all()) and bool(torch.isnan(x[1:]).all()), "q_sample"
        loss = F.diffusion_loss(mo, x0, t, SCHED, seed=1, reduction="none", backend=backend)
        assert bool(torch.isfinite(loss[0])) and bool(torch.isnan(loss[1:]).all()), "diffusion_loss"
    x, _ = F.ddpm_step(mo, bad, x0, SCHED, prev_t=T(4, 999, 999), seed=1, return_x0=True, backend=backend)
    assert bool(torch.isfinite(x[0]).all()) and bool(torch.isnan(x[1:]).all()), "ddpm_step"
    x = F.ddim_step(mo, bad, x0, SCHED, prev_t=T(4, 900, 900), eta=0.5, seed=1, backend=backend)
    assert bool(torch.isfinite(x[0]).all()) and bool(torch.isnan(x[1:]).all()), "ddim_step"
    x = F.ddpm_step(mo, T(5, 6, 7), x0, SCHED, prev_t=T(4, 2000, 5), seed=1, backend=backend)
    assert bool(torch.isfinite(x[0]).all()) and bool(torch.isnan(x[1]).all()), "ddpm_step prev_t past the table"
    mo2 = torch.cat([mo, mo.clamp(-1, 1)], 1)
    v = F.vlb_loss(mo2, x0, x0, bad, SCHED, reduction="none", backend=backend)
    assert bool(torch.isfinite(v[0])) and bool(torch.isnan(v[1:]).all()), "vlb_loss"


@cuda_only
@pytest.mark.parametrize("backend", BACKENDS)
def test_lane_no_host_sync_per_step(backend):
    """One training step and one sampling step with device-tensor t, seed and offset, under
    torch.cuda.set_sync_debug_mode("error"): any host-device sync raises."""
    x0 = rnd(8, 4, 16, 16)
    mo = rnd(8, 4, 16, 16, seed=1).requires_grad_()
    t, prev = T(*range(900, 100, -100)), T(*range(899, 99, -100))
    seed = torch.tensor(7, dtype=torch.int64, device=DEV)
    off = torch.zeros((), dtype=torch.int64, device=DEV)
    x = x0.clone()

    def one_step():
        x_t = F.q_sample(x0, t, SCHED, seed=seed, offset=off, backend=backend)
        loss = F.diffusion_loss(mo, x0, t, SCHED, seed=seed, offset=off, backend=backend)
        loss.backward()
        F.ddpm_step(mo.detach(), t, x, SCHED, prev_t=prev, seed=seed, offset=off, out=x, backend=backend)
        F.ddim_step(mo.detach(), t, x_t, SCHED, prev_t=prev, eta=0.5, seed=seed, offset=off, backend=backend)
        F.ddpm_step(mo.detach(), 500, x, SCHED, seed=seed, offset=off, backend=backend)   # a host int t
        off.add_(1)

    one_step()   # warm-up: module loads, Triton's compiles and autotuning (which syncs), the table copy
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            one_step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert bool(torch.isfinite(x).all())


class _Lin(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.W = torch.nn.Parameter(torch.randn(2, 2, generator=g) * 0.3)

    def forward(self, x, t):
        return x @ self.W + (t.to(x.dtype) / 1000.0)[:, None]


@cuda_only
@pytest.mark.parametrize("backend", BACKENDS)
def test_lane_sample_cuda_graph_draws_fresh_noise_on_every_replay(backend, monkeypatch):
    """sample() with the loop captured in a CUDA graph gives the eager trajectory, and the eager one
    is the hand-written loop of the contract (x_T at offset 0, step i at offset 1 + i): so each replay
    drew its own noise. No host sync while eager sampling runs."""
    monkeypatch.setenv("DDPM_FAST_BACKEND", backend)
    S = F.NoiseSchedule.from_name("linear", 40)
    model = _Lin().to(DEV)
    shape = (16, 2)
    with torch.no_grad():
        xg, trg = F.sample(model, shape, S, None, seed=8, progress=False, cuda_graph=True, return_trajectory=True)
        xe, tre = F.sample(model, shape, S, None, seed=8, progress=False, cuda_graph=False, return_trajectory=True)
        torch.testing.assert_close(trg, tre, rtol=1e-6, atol=1e-6)
        x = F.gaussian_noise(shape, 8, offset=0, device=DEV, backend="reference")
        hand = [x]
        for i, t in enumerate(range(39, -1, -1)):
            x = F.ddpm_step(model(x, torch.full((16,), t, device=DEV)), t, x, S, seed=8, offset=1 + i,
                            clip_sample=False, backend="reference")
            hand.append(x)
        torch.testing.assert_close(tre, torch.stack(hand), rtol=1e-4, atol=1e-4)
        # consecutive replays drew different noise: the noise part of two steps differs
        steps = trg[1:] - trg[:-1]
        assert not torch.allclose(steps[5], steps[6])
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            again = F.sample(model, shape, S, None, seed=8, progress=False, cuda_graph=False)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    torch.testing.assert_close(again, xe, rtol=0, atol=0)


@cuda_only
@pytest.mark.parametrize("backend", BACKENDS)
def test_lane_long_rows_and_indices_past_2_31(backend):
    """Thresholding over a row longer than 2^24 (torch.quantile refuses those), and the noise of
    element indices past 2^31 (int64 indexing) in fp16."""
    n = (1 << 24) + 5
    mo, xt = rnd(1, n, seed=1), rnd(1, n, seed=2)
    close(*both(F.ddpm_step, backend, mo, 500, xt, SCHED, seed=3, thresholding=True, sample_max_value=3.0),
          torch.float32, "threshold 2^24+5")
    free, _ = torch.cuda.mem_get_info()
    big = 2 ** 31 + 8
    if free < 4 * big * 2:
        pytest.skip(f"needs {4 * big * 2 / 2**30:.0f} GiB of free GPU memory, {free / 2**30:.0f} free")
    x0 = torch.zeros((1, big), dtype=torch.float16, device=DEV)
    x_t = F.q_sample(x0, 999, SCHED, seed=3, offset=1, backend=backend)
    idx = torch.tensor([0, 2 ** 31 - 1, 2 ** 31, big - 1], dtype=torch.int64)
    want = normals_at(idx, 3, 1) * math.sqrt(1 - float(SCHED.alphas_cumprod[999]))
    close(x_t[0, idx.to(DEV)], want.to(torch.float16), torch.float16, "q_sample past 2^31")
    del x0, x_t


@cuda_only
def test_lane_native_opcheck_on_the_device():
    """torch.library.opcheck of the native CUDA ops: schema, fake tensors, autograd registration."""
    if not F.backends()["native"]["available"].get("cuda"):
        pytest.skip("native CUDA unavailable: " + F.backends()["native"]["reason"])
    ops = torch.ops.ddpm_fast
    abar = SCHED.table(DEV)
    x = rnd(2, 3, 4)
    mo = rnd(2, 3, 4, seed=1).requires_grad_()
    mo2 = rnd(2, 6, 4, seed=2).requires_grad_()
    t, pt, seed, off = T(5, 300), T(4, 200), T(3), T(1)
    clip = (True, 1.0, False, 0.995, 1.0, None, True)
    cases = [
        (ops.gaussian_noise, ([2, 3], seed, off, torch.float32)),
        (ops.q_sample, (rnd(2, 3, 4, seed=3).requires_grad_(), t, abar, None, seed, off)),
        (ops.ddpm_step, (mo, t, pt, x.clone().requires_grad_(), abar, None, seed, off, "epsilon", "fixed_small")
         + clip),
        (ops.ddpm_step, (mo2, t, pt, x, abar, None, seed, off, "v_prediction", "learned_range") + clip),
        (ops.ddim_step, (mo, t, pt, x, abar, None, seed, off, 0.5, "epsilon", False, 1.0) + clip),
        (ops.diffusion_loss, (mo, x, t, abar, None, seed, off, "v_prediction", 5.0)),
        (ops.vlb_loss, (mo2, x.clamp(-1, 1), x, t, abar, "epsilon", "learned_range")),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_an_installed_package_is_refused_with_the_reason(tmp_path, monkeypatch, capsys):
    """From a wheel, the tools folder's parent is site-packages, not a checkout: gpucheck says so
    instead of looking for tests and sources there."""
    monkeypatch.setattr(G, "ROOT", str(tmp_path))
    assert G.main(["--dry", "--out", str(tmp_path / "out")]) == G.EXIT_USAGE
    assert "source checkout" in capsys.readouterr().err
