"""The reference against diffusers 0.42 (docs/decisions.md, docs/diffusers.md), with the same noise.

Three comparisons per case:

1. **Formulas** (tight): our reference with float64 inputs against diffusers' own ``step`` run on
   float64 inputs with its tables replaced by our float64 ``alphas_cumprod``. Same formula, same
   numbers, so they agree to ~1e-13: a wrong coefficient, order or variance rule cannot hide.
2. **Drop-in** (what a user sees): ours in fp32 against stock diffusers in fp32. diffusers builds
   its tables in fp32 (``cumprod`` of fp32 ``1 - beta``, ``1 - abar`` of an fp32 ``abar``), so *its*
   outputs carry that table error; ours take float64 coefficients rounded once. The tolerances
   below are the size of diffusers' table error, measured here (torch 2.13 CPU, diffusers 0.42.1)
   as the worst of ``|ours - diffusers| / max(|diffusers|, 1)`` over every case of this file:
     - ``x0_hat`` (pred_original_sample): DDPM 1.9e-5 (epsilon prediction at t = 999, where
       ``1/sqrt(abar)`` ~ 150 amplifies diffusers' ~1e-5 relative error in its fp32 ``abar``;
       absolute 0.91 on values ~1e5 for the cosine schedule), DDIM 5e-6; tolerance 1e-4;
     - ``x_prev`` (prev_sample): DDPM 1.0e-3 (cosine schedule at t = 1, whose beta_0 = 4e-5
       makes diffusers' fp32 ``1 - abar_0`` wrong by ~1e-3 relative, and with it both posterior
       coefficients and the variance; 7e-4 zero-SNR, 1.9e-4 linear), DDIM 4.3e-4 (cosine);
       tolerance 2e-3;
     - ``add_noise`` 6.1e-6, ``get_velocity`` 5.1e-6 (one fp32 sqrt of an fp32 abar); tolerance
       ``TOL_FORWARD`` 1e-5;
     - tables (plain relative error): betas 2.2e-7 (zero-SNR: 1.05e-3, diffusers' fp32 rescale
       recomputes beta_0 = 1 - abar_0 in fp32), alphas_cumprod 1.3e-5 (fp32 cumprod, cosine).
   (Run with ``DDPM_FAST_AGREEMENT=path.json`` to write the measured worst cases of a run.)
3. **Accuracy**: ours in fp32 against the float64 truth of (1) on the same (fp32-representable)
   inputs: within 1e-5 of the tensor's largest magnitude — for epsilon's x0_hat, of the magnitude
   of its terms ``(|x_t| + |eps|)/sqrt(a)``, since ``(x_t - sqrt(1-a) eps)/sqrt(a)`` cancels (and
   clipping hides the scale) and fp32 rounding scales with the terms, not the result.

Excluded, because diffusers gets them wrong (docs/diffusers.md): ``fixed_large_log`` (diffusers square-roots a
log-variance: NaN); ``learned`` is compared only with positive variance channels, given to
diffusers as a variance and to us as its log (our ops read ``learned`` as a log-variance);
DDIM only with spacings where diffusers' ``prev = t - T // n`` is the next timestep (``leading``,
and ``trailing`` with ``n | T``); a zero-SNR schedule with epsilon prediction and thresholding at
``t = T - 1`` (``torch.quantile`` of an all-inf row is NaN in diffusers, docs/math.md wants it finite).
"""
import json
import os
import zlib

import pytest
import torch

import ddpm_fast
from ddpm_fast.schedule import NoiseSchedule

diffusers = pytest.importorskip("diffusers", reason="diffusers is the oracle of this file (pip install diffusers)")
from diffusers.schedulers import scheduling_ddpm  # noqa: E402

B = "reference"
TOL_X0 = 1e-4
TOL_PREV = 2e-3
TOL_FORWARD = 1e-5     # add_noise/get_velocity: one fp32 sqrt of an fp32 abar; measured 6.1e-6
TOL_ACCURACY = 1e-5    # ours in fp32 against the float64 truth
TOL_FORMULA = 1e-10    # ours in fp64 against diffusers' formulas on our float64 tables

