"""Structural block masks equal ``create_block_mask``'s, are cached, thread-safe, and scale."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.attention.flex_attention import create_block_mask

import sparsedsl as sd
from strategies import pattern_cases


def _block_sets(block_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense bool ``[B, H, nq, nk]`` sets of partial and of full tiles of a BlockMask."""
    partial = _scatter(block_mask.kv_num_blocks, block_mask.kv_indices)
    full = _scatter(block_mask.full_kv_num_blocks, block_mask.full_kv_indices)
    return partial, full


def _scatter(num, idx):
    num, idx = num.cpu().long(), idx.cpu().long()
    out = torch.zeros(idx.shape, dtype=torch.bool)
    live = torch.arange(idx.shape[-1]) < num[..., None]
    rows = live.nonzero(as_tuple=True)
    out[rows[:-1] + (idx[live],)] = True
    return out


def _assert_same_blocks(ours, theirs, batch, heads):
    for a, b in zip(_block_sets(ours), _block_sets(theirs)):
        a = a.expand(batch, heads, -1, -1)
        b = b.expand(batch, heads, -1, -1)
        assert torch.equal(a, b)
    assert ours.seq_lengths == theirs.seq_lengths
    assert ours.BLOCK_SIZE == theirs.BLOCK_SIZE


@settings(max_examples=200)
@given(case=pattern_cases(vary_layout_shape=True), block=st.sampled_from((16, 32, 64, 128)))
def test_block_mask_equals_create_block_mask(case, block):
    pattern, q_len, kv_len, heads, buffers = case
    module = sd.compile(pattern, block_size=block)
    ours = module.block_mask(q_len, kv_len, heads=heads, **buffers)
    mask_mod = module.mask_mod(q_len, kv_len, heads=heads, **buffers)
    batch = max(ours.kv_num_blocks.shape[0], 1)
    theirs = create_block_mask(mask_mod, batch, heads, q_len, kv_len, device="cpu", BLOCK_SIZE=block)
    _assert_same_blocks(ours, theirs, batch, heads)


@pytest.mark.parametrize("pattern,q_len,kv_len,heads", [
    (sd.window(300) | sd.global_tokens(70), 2048, 2048, 1),
    (sd.blocks(128).local(2).random(1, 7).global_(1), 1000, 1500, 1),
    (sd.segments([256, 512, 1024], [1, 2, 4]), 2000, 2000, 3),
    (sd.blocks(256).local(1).within(sd.segments([128, 128], [1, 2])), 2048, 2048, 2),
    (sd.dilated_window(200, 100, 3) - sd.strided(7), 900, 700, 1),
    (sd.causal() & ~sd.chunks(384) | sd.prefix(100), 1111, 1111, 1),
])
def test_block_mask_matches_on_larger_patterns(pattern, q_len, kv_len, heads):
    module = sd.compile(pattern)
    ours = module.block_mask(q_len, kv_len, heads=heads)
    theirs = create_block_mask(module.mask_mod(q_len, kv_len, heads=heads), 1, heads, q_len,
                               kv_len, device="cpu")
    _assert_same_blocks(ours, theirs, 1, heads)


def test_block_masks_are_cached_across_modules():
    a = sd.compile(sd.window(64) | sd.global_tokens(8), block_size=32)
    b = sd.compile(sd.window(64) | sd.global_tokens(8), block_size=32)
    assert a.block_mask(500) is b.block_mask(500)
    assert a.block_mask(500) is not a.block_mask(501)
    assert a.block_mask(500, heads=4) is a.block_mask(500, heads=8)  # head-independent
    seg = sd.compile(sd.segments([64, 128], [1, 2]), block_size=32)
    assert seg.block_mask(512, heads=2) is not seg.block_mask(512, heads=4)
    assert seg.block_mask(512, heads=4).kv_num_blocks.shape[1] == 4


def test_patterns_with_tensors_are_not_cached_by_identity():
    module = sd.compile(sd.documents("doc"), block_size=16)
    ids = torch.zeros(64, dtype=torch.int64)
    first = module.block_mask(64, doc=ids)
    ids[32:] = 1  # same tensor object, new contents: the mask must follow
    second = module.block_mask(64, doc=ids)
    assert not torch.equal(_block_sets(first)[1], _block_sets(second)[1])


def test_concurrent_builds_equal_serial_builds():
    patterns = [sd.window(40 + i) | sd.global_tokens(i + 1) for i in range(6)]
    patterns += [sd.segments([64, 32], [1, 2 + i % 3]) for i in range(3)]
    lengths = [700 + 13 * i for i in range(3)]
    serial = {}
    for p in patterns:
        for n in lengths:
            bm = sd.compile(p, block_size=32).block_mask(n, heads=2)
            serial[(p, n)] = _block_sets(bm)
    from sparsedsl.compiler.module import _LOWERINGS
    _LOWERINGS.clear()
    results, errors = {}, []

    def work(p, n):
        try:
            results.setdefault((p, n), []).append(_block_sets(sd.compile(p, block_size=32).block_mask(n, heads=2)))
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(p, n)) for p in patterns for n in lengths for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for key, got in results.items():
        for sets in got:
            assert all(torch.equal(a, b) for a, b in zip(sets, serial[key]))


def test_million_token_mask_builds_in_bounded_memory():
    """``blocks(128).local(8) | global_tokens(128)`` at 2**20 tokens, one head: the process
    stays under 4 GB (measured as peak resident memory in a fresh interpreter)."""
    script = textwrap.dedent("""
        import resource, sparsedsl as sd
        m = sd.compile(sd.blocks(128).local(8) | sd.global_tokens(128))
        bm = m.block_mask(1 << 20)
        nb = 8192  # a band of 17 block diagonals, plus block row and column 0 outside it
        assert int(bm.full_kv_num_blocks.sum()) == nb * 17 - 72 + 2 * (nb - 9)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    peak_kib = int(result.stdout.strip().splitlines()[-1])
    assert peak_kib < 4 * 1024 * 1024
