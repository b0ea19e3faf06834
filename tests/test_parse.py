"""The text form: ``parse(str(p)) == p``, and every bad text is a PatternSyntaxError that
quotes the text and points at the column."""

from __future__ import annotations

import pickle

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparsedsl.lang.checks import PatternArgumentError
from sparsedsl.lang.nodes import (
    Pattern,
    alibi,
    bias,
    blocks,
    causal,
    chunks,
    dilated,
    dilated_window,
    documents,
    full,
    global_tokens,
    heads,
    prefix,
    segments,
    softcap,
    strided,
    window,
)
from sparsedsl.lang.parse import MAX_DEPTH, MAX_LENGTH, PatternSyntaxError, parse


def assert_round_trip(p: Pattern) -> None:
    text = str(p)
    q = parse(text)
    assert q == p, (text, str(q))
    assert hash(q) == hash(p), text
    assert str(q) == text


def caret_column(message: str) -> int:
    """1-based column of the caret line's '^' relative to the quoted text (2-space indent)."""
    caret_lines = [ln for ln in message.splitlines() if ln.strip() == "^"]
    assert len(caret_lines) == 1, message
    return caret_lines[0].index("^") - 2 + 1


def rejected(text: str) -> PatternSyntaxError:
    with pytest.raises(PatternSyntaxError) as info:
        parse(text)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.text == text
    msg = str(err)
    assert "in pattern text" in msg
    if len(text) <= 200 and "\n" not in text:
        assert "  " + text in msg.splitlines()
        assert caret_column(msg) == err.column
    # Whatever excerpt is shown, the caret sits under the character at err.position.
    lines = msg.splitlines()
    at = [i for i, ln in enumerate(lines) if ln.strip() == "^"][0]
    shown, caret = lines[at - 1], lines[at].index("^")
    if err.position < len(text) and text[err.position] not in "\r\n":
        assert shown[caret] == text[err.position], msg
    return err


# ---------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------

a, b, c, d = window(3), causal(), chunks(16), strided(4)

HAND_WRITTEN = [
    # primitives
    full(),
    causal(),
    window(0),
    window(3),
    window(3, 2),
    window(0, 5),
    window(2**31 - 1),
    dilated_window(4, 2, 2),
    chunks(64),
    strided(8),
    dilated(64, 4),
    dilated(64, 4, 3),
    global_tokens(16),
    prefix(5),
    documents("doc_ids"),
    segments([128, 128], [1, 2]),
    segments([64, 128, 256], [1, 2, 4]),
    segments([64, 64], [2, 2], [1, 0]),
    segments([64], [4], [3]),
    # every block method
    blocks(64),
    blocks(64).local(1),
    blocks(64).local(0),
    blocks(64).dilated([1, 2]),
    blocks(64).dilated(3),
    blocks(64).dilated([2, 4], window=3),
    blocks(64).global_(2),
    blocks(64).random(2, 7),
    blocks(64).random(3),
    blocks(64).layout("lay"),
    blocks(64).causal(),
    blocks(64).causal().local(2),
    blocks(64).within(window(3)),
    blocks(256).local(3).within(segments([128, 128], [1, 2])),
    blocks(64).local(1).dilated([1, 2], window=4).global_(1).random(2, 7).layout("lay").causal().within(
        causal() | dilated(64, 2, 1)
    ),
    blocks(8).within(blocks(2).local(1)),
    # heads
    heads(window(2), causal()),
    heads(window(2) | global_tokens(1), blocks(4).local(1), ~causal()),
    heads(heads(full(), causal()), segments([8], [2])),
    # combinators
    a | b,
    a | b | c,
    a | (b | c),
    a & b,
    a & (b & c) & d,
    a - b,
    a - b - c,
    a - (b - c),
    (a - b) - (c - d),
    ~a,
    ~~a,
    ~~~a,
    ~(a | b),
    ~(a & b),
    ~(a - b),
    ~a - ~b,
    (a | b) & c,
    a | b & c,
    (a | b) & (c | d),
    a & b | c & d,
    (a | b) - c,
    a - (b | c),
    a - (b & c),
    (a & b) - c,
    a & (b - c),
    a | (b - c),
    ~(a | b) & ~(c & d) | (a - ~d),
    blocks(4).local(1) | window(2),
    ~blocks(4).local(1),
    heads(a, b) & c,
    # score modifications
    full().score(alibi()),
    (window(3) | causal()).score(alibi()),
    (window(3) | causal()).score(alibi()).score(softcap(30.0)),
    causal().score(softcap(30)),
    causal().score(softcap(0.5)),
    causal().score(softcap(1e-05)),
    causal().score(softcap(1e300)),
    causal().score(bias("rel_pos")),
    causal().score(alibi(), softcap(50.0), bias("b")),
    (~causal()).score(alibi()),
    (a - b).score(alibi()),
    blocks(64).local(1).causal().score(softcap(20.0)),
    heads(a, b).score(bias("bb")),
    segments([64, 64], [1, 2]).score(alibi()),
]


