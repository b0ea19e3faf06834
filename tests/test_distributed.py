"""Sequence-parallel attention (``sparsedsl.distributed``) equals one process's attention.

The multi-process tests spawn 2 and 4 gloo processes on the CPU once each (start-up is
the expensive part) and run every case in them: each rank computes the single-process
reference itself on the full tensors (float64), then its shard of the distributed
attention, and reports the largest differences of outputs and of the gradients of q, k
and v, its traffic, and the errors the error cases raised. The tests read those reports.
"""

from __future__ import annotations

import datetime
import multiprocessing
import socket
import traceback
import zlib
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import sparsedsl as sd
from sparsedsl.distributed import (
    estimate,
    exchange_plan,
    owned_ranges,
    sequence_parallel_attention,
    shard,
    unshard,
)

BLOCK = 16


def _cases() -> dict:
    """name: (pattern, zigzag, heads, kv_heads, seq_len, buffers)."""
    ids = torch.repeat_interleave(torch.arange(5), torch.tensor([40, 70, 10, 100, 36]))[None]
    return {
        "window": (sd.window(20), False, 2, 2, 256, {}),
        "window|global (GQA)": (sd.window(12) | sd.global_tokens(8), False, 4, 2, 256, {}),
        "longnet head-grouped": (sd.segments([64, 256], [1, 2]), False, 4, 4, 256, {}),
        "causal": (sd.causal(), False, 2, 1, 256, {}),
        "causal zigzag": (sd.causal(), True, 2, 1, 256, {}),
        "window zigzag": (sd.window(20), True, 2, 2, 256, {}),
        "documents": (sd.documents("ids"), False, 2, 2, 256, {"ids": ids}),
        # needed tiles far apart: random blocks and a global block anywhere in the
        # sequence, a dilated head group whose kept keys lie 48 positions apart
        "bigbird (far tiles)": (sd.blocks(16).local(1).global_(1).random(2, seed=3), False, 2, 1, 256, {}),
        "dilated far apart": (sd.segments([256, 32], [48, 1], [5, 0]), False, 2, 2, 256, {}),
        "prefix|causal zigzag": (sd.prefix(40) | sd.causal(), True, 2, 2, 256, {}),
        "alibi window": (sd.window(30).score(sd.alibi()), False, 2, 2, 240, {}),
        # LongNet (a multiset: one softmax, log m on keys several branches allow): rates
        # that do not divide the heads, lengths that are not multiples of the segments,
        # segments spanning ranks; each key/value head receives its own lattice only
        "longnet": (sd.longnet([64, 160], [1, 3]), False, 4, 4, 240, {}),
        "longnet causal (GQA)": (sd.longnet([32, 100, 240], [1, 2, 5]) & sd.causal(), False, 6, 3, 240, {}),
        "longnet zigzag": (sd.longnet([48, 256], [2, 3]), True, 5, 5, 256, {}),
        "longnet within shards": (sd.longnet([16, 32], [1, 2]), False, 3, 3, 128, {}),
        "window + causal": ((sd.window(12) + sd.causal()).score(sd.softcap(5.0)), False, 2, 2, 240, {}),
        # rows that see no key (two of every three), and a rank whose rows reach none
        "rows without keys": (sd.dilated(100, 3, 1), False, 2, 2, 240, {}),
        "a rank reaching no key": (sd.window(5) & sd.prefix(10), False, 2, 2, 256, {}),
        # rows counted from the end of the whole sequence, not of a rank's piece
        "bigbird's last block": (sd.blocks(16).local(1).global_(1).random(2, seed=3) | sd.queries(-16)
                                 | sd.keys(-16), False, 2, 1, 256, {}),
        # a bias over the whole sequence, as every rank passes it
        "bias window": (sd.window(20).score(sd.bias("b")), False, 2, 2, 256,
                        {"b": torch.randn(256, 256, generator=torch.Generator().manual_seed(7), dtype=torch.float64)}),
    }


