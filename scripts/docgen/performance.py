"""Generated blocks of ``docs/performance.md`` and ``benchmarks/results/README.md``: every
number comes from a results file, and every table names the runs it comes from."""

from __future__ import annotations

from .registry import block, cell
from .results import newest_cases, provenance, rows, runs

ATTENTION_CASES = ("longnet-64k", "longnet-paper-32k", "window-64k", "blockwindow-64k", "window-16k",
                   "window+global-16k", "blockwindow-16k", "seed-block-dilated-16k", "bigbird-16k",
                   "seed-guide-shape")
#: The runs the GPU targets are read from, oldest first: a case is read from the newest
#: run that measured it (``-05g`` has every case; ``-05h`` re-measured six of them).
GPU_TARGETS = ("h100-attention-2026-12-05g.json", "h100-attention-2026-12-05h.json")
DECODE = "h100-decode-2026-11-25.json"
MASK_BUILD = "h100-blockmask-build-2026-11-25.json"


def _ms(value: float) -> str:
    return f"{value:.3f}" if value < 1 else f"{value:.2f}" if value < 100 else f"{value:.1f}"


def attention_cases() -> dict[str, tuple[dict, str]]:
    """The benchmark cases shown, each from the newest run that measured it."""
    found = newest_cases("h100-attention-")
    return {case: found[case] for case in ATTENTION_CASES}


@block("performance-attention", "docs/performance.md")
def _attention() -> str:
    cases = attention_cases()
    out = ["| case | pattern | plan | density | forward ms: sparsedsl / dense / flex | speedup × density | "
           "flex ÷ sparsedsl | forward+backward ms: sparsedsl / dense / flex | speedup × density | "
           "flex ÷ sparsedsl | first call s |",
           "|---|---|---|---:|---|---:|---:|---|---:|---:|---:|"]
    for case, (r, _) in cases.items():
        out.append(
            f"| `{case}` | `{cell(r['pattern'])}` | {r['plan']} | {r['density']:.3f} | "
            f"{_ms(r['sparsedsl_fwd_ms'])} / {_ms(r['dense_fwd_ms'])} / {_ms(r['flex_fwd_ms'])} | "
            f"{r['speedup_x_density_fwd']:.2f} | {r['vs_flex_fwd']:.2f}× | "
            f"{_ms(r['sparsedsl_fwdbwd_ms'])} / {_ms(r['dense_fwdbwd_ms'])} / {_ms(r['flex_fwdbwd_ms'])} | "
            f"{r['speedup_x_density_fwdbwd']:.2f} | {r['vs_flex_fwdbwd']:.2f}× | {r['first_call_s']:.1f} |")
    files = sorted({name for _, name in cases.values()})
    out += ["", "Runs:", ""] + [f"* {provenance(name)}" for name in files]
    return "\n".join(out)


#: (what, case, the row's field, target, at least (True) or at most (False)): the GPU work's
#: targets, each read from one case of the runs :data:`GPU_TARGETS`.
TARGETS = (
    ("training step, block windows 16K", "blockwindow-16k", "speedup_x_density_fwdbwd", 0.75, True),
    ("training step, block windows 64K", "blockwindow-64k", "speedup_x_density_fwdbwd", 0.75, True),
    ("training step, the `dilated_attention_pytorch` guide's shape", "seed-guide-shape", "speedup_x_density_fwdbwd", 0.75, True),
    ("training step, LongNet segments 64K", "longnet-64k", "speedup_x_density_fwdbwd", 0.75, True),
    ("training step, LongNet paper segments 32K", "longnet-paper-32k", "speedup_x_density_fwdbwd", 0.75, True),
    ("training step never slower than flex, block windows 16K", "blockwindow-16k", "vs_flex_fwdbwd", 1.0, True),
    ("training step never slower than flex, block windows 64K", "blockwindow-64k", "vs_flex_fwdbwd", 1.0, True),
    ("training step never slower than flex, the guide's shape", "seed-guide-shape", "vs_flex_fwdbwd", 1.0, True),
    ("BigBird, 64-token blocks: computed / useful pairs, forward (training steps keep 128-token tiles: 2.13)",
     "bigbird-16k", "computed_over_useful", 1.3, False),
    ("LongNet as in the paper (`longnet`), 64K: forward TFLOP/s / dense SDPA's", "longnet-paper-64k",
     "tflops_vs_dense_fwd", 0.75, True),
    ("mask build (cold), windows 64K, ms", "window-64k", "build_ours_ms", 1.0, False),
    ("mask build (cold), block windows 64K, ms", "blockwindow-64k", "build_ours_ms", 1.0, False),
    ("mask build (cold), LongNet segments 64K, ms", "longnet-64k", "build_ours_ms", 1.0, False),
)


