"""The text form of patterns: :func:`parse` turns ``str(p)`` back into ``p``.

The parser never evaluates code. The text is parsed by :func:`ast.parse` in ``"eval"`` mode
and the resulting tree is walked node by node; only the constructs of the grammar below are
accepted, and the pattern is built by calling the public constructors of
:mod:`sparsedsl.lang.nodes` (``window``, ``blocks``, ``Pattern.__or__``, ...), so their
argument validation applies exactly as in Python code.

Grammar (precedence and associativity are Python's: ``|`` < ``&`` < ``-`` and ``+`` <
``~`` < call/method; binary operators group left to right)::

    pattern   ::= pattern "|" pattern                    union
                | pattern "&" pattern                    intersection
                | pattern "-" pattern                    difference
                | pattern "+" pattern                    multiset union
                | "~" pattern                            complement
                | "(" pattern ")"
                | PNAME "(" arguments ")"
                | blockpat
                | pattern ".score(" mod ("," mod)* [","] ")"
                | pattern ".starting_at(" arguments ")"         positions from an offset
                | "documents(" arguments ").within(" pattern ")"  positions inside documents
                | ("queries" | "keys" | "cycle_heads") "(" arguments ")"
    PNAME     ::= "full" | "causal" | "window" | "dilated_window" | "chunks" | "strided"
                | "dilated" | "global_tokens" | "prefix" | "documents" | "heads" | "segments"
                | "dilated_heads" | "longnet"
    blockpat  ::= "blocks(" arguments ")" | "(" blockpat ")"
                | blockpat "." BMETHOD "(" arguments ")"
    BMETHOD   ::= "local" | "dilated" | "global_" | "random" | "random_causal" | "layout"
                | "causal" | "within"
    mod       ::= MNAME "(" arguments ")"
    MNAME     ::= "alibi" | "softcap" | "bias"
    arguments ::= [ (posargs ["," kwargs] | kwargs) [","] ]
    posargs   ::= argument ("," argument)*
    kwargs    ::= KEYWORD "=" argument ("," KEYWORD "=" argument)*
    argument  ::= number | STRING | "[" [number ("," number)* [","]] "]" | pattern
                | "None"                                 only where the parameter defaults to None
    number    ::= ["-"] (INT | FLOAT)

``KEYWORD`` is a parameter name of the called constructor or method, each at most once;
the number and kinds of arguments must fit its signature (see :mod:`sparsedsl.lang.nodes`),
and the constructor then validates the values. ``INT``, ``FLOAT`` and ``STRING`` are Python
literals (``0x10`` and ``1_000`` are ints, ``'ids'`` and ``"ids"`` strings).

``.score(...)`` applies to any pattern, and nothing but another ``.score(...)`` may follow
it (a scored pattern cannot be an operand of ``| & - ~``, ``heads`` or ``.within``: the
constructors refuse it); the block methods apply only to a ``blocks(...)`` chain. Keywords are the
parameter names of the constructors (``window(before=3, after=2)``,
``segments(lengths=[64], dilations=[2])``, ``.random(per_row=2, seed=7)``). Strings are
Python string literals (``'ids'`` or ``"ids"``); ``f``-strings and ``b``-strings are not
accepted, nor are ``True``/``False``. Numbers are Python ``int``/``float`` literals; a
leading ``-`` reaches the constructor, so ``window(-1)`` fails with ``window()``'s own
message. Whitespace, newlines inside brackets and ``#`` comments are allowed as in Python.

Limits: at most :data:`MAX_LENGTH` characters, and at most :data:`MAX_DEPTH` levels of
nesting (brackets, runs of prefix operators, syntactic nesting and pattern nodes deep).

Every rejection, whether a Python syntax error, a construct outside the grammar, a wrong
argument count or keyword, or a constructor's validation error, raises
:class:`PatternSyntaxError`, whose message quotes the text and points at the column::

    unknown name 'foo' in pattern text:
      window(3) | foo(2)
                  ^

A plain Python score function (:class:`~sparsedsl.lang.nodes.FunctionMod`) prints as its
name and cannot be parsed back: the parser refuses it with a message that says so.
"""

from __future__ import annotations

import ast
import inspect
import re
import sys
import threading
import warnings
from typing import Any, Callable

from . import nodes
from .checks import PatternArgumentError
from .nodes import Blocks, Intersection, Pattern, ScoreMod, Sum, Union

