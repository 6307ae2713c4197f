"""ddpm_fast.sample: the whole reverse loop (ddpm_fast/sampling.py)."""
from __future__ import annotations

import pytest
import torch

import ddpm_fast
from ddpm_fast import DDIMScheduler, DDPMScheduler, NoiseSchedule, sample

from conftest import RecordingModel

try:
    import diffusers
except Exception as e:  # pragma: no cover
    diffusers = None
    _why = f"diffusers not importable: {type(e).__name__}: {e}"
needs_diffusers = pytest.mark.skipif(diffusers is None, reason=_why if diffusers is None else "")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none visible to torch)")


class Recorder(RecordingModel):
    """A small fixed model that records the timesteps it is called with."""

    def out(self, x, t):
        return torch.tanh(x.float() @ self.W.T * (0.5 + t.float()[:, None] / 2000))


def _manual_loop(model, scheduler_cls, n, shape, generator_seed, d64_from=None, **step_kw):
    s = scheduler_cls(clip_sample=False)
    if d64_from is not None:
        s.alphas_cumprod = d64_from.schedule.alphas_cumprod.clone()
        s.one = torch.tensor(1.0, dtype=torch.float64)
        if hasattr(s, "final_alpha_cumprod"):
            s.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    g = torch.Generator().manual_seed(generator_seed)
    x = torch.randn(shape, generator=g)
    s.set_timesteps(n)
    for t in s.timesteps:
        x = s.step(model(x, t.expand(shape[0])), t, x, generator=g, **step_kw).prev_sample
    return x


@needs_diffusers
@pytest.mark.parametrize("kind,n,eta", [("ddpm", 40, 0.0), ("ddim", 15, 0.0), ("ddim", 15, 1.0)])
def test_sample_with_generator_equals_the_diffusers_loop(kind, n, eta):
    """With a generator, sample() draws x_T and the step noise as a diffusers pipeline loop does:
    equal to diffusers on our float64 tables (see tests/test_schedulers.py for the tolerance)."""
    model = Recorder()
    ours_cls, their_cls = (DDPMScheduler, diffusers.DDPMScheduler) if kind == "ddpm" else (DDIMScheduler,
                                                                                           diffusers.DDIMScheduler)
    ours_sched = ours_cls(clip_sample=False)
    with torch.no_grad():
        x = sample(model, (6, 2), ours_sched, n, eta=eta, generator=torch.Generator().manual_seed(9), progress=False)
        kw = dict(eta=eta) if kind == "ddim" else {}
        ref = _manual_loop(model, their_cls, n, (6, 2), 9, d64_from=ours_sched, **kw)
        stock = _manual_loop(model, their_cls, n, (6, 2), 9, **kw)
    diff = (x.double() - ref.double()).abs()
    assert bool((diff <= 2e-5 * (1 + ref.double().abs())).all()), diff.max()
    assert bool(((x - stock).abs() <= (ref - stock).abs() + 2e-5 * (1 + stock.abs())).all())


def test_seeded_sampling_is_reproducible_and_batch_independent():
    model = Recorder()
    s = DDPMScheduler(num_train_timesteps=100, clip_sample=False)
    with torch.no_grad():
        a = sample(model, (8, 2), s, 20, seed=123, progress=False)
        b = sample(model, (8, 2), s, 20, seed=123, progress=False)
        c = sample(model, (3, 2), s, 20, seed=123, progress=False)
        d = sample(model, (8, 2), s, 20, seed=124, progress=False)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a[:3], c, rtol=0, atol=0)  # row b does not depend on the batch size
    assert not torch.allclose(a, d)


