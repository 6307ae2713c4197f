"""Training: :func:`training_loss` (fused q-sampling + fused loss, the noise regenerated from
``(seed, offset)`` instead of stored), the §3 :class:`NoiseStream`, and the timestep samplers
(:class:`UniformSampler`, improved DDPM's :class:`LossAwareSampler`).

Reproducibility: one training step is a pure function of ``(seed, offset)`` (with ``offset`` the
step counter) and the model/data. The timesteps are drawn on the CPU from a ``torch.Generator``
seeded with ``splitmix64(seed, offset)`` (so they do not touch torch's global generator), then
copied to the data's device; the noise is the §3 noise of ``(seed, offset)``, which
:func:`~ddpm_fast.q_sample` and :func:`~ddpm_fast.diffusion_loss` both regenerate, so no noise
tensor is kept between forward and backward.

Under ``torch.compile(fullgraph=True)``: Dynamo cannot trace a ``torch.Generator``, so while it
traces, the default uniform draw runs inside one custom op (``ddpm_fast_training::uniform_timesteps``,
the same sampler and generator as eagerly, so the compiled loss equals the eager one); the seed
and offset enter it as an int64 tensor, so a changing ``offset`` does not recompile. A
:class:`LossAwareSampler` (whose ``update`` reads the losses on the host) needs eager mode.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Tuple, Union

import numpy as np
import torch

from . import ops
from .schedule import NoiseSchedule

__all__ = ["training_loss", "NoiseStream", "UniformSampler", "LossAwareSampler", "timestep_generator"]

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def timestep_generator(seed: int, offset: int) -> torch.Generator:
    """The CPU generator the timesteps of training step ``(seed, offset)`` are drawn from."""
    g = torch.Generator(device="cpu")
    g.manual_seed(_splitmix64(_splitmix64(int(seed)) ^ int(offset)) >> 1)
    return g


class NoiseStream:
    """A ``(seed, offset)`` source for a training run: :meth:`next` returns the pair for this step
    and advances ``offset`` by one, so every iteration draws new noise and step ``k`` of a run is
    ``(seed, start + k)``. ``state_dict``/``load_state_dict`` make it checkpointable."""

    def __init__(self, seed: int, offset: int = 0):
        for name, v in (("seed", seed), ("offset", offset)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= int(v) < 2 ** 63:
                raise ValueError(f"{name} must be an int in [0, 2**63), got {v!r}")
        self.seed = int(seed)
        self.offset = int(offset)

    def next(self) -> Tuple[int, int]:
        pair = (self.seed, self.offset)
        self.offset += 1
        return pair

    def state_dict(self) -> dict:
        return {"seed": self.seed, "offset": self.offset}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.offset = int(state["seed"]), int(state["offset"])

    def __repr__(self) -> str:
        return f"NoiseStream(seed={self.seed}, offset={self.offset})"


class UniformSampler:
    """Timesteps uniform on ``[0, T)``; importance weights all 1."""

    def __init__(self, num_timesteps: int):
        if isinstance(num_timesteps, NoiseSchedule):
            num_timesteps = num_timesteps.num_timesteps
        if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int) or num_timesteps < 1:
            raise ValueError(f"num_timesteps must be a positive int, got {num_timesteps!r}")
        self.num_timesteps = num_timesteps

    def weights(self) -> np.ndarray:
        """Unnormalised sampling weights per timestep (float64)."""
        return np.ones(self.num_timesteps, dtype=np.float64)

    def sample(self, batch_size: int, generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(t, w)`` on the CPU: ``t`` (B,) int64 drawn with ``p = weights / sum``, ``w`` (B,) fp32
        importance weights ``1 / (T p_t)`` (so the weighted loss is unbiased)."""
        w = self.weights()
        p = torch.from_numpy(w / w.sum())
        t = torch.multinomial(p, batch_size, replacement=True, generator=generator)
        weights = (1.0 / (self.num_timesteps * p[t])).to(torch.float32)
        return t, weights

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Record per-sample losses (nothing to do for the uniform sampler)."""


class LossAwareSampler(UniformSampler):
    """improved DDPM's importance sampling of ``t`` (Nichol & Dhariwal 2021, ``LossSecondMomentResampler``):
    ``p_t ∝ sqrt(E[L_t^2])`` over the last ``history_per_term`` losses seen at each ``t``, mixed with
    ``uniform_prob`` of the uniform distribution; uniform until every ``t`` has a full history.

    :meth:`update` copies the batch's ``(t, loss)`` to the host (one device-to-host copy per
    training step, as improved-diffusion's all-gather does); :func:`training_loss` calls it."""

    def __init__(self, num_timesteps: int, history_per_term: int = 10, uniform_prob: float = 0.001):
        super().__init__(num_timesteps)
        if history_per_term < 1:
            raise ValueError(f"history_per_term must be >= 1, got {history_per_term}")
        if not 0.0 <= uniform_prob <= 1.0:
            raise ValueError(f"uniform_prob must lie in [0, 1], got {uniform_prob}")
        self.history_per_term = int(history_per_term)
        self.uniform_prob = float(uniform_prob)
        self._history = np.zeros((self.num_timesteps, self.history_per_term), dtype=np.float64)
        self._counts = np.zeros(self.num_timesteps, dtype=np.int64)

    def warmed_up(self) -> bool:
        return bool((self._counts == self.history_per_term).all())

    def weights(self) -> np.ndarray:
        if not self.warmed_up():
            return np.ones(self.num_timesteps, dtype=np.float64)
        w = np.sqrt(np.mean(self._history ** 2, axis=-1))
        w = w / w.sum()
        w = w * (1 - self.uniform_prob) + self.uniform_prob / self.num_timesteps
        return w

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        ts = t.detach().to("cpu", torch.int64).numpy()
        ls = losses.detach().to("cpu", torch.float64).numpy()
        for ti, li in zip(ts.tolist(), ls.tolist()):
            if self._counts[ti] == self.history_per_term:
                self._history[ti, :-1] = self._history[ti, 1:]
                self._history[ti, -1] = li
            else:
                self._history[ti, self._counts[ti]] = li
                self._counts[ti] += 1

    def state_dict(self) -> dict:
        return {"history": self._history.copy(), "counts": self._counts.copy()}

    def load_state_dict(self, state: dict) -> None:
        self._history = np.array(state["history"], dtype=np.float64)
        self._counts = np.array(state["counts"], dtype=np.int64)


