"""The parity suite: every backend against the reference, op by op and variant by variant.

One set of sample inputs, one tolerance rule, one set of test functions, run by two lanes:

* ``tests/test_parity.py`` (the main lane) runs them for every backend available on the CPU
  (native; the others skip with their reason);
* ``tests/triton/test_parity_triton.py`` (the Triton lane, its own process under
  ``TRITON_INTERPRET=1``, or compiled on a CUDA device) runs the same functions for ``triton``,
  skipping the few large-shape cases (the interpreter is slow) and fp64 (Triton does not take it).

A lane supplies the ``lane`` fixture (a :class:`Lane`: backend name, device, whether large shapes
run). Backend-specific tests (instruction sets, build info, opcheck, torch.compile, the sm_90
compile check, interpreter and grid quirks) stay in ``tests/test_native.py`` and
``tests/triton/test_triton_ops.py``.

The tolerance rule (:func:`assert_close`): elementwise

    |got - want| <= atol + max(ROUNDING[dtype], rtol) * |want|,   NaN exactly where want is NaN,

with ``atol = 1e-5`` unless a case says otherwise; for fp32, ``rtol`` is at least the backend's
own allowance ``FP32_RTOL`` (native: 1e-5, a few fp32 ulp of its vectorised arithmetic). Every backend computes in fp32 from the same
float64 row coefficients and draws the noise in fp32 (it agrees with the float64 reference noise
within 1e-5 absolute, measured ~2e-6), so fp32 results agree within 1e-5 absolute. Half types:
the two fp32 results, each rounded once to the output dtype, may land one unit in the last place
apart (2^-10 for fp16, 2^-7 for bf16). fp64 differs from the reference only by the fp32 noise
and fp64 rounding (1e-9 relative). Cases whose outputs are their inputs amplified (x0_hat at t
near T carries 1/sqrt(abar) ~ 150 times the inputs' scale; the variational bound's KL terms) pass
``rtol=AMPLIFIED`` (1e-5 relative: a few fp32 ulp of the per-element arithmetic at that scale).
"""
from __future__ import annotations

import dataclasses
import itertools
import os

import pytest
import torch

import ddpm_fast as F
from ddpm_fast import NoiseSchedule
from ddpm_fast.noise import gaussian_noise_reference

INTERPRET = os.environ.get("TRITON_INTERPRET", "") == "1"

# ---- the one tolerance rule ---------------------------------------------------------------------
ATOL = 1e-5
ROUNDING = {torch.float32: 0.0, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7, torch.float64: 1e-9}
AMPLIFIED = 1e-5
# A backend's own fp32 relative allowance, for every case: the native kernels' vectorised fp32
# arithmetic (fused multiply-adds, reordered sums) lands a few fp32 ulp from the reference's.
FP32_RTOL = {"native": 1e-5}

# Backends whose decoder NLL (the t = 0 row of vlb_loss) uses the sigmoid form of the tanh CDF:
# no cancellation, so they agree with the float64 reference where the fp32 reference (and the
# native kernels, which share its form) can be off by ~0.2 at the outer bins. Their vlb_loss is
# compared with the float64 reference: at least as close to it as the fp32 reference is.
NLL_WITHOUT_CANCELLATION = {"triton"}

# Largest error seen per (op, dtype); the Triton lane prints it at the end of its session.
WORST = {}


def _record(op, dtype, got, want):
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    both_nan = torch.isnan(got) & torch.isnan(want)
    diff = torch.where(both_nan | (got == want), torch.zeros_like(got), (got - want).abs())
    rel = diff / want.abs().clamp(min=1e-3)
    key = (op, str(dtype).replace("torch.", ""))
    a, r = WORST.get(key, (0.0, 0.0))
    WORST[key] = (max(a, float(diff.max()) if diff.numel() else 0.0), max(r, float(rel.max()) if rel.numel() else 0.0))


def assert_close(got, want, dtype=None, *, atol=ATOL, rtol=0.0, op="", check_dtype=True, fp32_rtol=0.0):
    """The rule of the module docstring. ``dtype`` picks the rounding unit (default: want's dtype);
    ``check_dtype`` also asserts that got and want have the same dtype (off when want is a
    float64 oracle); ``fp32_rtol``: the backend's own fp32 allowance (:data:`FP32_RTOL`)."""
    dtype = dtype or want.dtype
    if dtype == torch.float32:
        rtol = max(rtol, fp32_rtol)
    _record(op, dtype, got, want)
    if check_dtype:
        assert got.dtype == want.dtype, f"{op}: dtype {got.dtype} != {want.dtype}"
    g, w = got.detach().double().cpu(), want.detach().double().cpu()
    assert g.shape == w.shape, f"{op}: shape {tuple(g.shape)} != {tuple(w.shape)}"
    assert torch.equal(torch.isnan(g), torch.isnan(w)), f"{op}: NaN pattern differs"
    bound = atol + max(ROUNDING[dtype], rtol) * w.abs()
    ok = torch.isnan(w) | (g == w) | ((g - w).abs() <= bound)
    bad = (~ok).nonzero()
    assert bool(ok.all()), (f"{op} {dtype}: {len(bad)} of {ok.numel()} elements off, worst |diff| "
                            f"{float((g - w).abs().nan_to_num().max()):.3g} at {bad[0].tolist()}")


# ---- the lanes ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Lane:
    """One backend on one device. ``large``: whether the large-shape cases run (not under the
    Triton interpreter)."""
    backend: str
    device: torch.device = torch.device("cpu")
    large: bool = True

    def takes(self, dtype):
        if dtype == torch.float64 and self.backend == "triton":
            pytest.skip("triton does not take fp64 (the backend refuses it by name)")

    def need_large(self, what):
        if not self.large:
            pytest.skip(f"{what}: too large for the {self.backend} lane here (the Triton interpreter is slow)")

    def assert_close(self, got, want, dtype=None, **kw):
        """:func:`assert_close` with this lane's fp32 allowance."""
        assert_close(got, want, dtype, fp32_rtol=FP32_RTOL.get(self.backend, 0.0), **kw)

    def put(self, x):
        return x.to(self.device) if isinstance(x, torch.Tensor) else x

    def both(self, fn, *args, **kwargs):
        """fn on this lane's backend and on the reference, tensors moved to the lane's device."""
        args = [self.put(a) for a in args]
        kwargs = {k: self.put(v) for k, v in kwargs.items()}
        return fn(*args, backend=self.backend, **kwargs), fn(*args, backend="reference", **kwargs)

    def gen(self, *shape, scale=1.0, seed=0, dtype=torch.float32):
        g = torch.Generator().manual_seed(seed)
        return (torch.randn(*shape, generator=g) * scale).to(dtype).to(self.device)

    def T(self, *values):
        return torch.tensor(values, dtype=torch.int64, device=self.device)


