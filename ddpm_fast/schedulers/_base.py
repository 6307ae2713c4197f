"""What the five drop-in schedulers share: the float64 tables built from diffusers' constructor
arguments, the per-device lookup tables a step reads (so a step makes no host copy), the timestep
resolution of ``step``, the noise (a ``generator`` as diffusers draws it, ``variance_noise``, or
the counter-based noise with a lazily drawn seed), ``add_noise`` and ``get_velocity``.

docs/diffusers.md lists every behaviour matched and every deliberate difference.
"""
from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from .. import ops, reference
from ..schedule import NoiseSchedule, betas_for_schedule, inference_timesteps, rescale_zero_terminal_snr
from ..step_options import StepOptions
from ._config import BASES, KARRAS_COMPATIBLES, USING_DIFFUSERS, BaseOutput

__all__ = ["SchedulerOutput", "randn_like_diffusers", "learned_variance_to_log", "to_device_async"]


@dataclass
class SchedulerOutput(BaseOutput):
    """The output of ``step``: ``prev_sample`` (the next model input) and ``pred_original_sample``
    (x0_hat after clipping/thresholding)."""

    prev_sample: torch.Tensor
    pred_original_sample: Optional[torch.Tensor] = None


class TimestepNotInScheduleError(ValueError, IndexError):
    """A host timestep that is not in the schedule set by ``set_timesteps`` where the step needs
    it to be (diffusers raises ``IndexError`` there, so this is both)."""


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _laplace_betas(T: int, max_beta: float = 0.999) -> torch.Tensor:
    """diffusers' ``betas_for_alpha_bar(alpha_transform_type="laplace")``, in float64."""

    def alpha_bar(t):
        lmb = -0.5 * math.copysign(1, 0.5 - t) * math.log(1 - 2 * math.fabs(0.5 - t) + 1e-6)
        snr = math.exp(lmb)
        return math.sqrt(snr / (1 + snr))

    return torch.tensor([min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)],
                        dtype=torch.float64)


class _StepGuard:
    """For betas outside (0, 1] (which diffusers' constructors accept): the timesteps a step may not
    start from (``abar_t`` outside [0, 1): ``1 - abar_t`` is divided by or square-rooted) or go
    to (``abar`` outside [0, 1]); a step there would give NaN, so it raises instead."""

    def __init__(self, alphas_cumprod: torch.Tensor, betas: torch.Tensor):
        a = alphas_cumprod
        self.bad_from = ~((a >= 0) & (a < 1))
        self.bad_to = ~((a >= 0) & (a <= 1))
        self.betas = betas

    def check(self, frm, to, what="step"):
        """Raise for a step from host timestep ``frm`` to ``to`` (ints; negative: the constant
        alpha past the end of the table, never refused)."""
        bad = [t for t in (frm,) if t >= 0 and bool(self.bad_from[t])]
        bad += [t for t in (to,) if t >= 0 and bool(self.bad_to[t])]
        if bad:
            where = sorted(set(bad))
            raise ValueError(
                f"this scheduler's betas leave (0, 1] (min {float(self.betas.min()):.3g}, max "
                f"{float(self.betas.max()):.3g}), so alphas_cumprod leaves [0, 1) at timestep(s) {where[:8]}: a {what} "
                "there would give NaN (diffusers computes it and returns NaN)")


def _build_schedule(cls_name, num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                    rescale_betas_zero_snr, allowed) -> Tuple[NoiseSchedule, Optional[_StepGuard]]:
    """The float64 schedule of diffusers' constructor arguments, and a guard when its betas leave
    (0, 1]. ``trained_betas`` may have any length (diffusers builds its tables from it)."""
    if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, numbers.Integral) \
            or num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be a positive int, got {num_train_timesteps!r}")
    T = int(num_train_timesteps)
    if trained_betas is not None:
        betas = torch.as_tensor(np.asarray(trained_betas, dtype=np.float64), dtype=torch.float64).reshape(-1)
        if betas.numel() == 0:
            raise ValueError("trained_betas must not be empty")
    elif beta_schedule == "laplace" and "laplace" in allowed:
        betas = _laplace_betas(T)
    elif beta_schedule in allowed:
        betas = betas_for_schedule(beta_schedule, T, float(beta_start), float(beta_end))
    else:
        raise NotImplementedError(f"{beta_schedule} is not implemented for {cls_name} (beta_schedule must be one "
                                  f"of {allowed})")
    if not bool(torch.isfinite(betas).all()):
        raise ValueError(f"{cls_name}: the betas must be finite (trained_betas={trained_betas!r}, beta_start="
                         f"{beta_start!r}, beta_end={beta_end!r})")
    if rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    if bool(((betas > 0) & (betas <= 1)).all()):
        return NoiseSchedule(betas), None
    warnings.warn(
        f"{cls_name}: betas outside (0, 1] (min {float(betas.min()):.3g}, max {float(betas.max()):.3g}; beta_start="
        f"{beta_start!r}, beta_end={beta_end!r}). Accepted as diffusers does; a step from a timestep where "
        "alphas_cumprod is not in [0, 1) raises ValueError (diffusers returns NaN there).", UserWarning, stacklevel=4)
    schedule = NoiseSchedule(betas, check_range=False)
    return schedule, _StepGuard(schedule.alphas_cumprod, betas)