def _uniform_timesteps(seed_offset: torch.Tensor, batch: int, num_timesteps: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The default sampler's ``(t, w)`` for ``seed_offset = [seed, offset]`` (CPU int64): what
    :func:`training_loss` draws eagerly, as one op that Dynamo keeps opaque."""
    seed, offset = seed_offset.tolist()
    return UniformSampler(num_timesteps).sample(batch, timestep_generator(seed, offset))


_uniform_timesteps_op = None
if hasattr(torch.library, "custom_op"):
    _uniform_timesteps.__annotations__ = {"seed_offset": torch.Tensor, "batch": int, "num_timesteps": int,
                                          "return": Tuple[torch.Tensor, torch.Tensor]}
    _uniform_timesteps_op = torch.library.custom_op("ddpm_fast_training::uniform_timesteps", _uniform_timesteps,
                                                    mutates_args=(), device_types="cpu")

    @_uniform_timesteps_op.register_fake
    def _(seed_offset, batch, num_timesteps):
        return (torch.empty(batch, dtype=torch.int64, device=seed_offset.device),
                torch.empty(batch, dtype=torch.float32, device=seed_offset.device))


def _draw_timesteps(timestep_sampler, batch: int, seed, offset: int):
    """``(t, w)`` on the CPU. While Dynamo traces, the uniform draw is one opaque op."""
    if ops._is_compiling():
        if type(timestep_sampler) is not UniformSampler or _uniform_timesteps_op is None:
            raise TypeError(f"under torch.compile, training_loss draws t with the default UniformSampler only, "
                            f"got {type(timestep_sampler).__name__}: a LossAwareSampler reads the losses on the "
                            "host; call training_loss eagerly or draw t outside the compiled code")
        return _uniform_timesteps_op(torch.tensor([seed, offset], dtype=torch.int64), batch,
                                     timestep_sampler.num_timesteps)
    return timestep_sampler.sample(batch, timestep_generator(seed, offset))


def _unwrap(out) -> torch.Tensor:
    """The tensor of a model's output (a tensor, an object with .sample, or a tuple); sample() too."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"the model must return a tensor, an object with .sample, or a tuple; got {type(out).__name__}")


def training_loss(model, x0: torch.Tensor, schedule, *, seed: Union[int, NoiseStream], offset: int = 0,
                  target: str = "epsilon", snr_gamma: Optional[float] = None, timestep_sampler=None,
                  hybrid: bool = False, variance_type: str = "learned_range", reduction: str = "mean",
                  return_details: bool = False, backend: Optional[str] = None):
    """The DDPM training loss of one batch.

    1. ``t`` (B,) drawn by ``timestep_sampler`` (default uniform) from
       :func:`timestep_generator` ``(seed, offset)``, with importance weights ``w``;
    2. ``x_t = q_sample(x0, t, schedule, seed=seed, offset=offset)`` (fused, noise from §3);
    3. ``out = model(x_t, timestep_map[t])`` (``t`` as the ORIGINAL training timesteps; the model
       may return a tensor, an object with ``.sample`` or a tuple);
    4. per-sample loss ``diffusion_loss(out, x0, t, ..., seed=seed, offset=offset)`` — the same
       noise, regenerated — or, with ``hybrid=True``, improved DDPM's ``hybrid_loss`` (``out`` has
       ``2C`` channels, ``variance_type`` ``learned_range`` or ``learned`` as a log-variance);
    5. ``timestep_sampler.update(t, losses)``, then ``w * losses`` reduced (``mean``, ``sum`` or
       ``none``).

    ``schedule``: a :class:`NoiseSchedule` or one of our schedulers (its ``schedule``).
    ``seed``: an int with ``offset`` the step counter, or a :class:`NoiseStream` (its next pair is
    used and it advances). ``target``: ``epsilon``, ``sample`` or ``v_prediction``.
    ``snr_gamma``: min-SNR-gamma weights. Returns the loss (fp32), or ``(loss, details)`` with
    ``details = {"t", "weights", "losses", "seed", "offset"}`` when ``return_details``."""
    if not isinstance(schedule, NoiseSchedule):
        inner = getattr(schedule, "schedule", None)
        if not isinstance(inner, NoiseSchedule):
            raise TypeError(f"schedule must be a NoiseSchedule or a ddpm_fast scheduler, got {type(schedule).__name__}")
        schedule = inner
    if isinstance(seed, NoiseStream):
        if offset != 0:
            raise ValueError("give offset only with an int seed; a NoiseStream carries its own offset")
        seed, offset = seed.next()
    for name, v in (("seed", seed), ("offset", offset)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= int(v) < 2 ** 63:
            raise ValueError(f"{name} must be an int in [0, 2**63), got {v!r}")
    seed, offset = int(seed), int(offset)
    ops._check_choice("target", target, ops.LOSS_TARGETS)
    ops._check_choice("reduction", reduction, ops.REDUCTIONS)
    x0 = ops._check_tensor("x0", x0)
    if timestep_sampler is None:
        timestep_sampler = UniformSampler(schedule.num_timesteps)
    if getattr(timestep_sampler, "num_timesteps", schedule.num_timesteps) != schedule.num_timesteps:
        raise ValueError(f"timestep_sampler has {timestep_sampler.num_timesteps} timesteps, the schedule "
                         f"{schedule.num_timesteps}")
    B = x0.shape[0]
    t_cpu, w_cpu = _draw_timesteps(timestep_sampler, B, seed, offset)
    dev = x0.device
    t = t_cpu.to(dev)
    w = w_cpu.to(dev)
    t_model = schedule.timestep_map[t_cpu].to(dev)
    with torch.no_grad() if not x0.requires_grad else contextlib.nullcontext():
        x_t = ops.q_sample(x0, t, schedule, seed=seed, offset=offset, backend=backend)
    out = _unwrap(model(x_t, t_model))
    if hybrid:
        per_sample = ops.hybrid_loss(out, x0, t, schedule, seed=seed, offset=offset, prediction_type=target,
                                     variance_type=variance_type, snr_gamma=snr_gamma, reduction="none",
                                     backend=backend)
    else:
        per_sample = ops.diffusion_loss(out, x0, t, schedule, target=target, seed=seed, offset=offset,
                                        snr_gamma=snr_gamma, reduction="none", backend=backend)
    timestep_sampler.update(t, per_sample.detach())
    weighted = per_sample * w
    if reduction == "mean":
        loss = weighted.mean()
    elif reduction == "sum":
        loss = weighted.sum()
    else:
        loss = weighted
    if return_details:
        return loss, {"t": t, "weights": w, "losses": per_sample.detach(), "seed": seed, "offset": offset}
    return loss