@pytest.mark.parametrize("p", HAND_WRITTEN, ids=[str(p) for p in HAND_WRITTEN])
def test_round_trip_hand_written(p):
    assert_round_trip(p)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("window(before=3, after=2)", window(3, 2)),
        ("window(3, after=2)", window(3, 2)),
        ("window(before=3)", window(3)),
        ("window(3, None)", window(3)),
        ("dilated_window(before=4, after=2, rate=2)", dilated_window(4, 2, 2)),
        ("chunks(size=8)", chunks(8)),
        ("strided(stride=8)", strided(8)),
        ("dilated(segment=64, rate=4, offset=1)", dilated(64, 4, 1)),
        ("global_tokens(n=2)", global_tokens(2)),
        ("prefix(n=2)", prefix(2)),
        ('documents(name="ids")', documents("ids")),
        ("blocks(size=64)", blocks(64)),
        ("blocks(64).local(window=1)", blocks(64).local(1)),
        ("blocks(64).dilated(rates=[1, 2], window=3)", blocks(64).dilated([1, 2], window=3)),
        ("blocks(64).dilated([1, 2], None)", blocks(64).dilated([1, 2])),
        ("blocks(64).global_(n=1)", blocks(64).global_(1)),
        ("blocks(64).random(per_row=2, seed=7)", blocks(64).random(2, 7)),
        ("blocks(64).layout(name='lay')", blocks(64).layout("lay")),
        ("blocks(64).within(rule=causal())", blocks(64).within(causal())),
        ("segments(lengths=[8, 16], dilations=[1, 2])", segments([8, 16], [1, 2])),
        ("segments([8, 16], [1, 2], offsets=[0, 1])", segments([8, 16], [1, 2], [0, 1])),
        ("segments([8, 16], [1, 2], None)", segments([8, 16], [1, 2])),
        ("full().score(softcap(cap=30))", full().score(softcap(30.0))),
        ("full().score(bias(name='b'))", full().score(bias("b"))),
        # layout and spelling freedom
        ("  window( 3 ,2, )  # trailing comment", window(3, 2)),
        ("\n(window(3)\n | causal())\n", window(3) | causal()),
        ("((window(3)))", window(3)),
        ("(blocks(4)).local(1)", blocks(4).local(1)),
        ("window(0x10)", window(16)),
        ("window(1_000)", window(1000)),
        ("full().score(softcap(3e1))", full().score(softcap(30.0))),
        ("full().score(alibi()).score(softcap(30), bias('b'))",
         full().score(alibi(), softcap(30.0), bias("b"))),
        ("window(3) | (causal() | chunks(16))", window(3) | causal() | chunks(16)),
        ("documents('é')", documents("é")),
    ],
)
def test_accepted_spellings(text, expected):
    p = parse(text)
    assert p == expected
    assert hash(p) == hash(expected)


