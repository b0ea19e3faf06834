"""The ``sparsedsl`` command: show, count, render, diagram and explain on pattern text."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys

import pytest

from sparsedsl.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


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


def test_bad_pattern_exits_nonzero_with_the_parse_error(capsys):
    assert main(["count", "window(", "--seq-len", "10"]) != 0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "window(" in captured.err and "^" in captured.err
    assert main(["count", "windw(3)"]) != 0
    assert "windw" in capsys.readouterr().err


def test_show(capsys):
    assert main(["show", "window(64) | global_tokens(8)", "--seq-len", "512", "--tile", "64"]) == 0
    out = capsys.readouterr().out
    assert "█" in out and "full tile" in out and "pairs:" in out


def test_explain(capsys):
    assert main(["explain", "causal()", "--seq-len", "256", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.strip()


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="needs matplotlib")
def test_render(tmp_path, capsys):
    out = tmp_path / "w.png"
    assert main(["render", "window(32) | prefix(4)", "--seq-len", "300", "--tile", "32",
                 "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert str(out) in capsys.readouterr().out
    assert main(["render", "causal()", "--seq-len", "64", "--output", str(tmp_path / "w.gif")]) == 2
    assert ".png or .svg" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("dot") is None, reason="needs graphviz")
def test_diagram(tmp_path, capsys):
    out = tmp_path / "t.svg"
    assert main(["diagram", "causal() | prefix(8)", "--seq-len", "100", "-o", str(out)]) == 0
    assert "prefix(8)" in out.read_text()


def test_diagram_without_dot(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert main(["diagram", "causal()", "--seq-len", "64", "-o", str(tmp_path / "t.svg")]) == 3
    assert "apt-get install graphviz" in capsys.readouterr().err


def test_python_dash_m(tmp_path):
    done = subprocess.run([sys.executable, "-m", "sparsedsl", "count", "causal()", "--seq-len", "1000"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "500500"
    bad = subprocess.run([sys.executable, "-m", "sparsedsl", "count", "causal(", "--seq-len", "10"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "causal(" in bad.stderr
