"""Scale-out on ``torch.distributed``: world-size-invariant training and sharded sampling.

Everything random about a row is keyed by its global index (``sample_index=``, see
docs/distributed.md for the derivation), so a batch or a sample set split over any number of
ranks gives every row exactly what one process gives it.

* :func:`sample_shard` draws this rank's contiguous block of a sample set; the union over ranks is
  the set one process draws, row for row.
* :func:`save_samples` / :func:`merge_samples` write one ``.npz`` per rank and merge them in
  global order (the FID workflow); :func:`gather_samples` all-gathers instead.
* :func:`local_indices`, :func:`shard_bounds` and :func:`ddp_mean` split a global training batch
  and reduce its loss so that one DDP step equals the single-process step.
* ``python -m ddpm_fast sample`` (:func:`main`): sample a diffusers ``UNet2DModel`` folder under
  ``torchrun``.

Importable, and usable, without a process group: then the world is one rank holding everything.
"""
from __future__ import annotations

import argparse
import glob
import os
import re
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = ["rank_and_world", "shard_bounds", "local_indices", "sample_shard", "all_gather_rows", "gather_samples",
           "save_samples", "merge_samples", "to_uint8_images", "ddp_mean", "main"]


def _dist():
    """``torch.distributed`` when a process group is initialised, else None."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist
    return None


def rank_and_world(group=None) -> Tuple[int, int]:
    """``(rank, world_size)`` in ``group`` (default: the world); ``(0, 1)`` without a process group."""
    dist = _dist()
    if dist is None:
        if group is not None:
            raise ValueError("group was given but no torch.distributed process group is initialised")
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _check_count(name: str, n) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"{name} must be a non-negative int, got {n!r}")
    return int(n)


def shard_bounds(num_samples: int, rank: int, world_size: int) -> Tuple[int, int]:
    """``(start, stop)`` of rank ``rank``'s contiguous block of ``num_samples`` rows: the first
    ``num_samples % world_size`` ranks hold one row more than the others; rank order is global
    order."""
    num_samples = _check_count("num_samples", num_samples)
    world_size = _check_count("world_size", world_size)
    if world_size < 1 or not 0 <= int(rank) < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}")
    base, extra = divmod(num_samples, world_size)
    start = int(rank) * base + min(int(rank), extra)
    return start, start + base + (1 if int(rank) < extra else 0)


def local_indices(num_samples: int, group=None) -> torch.Tensor:
    """This rank's global indices of a batch (or sample set) of ``num_samples`` rows: the CPU
    int64 tensor ``arange(start, stop)`` of :func:`shard_bounds`. Pass it as ``sample_index=``."""
    rank, world = rank_and_world(group)
    start, stop = shard_bounds(num_samples, rank, world)
    return torch.arange(start, stop, dtype=torch.int64)


def ddp_mean(per_sample_losses: torch.Tensor, global_batch_size: int, group=None) -> torch.Tensor:
    """The loss to backpropagate on this rank so that DDP's gradient average equals the gradient
    of the mean over the global batch, whatever the shard sizes: ``sum(local losses) *
    world_size / global_batch_size`` (DDP divides the summed gradients by the world size). With
    equal shards it is the local mean. Its value is this rank's share of the global mean times
    the world size: for logging, all-reduce ``loss.detach()`` and divide by the world size."""
    global_batch_size = _check_count("global_batch_size", global_batch_size)
    if global_batch_size < 1:
        raise ValueError("global_batch_size must be positive")
    if not isinstance(per_sample_losses, torch.Tensor) or per_sample_losses.dim() != 1:
        raise ValueError("per_sample_losses must be a (B,) tensor (training_loss(..., reduction='none'))")
    _, world = rank_and_world(group)
    return per_sample_losses.sum() * (world / global_batch_size)


def all_gather_rows(*tensors: torch.Tensor, group=None) -> Tuple[torch.Tensor, ...]:
    """Concatenate each tensor's rows over the ranks of ``group``, in rank order; the ranks may hold
    different numbers of rows (padded for the collective, trimmed after). All tensors of one call
    share a device and a row count (CPU tensors for gloo, CUDA tensors for NCCL). Without a
    process group (or a world of one) returns the tensors as they are."""
    dist = _dist()
    if dist is None or dist.get_world_size(group) == 1:
        return tuple(tensors)
    world = dist.get_world_size(group)
    n, dev = tensors[0].shape[0], tensors[0].device
    for x in tensors:
        if x.shape[0] != n or x.device != dev:
            raise ValueError("all_gather_rows: every tensor must have the same number of rows and device")
    count = torch.tensor([n], dtype=torch.int64, device=dev)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=group)
    sizes = [int(c) for c in counts]
    most = max(sizes)
    out = []
    for x in tensors:
        padded = torch.cat([x, x.new_zeros((most - n, *x.shape[1:]))]).contiguous() if most > n else x.contiguous()
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded, group=group)
        out.append(torch.cat([p[:s] for p, s in zip(parts, sizes)]))
    return tuple(out)


def sample_shard(model, num_samples: int, sample_shape: Sequence[int], scheduler_or_schedule,
                 num_inference_steps: Optional[int] = None, *, seed: int, batch_size: int = 64, group=None,
                 output_device=None, **sample_kwargs) -> Tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of a set of ``num_samples`` samples of shape ``sample_shape`` (one row,
    without the batch dimension): the contiguous block :func:`shard_bounds` gives it, drawn with
    :func:`ddpm_fast.sample` in batches of ``batch_size`` with every row's noise keyed by its global
    index (``sample_index=``). Returns ``(global_indices, samples)``: a CPU int64 ``(n,)`` tensor and
    the ``(n, *sample_shape)`` samples (on ``output_device``, default where they were sampled).

    The union over ranks equals what one process returns, row for row, for any world size and any
    ``batch_size``: bit for bit when the model treats each row independently in floating point,
    otherwise within the model's own dependence on the batch it is called with. Without a process
    group it is the whole set. ``seed`` is required (one seed for the whole set, the same on every
    rank). ``sample_kwargs`` go to :func:`ddpm_fast.sample` (``eta``, ``device``, ``dtype``,
    ``guidance``, ``cuda_graph``, ...; not ``seed``, ``generator`` or ``sample_index``); ``progress``
    (default True) shows one bar over this rank's rows on rank 0 only."""
    from .sampling import sample
    from .training import _check_seed_offset  # (training imports this module: a late import)

    num_samples = _check_count("num_samples", num_samples)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    seed = _check_seed_offset("seed", seed)
    for k in ("generator", "sample_index", "return_trajectory", "callback"):
        if k in sample_kwargs:
            raise TypeError(f"sample_shard() does not take {k!r} (each row's noise is keyed by seed and its index)")
    try:
        sample_shape = tuple(int(s) for s in sample_shape)
    except TypeError:
        raise TypeError(f"sample_shape must be a sequence of ints, got {sample_shape!r}") from None
    progress = sample_kwargs.pop("progress", True)
    rank, world = rank_and_world(group)
    start, stop = shard_bounds(num_samples, rank, world)
    indices = torch.arange(start, stop, dtype=torch.int64)
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=stop - start, desc=f"sampling (rank 0 of {world})", unit="sample")
    chunks: List[torch.Tensor] = []
    try:
        for lo in range(start, stop, batch_size):
            index = indices[lo - start:lo - start + batch_size]
            x = sample(model, (index.shape[0], *sample_shape), scheduler_or_schedule, num_inference_steps,
                       seed=int(seed), sample_index=index, progress=False, **sample_kwargs)
            chunks.append(x if output_device is None else x.to(output_device))
            if bar is not None:
                bar.update(index.shape[0])
    finally:
        if bar is not None:
            bar.close()
    if chunks:
        return indices, torch.cat(chunks)
    from .sampling import _model_device

    device = output_device or sample_kwargs.get("device") or _model_device(model) or "cpu"
    return indices, torch.empty((0, *sample_shape), dtype=sample_kwargs.get("dtype", torch.float32), device=device)