__all__ = ["MAX_DEPTH", "MAX_LENGTH", "PatternSyntaxError", "parse"]

#: Longest accepted pattern text, in characters.
MAX_LENGTH = 100_000

#: Deepest accepted nesting: brackets, runs of prefix operators (``~``, ``-``), syntactic
#: nesting of expressions, and depth of the resulting pattern tree (a primitive is 1 deep).
MAX_DEPTH = 100

# The vocabulary. Pattern constructors may appear anywhere a pattern may; score
# modifications only as arguments of ``.score(...)``.
_PATTERN_FUNCS: dict[str, Callable] = {
    name: getattr(nodes, name)
    for name in (
        "full", "causal", "window", "dilated_window", "chunks", "strided", "dilated",
        "global_tokens", "prefix", "documents", "blocks", "heads", "segments",
        "queries", "keys", "cycle_heads", "dilated_heads", "longnet",
    )
}
_MOD_FUNCS: dict[str, Callable] = {name: getattr(nodes, name) for name in ("alibi", "softcap", "bias")}
_BLOCK_METHODS = ("local", "dilated", "global_", "random", "random_causal", "layout", "causal", "within")
_VOCABULARY = set(_PATTERN_FUNCS) | set(_MOD_FUNCS)


def _method_signature(func: Callable) -> inspect.Signature:
    """The signature of an unbound method without its ``self`` parameter."""
    sig = inspect.signature(func)
    return sig.replace(parameters=list(sig.parameters.values())[1:])


_SIGNATURES: dict[str, inspect.Signature] = {
    name: inspect.signature(f) for name, f in {**_PATTERN_FUNCS, **_MOD_FUNCS}.items()
}
_METHOD_SIGNATURES: dict[str, inspect.Signature] = {
    name: _method_signature(getattr(Blocks, name)) for name in _BLOCK_METHODS
}
_METHOD_SIGNATURES["score"] = _method_signature(Pattern.score)
_METHOD_SIGNATURES["starting_at"] = _method_signature(Pattern.starting_at)
_DOCUMENT_WITHIN_SIGNATURE = _method_signature(nodes.Documents.within)

_BINOP_SYMBOLS = {
    ast.BitOr: "|", ast.BitAnd: "&", ast.Sub: "-", ast.Add: "+", ast.Mult: "*",
    ast.Div: "/", ast.FloorDiv: "//", ast.Mod: "%", ast.Pow: "**", ast.LShift: "<<",
    ast.RShift: ">>", ast.BitXor: "^", ast.MatMult: "@",
}
_UNARY_SYMBOLS = {ast.Invert: "~", ast.USub: "-", ast.UAdd: "+", ast.Not: "not"}

_NOT_ALLOWED = {
    ast.Lambda: "lambda expression",
    ast.ListComp: "list comprehension",
    ast.SetComp: "set comprehension",
    ast.DictComp: "dict comprehension",
    ast.GeneratorExp: "generator expression",
    ast.Subscript: "subscript",
    ast.Attribute: "attribute access",
    ast.Tuple: "tuple",
    ast.Dict: "dict",
    ast.Set: "set",
    ast.Compare: "comparison",
    ast.BoolOp: "'and'/'or'",
    ast.IfExp: "conditional expression",
    ast.NamedExpr: "assignment expression ':='",
    ast.Await: "'await'",
    ast.Yield: "'yield'",
    ast.YieldFrom: "'yield from'",
    ast.Starred: "star unpacking",
    ast.JoinedStr: "f-string",
    ast.FormattedValue: "f-string",
    ast.Slice: "slice",
}

_NEWLINE = re.compile(r"\r\n|\r|\n")
_BLANK_LINE = re.compile(r"[ \t\f]*(#.*)?")


# ---------------------------------------------------------------------------------------
# The error
# ---------------------------------------------------------------------------------------


class PatternSyntaxError(ValueError):
    """A pattern text could not be parsed.

    Attributes:
        text: the whole text given to :func:`parse`.
        reason: what is wrong, without the quoted text.
        position: 0-based character index into ``text`` of the offending place.
        line: 1-based line of that place (1 for single-line texts).
        column: 1-based character column of that place within its line.

    ``str(err)`` is ``reason``, then the quoted text with a caret line under the column.
    Errors raised by a constructor's validation while building (``PatternArgumentError``)
    keep their message as ``reason`` and are chained as ``__cause__``.
    """

    def __init__(self, reason: str, text: str, position: int = 0):
        position = max(0, min(int(position), len(text)))
        starts = [0] + [m.end() for m in _NEWLINE.finditer(text)]
        line = _line_index(starts, position)
        self.reason = reason
        self.text = text
        self.position = position
        self.line = line + 1
        self.column = position - starts[line] + 1
        super().__init__(_format(reason, text, starts, line, self.column - 1))

    def __reduce__(self):
        return (type(self), (self.reason, self.text, self.position))


