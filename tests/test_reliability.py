"""Reliability rules (docs/errors.md) on the CPU backends, reference and native: one test group per
rule, each of which failed before the rule was implemented.

1. a timestep outside the table (t outside [0, T), prev_t >= T, next_t outside [0, T)) gives a NaN
   row in every output of the registered ops and the backend functions, never a read outside the
   table (t = 10**12 used to segfault: those checks run in a subprocess);
2. out= sharing part of its memory with an input is refused (out = x_t itself still works);
3. zero-size inputs give empty results;
4. an expanded or otherwise unwritable out= is refused, naming out;
5. DDIM towards a noisier state (final_alpha_cumprod <= abar_t) is the deterministic map;
6. zero-SNR 0/0 (x_t == eps_hat at abar = 0) is 0, so clipping/thresholding stay finite;
7. sample_max_value <= 0 is refused;
8. seed/offset tensors on the CPU are range-checked;
9. gaussian_noise's shape takes ints only (TypeError as torch);
plus: device="cuda" on a CPU-only torch is a ValueError naming device, and the simple loss is
differentiable in x0 on every backend.
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import ddpm_fast
from ddpm_fast import NoiseSchedule
from ddpm_fast import reference as R
from conftest import backend_param

SCHED = NoiseSchedule.from_name("linear", 1000)
ZSNR = NoiseSchedule.from_name("linear", 1000, rescale_zero_snr=True)
NATIVE = ddpm_fast.backends()["native"]
needs_native = pytest.mark.skipif(not NATIVE["available"]["cpu"],
                                  reason=f"native backend unavailable on cpu: {NATIVE['reason']}")
CPU_BACKENDS = [p for p in backend_param("cpu") if p.values[0] != "triton"]   # triton: tests/triton
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _x(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _raises(exc, *names):
    return _Raises(exc, names)


class _Raises:
    """pytest.raises that also checks that the message names every one of ``names``."""

    def __init__(self, exc, names):
        self.cm, self.names = pytest.raises(exc), names

    def __enter__(self):
        self.info = self.cm.__enter__()
        return self.info

    def __exit__(self, *a):
        out = self.cm.__exit__(*a)
        msg = str(self.info.value)
        for n in self.names:
            assert n in msg, f"error message {msg!r} does not name {n!r}"
        return out


# --------------------------------------------------------------------------------------------
# 1. timesteps outside the table: NaN rows, no read outside it
# --------------------------------------------------------------------------------------------
# Run in a subprocess: before the rule, t = 10**12 read far outside the table and segfaulted.
# For every registered op and the backend modules' functions, row 0 has a timestep outside the
# table and row 1 a valid one; the script reports, per case, whether row 0 is NaN in every output
# and whether row 1 equals the same call with row 0's timestep replaced by a valid one.
_OOB_SCRIPT = r"""
import json, math, sys, torch, ddpm_fast
from ddpm_fast import reference as R
S = ddpm_fast.NoiseSchedule.from_name("linear", 10)
abar = S.table("cpu")
T = 10
ddpm_fast.backends()
ops = torch.ops.ddpm_fast
from ddpm_fast.backends import reference as ops_ref
g = torch.Generator().manual_seed(0)
x = torch.randn(2, 3, 4, generator=g)
mo = torch.randn(2, 3, 4, generator=g)
mo2 = torch.randn(2, 6, 4, generator=g)
seed, off = torch.tensor([5]), torch.tensor([2])
clip = (True, 1.0, False, 0.995, 1.0, None, True)
thr = (False, 1.0, True, 0.9, 2.0, None, True)
BAD_PREV = [T, T + 1, 10 ** 12, 2 ** 63 - 1]      # prev_t: any negative value is the final step
BAD_T = BAD_PREV + [-1, -5, -(10 ** 12), -(2 ** 63)]   # t and next_t: negative values are outside too

