"""The frozen noise contract (docs/noise.md), in vectorised pure PyTorch.

Gaussian noise is a pure function of ``(seed, offset, i)``: Philox4x32-10 with key
``(seed mod 2^32, seed >> 32)`` and counter ``(q mod 2^32, q >> 32, offset mod 2^32, offset >> 32)``,
``q = i // 4``; the four output words give four normals by Box-Muller and element ``i`` takes number
``i % 4``. ``i`` is the row-major index of the element in the sample's shape (restarting at 0 in
every row of dim 0 when the seed is per row). This module is the specification: it computes the
uniforms and Box-Muller in float64 and rounds only the result.

32-bit words are held in int64 tensors; the 32x32 -> 64-bit products of Philox are split into
16-bit halves so that no intermediate exceeds 2^50 (no signed overflow anywhere).
"""
from __future__ import annotations

import math
import operator
from typing import Sequence, Tuple

import torch

__all__ = ["philox4x32_10", "uniform_from_bits", "box_muller", "normals_at", "gaussian_noise_reference",
           "row_seeds", "row_bits", "PHILOX_M0", "PHILOX_M1", "PHILOX_W0", "PHILOX_W1"]

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
_MASK32 = 0xFFFFFFFF
_TWO_POW_M23 = 2.0 ** -23


