"""The benchmarked ops, one :class:`OpSpec` each: what it computes, its minimal traffic, the inputs
its providers share and the providers themselves (a factory per provider returning a zero-argument
callable). Adding an op to the bench is adding one spec to :data:`SPECS`; timing
(:mod:`.timing`) and reporting (:mod:`.report`) read the specs and know no op by name.

Providers come in two kinds: ``library`` (the fused kernels through the public API, one per
backend: ``native``, ``triton``) and ``baseline`` (the pure-PyTorch specification ``reference``,
``reference+compile``, and what users write today: diffusers' schedulers, ``randn_like`` +
``add_noise``, the eager training step, a plain-torch training loop).
"""
from __future__ import annotations

import importlib
import importlib.util
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

from ...nvtx import nvtx_range
from ...step_options import StepOptions

SEED, OFFSET = 1234, 7
DDPM_T = 500
DDIM_STEPS, DDIM_INDEX = 50, 25
TOY_T = 100  # the demo's schedule: T = 100, cosine

DEFAULT_SHAPES: Tuple[Tuple[int, ...], ...] = ((10000, 2), (4, 4, 64, 64), (64, 3, 32, 32))
CUDA_LARGE_SHAPE: Tuple[int, ...] = (64, 4, 256, 256)        # 16.8M elements
QUICK_SHAPES: Tuple[Tuple[int, ...], ...] = ((10000, 2), (64, 3, 32, 32))
TOY_SHAPES: Tuple[Tuple[int, ...], ...] = ((1024, 2),)        # the demo's batch of 2-D points
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
LIBRARY_PROVIDERS = ("native", "triton")


class ProviderSkip(Exception):
    """A provider that cannot run here; the message is the reason."""


@dataclass(frozen=True)
class Traffic:
    """Minimal traffic of an op in units of one sample tensor (``numel * itemsize`` bytes)."""
    reads: int
    writes: int
    what: str


Runner = Callable[[], object]
# A provider's factory: (inputs, shape, dtype, device) -> a zero-argument callable running the op once.
Factory = Callable[[dict, Tuple[int, ...], torch.dtype, torch.device], Runner]


@dataclass(frozen=True)
class OpSpec:
    name: str
    description: str
    traffic: Traffic
    providers: Dict[str, Factory]
    inputs: Callable[[Tuple[int, ...], torch.dtype, torch.device], dict]
    shapes: Optional[Tuple[Tuple[int, ...], ...]] = None   # None: the bench's shapes
    quick_shapes: Optional[Tuple[Tuple[int, ...], ...]] = None
    kinds: Dict[str, str] = field(default_factory=dict)    # provider -> "library" (default: by name)

    def kind(self, provider: str) -> str:
        return self.kinds.get(provider, "library" if provider in LIBRARY_PROVIDERS else "baseline")


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def shape_str(shape: Sequence[int]) -> str:
    return "x".join(str(s) for s in shape)


# --------------------------------------------------------------------------------------------
# shared pieces
# --------------------------------------------------------------------------------------------
def _schedule():
    from ...schedule import NoiseSchedule
    return NoiseSchedule.from_name("linear", 1000)


def _toy_scheduler():
    from ...schedulers import DDPMScheduler
    return DDPMScheduler(num_train_timesteps=TOY_T, beta_schedule="squaredcos_cap_v2", clip_sample=False,
                         variance_type="fixed_large")


def _library_backend(provider: str, device: torch.device, dtype: torch.dtype):
    from ...backends import BackendUnavailable, resolve_backend
    if provider == "triton" and importlib.util.find_spec("triton") is None:
        raise ProviderSkip("triton is not installed (pip install triton, or ddpm_fast[triton])")
    if provider == "triton" and device.type == "cpu":
        raise ProviderSkip("Triton runs CPU tensors only in its interpreter (TRITON_INTERPRET=1): not timed")
    try:
        return resolve_backend(provider, device, dtype)
    except BackendUnavailable as e:
        raise ProviderSkip(str(e)) from None


