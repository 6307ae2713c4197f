"""The drop-in schedulers inside diffusers pipelines built from tiny random components (no hub
access): images against diffusers' own (private generator and ``torch.manual_seed(0)``, DDPM and
DDIM with eta 0 and 1), ``sample()`` against the pipelines, ``save_pretrained``/``from_pretrained``
in both directions with all five schedulers (and loading without ddpm_fast), ``swap_schedulers``
with DDPMPipeline, DDIMPipeline and a class-conditional DiTPipeline. docs/diffusers.md describes
what is tested here.

Tolerance: diffusers builds its tables in fp32, ours are float64, so images differ by diffusers'
table rounding carried through the loop; the bar is 1e-3 (max abs, images in [0, 1]). Each test
prints the measured figure (``pytest -s``).
"""
from __future__ import annotations

import json
import sys
import warnings

import pytest
import torch

import ddpm_fast
from ddpm_fast.schedulers import (DDIMInverseScheduler, DDIMParallelScheduler, DDIMScheduler, DDPMParallelScheduler,
                                  DDPMScheduler, swap_schedulers)

diffusers = pytest.importorskip("diffusers", reason="diffusers is the oracle of this file (pip install diffusers)")

STEPS = 10
TOL = 1e-3


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The models here are tiny: one intra-op thread is as fast, and on a shared machine far
    faster (oversubscribed threads made one UNet call 100x slower there)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def unet():
    g = torch.random.get_rng_state()
    torch.manual_seed(0)
    model = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                  block_out_channels=(8, 16), norm_num_groups=4,
                                  down_block_types=("DownBlock2D", "DownBlock2D"),
                                  up_block_types=("UpBlock2D", "UpBlock2D")).eval()
    torch.random.set_rng_state(g)
    return model


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generator(mode):
    # "global": diffusers' documented idiom, which passes torch's global generator itself
    return torch.Generator().manual_seed(0) if mode == "private" else torch.manual_seed(0)


def _images(pipe, mode, **kw):
    out = pipe(generator=_generator(mode), output_type="np", **kw).images
    return torch.from_numpy(out).double()


def _report(what, value):
    print(f"\n[figure] {what}: max abs {value:.3g}")


def _ddim_pipeline(unet, scheduler):
    """DDIMPipeline rebuilds its scheduler with diffusers' class; swap_schedulers puts ours back."""
    pipe = diffusers.DDIMPipeline(unet=unet, scheduler=scheduler)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _quiet(swap_schedulers(pipe))


# --------------------------------------------------------------------------------------------
# images: ours in the pipelines vs diffusers, and sample() vs the pipelines
# --------------------------------------------------------------------------------------------
CASES = [("ddpm", None, "private"), ("ddpm", None, "global"), ("ddim", 0.0, "private"), ("ddim", 0.0, "global"),
         ("ddim", 1.0, "private"), ("ddim", 1.0, "global")]


@pytest.mark.parametrize("kind,eta,mode", CASES)
def test_pipeline_images_match_diffusers_and_sample(unet, kind, eta, mode):
    cfg = dict(clip_sample=False)
    kw = dict(batch_size=2, num_inference_steps=STEPS)
    if kind == "ddpm":
        ours_pipe = _quiet(diffusers.DDPMPipeline(unet=unet, scheduler=DDPMScheduler(**cfg)))
        theirs_pipe = _quiet(diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(**cfg)))
        ours_sched, call = DDPMScheduler(**cfg), {}
    else:
        ours_pipe = _ddim_pipeline(unet, diffusers.DDIMScheduler(**cfg))
        theirs_pipe = _quiet(diffusers.DDIMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler(**cfg)))
        ours_sched, call = DDIMScheduler(**cfg), dict(eta=eta)
    assert type(ours_pipe.scheduler).__module__ == "ddpm_fast.schedulers"
    assert type(theirs_pipe.scheduler).__module__.startswith("diffusers.")
    ours = _images(ours_pipe, mode, **kw, **call)
    theirs = _images(theirs_pipe, mode, **kw, **call)
    with torch.no_grad():
        sampled = ddpm_fast.sample(lambda x, t: unet(x, t).sample, (2, 3, 8, 8), ours_sched, STEPS,
                                   generator=_generator(mode), output_type="np", progress=False,
                                   eta=eta or 0.0)
    sampled = torch.from_numpy(sampled).double()
    d_pipe = float((ours - theirs).abs().max())
    d_sample = float((sampled - theirs).abs().max())
    _report(f"{kind} eta={eta} generator={mode}: ours-pipeline vs diffusers", d_pipe)
    _report(f"{kind} eta={eta} generator={mode}: sample() vs diffusers", d_sample)
    assert ours.shape == theirs.shape == (2, 8, 8, 3)
    assert d_pipe <= TOL and d_sample <= TOL
    # sample() and the pipeline with our scheduler draw the same noise and run the same steps
    torch.testing.assert_close(sampled, ours, rtol=0, atol=1e-5)


