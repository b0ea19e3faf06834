"""Choosing how a compiled pattern runs, and reporting it (``CompiledPattern.explain``).

Plans:

* ``sdpa``: the pattern is ``full()`` or ``causal()`` with no score modification; PyTorch's
  dense ``scaled_dot_product_attention`` (``is_causal`` for ``causal()``, or a lower-right
  causal bias when the queries are aligned to the end of the keys) is exact and fastest.
* ``flex``: FlexAttention compiled by Inductor with the structural ``BlockMask``; the plan
  for CUDA tensors in float32, float16 and bfloat16.
* ``lattice``: token-level dilation (``dilated``, ``segments``, ``.within(dilated(...))``)
  as dense or block-sparse attention on gathered lattices of positions
  (:mod:`sparsedsl.plans.lattice`); on every device.
* ``band``: a window of whole blocks (``blocks(size).local(w)``) as one dense SDPA call on
  overlapping key windows taken as views, the edge rows through the tile plan
  (:mod:`sparsedsl.plans.band`); chosen for CUDA forward passes without gradients.
* ``gather``: block-sparse attention in plain PyTorch operations
  (:mod:`sparsedsl.plans.gather`); the plan for the CPU (where FlexAttention has no
  backward and its eager path materialises the whole score matrix) and for float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..lang import nodes as n
from ..lang.queries import mask_part, score_mods
from ..plans.band import Band, band_pays

KERNELS = ("auto", "band", "flex", "gather", "lattice")
#: FlexAttention's kernels refuse smaller head dims ("embedding dimension ... at least 16").
FLEX_MIN_HEAD_DIM = 16


@dataclass(frozen=True)
class Plan:
    """What runs for one call shape, and what it costs.

    ``pairs`` counts allowed ``(q, k)`` pairs over all heads (and over the batch entries of
    bound tensors such as document ids); ``useful_flops = 4 * head_dim * pairs`` is the
    forward work of those pairs (``QK^T`` and ``PV``); ``computed_flops`` is what the plan's
    kernel actually multiplies, whole tiles at a time.
    """

    kind: str
    reason: str
    q_len: int
    kv_len: int
    heads: int
    head_dim: int
    q_block: int
    kv_block: int
    tiles_full: int
    tiles_partial: int
    tiles_empty: int
    pairs: int
    computed_pairs: int
    q_offset: int = 0

    @property
    def useful_flops(self) -> int:
        return 4 * self.head_dim * self.pairs

    @property
    def computed_flops(self) -> int:
        return 4 * self.head_dim * self.computed_pairs

    @property
    def density(self) -> float:
        """Allowed pairs over all ``heads * q_len * kv_len`` pairs."""
        return self.pairs / (self.heads * self.q_len * self.kv_len)

    def __str__(self) -> str:
        tiles = self.tiles_full + self.tiles_partial + self.tiles_empty
        waste = self.computed_flops / self.useful_flops if self.pairs else float("inf")
        return "\n".join([
            f"plan: {self.kind} — {self.reason}",
            f"shape: q_len={self.q_len} kv_len={self.kv_len} heads={self.heads} "
            + (f"q_offset={self.q_offset} " if self.q_offset else "") +
            f"head_dim={self.head_dim}, tiles {self.q_block}x{self.kv_block}",
            f"tiles: {self.tiles_full} full, {self.tiles_partial} partial, "
            f"{self.tiles_empty} empty of {tiles}",
            f"pairs: {self.pairs:,} allowed (density {self.density:.4f})",
            f"flops: {self.useful_flops:,} useful, {self.computed_flops:,} computed "
            f"({waste:.2f}x useful)",
        ])


def dense_sdpa_case(pattern: n.Pattern) -> str | None:
    """``"full"`` or ``"causal"`` when dense SDPA computes ``pattern`` exactly, else None."""
    if score_mods(pattern):
        return None
    core = mask_part(pattern)
    if isinstance(core, n.Full):
        return "full"
    if isinstance(core, n.Causal):
        return "causal"
    return None


def choose_plan(pattern: n.Pattern, kernel: str, device: torch.device, dtype: torch.dtype,
                needs_grad: bool, needs_lse: bool = False, lattice: bool = False,
                head_dim: int | None = None, q_offset: int = 0,
                lower_right: bool = False, band: Band | None = None) -> tuple[str, str]:
    """``(kind, reason)`` of the plan that runs ``pattern`` for these inputs; ``lattice``
    says whether the lattice plan applies to these sizes, ``band`` is the band plan's
    decomposition where it applies; ``q_offset`` is the position of the first query and
    ``lower_right`` whether that aligns the queries to the end of the keys."""
    device = torch.device(device)
    if kernel == "band":
        if band is None:
            raise ValueError(
                f"kernel='band': {pattern} is not a band of whole blocks for these sizes (it "
                f"needs blocks(size) with only local rules, q_len == kv_len, no q_offset, and a "
                f"block size that is a multiple of the tile plan's query tile; see "
                f"sparsedsl.plans.band)"
            )
        return "band", "requested with kernel='band'"
    if kernel == "lattice":
        if not lattice:
            raise ValueError(
                f"kernel='lattice': {pattern} has no lattice decomposition for these sizes (it "
                f"needs token dilation, q_len == kv_len, no score modification; see "
                f"sparsedsl.plans.lattice)"
            )
        return "lattice", "requested with kernel='lattice'"
    if kernel == "gather":
        return "gather", "requested with kernel='gather'"
    if kernel == "flex":
        if device.type == "cpu" and (needs_grad or needs_lse):
            what = "backward pass" if needs_grad else "log-sum-exp output (return_lse)"
            raise ValueError(
                f"kernel='flex': FlexAttention has no {what} on the CPU; use "
                f"kernel='auto' (the gather plan) on the CPU"
            )
        return "flex", "requested with kernel='flex'"
    case = dense_sdpa_case(pattern)
    if case is not None and not needs_lse and (case == "full" or not q_offset or lower_right):
        where = " (lower-right causal bias: queries aligned to the end)" if case == "causal" and q_offset else ""
        return "sdpa", f"the pattern is {case}(): dense SDPA is exact and fastest{where}"
    if lattice:
        return "lattice", ("token dilation: dense attention on the dilated lattices, segments "
                           "folded into the batch (a mask would compute whole tiles)")
    if (band is not None and band_pays(band) and device.type == "cuda" and not needs_grad
            and not needs_lse and dtype in (torch.float16, torch.bfloat16)
            and (head_dim is None or head_dim >= FLEX_MIN_HEAD_DIM)):
        return "band", (f"a band of whole {band.size}-token blocks: one dense SDPA call on "
                        f"overlapping key windows (views), the edge rows through flex")
    if dtype == torch.float64:
        return "gather", "float64 inputs: FlexAttention kernels take 16- and 32-bit floats"
    if head_dim is not None and head_dim < FLEX_MIN_HEAD_DIM:
        return "gather", (f"head_dim={head_dim}: FlexAttention kernels need a head dim of at "
                          f"least {FLEX_MIN_HEAD_DIM}")
    if device.type == "cpu":
        return "gather", ("CPU tensors: FlexAttention has no CPU backward and its eager "
                          "path materialises every score; block-sparse gather instead")
    return "flex", "block-sparse FlexAttention with the structural block mask"
