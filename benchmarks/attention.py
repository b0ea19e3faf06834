"""Attention speed: sparsedsl vs dense SDPA vs hand-written FlexAttention, side by side.

For every case, in one process on one GPU: dense ``scaled_dot_product_attention`` (the
pattern ignored: the speed of light for dense work), FlexAttention as a user would write it
(``torch.compile(flex_attention)`` with ``torch.compile(create_block_mask)``,
default kernel options) and ``sparsedsl.compile(pattern)`` (whatever plan it picks, or the
plan :data:`KERNELS` names), each forward and forward+backward. Useful FLOPs count only
allowed pairs, a multiset's once per term that allows them: ``4 * D * pairs`` forward and
``2.5x`` that backward. For a multiset, flex runs its mask only (the distinct pairs, without
multiplicities): a bound on speed, not the same attention. Times are back to back (calls queued without
synchronising, as in a training loop; :func:`bench`), with the ratio to flex of isolated
calls (host time exposed) beside them. For lattice plans, the forward is also timed
captured in a CUDA graph (:func:`cuda_graphed`: no host time per call). Prints a table of
times and ratios, writes JSON.

    python benchmarks/attention.py --json results.json
    python benchmarks/attention.py --cases longnet-64k,window-16k --quick
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

import sparsedsl as sd
from sparsedsl.progress import Progress

compiled_cbm = torch.compile(create_block_mask)

# name: (pattern text, seq_len, batch, heads, head_dim)
CASES = {
    "window-16k": ("window(800)", 16384, 1, 16, 128),
    "blockwindow-16k": ("blocks(128).local(6)", 16384, 1, 16, 128),
    "window-64k": ("window(3200)", 65536, 1, 16, 128),
    "blockwindow-64k": ("blocks(128).local(25)", 65536, 1, 16, 128),
    "window+global-16k": ("window(800) | global_tokens(256)", 16384, 1, 16, 128),
    "bigbird-16k": ("blocks(64).local(1).global_(2).random(3, 0)", 16384, 1, 16, 128),
    "longnet-64k": ("segments([2048, 4096, 8192, 16384], [1, 2, 4, 8])", 65536, 1, 16, 128),
    "longnet-paper-32k": ("segments([2048, 4096, 8192, 16384, 32768], [1, 2, 4, 6, 12])", 32768, 1, 20, 128),
    "seed-block-dilated-16k": ("blocks(256).local(1).within(segments([128, 128], [1, 2]))", 16384, 1, 16, 128),
    "seed-guide-shape": ("blocks(256).local(3)", 16384, 2, 8, 64),
    "longnet-paper-64k": ("longnet([2048, 4096, 8192, 16384, 32768], [1, 2, 4, 6, 12])", 65536, 1, 12, 128),
}

#: Cases run on a named plan rather than the planner's choice: the branches plan is not
#: costed on CUDA, where the planner runs multisets on flex.
KERNELS = {"longnet-paper-64k": "branches"}


#: Calls per back-to-back sample, at least.
MIN_CALLS = 3


def bench(fn, warmup: int = 3, iters: int = 10, back_to_back: bool = True) -> tuple[float, float | None]:
    """``(isolated, back_to_back)``: median milliseconds of ``fn()`` on the current CUDA
    stream, measured two ways (the second None unless ``back_to_back``).

    *Isolated*: one call between two events, synchronised before the next, so the time
    includes the host time spent before the first kernel is queued (Python, Dynamo's
    guards, launches), during which the GPU idles. *Back to back*: ``calls`` calls between
    two events with no synchronisation in between, divided by ``calls``, so the host queues
    the next call while the GPU runs the current one, as in a training or inference loop
    (where host time is hidden as long as it is shorter than the kernels). ``calls`` is
    chosen so that one sample lasts about 4 ms, with at least ``MIN_CALLS`` (a sample of
    one call would be an isolated call again) and at most 16."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()

    def sample(calls: int) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / calls

    isolated = sorted(sample(1) for _ in range(iters))[iters // 2]
    if not back_to_back:
        return isolated, None
    calls = max(MIN_CALLS, min(16, round(4.0 / isolated)))
    return isolated, sorted(sample(calls) for _ in range(iters))[iters // 2]


def fwd_bwd(run, q, k, v):
    """One training step of attention: the forward, then the gradients of ``q``, ``k``,
    ``v`` for a fixed random output gradient, returned rather than accumulated into
    ``.grad``. In a model ``q``, ``k``, ``v`` come out of projections, so nothing
    accumulates there; accumulating into leaves would add three read-modify-writes of
    their size to every call, the same for every method compared."""
    grad = torch.randn(*q.shape[:3], v.shape[-1], device=q.device, dtype=q.dtype)

    def step():
        torch.autograd.grad(run(q, k, v), (q, k, v), grad)
    return step


def cuda_graphed(fn):
    """``fn`` captured in a CUDA graph, after warm-up calls on a side stream (as capture
    requires); returns the graph's ``replay``. A replay queues the captured kernels with
    no per-call host time: the bound that host overhead leaves for ``fn``."""
    caller, warm_up = torch.cuda.current_stream(), torch.cuda.Stream()
    warm_up.wait_stream(caller)
    with torch.cuda.stream(warm_up):
        for _ in range(3):
            fn()
    caller.wait_stream(warm_up)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def run_case(name, text, n, batch, heads, dim, quick: bool, other_plans: tuple[str, ...] = ()) -> dict:
    pattern = sd.parse(text)
    module = sd.compile(pattern, kernel=KERNELS.get(name, "auto"))
    counts = module.explain(n, heads=heads, head_dim=dim, device="cuda")
    # Useful work: each allowed pair once per term of a multiset that allows it (one softmax
    # over the keys counted with multiplicity; LongNet's branches each compute their pairs).
    pairs = sd.count(pattern, n, heads=heads).pairs_with_multiplicity * batch
    density = counts.density
    mk = lambda: torch.randn(batch, heads, n, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    q, k, v = mk(), mk(), mk()
    row = {"case": name, "pattern": text, "seq_len": n, "batch": batch, "heads": heads,
           "head_dim": dim, "density": density, "plan": counts.kind,
           "computed_over_useful": counts.computed_flops / counts.useful_flops}

    # First call of sparsedsl (lowering, block mask, Inductor compile) from cold.
    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        module(q, k, v)
    torch.cuda.synchronize()
    row["first_call_s"] = time.perf_counter() - start

    mask_mod = module.mask_mod(n, heads=heads, device="cuda")
    start = time.perf_counter()
    block_mask = compiled_cbm(mask_mod, 1, heads, n, n, device="cuda")
    torch.cuda.synchronize()
    row["create_block_mask_compiled_first_s"] = time.perf_counter() - start
    flex = torch.compile(flex_attention, dynamic=False)  # as sparsedsl's flex plan compiles it

    runs = {
        "dense": lambda a, b, c: F.scaled_dot_product_attention(a, b, c),
        "flex": lambda a, b, c: flex(a, b, c, block_mask=block_mask),
        "sparsedsl": lambda a, b, c: module(a, b, c),
    }
    iters = 5 if quick else 10
    for key, run in runs.items():
        with torch.no_grad():
            row[f"{key}_fwd_isolated_ms"], row[f"{key}_fwd_ms"] = bench(lambda: run(q, k, v), iters=iters)
        row[f"{key}_fwdbwd_isolated_ms"], row[f"{key}_fwdbwd_ms"] = bench(fwd_bwd(run, q, k, v), iters=iters)
    if counts.kind == "lattice":  # the forward without host time: captured in a CUDA graph
        with torch.no_grad():
            replay = cuda_graphed(lambda: module(q, k, v))
            row["graph_fwd_isolated_ms"], row["graph_fwd_ms"] = bench(replay, iters=iters)
    for plan in other_plans:  # named plans beside the planner's choice, to check its rule
        forced = sd.compile(pattern, kernel=plan)
        try:
            forced.explain(n, heads=heads, head_dim=dim, device="cuda")
        except sd.PlanNotSupported:  # the plan does not run this pattern
            continue
        with torch.no_grad():
            row[f"{plan}_fwd_isolated_ms"], row[f"{plan}_fwd_ms"] = bench(lambda: forced(q, k, v), iters=iters)
        row[f"{plan}_fwdbwd_isolated_ms"], row[f"{plan}_fwdbwd_ms"] = bench(fwd_bwd(forced, q, k, v), iters=iters)
    # Block-mask builds, timed as isolated calls only (a first build is a one-off, not a
    # loop): ours cold, each at a new length (n + 128, n + 256, ...: nothing cached), vs
    # compiled create_block_mask at n.
    new_lengths = iter(range(n + 128, n + 128 * 14, 128))
    row["build_ours_ms"], _ = bench(lambda: module.block_mask(next(new_lengths), heads=heads, device="cuda"),
                                    warmup=2, iters=11, back_to_back=False)
    row["build_cbm_compiled_ms"], _ = bench(
        lambda: compiled_cbm(mask_mod, 1, heads, n, n, device="cuda"), warmup=2, iters=11, back_to_back=False)
    useful = 4 * dim * pairs
    for key in runs:
        row[f"{key}_fwd_tflops"] = useful / row[f"{key}_fwd_ms"] / 1e9
        row[f"{key}_fwdbwd_tflops"] = 3.5 * useful / row[f"{key}_fwdbwd_ms"] / 1e9
    dense_useful = 4 * dim * batch * heads * n * n
    row["dense_fwd_tflops"] = dense_useful / row["dense_fwd_ms"] / 1e9
    row["dense_fwdbwd_tflops"] = 3.5 * dense_useful / row["dense_fwdbwd_ms"] / 1e9
    for mode in ("fwd", "fwdbwd"):
        speedup = row[f"dense_{mode}_ms"] / row[f"sparsedsl_{mode}_ms"]
        row[f"speedup_{mode}"] = speedup
        row[f"speedup_x_density_{mode}"] = speedup * density
        row[f"vs_flex_{mode}"] = row[f"flex_{mode}_ms"] / row[f"sparsedsl_{mode}_ms"]
        row[f"vs_flex_{mode}_isolated"] = row[f"flex_{mode}_isolated_ms"] / row[f"sparsedsl_{mode}_isolated_ms"]
        row[f"tflops_vs_dense_{mode}"] = row[f"sparsedsl_{mode}_tflops"] / row[f"dense_{mode}_tflops"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--json", default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--plans", default="band",
                        help="plans also timed on each case they run, forward and forward+backward (comma-separated)")
    args = parser.parse_args()
    rows = []
    names = args.cases.split(",")
    with Progress(len(names), "cases", unit="case") as bar:
        for name in names:
            text, n, batch, heads, dim = CASES[name]
            # Each case starts from an empty allocator cache: after a case of large buffers
            # (longnet-paper-64k's), later cases measured slower as called than captured in
            # a CUDA graph (longnet-64k 1.79 ms against 0.95 ms, 2026-12-05), as if cached
            # blocks were being split and freed (which synchronises) at every call.
            gc.collect()
            torch.cuda.empty_cache()
            try:
                rows.append(run_case(name, text, n, batch, heads, dim, args.quick, tuple(filter(None, args.plans.split(",")))))
            except Exception as err:  # noqa: BLE001 - a failed case is reported, the rest still run
                rows.append({"case": name, "error": f"{type(err).__name__}: {err}"[:500]})
            print(json.dumps(rows[-1]), flush=True)
            bar.update(name)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(rows, f, indent=2)
    print()
    print(f"{'case':24} {'plan':8} {'dens':>6} {'fwd ms':>8} {'dense':>8} {'flex':>8} "
          f"{'xdens':>6} {'vsflex':>6} {'1call':>6} {'f+b ms':>8} {'xdens':>6} {'vsflex':>6} {'1call':>6} "
          f"{'TF/dense':>8} {'build':>7} {'cbm-c':>7}")
    for r in rows:
        if "error" in r:
            print(f"{r['case']:24} ERROR {r['error'][:100]}")
            continue
        print(f"{r['case']:24} {r['plan']:8} {r['density']:6.3f} {r['sparsedsl_fwd_ms']:8.3f} "
              f"{r['dense_fwd_ms']:8.3f} {r['flex_fwd_ms']:8.3f} {r['speedup_x_density_fwd']:6.2f} "
              f"{r['vs_flex_fwd']:6.2f} {r['vs_flex_fwd_isolated']:6.2f} {r['sparsedsl_fwdbwd_ms']:8.3f} "
              f"{r['speedup_x_density_fwdbwd']:6.2f} {r['vs_flex_fwdbwd']:6.2f} {r['vs_flex_fwdbwd_isolated']:6.2f} "
              f"{r['tflops_vs_dense_fwd']:8.2f} {r['build_ours_ms']:7.2f} "
              f"{r['build_cbm_compiled_ms']:7.2f}")
    for r in rows:
        if "graph_fwd_ms" in r:
            print(f"{r['case']:24} captured in a CUDA graph: fwd {r['graph_fwd_ms']:.3f} ms back to back "
                  f"({r['graph_fwd_isolated_ms']:.3f} isolated) vs {r['sparsedsl_fwd_ms']:.3f} as called "
                  f"({r['dense_fwd_ms'] / r['graph_fwd_ms'] * r['density']:.2f} x density)")
        for plan in filter(None, args.plans.split(",")):
            if f"{plan}_fwd_ms" in r:
                print(f"{r['case']:24} {plan} plan forced: fwd {r[f'{plan}_fwd_ms']:.3f} ms, f+b "
                      f"{r[f'{plan}_fwdbwd_ms']:.3f} ms back to back, vs {r['plan']} {r['sparsedsl_fwd_ms']:.3f}, "
                      f"{r['sparsedsl_fwdbwd_ms']:.3f} and flex {r['flex_fwd_ms']:.3f}, {r['flex_fwdbwd_ms']:.3f}")


if __name__ == "__main__":
    main()