def test_global_generator_draws_what_diffusers_draws(unet):
    """With generator=torch.manual_seed(0) a whole pipeline run leaves torch's global generator
    where diffusers leaves it: the counter-noise seed is never drawn when a generator is given."""
    states = []
    for sched in (DDPMScheduler(), diffusers.DDPMScheduler()):
        _images(_quiet(diffusers.DDPMPipeline(unet=unet, scheduler=sched)), "global", batch_size=1,
                num_inference_steps=3)
        states.append(torch.random.get_rng_state())
    assert torch.equal(states[0], states[1])


# --------------------------------------------------------------------------------------------
# save_pretrained / from_pretrained with all five schedulers
# --------------------------------------------------------------------------------------------
class InversionPipeline(diffusers.DiffusionPipeline):
    """A tiny pipeline holding a scheduler and an inverse scheduler, as diffusers' editing pipelines
    do: DDIM-invert an image to noise, then sample it back."""

    def __init__(self, unet, scheduler, inverse_scheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, inverse_scheduler=inverse_scheduler)

    @torch.no_grad()
    def __call__(self, image, num_inference_steps=4):
        x = image
        self.inverse_scheduler.set_timesteps(num_inference_steps)
        for t in self.inverse_scheduler.timesteps:
            x = self.inverse_scheduler.step(self.unet(x, t).sample, t, x).prev_sample
        noise = x
        self.scheduler.set_timesteps(num_inference_steps)
        for t in self.scheduler.timesteps:
            x = self.scheduler.step(self.unet(x, t).sample, t, x).prev_sample
        return noise, x


def _build(kind, unet):
    cfg = dict(clip_sample=False, num_train_timesteps=100)
    if kind == "DDPMScheduler":
        return _quiet(diffusers.DDPMPipeline(unet=unet, scheduler=DDPMScheduler(**cfg)))
    if kind == "DDPMParallelScheduler":
        return _quiet(diffusers.DDPMPipeline(unet=unet, scheduler=DDPMParallelScheduler(**cfg)))
    if kind in ("DDIMScheduler", "DDIMParallelScheduler"):
        pipe = _quiet(diffusers.DDIMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler(**cfg)))
        pipe.scheduler = (DDIMScheduler if kind == "DDIMScheduler" else DDIMParallelScheduler)(**cfg)
        return pipe
    return _quiet(InversionPipeline(unet=unet, scheduler=DDIMScheduler(**cfg),
                                    inverse_scheduler=DDIMInverseScheduler(**cfg)))


def _run(pipe):
    if isinstance(pipe, InversionPipeline):
        image = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(3)) * 2 - 1
        return torch.cat(pipe(image), 0)
    return torch.from_numpy(pipe(batch_size=1, num_inference_steps=4, generator=torch.Generator().manual_seed(1),
                                 output_type="np").images)


KINDS = ["DDPMScheduler", "DDPMParallelScheduler", "DDIMScheduler", "DDIMParallelScheduler", "DDIMInverseScheduler"]


@pytest.fixture(scope="module")
def saved(unet, tmp_path_factory):
    """Each pipeline with ours, its images, and the directory it was saved to."""
    out = {}
    root = tmp_path_factory.mktemp("pipelines")
    for kind in KINDS:
        pipe = _build(kind, unet)
        images = _run(pipe)
        pipe.save_pretrained(root / kind)
        out[kind] = (pipe, images, root / kind)
    return out


def _scheduler_names(pipe):
    return {n: c for n, c in pipe.components.items() if n.endswith("scheduler")}