def lane_params(backends, device="cpu", large=True):
    """pytest params of the ``lane`` fixture, one per backend; one unavailable on ``device`` skips
    with its reason."""
    info = F.backends()
    dev = torch.device(device)
    params = []
    for name in backends:
        ok = info[name]["available"].get(dev.type, False)
        marks = [] if ok else [pytest.mark.skip(reason=f"backend {name!r} unavailable on {dev.type}: "
                                                       f"{info[name]['reason']}")]
        params.append(pytest.param(Lane(name, dev, large), marks=marks, id=name))
    return params


# ---- sample inputs --------------------------------------------------------------------------------
SCHED = NoiseSchedule.from_name("linear", 1000)
COSINE = NoiseSchedule.from_name("squaredcos_cap_v2", 1000)
PREDICTIONS = ("epsilon", "sample", "v_prediction")
VARIANCES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")
CLIPS = {
    "none": dict(clip_sample=False),
    "clip": dict(clip_sample=True, clip_sample_range=1.5),
    "threshold": dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=2.5),
}
HALF = (torch.float16, torch.bfloat16)
SHAPE = (2, 3, 4, 5)


def step_inputs(shape, variance, guidance=False, dtype=torch.float32, scale=1.0):
    """(model_output, x_t) for a step from the global (per-test seeded) generator: the model output
    has twice the channels for learned variances (kept in the model's usual range) and twice the
    batch under guidance."""
    learned = variance in ("learned", "learned_range")
    mo_shape = list(shape)
    if learned:
        mo_shape[1] *= 2
    if guidance:
        mo_shape[0] *= 2
    mo = torch.randn(mo_shape) * scale
    if learned:
        C = shape[1]
        mo[:, C:] = torch.rand_like(mo[:, C:]) * 2 - 1 if variance == "learned_range" else -3 + mo[:, C:]
    x_t = torch.randn(shape) * scale
    return mo.to(dtype), x_t.to(dtype)


def seeded_step_inputs(lane, variance_type, guidance, dtype=torch.float32, shape=SHAPE, seed=0):
    """(model_output, x_t) from explicit generators on the lane's device (variance channels clamped
    to [-1, 1] for learned_range, around -6 for learned)."""
    B, C = shape[0], shape[1]
    mo_shape = (2 * B if guidance else B, 2 * C if variance_type.startswith("learned") else C) + shape[2:]
    mo = lane.gen(*mo_shape, scale=1.5, seed=seed + 1, dtype=dtype)
    if variance_type.startswith("learned"):
        mo[:, C:] = mo[:, C:].clamp(-1, 1) if variance_type == "learned_range" else mo[:, C:] * 0.5 - 6
    return mo, lane.gen(*shape, scale=1.2, seed=seed + 2, dtype=dtype)


# ==================================================================================================
# the noise contract
# ==================================================================================================
@pytest.mark.parametrize("shape", [(1,), (3, 5), (2, 3, 7, 9), (5, 4, 8, 8)])
@pytest.mark.parametrize("per_row", [False, True])
def test_noise_matches_reference(lane, shape, per_row):
    seed = torch.tensor([7, 1 << 40, 3, 12345, 2][: shape[0]]) if per_row else 0x123456789AB
    got = F.gaussian_noise(shape, lane.put(seed), offset=11, device=lane.device, backend=lane.backend)
    ref = gaussian_noise_reference(shape, seed, 11, dtype=torch.float64)
    assert got.dtype == torch.float32
    assert (got.double().cpu() - ref).abs().max().item() < 1e-5


KNOWN = [  # known answers of the noise contract (docs/noise.md)
    (0, 0, [0.9911375, -0.9246628, -0.6176091, -0.4820683]),
    (0x123456789AB, 7, [1.6177623, 0.6978294, 0.6346602, -0.0150390, -1.1643815, -2.3782302]),
]


def test_noise_known_values(lane):
    got = F.gaussian_noise((6,), 0x123456789AB, offset=7, device=lane.device, backend=lane.backend)
    expected = [1.6177623, 0.6978294, 0.6346602, -0.0150390, -1.1643815, -2.3782302]
    assert max(abs(a - b) for a, b in zip(got.tolist(), expected)) < 1e-5


@pytest.mark.parametrize("seed,offset,values", KNOWN)
def test_noise_known_answers(lane, seed, offset, values):
    z = F.gaussian_noise((len(values),), seed, offset, device=lane.device, backend=lane.backend)
    lane.assert_close(z, torch.tensor(values, dtype=torch.float64), atol=1e-5 + 5e-8, op="gaussian_noise",
                 check_dtype=False, dtype=torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_noise_dtypes(lane, dtype):
    lane.takes(dtype)
    got = F.gaussian_noise((4, 33), 5, offset=2, dtype=dtype, device=lane.device, backend=lane.backend)
    ref = gaussian_noise_reference((4, 33), 5, 2, dtype=torch.float64)
    lane.assert_close(got, ref.to(dtype), dtype, op="gaussian_noise")


def test_noise_is_finite_and_standard_over_many_draws(lane):
    lane.need_large("2^20 draws")
    z = F.gaussian_noise((1 << 20,), 99, offset=0, device=lane.device, backend=lane.backend)
    assert torch.isfinite(z).all()
    assert abs(z.mean().item()) < 5e-3 and abs(z.std().item() - 1) < 5e-3


@pytest.mark.parametrize("dtype", (torch.float32,) + HALF)
@pytest.mark.parametrize("shape,per_row", [((2, 3, 4, 5), False), ((3, 5, 7), False), ((3, 5, 7), True),
                                           ((37,), False), ((4, 2), True)])
def test_noise_matches_reference_large_seeds_and_offsets(lane, shape, per_row, dtype):
    seed = lane.T(11, 2 ** 40 + 5, 3, 2 ** 62 + 1)[: shape[0]] if per_row else 0x123456789AB
    offset = 2 ** 33 + 9
    z = F.gaussian_noise(shape, seed, offset, device=lane.device, dtype=dtype, backend=lane.backend)
    assert z.dtype == dtype and tuple(z.shape) == shape
    want = gaussian_noise_reference(shape, seed.cpu() if per_row else seed, offset, dtype=torch.float64)
    lane.assert_close(z, want, dtype, op="gaussian_noise", check_dtype=False)


def test_noise_offset_tensor_selects_stream(lane):
    a = F.gaussian_noise(SHAPE, 5, torch.tensor(3, device=lane.device), device=lane.device, backend=lane.backend)
    b = F.gaussian_noise(SHAPE, 5, 3, device=lane.device, backend=lane.backend)
    c = F.gaussian_noise(SHAPE, 5, 4, device=lane.device, backend=lane.backend)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_per_row_seed_is_batch_independent(lane):
    """Row b of a per-row-seeded draw does not depend on the batch around it."""
    big = F.gaussian_noise((3, 3, 4, 5), lane.T(7, 8, 9), 2, device=lane.device, backend=lane.backend)
    one = F.gaussian_noise((1, 3, 4, 5), lane.T(8), 2, device=lane.device, backend=lane.backend)
    assert torch.equal(big[1:2], one)


# ==================================================================================================
# q_sample
# ==================================================================================================
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (4, 3, 7, 9)])
def test_q_sample_seed(lane, dtype, shape):
    lane.takes(dtype)
    x0 = torch.randn(shape).to(dtype)
    t = torch.randint(0, 1000, (shape[0],))
    got, ref = lane.both(F.q_sample, x0, t, SCHED, seed=42, offset=3)
    lane.assert_close(got, ref, op="q_sample")