def _max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _run_case(name, rank, world_size, device, dtype) -> dict:
    pattern, zigzag, heads, kv_heads, seq_len, buffers = _cases()[name]
    buffers = {key: value.to(device) for key, value in buffers.items()}
    compiled = sd.compile(pattern, block_size=BLOCK)
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    q, k, v, weight = (torch.randn(2, h, seq_len, 8, generator=gen, dtype=torch.float64).to(device, dtype)
                       for h in (heads, kv_heads, kv_heads, heads))
    weight = 5 * weight  # upstream gradients of rows without keys well past 1
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    expected = compiled(*full, **buffers)
    (expected * weight).sum().backward()

    local = [shard(t, rank, world_size, zigzag).detach().requires_grad_() for t in (q, k, v)]
    out, stats = sequence_parallel_attention(compiled, *local, zigzag=zigzag, return_stats=True,
                                             **buffers)
    (out * shard(weight, rank, world_size, zigzag)).sum().backward()
    gathered = [torch.empty_like(out) for _ in range(world_size)]
    dist.all_gather(gathered, out.detach().contiguous())
    plan = exchange_plan(compiled, seq_len, world_size, zigzag=zigzag, heads=heads, kv_heads=kv_heads,
                         **buffers)
    position_bytes = k.shape[0] * kv_heads * (k.shape[3] + v.shape[3]) * k.element_size()
    planned = None
    if not buffers:
        planned = estimate(compiled, seq_len, world_size, heads=heads, head_dim=8, dtype=dtype,
                           zigzag=zigzag, kv_heads=kv_heads, batch=2).ranks[rank]
        planned = (planned.received_bytes, planned.sent_bytes, planned.held_kv_positions)
    return {
        "out": _max_error(out, shard(expected, rank, world_size, zigzag)),
        "unsharded out": _max_error(unshard(gathered, zigzag), expected),
        **{f"grad {n}": _max_error(t.grad, shard(f.grad, rank, world_size, zigzag))
           for n, t, f in zip("qkv", local, full)},
        "received_bytes": stats.received_bytes,
        "sent_bytes": stats.sent_bytes,
        "held_kv_positions": stats.held_kv_positions,
        "estimate": planned,
        "all_gather_bytes": stats.all_gather_bytes,
        "planned_received_bytes": plan.received_positions(rank) * position_bytes,
    }


def _error_of(call) -> str:
    try:
        call()
    except ValueError as error:
        return str(error)
    return "no error"


def _run_error_cases(rank, world_size, device) -> dict:
    compiled = sd.compile(sd.window(20), block_size=BLOCK)

    def shards(length, q_dims=4):
        q = torch.randn(1, 2, length, 8, device=device)
        return (q if q_dims == 4 else q[0]), torch.randn(1, 2, length, 8, device=device), \
            torch.randn(1, 2, length, 8, device=device)

    return {
        "lengths differ": _error_of(lambda: sequence_parallel_attention(
            compiled, *shards(64 + 16 * rank))),
        "odd zigzag shard": _error_of(lambda: sequence_parallel_attention(
            compiled, *shards(63), zigzag=True)),
        "rank 0 malformed": _error_of(lambda: sequence_parallel_attention(
            compiled, *shards(64, q_dims=3 if rank == 0 else 4))),
        "zigzag differs": _error_of(lambda: sequence_parallel_attention(
            compiled, *shards(64), zigzag=rank == 0)),
        "dtype differs": _error_of(lambda: sequence_parallel_attention(
            compiled, *(t.to(torch.float64 if rank else torch.float32) for t in shards(64)))),
        "missing tensor": _error_of(lambda: sequence_parallel_attention(
            sd.compile(sd.documents("ids"), block_size=BLOCK), *shards(64))),
        "q_offset": _error_of(lambda: sequence_parallel_attention(compiled, *shards(64), q_offset=5)),
        "group still works": tuple(sequence_parallel_attention(compiled, *shards(64)).shape),
    }


