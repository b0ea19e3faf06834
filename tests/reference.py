"""The reference attention every plan is tested against: one softmax over the dense mask
(DESIGN.md §1), with score modifications applied to dense tensors, in float64. A multiset
pattern's dense form is its multiplicities ``m``: ``log m`` is added to the scores last.
Also the seeded choice of random blocks, written plainly from its stated rule."""

from __future__ import annotations

import math

import torch

import sparsedsl as sd
from sparsedsl.lang import nodes as n


def _alibi_slopes(heads: int) -> torch.Tensor:
    # Press et al. 2022: 2^(-8 i / n) for n a power of two; otherwise the closest power of
    # two's slopes, then every other slope of twice that power.
    def geometric(count):
        return [2.0 ** (-8.0 * (i + 1) / count) for i in range(count)]
    base = 2 ** int(math.floor(math.log2(heads)))
    slopes = geometric(base) + geometric(2 * base)[0::2][: heads - base]
    return torch.tensor(slopes, dtype=torch.float64)


def dense_scores(pattern: n.Pattern, scores: torch.Tensor, buffers: dict, q_offset: int = 0) -> torch.Tensor:
    """``scores`` [B, H, Q, K] (float64) with the pattern's score modifications applied;
    query row ``i`` is position ``q_offset + i``."""
    if not isinstance(pattern, n.Scored):
        return scores
    batch, heads, q_len, kv_len = scores.shape
    qi = torch.arange(q_offset, q_offset + q_len)[:, None]
    ki = torch.arange(kv_len)[None, :]
    for mod in pattern.mods:
        if isinstance(mod, n.Alibi):
            scores = scores - _alibi_slopes(heads)[:, None, None] * (qi - ki).abs()
        elif isinstance(mod, n.Softcap):
            scores = mod.cap * torch.tanh(scores / mod.cap)
        elif isinstance(mod, n.Bias):
            values = buffers[mod.name].double()[..., q_offset:, :]
            while values.dim() < 4:
                values = values[None]
            scores = scores + values
        else:
            b = torch.arange(batch).view(-1, 1, 1, 1)
            h = torch.arange(heads).view(1, -1, 1, 1)
            scores = mod.fn(scores, b, h, qi[None, None], ki[None, None])
    return scores


def reference_attention(pattern: n.Pattern, q, k, v, scale=None, q_offset=0, **buffers):
    """``(out, lse)`` in float64 for ``[B, H, N, D]`` inputs (k/v may have fewer heads);
    query row ``i`` is position ``q_offset + i``."""
    batch, heads, q_len, dim = q.shape
    kv_len = k.shape[2]
    scale = dim ** -0.5 if scale is None else scale
    allowed = sd.dense(pattern, q_len, kv_len, heads=heads, q_offset=q_offset, **buffers)
    if allowed.dim() == 3:
        allowed = allowed[None]
    group = heads // k.shape[1]
    k = k.double().repeat_interleave(group, 1)
    v = v.double().repeat_interleave(group, 1)
    scores = dense_scores(pattern, (q.double() @ k.transpose(-1, -2)) * scale, buffers, q_offset)
    if allowed.dtype != torch.bool:  # a multiset's multiplicities: log m added last
        scores = scores + allowed.double().log()
        allowed = allowed > 0
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    weights = torch.softmax(scores, -1).nan_to_num(0.0)
    return weights @ v, lse


def block_sets(block_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``BlockMask``'s partial and full tiles as dense bool ``[B, H, nq, nk]`` sets."""
    def scatter(num, idx):
        num, idx = num.cpu().long(), idx.cpu().long()
        out = torch.zeros(idx.shape, dtype=torch.bool)
        live = torch.arange(idx.shape[-1]) < num[..., None]
        rows = live.nonzero(as_tuple=True)
        out[rows[:-1] + (idx[live],)] = True
        return out
    return (scatter(block_mask.kv_num_blocks, block_mask.kv_indices),
            scatter(block_mask.full_kv_num_blocks, block_mask.full_kv_indices))


_MASK31 = 0x7FFFFFFF


def _mix31(x: int) -> int:
    """Three rounds of the 31-bit multiply-xorshift (Python integers)."""
    for mult in (1103515245, 1664525, 22695477):
        x = (x * mult + 12345) & _MASK31
        x ^= x >> 13
    return x


def random_block_hash(seed: int, qb: int, j: int) -> int:
    """The 31-bit hash of ``(seed, qb, j)`` that random blocks are chosen by."""
    x = _mix31((seed & _MASK31) ^ 0x2545F491)
    x = _mix31(x ^ (qb & _MASK31))
    return _mix31(x ^ (j & _MASK31))


def random_row(seed: int, qb: int, n: int, per_row: int) -> set[int]:
    """The key blocks row ``qb`` of ``.random(per_row, seed)`` takes among ``n`` (of
    ``.random_causal``: ``n = qb + 1``): Robert Floyd's sampling, one step at a time."""
    chosen: set[int] = set()
    for j in range(n - min(per_row, n), n):
        t = random_block_hash(seed, qb, j) % (j + 1)
        chosen.add(j if t in chosen else t)
    return chosen
