"""Property-based tests (hypothesis): the native backend against the reference over generated
inputs, and the classification of bad inputs.

Generated: shapes of 1 to 5 dimensions with odd sizes and, now and then, a zero-size dimension;
dtypes fp32, fp16, bf16, fp64 (and a model output of another dtype than the sample); layouts
(contiguous, transposed, every other element, channels_last, a stride-0 expanded dimension, a
storage offset); every option of every op; ``t`` as an int, a 0-d tensor or a ``(B,)`` tensor;
seeds and offsets near 0, 2^32 and 2^63 (ints, 0-d and per-row tensors) or an explicit noise
tensor; ``out=`` absent, fresh, strided or ``x_t`` itself; NaN and +-inf placed in the inputs.
Tolerances are tests/test_native.py's (one table by the sample's dtype; losses by the compute
dtype), unchanged. The worst error per op and dtype, in absolute terms and in units of that
tolerance, is printed at the end of the module.

The profile is fixed (``derandomize=True``, no example database, bounded ``max_examples``), so a
CI run is reproducible and stays within its time budget. The registered ops' fuzzing over
arbitrary int64 timesteps runs in a subprocess (before the table-bounds rule such inputs
segfaulted).
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is not installed (pip install hypothesis)")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

import ddpm_fast  # noqa: E402
from ddpm_fast import NoiseSchedule  # noqa: E402

_INFO = ddpm_fast.backends()["native"]
pytestmark = pytest.mark.skipif(not _INFO["available"]["cpu"],
                                reason=f"native backend unavailable on cpu: {_INFO['reason']}")

settings.register_profile(
    "ddpm_fast_properties", derandomize=True, database=None, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
PROFILE = settings.get_profile("ddpm_fast_properties")


def examples(n):
    return settings(PROFILE, max_examples=n)


# Hypothesis (6.131 on) now and then draws, instead of a random value, a literal found in any local
# module loaded in the process: every test file pytest collected, every library module imported so
# far. ``derandomize`` does not cover that pool, so the examples changed with the test files on the
# command line (tests/test_api.py and tests/test_reliability.py collected first gave
# test_ddpm_step_parity other examples than a run of this file alone) and with any literal edited
# anywhere. These tests draw from Hypothesis's built-in constants only: the same examples in every
# process. (A private hook; test_examples_do_not_depend_on_the_modules_loaded fails if it goes.)
try:
    from hypothesis.internal.conjecture import providers as _hypothesis_providers
except ImportError:  # pragma: no cover  (a Hypothesis without that module has no such pool)
    _hypothesis_providers = None


@pytest.fixture(scope="module", autouse=True)
def _no_local_constants():
    get = getattr(_hypothesis_providers, "_get_local_constants", None)
    cache = getattr(getattr(_hypothesis_providers, "CONSTANTS_CACHE", None), "cache", None)
    if get is None or cache is None or not hasattr(_hypothesis_providers, "Constants"):
        yield  # a Hypothesis without the pool (before 6.131): nothing to pin
        return
    empty = _hypothesis_providers.Constants()
    _hypothesis_providers._get_local_constants = lambda: empty
    cache.clear()  # per-range choices cached from the pool of earlier tests
    try:
        yield
    finally:
        _hypothesis_providers._get_local_constants = get
        cache.clear()


# tests/test_native.py's table: dtype -> (rtol, atol)
TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2.0 ** -10, 1e-5),
    torch.bfloat16: (2.0 ** -7, 1e-5),
    torch.float64: (1e-9, 1e-5),
}
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
SCHEDULES = {
    "linear": NoiseSchedule.from_name("linear", 1000),
    "cosine": NoiseSchedule.from_name("squaredcos_cap_v2", 1000),
    "zero_snr": NoiseSchedule.from_name("linear", 1000, rescale_zero_snr=True),
    "short": NoiseSchedule.from_name("scaled_linear", 10),
    "respaced": NoiseSchedule.from_name("squaredcos_cap_v2", 1000).respace(ddpm_fast.space_timesteps(1000, "25")),
}
PREDICTIONS = ("epsilon", "sample", "v_prediction")
VARIANCES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")
SIZES = (1, 2, 3, 4, 5, 7, 8, 13)
SEEDS = (0, 1, 7, 2 ** 32 - 1, 2 ** 32, 2 ** 62 + 3, 2 ** 63 - 2 ** 32, 2 ** 63 - 1)
LAYOUTS = ("contiguous", "transposed", "step2", "channels_last", "stride0", "offset")

WORST = {}    # (op, dtype) -> [cases, worst |diff|, worst in tolerance units]


def _record(op, dtype, got, want, rtol, atol):
    g, w = got.detach().double(), want.detach().double()
    finite = torch.isfinite(g) & torch.isfinite(w)
    diff = (g - w).abs().where(finite, torch.zeros_like(g))
    units = diff / (atol + rtol * w.abs())
    key = (op, str(dtype).replace("torch.", ""))
    entry = WORST.setdefault(key, [0, 0.0, 0.0])
    entry[0] += 1
    if diff.numel():
        entry[1] = max(entry[1], float(diff.max()))
        entry[2] = max(entry[2], float(units.max()))


def close(op, got, want, dtype):
    """tests/test_native.py's comparison: same dtype and shape, |got - want| <= atol + rtol |want|,
    NaN where the other is NaN, infinities equal."""
    rtol, atol = TOL[dtype]
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, want.dtype, got.shape, want.shape)
    _record(op, dtype, got, want, rtol, atol)
    torch.testing.assert_close(got.double(), want.double(), rtol=rtol, atol=atol, equal_nan=True)


class _Report:
    """Prints WORST in pytest's terminal summary (registered as a plugin by the fixture below)."""

    def pytest_terminal_summary(self, terminalreporter):
        if not WORST:
            return
        terminalreporter.write_line("native vs reference (property tests): cases, worst |diff|, worst in tolerance "
                                    "units, per op and dtype")
        for (op, dt), (n, a, u) in sorted(WORST.items()):
            terminalreporter.write_line(f"  {op:24s} {dt:9s} {n:5d} cases  abs {a:.3g}  units {u:.3g}")
        path = os.environ.get("DDPM_FAST_PROPERTY_REPORT")
        if path:
            with open(path, "w") as f:
                json.dump({f"{op} {dt}": v for (op, dt), v in WORST.items()}, f, indent=1)