def _reference_module():
    try:
        return importlib.import_module("ddpm_fast.backends.reference")
    except Exception as e:
        raise ProviderSkip(f"reference backend not importable: {type(e).__name__}: {e}") from None


def _diffusers():
    try:
        return importlib.import_module("diffusers")
    except Exception as e:
        raise ProviderSkip(f"diffusers not importable: {type(e).__name__}: {e}") from None


def _ddim_timesteps():
    """DDIM's (t, prev_t) as diffusers' leading spacing gives them for 50 of 1000 steps."""
    step = 1000 // DDIM_STEPS
    t = (DDIM_STEPS - 1 - DDIM_INDEX) * step
    return t, t - step


def sample_inputs(shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device, *,
                  model_channels: int = 1) -> dict:
    """x0 in [-1, 1], x_t, model_output (``model_channels`` times the channels), per-row t, seed
    and offset tensors: one set for every provider of a case."""
    g = torch.Generator().manual_seed(0)
    d = {"x0": torch.randn(shape, generator=g).clamp_(-1, 1).to(device, dtype),
         "x_t": torch.randn(shape, generator=g).to(device, dtype)}
    if model_channels == 1:
        d["model_output"] = torch.randn(shape, generator=g).to(device, dtype)
    else:
        if len(shape) < 2:
            raise ProviderSkip("learned variance needs a channel dimension")
        mo_shape = (shape[0], model_channels * shape[1]) + tuple(shape[2:])
        d["model_output"] = (0.5 * torch.randn(mo_shape, generator=g)).to(device, dtype)
    d["t_rows"] = torch.randint(0, 1000, (shape[0],), generator=g).to(device)
    d["seed"] = torch.tensor(SEED, dtype=torch.int64, device=device)
    d["offset"] = torch.tensor(OFFSET, dtype=torch.int64, device=device)
    return d


def _compiled(fn, args) -> Runner:
    """torch.compile of fn over args; compiled (and checked) now, so compile time stays out of the
    timing and a failure is a skip reason."""
    run = (lambda: fn(*args)) if args else fn
    try:
        run()
    except ProviderSkip:
        raise
    except Exception as e:
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise ProviderSkip(f"torch.compile failed here: {type(e).__name__}: {msg}") from None
    return run


def _public(provider: str, make: Callable[..., Runner]) -> Factory:
    """A library provider (or the eager reference) through the public ops with backend=provider."""
    def factory(d, shape, dtype, device):
        if provider == "reference":
            _reference_module()
        _library_backend(provider, device, dtype)
        return make(provider, d, shape, dtype, device)
    return factory


def _with_library(make: Callable[..., Runner], names=("native", "triton", "reference")) -> Dict[str, Factory]:
    return {name: _public(name, make) for name in names}


# --------------------------------------------------------------------------------------------
# gaussian_noise
# --------------------------------------------------------------------------------------------
def _noise_public(backend, d, shape, dtype, device):
    from ... import ops
    seed, offset = d["seed"], d["offset"]
    return lambda: ops.gaussian_noise(shape, seed, offset, device=device, dtype=dtype, backend=backend)


def _noise_compiled(d, shape, dtype, device):
    ref = _reference_module()
    seed, offset = d["seed"].reshape(1), d["offset"].reshape(1)
    return _compiled(torch.compile(lambda s, o: ref.gaussian_noise(shape, s, o, dtype), dynamic=False),
                     (seed, offset))


def _noise_randn(d, shape, dtype, device):
    return lambda: torch.randn(shape, device=device, dtype=dtype)


GAUSSIAN_NOISE = OpSpec(
    name="gaussian_noise",
    description="docs/noise.md noise of the sample's shape",
    traffic=Traffic(0, 1, "write the noise"),
    providers={**_with_library(_noise_public), "reference+compile": _noise_compiled, "torch.randn": _noise_randn},
    inputs=sample_inputs,
)


