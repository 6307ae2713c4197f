"""Training: :func:`training_loss` (fused q-sampling + fused loss, the noise regenerated from
``(seed, offset)`` instead of stored), the docs/noise.md :class:`NoiseStream`, and the timestep samplers
(:class:`UniformSampler`, improved DDPM's :class:`LossAwareSampler`).

Reproducibility: one training step is a pure function of ``(seed, offset)`` (with ``offset`` the
step counter) and the model/data. The timesteps are drawn on the CPU from a ``torch.Generator``
seeded with ``splitmix64(seed, offset)`` (so they do not touch torch's global generator), then
copied to the data's device; the noise is the docs/noise.md noise of ``(seed, offset)``. On a GPU
:func:`~ddpm_fast.q_sample` and :func:`~ddpm_fast.diffusion_loss` both regenerate it, so no noise
tensor is kept between forward and backward; on a CPU (native backend), where generating the noise
is the cost, the step draws it once and passes it to both (the same values, see ``_noise_once``).

Under ``torch.compile(fullgraph=True)``: Dynamo cannot trace a ``torch.Generator``, so while it
traces, the default uniform draw runs inside one custom op (``ddpm_fast_training::uniform_timesteps``,
the same sampler and generator as eagerly, so the compiled loss equals the eager one); the seed
and offset enter it as an int64 tensor, so a changing ``offset`` does not recompile. A
:class:`LossAwareSampler` (whose ``update`` reads the losses on the host) needs eager mode.

With ``sample_index=`` (the rows' global indices in the step's batch) everything random about a
row is a pure function of ``(seed, offset, sample_index[b])`` instead: its noise is keyed by
:func:`ddpm_fast.noise.row_seeds` and its timestep drawn from :func:`ddpm_fast.noise.row_bits`
(:meth:`UniformSampler.sample_from_bits`), so a batch split over any number of ranks gives every
row what one process gives it (docs/distributed.md).
"""
from __future__ import annotations

import contextlib
from typing import Optional, Tuple, Union

import numpy as np
import torch

from . import ops
from .noise import row_bits
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


