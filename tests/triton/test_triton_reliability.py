"""The reliability rules of tests/test_reliability.py (docs/errors.md) on the Triton backend, and a
small property-based parity run against the reference.

Runs where tests/triton runs: ``TRITON_INTERPRET=1`` on the CPU (its own process), or a CUDA
device. Shapes are tiny (the interpreter is slow); the hypothesis profile is fixed
(``derandomize=True``, no database, few examples). Tolerances are tests/triton/test_triton_ops.py's:
|got - want| <= 1e-5 + ulp(dtype) |want| (ulp 0 for fp32, 2^-10 fp16, 2^-7 bf16), NaN where the
reference is NaN.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "") == "1"
CUDA = torch.cuda.is_available()
if not (INTERPRET or CUDA):
    _why = "the Triton lane needs TRITON_INTERPRET=1 (CPU, its own process) or a CUDA device"
    print(f"SKIP tests/triton/test_triton_reliability.py: {_why}")
    pytest.skip(_why, allow_module_level=True)
try:
    import triton  # noqa: F401
except Exception as e:  # pragma: no cover
    pytest.skip(f"triton is not importable ({e})", allow_module_level=True)

import ddpm_fast as F  # noqa: E402

DEVICE = torch.device("cuda" if (CUDA and not INTERPRET) else "cpu")
SCHED = F.NoiseSchedule.from_name("linear", 1000)
ZSNR = F.NoiseSchedule.from_name("linear", 1000, rescale_zero_snr=True)
ULP = {torch.float32: 0.0, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}
WORST = {}


def gen(*shape, seed=0, dtype=torch.float32, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEVICE)


def T(*v):
    return torch.tensor(v, dtype=torch.int64, device=DEVICE)


def assert_close(op, got, want, dtype):
    """test_triton_ops.py's rule, recording the worst error per (op, dtype)."""
    g, w = got.detach().double().cpu(), want.detach().double().cpu()
    assert g.shape == w.shape, (op, g.shape, w.shape)
    assert torch.equal(torch.isnan(g), torch.isnan(w)), f"{op}: NaN pattern differs"
    finite = torch.isfinite(w)
    assert torch.equal(g[~finite & ~torch.isnan(w)], w[~finite & ~torch.isnan(w)]), f"{op}: infinities differ"
    diff = torch.where(finite, (g - w).abs(), torch.zeros_like(g))
    tol = torch.where(finite, 1e-5 + ULP[dtype] * w.abs(), torch.ones_like(g))
    key = (op, str(dtype).replace("torch.", ""))
    n, a, u = WORST.get(key, (0, 0.0, 0.0))
    WORST[key] = (n + 1, max(a, float(diff.max()) if diff.numel() else 0.0),
                  max(u, float((diff / tol).max()) if diff.numel() else 0.0))
    assert bool((diff <= tol).all()), f"{op} {dtype}: worst |diff| {float(diff.max()):.3g}"


class _Report:
    """Prints WORST in pytest's terminal summary (registered as a plugin by the fixture below)."""

    def pytest_terminal_summary(self, terminalreporter):
        if WORST:
            terminalreporter.write_line("Triton vs reference (property tests): cases, worst |diff|, worst in tolerance "
                                        f"units (device {DEVICE})")
            for (op, dt), (n, a, u) in sorted(WORST.items()):
                terminalreporter.write_line(f"  {op:24s} {dt:9s} {n:4d} cases  abs {a:.3g}  units {u:.3g}")


@pytest.fixture(scope="module", autouse=True)
def _report(request):
    if not request.config.pluginmanager.has_plugin("ddpm_fast_triton_property_report"):
        request.config.pluginmanager.register(_Report(), "ddpm_fast_triton_property_report")
    yield


def ops():
    import ddpm_fast.backends.triton
    ddpm_fast.backends.triton._load()
    return torch.ops.ddpm_fast_triton


CLIP = (True, 1.0, False, 0.995, 1.0, None, True)
THR = (False, 1.0, True, 0.9, 2.0, None, True)


