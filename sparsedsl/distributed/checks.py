"""Input checks of sequence-parallel attention: on this rank, then across the group.

Per-rank shape problems are not raised at once: every rank first learns, through one
small ``all_gather``, whether any rank's inputs failed and whether all ranks describe the
same call (shapes, dtype, pattern, layout, gradients). Then every rank raises together, so
no rank is left waiting in a collective that the others will never join.
"""

from __future__ import annotations

import zlib

import torch
import torch.distributed as dist

from ..compiler.inputs import FLOAT_DTYPES, check_attention_inputs
from ..compiler.module import CompiledPattern
from ..passes.context import BufferBindingError, check_bound_tensors

WHERE = "sequence_parallel_attention()"


def check_types(compiled, q, k, v, group) -> None:
    """``TypeError``/``RuntimeError`` for arguments that are wrong on every rank alike."""
    if not isinstance(compiled, CompiledPattern):
        raise TypeError(
            f"{WHERE}: argument 'compiled' must be a CompiledPattern (from sparsedsl.compile), "
            f"got {type(compiled).__name__}"
        )
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{WHERE}: argument {name!r} must be a torch.Tensor, got {type(t).__name__}")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            f"{WHERE}: torch.distributed is not initialized; call "
            f"torch.distributed.init_process_group first (gloo on CPUs, nccl on GPUs)"
        )
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"{WHERE}: argument 'group' must be a ProcessGroup or None, got {group!r}")


#: Keywords of a single call that a sequence-parallel call does not take (it attends the
#: whole sequence to itself and returns the output alone).
SINGLE_CALL_ONLY = ("q_offset", "layout", "return_lse")


def local_problem(compiled: CompiledPattern, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, zigzag: bool,
                  buffers: dict) -> str | None:
    """What is wrong with this rank's shards ``[B, H, L, D]`` and tensors ``buffers``, or
    None: the compiled module's own input checks, plus equal shard lengths and, with
    ``zigzag``, even ones."""
    taken = sorted(set(SINGLE_CALL_ONLY) & buffers.keys())
    if taken:
        return (f"argument(s) {taken} are not taken: the sequence is attended to itself from "
                f"position 0, in the [batch, heads, length, head_dim] layout, and the output returned alone")
    try:
        check_bound_tensors(WHERE, compiled.pattern, buffers)
    except BufferBindingError as err:
        return str(err).removeprefix(f"{WHERE}: ")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            return (f"argument {name!r} must be a 4-D shard [batch, heads, length, head_dim], "
                    f"got shape {list(t.shape)}")
    try:
        check_attention_inputs(q, k, v, None, "bhnd", where=WHERE)
    except (TypeError, ValueError) as err:
        return str(err).removeprefix(f"{WHERE}: ")
    length = q.shape[2]
    if k.shape[2] != length:
        return (f"q, k and v shards must have the same length (each rank holds the same "
                f"positions of the queries, keys and values) (q {list(q.shape)}, "
                f"k {list(k.shape)}, v {list(v.shape)})")
    if zigzag and length % 2:
        return (f"with zigzag=True each shard holds two chunks, so its length must be even, "
                f"got q.shape[2]={length}")
    return None


def call_signature(compiled: CompiledPattern, q, k, v, zigzag: bool, kv_needs_grad: bool,
                   problem: str | None, buffers: dict) -> dict[str, int]:
    """What every rank of the group must agree on, as named integers."""
    shapes_known = problem is None
    return {
        "input check failed": int(not shapes_known),
        "batch": q.shape[0] if shapes_known else 0,
        "heads": q.shape[1] if shapes_known else 0,
        "shard length": q.shape[2] if shapes_known else 0,
        "head_dim": q.shape[3] if shapes_known else 0,
        "k/v heads": k.shape[1] if shapes_known else 0,
        "v head_dim": v.shape[3] if shapes_known else 0,
        "dtype": FLOAT_DTYPES.index(q.dtype) if shapes_known else -1,
        "zigzag": int(zigzag),
        "pattern (crc32 of its text)": zlib.crc32(str(compiled.pattern).encode()),
        "q_block": compiled.q_block,
        "kv_block": compiled.kv_block,
        "k/v need gradients": int(kv_needs_grad),
        "bound tensors (crc32 of their names and shapes)": zlib.crc32(repr(sorted(
            (name, tuple(t.shape) if isinstance(t, torch.Tensor) else None) for name, t in buffers.items())).encode()),
    }


def agree_across_ranks(signature: dict[str, int], problem: str | None, group, device) -> None:
    """Raise ``ValueError`` on every rank when any rank's inputs failed their checks or the
    ranks' signatures differ; return on every rank otherwise."""
    world_size = dist.get_world_size(group)
    mine = torch.tensor(list(signature.values()), dtype=torch.int64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(gathered, mine, group=group)
    table = torch.stack(gathered).cpu()
    if problem is not None:
        raise ValueError(f"{WHERE}: {problem}")
    failed = table[:, 0].nonzero().flatten().tolist()
    if failed:
        raise ValueError(
            f"{WHERE}: the inputs of rank(s) {failed} failed their checks (see the error "
            f"there); every rank of the group stops"
        )
    for column, name in enumerate(signature):
        values = table[:, column].tolist()
        if len(set(values)) > 1:
            shown = [FLOAT_DTYPES[value] if name == "dtype" else value for value in values]
            raise ValueError(
                f"{WHERE}: the ranks of the group disagree on the {name}: "
                + ", ".join(f"rank {r} has {value}" for r, value in enumerate(shown))
            )