@pytest.fixture(scope="module", autouse=True)
def _report(request):
    if not request.config.pluginmanager.has_plugin("ddpm_fast_property_report"):
        request.config.pluginmanager.register(_Report(), "ddpm_fast_property_report")
    yield


# --------------------------------------------------------------------------------------------
# strategies
# --------------------------------------------------------------------------------------------
@st.composite
def shapes(draw, min_dims=1, max_dims=5, max_numel=400):
    nd = draw(st.integers(min_dims, max_dims))
    dims = [draw(st.sampled_from(SIZES)) for _ in range(nd)]
    while math.prod(dims) > max_numel:
        k = dims.index(max(dims))
        dims[k] = max(1, dims[k] // 2)
    if draw(st.integers(0, 11)) == 0:          # now and then a zero-size dimension
        dims[draw(st.integers(0, nd - 1))] = 0
    return tuple(dims)


def layout(x: torch.Tensor, how: str) -> torch.Tensor:
    """x (or a tensor derived from it) in the given memory layout; both backends get this very tensor."""
    if how == "transposed" and x.dim() >= 2:
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    if how == "step2":
        buf = torch.zeros(x.shape[:-1] + (2 * x.shape[-1],), dtype=x.dtype)
        buf[..., ::2] = x
        return buf[..., ::2]
    if how == "channels_last" and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    if how == "stride0" and x.dim() >= 2 and x.shape[-1] > 0:
        return x[..., :1].expand(x.shape)       # stride 0 along the last dimension (an input only)
    if how == "offset":
        buf = torch.zeros(x.numel() + 3, dtype=x.dtype)
        view = buf[3:].view(x.shape)
        view.copy_(x)
        return view
    return x


@st.composite
def tensors(draw, shape, dtype, scale=None, specials=True):
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))
    scale = scale if scale is not None else draw(st.sampled_from((1.0, 3.0)))
    x = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    if specials and x.numel() and draw(st.integers(0, 6)) == 0:   # NaN / inf somewhere
        flat = x.view(-1)
        for _ in range(draw(st.integers(1, 2))):
            flat[draw(st.integers(0, x.numel() - 1))] = draw(st.sampled_from((math.nan, math.inf, -math.inf)))
    return layout(x.to(dtype), draw(st.sampled_from(LAYOUTS)))


@st.composite
def timesteps(draw, B, T, low=0, high=None):
    """t as an int, a 0-d tensor or a (B,) tensor, values in [low, high]."""
    high = T - 1 if high is None else high
    form = draw(st.sampled_from(("int", "0d", "rows")))
    if form == "int":
        return draw(st.integers(low, high))
    if form == "0d":
        return torch.tensor(draw(st.integers(low, high)))
    return torch.tensor([draw(st.integers(low, high)) for _ in range(B)], dtype=torch.int64)


def _values(t, B):
    if isinstance(t, int):
        return [t] * B
    return [int(t)] * B if t.dim() == 0 else t.tolist()