SCHEDULES = ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "zero_snr"]
DDPM_VARIANCES = ["fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range"]
CLIPS = ["none", "clip", "clip2", "threshold"]
PREDICTIONS = ["epsilon", "sample", "v_prediction"]

_WORST = {}


@pytest.fixture(scope="module", autouse=True)
def _report_agreement():
    yield
    path = os.environ.get("DDPM_FAST_AGREEMENT")
    if path:
        with open(path, "w") as f:
            json.dump({k: {"abs": v[0], "rel": v[1]} for k, v in sorted(_WORST.items())}, f, indent=1)


def _record(key, ours, ref, tol, floor=1.0):
    """Assert ``|ours - ref| <= tol * max(|ref|, floor)`` on finite entries (non-finite entries must
    be identical) and remember the worst case for the report."""
    ours, ref = ours.double(), ref.double()
    fin = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(ours), fin), f"{key}: non-finite entries differ"
    assert torch.equal(ours[~fin].nan_to_num(0.0), ref[~fin].nan_to_num(0.0)), f"{key}: infinities differ"
    assert torch.equal(torch.isnan(ours), torch.isnan(ref)), f"{key}: NaN entries differ"
    err = (ours - ref)[fin].abs()
    if err.numel() == 0:
        return
    if floor == "tensor":  # relative to the tensor's largest finite magnitude (fp32 rounding of a whole row)
        floor = max(ref[fin].abs().max().item(), 1.0)
    rel = err / ref[fin].abs().clamp(min=floor)
    w = _WORST.setdefault(key, [0.0, 0.0])
    _WORST[key] = [max(w[0], err.max().item()), max(w[1], rel.max().item())]
    assert rel.max().item() <= tol, f"{key}: worst relative error {rel.max().item():.3g} > {tol}"


def _schedule_args(name):
    zero = name == "zero_snr"
    sched = "linear" if zero else name
    kw = dict(beta_schedule=sched, rescale_betas_zero_snr=zero)
    if sched == "scaled_linear":
        kw.update(beta_start=0.00085, beta_end=0.012)
    ours = NoiseSchedule.from_name(sched, 1000, kw.get("beta_start", 1e-4), kw.get("beta_end", 0.02),
                                   rescale_zero_snr=zero)
    return kw, ours


def _clip_args(clip):
    return dict(clip_sample=clip in ("clip", "clip2"), clip_sample_range=2.0 if clip == "clip2" else 1.0,
                thresholding=clip == "threshold", dynamic_thresholding_ratio=0.9, sample_max_value=3.0)


