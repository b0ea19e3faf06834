"""Structural block masks equal ``create_block_mask``'s, are cached, thread-safe, and scale."""

from __future__ import annotations

import collections
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.attention.flex_attention import create_block_mask
from torch.utils._python_dispatch import TorchDispatchMode

import sparsedsl as sd
from sparsedsl.passes import blockmask
from sparsedsl.passes.blockmask import ordered_indices
from sparsedsl.passes.context import Context
from sparsedsl.passes.tiles import (EMPTY, FULL, PARTIAL, UNKNOWN, TileGrid, _undecided, classify,
                                    complement, intersection, leaves_unknown, union)
from reference import block_sets
from strategies import pattern_cases


def _assert_same_blocks(ours, theirs, batch, heads):
    for a, b in zip(block_sets(ours), block_sets(theirs)):
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
    assert not torch.equal(block_sets(first)[1], block_sets(second)[1])


def test_concurrent_builds_equal_serial_builds():
    patterns = [sd.window(40 + i) | sd.global_tokens(i + 1) for i in range(6)]
    patterns += [sd.segments([64, 32], [1, 2 + i % 3]) for i in range(3)]
    lengths = [700 + 13 * i for i in range(3)]
    serial = {}
    for p in patterns:
        for n in lengths:
            bm = sd.compile(p, block_size=32).block_mask(n, heads=2)
            serial[(p, n)] = block_sets(bm)
    from sparsedsl.passes.lowering import _LOWERINGS
    _LOWERINGS.clear()
    results, errors = {}, []

    def work(p, n):
        try:
            results.setdefault((p, n), []).append(block_sets(sd.compile(p, block_size=32).block_mask(n, heads=2)))
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


def _reference_order(selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the selected columns in order, then the others (create_block_mask's layout)."""
    num = torch.zeros(selected.shape[:-1], dtype=torch.int32)
    idx = torch.zeros(selected.shape, dtype=torch.int32)
    for row in range(selected[..., 0].numel()):
        at = torch.unravel_index(torch.tensor(row), selected.shape[:-1])
        flags = selected[at].tolist()
        chosen = [c for c, f in enumerate(flags) if f]
        num[at] = len(chosen)
        idx[at] = torch.tensor(chosen + [c for c, f in enumerate(flags) if not f], dtype=torch.int32)
    return num, idx


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (1, 1, 5, 9), (2, 3, 7, 4), (3, 1, 6, 6), (1, 2, 1, 13)])
@pytest.mark.parametrize("budget", [None, 7])
def test_ordered_indices_equal_a_reference(shape, budget, monkeypatch):
    if budget is not None:  # several passes, of a row or two each
        monkeypatch.setattr(blockmask, "ORDER_BUDGET", budget)
    gen = torch.Generator().manual_seed(sum(shape))
    selected = torch.rand(shape, generator=gen) < torch.rand(shape[:-1] + (1,), generator=gen)
    selected[..., 0, :] = False  # an empty row
    selected[..., -1, :] = True  # a full row
    selected[..., 0] = True  # a full column (an empty one below)
    if shape[-1] > 1:
        selected[..., -1] = False
    for transposed in (False, True):
        num, idx = ordered_indices(selected, transposed)
        ref_num, ref_idx = _reference_order(selected.transpose(-1, -2) if transposed else selected)
        assert num.dtype == idx.dtype == torch.int32 and num.is_contiguous() and idx.is_contiguous()
        assert torch.equal(num, ref_num) and torch.equal(idx, ref_idx)


def test_block_mask_indices_equal_create_block_mask_exactly():
    """Not only the block sets: every index entry, past ``num_blocks`` too."""
    module = sd.compile(sd.blocks(64).local(1).global_(1).random(2, 5), block_size=32)
    ours = module.block_mask(1000, 900)
    theirs = create_block_mask(module.mask_mod(1000, 900), 1, 1, 1000, 900, device="cpu", BLOCK_SIZE=32)
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
                 "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices"):
        assert torch.equal(getattr(ours, name), getattr(theirs, name)), name


class _AtenOps(TorchDispatchMode):
    """Counts the aten operations run under it, by name."""

    SYNCS = ("aten::nonzero", "aten::item", "aten::_local_scalar_dense")  # read back to the host

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func._schema.name] += 1
        return func(*args, **(kwargs or {}))

    @property
    def syncs(self) -> int:
        return sum(self.counts[name] for name in self.SYNCS)


