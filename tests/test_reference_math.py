"""The reference (docs/math.md) against independent float64 closed forms.

Everything here runs on backend="reference" (the specification itself); the other backends have
their own parity tests against it. Closed forms are written out in numpy/python float64 so that a
wrong formula in ``ddpm_fast.reference`` or ``ddpm_fast.schedule`` cannot agree with itself.
"""
import math

import numpy as np
import pytest
import torch

import ddpm_fast
from ddpm_fast import reference as R
from ddpm_fast.schedule import NoiseSchedule, inference_timesteps, space_timesteps

B = "reference"
F64 = torch.float64
SCHEDULES = ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"]


def _abar_np(betas):
    return np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))


def _col(v, ndim):
    return np.asarray(v, dtype=np.float64).reshape((-1,) + (1,) * (ndim - 1))


# --------------------------------------------------------------------------------------------
# schedules
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("T", [1000, 37])
def test_linear_and_scaled_linear(T):
    lin = NoiseSchedule.from_name("linear", T, 2e-4, 0.03)
    expect = np.array([2e-4 + (0.03 - 2e-4) * i / (T - 1) for i in range(T)])
    np.testing.assert_allclose(lin.betas.numpy(), expect, rtol=1e-13, atol=0)
    sl = NoiseSchedule.from_name("scaled_linear", T, 8.5e-4, 0.012)
    a, b = math.sqrt(8.5e-4), math.sqrt(0.012)
    expect = np.array([(a + (b - a) * i / (T - 1)) ** 2 for i in range(T)])
    np.testing.assert_allclose(sl.betas.numpy(), expect, rtol=1e-13, atol=0)


@pytest.mark.parametrize("T", [1000, 50])
def test_cosine_formula_and_cap(T):
    s = 0.008

    def f(u):
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    sched = NoiseSchedule.from_name("squaredcos_cap_v2", T)
    assert torch.equal(NoiseSchedule.from_name("cosine", T).betas, sched.betas)
    raw = np.array([1 - f((t + 1) / T) / f(t / T) for t in range(T)])
    capped = raw > 0.999
    assert capped[-1], "the 0.999 cap binds at the last step"
    np.testing.assert_allclose(sched.betas.numpy(), np.minimum(raw, 0.999), rtol=1e-12, atol=1e-15)
    assert float(sched.betas.max()) == pytest.approx(0.999, abs=1e-15)
    # abar equals f((t+1)/T)/f(0) exactly where the cap never bound before t
    first_cap = int(np.argmax(capped))
    closed = np.array([f((t + 1) / T) / f(0) for t in range(first_cap)])
    np.testing.assert_allclose(sched.alphas_cumprod[:first_cap].numpy(), closed, rtol=1e-11)
    # and is strictly larger than it after the cap bound
    assert float(sched.alphas_cumprod[-1]) > f(1.0) / f(0)


def test_sigmoid_formula():
    T, b0, b1 = 1000, 1e-4, 0.02
    x = np.linspace(-6, 6, T)
    expect = 1 / (1 + np.exp(-x)) * (b1 - b0) + b0
    np.testing.assert_allclose(NoiseSchedule.from_name("sigmoid", T, b0, b1).betas.numpy(), expect, rtol=1e-13)


