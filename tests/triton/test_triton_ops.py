"""What is particular to the Triton backend: availability and dispatch, the noise helpers inside
a kernel (Philox counter words, the quad path, Box-Muller at the uniform's ends), the flat grid,
the sm_90 compile check, and the GPU-only paths (torch.compile, CUDA graphs, native parity, int64
indexing, opcheck). Its parity with the reference, op by op, is the shared suite
(tests/parity_cases.py, run for triton by tests/triton/test_parity_triton.py).

Runs in its own process: ``TRITON_INTERPRET=1 python -m pytest tests/triton -q`` (the variable is
read when Triton kernels are decorated, so it cannot be switched inside a session that already
imported them). On CPU it needs TRITON_INTERPRET=1; on a CUDA machine it runs the compiled kernels
on the GPU (and the GPU-only tests at the bottom)."""
from __future__ import annotations

import importlib
import math
import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "") == "1"
CUDA = torch.cuda.is_available()

if not (INTERPRET or CUDA):
    _why = ("the Triton lane needs TRITON_INTERPRET=1 (CPU, its own process: "
            "TRITON_INTERPRET=1 python -m pytest tests/triton -q) or a CUDA device")
    print(f"SKIP tests/triton: {_why}")
    pytest.skip(_why, allow_module_level=True)

try:
    import triton  # noqa: F401
    import triton.language as tl
except Exception as e:  # pragma: no cover
    print(f"SKIP tests/triton: triton is not importable ({e})")
    pytest.skip(f"triton is not importable ({e})", allow_module_level=True)

import ddpm_fast as F  # noqa: E402
import parity_cases as P  # noqa: E402
from ddpm_fast.noise import normals_at as normals_at_reference  # noqa: E402
from ddpm_fast.backends.triton import _helpers as H  # noqa: E402
from parity_cases import SCHED as SCHEDULE, SHAPE, VARIANCES, Lane, seeded_step_inputs  # noqa: E402

DEVICE = torch.device("cuda" if (CUDA and not INTERPRET) else "cpu")
TRITON = Lane("triton", DEVICE, large=not INTERPRET)
importlib.import_module("ddpm_fast.backends.triton")._load()  # registers torch.ops.ddpm_fast_triton (used directly below)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
gen, T = TRITON.gen, TRITON.T


def assert_close(op, got, want, dtype=torch.float32, atol=P.ATOL):
    """The shared rule (parity_cases.assert_close) at ``dtype``'s rounding unit; ``want`` may be a
    float64 oracle."""
    P.assert_close(got, want, dtype, atol=atol, op=op, check_dtype=False)


def _ddpm_inputs(variance_type, guidance, dtype=torch.float32, shape=SHAPE, seed=0):
    return seeded_step_inputs(TRITON, variance_type, guidance, dtype, shape, seed)

# Largest error seen per (op, dtype), printed at the end of the session (the closing note's table).


# --------------------------------------------------------------------------------------------
# availability and dispatch
# --------------------------------------------------------------------------------------------
def test_backends_report_triton():
    info = F.backends()["triton"]
    if INTERPRET:
        assert info["available"]["cpu"] is True
        assert "TRITON_INTERPRET=1" in info["reason"]
    assert info["available"]["cuda"] == CUDA


def test_backend_none_never_picks_triton_on_cpu():
    from ddpm_fast.backends import resolve_backend
    old = os.environ.pop("DDPM_FAST_BACKEND", None)
    try:
        assert resolve_backend(None, torch.device("cpu"), torch.float32).NAME != "triton"
    finally:
        if old is not None:
            os.environ["DDPM_FAST_BACKEND"] = old


def test_fp64_refused_by_name():
    x0 = gen(*SHAPE, dtype=torch.float64)
    with pytest.raises(F.BackendUnavailable):
        F.q_sample(x0, 3, SCHEDULE, seed=1, backend="triton")


# --------------------------------------------------------------------------------------------
# the noise helpers inside a kernel
# --------------------------------------------------------------------------------------------


@triton.jit
def _normals_at_kernel(idx_ptr, out_ptr, seed, offset, n, BLOCK: tl.constexpr, USE_LIBDEVICE: tl.constexpr):
    i = tl.arange(0, BLOCK)
    m = i < n
    idx = tl.load(idx_ptr + i, mask=m, other=0)
    z = H.normals_at(seed.to(tl.int64), offset.to(tl.int64), idx, USE_LIBDEVICE)
    tl.store(out_ptr + i, z, mask=m)


