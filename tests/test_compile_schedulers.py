"""The drop-in schedulers' ``step`` (and the parallel ``batch_step_no_noise``) under
``torch.compile(fullgraph=True, backend="aot_eager")``: the first call traces, a tensor timestep
is never read on the host, and changing it does not recompile; results equal eager.

Two lanes. "scheduler": the functional ops are replaced by their pure-PyTorch reference formulas
(``ddpm_fast.reference``), so this lane checks the scheduler side alone (its timestep lookup,
noise choice, offset advance and output object) whatever the state of the ops. "ops": the real
fused ops; it skips, saying why, while the ops themselves do not trace.
"""
from __future__ import annotations

import functools

import pytest
import torch

import ddpm_fast
from ddpm_fast import reference as R
from ddpm_fast.schedulers import (DDIMInverseScheduler, DDIMParallelScheduler, DDIMScheduler, DDPMParallelScheduler,
                                  DDPMScheduler)

try:
    from torch._dynamo.backends.registry import lookup_backend
    _AOT = lookup_backend("aot_eager")
except Exception as e:  # pragma: no cover - torch without dynamo
    _AOT = None
    _why = f"torch.compile's aot_eager backend is unavailable: {type(e).__name__}: {e}"
pytestmark = pytest.mark.skipif(_AOT is None, reason=_why if _AOT is None else "")


def _rows(t, B):
    t = torch.as_tensor(t)
    return t.reshape(-1).expand(B) if t.numel() == 1 else t


def _stand_in_ddpm(model_output, t, x_t, schedule, *, prev_t=None, noise=None, seed=None, offset=0, return_x0=False,
                   backend=None, **kw):
    B = x_t.shape[0]
    noise = noise if noise is not None else torch.zeros_like(x_t)  # the counter noise is the ops' business
    out = R.ddpm_step(model_output, _rows(t, B), _rows(prev_t, B), x_t, schedule.alphas_cumprod, noise, **kw)
    return out if return_x0 else out[0]


def _stand_in_ddim(model_output, t, x_t, schedule, *, prev_t, noise=None, seed=None, offset=0, return_x0=False,
                   backend=None, **kw):
    B = x_t.shape[0]
    noise = noise if noise is not None else torch.zeros_like(x_t)
    out = R.ddim_step(model_output, _rows(t, B), _rows(prev_t, B), x_t, schedule.alphas_cumprod, noise, **kw)
    return out if return_x0 else out[0]


def _stand_in_reverse(model_output, t, x_t, schedule, *, next_t, return_x0=False, backend=None, **kw):
    B = x_t.shape[0]
    out = R.ddim_reverse_step(model_output, _rows(t, B), _rows(next_t, B), x_t, schedule.alphas_cumprod, **kw)
    return out if return_x0 else out[0]


@functools.lru_cache(maxsize=None)
def _ops_trace_problem():
    """None when the functional ops trace with fullgraph=True, else why not."""
    s = ddpm_fast.NoiseSchedule.from_name("linear", 100)

    def f(mo, t, x, p):
        return ddpm_fast.ddim_step(mo, t, x, s, prev_t=p)

    try:
        torch.compile(f, fullgraph=True, backend="aot_eager")(torch.randn(2, 3), torch.tensor([50, 50]),
                                                              torch.randn(2, 3), torch.tensor([40, 40]))
    except Exception as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    finally:
        torch._dynamo.reset()
    return None


@pytest.fixture(params=["scheduler", "ops"])
def lane(request, monkeypatch):
    if request.param == "scheduler":
        monkeypatch.setattr(ddpm_fast.ops, "ddpm_step", _stand_in_ddpm)
        monkeypatch.setattr(ddpm_fast.ops, "ddim_step", _stand_in_ddim)
        monkeypatch.setattr(ddpm_fast.ops, "ddim_reverse_step", _stand_in_reverse)
    else:
        why = _ops_trace_problem()
        if why is not None:
            pytest.skip(f"the functional ops do not trace with fullgraph=True yet ({why})")
    torch._dynamo.reset()
    yield request.param
    torch._dynamo.reset()