# --------------------------------------------------------------------------------------------
# 1. timesteps outside the table: NaN rows in every output of the registered ops
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [1000, 10 ** 12, 2 ** 63 - 1, -1, -(2 ** 63)])
def test_registered_triton_ops_give_nan_rows_outside_the_table(bad):
    o = ops()
    abar = SCHED.table(DEVICE)
    x, mo, mo2 = gen(2, 3, 4), gen(2, 3, 4, seed=1), gen(2, 6, 4, seed=2)
    seed, off = T(5), T(1)
    t, prev, nxt = T(bad, 400), T(300, 399), T(600, 500)
    t_ok = T(6, 400)

    def rows(outs):
        for out in outs:
            if out.numel():
                assert torch.isnan(out[0]).all(), "row 0 should be NaN"
                assert torch.isfinite(out[1]).all(), "row 1 should be finite"

    rows([o.q_sample(x, t, abar, None, seed, off)])
    rows(o.ddpm_step(mo, t, t_ok - 1, x, abar, None, seed, off, "sample", "fixed_small", *CLIP))
    rows(o.ddpm_step(mo2, t, t_ok - 1, x, abar, None, seed, off, "epsilon", "learned_range", *THR))
    rows(o.ddim_step(mo, t, T(-1, 399), x, abar, None, seed, off, 1.0, "sample", True, 0.5, *CLIP))
    rows(o.ddim_reverse_step(mo, t, nxt, x, abar, "v_prediction", False, *CLIP))
    rows([o.diffusion_loss(mo, x, t, abar, None, seed, off, target, g)
          for target in ("epsilon", "sample", "v_prediction") for g in (None, 5.0)])
    rows([o.diffusion_loss_backward(torch.ones(2, device=DEVICE), mo, x, t, abar, None, seed, off, "sample", None)])
    rows([o.vlb_loss(mo2, x.clamp(-1, 1), x, t, abar, "sample", "learned_range")])
    if bad >= 0:    # prev_t >= T; a negative prev_t is the final step
        rows(o.ddpm_step(mo, t_ok, T(bad, 399), x, abar, None, seed, off, "sample", "fixed_small", *CLIP))
        rows(o.ddim_step(mo, t_ok, T(bad, 399), x, abar, None, seed, off, 0.0, "sample", False, 1.0, *CLIP))
    # next_t outside [0, T): negative values too
    rows(o.ddim_reverse_step(mo, T(5, 400), T(bad, 500), x, abar, "sample", False, *CLIP))
    # gradients
    x0 = x.clone().requires_grad_(True)
    o.q_sample(x0, t, abar, None, seed, off).sum().backward()
    rows([x0.grad])


# --------------------------------------------------------------------------------------------
# 2 and 4. out=
# --------------------------------------------------------------------------------------------
def test_out_partial_overlap_and_unwritable_out_are_refused():
    buf = gen(2 * 40 + 1)
    x_t, shifted = buf[:80].view(2, 40), buf[1:].view(2, 40)
    mo = gen(2, 40, seed=1)
    with pytest.raises(ValueError, match="out"):
        F.ddpm_step(mo, 500, x_t, SCHED, seed=1, out=shifted, backend="triton")
    with pytest.raises(ValueError, match="out"):
        F.ddim_step(mo, 500, x_t, SCHED, prev_t=400, out=shifted, backend="triton")
    with pytest.raises(ValueError, match="out"):
        F.ddim_reverse_step(mo, 500, x_t, SCHED, next_t=600, out=torch.zeros(1, 40, device=DEVICE).expand(2, 40),
                            backend="triton")
    o = ops()
    abar = SCHED.table(DEVICE)
    with pytest.raises(ValueError, match="out"):
        o.ddpm_step_out(mo, T(500, 500), T(499, 499), x_t, abar, None, T(1), T(0), "epsilon", "fixed_small", *CLIP,
                        shifted)
    with pytest.raises(ValueError, match="out"):
        o.ddim_reverse_step_out(mo, T(5, 5), T(6, 6), x_t, abar, "epsilon", False, *CLIP, shifted)
    # out = x_t itself works
    want = F.ddpm_step(mo, 500, x_t, SCHED, seed=1, backend="reference")
    xt = x_t.clone()
    assert F.ddpm_step(mo, 500, xt, SCHED, seed=1, out=xt, backend="triton") is xt
    assert_close("ddpm_step out=x_t", xt, want, torch.float32)