def test_q_sample_per_row_seed_and_explicit_noise_noncontiguous(lane):
    x0 = torch.randn(6, 8, 3).transpose(1, 2)  # non-contiguous
    seeds = torch.tensor([1, 2, 3, 4, 5, 6])
    got, ref = lane.both(F.q_sample, x0, 500, SCHED, seed=seeds, offset=9)
    lane.assert_close(got, ref, op="q_sample")
    noise = torch.randn(6, 8, 3).transpose(1, 2)
    got, ref = lane.both(F.q_sample, x0, torch.arange(6) * 150, SCHED, noise)
    lane.assert_close(got, ref, op="q_sample")


def test_per_row_seed_row_independent_of_batch(lane):
    x0 = lane.put(torch.randn(4, 10))
    a = F.q_sample(x0, 300, SCHED, seed=lane.T(5, 6, 7, 8), backend=lane.backend)
    b = F.q_sample(x0[2:3], 300, SCHED, seed=lane.T(7), backend=lane.backend)
    assert torch.equal(a[2:3], b)


@pytest.mark.parametrize("dtype", (torch.float32,) + HALF)
@pytest.mark.parametrize("noise_kind", ["seed", "per_row_seed", "tensor"])
def test_q_sample(lane, dtype, noise_kind):
    x0 = lane.gen(*SHAPE, dtype=dtype)
    t = lane.T(0, 999)
    kw = {"tensor": dict(noise=lane.gen(*SHAPE, seed=3, dtype=dtype)), "seed": dict(seed=12345, offset=6),
          "per_row_seed": dict(seed=lane.T(4, 2 ** 50), offset=1)}[noise_kind]
    got, want = lane.both(F.q_sample, x0, t, SCHED, **kw)
    assert got.dtype == dtype
    lane.assert_close(got, want, dtype, op="q_sample")


def test_q_sample_unaligned_rows_and_noncontiguous(lane):
    """Rows of 35 elements (quads straddle rows) and a transposed (strided) input."""
    x0 = lane.gen(5, 7, 3).transpose(1, 2)
    assert not x0.is_contiguous()
    got, want = lane.both(F.q_sample, x0, lane.T(1, 10, 100, 500, 998), SCHED, seed=99, offset=3)
    lane.assert_close(got, want, op="q_sample")


def test_q_sample_grad(lane):
    x0 = lane.gen(*SHAPE).requires_grad_()
    x0r = x0.detach().clone().requires_grad_()
    g = lane.gen(*SHAPE, seed=8)
    t = lane.T(5, 700)
    (F.q_sample(x0, t, SCHED, seed=1, backend=lane.backend) * g).sum().backward()
    (F.q_sample(x0r, t, SCHED, seed=1, backend="reference") * g).sum().backward()
    lane.assert_close(x0.grad, x0r.grad, op="q_sample.grad")


# ==================================================================================================
# the DDPM step
# ==================================================================================================
@pytest.mark.parametrize("clip", list(CLIPS))
@pytest.mark.parametrize("variance", VARIANCES)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_ddpm_step_variants(lane, prediction, variance, clip):
    shape = (3, 2, 5, 7)
    mo, x_t = step_inputs(shape, variance, scale=2.0)
    t = torch.tensor([999, 0, 437])
    got, ref = lane.both(F.ddpm_step, mo, t, x_t, SCHED, prediction_type=prediction, variance_type=variance,
                         seed=torch.tensor([3, 4, 5]), offset=1, return_x0=True, **CLIPS[clip])
    lane.assert_close(got[0], ref[0], rtol=AMPLIFIED, op="ddpm_step")
    lane.assert_close(got[1], ref[1], rtol=AMPLIFIED, op="ddpm_step.x0_hat")


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("variance_type", VARIANCES)
def test_ddpm_step_variants_guidance(lane, prediction_type, variance_type):
    """Every prediction x variance x (no clip, clip, threshold) x guidance, fp32, per-sample t
    (one row at t = 0: no noise there), noise from a seed, x0_hat returned."""
    t, prev_t = lane.T(500, 0), lane.T(499, -1)
    for (clip_name, clip), guidance in itertools.product(CLIPS.items(), (None, 3.0)):
        mo, xt = seeded_step_inputs(lane, variance_type, guidance)
        kw = dict(prev_t=prev_t, prediction_type=prediction_type, variance_type=variance_type,
                  guidance_scale=guidance, seed=77, offset=5, return_x0=True, **clip)
        (got, got_x0), (want, want_x0) = lane.both(F.ddpm_step, mo, t, xt, SCHED, **kw)
        lane.assert_close(got, want, op="ddpm_step")
        lane.assert_close(got_x0, want_x0, op="ddpm_step.x0_hat")


