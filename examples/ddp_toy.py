"""DDP training of the demo's toy model (ddpm_fast/tools/demo.py), the same run on any number of ranks.

    torchrun --standalone --nproc_per_node 2 examples/ddp_toy.py --iterations 300
    python examples/ddp_toy.py --iterations 300          # one process: the same run

Each step every rank draws the same global batch of ``--batch`` rows (a generator seeded by the
step), keeps its contiguous block (``ddpm_fast.distributed.local_indices``) and calls
``training_loss(..., sample_index=)`` with the rows' positions in the global batch, so each row's
timestep and noise depend on ``(seed, step, position)`` only. ``ddp_mean`` turns the per-sample
losses into the loss whose DDP-averaged gradient is the gradient of the global mean, also when
``--batch`` is not a multiple of the world size. The printed loss curve and parameter checksum
agree across world sizes within fp32 summation order (they drift apart slowly over many Adam
steps, as any two fp32 runs with different reduction orders do). At the end the ranks draw
``--samples`` samples with ``sample_shard`` and rank 0 prints the recovered mixture weights.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout

import ddpm_fast as F  # noqa: E402
from ddpm_fast import distributed as D  # noqa: E402
from ddpm_fast.tools.demo import ToyMLP, draw_data, evaluate  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--batch", type=int, default=1024, help="global batch (split over the ranks)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--timesteps", type=int, default=100)
    parser.add_argument("--samples", type=int, default=5000, help="samples drawn at the end (0: none)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    started = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        started = True
    rank, world = D.rank_and_world()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.set_num_threads(1)
    try:
        T = args.timesteps
        scheduler = F.DDPMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2", clip_sample=False,
                                    variance_type="fixed_large")
        torch.manual_seed(args.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
        model = ToyMLP(T).to(device)
        ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
        opt = torch.optim.Adam(model.parameters(), lr=args.lr)
        index = D.local_indices(args.batch)                       # this rank's positions in the global batch
        lo, hi = (int(index[0]), int(index[-1]) + 1) if len(index) else (0, 0)
        t0 = time.perf_counter()
        for step in range(args.iterations):
            x0 = draw_data(args.batch, torch.Generator().manual_seed(args.seed * 1_000_003 + step), "cpu")
            losses = F.training_loss(ddp, x0[lo:hi].to(device), scheduler, seed=args.seed, offset=step,
                                     sample_index=index, reduction="none")
            loss = D.ddp_mean(losses, args.batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % 50 == 0 or step == args.iterations - 1:
                logged = loss.detach().clone()
                if world > 1:
                    dist.all_reduce(logged)
                if rank == 0:
                    print(f"step {step:5d}  loss {float(logged) / world:.6f}", flush=True)
        checksum = sum(float(p.detach().double().abs().sum()) for p in model.parameters())
        if rank == 0:
            print(f"trained {args.iterations} steps on {world} rank(s) in {time.perf_counter() - t0:.1f} s; "
                  f"parameter checksum {checksum:.6f}", flush=True)
        if args.samples > 0:
            with torch.no_grad():
                idx, x = D.sample_shard(model, args.samples, (2,), scheduler, T, seed=args.seed + 1,
                                        batch_size=4096, device=device, progress=False)
                idx, x = D.gather_samples(idx, x)
            if rank == 0:
                r = evaluate(x)
                print(f"{args.samples} samples: weights {r['weights'][0]:.4f} / {r['weights'][1]:.4f} "
                      f"(true 0.8 / 0.2)", flush=True)
    finally:
        if started:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
