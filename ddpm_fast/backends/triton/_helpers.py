"""Per-element helpers shared by every Triton kernel, and the launch utilities of the launchers.

Device side (``@triton.jit``):

* the docs/noise.md noise: Philox4x32-10 words -> uniforms ``u(r) = ((r >> 9) + 0.5) * 2^-23`` -> Box-Muller
  normals, through ``triton.language.random.philox(seed, c0, c1, c2, c3)`` with the four counter
  words as **uint32** tensors (``(q mod 2^32, q >> 32, offset mod 2^32, offset >> 32)``, split with
  logical shifts of the uint64 values): ``tl.randn``/``tl.randint4x`` use other layouts and cannot
  carry the offset;
* ``log``/``exp``/``sin``/``cos``/``sqrt`` that are accurate on CUDA: ``tl.log``/``tl.exp``/``tl.sin``/
  ``tl.cos`` lower to approximate PTX (``lg2.approx``/``ex2.approx``/``sin.approx``) for fp32, so with
  ``USE_LIBDEVICE`` the CUDA path calls libdevice's ``__nv_logf``/``__nv_expf``/``__nv_sinf``/``__nv_cosf``
  (``tl.extra.cuda.libdevice``); the interpreter cannot call extern functions and takes the
  ``tl.*`` path, which it evaluates with numpy (accurate);
* NaN-keeping clamps (comparisons are false for NaN, so NaN passes through);
* the parameterisation conversions (docs/math.md) with fp32 per-row coefficients.

Host side: whether we run under the interpreter, the fixed block size used there, the autotune
configurations used on CUDA (keyed on the row count and row length, i.e. on the element count),
and the decomposition ``program id -> (row, block within the row)`` every kernel shares.
"""
from __future__ import annotations

import math
import os
import struct

import torch
import triton
import triton.language as tl

try:  # libdevice lives here in triton >= 3.0
    from triton.language.extra.cuda import libdevice
except Exception:  # pragma: no cover - exotic builds
    libdevice = None

# Read once, at import, as Triton itself reads TRITON_INTERPRET when kernels are decorated.
INTERPRET = os.environ.get("TRITON_INTERPRET", "") == "1"

TWO_POW_M23 = 1.1920928955078125e-07  # 2^-23, exact in fp32
TWO_PI = 6.283185307179586
MASK32 = 0xFFFFFFFF

# prediction / variance / noise codes passed to kernels as constexprs
PRED_CODES = {"epsilon": 0, "sample": 1, "v_prediction": 2}
VAR_CODES = {"fixed_small": 0, "fixed_small_log": 1, "fixed_large": 2, "fixed_large_log": 3, "learned": 4,
             "learned_range": 5}
NOISE_NONE, NOISE_TENSOR, NOISE_SEED = 0, 1, 2

# Block size under the interpreter (one program per row for the small test shapes) and the plain
# (untuned) configuration used on CUDA where autotuning is unsafe (in-place updates).
INTERPRET_MAX_BLOCK = 1024
PLAIN_BLOCK = 1024
# Rows shorter than this run on the flat grid (per-element row index and coefficients). Under the
# interpreter blocks are as small as 16, so only rows shorter than that need it there (the tests
# force the flat path by raising this).
FLAT_ROW_MIN = 16 if INTERPRET else 512
MIN_TUNED_BLOCK = 512


def autotune_configs():
    """Elementwise configurations tried on CUDA (every BLOCK a multiple of 4 so a block holds
    whole Philox quads)."""
    return [triton.Config({"BLOCK": b}, num_warps=w) for b, w in
            ((512, 4), (1024, 4), (1024, 8), (2048, 8), (4096, 8))]


def use_libdevice(device: torch.device) -> bool:
    return device.type == "cuda" and not INTERPRET and libdevice is not None


def interpret_block(row_len: int) -> int:
    return max(16, min(INTERPRET_MAX_BLOCK, triton.next_power_of_2(max(row_len, 1))))