# --------------------------------------------------------------------------------------------
# 3. zero-size inputs
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(0, 3), (2, 0), (0, 2, 3), (2, 0, 3)], ids=str)
def test_zero_size_inputs_give_empty_results(shape):
    B = shape[0]
    x, mo = torch.randn(shape, device=DEVICE), torch.randn(shape, device=DEVICE)
    mo2 = torch.randn((shape[0], 2 * shape[1]) + shape[2:], device=DEVICE)
    for t in (5, torch.full((B,), 5, dtype=torch.int64, device=DEVICE)):
        assert F.q_sample(x, t, SCHED, seed=1, backend="triton").shape == shape
        assert F.ddpm_step(mo, t, x, SCHED, seed=1, thresholding=True, sample_max_value=2.0,
                           backend="triton").shape == shape
        assert F.ddpm_step(mo2, t, x, SCHED, variance_type="learned_range", seed=1, backend="triton").shape == shape
        assert F.ddim_step(mo, t, x, SCHED, prev_t=4, eta=1.0, seed=1, backend="triton").shape == shape
        assert F.ddim_reverse_step(mo, t, x, SCHED, next_t=6, backend="triton").shape == shape
        loss = F.diffusion_loss(mo, x, t, SCHED, seed=1, reduction="none", backend="triton")
        assert loss.shape == (B,) and torch.isnan(loss).all()
        assert F.vlb_loss(mo2, x, x, t, SCHED, reduction="none", backend="triton").shape == (B,)
    assert F.gaussian_noise(shape, 3, device=DEVICE, backend="triton").shape == shape