def test_union_flattening_is_preserved():
    left = parse("(window(1) | window(2)) | window(3)")
    right = parse("window(1) | (window(2) | window(3))")
    assert left == right == window(1) | window(2) | window(3)
    assert len(left.parts) == 3


def test_long_flat_union_round_trips():
    p = window(0)
    for i in range(1, 300):
        p = p | window(i)
    assert_round_trip(p)


def test_depth_limit_is_inclusive():
    p = full()
    for _ in range(MAX_DEPTH - 1):
        p = ~p
    assert_round_trip(p)  # exactly MAX_DEPTH nodes deep
    err = rejected("~" * MAX_DEPTH + "full()")
    assert "too deep" in err.reason


# ---------------------------------------------------------------------------------------
# Random patterns from the constructors
# ---------------------------------------------------------------------------------------

small = st.integers(min_value=0, max_value=6)
positive = st.integers(min_value=1, max_value=6)
names = st.sampled_from(["ids", "doc", "b2"])


@st.composite
def dilated_args(draw):
    segment = draw(positive)
    rate = draw(st.integers(1, segment))
    return segment, rate, draw(st.integers(0, rate - 1))


@st.composite
def segments_st(draw):
    n = draw(st.integers(1, 3))
    triples = [draw(dilated_args()) for _ in range(n)]
    lengths, dilations, offsets = zip(*triples)
    if draw(st.booleans()):
        return segments(list(lengths), list(dilations))
    return segments(list(lengths), list(dilations), list(offsets))


@st.composite
def blocks_st(draw, within=None):
    p = blocks(draw(positive))
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["local", "dilated", "dilated_w", "global_", "random", "layout", "causal"]))
        if kind == "local":
            p = p.local(draw(small))
        elif kind == "dilated":
            p = p.dilated(draw(st.lists(positive, min_size=1, max_size=3)))
        elif kind == "dilated_w":
            p = p.dilated(draw(st.lists(positive, min_size=1, max_size=3)), window=draw(small))
        elif kind == "global_":
            p = p.global_(draw(positive))
        elif kind == "random":
            p = p.random(draw(positive), draw(small))
        elif kind == "layout":
            p = p.layout(draw(names))
        else:
            p = p.causal()
    if within is not None and draw(st.booleans()):
        rule = draw(within)
        if not rule.buffer_names():
            p = p.within(rule)
    return p


leaves = st.one_of(
    st.just(full()),
    st.just(causal()),
    st.builds(window, small),
    st.builds(window, small, small),
    st.builds(dilated_window, small, small, positive),
    st.builds(chunks, positive),
    st.builds(strided, positive),
    dilated_args().map(lambda t: dilated(*t)),
    st.builds(global_tokens, positive),
    st.builds(prefix, positive),
    st.builds(documents, names),
    segments_st(),
    blocks_st(),
)


def _extend(children):
    return st.one_of(
        st.tuples(children, children).map(lambda t: t[0] | t[1]),
        st.tuples(children, children).map(lambda t: t[0] & t[1]),
        st.tuples(children, children).map(lambda t: t[0] - t[1]),
        children.map(lambda p: ~p),
        st.lists(children, min_size=1, max_size=3).map(lambda ps: heads(*ps)),
        blocks_st(within=children),
    )


patterns = st.recursive(leaves, _extend, max_leaves=8)

mods = st.one_of(
    st.just(alibi()),
    st.floats(min_value=1e-3, max_value=1e6, allow_nan=False, allow_infinity=False).map(softcap),
    st.integers(1, 100).map(softcap),
    names.map(bias),
)


@st.composite
def scored_patterns(draw):
    p = draw(patterns)
    for _ in range(draw(st.integers(0, 2))):
        p = p.score(*draw(st.lists(mods, min_size=1, max_size=2)))
    return p


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scored_patterns())
def test_round_trip_random(p):
    assert_round_trip(p)