@pytest.mark.parametrize("pattern", [sd.blocks(64).local(2), sd.window(100) | sd.global_tokens(64),
                                     sd.segments([128, 256], [1, 2]), sd.full(), sd.causal(),
                                     sd.blocks(128).local(1).random(2, 0),
                                     sd.blocks(128).local(1).within(sd.segments([64, 64], [1, 2])),
                                     # several block rules on tiles that cross blocks (BigBird-like):
                                     sd.blocks(32).local(1).global_(2).random(3, 0),
                                     sd.blocks(32).local(2).random(2, 5).causal(),
                                     sd.blocks(48).local(1).dilated([2, 3]),
                                     # diagonal bands intersected: one band
                                     sd.causal() & sd.window(100, 0), sd.window(100) & sd.window(30, 200) & sd.causal(),
                                     sd.causal() & sd.window(70, 3) & sd.global_tokens(64)])
@pytest.mark.parametrize("q_len,kv_len", [(1024, 1024), (1000, 1024), (1024, 999), (1001, 777)])
def test_builds_without_undecided_tiles_read_nothing_back(pattern, q_len, kv_len):
    """Aligned or cut short (ragged) alike, and equal to create_block_mask's sets. Several
    block rules on tiles that cross blocks are decided together on their block layout, and
    an intersection of diagonal bands as one band."""
    module = sd.compile(pattern, block_size=64)
    ctx = Context.make(pattern, q_len, kv_len, heads=2)
    assert not leaves_unknown(pattern, ctx, TileGrid(q_len, kv_len, 64, 64))
    with _AtenOps() as ops:
        ours = module.block_mask(q_len, kv_len, heads=2)
    assert ops.syncs == 0
    theirs = create_block_mask(module.mask_mod(q_len, kv_len, heads=2), 1, 2, q_len, kv_len,
                               device="cpu", BLOCK_SIZE=64)
    _assert_same_blocks(ours, theirs, 1, 2)


@pytest.mark.parametrize("q_len,kv_len,cut", [(512, 512, False), (500, 512, True), (512, 450, True)])
def test_cut_tiles_are_partial_and_aligned_grids_skip_the_fix_up(q_len, kv_len, cut):
    ctx = Context.make(sd.full(), q_len, kv_len)
    with _AtenOps() as ops:
        states = blockmask.tile_states(sd.full(), ctx, TileGrid(q_len, kv_len, 64, 64), None)
    assert (ops.counts["aten::masked_fill_"] > 0) == cut and ops.syncs == 0
    expected = torch.full((8, 8), FULL, dtype=torch.int8)
    expected[-1 if q_len % 64 else 8:, :] = PARTIAL
    expected[:, -1 if kv_len % 64 else 8:] = PARTIAL
    assert torch.equal(states[0, 0], expected)


@settings(max_examples=300, deadline=None)
@given(case=pattern_cases(), block=st.sampled_from((1, 2, 4, 16, 32)), q_start=st.integers(0, 40))
def test_structure_bounds_the_undecided_tiles(case, block, q_start):
    """Where the host-side analysis says no tile is UNKNOWN (or undecided), none is."""
    pattern, q_len, kv_len, heads, buffers = case
    ctx = Context.make(pattern, q_len, kv_len, heads=heads, buffers=buffers)
    grid = TileGrid(q_len, kv_len, block, block, min(q_start, q_len - 1))
    states = classify(pattern, ctx, grid, range(grid.num_q_tiles))
    undecided = _undecided(pattern, ctx, grid)
    if not undecided.unknown:
        assert not (states == UNKNOWN).any()
    if not undecided.partial:
        assert not ((states == UNKNOWN) | (states == PARTIAL)).any()


def test_three_valued_logic_tables():
    states = torch.tensor([EMPTY, PARTIAL, UNKNOWN, FULL], dtype=torch.int8)
    a, b = states[:, None], states[None, :]

    def expected(rule):
        return torch.tensor([[rule(x, y) for y in states.tolist()] for x in states.tolist()], dtype=torch.int8)

    assert torch.equal(union(a, b), expected(
        lambda x, y: FULL if FULL in (x, y) else y if x == EMPTY else x if y == EMPTY else UNKNOWN))
    assert torch.equal(intersection(a, b), expected(
        lambda x, y: EMPTY if EMPTY in (x, y) else y if x == FULL else x if y == FULL else UNKNOWN))
    assert torch.equal(complement(states), torch.tensor(
        [FULL if s == EMPTY else EMPTY if s == FULL else s for s in states.tolist()], dtype=torch.int8))


