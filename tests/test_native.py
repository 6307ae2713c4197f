"""Parity of the native backend (fused C++ CPU kernels) with the reference, op by op and variant by
variant, through the public ops (``backend="native"`` against ``backend="reference"``).

Tolerances (one table, by the sample's dtype): the native kernels make the §3 noise in fp32 (it
agrees with the float64 reference noise within 1e-5 absolute, measured ~2e-6) and compute in
fp32 with the same float64 row coefficients, so fp32 results agree within 1e-5 absolute plus
1e-5 relative to the value's scale (a few fp32 ulp of the per-element arithmetic; x0_hat at large
t carries 1/sqrt(abar) ~ 100 times the inputs' scale). Half types: the two fp32 results, each
rounded once to the output dtype, may land one ulp apart (rtol = 2^-10 for fp16, 2^-7 for bf16).
fp64 math differs from the reference only by the fp32 noise (1e-5 absolute) and fp64 rounding.
"""
import math

import pytest
import torch

import ddpm_fast
from ddpm_fast import NoiseSchedule
from ddpm_fast.noise import gaussian_noise_reference

_INFO = ddpm_fast.backends()["native"]
pytestmark = pytest.mark.skipif(not _INFO["available"]["cpu"],
                                reason=f"native backend unavailable on cpu: {_INFO['reason']}")

# dtype: (rtol, atol)
TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2.0 ** -10, 1e-5),
    torch.bfloat16: (2.0 ** -7, 1e-5),
    torch.float64: (1e-9, 1e-5),
}

SCHED = NoiseSchedule.from_name("linear", 1000)
COSINE = NoiseSchedule.from_name("squaredcos_cap_v2", 1000)
PREDICTIONS = ("epsilon", "sample", "v_prediction")
VARIANCES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")
CLIPS = {
    "none": dict(clip_sample=False),
    "clip": dict(clip_sample=True, clip_sample_range=1.5),
    "threshold": dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=2.5),
}


def close(native, ref, dtype=None):
    dtype = dtype or ref.dtype
    rtol, atol = TOL[dtype]
    assert native.dtype == ref.dtype and native.shape == ref.shape
    torch.testing.assert_close(native.double(), ref.double(), rtol=rtol, atol=atol, equal_nan=True)


def both(fn, *args, **kwargs):
    return fn(*args, backend="native", **kwargs), fn(*args, backend="reference", **kwargs)


# ---- the noise contract -------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1,), (3, 5), (2, 3, 7, 9), (5, 4, 8, 8)])
@pytest.mark.parametrize("per_row", [False, True])
def test_noise_matches_reference(shape, per_row):
    seed = torch.tensor([7, 1 << 40, 3, 12345, 2][: shape[0]]) if per_row else 0x123456789AB
    got = ddpm_fast.gaussian_noise(shape, seed, offset=11, backend="native")
    ref = gaussian_noise_reference(shape, seed, 11, dtype=torch.float64)
    assert got.dtype == torch.float32
    assert (got.double() - ref).abs().max().item() < 1e-5


def test_noise_known_values():
    got = ddpm_fast.gaussian_noise((6,), 0x123456789AB, offset=7, backend="native")
    expected = [1.6177623, 0.6978294, 0.6346602, -0.0150390, -1.1643815, -2.3782302]
    assert max(abs(a - b) for a, b in zip(got.tolist(), expected)) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_noise_dtypes(dtype):
    got = ddpm_fast.gaussian_noise((4, 33), 5, offset=2, dtype=dtype, backend="native")
    ref = gaussian_noise_reference((4, 33), 5, 2, dtype=torch.float64)
    close(got, ref.to(dtype), dtype)


def test_noise_is_finite_and_standard_over_many_draws():
    z = ddpm_fast.gaussian_noise((1 << 20,), 99, offset=0, backend="native")
    assert torch.isfinite(z).all()
    assert abs(z.mean().item()) < 5e-3 and abs(z.std().item() - 1) < 5e-3


# ---- q_sample -----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (4, 3, 7, 9)])
def test_q_sample_seed(dtype, shape):
    x0 = torch.randn(shape).to(dtype)
    t = torch.randint(0, 1000, (shape[0],))
    got, ref = both(ddpm_fast.q_sample, x0, t, SCHED, seed=42, offset=3)
    close(got, ref)