# --------------------------------------------------------------------------------------------
# q_sample
# --------------------------------------------------------------------------------------------
def _q_public(backend, d, shape, dtype, device):
    from ... import ops
    sched = _schedule()
    x0, t_rows, seed, offset = d["x0"], d["t_rows"], d["seed"], d["offset"]
    return lambda: ops.q_sample(x0, t_rows, sched, seed=seed, offset=offset, backend=backend)


def _q_compiled(d, shape, dtype, device):
    ref = _reference_module()
    table = _schedule().table(device)
    seed, offset = d["seed"].reshape(1), d["offset"].reshape(1)
    fn = torch.compile(lambda x, t: ref.q_sample(x, t, table, None, seed, offset), dynamic=False)
    return _compiled(fn, (d["x0"], d["t_rows"]))


def _q_diffusers(d, shape, dtype, device):
    sched = _diffusers().DDPMScheduler()
    x0, t_rows = d["x0"], d["t_rows"]
    return lambda: sched.add_noise(x0, torch.randn_like(x0), t_rows)


Q_SAMPLE = OpSpec(
    name="q_sample",
    description="x_t = sqrt(abar_t) x0 + sqrt(1-abar_t) eps, per-sample t, noise from (seed, offset)",
    traffic=Traffic(1, 1, "read x0; write x_t (noise made in registers)"),
    providers={**_with_library(_q_public), "reference+compile": _q_compiled, "randn_like+add_noise": _q_diffusers},
    inputs=sample_inputs,
)


# --------------------------------------------------------------------------------------------
# the steps
# --------------------------------------------------------------------------------------------
# the public defaults (StepOptions()), as the backend functions take them
_DDPM_OPTS = dict(prediction_type="epsilon", variance_type="fixed_small", opts=StepOptions(), out=None)
_DDIM_OPTS = dict(eta=0.0, prediction_type="epsilon", use_clipped_model_output=False, final_alpha_cumprod=1.0,
                  opts=StepOptions(), out=None)


def _ddpm_public(backend, d, shape, dtype, device):
    from ... import ops
    sched = _schedule()
    mo, x_t, seed, offset = d["model_output"], d["x_t"], d["seed"], d["offset"]
    t = torch.full((shape[0],), DDPM_T, dtype=torch.int64, device=device)
    return lambda: ops.ddpm_step(mo, t, x_t, sched, seed=seed, offset=offset, backend=backend)


def _ddpm_compiled(d, shape, dtype, device):
    ref = _reference_module()
    table = _schedule().table(device)
    seed, offset = d["seed"].reshape(1), d["offset"].reshape(1)
    t = torch.full((shape[0],), DDPM_T, dtype=torch.int64, device=device)
    fn = torch.compile(lambda m, tt, x: ref.ddpm_step(m, tt, tt - 1, x, table, None, seed, offset, **_DDPM_OPTS)[0],
                       dynamic=False)
    return _compiled(fn, (d["model_output"], t, d["x_t"]))


def _ddpm_diffusers(d, shape, dtype, device):
    sched = _diffusers().DDPMScheduler()
    mo, x_t = d["model_output"], d["x_t"]
    return lambda: sched.step(mo, DDPM_T, x_t).prev_sample


DDPM_STEP = OpSpec(
    name="ddpm_step",
    description="DDPM step t=500 -> 499, epsilon, fixed_small, clip_sample, noise from (seed, offset)",
    traffic=Traffic(2, 1, "read model_output, x_t; write x_prev"),
    providers={**_with_library(_ddpm_public), "reference+compile": _ddpm_compiled,
               "diffusers DDPM.step": _ddpm_diffusers},
    inputs=sample_inputs,
)


def _ddim_public(backend, d, shape, dtype, device):
    from ... import ops
    sched = _schedule()
    mo, x_t = d["model_output"], d["x_t"]
    tv, pv = _ddim_timesteps()
    t = torch.full((shape[0],), tv, dtype=torch.int64, device=device)
    pt = torch.full((shape[0],), pv, dtype=torch.int64, device=device)
    return lambda: ops.ddim_step(mo, t, x_t, sched, prev_t=pt, backend=backend)