def _line_index(starts: list[int], position: int) -> int:
    lo, hi = 0, len(starts) - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if starts[mid] <= position:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _line_text(text: str, starts: list[int], i: int) -> str:
    end = starts[i + 1] if i + 1 < len(starts) else len(text)
    return _NEWLINE.sub("", text[starts[i]:end])


def _excerpt(line: str, col: int, width: int = 200) -> tuple[str, int]:
    """A window of ``line`` around 0-based ``col`` (whole line when short), and the caret's
    0-based column in it."""
    if len(line) <= width:
        return line, col
    start = 0 if col < width * 3 // 4 else col - width // 2
    end = min(len(line), start + width)
    shown = ("..." if start else "") + line[start:end] + ("..." if end < len(line) else "")
    return shown, col - start + (3 if start else 0)


def _format(reason: str, text: str, starts: list[int], line: int, col: int) -> str:
    multi = len(starts) > 1
    where = f" (line {line + 1}, column {col + 1})" if multi else ""
    out = [f"{reason} in pattern text{where}:"]
    first, last = max(0, line - 5), min(len(starts) - 1, line + 5)
    if first > 0:
        out.append("  ...")
    for i in range(first, last + 1):
        shown, caret = _excerpt(_line_text(text, starts, i), col if i == line else 0)
        out.append("  " + shown)
        if i == line:
            # Keep tabs so that the caret lines up under tabbed text.
            pad = "".join(c if c == "\t" else " " for c in shown[:caret])
            out.append("  " + pad + "^")
    if last < len(starts) - 1:
        out.append("  ...")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------


def parse(text: str) -> Pattern:
    """Parse the text form of a pattern (``str(p)``) back into an equal pattern.

    ``text`` follows the grammar of this module's docstring: the vocabulary ``full()``,
    ``causal()``, ``window(before[, after])``, ``dilated_window(before, after, rate)``,
    ``chunks(size)``, ``strided(stride)``, ``dilated(segment, rate[, offset])``,
    ``global_tokens(n)``, ``prefix(n)``, ``documents(name)``, ``heads(p0, p1, ...)``,
    ``segments(lengths, dilations[, offsets])``, ``blocks(size)`` followed by the chained
    methods ``.local(window)``, ``.dilated(rates[, window])``, ``.global_(n)``,
    ``.random(per_row[, seed])``, ``.layout(name)``, ``.causal()``, ``.within(pattern)``;
    the operators ``|``, ``&``, ``-``, ``~`` and parentheses; ``.score(mod, ...)`` on any
    pattern with ``alibi()``, ``softcap(cap)`` and ``bias(name)``. Arguments are
    positional or by the constructors' keyword names; they are int, float or string
    literals, lists of numbers, patterns, or ``None`` for parameters that default to it.

    The text is never evaluated: it is parsed with :func:`ast.parse` and only the grammar
    above is accepted. For every pattern ``p`` whose score modifications are not plain
    Python functions, ``parse(str(p)) == p`` and ``hash(parse(str(p))) == hash(p)``.

    Raises:
        TypeError: ``text`` is not a ``str``.
        PatternSyntaxError: anything else is wrong (syntax, a construct outside the
            grammar, an unknown name or keyword, a wrong number of arguments, an argument
            the constructor rejects, a text longer than :data:`MAX_LENGTH` characters or
            nested deeper than :data:`MAX_DEPTH`). The message quotes the text and points at
            the column.
    """
    if not isinstance(text, str):
        raise TypeError(f"parse(): argument 'text' must be a str, got {type(text).__name__}")
    text = str(text)
    if len(text) > MAX_LENGTH:
        raise PatternSyntaxError(
            f"pattern text too long ({len(text)} characters; the limit is {MAX_LENGTH})",
            text, MAX_LENGTH,
        )
    # Leading whitespace would be an IndentationError for ast; parse from the first
    # non-blank character and shift every position back.
    shift = len(text) - len(text.lstrip(" \t\f\r\n"))
    source = text[shift:]
    if all(_BLANK_LINE.fullmatch(line) for line in _NEWLINE.split(source)):
        raise PatternSyntaxError("empty pattern", text, len(text))
    prescan(text)
    tree = _ast_parse(text, source, shift)
    return _Builder(text, source, shift).top(tree.body)


