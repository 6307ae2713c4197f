"""The Triton backend against the reference, op by op and variant by variant (REFERENCE §1, §3, §6).

Runs in its own process: ``TRITON_INTERPRET=1 python -m pytest tests/triton -q`` (the variable is
read when Triton kernels are decorated, so it cannot be switched inside a session that already
imported them). On CPU it needs TRITON_INTERPRET=1; on a CUDA machine it runs the compiled kernels
on the GPU (and the GPU-only tests at the bottom). Shapes are small: the interpreter is slow.

Tolerances (per output dtype): fp32 results agree within 1e-5 (both sides compute in fp32 from the
same float64 coefficients; the §3 noise of the two sides agrees within 1e-5 by contract, scaled by
sigma <= 1 here); fp16/bf16 results are the same fp32 values rounded, so they agree within one
unit in the last place of that dtype (relative 2^-10, 2^-7), plus the fp32 tolerance.
"""
from __future__ import annotations

import itertools
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
from ddpm_fast import reference as R  # noqa: E402
from ddpm_fast.noise import gaussian_noise_reference, normals_at as normals_at_reference  # noqa: E402
from ddpm_fast.triton import _helpers as H  # noqa: E402

DEVICE = torch.device("cuda" if (CUDA and not INTERPRET) else "cpu")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ULP = {torch.float32: 0.0, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}
FP32_TOL = 1e-5
SHAPE = (2, 3, 4, 5)
SCHEDULE = F.NoiseSchedule.from_name("linear", 1000)
PREDICTIONS = ("epsilon", "sample", "v_prediction")
VARIANCES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")

# Largest error seen per (op, dtype), printed at the end of the session (the closing note's table).
WORST = {}


def _record(op, dtype, got, want):
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    both_nan = torch.isnan(got) & torch.isnan(want)
    diff = torch.where(both_nan, torch.zeros_like(got), (got - want).abs())
    rel = diff / want.abs().clamp(min=1e-3)
    key = (op, str(dtype).replace("torch.", ""))
    a, r = WORST.get(key, (0.0, 0.0))
    WORST[key] = (max(a, float(diff.max()) if diff.numel() else 0.0), max(r, float(rel.max()) if rel.numel() else 0.0))


def assert_close(op, got, want, dtype=torch.float32, atol=FP32_TOL):
    """|got - want| <= atol + ulp(dtype) * |want| elementwise, NaN where the other is NaN."""
    _record(op, dtype, got, want)
    g, w = got.detach().double().cpu(), want.detach().double().cpu()
    assert g.shape == w.shape, (g.shape, w.shape)
    assert torch.equal(torch.isnan(g), torch.isnan(w)), f"{op}: NaN pattern differs"
    ok = torch.isnan(w) | ((g - w).abs() <= atol + ULP[dtype] * w.abs())
    bad = (~ok).nonzero()
    assert bool(ok.all()), (f"{op} {dtype}: {len(bad)} elements off, worst |diff| "
                            f"{float((g - w).abs().nan_to_num().max()):.3g} at {bad[0].tolist()}")


def gen(*shape, scale=1.0, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEVICE)


def T(*values):
    return torch.tensor(values, dtype=torch.int64, device=DEVICE)


def teardown_module(module):
    if WORST:
        print("\nTriton vs reference, worst |abs| / rel error per op and dtype (device %s):" % DEVICE)
        for (op, dt), (a, r) in sorted(WORST.items()):
            print(f"  {op:28s} {dt:9s} abs {a:.3g}  rel {r:.3g}")


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
# the §3 noise
# --------------------------------------------------------------------------------------------
KNOWN = [  # REFERENCE §3 known answers
    (0, 0, [0.9911375, -0.9246628, -0.6176091, -0.4820683]),
    (0x123456789AB, 7, [1.6177623, 0.6978294, 0.6346602, -0.0150390, -1.1643815, -2.3782302]),
]


@pytest.mark.parametrize("seed,offset,values", KNOWN)
def test_noise_known_answers(seed, offset, values):
    z = F.gaussian_noise((len(values),), seed, offset, device=DEVICE, backend="triton")
    assert_close("gaussian_noise", z, torch.tensor(values, dtype=torch.float64), atol=1e-5 + 5e-8)


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
    """i = 4 * 2^32 + 3 uses the high counter word (c1): the §3 known answer +0.3931865."""
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


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,per_row", [((2, 3, 4, 5), False), ((3, 5, 7), False), ((3, 5, 7), True),
                                           ((37,), False), ((4, 2), True)])