# --------------------------------------------------------------------------------------------
# 5, 6, 7
# --------------------------------------------------------------------------------------------
def test_ddim_towards_a_noisier_state_matches_the_reference():
    mo, x = gen(3, 4, 5), gen(3, 4, 5, seed=1)
    a = SCHED.alphas_cumprod[20].item()
    for final in (0.5 * a, 0.0):
        for eta in (0.0, 1.0):
            kw = dict(prev_t=-1, eta=eta, final_alpha_cumprod=final, seed=7, return_x0=True)
            got = F.ddim_step(mo, 20, x, SCHED, backend="triton", **kw)
            want = F.ddim_step(mo, 20, x, SCHED, backend="reference", **kw)
            assert torch.isfinite(got[0]).all()
            assert_close("ddim_step final", got[0], want[0], torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_zero_snr_zero_over_zero(dtype):
    x_t, eps = gen(2, 3, 4, dtype=dtype), gen(2, 3, 4, seed=1, dtype=dtype)
    eps[0, 1, 2] = x_t[0, 1, 2]
    for kw in (dict(), dict(thresholding=True, sample_max_value=3.0)):
        prev, x0 = F.ddpm_step(eps, 999, x_t, ZSNR, seed=1, return_x0=True, backend="triton", **kw)
        assert torch.isfinite(prev).all() and torch.isfinite(x0).all() and x0[0, 1, 2] == 0
        prev = F.ddim_step(eps, 999, x_t, ZSNR, prev_t=899, use_clipped_model_output=True, backend="triton", **kw)
        assert torch.isfinite(prev).all()
    prev = F.ddim_step(eps, 999, x_t, ZSNR, prev_t=899, clip_sample=False, use_clipped_model_output=True,
                       backend="triton")
    assert not torch.isnan(prev).any()
    vlb = F.vlb_loss(torch.cat([eps, torch.zeros_like(eps)], 1), x_t.clamp(-1, 1), x_t, 999, ZSNR,
                     reduction="none", backend="triton")
    assert not torch.isnan(vlb).any()


def test_sample_max_value_zero_is_refused():
    mo, x = gen(2, 3), gen(2, 3, seed=1)
    with pytest.raises(ValueError, match="sample_max_value"):
        F.ddpm_step(mo, 5, x, SCHED, seed=1, thresholding=True, sample_max_value=0.0, backend="triton")
    with pytest.raises(ValueError, match="sample_max_value"):
        ops().ddim_step(mo, T(5, 5), T(4, 4), x, SCHED.table(DEVICE), None, None, None, 0.0, "epsilon", False, 1.0,
                        False, 1.0, True, 0.995, 0.0, None, False)


# --------------------------------------------------------------------------------------------
# the loss gradient in x0
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("target", ["epsilon", "sample", "v_prediction"])
def test_diffusion_loss_gradient_in_x0(target):
    grads = {}
    for b in ("triton", "reference"):
        x0 = gen(3, 2, 5).requires_grad_(True)
        mo = gen(3, 2, 5, seed=1, dtype=torch.bfloat16).requires_grad_(True)
        loss = F.diffusion_loss(mo, x0, T(0, 400, 999), SCHED, target=target, seed=4, reduction="none", backend=b)
        (loss * torch.tensor([1.0, -2.0, 0.5], device=DEVICE)).sum().backward()
        grads[b] = (mo.grad, x0.grad)
    if target == "epsilon":
        assert grads["triton"][1] is None and grads["reference"][1] is None
    else:
        assert_close("diffusion_loss grad x0", grads["triton"][1], grads["reference"][1], torch.float32)
    assert_close("diffusion_loss grad mo", grads["triton"][0], grads["reference"][0], torch.bfloat16)


def test_vlb_gradient_in_x0_and_x_t():
    grads = {}
    for b in ("triton", "reference"):
        x0 = gen(3, 2, 5).clamp(-1, 1).requires_grad_(True)
        x_t = gen(3, 2, 5, seed=1).requires_grad_(True)
        mo = torch.cat([gen(3, 2, 5, seed=2), gen(3, 2, 5, seed=3).clamp(-1, 1)], 1).requires_grad_(True)
        vlb = F.vlb_loss(mo, x0, x_t, T(0, 300, 999), SCHED, reduction="none", backend=b)
        (vlb * torch.tensor([1.0, -0.5, 2.0], device=DEVICE)).sum().backward()
        grads[b] = (mo.grad, x0.grad, x_t.grad)
    for name, got, want in zip(("mo", "x0", "x_t"), grads["triton"], grads["reference"]):
        assert got is not None and want is not None, name
        assert_close(f"vlb_loss grad {name}", got, want, torch.float32)


# --------------------------------------------------------------------------------------------
# property-based parity (small)
# --------------------------------------------------------------------------------------------
hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is not installed (pip install hypothesis)")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

settings.register_profile("ddpm_fast_triton_properties", derandomize=True, database=None, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PROFILE = settings.get_profile("ddpm_fast_triton_properties")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SIZES = (1, 2, 3, 5, 8)
SEEDS = (0, 7, 2 ** 32 - 1, 2 ** 32, 2 ** 63 - 1)


@st.composite
def shapes(draw, min_dims=1, max_dims=4):
    nd = draw(st.integers(min_dims, max_dims))
    dims = [draw(st.sampled_from(SIZES)) for _ in range(nd)]
    while math.prod(dims) > 120:
        dims[dims.index(max(dims))] //= 2
    return tuple(max(d, 1) for d in dims)


@st.composite
def inputs(draw, shape, dtype):
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))
    x = torch.randn(shape, generator=g) * draw(st.sampled_from((1.0, 3.0)))
    if x.numel() and draw(st.integers(0, 5)) == 0:
        x.view(-1)[draw(st.integers(0, x.numel() - 1))] = draw(st.sampled_from((math.nan, math.inf, -math.inf)))
    x = x.to(dtype).to(DEVICE)
    if x.dim() >= 2 and draw(st.booleans()):
        x = x.transpose(-1, -2).contiguous().transpose(-1, -2)   # strided
    return x