@triton.jit
def _normals_aligned_kernel(out_ptr, seed, offset, base, BLOCK: tl.constexpr, USE_LIBDEVICE: tl.constexpr):
    z = H.normals_aligned(seed.to(tl.int64), offset.to(tl.int64), base.to(tl.int64), BLOCK, USE_LIBDEVICE)
    tl.store(out_ptr + tl.arange(0, BLOCK), z)


@triton.jit
def _box_muller_kernel(ra_ptr, rb_ptr, out_ptr, n, BLOCK: tl.constexpr, USE_LIBDEVICE: tl.constexpr):
    i = tl.arange(0, BLOCK)
    m = i < n
    ra = tl.load(ra_ptr + i, mask=m, other=0).to(tl.uint32)
    rb = tl.load(rb_ptr + i, mask=m, other=0).to(tl.uint32)
    c, s = H.box_muller(ra, rb, USE_LIBDEVICE)
    tl.store(out_ptr + i, c, mask=m)
    tl.store(out_ptr + n + i, s, mask=m)


def test_noise_index_past_2_32():
    """i = 4 * 2^32 + 3 uses the high counter word (c1): the docs/noise.md known answer +0.3931865."""
    idx = torch.tensor([17179869187, 4, 5, 0], dtype=torch.int64, device=DEVICE)
    out = torch.empty(4, dtype=torch.float32, device=DEVICE)
    _normals_at_kernel[(1,)](idx, out, 0x123456789AB, 7, 4, BLOCK=4, USE_LIBDEVICE=H.use_libdevice(DEVICE))
    assert_close("gaussian_noise", out, torch.tensor([0.3931865, -1.1643815, -2.3782302, 1.6177623],
                                                     dtype=torch.float64), atol=1e-5 + 5e-8)


@pytest.mark.parametrize("base", [0, 4 * 2 ** 32 - 8, 2 ** 62])
def test_quad_path_at_large_indices(base):
    """The one-Philox-per-quad path (normals interleaved back with join/reshape) at indices whose
    quad counter needs both 32-bit words."""
    out = torch.empty(16, dtype=torch.float32, device=DEVICE)
    _normals_aligned_kernel[(1,)](out, 0x123456789AB, 2 ** 40 + 3, base, BLOCK=16,
                                  USE_LIBDEVICE=H.use_libdevice(DEVICE))
    idx = base + torch.arange(16, dtype=torch.int64)
    assert_close("gaussian_noise", out, normals_at_reference(idx, 0x123456789AB, 2 ** 40 + 3), atol=1e-5)


def test_uniform_ends_give_finite_normals():
    """u(0xffffffff) = 1 - 2^-24: ln u = -5.96e-8 must stay negative (an approximate log can turn
    it positive and make the root NaN); u(0) = 2^-24 is the largest radius."""
    words = torch.tensor([0xFFFFFFFF, 0xFFFFFFFF, 0, 0, 0xFFFFFE00, 0x200], dtype=torch.int64)
    partners = torch.tensor([0, 0x40000000, 0, 0x12345678, 0xFFFFFFFF, 7], dtype=torch.int64)
    out = torch.empty(2 * len(words), dtype=torch.float32, device=DEVICE)
    _box_muller_kernel[(1,)](words.to(DEVICE), partners.to(DEVICE), out, len(words), BLOCK=8,
                             USE_LIBDEVICE=H.use_libdevice(DEVICE))
    from ddpm_fast.noise import box_muller
    c, s = box_muller(words, partners)
    want = torch.cat([c, s])
    assert bool(torch.isfinite(out).all())
    assert_close("gaussian_noise", out, want, atol=1e-5)


# --------------------------------------------------------------------------------------------
# GPU-only: torch.compile, CUDA graphs, native parity, int64 indexing
# --------------------------------------------------------------------------------------------
gpu = pytest.mark.skipif(not CUDA or INTERPRET, reason="needs a CUDA device and compiled Triton kernels "
                         "(not the interpreter)")