def _counting_compile(fn):
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return _AOT(gm, example_inputs)

    return torch.compile(fn, fullgraph=True, backend=backend), graphs


def _make(kind):
    """(scheduler, a function of (model_output, t, x, noise) calling the method under test)."""
    cfg = dict(num_train_timesteps=100, clip_sample=True)
    if kind == "ddpm":
        s = DDPMScheduler(**cfg)
        fn = lambda mo, t, x, z: s.step(mo, t, x, variance_noise=z).prev_sample  # noqa: E731
    elif kind == "ddpm_counter_noise":  # no generator, no variance_noise: the lazily drawn seed
        s = DDPMScheduler(**cfg)
        fn = lambda mo, t, x, z: s.step(mo, t, x).prev_sample  # noqa: E731
    elif kind == "ddim":
        s = DDIMScheduler(**cfg)
        fn = lambda mo, t, x, z: s.step(mo, t, x, eta=0.5, variance_noise=z).prev_sample  # noqa: E731
    elif kind == "ddim_inverse":
        s = DDIMInverseScheduler(**cfg)
        fn = lambda mo, t, x, z: s.step(mo, t, x).prev_sample  # noqa: E731
    elif kind == "ddpm_parallel":
        s = DDPMParallelScheduler(**cfg)
        fn = lambda mo, t, x, z: s.batch_step_no_noise(mo, t.expand(x.shape[0]), x)  # noqa: E731
    else:
        s = DDIMParallelScheduler(**cfg)
        fn = lambda mo, t, x, z: s.batch_step_no_noise(mo, t.expand(x.shape[0]), x)  # noqa: E731
    s.set_timesteps(10)
    return s, fn


KINDS = ["ddpm", "ddpm_counter_noise", "ddim", "ddim_inverse", "ddpm_parallel", "ddim_parallel"]


@pytest.mark.parametrize("kind", KINDS)
def test_step_traces_and_changing_t_does_not_recompile(lane, kind):
    if lane == "ops" and kind not in ("ddpm", "ddpm_counter_noise", "ddim"):
        pytest.skip("the ops lane runs DDPM and DDIM (the scheduler lane covers every class)")
    s, fn = _make(kind)
    cf, graphs = _counting_compile(fn)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 4, generator=g)
    mo = torch.randn(2, 3, 4, 4, generator=g)
    z = torch.randn(2, 3, 4, 4, generator=g)
    ts = list(s.timesteps[:4])  # 0-d CPU tensors, as the pipelines pass them
    torch.manual_seed(3)
    compiled = [cf(mo, t, x, z) for t in ts]
    offsets_after_compiled, seed_compiled = int(s.noise_offset), s._noise_seed
    s.set_timesteps(10)
    torch.manual_seed(3)
    eager = [fn(mo, t, x, z) for t in ts]
    # the lazy seed: drawn inside the graph from the same global generator, only where needed
    assert seed_compiled == s._noise_seed and (seed_compiled is None) == (kind != "ddpm_counter_noise")
    # the lazy seed draw flips a Python attribute at the first call: one recompile at most there
    assert len(graphs) <= (2 if kind == "ddpm_counter_noise" else 1), f"{len(graphs)} graphs for 4 timesteps"
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    if kind in ("ddpm", "ddpm_counter_noise", "ddim"):
        assert offsets_after_compiled == 4  # the in-place offset advance ran in the graph


def test_per_row_device_timesteps_trace(lane):
    s = DDIMScheduler(num_train_timesteps=100)
    s.set_timesteps(10)
    cf, graphs = _counting_compile(lambda mo, t, x: s.step(mo, t, x, return_dict=False)[0])
    x, mo = torch.randn(3, 2), torch.randn(3, 2)
    outs = [cf(mo, s.timesteps[torch.tensor(rows)], x) for rows in ([0, 1, 2], [3, 5, 9], [9, 9, 0])]
    assert len(graphs) == 1
    for rows, out in zip(([0, 1, 2], [3, 5, 9], [9, 9, 0]), outs):
        torch.testing.assert_close(out, s.step(mo, s.timesteps[torch.tensor(rows)], x).prev_sample,
                                   rtol=1e-6, atol=1e-6)
