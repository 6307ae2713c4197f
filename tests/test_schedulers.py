"""The drop-in schedulers (ddpm_fast/schedulers/) against diffusers' DDPMScheduler and
DDIMScheduler, the deliberate differences (docs/diffusers.md), what diffusers accepts and we
accept too, and the errors.

Tolerances against diffusers. diffusers builds its tables in fp32; ours are float64, so the two
differ by diffusers' own table rounding (~1e-4 relative on ``x0_hat`` at extreme timesteps, far
more after zero-SNR rescaling or a respaced ``beta = 1 - abar_t / abar_prev``). Every parity test
therefore compares twice:

1. against diffusers running the very same code with its ``alphas_cumprod`` replaced by our
   float64 table (``_with_float64_tables``): then only the order of fp32 operations differs, and
   we require ``|ours - theirs| <= 2e-5 * (1 + |theirs|)`` element by element (fp32 ulp is 6e-8;
   the margin covers the ``1/sqrt(abar)`` amplification of x0_hat at the noisiest steps);
2. against stock diffusers, requiring ``|ours - stock| <= |float64-diffusers - stock| + the same
   tolerance`` element by element: what separates us from stock diffusers is exactly its fp32
   table error, no more.
"""
from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

import ddpm_fast
from ddpm_fast import DDIMScheduler, DDPMScheduler, SchedulerOutput
from ddpm_fast import schedulers as S

try:
    import diffusers
except Exception as e:  # pragma: no cover - diffusers is installed in CI
    diffusers = None
    _why = f"diffusers not importable: {type(e).__name__}: {e}"
needs_diffusers = pytest.mark.skipif(diffusers is None, reason=_why if diffusers is None else "")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none visible to torch)")

PRED = ("epsilon", "sample", "v_prediction")


def _tight(a, b):
    """|a - b| <= 2e-5 (1 + |b|) elementwise (see the module docstring); NaN/inf must match."""
    a, b = a.double(), b.double()
    both_nan = torch.isnan(a) & torch.isnan(b)
    same_inf = torch.isinf(a) & torch.isinf(b) & (a == b)
    ok = ((a - b).abs() <= 2e-5 * (1 + b.abs())) | both_nan | same_inf
    assert bool(ok.all()), f"max |a-b| = {(a - b).abs()[~ok].max().item():.3g} at {int((~ok).sum())} elements"


def _within_table_error(ours, stock, d64):
    """|ours - stock| <= |d64 - stock| + tight tolerance (ours differs from stock only by its fp32 tables)."""
    ours, stock, d64 = ours.double(), stock.double(), d64.double()
    finite = torch.isfinite(stock) & torch.isfinite(ours) & torch.isfinite(d64)
    bound = (d64 - stock).abs() + 2e-5 * (1 + stock.abs())
    ok = ((ours - stock).abs() <= bound) | ~finite
    assert bool(ok.all()), f"ours-stock {(ours - stock).abs()[~ok].max().item():.3g} exceeds the table error"
    return float(((ours - stock).abs()[finite]).max()) if bool(finite.any()) else 0.0


def _with_float64_tables(d, ours):
    """diffusers' scheduler ``d`` computing with our float64 tables (same code otherwise)."""
    d.alphas_cumprod = ours.schedule.alphas_cumprod.clone()
    d.one = torch.tensor(1.0, dtype=torch.float64)
    if hasattr(d, "final_alpha_cumprod"):
        d.final_alpha_cumprod = (torch.tensor(1.0, dtype=torch.float64) if d.config.set_alpha_to_one
                                 else ours.schedule.alphas_cumprod[0].clone())
    return d


