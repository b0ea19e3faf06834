"""Turning what a user typed into a pattern: pattern text, catalog names, or both.

:func:`pattern_from_text` accepts the language's text form (read by
:func:`sparsedsl.parse`) in which a name of the catalog (:mod:`sparsedsl.patterns`) may
stand wherever a pattern may: a bare name (``bigbird``), or a call with literal arguments
(``longnet(segment_lengths=[2048, 4096], dilation_rates=[1, 2])``), alone or combined
(``sliding_window(window=256) | global_tokens(4)``). :func:`load` builds one catalog entry
from Python.

Catalog arguments are Python literals only (numbers, strings, lists, tuples,
``True``/``False``/``None``), read with :func:`ast.literal_eval`: the text is never
evaluated. Errors are :class:`~sparsedsl.PatternSyntaxError`s that quote the text and point
at the column.
"""

from __future__ import annotations

import ast
import difflib
import inspect
import re

from .lang.checks import PatternArgumentError, check_bool
from .lang.nodes import Pattern
from .lang.parse import PatternSyntaxError, parse, prescan

__all__ = ["catalog_names", "load", "pattern_from_text"]


def _catalog() -> dict:
    from . import patterns  # the top-level folder patterns/, shipped as sparsedsl.patterns
    return patterns.CATALOG


def catalog_names() -> list[str]:
    """The names :func:`load` and :func:`pattern_from_text` accept, sorted."""
    return sorted(_catalog())


