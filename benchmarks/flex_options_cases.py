"""One set of FlexAttention kernel options against the defaults, on the attention
benchmark's cases (:data:`attention.CASES`), with sparsedsl's block mask: how a setting
found by ``flex_options.py`` on one pattern does on the others.

For each case, the compiled FlexAttention forward with the default options and with
``--options`` (a JSON object; ``fwd_``/``bwd_`` prefixes select one kernel), back to back
(:func:`attention.bench`); with ``--backward`` also forward+backward. Prints a table of
times and ratios, writes JSON.

    python benchmarks/flex_options_cases.py --backward \\
        --options '{"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 64, "fwd_num_warps": 4, "fwd_num_stages": 2}'
"""

from __future__ import annotations

import argparse
import json

import torch

import sparsedsl as sd
from sparsedsl.plans.flex import compiled_flex_attention
from sparsedsl.progress import Progress

from attention import CASES, bench, fwd_bwd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--options", required=True, help="kernel options, a JSON object")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--backward", action="store_true", help="also time forward+backward")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    try:
        options = json.loads(args.options)
    except json.JSONDecodeError:
        options = None
    if not isinstance(options, dict):
        parser.error(f"--options must be a JSON object of kernel options, got {args.options!r}")
    flex = compiled_flex_attention()
    rows = []
    names = args.cases.split(",")
    with Progress(len(names), "cases", unit="case") as bar:
        for name in names:
            text, n, batch, heads, dim = CASES[name]
            block_mask = sd.compile(sd.parse(text)).block_mask(n, heads=heads, device="cuda")
            q, k, v = (torch.randn(batch, heads, n, dim, device="cuda", dtype=torch.bfloat16,
                                   requires_grad=args.backward) for _ in range(3))
            row = {"case": name}
            for label, kernel_options in (("default", None), ("options", options)):
                def run(a, b, c, kernel_options=kernel_options):
                    return flex(a, b, c, block_mask=block_mask, kernel_options=kernel_options)
                try:
                    with torch.no_grad():
                        row[f"{label}_fwd_ms"] = bench(lambda: run(q, k, v))[1]
                    if args.backward:
                        row[f"{label}_fwdbwd_ms"] = bench(fwd_bwd(run, q, k, v))[1]
                except Exception as err:  # noqa: BLE001 - a setting the kernel refuses is reported
                    row[f"{label}_error"] = f"{type(err).__name__}: {err}"[:200]
            rows.append(row)
            print(json.dumps(row), flush=True)
            bar.update(name)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump({"options": options, "rows": rows}, f, indent=1)
    print(f"\n{options} against the defaults, ms back to back, {torch.cuda.get_device_name()}")
    for r in rows:
        cells = []
        for mode in ("fwd", "fwdbwd") if args.backward else ("fwd",):
            default, tuned = r.get(f"default_{mode}_ms"), r.get(f"options_{mode}_ms")
            if default is not None and tuned is not None:
                cells.append(f"{mode} {default:8.3f} -> {tuned:8.3f} ({default / tuned:.2f}x)")
        errors = [r[key][:60] for key in ("default_error", "options_error") if key in r]
        print(f"{r['case']:24} " + "   ".join(cells + errors))


if __name__ == "__main__":
    main()