@pytest.mark.parametrize("kind", KINDS)
def test_saved_with_ours_loads_everywhere_and_back_into_ours(saved, kind):
    pipe, images, path = saved[kind]
    index = json.loads((path / "model_index.json").read_text())
    for name, sched in _scheduler_names(pipe).items():
        # recorded as diffusers' class of the same name: loadable without ddpm_fast
        assert index[name] == ["diffusers", type(sched).__name__]
        config = json.loads((path / name / "scheduler_config.json").read_text())
        assert config["_class_name"] == type(sched).__name__
    cls = type(pipe)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = cls.from_pretrained(path)
        assert all(type(s).__module__.startswith("diffusers.") for s in _scheduler_names(loaded).values())
        theirs = _run(_quiet(loaded))  # diffusers' schedulers from our files
        swap_schedulers(loaded)
    for name, sched in _scheduler_names(loaded).items():
        assert type(sched).__module__ == "ddpm_fast.schedulers"
        strip = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
        assert strip(sched.config) == strip(getattr(pipe, name).config)
    torch.testing.assert_close(_run(loaded), images, rtol=0, atol=1e-6)
    diff = float((theirs - images).abs().max())
    _report(f"{kind}: saved with ours, run by diffusers' class after loading, vs ours", diff)
    assert diff <= TOL * (4 if kind == "DDIMInverseScheduler" else 1)  # the inverse pipeline returns x in [-1, 1]


@pytest.mark.parametrize("kind", ["DDPMScheduler", "DDIMInverseScheduler"])
def test_from_pretrained_with_our_scheduler_passed(saved, kind):
    """Passing ours to from_pretrained (it raised TypeError: issubclass() arg 2 must be a class)."""
    pipe, images, path = saved[kind]
    names = _scheduler_names(pipe)
    passed = {n: type(s).from_pretrained(path, subfolder=n) for n, s in names.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = _quiet(type(pipe).from_pretrained(path, **passed))
    for n in names:
        assert getattr(loaded, n) is passed[n]
    torch.testing.assert_close(_run(loaded), images, rtol=0, atol=1e-6)


def test_a_user_without_ddpm_fast_loads_the_saved_pipelines(saved, monkeypatch):
    """With ddpm_fast hidden (every ``ddpm_fast*`` entry of sys.modules removed and ``import
    ddpm_fast`` failing, as on a machine without it), diffusers loads every saved pipeline."""
    for name in [m for m in sys.modules if m == "ddpm_fast" or m.startswith("ddpm_fast.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "ddpm_fast", None)  # import ddpm_fast raises ImportError
    with pytest.raises(ImportError):
        import ddpm_fast.schedulers  # noqa: F401
    for kind in KINDS:
        pipe, _, path = saved[kind]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = _quiet(type(pipe).from_pretrained(path))
        for name, sched in _scheduler_names(loaded).items():
            assert type(sched).__module__.startswith("diffusers."), (kind, name, type(sched))
        assert bool(torch.isfinite(_run(loaded)).all())


def test_model_index_naming_ddpm_fast_loads_ours(saved, tmp_path):
    """A model_index.json naming ddpm_fast.schedulers (what earlier versions wrote) loads ours: the
    loader looks up SchedulerMixin by name in that module."""
    pipe, images, path = saved["DDPMScheduler"]
    import shutil
    shutil.copytree(path, tmp_path / "p")
    index = json.loads((tmp_path / "p" / "model_index.json").read_text())
    index["scheduler"] = ["ddpm_fast.schedulers", "DDPMScheduler"]
    (tmp_path / "p" / "model_index.json").write_text(json.dumps(index))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = _quiet(diffusers.DDPMPipeline.from_pretrained(tmp_path / "p"))
    assert type(loaded.scheduler) is DDPMScheduler
    torch.testing.assert_close(_run(loaded), images, rtol=0, atol=1e-6)


def test_saved_with_diffusers_loads_and_swaps(unet, tmp_path):
    cfg = dict(clip_sample=False, num_train_timesteps=100)
    theirs = _quiet(diffusers.DDIMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler(**cfg)))
    reference = _run(theirs)
    theirs.save_pretrained(tmp_path / "d")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = _quiet(swap_schedulers(diffusers.DDIMPipeline.from_pretrained(tmp_path / "d")))
    assert type(loaded.scheduler) is DDIMScheduler
    diff = float((_run(loaded) - reference).abs().max())
    _report("saved with diffusers' DDIMScheduler, loaded and swapped, vs diffusers", diff)
    assert diff <= TOL


# --------------------------------------------------------------------------------------------
# swap_schedulers
# --------------------------------------------------------------------------------------------
def test_swap_schedulers_warnings_and_errors(unet):
    from ddpm_fast.schedulers import pipelines as P

    P._warned.discard(diffusers.DDIMPipeline)
    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(num_train_timesteps=50))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # DDPMPipeline keeps what it is given: no warning
        assert swap_schedulers(pipe) is pipe
    assert type(pipe.scheduler) is DDPMScheduler and pipe.scheduler.config.num_train_timesteps == 50
    assert pipe.config.scheduler == ("diffusers", "DDPMScheduler") or list(pipe.config.scheduler) == [
        "diffusers", "DDPMScheduler"]
    ddim = diffusers.DDIMPipeline(unet=unet, scheduler=DDIMScheduler())
    assert type(ddim.scheduler) is diffusers.DDIMScheduler  # diffusers' constructor rebuilt ours
    with pytest.warns(UserWarning, match="rebuilds its scheduler"):
        swap_schedulers(ddim)
    assert type(ddim.scheduler) is DDIMScheduler
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per pipeline class
        swap_schedulers(diffusers.DDIMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler()))
    assert P.rebuilds_scheduler(diffusers.DDIMPipeline) and not P.rebuilds_scheduler(diffusers.DDPMPipeline)
    with pytest.warns(UserWarning, match="nothing was replaced"):
        swap_schedulers(diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.PNDMScheduler()))
    with pytest.raises(TypeError, match="pipeline"):
        swap_schedulers(diffusers.DDPMScheduler())

    class Custom(diffusers.DDPMScheduler):  # a subclass may change behaviour: left alone
        pass

    custom = Custom()
    assert ddpm_fast.schedulers.from_diffusers(custom) is custom

    class Mine(DDPMScheduler):  # a user's subclass of ours is recorded under its own module
        pass

    mine = diffusers.DDPMPipeline(unet=unet, scheduler=Mine())
    assert list(mine.config.scheduler) == [Mine.__module__, "Mine"]
    assert type(ddpm_fast.schedulers.from_diffusers(diffusers.DDPMParallelScheduler())) is DDPMParallelScheduler