def calls(t, prev, nxt):
    # (name, fn) -> tuple of outputs; row 0 carries the timesteps under test
    if backend == "native":
        return [
            ("q_sample", lambda: (ops.q_sample(x, t, abar, None, seed, off),)),
            ("q_sample noise", lambda: (ops.q_sample(x, t, abar, mo, None, None),)),
            ("ddpm_step sample", lambda: ops.ddpm_step(mo, t, prev, x, abar, None, seed, off, "sample",
                                                       "fixed_small", *clip)),
            ("ddpm_step eps thr", lambda: ops.ddpm_step(mo, t, prev, x, abar, None, seed, off, "epsilon",
                                                        "fixed_large", *thr)),
            ("ddpm_step learned", lambda: ops.ddpm_step(mo2, t, prev, x, abar, None, seed, off, "v_prediction",
                                                        "learned_range", *clip)),
            ("ddim_step", lambda: ops.ddim_step(mo, t, prev, x, abar, None, seed, off, 0.5, "sample", True, 1.0,
                                                *clip)),
            ("ddim_step thr", lambda: ops.ddim_step(mo, t, prev, x, abar, None, None, None, 0.0, "epsilon", False,
                                                    0.9, *thr)),
            ("ddim_reverse_step", lambda: ops.ddim_reverse_step(mo, t, nxt, x, abar, "sample", False, *clip)),
            ("diffusion_loss eps", lambda: (ops.diffusion_loss(mo, x, t, abar, None, seed, off, "epsilon", None),)),
            ("diffusion_loss x0 snr", lambda: (ops.diffusion_loss(mo, x, t, abar, None, seed, off, "sample", 5.0),)),
            ("diffusion_loss v", lambda: (ops.diffusion_loss(mo, x, t, abar, None, seed, off, "v_prediction", None),)),
            ("diffusion_loss_backward", lambda: (ops.diffusion_loss_backward(torch.ones(2), mo, x, t, abar, None, seed,
                                                                             off, "sample", None),)),
            ("vlb_loss", lambda: (ops.vlb_loss(mo2, x.clamp(-1, 1), x, t, abar, "sample", "learned_range"),)),
            ("vlb_loss fixed", lambda: (ops.vlb_loss(mo, x.clamp(-1, 1), x, t, abar, "epsilon", "fixed_large"),)),
            ("q_sample grad", lambda: grad_q(t)),
        ]
    from ddpm_fast.step_options import StepOptions
    kw = dict(opts=StepOptions(clip_sample=True, clip_sample_range=1.0, thresholding=False,
                               dynamic_thresholding_ratio=0.995, sample_max_value=1.0, guidance_scale=None,
                               return_x0=True))
    return [
        ("q_sample", lambda: (ops_ref.q_sample(x, t, abar, None, seed, off),)),
        ("ddpm_step sample", lambda: ops_ref.ddpm_step(mo, t, prev, x, abar, None, seed, off, prediction_type="sample",
                                                       variance_type="fixed_small", out=None, **kw)),
        ("ddim_step", lambda: ops_ref.ddim_step(mo, t, prev, x, abar, None, seed, off, eta=0.5, prediction_type="sample",
                                                use_clipped_model_output=True, final_alpha_cumprod=1.0,
                                                out=None, **kw)),
        ("ddim_reverse_step", lambda: ops_ref.ddim_reverse_step(mo, t, nxt, x, abar, prediction_type="sample",
                                                                use_clipped_model_output=False,
                                                                out=None, **kw)),
        ("diffusion_loss x0", lambda: (ops_ref.diffusion_loss(mo, x, t, abar, None, seed, off, target="sample",
                                                              snr_gamma=None),)),
        ("diffusion_loss eps", lambda: (ops_ref.diffusion_loss(mo, x, t, abar, None, seed, off, target="epsilon",
                                                               snr_gamma=None),)),
        ("vlb_loss", lambda: (ops_ref.vlb_loss(mo2, x.clamp(-1, 1), x, t, abar, prediction_type="sample",
                                               variance_type="learned_range"),)),
    ]

def grad_q(t):
    x0 = x.clone().requires_grad_(True)
    ddpm_fast.backends.native.q_sample(x0, t, abar, None, seed, off).sum().backward()
    return (x0.grad,)

