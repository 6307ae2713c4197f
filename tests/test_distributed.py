"""Scale-out: ``sample_index=`` makes every row's randomness a function of its global index, so
DDP training and sharded sampling (ddpm_fast/distributed.py) do not depend on the world size.

The gloo tests start ONE job of three CPU ranks (env:// rendezvous variables, as torchrun sets
them) and run every check over process groups of 1, 2 and 3 ranks (``new_group([0])``,
``new_group([0, 1])``, the world); the single-process references are computed here, without any
process group. A second job of two ranks runs ``python -m ddpm_fast sample`` (its main()
initialising the group from those variables) with a tiny diffusers ``UNet2DModel``.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import ddpm_fast as F
from ddpm_fast import distributed as D
from ddpm_fast import noise as N
from conftest import backend_param

REPO = Path(__file__).resolve().parents[1]
SEED = 20240611
NUM_SAMPLES = 7           # unequal shards on 2 and 3 ranks (4/3 and 3/2/2)
BATCH_SIZES = (2, 3)      # sample_shard batch sizes in the workers; the reference uses one batch
GLOBAL_BATCH = 12         # equal shards on 1, 2, 3 ranks
UNEQUAL_BATCH = 10        # 10, 5/5, 4/3/3
WORLD_SIZES = (1, 2, 3)
T_TRAIN = 20
T_AWARE = 6               # the loss-aware sampler warms up within two steps of 12 rows


# ------------------------------------------------------------------------------------------------
# what the workers and the references share
# ------------------------------------------------------------------------------------------------
class Elementwise(torch.nn.Module):
    """``eps_hat = x * scale * (1 - t / T)``: each element on its own, so every row is computed
    identically whatever the batch (bit-for-bit checks)."""

    def __init__(self, channels: int, T: int):
        super().__init__()
        self.T = T
        self.scale = torch.nn.Parameter(torch.linspace(0.3, 0.7, channels))

    def forward(self, x, t):
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * self.scale.reshape(shape) * (1.0 - t.to(x.dtype) / self.T).reshape((-1,) + (1,) * (x.dim() - 1))


class TinyConvNet(torch.nn.Module):
    """A two-level conv net with GroupNorm, a skip and a timestep bias (a UNet in miniature)."""

    def __init__(self, channels: int = 1, width: int = 8, T: int = T_TRAIN):
        super().__init__()
        self.T = T
        self.inp = torch.nn.Conv2d(channels, width, 3, padding=1)
        self.norm = torch.nn.GroupNorm(4, width)
        self.down = torch.nn.Conv2d(width, width, 3, stride=2, padding=1)
        self.temb = torch.nn.Linear(1, width)
        self.up = torch.nn.ConvTranspose2d(width, width, 2, stride=2)
        self.out = torch.nn.Conv2d(2 * width, channels, 3, padding=1)

    def forward(self, x, t):
        h = torch.nn.functional.silu(self.norm(self.inp(x)))
        e = self.temb((t.to(x.dtype) / self.T)[:, None])[:, :, None, None]
        d = torch.nn.functional.silu(self.down(h) + e)
        return self.out(torch.cat([h, self.up(d)], dim=1))


def _mlp():
    from ddpm_fast.tools.demo import ToyMLP

    torch.manual_seed(3)
    return ToyMLP(T_TRAIN, width=16)


def _workloads():
    """name -> (model, per-row shape, scheduler factory, steps, exact?)."""
    torch.manual_seed(5)
    conv = TinyConvNet()
    return {
        "elementwise": (Elementwise(3, T_TRAIN), (3, 2, 2),
                        lambda: F.DDPMScheduler(num_train_timesteps=T_TRAIN, clip_sample=True), T_TRAIN, True),
        "mlp": (_mlp(), (2,), lambda: F.DDIMScheduler(num_train_timesteps=T_TRAIN, clip_sample=False), 8, False),
        "conv": (conv, (1, 8, 8),
                 lambda: F.DDPMScheduler(num_train_timesteps=T_TRAIN, variance_type="fixed_large"), 10, False),
    }


def _train_data(n: int) -> torch.Tensor:
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(11))


def _flat_grad(model) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def _sample_kwargs(name):
    return {"eta": 1.0} if name == "mlp" else {}


# ------------------------------------------------------------------------------------------------
# the worker (python tests/test_distributed.py WORKDIR, one process per rank)
# ------------------------------------------------------------------------------------------------
def _checks_in_group(group, workdir: Path, ws: int) -> dict:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    rank = dist.get_rank(group)
    out = {}
    # 1. one DDP step, equal shards, training_loss(reduction="mean")
    model = _mlp()
    ddp = DDP(model, process_group=group)
    x0 = _train_data(GLOBAL_BATCH)
    lo, hi = D.shard_bounds(GLOBAL_BATCH, rank, ws)
    index = D.local_indices(GLOBAL_BATCH, group=group)
    assert (index[0].item() if len(index) else lo, len(index)) == (lo, hi - lo)
    loss = F.training_loss(ddp, x0[lo:hi], F.DDPMScheduler(num_train_timesteps=T_TRAIN), seed=SEED, offset=5,
                           sample_index=index)
    loss.backward()
    out["grad_equal"] = _flat_grad(model)
    # 2. unequal shards: ddp_mean over per-sample losses
    model = _mlp()
    ddp = DDP(model, process_group=group)
    x0 = _train_data(UNEQUAL_BATCH)
    lo, hi = D.shard_bounds(UNEQUAL_BATCH, rank, ws)
    losses = F.training_loss(ddp, x0[lo:hi], F.NoiseSchedule.from_name("linear", T_TRAIN), seed=SEED, offset=9,
                             reduction="none", sample_index=torch.arange(lo, hi), hybrid=False)
    D.ddp_mean(losses, UNEQUAL_BATCH, group=group).backward()
    out["grad_unequal"] = _flat_grad(model)
    # 3. the loss-aware sampler: identical state and timesteps on every rank and world size
    sched = F.NoiseSchedule.from_name("linear", T_AWARE)
    sampler = F.LossAwareSampler(T_AWARE, history_per_term=1, uniform_prob=0.2, group=group)
    emodel = DDP(Elementwise(2, T_AWARE), process_group=group)
    lo, hi = D.shard_bounds(GLOBAL_BATCH, rank, ws)
    drawn = []
    for step in range(4):
        x0 = torch.randn(GLOBAL_BATCH, 2, generator=torch.Generator().manual_seed(100 + step))
        _, det = F.training_loss(emodel, x0[lo:hi], sched, seed=SEED, offset=step, timestep_sampler=sampler,
                                 sample_index=torch.arange(lo, hi), return_details=True)
        idx, t = D.all_gather_rows(torch.arange(lo, hi), det["t"], group=group)
        drawn.append(t[torch.argsort(idx)])
    out["aware_t"] = torch.stack(drawn)
    out["aware_history"] = torch.from_numpy(sampler._history.copy())
    out["aware_warm"] = sampler.warmed_up()
    # 4. sample_shard, every workload and batch size; gather and save/merge
    for name, (m, shape, make_sched, steps, _) in _workloads().items():
        for bs in BATCH_SIZES:
            idx, x = D.sample_shard(m, NUM_SAMPLES, shape, make_sched(), steps, seed=SEED, batch_size=bs,
                                    group=group, progress=False, **_sample_kwargs(name))
            gi, gx = D.gather_samples(idx, x, group=group)
            shard_dir = workdir / f"ws{ws}-{name}-bs{bs}"
            D.save_samples(str(shard_dir), idx, x, group=group)
            dist.barrier(group=group)
            if rank == 0:
                mi, mx = D.merge_samples(str(shard_dir), num_samples=NUM_SAMPLES)
                out[f"merged/{name}/{bs}"] = (torch.from_numpy(mi), torch.from_numpy(mx))
            out[f"samples/{name}/{bs}"] = (gi, gx)
    return out


def _worker(workdir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # env:// (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), as under torchrun
    rank = dist.get_rank()
    groups = {1: dist.new_group([0]), 2: dist.new_group([0, 1]), 3: dist.group.WORLD}
    results = {}
    for ws, group in groups.items():
        if rank < ws:
            results[ws] = _checks_in_group(group, Path(workdir), ws)
    if rank == 0:
        torch.save(results, os.path.join(workdir, "results.pt"))
    dist.barrier()
    dist.destroy_process_group()


def _cli_worker(workdir: str) -> None:
    """One rank of ``python -m ddpm_fast sample``: main() initialises the process group itself from
    the torchrun variables, exactly as under torchrun."""
    import json

    from ddpm_fast.__main__ import main

    torch.set_num_threads(1)
    argv = json.loads(Path(workdir, "cli_args.json").read_text())
    rc = main(argv)
    if rc:
        raise SystemExit(rc)


_TARGETS = {"checks": _worker, "cli": _cli_worker}


def _rendezvous(rank: int, world: int, port: int) -> dict:
    return dict(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port))


def _forked_rank(target: str, rank: int, world: int, port: int, workdir: str) -> None:
    import traceback

    os.environ.update(_rendezvous(rank, world, port))
    err = open(Path(workdir, f"rank{rank}.err"), "w", buffering=1)  # this rank's stderr (the progress bar)
    os.dup2(err.fileno(), 2)
    sys.stderr = err
    try:
        _TARGETS[target](workdir)
    except BaseException:
        Path(workdir, f"rank{rank}.log").write_text(traceback.format_exc())
        raise
    finally:
        err.flush()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests"), env.get("PYTHONPATH", "")])
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **extra)
    return env


def _launch(target: str, world: int, workdir: Path, timeout: float, preload=()) -> str:
    """Run ``world`` ranks of ``_TARGETS[target](workdir)`` as torchrun would: each with RANK,
    LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set, initialising gloo from them (env://).
    Forked from this process where that is safe (no CUDA context, no other thread), so the ranks
    inherit its imports (torch, ddpm_fast, diffusers, and the torch._dynamo that DDP imports on
    construction: seconds per rank on a shared machine); else fresh interpreters running this
    file. Returns how they were started."""
    import importlib
    import multiprocessing as mp

    import threading

    port = _free_port()
    try:  # tqdm's monitor thread (started by an earlier bar) is stopped; tqdm restarts it when needed
        import tqdm
        import tqdm.auto

        for cls in {tqdm.tqdm, tqdm.auto.tqdm}:
            if getattr(cls, "monitor", None) is not None:
                cls.monitor.exit()
                cls.monitor = None
    except ImportError:
        pass
    # fork only a process with no other Python thread (a lock held by one would stay held in the child)
    if "fork" in mp.get_all_start_methods() and not torch.cuda.is_initialized() and threading.active_count() == 1:
        for name in preload:
            importlib.import_module(name)
        ctx = mp.get_context("fork")
        procs = [ctx.Process(target=_forked_rank, args=(target, rank, world, port, str(workdir)))
                 for rank in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.1, deadline - time.monotonic()))
        if any(p.is_alive() for p in procs):
            for p in procs:
                p.kill()
            pytest.fail(f"the {target} ranks did not finish within {timeout:.0f} s")
        for rank, p in enumerate(procs):
            log = workdir / f"rank{rank}.log"
            assert p.exitcode == 0, f"rank {rank} failed:\n{log.read_text() if log.exists() else p.exitcode}"
        return "forked"
    procs = [subprocess.Popen([sys.executable, __file__, target, str(workdir)],
                              env=_env(DDPM_FAST_NO_DIFFUSERS="1" if target == "checks" else "",
                                       **_rendezvous(rank, world, port)),
                              cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(world)]
    deadline = time.monotonic() + timeout
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"the {target} ranks did not finish within {timeout:.0f} s")
    for rank, (p, log) in enumerate(zip(procs, logs)):
        (workdir / f"rank{rank}.err").write_text(log)
        assert p.returncode == 0, f"rank {rank} failed:\n{log[-4000:]}"
    return "spawned"


@pytest.fixture(scope="module")
def gloo(tmp_path_factory):
    dist = torch.distributed
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    workdir = tmp_path_factory.mktemp("gloo")
    t0 = time.perf_counter()
    how = _launch("checks", 3, workdir, timeout=240,
                  preload=("torch._dynamo", "torch.nn.parallel", "ddpm_fast.tools.demo", "ddpm_fast.sampling"))
    print(f"\ngloo job (3 ranks, {how}; groups of 1, 2, 3 ranks): {time.perf_counter() - t0:.1f} s")
    return torch.load(workdir / "results.pt", weights_only=False)


# ------------------------------------------------------------------------------------------------
# gloo: world-size invariance
# ------------------------------------------------------------------------------------------------
def _reference_grad(global_batch, offset, reduce):
    model = _mlp()
    x0 = _train_data(global_batch)
    sched = F.DDPMScheduler(num_train_timesteps=T_TRAIN) if reduce == "mean" else \
        F.NoiseSchedule.from_name("linear", T_TRAIN)
    loss = F.training_loss(model, x0, sched, seed=SEED, offset=offset, sample_index=torch.arange(global_batch))
    loss.backward()
    return _flat_grad(model)


@pytest.mark.parametrize("key,batch,offset,reduce", [("grad_equal", GLOBAL_BATCH, 5, "mean"),
                                                     ("grad_unequal", UNEQUAL_BATCH, 9, "ddp_mean")])
def test_ddp_gradient_equals_single_process(gloo, key, batch, offset, reduce):
    ref = _reference_grad(batch, offset, reduce)
    scale = float(ref.abs().max())
    for ws in WORLD_SIZES:
        got = gloo[ws][key]
        diff = float((got - ref).abs().max())
        print(f"{key} world {ws}: max abs diff {diff:.3g} (max |grad| {scale:.3g})")
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6 * scale)
    # what sample_index fixes: without it, two ranks with the same (seed, offset) each draw the
    # timesteps and noise of rows 0.. of their own shard, and the averaged gradient is another one
    sched = F.NoiseSchedule.from_name("linear", T_TRAIN)
    whole, halves = _mlp(), _mlp()
    x0 = _train_data(GLOBAL_BATCH)
    F.training_loss(whole, x0, sched, seed=SEED, offset=offset).backward()
    for half in x0.chunk(2):
        (0.5 * F.training_loss(halves, half, sched, seed=SEED, offset=offset)).backward()
    assert not torch.allclose(_flat_grad(halves), _flat_grad(whole), rtol=1e-2)


def test_loss_aware_sampler_state_is_world_size_invariant(gloo):
    sched = F.NoiseSchedule.from_name("linear", T_AWARE)
    sampler = F.LossAwareSampler(T_AWARE, history_per_term=1, uniform_prob=0.2)
    model = Elementwise(2, T_AWARE)
    drawn = []
    for step in range(4):
        x0 = torch.randn(GLOBAL_BATCH, 2, generator=torch.Generator().manual_seed(100 + step))
        _, det = F.training_loss(model, x0, sched, seed=SEED, offset=step, timestep_sampler=sampler,
                                 sample_index=torch.arange(GLOBAL_BATCH), return_details=True)
        drawn.append(det["t"])
    assert sampler.warmed_up()  # the last steps drew from non-uniform weights
    for ws in WORLD_SIZES:
        assert gloo[ws]["aware_warm"]
        assert torch.equal(gloo[ws]["aware_t"], torch.stack(drawn)), ws
        assert torch.equal(gloo[ws]["aware_history"], torch.from_numpy(sampler._history)), ws


def _reference_samples():
    refs = {}
    for name, (m, shape, make_sched, steps, exact) in _workloads().items():
        with torch.no_grad():
            idx, x = D.sample_shard(m, NUM_SAMPLES, shape, make_sched(), steps, seed=SEED,
                                    batch_size=NUM_SAMPLES, progress=False, **_sample_kwargs(name))
        # the model's own batch-size dependence: one model call on the whole batch vs row by row
        xin = torch.randn(NUM_SAMPLES, *shape, generator=torch.Generator().manual_seed(0))
        tin = torch.full((NUM_SAMPLES,), T_TRAIN // 2)
        with torch.no_grad():
            whole = m(xin, tin)
            rows = torch.cat([m(xin[i:i + 1], tin[i:i + 1]) for i in range(NUM_SAMPLES)])
        refs[name] = (idx, x, exact, float((whole - rows).abs().max()))
    return refs


@pytest.fixture(scope="module")
def reference_samples():
    return _reference_samples()


def test_sample_shard_identical_across_world_sizes_and_batch_sizes(gloo, reference_samples):
    for name, (idx, ref, exact, model_dep) in reference_samples.items():
        assert torch.equal(idx, torch.arange(NUM_SAMPLES))
        worst = 0.0
        for ws in WORLD_SIZES:
            for bs in BATCH_SIZES:
                gi, gx = gloo[ws][f"samples/{name}/{bs}"]
                assert torch.equal(gi, torch.arange(NUM_SAMPLES)), (name, ws, bs)
                diff = float((gx - ref).abs().max())
                worst = max(worst, diff)
                if exact:
                    assert torch.equal(gx, ref), (name, ws, bs, diff)
                else:
                    # the steps carry the model's batch dependence along (measured: 1.2e-7 here)
                    assert diff <= max(1e-5, 50 * model_dep), (name, ws, bs, diff, model_dep)
        print(f"sample_shard {name}: max abs diff over world sizes {WORLD_SIZES} x batch sizes {BATCH_SIZES} = "
              f"{worst:.3g} (model batch dependence {model_dep:.3g})")


def test_shards_cover_every_index_once_and_merge(gloo, reference_samples):
    for name, (_, ref, exact, _) in reference_samples.items():
        for ws in WORLD_SIZES:
            for bs in BATCH_SIZES:
                mi, mx = gloo[ws][f"merged/{name}/{bs}"]
                assert torch.equal(mi, torch.arange(NUM_SAMPLES))
                gi, gx = gloo[ws][f"samples/{name}/{bs}"]
                assert torch.equal(mx, gx)


# ------------------------------------------------------------------------------------------------
# python -m ddpm_fast sample under torchrun
# ------------------------------------------------------------------------------------------------
def test_sample_cli_on_two_ranks_matches_one_process(tmp_path):
    """``python -m ddpm_fast sample`` on two gloo ranks started as torchrun starts them (see
    :func:`_launch`; the same command under ``torchrun --nproc_per_node 2`` is in docs/distributed.md)
    against one process, with another batch size."""
    import json

    diffusers = pytest.importorskip("diffusers", reason="diffusers is needed for a UNet2DModel folder")
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                 layers_per_block=1, norm_num_groups=4,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"))
    unet.save_pretrained(tmp_path / "unet")
    F.DDIMScheduler(num_train_timesteps=T_TRAIN, clip_sample=True).save_pretrained(tmp_path / "unet")
    common = ["sample", str(tmp_path / "unet"), "-n", "5", "--steps", "3", "--eta", "0.5", "--seed", "3",
              "--format", "float32"]
    workdir = tmp_path / "ranks"
    workdir.mkdir()
    (workdir / "cli_args.json").write_text(json.dumps([*common, "--batch-size", "2", "--out", str(tmp_path / "two")]))
    t0 = time.perf_counter()
    how = _launch("cli", 2, workdir, timeout=180, preload=("ddpm_fast.distributed", "ddpm_fast.__main__"))
    elapsed = time.perf_counter() - t0
    err0, err1 = (workdir / "rank0.err").read_text(), (workdir / "rank1.err").read_text()
    assert "sampling (rank 0 of 2)" in err0 and "sampling (" not in err1  # the bar, on rank 0 only
    from ddpm_fast.__main__ import main

    assert main([*common, "--batch-size", "5", "--out", str(tmp_path / "one"), "--no-progress"]) == 0
    two = np.load(tmp_path / "two" / "samples.npz")["arr_0"]
    one = np.load(tmp_path / "one" / "samples.npz")["arr_0"]
    assert two.shape == one.shape == (5, 1, 8, 8)
    diff = float(np.abs(two - one).max())
    print(f"\nsample CLI on 2 ranks ({how}, batch 2) vs one process (batch 5), tiny UNet2DModel: max abs diff "
          f"{diff:.3g}; 2-rank run {elapsed:.1f} s")
    assert diff < 1e-5
    shards = sorted(os.listdir(tmp_path / "two" / "shards"))
    assert shards == ["shard-00000-of-00002.npz", "shard-00001-of-00002.npz"]
    idx0 = np.load(tmp_path / "two" / "shards" / shards[0])["indices"]
    assert idx0.tolist() == [0, 1, 2]  # contiguous blocks in global order
    # uint8 for FID: the merged arr_0 is (N, H, W, C)
    assert main([*common[:-2], "--batch-size", "5", "--out", str(tmp_path / "u8"), "--no-progress"]) == 0
    u8 = np.load(tmp_path / "u8" / "samples.npz")["arr_0"]
    assert u8.dtype == np.uint8 and u8.shape == (5, 8, 8, 1)
    assert np.array_equal(u8, D.to_uint8_images(one))


# ------------------------------------------------------------------------------------------------
# in-process: the derivation, the plumbing, the helpers
# ------------------------------------------------------------------------------------------------
def test_sample_cli_ddim_without_steps_is_a_usage_error(tmp_path, capsys):
    """DDIM needs --steps: whether ddim comes from --scheduler or from the folder's scheduler config,
    the CLI stops with argparse's usage error (exit 2, the option named) before any model load or
    process group, not with a traceback from inside the sampling loop."""
    from ddpm_fast.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(["sample", str(tmp_path), "-n", "2", "--scheduler", "ddim"])
    assert e.value.code == 2
    assert "--steps is required" in capsys.readouterr().err
    F.DDIMScheduler(num_train_timesteps=T_TRAIN).save_pretrained(tmp_path / "folder")
    with pytest.raises(SystemExit) as e:
        main(["sample", str(tmp_path / "folder"), "-n", "2"])
    assert e.value.code == 2
    assert "--steps is required" in capsys.readouterr().err


def test_row_seeds_is_a_bijection_for_every_seed():
    idx = torch.cat([torch.arange(0, 4096), torch.tensor([2 ** 32 - 1, 2 ** 32, 2 ** 40 - 1, 2 ** 40, 2 ** 62,
                                                          2 ** 63 - 1])])
    for seed in (0, 1, 2 ** 32, 2 ** 63 - 1):
        r = N.row_seeds(seed, idx)
        assert r.min() >= 0
        assert torch.unique(r).numel() == idx.numel()
        assert torch.equal(N._row_seeds_inverse(seed, r), idx)
    assert not torch.equal(N.row_seeds(0, idx), N.row_seeds(1, idx))


def test_row_seeds_and_row_bits_known_answers():
    """The values docs/distributed.md lists, so another implementation can check itself."""
    assert N.row_seeds(0, torch.tensor([0, 1, 2 ** 40])).tolist() == KNOWN_ROW_SEEDS
    assert N.row_bits(0, 0, torch.tensor([0, 1])).tolist() == KNOWN_ROW_BITS
    # row_bits: key seed, counter (i lo, i hi, offset lo, 2^31 + offset hi), (r1 mod 2^31) 2^32 + r0
    r = N.philox4x32_10((torch.tensor(5), torch.tensor(1), torch.tensor(7), torch.tensor(2 ** 31 + 3)),
                        (torch.tensor(9), torch.tensor(0)))
    expect = ((int(r[1]) & 0x7FFFFFFF) << 32) | int(r[0])
    assert N.row_bits(9, 3 * 2 ** 32 + 7, torch.tensor([2 ** 32 + 5])).tolist() == [expect]


KNOWN_ROW_SEEDS = [4154444745573095350, 7857362307555732722, 3513382366677574714]
KNOWN_ROW_BITS = [246240052281331746, 4040225391543862084]


def test_row_bits_uniform_timesteps():
    t = N.row_bits(SEED, 3, torch.arange(30_000)) % 6
    counts = torch.bincount(t, minlength=6).double()
    chi2 = float(((counts - 5_000) ** 2 / 5_000).sum())
    assert chi2 < 25.0  # 5 degrees of freedom: p ~ 1e-4


@pytest.mark.parametrize("backend", backend_param("cpu"))
def test_sample_index_rows_do_not_depend_on_the_batch(backend):
    sched = F.NoiseSchedule.from_name("linear", 50)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(6, 2, 3, 3, generator=g)
    mo = torch.randn(6, 4, 3, 3, generator=g)
    t = torch.tensor([0, 3, 49, 7, 20, 1])
    idx = torch.tensor([5, 0, 2 ** 40 - 1, 3, 11, 2 ** 33])
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    kw = dict(seed=SEED, offset=4, backend=backend)
    whole = F.q_sample(x0, t, sched, sample_index=idx, **kw)
    assert torch.equal(F.q_sample(x0[perm], t[perm], sched, sample_index=idx[perm], **kw), whole[perm])
    assert torch.equal(F.q_sample(x0[2:4], t[2:4], sched, sample_index=idx[2:4], **kw), whole[2:4])
    # the noise is the per-row-seed noise of row_seeds
    eps = F.gaussian_noise(x0.shape, N.row_seeds(SEED, idx), 4, backend=backend)
    torch.testing.assert_close(whole, F.q_sample(x0, t, sched, eps, backend=backend), rtol=0, atol=1e-6)
    for target in ("epsilon", "v_prediction", "sample"):
        a = F.diffusion_loss(mo[:, :2], x0, t, sched, target=target, sample_index=idx, reduction="none", **kw)
        b = F.diffusion_loss(mo[perm, :2], x0[perm], t[perm], sched, target=target, sample_index=idx[perm],
                             reduction="none", **kw)
        torch.testing.assert_close(b, a[perm], rtol=1e-6, atol=0)
    a = F.hybrid_loss(mo, x0, t, sched, sample_index=idx, reduction="none", **kw)
    b = F.hybrid_loss(mo[perm], x0[perm], t[perm], sched, sample_index=idx[perm], reduction="none", **kw)
    torch.testing.assert_close(b, a[perm], rtol=1e-6, atol=0)
    c = F.hybrid_loss(mo, x0, t, sched, noise=eps, reduction="none", backend=backend)
    torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)


def test_training_loss_rows_follow_their_index():
    sched = F.NoiseSchedule.from_name("cosine", 100)
    model = Elementwise(2, 100)
    x0 = torch.randn(8, 2)
    idx = torch.arange(100, 108)
    perm = torch.randperm(8)
    for hybrid in (False, True):
        m = (lambda x, t: torch.cat([model(x, t), 0.1 * x], 1)) if hybrid else model
        _, a = F.training_loss(m, x0, sched, seed=SEED, offset=2, sample_index=idx, hybrid=hybrid,
                               return_details=True)
        _, b = F.training_loss(m, x0[perm], sched, seed=SEED, offset=2, sample_index=idx[perm], hybrid=hybrid,
                               return_details=True)
        assert torch.equal(b["t"], a["t"][perm])
        torch.testing.assert_close(b["losses"], a["losses"][perm], rtol=1e-6, atol=0)
        assert torch.equal(a["t"], N.row_bits(SEED, 2, idx) % 100)
    _, c = F.training_loss(model, x0, sched, seed=SEED, offset=3, sample_index=idx, return_details=True)
    assert not torch.equal(c["t"], a["t"])  # another step, other timesteps


def test_sample_with_sample_index_is_row_wise():
    sched = F.DDPMScheduler(num_train_timesteps=10)
    model = Elementwise(2, 10)
    with torch.no_grad():
        whole = F.sample(model, (5, 2), sched, 10, seed=1, sample_index=torch.arange(5), progress=False)
        parts = [F.sample(model, (2, 2), sched, 10, seed=1, sample_index=torch.tensor([4, 1]), progress=False)]
        plain = F.sample(model, (5, 2), sched, 10, seed=1, progress=False)
    assert torch.equal(parts[0], whole[[4, 1]])
    assert not torch.equal(plain, whole)  # sample_index selects the index-keyed noise
    with pytest.raises(ValueError, match="sample_index needs seed"):
        F.sample(model, (5, 2), sched, 10, sample_index=torch.arange(5), progress=False)


def test_sample_index_errors():
    sched = F.NoiseSchedule.from_name("linear", 10)
    x0 = torch.randn(3, 2)
    with pytest.raises(TypeError, match="sample_index must be an int64 tensor"):
        F.q_sample(x0, 1, sched, seed=1, sample_index=torch.arange(3, dtype=torch.int32))
    with pytest.raises(TypeError, match="sample_index must be a"):
        F.q_sample(x0, 1, sched, seed=1, sample_index=[0, 1, 2])
    with pytest.raises(ValueError, match=r"sample_index must have shape \(3,\)"):
        F.q_sample(x0, 1, sched, seed=1, sample_index=torch.arange(4))
    with pytest.raises(ValueError, match=r"sample_index must lie in \[0, 2\*\*63\)"):
        F.q_sample(x0, 1, sched, seed=1, sample_index=torch.tensor([0, -1, 2]))
    with pytest.raises(ValueError, match="cannot be combined with noise"):
        F.q_sample(x0, 1, sched, torch.randn(3, 2), sample_index=torch.arange(3))
    with pytest.raises(ValueError, match="sample_index needs seed"):
        F.diffusion_loss(x0, x0, 1, sched, sample_index=torch.arange(3))
    with pytest.raises(ValueError, match="one seed for the run"):
        F.q_sample(x0, 1, sched, seed=torch.arange(3), sample_index=torch.arange(3))
    # target="sample" draws no noise: sample_index without seed is fine there
    F.diffusion_loss(x0, x0, 1, sched, target="sample", sample_index=torch.arange(3))

    class NoBits:
        num_timesteps = 10

        def sample(self, b, g):
            return torch.zeros(b, dtype=torch.int64), torch.ones(b)

    with pytest.raises(TypeError, match="sample_from_bits"):
        F.training_loss(lambda x, t: x, x0, sched, seed=1, timestep_sampler=NoBits(), sample_index=torch.arange(3))


def test_loss_aware_sample_from_bits_follows_the_weights():
    s = F.LossAwareSampler(4, history_per_term=1, uniform_prob=0.0)
    s.update(torch.arange(4), torch.tensor([1.0, 1.0, 2.0, 0.0]))  # p = 1/4, 1/4, 1/2, 0
    assert s.warmed_up()
    t, w = s.sample_from_bits(N.row_bits(1, 0, torch.arange(40_000)))
    freq = torch.bincount(t, minlength=4).double() / 40_000
    torch.testing.assert_close(freq, torch.tensor([0.25, 0.25, 0.5, 0.0], dtype=torch.float64), atol=0.01, rtol=0)
    torch.testing.assert_close(w[t == 2], torch.full_like(w[t == 2], 0.5))
    # update with sample_index records rows in index order (no process group: a sort)
    a, b = F.LossAwareSampler(3, history_per_term=2), F.LossAwareSampler(3, history_per_term=2)
    a.update(torch.tensor([1, 1]), torch.tensor([5.0, 7.0]), sample_index=torch.tensor([9, 2]))
    b.update(torch.tensor([1, 1]), torch.tensor([7.0, 5.0]))
    assert np.array_equal(a._history, b._history)


def test_shard_bounds_partition():
    for n in (0, 1, 5, 7, 12, 100):
        for world in (1, 2, 3, 8):
            bounds = [D.shard_bounds(n, r, world) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            sizes = [b - a for a, b in bounds]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    with pytest.raises(ValueError, match="rank"):
        D.shard_bounds(5, 3, 3)
    with pytest.raises(ValueError, match="num_samples"):
        D.shard_bounds(-1, 0, 1)


def test_without_a_process_group_everything_is_one_rank(tmp_path):
    assert D.rank_and_world() == (0, 1)
    assert torch.equal(D.local_indices(4), torch.arange(4))
    losses = torch.tensor([1.0, 2.0, 3.0])
    assert float(D.ddp_mean(losses, 3)) == pytest.approx(2.0)
    model = Elementwise(2, 10)
    sched = F.DDPMScheduler(num_train_timesteps=10)
    with torch.no_grad():
        idx, x = D.sample_shard(model, 5, (2,), sched, 10, seed=4, batch_size=2, progress=False)
        ref = F.sample(model, (5, 2), sched, 10, seed=4, sample_index=torch.arange(5), progress=False)
        e_idx, e_x = D.sample_shard(model, 0, (2,), sched, 10, seed=4, progress=False)
    assert torch.equal(idx, torch.arange(5)) and torch.equal(x, ref)
    assert e_idx.numel() == 0 and e_x.shape == (0, 2)
    gi, gx = D.gather_samples(idx.flip(0), x.flip(0))
    assert torch.equal(gi, idx) and torch.equal(gx, x)
    path = D.save_samples(str(tmp_path / "s"), idx, x)
    assert path.endswith("shard-00000-of-00001.npz")
    mi, mx = D.merge_samples(str(tmp_path / "s"), str(tmp_path / "all.npz"))
    assert mi.tolist() == list(range(5)) and np.array_equal(mx, x.numpy())
    assert np.array_equal(np.load(tmp_path / "all.npz")["arr_0"], x.numpy())
    with pytest.raises(TypeError, match="generator"):
        D.sample_shard(model, 5, (2,), sched, 10, seed=4, generator=torch.Generator())
    with pytest.raises(ValueError, match="group was given"):
        D.rank_and_world(group=object())


def test_merge_samples_rejects_incomplete_or_mixed_shards(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    np.savez(d / "shard-00000-of-00002.npz", indices=np.arange(3), samples=np.zeros((3, 2)))
    with pytest.raises(ValueError, match="missing"):
        D.merge_samples(str(d))
    np.savez(d / "shard-00001-of-00002.npz", indices=np.array([3, 3]), samples=np.zeros((2, 2)))
    with pytest.raises(ValueError, match="exactly once"):
        D.merge_samples(str(d))
    np.savez(d / "shard-00001-of-00002.npz", indices=np.array([3, 4]), samples=np.ones((2, 2)))
    idx, x = D.merge_samples(str(d), num_samples=5)
    assert idx.tolist() == [0, 1, 2, 3, 4] and x[3:].sum() == 4
    with pytest.raises(ValueError, match="exactly once"):
        D.merge_samples(str(d), num_samples=6)
    np.savez(d / "shard-00000-of-00001.npz", indices=np.arange(5), samples=np.zeros((5, 2)))
    with pytest.raises(ValueError, match="several world sizes"):
        D.merge_samples(str(d))
    with pytest.raises(ValueError, match="no shard"):
        D.merge_samples(str(tmp_path))


def test_ddp_toy_example_runs_on_one_process(capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("ddp_toy", REPO / "examples" / "ddp_toy.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    threads = torch.get_num_threads()
    try:
        assert mod.main(["--iterations", "3", "--batch", "10", "--timesteps", "10", "--samples", "20"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "trained 3 steps on 1 rank(s)" in out and "parameter checksum" in out and "20 samples: weights" in out


def test_to_uint8_images():
    x = torch.tensor([-1.0, -0.999, 0.0, 1.0, 3.0]).reshape(1, 1, 1, 5).expand(2, 3, 1, 5)
    img = D.to_uint8_images(x)
    assert img.shape == (2, 1, 5, 3) and img.dtype == np.uint8
    assert img[0, 0, :, 0].tolist() == [0, 0, 128, 255, 255]
    with pytest.raises(ValueError, match="N, C, H, W"):
        D.to_uint8_images(torch.zeros(3, 2))


if __name__ == "__main__":  # a rank started as a fresh interpreter (where fork is unavailable)
    _TARGETS[sys.argv[1]](sys.argv[2])