def test_q_sample_per_row_seed_and_explicit_noise_noncontiguous():
    x0 = torch.randn(6, 8, 3).transpose(1, 2)  # non-contiguous
    seeds = torch.tensor([1, 2, 3, 4, 5, 6])
    got, ref = both(ddpm_fast.q_sample, x0, 500, SCHED, seed=seeds, offset=9)
    close(got, ref)
    noise = torch.randn(6, 8, 3).transpose(1, 2)
    got, ref = both(ddpm_fast.q_sample, x0, torch.arange(6) * 150, SCHED, noise)
    close(got, ref)


def test_per_row_seed_row_independent_of_batch():
    x0 = torch.randn(4, 10)
    a = ddpm_fast.q_sample(x0, 300, SCHED, seed=torch.tensor([5, 6, 7, 8]), backend="native")
    b = ddpm_fast.q_sample(x0[2:3], 300, SCHED, seed=torch.tensor([7]), backend="native")
    assert torch.equal(a[2:3], b)


# ---- the DDPM step ------------------------------------------------------------------------------
def _step_inputs(shape, variance, guidance=False, dtype=torch.float32, scale=1.0):
    learned = variance in ("learned", "learned_range")
    mo_shape = list(shape)
    if learned:
        mo_shape[1] *= 2
    if guidance:
        mo_shape[0] *= 2
    mo = torch.randn(mo_shape) * scale
    if learned:  # keep variance channels in the model's usual range
        C = shape[1]
        mo[:, C:] = torch.rand_like(mo[:, C:]) * 2 - 1 if variance == "learned_range" else -3 + mo[:, C:]
    x_t = torch.randn(shape) * scale
    return mo.to(dtype), x_t.to(dtype)


@pytest.mark.parametrize("clip", list(CLIPS))
@pytest.mark.parametrize("variance", VARIANCES)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_ddpm_step_variants(prediction, variance, clip):
    shape = (3, 2, 5, 7)
    mo, x_t = _step_inputs(shape, variance, scale=2.0)
    t = torch.tensor([999, 0, 437])
    got, ref = both(ddpm_fast.ddpm_step, mo, t, x_t, SCHED, prediction_type=prediction, variance_type=variance,
                    seed=torch.tensor([3, 4, 5]), offset=1, return_x0=True, **CLIPS[clip])
    close(got[0], ref[0])
    close(got[1], ref[1])