@st.composite
def noise_source(draw, shape):
    """kwargs giving the noise: seed (int, 0-d or per-row tensor) and offset, or an explicit tensor."""
    kind = draw(st.sampled_from(("int", "0d", "rows", "rows", "noise")))
    offset = draw(st.sampled_from(SEEDS))
    offset = torch.tensor(offset) if draw(st.booleans()) else offset
    if kind == "noise":
        return dict(noise=draw(tensors(shape, draw(st.sampled_from(DTYPES)), scale=1.0, specials=False)))
    if kind == "int":
        return dict(seed=draw(st.sampled_from(SEEDS)), offset=offset)
    if kind == "0d":
        return dict(seed=torch.tensor(draw(st.sampled_from(SEEDS))), offset=offset)
    return dict(seed=torch.tensor([draw(st.sampled_from(SEEDS)) for _ in range(shape[0])], dtype=torch.int64),
                offset=offset)


@st.composite
def clip_options(draw):
    kind = draw(st.sampled_from(("none", "clip", "threshold")))
    if kind == "none":
        return dict(clip_sample=False)
    if kind == "clip":
        return dict(clip_sample=True, clip_sample_range=draw(st.sampled_from((0.5, 1.0, 2.5))))
    return dict(thresholding=True, dynamic_thresholding_ratio=draw(st.sampled_from((0.0, 0.5, 0.9, 0.995, 1.0))),
                sample_max_value=draw(st.sampled_from((0.5, 1.0, 2.5, 10.0))))


def _call_both(fn, out_kind, x_t, **kw):
    """fn on native and reference; with out_kind "x_t" each backend updates its own copy in place.

    A seeded step gives the reference the native backend's own noise for that (seed, offset): the
    step's math is compared exactly, the noise apart (test_gaussian_noise_parity). docs/noise.md
    lets fp32 kernels make the noise within 1e-5 of the float64 specification (measured 1.9e-6),
    and a step scales that by its sigma: a learned log-variance of 9 (sigma = 90) made a float64
    step differ from the seeded reference by 1.7e-5, within the noise contract but beyond the
    step's own 1e-5. (Native's seeded step using exactly its gaussian_noise is part of the check.)"""
    results = []
    for backend in ("native", "reference"):
        extra = {}
        if backend == "reference" and kw.get("seed") is not None:
            kw = dict(kw)
            seed, offset = kw.pop("seed"), kw.pop("offset", 0)
            noise_dtype = torch.float64 if x_t.dtype == torch.float64 else torch.float32  # the compute dtype
            kw["noise"] = ddpm_fast.gaussian_noise(tuple(x_t.shape), seed, offset, dtype=noise_dtype, backend="native")
        x = x_t
        if out_kind == "x_t":
            x = x_t.clone()
            extra["out"] = x
        elif out_kind == "fresh":
            extra["out"] = torch.empty_like(x_t, memory_format=torch.contiguous_format)
        elif out_kind == "strided":
            extra["out"] = torch.empty(x_t.shape[::-1], dtype=x_t.dtype).permute(*range(x_t.dim() - 1, -1, -1))
        res = fn(x, backend=backend, **kw, **extra)
        if "out" in extra:
            x_prev = res[0] if isinstance(res, tuple) else res
            assert x_prev is extra["out"]
        results.append(res)
    return results


def test_examples_do_not_depend_on_the_modules_loaded(tmp_path):
    """The same examples before and after a new local module full of literals is imported (what
    collecting other test files did): Hypothesis's pool of local constants is pinned."""
    seen = []

    @settings(PROFILE, max_examples=80)
    @given(st.lists(st.integers(0, 2 ** 31 - 1), min_size=4, max_size=4), st.integers(-60, 999))
    def draw(xs, t):
        seen.append((tuple(xs), t))

    draw()
    before = list(seen)
    name = "ddpm_fast_literals_probe"
    (tmp_path / f"{name}.py").write_text("LITERALS = (" + ", ".join(map(str, range(101, 5000, 7))) + ")\n")
    sys.path.insert(0, str(tmp_path))
    try:
        __import__(name)
        seen.clear()
        draw()
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop(name, None)
    assert len(before) == 80 and seen == before


# --------------------------------------------------------------------------------------------
# parity
# --------------------------------------------------------------------------------------------
@examples(120)
@given(data=st.data())
def test_q_sample_parity(data):
    shape = data.draw(shapes())
    dtype = data.draw(st.sampled_from(DTYPES))
    sched = SCHEDULES[data.draw(st.sampled_from(tuple(SCHEDULES)))]
    x0 = data.draw(tensors(shape, dtype))
    t = data.draw(timesteps(shape[0], sched.num_timesteps))
    kw = data.draw(noise_source(shape))
    got, want = [ddpm_fast.q_sample(x0, t, sched, backend=b, **kw) for b in ("native", "reference")]
    close("q_sample", got, want, dtype)


