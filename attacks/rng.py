"""Per-sample random streams, so an attack's outcome on a sample does not depend on which batch it is in.

Each sample owns a 64-bit key and a draw counter; every value is a hash (the SplitMix64 finalizer) of
(key, counter, element position), computed for a whole batch at once with integer tensor ops. So the draws of
sample ``i`` are the same whether it is attacked alone, in a batch of 250, in a cascade's re-batched leftovers, or
on another process — which is what makes a cascade's worst case comparable to each attack run alone, and a
sharded evaluation equal to a single-process one.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_M64 = (1 << 64) - 1


def _i64(v: int) -> int:
    """An unsigned 64-bit constant as the signed int64 torch stores."""
    v &= _M64
    return v - (1 << 64) if v >= 1 << 63 else v


_GOLDEN = _i64(0x9E3779B97F4A7C15)
_MIX1 = _i64(0xBF58476D1CE4E5B9)
_MIX2 = _i64(0x94D049BB133111EB)
_STEP = _i64(0xD1B54A32D192ED03)


def _shr(x: Tensor, s: int) -> Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _mix(x: Tensor) -> Tensor:
    """SplitMix64 finalizer: a bijective avalanche of 64-bit integers (multiplication wraps modulo 2**64).

    Each stage works in place on one new tensor (the shifted copy), leaving ``x`` alone: the same integers as the
    textbook ``x = (x ^ (x >>> 30)) * MIX1`` ..., with a quarter of the temporaries."""
    for shift, mult in ((30, _MIX1), (27, _MIX2), (31, None)):
        t = x >> shift
        t &= (1 << (64 - shift)) - 1  # logical shift: clear the bits the arithmetic one copied from the sign
        t ^= x
        if mult is not None:
            t *= mult
        x = t
    return x


def sample_keys(seed: int, indices: Tensor, stream: int = 0) -> Tensor:
    """Keys for the samples at global ``indices`` under ``seed`` and ``stream`` (e.g. an attack's position)."""
    base = _mix(torch.tensor([_i64(seed * 0x2545F4914F6CDD1D + stream * 0x9E3779B1 + 1)], dtype=torch.long))
    return _mix(indices.long().cpu() * _GOLDEN + base)


class SampleRNG:
    """Random draws for a batch in which every sample has its own stream.

    ``idx`` arguments are positions in the batch; each draw advances only those samples' counters.
    """

    def __init__(self, keys: Tensor, device: torch.device | str = "cpu"):
        self.keys = keys.long().to(device)
        self.counters = torch.zeros_like(self.keys)
        self.device = torch.device(device)

    @classmethod
    def from_generator(cls, generator: torch.Generator, n: int, device) -> "SampleRNG":
        """Keys drawn from a ``torch.Generator``: reproducible for the same generator state and batch."""
        keys = torch.randint(-(1 << 62), 1 << 62, (n,), generator=generator, device=generator.device)
        return cls(keys.cpu(), device)

    def _bits(self, idx: Tensor, per_sample: int) -> Tensor:
        """(len(idx), per_sample) int64 hashes; advances the counters of ``idx``."""
        idx = idx.to(self.device)
        k = self.keys[idx][:, None]
        c = self.counters[idx][:, None]
        j = torch.arange(per_sample, device=self.device, dtype=torch.long)[None, :]
        self.counters[idx] += 1
        return _mix(_mix(k ^ (c * _STEP)) + j * _GOLDEN)

    def uniform(self, idx: Tensor, shape: tuple[int, ...]) -> Tensor:
        """Uniform floats in [0, 1) of shape ``(len(idx), *shape)`` (float32, 24 random bits each)."""
        per = math.prod(shape)
        u = _shr(self._bits(idx, per), 40).to(torch.float32) * (1.0 / (1 << 24))
        return u.reshape(len(idx), *shape)

    def normal(self, idx: Tensor, shape: tuple[int, ...]) -> Tensor:
        """Standard normal floats of shape ``(len(idx), *shape)`` (float32).

        Box-Muller on both halves of each hash: its top 24 bits give the radius, the next 24 the angle, and the pair
        gives two neighbouring values (the cosine and the sine), so a draw of ``m`` values hashes ``ceil(m / 2)``
        integers. As with :meth:`uniform`, a sample's first values do not depend on how many are drawn."""
        per = math.prod(shape)
        bits = self._bits(idx, (per + 1) // 2)
        scale = 1.0 / (1 << 24)
        radius = _shr(bits, 40).to(torch.float32).mul_(-scale).log1p_().mul_(-2.0).sqrt_()  # 1 - u in (0, 1]
        angle = ((bits >> 16) & 0xFFFFFF).to(torch.float32).mul_(2 * math.pi * scale)
        out = torch.stack([angle.cos().mul_(radius), angle.sin_().mul_(radius)], dim=2).reshape(len(idx), -1)
        return (out if out.shape[1] == per else out[:, :per]).reshape(len(idx), *shape)

    def integers(self, idx: Tensor, high: int | Tensor, shape: tuple[int, ...] = ()) -> Tensor:
        """Integers in ``[0, high)`` (``high`` an int or per-sample tensor) of shape ``(len(idx), *shape)``."""
        u = self.uniform(idx, shape or (1,))
        h = torch.as_tensor(high, device=self.device).reshape(-1, *([1] * len(shape or (1,))))
        out = torch.minimum((u * h).long(), h - 1)
        return out if shape else out[:, 0]

    def permutation_keys(self, idx: Tensor, n: int) -> Tensor:
        """Per-sample random permutations of ``range(n)``, shape ``(len(idx), n)``."""
        return self.uniform(idx, (n,)).argsort(dim=1)