def _check_seed_offset(name: str, value) -> int:
    """``value`` as an int, checked to be an int (Python or numpy, not bool) in [0, 2**63): a training
    step's seed or offset, as :class:`NoiseStream` and :func:`training_loss` take them (host ints: the
    timestep generator is seeded from them). ValueError naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= int(value) < 2 ** 63:
        raise ValueError(f"{name} must be an int in [0, 2**63), got {value!r}")
    return int(value)


class NoiseStream:
    """A ``(seed, offset)`` source for a training run: :meth:`next` returns the pair for this step
    and advances ``offset`` by one, so every iteration draws new noise and step ``k`` of a run is
    ``(seed, start + k)``. ``state_dict``/``load_state_dict`` make it checkpointable."""

    def __init__(self, seed: int, offset: int = 0):
        self.seed = _check_seed_offset("seed", seed)
        self.offset = _check_seed_offset("offset", offset)

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
        importance weights ``1 / (T p_t)`` (so the weighted loss is unbiased).

        With the uniform weights of this class (``weights`` not overridden) ``t`` is
        ``torch.randint(0, T, (B,), generator=generator)`` and ``w`` is ones; a subclass with its own
        ``weights`` draws ``torch.multinomial(p, B, replacement=True, generator=generator)``. (randint:
        the same distribution as multinomial over T equal weights at a fraction of the cost; multinomial
        was 59 of 133 ms of a 2-D toy's training profile.)"""
        if _uniform_weights(self):
            t = torch.randint(0, self.num_timesteps, (batch_size,), generator=generator, dtype=torch.int64)
            return t, torch.ones(batch_size, dtype=torch.float32)
        w = self.weights()
        p = torch.from_numpy(w / w.sum())
        t = torch.multinomial(p, batch_size, replacement=True, generator=generator)
        weights = (1.0 / (self.num_timesteps * p[t])).to(torch.float32)
        return t, weights

    def sample_from_bits(self, bits: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(t, w)`` from 63 random bits per row (the ``sample_index=`` path of
        :func:`training_loss`), on ``bits``' device, each row's ``t`` a function of its own bits and
        :meth:`weights` only. Uniform weights: ``t = bits mod T`` (uniform on ``[0, T)`` within
        ``T / 2^63``), ``w = 1``. Otherwise the inverse CDF of ``p = weights / sum`` (float64) at
        ``u = floor(bits / 2^10) * 2^-53`` in ``[0, 1)``, ``w = 1 / (T p_t)``."""
        w = self.weights()
        T = self.num_timesteps
        if np.all(w == w[0]):
            return _uniform_from_bits(bits, T)
        p = torch.from_numpy(w / w.sum())
        cdf = torch.cumsum(p, 0).to(bits.device)
        u = (bits >> 10).to(torch.float64) * 2.0 ** -53
        t = torch.searchsorted(cdf, u, right=True).clamp_(max=T - 1)
        weights = (1.0 / (T * p.to(bits.device)[t])).to(torch.float32)
        return t, weights

    def update(self, t: torch.Tensor, losses: torch.Tensor, sample_index: Optional[torch.Tensor] = None) -> None:
        """Record per-sample losses (nothing to do for the uniform sampler)."""


def _uniform_from_bits(bits: torch.Tensor, num_timesteps: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Uniform ``(t, w)`` from 63 random bits per row: ``t = bits mod T``, ``w = 1``."""
    return bits % num_timesteps, torch.ones(bits.shape, dtype=torch.float32, device=bits.device)


def _uniform_weights(sampler) -> bool:
    """Whether ``sampler`` draws with UniformSampler's own ``sample`` and ``weights`` (then every
    importance weight is 1 by construction)."""
    cls = type(sampler)
    return (isinstance(sampler, UniformSampler) and cls.weights is UniformSampler.weights
            and cls.sample is UniformSampler.sample)


class LossAwareSampler(UniformSampler):
    """improved DDPM's importance sampling of ``t`` (Nichol & Dhariwal 2021, ``LossSecondMomentResampler``):
    ``p_t ∝ sqrt(E[L_t^2])`` over the last ``history_per_term`` losses seen at each ``t``, mixed with
    ``uniform_prob`` of the uniform distribution; uniform until every ``t`` has a full history.

    :meth:`update` copies the batch's ``(t, loss)`` to the host (one device-to-host copy per
    training step, as improved-diffusion's all-gather does); :func:`training_loss` calls it.
    With ``sample_index`` (``training_loss(..., sample_index=...)``) the rows are recorded in the
    order of their global index and, when a ``torch.distributed`` process group of more than one
    rank is initialised, after an all-gather of ``(index, t, loss)`` over ``group`` (default: the
    world), so every rank holds the state one process would, and draws the same timesteps."""

    def __init__(self, num_timesteps: int, history_per_term: int = 10, uniform_prob: float = 0.001, group=None):
        super().__init__(num_timesteps)
        self.group = group
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

    def update(self, t: torch.Tensor, losses: torch.Tensor, sample_index: Optional[torch.Tensor] = None) -> None:
        if sample_index is not None:
            from .distributed import all_gather_rows

            index, t, losses = all_gather_rows(sample_index.to(t.device), t, losses.detach(), group=self.group)
            order = torch.argsort(index.to("cpu"))
            t, losses = t.to("cpu")[order], losses.to("cpu")[order]
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


_uniform_timesteps.__annotations__ = {"seed_offset": torch.Tensor, "batch": int, "num_timesteps": int,
                                      "return": Tuple[torch.Tensor, torch.Tensor]}
_uniform_timesteps_op = torch.library.custom_op("ddpm_fast_training::uniform_timesteps", _uniform_timesteps,
                                                mutates_args=(), device_types="cpu")


@_uniform_timesteps_op.register_fake
def _(seed_offset, batch, num_timesteps):
    return (torch.empty(batch, dtype=torch.int64, device=seed_offset.device),
            torch.empty(batch, dtype=torch.float32, device=seed_offset.device))


def _check_traceable_sampler(timestep_sampler) -> None:
    if type(timestep_sampler) is not UniformSampler:
        raise TypeError(f"under torch.compile, training_loss draws t with the default UniformSampler only, "
                        f"got {type(timestep_sampler).__name__}: a LossAwareSampler reads the losses on the "
                        "host; call training_loss eagerly or draw t outside the compiled code")


def _draw_timesteps(timestep_sampler, batch: int, seed, offset: int):
    """``(t, w)`` on the CPU. While Dynamo traces, the uniform draw is one opaque op."""
    if ops._is_compiling():
        _check_traceable_sampler(timestep_sampler)
        return _uniform_timesteps_op(torch.tensor([seed, offset], dtype=torch.int64), batch,
                                     timestep_sampler.num_timesteps)
    return timestep_sampler.sample(batch, timestep_generator(seed, offset))


def _draw_indexed_timesteps(timestep_sampler, seed, offset: int, sample_index: torch.Tensor):
    """``(t, w)`` of the ``sample_index=`` path: ``sample_from_bits`` of the rows' bits. While
    Dynamo traces, the uniform sampler's branch of it without its numpy test of the weights."""
    if ops._is_compiling():
        _check_traceable_sampler(timestep_sampler)
        # a 0-d tensor: row_bits' torch.as_tensor of a traced int would specialise on its value
        bits = row_bits(seed, torch.full((), offset, dtype=torch.int64), sample_index)
        return _uniform_from_bits(bits, timestep_sampler.num_timesteps)
    return timestep_sampler.sample_from_bits(row_bits(seed, offset, sample_index))


def _unwrap(out) -> torch.Tensor:
    """The tensor of a model's output (a tensor, an object with .sample, or a tuple); sample() too."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"the model must return a tensor, an object with .sample, or a tuple; got {type(out).__name__}")


def _noise_once(x0: torch.Tensor, seed, offset: int, loss_reads_noise: bool, backend: Optional[str]):
    """The step's noise as a tensor, on the CPU with the native backend; else None (regenerate).

    q_sample and the loss each regenerate the docs/noise.md noise of ``(seed, offset)``, and the loss backward
    a third time: free on a GPU, where memory traffic is the cost, but on a CPU the noise generation
    is the cost. There the step draws it once (``gaussian_noise``, the very values the kernels
    regenerate: they compute it in fp32 too, so the results are bit for bit those of the
    ``seed=`` path) and passes ``noise=`` to both ops; the loss keeps it for its backward. Costs
    one fp32 tensor of ``x0``'s shape for the step. ``loss_reads_noise``: whether the loss needs the
    noise too (not the simple loss with ``target="sample"``, whose noise is in q_sample only).
    ``seed``: an int, or the ``(B,)`` per-row seeds of ``sample_index=``."""
    if x0.device.type != "cpu" or not loss_reads_noise:
        return None
    from .backends import resolve_backend
    if resolve_backend(backend, x0.device, x0.dtype).NAME != "native":
        return None
    return ops.gaussian_noise(x0.shape, seed, offset, device=x0.device, backend="native")


def training_loss(model, x0: torch.Tensor, schedule, *, seed: Union[int, NoiseStream], offset: int = 0,
                  target: str = "epsilon", snr_gamma: Optional[float] = None, timestep_sampler=None,
                  hybrid: bool = False, variance_type: str = "learned_range", reduction: str = "mean",
                  sample_index: Optional[torch.Tensor] = None, return_details: bool = False,
                  backend: Optional[str] = None):
    """The DDPM training loss of one batch.

    1. ``t`` (B,) drawn by ``timestep_sampler`` (default uniform) from
       :func:`timestep_generator` ``(seed, offset)``, with importance weights ``w``;
    2. ``x_t = q_sample(x0, t, schedule, seed=seed, offset=offset)`` (fused, noise from docs/noise.md);
    3. ``out = model(x_t, timestep_map[t])`` (``t`` as the ORIGINAL training timesteps; the model
       may return a tensor, an object with ``.sample`` or a tuple);
    4. per-sample loss ``diffusion_loss(out, x0, t, ..., seed=seed, offset=offset)`` — the same
       noise, regenerated — or, with ``hybrid=True``, improved DDPM's ``hybrid_loss`` (``out`` has
       ``2C`` channels, ``variance_type`` ``learned_range`` or ``learned`` as a log-variance);
    5. ``timestep_sampler.update(t, losses)``, then ``w * losses`` reduced (``mean``, ``sum`` or
       ``none``).

    ``schedule``: a :class:`NoiseSchedule` or one of our schedulers (its ``schedule``).
    ``seed``: an int with ``offset`` the step counter, or a :class:`NoiseStream` (its next pair is
    used and it advances). ``target``: what the model predicts, the loss's regression target:
    ``epsilon``, ``sample`` or ``v_prediction`` (:func:`~ddpm_fast.diffusion_loss`'s ``target``; with
    ``hybrid=True`` the first ``C`` output channels predict it, which is
    :func:`~ddpm_fast.hybrid_loss`'s ``prediction_type``, also the parametrisation its VLB term reads).
    ``snr_gamma``: min-SNR-gamma weights. ``sample_index``: a ``(B,)`` int64 tensor of the rows'
    global indices in the step's batch (e.g. ``arange(start, start + B)`` on a rank holding rows
    ``start..start+B-1``): then row ``b``'s timestep is ``timestep_sampler.sample_from_bits(
    row_bits(seed, offset, sample_index))`` and its noise is keyed by ``(seed, offset,
    sample_index[b])`` (docs/distributed.md), so a DDP step over a split batch sees what one
    process sees; pass it on the CPU (the keys are computed where it lives, then copied).
    Returns the loss (fp32), or ``(loss, details)`` with ``details = {"t", "weights", "losses",
    "seed", "offset", "sample_index"}`` when ``return_details``."""
    if not isinstance(schedule, NoiseSchedule):
        inner = getattr(schedule, "schedule", None)
        if not isinstance(inner, NoiseSchedule):
            raise TypeError(f"schedule must be a NoiseSchedule or a ddpm_fast scheduler, got {type(schedule).__name__}")
        schedule = inner
    if isinstance(seed, NoiseStream):
        if offset != 0:
            raise ValueError("give offset only with an int seed; a NoiseStream carries its own offset")
        seed, offset = seed.next()
    seed, offset = _check_seed_offset("seed", seed), _check_seed_offset("offset", offset)
    ops._check_choice("target", target, ops.LOSS_TARGETS)
    ops._check_choice("reduction", reduction, ops.REDUCTIONS)
    x0 = ops._check_tensor("x0", x0)
    if timestep_sampler is None:
        timestep_sampler = UniformSampler(schedule.num_timesteps)
    if getattr(timestep_sampler, "num_timesteps", schedule.num_timesteps) != schedule.num_timesteps:
        raise ValueError(f"timestep_sampler has {timestep_sampler.num_timesteps} timesteps, the schedule "
                         f"{schedule.num_timesteps}")
    B = x0.shape[0]
    dev = x0.device
    noise_seed = seed
    if sample_index is None:
        t_cpu, w_cpu = _draw_timesteps(timestep_sampler, B, seed, offset)
    else:
        noise_seed = ops._indexed_seed(seed, sample_index, None, B, dev).to(dev)
        if not hasattr(timestep_sampler, "sample_from_bits"):
            raise TypeError(f"timestep_sampler {type(timestep_sampler).__name__} has no sample_from_bits(bits), "
                            "which sample_index= needs (each row's timestep from its own random bits)")
        t_cpu, w_cpu = _draw_indexed_timesteps(timestep_sampler, seed, offset, sample_index)
    t = t_cpu.to(dev)
    w = w_cpu.to(dev)
    t_model = schedule.timestep_map.to(t_cpu.device)[t_cpu].to(dev)
    # the hybrid loss rebuilds x_t from the noise whatever the target
    noise = _noise_once(x0, noise_seed, offset, hybrid or target != "sample", backend)
    noise_kw = {"noise": noise} if noise is not None else {"seed": noise_seed, "offset": offset}
    with torch.no_grad() if not x0.requires_grad else contextlib.nullcontext():
        x_t = ops.q_sample(x0, t, schedule, backend=backend, **noise_kw)
    out = _unwrap(model(x_t, t_model))
    if hybrid:
        # target is what the first C output channels predict: hybrid_loss calls it prediction_type
        per_sample = ops.hybrid_loss(out, x0, t, schedule, prediction_type=target, variance_type=variance_type,
                                     snr_gamma=snr_gamma, reduction="none", backend=backend, **noise_kw)
    else:
        per_sample = ops.diffusion_loss(out, x0, t, schedule, target=target, snr_gamma=snr_gamma,
                                        reduction="none", backend=backend, **noise_kw)
    if sample_index is None:
        timestep_sampler.update(t, per_sample.detach())
    else:
        timestep_sampler.update(t, per_sample.detach(), sample_index=sample_index)
    weighted = per_sample if _uniform_weights(timestep_sampler) else per_sample * w  # w == 1: x * 1 == x
    loss = ops._reduce(weighted, reduction)
    if return_details:
        return loss, {"t": t, "weights": w, "losses": per_sample.detach(), "seed": seed, "offset": offset,
                      "sample_index": sample_index}
    return loss