# ---------------------------------------------------------------------------------------
# Heads that share a layer: classified and ordered once per layer
# ---------------------------------------------------------------------------------------

_BLOCK_MASK_TENSORS = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
                       "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices")

#: ``(pattern, heads, layers)``: patterns whose heads fall in fewer layers than heads.
HEAD_GROUPED = [
    # LongNet segments, 16 heads in 4 groups of 4, and in 3 groups (6, 5 and 5 heads)
    (sd.segments([256, 512, 1024, 2048], [1, 2, 4, 8]), 16, 4),
    (sd.segments([256, 512, 1024], [1, 2, 4]), 16, 3),
    # a union with head groups of another count: groups of 4 split at 6 and 11
    (sd.segments([256, 512, 1024, 2048], [1, 2, 4, 8])
     | sd.heads(sd.window(100), sd.blocks(64).local(1), sd.causal()), 16, 6),
    # nested, under an intersection and inside a block rule
    (sd.heads(sd.window(50), sd.segments([128, 256], [1, 2])) & sd.causal(), 6, 2),
    (sd.blocks(128).local(1).within(sd.segments([64, 64], [1, 2])), 8, 2),
    (sd.longnet([256, 512], [1, 2]), 5, 2),
    (sd.cycle_heads(sd.window(30), sd.dilated(128, 2)), 5, 2),
    (sd.segments([256], [2]), 4, 1),  # one group: every head the same layer
]


@pytest.mark.parametrize("pattern,heads,layers", HEAD_GROUPED, ids=[str(p) for p, _, _ in HEAD_GROUPED])
@pytest.mark.parametrize("q_len,kv_len", [(1024, 1024), (1000, 1000), (777, 1100)])
def test_head_grouped_block_masks_equal_create_block_mask_exactly(pattern, heads, layers, q_len, kv_len):
    """Every index entry of every head, on lengths that are multiples of the tile or not;
    the heads' layers are fewer than the heads (the build runs on them), and nothing is
    read back from the device unless tiles are left to refine (then on the layers' heads)."""
    module = sd.compile(pattern, block_size=64)
    with _AtenOps() as ops:
        ours = module.block_mask(q_len, kv_len, heads=heads)
    ctx = Context.make(pattern, q_len, kv_len, heads=heads)
    if not leaves_unknown(pattern, ctx, TileGrid(q_len, kv_len, 64, 64)):
        assert ops.syncs == 0
    assert module.lowering(q_len, kv_len, heads=heads).layer_states.shape[1] == layers
    theirs = create_block_mask(module.mask_mod(q_len, kv_len, heads=heads), 1, heads, q_len, kv_len,
                               device="cpu", BLOCK_SIZE=64)
    for name in _BLOCK_MASK_TENSORS:
        got = getattr(ours, name)
        assert got.is_contiguous() and got.dtype == torch.int32, name
        assert torch.equal(got.expand_as(getattr(theirs, name)), getattr(theirs, name)), name


@pytest.mark.parametrize("pattern,heads,layers", HEAD_GROUPED, ids=[str(p) for p, _, _ in HEAD_GROUPED])
def test_layers_given_to_heads_equal_the_per_head_path(pattern, heads, layers):
    """The lowering's states per head equal a classification head by head, its block mask
    the one built from them, and its tile and pair counts those of ``count``."""
    q_len, kv_len = 1000, 1100
    module = sd.compile(pattern, block_size=64)
    lowered = module.lowering(q_len, kv_len, heads=heads)
    ctx = Context.make(pattern, q_len, kv_len, heads=heads)
    per_head = blockmask.tile_states(pattern, ctx, lowered.grid, lowered.position_mask)
    assert torch.equal(lowered.states.expand(1, heads, -1, -1), per_head.expand(1, heads, -1, -1))
    ours = lowered.block_mask
    theirs = blockmask.block_mask_from_states(per_head, lowered.grid, lowered.mask_mod)
    for name in _BLOCK_MASK_TENSORS:
        assert torch.equal(getattr(ours, name).expand_as(getattr(theirs, name)), getattr(theirs, name)), name
    counts = sd.count(pattern, q_len, kv_len, heads=heads, tile=64)
    assert lowered.pairs(heads) == counts.pairs
    full, partial = lowered.tile_counts
    per_grid = heads // lowered.states.shape[1]
    assert (full * per_grid, partial * per_grid) == (counts.tiles.full, counts.tiles.partial)