@examples(50)
@given(data=st.data())
def test_gaussian_noise_parity(data):
    shape = data.draw(shapes())
    dtype = data.draw(st.sampled_from(DTYPES))
    kw = data.draw(noise_source(shape).filter(lambda k: "seed" in k))
    got, want = [ddpm_fast.gaussian_noise(shape, kw["seed"], kw["offset"], dtype=dtype, backend=b)
                 for b in ("native", "reference")]
    close("gaussian_noise", got, want, dtype)


def _model_output(data, shape, dtype, learned=False, guidance=False):
    mo_shape = list(shape)
    if learned:
        mo_shape[1] *= 2
    if guidance:
        mo_shape[0] *= 2
    mo_dtype = dtype if data.draw(st.integers(0, 3)) else data.draw(st.sampled_from(DTYPES))
    return data.draw(tensors(tuple(mo_shape), mo_dtype))


@examples(150)
@given(data=st.data())
def test_ddpm_step_parity(data):
    variance = data.draw(st.sampled_from(VARIANCES))
    learned = variance in ("learned", "learned_range")
    shape = data.draw(shapes(min_dims=2 if learned else 1))
    dtype = data.draw(st.sampled_from(DTYPES))
    sched = SCHEDULES[data.draw(st.sampled_from(tuple(SCHEDULES)))]
    T, B = sched.num_timesteps, shape[0]
    guidance = data.draw(st.booleans())
    mo = _model_output(data, shape, dtype, learned, guidance)
    x_t = data.draw(tensors(shape, dtype))
    t = data.draw(timesteps(B, T))
    tv = _values(t, B)
    prev_kind = data.draw(st.sampled_from(("none", "rows", "final")))
    kw = dict(prediction_type=data.draw(st.sampled_from(PREDICTIONS)), variance_type=variance,
              guidance_scale=data.draw(st.sampled_from((1.0, 4.5))) if guidance else None, return_x0=True,
              **data.draw(clip_options()))
    if prev_kind == "rows":
        kw["prev_t"] = torch.tensor([data.draw(st.integers(-60, v - 1)) if v > 0 else -1 for v in tv],
                                    dtype=torch.int64)
    elif prev_kind == "final":
        kw["prev_t"] = -1
    if any(v > 0 for v in tv):
        kw.update(data.draw(noise_source(shape)))
    elif data.draw(st.booleans()):
        kw.update(data.draw(noise_source(shape)))
    out_kind = data.draw(st.sampled_from(("none", "none", "fresh", "strided", "x_t")))
    (gp, gx), (wp, wx) = _call_both(lambda x, **k: ddpm_fast.ddpm_step(mo, t, x, sched, **k), out_kind, x_t, **kw)
    close("ddpm_step", gp, wp, dtype)
    close("ddpm_step x0_hat", gx, wx, dtype)


@examples(120)
@given(data=st.data())
def test_ddim_step_parity(data):
    shape = data.draw(shapes())
    dtype = data.draw(st.sampled_from(DTYPES))
    sched = SCHEDULES[data.draw(st.sampled_from(tuple(SCHEDULES)))]
    T, B = sched.num_timesteps, shape[0]
    guidance = data.draw(st.booleans())
    mo = _model_output(data, shape, dtype, False, guidance)
    x_t = data.draw(tensors(shape, dtype))
    t = data.draw(timesteps(B, T))
    tv = _values(t, B)
    if data.draw(st.booleans()):
        prev = torch.tensor([data.draw(st.integers(-60, v - 1)) if v > 0 else -1 for v in tv], dtype=torch.int64)
    else:
        prev = min(tv) - 1 if tv else -1
    eta = data.draw(st.sampled_from((0.0, 0.3, 1.0)))
    kw = dict(prev_t=prev, eta=eta, prediction_type=data.draw(st.sampled_from(PREDICTIONS)),
              use_clipped_model_output=data.draw(st.booleans()),
              final_alpha_cumprod=data.draw(st.sampled_from((1.0, 0.9999, 0.5, 0.0))),
              guidance_scale=data.draw(st.sampled_from((1.0, 4.5))) if guidance else None, return_x0=True,
              **data.draw(clip_options()))
    if eta > 0:
        kw.update(data.draw(noise_source(shape)))
    out_kind = data.draw(st.sampled_from(("none", "none", "fresh", "strided", "x_t")))
    (gp, gx), (wp, wx) = _call_both(lambda x, **k: ddpm_fast.ddim_step(mo, t, x, sched, **k), out_kind, x_t, **kw)
    close("ddim_step", gp, wp, dtype)
    close("ddim_step x0_hat", gx, wx, dtype)