def _unknown(name: str) -> str:
    names = catalog_names()
    close = difflib.get_close_matches(name, names, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return f"unknown catalog pattern {name!r}{hint} (known: {', '.join(names)})"


def load(name: str, /, **params) -> Pattern:
    """The catalog entry ``name`` built with ``params``: ``load("bigbird", block_size=128)``.

    Raises ``ValueError`` (a :class:`~sparsedsl.PatternArgumentError`) for an unknown name,
    an unknown parameter or a value the entry rejects; ``TypeError`` if ``name`` is not a
    string. See :mod:`sparsedsl.patterns` for the entries, their defaults and sources.
    """
    if not isinstance(name, str):
        raise TypeError(f"load(): argument 'name' must be a str, got {type(name).__name__}")
    catalog = _catalog()
    if name not in catalog:
        raise PatternArgumentError(f"load(): {_unknown(name)}")
    entry = catalog[name]
    try:
        bound = inspect.signature(entry).bind(**params)
    except TypeError as err:
        raise PatternArgumentError(
            f"load({name!r}): {err}; parameters: {_parameters(entry)}") from None
    return entry(**_checked_flags(f"load({name!r})", entry, bound))


def _checked_flags(where: str, entry, bound: inspect.BoundArguments) -> dict:
    """``bound``'s keyword arguments, each given to a parameter annotated ``bool`` checked
    to be True or False (a string such as ``"no"`` would read as true); positional ones
    too, moved to keywords."""
    parameters = inspect.signature(entry).parameters
    arguments = dict(bound.arguments)
    for key, value in arguments.items():
        if parameters[key].annotation in (bool, "bool"):
            try:
                arguments[key] = check_bool(where, key, value)
            except TypeError as err:  # a value the entry rejects: a ValueError, as load() says
                raise PatternArgumentError(str(err)) from None
    return arguments


def _parameters(entry) -> str:
    return ", ".join(
        f"{p.name}={p.default!r}" if p.default is not p.empty else p.name
        for p in inspect.signature(entry).parameters.values())


# -- catalog names inside pattern text ---------------------------------------------------------

class _Offsets:
    """Maps ``ast`` (line, UTF-8 byte column) positions of ``source`` to character indices."""

    def __init__(self, source: str):
        # Lines as Python's tokenizer ends them (str.splitlines also ends them at \x1c,
        # \u2028 and others, which a comment may hold).
        ends = [match.end() for match in re.finditer(r"\r\n|\r|\n", source)]
        self.lines = [source[a:b] for a, b in zip([0] + ends, ends + [len(source)])]
        self.starts = [0]
        for line in self.lines:
            self.starts.append(self.starts[-1] + len(line))

    def index(self, lineno: int, col: int) -> int:
        line = self.lines[lineno - 1] if lineno - 1 < len(self.lines) else ""
        return self.starts[lineno - 1] + len(line.encode("utf-8")[:col].decode("utf-8", "replace"))


def _catalog_nodes(tree: ast.AST, catalog: dict) -> list[ast.AST]:
    """The outermost ``Name`` / ``Call`` nodes of ``tree`` that name catalog entries."""
    found = []

    def visit(node):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in catalog:
            found.append(node)
            return
        if isinstance(node, ast.Name) and node.id in catalog:
            found.append(node)
            return
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _build(node: ast.AST, catalog: dict, text: str, position) -> Pattern:
    if isinstance(node, ast.Name):
        name, args, keywords = node.id, [], []
    else:
        name, args, keywords = node.func.id, node.args, node.keywords
    entry = catalog[name]

    def literal(value_node):
        try:
            return ast.literal_eval(value_node)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            raise PatternSyntaxError(
                f"argument of catalog pattern {name!r} must be a literal (number, string, "
                f"list, True/False/None)", text, position(value_node)) from None

    positional = []
    for arg in args:
        if isinstance(arg, ast.Starred):
            raise PatternSyntaxError(f"'*' arguments are not accepted by {name!r}", text, position(arg))
        positional.append(literal(arg))
    named = {}
    for kw in keywords:
        if kw.arg is None:
            raise PatternSyntaxError(f"'**' arguments are not accepted by {name!r}", text, position(kw.value))
        if kw.arg in named:
            raise PatternSyntaxError(f"keyword argument repeated: {kw.arg!r}", text, position(kw.value))
        named[kw.arg] = literal(kw.value)
    try:
        bound = inspect.signature(entry).bind(*positional, **named)
    except TypeError as err:
        raise PatternSyntaxError(
            f"catalog pattern {name}(): {err}; parameters: {_parameters(entry)}",
            text, position(node)) from None
    try:
        return entry(**_checked_flags(f"catalog pattern {name}()", entry, bound))
    except (PatternArgumentError, ValueError, TypeError) as err:
        raise PatternSyntaxError(str(err), text, position(node)) from err


def pattern_from_text(text: str) -> Pattern:
    """The pattern that ``text`` names: pattern source text such as ``"window(256)"``, a
    catalog name such as ``"bigbird"`` or ``"longnet(segment_lengths=[2048, 4096],
    dilation_rates=[1, 2])"``, or pattern text that uses catalog names as patterns
    (``"sliding_window(window=256) | global_tokens(4)"``).

    Each catalog name is replaced by its pattern's text form, and the result is read by
    :func:`sparsedsl.parse`. Raises :class:`~sparsedsl.PatternSyntaxError` (a
    ``ValueError``) with the text quoted and the column marked.
    """
    if not isinstance(text, str):
        raise TypeError(f"pattern_from_text(): argument 'text' must be a str, got {type(text).__name__}")
    prescan(text)  # ASCII names, nesting: as parse() reads them
    shift = len(text) - len(text.lstrip(" \t\f\r\n"))
    source = text[shift:]
    try:
        tree = ast.parse(source, mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return _parse(text)  # parse() reports the syntax error with its own message
    catalog = _catalog()
    found = _catalog_nodes(tree, catalog)
    if not found:
        return _parse(text)
    offsets = _Offsets(source)

    def span(node) -> tuple[int, int]:
        return (shift + offsets.index(node.lineno, node.col_offset),
                shift + offsets.index(node.end_lineno, node.end_col_offset))

    def position(node) -> int:
        return span(node)[0]

    pieces, replaced, cursor = [], [], 0  # replaced: (orig_start, orig_end, new_start, new_end)
    length = 0
    for node in sorted(found, key=position):
        start, end = span(node)
        pattern = _build(node, catalog, text, position)
        before = text[cursor:start]
        pieces.append(before)
        length += len(before)
        piece = f"({pattern})"
        replaced.append((start, end, length, length + len(piece)))
        pieces.append(piece)
        length += len(piece)
        cursor = end
    pieces.append(text[cursor:])
    expanded = "".join(pieces)
    try:
        return parse(expanded)
    except PatternSyntaxError as err:
        raise PatternSyntaxError(err.reason, text, _original_position(err.position, replaced)) from err


def _parse(text: str) -> Pattern:
    """:func:`parse`, with a hint when an unknown name is close to a catalog name."""
    try:
        return parse(text)
    except PatternSyntaxError as err:
        if err.reason.startswith("unknown name '"):
            name = err.reason[len("unknown name '"):].split("'", 1)[0]
            close = difflib.get_close_matches(name, catalog_names(), n=3)
            if close:
                raise PatternSyntaxError(
                    f"{err.reason}; did you mean the catalog pattern {' or '.join(close)}?",
                    err.text, err.position) from err
        raise


def _original_position(position: int, replaced: list[tuple[int, int, int, int]]) -> int:
    """Where ``position`` of the expanded text was in the text the user gave."""
    delta = 0
    for orig_start, orig_end, new_start, new_end in replaced:
        if position < new_start:
            break
        if position < new_end:
            return orig_start
        delta = orig_end - new_end
    return position + delta