def row(v, i):
    return v[i] if v.numel() else v

def check(kind, bad):
    ok_t, ok_prev, ok_next = torch.tensor([6, 4]), torch.tensor([5, 3]), torch.tensor([7, 5])
    t, prev, nxt = ok_t.clone(), ok_prev.clone(), ok_next.clone()
    if kind == "t":
        t[0] = bad
    elif kind == "prev":
        prev[0] = bad
    else:
        nxt[0] = bad
    out = []
    for (name, fn), (_, ref_fn) in zip(calls(t, prev, nxt), calls(ok_t, ok_prev, ok_next)):
        if kind == "prev" and not ("ddpm" in name or "ddim_step" in name):
            continue
        if kind == "next" and "reverse" not in name:
            continue
        try:
            got, want = fn(), ref_fn()
        except Exception as e:
            out.append([kind, bad, name, "raised " + type(e).__name__ + ": " + str(e)[:200]])
            continue
        nan_row = all(bool(torch.isnan(row(o, 0)).all()) for o in got if o.numel())
        same_row1 = all(torch.equal(row(a, 1), row(b, 1)) or bool(torch.isnan(row(b, 1)).all())
                        for a, b in zip(got, want) if a.numel())
        out.append([kind, bad, name, "ok" if (nan_row and same_row1) else f"nan_row={nan_row} row1={same_row1}"])
    return out

report = {}
for backend in sys.argv[1:]:
    results = []
    for bad in BAD_T:
        results += check("t", bad)
    for bad in BAD_PREV:
        results += check("prev", bad)
    for bad in BAD_T:
        results += check("next", bad)
    report[backend] = results
print(json.dumps(report))
"""


_OOB_RESULTS = {}


def _run_oob(backend):
    """The script's results for backend (one subprocess runs every backend, on first use)."""
    if not _OOB_RESULTS:
        backends = ["reference"] + (["native"] if NATIVE["available"]["cpu"] else [])
        _OOB_RESULTS.update(_run_oob_subprocess(backends))
    return _OOB_RESULTS[backend]


def _run_oob_subprocess(backends):
    # the subprocess imports the very ddpm_fast this session imported
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(ddpm_fast.__file__)))
    env = dict(os.environ, PYTHONPATH=package_root + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", _OOB_SCRIPT, *backends], env=env, capture_output=True, text=True,
                       timeout=300, cwd=package_root)
    assert r.returncode == 0, f"the subprocess died (rc {r.returncode}: a read outside the table?):\n{r.stderr[-3000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


@needs_native
def test_registered_native_ops_give_nan_rows_outside_the_table():
    results = _run_oob("native")
    bad = [r for r in results if r[3] != "ok"]
    assert len(results) >= 148
    assert not bad, f"{len(bad)} of {len(results)} cases: {bad[:10]}"


def test_reference_backend_gives_nan_rows_outside_the_table():
    results = _run_oob("reference")
    bad = [r for r in results if r[3] != "ok"]
    assert len(results) > 50
    assert not bad, f"{len(bad)} of {len(results)} cases: {bad[:10]}"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradients_of_a_nan_row_are_nan_and_the_rest_exact(backend):
    import importlib
    impl = importlib.import_module("ddpm_fast.backends.native" if backend == "native" else "ddpm_fast.backends.reference")
    abar = SCHED.table("cpu")
    x0 = _x(2, 3, 4).requires_grad_(True)
    mo = _x(2, 3, 4, seed=1).requires_grad_(True)
    t = torch.tensor([1000, 10])
    loss = impl.diffusion_loss(mo, x0, t, abar, None, torch.tensor([1]), torch.tensor([0]), target="v_prediction",
                               snr_gamma=None)
    assert torch.isnan(loss[0]) and torch.isfinite(loss[1])
    loss.nansum().backward()
    assert torch.isnan(mo.grad[0]).all() and torch.isfinite(mo.grad[1]).all()
    assert torch.isnan(x0.grad[0]).all() and torch.isfinite(x0.grad[1]).all()