def _mulhilo32(a: torch.Tensor, m: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit words of the 64-bit product a * m, a an int64 tensor of uint32 values."""
    a_lo = a & 0xFFFF
    a_hi = a >> 16
    p_lo = a_lo * m                       # < 2^48
    p_hi = a_hi * m                       # < 2^48
    mid = p_lo + ((p_hi & 0xFFFF) << 16)  # < 2^49
    lo = mid & _MASK32
    hi = (p_hi >> 16) + (mid >> 32)
    return hi & _MASK32, lo


def philox4x32_10(counter: Sequence[torch.Tensor], key: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, ...]:
    """Philox4x32-10 (Salmon et al. 2011; Random123 constants) on int64 tensors holding uint32
    words. ``counter`` is four words, ``key`` two; they broadcast. Returns the four output words."""
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64) & _MASK32 for c in counter)
    k0, k1 = (torch.as_tensor(k, dtype=torch.int64) & _MASK32 for k in key)
    for rnd in range(10):
        if rnd > 0:
            k0 = (k0 + PHILOX_W0) & _MASK32
            k1 = (k1 + PHILOX_W1) & _MASK32
        hi0, lo0 = _mulhilo32(c0, PHILOX_M0)
        hi1, lo1 = _mulhilo32(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def uniform_from_bits(r: torch.Tensor) -> torch.Tensor:
    """u(r) = ((r >> 9) + 0.5) * 2^-23: strictly inside (0, 1), exact in fp32 (float64 here)."""
    return ((r >> 9).to(torch.float64) + 0.5) * _TWO_POW_M23


def box_muller(ra: torch.Tensor, rb: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Two normals from two words: sqrt(-2 ln u(ra)) * (cos, sin)(2 pi u(rb)), in float64."""
    radius = torch.sqrt(-2.0 * torch.log(uniform_from_bits(ra)))
    theta = (2.0 * math.pi) * uniform_from_bits(rb)
    return radius * torch.cos(theta), radius * torch.sin(theta)


def _key_words(seed) -> Tuple[torch.Tensor, torch.Tensor]:
    """The Philox key ``(seed mod 2^32, seed >> 32)`` of a seed (int or int64 tensor)."""
    seed = torch.as_tensor(seed, dtype=torch.int64)
    return seed & _MASK32, (seed >> 32) & _MASK32


def _normal_blocks(q: torch.Tensor, seed: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """The float64 normals of block ``q`` (elements ``4q .. 4q+3``) in a trailing dim of 4: one
    Philox call (counter ``(q mod 2^32, q >> 32, offset mod 2^32, offset >> 32)``, key from ``seed``),
    two Box-Muller pairs. ``q``, ``seed`` and ``offset`` are int64 tensors that broadcast."""
    r0, r1, r2, r3 = philox4x32_10((q & _MASK32, q >> 32, offset & _MASK32, offset >> 32), _key_words(seed))
    n0, n1 = box_muller(r0, r1)
    n2, n3 = box_muller(r2, r3)
    return torch.stack([n0, n1, n2, n3], dim=-1)


def normals_at(index: torch.Tensor, seed, offset) -> torch.Tensor:
    """The float64 normals of the contract at element indices ``index`` (int64 tensor): number
    ``index % 4`` of block ``index // 4``. ``seed`` and ``offset`` are ints or int64 tensors
    broadcasting against ``index``."""
    index = torch.as_tensor(index, dtype=torch.int64)
    seed = torch.as_tensor(seed, dtype=torch.int64, device=index.device)
    offset = torch.as_tensor(offset, dtype=torch.int64, device=index.device)
    blocks = _normal_blocks(index >> 2, seed, offset)
    lane = (index & 3).expand(blocks.shape[:-1]).unsqueeze(-1)
    return blocks.gather(-1, lane).squeeze(-1)


def _shape_tuple(shape) -> Tuple[int, ...]:
    """A shape as a tuple of ints, raising TypeError as torch does for floats, strings and bools
    (``int(2.5)`` and ``int("2")`` would silently accept them)."""
    if isinstance(shape, (str, bytes)) or not hasattr(shape, "__iter__"):
        raise TypeError(f"shape must be a sequence of ints, got {type(shape).__name__} {shape!r}")
    dims = []
    for i, s in enumerate(shape):
        if isinstance(s, bool):
            raise TypeError(f"shape must be a sequence of ints, got bool at position {i}")
        try:
            dims.append(operator.index(s))
        except TypeError:
            raise TypeError(f"shape must be a sequence of ints, got {type(s).__name__} at position {i}") from None
    if any(d < 0 for d in dims):
        raise ValueError(f"shape must hold non-negative ints, got {tuple(dims)}")
    return tuple(dims)


def gaussian_noise_reference(shape: Sequence[int], seed, offset=0, *, device=None,
                             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """docs/noise.md noise of ``shape``. ``seed``: int, 0-d int64 tensor, or a ``(shape[0],)`` int64 tensor of
    per-row seeds (``i`` restarts in every row). ``offset``: int or 0-d int64 tensor. Computed in
    float64 by blocks of four normals and rounded once to ``dtype``."""
    shape = _shape_tuple(shape)
    seed_t = torch.as_tensor(seed, dtype=torch.int64)
    if device is None:
        device = seed_t.device
    device = torch.device(device)
    seed_t = seed_t.to(device)
    offset_t = torch.as_tensor(offset, dtype=torch.int64).to(device).reshape(())
    numel = math.prod(shape)
    if numel == 0:
        return torch.empty(shape, device=device, dtype=dtype)
    if seed_t.dim() == 1 and len(shape) >= 1:
        rows = shape[0]
        per_row = numel // rows if rows else 0
        nq = (per_row + 3) // 4
        q = torch.arange(nq, device=device, dtype=torch.int64).unsqueeze(0)      # (1, nq)
        key = seed_t.reshape(rows, 1)
        blocks = _normal_blocks(q, key, offset_t)                                 # (rows, nq, 4)
        flat = blocks.reshape(rows, nq * 4)[:, :per_row]
    else:
        nq = (numel + 3) // 4
        q = torch.arange(nq, device=device, dtype=torch.int64)
        flat = _normal_blocks(q, seed_t.reshape(()), offset_t).reshape(-1)[:numel]
    return flat.reshape(shape).to(dtype)


# --------------------------------------------------------------------------------------------
# World-size invariance: row seeds and row bits keyed by a row's global index (docs/distributed.md)
# --------------------------------------------------------------------------------------------
# Noise streams never set the top bit of counter word 3 (offset < 2^63). The derived streams below
# set it, and tell themselves apart by counter word 1: the Feistel rounds set its top bit, the row
# bits hold ``index >> 32 < 2^31`` there. So the three kinds of Philox input never meet.
_DERIVED = 0x80000000
_MASK31 = 0x7FFFFFFF
_FEISTEL_ROUNDS = 4


def row_seeds(seed, sample_index: torch.Tensor) -> torch.Tensor:
    """The per-row seeds ``R_seed(sample_index)`` (int64 in [0, 2^63)) that key the noise of rows
    given by their global index: row ``b`` draws the docs/noise.md noise of seed ``R_seed(sample_index[b])``
    (``i`` restarting in the row) at the caller's offset.

    ``R_seed`` is a 4-round unbalanced Feistel permutation of [0, 2^63) (halves of 31 and 32
    bits) whose round function is Philox4x32-10 keyed by ``seed``: word 0 of counter
    ``(half, 2^31 + round, 0, 2^31)``. A bijection for every seed, so distinct indices get distinct
    keys. ``seed``: int or 0-d int64 tensor in [0, 2^63); ``sample_index``: int64 tensor of values
    in [0, 2^63), any shape; computed on its device (or on ``seed``'s, when that is a tensor)."""
    index = torch.as_tensor(sample_index, dtype=torch.int64)
    if isinstance(seed, torch.Tensor):
        index = index.to(seed.device)
    return _feistel(seed, index, range(_FEISTEL_ROUNDS))


def _row_seeds_inverse(seed, row_seed: torch.Tensor) -> torch.Tensor:
    """``R_seed^-1``: the rounds undone in reverse order (the bijection, made checkable)."""
    return _feistel(seed, torch.as_tensor(row_seed, dtype=torch.int64), reversed(range(_FEISTEL_ROUNDS)))


def _feistel(seed, x: torch.Tensor, rounds) -> torch.Tensor:
    """The Feistel rounds of :func:`row_seeds`, in the order ``rounds``, on ``x`` (int64 in [0, 2^63))
    split as ``(hi, lo)`` = 31 + 32 bits. Each round xors one half with a Philox word of the other, so
    it undoes itself: the reversed order is the inverse."""
    k0, k1 = _key_words(torch.as_tensor(seed, dtype=torch.int64, device=x.device))
    hi, lo = (x >> 32) & _MASK31, x & _MASK32
    zero = torch.zeros((), dtype=torch.int64, device=x.device)
    for rnd in rounds:
        tag = _DERIVED | rnd
        if rnd % 2 == 0:
            hi = hi ^ (philox4x32_10((lo, tag, zero, _DERIVED), (k0, k1))[0] & _MASK31)
        else:
            lo = lo ^ philox4x32_10((hi, tag, zero, _DERIVED), (k0, k1))[0]
    return (hi << 32) | lo


def row_bits(seed, offset, sample_index: torch.Tensor) -> torch.Tensor:
    """63 random bits per row (int64 in [0, 2^63)), a pure function of ``(seed, offset,
    sample_index[b])``: Philox4x32-10 with key ``seed`` and counter
    ``(index mod 2^32, index >> 32, offset mod 2^32, 2^31 + (offset >> 32))``; the result is
    ``(r1 mod 2^31) * 2^32 + r0``. Counter word 3 has its top bit set, which no noise stream has,
    and word 1 is below 2^31, which no :func:`row_seeds` round has. ``training_loss`` draws each
    row's timestep from these bits."""
    index = torch.as_tensor(sample_index, dtype=torch.int64)
    if isinstance(seed, torch.Tensor):
        index = index.to(seed.device)
    dev = index.device
    k0, k1 = _key_words(torch.as_tensor(seed, dtype=torch.int64, device=dev))
    offset = torch.as_tensor(offset, dtype=torch.int64, device=dev)
    r0, r1, _, _ = philox4x32_10((index & _MASK32, (index >> 32) & _MASK31, offset & _MASK32,
                                  _DERIVED | ((offset >> 32) & _MASK31)), (k0, k1))
    return ((r1 & _MASK31) << 32) | r0
