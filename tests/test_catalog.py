"""The pattern catalog (sparsedsl.patterns), sparsedsl.catalog.load, catalog names in
pattern text and on the command line, and the packaging that ships patterns/."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

import sparsedsl as sd
import sparsedsl.patterns as catalog
from sparsedsl.catalog import catalog_names, load, pattern_from_text
from sparsedsl.cli import main

ROOT = Path(__file__).resolve().parents[1]

EXPECTED = {
    "local_window", "dilated_sparse", "global_local", "block_sparse_dilated", "sliding_window",
    "longformer", "bigbird", "sparse_transformer_strided", "sparse_transformer_fixed", "longnet",
    "longnet_head_grouped", "prefix_lm", "document_mask", "block_causal", "neighbourhood_1d",
    "neighbourhood_2d", "dilated_sliding_window", "attention_sink", "document_prefix_lm", "sliding_tile",
    "svg_spatial", "svg_temporal", "video_sparse_attention", "deepspeed_fixed", "deepspeed_variable",
    "deepspeed_bslongformer", "deepspeed_bigbird",
}

#: Entries whose pairs depend on a tensor bound at call time.
BOUND = {"document_mask", "document_prefix_lm", "video_sparse_attention"}


def test_the_catalog_has_every_entry():
    assert set(catalog.names()) == EXPECTED == set(catalog_names())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_entry_builds_round_trips_and_is_documented(name):
    entry = catalog.CATALOG[name]
    pattern = entry()
    assert isinstance(pattern, sd.Pattern)
    again = sd.parse(str(pattern))
    assert again == pattern and hash(again) == hash(pattern)
    assert load(name) == pattern
    assert pattern_from_text(name) == pattern
    doc = inspect.getdoc(entry)
    assert "arXiv:" in doc or "dilated_attention_pytorch" in doc, name
    for param in inspect.signature(entry).parameters.values():
        assert param.default is not param.empty, f"{name}: {param.name} has no default"


@pytest.mark.parametrize("name", sorted(EXPECTED - BOUND))
def test_counts_equal_the_dense_reference_at_a_small_size(name):
    small = {
        "local_window": {"seq_len": 300, "block_size": 32},
        "dilated_sparse": {"seq_len": 300, "block_size": 16, "sparsity_ratio": 0.3},
        "global_local": {"seq_len": 300, "block_size": 32},
        "block_sparse_dilated": {"seq_len": 300, "block_size": 32, "segment_lengths": [16, 32]},
        "sliding_window": {"window": 40},
        "longformer": {"window": 30, "global_tokens": 3, "dilation": 2},
        "bigbird": {"block_size": 16},
        "sparse_transformer_strided": {"stride": 17},
        "sparse_transformer_fixed": {"stride": 20, "c": 4},
        "longnet": {"segment_lengths": [32, 64, 128], "dilation_rates": [1, 2, 4], "causal": True},
        "longnet_head_grouped": {"segment_lengths": [32, 64, 128], "dilation_rates": [1, 2, 4], "causal": True},
        "prefix_lm": {"prefix_length": 50},
        "block_causal": {"block_size": 24},
        "neighbourhood_1d": {"kernel_size": 9},
        "neighbourhood_2d": {"height": 20, "width": 15, "kernel_height": 5, "kernel_width": 3},
        "dilated_sliding_window": {"window": 20, "dilation": 3},
        "attention_sink": {"window": 30, "sink_tokens": 4},
        "sliding_tile": {"canvas": (12, 24), "kernel": (6, 8), "tile": (3, 4), "text_length": 12},
        "svg_spatial": {"prompt_length": 20, "tokens_per_frame": 28, "round_width": 8},
        "svg_temporal": {"prompt_length": 20, "num_frames": 10, "tokens_per_frame": 28},
        "deepspeed_fixed": {"block": 8, "num_local_blocks": 4, "num_global_blocks": 2,
                            "num_different_global_patterns": 2},
        "deepspeed_variable": {"block": 8, "num_random_blocks": 1, "local_window_blocks": (2, 3, 4),
                               "global_block_indices": (1, 20)},
        "deepspeed_bslongformer": {"block": 8, "global_block_indices": (2, 9), "global_block_end_indices": (4, 11)},
        "deepspeed_bigbird": {"block": 8, "attention": "unidirectional", "num_random_blocks": 2},
    }[name]
    pattern = load(name, **small)
    heads = 4
    counts = sd.count(pattern, 300, heads=heads, tile=32)
    dense = sd.dense(pattern, 300, heads=heads)  # multiplicities for longnet (a multiset)
    assert counts.pairs == int((dense > 0).sum())
    assert list(counts.per_head) == [int(x) for x in (dense > 0).sum((1, 2))]
    assert counts.pairs_with_multiplicity == int(dense.sum())
    assert 0 < counts.density <= 1


def test_sliding_window_density_is_exact():
    n, w = 4096, 256
    counts = sd.count(load("sliding_window", window=w), n)
    assert counts.pairs == w * (w + 1) // 2 + (n - w) * w
    assert counts.density == pytest.approx(w / n, rel=0.05)
    assert load("sliding_window") == sd.window(4095, 0)


def test_longnet_defaults_are_the_papers_with_every_head_running_every_branch():
    assert catalog.longnet() == sd.longnet([2048, 4096, 8192, 16384, 32768], [1, 2, 4, 6, 12])
    assert catalog.longnet(causal=True) == catalog.longnet() & sd.causal()
    counts = sd.count(catalog.longnet(), 4096, heads=12, tile=256)
    # At 4,096 tokens head h keeps, per branch (w, r), the positions j, j + r, ... of each
    # segment (j = h // ceil(12 / r), segments cut to the sequence).
    for h, pairs in enumerate(counts.per_head_with_multiplicity):
        assert pairs == sum((-(-4096 // min(w, 4096))) * len(range(h // -(-12 // r), min(w, 4096), r)) ** 2
                            for w, r in zip(catalog.PAPER_SEGMENT_LENGTHS, catalog.PAPER_DILATION_RATES))


def test_longnet_head_grouped_defaults_are_the_papers_and_per_head_counts_are_exact():
    pattern = catalog.longnet_head_grouped()
    assert pattern == sd.segments([2048, 4096, 8192, 16384, 32768], [1, 2, 4, 6, 12])
    n = 65536
    counts = sd.count(pattern, n, heads=5, tile=256)
    for pairs, s, r, i in zip(counts.per_head, catalog.PAPER_SEGMENT_LENGTHS,
                              catalog.PAPER_DILATION_RATES, range(5)):
        kept = len(range(i % r, s, r))
        assert pairs == (n // s) * kept * kept


def test_bigbird_rows_see_local_global_and_random_blocks():
    """BigBird-ITC: the first and the last block global, a band of 3 blocks and 3 random
    blocks per row (drawn among all blocks, so 5 to 8 blocks a middle row)."""
    pattern = catalog.bigbird()
    assert pattern == sd.blocks(64).local(1).global_(1).random(3, 0) | sd.queries(-64) | sd.keys(-64)
    counts = sd.count(pattern, 4096, tile=64)
    assert counts.tiles.partial == 0  # block-aligned: every tile full or empty
    rows = sd.dense(pattern, 4096)[0, ::64, ::64]
    per_row = rows.sum(-1)
    assert int(per_row[1:-1].min()) >= 5 and int(per_row[2:-2].max()) <= 8
    for ends in (rows[[0, -1]], rows[:, [0, -1]]):
        assert bool(ends.all())
    assert not bool(rows[1:-1, 1].all())  # the second block is not global
    without_random = sd.dense(catalog.bigbird(random_blocks=0), 640)[0, ::64, ::64]
    blocks = torch.arange(10)
    band = (blocks[:, None] - blocks[None, :]).abs() <= 1
    ends = (blocks == 0) | (blocks == 9)
    assert torch.equal(without_random, band | ends[:, None] | ends[None, :])
    # An odd count puts the extra global block first; none leaves the band and random blocks.
    assert catalog.bigbird(global_blocks=3) == (sd.blocks(64).local(1).global_(2).random(3, 0) | sd.queries(-64)
                                                | sd.keys(-64))
    assert catalog.bigbird(global_blocks=0) == sd.blocks(64).local(1).random(3, 0)


def test_other_formulas():
    n = 1000
    assert sd.count(catalog.prefix_lm(100), n).pairs == 100 * 100 + sum(max(q + 1, 100) for q in range(100, n))
    assert sd.count(catalog.block_causal(64), n).pairs == sum(min(n, (q // 64 + 1) * 64) for q in range(n))
    assert sd.count(catalog.neighbourhood_1d(), 4096).pairs == 4096 * 7
    ids = torch.tensor([0] * 300 + [1] * 700)
    assert sd.count(catalog.document_mask(), n, doc_ids=ids).pairs == 300 * 301 // 2 + 700 * 701 // 2
    assert sd.count(catalog.document_mask(causal=False), n, doc_ids=ids).pairs == 300 ** 2 + 700 ** 2
    strided = sd.count(catalog.sparse_transformer_strided(stride=32, merged=True), n).density
    assert strided < 0.05


@pytest.mark.parametrize("kernel,n", [(7, 7), (7, 8), (7, 40), (3, 5), (1, 9), (15, 31)])
def test_neighbourhood_every_query_sees_exactly_the_clamped_window(kernel, n):
    allowed = sd.dense(catalog.neighbourhood_1d(kernel), n)[0]
    start = (torch.arange(n) - kernel // 2).clamp(0, n - kernel)
    keys = torch.arange(n)[None]
    assert torch.equal(allowed, (keys >= start[:, None]) & (keys < start[:, None] + kernel))


@pytest.mark.parametrize("name", ["local_window", "dilated_sparse", "global_local"])
def test_seed_entries_honour_the_ratio_at_16k(name):
    tiles = sd.count(load(name), 16384, tile=256).tiles
    assert abs((tiles.full + tiles.partial) / 4096 - 0.1) < 0.025


def test_entries_reject_bad_parameters():
    with pytest.raises(ValueError):
        load("longnet", segment_lengths=[2048], dilation_rates=[1, 2])
    with pytest.raises(ValueError):
        load("neighbourhood_1d", kernel_size=4)
    with pytest.raises(ValueError):
        load("neighbourhood_2d", width=5, kernel_width=7)
    with pytest.raises(ValueError, match="'attention' must be"):
        load("deepspeed_fixed", attention="causal")
    with pytest.raises(ValueError, match="num_different_global_patterns"):
        load("deepspeed_fixed", num_local_blocks=4, num_global_blocks=2, num_different_global_patterns=3)
    with pytest.raises(ValueError, match="horizontal_global_attention"):
        load("deepspeed_variable", attention="unidirectional", horizontal_global_attention=True)
    with pytest.raises(ValueError, match="multiples of the tile"):
        load("sliding_tile", canvas=(10, 10), kernel=(4, 4), tile=(4, 4))
    with pytest.raises(ValueError):
        load("sparse_transformer_fixed", stride=8, c=9)
    with pytest.raises(ValueError, match="did you mean bigbird"):
        load("bigbrid")
    with pytest.raises(ValueError, match="parameters: block_size=64"):
        load("bigbird", blocksize=64)
    with pytest.raises(TypeError):
        load(3)


@pytest.mark.parametrize("call", [
    lambda: load("sparse_transformer_strided", merged="no"),
    lambda: load("document_mask", causal="False"),
    lambda: load("longnet", causal=1),
    lambda: load("svg_spatial", attention_sink=None),
    lambda: pattern_from_text("document_mask(causal=None)"),
    lambda: pattern_from_text("dilated_sliding_window(causal='no')"),
])
def test_flags_of_entries_must_be_true_or_false(call):
    with pytest.raises(ValueError, match="must be True or False"):
        call()


def test_an_entry_parameter_called_name_can_be_set():
    assert load("document_mask", name="x") == sd.documents("x") & sd.causal()
    assert load("document_mask", name="x", causal=False) == sd.documents("x")


@pytest.mark.parametrize("text, message", [
    ("sliding_window(window=8, window=2)", "keyword argument repeated: 'window'"),
    ("\uff53\uff4c\uff49\uff44\uff49\uff4e\uff47_window(window=8)", "non-ASCII character"),
    ("sliding_window(\uff57indow=8)", "non-ASCII character"),
])
def test_catalog_text_is_read_as_the_language_reads_it(text, message):
    with pytest.raises(sd.PatternSyntaxError, match=message):
        pattern_from_text(text)


@pytest.mark.parametrize("separator", ["\x1c", "\u2028", "\x85", "\x0c"])
def test_comments_may_hold_any_character(separator):
    """Catalog names are found at the columns Python's tokenizer gives, whose lines end
    only at \\n, \\r and \\r\\n."""
    text = f"(prefix_lm # {separator} note\n | longformer)"
    assert pattern_from_text(text) == load("prefix_lm") | load("longformer")


# -- catalog names in pattern text -----------------------------------------------------------------

def test_catalog_calls_and_combinations_in_text():
    assert pattern_from_text("longnet(segment_lengths=[2048,4096], dilation_rates=[1,2])") == \
        sd.longnet([2048, 4096], [1, 2])
    assert pattern_from_text("longnet_head_grouped(segment_lengths=[2048,4096], dilation_rates=[1,2])") == \
        sd.segments([2048, 4096], [1, 2])
    assert pattern_from_text("bigbird(128, 2)") == catalog.bigbird(128, 2)
    assert pattern_from_text("  sliding_window(window=64) | global_tokens(4)") == \
        sd.window(63, 0) | sd.global_tokens(4)
    assert pattern_from_text("(heads(longformer(window=8),\n       block_causal) & causal())") == \
        sd.heads(sd.window(4) | sd.global_tokens(1), sd.blocks(128).causal()) & sd.causal()
    assert pattern_from_text("documents('bigbird')") == sd.documents("bigbird")
    assert pattern_from_text("window(3)") == sd.window(3)


@pytest.mark.parametrize("text,column,message", [
    ("bigbird(blocksize=3)", 1, "unexpected keyword"),
    ("bigbird(block_size=x)", 20, "literal"),
    ("longformer() | bigbird & windw(2)", 26, "unknown name 'windw'"),
    ("bigbird | window(-1)", 11, "window()"),
    ("window(2) | bigbrd", 13, "catalog pattern bigbird"),
    ("é_x | bigbird", 1, "non-ASCII character"),
    ("bigbird(", 8, ""),
])
def test_errors_quote_the_text_and_point_at_the_column(text, column, message):
    with pytest.raises(sd.PatternSyntaxError) as info:
        pattern_from_text(text)
    assert info.value.text == text
    assert info.value.column == column, str(info.value)
    assert message in str(info.value)


# -- the command line -------------------------------------------------------------------------------

def test_cli_counts_catalog_names(capsys):
    assert main(["count", "bigbird", "--seq-len", "4096"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert int(first) == sd.count(catalog.bigbird(), 4096).pairs
    assert main(["count", "longnet_head_grouped(segment_lengths=[256, 512], dilation_rates=[1, 2]) & causal()",
                 "--seq-len", "1024"]) == 0
    assert "heads=2" in capsys.readouterr().out
    assert main(["count", "longnet(segment_lengths=[256, 512], dilation_rates=[1, 2]) & causal()",
                 "--seq-len", "1024"]) == 0
    assert "with multiplicity" in capsys.readouterr().out
    assert main(["show", "block_causal(block_size=256)", "--seq-len", "1024"]) == 0
    assert "█" in capsys.readouterr().out
    assert main(["count", "bigbrd"]) == 2
    assert "did you mean" in capsys.readouterr().err


def test_cli_console_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "sparsedsl", "count", "bigbird", "--seq-len", "4096"],
                            capture_output=True, text=True, timeout=120, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": ""})
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.splitlines()[0]) == sd.count(catalog.bigbird(), 4096).pairs


# -- packaging -----------------------------------------------------------------------------------

def test_patterns_ship_as_sparsedsl_patterns():
    assert Path(catalog.__file__).resolve().parent == ROOT / "patterns"


def test_pyproject_lists_every_package():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "sparsedsl").rglob("__init__.py")}
    assert found | {"sparsedsl.patterns"} == listed
    assert config["package-dir"] == {"sparsedsl.patterns": "patterns"}