@pytest.mark.parametrize("variance", ["fixed_small", "learned_range"])
def test_ddpm_step_guidance_respaced_and_explicit_noise(lane, variance):
    shape = (2, 3, 4, 5)
    mo, x_t = step_inputs(shape, variance, guidance=True)
    kept = F.space_timesteps(1000, "50")
    sched = COSINE.respace(kept)
    t = torch.tensor([49, 10])
    noise = torch.randn(shape)
    got, ref = lane.both(F.ddpm_step, mo, t, x_t, sched, prev_t=torch.tensor([40, -1]), variance_type=variance,
                         guidance_scale=7.5, noise=noise, return_x0=True, thresholding=True, sample_max_value=3.0)
    lane.assert_close(got[0], ref[0], op="ddpm_step")
    lane.assert_close(got[1], ref[1], op="ddpm_step.x0_hat")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("variance", ["fixed_small", "learned_range"])
def test_ddpm_step_dtypes(lane, dtype, variance):
    lane.takes(dtype)
    mo, x_t = step_inputs((2, 4, 6, 6), variance, dtype=dtype)
    got, ref = lane.both(F.ddpm_step, mo, torch.tensor([700, 3]), x_t, SCHED, variance_type=variance, seed=8,
                         offset=4)
    lane.assert_close(got, ref, op="ddpm_step")


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("variance_type", ["fixed_small", "learned_range"])
def test_ddpm_step_half(lane, dtype, variance_type):
    t = lane.T(900, 3)
    for clip_name, clip in CLIPS.items():
        mo, xt = seeded_step_inputs(lane, variance_type, None, dtype)
        kw = dict(variance_type=variance_type, seed=lane.T(3, 4), offset=2, return_x0=True, **clip)
        (got, got_x0), (want, want_x0) = lane.both(F.ddpm_step, mo, t, xt, SCHED, **kw)
        assert got.dtype == dtype
        lane.assert_close(got, want, dtype, op="ddpm_step")
        lane.assert_close(got_x0, want_x0, dtype, op="ddpm_step.x0_hat")


def test_ddpm_step_mixed_dtypes_and_noncontiguous(lane):
    mo = torch.randn(3, 8, 5).transpose(1, 2).half()  # fp16 network output, strided
    x_t = torch.randn(3, 5, 8)
    got, ref = lane.both(F.ddpm_step, mo, 500, x_t, SCHED, seed=1)
    lane.assert_close(got, ref, op="ddpm_step")


def test_ddpm_step_mixed_dtypes_noise_tensor_respaced(lane):
    """fp16 model output over fp32 latents; a given noise tensor; a respaced pair (t, prev_t) far
    apart; a transposed (non-contiguous) x_t."""
    mo, _ = seeded_step_inputs(lane, "fixed_large", None, torch.float16)
    xt = lane.gen(2, 5, 4, 3).permute(0, 3, 2, 1)
    assert not xt.is_contiguous()
    noise = lane.gen(*SHAPE, seed=9)
    kw = dict(prev_t=lane.T(600, 100), variance_type="fixed_large", noise=noise)
    got, want = lane.both(F.ddpm_step, mo, lane.T(800, 300), xt, SCHED, **kw)
    assert got.dtype == torch.float32
    lane.assert_close(got, want, op="ddpm_step")


def test_ddpm_step_tiny_and_odd_shapes(lane):
    shapes = [(1,), (1, 1), (5, 3), (2, 1, 1, 13)] + ([(10000, 2)] if lane.large else [])
    for shape in shapes:
        mo, x_t = torch.randn(shape), torch.randn(shape)
        got, ref = lane.both(F.ddpm_step, mo, 250, x_t, SCHED, seed=2, offset=5)
        lane.assert_close(got, ref, op="ddpm_step")


def test_thresholding_row_longer_than_2_pow_24(lane):
    # torch.quantile refuses rows past 2^24 elements; the kernels' quantile pass does not
    lane.need_large("a row of 2^24 + 5 elements")
    n = (1 << 24) + 5
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(1, n, generator=g)
    mo = torch.randn(1, n, generator=g) * 3
    got, ref = lane.both(F.ddpm_step, mo, 0, x_t, SCHED, prediction_type="sample", thresholding=True,
                         dynamic_thresholding_ratio=0.99, sample_max_value=5.0)
    lane.assert_close(got, ref, op="ddpm_step")


def test_ddpm_step_zero_snr_and_nan(lane):
    """Zero terminal SNR (abar = 0 at T-1): epsilon x0_hat is +-inf, clipped back to finite;
    a NaN in a row under thresholding makes that row NaN, and only that row."""
    sched = NoiseSchedule.from_name("linear", 1000, rescale_zero_snr=True)
    mo, xt = seeded_step_inputs(lane, "fixed_small", None)
    got, want = lane.both(F.ddpm_step, mo, lane.T(999, 500), xt, sched, seed=3)
    assert bool(torch.isfinite(got).all())
    lane.assert_close(got, want, op="ddpm_step")
    mo[1, 0, 0, 0] = float("nan")
    got, want = lane.both(F.ddpm_step, mo, lane.T(400, 500), xt, SCHED, seed=3, **CLIPS["threshold"])
    assert bool(torch.isnan(got[1]).all()) and bool(torch.isfinite(got[0]).all())
    lane.assert_close(got, want, op="ddpm_step")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_snr_thresholding_is_finite(lane, dtype):
    """A zero-SNR epsilon step at T-1 under thresholding is finite. Every |x0_hat| is +inf there,
    so the per-row quantile's two neighbours are both inf; a plain lerp gives inf - inf = NaN (as
    torch.quantile, hence diffusers, does). The threshold must instead be sample_max_value and
    x0_hat = sign(x_t - eps)."""
    lane.takes(dtype)
    s = NoiseSchedule.from_name("linear", 1000, rescale_zero_snr=True)
    g = torch.Generator().manual_seed(9)
    x_t = lane.put(torch.randn(2, 3, 4, generator=g).to(dtype))
    eps = lane.put(torch.randn(2, 3, 4, generator=g).to(dtype))
    kw = dict(thresholding=True, sample_max_value=3.0, return_x0=True, backend=lane.backend)
    prev, x0 = F.ddpm_step(eps, 999, x_t, s, seed=1, **kw)
    assert torch.isfinite(prev).all() and torch.isfinite(x0).all()
    torch.testing.assert_close(x0, torch.sign(x_t - eps), rtol=0, atol=0)
    prev, x0 = F.ddim_step(eps, 999, x_t, s, prev_t=899, **kw)
    assert torch.isfinite(prev).all() and torch.isfinite(x0).all()