# --------------------------------------------------------------------------------------------
# random configs
# --------------------------------------------------------------------------------------------
def _draw_config(rng: random.Random, kind: str):
    T = rng.choice([10, 50, 100, 1000])
    schedules = ["linear", "scaled_linear", "squaredcos_cap_v2"] + (["sigmoid"] if kind == "ddpm" else [])
    cfg = dict(
        num_train_timesteps=T,
        beta_start=rng.choice([1e-4, 5e-4, 1e-3]),
        beta_end=rng.choice([0.01, 0.02, 0.05]),
        beta_schedule=rng.choice(schedules),
        trained_betas=None,
        clip_sample=rng.random() < 0.5,
        prediction_type=rng.choice(PRED),
        thresholding=rng.random() < 0.3,
        dynamic_thresholding_ratio=rng.choice([0.9, 0.995]),
        clip_sample_range=rng.choice([0.5, 1.0, 2.0]),
        sample_max_value=rng.choice([1.0, 1.5, 3.0]),
        timestep_spacing=rng.choice(["leading", "trailing", "linspace"] if kind == "ddpm" else ["leading", "trailing"]),
        steps_offset=rng.choice([0, 0, 1]),
        rescale_betas_zero_snr=rng.random() < 0.2,
    )
    if rng.random() < 0.15:
        cfg["trained_betas"] = [float(b) for b in np.linspace(2e-4, 0.03, T) * rng.uniform(0.5, 1.5)]
    if kind == "ddpm":
        cfg["variance_type"] = rng.choice(["fixed_small", "fixed_small_log", "fixed_large", "learned",
                                           "learned_range"])
    else:
        cfg["set_alpha_to_one"] = rng.random() < 0.5
    n = rng.randint(1, min(T, 12))
    if kind == "ddim" and cfg["timestep_spacing"] == "trailing":
        while T % n:  # trailing with n | T: diffusers' t - T//n is then the next entry (else a deliberate difference)
            n -= 1
    if cfg["timestep_spacing"] == "leading" and (n - 1) * (T // n) + cfg["steps_offset"] >= T:
        cfg["steps_offset"] = 0
    if kind == "ddim" and cfg["timestep_spacing"] == "leading" and cfg["steps_offset"] >= T // n:
        cfg["steps_offset"] = 0  # diffusers' last step then goes to t = offset - T//n >= 0 (a difference tested below)
    if cfg["rescale_betas_zero_snr"] and cfg["prediction_type"] == "epsilon":
        # x0_hat = +-inf at abar = 0: clipping gives both the same value; thresholding would not
        # (torch.quantile of an inf row is NaN in diffusers, finite in ours: test_reference_math.py)
        cfg["clip_sample"], cfg["thresholding"] = True, False
    return cfg, n


def _model_output(cfg, x, g):
    mo = torch.randn(x.shape, generator=g)
    vt = cfg.get("variance_type")
    if vt == "learned":  # diffusers' meaning: a variance (positive here; negative is tested below)
        mo = torch.cat([mo, torch.rand(x.shape, generator=g) * 0.05 + 1e-4], 1)
    elif vt == "learned_range":
        mo = torch.cat([mo, torch.rand(x.shape, generator=g) * 2 - 1], 1)
    return mo


@needs_diffusers
@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
@pytest.mark.parametrize("case", range(14))
def test_random_config_matches_diffusers_step_by_step(kind, case):
    rng = random.Random(1000 * (kind == "ddim") + case)
    cfg, n = _draw_config(rng, kind)
    ours_cls, their_cls = (DDPMScheduler, diffusers.DDPMScheduler) if kind == "ddpm" else (DDIMScheduler,
                                                                                           diffusers.DDIMScheduler)
    ours, stock, d64 = ours_cls(**cfg), their_cls(**cfg), their_cls(**cfg)
    _with_float64_tables(d64, ours)
    assert dict(ours.config) == {k: v for k, v in stock.config.items() if not k.startswith("_")} | (
        {"_use_default_values": ours.config["_use_default_values"]} if "_use_default_values" in ours.config else {})
    custom = kind == "ddpm" and rng.random() < 0.2
    if custom:
        ts = sorted(rng.sample(range(cfg["num_train_timesteps"]), n), reverse=True)
        for s in (ours, stock, d64):
            s.set_timesteps(timesteps=ts)
    else:
        for s in (ours, stock, d64):
            s.set_timesteps(n)
    assert torch.equal(ours.timesteps, stock.timesteps)
    g = torch.Generator().manual_seed(case)
    x = torch.randn(2, 3, 4, 4, generator=g) * 1.5
    eta = rng.choice([0.0, 0.5, 1.0])
    if cfg["rescale_betas_zero_snr"] and eta == 1.0:
        eta = 0.5  # diffusers' NaN at abar_t = 0 with eta = 1: its own test below
    use_clipped = rng.random() < 0.5
    for i, t in enumerate(ours.timesteps):
        mo = _model_output(cfg, x, g)
        gens = None
        outs = []
        for s in (ours, stock, d64):
            gens = ([torch.Generator().manual_seed(7 * i + r) for r in range(2)] if i % 2
                    else torch.Generator().manual_seed(7 * i))
            if kind == "ddpm":
                outs.append(s.step(mo, t, x, generator=gens))
            else:
                outs.append(s.step(mo, t, x, eta=eta, use_clipped_model_output=use_clipped, generator=gens))
        o, st, dd = outs
        assert isinstance(o, SchedulerOutput)
        _tight(o.prev_sample, dd.prev_sample)
        _tight(o.pred_original_sample, dd.pred_original_sample)
        _within_table_error(o.prev_sample, st.prev_sample, dd.prev_sample)
        _within_table_error(o.pred_original_sample, st.pred_original_sample, dd.pred_original_sample)
        x = dd.prev_sample  # all three continue from the same sample


@needs_diffusers
@pytest.mark.parametrize("kind,n,spacing", [("ddpm", 1000, "leading"), ("ddpm", 50, "trailing"),
                                            ("ddim", 50, "leading"), ("ddim", 25, "trailing")])
def test_full_reverse_loop_matches_diffusers(kind, n, spacing):
    """A whole loop with one generator, model outputs from a fixed function of (x, t)."""
    cfg = dict(timestep_spacing=spacing, clip_sample=False)
    ours_cls, their_cls = (DDPMScheduler, diffusers.DDPMScheduler) if kind == "ddpm" else (DDIMScheduler,
                                                                                           diffusers.DDIMScheduler)
    W = torch.randn(3, 3, generator=torch.Generator().manual_seed(0)) * 0.3

    def model(x, t):
        return torch.tanh(torch.einsum("ij,bjhw->bihw", W, x) * (0.5 + t.float().reshape(-1, 1, 1, 1) / 2000))

    results = []
    for s in (ours_cls(**cfg), their_cls(**cfg), _with_float64_tables(their_cls(**cfg), ours_cls(**cfg))):
        g = torch.Generator().manual_seed(42)
        x = torch.randn(2, 3, 4, 4, generator=g)
        s.set_timesteps(n)
        for t in s.timesteps:
            kw = dict(eta=1.0) if kind == "ddim" else {}
            x = s.step(model(x, t.expand(2)), t, x, generator=g, **kw).prev_sample
        results.append(x)
    ours, stock, d64 = results
    _tight(ours, d64)
    worst = _within_table_error(ours, stock, d64)
    assert worst < 0.05  # the whole loop stays close to stock diffusers too


@needs_diffusers
def test_defaults_and_attributes_match_diffusers():
    for ours_cls, their_cls in ((DDPMScheduler, diffusers.DDPMScheduler), (DDIMScheduler, diffusers.DDIMScheduler)):
        o, d = ours_cls(), their_cls()
        strip = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
        assert strip(o.config) == strip(d.config)
        assert o.betas.dtype == torch.float32 and o.alphas_cumprod.dtype == torch.float32
        torch.testing.assert_close(o.alphas_cumprod, d.alphas_cumprod, rtol=2e-5, atol=1e-7)
        assert torch.equal(o.timesteps, d.timesteps) and o.timesteps.dtype == torch.int64
        assert o.init_noise_sigma == d.init_noise_sigma == 1.0
        assert o.order == d.order and len(o) == len(d)
        x = torch.randn(2, 3)
        assert o.scale_model_input(x, 5) is x
        assert o.config.num_train_timesteps == 1000  # attribute access on the config
        if S.USING_DIFFUSERS:  # diffusers' scheduler swapping (from_config between compatibles) sees ours
            assert sorted(o._compatibles) == sorted(d._compatibles)
            assert isinstance(o, diffusers.SchedulerMixin) and isinstance(o, diffusers.ConfigMixin)


@needs_diffusers
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_add_noise_and_get_velocity(dtype):
    o, d = DDPMScheduler(), diffusers.DDPMScheduler()
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(6, 3, 4, 4, generator=g)
    noise = torch.randn(6, 3, 4, 4, generator=g)
    t = torch.tensor([0, 1, 9, 500, 998, 999])
    abar = o.schedule.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    exact_xt = abar.sqrt() * x0.double() + (1 - abar).sqrt() * noise.double()
    exact_v = abar.sqrt() * noise.double() - (1 - abar).sqrt() * x0.double()
    xt = o.add_noise(x0.to(dtype), noise.to(dtype), t)
    v = o.get_velocity(x0.to(dtype), noise.to(dtype), t)
    assert xt.dtype == dtype and v.dtype == dtype
    # fp32 math from float64 coefficients: one rounding of the inputs and one of the output
    exact_in = lambda c: (c(x0.to(dtype).double(), noise.to(dtype).double()))  # noqa: E731
    ref_xt = exact_in(lambda a, b: abar.sqrt() * a + (1 - abar).sqrt() * b)
    ref_v = exact_in(lambda a, b: abar.sqrt() * b - (1 - abar).sqrt() * a)
    tol = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(xt.double(), ref_xt, rtol=tol, atol=tol)
    torch.testing.assert_close(v.double(), ref_v, rtol=tol, atol=tol)
    if dtype == torch.float32:
        torch.testing.assert_close(xt.double(), exact_xt, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(v.double(), exact_v, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(xt, d.add_noise(x0, noise, t), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(v, d.get_velocity(x0, noise, t), rtol=1e-4, atol=1e-5)
    # int and 0-d timesteps broadcast over the batch, as in diffusers
    torch.testing.assert_close(o.add_noise(x0, noise, 500), o.add_noise(x0, noise, torch.full((6,), 500)))
    torch.testing.assert_close(o.add_noise(x0, noise, torch.tensor(500)), o.add_noise(x0, noise, 500))


def test_difference_add_noise_half_precision_keeps_the_noise():
    """Difference: diffusers rounds abar to bf16, where abar_t = 1 for t = 0..9 of the linear schedule (so
    no noise is added); ours keeps fp32 math from float64 coefficients."""
    o = DDPMScheduler()
    x0 = torch.zeros(10, 4, dtype=torch.bfloat16)
    noise = torch.ones(10, 4, dtype=torch.bfloat16)
    xt = o.add_noise(x0, noise, torch.arange(10))
    expected = (1 - o.schedule.alphas_cumprod[:10]).sqrt()
    assert bool((xt[:, 0].double() > 0).all())
    torch.testing.assert_close(xt[:, 0].double(), expected, rtol=8e-3, atol=0)
    if diffusers is not None:
        d = diffusers.DDPMScheduler()
        assert bool((d.add_noise(x0, noise, torch.arange(10))[:2] == 0).all())  # diffusers' loss


# --------------------------------------------------------------------------------------------
# pipelines and config files
# --------------------------------------------------------------------------------------------
def _tiny_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(8, 16), norm_num_groups=4,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D")).eval()


@needs_diffusers
def test_ddpm_pipeline_runs_with_our_scheduler():
    unet = _tiny_unet()
    images = []
    for sched in (DDPMScheduler(), _with_float64_tables(diffusers.DDPMScheduler(), DDPMScheduler()),
                  diffusers.DDPMScheduler()):
        pipe = diffusers.DDPMPipeline(unet=unet, scheduler=sched)
        pipe.set_progress_bar_config(disable=True)
        out = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=10,
                   output_type="np")
        images.append(torch.from_numpy(out.images))
    assert images[0].shape == (2, 8, 8, 3)
    _tight(images[0], images[1])
    _within_table_error(images[0], images[2], images[1])


@needs_diffusers
def test_ddim_pipeline_after_assigning_our_scheduler():
    """DDIMPipeline converts its scheduler with diffusers' DDIMScheduler.from_config in its
    constructor; assigning ours afterwards keeps it."""
    unet = _tiny_unet()
    pipe = diffusers.DDIMPipeline(unet=unet, scheduler=DDIMScheduler())
    assert type(pipe.scheduler) is diffusers.DDIMScheduler  # diffusers' constructor replaced it
    pipe.scheduler = DDIMScheduler()
    pipe.set_progress_bar_config(disable=True)
    ours = pipe(batch_size=1, generator=torch.Generator().manual_seed(0), num_inference_steps=5, eta=0.5,
                output_type="np").images
    assert type(pipe.scheduler) is DDIMScheduler
    pipe.scheduler = _with_float64_tables(diffusers.DDIMScheduler(), DDIMScheduler())
    theirs = pipe(batch_size=1, generator=torch.Generator().manual_seed(0), num_inference_steps=5, eta=0.5,
                  output_type="np").images
    _tight(torch.from_numpy(ours), torch.from_numpy(theirs))


@needs_diffusers
@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_config_files_both_ways(kind, tmp_path):
    ours_cls, their_cls = (DDPMScheduler, diffusers.DDPMScheduler) if kind == "ddpm" else (DDIMScheduler,
                                                                                           diffusers.DDIMScheduler)
    cfg = dict(num_train_timesteps=500, beta_schedule="scaled_linear", prediction_type="v_prediction",
               timestep_spacing="trailing", steps_offset=1, clip_sample=False, rescale_betas_zero_snr=True)
    strip = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    ours = ours_cls(**cfg)
    ours.save_pretrained(tmp_path / "ours")
    with open(tmp_path / "ours" / "scheduler_config.json") as f:
        saved = json.load(f)
    assert saved["_class_name"] == their_cls.__name__
    theirs = their_cls.from_pretrained(tmp_path / "ours")
    assert strip(theirs.config) == strip(ours.config)
    their_cls(**cfg).save_pretrained(tmp_path / "theirs")
    back = ours_cls.from_pretrained(tmp_path / "theirs")
    assert type(back) is ours_cls and strip(back.config) == strip(ours.config)
    assert strip(ours_cls.from_config(theirs.config).config) == strip(ours.config)
    assert strip(their_cls.from_config(ours.config).config) == strip(ours.config)
    # from_config with overrides, as diffusers users do
    assert ours_cls.from_config(theirs.config, prediction_type="epsilon").config.prediction_type == "epsilon"


@needs_diffusers
def test_without_diffusers_the_builtin_config_layer_writes_the_same_files(tmp_path):
    """DDPM_FAST_NO_DIFFUSERS=1 forces the built-in config layer (as on a machine without
    diffusers); its files load in diffusers and diffusers' load in it."""
    diffusers.DDIMScheduler(num_train_timesteps=200, set_alpha_to_one=False).save_pretrained(tmp_path / "d")
    code = f"""
import json, torch, ddpm_fast.schedulers as S
assert not S.USING_DIFFUSERS
s = S.DDPMScheduler(num_train_timesteps=300, beta_schedule="squaredcos_cap_v2", variance_type="fixed_large")
assert s.config.num_train_timesteps == 300 and s.config["variance_type"] == "fixed_large"
try:
    s.config["x"] = 1
    raise SystemExit("config is not frozen")
except Exception as e:
    assert "frozen" in str(e)
s.save_pretrained({str(tmp_path / 'o')!r})
d = S.DDIMScheduler.from_pretrained({str(tmp_path / 'd')!r})
assert d.config.num_train_timesteps == 200 and d.config.set_alpha_to_one is False
s.set_timesteps(10)
x = torch.randn(2, 3)
out = s.step(torch.randn(2, 3), s.timesteps[0], x)
assert out.prev_sample.shape == (2, 3) and out[0] is out.prev_sample and len(out.to_tuple()) == 2
import copy, pickle
assert pickle.loads(pickle.dumps(s)).config == s.config and copy.deepcopy(s).config == s.config
inv = S.DDIMInverseScheduler(num_train_timesteps=40, timestep_spacing="trailing")
inv.save_pretrained({str(tmp_path / 'inv')!r})
assert "kwargs" not in inv.config
assert S.DDIMInverseScheduler.from_pretrained({str(tmp_path / 'inv')!r}).config == inv.config
inv.set_timesteps(4)
assert inv.timesteps.tolist() == [9, 19, 29, 39] and inv.step(torch.randn(2, 3), 19, x).prev_sample.shape == (2, 3)
par = S.DDIMParallelScheduler(num_train_timesteps=40)
par.set_timesteps(4)
assert par.batch_step_no_noise(torch.randn(2, 3), torch.tensor([30, 0]), x).shape == (2, 3)
print("ok")
"""
    env = dict(os.environ, DDPM_FAST_NO_DIFFUSERS="1")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]
    assert diffusers.DDIMInverseScheduler.from_pretrained(tmp_path / "inv").config.timestep_spacing == "trailing"
    loaded = diffusers.DDPMScheduler.from_pretrained(tmp_path / "o")
    assert loaded.config.num_train_timesteps == 300 and loaded.config.variance_type == "fixed_large"
    assert loaded.config.beta_schedule == "squaredcos_cap_v2"


# --------------------------------------------------------------------------------------------
# per-sample and device timesteps, noise without a generator
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_per_sample_timesteps_equal_rows_run_one_by_one(kind):
    s = (DDPMScheduler(variance_type="learned_range", clip_sample=False) if kind == "ddpm"
         else DDIMScheduler(timestep_spacing="linspace"))
    s.set_timesteps(20)
    B = 5
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, 2, 3, 3, generator=g)
    mo = torch.randn(B, 4 if kind == "ddpm" else 2, 3, 3, generator=g)
    noise = torch.randn(B, 2, 3, 3, generator=g)
    t = s.timesteps[torch.tensor([0, 3, 7, 18, 19])]
    kw = {} if kind == "ddpm" else dict(eta=0.7)
    both = s.step(mo, t, x, variance_noise=noise, **kw)
    for b in range(B):
        row = s.step(mo[b:b + 1], int(t[b]), x[b:b + 1], variance_noise=noise[b:b + 1], **kw)
        torch.testing.assert_close(both.prev_sample[b:b + 1], row.prev_sample, rtol=0, atol=0)
        torch.testing.assert_close(both.pred_original_sample[b:b + 1], row.pred_original_sample, rtol=0, atol=0)


def test_noise_without_generator_is_the_counter_noise():
    """Without a generator the noise is the counter noise of (seed, offset): the seed drawn from
    torch's global generator at the first step that needs noise (not at construction or
    set_timesteps), the offset advancing by one per step; row b is batch-independent."""
    x = torch.randn(4, 3)
    mo = torch.randn(4, 3)
    torch.manual_seed(5)
    s = DDPMScheduler(clip_sample=False)
    s.set_timesteps(10)
    assert s._noise_seed is None
    outs = [s.step(mo, s.timesteps[k], x).prev_sample for k in range(3)]
    torch.manual_seed(5)
    seed = int(torch.randint(0, 2 ** 63 - 1, (), dtype=torch.int64))
    assert s._noise_seed == seed  # the first global draw after manual_seed(5)
    assert int(s.noise_offset) == 3
    for k in range(3):
        expect = ddpm_fast.ddpm_step(mo, int(s.timesteps[k]), x, s.schedule, prev_t=int(s.timesteps[k + 1]),
                                     clip_sample=False, seed=seed, offset=k)
        torch.testing.assert_close(outs[k], expect, rtol=0, atol=0)
    assert not torch.equal(outs[0], outs[1])
    torch.manual_seed(5)
    s2 = DDPMScheduler(clip_sample=False)
    s2.set_timesteps(10)
    torch.testing.assert_close(s2.step(mo[:2], s.timesteps[0], x[:2]).prev_sample, outs[0][:2], rtol=0, atol=0)


def test_device_tensor_timesteps_on_cpu_and_prev_lookup():
    s = DDIMScheduler(timestep_spacing="trailing")
    s.set_timesteps(7)  # 7 does not divide 1000: diffusers' t - T//n differs here (a deliberate difference)
    ts = s.timesteps.tolist()
    x, mo = torch.randn(3, 2), torch.randn(3, 2)
    for i, t in enumerate(ts):
        prev = ts[i + 1] if i + 1 < len(ts) else -1
        expect = ddpm_fast.ddim_step(mo, t, x, s.schedule, prev_t=prev)
        for tt in (t, torch.tensor(t), torch.full((3,), t)):
            torch.testing.assert_close(s.step(mo, tt, x).prev_sample, expect, rtol=0, atol=0)


@needs_cuda
@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_step_makes_no_host_sync_on_cuda(kind):
    s = DDPMScheduler() if kind == "ddpm" else DDIMScheduler()
    s.set_timesteps(50, device="cuda")
    x = torch.randn(4, 3, 8, 8, device="cuda")
    mo = torch.randn_like(x)
    g = torch.Generator(device="cuda").manual_seed(0)
    per_sample = s.timesteps[torch.tensor([0, 5, 10, 49], device="cuda")]
    kw = {} if kind == "ddpm" else dict(eta=0.5)
    s.step(mo, s.timesteps[0], x, **kw)  # warm-up: device tables made on first use
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for t in list(s.timesteps[:3]) + [per_sample]:
            x = s.step(mo, t, x, **kw).prev_sample
            x = s.step(mo, t, x, generator=g, **kw).prev_sample
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert bool(torch.isfinite(x).all())


# --------------------------------------------------------------------------------------------
# deliberate differences (docs/diffusers.md)
# --------------------------------------------------------------------------------------------
@needs_diffusers
def test_difference_fixed_large_log_is_finite_and_equals_fixed_large():
    x, mo = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    outs = []
    for vt in ("fixed_large_log", "fixed_large"):
        s = DDPMScheduler(variance_type=vt)
        s.set_timesteps(10)
        outs.append(s.step(mo, 500, x, generator=torch.Generator().manual_seed(0)).prev_sample)
    assert bool(torch.isfinite(outs[0]).all())
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    d = diffusers.DDPMScheduler(variance_type="fixed_large_log")
    d.set_timesteps(10)
    assert bool(torch.isnan(d.step(mo, 500, x, generator=torch.Generator().manual_seed(0)).prev_sample).any())


@needs_diffusers
def test_difference_learned_keeps_diffusers_meaning_a_variance():
    x = torch.randn(2, 3, 4, 4)
    pred = torch.randn(2, 3, 4, 4)
    var = torch.rand(2, 3, 4, 4) * 0.02 + 1e-3
    o, d = DDPMScheduler(variance_type="learned"), diffusers.DDPMScheduler(variance_type="learned")
    _with_float64_tables(d, o)
    mo = torch.cat([pred, var], 1)
    a = o.step(mo, 700, x, generator=torch.Generator().manual_seed(1)).prev_sample
    b = d.step(mo, 700, x, generator=torch.Generator().manual_seed(1)).prev_sample
    _tight(a, b)
    # a negative variance has no square root: NaN in those elements, as diffusers gives
    mo_neg = torch.cat([pred, -var], 1)
    a = o.step(mo_neg, 700, x, generator=torch.Generator().manual_seed(1)).prev_sample
    assert bool(torch.isnan(a).all())


@needs_diffusers
@pytest.mark.parametrize("spacing,n,T,offset", [("linspace", 10, 1000, 0), ("trailing", 7, 1000, 0),
                                               ("leading", 8, 10, 1)])
def test_difference_ddim_previous_timestep_is_the_next_entry(spacing, n, T, offset):
    """diffusers' DDIM steps from t to t - T // n: wrong for linspace, for trailing when n does not
    divide T, and for leading when steps_offset >= T // n (its last step then goes to t = offset -
    T // n >= 0 instead of the final alpha). Ours: the next entry of the schedule, always."""
    cfg = dict(timestep_spacing=spacing, num_train_timesteps=T, steps_offset=offset)
    o, d = DDIMScheduler(**cfg), diffusers.DDIMScheduler(**cfg)
    o.set_timesteps(n), d.set_timesteps(n)
    ts = o.timesteps.tolist()
    assert ts == d.timesteps.tolist()
    x, mo = torch.randn(2, 3), torch.randn(2, 3)
    differs = False
    for i, t in enumerate(ts):
        prev = ts[i + 1] if i + 1 < len(ts) else -1
        ours = o.step(mo, t, x).prev_sample
        torch.testing.assert_close(ours, ddpm_fast.ddim_step(mo, t, x, o.schedule, prev_t=prev), rtol=0, atol=0)
        diffusers_prev = t - T // n
        if diffusers_prev != prev and not (diffusers_prev < 0 and prev < 0):
            differs = True
            assert not torch.allclose(ours, d.step(mo, t, x).prev_sample, rtol=1e-3, atol=1e-4)
    assert differs  # this spacing is one where diffusers' rule is wrong


@needs_diffusers
def test_zero_snr_ddim_eta_one_is_finite():
    """At abar_t = 0 (zero-SNR rescaling, trailing spacing) with eta = 1, ``1 - abar_prev -
    sigma^2`` is 0 in exact math; diffusers' rounding makes it slightly negative and its square
    root NaN. Ours clamps it at 0: the step stays finite (no NaN from finite inputs)."""
    cfg = dict(num_train_timesteps=10, beta_schedule="squaredcos_cap_v2", rescale_betas_zero_snr=True,
               timestep_spacing="trailing", clip_sample_range=2.0)
    o, d = DDIMScheduler(**cfg), diffusers.DDIMScheduler(**cfg)
    o.set_timesteps(5), d.set_timesteps(5)
    x, mo = torch.randn(1, 2), torch.randn(1, 2)
    ours = o.step(mo, 9, x, eta=1.0, use_clipped_model_output=True, generator=torch.Generator().manual_seed(0))
    theirs = d.step(mo, 9, x, eta=1.0, use_clipped_model_output=True, generator=torch.Generator().manual_seed(0))
    assert bool(torch.isfinite(ours.prev_sample).all())
    assert bool(torch.isnan(theirs.prev_sample).all())
    torch.testing.assert_close(ours.pred_original_sample, theirs.pred_original_sample)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_difference_half_inputs_keep_fp32_math(dtype):
    s = DDPMScheduler(prediction_type="v_prediction")
    s.set_timesteps(20)
    x = torch.randn(2, 3, 4, 4).to(dtype)
    mo = torch.randn(2, 3, 4, 4).to(dtype)
    noise = torch.randn(2, 3, 4, 4).to(dtype)
    half = s.step(mo, 950, x, variance_noise=noise)
    full = s.step(mo.float(), 950, x.float(), variance_noise=noise.float())
    assert half.prev_sample.dtype == dtype
    torch.testing.assert_close(half.prev_sample, full.prev_sample.to(dtype), rtol=0, atol=0)


def test_difference_tables_are_float64():
    s = DDPMScheduler(rescale_betas_zero_snr=True)
    assert s.schedule.alphas_cumprod.dtype == torch.float64
    assert float(s.schedule.alphas_cumprod[-1]) == 0.0
    torch.testing.assert_close(s.alphas_cumprod, s.schedule.alphas_cumprod.float(), rtol=0, atol=0)


def test_guidance_scale_in_step():
    s = DDIMScheduler()
    s.set_timesteps(10)
    x = torch.randn(2, 3)
    uncond, cond = torch.randn(2, 3), torch.randn(2, 3)
    fused = s.step(torch.cat([uncond, cond]), s.timesteps[2], x, guidance_scale=4.0).prev_sample
    plain = s.step(uncond + 4.0 * (cond - uncond), s.timesteps[2], x).prev_sample
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-6)