def _model_outputs(var, C, shape, gen):
    """(ours, diffusers') model outputs: learned variances are positive variances for diffusers and
    their logs for us; learned_range values lie in [-1, 1]."""
    mo = _f32(torch.randn(shape[0], C, *shape[2:], generator=gen, dtype=torch.float64))
    if var == "learned":
        var_ch = _f32(torch.rand(shape[0], C // 2, *shape[2:], generator=gen, dtype=torch.float64) * 0.03 + 1e-5)
        theirs = torch.cat([mo[:, :C // 2], var_ch], 1)
        ours = torch.cat([mo[:, :C // 2], var_ch.log()], 1)
        return ours, theirs
    if var == "learned_range":
        mo[:, C // 2:] = mo[:, C // 2:].clamp(-1, 1)
    return mo, mo


def _f32(x):
    """float64 values that fp32 represents exactly, so the fp32 and float64 runs see the same inputs."""
    return x.float().double()


def _raw_scale(pred, x, mo, abar_t):
    """The magnitude of the terms of x0_hat: fp32 rounding errors scale with it, not with the
    (cancelled, or clipped) result."""
    if pred != "epsilon":
        return "tensor"
    return max(1.0, (x.abs().max().item() + mo.abs().max().item()) / max(abar_t, 1e-300) ** 0.5)


class _FixedNoise:
    """Replaces diffusers' ``randn_tensor`` for the float64 run, so it uses our noise."""

    def __init__(self, noise):
        self.noise = noise

    def __call__(self, shape, generator=None, device=None, dtype=None, layout=None):
        assert tuple(shape) == tuple(self.noise.shape)
        return self.noise.to(dtype)


def _diffusers_f64(sched, ours_schedule, final_alpha_cumprod=None):
    """A copy of a diffusers scheduler computing in float64 on our float64 tables."""
    s = type(sched).from_config(sched.config)
    if sched.num_inference_steps is not None:
        s.set_timesteps(sched.num_inference_steps)
    s.alphas_cumprod = ours_schedule.alphas_cumprod.clone()
    s.one = torch.tensor(1.0, dtype=torch.float64)
    if final_alpha_cumprod is not None:
        s.final_alpha_cumprod = torch.tensor(final_alpha_cumprod, dtype=torch.float64)
    return s


# --------------------------------------------------------------------------------------------
# tables and the forward process
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("cls", ["DDPMScheduler", "DDIMScheduler"])
def test_tables(name, cls):
    if cls == "DDIMScheduler" and name == "sigmoid":
        pytest.skip("diffusers' DDIMScheduler has no sigmoid schedule")
    kw, ours = _schedule_args(name)
    theirs = getattr(diffusers, cls)(**kw)
    # plain relative errors here (floor 1e-30). betas: fp32 linspace/sigmoid, a few ulps (measured
    # 2.2e-7); zero-SNR: diffusers' fp32 rescale returns beta_0 = 1 - abar_0 from an fp32 abar_0,
    # off by 1.05e-3 relative (measured). alphas_cumprod: an fp32 cumprod errs by up to
    # T * 2^-24 = 6e-5 (measured 1.3e-5, cosine near T-1).
    _record(f"betas[{name}]", ours.betas, theirs.betas, 1e-6 if name != "zero_snr" else 2e-3, floor=1e-30)
    _record(f"alphas_cumprod[{name}]", ours.alphas_cumprod, theirs.alphas_cumprod, 6e-5, floor=1e-30)
    if name == "zero_snr":
        assert float(theirs.alphas_cumprod[-1]) == 0.0 == float(ours.alphas_cumprod[-1])


@pytest.mark.parametrize("name", SCHEDULES)
def test_add_noise_and_velocity(name):
    kw, ours = _schedule_args(name)
    theirs = diffusers.DDPMScheduler(**kw)
    g = torch.Generator().manual_seed(11)
    t = torch.tensor([0, 1, 2, 10, 250, 500, 900, 998, 999])
    x0 = torch.randn(9, 3, 8, 8, generator=g)
    noise = torch.randn(9, 3, 8, 8, generator=g)
    got = ddpm_fast.q_sample(x0, t, ours, noise, backend=B)
    _record("add_noise", got, theirs.add_noise(x0, noise, t), TOL_FORWARD)
    a = ours.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    truth = a.sqrt() * x0.double() + (1 - a).sqrt() * noise.double()
    _record("add_noise vs float64", got, truth, TOL_ACCURACY)
    # the velocity target, as the loss sees it (the reference's v) and as diffusers computes it
    v = ddpm_fast.reference.v_target(x0.double(), noise.double(), ours.alphas_cumprod[t]).float()
    _record("get_velocity", v, theirs.get_velocity(x0, noise, t), TOL_FORWARD)
    # and through the public loss: mean((v - 0)^2) per sample
    loss = ddpm_fast.diffusion_loss(torch.zeros_like(x0), x0, t, ours, target="v_prediction", noise=noise,
                                    reduction="none", backend=B)
    ref = theirs.get_velocity(x0, noise, t).double().pow(2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(loss.double(), ref, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------
# DDPM step
# --------------------------------------------------------------------------------------------
def _check_ddpm(sched, ours_s, omo, dmo, t, prev_t, x, noise, pred, var, clipkw, key, monkeypatch,
                ours_t=None, ours_prev_t=None, full=None):
    """Compare one DDPM step three ways (see the module docstring)."""
    ot = t if ours_t is None else ours_t
    opt = prev_t if ours_prev_t is None else ours_prev_t
    kw = dict(prev_t=opt, prediction_type=pred, variance_type=var, return_x0=True, backend=B, **clipkw)
    # 2. drop-in: fp32, diffusers draws its noise from a generator, we are given the same numbers
    gen = torch.Generator().manual_seed(1000 + t)
    noise32 = torch.randn(x.shape, generator=torch.Generator().manual_seed(1000 + t))
    d = sched.step(dmo.float(), t, x.float(), generator=gen)
    prev32, x032 = ddpm_fast.ddpm_step(omo.float(), ot, x.float(), ours_s, noise=noise32, **kw)
    _record(f"ddpm x0_hat{key}", x032, d.pred_original_sample, TOL_X0)
    _record(f"ddpm prev_sample{key}", prev32, d.prev_sample, TOL_PREV)
    # 1. formulas: diffusers in float64 on our tables, with the same (float64) noise
    s64 = _diffusers_f64(sched, ours_s if full is None else full)
    with monkeypatch.context() as m:
        m.setattr(scheduling_ddpm, "randn_tensor", _FixedNoise(noise32.double()))
        d64 = s64.step(dmo, t, x, generator=None)
    prev64, x064 = ddpm_fast.ddpm_step(omo, ot, x, ours_s, noise=noise32.double(), **kw)
    _record("ddpm formulas x0_hat", x064, d64.pred_original_sample, TOL_FORMULA)
    _record("ddpm formulas prev_sample", prev64, d64.prev_sample, TOL_FORMULA)
    # 3. accuracy of our fp32 against the float64 truth
    scale = _raw_scale(pred, x, omo, float(ours_s.alphas_cumprod[ot]))
    _record("ddpm fp32 vs float64 x0_hat", x032, d64.pred_original_sample, TOL_ACCURACY, scale)
    _record("ddpm fp32 vs float64 prev_sample", prev32, d64.prev_sample, TOL_ACCURACY, "tensor")


@pytest.mark.parametrize("clip", CLIPS)
@pytest.mark.parametrize("var", DDPM_VARIANCES)
@pytest.mark.parametrize("pred", PREDICTIONS)
def test_ddpm_step(pred, var, clip, monkeypatch):
    clipkw = _clip_args(clip)
    for name in SCHEDULES:
        kw, ours = _schedule_args(name)
        sched = diffusers.DDPMScheduler(prediction_type=pred, variance_type=var, **clipkw, **kw)
        g = torch.Generator().manual_seed(zlib.crc32(f"{pred}{var}{clip}{name}".encode()))
        C = 6 if var.startswith("learned") else 3
        for t in [999, 998, 500, 10, 1, 0]:
            if name == "zero_snr" and pred == "epsilon" and clip == "threshold" and t == 999:
                continue  # diffusers: quantile of an all-inf row is NaN (excluded, module docstring)
            x = _f32(torch.randn(2, 3, 6, 6, generator=g, dtype=torch.float64) * 1.5)
            omo, dmo = _model_outputs(var, C, x.shape, g)
            _check_ddpm(sched, ours, omo, dmo, t, None, x, None, pred, var, clipkw, f"[{name}]", monkeypatch)


@pytest.mark.parametrize("spacing,offset,n", [("leading", 0, 10), ("leading", 1, 10), ("leading", 0, 7),
                                              ("leading", 1, 7), ("linspace", 0, 10), ("linspace", 0, 7),
                                              ("trailing", 0, 10), ("trailing", 0, 7)])
@pytest.mark.parametrize("name", ["linear", "squaredcos_cap_v2", "zero_snr"])
def test_ddpm_step_respaced(name, spacing, offset, n, monkeypatch):
    """set_timesteps with each spacing: the previous timestep is the next entry (or -1)."""
    kw, ours = _schedule_args(name)
    g = torch.Generator().manual_seed(7)
    for pred, var in [("epsilon", "fixed_small"), ("v_prediction", "learned_range"), ("sample", "fixed_large")]:
        clipkw = _clip_args("clip")
        sched = diffusers.DDPMScheduler(prediction_type=pred, variance_type=var, timestep_spacing=spacing,
                                        steps_offset=offset, **clipkw, **kw)
        sched.set_timesteps(n)
        ts = sched.timesteps.tolist()
        assert ts == ddpm_fast.inference_timesteps(1000, n, spacing, offset)
        # our respaced schedule (index i <-> ts[-1-i]) gives the same step when the last timestep is 0
        respaced = ours.respace(ts) if ts[-1] == 0 else None
        C = 6 if var.startswith("learned") else 3
        for i, t in enumerate(ts):
            prev = ts[i + 1] if i + 1 < len(ts) else -1
            x = _f32(torch.randn(2, 3, 5, 5, generator=g, dtype=torch.float64))
            omo, dmo = _model_outputs(var, C, x.shape, g)
            _check_ddpm(sched, ours, omo, dmo, t, prev, x, None, pred, var, clipkw, "[respaced]", monkeypatch)
            if respaced is not None:
                j = len(ts) - 1 - i
                _check_ddpm(sched, respaced, omo, dmo, t, prev, x, None, pred, var, clipkw, "[respaced]",
                            monkeypatch, ours_t=j, ours_prev_t=j - 1, full=ours)


def test_ddpm_step_per_sample_timesteps_match_diffusers_rows():
    """One call with per-row t equals diffusers' step row by row."""
    _, ours = _schedule_args("linear")
    sched = diffusers.DDPMScheduler(variance_type="fixed_small")
    g = torch.Generator().manual_seed(3)
    t = torch.tensor([999, 500, 1, 0])
    x = torch.randn(4, 3, 4, 4, generator=g)
    mo = torch.randn(4, 3, 4, 4, generator=g)
    noise = torch.randn(4, 3, 4, 4, generator=g)
    prev = ddpm_fast.ddpm_step(mo, t, x, ours, noise=noise, backend=B)
    for r in range(4):
        gen = torch.Generator().manual_seed(r)
        nr = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(r))
        d = sched.step(mo[r:r + 1], int(t[r]), x[r:r + 1], generator=gen).prev_sample
        mine = ddpm_fast.ddpm_step(mo[r:r + 1], t[r:r + 1], x[r:r + 1], ours, noise=nr, backend=B)
        _record("ddpm prev_sample[per-row]", mine, d, TOL_PREV)
        if int(t[r]) == 0:
            torch.testing.assert_close(prev[r:r + 1], mine, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# DDIM step
# --------------------------------------------------------------------------------------------
def _check_ddim(sched, ours_s, mo, t, prev_t, x, noise, pred, eta, ucmo, final, clipkw, key):
    kw = dict(prev_t=prev_t, eta=eta, prediction_type=pred, use_clipped_model_output=ucmo,
              final_alpha_cumprod=final, return_x0=True, backend=B, **clipkw)
    vn = noise if eta > 0 else None
    d = sched.step(mo.float(), t, x.float(), eta=eta, use_clipped_model_output=ucmo,
                   variance_noise=None if vn is None else vn.float())
    prev32, x032 = ddpm_fast.ddim_step(mo.float(), t, x.float(), ours_s, noise=None if vn is None else vn.float(),
                                       **kw)
    _record(f"ddim x0_hat{key}", x032, d.pred_original_sample, TOL_X0)
    _record(f"ddim prev_sample{key}", prev32, d.prev_sample, TOL_PREV)
    s64 = _diffusers_f64(sched, ours_s, final)
    d64 = s64.step(mo, t, x, eta=eta, use_clipped_model_output=ucmo, variance_noise=vn)
    prev64, x064 = ddpm_fast.ddim_step(mo, t, x, ours_s, noise=vn, **kw)
    _record("ddim formulas x0_hat", x064, d64.pred_original_sample, TOL_FORMULA)
    _record("ddim formulas prev_sample", prev64, d64.prev_sample, TOL_FORMULA)
    scale = _raw_scale(pred, x, mo, float(ours_s.alphas_cumprod[t]))
    _record("ddim fp32 vs float64 x0_hat", x032, d64.pred_original_sample, TOL_ACCURACY, scale)
    _record("ddim fp32 vs float64 prev_sample", prev32, d64.prev_sample, TOL_ACCURACY, "tensor")


@pytest.mark.parametrize("ucmo", [False, True])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("clip", CLIPS)
@pytest.mark.parametrize("pred", PREDICTIONS)
def test_ddim_step(pred, clip, eta, ucmo):
    clipkw = _clip_args(clip)
    _, ours = _schedule_args("linear")
    sched = diffusers.DDIMScheduler(prediction_type=pred, **clipkw)
    sched.set_timesteps(10)
    ts = sched.timesteps.tolist()
    g = torch.Generator().manual_seed(17)
    for i, t in enumerate(ts):
        prev = ts[i + 1] if i + 1 < len(ts) else -1
        x = _f32(torch.randn(2, 3, 5, 5, generator=g, dtype=torch.float64) * 1.5)
        mo = _f32(torch.randn(2, 3, 5, 5, generator=g, dtype=torch.float64))
        noise = _f32(torch.randn(2, 3, 5, 5, generator=g, dtype=torch.float64))
        _check_ddim(sched, ours, mo, t, prev, x, noise, pred, eta, ucmo, 1.0, clipkw, "")


@pytest.mark.parametrize("spacing,offset,n", [("leading", 0, 50), ("leading", 1, 50), ("leading", 1, 7),
                                              ("trailing", 0, 20)])
@pytest.mark.parametrize("set_alpha_to_one", [True, False])
@pytest.mark.parametrize("name", ["linear", "scaled_linear", "squaredcos_cap_v2", "zero_snr"])
def test_ddim_step_schedules(name, set_alpha_to_one, spacing, offset, n):
    kw, ours = _schedule_args(name)
    final = 1.0 if set_alpha_to_one else float(ours.alphas_cumprod[0])
    g = torch.Generator().manual_seed(19)
    for pred in PREDICTIONS:
        clipkw = _clip_args("clip")
        sched = diffusers.DDIMScheduler(prediction_type=pred, timestep_spacing=spacing, steps_offset=offset,
                                        set_alpha_to_one=set_alpha_to_one, **clipkw, **kw)
        sched.set_timesteps(n)
        ts = sched.timesteps.tolist()
        # diffusers' rule t - T//n is the next entry for these spacings (docs/diffusers.md)
        assert all(ts[i] - 1000 // n == ts[i + 1] for i in range(len(ts) - 1))
        for i in list(range(3)) + list(range(len(ts) - 3, len(ts))):
            t = ts[i]
            prev = ts[i + 1] if i + 1 < len(ts) else -1
            x = _f32(torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64))
            mo = _f32(torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64))
            noise = _f32(torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64))
            _check_ddim(sched, ours, mo, t, prev, x, noise, pred, 0.8, True, final, clipkw, f"[{name}]")


def test_fixed_large_log_is_fixed_large():
    """docs/diffusers.md: diffusers' fixed_large_log square-roots a log-variance (NaN); ours equals fixed_large."""
    _, ours = _schedule_args("linear")
    g = torch.Generator().manual_seed(23)
    x = torch.randn(2, 3, 4, 4, generator=g)
    mo = torch.randn(2, 3, 4, 4, generator=g)
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    for t in (500, 1):
        a = ddpm_fast.ddpm_step(mo, t, x, ours, variance_type="fixed_large_log", noise=noise, backend=B)
        b = ddpm_fast.ddpm_step(mo, t, x, ours, variance_type="fixed_large", noise=noise, backend=B)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        d = diffusers.DDPMScheduler(variance_type="fixed_large_log").step(
            mo, t, x, generator=torch.Generator().manual_seed(1)).prev_sample
        assert torch.isnan(d).all()
