"""The new drop-ins: ``DDIMInverseScheduler``, ``DDPMParallelScheduler``, ``DDIMParallelScheduler``
against diffusers' classes config-for-config and step-for-step (diffusers on our float64 tables
within 2e-5, and stock diffusers within its fp32-table error: see tests/test_schedulers.py), their
files, a DDIM inversion round trip and a ParaDiGMS-style parallel (Picard) loop."""
from __future__ import annotations

import json
import random
import warnings

import numpy as np
import pytest
import torch

import ddpm_fast
from ddpm_fast import DDIMInverseScheduler, DDIMParallelScheduler, DDIMScheduler, DDPMParallelScheduler, DDPMScheduler

from test_schedulers import _model_output, _tight, _with_float64_tables, _within_table_error

diffusers = pytest.importorskip("diffusers", reason="diffusers is the oracle of this file (pip install diffusers)")

PRED = ("epsilon", "sample", "v_prediction")
strip = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731


def _f64_inverse(d, ours):
    d.alphas_cumprod = ours.schedule.alphas_cumprod.clone()
    d.initial_alpha_cumprod = (torch.tensor(1.0, dtype=torch.float64) if d.config.set_alpha_to_one
                               else ours.schedule.alphas_cumprod[0].clone())
    return d


def _inverse_config(rng):
    T = rng.choice([10, 50, 100, 1000])
    cfg = dict(num_train_timesteps=T, beta_start=rng.choice([1e-4, 1e-3]), beta_end=rng.choice([0.02, 0.05]),
               beta_schedule=rng.choice(["linear", "scaled_linear", "squaredcos_cap_v2"]),
               clip_sample=rng.random() < 0.5, set_alpha_to_one=rng.random() < 0.5, prediction_type=rng.choice(PRED),
               clip_sample_range=rng.choice([1.0, 2.0]), timestep_spacing=rng.choice(["leading", "trailing"]),
               rescale_betas_zero_snr=rng.random() < 0.2, steps_offset=rng.choice([0, 0, 1]))
    n = rng.randint(1, min(T, 10))
    if cfg["timestep_spacing"] == "trailing":
        while T % n:  # with n | T diffusers' t - T // n is the entry before (else a deliberate difference)
            n -= 1
        cfg["steps_offset"] = 0
    if cfg["steps_offset"] >= T // n or (n - 1) * (T // n) + cfg["steps_offset"] >= T:
        cfg["steps_offset"] = 0
    if cfg["rescale_betas_zero_snr"]:
        cfg["prediction_type"] = "v_prediction"  # epsilon/sample divide by 0 at abar = 0 in both
    return cfg, n


# --------------------------------------------------------------------------------------------
# DDIMInverseScheduler
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", range(10))
def test_inverse_matches_diffusers_step_by_step(case):
    rng = random.Random(500 + case)
    cfg, n = _inverse_config(rng)
    ours, stock = DDIMInverseScheduler(**cfg), diffusers.DDIMInverseScheduler(**cfg)
    d64 = _f64_inverse(diffusers.DDIMInverseScheduler(**cfg), ours)
    assert dict(strip(ours.config)) == dict(strip(stock.config))
    assert torch.equal(ours.timesteps, stock.timesteps)  # ascending 0..T-1 before set_timesteps
    torch.testing.assert_close(ours.initial_alpha_cumprod, stock.initial_alpha_cumprod, rtol=2e-5, atol=1e-7)
    for s in (ours, stock, d64):
        s.set_timesteps(n)
    assert torch.equal(ours.timesteps, stock.timesteps) and ours.timesteps.dtype == torch.int64
    g = torch.Generator().manual_seed(case)
    x = torch.randn(2, 3, 4, 4, generator=g)
    for t in ours.timesteps:
        mo = _model_output(cfg, x, g)
        o, st, dd = (s.step(mo, t, x) for s in (ours, stock, d64))
        _tight(o.prev_sample, dd.prev_sample)
        _tight(o.pred_original_sample, dd.pred_original_sample)
        _within_table_error(o.prev_sample, st.prev_sample, dd.prev_sample)
        x = dd.prev_sample
    out = ours.step(mo, ours.timesteps[-1], x, return_dict=False)
    assert isinstance(out, tuple) and len(out) == 2