def test_return_dict_false_and_output_object():
    s = DDPMScheduler()
    s.set_timesteps(5)
    x = torch.randn(1, 2)
    out = s.step(torch.randn(1, 2), s.timesteps[-1], x, return_dict=False)
    assert isinstance(out, tuple) and len(out) == 2
    o = s.step(torch.randn(1, 2), s.timesteps[-1], x)
    assert o[0] is o.prev_sample and o["pred_original_sample"] is o.pred_original_sample


def test_custom_timesteps_and_previous_timestep():
    s = DDPMScheduler()
    s.set_timesteps(timesteps=[900, 500, 100, 3])
    assert s.custom_timesteps and s.timesteps.tolist() == [900, 500, 100, 3]
    assert int(s.previous_timestep(500)) == 100 and int(s.previous_timestep(3)) == -1
    x, mo = torch.randn(2, 3), torch.randn(2, 3)
    out = s.step(mo, 500, x, variance_noise=torch.zeros(2, 3)).prev_sample
    torch.testing.assert_close(out, ddpm_fast.ddpm_step(mo, 500, x, s.schedule, prev_t=100, noise=torch.zeros(2, 3)))
    fresh = DDPMScheduler()
    assert fresh.previous_timestep(10) == 9  # before set_timesteps: t - 1