def _ddim_compiled(d, shape, dtype, device):
    ref = _reference_module()
    table = _schedule().table(device)
    tv, pv = _ddim_timesteps()
    t = torch.full((shape[0],), tv, dtype=torch.int64, device=device)
    pt = torch.full((shape[0],), pv, dtype=torch.int64, device=device)
    fn = torch.compile(lambda m, tt, ptt, x: ref.ddim_step(m, tt, ptt, x, table, None, None, None,
                                                           **_DDIM_OPTS)[0], dynamic=False)
    return _compiled(fn, (d["model_output"], t, pt, d["x_t"]))


def _ddim_diffusers(d, shape, dtype, device):
    sched = _diffusers().DDIMScheduler()
    sched.set_timesteps(DDIM_STEPS)
    tv = int(sched.timesteps[DDIM_INDEX])
    if (tv, tv - 1000 // DDIM_STEPS) != _ddim_timesteps():
        raise ProviderSkip(f"diffusers' DDIM timesteps changed ({tv}): not the step the library runs")
    mo, x_t = d["model_output"], d["x_t"]
    return lambda: sched.step(mo, tv, x_t, eta=0.0).prev_sample


DDIM_STEP = OpSpec(
    name="ddim_step",
    description="DDIM step t=480 -> 460, eta=0, epsilon, clip_sample",
    traffic=Traffic(2, 1, "read model_output, x_t; write x_prev"),
    providers={**_with_library(_ddim_public), "reference+compile": _ddim_compiled,
               "diffusers DDIM.step": _ddim_diffusers},
    inputs=sample_inputs,
)


# --------------------------------------------------------------------------------------------
# the training side: q_sample + loss forward + backward
# --------------------------------------------------------------------------------------------
def _train_public(backend, d, shape, dtype, device, *, noise_once: bool = False):
    from ... import ops
    sched = _schedule()
    x0, t_rows, seed, offset = d["x0"], d["t_rows"], d["seed"], d["offset"]
    mo = d["model_output"].detach().clone().requires_grad_(True)

    def train():
        if noise_once:  # the step's noise drawn once, both ops read it (training_loss on a CPU)
            noise = ops.gaussian_noise(x0.shape, seed, offset, device=device, backend=backend)
            kw = {"noise": noise}
        else:
            kw = {"seed": seed, "offset": offset}
        with nvtx_range("train: q_sample"):
            xt = ops.q_sample(x0, t_rows, sched, backend=backend, **kw)
        with nvtx_range("train: loss fwd"):
            loss = ops.diffusion_loss(mo, x0, t_rows, sched, backend=backend, **kw)
        with nvtx_range("train: loss bwd"):
            loss.backward()
        mo.grad = None
        return xt
    return train


def _train_noise_once(d, shape, dtype, device):
    _library_backend("native", device, dtype)
    if device.type != "cpu":
        raise ProviderSkip("the noise-once path is the CPU policy (on a GPU regenerating the noise is free)")
    return _train_public("native", d, shape, dtype, device, noise_once=True)


def _train_compiled(d, shape, dtype, device):
    ref = _reference_module()
    table = _schedule().table(device)
    seed, offset = d["seed"].reshape(1), d["offset"].reshape(1)
    mo = d["model_output"].detach().clone().requires_grad_(True)
    x0, t_rows = d["x0"], d["t_rows"]

    def fwd(m, x, t):
        xt = ref.q_sample(x, t, table, None, seed, offset)
        loss = ref.diffusion_loss(m, x, t, table, None, seed, offset, target="epsilon", snr_gamma=None)
        return xt, loss.mean()
    compiled = torch.compile(fwd, dynamic=False)

    def train():
        with nvtx_range("train: q_sample + loss fwd (compiled)"):
            xt, loss = compiled(mo, x0, t_rows)
        with nvtx_range("train: loss bwd"):
            loss.backward()
        mo.grad = None
        return xt
    return _compiled(train, ())


def _train_eager(d, shape, dtype, device):
    import torch.nn.functional as F
    sched = _diffusers().DDPMScheduler()
    x0, t_rows = d["x0"], d["t_rows"]
    mo = d["model_output"].detach().clone().requires_grad_(True)

    def train():
        with nvtx_range("train: q_sample"):
            noise = torch.randn_like(x0)
            xt = sched.add_noise(x0, noise, t_rows)
        with nvtx_range("train: loss fwd"):
            loss = F.mse_loss(mo.float(), noise.float(), reduction="mean")
        with nvtx_range("train: loss bwd"):
            loss.backward()
        mo.grad = None
        return xt
    return train


TRAIN = OpSpec(
    name="train",
    description="q_sample + simple epsilon loss forward + backward, per-sample t",
    traffic=Traffic(5, 2, "q_sample: read x0, write x_t; loss fwd: read model_output, x0; "
                          "loss bwd: read model_output, x0, write grad (noise regenerated, never stored)"),
    providers={**_with_library(_train_public), "native, noise once": _train_noise_once,
               "reference+compile": _train_compiled, "randn+add_noise+mse+bwd": _train_eager},
    inputs=sample_inputs,
    kinds={"native, noise once": "library"},
)


# --------------------------------------------------------------------------------------------
# training_loss on the demo's 2-D toy: the library's whole training step around a model
# --------------------------------------------------------------------------------------------
class _StandIn(torch.nn.Module):
    """The stand-in model of the training_loss benchmark: one Linear over the last dimension
    (``t`` unused), so the figure is the training-side work around the model, which the library
    provides; the demo's MLP would add the same cost to both sides."""

    def __init__(self, width: int, device, dtype):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.lin = torch.nn.Linear(width, width).to(device, dtype)
        with torch.no_grad():
            self.lin.weight.copy_(0.1 * torch.randn(width, width, generator=g))

    def forward(self, x, t):
        return self.lin(x)


def toy_inputs(shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    return {"x0": torch.randn(shape, generator=g).clamp_(-1, 1).to(device, dtype)}


def _tl_public(backend, d, shape, dtype, device):
    from ...training import training_loss
    sched = _toy_scheduler()
    model = _StandIn(shape[-1], device, dtype)
    x0 = d["x0"]
    step = [0]

    def run():
        step[0] += 1
        loss = training_loss(model, x0, sched, seed=SEED, offset=step[0], backend=backend)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss
    return run


def _tl_plain(d, shape, dtype, device):
    """What people write: randint, randn_like, the schedule's fp32 tables indexed, mse, backward."""
    import torch.nn.functional as F
    abar = torch.as_tensor(_toy_scheduler().schedule.alphas_cumprod, dtype=torch.float32, device=device)
    sqrt_abar, sqrt_1m = abar.sqrt(), (1 - abar).sqrt()
    model = _StandIn(shape[-1], device, dtype)
    x0 = d["x0"]
    B = shape[0]
    view = (B,) + (1,) * (len(shape) - 1)

    def run():
        t = torch.randint(0, TOY_T, (B,), device=device)
        noise = torch.randn_like(x0)
        x_t = sqrt_abar[t].view(view) * x0 + sqrt_1m[t].view(view) * noise
        loss = F.mse_loss(model(x_t, t), noise)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss
    return run


TRAINING_LOSS = OpSpec(
    name="training_loss",
    description="training_loss + backward on the demo's 2-D toy (T=100 cosine; a Linear stand-in model)",
    traffic=Traffic(5, 2, "as train (the stand-in model's traffic not counted)"),
    providers={**_with_library(_tl_public), "plain torch loop": _tl_plain},
    inputs=toy_inputs,
    shapes=TOY_SHAPES,
    quick_shapes=TOY_SHAPES,
)


# --------------------------------------------------------------------------------------------
# vlb_loss
# --------------------------------------------------------------------------------------------
def _vlb_public(backend, d, shape, dtype, device):
    from ... import ops
    sched = _schedule()
    mo, x0, x_t, t_rows = d["model_output"], d["x0"], d["x_t"], d["t_rows"]
    return lambda: ops.vlb_loss(mo, x0, x_t, t_rows, sched, backend=backend)


def _vlb_compiled(d, shape, dtype, device):
    ref = _reference_module()
    table = _schedule().table(device)
    fn = torch.compile(lambda m, x, xt, t: ref.vlb_loss(m, x, xt, t, table, prediction_type="epsilon",
                                                        variance_type="learned_range"), dynamic=False)
    return _compiled(fn, (d["model_output"], d["x0"], d["x_t"], d["t_rows"]))


VLB_LOSS = OpSpec(
    name="vlb_loss",
    description="VLB term in bits/dim, learned_range, per-sample t, forward only",
    traffic=Traffic(4, 0, "read model_output (2C channels), x0, x_t; write B losses"),
    providers={**_with_library(_vlb_public), "reference+compile": _vlb_compiled},
    inputs=lambda shape, dtype, device: sample_inputs(shape, dtype, device, model_channels=2),
)


SPECS: Dict[str, OpSpec] = {s.name: s for s in (GAUSSIAN_NOISE, Q_SAMPLE, DDPM_STEP, DDIM_STEP, TRAIN, TRAINING_LOSS,
                                                VLB_LOSS)}
OPS: Tuple[str, ...] = tuple(SPECS)
TRAFFIC: Dict[str, Traffic] = {name: s.traffic for name, s in SPECS.items()}
COPY_TRAFFIC = Traffic(1, 1, "dst.copy_(src): read src, write dst")
PROVIDERS: Dict[str, Tuple[str, ...]] = {name: tuple(s.providers) for name, s in SPECS.items()}
OP_DESCRIPTIONS = {name: s.description for name, s in SPECS.items()}
ALL_PROVIDERS = tuple(dict.fromkeys(p for ps in PROVIDERS.values() for p in ps))


def op_bytes(op: str, shape: Sequence[int], dtype: torch.dtype) -> int:
    """Bytes a single fused pass of ``op`` must move for a sample of ``shape``/``dtype``."""
    tr = COPY_TRAFFIC if op == "copy" else TRAFFIC[op]
    return (tr.reads + tr.writes) * math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def shapes_for(op: str, shapes: Sequence[Tuple[int, ...]], *, quick: bool = False,
               explicit: bool = False) -> Sequence[Tuple[int, ...]]:
    """The shapes ``op`` runs at: the asked-for ones when given explicitly (``--shapes``), else the
    op's own (training_loss: the demo's 2-D batch) or the bench's."""
    spec = SPECS[op]
    own = spec.quick_shapes if quick else spec.shapes
    return list(shapes) if explicit or own is None else list(own)


_INPUT_CACHE: Dict[tuple, dict] = {}


def inputs_for(op: str, shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device) -> dict:
    """The inputs of one (op, shape, dtype), shared by its providers (the last set is cached:
    every provider of a case sees the same tensors, and 16M-element inputs are made once)."""
    key = (op, tuple(shape), dtype, str(device))
    if key not in _INPUT_CACHE:
        _INPUT_CACHE.clear()
        _INPUT_CACHE[key] = SPECS[op].inputs(tuple(shape), dtype, device)
    return dict(_INPUT_CACHE[key])


def make_runner(op: str, provider: str, shape: Sequence[int], dtype: torch.dtype,
                device="cpu", *, sync: bool = False) -> Runner:
    """A zero-argument callable running ``op`` once with ``provider`` on prepared inputs of
    ``shape``/``dtype``. Raises :class:`ProviderSkip` (with the reason) when the provider cannot
    run here. ``sync=True`` adds a CUDA synchronize after each call (for timers that do not)."""
    if op not in SPECS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    spec = SPECS[op]
    if provider not in spec.providers:
        raise ValueError(f"provider must be one of {tuple(spec.providers)} for {op}, got {provider!r}")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ProviderSkip("CUDA is not available to this torch")
    shape = tuple(int(s) for s in shape)
    run = spec.providers[provider](inputs_for(op, shape, dtype, device), shape, dtype, device)
    if sync and device.type == "cuda":
        inner = run

        def run():
            out = inner()
            torch.cuda.synchronize()
            return out
    return run