@block("performance-targets", "docs/performance.md")
def _targets() -> str:
    found = {r["case"]: (r, name) for name in GPU_TARGETS for r in rows(name) if "error" not in r}
    out = ["| target | case | plan | measured | wanted | met | run |", "|---|---|---|---:|---:|---|---|"]
    for what, case, field, wanted, at_least in TARGETS:
        r, name = found[case]
        value = r[field]
        met = value >= wanted if at_least else value <= wanted
        shown = f"{value:.2f}" if float(f"{value:.2f}") != wanted else f"{value:.3f}"  # never "1.00, not met"
        out.append(f"| {what} | `{case}` | {r['plan']} | {shown} | {'≥' if at_least else '≤'} {wanted:g} | "
                   f"{'met' if met else 'not met'} | `{name}` |")
    out += ["", "Runs:", ""] + [f"* {provenance(name)}" for name in GPU_TARGETS]
    return "\n".join(out)


@block("performance-decode", "docs/performance.md")
def _decode() -> str:
    out = ["| pattern | density | dense SDPA ms | sparsedsl, static cache ms | sparsedsl, growing cache ms | "
           "block mask per step (host) |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows(DECODE):
        dense = _ms(r["dense_ms"]) + (" (cold cuDNN plans)" if r["dense_ms"] > 1 else "")
        out.append(f"| `{cell(r['pattern'])}` | {r['density']:.3g} | {dense} | {_ms(r['static_ms'])} | "
                   f"{_ms(r['growing_ms'])} | {r['mask_hit_us']:.0f} µs |")
    out += ["", f"Run: {provenance(DECODE)}"]
    return "\n".join(out)


@block("performance-blockmask", "docs/performance.md")
def _blockmask() -> str:
    out = ["| pattern (65,536 tokens) | heads | sparsedsl ms | eager `create_block_mask` ms | "
           "compiled `create_block_mask` ms | compiled / sparsedsl |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows(MASK_BUILD):
        eager = "out of memory" if r.get("eager_s") is None else _ms(r["eager_s"] * 1e3)
        compiled = r.get("compiled_s")
        ratio = "–" if compiled is None else f"{compiled / r['sparsedsl_s']:.1f}×"
        out.append(f"| `{cell(r['pattern'])}` | {r['heads']} | {_ms(r['sparsedsl_s'] * 1e3)} | {eager} | "
                   f"{'–' if compiled is None else _ms(compiled * 1e3)} | {ratio} |")
    out += ["", f"Run: {provenance(MASK_BUILD)}"]
    return "\n".join(out)


@block("results-runs", "benchmarks/results/README.md")
def _runs() -> str:
    out = ["| file | what | date | commit | device, software | command |", "|---|---|---|---|---|---|"]
    for name, r in sorted(runs().items(), reverse=True):
        out.append(f"| `{name}` | {cell(r['what'])} | {r['date']} | {r['commit']} | {r['device']}, "
                   f"{r['software']} | `{cell(r['command'])}` |")
    return "\n".join(out)


def newest_cpu_run() -> str:
    """The newest results file of ``benchmarks/cpu.py``."""
    return max(name for name in runs() if name.startswith("cpu-"))


@block("performance-cpu", "docs/performance.md")
def _cpu() -> str:
    name = newest_cpu_run()
    run = rows(name)
    out = ["| case | pattern | tokens | plan (no grad / grad) | density | forward ms: sparsedsl / dense / flex | "
           "speedup × density | flex ÷ sparsedsl | flex first call s | forward+backward ms: sparsedsl / dense | "
           "speedup × density |", "|---|---|---:|---|---:|---|---:|---:|---:|---|---:|"]
    for r in run["rows"]:
        flex = (f"{_ms(r['flex_fwd_ms'])}", f"{r['vs_flex']:.2f}×", f"{r['flex_compile_s']:.1f}") \
            if "flex_fwd_ms" in r else ("–", "–", "–")
        out.append(
            f"| {r['case']} | `{cell(r['pattern'])}` | {r['tokens']:,} | {r['plan']} / {r['plan_grad']} | "
            f"{r['density']:.3f} | {_ms(r['fwd_ms'])} / {_ms(r['dense_fwd_ms'])} / {flex[0]} | "
            f"{r['fwd_speedup_x_density']:.2f} | {flex[1]} | {flex[2]} | "
            f"{_ms(r['fwd_bwd_ms'])} / {_ms(r['dense_fwd_bwd_ms'])} | {r['fwd_bwd_speedup_x_density']:.2f} |")
    out += ["", f"Run: {provenance(name)} ({run['threads']} thread{'s' if run['threads'] != 1 else ''}, {run['clock']} time)"]
    return "\n".join(out)