def test_noise_matches_reference(shape, per_row, dtype):
    seed = T(11, 2 ** 40 + 5, 3, 2 ** 62 + 1)[: shape[0]] if per_row else 0x123456789AB
    offset = 2 ** 33 + 9
    z = F.gaussian_noise(shape, seed, offset, device=DEVICE, dtype=dtype, backend="triton")
    assert z.dtype == dtype and tuple(z.shape) == shape
    want = gaussian_noise_reference(shape, seed.cpu() if per_row else seed, offset, dtype=torch.float64)
    assert_close("gaussian_noise", z, want, dtype, atol=1e-5)


def test_noise_offset_tensor_selects_stream():
    a = F.gaussian_noise(SHAPE, 5, torch.tensor(3, device=DEVICE), device=DEVICE, backend="triton")
    b = F.gaussian_noise(SHAPE, 5, 3, device=DEVICE, backend="triton")
    c = F.gaussian_noise(SHAPE, 5, 4, device=DEVICE, backend="triton")
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_per_row_seed_is_batch_independent():
    """Row b of a per-row-seeded draw does not depend on the batch around it."""
    big = F.gaussian_noise((3, 3, 4, 5), T(7, 8, 9), 2, device=DEVICE, backend="triton")
    one = F.gaussian_noise((1, 3, 4, 5), T(8), 2, device=DEVICE, backend="triton")
    assert torch.equal(big[1:2], one)


# --------------------------------------------------------------------------------------------
# q_sample
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("noise_kind", ["seed", "per_row_seed", "tensor"])
def test_q_sample(dtype, noise_kind):
    x0 = gen(*SHAPE, dtype=dtype)
    t = T(0, 999)
    kw = {"tensor": dict(noise=gen(*SHAPE, seed=3, dtype=dtype)), "seed": dict(seed=12345, offset=6),
          "per_row_seed": dict(seed=T(4, 2 ** 50), offset=1)}[noise_kind]
    got = F.q_sample(x0, t, SCHEDULE, backend="triton", **kw)
    want = F.q_sample(x0, t, SCHEDULE, backend="reference", **kw)
    assert got.dtype == dtype
    assert_close("q_sample", got, want, dtype)


def test_q_sample_unaligned_rows_and_noncontiguous():
    """Rows of 35 elements (quads straddle rows) and a transposed (strided) input."""
    x0 = gen(5, 7, 3).transpose(1, 2)
    assert not x0.is_contiguous()
    t = T(1, 10, 100, 500, 998)
    got = F.q_sample(x0, t, SCHEDULE, seed=99, offset=3, backend="triton")
    want = F.q_sample(x0, t, SCHEDULE, seed=99, offset=3, backend="reference")
    assert_close("q_sample", got, want)


def test_q_sample_grad():
    x0 = gen(*SHAPE).requires_grad_()
    x0r = x0.detach().clone().requires_grad_()
    g = gen(*SHAPE, seed=8)
    t = T(5, 700)
    (F.q_sample(x0, t, SCHEDULE, seed=1, backend="triton") * g).sum().backward()
    (F.q_sample(x0r, t, SCHEDULE, seed=1, backend="reference") * g).sum().backward()
    assert_close("q_sample.grad", x0.grad, x0r.grad)


# --------------------------------------------------------------------------------------------
# the DDPM step
# --------------------------------------------------------------------------------------------
CLIPS = {"none": dict(clip_sample=False), "clip": dict(clip_sample=True, clip_sample_range=1.5),
         "threshold": dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=2.5)}