# ---------------------------------------------------------------------------------------
# Rejections
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, column, fragment",
    [
        ("__import__('os')", 1, "unknown name '__import__'"),
        ("window(3).__class__", 11, "attribute access"),
        ("(lambda: 1)()", 2, "lambda"),
        ("lambda: full()", 1, "lambda"),
        ("[x for x in y]", 1, "comprehension"),
        ("foo(1)", 1, "unknown name 'foo'"),
        ("window(3) | foo(2)", 13, "unknown name 'foo'"),
        ("window(1)[0]", 10, "subscript"),
        ("window(x)", 8, "unknown name 'x'"),
        ("blocks(4).local(1).mro()", 20, "unknown method '.mro()'"),
        ("blocks(4)._with_rule(1)", 11, "unknown method"),
        ("window(3).local(1)", 11, "applies only to a blocks(...)"),
        ("window(-1)", 1, "window(): argument 'before'"),
        ("window(3, -2)", 1, "window(): argument 'after'"),
        ("dilated(64, 3, 5)", 1, "dilated(): argument 'offset'"),
        ("blocks(0)", 1, "blocks(): argument 'size'"),
        ("blocks(4).random(0, 1)", 11, "blocks().random(): argument 'per_row'"),
        ("segments([8, 8], [1])", 1, "segments()"),
        ("segments([], [])", 1, "segments()"),
        ("blocks(4).within(documents('d'))", 11, "call-time tensors"),
        ("blocks(4).within(full()).local(1)", 26, "call .within(...) last"),
        ("window(3.0)", 1, "must be an integer"),
        ("window('3')", 1, "must be an integer"),
        ("documents('not a name')", 1, "identifier"),
        ("window(True)", 8, "True"),
        ("window(None)", 8, "None not allowed"),
        ("heads(full(), None)", 15, "None not allowed"),
        ("documents(b'ids')", 11, "bytes"),
        ("documents(f'ids')", 11, "f-string"),
        ("window(1 + 2)", 10, "operator '+' not allowed in an argument"),
        ("window(10**100)", 10, "operator '**' not allowed in an argument"),
        ("window(1, 2, 3)", 1, "too many positional arguments"),
        ("window()", 1, "missing a required argument"),
        ("window(before=1, width=2)", 18, "unexpected keyword argument 'width'"),
        ("window(*[1])", 8, "star unpacking"),
        ("window(**{'before': 1})", 8, "'**'"),
        ("full(1)", 1, "too many positional arguments"),
        ("full", 1, "must be called"),
        ("full() | window", 10, "must be called"),
        ("3", 1, "expected a pattern"),
        ("'full()'", 1, "expected a pattern"),
        ("full() | 3", 10, "expected a pattern"),
        ("full() + causal().score(alibi())", 8, "operator '+'"),
        ("full() ^ causal()", 8, "operator '^'"),
        ("full() | causal() * full()", 19, "operator '*'"),
        ("-full()", 1, "use ~"),
        ("not full()", 1, "'not'"),
        ("--1", 1, "use ~"),
        ("window(--1)", 8, "unary '-'"),
        ("window(-full())", 8, "unary '-'"),
        ("segments([8, x], [1, 1])", 14, "list elements"),
        ("segments([8, [1]], [1, 1])", 14, "list elements"),
        ("full() if 1 else causal()", 1, "conditional"),
        ("full() or causal()", 1, "'and'/'or'"),
        ("(full(), causal())", 1, "tuple"),
        ("full() == causal()", 1, "comparison"),
        ("{full()}", 1, "set"),
        ("(x := full())", 2, ":="),
        ("alibi()", 1, "score modification"),
        ("full() | softcap(3)", 10, "score modification"),
        ("full().score()", 8, "at least one score modification"),
        ("full().score(window(3))", 14, "is a pattern, not a score modification"),
        ("full().score(alibi)", 14, "must be called"),
        ("full().score(3)", 14, "expected a score modification"),
        ("full().score(softcap(-1.0))", 14, "softcap(): argument 'cap'"),
        ("full().score(softcap(1e999))", 14, "finite"),
        ("full().score(softcap(True))", 22, "True"),
        ("full().score(alibi()) | causal()", 23, "score modifications"),
        ("~full().score(alibi())", 1, "score modifications"),
        ("heads(full().score(alibi()))", 1, "heads()"),
        ("blocks(4).score(alibi()).local(1)", 26, "applies only to a blocks(...)"),
        ("(full() | causal()).local(1)", 21, "applies only to a blocks(...)"),
        ("full().score(my_score_fn)", 14, "plain Python functions cannot be written"),
        ("full().score(<lambda>)", 14, "plain Python function"),
        ("window(3", 7, "never closed"),
        ("window(3))", 10, "unmatched ')'"),
        ("(window(3) | causal()", 1, "never closed"),
        ("window(3) |", 12, "invalid syntax"),
        ("window(3) causal()", 11, "invalid syntax"),
        ("window(before=1, before=2)", 18, "repeated"),
        ("", 1, "empty"),
        ("   ", 4, "empty"),
        ("# only a comment", 17, "empty"),
        ("  foo(1)", 3, "unknown name 'foo'"),
        ("\tfoo(1)", 2, "unknown name 'foo'"),
        ("documents('é') | foo(1)", 18, "unknown name 'foo'"),
        ("window(" + "9" * 30 + ")", 1, "at most 2**31 - 1"),
        ("full().score(softcap(" + "9" * 400 + "))", 14, "softcap()"),
    ],
)
def test_rejected(text, column, fragment):
    err = rejected(text)
    assert fragment in str(err), str(err)
    assert err.column == column, str(err)
    assert err.line == 1