def gather_samples(global_indices: torch.Tensor, samples: torch.Tensor, group=None
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Every rank's ``(global_indices, samples)`` all-gathered and put in global order (each rank
    receives the whole set: fine for small sets; write shards with :func:`save_samples` for big
    ones). Without a process group: the inputs sorted by index."""
    index, x = all_gather_rows(global_indices.to(samples.device), samples, group=group)
    order = torch.argsort(index)
    return index[order].cpu(), x[order]


def _numpy(x: torch.Tensor) -> np.ndarray:
    x = x.detach().cpu()
    if x.dtype in (torch.bfloat16, torch.float16):
        x = x.float()
    return x.numpy()


def to_uint8_images(samples) -> np.ndarray:
    """``(N, C, H, W)`` samples in ``[-1, 1]`` as ``(N, H, W, C)`` uint8 images (``round((x + 1) *
    127.5)`` clamped to ``[0, 255]``), the layout FID tools read (e.g. the ``arr_0`` of
    guided-diffusion's evaluator)."""
    x = samples if isinstance(samples, np.ndarray) else _numpy(samples)
    if x.ndim != 4:
        raise ValueError(f"samples must be (N, C, H, W), got shape {x.shape}")
    x = np.clip(np.rint((x.astype(np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


_SHARD = re.compile(r"shard-(\d+)-of-(\d+)\.npz$")


def save_samples(directory: str, global_indices: torch.Tensor, samples, *, group=None) -> str:
    """Write this rank's shard as ``directory/shard-RRRRR-of-WWWWW.npz`` with arrays ``indices``
    (int64) and ``samples`` (as given: a tensor is copied to the host, fp16/bf16 as fp32; or a
    numpy array such as :func:`to_uint8_images`'). Returns the path. Merge with
    :func:`merge_samples` once every rank has written (e.g. after ``dist.barrier()``)."""
    rank, world = rank_and_world(group)
    index = np.asarray(global_indices.cpu() if isinstance(global_indices, torch.Tensor) else global_indices,
                       dtype=np.int64)
    data = samples if isinstance(samples, np.ndarray) else _numpy(samples)
    if index.ndim != 1 or data.shape[0] != index.shape[0]:
        raise ValueError(f"global_indices must be (n,) with one entry per sample, got {index.shape} for "
                         f"{data.shape[0]} samples")
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"shard-{rank:05d}-of-{world:05d}.npz")
    tmp = path + ".tmp.npz"
    np.savez(tmp, indices=index, samples=data)
    os.replace(tmp, path)
    return path


def merge_samples(directory: str, out: Optional[str] = None, *, num_samples: Optional[int] = None
                  ) -> Tuple[np.ndarray, np.ndarray]:
    """Read the shards :func:`save_samples` wrote to ``directory`` and return ``(indices, samples)``
    in global order. Checks that the shards come from one world size, that all of them are there,
    and that the indices are ``0..N-1`` exactly once (``N = num_samples`` when given); raises
    ``ValueError`` otherwise. With ``out``, also writes ``np.savez(out, arr_0=samples)``."""
    paths = sorted(p for p in glob.glob(os.path.join(directory, "shard-*-of-*.npz")) if _SHARD.search(p))
    if not paths:
        raise ValueError(f"no shard-*-of-*.npz files in {directory!r}")
    worlds = {int(_SHARD.search(p).group(2)) for p in paths}
    if len(worlds) != 1:
        raise ValueError(f"{directory!r} holds shards of several world sizes {sorted(worlds)}: remove the stale ones")
    world = worlds.pop()
    ranks = sorted(int(_SHARD.search(p).group(1)) for p in paths)
    if ranks != list(range(world)):
        missing = sorted(set(range(world)) - set(ranks))
        raise ValueError(f"{directory!r}: shards of ranks {missing} (of {world}) are missing")
    index_parts, data_parts = [], []
    for p in paths:
        with np.load(p) as f:
            index_parts.append(f["indices"])
            data_parts.append(f["samples"])
    index = np.concatenate(index_parts)
    data = np.concatenate(data_parts)
    n = index.shape[0] if num_samples is None else _check_count("num_samples", num_samples)
    order = np.argsort(index, kind="stable")
    index, data = index[order], data[order]
    if index.shape[0] != n or not np.array_equal(index, np.arange(n)):
        raise ValueError(f"the shards' indices are not 0..{n - 1} exactly once ({index.shape[0]} rows)")
    if out is not None:
        parent = os.path.dirname(os.path.abspath(out))
        os.makedirs(parent, exist_ok=True)
        np.savez(out, arr_0=data)
    return index, data


# ------------------------------------------------------------------------------------------------
# python -m ddpm_fast sample
# ------------------------------------------------------------------------------------------------
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _load_unet(path: str, subfolder: Optional[str], dtype: torch.dtype):
    from diffusers import UNet2DModel

    if subfolder is None and os.path.isfile(os.path.join(path, "model_index.json")):
        subfolder = "unet"
    return UNet2DModel.from_pretrained(path, subfolder=subfolder, torch_dtype=dtype, low_cpu_mem_usage=False)


def _load_scheduler(path: str, kind: Optional[str], num_train_timesteps: Optional[int]):
    from .schedulers import DDIMScheduler, DDPMScheduler

    config = None
    for sub in ("scheduler", ""):
        if os.path.isfile(os.path.join(path, sub, "scheduler_config.json")):
            config = DDPMScheduler.load_config(path, subfolder=sub or None)
            break
    if kind is None:
        kind = "ddim" if config is not None and config.get("_class_name") == "DDIMScheduler" else "ddpm"
    cls = DDIMScheduler if kind == "ddim" else DDPMScheduler
    if config is None:
        return cls(**({} if num_train_timesteps is None else {"num_train_timesteps": num_train_timesteps}))
    extra = {} if num_train_timesteps is None else {"num_train_timesteps": num_train_timesteps}
    return cls.from_config(config, **extra)


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m ddpm_fast sample MODEL_DIR -n N [...]``, alone or under ``torchrun``."""
    parser = argparse.ArgumentParser(
        prog="python -m ddpm_fast sample",
        description="Sample N images from a diffusers UNet2DModel folder (save_pretrained) with ddpm_fast's "
                    "schedulers, sharded over the ranks of torchrun; the result is the same for any number of "
                    "ranks. Writes OUT/shards/shard-RRRRR-of-WWWWW.npz per rank, then OUT/samples.npz (arr_0: "
                    "the samples in global order) from rank 0.")
    parser.add_argument("model", help="a folder written by UNet2DModel.save_pretrained (or a pipeline folder with "
                                      "unet/ and scheduler/)")
    parser.add_argument("-n", "--num-samples", type=int, required=True, help="total number of samples N")
    parser.add_argument("--out", default="samples_out", help="output folder (default samples_out)")
    parser.add_argument("--scheduler", choices=("ddpm", "ddim"), default=None,
                        help="ddpm_fast scheduler (default: the folder's scheduler config, else ddpm)")
    parser.add_argument("--steps", type=int, default=None,
                        help="inference steps (default: all training steps for ddpm; required for ddim)")
    parser.add_argument("--num-train-timesteps", type=int, default=None,
                        help="training timesteps when the folder has no scheduler config (default 1000)")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM eta (default 0)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the whole sample set (default 0)")
    parser.add_argument("--batch-size", type=int, default=64, help="rows per model call on each rank (default 64)")
    parser.add_argument("--device", default=None,
                        help="torch device (default cuda:LOCAL_RANK when CUDA is available, else cpu)")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="float32", help="the network's dtype")
    parser.add_argument("--format", choices=("uint8", "float32"), default="uint8",
                        help="uint8: (N, H, W, C) images from [-1, 1] (for FID); float32: raw (N, C, H, W)")
    parser.add_argument("--subfolder", default=None, help="the UNet's subfolder (default: unet/ in a pipeline folder)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.num_samples < 1 or args.batch_size < 1:
        parser.error("--num-samples and --batch-size must be positive")
    # Resolved before any process group or model load, so a missing option is a usage error on every rank.
    from .schedulers import DDIMScheduler

    scheduler = _load_scheduler(args.model, args.scheduler, args.num_train_timesteps)
    if args.steps is None and isinstance(scheduler, DDIMScheduler):
        parser.error("--steps is required with the ddim scheduler (from --scheduler or the folder's config)")

    dist = torch.distributed
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(args.device if args.device is not None else
                          (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    started = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        started = True
    try:
        rank, world = rank_and_world()
        shard_dir = os.path.join(args.out, "shards")
        if rank == 0:  # shards of an earlier run would be merged with this one's
            for stale in glob.glob(os.path.join(shard_dir, "shard-*-of-*.npz")):
                os.remove(stale)
        if world > 1:
            dist.barrier()
        unet = _load_unet(args.model, args.subfolder, _DTYPES[args.dtype]).to(device).eval()
        size = unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        shape = (unet.config.in_channels, *size)
        net_dtype = _DTYPES[args.dtype]

        def model(x, t):
            return unet(x.to(net_dtype), t).sample

        if rank == 0:
            print(f"sampling {args.num_samples} x {shape} with {type(scheduler).__name__}"
                  f"{'' if args.steps is None else f', {args.steps} steps'} on {world} rank(s), seed {args.seed}",
                  flush=True)
        with torch.no_grad():
            index, x = sample_shard(model, args.num_samples, shape, scheduler, args.steps, seed=args.seed,
                                    batch_size=args.batch_size, eta=args.eta, device=device,
                                    progress=not args.no_progress, output_device="cpu")
        data = to_uint8_images(x) if args.format == "uint8" else _numpy(x.float())
        save_samples(shard_dir, index, data)
        if world > 1:
            dist.barrier()
        if rank == 0:
            out = os.path.join(args.out, "samples.npz")
            merge_samples(shard_dir, out, num_samples=args.num_samples)
            print(f"wrote {out} (arr_0: {args.num_samples} samples in global order, {args.format})", flush=True)
        if world > 1:
            dist.barrier()
    finally:
        if started:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