@gpu
def test_compile_fullgraph_over_triton_ops():
    """torch.compile(fullgraph=True) traces the registered ops (no graph break), forward and
    backward, and gives the eager results."""
    abar = SCHEDULE.table(DEVICE)
    mo, xt = _ddpm_inputs("learned_range", None)
    seed, off, t = T(7), T(3), T(500, 400)
    O = torch.ops.ddpm_fast_triton

    def step(mo, xt, off):
        x, _ = O.ddpm_step(mo, t, t - 1, xt, abar, None, seed, off, "epsilon", "learned_range", True, 1.0, True,
                           0.9, 2.0, None, False)
        x = O.q_sample(x, t, abar, None, seed, off)
        return O.diffusion_loss(x, xt, t, abar, None, seed, off, "v_prediction", 5.0).sum()

    compiled = torch.compile(step, fullgraph=True)
    mo1 = mo.clone().requires_grad_()
    mo2 = mo.clone().requires_grad_()
    a, b = compiled(mo1, xt, off), step(mo2, xt, off)
    assert_close("compile", a, b)
    a.backward()
    b.backward()
    assert_close("compile.grad", mo1.grad, mo2.grad)


@gpu
def test_cuda_graph_replay_draws_fresh_noise():
    mo, xt = _ddpm_inputs("fixed_small", None)
    offset = torch.zeros((), dtype=torch.int64, device=DEVICE)
    seed = torch.tensor(11, dtype=torch.int64, device=DEVICE)
    t = T(500, 400)
    out = torch.empty_like(xt)
    F.ddpm_step(mo, t, xt, SCHEDULE, seed=seed, offset=offset, out=out, backend="triton")  # warm up
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        F.ddpm_step(mo, t, xt, SCHEDULE, seed=seed, offset=offset, out=out, backend="triton")
        offset.add_(1)
    offset.zero_()
    results = []
    for _ in range(3):
        g.replay()
        results.append(out.clone())
    for k, r in enumerate(results):
        want = F.ddpm_step(mo, t, xt, SCHEDULE, seed=11, offset=k, backend="reference")
        assert_close("cuda_graph", r, want)
    assert not torch.equal(results[0], results[1])


@gpu
def test_parity_with_native_cuda():
    if not F.backends()["native"]["available"].get("cuda"):
        pytest.skip("native CUDA backend not available: " + F.backends()["native"]["reason"])
    for dtype in DTYPES:
        mo, xt = _ddpm_inputs("learned_range", 2.0, dtype, shape=(4, 4, 16, 16))
        kw = dict(variance_type="learned_range", guidance_scale=2.0, seed=T(1, 2, 3, 4), offset=5)
        got = F.ddpm_step(mo, T(900, 500, 100, 1), xt, SCHEDULE, backend="triton", **kw)
        want = F.ddpm_step(mo, T(900, 500, 100, 1), xt, SCHEDULE, backend="native", **kw)
        assert_close("native_parity", got, want, dtype)


@gpu
def test_int64_indexing_past_2_31_elements():
    n = 2 ** 31 + 8
    try:
        x0 = torch.zeros((1, n), dtype=torch.float16, device=DEVICE)
    except torch.cuda.OutOfMemoryError:
        pytest.skip("not enough GPU memory for 2^31 fp16 elements")
    x_t = F.q_sample(x0, 999, SCHEDULE, seed=3, offset=1, backend="triton")
    idx = torch.tensor([0, 2 ** 31 - 1, 2 ** 31, n - 1], dtype=torch.int64)
    abar = float(SCHEDULE.alphas_cumprod[999])
    want = normals_at_reference(idx, 3, 1) * math.sqrt(1 - abar)
    assert_close("q_sample", x_t[0, idx.to(DEVICE)].float(), want, torch.float16)


@gpu
def test_opcheck_triton_ops():
    """torch.library.opcheck: schema, fake tensors, autograd registration, AOT dispatch."""
    abar = SCHEDULE.table(DEVICE)
    mo, xt = _ddpm_inputs("fixed_small", None)
    seed, off, t = T(3), T(4), T(500, 20)
    O = torch.ops.ddpm_fast_triton
    torch.library.opcheck(O.q_sample, (xt, t, abar, None, seed, off))
    torch.library.opcheck(O.ddpm_step, (mo, t, t - 1, xt, abar, None, seed, off, "epsilon", "fixed_small", True, 1.0,
                                        False, 0.995, 1.0, None, True))
    torch.library.opcheck(O.ddim_step, (mo, t, t - 10, xt, abar, None, seed, off, 0.5, "epsilon", False, 1.0, True,
                                        1.0, False, 0.995, 1.0, None, False))
    torch.library.opcheck(O.diffusion_loss, (mo.requires_grad_(), xt, t, abar, None, seed, off, "epsilon", 5.0))