def test_constructor_errors_are_chained():
    err = rejected("window(-1)")
    assert isinstance(err.__cause__, PatternArgumentError)
    assert str(err.__cause__) in str(err)


def test_error_carries_position_and_pickles():
    err = rejected("window(3) | foo(2)")
    assert (err.text, err.line, err.column, err.position) == ("window(3) | foo(2)", 1, 13, 12)
    assert err.reason == "unknown name 'foo'"
    assert str(err) == (
        "unknown name 'foo' in pattern text:\n"
        "  window(3) | foo(2)\n"
        "              ^"
    )
    again = pickle.loads(pickle.dumps(err))
    assert str(again) == str(err) and again.column == 13


def test_multiline_error_points_at_line_and_column():
    text = "(window(3)\n | foo(2))"
    err = rejected(text)
    assert (err.line, err.column) == (2, 4)
    lines = str(err).splitlines()
    assert lines[0] == "unknown name 'foo' in pattern text (line 2, column 4):"
    assert lines[1:] == ["  (window(3)", "   | foo(2))", "     ^"]


def test_non_str_input():
    for bad in (None, 3, b"full()", full()):
        with pytest.raises(TypeError, match="argument 'text'"):
            parse(bad)


def test_function_mod_is_rejected():
    def my_scores(score, b, h, q, k):
        return score

    p = causal().score(my_scores)
    err = rejected(str(p))
    assert "my_scores" in str(err)
    assert "plain Python functions cannot be written" in str(err)
    assert err.column == len("causal().score(") + 1

    q = causal().score(alibi(), lambda s, b, h, q, k: s)
    err = rejected(str(q))
    assert "plain Python function" in str(err)


def _long_rejected(text: str, column: int, fragment: str) -> None:
    err = rejected(text)
    msg = str(err)
    assert fragment in msg
    assert err.column == column
    assert text[: min(column, 100)] in msg  # a prefix of the text is quoted
    assert caret_column(msg) == column  # the excerpt starts at the beginning of the line
    assert len(msg) < 2000


def test_deep_tilde():
    _long_rejected("~" * 10000 + "full()", MAX_DEPTH + 1, "too deep")


def test_deep_parentheses():
    _long_rejected("(" * 5000 + "full()" + ")" * 5000, MAX_DEPTH + 1, "too deep")