@pytest.mark.parametrize("variance", ["fixed_small", "learned_range"])
def test_ddpm_step_gradients(lane, variance):
    mo, x_t = step_inputs((2, 2, 3, 3), variance)
    args = dict(variance_type=variance, seed=lane.T(4, 5), offset=1, return_x0=True)
    leaves = {}
    for backend in (lane.backend, "reference"):
        m, x = lane.put(mo).clone().requires_grad_(True), lane.put(x_t).clone().requires_grad_(True)
        leaves[backend] = (m, x)
        prev, x0 = F.ddpm_step(m, lane.T(600, 1), x, SCHED, backend=backend, **args)
        (prev.sin().sum() + (x0 * 0.5).sum()).backward()
    for a, b in zip(leaves[lane.backend], leaves["reference"]):
        lane.assert_close(a.grad, b.grad, op="ddpm_step.grad")


@pytest.mark.parametrize("variance_type", ["fixed_small", "learned_range"])
def test_ddpm_step_grad_guidance(lane, variance_type):
    """Gradients in model_output and x_t (including sigma's dependence on learned variances)."""
    grads = []
    for backend in (lane.backend, "reference"):
        mo, xt = seeded_step_inputs(lane, variance_type, 2.0)
        mo.requires_grad_()
        xt.requires_grad_()
        x_prev, x0 = F.ddpm_step(mo, lane.T(300, 2), xt, SCHED, variance_type=variance_type, guidance_scale=2.0,
                                 seed=5, return_x0=True, backend=backend)
        (x_prev * lane.gen(*SHAPE, seed=4) + x0 * lane.gen(*SHAPE, seed=5)).sum().backward()
        grads.append((mo.grad, xt.grad))
    lane.assert_close(grads[0][0], grads[1][0], op="ddpm_step.grad")
    lane.assert_close(grads[0][1], grads[1][1], op="ddpm_step.grad")


# ==================================================================================================
# DDIM and its inversion
# ==================================================================================================
@pytest.mark.parametrize("clip", list(CLIPS))
@pytest.mark.parametrize("use_clipped", [False, True])
@pytest.mark.parametrize("eta", [0.0, 0.7])
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_ddim_step_variants(lane, prediction, eta, use_clipped, clip):
    shape = (3, 3, 6, 5)
    mo, x_t = torch.randn(shape) * 2, torch.randn(shape) * 2
    t = torch.tensor([980, 20, 500])
    prev_t = torch.tensor([960, -1, 480])
    got, ref = lane.both(F.ddim_step, mo, t, x_t, SCHED, prev_t=prev_t, eta=eta, prediction_type=prediction,
                         use_clipped_model_output=use_clipped, final_alpha_cumprod=0.9999, seed=11, offset=2,
                         return_x0=True, **CLIPS[clip])
    lane.assert_close(got[0], ref[0], rtol=AMPLIFIED, op="ddim_step")
    lane.assert_close(got[1], ref[1], rtol=AMPLIFIED, op="ddim_step.x0_hat")


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("eta", [0.0, 0.6])
def test_ddim_step_variants_guidance_final_step(lane, prediction_type, eta):
    """use_clipped_model_output x (no clip, clip, threshold) x guidance; one row at its final
    step (prev_t = -1 with final_alpha_cumprod = abar_0, set_alpha_to_one=False)."""
    t, prev_t = lane.T(500, 20), lane.T(480, -1)
    final = float(SCHED.alphas_cumprod[0])
    for use_clipped, (clip_name, clip), guidance in itertools.product((False, True), CLIPS.items(), (None, 4.0)):
        mo, xt = seeded_step_inputs(lane, "fixed_small", guidance)
        kw = dict(prev_t=prev_t, eta=eta, prediction_type=prediction_type, use_clipped_model_output=use_clipped,
                  final_alpha_cumprod=final, guidance_scale=guidance, return_x0=True,
                  seed=(lane.T(1, 2) if eta > 0 else None), offset=3, **clip)
        (got, got_x0), (want, want_x0) = lane.both(F.ddim_step, mo, t, xt, SCHED, **kw)
        lane.assert_close(got, want, op="ddim_step")
        lane.assert_close(got_x0, want_x0, op="ddim_step.x0_hat")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_ddim_step_dtypes_guidance(lane, dtype):
    lane.takes(dtype)
    mo = torch.randn(4, 3, 5, 5).to(dtype)
    x_t = torch.randn(2, 3, 5, 5).to(dtype)
    got, ref = lane.both(F.ddim_step, mo, 600, x_t, SCHED, prev_t=580, eta=0.3, guidance_scale=3.0,
                         seed=torch.tensor([1, 2]), offset=0)
    lane.assert_close(got, ref, op="ddim_step")


@pytest.mark.parametrize("dtype", (torch.float32,) + HALF)
def test_ddim_step_dtypes_and_out(lane, dtype):
    mo, xt = seeded_step_inputs(lane, "fixed_small", None, dtype)
    kw = dict(prev_t=lane.T(650, 250), eta=1.0, seed=9)
    want = F.ddim_step(mo, lane.T(700, 300), xt, SCHED, backend="reference", **kw)
    got = F.ddim_step(mo, lane.T(700, 300), xt, SCHED, out=xt, backend=lane.backend, **kw)
    assert got is xt
    lane.assert_close(got, want, dtype, op="ddim_step")


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("use_clipped", [False, True])
def test_ddim_reverse_step(lane, prediction, use_clipped):
    mo, x_t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    got, ref = lane.both(F.ddim_reverse_step, mo, torch.tensor([0, 500]), x_t, SCHED,
                         next_t=torch.tensor([20, 520]), prediction_type=prediction,
                         use_clipped_model_output=use_clipped, return_x0=True)
    lane.assert_close(got[0], ref[0], op="ddim_reverse_step")
    lane.assert_close(got[1], ref[1], op="ddim_reverse_step.x0_hat")


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_ddim_reverse_step_clip_guidance(lane, prediction_type):
    for use_clipped, (clip_name, clip), guidance in itertools.product((False, True), CLIPS.items(), (None, 2.0)):
        mo, xt = seeded_step_inputs(lane, "fixed_small", guidance)
        kw = dict(next_t=lane.T(520, 40), prediction_type=prediction_type, use_clipped_model_output=use_clipped,
                  guidance_scale=guidance, return_x0=True, **clip)
        (got, got_x0), (want, want_x0) = lane.both(F.ddim_reverse_step, mo, lane.T(500, 0), xt, SCHED, **kw)
        lane.assert_close(got, want, op="ddim_reverse_step")
        lane.assert_close(got_x0, want_x0, op="ddim_reverse_step.x0_hat")


