"""ddpm_fast.training_loss, NoiseStream and the timestep samplers (ddpm_fast/training.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import ddpm_fast
from ddpm_fast import DDPMScheduler, LossAwareSampler, NoiseSchedule, NoiseStream, UniformSampler, training_loss
from ddpm_fast.training import timestep_generator

from conftest import RecordingModel


class TinyModel(RecordingModel):
    def out(self, x, t):
        return x @ self.W.T * (1 + t.float()[:, None] / 1000)


SCHED = NoiseSchedule.from_name("linear", 100, 1e-3, 0.2)


def _manual(model, x0, schedule, seed, offset, target="epsilon"):
    """The documented recipe, written out: t from timestep_generator(seed, offset), the docs/noise.md noise
    of (seed, offset), x_t, the model, the per-sample MSE."""
    t, _ = UniformSampler(schedule.num_timesteps).sample(x0.shape[0], timestep_generator(seed, offset))
    eps = ddpm_fast.gaussian_noise(x0.shape, seed, offset, dtype=torch.float64)
    a = schedule.alphas_cumprod[t].reshape(-1, 1)
    x_t = (a.sqrt() * x0.double() + (1 - a).sqrt() * eps).float()
    out = model(x_t, t).double()
    tgt = {"epsilon": eps, "sample": x0.double(), "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x0.double()}[target]
    return ((out - tgt) ** 2).mean(1), t


@pytest.mark.parametrize("target", ["epsilon", "sample", "v_prediction"])
def test_loss_is_the_documented_recipe(target):
    x0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(1))
    model = TinyModel()
    loss, det = training_loss(model, x0, SCHED, seed=11, offset=5, target=target, return_details=True)
    per, t = _manual(model, x0, SCHED, 11, 5, target)
    assert torch.equal(det["t"], t)
    torch.testing.assert_close(det["losses"].double(), per, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(loss.double(), per.mean(), rtol=2e-5, atol=1e-6)
    assert loss.dtype == torch.float32 and loss.dim() == 0


def test_reproducible_from_seed_and_step_and_noise_stream():
    x0 = torch.randn(32, 2, generator=torch.Generator().manual_seed(2))
    model = TinyModel()
    a = [training_loss(model, x0, SCHED, seed=3, offset=k) for k in range(4)]
    b = [training_loss(model, x0, SCHED, seed=3, offset=k) for k in range(4)]
    stream = NoiseStream(3)
    c = [training_loss(model, x0, SCHED, seed=stream) for _ in range(4)]
    assert stream.offset == 4 and stream.state_dict() == {"seed": 3, "offset": 4}
    for k in range(4):
        assert torch.equal(a[k], b[k]) and torch.equal(a[k], c[k])
    assert len({float(v.detach()) for v in a}) == 4  # each step draws new noise and timesteps
    s2 = NoiseStream(0)
    s2.load_state_dict({"seed": 3, "offset": 2})
    assert torch.equal(training_loss(model, x0, SCHED, seed=s2), a[2])


def test_global_rng_untouched_and_gradients():
    x0 = torch.randn(16, 2)
    model = TinyModel()
    state = torch.get_rng_state()
    loss = training_loss(model, x0, SCHED, seed=1, offset=0, snr_gamma=5.0)
    assert torch.equal(state, torch.get_rng_state())
    loss.backward()
    g_fused = model.W.grad.clone()
    model.W.grad = None
    per, t = _manual(model, x0, SCHED, 1, 0)
    abar = SCHED.alphas_cumprod[t]
    snr = abar / (1 - abar)
    w = torch.minimum(snr, torch.full_like(snr, 5.0)) / snr
    (per * w).mean().backward()
    torch.testing.assert_close(g_fused, model.W.grad, rtol=1e-4, atol=1e-6)


def test_hybrid_loss_and_scheduler_argument():
    x0 = torch.randn(16, 2, generator=torch.Generator().manual_seed(4))
    model = TinyModel(out_factor=2)
    sched = DDPMScheduler(num_train_timesteps=100, beta_start=1e-3, beta_end=0.2)
    loss, det = training_loss(model, x0, sched, seed=6, offset=1, hybrid=True, return_details=True)
    out = model(ddpm_fast.q_sample(x0, det["t"], sched.schedule, seed=6, offset=1), det["t"])
    ref = ddpm_fast.hybrid_loss(out, x0, det["t"], sched.schedule, seed=6, offset=1)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-7)


def test_respaced_schedule_gives_the_model_original_timesteps():
    respaced = NoiseSchedule.from_name("linear", 1000).respace(range(0, 1000, 10))
    model = TinyModel()
    _, det = training_loss(model, torch.randn(8, 2), respaced, seed=0, offset=0, return_details=True)
    assert torch.equal(model.seen[-1], det["t"] * 10)


def test_loss_aware_sampler():
    T = 6
    s = LossAwareSampler(T, history_per_term=3, uniform_prob=0.1)
    np.testing.assert_array_equal(s.weights(), np.ones(T))
    for _ in range(3):
        t = torch.arange(T)
        s.update(t, (t + 1).float())
    assert s.warmed_up()
    w = s.weights()
    expect = np.arange(1, T + 1) / np.arange(1, T + 1).sum() * 0.9 + 0.1 / T
    np.testing.assert_allclose(w, expect, rtol=1e-12)
    t, iw = s.sample(10000, torch.Generator().manual_seed(0))
    freq = np.bincount(t.numpy(), minlength=T) / 10000
    np.testing.assert_allclose(freq, expect, atol=0.02)
    np.testing.assert_allclose(iw.numpy(), 1.0 / (T * expect[t.numpy()]), rtol=1e-6)  # unbiased weights
    # the history keeps the last entries
    s.update(torch.tensor([0]), torch.tensor([100.0]))
    assert s.state_dict()["history"][0].tolist() == [1.0, 1.0, 100.0]
    # training_loss feeds it
    s2 = LossAwareSampler(100)
    training_loss(TinyModel(), torch.randn(64, 2), SCHED, seed=0, offset=0, timestep_sampler=s2)
    assert int(s2._counts.sum()) == 64


def test_bad_inputs():
    model = TinyModel()
    x0 = torch.randn(4, 2)
    with pytest.raises(ValueError, match="offset"):
        training_loss(model, x0, SCHED, seed=NoiseStream(1), offset=3)
    with pytest.raises(ValueError, match="seed"):
        training_loss(model, x0, SCHED, seed=-1)
    with pytest.raises(ValueError, match="target"):
        training_loss(model, x0, SCHED, seed=0, target="noise")
    with pytest.raises(TypeError, match="schedule"):
        training_loss(model, x0, "linear", seed=0)
    with pytest.raises(ValueError, match="timesteps"):
        training_loss(model, x0, SCHED, seed=0, timestep_sampler=UniformSampler(10))
    with pytest.raises(ValueError, match="model_output"):
        training_loss(TinyModel(out_factor=2), x0, SCHED, seed=0)
    with pytest.raises(ValueError, match="seed"):
        NoiseStream(2 ** 63)
    with pytest.raises(ValueError, match="uniform_prob"):
        LossAwareSampler(10, uniform_prob=2.0)


def test_uniform_sampler_draws_randint_of_the_generator():
    """The uniform timesteps are torch.randint(0, T, (B,), generator=timestep_generator(seed, offset))
    (documented in UniformSampler.sample); weights all 1. A subclass with its own weights() draws
    with torch.multinomial from them, as before."""
    t, w = UniformSampler(100).sample(513, timestep_generator(7, 3))
    assert torch.equal(t, torch.randint(0, 100, (513,), generator=timestep_generator(7, 3)))
    assert t.dtype == torch.int64 and torch.equal(w, torch.ones(513))

    class Skewed(UniformSampler):
        def weights(self):
            return np.arange(1, self.num_timesteps + 1, dtype=np.float64)

    t, w = Skewed(10).sample(64, timestep_generator(7, 3))
    p = torch.arange(1, 11, dtype=torch.float64) / 55
    assert torch.equal(t, torch.multinomial(p, 64, replacement=True, generator=timestep_generator(7, 3)))
    torch.testing.assert_close(w, (1.0 / (10 * p[t])).float())
    # LossAwareSampler before its warm-up: uniform weights, but its own weights(): multinomial
    t, _ = LossAwareSampler(10).sample(64, timestep_generator(1, 1))
    assert torch.equal(t, torch.multinomial(torch.full((10,), 0.1, dtype=torch.float64), 64, replacement=True,
                                            generator=timestep_generator(1, 1)))


def _native_cpu():
    if not ddpm_fast.backends()["native"]["available"].get("cpu"):
        pytest.skip(f"native backend unavailable on cpu: {ddpm_fast.backends()['native']['reason']}")


@pytest.mark.parametrize("target", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_cpu_noise_once_is_bit_identical(target, dtype):
    """On a CPU the loss forward draws the noise once and its backward reads it, and training_loss
    draws it once for q_sample and the loss: the values are exactly those the kernels regenerate
    from (seed, offset), so losses and gradients equal the regenerating path bit for bit."""
    _native_cpu()
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(6, 3, 4, generator=g).to(dtype)
    mo = torch.randn(6, 3, 4, generator=g).to(dtype).requires_grad_(True)
    t = torch.randint(0, 100, (6,), generator=g)
    seed, offset = torch.tensor([11]), torch.tensor([4])
    abar = SCHED.table(torch.device("cpu"))
    loss = torch.ops.ddpm_fast.diffusion_loss(mo, x0, t, abar, None, seed, offset, target, 3.0)
    grad_out = torch.linspace(0.5, 1.5, 6, dtype=loss.dtype)
    (grad,) = torch.autograd.grad(loss, mo, grad_out)
    with torch.no_grad():  # the regenerating forward and backward kernels, called directly
        want = torch.ops.ddpm_fast.diffusion_loss(mo, x0, t, abar, None, seed, offset, target, 3.0)
    want_grad = torch.ops.ddpm_fast.diffusion_loss_backward(grad_out, mo.detach(), x0, t, abar, None, seed, offset,
                                                            target, 3.0)
    assert torch.equal(loss.detach(), want) and torch.equal(grad, want_grad)
    # per-row seeds draw the same per-row noise
    seeds = torch.arange(6, dtype=torch.int64) * 1000 + 1
    loss = torch.ops.ddpm_fast.diffusion_loss(mo, x0, t, abar, None, seeds, offset, target, None)
    with torch.no_grad():
        want = torch.ops.ddpm_fast.diffusion_loss(mo, x0, t, abar, None, seeds, offset, target, None)
    assert torch.equal(loss.detach(), want)


def test_training_loss_noise_once_equals_the_seed_path():
    """training_loss on a CPU (one gaussian_noise for the step) against q_sample + diffusion_loss
    with seed= (each regenerating): the same x_t fed to the model, the same loss and gradient."""
    _native_cpu()
    x0 = torch.randn(32, 2, generator=torch.Generator().manual_seed(3))
    model = TinyModel()
    loss, det = training_loss(model, x0, SCHED, seed=9, offset=2, return_details=True)
    (grad,) = torch.autograd.grad(loss, model.W)
    seen = model.seen[-1]
    t = det["t"]
    x_t = ddpm_fast.q_sample(x0, t, SCHED, seed=9, offset=2, backend="native")
    per = ddpm_fast.diffusion_loss(model(x_t, t), x0, t, SCHED, seed=9, offset=2, reduction="none", backend="native")
    want = per.mean()
    (want_grad,) = torch.autograd.grad(want, model.W)
    assert torch.equal(seen, model.seen[-1])
    assert torch.equal(loss, want) and torch.equal(grad, want_grad)


@pytest.mark.parametrize("target", ["epsilon", "sample", "v_prediction"])
def test_hybrid_training_loss_noise_once_equals_the_seed_path(target):
    """With hybrid=True the loss rebuilds x_t from the noise for every target (also "sample"), so on a
    CPU training_loss passes the step's one noise tensor to it: the same loss and gradient, bit for bit,
    as q_sample + hybrid_loss regenerating from seed=, with target as hybrid_loss's prediction_type."""
    _native_cpu()
    x0 = torch.randn(16, 2, generator=torch.Generator().manual_seed(4))
    model = TinyModel(out_factor=2)
    loss, det = training_loss(model, x0, SCHED, seed=6, offset=1, target=target, hybrid=True, return_details=True)
    (grad,) = torch.autograd.grad(loss, model.W)
    t = det["t"]
    x_t = ddpm_fast.q_sample(x0, t, SCHED, seed=6, offset=1, backend="native")
    want = ddpm_fast.hybrid_loss(model(x_t, t), x0, t, SCHED, seed=6, offset=1, prediction_type=target,
                                 backend="native")
    (want_grad,) = torch.autograd.grad(want, model.W)
    assert torch.equal(loss, want) and torch.equal(grad, want_grad)