@examples(80)
@given(data=st.data())
def test_ddim_reverse_step_parity(data):
    shape = data.draw(shapes())
    dtype = data.draw(st.sampled_from(DTYPES))
    sched = SCHEDULES[data.draw(st.sampled_from(tuple(SCHEDULES)))]
    T, B = sched.num_timesteps, shape[0]
    mo = _model_output(data, shape, dtype)
    x_t = data.draw(tensors(shape, dtype))
    t = data.draw(timesteps(B, T, high=T - 2))
    tv = _values(t, B)
    if data.draw(st.booleans()):
        nxt = torch.tensor([data.draw(st.integers(v + 1, T - 1)) for v in tv], dtype=torch.int64)
    else:
        nxt = max(tv) + 1 if tv else T - 1
    kw = dict(next_t=nxt, prediction_type=data.draw(st.sampled_from(PREDICTIONS)),
              use_clipped_model_output=data.draw(st.booleans()), return_x0=True, **data.draw(clip_options()))
    out_kind = data.draw(st.sampled_from(("none", "fresh", "x_t")))
    (gp, gx), (wp, wx) = _call_both(lambda x, **k: ddpm_fast.ddim_reverse_step(mo, t, x, sched, **k), out_kind,
                                    x_t, **kw)
    close("ddim_reverse_step", gp, wp, dtype)
    close("ddim_reverse_step x0_hat", gx, wx, dtype)


def _loss_dtype(*xs):
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


@examples(120)
@given(data=st.data())
def test_diffusion_loss_parity_and_gradients(data):
    shape = data.draw(shapes())
    dtype = data.draw(st.sampled_from(DTYPES))
    sched = SCHEDULES[data.draw(st.sampled_from(tuple(SCHEDULES)))]
    x0 = data.draw(tensors(shape, dtype))
    mo = _model_output(data, shape, dtype)
    t = data.draw(timesteps(shape[0], sched.num_timesteps))
    target = data.draw(st.sampled_from(PREDICTIONS))
    kw = dict(target=target, snr_gamma=data.draw(st.sampled_from((None, 1.0, 5.0))), reduction="none")
    if target != "sample" or data.draw(st.booleans()):
        kw.update(data.draw(noise_source(shape)))
    grad = data.draw(st.booleans())
    res = {}
    for b in ("native", "reference"):
        m = mo.detach().clone().requires_grad_(grad)
        x = x0.detach().clone().requires_grad_(grad)
        loss = ddpm_fast.diffusion_loss(m, x, t, sched, backend=b, **kw)
        if grad:
            w = torch.linspace(-1.0, 2.0, loss.numel(), dtype=loss.dtype)
            (loss * w).nansum().backward()
        res[b] = (loss, m.grad, x.grad)
    close("diffusion_loss", res["native"][0], res["reference"][0], _loss_dtype(mo, x0))
    if grad:
        close("diffusion_loss grad mo", res["native"][1], res["reference"][1], mo.dtype)
        if target == "epsilon":
            assert res["native"][2] is None and res["reference"][2] is None
        else:
            close("diffusion_loss grad x0", res["native"][2], res["reference"][2], x0.dtype)


@examples(80)
@given(data=st.data())
def test_vlb_loss_parity(data):
    variance = data.draw(st.sampled_from(VARIANCES))
    learned = variance in ("learned", "learned_range")
    shape = data.draw(shapes(min_dims=2 if learned else 1))
    dtype = data.draw(st.sampled_from(DTYPES))
    sched = SCHEDULES[data.draw(st.sampled_from(("linear", "cosine", "short")))]
    x0 = data.draw(tensors(shape, dtype, scale=0.5)).clamp(-1, 1)
    x_t = data.draw(tensors(shape, dtype))
    mo = _model_output(data, shape, dtype, learned)
    if learned and mo.numel():   # variance channels in their usual range
        C = shape[1]
        v = mo[:, C:].double().clamp(-1, 1) if variance == "learned_range" else mo[:, C:].double().clamp(-8, 2)
        mo = torch.cat([mo[:, :C], v.to(mo.dtype)], 1)
    t = data.draw(timesteps(shape[0], sched.num_timesteps))
    kw = dict(prediction_type=data.draw(st.sampled_from(PREDICTIONS)), variance_type=variance, reduction="none")
    got, want = [ddpm_fast.vlb_loss(mo, x0, x_t, t, sched, backend=b, **kw) for b in ("native", "reference")]
    close("vlb_loss", got, want, _loss_dtype(mo, x0, x_t))