@pytest.mark.parametrize("dtype", HALF)
def test_ddim_reverse_step_half(lane, dtype):
    mo, xt = seeded_step_inputs(lane, "fixed_small", None, dtype)
    got, want = lane.both(F.ddim_reverse_step, mo, lane.T(5, 6), xt, SCHED, next_t=lane.T(25, 26))
    lane.assert_close(got, want, dtype, op="ddim_reverse_step")


def test_ddim_and_q_sample_gradients(lane):
    grads = {}
    for backend in (lane.backend, "reference"):
        m = lane.put(torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(1))).requires_grad_(True)
        x = lane.put(torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(2))).requires_grad_(True)
        x0 = lane.put(torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(3))).requires_grad_(True)
        y = F.ddim_step(m, 500, x, SCHED, prev_t=450, eta=0.5, seed=1, backend=backend)
        z = F.ddim_reverse_step(m, 300, x, SCHED, next_t=350, backend=backend)
        q = F.q_sample(x0, lane.T(10, 900), SCHED, seed=2, backend=backend)
        (y.pow(2).sum() + z.sum() + q.pow(2).sum()).backward()
        grads[backend] = (m.grad, x.grad, x0.grad)
    for a, b in zip(grads[lane.backend], grads["reference"]):
        lane.assert_close(a, b, op="ddim_step.grad")


def test_ddim_grads(lane):
    grads = []
    for backend in (lane.backend, "reference"):
        mo, xt = seeded_step_inputs(lane, "fixed_small", None)
        mo.requires_grad_()
        xt.requires_grad_()
        a = F.ddim_step(mo, lane.T(300, 200), xt, SCHED, prev_t=lane.T(250, 150), eta=0.5, seed=2, backend=backend)
        b = F.ddim_reverse_step(mo, lane.T(300, 200), xt, SCHED, next_t=lane.T(350, 250),
                                use_clipped_model_output=True, backend=backend)
        (a * lane.gen(*SHAPE, seed=6) + b * lane.gen(*SHAPE, seed=7)).sum().backward()
        grads.append((mo.grad, xt.grad))
    lane.assert_close(grads[0][0], grads[1][0], op="ddim_step.grad")
    lane.assert_close(grads[0][1], grads[1][1], op="ddim_step.grad")


# ==================================================================================================
# out=
# ==================================================================================================
@pytest.mark.parametrize("op", ["ddpm", "ddim", "reverse"])
def test_out_in_place(lane, op):
    mo, x_t = lane.put(torch.randn(2, 3, 8, 8)), lane.put(torch.randn(2, 3, 8, 8))
    if op == "ddpm":
        ref = F.ddpm_step(mo, 500, x_t, SCHED, seed=3, backend="reference")
        res = F.ddpm_step(mo, 500, x_t, SCHED, seed=3, out=x_t, backend=lane.backend)
    elif op == "ddim":
        ref = F.ddim_step(mo, 500, x_t, SCHED, prev_t=480, eta=1.0, seed=3, backend="reference")
        res = F.ddim_step(mo, 500, x_t, SCHED, prev_t=480, eta=1.0, seed=3, out=x_t, backend=lane.backend)
    else:
        ref = F.ddim_reverse_step(mo, 500, x_t, SCHED, next_t=520, backend="reference")
        res = F.ddim_reverse_step(mo, 500, x_t, SCHED, next_t=520, out=x_t, backend=lane.backend)
    assert res.data_ptr() == x_t.data_ptr()
    lane.assert_close(x_t, ref, op=f"{op}_step(out=)")


def test_ddpm_step_out_in_place_seeded(lane):
    mo, xt = seeded_step_inputs(lane, "fixed_small", None)
    want = F.ddpm_step(mo, lane.T(10, 20), xt, SCHED, seed=1, backend="reference")
    got = F.ddpm_step(mo, lane.T(10, 20), xt, SCHED, seed=1, out=xt, backend=lane.backend)
    assert got is xt
    lane.assert_close(xt, want, op="ddpm_step")


def test_out_noncontiguous(lane):
    mo, x_t = lane.put(torch.randn(2, 4, 6)), lane.put(torch.randn(2, 4, 6))
    out = torch.empty(2, 6, 4, device=lane.device).transpose(1, 2)
    ref = F.ddpm_step(mo, 300, x_t, SCHED, seed=1, backend="reference")
    res = F.ddpm_step(mo, 300, x_t, SCHED, seed=1, out=out, backend=lane.backend)
    assert res is out
    lane.assert_close(out, ref, op="ddpm_step(out=)")


# ==================================================================================================
# NaN
# ==================================================================================================
def test_nan_propagates_to_its_element_only(lane):
    mo, x_t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    mo[0, 1, 2, 3] = float("nan")
    mo, x_t = lane.put(mo), lane.put(x_t)
    out = F.ddpm_step(mo, 500, x_t, SCHED, seed=1, backend=lane.backend)
    nan = torch.isnan(out)
    assert nan[0, 1, 2, 3] and nan.sum() == 1
    out = F.ddim_step(mo, 500, x_t, SCHED, prev_t=400, backend=lane.backend)
    assert torch.isnan(out).sum() == 1


def test_nan_under_thresholding_poisons_its_row(lane):
    mo, x_t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    mo[1, 0, 0, 0] = float("nan")
    got, ref = lane.both(F.ddpm_step, mo, 500, x_t, SCHED, seed=1, thresholding=True, sample_max_value=2.0)
    assert torch.isnan(got[1]).all() and not torch.isnan(got[0]).any()
    lane.assert_close(got, ref, op="ddpm_step")


