"""``sparsedsl.draw.render_scores``: heat maps of one head's scores and attention weights.

Score modifications (``alibi()``, ``softcap(c)``, ``bias(name)``, a plain function) change
the scores of allowed pairs, never which pairs are allowed. This draws what they do for one
head and one batch entry, on given ``q`` and ``k`` or on seeded random ones:

* ``"mod"``: what the modification alone makes of a zero score (ALiBi's distance penalty,
  a bias tensor);
* ``"scores"``: ``q·kᵀ·scale`` with the modification applied;
* ``"weights"``: the attention weights, one softmax over the allowed keys of each row.

Masked pairs are left blank. The matrices are dense (``Q x K`` for one head), so the sizes
are limited to ``MAX_SIDE`` a side; draw a long pattern's mask with :func:`render`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..lang import nodes as n
from ..lang.checks import PatternArgumentError, check_int
from ..lang.queries import head_group_count, mask_part
from ..passes.context import Context
from ..passes.dense import dense
from ..passes.maskmod import lower_score
from .output import check_canvas, output_path, pyplot, save
from .render import COMPACT_WIDTH, PANEL_WIDTH, _check_size, percent

#: Longest side drawn (the matrices are dense).
MAX_SIDE = 4096
PANELS = ("mod", "scores", "weights")
TITLES = {"mod": "score modification (on a zero score)", "scores": "scores q·kᵀ·scale, modified",
          "weights": "attention weights"}


def score_maps(pattern: n.Pattern, q_len: int, kv_len: int | None = None, *, heads: int | None = None,
               head: int = 0, q: torch.Tensor | None = None, k: torch.Tensor | None = None,
               head_dim: int = 32, scale: float | None = None, seed: int = 0,
               **buffers: torch.Tensor) -> dict[str, torch.Tensor]:
    """The ``[Q, K]`` float64 maps of head ``head`` (batch 0): ``"allowed"`` (bool),
    ``"mod"``, ``"scores"`` and ``"weights"`` (NaN where masked; a row with no allowed key
    has zero weights). ``q`` and ``k`` are ``[B, H, N, D]`` (``k`` may have fewer heads);
    without them, standard normal inputs of ``head_dim`` are drawn from ``seed``."""
    where = "render_scores()"
    heads = head_group_count(pattern) if heads is None else heads
    ctx = Context.make(pattern, q_len, kv_len, heads, buffers=buffers, where=where)
    for name, side in (("q_len", ctx.q_len), ("kv_len", ctx.kv_len)):
        if side > MAX_SIDE:
            raise PatternArgumentError(
                f"{where}: argument {name!r} is {side:,}; score maps are dense, at most {MAX_SIDE:,} "
                f"a side (draw the mask of a longer pattern with render())")
    head = check_int(where, "head", head)
    if head >= ctx.heads:
        raise PatternArgumentError(f"{where}: argument 'head' is {head}, but there are {ctx.heads} heads")
    q, k = _inputs(where, q, k, ctx, head_dim, seed)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    allowed = dense(mask_part(pattern), ctx.q_len, ctx.kv_len, heads=ctx.heads, **buffers)
    allowed = (allowed if allowed.dim() == 3 else allowed[0])[head] > 0  # a multiset's m > 0
    kv_head = head // (ctx.heads // k.shape[1])
    raw = (q[0, head] @ k[0, kv_head].T) * scale
    rows, cols = torch.arange(ctx.q_len)[:, None], torch.arange(ctx.kv_len)[None, :]
    b, h = torch.zeros((), dtype=torch.int64), torch.tensor(head)
    mod_fn = lower_score(pattern, ctx)
    if mod_fn is None:
        mod, scores = torch.zeros_like(raw), raw
    else:
        mod = mod_fn(torch.zeros_like(raw), b, h, rows, cols).to(torch.float64)
        scores = mod_fn(raw, b, h, rows, cols).to(torch.float64)
    weights = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
    blank = torch.tensor(float("nan"), dtype=torch.float64)
    return {"allowed": allowed, "mod": torch.where(allowed, mod, blank),
            "scores": torch.where(allowed, scores, blank), "weights": torch.where(allowed, weights, blank)}


def _inputs(where, q, k, ctx: Context, head_dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    if (q is None) != (k is None):
        raise PatternArgumentError(f"{where}: pass both 'q' and 'k', or neither (random inputs)")
    if q is None:
        head_dim = check_int(where, "head_dim", head_dim, minimum=1)
        gen = torch.Generator().manual_seed(seed)
        q = torch.randn(1, ctx.heads, ctx.q_len, head_dim, generator=gen, dtype=torch.float64)
        k = torch.randn(1, ctx.heads, ctx.kv_len, head_dim, generator=gen, dtype=torch.float64)
        return q, k
    for name, x, length in (("q", q, ctx.q_len), ("k", k, ctx.kv_len)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[2] != length:
            raise PatternArgumentError(
                f"{where}: argument {name!r} must be a [batch, heads, {length}, head_dim] tensor, "
                f"got {tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if q.shape[1] != ctx.heads or ctx.heads % k.shape[1] or q.shape[-1] != k.shape[-1]:
        raise PatternArgumentError(
            f"{where}: 'q' must have {ctx.heads} heads and 'k' a divisor of that, with one head "
            f"dim; got q {tuple(q.shape)}, k {tuple(k.shape)}")
    return q.detach().to(torch.float64).cpu(), k.detach().to(torch.float64).cpu()


def render_scores(pattern: n.Pattern, q_len: int, path, *, kv_len: int | None = None,
                  heads: int | None = None, head: int = 0, show=("scores", "weights"),
                  q: torch.Tensor | None = None, k: torch.Tensor | None = None, head_dim: int = 32,
                  scale: float | None = None, seed: int = 0, size: tuple[float, float] | None = None,
                  dpi: int = 200, cmap: str = "viridis", compact: bool = False,
                  **buffers: torch.Tensor) -> Path:
    """Draw heat maps of head ``head``'s ``show`` maps (any of ``"mod"``, ``"scores"``,
    ``"weights"``; see :func:`score_maps`) side by side to ``path`` (``.png``, ``.svg``,
    ``.pdf``). ``compact`` draws the first map alone, small, without titles. Returns the
    path written."""
    path = output_path("render_scores()", path)
    size = _check_size(size)
    dpi = check_int("render_scores()", "dpi", dpi, minimum=1)
    show = (show,) if isinstance(show, str) else tuple(show)
    if not show or any(s not in PANELS for s in show):
        raise PatternArgumentError(f"render_scores(): argument 'show' must name some of {PANELS}, got {show!r}")
    plt = pyplot("render_scores()")
    maps = score_maps(pattern, q_len, kv_len, heads=heads, head=head, q=q, k=k, head_dim=head_dim,
                      scale=scale, seed=seed, **buffers)
    show = show[:1] if compact else show
    q_side, k_side = maps["allowed"].shape
    ratio = min(4.0, max(0.25, q_side / k_side))
    width = COMPACT_WIDTH if compact else PANEL_WIDTH + 0.6
    if size is None:
        size = (len(show) * width, (width - 1.4) * ratio + (0.5 if compact else 1.3))
    check_canvas("render_scores()", size, dpi)
    fontsize = 7 if compact else 9
    with plt.rc_context({"font.size": fontsize, "axes.titlesize": fontsize + 0.5}):
        fig, axes = plt.subplots(1, len(show), figsize=size, squeeze=False, layout="constrained")
        for ax, name in zip(axes[0], show):
            image = ax.imshow(maps[name].numpy(), cmap=cmap, interpolation="nearest", aspect="equal",
                              extent=(0, k_side, q_side, 0))
            ax.xaxis.tick_top()
            ax.xaxis.set_label_position("top")
            ax.set_xlabel("key position")
            ax.set_ylabel("query position")
            fig.colorbar(image, ax=ax, shrink=0.8, aspect=25, pad=0.02)
            if not compact:
                ax.set_title(TITLES[name], loc="left")
        if not compact:
            density = float(maps["allowed"].double().mean())
            inputs = "given q, k" if q is not None else f"random q, k (head dim {head_dim}, seed {seed})"
            fig.suptitle(f"{pattern}\nhead {head}, Q = {q_side:,}, K = {k_side:,}, {inputs}; "
                         f"density {percent(density)}; blank: masked", x=0.01, ha="left",
                         fontsize=fontsize + 1)
    return save(fig, path, dpi)