def _worker(rank, world_size, port, backend, case_names, out_dir) -> None:
    torch.set_num_threads(1)
    report: dict = {}
    try:
        device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
        if backend == "nccl":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size, timeout=datetime.timedelta(seconds=60))
        dtype = torch.float32 if backend == "nccl" else torch.float64
        for name in case_names:
            report[name] = _run_case(name, rank, world_size, device, dtype)
        if backend == "gloo":
            report["errors"] = _run_error_cases(rank, world_size, device)
        dist.destroy_process_group()
    except Exception:  # reported to the parent, which fails the tests with it
        report["crash"] = traceback.format_exc()
    torch.save(report, Path(out_dir) / f"rank{rank}.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(world_size: int, backend: str, case_names, out_dir: Path, timeout: float = 150.0) -> list[dict]:
    """Run ``_worker`` on ``world_size`` fresh processes; their reports, in rank order."""
    context = multiprocessing.get_context("spawn")
    port = _free_port()
    processes = [context.Process(target=_worker, args=(rank, world_size, port, backend,
                                                       list(case_names), str(out_dir)))
                 for rank in range(world_size)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(timeout)
    for p in processes:
        if p.is_alive():
            p.kill()
    reports = []
    for rank, p in enumerate(processes):
        path = out_dir / f"rank{rank}.pt"
        assert path.is_file(), f"rank {rank} of {world_size} wrote no report (exit code {p.exitcode})"
        reports.append(torch.load(path))
    crashes = [f"rank {r}:\n{rep['crash']}" for r, rep in enumerate(reports) if "crash" in rep]
    assert not crashes, "\n".join(crashes)
    return reports


@pytest.fixture(scope="module", params=[2, 4], ids=lambda p: f"{p}ranks")
def gloo_reports(request, tmp_path_factory):
    world_size = request.param
    return world_size, _spawn(world_size, "gloo", _cases(), tmp_path_factory.mktemp(f"gloo{world_size}"))


# -- equality with one process -------------------------------------------------------------

@pytest.mark.parametrize("case", list(_cases()))
def test_outputs_and_gradients_equal_one_process(gloo_reports, case):
    world_size, reports = gloo_reports
    for rank, report in enumerate(reports):
        errors = {key: report[case][key] for key in
                  ("out", "unsharded out", "grad q", "grad k", "grad v")}
        assert max(errors.values()) < 1e-10, f"{case}, rank {rank} of {world_size}: {errors}"


def test_stats_report_the_planned_traffic(gloo_reports):
    _, reports = gloo_reports
    for report in reports:
        for case in _cases():
            assert report[case]["received_bytes"] == report[case]["planned_received_bytes"], case


def test_the_estimate_equals_the_real_run_byte_for_byte(gloo_reports):
    world_size, reports = gloo_reports
    checked = 0
    for rank, report in enumerate(reports):
        for case in _cases():
            planned, real = report[case]["estimate"], report[case]
            if planned is None:  # patterns with call-time tensors are not estimated
                continue
            got = planned
            want = (real["received_bytes"], real["sent_bytes"], real["held_kv_positions"])
            assert got == want, f"{case}, rank {rank} of {world_size}: estimate {got}, run {want}"
            checked += 1
    assert checked == world_size * sum(not buffers for *_, buffers in _cases().values())


def test_compact_holding_is_what_the_rows_need(gloo_reports):
    """Each rank holds its needed tiles only: a window's rank holds its shard and a tile
    either side, never the sequence; tiles far apart are held without what lies between."""
    world_size, reports = gloo_reports
    shard_len = 256 // world_size
    for rank, report in enumerate(reports):
        neighbours = (rank > 0) + (rank < world_size - 1)
        assert report["window"]["held_kv_positions"] == shard_len + 32 * neighbours
        # kept keys of the rate-48 group (offset 5): positions 5, 53, ..., 245, one 16-tile
        # each, and the rank's own tiles for the chunked group.
        far = report["dilated far apart"]["held_kv_positions"]
        own_tiles = shard_len // 16
        kept_tiles_elsewhere = sum(1 for p in range(5, 256, 48) if not rank * shard_len <= p < (rank + 1) * shard_len)
        assert far == 16 * (own_tiles + kept_tiles_elsewhere) < 256


def test_a_window_moves_far_less_than_an_all_gather(gloo_reports):
    world_size, reports = gloo_reports
    position_bytes = 2 * 2 * (8 + 8) * 8  # batch x k/v heads x (k and v head_dim) x float64
    for rank, report in enumerate(reports):
        # window(20) on 16-token tiles: the rows next to a boundary reach 20 positions
        # into the neighbour, that is 2 of its tiles (32 positions) from each neighbour.
        neighbours = (rank > 0) + (rank < world_size - 1)
        stats = report["window"]
        assert stats["received_bytes"] == neighbours * 32 * position_bytes
        assert stats["all_gather_bytes"] == (world_size - 1) * (256 // world_size) * position_bytes
        assert stats["received_bytes"] <= stats["all_gather_bytes"] / 2


def _needed_by_kv_head(pattern, seq_len, heads, kv_heads, rows) -> list[set[int]]:
    """Per key/value head: the key positions some of its query heads may attend to from
    ``rows`` (a multiplicity above 0 in the dense reference)."""
    allowed = sd.dense(pattern, seq_len, seq_len, heads=heads).expand(heads, seq_len, seq_len)[:, rows] > 0
    per_kv = heads // kv_heads
    return [set(allowed[g * per_kv:(g + 1) * per_kv].any(0).any(0).nonzero().flatten().tolist())
            for g in range(kv_heads)]


@pytest.mark.parametrize("case", ["longnet", "longnet zigzag", "longnet causal (GQA)"])
def test_longnet_moves_only_the_dilated_keys_of_each_head(gloo_reports, case):
    """Each key/value head receives the positions of the other ranks that its query heads'
    branches reach from the rank's rows (the dilated lattice of each head group, in the
    segments the rows lie in), computed here from the dense reference: exactly those, and
    for ``& causal()`` (whose reach is the intersection of the parts') at least those."""
    world_size, reports = gloo_reports
    pattern, zigzag, heads, kv_heads, seq_len, _ = _cases()[case]
    row_bytes = 2 * (8 + 8) * 8  # batch x (k and v head_dim) x float64, per key/value head
    for rank, report in enumerate(reports):
        ranges = owned_ranges(seq_len, rank, world_size, zigzag)
        rows = [p for r in ranges for p in r]
        owned = set(rows)
        needed = _needed_by_kv_head(pattern, seq_len, heads, kv_heads, rows)
        least = sum(len(keys - owned) for keys in needed) * row_bytes
        got = report[case]["received_bytes"]
        assert got == least if "causal" not in case else got >= least, (case, rank, got, least)
        assert got < kv_heads * (seq_len - len(rows)) * row_bytes  # less than every other position


# -- errors ----------------------------------------------------------------------------

def test_every_rank_raises_together_on_bad_inputs(gloo_reports):
    world_size, reports = gloo_reports
    for rank, report in enumerate(reports):
        errors = report["errors"]
        assert "disagree on the shard length: rank 0 has 64, rank 1 has 80" in errors["lengths differ"]
        assert "zigzag=True" in errors["odd zigzag shard"] and "q.shape[2]=63" in errors["odd zigzag shard"]
        if rank == 0:
            assert "argument 'q' must be a 4-D shard" in errors["rank 0 malformed"]
        else:
            assert "rank(s) [0] failed their checks" in errors["rank 0 malformed"]
        assert "disagree on the zigzag: rank 0 has 1, rank 1 has 0" in errors["zigzag differs"]
        assert ("disagree on the dtype: rank 0 has torch.float32, rank 1 has torch.float64"
                in errors["dtype differs"])
        assert "needs tensor(s) ['ids'] bound by keyword" in errors["missing tensor"]
        assert "argument(s) ['q_offset'] are not taken" in errors["q_offset"]
        assert errors["group still works"] == (1, 2, 64, 8)


def test_errors_without_a_process_group():
    compiled = sd.compile(sd.window(4), block_size=BLOCK)
    q = torch.randn(1, 1, 32, 8)
    with pytest.raises(TypeError, match="argument 'compiled' must be a CompiledPattern"):
        sequence_parallel_attention(sd.window(4), q, q, q)
    with pytest.raises(TypeError, match="argument 'k' must be a torch.Tensor"):
        sequence_parallel_attention(compiled, q, [1.0], q)
    if not dist.is_initialized():
        with pytest.raises(RuntimeError, match="init_process_group"):
            sequence_parallel_attention(compiled, q, q, q)


def test_shard_and_unshard_errors():
    x = torch.randn(1, 2, 100, 4)
    with pytest.raises(ValueError, match=r"argument 'x' has length 100 along dim 2, which must be "
                                         r"divisible by world_size=3"):
        shard(x, 0, 3)
    with pytest.raises(ValueError, match=r"divisible by 2 \* world_size=8 \(zigzag=True\)"):
        shard(x, 0, 4, zigzag=True)
    with pytest.raises(ValueError, match="argument 'rank' must be < world_size=4, got 4"):
        shard(x, 4, 4)
    with pytest.raises(TypeError, match="argument 'zigzag' must be True or False"):
        shard(x, 0, 4, zigzag="yes")
    with pytest.raises(ValueError, match="argument 'dim' must be a dimension"):
        shard(x, 0, 4, dim=4)
    with pytest.raises(ValueError, match="same shape"):
        unshard([x, x[:, :, :50]])
    with pytest.raises(ValueError, match="length along dim 2 must be even, got 25"):
        unshard([x[:, :, :25]] * 4, zigzag=True)
    with pytest.raises(ValueError, match="argument 'seq_len' must be divisible by world_size=3"):
        exchange_plan(sd.compile(sd.window(4)), 100, 3)


# -- layouts and plans, in one process ----------------------------------------------------

@pytest.mark.parametrize("zigzag", [False, True])
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_shard_then_unshard_is_the_identity(world_size, zigzag):
    x = torch.randn(2, 3, 48, 5)
    shards = [shard(x, rank, world_size, zigzag) for rank in range(world_size)]
    assert torch.equal(unshard(shards, zigzag), x)
    assert torch.equal(unshard([shard(x, r, world_size, zigzag, dim=-2) for r in range(world_size)],
                               zigzag, dim=-2), x)


def test_zigzag_layout_and_balance():
    assert owned_ranges(64, 1, 4, zigzag=True) == (range(8, 16), range(48, 56))
    assert owned_ranges(64, 1, 4) == (range(16, 32),)
    # Under causal(), the rows of every rank see the same number of keys with zigzag.
    def causal_pairs(rank, zigzag):
        return sum(int(sd.dense(sd.causal(), len(r), 64, q_offset=r.start).sum())
                   for r in owned_ranges(64, rank, 4, zigzag))
    assert len({causal_pairs(rank, True) for rank in range(4)}) == 1
    assert [causal_pairs(rank, False) for rank in range(4)] == [136, 392, 648, 904]


def test_the_plan_follows_the_pattern():
    seq_len, world_size = 4096, 4
    window = exchange_plan(sd.compile(sd.window(64), block_size=64), seq_len, world_size)
    # each neighbour sends the one 64-position tile next to the boundary
    assert [window.received_positions(r) for r in range(world_size)] == [64, 128, 128, 64]
    assert window.all_gather_positions() == 3072
    assert torch.equal(window.transfer(0, 1), torch.arange(960, 1024))
    chunks = exchange_plan(sd.compile(sd.chunks(1024), block_size=64), seq_len, world_size)
    assert not chunks.moves_anything
    full = exchange_plan(sd.compile(sd.full(), block_size=64), seq_len, world_size)
    assert [full.received_positions(r) for r in range(world_size)] == [3072] * 4
    # LongNet segments of 2048 (2 shards each) and 4096 (all 4 shards) rate 4: the second
    # head group needs every tile of its segment, so ranks receive all the other positions.
    longnet = exchange_plan(sd.compile(sd.segments([2048, 4096], [1, 4]), block_size=64),
                            seq_len, world_size, heads=2)
    assert [longnet.received_positions(r) for r in range(world_size)] == [3072] * 4
    short = exchange_plan(sd.compile(sd.segments([512, 1024], [1, 2]), block_size=64),
                          seq_len, world_size, heads=2)
    assert not short.moves_anything


def test_longnet_plans_move_each_head_groups_lattice():
    """LongNet's distributed algorithm: a segment that spans ranks costs each head the
    kept keys of its own group, ``w / r`` of the segment, whatever the tile size."""
    seq_len, world_size = 4096, 4
    plan = exchange_plan(sd.compile(sd.longnet([4096], [4]), block_size=64), seq_len, world_size, heads=8)
    assert [c.kv_heads for c in plan.classes] == [(0, 1), (2, 3), (4, 5), (6, 7)]
    # each head needs the 1024 positions of its residue, 768 of them held by other ranks
    assert [plan.received_positions(r) for r in range(world_size)] == [768] * 4
    assert [plan.held_positions(r) for r in range(world_size)] == [1024] * 4
    assert plan.transfer(1, 0, kv_head=2).tolist() == list(range(1025, 2048, 4))
    assert int(plan.entries_moved.sum()) == 4 * 8 * 768
    # the same segment, head-grouped (segments): whole tiles, every position to every head
    grouped = exchange_plan(sd.compile(sd.segments([4096, 4096], [4, 4], [0, 1]), block_size=64),
                            seq_len, world_size, heads=8)
    assert [grouped.received_positions(r) for r in range(world_size)] == [3072] * 4
    # segments within a shard: nothing moves, the shard runs as self-attention
    local = exchange_plan(sd.compile(sd.longnet([256, 1024], [2, 4]), block_size=64), seq_len, world_size,
                          heads=6, kv_heads=3)
    assert not local.moves_anything
    with pytest.raises(ValueError, match="argument 'kv_heads' must divide heads=6, got 4"):
        exchange_plan(sd.compile(sd.longnet([256], [2])), seq_len, world_size, heads=6, kv_heads=4)


# -- NCCL ----------------------------------------------------------------------------

@pytest.mark.gpu
def test_nccl_on_two_gpus(tmp_path):
    if torch.cuda.device_count() < 2 or not dist.is_nccl_available():
        pytest.skip("needs 2 CUDA devices and NCCL")
    names = ["window", "longnet head-grouped", "longnet", "causal zigzag", "bigbird (far tiles)", "prefix|causal zigzag"]
    for rank, report in enumerate(_spawn(2, "nccl", names, tmp_path)):
        for name in names:
            errors = {key: report[name][key] for key in ("out", "grad q", "grad k", "grad v")}
            assert max(errors.values()) < 1e-3, f"{name}, rank {rank}: {errors}"