def test_deep_minus():
    _long_rejected("window(" + "-" * 10000 + "1)", len("window(") + MAX_DEPTH + 1, "too deep")


def test_deep_heads():
    text = "heads(" * 150 + "full()" + ")" * 150
    err = rejected(text)
    assert "too deep" in err.reason
    assert err.column == len("heads(") * (MAX_DEPTH + 1)  # the 101st open bracket
    assert "heads(heads(" in str(err) and len(str(err)) < 2000


def test_huge_integer_literal():
    err = rejected("window(" + "9" * 5000 + ")")
    assert "digits" in err.reason
    assert len(str(err)) < 2000


def test_deep_pattern_from_difference_chain():
    text = " - ".join(["full()"] * (MAX_DEPTH + 5))
    err = rejected(text)
    assert "too deep" in err.reason
    assert text[err.position] == "-"


def test_deep_syntax_without_brackets_limit():
    # 60 nested complements of parenthesised unions: brackets 60 deep, syntax 120 deep.
    text = "~(full() | " * 60 + "full()" + ")" * 60
    err = rejected(text)
    assert "too deep" in err.reason


def test_parser_limits_become_syntax_errors():
    for text in (
        " | ".join(["full()"] * 12000),
        "not " * 10000 + "full()",
        "full() if full() else " * 4000 + "full()",
        "1 ** " * 8000 + "1",
    ):
        with pytest.raises(PatternSyntaxError) as info:
            parse(text)
        assert text[:50] in str(info.value)


def test_text_length_limit():
    text = "full()" + " " * MAX_LENGTH
    err = rejected(text)
    assert "too long" in err.reason
    assert len(str(err)) < 2000


def test_unicode_and_control_characters():
    for text in ("full() | \ud800", "full()\0", "full() | é(1)", "window(３)"):
        with pytest.raises(PatternSyntaxError):
            parse(text)


# ---------------------------------------------------------------------------------------
# Fuzzing: a Pattern or a PatternSyntaxError, never anything else
# ---------------------------------------------------------------------------------------

TOKENS = [
    "full()", "causal()", "window(", "dilated_window(", "chunks(", "strided(", "dilated(",
    "global_tokens(", "prefix(", "documents(", "blocks(", "heads(", "segments(", ".local(",
    ".dilated(", ".global_(", ".random(", ".layout(", ".causal()", ".within(", ".score(",
    "alibi()", "softcap(", "bias(", "(", ")", "[", "]", ",", "|", "&", "-", "~", "+", "*",
    "0", "1", "3", "-1", "2.5", "30.0", "1e999", "99999999999", "'ids'", '"x"', "'a b'",
    "None", "True", "=", "before=", "window=", "seed=", "rates=", "__class__", ".", "lambda",
    "x", ":", " ", "\n", "\t", "#", "'", '"', "é", "\\", "0x1f", "**", "f'", "b'", "[1, 2]",
    "not ", " if ", " else ", "==", ":=", "{", "}", "\0",
]


def _parse_or_error(text: str) -> None:
    try:
        p = parse(text)
    except PatternSyntaxError as err:
        assert err.text == text
        assert "^" in str(err)
        assert 1 <= err.column
    else:
        assert isinstance(p, Pattern)
        hash(p)
        if "<" not in str(p):
            assert parse(str(p)) == p


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=60))
def test_fuzz_random_text(text):
    _parse_or_error(text)


@settings(max_examples=1000, deadline=None)
@given(st.lists(st.sampled_from(TOKENS), max_size=25).map("".join))
def test_fuzz_token_soup(text):
    _parse_or_error(text)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scored_patterns(), st.data())
def test_fuzz_mutated_pattern_text(p, data):
    text = str(p)
    i = data.draw(st.integers(0, len(text)))
    j = data.draw(st.integers(i, min(len(text), i + 5)))
    text = text[:i] + data.draw(st.sampled_from(TOKENS + [""])) + text[j:]
    _parse_or_error(text)