# --------------------------------------------------------------------------------------------
# bad inputs: a clear ValueError / TypeError naming the argument, on both backends
# --------------------------------------------------------------------------------------------
def _valid_call(op):
    """(function, kwargs) of a valid call of op on (2, 3, 4) inputs."""
    S = SCHEDULES["linear"]
    x = torch.randn(2, 3, 4)
    mo2 = torch.randn(2, 6, 4)
    if op == "q_sample":
        return ddpm_fast.q_sample, dict(x0=x, t=5, schedule=S, seed=1, offset=0)
    if op == "ddpm_step":
        return ddpm_fast.ddpm_step, dict(model_output=x, t=5, x_t=x.clone(), schedule=S, seed=1, offset=0)
    if op == "ddim_step":
        return ddpm_fast.ddim_step, dict(model_output=x, t=5, x_t=x.clone(), schedule=S, prev_t=4, eta=0.5, seed=1)
    if op == "ddim_reverse_step":
        return ddpm_fast.ddim_reverse_step, dict(model_output=x, t=5, x_t=x.clone(), schedule=S, next_t=6)
    if op == "diffusion_loss":
        return ddpm_fast.diffusion_loss, dict(model_output=x, x0=x.clone(), t=5, schedule=S, seed=1)
    if op == "vlb_loss":
        return ddpm_fast.vlb_loss, dict(model_output=mo2, x0=x.clamp(-1, 1), x_t=x, t=5, schedule=S)
    return ddpm_fast.gaussian_noise, dict(shape=(2, 3, 4), seed=1, offset=0)


_STEPS = ("ddpm_step", "ddim_step", "ddim_reverse_step")
_TIMESTEP_OPS = ("q_sample", "diffusion_loss", "vlb_loss") + _STEPS
_NOISE_OPS = ("q_sample", "ddpm_step", "ddim_step", "diffusion_loss")
_ALL = _TIMESTEP_OPS + ("gaussian_noise",)

def _shifted_alias(kw):
    """An out sharing x_t's storage, shifted by one element (x_t rebuilt inside that storage)."""
    buf = torch.zeros(kw["x_t"].numel() + 1)
    buf[:-1].copy_(kw["x_t"].reshape(-1))
    kw["x_t"] = buf[:-1].view(kw["x_t"].shape)
    return buf[1:].view(kw["x_t"].shape)