def _ddpm_inputs(variance_type, guidance, dtype=torch.float32, shape=SHAPE, seed=0):
    B, C = shape[0], shape[1]
    mo_shape = (2 * B if guidance else B, 2 * C if variance_type.startswith("learned") else C) + shape[2:]
    mo = gen(*mo_shape, scale=1.5, seed=seed + 1, dtype=dtype)
    if variance_type.startswith("learned"):  # keep the variance channels in a sane range
        mo[:, C:] = mo[:, C:].clamp(-1, 1) if variance_type == "learned_range" else mo[:, C:] * 0.5 - 6
    return mo, gen(*shape, scale=1.2, seed=seed + 2, dtype=dtype)


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("variance_type", VARIANCES)
def test_ddpm_step_variants(prediction_type, variance_type):
    """Every prediction x variance x (no clip, clip, threshold) x guidance, fp32, per-sample t
    (one row at t = 0: no noise there), noise from a seed, x0_hat returned."""
    t, prev_t = T(500, 0), T(499, -1)
    for (clip_name, clip), guidance in itertools.product(CLIPS.items(), (None, 3.0)):
        mo, xt = _ddpm_inputs(variance_type, guidance)
        kw = dict(prev_t=prev_t, prediction_type=prediction_type, variance_type=variance_type,
                  guidance_scale=guidance, seed=77, offset=5, return_x0=True, **clip)
        got, got_x0 = F.ddpm_step(mo, t, xt, SCHEDULE, backend="triton", **kw)
        want, want_x0 = F.ddpm_step(mo, t, xt, SCHEDULE, backend="reference", **kw)
        assert_close("ddpm_step", got, want)
        assert_close("ddpm_step.x0_hat", got_x0, want_x0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("variance_type", ["fixed_small", "learned_range"])
def test_ddpm_step_half(dtype, variance_type):
    t = T(900, 3)
    for clip_name, clip in CLIPS.items():
        mo, xt = _ddpm_inputs(variance_type, None, dtype)
        kw = dict(variance_type=variance_type, seed=T(3, 4), offset=2, return_x0=True, **clip)
        got, got_x0 = F.ddpm_step(mo, t, xt, SCHEDULE, backend="triton", **kw)
        want, want_x0 = F.ddpm_step(mo, t, xt, SCHEDULE, backend="reference", **kw)
        assert got.dtype == dtype
        assert_close("ddpm_step", got, want, dtype)
        assert_close("ddpm_step.x0_hat", got_x0, want_x0, dtype)


def test_ddpm_step_mixed_dtypes_noise_tensor_respaced():
    """fp16 model output over fp32 latents; a given noise tensor; a respaced pair (t, prev_t) far
    apart; a transposed (non-contiguous) x_t."""
    mo, _ = _ddpm_inputs("fixed_large", None, torch.float16)
    xt = gen(2, 5, 4, 3).permute(0, 3, 2, 1)
    assert not xt.is_contiguous()
    noise = gen(*SHAPE, seed=9)
    kw = dict(prev_t=T(600, 100), variance_type="fixed_large", noise=noise)
    got = F.ddpm_step(mo, T(800, 300), xt, SCHEDULE, backend="triton", **kw)
    want = F.ddpm_step(mo, T(800, 300), xt, SCHEDULE, backend="reference", **kw)
    assert got.dtype == torch.float32
    assert_close("ddpm_step", got, want)


def test_ddpm_step_out_in_place():
    mo, xt = _ddpm_inputs("fixed_small", None)
    want = F.ddpm_step(mo, T(10, 20), xt, SCHEDULE, seed=1, backend="reference")
    got = F.ddpm_step(mo, T(10, 20), xt, SCHEDULE, seed=1, out=xt, backend="triton")
    assert got is xt
    assert_close("ddpm_step", xt, want)


def test_ddpm_step_zero_snr_and_nan():
    """Zero terminal SNR (abar = 0 at T-1): epsilon x0_hat is +-inf, clipped back to finite;
    a NaN in a row under thresholding makes that row NaN, and only that row."""
    sched = F.NoiseSchedule.from_name("linear", 1000, rescale_zero_snr=True)
    mo, xt = _ddpm_inputs("fixed_small", None)
    got = F.ddpm_step(mo, T(999, 500), xt, sched, seed=3, backend="triton")
    want = F.ddpm_step(mo, T(999, 500), xt, sched, seed=3, backend="reference")
    assert bool(torch.isfinite(got).all())
    assert_close("ddpm_step", got, want)
    mo[1, 0, 0, 0] = float("nan")
    kw = dict(seed=3, **CLIPS["threshold"])
    got = F.ddpm_step(mo, T(400, 500), xt, SCHEDULE, backend="triton", **kw)
    want = F.ddpm_step(mo, T(400, 500), xt, SCHEDULE, backend="reference", **kw)
    assert bool(torch.isnan(got[1]).all()) and bool(torch.isfinite(got[0]).all())
    assert_close("ddpm_step", got, want)


@pytest.mark.parametrize("variance_type", ["fixed_small", "learned_range"])
def test_ddpm_step_grad(variance_type):
    """Gradients in model_output and x_t (including sigma's dependence on learned variances)."""
    grads = []
    for backend in ("triton", "reference"):
        mo, xt = _ddpm_inputs(variance_type, 2.0)
        mo.requires_grad_()
        xt.requires_grad_()
        x_prev, x0 = F.ddpm_step(mo, T(300, 2), xt, SCHEDULE, variance_type=variance_type, guidance_scale=2.0,
                                 seed=5, return_x0=True, backend=backend)
        (x_prev * gen(*SHAPE, seed=4) + x0 * gen(*SHAPE, seed=5)).sum().backward()
        grads.append((mo.grad, xt.grad))
    assert_close("ddpm_step.grad", grads[0][0], grads[1][0])
    assert_close("ddpm_step.grad", grads[0][1], grads[1][1])


# --------------------------------------------------------------------------------------------
# DDIM and its inversion
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("eta", [0.0, 0.6])
def test_ddim_step_variants(prediction_type, eta):
    """use_clipped_model_output x (no clip, clip, threshold) x guidance; one row at its final
    step (prev_t = -1 with final_alpha_cumprod = abar_0, set_alpha_to_one=False)."""
    t, prev_t = T(500, 20), T(480, -1)
    final = float(SCHEDULE.alphas_cumprod[0])
    for use_clipped, (clip_name, clip), guidance in itertools.product((False, True), CLIPS.items(), (None, 4.0)):
        mo, xt = _ddpm_inputs("fixed_small", guidance)
        kw = dict(prev_t=prev_t, eta=eta, prediction_type=prediction_type, use_clipped_model_output=use_clipped,
                  final_alpha_cumprod=final, guidance_scale=guidance, return_x0=True,
                  seed=(T(1, 2) if eta > 0 else None), offset=3, **clip)
        got, got_x0 = F.ddim_step(mo, t, xt, SCHEDULE, backend="triton", **kw)
        want, want_x0 = F.ddim_step(mo, t, xt, SCHEDULE, backend="reference", **kw)
        assert_close("ddim_step", got, want)
        assert_close("ddim_step.x0_hat", got_x0, want_x0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ddim_step_dtypes_and_out(dtype):
    mo, xt = _ddpm_inputs("fixed_small", None, dtype)
    want = F.ddim_step(mo, T(700, 300), xt, SCHEDULE, prev_t=T(650, 250), eta=1.0, seed=9, backend="reference")
    got = F.ddim_step(mo, T(700, 300), xt, SCHEDULE, prev_t=T(650, 250), eta=1.0, seed=9, out=xt,
                      backend="triton")
    assert got is xt
    assert_close("ddim_step", got, want, dtype)


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_ddim_reverse_step(prediction_type):
    for use_clipped, (clip_name, clip), guidance in itertools.product((False, True), CLIPS.items(), (None, 2.0)):
        mo, xt = _ddpm_inputs("fixed_small", guidance)
        kw = dict(next_t=T(520, 40), prediction_type=prediction_type, use_clipped_model_output=use_clipped,
                  guidance_scale=guidance, return_x0=True, **clip)
        got, got_x0 = F.ddim_reverse_step(mo, T(500, 0), xt, SCHEDULE, backend="triton", **kw)
        want, want_x0 = F.ddim_reverse_step(mo, T(500, 0), xt, SCHEDULE, backend="reference", **kw)
        assert_close("ddim_reverse_step", got, want)
        assert_close("ddim_reverse_step.x0_hat", got_x0, want_x0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ddim_reverse_step_half(dtype):
    mo, xt = _ddpm_inputs("fixed_small", None, dtype)
    got = F.ddim_reverse_step(mo, T(5, 6), xt, SCHEDULE, next_t=T(25, 26), backend="triton")
    want = F.ddim_reverse_step(mo, T(5, 6), xt, SCHEDULE, next_t=T(25, 26), backend="reference")
    assert_close("ddim_reverse_step", got, want, dtype)


def test_ddim_grads():
    grads = []
    for backend in ("triton", "reference"):
        mo, xt = _ddpm_inputs("fixed_small", None)
        mo.requires_grad_()
        xt.requires_grad_()
        a = F.ddim_step(mo, T(300, 200), xt, SCHEDULE, prev_t=T(250, 150), eta=0.5, seed=2, backend=backend)
        b = F.ddim_reverse_step(mo, T(300, 200), xt, SCHEDULE, next_t=T(350, 250), use_clipped_model_output=True,
                                backend=backend)
        (a * gen(*SHAPE, seed=6) + b * gen(*SHAPE, seed=7)).sum().backward()
        grads.append((mo.grad, xt.grad))
    assert_close("ddim_step.grad", grads[0][0], grads[1][0])
    assert_close("ddim_step.grad", grads[0][1], grads[1][1])


# --------------------------------------------------------------------------------------------
# losses
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("target", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("snr_gamma", [None, 5.0])
def test_diffusion_loss_fwd_bwd(target, snr_gamma):
    """Forward and backward (noise regenerated from (seed, offset) in the backward kernel), scalar
    and per-row seeds, unaligned rows of 35 elements, a row at t = 0 and one at T-1."""
    for shape, seed in (((3, 3, 4, 5), 7), ((3, 5, 7), T(1, 2, 3))):
        x0 = gen(*shape, seed=1).clamp(-1, 1)
        t = T(0, 500, 999)
        g = gen(shape[0], seed=2).abs()
        results = []
        for backend in ("triton", "reference"):
            mo = gen(*shape, seed=3).requires_grad_()
            loss = F.diffusion_loss(mo, x0, t, SCHEDULE, target=target, seed=seed, offset=4, snr_gamma=snr_gamma,
                                    reduction="none", backend=backend)
            (loss * g).sum().backward()
            results.append((loss.detach(), mo.grad))
        assert results[0][0].dtype == torch.float32
        scale = max(1.0, float(results[1][0].abs().max()))
        assert_close("diffusion_loss", results[0][0], results[1][0], atol=FP32_TOL * scale)
        assert_close("diffusion_loss.grad", results[0][1], results[1][1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_diffusion_loss_half_and_noise_tensor(dtype):
    x0 = gen(*SHAPE, seed=1, dtype=dtype)
    noise = gen(*SHAPE, seed=4, dtype=dtype)
    results = []
    for backend in ("triton", "reference"):
        mo = gen(*SHAPE, seed=3, dtype=dtype).requires_grad_()
        loss = F.diffusion_loss(mo, x0, T(10, 900), SCHEDULE, target="v_prediction", noise=noise, snr_gamma=1.0,
                                reduction="mean", backend=backend)
        loss.backward()
        results.append((loss.detach(), mo.grad))
    assert_close("diffusion_loss", results[0][0], results[1][0])
    assert results[0][1].dtype == dtype
    assert_close("diffusion_loss.grad", results[0][1], results[1][1], dtype)


def test_loss_noise_is_q_sample_noise():
    """The loss with target epsilon regenerates exactly the noise q_sample drew with the same
    (seed, offset): a model output equal to that noise has zero loss."""
    x0 = gen(*SHAPE)
    t = T(100, 200)
    x_t = F.q_sample(x0, t, SCHEDULE, seed=42, offset=9, backend="triton")
    a = SCHEDULE.alphas_cumprod.to(DEVICE)[t].reshape(-1, 1, 1, 1)
    eps = (x_t.double() - a.sqrt() * x0.double()) / (1 - a).sqrt()
    loss = F.diffusion_loss(eps.float(), x0, t, SCHEDULE, seed=42, offset=9, reduction="none", backend="triton")
    assert float(loss.max()) < 1e-8


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("variance_type", VARIANCES)
def test_vlb_loss(prediction_type, variance_type):
    """KL rows (t > 0) and the decoder NLL row (t = 0), forward and backward. The NLL uses the
    sigmoid form of the tanh CDF (no cancellation), so the kernel is compared with the float64
    reference: it must be at least as close to it as the fp32 reference is (plus 1e-5)."""
    x0 = gen(*SHAPE, seed=1).clamp(-1, 1)
    t = T(0, 400)
    x_t = F.q_sample(x0, t, SCHEDULE, seed=5, backend="reference")
    mo, _ = _ddpm_inputs(variance_type, None)
    mo = (mo * 0.3).requires_grad_()
    kw = dict(prediction_type=prediction_type, variance_type=variance_type, reduction="none")
    got = F.vlb_loss(mo, x0, x_t, t, SCHEDULE, backend="triton", **kw)
    got.sum().backward()
    g_tri, mo.grad = mo.grad, None
    want = F.vlb_loss(mo, x0, x_t, t, SCHEDULE, backend="reference", **kw)
    want.sum().backward()
    want64 = F.vlb_loss(mo.detach().double(), x0.double(), x_t.double(), t, SCHEDULE, backend="reference", **kw)
    ref_err = (want.detach().double() - want64).abs()
    scale = want64.abs().clamp(min=1.0)
    assert bool(((got.detach().double() - want64).abs() <= ref_err + FP32_TOL * scale).all()), (got, want, want64)
    _record("vlb_loss", torch.float32, got, want)
    _record("vlb_loss(vs float64)", torch.float32, got, want64)
    _record("vlb_loss(fp32 ref vs float64)", torch.float32, want, want64)
    assert_close("vlb_loss.grad", g_tri, mo.grad, atol=1e-5 * max(1.0, float(mo.grad.abs().max())))


def test_vlb_loss_half():
    x0 = gen(*SHAPE, seed=1, dtype=torch.bfloat16).clamp(-1, 1)
    t = T(0, 40)
    x_t = F.q_sample(x0, t, SCHEDULE, seed=5, backend="reference")
    mo, _ = _ddpm_inputs("learned_range", None, torch.bfloat16)
    kw = dict(variance_type="learned_range", reduction="none")
    got = F.vlb_loss(mo, x0, x_t, t, SCHEDULE, backend="triton", **kw)
    want64 = F.vlb_loss(mo.double(), x0.double(), x_t.double(), t, SCHEDULE, backend="reference", **kw)
    want = F.vlb_loss(mo, x0, x_t, t, SCHEDULE, backend="reference", **kw)
    _record("vlb_loss", torch.bfloat16, got, want)
    ref_err = (want.double() - want64).abs()
    assert bool(((got.double() - want64).abs() <= ref_err + 1e-5 * want64.abs().clamp(min=1)).all())


def test_hybrid_loss_through_triton():
    x0 = gen(2, 3, 4, 5, seed=1).clamp(-1, 1)
    results = []
    for backend in ("triton", "reference"):
        mo = (gen(2, 6, 4, 5, seed=2) * 0.5).requires_grad_()
        loss = F.hybrid_loss(mo, x0, T(0, 600), SCHEDULE, seed=3, offset=1, backend=backend)
        loss.backward()
        results.append((loss.detach(), mo.grad))
    assert abs(float(results[0][0]) - float(results[1][0])) <= 1e-4 * max(1.0, abs(float(results[1][0])))
    assert_close("hybrid_loss.grad", results[0][1], results[1][1], atol=1e-4)


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
    """``import ddpm_fast.triton`` works where Triton is missing, and the backend reports why."""
    import subprocess
    import sys
    code = ("import sys; sys.modules['triton'] = None\n"
            "import ddpm_fast, ddpm_fast.triton as T\n"
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
        test_noise_matches_reference(shape, per_row, torch.float32)
    for kind in ("seed", "per_row_seed", "tensor"):
        test_q_sample(torch.float32, kind)
    test_q_sample_unaligned_rows_and_noncontiguous()


@pytest.mark.parametrize("variance_type", VARIANCES)
def test_flat_grid_ddpm_step(flat_grid, variance_type):
    test_ddpm_step_variants("v_prediction", variance_type)


def test_flat_grid_ddim_and_losses(flat_grid):
    test_ddim_step_variants("epsilon", 0.6)
    test_ddim_reverse_step("sample")
    for target in ("epsilon", "v_prediction"):
        test_diffusion_loss_fwd_bwd(target, 5.0)
    for variance_type in ("learned_range", "fixed_large"):
        test_vlb_loss("epsilon", variance_type)


def test_toy_2d_data():
    """(16, 2) samples (2-D toy data): rows far shorter than a block, on the flat grid by default."""
    x0 = gen(16, 2)
    t = torch.arange(0, 1000, 63, device=DEVICE)[:16]
    assert H.is_flat(2)
    got = F.q_sample(x0, t, SCHEDULE, seed=T(*range(16)), offset=2, backend="triton")
    assert_close("q_sample", got, F.q_sample(x0, t, SCHEDULE, seed=T(*range(16)), offset=2, backend="reference"))
    kw = dict(variance_type="learned_range", seed=5, offset=1)
    mo = gen(16, 4, seed=3)
    got = F.ddpm_step(mo, t, x0, SCHEDULE, backend="triton", **kw)
    assert_close("ddpm_step", got, F.ddpm_step(mo, t, x0, SCHEDULE, backend="reference", **kw))
    lt = F.diffusion_loss(mo[:, :2], x0, t, SCHEDULE, seed=5, reduction="none", backend="triton")
    lr = F.diffusion_loss(mo[:, :2], x0, t, SCHEDULE, seed=5, reduction="none", backend="reference")
    assert_close("diffusion_loss", lt, lr, atol=FP32_TOL * max(1.0, float(lr.abs().max())))