@pytest.mark.parametrize("name", SCHEDULES)
def test_tables_closed_forms(name):
    s = NoiseSchedule.from_name(name, 200)
    b = s.betas.numpy()
    a = _abar_np(b)
    ap = np.concatenate([[1.0], a[:-1]])
    np.testing.assert_allclose(s.alphas_cumprod.numpy(), a, rtol=1e-13)
    np.testing.assert_allclose(s.alphas_cumprod_prev.numpy(), ap, rtol=1e-13)
    np.testing.assert_allclose(s.sqrt_recipm1_alphas_cumprod.numpy(), np.sqrt(1 / a - 1), rtol=1e-12)
    pv = b * (1 - ap) / (1 - a)
    np.testing.assert_allclose(s.posterior_variance.numpy(), pv, rtol=1e-12, atol=1e-300)
    assert s.posterior_variance[0] == 0
    np.testing.assert_allclose(s.posterior_log_variance_clipped.numpy(), np.log(np.append(pv[1], pv[1:])),
                               rtol=1e-12)
    np.testing.assert_allclose(s.posterior_mean_coef_x0.numpy(), b * np.sqrt(ap) / (1 - a), rtol=1e-12)
    np.testing.assert_allclose(s.posterior_mean_coef_xt.numpy(), (1 - ap) * np.sqrt(1 - b) / (1 - a),
                               rtol=1e-12, atol=1e-300)


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_zero_terminal_snr_rescale(name):
    base = NoiseSchedule.from_name(name, 1000, 8.5e-4 if name == "scaled_linear" else 1e-4,
                                   0.012 if name == "scaled_linear" else 0.02)
    z = NoiseSchedule.from_name(name, 1000, 8.5e-4 if name == "scaled_linear" else 1e-4,
                                0.012 if name == "scaled_linear" else 0.02, rescale_zero_snr=True)
    sa, sz = np.sqrt(base.alphas_cumprod.numpy()), np.sqrt(z.alphas_cumprod.numpy())
    assert sz[-1] == 0.0
    assert sz[0] == pytest.approx(sa[0], rel=1e-14)
    # an affine map of sqrt(abar): (s - s_last) * s_0 / (s_0 - s_last)
    np.testing.assert_allclose(sz, (sa - sa[-1]) * sa[0] / (sa[0] - sa[-1]), rtol=1e-10, atol=1e-15)
    assert float(z.betas[-1]) == 1.0
    assert bool(((z.betas > 0) & (z.betas <= 1)).all())


# --------------------------------------------------------------------------------------------
# respacing and timestep helpers
# --------------------------------------------------------------------------------------------
def _improved_space_timesteps(T, section_counts):
    """improved-diffusion's respace.space_timesteps, rewritten from its description."""
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            n = int(section_counts[4:])
            for stride in range(1, T):
                if len(range(0, T, stride)) == n:
                    return set(range(0, T, stride))
            raise ValueError
        section_counts = [int(x) for x in section_counts.split(",")]
    per, extra = divmod(T, len(section_counts))
    start, out = 0, set()
    for i, count in enumerate(section_counts):
        size = per + (1 if i < extra else 0)
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        out |= {start + round(stride * j) for j in range(count)}
        start += size
    return out


@pytest.mark.parametrize("T,counts", [(1000, "10,20"), (1000, "ddim50"), (1000, "250"), (100, "3,1,7"),
                                      (4000, "ddim25"), (1001, "10,10,10")])