def test_longnet_at_16_heads_is_ordered_on_its_4_layers():
    """The ordering (the build's largest work) sees 4 layers of tiles, not 16 heads; one
    copy per tensor gives the heads their layer's indices."""
    pattern = sd.segments([256, 512, 1024, 2048], [1, 2, 4, 8])
    module = sd.compile(pattern, block_size=64)
    with _AtenOps() as ops:
        module.block_mask(4096, heads=16)
    lowered = module.lowering(4096, heads=16)
    assert lowered.head_layers == tuple(h // 4 for h in range(16))
    assert ops.counts["aten::scatter_"] == 1  # both orders of a square grid in one pass
    assert ops.counts["aten::index_select"] == 2  # num_blocks and indices, both kinds and orders
    assert ops.syncs == 0


def test_a_layout_with_a_head_axis_keeps_a_layer_per_head():
    """A bound ``[H, nqb, nkb]`` layout can make heads of one group differ: classified head
    by head, and still equal to create_block_mask."""
    pattern = sd.blocks(64).layout("lay") & sd.segments([128, 256], [1, 2])
    layout = torch.rand(4, 16, 16, generator=torch.Generator().manual_seed(3)) < 0.5
    module = sd.compile(pattern, block_size=64)
    ours = module.block_mask(1000, heads=4, lay=layout)
    assert module.lowering(1000, heads=4, lay=layout).layer_states.shape[1] == 4
    theirs = create_block_mask(module.mask_mod(1000, heads=4, lay=layout), 1, 4, 1000, 1000, device="cpu",
                               BLOCK_SIZE=64)
    _assert_same_blocks(ours, theirs, 1, 4)


def test_the_default_head_count_gives_every_group_one_head():
    """Without ``heads``, a pattern runs with one head per group: a layer per head, no copy."""
    pattern = sd.segments([256, 512, 1024], [1, 2, 4])
    module = sd.compile(pattern, block_size=64)
    ours = module.block_mask(1000)
    lowered = module.lowering(1000)
    assert lowered.head_layers is None and lowered.layer_states.shape[1] == 3
    theirs = create_block_mask(module.mask_mod(1000), 1, 3, 1000, 1000, device="cpu", BLOCK_SIZE=64)
    for name in _BLOCK_MASK_TENSORS:
        assert torch.equal(getattr(ours, name), getattr(theirs, name)), name


@pytest.mark.parametrize("pattern,heads,expected", [
    (sd.window(3), 4, (0, 0, 0, 0)),
    (sd.segments([64, 128, 256], [1, 2, 4]), 16, (0,) * 6 + (1,) * 5 + (2,) * 5),
    (sd.segments([64, 128], [1, 2]) | sd.heads(sd.window(1), sd.window(2), sd.causal()), 6, (0, 0, 1, 2, 3, 3)),
    (sd.heads(sd.causal(), sd.causal()), 4, (0, 0, 1, 1)),  # equal parts, still two groups
    (sd.longnet([64, 128], [1, 2]), 5, (0, 0, 0, 1, 1)),
    (sd.cycle_heads(sd.window(1), sd.window(2)), 5, (0, 1, 0, 1, 0)),
    (sd.blocks(64).local(1).within(sd.segments([32, 32], [1, 2])).score(sd.alibi()), 4, (0, 0, 1, 1)),
])
def test_head_layers_split_heads_by_every_head_group(pattern, heads, expected):
    from sparsedsl.lang.queries import head_layers
    assert head_layers(pattern, heads) == expected


@pytest.mark.parametrize("pattern", [sd.window(40) | sd.global_tokens(70), sd.longnet([64, 128, 256], [1, 2, 4]),
                                     (sd.causal() & ~sd.chunks(96)) | sd.prefix(20), sd.blocks(32).local(1).random(1, 3)])
@pytest.mark.parametrize("q_len,kv_len,q_start", [(640, 640, 0), (611, 590, 0), (500, 640, 140)])
def test_probed_refinement_equals_whole_tile_counts(pattern, q_len, kv_len, q_start, monkeypatch):
    """``refined_states`` (a tile's first rows first, the tile whole only where they do not
    show it partial) equals deciding every tile by its whole count, on every tile and head
    of grids with tiles cut short and query rows from an offset; both of its ways decide
    some tiles."""
    from sparsedsl.passes import refine
    from sparsedsl.passes.maskmod import lower_mask
    from sparsedsl.passes.refine import refined_states, states_from_counts, tile_pair_counts
    from sparsedsl.passes.squares import uniform_square
    ctx = Context.make(pattern, q_len, kv_len, heads=4)
    grid = TileGrid(q_len, kv_len, 64, 64, q_start)
    mask_mod = lower_mask(pattern, ctx)
    tiles = torch.cartesian_prod(torch.arange(1), torch.arange(4), torch.arange(grid.num_q_tiles),
                                 torch.arange(grid.num_kv_tiles))
    whole_tiles = []

    def counting(*args, rows=None, **kwargs):
        if rows is None:
            whole_tiles.append(args[2].shape[0])
        return tile_pair_counts(*args, rows=rows, **kwargs)

    monkeypatch.setattr(refine, "tile_pair_counts", counting)
    for square in {1, uniform_square(pattern)}:
        whole_tiles.clear()
        expected = states_from_counts(tile_pair_counts(mask_mod, grid, tiles, square=square), grid)
        assert torch.equal(refined_states(mask_mod, grid, tiles, square=square), expected)
        assert 0 < sum(whole_tiles) < tiles.shape[0]


@pytest.mark.gpu
@settings(max_examples=40)
@given(case=pattern_cases(vary_layout_shape=True), block=st.sampled_from((16, 64, 128)))
def test_gpu_block_mask_build_kernels_equal_the_cpu_build(case, block):
    """On CUDA a build runs Triton kernels (:mod:`sparsedsl.passes.build_kernels`: the
    block indices, LongNet's dilated states); every tensor equals the CPU build's, whose
    tensor operations the other tests check against ``create_block_mask``: head layers,
    batch-dependent layouts and grids that are not square included."""
    pattern, q_len, kv_len, heads, buffers = case
    module = sd.compile(pattern, block_size=block)
    on_cpu = module.block_mask(q_len, kv_len, heads=heads, **buffers)
    on_gpu = module.block_mask(q_len, kv_len, heads=heads, device="cuda",
                               **{name: t.cuda() if isinstance(t, torch.Tensor) else t for name, t in buffers.items()})
    _assert_same_tensors(on_gpu, on_cpu)


@pytest.mark.gpu
@pytest.mark.parametrize("pattern,q_len,kv_len,block", [
    (sd.window(3200), 65536 + 384, 65536 + 384, 128),  # 515 tile columns
    (sd.segments([2048, 4096, 8192, 16384], [1, 2, 4, 8]), 40000, 40000, 128),  # head layers
    (sd.segments([96, 200, 512], [1, 3, 8]), 5000, 5000, 16),  # segments not multiples of the rate
    (sd.dilated(300, 7, 5) | sd.dilated(64, 4, 1), 3000, 7000, 16),  # offsets; keys past the queries
    (sd.blocks(16).local(2), 20000, 20000, 16),  # 1,250 columns: two chunks a row
])
def test_gpu_block_mask_build_kernels_at_length(pattern, q_len, kv_len, block):
    module = sd.compile(pattern, block_size=block)
    on_cpu = module.block_mask(q_len, kv_len, heads=16)
    _assert_same_tensors(module.block_mask(q_len, kv_len, heads=16, device="cuda"), on_cpu)


@pytest.mark.gpu
def test_gpu_block_mask_without_triton_runs_tensor_operations(monkeypatch):
    """Where Triton cannot be imported (CUDA builds of PyTorch without it), a CUDA build
    runs the CPU's tensor operations on the device, to the same tensors."""
    from sparsedsl import triton_kernels
    monkeypatch.setattr(triton_kernels, "_triton_importable", lambda: False)
    module = sd.compile(sd.segments([96, 200, 512], [1, 3, 8]) | sd.window(40), block_size=16)
    _assert_same_tensors(module.block_mask(3000, heads=6, device="cuda"), module.block_mask(3000, heads=6))


def test_triton_kernels_run_only_on_cuda_tensors():
    from sparsedsl.triton_kernels import runs_triton
    assert not runs_triton(torch.zeros(3))


def _assert_same_tensors(on_gpu, on_cpu):
    for name in _BLOCK_MASK_TENSORS:
        assert torch.equal(getattr(on_gpu, name).cpu(), getattr(on_cpu, name)), name