def test_no_nan_from_finite_inputs_at_extremes(lane):
    sched = NoiseSchedule.from_name("linear", 1000, rescale_zero_snr=True)
    mo, x_t = torch.randn(3, 2, 8, 8), torch.randn(3, 2, 8, 8)
    for prediction in PREDICTIONS:
        got, ref = lane.both(F.ddpm_step, mo, torch.tensor([999, 1, 0]), x_t, sched, prediction_type=prediction,
                             seed=3, variance_type="fixed_large_log")
        assert torch.isfinite(got).all()
        lane.assert_close(got, ref, op="ddpm_step")


# ==================================================================================================
# losses
# ==================================================================================================
@pytest.mark.parametrize("snr_gamma", [None, 5.0])
@pytest.mark.parametrize("target", PREDICTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_diffusion_loss_forward_backward(lane, target, snr_gamma, dtype):
    lane.takes(dtype)
    x0 = lane.put(torch.randn(4, 3, 5, 7).to(dtype))
    t = lane.T(0, 10, 500, 999)
    mo_n = lane.put(torch.randn(4, 3, 5, 7).to(dtype)).requires_grad_(True)
    mo_r = mo_n.detach().clone().requires_grad_(True)
    seeds = dict(seed=lane.T(1, 2, 3, 4), offset=6)
    ln = F.diffusion_loss(mo_n, x0, t, SCHED, target=target, snr_gamma=snr_gamma, reduction="none",
                          backend=lane.backend, **seeds)
    lr = F.diffusion_loss(mo_r, x0, t, SCHED, target=target, snr_gamma=snr_gamma, reduction="none",
                          backend="reference", **seeds)
    lane.assert_close(ln, lr, torch.float64 if dtype == torch.float64 else torch.float32, op="diffusion_loss")
    w = torch.tensor([0.3, -1.0, 2.0, 0.5], dtype=ln.dtype, device=lane.device)
    (ln * w).sum().backward()
    (lr * w).sum().backward()
    lane.assert_close(mo_n.grad, mo_r.grad, op="diffusion_loss.grad")


@pytest.mark.parametrize("target", PREDICTIONS)
@pytest.mark.parametrize("snr_gamma", [None, 5.0])
def test_diffusion_loss_fwd_bwd_row_seeds(lane, target, snr_gamma):
    """Forward and backward (noise regenerated from (seed, offset) in the backward kernel), scalar
    and per-row seeds, unaligned rows of 35 elements, a row at t = 0 and one at T-1."""
    for shape, seed in (((3, 3, 4, 5), 7), ((3, 5, 7), lane.T(1, 2, 3))):
        x0 = lane.gen(*shape, seed=1).clamp(-1, 1)
        t = lane.T(0, 500, 999)
        g = lane.gen(shape[0], seed=2).abs()
        results = []
        for backend in (lane.backend, "reference"):
            mo = lane.gen(*shape, seed=3).requires_grad_()
            loss = F.diffusion_loss(mo, x0, t, SCHED, target=target, seed=seed, offset=4, snr_gamma=snr_gamma,
                                    reduction="none", backend=backend)
            (loss * g).sum().backward()
            results.append((loss.detach(), mo.grad))
        assert results[0][0].dtype == torch.float32
        scale = max(1.0, float(results[1][0].abs().max()))
        lane.assert_close(results[0][0], results[1][0], atol=ATOL * scale, op="diffusion_loss")
        lane.assert_close(results[0][1], results[1][1], op="diffusion_loss.grad")


@pytest.mark.parametrize("dtype", HALF)
def test_diffusion_loss_half_and_noise_tensor(lane, dtype):
    x0 = lane.gen(*SHAPE, seed=1, dtype=dtype)
    noise = lane.gen(*SHAPE, seed=4, dtype=dtype)
    results = []
    for backend in (lane.backend, "reference"):
        mo = lane.gen(*SHAPE, seed=3, dtype=dtype).requires_grad_()
        loss = F.diffusion_loss(mo, x0, lane.T(10, 900), SCHED, target="v_prediction", noise=noise, snr_gamma=1.0,
                                reduction="mean", backend=backend)
        loss.backward()
        results.append((loss.detach(), mo.grad))
    lane.assert_close(results[0][0], results[1][0], torch.float32, op="diffusion_loss")
    assert results[0][1].dtype == dtype
    lane.assert_close(results[0][1], results[1][1], dtype, op="diffusion_loss.grad")


def test_losses_long_rows_split_across_tasks(lane):
    # rows past 2^16 elements are reduced in parts (several tasks per row)
    lane.need_large("rows of 70001 elements")
    x0 = torch.rand(2, 2, 70001) * 2 - 1
    mo = torch.randn(2, 4, 70001)
    x_t = torch.randn(2, 2, 70001)
    got, ref = lane.both(F.diffusion_loss, mo[:, :2], x0, torch.tensor([3, 900]), SCHED, seed=1,
                         reduction="none")
    lane.assert_close(got, ref, op="diffusion_loss")
    got, ref = lane.both(F.vlb_loss, mo, x0, x_t, torch.tensor([0, 900]), SCHED, reduction="none")
    lane.assert_close(got, ref, op="vlb_loss")


def test_diffusion_loss_reductions_and_q_sample_consistency(lane):
    x0 = lane.put(torch.randn(3, 4, 6))
    x_t = F.q_sample(x0, 400, SCHED, seed=5, offset=8, backend=lane.backend)
    # the loss regenerates exactly the noise q_sample used: eps from x_t is the target
    a = SCHED.alphas_cumprod[400]
    eps = ((x_t.double().cpu() - a.sqrt() * x0.double().cpu()) / (1 - a).sqrt()).float()
    loss = F.diffusion_loss(lane.put(eps), x0, 400, SCHED, seed=5, offset=8, reduction="sum",
                            backend=lane.backend)
    assert loss.item() < 1e-9


def test_loss_noise_is_q_sample_noise(lane):
    """The loss with target epsilon regenerates exactly the noise q_sample drew with the same
    (seed, offset), per-row timesteps: a model output equal to that noise has zero loss."""
    x0 = lane.gen(*SHAPE)
    t = lane.T(100, 200)
    x_t = F.q_sample(x0, t, SCHED, seed=42, offset=9, backend=lane.backend)
    a = SCHED.alphas_cumprod.to(lane.device)[t].reshape(-1, 1, 1, 1)
    eps = (x_t.double() - a.sqrt() * x0.double()) / (1 - a).sqrt()
    loss = F.diffusion_loss(eps.float(), x0, t, SCHED, seed=42, offset=9, reduction="none", backend=lane.backend)
    assert float(loss.max()) < 1e-8


# ==================================================================================================
# the variational bound
# ==================================================================================================
@pytest.mark.parametrize("variance", VARIANCES)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_vlb_loss(lane, prediction, variance):
    shape = (4, 2, 4, 5)
    mo, x_t = step_inputs(shape, variance)
    x0 = torch.rand(shape) * 2 - 1
    x0[0, 0, 0, :2] = torch.tensor([-1.0, 1.0])  # the outer bins of the decoder
    mo, x_t, x0 = lane.put(mo), lane.put(x_t), lane.put(x0)
    t = lane.T(0, 1, 300, 999)
    mo_n = mo.clone().requires_grad_(True)
    mo_r = mo.clone().requires_grad_(True)
    kw = dict(prediction_type=prediction, variance_type=variance, reduction="none")
    ln = F.vlb_loss(mo_n, x0, x_t, t, SCHED, backend=lane.backend, **kw)
    lr = F.vlb_loss(mo_r, x0, x_t, t, SCHED, backend="reference", **kw)
    if lane.backend in NLL_WITHOUT_CANCELLATION:  # the float64 reference is the oracle of the t = 0 row
        lr64 = F.vlb_loss(mo.double(), x0.double(), x_t.double(), t, SCHED, backend="reference", **kw)
        ref_err = (lr.detach().double() - lr64).abs()
        assert bool(((ln.detach().double() - lr64).abs() <= ref_err + ATOL * lr64.abs().clamp(min=1.0)).all())
    else:
        lane.assert_close(ln, lr, rtol=AMPLIFIED, op="vlb_loss")
    ln.sum().backward()
    lr.sum().backward()
    lane.assert_close(mo_n.grad, mo_r.grad, rtol=AMPLIFIED, op="vlb_loss.grad")


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("variance_type", VARIANCES)
def test_vlb_loss_vs_float64(lane, prediction_type, variance_type):
    """KL rows (t > 0) and the decoder NLL row (t = 0), forward and backward. The NLL uses the
    sigmoid form of the tanh CDF (no cancellation), so the backend is compared with the float64
    reference: it must be at least as close to it as the fp32 reference is (plus 1e-5)."""
    x0 = lane.gen(*SHAPE, seed=1).clamp(-1, 1)
    t = lane.T(0, 400)
    x_t = F.q_sample(x0, t, SCHED, seed=5, backend="reference")
    mo, _ = seeded_step_inputs(lane, variance_type, None)
    mo = (mo * 0.3).requires_grad_()
    kw = dict(prediction_type=prediction_type, variance_type=variance_type, reduction="none")
    got = F.vlb_loss(mo, x0, x_t, t, SCHED, backend=lane.backend, **kw)
    got.sum().backward()
    g_got, mo.grad = mo.grad, None
    want = F.vlb_loss(mo, x0, x_t, t, SCHED, backend="reference", **kw)
    want.sum().backward()
    want64 = F.vlb_loss(mo.detach().double(), x0.double(), x_t.double(), t, SCHED, backend="reference", **kw)
    ref_err = (want.detach().double() - want64).abs()
    scale = want64.abs().clamp(min=1.0)
    assert bool(((got.detach().double() - want64).abs() <= ref_err + ATOL * scale).all()), (got, want, want64)
    _record("vlb_loss", torch.float32, got, want)
    _record("vlb_loss(vs float64)", torch.float32, got, want64)
    _record("vlb_loss(fp32 ref vs float64)", torch.float32, want, want64)
    lane.assert_close(g_got, mo.grad, atol=ATOL * max(1.0, float(mo.grad.abs().max())), op="vlb_loss.grad")


def test_vlb_loss_half(lane):
    x0 = lane.gen(*SHAPE, seed=1, dtype=torch.bfloat16).clamp(-1, 1)
    t = lane.T(0, 40)
    x_t = F.q_sample(x0, t, SCHED, seed=5, backend="reference")
    mo, _ = seeded_step_inputs(lane, "learned_range", None, torch.bfloat16)
    kw = dict(variance_type="learned_range", reduction="none")
    got = F.vlb_loss(mo, x0, x_t, t, SCHED, backend=lane.backend, **kw)
    want64 = F.vlb_loss(mo.double(), x0.double(), x_t.double(), t, SCHED, backend="reference", **kw)
    want = F.vlb_loss(mo, x0, x_t, t, SCHED, backend="reference", **kw)
    _record("vlb_loss", torch.bfloat16, got, want)
    ref_err = (want.double() - want64).abs()
    assert bool(((got.double() - want64).abs() <= ref_err + 1e-5 * want64.abs().clamp(min=1)).all())


def test_hybrid_loss(lane):
    x0 = lane.gen(2, 3, 4, 5, seed=1).clamp(-1, 1)
    results = []
    for backend in (lane.backend, "reference"):
        mo = (lane.gen(2, 6, 4, 5, seed=2) * 0.5).requires_grad_()
        loss = F.hybrid_loss(mo, x0, lane.T(0, 600), SCHED, seed=3, offset=1, backend=backend)
        loss.backward()
        results.append((loss.detach(), mo.grad))
    assert abs(float(results[0][0]) - float(results[1][0])) <= 1e-4 * max(1.0, abs(float(results[1][0])))
    lane.assert_close(results[0][1], results[1][1], atol=1e-4, op="hybrid_loss.grad")


def test_toy_2d_data(lane):
    """(16, 2) samples (2-D toy data): rows far shorter than a block."""
    x0 = lane.gen(16, 2)
    t = torch.arange(0, 1000, 63, device=lane.device)[:16]
    seeds = lane.T(*range(16))
    got, want = lane.both(F.q_sample, x0, t, SCHED, seed=seeds, offset=2)
    lane.assert_close(got, want, op="q_sample")
    mo = lane.gen(16, 4, seed=3)
    got, want = lane.both(F.ddpm_step, mo, t, x0, SCHED, variance_type="learned_range", seed=5, offset=1)
    lane.assert_close(got, want, op="ddpm_step")
    lt, lr = lane.both(F.diffusion_loss, mo[:, :2], x0, t, SCHED, seed=5, reduction="none")
    lane.assert_close(lt, lr, atol=ATOL * max(1.0, float(lr.abs().max())), op="diffusion_loss")