@pytest.mark.parametrize("variance", ["fixed_small", "learned_range"])
def test_ddpm_step_guidance_respaced_and_explicit_noise(variance):
    shape = (2, 3, 4, 5)
    mo, x_t = _step_inputs(shape, variance, guidance=True)
    kept = ddpm_fast.space_timesteps(1000, "50")
    sched = COSINE.respace(kept)
    t = torch.tensor([49, 10])
    noise = torch.randn(shape)
    got, ref = both(ddpm_fast.ddpm_step, mo, t, x_t, sched, prev_t=torch.tensor([40, -1]), variance_type=variance,
                    guidance_scale=7.5, noise=noise, return_x0=True, thresholding=True, sample_max_value=3.0)
    close(got[0], ref[0])
    close(got[1], ref[1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("variance", ["fixed_small", "learned_range"])
def test_ddpm_step_dtypes(dtype, variance):
    mo, x_t = _step_inputs((2, 4, 6, 6), variance, dtype=dtype)
    got, ref = both(ddpm_fast.ddpm_step, mo, torch.tensor([700, 3]), x_t, SCHED, variance_type=variance, seed=8,
                    offset=4)
    close(got, ref)


def test_ddpm_step_mixed_dtypes_and_noncontiguous():
    mo = torch.randn(3, 8, 5).transpose(1, 2).half()  # fp16 network output, strided
    x_t = torch.randn(3, 5, 8)
    got, ref = both(ddpm_fast.ddpm_step, mo, 500, x_t, SCHED, seed=1)
    close(got, ref)


def test_ddpm_step_tiny_and_odd_shapes():
    for shape in [(1,), (1, 1), (5, 3), (2, 1, 1, 13), (10000, 2)]:
        mo, x_t = torch.randn(shape), torch.randn(shape)
        got, ref = both(ddpm_fast.ddpm_step, mo, 250, x_t, SCHED, seed=2, offset=5)
        close(got, ref)


def test_thresholding_row_longer_than_2_pow_24():
    # torch.quantile refuses rows past 2^24 elements; the kernels' quantile pass does not
    n = (1 << 24) + 5
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(1, n, generator=g)
    mo = torch.randn(1, n, generator=g) * 3
    got, ref = both(ddpm_fast.ddpm_step, mo, 0, x_t, SCHED, prediction_type="sample", thresholding=True,
                    dynamic_thresholding_ratio=0.99, sample_max_value=5.0)
    close(got, ref)


# ---- DDIM and its inversion -------------------------------------------------------------------
@pytest.mark.parametrize("clip", list(CLIPS))
@pytest.mark.parametrize("use_clipped", [False, True])
@pytest.mark.parametrize("eta", [0.0, 0.7])
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_ddim_step_variants(prediction, eta, use_clipped, clip):
    shape = (3, 3, 6, 5)
    mo, x_t = torch.randn(shape) * 2, torch.randn(shape) * 2
    t = torch.tensor([980, 20, 500])
    prev_t = torch.tensor([960, -1, 480])
    got, ref = both(ddpm_fast.ddim_step, mo, t, x_t, SCHED, prev_t=prev_t, eta=eta, prediction_type=prediction,
                    use_clipped_model_output=use_clipped, final_alpha_cumprod=0.9999, seed=11, offset=2,
                    return_x0=True, **CLIPS[clip])
    close(got[0], ref[0])
    close(got[1], ref[1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_ddim_step_dtypes_guidance(dtype):
    mo = torch.randn(4, 3, 5, 5).to(dtype)
    x_t = torch.randn(2, 3, 5, 5).to(dtype)
    got, ref = both(ddpm_fast.ddim_step, mo, 600, x_t, SCHED, prev_t=580, eta=0.3, guidance_scale=3.0,
                    seed=torch.tensor([1, 2]), offset=0)
    close(got, ref)


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("use_clipped", [False, True])
def test_ddim_reverse_step(prediction, use_clipped):
    mo, x_t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    got, ref = both(ddpm_fast.ddim_reverse_step, mo, torch.tensor([0, 500]), x_t, SCHED,
                    next_t=torch.tensor([20, 520]), prediction_type=prediction, use_clipped_model_output=use_clipped,
                    return_x0=True)
    close(got[0], ref[0])
    close(got[1], ref[1])


# ---- out= ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("op", ["ddpm", "ddim", "reverse"])
def test_out_in_place(op):
    mo, x_t = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    if op == "ddpm":
        ref = ddpm_fast.ddpm_step(mo, 500, x_t, SCHED, seed=3, backend="reference")
        res = ddpm_fast.ddpm_step(mo, 500, x_t, SCHED, seed=3, out=x_t, backend="native")
    elif op == "ddim":
        ref = ddpm_fast.ddim_step(mo, 500, x_t, SCHED, prev_t=480, eta=1.0, seed=3, backend="reference")
        res = ddpm_fast.ddim_step(mo, 500, x_t, SCHED, prev_t=480, eta=1.0, seed=3, out=x_t, backend="native")
    else:
        ref = ddpm_fast.ddim_reverse_step(mo, 500, x_t, SCHED, next_t=520, backend="reference")
        res = ddpm_fast.ddim_reverse_step(mo, 500, x_t, SCHED, next_t=520, out=x_t, backend="native")
    assert res.data_ptr() == x_t.data_ptr()
    close(x_t, ref)


def test_out_noncontiguous():
    mo, x_t = torch.randn(2, 4, 6), torch.randn(2, 4, 6)
    out = torch.empty(2, 6, 4).transpose(1, 2)
    ref = ddpm_fast.ddpm_step(mo, 300, x_t, SCHED, seed=1, backend="reference")
    res = ddpm_fast.ddpm_step(mo, 300, x_t, SCHED, seed=1, out=out, backend="native")
    assert res is out
    close(out, ref)


# ---- NaN ------------------------------------------------------------------------------------------
def test_nan_propagates_to_its_element_only():
    mo, x_t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    mo[0, 1, 2, 3] = float("nan")
    out = ddpm_fast.ddpm_step(mo, 500, x_t, SCHED, seed=1, backend="native")
    nan = torch.isnan(out)
    assert nan[0, 1, 2, 3] and nan.sum() == 1
    out = ddpm_fast.ddim_step(mo, 500, x_t, SCHED, prev_t=400, backend="native")
    assert torch.isnan(out).sum() == 1


def test_nan_under_thresholding_poisons_its_row():
    mo, x_t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    mo[1, 0, 0, 0] = float("nan")
    got, ref = both(ddpm_fast.ddpm_step, mo, 500, x_t, SCHED, seed=1, thresholding=True, sample_max_value=2.0)
    assert torch.isnan(got[1]).all() and not torch.isnan(got[0]).any()
    close(got, ref)


def test_no_nan_from_finite_inputs_at_extremes():
    sched = NoiseSchedule.from_name("linear", 1000, rescale_zero_snr=True)
    mo, x_t = torch.randn(3, 2, 8, 8), torch.randn(3, 2, 8, 8)
    for prediction in PREDICTIONS:
        got, ref = both(ddpm_fast.ddpm_step, mo, torch.tensor([999, 1, 0]), x_t, sched, prediction_type=prediction,
                        seed=3, variance_type="fixed_large_log")
        assert torch.isfinite(got).all()
        close(got, ref)


# ---- losses ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("snr_gamma", [None, 5.0])
@pytest.mark.parametrize("target", PREDICTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_diffusion_loss_forward_backward(target, snr_gamma, dtype):
    x0 = torch.randn(4, 3, 5, 7).to(dtype)
    t = torch.tensor([0, 10, 500, 999])
    mo_n = torch.randn(4, 3, 5, 7).to(dtype).requires_grad_(True)
    mo_r = mo_n.detach().clone().requires_grad_(True)
    seeds = dict(seed=torch.tensor([1, 2, 3, 4]), offset=6)
    ln = ddpm_fast.diffusion_loss(mo_n, x0, t, SCHED, target=target, snr_gamma=snr_gamma, reduction="none",
                                  backend="native", **seeds)
    lr = ddpm_fast.diffusion_loss(mo_r, x0, t, SCHED, target=target, snr_gamma=snr_gamma, reduction="none",
                                  backend="reference", **seeds)
    close(ln, lr, torch.float64 if dtype == torch.float64 else torch.float32)
    w = torch.tensor([0.3, -1.0, 2.0, 0.5], dtype=ln.dtype)
    (ln * w).sum().backward()
    (lr * w).sum().backward()
    close(mo_n.grad, mo_r.grad)


def test_losses_long_rows_split_across_tasks():
    # rows past 2^16 elements are reduced in parts (several tasks per row)
    x0 = torch.rand(2, 2, 70001) * 2 - 1
    mo = torch.randn(2, 4, 70001)
    x_t = torch.randn(2, 2, 70001)
    got, ref = both(ddpm_fast.diffusion_loss, mo[:, :2], x0, torch.tensor([3, 900]), SCHED, seed=1,
                    reduction="none")
    close(got, ref)
    got, ref = both(ddpm_fast.vlb_loss, mo, x0, x_t, torch.tensor([0, 900]), SCHED, reduction="none")
    close(got, ref)


def test_diffusion_loss_reductions_and_q_sample_consistency():
    x0 = torch.randn(3, 4, 6)
    x_t = ddpm_fast.q_sample(x0, 400, SCHED, seed=5, offset=8, backend="native")
    # the loss regenerates exactly the noise q_sample used: eps from x_t is the target
    a = SCHED.alphas_cumprod[400]
    eps = ((x_t.double() - a.sqrt() * x0.double()) / (1 - a).sqrt()).float()
    loss = ddpm_fast.diffusion_loss(eps, x0, 400, SCHED, seed=5, offset=8, reduction="sum", backend="native")
    assert loss.item() < 1e-9


# ---- the variational bound -------------------------------------------------------------------------
@pytest.mark.parametrize("variance", VARIANCES)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_vlb_loss(prediction, variance):
    shape = (4, 2, 4, 5)
    mo, x_t = _step_inputs(shape, variance)
    x0 = torch.rand(shape) * 2 - 1
    x0[0, 0, 0, :2] = torch.tensor([-1.0, 1.0])  # the outer bins of the decoder
    t = torch.tensor([0, 1, 300, 999])
    mo_n = mo.clone().requires_grad_(True)
    mo_r = mo.clone().requires_grad_(True)
    ln = ddpm_fast.vlb_loss(mo_n, x0, x_t, t, SCHED, prediction_type=prediction, variance_type=variance,
                            reduction="none", backend="native")
    lr = ddpm_fast.vlb_loss(mo_r, x0, x_t, t, SCHED, prediction_type=prediction, variance_type=variance,
                            reduction="none", backend="reference")
    close(ln, lr)
    ln.sum().backward()
    lr.sum().backward()
    close(mo_n.grad, mo_r.grad)


# ---- gradients of the steps ------------------------------------------------------------------------
@pytest.mark.parametrize("variance", ["fixed_small", "learned_range"])
def test_ddpm_step_gradients(variance):
    mo, x_t = _step_inputs((2, 2, 3, 3), variance)
    args = dict(variance_type=variance, seed=torch.tensor([4, 5]), offset=1, return_x0=True)
    leaves = {}
    outs = {}
    for backend in ("native", "reference"):
        m, x = mo.clone().requires_grad_(True), x_t.clone().requires_grad_(True)
        leaves[backend] = (m, x)
        prev, x0 = ddpm_fast.ddpm_step(m, torch.tensor([600, 1]), x, SCHED, backend=backend, **args)
        (prev.sin().sum() + (x0 * 0.5).sum()).backward()
    for a, b in zip(leaves["native"], leaves["reference"]):
        close(a.grad, b.grad)


def test_ddim_and_q_sample_gradients():
    grads = {}
    for backend in ("native", "reference"):
        m = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
        x = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
        x0 = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
        y = ddpm_fast.ddim_step(m, 500, x, SCHED, prev_t=450, eta=0.5, seed=1, backend=backend)
        z = ddpm_fast.ddim_reverse_step(m, 300, x, SCHED, next_t=350, backend=backend)
        q = ddpm_fast.q_sample(x0, torch.tensor([10, 900]), SCHED, seed=2, backend=backend)
        (y.pow(2).sum() + z.sum() + q.pow(2).sum()).backward()
        grads[backend] = (m.grad, x.grad, x0.grad)
    for a, b in zip(grads["native"], grads["reference"]):
        close(a, b)


# ---- torch.library -------------------------------------------------------------------------------
def _opcheck_cases():
    ops = torch.ops.ddpm_fast
    abar = SCHED.table("cpu")
    x = torch.randn(2, 3, 4)
    mo = torch.randn(2, 3, 4, requires_grad=True)
    mo2 = torch.randn(2, 6, 4, requires_grad=True)
    t, pt = torch.tensor([5, 300]), torch.tensor([4, 200])
    seed, off = torch.tensor([3]), torch.tensor([1])
    clip = (True, 1.0, False, 0.995, 1.0, None, True)
    return [
        (ops.gaussian_noise, ([2, 3], seed, off, torch.float32)),
        (ops.q_sample, (torch.randn(2, 3, 4, requires_grad=True), t, abar, None, seed, off)),
        (ops.ddpm_step, (mo, t, pt, x.clone().requires_grad_(True), abar, None, seed, off, "epsilon", "fixed_small")
         + clip),
        (ops.ddpm_step, (mo2, t, pt, x, abar, None, seed, off, "v_prediction", "learned_range") + clip),
        (ops.ddpm_step_out, (mo.detach(), t, pt, x, abar, None, seed, off, "epsilon", "fixed_small") + clip
         + (x.clone(),)),
        (ops.ddim_step, (mo, t, pt, x, abar, None, seed, off, 0.5, "epsilon", False, 1.0) + clip),
        (ops.ddim_step_out, (mo.detach(), t, pt, x, abar, None, seed, off, 0.5, "epsilon", False, 1.0) + clip
         + (x.clone(),)),
        (ops.ddim_reverse_step, (mo, pt, t, x, abar, "sample", True) + clip),
        (ops.ddim_reverse_step_out, (mo.detach(), pt, t, x, abar, "sample", True) + clip + (x.clone(),)),
        (ops.diffusion_loss, (mo, x, t, abar, None, seed, off, "v_prediction", 5.0)),
        (ops.diffusion_loss_backward, (torch.ones(2), mo.detach(), x, t, abar, None, seed, off, "epsilon", None)),
        (ops.vlb_loss, (mo2, x.clamp(-1, 1), x, t, abar, "epsilon", "learned_range")),
    ]


@pytest.mark.parametrize("case", range(12))
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


def _compile_usable():
    try:
        torch.compile(lambda x: x + 1, fullgraph=True)(torch.ones(2))
        return True, ""
    except Exception as e:  # no C compiler for inductor, etc.
        return False, f"torch.compile unusable here: {type(e).__name__}: {e}"


def test_torch_compile_fullgraph():
    ok, why = _compile_usable()
    if not ok:
        pytest.skip(why)
    abar = SCHED.table("cpu")
    ops = torch.ops.ddpm_fast

    def loop(mo, x, x0, t, seed, off):
        x_t = ops.q_sample(x0, t, abar, None, seed, off)
        loss = ops.diffusion_loss(mo, x0, t, abar, None, seed, off, "epsilon", None)
        x_prev, _ = ops.ddpm_step(mo, t, t - 1, x, abar, None, seed, off, "epsilon", "fixed_small", True, 1.0, False,
                                  0.995, 1.0, None, False)
        return x_t, loss, x_prev

    compiled = torch.compile(loop, fullgraph=True)
    args = (torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.tensor([10, 20]),
            torch.tensor([1]), torch.tensor([0]))
    for a, b in zip(compiled(*args), loop(*args)):
        torch.testing.assert_close(a, b)


def test_build_info_and_dispatch():
    from ddpm_fast import _native_backend

    info = _native_backend.build_info()
    assert info["torch_version"] == torch.__version__
    assert "baseline" in info["cpu_isas_built"]
    # backend=None prefers native on the CPU
    x0 = torch.randn(2, 3)
    a = ddpm_fast.q_sample(x0, 5, SCHED, seed=1)
    b = ddpm_fast.q_sample(x0, 5, SCHED, seed=1, backend="native")
    assert torch.equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the native CUDA kernels are tested on a GPU")
def test_cuda_parity_q_sample_and_step():
    if not _INFO["available"].get("cuda", False):
        pytest.skip(f"native CUDA unavailable: {_INFO['reason']}")
    x0 = torch.randn(4, 3, 16, 16, device="cuda")
    got, ref = both(ddpm_fast.q_sample, x0, torch.randint(0, 1000, (4,), device="cuda"), SCHED, seed=1)
    close(got, ref)
    mo, x_t = torch.randn_like(x0), torch.randn_like(x0)
    got, ref = both(ddpm_fast.ddpm_step, mo, 500, x_t, SCHED, seed=3, thresholding=True, sample_max_value=2.0)
    close(got, ref)


_ISA_SCRIPT = r"""
import torch, ddpm_fast
from ddpm_fast import NoiseSchedule, _native_backend
print(_native_backend.build_info()["cpu_isa_selected"])
S = NoiseSchedule.from_name("linear", 1000)
g = torch.Generator().manual_seed(0)
worst = 0.0
for dtype in (torch.float32, torch.float16, torch.float64):
    mo = torch.randn(3, 4, 5, 7, generator=g).to(dtype)
    x = torch.randn(3, 4, 5, 7, generator=g).to(dtype)
    v = torch.cat([mo, torch.rand_like(mo) * 2 - 1], 1)
    t = torch.tensor([999, 0, 400])
    pairs = [
        [ddpm_fast.ddpm_step(v, t, x, S, variance_type="learned_range", thresholding=True, sample_max_value=2.0,
                             seed=3, backend=b) for b in ("native", "reference")],
        [ddpm_fast.ddim_step(mo, t, x, S, prev_t=t - 1, eta=0.5, seed=4, backend=b) for b in ("native", "reference")],
        [ddpm_fast.q_sample(x, t, S, seed=5, backend=b) for b in ("native", "reference")],
        [ddpm_fast.diffusion_loss(mo, x, t, S, target="v_prediction", seed=6, reduction="none", backend=b)
         for b in ("native", "reference")],
    ]
    for a, b in pairs:
        err = ((a.double() - b.double()).abs() / (1e-5 + 2.0 ** -10 * b.double().abs())).max().item()
        worst = max(worst, err)
print(worst)
"""


@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
def test_every_instruction_set_matches_reference(isa):
    """Each per-ISA build of the kernels (DDPM_FAST_CPU_ISA picks one at load) against the reference,
    in a subprocess; within one fp16 ulp (2^-10 relative, the loosest row of TOL) plus 1e-5."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, DDPM_FAST_CPU_ISA=isa, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", _ISA_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    selected, worst = r.stdout.split()
    if selected != isa:
        pytest.skip(f"this CPU does not support {isa} (selected {selected})")
    assert float(worst) <= 1.0, f"{isa}: worst error {worst} tolerance units"
