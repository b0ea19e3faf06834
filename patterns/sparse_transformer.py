"""Sparse Transformer: factorised strided and fixed attention patterns (autoregressive).

Source: Child, Gray, Radford and Sutskever 2019, "Generating Long Sequences with Sparse
Transformers", arXiv:1904.10509, §4.2–4.3. With stride ``l``:

* strided: ``A1(i) = {i - l, ..., i}`` and ``A2(i) = {j : (i - j) mod l = 0}``;
* fixed: ``A1(i) = {j : floor(j / l) = floor(i / l)}`` and ``A2(i) = {j : j mod l >= l - c}``;

both restricted to ``j <= i``. The paper runs the two parts as separate heads, interleaved
layers, or one merged head; here they are two head groups, or one union with ``merged=True``.
"""

from __future__ import annotations

from sparsedsl.lang import nodes as n
from sparsedsl.lang.checks import PatternArgumentError, check_int


def _combine(first: n.Pattern, second: n.Pattern, merged: bool) -> n.Pattern:
    return first | second if merged else n.heads(first, second)


def sparse_transformer_strided(stride: int = 128, merged: bool = False) -> n.Pattern:
    """Strided pattern: head group 1 ``window(stride, 0)`` (the previous ``stride``
    positions and itself), head group 2 ``strided(stride) & causal()`` (every
    ``stride``-th earlier position). ``merged=True`` gives one pattern, their union.

    ``stride`` (default 128) is the paper's ``l``, chosen near ``sqrt(N)`` (128 suits
    16,384 tokens).

    Source: Child et al. 2019, "Sparse Transformers", arXiv:1904.10509, §4.2.
    """
    stride = check_int("sparse_transformer_strided()", "stride", stride, minimum=1)
    return _combine(n.window(stride, 0), n.strided(stride) & n.causal(), bool(merged))


def sparse_transformer_fixed(stride: int = 128, c: int = 8, merged: bool = False) -> n.Pattern:
    """Fixed pattern: head group 1 ``chunks(stride) & causal()`` (earlier positions of the
    same ``stride``-block), head group 2 ``blocks(stride).within(~prefix(stride - c)) &
    causal()`` (the last ``c`` positions of every earlier block: the "summary" cells).
    ``merged=True`` gives their union.

    Defaults ``stride=128``, ``c=8``: the paper found ``c`` in {8, 16, 32} good for ``l``
    in {128, 256}.

    Source: Child et al. 2019, "Sparse Transformers", arXiv:1904.10509, §4.3.
    """
    where = "sparse_transformer_fixed()"
    stride = check_int(where, "stride", stride, minimum=1)
    c = check_int(where, "c", c, minimum=1)
    if c > stride:
        raise PatternArgumentError(f"{where}: argument 'c' must be <= stride ({stride}), got {c}")
    summary = n.causal() if c == stride else n.blocks(stride).within(~n.prefix(stride - c)) & n.causal()
    return _combine(n.chunks(stride) & n.causal(), summary, bool(merged))