# (name, ops it applies to, argument to change, bad value or a function of the valid kwargs, exception)
BAD_INPUTS = [
    ("t float", _TIMESTEP_OPS, "t", 2.5, TypeError),
    ("t bool", _TIMESTEP_OPS, "t", True, TypeError),
    ("t = T", _TIMESTEP_OPS, "t", 1000, ValueError),
    ("t negative", _TIMESTEP_OPS, "t", -1, ValueError),
    ("t huge", _TIMESTEP_OPS, "t", 10 ** 12, ValueError),
    ("t tensor out of range", _TIMESTEP_OPS, "t", torch.tensor([5, 1000]), ValueError),
    ("t float tensor", _TIMESTEP_OPS, "t", torch.tensor([5.0, 6.0]), TypeError),
    ("t wrong length", _TIMESTEP_OPS, "t", torch.tensor([5, 6, 7]), ValueError),
    ("t 2-D", _TIMESTEP_OPS, "t", torch.tensor([[5, 6]]), ValueError),
    ("prev_t >= t", ("ddpm_step", "ddim_step"), "prev_t", 5, ValueError),
    ("prev_t = T", ("ddpm_step", "ddim_step"), "prev_t", 1000, ValueError),
    ("next_t <= t", ("ddim_reverse_step",), "next_t", 5, ValueError),
    ("next_t = T", ("ddim_reverse_step",), "next_t", 1000, ValueError),
    ("next_t negative", ("ddim_reverse_step",), "next_t", -1, ValueError),
    ("seed negative", _NOISE_OPS + ("gaussian_noise",), "seed", -1, ValueError),
    ("seed 2**63", _NOISE_OPS + ("gaussian_noise",), "seed", 2 ** 63, ValueError),
    ("seed float", _NOISE_OPS + ("gaussian_noise",), "seed", 2.0, TypeError),
    ("seed int32", _NOISE_OPS + ("gaussian_noise",), "seed", torch.tensor(1, dtype=torch.int32), TypeError),
    ("seed wrong length", _NOISE_OPS, "seed", torch.tensor([1, 2, 3]), ValueError),
    ("seed negative tensor", _NOISE_OPS + ("gaussian_noise",), "seed", torch.tensor([1, -2]), ValueError),
    ("offset negative", _NOISE_OPS + ("gaussian_noise",), "offset", -1, ValueError),
    ("offset 2**63", _NOISE_OPS + ("gaussian_noise",), "offset", 2 ** 63, ValueError),
    ("offset str", _NOISE_OPS + ("gaussian_noise",), "offset", "0", TypeError),
    ("offset two values", _NOISE_OPS + ("gaussian_noise",), "offset", torch.tensor([1, 2]), ValueError),
    ("offset negative tensor", _NOISE_OPS + ("gaussian_noise",), "offset", torch.tensor(-3), ValueError),
    ("noise wrong shape", _NOISE_OPS, "noise", torch.randn(2, 3), ValueError),
    ("noise int", _NOISE_OPS, "noise", torch.zeros(2, 3, 4, dtype=torch.int64), TypeError),
    ("model_output int", _STEPS + ("diffusion_loss", "vlb_loss"), "model_output",
     torch.zeros(2, 3, 4, dtype=torch.int32), TypeError),
    ("model_output shape", _STEPS + ("diffusion_loss", "vlb_loss"), "model_output", torch.randn(2, 3, 5), ValueError),
    ("model_output 0-d", _STEPS + ("diffusion_loss",), "model_output", torch.tensor(1.0), ValueError),
    ("x_t int", _STEPS, "x_t", torch.zeros(2, 3, 4, dtype=torch.int64), TypeError),
    ("x0 list", ("q_sample", "diffusion_loss"), "x0", [1.0, 2.0], TypeError),
    ("schedule", _TIMESTEP_OPS, "schedule", "linear", TypeError),
    ("prediction_type", _STEPS + ("vlb_loss",), "prediction_type", "eps", ValueError),
    ("variance_type", ("ddpm_step", "vlb_loss"), "variance_type", "fixed", ValueError),
    ("clip_sample int", _STEPS, "clip_sample", 1, TypeError),
    ("clip_sample_range negative", _STEPS, "clip_sample_range", -1.0, ValueError),
    ("clip_sample_range nan", _STEPS, "clip_sample_range", math.nan, ValueError),
    ("dynamic_thresholding_ratio", _STEPS, "dynamic_thresholding_ratio", 1.5, ValueError),
    ("sample_max_value 0", _STEPS, "sample_max_value", 0.0, ValueError),
    ("guidance_scale str", _STEPS, "guidance_scale", "7", TypeError),
    ("eta > 1", ("ddim_step",), "eta", 1.5, ValueError),
    ("eta nan", ("ddim_step",), "eta", math.nan, ValueError),
    ("eta reverse", ("ddim_reverse_step",), "eta", 0.5, ValueError),
    ("final_alpha_cumprod", ("ddim_step",), "final_alpha_cumprod", 1.5, ValueError),
    ("use_clipped_model_output", ("ddim_step", "ddim_reverse_step"), "use_clipped_model_output", "yes", TypeError),
    ("return_x0", _STEPS, "return_x0", 1, TypeError),
    ("target", ("diffusion_loss",), "target", "x0", ValueError),
    ("reduction", ("diffusion_loss", "vlb_loss"), "reduction", "avg", ValueError),
    ("snr_gamma 0", ("diffusion_loss",), "snr_gamma", 0.0, ValueError),
    ("snr_gamma negative", ("diffusion_loss",), "snr_gamma", -1.0, ValueError),
    ("out shape", _STEPS, "out", torch.empty(2, 3, 5), ValueError),
    ("out list", _STEPS, "out", [0.0], TypeError),
    ("out expanded", _STEPS, "out", torch.zeros(1, 3, 4).expand(2, 3, 4), ValueError),
    ("out partial overlap", _STEPS, "out", _shifted_alias, ValueError),
    ("shape float", ("gaussian_noise",), "shape", (2.5, 3), TypeError),
    ("shape str", ("gaussian_noise",), "shape", ("2", "3"), TypeError),
    ("shape negative", ("gaussian_noise",), "shape", (2, -3), ValueError),
    ("dtype", ("gaussian_noise",), "dtype", torch.int64, TypeError),
    ("device", ("gaussian_noise",), "device", "no-such-device", ValueError),
    ("backend", _ALL, "backend", "fast", ValueError),
]


@examples(250)
@given(case=st.sampled_from([(c, op) for c in BAD_INPUTS for op in c[1]]),
       backend=st.sampled_from(("native", "reference")))
def test_bad_inputs_raise_a_clear_error_naming_the_argument(case, backend):
    (name, _, arg, bad, exc), op = case
    fn, kw = _valid_call(op)
    if arg != "backend":
        kw["backend"] = backend
    kw[arg] = bad(kw) if callable(bad) else bad
    if arg == "noise":
        kw.pop("seed", None)
    with pytest.raises(exc) as info:
        fn(**kw)
    assert arg in str(info.value), f"{name} on {op}: {type(info.value).__name__}: {info.value}"
    _record("bad input", exc.__name__, torch.zeros(0), torch.zeros(0), 1.0, 1.0)