# --------------------------------------------------------------------------------------------
# 2. out= sharing part of an input's memory
# --------------------------------------------------------------------------------------------
def _step_call(op, mo, x_t, **kw):
    if op == "ddpm":
        return ddpm_fast.ddpm_step(mo, 500, x_t, SCHED, seed=3, **kw)
    if op == "ddim":
        return ddpm_fast.ddim_step(mo, 500, x_t, SCHED, prev_t=450, eta=0.5, seed=3, **kw)
    return ddpm_fast.ddim_reverse_step(mo, 500, x_t, SCHED, next_t=520, **kw)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("op", ["ddpm", "ddim", "reverse"])
def test_partial_overlap_of_out_is_refused(backend, op):
    n = 2 * 300
    buf = _x(n + 1)
    x_t, shifted = buf[:n].view(2, 300), buf[1:].view(2, 300)
    mo = _x(2, 300, seed=1)
    with _raises(ValueError, "out", "x_t"):
        _step_call(op, mo, x_t, out=shifted, backend=backend)
    mbuf = _x(n + 1, seed=2)
    with _raises(ValueError, "out", "model_output"):
        _step_call(op, mbuf[:n].view(2, 300), x_t.clone(), out=mbuf[1:].view(2, 300), backend=backend)
    # a transposed view of x_t's memory is not x_t either
    sq = _x(4, 4, seed=3)
    with _raises(ValueError, "out"):
        _step_call(op, _x(4, 4, seed=4), sq, out=sq.t(), backend=backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_partial_overlap_with_noise_is_refused(backend):
    buf = _x(13)
    noise, out = buf[:12].view(3, 4), buf[1:].view(3, 4)
    with _raises(ValueError, "out", "noise"):
        ddpm_fast.ddpm_step(_x(3, 4), 500, _x(3, 4, seed=1), SCHED, noise=noise, out=out, backend=backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("op", ["ddpm", "ddim", "reverse"])
def test_exact_alias_and_disjoint_interleaved_views_work(backend, op):
    mo, x = _x(2, 3, 8, 8), _x(2, 3, 8, 8, seed=1)
    want = _step_call(op, mo, x, backend="reference")
    xt = x.clone()
    got = _step_call(op, mo, xt, out=xt, backend=backend)
    assert got is xt
    torch.testing.assert_close(xt, want, rtol=1e-5, atol=1e-5)
    # out and x_t interleaved in one buffer (even / odd columns): no element is shared
    buf = torch.empty(2, 3, 8, 16)
    buf[..., ::2] = x
    got = _step_call(op, mo, buf[..., ::2], out=buf[..., 1::2], backend=backend)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(buf[..., ::2], x, rtol=0, atol=0)   # x_t untouched


@needs_native
def test_registered_ops_refuse_partial_overlap():
    ddpm_fast.backends()
    ops = torch.ops.ddpm_fast
    abar = SCHED.table("cpu")
    buf = _x(2 * 300 + 1)
    x_t, shifted = buf[:600].view(2, 300), buf[1:].view(2, 300)
    mo = _x(2, 300, seed=1)
    t, pt = torch.tensor([500, 400]), torch.tensor([499, 399])
    clip = (True, 1.0, False, 0.995, 1.0, None, False)
    seed, off = torch.tensor([1]), torch.tensor([0])
    with _raises(ValueError, "out", "x_t"):
        ops.ddpm_step_out(mo, t, pt, x_t, abar, None, seed, off, "epsilon", "fixed_small", *clip, shifted)
    with _raises(ValueError, "out", "x_t"):
        ops.ddim_step_out(mo, t, pt, x_t, abar, None, seed, off, 0.0, "epsilon", False, 1.0, *clip, shifted)
    with _raises(ValueError, "out", "x_t"):
        ops.ddim_reverse_step_out(mo, pt, t, x_t, abar, "epsilon", False, *clip, shifted)
    with _raises(ValueError, "out"):
        ops.ddpm_step_out(mo, t, pt, x_t.clone(), abar, None, seed, off, "epsilon", "fixed_small", *clip,
                          torch.zeros(1, 300).expand(2, 300))
    xt = x_t.clone()
    ops.ddpm_step_out(mo, t, pt, xt, abar, None, seed, off, "epsilon", "fixed_small", *clip, xt)  # in place works


# --------------------------------------------------------------------------------------------
# 3. zero-size inputs
# --------------------------------------------------------------------------------------------
_EMPTY_SHAPES = [(0,), (0, 3), (0, 2, 4, 4), (2, 0), (3, 0, 4), (2, 3, 0, 5)]


def _t_forms(B):
    return [5, torch.tensor(5), torch.full((B,), 5, dtype=torch.int64)]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", _EMPTY_SHAPES, ids=str)
def test_zero_size_inputs_give_empty_results(backend, shape):
    B = shape[0]
    x = torch.randn(shape)
    mo = torch.randn(shape)
    learned_shape = list(shape)
    if len(shape) > 1:
        learned_shape[1] *= 2
    mo2 = torch.randn(learned_shape)
    for t in _t_forms(B):
        assert ddpm_fast.q_sample(x, t, SCHED, seed=1, backend=backend).shape == shape
        for kw in (dict(), dict(thresholding=True, sample_max_value=2.0), dict(guidance_scale=2.0)):
            m = torch.cat([mo, mo]) if "guidance_scale" in kw else mo
            prev, x0 = ddpm_fast.ddpm_step(m, t, x, SCHED, seed=1, return_x0=True, backend=backend, **kw)
            assert prev.shape == shape and x0.shape == shape
            prev, x0 = ddpm_fast.ddim_step(m, t, x, SCHED, prev_t=4, eta=1.0, seed=1, return_x0=True,
                                           backend=backend, **kw)
            assert prev.shape == shape and x0.shape == shape
            assert ddpm_fast.ddim_reverse_step(m, t, x, SCHED, next_t=6, backend=backend, **kw).shape == shape
        out = torch.empty(shape)
        assert ddpm_fast.ddpm_step(mo, t, x, SCHED, seed=1, out=out, backend=backend) is out
        if len(shape) > 1:
            assert ddpm_fast.ddpm_step(mo2, t, x, SCHED, variance_type="learned_range", seed=1,
                                       backend=backend).shape == shape
            assert ddpm_fast.vlb_loss(mo2, x, x, t, SCHED, reduction="none", backend=backend).shape == (B,)
            assert ddpm_fast.hybrid_loss(mo2, x, t, SCHED, seed=1, reduction="none", backend=backend).shape == (B,)
        for target in ("epsilon", "sample", "v_prediction"):
            loss = ddpm_fast.diffusion_loss(mo, x, t, SCHED, target=target, seed=1, snr_gamma=5.0,
                                            reduction="none", backend=backend)
            assert loss.shape == (B,)
            # a sample with no elements has a NaN mean, as torch's mean of nothing
            assert torch.isnan(loss).all()
    assert ddpm_fast.gaussian_noise(shape, 3, backend=backend).shape == shape
    # per-row seeds of an empty batch, and an empty noise tensor
    for noise in (dict(seed=torch.zeros((B,), dtype=torch.int64)), dict(noise=torch.randn(shape))):
        assert ddpm_fast.q_sample(x, 5, SCHED, backend=backend, **noise).shape == shape
        assert ddpm_fast.diffusion_loss(mo, x, 5, SCHED, reduction="none", backend=backend, **noise).shape == (B,)
        assert ddpm_fast.ddpm_step(mo, 5, x, SCHED, backend=backend, **noise).shape == shape


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_zero_size_gradients(backend):
    mo = torch.randn(0, 3, requires_grad=True)
    x = torch.randn(0, 3, requires_grad=True)
    loss = ddpm_fast.diffusion_loss(mo, x, torch.zeros(0, dtype=torch.int64), SCHED, target="sample",
                                    reduction="sum", backend=backend)
    loss.backward()
    assert mo.grad.shape == (0, 3)


# --------------------------------------------------------------------------------------------
# 4. out= that cannot be written element by element
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_unwritable_out_is_refused_naming_out(backend):
    mo, x = _x(2, 3), _x(2, 3, seed=1)
    with _raises(ValueError, "out", "expanded"):
        ddpm_fast.ddpm_step(mo, 5, x, SCHED, seed=1, out=torch.zeros(1, 3).expand(2, 3), backend=backend)
    with _raises(ValueError, "out", "expanded"):
        ddpm_fast.ddim_step(mo, 5, x, SCHED, prev_t=4, out=torch.zeros(4).as_strided((2, 3), (1, 1)), backend=backend)
    with _raises(ValueError, "out", "requires grad"):
        ddpm_fast.ddpm_step(mo, 5, x, SCHED, seed=1, out=torch.zeros(2, 3, requires_grad=True), backend=backend)
    with torch.inference_mode():
        inf_out = torch.zeros(2, 3)
    with _raises(ValueError, "out", "inference"):
        ddpm_fast.ddim_reverse_step(mo, 5, x, SCHED, next_t=6, out=inf_out, backend=backend)
    with torch.no_grad():   # a leaf that requires grad may be written under no_grad, as torch allows
        leaf = torch.zeros(2, 3, requires_grad=True)
        assert ddpm_fast.ddpm_step(mo, 5, x, SCHED, seed=1, out=leaf, backend=backend) is leaf


# --------------------------------------------------------------------------------------------
# 5. DDIM towards a noisier state
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v_prediction"])
def test_ddim_final_step_below_abar_t_is_the_deterministic_map(backend, prediction):
    mo, x = _x(3, 4, 5), _x(3, 4, 5, seed=1)
    t = 20
    a = SCHED.alphas_cumprod[t].item()
    for final in (0.5 * a, 0.0):
        for eta in (0.0, 1.0):
            got, x0 = ddpm_fast.ddim_step(mo, t, x, SCHED, prev_t=-1, eta=eta, final_alpha_cumprod=final,
                                          prediction_type=prediction, clip_sample=False, seed=7, return_x0=True,
                                          backend=backend)
            assert torch.isfinite(got).all(), (final, eta)
            eps = R.eps_from_prediction(mo.double(), x.double(), torch.tensor([a] * 3, dtype=torch.float64),
                                        prediction)
            want = math.sqrt(final) * x0.double() + math.sqrt(1 - final) * eps   # no noise: sigma = 0
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# 6. zero-SNR 0/0
# --------------------------------------------------------------------------------------------
def _zsnr_inputs(dtype=torch.float32):
    x_t, eps = _x(2, 3, 4, dtype=dtype), _x(2, 3, 4, seed=1, dtype=dtype)
    eps[0, 1, 2] = x_t[0, 1, 2]       # x_t == eps_hat exactly: (x_t - eps) / 0 = 0/0
    eps[1, 0, 0] = x_t[1, 0, 0]
    return x_t, eps


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_zero_snr_zero_over_zero_is_finite_under_clipping_and_thresholding(backend, dtype):
    x_t, eps = _zsnr_inputs(dtype)
    for kw in (dict(), dict(clip_sample_range=2.0), dict(thresholding=True, sample_max_value=3.0)):
        prev, x0 = ddpm_fast.ddpm_step(eps, 999, x_t, ZSNR, seed=1, return_x0=True, backend=backend, **kw)
        assert torch.isfinite(prev).all() and torch.isfinite(x0).all(), kw
        assert x0[0, 1, 2] == 0 and x0[1, 0, 0] == 0
        for uc in (False, True):
            prev, x0 = ddpm_fast.ddim_step(eps, 999, x_t, ZSNR, prev_t=899, eta=0.5, seed=1, return_x0=True,
                                           use_clipped_model_output=uc, backend=backend, **kw)
            assert torch.isfinite(prev).all() and torch.isfinite(x0).all(), (kw, uc)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_zero_snr_without_clipping_gives_inf_never_nan(backend):
    x_t, eps = _zsnr_inputs()
    prev, x0 = ddpm_fast.ddpm_step(eps, 999, x_t, ZSNR, seed=1, clip_sample=False, return_x0=True, backend=backend)
    assert not torch.isnan(prev).any() and not torch.isnan(x0).any()
    assert x0[0, 1, 2] == 0 and torch.isinf(x0[0, 0, 0])
    prev = ddpm_fast.ddim_step(eps, 999, x_t, ZSNR, prev_t=899, clip_sample=False, use_clipped_model_output=True,
                               backend=backend)
    assert not torch.isnan(prev).any()
    mo = torch.cat([eps, torch.zeros_like(eps)], 1)
    vlb = ddpm_fast.vlb_loss(mo, x_t.clamp(-1, 1), x_t, 999, ZSNR, reduction="none", backend=backend)
    assert not torch.isnan(vlb).any()


# --------------------------------------------------------------------------------------------
# 7. sample_max_value
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_sample_max_value_must_be_positive(backend):
    mo, x = _x(2, 3), _x(2, 3, seed=1)
    for bad in (0.0, -1.0, 0):
        with _raises(ValueError, "sample_max_value"):
            ddpm_fast.ddpm_step(mo, 5, x, SCHED, seed=1, thresholding=True, sample_max_value=bad, backend=backend)
        with _raises(ValueError, "sample_max_value"):
            ddpm_fast.ddim_step(mo, 5, x, SCHED, prev_t=4, thresholding=True, sample_max_value=bad, backend=backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_sample_max_value_below_one_is_the_threshold(backend):
    mo, x = _x(2, 3, 8) * 4, _x(2, 3, 8, seed=1)
    _, x0 = ddpm_fast.ddpm_step(mo, 5, x, SCHED, prediction_type="sample", seed=1, thresholding=True,
                                sample_max_value=0.5, return_x0=True, backend=backend)
    torch.testing.assert_close(x0, mo.clamp(-0.5, 0.5) / 0.5, rtol=1e-6, atol=1e-6)


@needs_native
def test_registered_op_refuses_zero_sample_max_value():
    ddpm_fast.backends()
    abar = SCHED.table("cpu")
    with _raises(ValueError, "sample_max_value"):
        torch.ops.ddpm_fast.ddpm_step(_x(2, 3), torch.tensor([5, 5]), torch.tensor([4, 4]), _x(2, 3), abar, None,
                                      torch.tensor([1]), torch.tensor([0]), "epsilon", "fixed_small", False, 1.0, True,
                                      0.995, 0.0, None, False)


# --------------------------------------------------------------------------------------------
# 8. seed and offset tensors
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_negative_seed_and_offset_tensors_are_refused(backend):
    x = _x(3, 4)
    for seed in (torch.tensor(-1), torch.tensor([1, -2, 3]), torch.tensor(-(2 ** 63))):
        with _raises(ValueError, "seed", "2**63"):
            ddpm_fast.q_sample(x, 5, SCHED, seed=seed, backend=backend)
        with _raises(ValueError, "seed"):
            ddpm_fast.gaussian_noise((3, 4), seed, backend=backend)
    for offset in (torch.tensor(-1), torch.tensor([-5])):
        with _raises(ValueError, "offset", "2**63"):
            ddpm_fast.q_sample(x, 5, SCHED, seed=1, offset=offset, backend=backend)
        with _raises(ValueError, "offset"):
            ddpm_fast.ddpm_step(x, 5, x, SCHED, seed=1, offset=offset, backend=backend)
    # the edges of [0, 2**63) work
    a = ddpm_fast.q_sample(x, 5, SCHED, seed=torch.tensor([0, 2 ** 63 - 1, 7]), offset=torch.tensor(2 ** 63 - 1),
                           backend=backend)
    assert torch.isfinite(a).all()


# --------------------------------------------------------------------------------------------
# 9. gaussian_noise's shape
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_noise_shape_takes_ints_only(backend):
    for bad in ((2.5, 3), ("2", "3"), (True, 3), (2, 3.0)):
        with _raises(TypeError, "shape"):
            ddpm_fast.gaussian_noise(bad, 1, backend=backend)
        with pytest.raises(TypeError):
            torch.zeros(bad)   # as torch
    for bad in ("23", 5, None):
        with _raises(TypeError, "shape"):
            ddpm_fast.gaussian_noise(bad, 1, backend=backend)
    for bad in ((), (2, -1)):
        with _raises(ValueError, "shape"):
            ddpm_fast.gaussian_noise(bad, 1, backend=backend)
    import numpy as np
    for ok in ((2, 3), [2, 3], torch.Size([2, 3]), (np.int64(2), 3), (torch.tensor(2), 3)):
        assert ddpm_fast.gaussian_noise(ok, 1, backend=backend).shape == (2, 3)


# --------------------------------------------------------------------------------------------
# device arguments without CUDA (issue: torch's AssertionError was seen)
# --------------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here: device='cuda' is valid")
def test_cuda_device_without_cuda_is_a_value_error_naming_device():
    with _raises(ValueError, "device", "cuda"):
        ddpm_fast.gaussian_noise((2, 3), 1, device="cuda")
    with _raises(ValueError, "device", "cuda"):
        ddpm_fast.gaussian_noise((2, 3), 1, device=torch.device("cuda", 0), backend="reference")
    with _raises(ValueError, "device"):
        SCHED.to("cuda")
    with _raises(ValueError, "device"):
        ddpm_fast.DDPMScheduler().set_timesteps(10, device="cuda")
    with _raises(ValueError, "device"):
        ddpm_fast.sample(lambda x, t: x, (2, 3), SCHED, 2, seed=1, device="cuda", progress=False)
    with _raises(ValueError, "device"):
        ddpm_fast.gaussian_noise((2, 3), 1, device="nonsense")


# --------------------------------------------------------------------------------------------
# the simple loss's gradient in x0
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("target", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("mo_dtype", [torch.float32, torch.bfloat16])
def test_diffusion_loss_gradient_in_x0(backend, target, mo_dtype):
    grads = {}
    for b in (backend, "reference"):
        x0 = _x(3, 2, 5).requires_grad_(True)
        mo = _x(3, 2, 5, seed=1).to(mo_dtype).requires_grad_(True)
        loss = ddpm_fast.diffusion_loss(mo, x0, torch.tensor([0, 400, 999]), SCHED, target=target, seed=4,
                                        snr_gamma=5.0, reduction="none", backend=b)
        (loss * torch.tensor([1.0, -2.0, 0.5])).sum().backward()
        grads[b] = (mo.grad, x0.grad)
    if target == "epsilon":
        assert grads[backend][1] is None and grads["reference"][1] is None   # the target is the noise
    else:
        torch.testing.assert_close(grads[backend][1], grads["reference"][1], rtol=1e-5, atol=1e-6)
    rtol = 1e-5 if mo_dtype == torch.float32 else 2.0 ** -7
    torch.testing.assert_close(grads[backend][0].double(), grads["reference"][0].double(), rtol=rtol, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_vlb_and_hybrid_gradients_in_x0_and_x_t(backend):
    grads = {}
    for b in (backend, "reference"):
        g = torch.Generator().manual_seed(3)
        x0 = (torch.rand(3, 2, 5, generator=g) * 2 - 1).requires_grad_(True)
        x_t = torch.randn(3, 2, 5, generator=g).requires_grad_(True)
        mo = torch.cat([torch.randn(3, 2, 5, generator=g), torch.rand(3, 2, 5, generator=g) * 2 - 1], 1)
        mo.requires_grad_(True)
        t = torch.tensor([0, 300, 999])
        vlb = ddpm_fast.vlb_loss(mo, x0, x_t, t, SCHED, reduction="none", backend=b)
        hyb = ddpm_fast.hybrid_loss(mo, x0, t, SCHED, seed=2, prediction_type="sample", reduction="none", backend=b)
        ((vlb + hyb) * torch.tensor([1.0, -0.5, 2.0])).sum().backward()
        grads[b] = (mo.grad, x0.grad, x_t.grad)
    for got, want in zip(grads[backend], grads["reference"]):
        assert got is not None and want is not None
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