# --------------------------------------------------------------------------------------------
# bad inputs
# --------------------------------------------------------------------------------------------
def test_bad_inputs():
    with pytest.raises(ValueError, match="variance_type"):
        DDPMScheduler(variance_type="huge")
    with pytest.raises(ValueError, match="prediction_type"):
        DDIMScheduler(prediction_type="noise")
    with pytest.raises(NotImplementedError):
        DDPMScheduler(beta_schedule="quadratic")
    with pytest.raises(NotImplementedError):
        DDIMScheduler(beta_schedule="sigmoid")  # diffusers' DDIM has no sigmoid either
    s = DDPMScheduler(num_train_timesteps=100)
    with pytest.raises(ValueError, match="cannot be larger"):
        s.set_timesteps(101)
    with pytest.raises(ValueError, match="descending"):
        s.set_timesteps(timesteps=[10, 20])
    with pytest.raises(ValueError, match="Can only pass one"):
        s.set_timesteps(10, timesteps=[20, 10])
    with pytest.raises(ValueError, match="start before"):
        s.set_timesteps(timesteps=[100, 10])
    s.set_timesteps(10)
    x, mo = torch.randn(2, 3), torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"\[0, 100\)"):
        s.step(mo, 100, x)
    with pytest.raises(ValueError, match="not in this scheduler's timesteps"):
        s.step(mo, 55, x)
    with pytest.raises(ValueError, match=r"\(2,\) tensor"):
        s.step(mo, torch.tensor([90, 80, 70]), x)
    with pytest.raises(TypeError, match="integer"):
        s.step(mo, torch.tensor([90.5, 80.0]), x)
    with pytest.raises(ValueError, match="one per batch row"):
        s.step(mo, 90, x, generator=[torch.Generator()] * 3)
    with pytest.raises(ValueError, match="model_output"):
        s.step(torch.randn(2, 4), 90, x)
    d = DDIMScheduler()
    with pytest.raises(ValueError, match="set_timesteps"):
        d.step(mo, 10, x)
    d.set_timesteps(10)
    with pytest.raises(ValueError, match="Cannot pass both"):
        d.step(mo, d.timesteps[0], x, eta=0.5, generator=torch.Generator(), variance_noise=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="eta"):
        d.step(mo, d.timesteps[0], x, eta=1.5)