def maybe_autotune(fn):
    """``@triton.autotune`` keyed on the row count and length (the element count) and on the
    kernel's constexpr variant flags (the autotuner's cache key holds only the listed arguments and
    the tensors' dtypes) on CUDA; ``None`` under the interpreter (autotuning is off: fixed block)."""
    if INTERPRET:
        return None
    flags = [p.name for p in fn.params if p.is_constexpr and p.name != "BLOCK"]
    return triton.autotune(configs=autotune_configs(), key=["B", "N", *flags])(fn)


def is_flat(N: int) -> bool:
    """Short rows run on the flat grid (a row-wise block would be mostly masked)."""
    return N < FLAT_ROW_MIN


def launch_step(plain, tuned, *, B: int, N: int, device: torch.device, allow_tune: bool, inputs, middle, tail,
                out, x0_hat, return_x0: bool, thresholding: bool, dynamic_thresholding_ratio: float,
                sample_max_value: float, kwargs):
    """A step kernel's launches: with dynamic thresholding, a first pass writes the raw x0_hat
    (``RAW_X0``) and the per-row thresholds s = clamp(quantile(|x0_hat|), 1, sample_max_value) come
    from it; then the step itself. Kernel arguments are ``(*inputs, out, x0, *middle, thr, *tail)``."""
    thr = dummy(device)
    if thresholding:
        if not sample_max_value > 0.0:  # s = clamp(q, 1, sample_max_value) divides x0_hat
            raise ValueError(f"sample_max_value must be positive with thresholding, got {sample_max_value}")
        raw = torch.empty((B, N), device=device, dtype=torch.float32)
        launch(plain, tuned, B=B, N=N, device=device, allow_tune=True,
               args=(*inputs, raw, raw, *middle, thr, *tail), kwargs=dict(kwargs, RAW_X0=True, WRITE_X0=False))
        thr = row_quantile(raw.abs(), dynamic_thresholding_ratio).clamp(1.0, sample_max_value).contiguous()
    launch(plain, tuned, B=B, N=N, device=device, allow_tune=allow_tune,
           args=(*inputs, out, x0_hat if return_x0 else dummy(device), *middle, thr, *tail),
           kwargs=dict(kwargs, RAW_X0=False, WRITE_X0=bool(return_x0)))


def launch(plain, tuned, *, B: int, N: int, device: torch.device, allow_tune: bool, args, kwargs):
    """Launch an elementwise kernel on its grid: row-wise B * cdiv(N, BLOCK) programs, or flat
    cdiv(B * N, BLOCK) programs for short rows (``FLAT`` is added to the constexprs). Under the
    interpreter a fixed power-of-two block; on CUDA the autotuned kernel unless ``allow_tune`` is
    False (in-place updates: autotuning re-runs the kernel, which would read its own output)."""
    flat = is_flat(N)
    kwargs = dict(kwargs, FLAT=flat)
    n_rows = 1 if flat else B
    row_len = B * N if flat else N
    if INTERPRET or tuned is None or not allow_tune:
        block = interpret_block(row_len) if INTERPRET else PLAIN_BLOCK
        grid = (n_rows * triton.cdiv(row_len, block),)
        _wrap(plain)[grid](*args, **kwargs, BLOCK=block)   # Triton's default num_warps=4
        return block
    grid = lambda meta: (n_rows * triton.cdiv(row_len, meta["BLOCK"]),)  # noqa: E731
    _wrap(tuned)[grid](*args, **kwargs)
    return None


# torch >= 2.6 has triton_op/wrap_triton (torch.compile then sees the kernels themselves and CUDA
# graphs capture them); older torch gets an opaque custom_op with the same schema.
_HAS_TRITON_OP = hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")


def register_op(name: str, *, mutates_args):
    """``torch.library.triton_op`` where the installed torch has it, else ``custom_op``."""
    if _HAS_TRITON_OP:
        return torch.library.triton_op(name, mutates_args=mutates_args)
    return torch.library.custom_op(name, mutates_args=mutates_args)


def _wrap(kernel):
    """``torch.library.wrap_triton`` so that torch.compile traces the launch (a no-op wrapper in
    eager); the kernel itself where torch has no wrap_triton (its ops are custom_ops then)."""
    return torch.library.wrap_triton(kernel) if _HAS_TRITON_OP else kernel