# --------------------------------------------------------------------------------------------
# the compiled path, without a GPU: every kernel compiled for sm_90 and its PTX inspected
# --------------------------------------------------------------------------------------------
def test_kernels_compile_for_sm90():
    """tests/triton/compile_sm90.py in a process without TRITON_INTERPRET: the interpreter runs the
    kernels' Python, so this is what catches type errors of the compiled path and approximate
    transcendental instructions (tl.sqrt/tl.exp lower to sqrt/ex2.approx; the kernels call
    libdevice and sqrt_rn instead)."""
    import subprocess
    import sys
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except Exception as e:
        pytest.skip(f"triton's NVIDIA backend is not installed: {e}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(__file__), "compile_sm90.py")
    r = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=600)
    if r.returncode != 0 and "ptxas" in (r.stderr + r.stdout) and "not found" in (r.stderr + r.stdout):
        pytest.skip("ptxas is not available to compile for sm_90")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "all kernels compiled for sm_90" in r.stdout


def test_device_timestep_out_of_range_poisons_its_row():
    """A timestep tensor past the table (not checked on the host without a sync) gives NaN in its
    row instead of an out-of-bounds read; the other rows are untouched."""
    abar = SCHEDULE.table(DEVICE)
    x0 = gen(*SHAPE)
    O = torch.ops.ddpm_fast_triton
    x_t = O.q_sample(x0, T(5, 1000), abar, None, T(1), T(0))
    assert bool(torch.isnan(x_t[1]).all()) and bool(torch.isfinite(x_t[0]).all())
    x_prev, _ = O.ddpm_step(x0, T(1000, 5), T(999, 4), x0, abar, None, T(1), T(0), "epsilon", "fixed_small",
                            True, 1.0, False, 0.995, 1.0, None, False)
    assert bool(torch.isnan(x_prev[0]).all()) and bool(torch.isfinite(x_prev[1]).all())


def test_import_without_triton_reports_unavailable():
    """``import ddpm_fast.backends.triton`` works where Triton is missing, and the backend reports why."""
    import subprocess
    import sys
    code = ("import sys; sys.modules['triton'] = None\n"
            "import ddpm_fast, ddpm_fast.backends.triton as T\n"
            "av = T.availability(); assert av['cpu'][0] is False and av['cuda'][0] is False, av\n"
            "assert 'triton is not importable' in av['cuda'][1], av\n"
            "info = ddpm_fast.backends()['triton']; assert not any(info['available'].values()), info\n"
            "print('ok')\n")
    root = os.path.join(os.path.dirname(__file__), "..", "..")
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": os.path.abspath(root)})
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr


# --------------------------------------------------------------------------------------------
# the flat grid (rows shorter than FLAT_ROW_MIN: per-element rows and coefficients)
# --------------------------------------------------------------------------------------------
@pytest.fixture
def flat_grid(monkeypatch):
    monkeypatch.setattr(H, "FLAT_ROW_MIN", 10 ** 9)
    assert H.is_flat(60)


def test_flat_grid_noise_and_q_sample(flat_grid):
    for shape, per_row in (((2, 3, 4, 5), False), ((3, 5, 7), True), ((3, 5, 7), False)):
        P.test_noise_matches_reference_large_seeds_and_offsets(TRITON, shape, per_row, torch.float32)
    for kind in ("seed", "per_row_seed", "tensor"):
        P.test_q_sample(TRITON, torch.float32, kind)
    P.test_q_sample_unaligned_rows_and_noncontiguous(TRITON)


@pytest.mark.parametrize("variance_type", VARIANCES)
def test_flat_grid_ddpm_step(flat_grid, variance_type):
    P.test_ddpm_step_variants_guidance(TRITON, "v_prediction", variance_type)


def test_flat_grid_ddim_and_losses(flat_grid):
    P.test_ddim_step_variants_guidance_final_step(TRITON, "epsilon", 0.6)
    P.test_ddim_reverse_step_clip_guidance(TRITON, "sample")
    for target in ("epsilon", "v_prediction"):
        P.test_diffusion_loss_fwd_bwd_row_seeds(TRITON, target, 5.0)
    for variance_type in ("learned_range", "fixed_large"):
        P.test_vlb_loss_vs_float64(TRITON, "epsilon", variance_type)


def test_toy_2d_rows_take_the_flat_grid():
    """(16, 2) samples (2-D toy data, the parity case test_toy_2d_data) are on the flat grid by
    default."""
    assert H.is_flat(2)