def test_space_timesteps(T, counts):
    kept = space_timesteps(T, counts)
    assert kept == sorted(_improved_space_timesteps(T, counts))
    if counts.startswith("ddim"):
        assert kept == list(range(0, T, T // int(counts[4:])))


def test_space_timesteps_known():
    assert space_timesteps(100, "4") == [0, 33, 66, 99]
    assert space_timesteps(20, "2,3") == [0, 9, 10, 14, 19]
    with pytest.raises(ValueError):
        space_timesteps(10, "ddim6")  # no integer stride gives 6 of 10


@pytest.mark.parametrize("name", ["linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("counts", ["10,20", "ddim50"])
def test_respace_keeps_abar(name, counts):
    s = NoiseSchedule.from_name(name, 1000)
    kept = space_timesteps(1000, counts)
    r = s.respace(kept)
    assert r.num_timesteps == len(kept)
    assert r.timestep_map.tolist() == kept
    # 1 - (1 - abar_k/abar_prev) re-multiplied: a few float64 ulps per step (2.7e-11 seen for cosine)
    np.testing.assert_allclose(r.alphas_cumprod.numpy(), s.alphas_cumprod.numpy()[kept], rtol=1e-9)
    a = s.alphas_cumprod.numpy()[kept]
    np.testing.assert_allclose(r.betas.numpy(), 1 - a / np.concatenate([[1.0], a[:-1]]), rtol=1e-12)


def _diffusers_timesteps(T, n, spacing, offset):
    diffusers = pytest.importorskip("diffusers", reason="diffusers is the oracle for set_timesteps")
    sch = diffusers.DDPMScheduler(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=offset)
    sch.set_timesteps(n)
    return sch.timesteps.tolist()


@pytest.mark.parametrize("spacing,offset", [("leading", 0), ("leading", 1), ("linspace", 0), ("trailing", 0)])
@pytest.mark.parametrize("T,n", [(1000, 50), (1000, 7), (1000, 1000), (1000, 1), (77, 13)])
def test_inference_timesteps_match_diffusers(spacing, offset, T, n):
    theirs = _diffusers_timesteps(T, n, spacing, offset)
    if max(theirs) >= T:  # diffusers hands out timestep T here (and fails later, in step); we refuse early
        with pytest.raises(ValueError, match="steps_offset"):
            inference_timesteps(T, n, spacing, steps_offset=offset)
        return
    ours = inference_timesteps(T, n, spacing, steps_offset=offset)
    assert ours == theirs
    assert ours == sorted(ours, reverse=True) and len(ours) == n


def test_inference_timesteps_bad():
    with pytest.raises(ValueError, match="spacing"):
        inference_timesteps(1000, 10, "cosine")
    with pytest.raises(ValueError, match="num_inference_steps"):
        inference_timesteps(1000, 1001)
    with pytest.raises(ValueError, match="steps_offset"):
        inference_timesteps(10, 10, "leading", steps_offset=1)


# --------------------------------------------------------------------------------------------
# posterior, conversions, KL, likelihood
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SCHEDULES)
def test_posterior_mean_two_forms(name):
    """coef_x0 x0_hat + coef_xt x_t == 1/sqrt(alpha)(x_t - beta/sqrt(1-abar) eps) without clipping,
    also for respaced pairs (t, prev_t) with beta = 1 - abar_t/abar_prev."""
    s = NoiseSchedule.from_name(name, 1000)
    a = s.alphas_cumprod.numpy()
    t = torch.tensor([1, 2, 500, 998, 999, 300])
    pt = torch.tensor([0, -1, 499, 997, 899, 3])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 2, 5, generator=g, dtype=F64)
    eps = torch.randn(6, 2, 5, generator=g, dtype=F64)
    out = ddpm_fast.ddpm_step(eps, t, x, s, prev_t=pt, clip_sample=False, noise=torch.zeros_like(x), backend=B)
    at = a[t.numpy()]
    ap = np.where(pt.numpy() >= 0, a[pt.clamp(min=0).numpy()], 1.0)
    alpha = at / ap
    beta = 1 - alpha
    expect = (x.numpy() - _col(beta / np.sqrt(1 - at), 3) * eps.numpy()) / _col(np.sqrt(alpha), 3)
    np.testing.assert_allclose(out.numpy(), expect, rtol=1e-10, atol=1e-12)


def test_conversions_invert():
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(5, 3, 4, generator=g, dtype=F64)
    eps = torch.randn(5, 3, 4, generator=g, dtype=F64)
    abar = torch.tensor([0.9999, 0.7, 0.3, 1e-3, 4e-5], dtype=F64)
    x_t = R.q_sample(x0, abar, eps)
    col = abar.reshape(-1, 1, 1)
    torch.testing.assert_close(x_t, col.sqrt() * x0 + (1 - col).sqrt() * eps, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(R.x0_from_eps(x_t, eps, abar), x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(R.eps_from_x0(x_t, x0, abar), eps, rtol=1e-9, atol=1e-9)
    v = R.v_target(x0, eps, abar)
    torch.testing.assert_close(v, col.sqrt() * eps - (1 - col).sqrt() * x0, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(R.x0_from_v(x_t, v, abar), x0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(R.eps_from_v(x_t, v, abar), eps, rtol=1e-12, atol=1e-12)
    for pt, pred in (("epsilon", eps), ("sample", x0), ("v_prediction", v)):
        torch.testing.assert_close(R.x0_from_prediction(pred, x_t, abar, pt), x0, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(R.eps_from_prediction(pred, x_t, abar, pt), eps, rtol=1e-9, atol=1e-9)


def test_normal_kl_zero_and_closed_form():
    integrate = pytest.importorskip("scipy.integrate", reason="scipy integrates the KL numerically")

    m = torch.tensor([0.3, -2.0, 5.0], dtype=F64)
    lv = torch.tensor([-1.0, 0.0, 2.5], dtype=F64)
    assert torch.equal(R.normal_kl(m, lv, m, lv), torch.zeros(3, dtype=F64))
    for m1, l1, m2, l2 in [(0.0, 0.0, 1.0, 0.0), (0.3, -1.2, -0.4, 0.7), (2.0, 1.0, 1.5, -0.5)]:
        s1, s2 = math.exp(0.5 * l1), math.exp(0.5 * l2)

        def integrand(x):
            lp = -0.5 * ((x - m1) / s1) ** 2 - math.log(s1)
            lq = -0.5 * ((x - m2) / s2) ** 2 - math.log(s2)
            return math.exp(lp) / math.sqrt(2 * math.pi) * (lp - lq)

        numeric, _ = integrate.quad(integrand, m1 - 30 * s1, m1 + 30 * s1, limit=200)
        ours = float(R.normal_kl(*(torch.tensor(v, dtype=F64) for v in (m1, l1, m2, l2))))
        assert ours == pytest.approx(numeric, rel=1e-8, abs=1e-12)


def test_normal_kl_monte_carlo():
    g = torch.Generator().manual_seed(3)
    m1, l1, m2, l2 = 0.5, -0.3, -0.2, 0.4
    x = m1 + math.exp(0.5 * l1) * torch.randn(400_000, generator=g, dtype=F64)
    logp = -0.5 * (x - m1) ** 2 / math.exp(l1) - 0.5 * l1
    logq = -0.5 * (x - m2) ** 2 / math.exp(l2) - 0.5 * l2
    mc = (logp - logq).mean().item()
    se = (logp - logq).std().item() / math.sqrt(x.numel())
    ours = float(R.normal_kl(*(torch.tensor(v, dtype=F64) for v in (m1, l1, m2, l2))))
    assert abs(ours - mc) < 5 * se


@pytest.mark.parametrize("mean,log_scale", [(0.0, math.log(0.05)), (0.37, math.log(0.3)), (-0.9, math.log(0.01)),
                                            (0.2, math.log(2.0))])
def test_discretized_likelihood_sums_to_one(mean, log_scale):
    bins = torch.linspace(-1, 1, 256, dtype=F64)
    assert (bins[1] - bins[0]).item() == pytest.approx(2 * R.DISCRETE_BIN_HALF_WIDTH)
    ll = R.discretized_gaussian_log_likelihood(bins, torch.full_like(bins, mean), torch.full_like(bins, log_scale))
    assert ll.exp().sum().item() == pytest.approx(1.0, abs=1e-9)
    # an interior bin is the difference of the tanh-approximated CDF at its edges
    k = 100
    cdf = lambda z: 0.5 * (1 + math.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z ** 3)))  # noqa: E731
    inv = math.exp(-log_scale)
    edge = bins[k].item() - mean
    p = cdf(inv * (edge + 1 / 255)) - cdf(inv * (edge - 1 / 255))
    assert ll[k].item() == pytest.approx(math.log(max(p, 1e-12)), rel=1e-9)


def test_tanh_cdf_is_close_to_normal_cdf():
    x = torch.linspace(-6, 6, 1001, dtype=F64)
    exact = 0.5 * (1 + torch.erf(x / math.sqrt(2)))
    assert (R.approx_standard_normal_cdf(x) - exact).abs().max().item() < 2e-4


# --------------------------------------------------------------------------------------------
# min-SNR weights and the simple loss
# --------------------------------------------------------------------------------------------
def test_min_snr_weights():
    abar = torch.tensor([0.9999, 0.9, 0.5, 0.1, 1e-4, 0.0], dtype=F64)
    snr = abar / (1 - abar)
    g = 5.0
    clipped = torch.minimum(snr, torch.tensor(g, dtype=F64))
    eps_w = R.min_snr_weight(abar, g, "epsilon")
    torch.testing.assert_close(eps_w[:-1], (clipped / snr)[:-1], rtol=1e-14, atol=0)
    assert eps_w[-1].item() == 1.0  # the limit at snr = 0
    torch.testing.assert_close(R.min_snr_weight(abar, g, "v_prediction"), clipped / (snr + 1), rtol=1e-14, atol=0)
    torch.testing.assert_close(R.min_snr_weight(abar, g, "sample"), clipped, rtol=1e-14, atol=0)
    assert eps_w[0].item() == pytest.approx(g / snr[0].item())


@pytest.mark.parametrize("target", ["epsilon", "sample", "v_prediction"])
def test_diffusion_loss_closed_form(target):
    s = NoiseSchedule.from_name("linear", 1000, rescale_zero_snr=True)
    g = torch.Generator().manual_seed(4)
    x0 = torch.randn(4, 3, 6, generator=g, dtype=F64)
    eps = torch.randn(4, 3, 6, generator=g, dtype=F64)
    mo = torch.randn(4, 3, 6, generator=g, dtype=F64)
    t = torch.tensor([0, 10, 500, 999])
    a = s.alphas_cumprod[t].reshape(-1, 1, 1)
    tgt = {"epsilon": eps, "sample": x0, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x0}[target]
    mse = ((tgt - mo) ** 2).mean(dim=(1, 2))
    snr = (a / (1 - a)).reshape(-1)
    w = {"epsilon": torch.where(snr > 0, torch.minimum(snr, torch.tensor(5.0, dtype=F64)) / snr.clamp(min=1e-300),
                                torch.ones_like(snr)),
         "sample": torch.minimum(snr, torch.tensor(5.0, dtype=F64)),
         "v_prediction": torch.minimum(snr, torch.tensor(5.0, dtype=F64)) / (snr + 1)}[target]
    noise = None if target == "sample" else eps
    got = ddpm_fast.diffusion_loss(mo, x0, t, s, target=target, noise=noise, reduction="none", backend=B)
    torch.testing.assert_close(got, mse, rtol=1e-12, atol=0)
    got = ddpm_fast.diffusion_loss(mo, x0, t, s, target=target, noise=noise, snr_gamma=5.0, reduction="none",
                                   backend=B)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, mse * w, rtol=1e-12, atol=0)
    assert ddpm_fast.diffusion_loss(mo, x0, t, s, target=target, noise=noise, reduction="sum",
                                    backend=B).item() == pytest.approx(mse.sum().item(), rel=1e-12)
    assert ddpm_fast.diffusion_loss(mo, x0, t, s, target=target, noise=noise,
                                    backend=B).item() == pytest.approx(mse.mean().item(), rel=1e-12)


# --------------------------------------------------------------------------------------------
# q_sample statistics
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("t", [0, 250, 999])
def test_q_sample_statistics(t):
    s = NoiseSchedule.from_name("linear", 1000)
    a = float(s.alphas_cumprod[t])
    n = 1 << 18
    x0 = torch.full((1, n), 0.7)
    xt = ddpm_fast.q_sample(x0, t, s, seed=12345, offset=t, backend=B).double()
    sd = math.sqrt(1 - a)
    assert abs(xt.mean().item() - math.sqrt(a) * 0.7) < 5 * sd / math.sqrt(n)
    # variance of a sample variance: 2 sd^4 / n
    assert abs(xt.var().item() - (1 - a)) < 5 * math.sqrt(2 / n) * (1 - a)


# --------------------------------------------------------------------------------------------
# clipping and dynamic thresholding
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio,smax", [(0.995, 3.0), (0.9, 1.5), (0.5, 10.0), (1.0, 2.0), (0.0, 4.0)])
def test_dynamic_threshold_vs_torch_quantile(ratio, smax):
    s = NoiseSchedule.from_name("linear", 1000)
    g = torch.Generator().manual_seed(5)
    # rows whose quantile is below 1, between 1 and smax, and above smax
    x0 = torch.randn(4, 3, 7, 5, generator=g) * torch.tensor([0.3, 1.2, 2.5, 20.0]).reshape(-1, 1, 1, 1)
    x_t = torch.randn(4, 3, 7, 5, generator=g)
    _, got = ddpm_fast.ddpm_step(x0, 0, x_t, s, prediction_type="sample", thresholding=True,
                                 dynamic_thresholding_ratio=ratio, sample_max_value=smax, return_x0=True, backend=B)
    flat = x0.reshape(4, -1)
    q = torch.quantile(flat.abs(), ratio, dim=1).clamp(1.0, smax).unsqueeze(1)
    expect = (torch.clamp(flat, -q, q) / q).reshape(x0.shape)
    torch.testing.assert_close(got, expect, rtol=1e-6, atol=1e-7)
    # thresholding takes precedence over clip_sample
    _, both = ddpm_fast.ddpm_step(x0, 0, x_t, s, prediction_type="sample", thresholding=True, clip_sample=True,
                                  clip_sample_range=0.1, dynamic_thresholding_ratio=ratio, sample_max_value=smax,
                                  return_x0=True, backend=B)
    torch.testing.assert_close(both, got, rtol=0, atol=0)


def test_clip_sample_range():
    s = NoiseSchedule.from_name("linear", 1000)
    x0 = torch.randn(3, 50) * 4
    _, got = ddpm_fast.ddpm_step(x0, 5, torch.zeros(3, 50), s, prediction_type="sample", clip_sample_range=2.5,
                                 noise=torch.zeros(3, 50), return_x0=True, backend=B)
    assert torch.equal(got, x0.clamp(-2.5, 2.5))


def test_dynamic_threshold_row_past_2_pow_24():
    """torch.quantile refuses rows of more than 2^24 elements; the reference must not."""
    n = (1 << 24) + 8
    g = torch.Generator().manual_seed(6)
    x = torch.randn(1, n, generator=g) * 2.0
    got = R.dynamic_threshold(x, 0.995, 3.0)
    absx = np.abs(x.numpy()[0]).astype(np.float64)
    q = min(max(float(np.quantile(absx, 0.995)), 1.0), 3.0)
    expect = torch.from_numpy(np.clip(x.numpy()[0].astype(np.float64), -q, q) / q).float()
    torch.testing.assert_close(got[0], expect, rtol=2e-6, atol=2e-6)


# --------------------------------------------------------------------------------------------
# NaN and inf rules (docs/api.md)
# --------------------------------------------------------------------------------------------
def test_clamp_keeps_nan():
    s = NoiseSchedule.from_name("linear", 1000)
    x0 = torch.randn(2, 3, 4) * 3
    x0[0, 1, 2] = float("nan")
    x_t = torch.randn(2, 3, 4)
    prev, x0_hat = ddpm_fast.ddpm_step(x0, 10, x_t, s, prediction_type="sample", noise=torch.randn(2, 3, 4),
                                       return_x0=True, backend=B)
    nan = torch.isnan(x0_hat)
    assert nan[0, 1, 2] and nan.sum() == 1
    assert torch.equal(torch.isnan(prev), nan)
    prev, x0_hat = ddpm_fast.ddim_step(x0, 10, x_t, s, prev_t=5, prediction_type="sample", return_x0=True,
                                       backend=B)
    assert torch.equal(torch.isnan(x0_hat), nan) and torch.equal(torch.isnan(prev), nan)


def test_threshold_nan_row_only():
    s = NoiseSchedule.from_name("linear", 1000)
    g = torch.Generator().manual_seed(7)
    x0 = torch.randn(3, 2, 8, generator=g) * 3
    x_t = torch.randn(3, 2, 8, generator=g)
    noise = torch.randn(3, 2, 8, generator=g)
    kw = dict(prediction_type="sample", thresholding=True, sample_max_value=2.0, noise=noise, return_x0=True,
              backend=B)
    clean_prev, clean_x0 = ddpm_fast.ddpm_step(x0, 10, x_t, s, **kw)
    x0[1, 0, 3] = float("nan")
    prev, x0_hat = ddpm_fast.ddpm_step(x0, 10, x_t, s, **kw)
    assert torch.isnan(x0_hat[1]).all() and torch.isnan(prev[1]).all()
    for r in (0, 2):
        assert torch.equal(x0_hat[r], clean_x0[r]) and torch.equal(prev[r], clean_prev[r])


def _all_finite_variants():
    for sched in ["linear", "squaredcos_cap_v2", "zero_snr_linear"]:
        for pred in ["epsilon", "sample", "v_prediction"]:
            for clip in ["none", "clip", "threshold"]:
                if sched == "zero_snr_linear" and pred == "epsilon" and clip == "none":
                    continue  # the one inf of docs/api.md, tested below
                yield sched, pred, clip


def _schedule(sched):
    if sched == "zero_snr_linear":
        return NoiseSchedule.from_name("linear", 1000, rescale_zero_snr=True)
    return NoiseSchedule.from_name(sched, 1000)


@pytest.mark.parametrize("sched,pred,clip", list(_all_finite_variants()))
def test_no_nan_from_finite_inputs(sched, pred, clip):
    s = _schedule(sched)
    g = torch.Generator().manual_seed(8)
    x_t = torch.randn(6, 2, 3, 3, generator=g) * 3
    t = torch.tensor([999, 998, 500, 2, 1, 0])
    clipkw = dict(clip_sample=clip == "clip", thresholding=clip == "threshold", sample_max_value=2.0)
    for var in ["fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range"]:
        C = 4 if var.startswith("learned") else 2
        mo = torch.randn(6, C, 3, 3, generator=g) * 3
        if var == "learned_range":
            mo[:, 2:] = mo[:, 2:].clamp(-1, 1)
        prev, x0 = ddpm_fast.ddpm_step(mo, t, x_t, s, prediction_type=pred, variance_type=var, seed=1,
                                       return_x0=True, backend=B, **clipkw)
        assert torch.isfinite(prev).all() and torch.isfinite(x0).all(), var
    mo = torch.randn(6, 2, 3, 3, generator=g) * 3
    for eta in (0.0, 1.0):
        for ucmo in (False, True):
            prev, x0 = ddpm_fast.ddim_step(mo, t, x_t, s, prev_t=t - 1, eta=eta, prediction_type=pred,
                                           use_clipped_model_output=ucmo, seed=2, return_x0=True, backend=B,
                                           **clipkw)
            assert torch.isfinite(prev).all() and torch.isfinite(x0).all(), (eta, ucmo)
    if sched != "zero_snr_linear" or pred != "epsilon":
        nxt, _ = ddpm_fast.ddim_reverse_step(mo, t.clamp(max=998), x_t, s, next_t=t.clamp(max=998) + 1,
                                             prediction_type=pred, return_x0=True, backend=B, **clipkw)
        assert torch.isfinite(nxt).all()
    for target in ["epsilon", "sample", "v_prediction"]:
        for gamma in (None, 5.0):
            loss = ddpm_fast.diffusion_loss(mo, x_t, t, s, target=target, seed=3, snr_gamma=gamma, reduction="none",
                                            backend=B)
            assert torch.isfinite(loss).all()


def test_zero_snr_epsilon_inf_and_clipping():
    s = NoiseSchedule.from_name("linear", 1000, rescale_zero_snr=True)
    assert float(s.alphas_cumprod[-1]) == 0.0
    g = torch.Generator().manual_seed(9)
    x_t = torch.randn(2, 3, 4, generator=g)
    eps = torch.randn(2, 3, 4, generator=g)
    noise = torch.randn(2, 3, 4, generator=g)
    prev, x0 = ddpm_fast.ddpm_step(eps, 999, x_t, s, clip_sample=False, noise=noise, return_x0=True, backend=B)
    assert torch.isinf(x0).all() and not torch.isnan(prev).any()
    assert torch.equal(torch.sign(x0), torch.sign(x_t - eps))
    prev, x0 = ddpm_fast.ddpm_step(eps, 999, x_t, s, noise=noise, return_x0=True, backend=B)
    assert torch.isfinite(prev).all() and torch.isfinite(x0).all()
    torch.testing.assert_close(x0, torch.sign(x_t - eps), rtol=0, atol=0)
    prev, x0 = ddpm_fast.ddim_step(eps, 999, x_t, s, prev_t=899, return_x0=True, backend=B)
    assert torch.isfinite(prev).all() and torch.isfinite(x0).all()
    # v-prediction stays finite without clipping: x0_hat = -v there
    v = torch.randn(2, 3, 4, generator=g)
    prev, x0 = ddpm_fast.ddpm_step(v, 999, x_t, s, prediction_type="v_prediction", clip_sample=False, noise=noise,
                                   return_x0=True, backend=B)
    assert torch.isfinite(prev).all()
    torch.testing.assert_close(x0, -v, rtol=0, atol=0)


# (was a bug: torch.lerp(inf, inf, w) = NaN in row_quantile; torch.quantile, so diffusers, still gives NaN)
def test_zero_snr_epsilon_thresholding_is_finite():
    s = NoiseSchedule.from_name("linear", 1000, rescale_zero_snr=True)
    g = torch.Generator().manual_seed(9)
    x_t = torch.randn(2, 3, 4, generator=g)
    eps = torch.randn(2, 3, 4, generator=g)
    kw = dict(thresholding=True, sample_max_value=3.0, return_x0=True, backend=B)
    prev, x0 = ddpm_fast.ddpm_step(eps, 999, x_t, s, noise=torch.randn(2, 3, 4, generator=g), **kw)
    assert torch.isfinite(prev).all() and torch.isfinite(x0).all()
    # every |x0_hat| is inf, so s = sample_max_value and x0_hat = sign(x_t - eps)
    torch.testing.assert_close(x0, torch.sign(x_t - eps), rtol=0, atol=0)
    prev, x0 = ddpm_fast.ddim_step(eps, 999, x_t, s, prev_t=899, **kw)
    assert torch.isfinite(prev).all() and torch.isfinite(x0).all()
