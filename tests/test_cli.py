"""The ``sparsedsl`` command: every command, its JSON output, its help, and one-line errors
with exit code 2 for every mistake a user can type."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

import sparsedsl as sd
from sparsedsl.cli import build_parser, main, parse_zoom

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
needs_matplotlib = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                                      reason="needs matplotlib")


def run(*argv):
    return subprocess.run([sys.executable, "-m", "sparsedsl", *argv], capture_output=True,
                          text=True, timeout=300)


def test_count_prints_the_pairs_first(capsys):
    assert main(["count", "causal()", "--seq-len", "1000"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "500500"
    assert "tiles (128x128)" in out


def test_count_with_heads_and_tile(capsys):
    assert main(["count", "segments([64, 64], [1, 2])", "--seq-len", "256", "--heads", "4",
                 "--tile", "64"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first == str(2 * (4 * 64 * 64) + 2 * (4 * 32 * 32))


def test_count_json_matches_count(capsys):
    p = sd.window(7, 2) | sd.global_tokens(3)
    assert main(["count", str(p), "--seq-len", "300", "--kv-len", "250", "--tile", "32", "--json",
                 "--head-dim", "64"]) == 0
    got = json.loads(capsys.readouterr().out)
    c = sd.count(p, 300, 250, tile=32, head_dim=64)
    assert got["pairs"] == c.pairs == int(sd.dense(p, 300, 250).sum())
    assert got["per_head"] == list(c.per_head) and got["density"] == c.density
    assert got["tiles"] == {"full": c.tiles.full, "partial": c.tiles.partial, "empty": c.tiles.empty}
    assert got["useful_flops"] == c.useful_flops and got["computed_flops"] == c.computed_flops
    assert (got["q_len"], got["kv_len"], got["tile"], got["head_dim"]) == (300, 250, 32, 64)


def test_documents_lengths_from_the_command_line(capsys):
    lengths = [37, 100, 13, 50]
    ids = torch.repeat_interleave(torch.arange(4), torch.tensor(lengths))
    expected = int(sd.dense(sd.documents("doc_ids") & sd.causal(), 200, doc_ids=ids).sum())
    assert main(["count", "document_mask", "--documents", "doc_ids=37,100,13,50", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["pairs"] == expected and got["q_len"] == 200  # the length is the lengths' sum
    assert main(["count", "documents('d') | window(2)", "--documents", "37 100 13 50",
                 "--seq-len", "200"]) == 0
    assert int(capsys.readouterr().out.splitlines()[0]) == int(
        sd.dense(sd.documents("d") | sd.window(2), 200, d=ids).sum())


@pytest.mark.parametrize("pattern", ["document_prefix_lm", "documents('doc').within(causal())"])
def test_documents_within_rules_take_lengths_from_the_command_line(pattern, capsys):
    """``documents(name).within(rule)`` names a documents tensor too (the catalog's
    ``document_prefix_lm``): ``--documents`` binds it."""
    assert main(["count", pattern, "--documents", "3,4,9"]) == 0
    parsed = sd.load(pattern) if "(" not in pattern else sd.parse(pattern)
    (name,) = parsed.buffer_names()
    ids = torch.repeat_interleave(torch.arange(3), torch.tensor([3, 4, 9]))
    assert int(capsys.readouterr().out.splitlines()[0]) == int(sd.dense(parsed, 16, **{name: ids}).sum())


@pytest.mark.parametrize("argv, words", [
    (["count", "document_mask"], ["--documents doc_ids="]),
    (["count", "document_mask", "--documents", "doc_ids=10,20", "--seq-len", "31"], ["sum to 30", "31"]),
    (["count", "document_mask", "--documents", "ids=10,20"], ["no documents tensor 'ids'"]),
    (["count", "document_mask", "--documents", "doc_ids=10,x"], ["--documents", "10,x"]),
    (["count", "document_mask", "--documents", "doc_ids=10,0"], ["positive"]),
    (["count", "blocks(4).layout('lay')"], ["'lay'", "Python API"]),
])
def test_documents_mistakes(argv, words, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    for word in words:
        assert word in err


def test_bad_pattern_exits_2_with_the_parse_error(capsys):
    assert main(["count", "window(", "--seq-len", "10"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "window(" in captured.err and "^" in captured.err
    assert main(["count", "windw(3)"]) == 2
    assert "windw" in capsys.readouterr().err


@pytest.mark.parametrize("argv, words", [
    (["explain", "causal()", "--device", "tpu"], ["--device", "'tpu'"]),
    (["explain", "causal()", "--device", ""], ["--device", "''"]),
    (["count", "causal()", "--seq-len", "-5"], ["--seq-len", "'-5'"]),
    (["count", "causal()", "--seq-len", "2147483648"], ["q_len", "2147483648"]),
    (["count", "causal()", "--heads", "0"], ["--heads", "'0'"]),
    (["count", "causal()", "--tile", "0"], ["--tile", "'0'"]),
    (["estimate", "causal()", "--tile", "0"], ["--tile", "'0'"]),
    (["render", "causal()", "--dpi", "0"], ["--dpi", "'0'"]),
    (["count", "causal()", "--seq-len", "ten"], ["--seq-len", "ten"]),
    (["render", "causal()", "--zoom", "a:b"], ["--zoom", "a:b"]),
    (["render", "causal()", "--size", "big"], ["--size", "big"]),
    (["render", "causal()", "--seq-len", "64", "--view", "bars"], ["--view", "bars"]),
    (["demo", "--seq-len", "40000"], ["seq_len", "40,000", "GiB"]),
    (["nonsense"], ["nonsense"]),
])
def test_mistakes_are_one_line_and_exit_2(argv, words, capsys):
    assert exit_code(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    for word in words:
        assert word in err, (word, err)


def exit_code(argv) -> int:
    """``main(argv)``, or the code argparse exits with."""
    try:
        return main(argv)
    except SystemExit as exited:
        return exited.code


@pytest.mark.parametrize("argv, words", [
    (["count", "causal()", "--heads", "2147483647"], ["heads=2,147,483,647"]),
    (["count", "documents('doc')", "--documents", "doc=2000000000"], ["--documents", "2,000,000,000"]),
    (["render", "window(3)", "--seq-len", "5", "--dpi", "100000"], ["dpi=100000"]),
])
def test_sizes_over_the_memory_budget_are_refused_by_name(argv, words, tmp_path, capsys):
    if argv[0] == "render":
        pytest.importorskip("matplotlib")
        argv = argv + ["-o", str(tmp_path / "x.png")]
    with sd.using_memory_budget(1 << 30):
        assert main(argv) == 2
    err = capsys.readouterr().err
    assert "memory budget" in err and err.count("\n") == 1
    for word in words:
        assert word in err, (word, err)
    assert not (tmp_path / "x.png").exists()


@needs_matplotlib
def test_output_path_mistakes_exit_2(tmp_path, capsys):
    folder = tmp_path / "out.png"
    folder.mkdir()
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for target, words in ((tmp_path, ["is a directory"]), (folder, ["is a directory"]),
                          (a_file / "x.png", ["is a file"]), (tmp_path / "w.gif", [".png, .svg or .pdf"])):
        assert main(["render", "causal()", "--seq-len", "64", "-o", str(target)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and all(w in err for w in words), err


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
@needs_matplotlib
def test_unwritable_output_exits_2(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    assert main(["render", "causal()", "--seq-len", "64", "-o", str(locked / "x.png")]) == 2
    assert "cannot write" in capsys.readouterr().err


def test_sizes_too_large_for_memory_exit_2():
    for argv in (["show", "causal()", "--seq-len", "2147483647"],
                 ["render", "causal()", "--seq-len", "2147483647", "--view", "tiles", "-o", "/tmp/x.png"]):
        done = run(*argv)
        assert done.returncode == 2, done.stderr
        assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1, done.stderr


def test_show(capsys):
    assert main(["show", "window(64) | global_tokens(8)", "--seq-len", "512", "--tile", "64"]) == 0
    out = capsys.readouterr().out
    assert "█" in out and "full tile" in out and "pairs:" in out


def test_explain_text_and_json(capsys):
    assert main(["explain", "causal()", "--seq-len", "256", "--device", "cpu"]) == 0
    text = capsys.readouterr().out.strip()
    assert text
    assert main(["explain", "window(16) | global_tokens(4)", "--seq-len", "300", "--heads", "2",
                 "--device", "cpu", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    plan = sd.compile(sd.window(16) | sd.global_tokens(4)).explain(300, heads=2, device="cpu")
    assert got["kind"] == plan.kind and got["pairs"] == plan.pairs == 2 * int(
        sd.dense(sd.window(16) | sd.global_tokens(4), 300).sum())
    assert got["text"] == str(plan)
    for name, candidate in (getattr(plan, "candidates", None) or {}).items():
        assert got["candidates"][name]["reasons"] == [str(r) for r in candidate.reasons]


def test_catalog_lists_every_entry_with_its_source(capsys):
    assert main(["catalog"]) == 0
    text = capsys.readouterr().out
    assert main(["catalog", "--json"]) == 0
    entries = json.loads(capsys.readouterr().out)
    assert [e["name"] for e in entries] == list(sd.patterns.CATALOG)
    for e in entries:
        assert e["name"] in text and e["summary"] and e["source"]
    assert any("arXiv:2007.14062" in e["source"] for e in entries)


def test_zoom_accepts_what_users_type():
    assert parse_zoom("512") == 512
    assert parse_zoom("0:512") == (0, 512, 0, 512)
    assert parse_zoom("1000:2000, 0:4096") == (1000, 2000, 0, 4096)
    assert parse_zoom("(1000, 2000, 0, 4096)") == (1000, 2000, 0, 4096)
    assert parse_zoom("[1_000,2_000,0,4_096]") == (1000, 2000, 0, 4096)


@needs_matplotlib
def test_render_options(tmp_path, capsys):
    out = tmp_path / "w.png"
    assert main(["render", "window(32) | prefix(4)", "--seq-len", "300", "--tile", "32",
                 "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert str(out) in capsys.readouterr().out
    pdf = tmp_path / "s.pdf"
    assert main(["render", "segments([64, 128], [1, 2])", "--seq-len", "512", "--heads", "4",
                 "--show-heads", "0,3", "--zoom", "0:256", "--size", "6x3", "--cmap", "viridis",
                 "-o", str(pdf)]) == 0
    assert pdf.read_bytes()[:5] == b"%PDF-"
    for extra in (["--view", "tiles", "--compact"], ["--view", "scores", "--show-heads", "1"]):
        target = tmp_path / f"{extra[1]}.svg"
        assert main(["render", "causal().score(alibi())", "--seq-len", "48", "--heads", "2",
                     *extra, "-o", str(target)]) == 0
        assert target.read_text().lstrip().startswith(("<?xml", "<svg"))
    assert main(["render", "causal()", "--seq-len", "64", "--cmap", "nocolors", "-o",
                 str(tmp_path / "c.png")]) == 2
    assert "cmap" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("dot") is None, reason="needs graphviz")
def test_diagram_honours_kv_len(tmp_path, capsys):
    out = tmp_path / "t.svg"
    assert main(["diagram", "causal() | prefix(8)", "--seq-len", "100", "--kv-len", "150",
                 "-o", str(out)]) == 0
    text = out.read_text()
    assert "prefix(8)" in text and "K = 150" in text
    pairs = int(sd.dense(sd.causal() | sd.prefix(8), 100, 150).sum())
    assert f"{pairs:,} pairs" in text


def test_diagram_without_dot(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert main(["diagram", "causal()", "--seq-len", "64", "-o", str(tmp_path / "t.svg")]) == 3
    assert "apt-get install graphviz" in capsys.readouterr().err


def test_demo_prints_one_comparison(capsys):
    assert main(["demo", "window(8) | global_tokens(2)", "--seq-len", "96", "--heads", "2",
                 "--tile", "32"]) == 0
    out = capsys.readouterr().out
    assert out.count("dense time / sparsedsl time") == 1
    assert "max |sparsedsl - dense reference|" in out and "plan" in out


def test_help_texts_state_the_defaults():
    parser = build_parser()
    subs = parser._subparsers._group_actions[0].choices
    demo_help = subs["demo"].format_help()
    assert "default: 2048" in demo_help and "default: 8" in demo_help
    assert "--kv-len" not in demo_help  # the demo runs self-attention only
    assert "``" not in parser.format_help() and ":class:" not in parser.format_help()
    for name in ("show", "count", "explain", "render", "diagram", "demo", "catalog"):
        assert name in parser.format_help()


def test_help_and_version_answer_fast_without_torch():
    start = time.perf_counter()
    done = run("--help")
    took = time.perf_counter() - start
    assert done.returncode == 0 and "catalog" in done.stdout
    assert took < 2.0, took  # a cold interpreter included; torch alone takes longer
    version = run("--version")
    assert version.returncode == 0 and version.stdout.startswith("sparsedsl ")
    probe = subprocess.run(
        [sys.executable, "-c", "import sys; from sparsedsl.cli import build_parser; "
         "build_parser().format_help(); print('torch' in sys.modules)"],
        capture_output=True, text=True, timeout=120)
    assert probe.stdout.strip() == "False", probe.stderr


def test_python_dash_m():
    done = run("count", "causal()", "--seq-len", "1000")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "500500"
    bad = run("count", "causal(", "--seq-len", "10")
    assert bad.returncode == 2 and "causal(" in bad.stderr and "Traceback" not in bad.stderr