@st.composite
def t_and_seed(draw, B, high=999):
    form = draw(st.sampled_from(("int", "rows")))
    t = draw(st.integers(0, high)) if form == "int" else \
        torch.tensor([draw(st.integers(0, high)) for _ in range(B)], device=DEVICE)
    if draw(st.booleans()):
        seed = torch.tensor([draw(st.sampled_from(SEEDS)) for _ in range(B)], device=DEVICE)
    else:
        seed = draw(st.sampled_from(SEEDS))
    return t, dict(seed=seed, offset=draw(st.sampled_from(SEEDS)))


@st.composite
def clip_options(draw):
    kind = draw(st.sampled_from(("none", "clip", "threshold")))
    if kind == "none":
        return dict(clip_sample=False)
    if kind == "clip":
        return dict(clip_sample=True, clip_sample_range=draw(st.sampled_from((0.5, 1.0, 2.5))))
    return dict(thresholding=True, dynamic_thresholding_ratio=draw(st.sampled_from((0.5, 0.995))),
                sample_max_value=draw(st.sampled_from((0.5, 2.5))))


def _both(fn, **kw):
    return fn(backend="triton", **kw), fn(backend="reference", **kw)


@settings(PROFILE, max_examples=30)
@given(data=st.data())
def test_q_sample_and_loss_parity(data):
    shape = data.draw(shapes())
    dtype = data.draw(st.sampled_from(DTYPES))
    x0 = data.draw(inputs(shape, dtype))
    t, noise = data.draw(t_and_seed(shape[0]))
    got, want = _both(lambda **k: F.q_sample(x0, t, SCHED, **k), **noise)
    assert_close("q_sample", got, want, dtype)
    mo = data.draw(inputs(shape, dtype))
    target = data.draw(st.sampled_from(("epsilon", "sample", "v_prediction")))
    gamma = data.draw(st.sampled_from((None, 5.0)))
    got, want = _both(lambda **k: F.diffusion_loss(mo, x0, t, SCHED, target=target, reduction="none",
                                                   snr_gamma=gamma, **k), **noise)
    assert_close("diffusion_loss", got, want, torch.float32)


@settings(PROFILE, max_examples=60)
@given(data=st.data())
def test_step_parity(data):
    op = data.draw(st.sampled_from(("ddpm", "ddim", "reverse")))
    variance = data.draw(st.sampled_from(("fixed_small", "fixed_large", "learned_range"))) if op == "ddpm" else None
    learned = variance == "learned_range"
    shape = data.draw(shapes(min_dims=2 if learned else 1))
    dtype = data.draw(st.sampled_from(DTYPES))
    x_t = data.draw(inputs(shape, dtype))
    mo_shape = (shape[0], 2 * shape[1]) + shape[2:] if learned else shape
    mo = data.draw(inputs(mo_shape, dtype))
    if learned:
        mo = torch.cat([mo[:, :shape[1]], mo[:, shape[1]:].float().clamp(-1, 1).to(dtype)], 1)
    t, noise = data.draw(t_and_seed(shape[0], high=998))
    pred = data.draw(st.sampled_from(("epsilon", "sample", "v_prediction")))
    kw = dict(prediction_type=pred, return_x0=True, **data.draw(clip_options()))
    tmin = t if isinstance(t, int) else int(t.min())
    tmax = t if isinstance(t, int) else int(t.max())
    if op == "ddpm":
        got, want = _both(lambda **k: F.ddpm_step(mo, t, x_t, SCHED, variance_type=variance, **k), **kw, **noise)
    elif op == "ddim":
        eta = data.draw(st.sampled_from((0.0, 1.0)))
        uc, final = data.draw(st.booleans()), data.draw(st.sampled_from((1.0, 0.0)))
        got, want = _both(lambda **k: F.ddim_step(mo, t, x_t, SCHED, prev_t=tmin - 1, eta=eta,
                                                  use_clipped_model_output=uc, final_alpha_cumprod=final, **k),
                          **kw, **noise)
    else:
        got, want = _both(lambda **k: F.ddim_reverse_step(mo, t, x_t, SCHED, next_t=tmax + 1, **k), **kw)
    assert_close(f"{op} x_prev", got[0], want[0], dtype)
    assert_close(f"{op} x0_hat", got[1], want[1], dtype)
