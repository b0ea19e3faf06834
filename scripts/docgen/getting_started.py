"""Generated blocks of ``docs/getting-started.md``: ``explain``, ``show``, ``count`` and the
command line, as they print."""

from __future__ import annotations

import contextlib
import io
import re

import sparsedsl as sd

from .registry import block, code


QUICK = "blocks(256).local(1).within(segments([128, 128], [1, 2]))"


@block("gs-explain", "docs/getting-started.md")
def _gs_explain() -> str:
    attn = sd.compile(sd.parse(QUICK))
    return code("text", str(attn.explain(4096, heads=8, head_dim=64, device="cpu")))


@block("gs-show", "docs/getting-started.md")
def _gs_show() -> str:
    p = sd.window(256) | sd.global_tokens(64)
    return code("text", sd.show(p, 4096, tile=256, file=io.StringIO()))


@block("gs-count", "docs/getting-started.md")
def _gs_count() -> str:
    c = sd.count(sd.parse(QUICK), 16384, heads=8, head_dim=64)
    return code("text", str(c))


CLI_RUNS = (
    ["count", "causal()", "--seq-len", "1000"],
    ["show", "bigbird", "--seq-len", "2048"],
    ["explain", "segments([2048, 4096], [1, 2])", "--seq-len", "16384", "--heads", "8", "--device", "cpu"],
)


def _cli(argv: list[str]) -> str:
    from sparsedsl.cli import main
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(list(argv))
    if rc != 0:
        raise RuntimeError(f"sparsedsl {' '.join(argv)} exited with {rc}")
    return buf.getvalue().rstrip()


def _shell_quote(arg: str) -> str:
    return arg if re.fullmatch(r"[\w./=-]+", arg) else f'"{arg}"'


@block("gs-cli", "docs/getting-started.md")
def _gs_cli() -> str:
    out = []
    for argv in CLI_RUNS:
        out.append("$ sparsedsl " + " ".join(_shell_quote(a) for a in argv) + "\n" + _cli(argv))
    return code("text", "\n\n".join(out))