def test_seeded_loop_is_the_documented_noise_stream():
    """x_T is the counter noise at offset 0, step i uses offset 1 + i."""
    model = Recorder()
    s = DDPMScheduler(num_train_timesteps=50, clip_sample=False)
    with torch.no_grad():
        out = sample(model, (4, 2), s, 10, seed=77, progress=False)
        x = ddpm_fast.gaussian_noise((4, 2), 77, 0)
        ts = s.timesteps.tolist()
        for i, t in enumerate(ts):
            prev = ts[i + 1] if i + 1 < len(ts) else -1
            x = ddpm_fast.ddpm_step(model(x, torch.full((4,), t)), t, x, s.schedule, prev_t=prev, clip_sample=False,
                                    seed=77, offset=1 + i)
    torch.testing.assert_close(out, x, rtol=0, atol=0)


def test_trajectory_callback_and_model_timesteps():
    model = Recorder()
    s = DDIMScheduler(num_train_timesteps=100, clip_sample=False)
    calls = []
    with torch.no_grad():
        x, traj = sample(model, (5, 2), s, 8, seed=1, progress=True, return_trajectory=True,
                         callback=lambda i, t, xx: calls.append((i, t, xx.clone())))
    assert traj.shape == (9, 5, 2)
    torch.testing.assert_close(traj[0], ddpm_fast.gaussian_noise((5, 2), 1, 0))
    torch.testing.assert_close(traj[-1], x)
    assert [c[0] for c in calls] == list(range(8)) and [c[1] for c in calls] == s.timesteps.tolist()
    torch.testing.assert_close(calls[3][2], traj[4])
    assert all(t.dtype == torch.int64 and t.shape == (5,) for t in model.seen)
    assert [int(t[0]) for t in model.seen] == s.timesteps.tolist()


def test_bare_schedule_respaced_passes_original_timesteps():
    """A NoiseSchedule: DDPM, epsilon, fixed_small, no clipping, evenly spaced kept timesteps; the
    model sees the ORIGINAL timesteps of a respaced schedule (timestep_map)."""
    base = NoiseSchedule.from_name("linear", 1000)
    respaced = base.respace(range(0, 1000, 100))  # 10 kept timesteps, re-indexed 0..9
    model = Recorder()
    with torch.no_grad():
        out = sample(model, (3, 2), respaced, None, seed=5, progress=False)
    assert [int(t[0]) for t in model.seen] == list(range(900, -1, -100))
    # equal to DDPM steps over the respaced tables, index by index
    model2 = Recorder()
    with torch.no_grad():
        x = ddpm_fast.gaussian_noise((3, 2), 5, 0)
        for i, t in enumerate(range(9, -1, -1)):
            x = ddpm_fast.ddpm_step(model2(x, torch.full((3,), 100 * t)), t, x, respaced, clip_sample=False, seed=5,
                                    offset=1 + i)
    torch.testing.assert_close(out, x, rtol=0, atol=0)


def test_classifier_free_guidance():
    """guidance=w: one model call on 2B rows (unconditional first), combined in the step."""
    calls = []

    def model(x, t):
        calls.append(x.shape[0])
        B = x.shape[0] // 2
        out = torch.tanh(x)
        return torch.cat([out[:B] * 0.5, out[B:] * 1.5])  # "unconditional" and "conditional" halves

    def combined(x, t):
        return 0.5 * torch.tanh(x) + 3.0 * (1.5 * torch.tanh(x) - 0.5 * torch.tanh(x))

    s = DDIMScheduler(num_train_timesteps=100, clip_sample=False)
    with torch.no_grad():
        a = sample(model, (4, 2), s, 10, seed=3, guidance=3.0, progress=False)
        b = sample(combined, (4, 2), s, 10, seed=3, progress=False)
    assert calls == [8] * 10
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_learned_variance_model_and_half_precision():
    model = Recorder(out_factor=2)
    s = DDPMScheduler(num_train_timesteps=50, variance_type="learned_range", clip_sample=False)
    with torch.no_grad():
        x = sample(model, (4, 2), s, 10, seed=2, progress=False)
        h = sample(model, (4, 2), s, 10, seed=2, progress=False, dtype=torch.bfloat16)
    assert x.shape == (4, 2) and bool(torch.isfinite(x).all())
    assert h.dtype == torch.bfloat16 and bool(torch.isfinite(h).all())