def prescan(text: str) -> None:
    """Reject nesting the Python parser would choke on (brackets, prefix-operator runs)
    with a message at the first place deeper than :data:`MAX_DEPTH`."""
    depth = run = 0
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in "([{":
            depth += 1
            run = 0
            if depth > MAX_DEPTH:
                raise PatternSyntaxError(
                    f"brackets nested too deeply (more than {MAX_DEPTH} levels)", text, i
                )
        elif c in ")]}":
            depth = max(0, depth - 1)
            run = 0
        elif c in "~-+":
            run += 1
            if run > MAX_DEPTH:
                raise PatternSyntaxError(
                    f"operators nested too deeply (more than {MAX_DEPTH} prefix operators "
                    f"in a row)", text, i,
                )
        elif c in " \t\f\r\n\\":
            pass
        elif not c.isascii():
            raise PatternSyntaxError(
                f"non-ASCII character {c!r} (U+{ord(c):04X}) outside a string: the names of "
                f"the language are ASCII", text, i,
            )
        elif c == "#":
            while i < n and text[i] not in "\r\n":
                i += 1
            continue
        elif c in "'\"":
            run = 0
            quote = c * 3 if text.startswith(c * 3, i) else c
            i += len(quote)
            while i < n and not text.startswith(quote, i):
                if len(quote) == 1 and text[i] in "\r\n":
                    break
                i += 2 if text[i] == "\\" else 1
            i += len(quote)
            continue
        else:
            run = 0
        i += 1


def _ast_parse(text: str, source: str, shift: int) -> ast.Expression:
    try:
        with warnings.catch_warnings():
            # e.g. "invalid decimal literal": the text either parses or fails below.
            warnings.simplefilter("ignore")
            try:
                return ast.parse(source, mode="eval")
            except RecursionError:
                return _deep_ast_parse(source)
    except SyntaxError as err:
        reason = err.msg or "invalid syntax"
        if "<lambda>" in text:
            reason += (
                " (a score modification printed as '<lambda>' is a plain Python function; "
                "plain functions cannot be written in pattern text)"
            )
        raise PatternSyntaxError(reason, text, _syntax_position(err, source, shift)) from None
    except UnicodeError as err:  # lone surrogates cannot be encoded for the parser
        position = shift + getattr(err, "start", 0)
        raise PatternSyntaxError("invalid character (a lone surrogate)", text, position) from None
    except ValueError as err:  # e.g. null bytes on some Python versions
        position = text.find("\0")
        raise PatternSyntaxError(str(err), text, max(position, 0)) from None
    except (MemoryError, RecursionError):
        raise PatternSyntaxError(
            "pattern text too long or too deeply nested for the parser", text, 0
        ) from None


#: Stack of the thread that parses texts whose syntax tree is deeper than the interpreter's
#: recursion limit (a union of thousands of parts is a left-nested chain of that depth).
_DEEP_PARSE_STACK = 256 << 20


def _deep_ast_parse(source: str) -> ast.Expression:
    """``ast.parse(source, mode="eval")`` for a tree deeper than the recursion limit: on a
    thread with a stack of :data:`_DEEP_PARSE_STACK` bytes, with the limit raised to the
    length of the text (no tree is deeper than the text is long; at most
    :data:`MAX_LENGTH`) while it runs. Interpreters whose syntax-tree depth does not follow
    the recursion limit raise ``RecursionError`` still."""
    result: dict[str, Any] = {}

    def work() -> None:
        limit = sys.getrecursionlimit()
        sys.setrecursionlimit(max(limit, len(source) + 1000))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result["tree"] = ast.parse(source, mode="eval")
        except BaseException as err:  # noqa: BLE001 - re-raised on the caller's thread
            result["error"] = err
        finally:
            sys.setrecursionlimit(limit)

    with _DEEP_PARSE_LOCK:
        previous = threading.stack_size(_DEEP_PARSE_STACK)
        try:
            worker = threading.Thread(target=work, name="sparsedsl-parse")
            worker.start()
        finally:
            threading.stack_size(previous)
        worker.join()
    if "error" in result:
        raise result["error"]
    return result["tree"]


