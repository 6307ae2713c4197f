"""``python -m ddpm_fast demo --digits``: a small image DDPM on scikit-learn's handwritten digits.

scikit-learn ships 1,797 handwritten digits (``sklearn.datasets.load_digits``: 8x8 pixels, values
0..16, ten classes, no download). This example trains a small diffusers ``UNet2DModel`` (a compact
conv net of its own, :class:`TinyUNet`, when diffusers is absent) on them with
:func:`ddpm_fast.training_loss`, keeps an EMA of the weights, then draws samples with
:func:`ddpm_fast.sample` through :class:`ddpm_fast.DDIMScheduler` (50 steps) and
:class:`ddpm_fast.DDPMScheduler` (the full chain of ``T`` steps). It uses only the library's public
names, as a user would.

The quality figure anyone can recompute (:class:`DigitScorer`): a logistic regression (scikit-learn
defaults, ``C = 1``, on pixels / 16) fitted on the training digits classifies the samples; it reports
the mean max class probability ("confidence"), the histogram of predicted classes with its entropy,
and the digits "inception score" ``exp(E_x KL(p(y|x) || p(y)))`` (at most 10), each beside the same
figures for the held-out real digits (a fixed stratified split: 1,257 training, 540 held-out; the
generator is trained on the training digits only).

Checks (``--check`` exits 1 when one fails). Full run: each sampler's confidence is >= 0.8 of the
held-out real digits', and every class holds between 0.8 and 1.2 of the uniform share of the
predicted classes (at 1,000 samples a perfect sampler passes that band only 74% of the time:
each share has a binomial standard error of 0.095). ``--quick`` (a CI-sized run, about 40 CPU
seconds): confidence >= 0.7 of the real digits', every class between 0.4 and 1.8 of the uniform
share, and the last tenth of the training loss below 0.6 of the first tenth's. The classifier is
fairly confident even on noise (0.64 of the real digits' confidence), so the histogram and the
inception score are what separate noise from digits; docs/examples.md gives the measured figures
and the justification of each threshold.

Choices (measured on a 2-core CPU, one thread): ``T = 200`` with the cosine schedule (the full DDPM
chain over 1,000 samples is 200 forward passes of a 118k-parameter UNet, about 45 CPU seconds),
v-prediction with min-SNR-5 weights (the highest confidence of the variants tried), clipping to
[-1, 1], DDIM with trailing spacing (its first step is at ``T - 1``), AdamW with a cosine learning
rate and an EMA of the weights.

Distributed (:mod:`ddpm_fast.distributed`): under ``torchrun --nproc_per_node N`` every rank draws
the same global batch and trains on its block of it (``local_indices``, ``training_loss(...,
sample_index=)``, ``ddp_mean``; DDP averages the gradients), and draws its block of the samples
(``sample_shard``); ``gather_samples`` puts them in global order and rank 0 scores them and writes
the files. Every row's timestep and noise are keyed by its global index, so the run is the same on
any number of ranks up to fp32 summation order. A single process needs no process group.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from typing import Dict, List, Optional

import numpy as np
import torch

NUM_CLASSES = 10
TEST_FRACTION = 0.3  # of 1,797 digits: 540 held out, stratified, random_state=0
SPLIT_SEED = 0
SAMPLE_BATCH = 250  # rows per sample() call (the bar advances once per call)

# the full and the --quick run; command-line options override these
FULL = dict(iterations=1500, batch=128, timesteps=200, samples=1000, ddim_steps=50, lr=2e-3)
QUICK = dict(iterations=400, batch=64, timesteps=100, samples=300, ddim_steps=25, lr=3e-3)
CHECKS = {  # (min confidence ratio, min class share, max class share) as fractions of real / uniform
    "full": dict(min_confidence_ratio=0.8, min_class_ratio=0.8, max_class_ratio=1.2),
    "quick": dict(min_confidence_ratio=0.7, min_class_ratio=0.4, max_class_ratio=1.8, max_loss_ratio=0.6),
}


# ---- data and the quality figure -------------------------------------------------------------

def _sklearn():
    try:
        import sklearn  # noqa: F401
        from sklearn.datasets import load_digits
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import train_test_split
    except ImportError as e:  # pragma: no cover - the message is the point
        raise ImportError("the digits example needs scikit-learn (pip install scikit-learn)") from e
    return load_digits, LogisticRegression, train_test_split


def load_split():
    """``(x_train, y_train, x_test, y_test)``: the digits as float64 ``(n, 64)`` pixels in [0, 16],
    split 70/30 stratified with ``random_state=0`` (1,257 / 540)."""
    load_digits, _, train_test_split = _sklearn()
    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=y)
    return x_tr, y_tr, x_te, y_te


def to_model_space(pixels: np.ndarray) -> torch.Tensor:
    """``(n, 64)`` pixels in [0, 16] -> ``(n, 1, 8, 8)`` float32 in [-1, 1]."""
    return torch.as_tensor(np.asarray(pixels), dtype=torch.float32).reshape(-1, 1, 8, 8) / 8.0 - 1.0


def to_pixels(x: torch.Tensor) -> np.ndarray:
    """``(n, 1, 8, 8)`` samples in model space -> ``(n, 64)`` float64 pixels in [0, 16] (clamped)."""
    return ((x.detach().float().cpu().reshape(-1, 64).clamp(-1.0, 1.0) + 1.0) * 8.0).double().numpy()


class DigitScorer:
    """The digits quality figure: scikit-learn's ``LogisticRegression`` (defaults, ``C = 1``,
    ``max_iter=2000``) fitted on ``pixels / 16`` of the training digits.

    :meth:`score` takes ``(n, 64)`` pixels in [0, 16] and returns the mean max class probability,
    the predicted-class counts, fractions and ratios to the uniform share, the histogram's entropy
    (nats; ``ln 10 = 2.303`` is uniform), the "inception score" ``exp(E KL(p(y|x) || p(y)))`` and a
    chi-square test of the counts against uniform (9 degrees of freedom)."""

    def __init__(self, x_train: np.ndarray, y_train: np.ndarray):
        _, LogisticRegression, _ = _sklearn()
        self.model = LogisticRegression(max_iter=2000).fit(np.asarray(x_train) / 16.0, np.asarray(y_train))

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        pixels = np.asarray(pixels, dtype=np.float64)
        if pixels.ndim != 2 or pixels.shape[1] != 64:
            raise ValueError(f"pixels must have shape (n, 64), got {pixels.shape}")
        return self.model.predict_proba(pixels / 16.0)

    def accuracy(self, pixels: np.ndarray, labels: np.ndarray) -> float:
        return float((self.probabilities(pixels).argmax(1) == np.asarray(labels)).mean())

    def score(self, pixels: np.ndarray) -> Dict:
        p = self.probabilities(pixels)
        n = p.shape[0]
        pred = p.argmax(1)
        counts = np.bincount(pred, minlength=NUM_CLASSES)
        frac = counts / n
        nz = frac[frac > 0]
        marginal = p.mean(0)
        kl = (p * (np.log(np.clip(p, 1e-30, None)) - np.log(np.clip(marginal, 1e-30, None)))).sum(1)
        expected = n / NUM_CLASSES
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        try:
            from scipy.stats import chi2 as chi2_dist

            chi2_p = float(chi2_dist.sf(chi2, NUM_CLASSES - 1))
        except ImportError:  # scipy comes with scikit-learn; keep the figure optional anyway
            chi2_p = None
        ratio = frac * NUM_CLASSES
        return {
            "n": int(n),
            "mean_confidence": float(p.max(1).mean()),
            "class_counts": counts.tolist(),
            "class_ratio_to_uniform": [round(float(r), 4) for r in ratio],
            "max_class_deviation": float(np.abs(ratio - 1.0).max()),
            "histogram_entropy": float(-(nz * np.log(nz)).sum()),
            "histogram_entropy_max": math.log(NUM_CLASSES),
            "inception_score": float(np.exp(kl.mean())),
            "chi2_uniform": chi2,
            "chi2_uniform_p": chi2_p,
        }


def check(score: Dict, real: Dict, thresholds: Dict) -> Dict[str, bool]:
    """The pass/fail of one sampler's score against the real digits' (see the module docstring)."""
    ratio = score["mean_confidence"] / real["mean_confidence"]
    share = score["class_ratio_to_uniform"]
    return {
        f"confidence_ratio>={thresholds['min_confidence_ratio']}": ratio >= thresholds["min_confidence_ratio"],
        f"every_class_in_[{thresholds['min_class_ratio']},{thresholds['max_class_ratio']}]x_uniform":
            min(share) >= thresholds["min_class_ratio"] and max(share) <= thresholds["max_class_ratio"],
    }


# ---- models ------------------------------------------------------------------------------------

def make_unet():
    """The diffusers ``UNet2DModel`` used here: 8x8 -> 4x4, 16 and 32 channels, one ResNet block a
    level, no mid block (118,289 parameters)."""
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       mid_block_type=None, norm_num_groups=4)


class _ResBlock(torch.nn.Module):
    def __init__(self, cin: int, cout: int, temb: int):
        super().__init__()
        self.norm1 = torch.nn.GroupNorm(4, cin)
        self.conv1 = torch.nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = torch.nn.Linear(temb, cout)
        self.norm2 = torch.nn.GroupNorm(4, cout)
        self.conv2 = torch.nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = torch.nn.Conv2d(cin, cout, 1) if cin != cout else torch.nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(torch.nn.functional.silu(self.norm1(x)))
        h = h + self.temb(emb)[:, :, None, None]
        h = self.conv2(torch.nn.functional.silu(self.norm2(h)))
        return self.skip(x) + h


class TinyUNet(torch.nn.Module):
    """The compact conv net used when diffusers is absent: the same shape as :func:`make_unet`
    (8x8 with 16 channels, 4x4 with 32, a skip connection, a sinusoidal time embedding)."""

    def __init__(self, ch: int = 16, temb: int = 64):
        super().__init__()
        self.ch = ch
        self.time = torch.nn.Sequential(torch.nn.Linear(ch, temb), torch.nn.SiLU(), torch.nn.Linear(temb, temb))
        self.conv_in = torch.nn.Conv2d(1, ch, 3, padding=1)
        self.down1 = _ResBlock(ch, ch, temb)
        self.down = torch.nn.Conv2d(ch, ch, 3, stride=2, padding=1)
        self.down2 = _ResBlock(ch, 2 * ch, temb)
        self.up2 = _ResBlock(2 * ch, 2 * ch, temb)
        self.up = torch.nn.Conv2d(2 * ch, 2 * ch, 3, padding=1)
        self.up1 = _ResBlock(3 * ch, ch, temb)
        self.norm_out = torch.nn.GroupNorm(4, ch)
        self.conv_out = torch.nn.Conv2d(ch, 1, 3, padding=1)

    def forward(self, x, t):
        half = self.ch // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=x.device, dtype=torch.float32) / half)
        ang = t.to(torch.float32)[:, None] * freqs[None]
        emb = self.time(torch.cat([ang.sin(), ang.cos()], dim=1))
        h1 = self.down1(self.conv_in(x), emb)
        h2 = self.down2(self.down(h1), emb)
        h = self.up(torch.nn.functional.interpolate(self.up2(h2, emb), scale_factor=2.0, mode="nearest"))
        h = self.up1(torch.cat([h, h1], dim=1), emb)
        return self.conv_out(torch.nn.functional.silu(self.norm_out(h)))


def make_model(kind: str = "auto"):
    """``(model, name)``: ``"unet"`` (diffusers), ``"conv"`` (:class:`TinyUNet`), or ``"auto"``
    (the UNet when diffusers imports, else the conv net)."""
    if kind not in ("auto", "unet", "conv"):
        raise ValueError(f"model must be 'auto', 'unet' or 'conv', got {kind!r}")
    if kind in ("auto", "unet"):
        try:
            return make_unet(), "diffusers UNet2DModel (16, 32), no mid block"
        except ImportError:
            if kind == "unet":
                raise
    return TinyUNet(), "TinyUNet (16, 32), the built-in conv net"


# ---- the process group (torchrun) ---------------------------------------------------------------

class _World:
    """The device and, under ``torchrun``, the process group (started here, closed at the end);
    ranks and shards come from :mod:`ddpm_fast.distributed`, which needs no group in one process."""

    def __init__(self, device_arg: str):
        import torch.distributed as dist

        from .. import distributed

        self.dist = dist
        self.owns_group = False
        want = int(os.environ.get("WORLD_SIZE", "1")) > 1
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device_arg == "auto":
            device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
        else:
            device = torch.device(device_arg)
            if device.type == "cuda" and device.index is None:
                device = torch.device("cuda", local if want else torch.cuda.current_device())
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if want and dist.is_available() and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            self.owns_group = True
        self.rank, self.size = distributed.rank_and_world()
        self.active = self.size > 1
        self.device = device

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        """The mean over the ranks (for logging)."""
        if self.active:
            x = x.clone()
            self.dist.all_reduce(x)
            x /= self.size
        return x

    def barrier(self):
        if self.active:
            self.dist.barrier()

    def close(self):
        if self.owns_group:
            self.dist.destroy_process_group()


# ---- the run ----------------------------------------------------------------------------------------

class _Clock:
    """Wall and process CPU seconds per phase (CPU time is the fairer figure on a shared machine)."""

    def __init__(self, device):
        self.device = device
        self.seconds: Dict[str, Dict[str, float]] = {}

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self):
        self._sync()
        return time.perf_counter(), time.process_time()

    def stop(self, name, t):
        self._sync()
        self.seconds[name] = {"wall": time.perf_counter() - t[0], "cpu": time.process_time() - t[1]}
        return self.seconds[name]


def _parser():
    p = argparse.ArgumentParser(prog="python -m ddpm_fast demo --digits", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="digits_out", help="output folder for digits.png, digits_loss.png, digits.json")
    p.add_argument("--device", default="auto", help="torch device; auto: cuda (cuda:LOCAL_RANK) when available, else cpu")
    p.add_argument("--model", default="auto", choices=("auto", "unet", "conv"),
                   help="unet: diffusers UNet2DModel; conv: the built-in TinyUNet; auto: unet when diffusers imports")
    p.add_argument("--iterations", type=int, help=f"training iterations (default {FULL['iterations']}; "
                                                  f"--quick {QUICK['iterations']})")
    p.add_argument("--batch", type=int, help=f"global training batch (default {FULL['batch']}; --quick {QUICK['batch']})")
    p.add_argument("--timesteps", type=int, help=f"num_train_timesteps T, also the DDPM chain length (default "
                                                 f"{FULL['timesteps']}; --quick {QUICK['timesteps']})")
    p.add_argument("--samples", type=int, help=f"samples per sampler (default {FULL['samples']}; --quick {QUICK['samples']})")
    p.add_argument("--ddim-steps", type=int, help=f"DDIM steps (default {FULL['ddim_steps']})")
    p.add_argument("--lr", type=float, help=f"AdamW peak learning rate (default {FULL['lr']:g}; --quick "
                                            f"{QUICK['lr']:g}; linear warm-up, cosine decay to 0)")
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay (warmed up as (1 + k) / (10 + k); default 0.999)")
    p.add_argument("--target", default="v_prediction", choices=("epsilon", "v_prediction"),
                   help="the model's target (default v_prediction)")
    p.add_argument("--snr-gamma", type=float, default=5.0, help="min-SNR-gamma loss weights (default 5; 0: off)")
    p.add_argument("--seed", type=int, default=0, help="seed of the model, the batches and the noise")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1; 0 leaves torch's setting)")
    p.add_argument("--quick", action="store_true", help="the CI-sized run (see the module docstring)")
    p.add_argument("--check", action="store_true", help="exit 1 unless the quality checks pass")
    p.add_argument("--no-plot", action="store_true", help="skip the PNGs")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in preset:
        if getattr(args, key) <= 0:
            parser.error(f"--{key.replace('_', '-')} must be positive, got {getattr(args, key)}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.samples < world or args.batch < world:
        parser.error(f"--samples and --batch must be at least the world size ({world})")
    if args.ddim_steps > args.timesteps:
        parser.error(f"--ddim-steps ({args.ddim_steps}) cannot exceed --timesteps ({args.timesteps})")
    if args.snr_gamma is not None and args.snr_gamma <= 0:
        args.snr_gamma = None
    if not 0.0 <= args.ema < 1.0:
        parser.error(f"--ema must lie in [0, 1), got {args.ema}")
    try:
        _sklearn()
    except ImportError as e:
        print(f"ddpm_fast digits example: {e}")
        return 2
    old_threads = torch.get_num_threads()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(old_threads)


def _run(args) -> int:
    import ddpm_fast
    from ddpm_fast import DDIMScheduler, DDPMScheduler, training_loss
    from ddpm_fast import distributed

    t_total = time.perf_counter(), time.process_time()
    world = _World(args.device)
    device, rank = world.device, world.rank
    lead = rank == 0
    clock = _Clock(device)
    try:
        # ---- data, the scorer --------------------------------------------------------------------
        x_tr, y_tr, x_te, y_te = load_split()
        scorer = real = None
        if lead:
            t = clock.start()
            scorer = DigitScorer(x_tr, y_tr)
            real = scorer.score(x_te)
            real["accuracy"] = scorer.accuracy(x_te, y_te)
            # what the figure gives a pipeline that learnt nothing: x_T itself (standard normal, clamped)
            noise = scorer.score(to_pixels(torch.randn(1000, 1, 8, 8, generator=torch.Generator().manual_seed(0))))
            clock.stop("classifier", t)
        data = to_model_space(x_tr).to(device)

        T = args.timesteps
        ddpm = DDPMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2", clip_sample=True,
                             prediction_type=args.target)
        ddim = DDIMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2", clip_sample=True,
                             prediction_type=args.target, timestep_spacing="trailing")
        torch.manual_seed(args.seed)
        net, model_name = make_model(args.model)
        net = net.to(device)
        n_params = sum(p.numel() for p in net.parameters())
        ema = copy.deepcopy(net).requires_grad_(False).eval()
        model = net
        if world.active:
            model = torch.nn.parallel.DistributedDataParallel(
                net, device_ids=[device.index] if device.type == "cuda" else None)
        opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=0.0)
        if lead:
            print(f"ddpm_fast {ddpm_fast.__version__} digits example: sklearn load_digits, {len(x_tr)} training / "
                  f"{len(x_te)} held-out digits, 8x8 in [-1, 1]")
            print(f"  model   {model_name}, {n_params:,} parameters; T={T}, cosine schedule, {args.target} target"
                  f"{'' if args.snr_gamma is None else f', min-SNR gamma {args.snr_gamma:g}'}; device {device}"
                  f"{f', {world.size} ranks' if world.active else ''}, {torch.get_num_threads()} thread(s)")
            print(f"  scorer  logistic regression on the training digits: held-out accuracy {real['accuracy']:.3f}, "
                  f"mean confidence {real['mean_confidence']:.3f}")

        # ---- training ------------------------------------------------------------------------------
        from tqdm.auto import tqdm

        B = args.batch
        # every rank draws the same global batch and keeps its block; each row's timestep and noise
        # are keyed by its position in the global batch (sample_index), so the run does not
        # depend on the number of ranks
        index = distributed.local_indices(B)
        lo, hi = (int(index[0]), int(index[-1]) + 1) if len(index) else (0, 0)
        batch_gen = torch.Generator().manual_seed(args.seed)
        warmup = min(100, max(1, args.iterations // 10))
        losses: List[float] = []
        pending: List[torch.Tensor] = []
        bar = tqdm(range(args.iterations), desc="training", disable=args.no_progress or not lead, leave=False)
        t = clock.start()
        for it in bar:
            lr = args.lr * min(1.0, (it + 1) / warmup) * 0.5 * (1.0 + math.cos(math.pi * it / args.iterations))
            for group in opt.param_groups:
                group["lr"] = lr
            idx = torch.randint(0, data.shape[0], (B,), generator=batch_gen)[lo:hi].to(device)
            losses_b = training_loss(model, data[idx], ddpm, seed=args.seed + 1, offset=it, target=args.target,
                                     snr_gamma=args.snr_gamma, sample_index=index, reduction="none")
            loss = distributed.ddp_mean(losses_b, B)  # DDP's average of its gradient = the global mean's
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            decay = min(args.ema, (1.0 + it) / (10.0 + it))
            with torch.no_grad():
                for pe, p in zip(ema.parameters(), net.parameters()):
                    pe.lerp_(p, 1.0 - decay)
            pending.append(loss.detach())
            if len(pending) == 50 or it + 1 == args.iterations:  # one host read per 50 steps, not per step
                chunk = world.mean(torch.stack(pending)).tolist()
                losses.extend(chunk)
                pending.clear()
                bar.set_postfix(loss=f"{sum(chunk) / len(chunk):.4f}")
        bar.close()
        train_s = clock.stop("train", t)
        tenth = max(1, len(losses) // 10)
        first_loss, final_loss = float(np.mean(losses[:tenth])), float(np.mean(losses[-tenth:]))
        if lead:
            print(f"  train   {args.iterations} iterations, batch {B}, AdamW lr {args.lr:g} (cosine), EMA {args.ema}: "
                  f"loss {first_loss:.4f} (first tenth) -> {final_loss:.4f} (last tenth); "
                  f"{train_s['wall']:.1f} s wall, {train_s['cpu']:.1f} s CPU")

        # ---- sampling ------------------------------------------------------------------------------
        n = args.samples
        results = {}
        samplers = [("ddim", ddim, args.ddim_steps, f"DDIM {args.ddim_steps} steps (eta 0, trailing)"),
                    ("ddpm", ddpm, T, f"DDPM {T} steps (the full chain, fixed_small)")]
        for k, (name, scheduler, steps, label) in enumerate(samplers):
            t = clock.start()
            with torch.no_grad():  # this rank's block of the n samples, then all of them in global order
                idx, x = distributed.sample_shard(ema, n, (1, 8, 8), scheduler, steps, seed=args.seed + 100 + k,
                                                  batch_size=SAMPLE_BATCH, device=device,
                                                  progress=not args.no_progress)
                x = distributed.gather_samples(idx, x)[1]
            sec = clock.stop(name, t)
            if lead:
                pixels = to_pixels(x)
                score = scorer.score(pixels)
                score["label"] = label
                score["confidence_ratio"] = score["mean_confidence"] / real["mean_confidence"]
                results[name] = (score, pixels, scorer.probabilities(pixels[:100]).argmax(1))
                print(f"  sample  {n:,} with {label}: {sec['wall']:.1f} s wall, {sec['cpu']:.1f} s CPU")

        if not lead:
            return 0

        # ---- the figures -------------------------------------------------------------------------------
        thresholds = CHECKS["quick" if args.quick else "full"]
        checks = {}
        for name, (score, _, _) in results.items():
            checks[name] = check(score, real, thresholds)
        if args.quick:
            checks["training"] = {f"loss_last_tenth<{thresholds['max_loss_ratio']}x_first_tenth":
                                  final_loss < thresholds["max_loss_ratio"] * first_loss}
        print()
        print(f"  {'':<14}{'confidence':>11}{'ratio':>7}{'entropy':>9}{'IS':>6}  per-class share of the predictions "
              f"(x uniform, digits 0..9)")
        rows = ([("held-out real", real)] + [(name.upper(), results[name][0]) for name in results]
                + [("noise (x_T)", noise)])
        for label, s in rows:
            share = " ".join(f"{r:.2f}" for r in s["class_ratio_to_uniform"])
            print(f"  {label:<14}{s['mean_confidence']:>11.3f}{s['mean_confidence'] / real['mean_confidence']:>7.2f}"
                  f"{s['histogram_entropy']:>9.3f}{s['inception_score']:>6.2f}  {share}")
        flat = {f"{name}.{k}": v for name, c in checks.items() for k, v in c.items()}
        print("  checks  " + ", ".join(f"{k}: {'PASS' if v else 'FAIL'}" for k, v in flat.items()))

        os.makedirs(args.out, exist_ok=True)
        written = []
        if not args.no_plot:
            written += _plot(args, x_te, y_te, results, real, losses, thresholds)
        path = os.path.join(args.out, "digits_ema.pt")
        torch.save({"state_dict": ema.state_dict(), "model": model_name, "scheduler": dict(ddpm.config)}, path)
        written.append(path)
        for name, (_, pixels, _) in results.items():
            path = os.path.join(args.out, f"samples_{name}.npy")
            np.save(path, pixels.astype(np.float32))
            written.append(path)
        total = {"wall": time.perf_counter() - t_total[0], "cpu": time.process_time() - t_total[1],
                 "cpu_since_process_start": time.process_time()}  # the latter includes the imports
        clock.seconds["total"] = total
        report = {
            "real_heldout": real,
            "samplers": {name: s for name, (s, _, _) in results.items()},
            "baseline_noise": noise,
            "checks": checks,
            "thresholds": thresholds,
            "passed": all(flat.values()),
            "loss": {"first_tenth": first_loss, "last_tenth": final_loss,
                     "curve": losses[:: max(1, len(losses) // 500)]},
            "config": {"model": model_name, "parameters": n_params, "iterations": args.iterations, "batch": B,
                       "timesteps": T, "ddim_steps": args.ddim_steps, "samples": n, "lr": args.lr, "ema": args.ema,
                       "target": args.target, "snr_gamma": args.snr_gamma, "schedule": "squaredcos_cap_v2",
                       "seed": args.seed, "device": str(device), "world_size": world.size,
                       "threads": torch.get_num_threads(), "quick": args.quick,
                       "split": {"train": len(x_tr), "heldout": len(x_te), "random_state": SPLIT_SEED},
                       "torch": torch.__version__, "ddpm_fast": ddpm_fast.__version__},
            "seconds": clock.seconds,
        }
        path = os.path.join(args.out, "digits.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
        written.append(path)
        print(f"  time    {total['wall']:.1f} s wall, {total['cpu']:.1f} s CPU (this process; "
              f"{total['cpu_since_process_start']:.1f} s CPU with the interpreter start and imports)")
        print(f"  wrote   {', '.join(written)}")
        if args.check and not report["passed"]:
            return 1
        return 0
    finally:
        world.barrier()
        world.close()


def _grid(pixels: np.ndarray, order: np.ndarray, rows: int = 10, cols: int = 10) -> np.ndarray:
    """A ``(rows*9 - 1, cols*9 - 1)`` image of ``pixels[order[:rows*cols]]`` with 1-pixel gaps."""
    out = np.full((rows * 9 - 1, cols * 9 - 1), np.nan)
    for k, i in enumerate(order[: rows * cols]):
        r, c = divmod(k, cols)
        out[r * 9:r * 9 + 8, c * 9:c * 9 + 8] = pixels[i].reshape(8, 8)
    return out


def _plot(args, x_te, y_te, results, real, losses, thresholds) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("held-out real digits", x_te[:100], np.argsort(y_te[:100], kind="stable"), real)]
    for name, (s, pixels, pred100) in results.items():
        panels.append((s["label"], pixels[:100], np.argsort(pred100, kind="stable"), s))
    cmap = matplotlib.colormaps["gray_r"].with_extremes(bad="white")
    fig, axes = plt.subplots(2, len(panels), figsize=(3.6 * len(panels), 5.6), gridspec_kw={"height_ratios": [3, 1.1]})
    for j, (title, px, order, s) in enumerate(panels):
        ax = axes[0, j]
        ax.imshow(_grid(px, order), cmap=cmap, vmin=0, vmax=16, interpolation="nearest")
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_title(f"{title}\nconfidence {s['mean_confidence']:.3f}"
                     + ("" if j == 0 else f" ({s['mean_confidence'] / real['mean_confidence']:.2f} of real)"),
                     fontsize=9)
        ax = axes[1, j]
        share = s["class_ratio_to_uniform"]
        ax.bar(range(NUM_CLASSES), share, color="tab:blue" if j == 0 else "tab:orange")
        ax.axhspan(thresholds["min_class_ratio"], thresholds["max_class_ratio"], color="tab:green", alpha=0.15, lw=0)
        ax.axhline(1.0, color="k", lw=0.6)
        ax.set_xticks(range(NUM_CLASSES)), ax.set_ylim(0, max(1.6, thresholds["max_class_ratio"], max(share)) + 0.1)
        ax.set_title(f"predicted class share (x uniform), n={s['n']}", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(f"ddpm_fast digits: first 100 of each set, ordered by (predicted) class; "
                 f"{args.iterations} iterations, T={args.timesteps}", fontsize=9)
    fig.tight_layout()
    grid_path = os.path.join(args.out, "digits.png")
    fig.savefig(grid_path, dpi=72)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 3.0))
    ax.plot(losses, lw=0.5, color="tab:gray", label="per iteration")
    k = max(1, len(losses) // 30)
    smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
    ax.plot(np.arange(k - 1, len(losses)), smooth, lw=1.5, color="tab:red", label=f"mean of {k}")
    weighting = "" if args.snr_gamma is None else f", min-SNR-{args.snr_gamma:g} weighted"
    ax.set_yscale("log"), ax.set_xlabel("iteration"), ax.set_ylabel(f"{args.target} MSE{weighting}", fontsize=8)
    ax.set_title("training loss", fontsize=9), ax.legend(fontsize=7)
    fig.tight_layout()
    loss_path = os.path.join(args.out, "digits_loss.png")
    fig.savefig(loss_path, dpi=72)
    plt.close(fig)
    return [grid_path, loss_path]


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