@needs_diffusers
def test_diffusers_scheduler_is_converted():
    model = Recorder()
    with torch.no_grad():
        a = sample(model, (4, 2), diffusers.DDIMScheduler(clip_sample=False), 10, seed=4, progress=False)
        b = sample(model, (4, 2), DDIMScheduler(clip_sample=False), 10, seed=4, progress=False)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bad_inputs():
    model = Recorder()
    s = DDPMScheduler()
    with pytest.raises(ValueError, match="eta"):
        sample(model, (2, 2), s, 10, eta=0.5, progress=False)
    with pytest.raises(ValueError, match="seed and generator"):
        sample(model, (2, 2), s, 10, seed=1, generator=torch.Generator(), progress=False)
    with pytest.raises(ValueError, match="cuda_graph"):
        sample(model, (2, 2), s, 10, cuda_graph="yes", progress=False)
    with pytest.raises(ValueError, match="CUDA"):
        sample(model, (2, 2), s, 10, cuda_graph=True, device="cpu", progress=False)
    with pytest.raises(ValueError, match="shape"):
        sample(model, (0, 2), s, 10, progress=False)
    with pytest.raises(TypeError, match="scheduler_or_schedule"):
        sample(model, (2, 2), "ddpm", 10, progress=False)
    with pytest.raises(ValueError, match="num_inference_steps"):
        sample(model, (2, 2), DDIMScheduler(), None, progress=False)
    with pytest.raises(ValueError, match="num_inference_steps"):
        sample(model, (2, 2), NoiseSchedule.from_name("linear", 10), 11, progress=False)
    with pytest.raises(TypeError, match="model must return"):
        sample(lambda x, t: "nope", (2, 2), s, 2, progress=False)


# --------------------------------------------------------------------------------------------
# the pipelines' __call__ options (docs/diffusers.md)
# --------------------------------------------------------------------------------------------
@needs_diffusers
def test_use_clipped_model_output_matches_the_ddim_loop():
    """use_clipped_model_output=True re-derives epsilon from the clipped x0 (diffusers'
    DDIMScheduler.step option, improved-diffusion's DDIM loop): equal to diffusers' loop on our
    float64 tables, and far from the unclipped-epsilon run."""
    model = Recorder()
    W = model.W.detach() * 6  # a large output, so x0_hat is clipped at the noisy steps

    def big(x, t):
        return torch.tanh(x.float() @ W.T) * 3

    ours = DDIMScheduler(clip_sample=True)
    with torch.no_grad():
        x = sample(big, (6, 2), ours, 12, eta=0.5, use_clipped_model_output=True,
                   generator=torch.Generator().manual_seed(2), progress=False)
        plain = sample(big, (6, 2), DDIMScheduler(clip_sample=True), 12, eta=0.5,
                       generator=torch.Generator().manual_seed(2), progress=False)
        d = diffusers.DDIMScheduler(clip_sample=True)
        d.alphas_cumprod = ours.schedule.alphas_cumprod.clone()
        d.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
        g = torch.Generator().manual_seed(2)
        ref = torch.randn((6, 2), generator=g)
        d.set_timesteps(12)
        for t in d.timesteps:
            ref = d.step(big(ref, t), t, ref, eta=0.5, use_clipped_model_output=True, generator=g).prev_sample
    diff = (x.double() - ref.double()).abs()
    assert bool((diff <= 2e-5 * (1 + ref.double().abs())).all()), diff.max()
    assert float((x - plain).abs().max()) > 0.1