def _draw_seed() -> int:
    """A counter-noise seed from torch's global CPU generator (so ``torch.manual_seed`` controls it)."""
    return int(torch.randint(0, 2 ** 63 - 1, (), dtype=torch.int64))


def _norm_device(device) -> torch.device:
    # cuda gets its current index; a device this torch cannot use is a ValueError naming `device`
    return ops._check_device("device", device)


def to_device_async(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a small host tensor to ``device`` without a host sync (pinned + non_blocking on CUDA;
    a pageable copy would synchronise, which ``torch.cuda.set_sync_debug_mode`` reports)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _is_host_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def randn_like_diffusers(shape, generator, device, dtype) -> torch.Tensor:
    """Gaussian noise drawn exactly as diffusers' ``randn_tensor``: on the generator's device when
    that is the CPU (then moved), one batch row per generator for a list."""
    device = torch.device(device)
    gens = generator if isinstance(generator, (list, tuple)) else [generator]
    if len(gens) == 0:
        raise ValueError("generator must not be an empty list")
    for g in gens:
        if not isinstance(g, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or a list of them, got {type(g).__name__}")
    gen_type = gens[0].device.type
    if gen_type != device.type and gen_type != "cpu":
        raise ValueError(f"Cannot generate a {device} tensor from a generator of type {gen_type}.")
    rand_device = torch.device("cpu") if gen_type != device.type else device
    if isinstance(generator, (list, tuple)) and len(generator) > 1:
        if len(generator) != shape[0]:
            raise ValueError(f"a list of generators needs one per batch row: got {len(generator)} for batch "
                             f"{shape[0]}")
        row = (1,) + tuple(shape[1:])
        out = torch.cat([torch.randn(row, generator=g, device=rand_device, dtype=dtype) for g in generator], 0)
    else:
        out = torch.randn(tuple(shape), generator=gens[0], device=rand_device, dtype=dtype)
    return out.to(device)


def learned_variance_to_log(model_output: torch.Tensor, channels: int, variance_type: str) -> torch.Tensor:
    """For ``variance_type="learned"``: diffusers reads the extra channels as a variance, the ops
    as a log-variance; return the output with ``log(variance)`` there (fp32 math; a negative
    variance gives NaN, as diffusers' square root does). Other types: unchanged."""
    if variance_type != "learned" or model_output.dim() < 2 or model_output.shape[1] != 2 * channels:
        return model_output
    prediction, variance = model_output[:, :channels], model_output[:, channels:]
    cd = reference.compute_dtype(model_output)
    return torch.cat([prediction.to(cd), variance.to(cd).log()], dim=1)


class _DeviceState:
    """Per-device tensors a step reads, so it never copies from the host: ``steps`` =
    ``arange(-1, L + 1)`` (``steps[k + 1]`` is a 0-d view holding ``k``), ``prev_of`` (``prev_of[t]``,
    the timestep a step from ``t`` goes to) and the counter noise's ``seed``/``offset`` (0-d int64)."""

    __slots__ = ("steps", "prev_of", "seed", "offset")


# --------------------------------------------------------------------------------------------
# the shared base
# --------------------------------------------------------------------------------------------
class _FastSchedulerBase(*BASES):
    _compatibles = list(KARRAS_COMPATIBLES)
    order = 1
    _beta_schedules: Tuple[str, ...] = ()
    _spacings: Tuple[str, ...] = ("linspace", "leading", "trailing")
    # whether step() takes a host timestep outside the schedule (diffusers' t - T // n); DDPM's
    # step refuses one, as diffusers' does
    _step_off_schedule = False
    # ops index = timestep + _index_shift (the inverse runs on a table with one entry prepended)
    _index_shift = 0

    # -- construction -------------------------------------------------------------------------
    def _init_tables(self, num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                     rescale_betas_zero_snr):
        self.schedule, self._guard = _build_schedule(
            type(self).__name__, num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
            rescale_betas_zero_snr, self._beta_schedules)
        # fp32 attributes for compatibility (diffusers' dtypes); the ops use schedule's float64 table
        self.betas = self.schedule.betas.to(torch.float32)
        self.alphas = self.schedule.alphas.to(torch.float32)
        self.alphas_cumprod = self.schedule.alphas_cumprod.to(torch.float32)
        self.one = torch.tensor(1.0)
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.custom_timesteps = False
        T = int(num_train_timesteps)
        self.timesteps = torch.from_numpy(np.arange(0, T)[::-1].copy().astype(np.int64))
        self._seed_cpu: Optional[torch.Tensor] = None  # drawn lazily (_ensure_seed)
        if USING_DIFFUSERS and type(self).__module__ == __package__:
            # A pipeline's model_index.json records a component as (its __module__, class name).
            # Ours record diffusers' class of the same name and config, so a user without
            # ddpm_fast loads the saved pipeline (docs/diffusers.md, "Saving and loading"). A
            # user's subclass keeps its own module (diffusers has no class of its name).
            self.__module__ = "diffusers"
        self._set_prev_table(None)

    def _table_len(self) -> int:
        return self.schedule.num_timesteps

    def _ops_schedule(self) -> NoiseSchedule:
        """The schedule whose table the step ops index."""
        return self.schedule

    def _fallback_ratio(self) -> int:
        """``T // n`` of diffusers' ``t - T // n`` (1 before set_timesteps and with custom timesteps)."""
        n = None if self.custom_timesteps else self.num_inference_steps
        return self.config.num_train_timesteps // int(n) if n else 1

    def _fallback_prev(self, t):
        """diffusers' previous timestep ``t - T // n`` (past the end, -1, when negative)."""
        p = t - self._fallback_ratio()
        return p.clamp(min=-1) if isinstance(p, torch.Tensor) else max(p, -1)

    def _set_prev_table(self, timesteps: Optional[List[int]]):
        """Host dict and CPU table of where a step from each timestep goes; device copies lazily.
        Timesteps of the schedule step to its next entry; others to :meth:`_fallback_prev`."""
        L = self._table_len()
        prev = self._fallback_prev(torch.arange(0, L, dtype=torch.int64))
        if timesteps is None:
            self._prev_host = None
        else:
            self._prev_host = {}
            for i, t in enumerate(timesteps):
                p = timesteps[i + 1] if i + 1 < len(timesteps) else -1
                self._prev_host[t] = p
                if 0 <= t < L:
                    prev[t] = p
        self._prev_cpu = prev
        self._device_states: Dict[str, _DeviceState] = {}

    def _reset_noise(self, device=None):
        """After set_timesteps: the next step that needs counter noise draws a new seed. The
        tables of ``device`` (the CPU by default) are made now, not inside a first (compiled) step."""
        self._seed_cpu = None
        for st in self._device_states.values():
            st.offset.zero_()
        self._state(_norm_device(device if device is not None else "cpu"))

    def _ensure_seed(self):
        """Draw the counter-noise seed from torch's global generator if not drawn since
        set_timesteps (one draw, only when a step needs noise and has no generator/variance_noise)."""
        if self._seed_cpu is None:
            self._seed_cpu = torch.randint(0, 2 ** 63 - 1, (), dtype=torch.int64)
            for st in self._device_states.values():
                st.seed.copy_(to_device_async(self._seed_cpu, st.seed.device))

    @property
    def _noise_seed(self) -> Optional[int]:
        """The counter-noise seed in use (None until a step has drawn it)."""
        return None if self._seed_cpu is None else int(self._seed_cpu)

    def _state(self, device: torch.device) -> _DeviceState:
        key = str(device)
        st = self._device_states.get(key)
        if st is None:
            st = _DeviceState()
            L = self._table_len()
            st.steps = torch.arange(-1, L + 1, dtype=torch.int64, device=device)
            st.prev_of = to_device_async(self._prev_cpu, device)
            st.seed = (to_device_async(self._seed_cpu, device).clone() if self._seed_cpu is not None
                       else torch.zeros((), dtype=torch.int64, device=device))
            st.offset = torch.zeros((), dtype=torch.int64, device=device)
            self._ops_schedule().table(device)  # cache the float64 table the ops read on the device now
            self._device_states[key] = st
        return st

    @property
    def noise_offset(self) -> torch.Tensor:
        """The counter-noise offset tensor of the first device stepped on (one more per ``step``)."""
        if not self._device_states:
            return torch.zeros((), dtype=torch.int64)
        return next(iter(self._device_states.values())).offset

    # -- diffusers' small methods -------------------------------------------------------------
    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """Identity (DDPM/DDIM need no input scaling); kept for interchangeability."""
        return sample

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def _spaced_timesteps(self, num_inference_steps) -> List[int]:
        T = self.config.num_train_timesteps
        if isinstance(num_inference_steps, bool) or not _is_host_int(num_inference_steps) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")
        if num_inference_steps > T:
            raise ValueError(
                f"`num_inference_steps`: {num_inference_steps} cannot be larger than `self.config.train_timesteps`:"
                f" {T} as the unet model trained with this scheduler can only handle maximal {T} timesteps.")
        spacing = self.config.timestep_spacing
        if spacing not in self._spacings:
            raise ValueError(f"{spacing} is not supported. Please make sure to choose one of "
                             f"{', '.join(repr(s) for s in self._spacings)}.")
        return inference_timesteps(T, int(num_inference_steps), spacing, int(self.config.steps_offset))

    def _finish_set_timesteps(self, timesteps: List[int], device):
        self.timesteps = torch.tensor(timesteps, dtype=torch.int64)
        if device is not None:
            self.timesteps = self.timesteps.to(_norm_device(device))
        self._set_prev_table(timesteps)
        self._reset_noise(device)

    # -- the forward process ------------------------------------------------------------------
    def _per_row_timesteps(self, timesteps, like: torch.Tensor):
        if _is_host_int(timesteps):
            return int(timesteps)
        if not isinstance(timesteps, torch.Tensor):
            timesteps = torch.as_tensor(timesteps)
        if timesteps.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"timesteps must be integers, got dtype {timesteps.dtype}")
        timesteps = timesteps.reshape(-1)
        if timesteps.numel() == 1 and like.shape[0] != 1:
            timesteps = timesteps.reshape(())
        if timesteps.device != like.device and not (timesteps.dim() == 0 and timesteps.device.type == "cpu"):
            timesteps = timesteps.to(like.device)
        return timesteps.to(torch.int64)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """``sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`` per row, by the fused ``q_sample`` (float64
        coefficients, fp32 math whatever the input dtype; diffusers rounds ``abar`` to the input
        dtype)."""
        t = self._per_row_timesteps(timesteps, original_samples)
        if isinstance(noise, torch.Tensor) and noise.device != original_samples.device:
            noise = noise.to(original_samples.device)
        return ops.q_sample(original_samples, t, self.schedule, noise)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """``v = sqrt(abar_t) noise - sqrt(1 - abar_t) x0`` (``reference.v_target``: float64
        coefficients, fp32 math whatever the input dtype)."""
        t = self._per_row_timesteps(timesteps, sample)
        if isinstance(t, int):
            t = torch.full((sample.shape[0],), t, dtype=torch.int64)
        elif t.dim() == 0:
            t = t.expand(sample.shape[0])
        T = self.schedule.num_timesteps
        if t.device.type == "cpu" and not _compiling() and t.numel() and (int(t.min()) < 0 or int(t.max()) >= T):
            raise ValueError(f"timesteps must lie in [0, {T}), got values in [{int(t.min())}, {int(t.max())}]")
        abar = self.schedule.table(sample.device)[t.to(sample.device)]
        cd = reference.compute_dtype(sample)
        return reference.v_target(sample.to(cd), noise.to(device=sample.device, dtype=cd), abar).to(sample.dtype)

    # -- timesteps for a step -----------------------------------------------------------------
    def _before_set_timesteps(self, t: int) -> int:
        return t - 1

    def _previous_host(self, t: int, off_schedule: Optional[bool] = None) -> int:
        """Where a step from host timestep ``t`` goes: the next entry of the schedule; outside it
        diffusers' ``t - T // n`` if ``off_schedule`` (default: the class's rule), else an error."""
        if self._prev_host is None:
            return self._before_set_timesteps(t)
        p = self._prev_host.get(t)
        if p is not None:
            return p
        if self._step_off_schedule if off_schedule is None else off_schedule:
            return self._fallback_prev(t)
        raise TimestepNotInScheduleError(
            f"timestep {t} is not in this scheduler's timesteps (set_timesteps gave {list(self._prev_host)[:8]}...)")

    def _step_timesteps(self, timestep, sample: torch.Tensor, off_schedule: Optional[bool] = None):
        """``(t, prev_t, t_host)`` for the ops: device views/tensors, never a host copy on CUDA.
        ``t_host`` is the host int when one timestep is known on the host, else None. Under
        torch.compile a tensor timestep is never read on the host (no checks, no sync)."""
        L = self.schedule.num_timesteps
        dev = sample.device
        B = sample.shape[0]
        compiling = _compiling()
        if isinstance(timestep, torch.Tensor):
            if timestep.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
                if not compiling and timestep.is_floating_point() and timestep.dim() == 0 \
                        and timestep.device.type == "cpu" and float(timestep) == int(timestep):
                    timestep = int(timestep)
                else:
                    raise TypeError(f"timestep must be an int or an integer tensor, got dtype {timestep.dtype}")
        if isinstance(timestep, torch.Tensor) and timestep.numel() == 1 and timestep.dim() <= 1:
            if timestep.device.type == "cpu" and not compiling:
                timestep = int(timestep.reshape(()))
            else:
                timestep = timestep.reshape(())
        if _is_host_int(timestep):
            t = int(timestep)
            if not 0 <= t < L:
                raise ValueError(f"timestep must lie in [0, {L}), got {t}")
            p = self._previous_host(t, off_schedule)
            if self._guard is not None:
                self._guard_check(t, p)
            st = self._state(dev)
            k = 1 + self._index_shift
            return st.steps[t + k], st.steps[p + k], t
        if not isinstance(timestep, torch.Tensor):
            raise TypeError(f"timestep must be an int or an int64 tensor, got {type(timestep).__name__}")
        if timestep.dim() not in (0, 1) or (timestep.dim() == 1 and timestep.shape[0] != B):
            raise ValueError(f"timestep must be an int, a 0-d tensor or a ({B},) tensor of per-sample timesteps, "
                             f"got shape {tuple(timestep.shape)}")
        t = timestep.to(torch.int64)
        if t.device != dev:
            if t.device.type != "cpu":
                raise ValueError(f"timestep is on {t.device} but the sample is on {dev}")
            if not compiling:
                self._check_host_rows(t, off_schedule)
            t = t.to(dev)
        elif dev.type == "cpu" and not compiling:
            self._check_host_rows(t, off_schedule)
        st = self._state(dev)
        # index_select, not prev_of[t]: indexing by a 0-d tensor is a host read under torch.compile
        p = st.prev_of.index_select(0, t.reshape(-1)).reshape(t.shape)
        if self._index_shift:
            return t + self._index_shift, p + self._index_shift, None
        return t, p, None

    def _guard_check(self, t, p):
        self._guard.check(t, p)

    def _check_host_rows(self, t: torch.Tensor, off_schedule: Optional[bool] = None):
        L = self.schedule.num_timesteps
        if t.numel() == 0:
            return
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= L:
            raise ValueError(f"timestep must lie in [0, {L}), got values in [{lo}, {hi}]")
        for v in torch.unique(t).tolist():
            p = self._previous_host(int(v), off_schedule)  # raises for a timestep not in the schedule
            if self._guard is not None:
                self._guard_check(int(v), p)

    def _noise(self, generator, variance_noise, shape, dtype, device, draw: bool):
        """``(noise, seed, offset)`` for the ops. The counter-noise seed is drawn only here, when
        the step needs noise and has neither a generator nor variance_noise. ``draw=False`` (no
        row needs noise): nothing is drawn or checked, as in diffusers."""
        if not draw:
            return None, None, None
        if variance_noise is not None and generator is not None:
            raise ValueError("Cannot pass both generator and variance_noise. Please make sure that either "
                             "`generator` or `variance_noise` stays `None`.")
        st = self._state(device)
        if variance_noise is not None:
            if not isinstance(variance_noise, torch.Tensor) or tuple(variance_noise.shape) != tuple(shape):
                raise ValueError(f"variance_noise must be a tensor of the sample's shape {tuple(shape)}, got "
                                 f"{getattr(variance_noise, 'shape', type(variance_noise).__name__)}")
            return variance_noise.to(device), None, None
        if generator is not None:
            return randn_like_diffusers(shape, generator, device, dtype), None, None
        self._ensure_seed()
        return None, st.seed, st.offset

    def _clip_options(self) -> dict:
        """The config's clipping and dynamic-thresholding options, as the step ops take them."""
        return StepOptions.from_config(self.config).clip_options()

    def _step_output(self, x_prev, x0_hat, device, return_dict: bool):
        """Advances the counter-noise offset and returns a step's result as diffusers does."""
        self._state(device).offset.add_(1)
        if not return_dict:
            return (x_prev, x0_hat)
        return SchedulerOutput(prev_sample=x_prev, pred_original_sample=x0_hat)

    @staticmethod
    def _check_tensors(model_output, sample):
        if not isinstance(sample, torch.Tensor) or not isinstance(model_output, torch.Tensor):
            raise TypeError("model_output and sample must be torch.Tensors")