def test_inverse_attributes_files_and_from_config(tmp_path):
    o, d = DDIMInverseScheduler(), diffusers.DDIMInverseScheduler()
    assert o.order == d.order and len(o) == len(d) and o.init_noise_sigma == d.init_noise_sigma
    assert o._compatibles == d._compatibles == []
    o.save_pretrained(tmp_path / "o")
    saved = json.loads((tmp_path / "o" / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "DDIMInverseScheduler"
    assert strip(diffusers.DDIMInverseScheduler.from_pretrained(tmp_path / "o").config) == strip(o.config)
    diffusers.DDIMInverseScheduler(timestep_spacing="trailing", set_alpha_to_one=False).save_pretrained(tmp_path / "d")
    back = DDIMInverseScheduler.from_pretrained(tmp_path / "d")
    assert type(back) is DDIMInverseScheduler and back.config.timestep_spacing == "trailing"
    # the usual way to get one: from a sampling scheduler's config (extra keys are ignored)
    ddim = diffusers.DDIMScheduler(thresholding=True, prediction_type="v_prediction")
    assert strip(DDIMInverseScheduler.from_config(ddim.config).config) == \
        strip(diffusers.DDIMInverseScheduler.from_config(ddim.config).config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = DDIMInverseScheduler(set_alpha_to_zero=False)
        b = diffusers.DDIMInverseScheduler(set_alpha_to_zero=False)
    torch.testing.assert_close(a.initial_alpha_cumprod, b.initial_alpha_cumprod)
    with pytest.raises(TypeError, match="unexpected"):
        DDIMInverseScheduler(thresholding=True)  # unknown option names still raise
    with pytest.raises(ValueError, match="set_timesteps"):
        DDIMInverseScheduler().step(torch.randn(1, 2), 10, torch.randn(1, 2))
    s = DDIMInverseScheduler(timestep_spacing="trailing")
    with pytest.raises(ValueError, match="timestep_spacing"):
        DDIMInverseScheduler(timestep_spacing="linspace")  # diffusers' inverse has no linspace either
    s.set_timesteps(4)
    assert s.timesteps.tolist() == [249, 499, 749, 999]


def test_inverse_source_is_the_entry_before_for_every_spacing():
    """Deliberate difference (as DDIM's): the step to a timestep comes from the entry before it in
    the schedule; diffusers takes t - T // n, wrong for trailing when n does not divide T. Off the
    schedule ours falls back to diffusers' rule."""
    cfg = dict(timestep_spacing="trailing", clip_sample=False)
    o, d = DDIMInverseScheduler(**cfg), diffusers.DDIMInverseScheduler(**cfg)
    o.set_timesteps(7), d.set_timesteps(7)
    ts = o.timesteps.tolist()
    assert ts == d.timesteps.tolist()
    x, mo = torch.randn(2, 3), torch.randn(2, 3)
    init = torch.ones((), dtype=torch.float64)
    table = torch.cat([init.reshape(1), o.schedule.alphas_cumprod])
    sched = ddpm_fast.NoiseSchedule(1 - table / torch.cat([torch.ones(1, dtype=torch.float64), table[:-1]]),
                                    check_range=False)
    differs = False
    for i, t in enumerate(ts):
        src = ts[i - 1] if i else -1
        expect = ddpm_fast.ddim_reverse_step(mo, src + 1, x, sched, next_t=t + 1, clip_sample=False)
        torch.testing.assert_close(o.step(mo, t, x).prev_sample, expect, rtol=1e-6, atol=1e-6)
        if max(t - 1000 // 7, -1) != src:
            differs = True
            assert not torch.allclose(o.step(mo, t, x).prev_sample, d.step(mo, t, x).prev_sample, atol=1e-4)
    assert differs
    _f64_inverse(d, o)
    _tight(o.step(mo, 600, x).prev_sample, d.step(mo, 600, x).prev_sample)  # off the schedule: diffusers' rule


def test_inversion_round_trip_and_per_row_timesteps():
    """With a model whose output does not depend on x, DDIM inversion and DDIM sampling are exact
    inverses (no clipping); per-row (B,) timesteps equal the rows run one by one."""
    eps = torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(0))
    x0 = torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(1))
    inv, fwd = DDIMInverseScheduler(clip_sample=False), DDIMScheduler(clip_sample=False)
    inv.set_timesteps(20), fwd.set_timesteps(20)
    x = x0
    for t in inv.timesteps:
        x = inv.step(eps, t, x).prev_sample
    latent = x
    for t in fwd.timesteps:
        x = fwd.step(eps, t, x).prev_sample
    torch.testing.assert_close(x, x0, rtol=1e-4, atol=1e-4)
    assert float((latent - x0).abs().max()) > 0.5
    rows = torch.tensor([0, 350, 950])
    both = inv.step(eps, rows, x0).prev_sample
    for b in range(3):
        torch.testing.assert_close(both[b:b + 1], inv.step(eps[b:b + 1], int(rows[b]), x0[b:b + 1]).prev_sample,
                                   rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# DDPMParallelScheduler / DDIMParallelScheduler
# --------------------------------------------------------------------------------------------
def _parallel_config(rng, kind):
    T = rng.choice([10, 100, 1000])
    cfg = dict(num_train_timesteps=T, beta_schedule=rng.choice(["linear", "scaled_linear", "squaredcos_cap_v2"]),
               clip_sample=rng.random() < 0.5, prediction_type=rng.choice(PRED), thresholding=rng.random() < 0.3,
               sample_max_value=rng.choice([1.0, 2.0]), timestep_spacing="leading", steps_offset=0)
    if kind == "ddpm":
        cfg["variance_type"] = rng.choice(["fixed_small", "fixed_large", "learned", "learned_range"])
    else:
        cfg["set_alpha_to_one"] = True  # see the difference test below
    return cfg, rng.randint(2, min(T, 12))


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
@pytest.mark.parametrize("case", range(5))
def test_parallel_batch_step_matches_diffusers(kind, case):
    rng = random.Random(900 + 10 * (kind == "ddim") + case)
    cfg, n = _parallel_config(rng, kind)
    ours_cls, their_cls = ((DDPMParallelScheduler, diffusers.DDPMParallelScheduler) if kind == "ddpm"
                           else (DDIMParallelScheduler, diffusers.DDIMParallelScheduler))
    ours, stock = ours_cls(**cfg), their_cls(**cfg)
    d64 = _with_float64_tables(their_cls(**cfg), ours)
    assert strip(ours.config) == strip(stock.config)
    assert ours._is_ode_scheduler == stock._is_ode_scheduler == (kind == "ddim")
    assert sorted(ours._compatibles) == sorted(stock._compatibles)
    for s in (ours, stock, d64):
        s.set_timesteps(n)
    g = torch.Generator().manual_seed(case)
    B = 6
    x = torch.randn(B, 2, 3, 3, generator=g)
    mo = _model_output(cfg, x, g)
    t = ours.timesteps[torch.randint(0, n, (B,), generator=g)]
    a, st, dd = (s.batch_step_no_noise(mo, t, x) for s in (ours, stock, d64))
    _tight(a, dd)
    _within_table_error(a, st, dd)
    # each row is the serial step without noise
    for b in range(B):
        kw = dict(variance_noise=torch.zeros_like(x[b:b + 1]))
        row = ours.step(mo[b:b + 1], int(t[b]), x[b:b + 1], **kw).prev_sample
        torch.testing.assert_close(a[b:b + 1], row, rtol=1e-6, atol=1e-6)


def test_parallel_differences_and_variances():
    """Deliberate differences: batch_step_no_noise goes to the next entry of the schedule, as
    step does (diffusers' batch method takes t - T // n, wrong for trailing when n does not divide
    T), and DDIM's uses final_alpha_cumprod past the end, as step does (diffusers' batch method
    uses 1). _get_variance(t) with one argument and _batch_get_variance as the pipeline reads them."""
    o, d = DDIMParallelScheduler(timestep_spacing="trailing"), diffusers.DDIMParallelScheduler(
        timestep_spacing="trailing")
    o.set_timesteps(7), d.set_timesteps(7)
    x, mo = torch.randn(7, 3), torch.randn(7, 3)
    t = o.timesteps.clone()
    ours = o.batch_step_no_noise(mo, t, x)
    for b in range(7):
        torch.testing.assert_close(ours[b:b + 1], o.step(mo[b:b + 1], int(t[b]), x[b:b + 1]).prev_sample)
    assert not torch.allclose(ours, d.batch_step_no_noise(mo, t, x), atol=1e-4)
    o, d = DDIMParallelScheduler(set_alpha_to_one=False), diffusers.DDIMParallelScheduler(set_alpha_to_one=False)
    o.set_timesteps(5), d.set_timesteps(5)
    last = torch.zeros(7, dtype=torch.int64)
    torch.testing.assert_close(o.batch_step_no_noise(mo, last, x), d.step(mo, 0, x).prev_sample, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(d.batch_step_no_noise(mo, last, x), d.step(mo, 0, x).prev_sample, atol=1e-4)
    with pytest.raises(ValueError, match="eta"):
        o.batch_step_no_noise(mo, last, x, eta=0.5)
    with pytest.raises(ValueError, match="one timestep per row"):
        o.batch_step_no_noise(mo, last[:3], x)
    torch.testing.assert_close(o._get_variance(800), d._get_variance(800), rtol=1e-4, atol=1e-8)
    tt, pp = torch.tensor([800, 600, 0]), torch.tensor([600, 400, -200])
    dd = diffusers.DDIMParallelScheduler()
    dd.set_timesteps(5)
    oo = DDIMParallelScheduler()
    oo.set_timesteps(5)
    torch.testing.assert_close(oo._batch_get_variance(tt, pp), dd._batch_get_variance(tt, pp), rtol=1e-4, atol=1e-8)
    p, q = DDPMParallelScheduler(), diffusers.DDPMParallelScheduler()
    p.set_timesteps(5), q.set_timesteps(5)
    torch.testing.assert_close(p._get_variance(600), q._get_variance(600), rtol=1e-4, atol=1e-8)


def _picard(s, model, x_T, noises):
    """ParaDiGMS' parallel sampling with a window over every step: each iteration evaluates the
    model at every position of the trajectory in one batch and steps all rows at once with
    batch_step_no_noise; after n iterations the trajectory is the serial one."""
    n, B = len(s.timesteps), x_T.shape[0]
    traj = x_T.unsqueeze(0).repeat(n + 1, *([1] * x_T.dim()))
    t_rows = s.timesteps.reshape(n, 1).expand(n, B).reshape(-1)
    for _ in range(n):
        flat = traj[:n].reshape(n * B, *x_T.shape[1:])
        drift = (s.batch_step_no_noise(model(flat, t_rows), t_rows, flat) - flat).reshape(traj[:n].shape)
        traj[1:] = x_T + torch.cumsum(drift, 0) + (0 if s._is_ode_scheduler else torch.cumsum(noises, 0))
    return traj[n]


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_parallel_sampling_loop_equals_the_serial_loop(kind):
    W = torch.randn(2, 2, generator=torch.Generator().manual_seed(0)) * 0.3

    def model(x, t):
        return torch.tanh(x @ W.T * (0.5 + t.float()[:, None] / 2000))

    cfg = dict(num_train_timesteps=100, clip_sample=False)
    cls, their_cls = ((DDPMParallelScheduler, diffusers.DDPMParallelScheduler) if kind == "ddpm"
                      else (DDIMParallelScheduler, diffusers.DDIMParallelScheduler))
    ours, theirs = cls(**cfg), their_cls(**cfg)
    _with_float64_tables(theirs, ours)
    ours.set_timesteps(8), theirs.set_timesteps(8)
    g = torch.Generator().manual_seed(4)
    x_T = torch.randn(3, 2, generator=g)
    z = torch.randn(8, 3, 2, generator=g)
    noises = torch.stack([ours._get_variance(t) ** 0.5 * z[i] for i, t in enumerate(ours.timesteps)])
    par = _picard(ours, model, x_T, noises)
    par_theirs = _picard(theirs, model, x_T, noises)
    x = x_T
    for i, t in enumerate(ours.timesteps):
        kw = dict(variance_noise=z[i]) if kind == "ddpm" else {}
        x = ours.step(model(x, t.expand(3)), t, x, **kw).prev_sample
    torch.testing.assert_close(par, x, rtol=1e-5, atol=1e-5)
    _tight(par, par_theirs)
