"""The whole reverse loop: :func:`sample` (DDPM or DDIM, any step count, no host sync per step,
the loop body captured in a CUDA graph on CUDA).

How the model is called: ``model(x, t)`` with ``x`` the current sample (``shape``, ``dtype``, on
``device``) and ``t`` a ``(B,)`` int64 tensor on the same device holding the ORIGINAL training
timesteps (for a respaced :class:`~ddpm_fast.NoiseSchedule`, ``schedule.timestep_map[t]``). The
model returns a tensor of ``x``'s shape (twice its channels for learned-variance types), or an
object with a ``.sample`` tensor (a diffusers ``UNet2DModel`` output), or a tuple whose first item
is that tensor.

Classifier-free guidance: with ``guidance=w`` the model is called once per step on ``2B`` rows,
``model(cat([x, x]), cat([t, t]))``; the first ``B`` rows must be its unconditional prediction and
the last ``B`` its conditional one (diffusers' order), e.g.
``lambda x, t: unet(x, t, class_labels=cat([null_labels, labels])).sample``. The step combines them
as ``uncond + w (cond - uncond)`` inside the fused kernel (learned-variance channels from the
conditional half).

Noise: ``seed`` (an int) gives the counter-based noise (README, "The noise contract"): ``x_T``
at offset 0 and step ``i`` at offset ``1 + i`` (a device int64 tensor incremented in place, so a
CUDA-graph replay draws fresh noise); row ``b`` does not depend on the batch size.
``sample_index`` (a ``(B,)`` int64 tensor of the rows' global indices, with ``seed``): row ``b``
draws its ``x_T`` and every step's noise from the per-row seed ``row_seeds(seed,
sample_index[b])`` instead, so it depends on its index only, not on its position in the batch
(sharded sampling: :mod:`ddpm_fast.distributed`). ``generator`` (or a list, one per row) draws ``x_T``
and the step noise exactly as diffusers' ``DDPMPipeline``/``DDIMPipeline`` do (then there is no
CUDA graph); nothing is drawn from torch's global generator then, so
``generator=torch.manual_seed(0)`` (diffusers' idiom, which passes the global generator itself)
gives the pipelines' images. Neither: a seed drawn from torch's global CPU generator.

What a pipeline's ``__call__`` offers and ``sample`` takes (docs/diffusers.md): ``batch_size``
(``shape[0]``), ``generator``, ``num_inference_steps``, ``eta`` and ``use_clipped_model_output``
(DDIM), ``output_type`` (``"pt"``, ``"np"``, ``"pil"``: the pipelines' ``(x / 2 + 0.5).clamp(0, 1)``
images; ``None``, the default, returns ``x_0`` as the model space holds it). ``return_dict`` has no
counterpart: ``sample`` returns the images themselves.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional, Sequence, Union

import torch

from . import ops
from .nvtx import nvtx_range
from .schedule import NoiseSchedule, space_timesteps
from .step_options import StepOptions
from .schedulers import (DDIMInverseScheduler, DDIMScheduler, DDPMScheduler, _draw_seed, _norm_device,
                         from_diffusers, learned_variance_to_log, randn_like_diffusers, to_device_async)
from .training import _unwrap  # the model output convention, shared with training_loss

__all__ = ["sample"]


class _Plan:
    """What the loop needs from a scheduler or a bare schedule, resolved once on the host."""

    def __init__(self, scheduler_or_schedule, num_inference_steps, eta, use_clipped_model_output):
        self.kind = "ddpm"
        self.final_abar = 1.0
        scheduler_or_schedule = from_diffusers(scheduler_or_schedule)
        if isinstance(scheduler_or_schedule, DDIMInverseScheduler):
            raise TypeError("sample() runs the reverse process; a DDIMInverseScheduler inverts it (step it "
                            "yourself, or use a DDIMScheduler here)")
        if isinstance(scheduler_or_schedule, NoiseSchedule):
            sched = scheduler_or_schedule
            self.schedule = sched
            T = sched.num_timesteps
            n = T if num_inference_steps is None else num_inference_steps
            if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= T:
                raise ValueError(f"num_inference_steps must be an int in [1, {T}], got {num_inference_steps!r}")
            self.timesteps = sorted(space_timesteps(T, str(n)), reverse=True)
            self.opts = dict(prediction_type="epsilon", **StepOptions(clip_sample=False).clip_options())
            self.variance_type = "fixed_small"
            self.timestep_map = sched.timestep_map
        elif isinstance(scheduler_or_schedule, (DDPMScheduler, DDIMScheduler)):
            s = scheduler_or_schedule
            self.schedule = s.schedule
            if isinstance(s, DDIMScheduler):
                self.kind = "ddim"
                if num_inference_steps is None:
                    raise ValueError("num_inference_steps is required with a DDIMScheduler")
                s.set_timesteps(num_inference_steps)
                self.final_abar = s._final_abar
            else:
                if num_inference_steps is None:
                    num_inference_steps = s.config.num_train_timesteps
                s.set_timesteps(num_inference_steps)
                self.variance_type = s.config.variance_type
            self.timesteps = [int(t) for t in s.timesteps.tolist()]
            c = s.config
            self.opts = dict(prediction_type=c.prediction_type, **StepOptions.from_config(c).clip_options())
            self.timestep_map = self.schedule.timestep_map
        else:
            raise TypeError("scheduler_or_schedule must be a DDPM/DDIM-family scheduler (ours or diffusers') or a "
                            f"NoiseSchedule, got {type(scheduler_or_schedule).__name__}")
        eta = ops._check_float("eta", eta, low=0.0, high=1.0)
        if self.kind == "ddpm" and eta != 0.0:
            raise ValueError(f"eta applies to DDIM only; got eta={eta} with a DDPM scheduler")
        self.eta = eta
        if use_clipped_model_output is not None:  # None: not passed on, as DDIMPipeline does
            use_clipped_model_output = ops._check_bool("use_clipped_model_output", use_clipped_model_output)
            if self.kind == "ddpm" and use_clipped_model_output:
                raise ValueError("use_clipped_model_output applies to DDIM only; got True with a DDPM scheduler")
        self.use_clipped = bool(use_clipped_model_output)
        self.prev = [self.timesteps[i + 1] if i + 1 < len(self.timesteps) else -1 for i in range(len(self.timesteps))]

    def needs_noise(self, t: int) -> bool:
        return t > 0 if self.kind == "ddpm" else self.eta > 0


_OUTPUT_TYPES = (None, "pt", "np", "pil")


def _postprocess(x: torch.Tensor, output_type):
    """The DDPM/DDIM pipelines' output: ``(x / 2 + 0.5).clamp(0, 1)``, then NHWC numpy or PIL."""
    if output_type is None:
        return x
    images = (x / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return images
    if images.dim() != 4:
        raise ValueError(f"output_type={output_type!r} needs image-shaped (B, C, H, W) samples, got shape "
                         f"{tuple(images.shape)} (use output_type='pt' or None)")
    arr = images.cpu().permute(0, 2, 3, 1).float().numpy()
    if output_type == "np":
        return arr
    from PIL import Image

    arr = (arr * 255).round().astype("uint8")
    if arr.shape[-1] == 1:
        return [Image.fromarray(a.squeeze(-1), mode="L") for a in arr]
    return [Image.fromarray(a) for a in arr]


def _model_device(model) -> Optional[torch.device]:
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.device
    return None


def sample(model: Callable, shape: Sequence[int], scheduler_or_schedule, num_inference_steps: Optional[int] = None,
           *, eta: float = 0.0, seed: Optional[int] = None, generator=None, device=None,
           dtype: torch.dtype = torch.float32, guidance: Optional[float] = None, progress: bool = True,
           callback: Optional[Callable] = None, return_trajectory: bool = False,
           cuda_graph: Union[str, bool] = "auto", sample_index: Optional[torch.Tensor] = None,
           use_clipped_model_output: Optional[bool] = None, output_type: Optional[str] = None):
    """Run the reverse process from ``x_T ~ N(0, I)`` to ``x_0``; returns ``x_0`` (and, with
    ``return_trajectory=True``, a ``(n + 1, *shape)`` tensor of ``x_T`` and every step's output).

    ``scheduler_or_schedule``: a :class:`DDPMScheduler` or ``DDPMParallelScheduler`` (ancestral
    DDPM steps, ``eta`` must be 0), a :class:`DDIMScheduler` or ``DDIMParallelScheduler`` (``eta``
    in [0, 1]; ``use_clipped_model_output`` re-derives epsilon from the clipped x0, as
    ``DDIMScheduler.step`` does) — their config gives the prediction type, variance type,
    clipping and spacing, and ``set_timesteps(num_inference_steps)`` is called on it — or a bare
    :class:`NoiseSchedule` (DDPM, epsilon prediction, ``fixed_small``, no clipping,
    ``num_inference_steps`` evenly spaced timesteps as improved-diffusion's respacing; default
    all). A diffusers scheduler of those classes is converted to ours through its config.
    ``output_type``: ``None`` returns ``x_0``; ``"pt"``/``"np"``/``"pil"`` the pipelines' images
    (module docstring); the trajectory stays in model space.
    See the module docstring for how the model is called, guidance, and the noise (``seed`` or
    ``generator``). ``callback(i, t, x)`` runs after step ``i`` (``t`` a host int). ``progress``:
    a tqdm bar. ``cuda_graph``: ``"auto"`` captures the loop body (model call + step) in a CUDA
    graph on CUDA without a generator, falling back to eager if capture fails; ``True`` requires
    it; ``False`` never. The loop runs under ``torch.no_grad()``; no host-device sync is made per
    step by the loop itself (the setup copies its timestep tables once, pinned and non-blocking)."""
    plan = _Plan(scheduler_or_schedule, num_inference_steps, eta, use_clipped_model_output)
    if output_type not in _OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {_OUTPUT_TYPES}, got {output_type!r}")
    if seed is not None and generator is not None:
        raise ValueError("give at most one of seed and generator")
    if cuda_graph not in ("auto", True, False):
        raise ValueError(f"cuda_graph must be 'auto', True or False, got {cuda_graph!r}")
    if guidance is not None:
        guidance = ops._check_float("guidance", guidance)
    try:
        shape = tuple(int(s) for s in shape)
    except TypeError:
        raise TypeError(f"shape must be a sequence of ints, got {shape!r}") from None
    if len(shape) < 1 or any(s < 1 for s in shape):
        raise ValueError(f"shape must be a non-empty sequence of positive ints, got {shape}")
    if dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"dtype must be a floating dtype, got {dtype}")
    if device is None:
        device = _model_device(model) or torch.device("cpu")
    device = _norm_device(device)
    B, n = shape[0], len(plan.timesteps)
    C = shape[1] if len(shape) > 1 else 1
    schedule = plan.schedule
    schedule.table(device)

    # x_T (seed and offset as device tensors: no host copy, no sync)
    if sample_index is not None and seed is None:
        raise ValueError("sample_index needs seed= (one seed for the whole sample set)")
    if generator is None and seed is None:
        seed = _draw_seed()
    if sample_index is not None:  # per-row seeds keyed by the global index (docs/distributed.md)
        seed_dev = ops._indexed_seed(seed, sample_index, None, B, device).to(device)
    else:
        seed_dev = torch.full((), seed if seed is not None else 0, dtype=torch.int64, device=device)
    offset_dev = torch.zeros((), dtype=torch.int64, device=device)
    if generator is not None:
        x = randn_like_diffusers(shape, generator, device, dtype)
    else:
        x = ops.gaussian_noise(shape, seed_dev, offset_dev, device=device, dtype=dtype)
    offset_dev.add_(1)

    # every step's timesteps, on the device once (rows of (B,) views, no per-step host copy)
    ts = torch.tensor(plan.timesteps, dtype=torch.int64)
    t_rows = to_device_async(ts.reshape(n, 1).expand(n, B).contiguous(), device)
    p_rows = to_device_async(torch.tensor(plan.prev, dtype=torch.int64).reshape(n, 1).expand(n, B).contiguous(),
                             device)
    tmodel = plan.timestep_map[ts].reshape(n, 1).expand(n, B)
    if guidance is not None:
        tmodel = torch.cat([tmodel, tmodel], dim=1)
    tmodel_rows = to_device_async(tmodel.contiguous(), device)

    def body(x_in: torch.Tensor, t, p, tm, draw: bool):
        # draw: take this step's noise from the generator (diffusers' draw, in the output's dtype)
        model_in = torch.cat([x_in, x_in], 0) if guidance is not None else x_in
        with nvtx_range("model"):
            out = _unwrap(model(model_in, tm))
        noise = randn_like_diffusers(shape, generator, device, out.dtype) if draw else None
        if plan.kind == "ddpm":
            out = learned_variance_to_log(out, C, plan.variance_type)
            kw = dict(noise=noise) if noise is not None else dict(seed=seed_dev, offset=offset_dev)
            x_new = ops.ddpm_step(out, t, x_in, schedule, prev_t=p, variance_type=plan.variance_type,
                                  guidance_scale=guidance, **kw, **plan.opts)
        else:
            kw = {}
            if plan.eta > 0:
                kw = dict(noise=noise) if noise is not None else dict(seed=seed_dev, offset=offset_dev)
            x_new = ops.ddim_step(out, t, x_in, schedule, prev_t=p, eta=plan.eta,
                                  use_clipped_model_output=plan.use_clipped, final_alpha_cumprod=plan.final_abar,
                                  guidance_scale=guidance, **kw, **plan.opts)
        offset_dev.add_(1)
        return x_new

    trajectory = [x.clone()] if return_trajectory else None
    from tqdm.auto import tqdm

    bar = tqdm(total=n, disable=not progress, desc="sampling", leave=False)

    def after(i, x_cur):
        if trajectory is not None:
            trajectory.append(x_cur.clone())
        if callback is not None:
            callback(i, plan.timesteps[i], x_cur)
        bar.update(1)

    use_graph = (cuda_graph is True or cuda_graph == "auto") and device.type == "cuda" and generator is None
    if cuda_graph is True and not use_graph:
        raise ValueError("cuda_graph=True needs a CUDA device and no generator")
    warm = min(n, 2) if use_graph else n
    i = 0
    try:
        # eager steps (all of them without a graph; the warm-up before capture otherwise)
        side = torch.cuda.Stream(device) if use_graph else None
        if side is not None:
            side.wait_stream(torch.cuda.current_stream(device))
        ctx = torch.cuda.stream(side) if side is not None else contextlib.nullcontext()
        with ctx:
            while i < warm:
                draw = generator is not None and plan.needs_noise(plan.timesteps[i])
                with torch.no_grad(), nvtx_range(f"step t={plan.timesteps[i]}"):
                    x = body(x, t_rows[i], p_rows[i], tmodel_rows[i], draw)
                after(i, x)
                i += 1
        if side is not None:
            torch.cuda.current_stream(device).wait_stream(side)
        if i < n:
            x, i = _graph_loop(body, x, i, n, t_rows, p_rows, tmodel_rows, device, after, strict=cuda_graph is True,
                           names=plan.timesteps)
        # anything left (graph capture failed under "auto"): eager
        while i < n:
            with torch.no_grad(), nvtx_range(f"step t={plan.timesteps[i]}"):
                x = body(x, t_rows[i], p_rows[i], tmodel_rows[i], False)
            after(i, x)
            i += 1
    finally:
        bar.close()
    if return_trajectory:
        return _postprocess(x, output_type), torch.stack(trajectory, 0)
    return _postprocess(x, output_type)


def _graph_loop(body, x, i0, n, t_rows, p_rows, tmodel_rows, device, after, *, strict, names):
    """Capture one loop body (model call + step) reading its step index from a device tensor,
    then replay it for steps ``i0..n-1``. Returns ``(x, next_i)``; on a capture failure under
    ``"auto"`` returns ``(x, i0)`` untouched (the caller finishes eagerly)."""
    static_x = x.clone()
    step_dev = torch.full((1,), i0, dtype=torch.int64, device=device)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.no_grad(), torch.cuda.graph(graph):
            t = t_rows.index_select(0, step_dev).reshape(-1)
            p = p_rows.index_select(0, step_dev).reshape(-1)
            tm = tmodel_rows.index_select(0, step_dev).reshape(-1)
            x_new = body(static_x, t, p, tm, False)
            static_x.copy_(x_new)
            step_dev.add_(1)
    except Exception:
        if strict:
            raise
        torch.cuda.synchronize(device)
        return x, i0
    # capture recorded body's offset increment without running it: the replays do it
    for i in range(i0, n):
        with nvtx_range(f"step t={names[i]} (graph)"):
            graph.replay()
        after(i, static_x)
    return static_x, n