_DEEP_PARSE_LOCK = threading.Lock()


def _syntax_position(err: SyntaxError, source: str, shift: int) -> int:
    if "null bytes" in str(err.msg):
        return shift + max(source.find("\0"), 0)
    starts = [0] + [m.end() for m in _NEWLINE.finditer(source)]
    lineno = err.lineno or 0
    if lineno < 1:
        return shift + len(source)
    lineno = min(lineno, len(starts))
    line = _line_text(source, starts, lineno - 1)
    offset = err.offset or 0
    # Python's offset is 1-based in characters; 0 or less means "at the end".
    col = len(line) if offset < 1 else min(offset - 1, len(line))
    return shift + starts[lineno - 1] + col


# ---------------------------------------------------------------------------------------
# The tree walk
# ---------------------------------------------------------------------------------------


class _NoneArg:
    """A literal ``None`` argument, kept with its node until the parameter is known."""

    def __init__(self, node: ast.AST):
        self.node = node


class _Builder:
    def __init__(self, text: str, source: str, shift: int):
        self.text = text
        self.source = source
        self.shift = shift
        self.starts = [0] + [m.end() for m in _NEWLINE.finditer(source)]
        self.depths: dict[int, tuple[Pattern, int]] = {}
        #: Per line: its length, and for a line with non-ASCII characters the character
        #: column of each UTF-8 byte column (made once per line, on first use).
        self.lines: dict[int, tuple[int, list[int] | None]] = {}

    # -- positions ------------------------------------------------------------------
    def _abs(self, lineno: int, col_bytes: int) -> int:
        """Absolute character index into ``text`` of an ast (line, UTF-8 byte column), in
        constant time once the line has been seen."""
        i = max(0, min(lineno - 1, len(self.starts) - 1))
        length, columns = self._line(i)
        col = col_bytes if columns is None else columns[min(col_bytes, len(columns) - 1)]
        return self.shift + self.starts[i] + min(col, length)

    def _line(self, i: int) -> tuple[int, list[int] | None]:
        known = self.lines.get(i)
        if known is None:
            line = _line_text(self.source, self.starts, i)
            columns = None
            if not line.isascii():
                columns = [0]
                for char_index, c in enumerate(line):
                    columns.extend([char_index + 1] * len(c.encode("utf-8", "surrogatepass")))
            known = self.lines[i] = (len(line), columns)
        return known

    def _start(self, node: ast.AST) -> int:
        return self._abs(node.lineno, node.col_offset)

    def _end(self, node: ast.AST) -> int:
        return self._abs(node.end_lineno, node.end_col_offset)

    def _after(self, start: int, end: int | None = None) -> int:
        """The first character at or after ``start`` (before ``end``) that is not blank,
        a closing bracket, a line continuation or a comment."""
        text, i = self.text, start
        end = len(text) if end is None else end
        while i < end:
            c = text[i]
            if c == "#":
                while i < end and text[i] not in "\r\n":
                    i += 1
            elif c in " \t\f\r\n\\)":
                i += 1
            else:
                return i
        return start

    def _operator_position(self, node: ast.BinOp) -> int:
        return self._after(self._end(node.left), self._start(node.right))

    def _attr_position(self, node: ast.Attribute) -> int:
        return max(self._start(node), self._end(node) - len(node.attr))

    def _error(self, reason: str, position: int) -> PatternSyntaxError:
        return PatternSyntaxError(reason, self.text, position)

    # -- depth ----------------------------------------------------------------------
    def _depth(self, p: Pattern) -> int:
        known = self.depths.get(id(p))
        if known is not None and known[0] is p:
            return known[1]
        return 1 + max((self._depth(c) for c in p.children()), default=0)

    def _checked(self, p: Pattern, position: int, operands: tuple = ()) -> Pattern:
        """Record the depth of a newly built pattern; reject it when too deep."""
        if operands and isinstance(p, (Union, Intersection, Sum)):
            # Flattening: operands of the same kind contribute their parts directly.
            depth = max(
                self._depth(o) if isinstance(o, type(p)) else 1 + self._depth(o) for o in operands
            )
        else:
            depth = 1 + max((self._depth(c) for c in p.children()), default=0)
        if depth > MAX_DEPTH:
            raise self._error(f"pattern nested too deeply (more than {MAX_DEPTH} nodes deep)", position)
        self.depths[id(p)] = (p, depth)
        return p

    # -- patterns -------------------------------------------------------------------
    def top(self, node: ast.AST) -> Pattern:
        return self.pattern(node, 1)

    def pattern(self, node: ast.AST, depth: int) -> Pattern:
        if depth > MAX_DEPTH:
            raise self._error(
                f"pattern text nested too deeply (more than {MAX_DEPTH} levels)", self._start(node)
            )
        if isinstance(node, ast.BinOp):
            return self._binop(node, depth)
        if isinstance(node, ast.UnaryOp):
            if isinstance(node.op, ast.Invert):
                inner = self.pattern(node.operand, depth + 1)
                return self._build(lambda: ~inner, "operator '~'", self._start(node))
            symbol = _UNARY_SYMBOLS.get(type(node.op), "?")
            hint = "; use ~ for the complement of a pattern" if symbol == "-" else ""
            raise self._error(
                f"unary operator {symbol!r} not allowed on a pattern{hint}", self._start(node)
            )
        if isinstance(node, ast.Call):
            return self._call(node, depth)
        if isinstance(node, ast.Name):
            raise self._name_error(node)
        if isinstance(node, ast.Constant):
            raise self._error(f"expected a pattern, got {_describe_constant(node.value)}", self._start(node))
        if isinstance(node, ast.List):
            raise self._error("expected a pattern, got a list", self._start(node))
        raise self._not_allowed(node)

    def _binop(self, node: ast.BinOp, depth: int) -> Pattern:
        # Walk the left spine iteratively: ``a | b | c | ...`` is left-nested in the ast.
        spine = []
        cur: ast.AST = node
        while isinstance(cur, ast.BinOp):
            spine.append(cur)
            cur = cur.left
        value = self.pattern(cur, depth + 1)
        for binop in reversed(spine):
            position = self._operator_position(binop)
            symbol = _BINOP_SYMBOLS.get(type(binop.op), "?")
            if symbol not in ("|", "&", "-", "+"):
                raise self._error(
                    f"operator {symbol!r} not allowed (patterns combine with |, &, -, + and ~)", position
                )
            right = self.pattern(binop.right, depth + 1)
            left = value
            if symbol == "|":
                value = self._build(lambda: left | right, "operator '|'", position, (left, right))
            elif symbol == "&":
                value = self._build(lambda: left & right, "operator '&'", position, (left, right))
            elif symbol == "+":
                value = self._build(lambda: left + right, "operator '+'", position, (left, right))
            else:
                value = self._build(lambda: left - right, "operator '-'", position)
        return value

    def _build(self, make: Callable[[], Any], where: str, position: int, operands: tuple = ()):
        """Call a constructor; its validation errors become PatternSyntaxError here."""
        try:
            value = make()
        except PatternSyntaxError:
            raise
        except PatternArgumentError as err:
            raise self._error(str(err), position) from err
        except (ValueError, TypeError, OverflowError) as err:
            raise self._error(f"{where}: {err}", position) from err
        if isinstance(value, Pattern):
            value = self._checked(value, position, operands)
        return value

    def _call(self, node: ast.Call, depth: int) -> Pattern:
        func = node.func
        if isinstance(func, ast.Name):
            name = func.id
            if name in _PATTERN_FUNCS:
                return self._invoke(node, name, _PATTERN_FUNCS[name], _SIGNATURES[name], depth,
                                    self._start(func))
            if name in _MOD_FUNCS:
                raise self._error(
                    f"{name}() is a score modification, not a pattern; use it inside "
                    f".score(...), e.g. full().score({name}(...))", self._start(func),
                )
            raise self._name_error(func)
        if isinstance(func, ast.Attribute):
            return self._chain(node, depth)
        raise self._error(
            f"cannot call a {_NOT_ALLOWED.get(type(func), 'non-name expression')}: only the "
            f"names of the pattern vocabulary can be called", self._start(func),
        )

    def _chain(self, node: ast.Call, depth: int) -> Pattern:
        """``base.m1(...).m2(...)...``: the base, then each method in order."""
        calls = []
        cur: ast.AST = node
        while isinstance(cur, ast.Call) and isinstance(cur.func, ast.Attribute):
            calls.append(cur)
            cur = cur.func.value
        value = self.pattern(cur, depth)
        for call in reversed(calls):
            attr = call.func
            name = attr.attr
            position = self._attr_position(attr)
            if name == "score":
                value = self._invoke(call, ".score", getattr(value, "score"),
                                     _METHOD_SIGNATURES["score"], depth, position, scores=True)
                continue
            if name == "starting_at":
                value = self._invoke(call, ".starting_at", value.starting_at,
                                     _METHOD_SIGNATURES["starting_at"], depth, position)
                continue
            if name == "within" and isinstance(value, nodes.Documents):
                value = self._invoke(call, "documents().within", value.within,
                                     _DOCUMENT_WITHIN_SIGNATURE, depth, position)
                continue
            if name not in _BLOCK_METHODS:
                raise self._error(
                    f"unknown method '.{name}()' (the methods are .score() on any pattern "
                    f"and {', '.join('.' + m + '()' for m in _BLOCK_METHODS)} on blocks(...))",
                    position,
                )
            if not isinstance(value, Blocks):
                shown = str(value)
                shown = shown if len(shown) <= 60 else shown[:57] + "..."
                raise self._error(
                    f"method '.{name}()' applies only to a blocks(...) pattern, not to {shown}",
                    position,
                )
            value = self._invoke(call, f"blocks().{name}", getattr(value, name),
                                 _METHOD_SIGNATURES[name], depth, position)
        return value

    def _invoke(self, node: ast.Call, where: str, func: Callable, sig: inspect.Signature,
                depth: int, position: int, *, scores: bool = False):
        """Evaluate the arguments of ``node``, bind them to ``sig`` and call ``func``."""
        label = where if where.endswith(")") else f"{where}()"
        args = []
        for arg in node.args:
            if isinstance(arg, ast.Starred):
                raise self._error("star unpacking '*' not allowed", self._start(arg))
            args.append(self._score_mod(arg) if scores else self.argument(arg, depth + 1))
        kwargs = {}
        for kw in node.keywords:
            if kw.arg is None:
                raise self._error("keyword unpacking '**' not allowed", self._start(kw))
            if kw.arg in kwargs:
                raise self._error(f"keyword argument repeated: {kw.arg!r}", self._start(kw))
            param = sig.parameters.get(kw.arg)
            if param is None or param.kind not in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY):
                names = [p.name for p in sig.parameters.values()
                         if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
                accepted = f"its keywords are {', '.join(names)}" if names else "it takes no keywords"
                raise self._error(
                    f"{label} got an unexpected keyword argument {kw.arg!r} ({accepted})",
                    self._start(kw),
                )
            kwargs[kw.arg] = self._score_mod(kw.value) if scores else self.argument(kw.value, depth + 1)
        try:
            bound = sig.bind(*args, **kwargs)
        except TypeError as err:
            raise self._error(f"{label}: {err} (expected {label[:-2]}({_params(sig)}))", position) from None
        for pname, value in list(bound.arguments.items()):
            param = sig.parameters[pname]
            values = value if param.kind == param.VAR_POSITIONAL else (value,)
            for v in values:
                if isinstance(v, _NoneArg):
                    if param.kind == param.VAR_POSITIONAL or param.default is not None:
                        raise self._error(
                            f"{label}: None not allowed for argument {pname!r}", self._start(v.node)
                        )
                    bound.arguments[pname] = None
        return self._build(lambda: func(*bound.args, **bound.kwargs), label, position)

    # -- arguments ------------------------------------------------------------------
    def argument(self, node: ast.AST, depth: int):
        """A call argument: a literal, a list of numbers, ``None`` or a pattern."""
        if isinstance(node, ast.Constant):
            value = node.value
            if value is None:
                return _NoneArg(node)
            if isinstance(value, str) or _is_number(value):
                return value
            raise self._error(f"{_describe_constant(value)} not allowed as an argument", self._start(node))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return self._number(node)
        if isinstance(node, ast.BinOp) and (
                _BINOP_SYMBOLS.get(type(node.op)) not in ("|", "&", "-", "+")
                or _is_number_literal(node.left) or _is_number_literal(node.right)):
            symbol = _BINOP_SYMBOLS.get(type(node.op), "?")
            raise self._error(
                f"operator {symbol!r} not allowed in an argument (arguments are literals: write "
                f"the value as one number, e.g. 1024 for 2**10)", self._operator_position(node),
            )
        if isinstance(node, ast.List):
            return [self._number(elt) for elt in node.elts]
        if isinstance(node, ast.Name) and node.id not in _VOCABULARY:
            raise self._error(
                f"unknown name {node.id!r} (arguments are numbers, 'strings', [lists of "
                f"integers] or patterns)", self._start(node),
            )
        return self.pattern(node, depth)

    def _number(self, node: ast.AST):
        """An int or float literal, possibly with one leading '-'."""
        negative = False
        inner = node
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            negative, inner = True, node.operand
        if isinstance(inner, ast.Constant) and _is_number(inner.value):
            return -inner.value if negative else inner.value
        if negative:
            raise self._error("unary '-' applies only to number literals", self._start(node))
        if isinstance(node, ast.Starred):
            raise self._error("star unpacking '*' not allowed", self._start(node))
        raise self._error("list elements must be integer literals", self._start(node))

    def _score_mod(self, node: ast.AST) -> ScoreMod:
        """An argument of ``.score(...)``: ``alibi()``, ``softcap(c)`` or ``bias(name)``."""
        mods = "alibi(), softcap(c) or bias('name')"
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            name = node.func.id
            if name in _MOD_FUNCS:
                return self._invoke(node, name, _MOD_FUNCS[name], _SIGNATURES[name], 1,
                                    self._start(node.func))
            if name in _PATTERN_FUNCS:
                raise self._error(
                    f"{name}() is a pattern, not a score modification; .score() takes {mods}",
                    self._start(node.func),
                )
            raise self._name_error(node.func)
        if isinstance(node, ast.Name):
            if node.id in _MOD_FUNCS:
                raise self._error(f"{node.id!r} must be called: {node.id}(...)", self._start(node))
            raise self._error(
                f"{node.id!r} is not a score modification of the language: plain Python "
                f"functions cannot be written in pattern text (use {mods}, or build the "
                f"pattern in Python)", self._start(node),
            )
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            raise self._error(
                f"{node.value!r} names a plain Python function: plain Python functions cannot be "
                f"written in pattern text (use {mods}, or build the pattern in Python)", self._start(node),
            )
        if isinstance(node, ast.Constant):
            raise self._error(
                f"expected a score modification ({mods}), got {_describe_constant(node.value)}",
                self._start(node),
            )
        if type(node) in _NOT_ALLOWED:
            raise self._not_allowed(node)
        raise self._error(f"expected a score modification ({mods})", self._start(node))

    # -- errors ---------------------------------------------------------------------
    def _name_error(self, node: ast.Name) -> PatternSyntaxError:
        name = node.id
        if name in _VOCABULARY:
            return self._error(f"{name!r} must be called: {name}(...)", self._start(node))
        return self._error(f"unknown name {name!r}", self._start(node))

    def _not_allowed(self, node: ast.AST) -> PatternSyntaxError:
        what = _NOT_ALLOWED.get(type(node), type(node).__name__)
        if isinstance(node, ast.Attribute):
            return self._error(
                f"attribute access '.{node.attr}' not allowed (only method calls of the "
                f"language)", self._attr_position(node),
            )
        if isinstance(node, ast.Subscript):
            return self._error("subscript '[...]' not allowed", self._after(self._end(node.value)))
        return self._error(f"{what} not allowed", self._start(node))


def _params(sig: inspect.Signature) -> str:
    """``before, after=None`` for an error message (no annotations)."""
    out = []
    for p in sig.parameters.values():
        if p.kind == p.VAR_POSITIONAL:
            out.append(f"*{p.name}")
        elif p.default is p.empty:
            out.append(p.name)
        else:
            out.append(f"{p.name}={p.default!r}")
    return ", ".join(out)


def _is_number_literal(node: ast.AST) -> bool:
    """Whether ``node`` is a number literal, possibly negated or part of arithmetic."""
    while isinstance(node, (ast.UnaryOp, ast.BinOp)):
        node = node.operand if isinstance(node, ast.UnaryOp) else node.left
    return isinstance(node, ast.Constant) and _is_number(node.value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _describe_constant(value: Any) -> str:
    if isinstance(value, bool) or value is None or value is Ellipsis:
        return repr(value)
    if isinstance(value, int) and value.bit_length() > 128:
        return "a large integer"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    if isinstance(value, str):
        shown = repr(value) if len(value) <= 40 else repr(value[:40]) + "..."
        return f"the string {shown}"
    if isinstance(value, bytes):
        return "a bytes literal"
    return f"a {type(value).__name__} literal"