# --------------------------------------------------------------------------------------------
# the registered ops over arbitrary int64 timesteps, in a subprocess
# --------------------------------------------------------------------------------------------
_FUZZ_SCRIPT = r"""
import json, sys, torch, ddpm_fast
from hypothesis import given, settings, strategies as st
try:  # Hypothesis's built-in constants only, not the literals of ddpm_fast's modules (see _no_local_constants)
    from hypothesis.internal.conjecture import providers as P
    if hasattr(P, "_get_local_constants") and hasattr(P, "Constants"):
        P._get_local_constants = lambda empty=P.Constants(): empty
except ImportError:
    pass
ddpm_fast.backends()
ops = torch.ops.ddpm_fast
S = ddpm_fast.NoiseSchedule.from_name("linear", 50)
abar = S.table("cpu")
T = 50
g = torch.Generator().manual_seed(0)
x = torch.randn(3, 2, 5, generator=g)
mo = torch.randn(3, 2, 5, generator=g)
mo2 = torch.randn(3, 4, 5, generator=g)
seed, off = torch.tensor([3]), torch.tensor([1])
clip = (True, 1.0, False, 0.995, 1.0, None, True)
thr = (False, 1.0, True, 0.9, 2.0, None, True)
int64 = st.integers(-2 ** 63, 2 ** 63 - 1)
near = st.sampled_from([-2 ** 63, -1, 0, 1, T - 1, T, T + 1, 2 ** 31, 2 ** 32, 2 ** 63 - 1])
steps = st.lists(st.one_of(int64, near), min_size=3, max_size=3)
failures, cases = [], [0]

def outside_t(v):
    return v < 0 or v >= T

@settings(derandomize=True, database=None, deadline=None, max_examples=int(sys.argv[1]))
@given(t=steps, p=steps, op=st.sampled_from(["q", "ddpm", "ddpm_thr", "ddim", "rev", "loss", "loss_bwd", "vlb"]))
def run(t, p, op):
    cases[0] += 1
    tt, pt = torch.tensor(t), torch.tensor(p)
    ordered = [True] * 3            # rows whose (t, prev_t) order makes the step defined
    if op == "q":
        outs, bad = (ops.q_sample(x, tt, abar, None, seed, off),), [outside_t(v) for v in t]
    elif op in ("ddpm", "ddpm_thr"):
        outs = ops.ddpm_step(mo2, tt, pt, x, abar, None, seed, off, "sample", "learned_range",
                             *(thr if op == "ddpm_thr" else clip))
        bad = [outside_t(a) or b >= T for a, b in zip(t, p)]
        ordered = [b < a for a, b in zip(t, p)]
    elif op == "ddim":
        outs = ops.ddim_step(mo, tt, pt, x, abar, None, seed, off, 1.0, "epsilon", True, 0.5, *clip)
        bad = [outside_t(a) or b >= T for a, b in zip(t, p)]
        ordered = [b < a for a, b in zip(t, p)]
    elif op == "rev":
        outs = ops.ddim_reverse_step(mo, tt, pt, x, abar, "v_prediction", False, *thr)
        bad = [outside_t(a) or outside_t(b) for a, b in zip(t, p)]
        ordered = [b > a for a, b in zip(t, p)]
    elif op == "loss":
        outs, bad = (ops.diffusion_loss(mo, x, tt, abar, None, seed, off, "sample", None),), [outside_t(v) for v in t]
    elif op == "loss_bwd":
        outs = (ops.diffusion_loss_backward(torch.ones(3), mo, x, tt, abar, None, seed, off, "v_prediction", 5.0),)
        bad = [outside_t(v) for v in t]
    else:
        outs = (ops.vlb_loss(mo2, x.clamp(-1, 1), x, tt, abar, "epsilon", "learned"),)
        bad = [outside_t(v) for v in t]
    for o in outs:
        if not o.numel():
            continue
        for b in range(3):
            row = o[b]
            if bad[b] and not bool(torch.isnan(row).all()):
                failures.append([op, t, p, b, "finite in a row outside the table"])
            if not bad[b] and ordered[b] and not bool(torch.isfinite(row).all()):
                failures.append([op, t, p, b, "non-finite in a valid row"])

run()
print(json.dumps({"cases": cases[0], "failures": failures[:20]}))
"""


def test_registered_ops_fuzzed_timesteps_in_a_subprocess():
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(ddpm_fast.__file__)))
    env = dict(os.environ, PYTHONPATH=package_root + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", _FUZZ_SCRIPT, "300"], env=env, capture_output=True, text=True,
                       timeout=300, cwd=package_root)
    assert r.returncode == 0, f"the subprocess died (rc {r.returncode}: a read outside the table?):\n{r.stderr[-3000:]}"
    res = json.loads(r.stdout.strip().splitlines()[-1])
    WORST.setdefault(("registered ops fuzz", "int64 t"), [0, 0.0, 0.0])[0] += res["cases"]
    assert res["cases"] >= 300 and not res["failures"], res