def check_out(out, **inputs):
    """The ``_out`` ops' rule for ``out`` (ops.py's, docs/errors.md): not expanded, and exactly an
    input (``out`` = ``x_t``) or disjoint from every input, never sharing part of one's memory.
    Skipped while tracing (fake tensors have no memory; aliasing is then the compiler's)."""
    from torch._subclasses.fake_tensor import is_fake

    from ..._tensors import _has_internal_overlap, _same_view, _shares_memory

    if torch.compiler.is_compiling() or is_fake(out):
        return
    if _has_internal_overlap(out):
        raise ValueError(f"out must not be expanded: several of its elements share one memory location (strides "
                         f"{tuple(out.stride())})")
    for name, x in inputs.items():
        if x is not None and not _same_view(out, x) and _shares_memory(out, x):
            raise ValueError(f"out shares part of its memory with {name} (a shifted or sliced view of the same "
                             f"storage): give out={name} itself for an in-place update, or a tensor of its own")


def abar_rows(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """abar[t] per row for the backward formulas (torch, not a kernel): float64, NaN where t lies
    outside the table (no out-of-bounds index)."""
    T = alphas_cumprod.numel()
    inside = (t >= 0) & (t < T)
    return torch.where(inside, alphas_cumprod[t.clamp(0, T - 1)], torch.full_like(alphas_cumprod[:1], float("nan")))


def num_blocks(N: int, block: int) -> int:
    return max(1, triton.cdiv(N, block))


def partial_cols(N: int) -> int:
    """Columns of a per-row partial-sum buffer valid for every block size a launch may pick (one
    per element on the flat grid, where a block spans rows)."""
    if is_flat(N):
        return max(N, 1)
    smallest = min(interpret_block(N), 16) if INTERPRET else min(MIN_TUNED_BLOCK, PLAIN_BLOCK)
    return num_blocks(N, smallest)


def row_view(x: torch.Tensor) -> int:
    """Elements per row of dim 0."""
    return x.numel() // x.shape[0] if x.shape[0] else 0


# --------------------------------------------------------------------------------------------
# device helpers
# --------------------------------------------------------------------------------------------
@triton.jit
def row_and_block(B, N, BLOCK: tl.constexpr, FLAT: tl.constexpr):
    """(row, block id, int64 column offsets, mask) of this program. Row-wise (FLAT False): a 1-D
    grid of B * cdiv(N, BLOCK) programs, each inside one row, ``row`` and ``blk`` scalars (the
    row's coefficients are computed once per program). Flat (short rows, N < FLAT_ROW_MIN): a grid
    of cdiv(B * N, BLOCK) programs over the flattened tensor, ``row`` and ``cols`` per element
    (the coefficients per element), ``blk`` the program id. int64 throughout: tensors past 2^31
    elements index correctly."""
    pid = tl.program_id(0).to(tl.int64)
    n64 = tl.cast(N, tl.int64)     # N, B arrive as i32 below 2^31: keep every product in int64
    if FLAT:
        flat = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        row = flat // n64
        cols = flat - row * n64
        mask = flat < tl.cast(B, tl.int64) * n64
        blk = pid
    else:
        nblk = (n64 + BLOCK - 1) // BLOCK
        row = pid // nblk
        blk = pid - row * nblk
        cols = blk * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        mask = cols < N
    return row, blk, cols, mask


@triton.jit
def log_f(x, USE_LIBDEVICE: tl.constexpr):
    if USE_LIBDEVICE:
        return libdevice.log(x)
    else:
        return tl.log(x)


@triton.jit
def exp_f(x, USE_LIBDEVICE: tl.constexpr):
    if USE_LIBDEVICE:
        return libdevice.exp(x)
    else:
        return tl.exp(x)


@triton.jit
def sin_f(x, USE_LIBDEVICE: tl.constexpr):
    if USE_LIBDEVICE:
        return libdevice.sin(x)
    else:
        return tl.sin(x)


@triton.jit
def cos_f(x, USE_LIBDEVICE: tl.constexpr):
    if USE_LIBDEVICE:
        return libdevice.cos(x)
    else:
        return tl.cos(x)


@triton.jit
def sqrt_f(x):
    """IEEE-rounded square root (tl.sqrt is approximate for fp32)."""
    return tl.sqrt_rn(x)


@triton.jit
def sqrt64(x):
    """float64 square root (correctly rounded: there is no approximate fp64 sqrt in PTX)."""
    return tl.sqrt(x.to(tl.float64))


@triton.jit
def to_dtype(x, dtype: tl.constexpr, USE_LIBDEVICE: tl.constexpr):
    """fp32 -> the output dtype, rounding to nearest even. Kernels compiled for CUDA with libdevice
    (``USE_LIBDEVICE``, see :func:`use_libdevice`) get it from ``.to``; the interpreter truncates
    fp32 -> bf16 (numpy has no bf16), so elsewhere the value is first rounded to the nearest bf16
    in fp32 bits (ties to even, NaN kept) and the truncation is then exact (on a compiled kernel
    without libdevice this gives the same result as ``.to``)."""
    if dtype == tl.bfloat16:
        if not USE_LIBDEVICE:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = tl.where(x != x, x, bits.to(tl.float32, bitcast=True))
    return x.to(dtype)


@triton.jit
def clamp_keep_nan(x, lo, hi):
    """clamp(x, lo, hi) that keeps NaN (as torch.clamp): NaN compares false and passes."""
    return tl.where(x < lo, lo, tl.where(x > hi, hi, x))


@triton.jit
def uniform_from_bits(r):
    """u(r) = ((r >> 9) + 0.5) * 2^-23: exact in fp32, strictly inside (0, 1)."""
    return ((r >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07


@triton.jit
def philox_words(seed, q, offset):
    """The four Philox4x32-10 words of counter (q lo, q hi, offset lo, offset hi) and key
    (seed lo, seed hi). ``q`` an int64 block, ``seed``/``offset`` int64 scalars in [0, 2^63)."""
    qu = q.to(tl.uint64, bitcast=True)
    c0 = (qu & 0xFFFFFFFF).to(tl.uint32)
    c1 = (qu >> 32).to(tl.uint32)
    ou = offset.to(tl.uint64, bitcast=True)
    zero = c0 * 0
    c2 = zero + (ou & 0xFFFFFFFF).to(tl.uint32)
    c3 = zero + (ou >> 32).to(tl.uint32)
    return tl.random.philox(seed, c0, c1, c2, c3)


@triton.jit
def box_muller(ra, rb, USE_LIBDEVICE: tl.constexpr):
    """sqrt(-2 ln u(ra)) * (cos, sin)(2 pi u(rb)) in fp32."""
    radius = sqrt_f(-2.0 * log_f(uniform_from_bits(ra), USE_LIBDEVICE))
    theta = 6.283185307179586 * uniform_from_bits(rb)
    return radius * cos_f(theta, USE_LIBDEVICE), radius * sin_f(theta, USE_LIBDEVICE)


@triton.jit
def normals_aligned(seed, offset, base, BLOCK: tl.constexpr, USE_LIBDEVICE: tl.constexpr):
    """The docs/noise.md normals of the BLOCK consecutive indices ``base ..`` (base a multiple of 4): one
    Philox call per quad, its four normals interleaved back into index order."""
    q = base // 4 + tl.arange(0, BLOCK // 4).to(tl.int64)
    r0, r1, r2, r3 = philox_words(seed, q, offset)
    n0, n1 = box_muller(r0, r1, USE_LIBDEVICE)
    n2, n3 = box_muller(r2, r3, USE_LIBDEVICE)
    # join(join(n0, n2), join(n1, n3)) has [q, a, b] = n_{2a+b}: row-major it is n0 n1 n2 n3.
    return tl.reshape(tl.join(tl.join(n0, n2), tl.join(n1, n3)), (BLOCK,))


@triton.jit
def normals_at(seed, offset, idx, USE_LIBDEVICE: tl.constexpr):
    """The docs/noise.md normals at arbitrary int64 indices (a quad's words recomputed per element)."""
    r0, r1, r2, r3 = philox_words(seed, idx >> 2, offset)
    lane = idx & 3
    ra = tl.where(lane < 2, r0, r2)
    rb = tl.where(lane < 2, r1, r3)
    c, s = box_muller(ra, rb, USE_LIBDEVICE)
    return tl.where((lane & 1) == 1, s, c)


@triton.jit
def row_noise(noise_ptr, seed_ptr, offset_ptr, row, blk, cols, mask, N,
              NOISE_MODE: tl.constexpr, PER_ROW_SEED: tl.constexpr, ALIGNED: tl.constexpr,
              BLOCK: tl.constexpr, FLAT: tl.constexpr, USE_LIBDEVICE: tl.constexpr):
    """The noise of elements ``cols`` of row(s) ``row`` of a sample with N elements a row: a given
    tensor (NOISE_MODE 1) or the docs/noise.md normals of (seed, offset) at the row-major sample index
    (NOISE_MODE 2): ``i = row * N + col``, or ``col`` with per-row seeds (``seed[row]``).
    ALIGNED: the block's indices are consecutive from a multiple of 4, so one Philox call serves
    four elements (row-wise: per-row seeds or N % 4 == 0; flat: a scalar seed); otherwise each
    element recomputes its quad's words."""
    if NOISE_MODE == 1:
        z = tl.load(noise_ptr + row * N + cols, mask=mask, other=0.0).to(tl.float32)
    else:
        if PER_ROW_SEED:
            seed = tl.load(seed_ptr + row)
            idx = cols
        else:
            seed = tl.load(seed_ptr)
            idx = row * N + cols
        offset = tl.load(offset_ptr)
        if ALIGNED:
            if FLAT:
                base = blk * BLOCK
            elif PER_ROW_SEED:
                base = blk * BLOCK
            else:
                base = row * N + blk * BLOCK
            z = normals_aligned(seed, offset, base, BLOCK, USE_LIBDEVICE)
        else:
            z = normals_at(seed, offset, idx, USE_LIBDEVICE)
    return z


@triton.jit
def x0_from_prediction(pred, x, sqrt_abar, sqrt_1m_abar, PRED: tl.constexpr):
    """epsilon: (x_t - sqrt(1-a) eps)/sqrt(a) (0/0 at zero SNR is 0, its limit a -> 0+, as the
    reference); sample: the prediction; v: sqrt(a) x_t - sqrt(1-a) v."""
    if PRED == 0:
        num = x - sqrt_1m_abar * pred
        return tl.where(num == 0.0, num, tl.div_rn(num, sqrt_abar))
    elif PRED == 1:
        return pred
    else:
        return sqrt_abar * x - sqrt_1m_abar * pred


@triton.jit
def eps_from_x0(x, x0, sqrt_abar, sqrt_1m_abar):
    """(x_t - sqrt(a) x0)/sqrt(1-a), the signal term 0 at a = 0 even for an infinite x0 (the
    reference's zero-SNR limit: 0 * inf would be NaN)."""
    signal = tl.where(sqrt_abar == 0.0, 0.0, sqrt_abar * x0)
    return tl.div_rn(x - signal, sqrt_1m_abar)


@triton.jit
def eps_from_prediction(pred, x, sqrt_abar, sqrt_1m_abar, PRED: tl.constexpr):
    """epsilon: the prediction; sample: (x_t - sqrt(a) x0)/sqrt(1-a); v: sqrt(a) v + sqrt(1-a) x_t."""
    if PRED == 0:
        return pred
    elif PRED == 1:
        return eps_from_x0(x, pred, sqrt_abar, sqrt_1m_abar)
    else:
        return sqrt_abar * pred + sqrt_1m_abar * x


@triton.jit
def load_prediction(mo_ptr, row, cols, mask, B, N, guidance_scale,
                    LEARNED: tl.constexpr, GUIDANCE: tl.constexpr):
    """(prediction, variance values) of elements ``cols`` of sample row ``row`` in fp32. The model
    output has 2N elements a row with learned variance (prediction first, dim-1 split), and 2B
    rows with guidance (unconditional first): ``uncond + w (cond - uncond)`` on the prediction,
    the variance values from the conditional half."""
    if LEARNED:
        mo_row = 2 * tl.cast(N, tl.int64)
    else:
        mo_row = tl.cast(N, tl.int64)
    pred = tl.load(mo_ptr + row * mo_row + cols, mask=mask, other=0.0).to(tl.float32)
    var_row = row
    if GUIDANCE:
        cond = tl.load(mo_ptr + (row + B) * mo_row + cols, mask=mask, other=0.0).to(tl.float32)
        pred = pred + guidance_scale * (cond - pred)
        var_row = row + B
    if LEARNED:
        var = tl.load(mo_ptr + var_row * mo_row + N + cols, mask=mask, other=0.0).to(tl.float32)
    else:
        var = pred
    return pred, var


@triton.jit
def f64_from_pair(hi, lo):
    return tl.cast(hi, tl.float64) + tl.cast(lo, tl.float64)


@triton.jit
def abar_or_past_end(abar_ptr, t, past_end, T):
    """abar[t] in float64 from the (T,) table: ``past_end`` where t < 0 (the step past the end:
    1 for DDPM, final_alpha_cumprod for DDIM), NaN where t >= T (a
    device-tensor timestep out of range poisons its row instead of reading out of bounds; the
    host-side check is ops.py's, opt-in for device tensors)."""
    a = tl.load(abar_ptr + tl.minimum(tl.maximum(t, 0), T - 1))
    return tl.where(t < 0, past_end, tl.where(t < T, a, float("nan")))


@triton.jit
def abar_in_table(abar_ptr, t, T):
    """abar[t] in float64 for a timestep that must lie in the table: NaN unless 0 <= t < T."""
    a = tl.load(abar_ptr + tl.minimum(tl.maximum(t, 0), T - 1))
    return tl.where((t >= 0) & (t < T), a, float("nan"))


# --------------------------------------------------------------------------------------------
# host helpers shared by the launchers
# --------------------------------------------------------------------------------------------
def noise_mode(noise, seed) -> int:
    if noise is not None:
        return NOISE_TENSOR
    if seed is not None:
        return NOISE_SEED
    return NOISE_NONE


def noise_flags(noise, seed, B: int, N: int):
    """(NOISE_MODE, PER_ROW_SEED, ALIGNED, noise, seed) ready for a kernel: a given noise tensor
    made contiguous (an explicit copy for strided noise), seeds flagged per row when ``(B,)``."""
    mode = noise_mode(noise, seed)
    per_row = bool(mode == NOISE_SEED and seed.numel() == B and B != 1)
    aligned = (not per_row) if is_flat(N) else (per_row or N % 4 == 0)
    if noise is not None:
        noise = noise.contiguous()
    return mode, per_row, aligned, noise


def row_quantile(x2d: torch.Tensor, q: float) -> torch.Tensor:
    """Per-row quantile of a (B, n) tensor: the reference's (a sort per row, no host sync; NaN
    rows give NaN; equal infinite neighbours give that infinity, so zero-SNR stays finite)."""
    from ...reference import row_quantile as reference_row_quantile

    return reference_row_quantile(x2d, q)


def fp32_pair(value: float):
    """(hi, lo) fp32 values with hi + lo == value to ~48 bits: how a Python float reaches a kernel
    (whose float arguments are fp32) when float64 precision matters. Pure Python (struct), so it
    is traceable by torch.compile."""
    hi = _round_fp32(value)
    return hi, _round_fp32(value - hi)


def _round_fp32(value: float) -> float:
    return struct.unpack("f", struct.pack("f", value))[0]


def dummy(device: torch.device, dtype=torch.float32) -> torch.Tensor:
    """A placeholder for pointer arguments a kernel variant never reads."""
    return torch.empty(1, device=device, dtype=dtype)