@pytest.fixture(scope="module")
def dit_parts():
    g = torch.random.get_rng_state()
    torch.manual_seed(0)
    transformer = diffusers.DiTTransformer2DModel(
        sample_size=8, num_layers=1, patch_size=4, attention_head_dim=8, num_attention_heads=2, in_channels=4,
        out_channels=8, attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
        norm_type="ada_norm_zero", norm_elementwise_affine=False).eval()
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                                  up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), layers_per_block=1,
                                  latent_channels=4, norm_num_groups=4, sample_size=8).eval()
    torch.random.set_rng_state(g)
    return transformer, vae


def test_class_conditional_dit_pipeline(dit_parts):
    """DiTPipeline (class labels, classifier-free guidance, learned sigma split off): with DDIM
    (the pipeline calls step without a generator, eta 0) ours gives diffusers' images; with
    DDPM the step noise is our counter noise (no generator is passed), reproducible from
    torch.manual_seed."""
    transformer, vae = dit_parts
    kw = dict(class_labels=[1, 7], guidance_scale=3.0, num_inference_steps=6, output_type="np")
    images = []
    for swap in (True, False):
        pipe = _quiet(diffusers.DiTPipeline(transformer=transformer, vae=vae,
                                            scheduler=diffusers.DDIMScheduler(clip_sample=False)))
        if swap:
            swap_schedulers(pipe)
            assert type(pipe.scheduler) is DDIMScheduler
        images.append(torch.from_numpy(pipe(generator=torch.Generator().manual_seed(0), **kw).images).double())
    diff = float((images[0] - images[1]).abs().max())
    _report("DiTPipeline DDIM (guidance 3): ours vs diffusers", diff)
    assert diff <= TOL
    pipe = _quiet(swap_schedulers(diffusers.DiTPipeline(transformer=transformer, vae=vae,
                                                        scheduler=diffusers.DDPMScheduler(clip_sample=False))))
    runs = []
    for _ in range(2):
        torch.manual_seed(5)
        runs.append(pipe(generator=torch.Generator().manual_seed(0), **kw).images)
    assert runs[0].shape == (2, 8, 8, 3) and bool(torch.isfinite(torch.from_numpy(runs[0])).all())
    assert (runs[0] == runs[1]).all()