def test_output_type_gives_the_pipelines_images():
    def img_model(x, t):
        return torch.tanh(x) * 0.1 * (1 + t.float().reshape(-1, 1, 1, 1) / 50)

    s = DDIMScheduler(num_train_timesteps=50, clip_sample=False)
    with torch.no_grad():
        raw = sample(img_model, (2, 3, 4, 5), s, 5, seed=1, progress=False)
        pt = sample(img_model, (2, 3, 4, 5), s, 5, seed=1, progress=False, output_type="pt")
        arr = sample(img_model, (2, 3, 4, 5), s, 5, seed=1, progress=False, output_type="np")
        pil = sample(img_model, (2, 3, 4, 5), s, 5, seed=1, progress=False, output_type="pil")
        x, traj = sample(img_model, (2, 3, 4, 5), s, 5, seed=1, progress=False, output_type="pt",
                         return_trajectory=True)
    torch.testing.assert_close(pt, (raw / 2 + 0.5).clamp(0, 1), rtol=0, atol=0)
    assert arr.shape == (2, 4, 5, 3) and arr.dtype.name == "float32"
    torch.testing.assert_close(torch.from_numpy(arr), pt.permute(0, 2, 3, 1), rtol=0, atol=0)
    assert len(pil) == 2 and pil[0].size == (5, 4) and pil[0].mode == "RGB"
    torch.testing.assert_close(traj[-1], raw, rtol=0, atol=0)  # the trajectory stays in model space
    with pytest.raises(ValueError, match="output_type"):
        sample(img_model, (2, 3, 4, 5), s, 5, seed=1, progress=False, output_type="latent")
    with pytest.raises(ValueError, match="image-shaped"):
        sample(Recorder(), (2, 2), s, 5, seed=1, progress=False, output_type="np")


def test_parallel_schedulers_sample_as_their_parents_and_inverse_is_refused():
    model = Recorder()
    with torch.no_grad():
        for parent, child, kw in ((DDPMScheduler, ddpm_fast.DDPMParallelScheduler, {}),
                                  (DDIMScheduler, ddpm_fast.DDIMParallelScheduler, dict(eta=0.5))):
            a = sample(model, (3, 2), parent(num_train_timesteps=100, clip_sample=False), 10, seed=3,
                       progress=False, **kw)
            b = sample(model, (3, 2), child(num_train_timesteps=100, clip_sample=False), 10, seed=3,
                       progress=False, **kw)
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(TypeError, match="DDIMInverseScheduler"):
        sample(model, (3, 2), ddpm_fast.DDIMInverseScheduler(), 10, progress=False)
    with pytest.raises(ValueError, match="use_clipped_model_output"):
        sample(model, (3, 2), DDPMScheduler(), 10, use_clipped_model_output=True, progress=False)


def test_a_generator_leaves_the_global_generator_alone():
    """With a generator nothing is drawn from torch's global generator (its state is unchanged),
    so generator=torch.manual_seed(0) sees exactly the draws a diffusers pipeline makes."""
    model = Recorder()
    for s, kw in ((DDPMScheduler(num_train_timesteps=50), {}), (DDIMScheduler(num_train_timesteps=50), dict(eta=1.0))):
        before = torch.random.get_rng_state()
        with torch.no_grad():
            sample(model, (3, 2), s, 5, generator=torch.Generator().manual_seed(0), progress=False, **kw)
        assert torch.equal(torch.random.get_rng_state(), before)


@needs_cuda
@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_cuda_graph_equals_eager_and_makes_no_sync(kind):
    model = Recorder().cuda()
    s = DDPMScheduler(num_train_timesteps=100) if kind == "ddpm" else DDIMScheduler(num_train_timesteps=100)
    kw = dict(eta=0.5) if kind == "ddim" else {}
    with torch.no_grad():
        eager = sample(model, (16, 2), s, 20, seed=8, progress=False, cuda_graph=False, **kw)
        graph = sample(model, (16, 2), s, 20, seed=8, progress=False, cuda_graph=True, **kw)
        torch.testing.assert_close(graph, eager, rtol=1e-6, atol=1e-6)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            again = sample(model, (16, 2), s, 20, seed=8, progress=False, cuda_graph=False, **kw)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    torch.testing.assert_close(again, eager, rtol=0, atol=0)