# --------------------------------------------------------------------------------------------
# what diffusers accepts, we accept (docs/diffusers.md, "Accepted as diffusers accepts it")
# --------------------------------------------------------------------------------------------
@needs_diffusers
@pytest.mark.parametrize("spacing,n,t", [("leading", 10, 955), ("leading", 10, 5), ("trailing", 7, 500),
                                         ("linspace", 10, 350)])
def test_ddim_step_off_schedule_uses_diffusers_rule(spacing, n, t):
    """A DDIM step at a timestep that is not in the schedule goes to diffusers' t - T // n (past
    the end when negative); timesteps of the schedule keep going to the next entry."""
    o, d = DDIMScheduler(timestep_spacing=spacing), diffusers.DDIMScheduler(timestep_spacing=spacing)
    o.set_timesteps(n), d.set_timesteps(n)
    _with_float64_tables(d, o)
    assert t not in o.timesteps.tolist()
    x, mo = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    noise = torch.randn(2, 3, 4, 4)
    for eta in (0.0, 0.7):
        a = o.step(mo, t, x, eta=eta, variance_noise=noise)
        b = d.step(mo, t, x, eta=eta, variance_noise=noise)
        _tight(a.prev_sample, b.prev_sample)
        _tight(a.pred_original_sample, b.pred_original_sample)
    prev = max(t - 1000 // n, -1)
    torch.testing.assert_close(o.step(mo, t, x).prev_sample,
                               ddpm_fast.ddim_step(mo, t, x, o.schedule, prev_t=prev), rtol=0, atol=0)
    # per-row host timesteps mixing a scheduled and an off-schedule one
    t0 = int(o.timesteps[0])
    rows = o.step(mo, torch.tensor([t, t0]), x).prev_sample
    torch.testing.assert_close(rows[:1], o.step(mo[:1], t, x[:1]).prev_sample, rtol=0, atol=0)
    torch.testing.assert_close(rows[1:], o.step(mo[1:], t0, x[1:]).prev_sample, rtol=0, atol=0)


@needs_diffusers
def test_ddpm_step_off_schedule_still_raises_as_diffusers_does():
    o, d = DDPMScheduler(), diffusers.DDPMScheduler()
    o.set_timesteps(10), d.set_timesteps(10)
    x, mo = torch.randn(2, 3), torch.randn(2, 3)
    with pytest.raises(IndexError):
        d.step(mo, 955, x)
    with pytest.raises(IndexError, match="not in this scheduler's timesteps"):
        o.step(mo, 955, x)
    with pytest.raises(ValueError):  # the same error is also a ValueError (bad argument)
        o.step(mo, 955, x)
    assert issubclass(S.TimestepNotInScheduleError, (IndexError, ValueError))


@needs_diffusers
@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_trained_betas_of_any_length(kind):
    """diffusers builds its tables from trained_betas whatever num_train_timesteps says; so do we.
    Steps at timesteps the tables hold match; beyond them both refuse (diffusers: IndexError)."""
    ours_cls, their_cls = (DDPMScheduler, diffusers.DDPMScheduler) if kind == "ddpm" else (DDIMScheduler,
                                                                                           diffusers.DDIMScheduler)
    betas = np.linspace(1e-4, 0.05, 100).tolist()
    o, d = ours_cls(trained_betas=betas, clip_sample=False), their_cls(trained_betas=betas, clip_sample=False)
    strip = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    assert strip(o.config) == strip(d.config) and len(o) == len(d) == 1000
    assert o.schedule.num_timesteps == 100 and o.alphas_cumprod.shape == d.alphas_cumprod.shape == (100,)
    o.set_timesteps(20), d.set_timesteps(20)
    assert torch.equal(o.timesteps, d.timesteps)
    _with_float64_tables(d, o)
    x, mo = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    t = 50
    a = o.step(mo, t, x, generator=torch.Generator().manual_seed(0))
    b = d.step(mo, t, x, generator=torch.Generator().manual_seed(0))
    _tight(a.prev_sample, b.prev_sample)
    with pytest.raises(IndexError):
        d.step(mo, 900, x, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"\[0, 100\)"):
        o.step(mo, 900, x)
    longer = ours_cls(num_train_timesteps=10, trained_betas=np.linspace(1e-3, 0.1, 30))
    longer.set_timesteps(5)
    assert longer.timesteps.max() < 10 and longer.schedule.num_timesteps == 30


@needs_diffusers
def test_beta_ranges_diffusers_accepts_construct_with_a_warning():
    """beta_start = 0 (abar_0 = 1): diffusers constructs and returns NaN at t = 0. Ours constructs
    with one warning, matches diffusers where the step is finite, and raises where it is not."""
    with pytest.warns(UserWarning, match=r"outside \(0, 1\]") as rec:
        o = DDPMScheduler(beta_start=0.0, clip_sample=False)
    assert len([w for w in rec if issubclass(w.category, UserWarning)]) == 1
    d = diffusers.DDPMScheduler(beta_start=0.0, clip_sample=False)
    strip = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    assert strip(o.config) == strip(d.config)
    o.set_timesteps(10), d.set_timesteps(10)
    _with_float64_tables(d, o)
    x, mo = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    for t in o.timesteps[:-1].tolist():
        _tight(o.step(mo, t, x, generator=torch.Generator().manual_seed(t)).prev_sample,
               d.step(mo, t, x, generator=torch.Generator().manual_seed(t)).prev_sample)
    assert bool(torch.isnan(d.step(mo, 0, x).prev_sample).any())
    with pytest.raises(ValueError, match="NaN"):
        o.step(mo, 0, x)
    # DDIM: with steps_offset = 1 no step starts at t = 0, and every step matches
    with pytest.warns(UserWarning):
        od = DDIMScheduler(beta_start=0.0, steps_offset=1, clip_sample=False)
    dd = diffusers.DDIMScheduler(beta_start=0.0, steps_offset=1, clip_sample=False)
    od.set_timesteps(10), dd.set_timesteps(10)
    _with_float64_tables(dd, od)
    for t in od.timesteps.tolist():
        _tight(od.step(mo, t, x).prev_sample, dd.step(mo, t, x).prev_sample)
    # betas above 1 make abar negative from some t on: steps before it run, steps there raise
    with pytest.warns(UserWarning):
        big = DDPMScheduler(num_train_timesteps=10, beta_end=1.5, clip_sample=False)
    bad = int(torch.nonzero(big.schedule.alphas_cumprod < 0)[0])
    big.set_timesteps(10)
    assert bool(torch.isfinite(big.step(mo, bad - 1, x, generator=torch.Generator()).prev_sample).all())
    with pytest.raises(ValueError, match="NaN"):
        big.step(mo, bad, x)
    with pytest.raises(ValueError, match="finite"):
        DDPMScheduler(trained_betas=[0.1, float("nan")])


@needs_diffusers
def test_unknown_option_values_still_raise_where_diffusers_constructs():
    """Deliberate difference: diffusers' constructors take any string and fail (or silently fall
    through) later; ours name the bad value at construction."""
    for ours_cls, their_cls, kw in [(DDPMScheduler, diffusers.DDPMScheduler, dict(variance_type="other")),
                                    (DDPMScheduler, diffusers.DDPMScheduler, dict(prediction_type="noise")),
                                    (DDIMScheduler, diffusers.DDIMScheduler, dict(timestep_spacing="weird"))]:
        their_cls(**kw)  # diffusers constructs
        with pytest.raises(ValueError, match=list(kw)[0]):
            ours_cls(**kw)


@needs_diffusers
def test_get_variance_matches_diffusers():
    """_get_variance (read by some pipelines) from the float64 tables by reference's formulas."""
    for vt in ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log"):
        o, d = DDPMScheduler(variance_type=vt), diffusers.DDPMScheduler(variance_type=vt)
        o.set_timesteps(10), d.set_timesteps(10)
        for t in (900, 500, 0):
            torch.testing.assert_close(o._get_variance(t), d._get_variance(t).float(), rtol=1e-4, atol=1e-7)
    pv = torch.rand(2, 3) * 2 - 1
    o, d = DDPMScheduler(variance_type="learned_range"), diffusers.DDPMScheduler(variance_type="learned_range")
    torch.testing.assert_close(o._get_variance(500, pv), d._get_variance(500, pv), rtol=1e-4, atol=1e-6)
    o, d = DDIMScheduler(set_alpha_to_one=False), diffusers.DDIMScheduler(set_alpha_to_one=False)
    o.set_timesteps(10), d.set_timesteps(10)
    for t, p in ((900, 800), (0, -100)):
        torch.testing.assert_close(o._get_variance(t, p), d._get_variance(t, p), rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(o._get_variance(900), d._get_variance(900, 800))
