"""The language itself: constructor validation, structural equality and hashing,
immutability, the text form and ``buffer_names()``."""

from __future__ import annotations

import copy
import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings

import sparsedsl
from sparsedsl import (
    PatternArgumentError,
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

from strategies import min_heads, patterns

# ---------------------------------------------------------------------------------------
# Validation: each bad argument raises PatternArgumentError naming the argument and value
# ---------------------------------------------------------------------------------------

SCORED = causal().score(alibi())

# (id, thunk, substrings the message must contain)
BAD_ARGUMENTS = [
    ("window(-1)", lambda: window(-1), ["window()", "'before'", "-1"]),
    ("window(3, -2)", lambda: window(3, -2), ["window()", "'after'", "-2"]),
    ("window(2.5)", lambda: window(2.5), ["window()", "'before'", "integer", "2.5"]),
    ("window(True)", lambda: window(True), ["window()", "'before'", "integer", "True"]),
    ("window('3')", lambda: window("3"), ["window()", "'before'", "integer", "'3'"]),
    ("window(None)", lambda: window(None), ["window()", "'before'", "None"]),
    ("window(2**31)", lambda: window(2**31), ["window()", "'before'", "2147483647", "2147483648"]),
    ("window(1, 2**40)", lambda: window(1, 2**40), ["'after'", str(2**40)]),
    ("blocks(0)", lambda: blocks(0), ["blocks()", "'size'", "0"]),
    ("blocks(-3)", lambda: blocks(-3), ["blocks()", "'size'", "-3"]),
    ("blocks(2**31)", lambda: blocks(2**31), ["blocks()", "'size'", "2147483648"]),
    ("blocks(4.0)", lambda: blocks(4.0), ["blocks()", "'size'", "4.0"]),
    ("dilated(64, 3, 5)", lambda: dilated(64, 3, 5), ["dilated()", "'offset'", "5", "3"]),
    ("dilated(4, 8)", lambda: dilated(4, 8), ["dilated()", "'rate'", "8", "4"]),
    ("dilated(4, 2, -1)", lambda: dilated(4, 2, -1), ["dilated()", "'offset'", "-1"]),
    ("dilated(0, 1)", lambda: dilated(0, 1), ["dilated()", "'segment'", "0"]),
    ("dilated_window(1, 1, 0)", lambda: dilated_window(1, 1, 0), ["dilated_window()", "'rate'", "0"]),
    ("dilated_window(-1, 1, 2)", lambda: dilated_window(-1, 1, 2), ["dilated_window()", "'before'", "-1"]),
    ("chunks(0)", lambda: chunks(0), ["chunks()", "'size'", "0"]),
    ("strided(0)", lambda: strided(0), ["strided()", "'stride'", "0"]),
    ("global_tokens(0)", lambda: global_tokens(0), ["global_tokens()", "'n'", "0"]),
    ("prefix(-2)", lambda: prefix(-2), ["prefix()", "'n'", "-2"]),
    ("segments lengths/dilations mismatch", lambda: segments([128, 128], [1]),
     ["segments()", "'lengths'", "'dilations'", "[128, 128]", "[1]"]),
    ("segments offsets mismatch", lambda: segments([4, 4], [1, 2], [0]),
     ["segments()", "'offsets'", "[0]"]),
    ("segments rate > length", lambda: segments([4, 2], [1, 4]), ["segments()", "dilations[1]", "lengths[1]", "4"]),
    ("segments offset >= rate", lambda: segments([4, 4], [2, 2], [0, 2]), ["segments()", "offsets[1]", "2"]),
    ("segments empty", lambda: segments([], []), ["segments()", "'lengths'", "[]"]),
    ("segments non-integer", lambda: segments([4, 4.5], [1, 1]), ["segments()", "lengths[1]", "4.5"]),
    ("heads()", lambda: heads(), ["heads()"]),
    ("heads(3)", lambda: heads(3), ["heads()", "argument 0", "3"]),
    ("heads(causal(), 'x')", lambda: heads(causal(), "x"), ["heads()", "argument 1", "'x'"]),
    ("heads(scored)", lambda: heads(SCORED), ["heads()", "argument 0", str(SCORED)]),
    ("softcap(0)", lambda: softcap(0), ["softcap()", "'cap'", "0"]),
    ("softcap(-1.5)", lambda: softcap(-1.5), ["softcap()", "'cap'", "-1.5"]),
    ("softcap(nan)", lambda: softcap(float("nan")), ["softcap()", "'cap'", "nan"]),
    ("softcap(inf)", lambda: softcap(float("inf")), ["softcap()", "'cap'", "inf"]),
    ("softcap('1')", lambda: softcap("1"), ["softcap()", "'cap'", "'1'"]),
    ("documents('not an identifier')", lambda: documents("not an identifier"),
     ["documents()", "'name'", "'not an identifier'"]),
    ("documents(3)", lambda: documents(3), ["documents()", "'name'", "3"]),
    ("bias('1x')", lambda: bias("1x"), ["bias()", "'name'", "'1x'"]),
    ("layout('a-b')", lambda: blocks(4).layout("a-b"), ["layout()", "'name'", "'a-b'"]),
    ("local(-1)", lambda: blocks(4).local(-1), ["local()", "'window'", "-1"]),
    ("local(1.0)", lambda: blocks(4).local(1.0), ["local()", "'window'", "1.0"]),
    ("dilated rates [2, 0]", lambda: blocks(4).dilated([2, 0]), ["dilated()", "rates[1]", "0"]),
    ("dilated rates []", lambda: blocks(4).dilated([]), ["dilated()", "'rates'", "[]"]),
    ("dilated window -1", lambda: blocks(4).dilated([2], window=-1), ["dilated()", "'window'", "-1"]),
    ("global_(0)", lambda: blocks(4).global_(0), ["global_()", "'n'", "0"]),
    ("random(0, 1)", lambda: blocks(4).random(0, 1), ["random()", "'per_row'", "0"]),
    ("random(1, -1)", lambda: blocks(4).random(1, -1), ["random()", "'seed'", "-1"]),
    (".within after .within", lambda: blocks(8).within(causal()).within(full()),
     ["within", "causal()"]),
    ("rule after .within", lambda: blocks(8).within(causal()).local(1), ["local(1)", "within"]),
    ("causal after .within", lambda: blocks(8).within(causal()).causal(), ["causal()", "within"]),
    (".within(documents)", lambda: blocks(8).within(documents("doc")), ["within()", "'rule'", "doc"]),
    (".within(scored)", lambda: blocks(8).within(SCORED), ["within()", "'rule'", str(SCORED)]),
    (".within(3)", lambda: blocks(8).within(3), ["within()", "'rule'", "3"]),
    ("scored | p", lambda: SCORED | window(1), ["'|'", str(SCORED), "score"]),
    ("p | scored", lambda: window(1) | SCORED, ["'|'", str(SCORED)]),
    ("scored & p", lambda: SCORED & window(1), ["'&'", str(SCORED)]),
    ("p - scored", lambda: window(1) - SCORED, ["'-'", str(SCORED)]),
    ("~scored", lambda: ~SCORED, ["'~'", str(SCORED)]),
    ("p | 3", lambda: causal() | 3, ["'|'", "3"]),
    (".score()", lambda: causal().score(), ["score()"]),
    (".score(3)", lambda: causal().score(3), ["score()", "3"]),
]


@pytest.mark.parametrize("thunk,fragments", [c[1:] for c in BAD_ARGUMENTS], ids=[c[0] for c in BAD_ARGUMENTS])
def test_bad_argument_is_rejected_with_a_precise_message(thunk, fragments):
    with pytest.raises(PatternArgumentError) as info:
        thunk()
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_pattern_argument_error_is_a_value_error():
    assert issubclass(PatternArgumentError, ValueError)
    assert sparsedsl.PatternArgumentError is PatternArgumentError
    with pytest.raises(ValueError):
        window(-1)


def test_valid_edge_arguments_are_accepted():
    assert window(0) == window(0, 0)
    assert window(2**31 - 1).before == 2**31 - 1
    assert dilated(4, 4, 3).offset == 3
    assert dilated(1, 1).rate == 1
    assert blocks(4).dilated(3) == blocks(4).dilated([3]) == blocks(4).dilated((3,))
    assert softcap(30) == softcap(30.0)
    assert segments((4, 4), (1, 2)) == segments([4, 4], [1, 2])


# ---------------------------------------------------------------------------------------
# Structural equality, hashing, immutability
# ---------------------------------------------------------------------------------------

BUILDERS = [
    lambda: full(),
    lambda: causal(),
    lambda: window(3),
    lambda: window(3, 1),
    lambda: window(1, 3),
    lambda: dilated_window(4, 2, 2),
    lambda: chunks(8),
    lambda: strided(4),
    lambda: dilated(8, 2),
    lambda: dilated(8, 2, 1),
    lambda: global_tokens(2),
    lambda: prefix(2),
    lambda: documents("doc"),
    lambda: documents("ids"),
    lambda: blocks(4),
    lambda: blocks(4).local(1),
    lambda: blocks(8).local(1),
    lambda: blocks(4).local(1).causal(),
    lambda: blocks(4).local(2),
    lambda: blocks(4).local(1).global_(1),
    lambda: blocks(4).global_(1).local(1),  # rule order is kept in the text form
    lambda: blocks(4).dilated([2, 3]),
    lambda: blocks(4).dilated([2, 3], window=4),
    lambda: blocks(4).random(2, 0),
    lambda: blocks(4).random(2, 1),
    lambda: blocks(4).layout("lay"),
    lambda: blocks(256).local(3).within(segments([128, 128], [1, 2])),
    lambda: blocks(256).local(3).within(segments([128, 128], [1, 2], [0, 0])),
    lambda: segments([4, 4], [1, 2]),
    lambda: heads(causal(), full()),
    lambda: heads(full(), causal()),
    lambda: causal() | prefix(2),
    lambda: prefix(2) | causal(),
    lambda: causal() & prefix(2),
    lambda: causal() - prefix(2),
    lambda: prefix(2) - causal(),
    lambda: ~causal(),
    lambda: causal().score(alibi()),
    lambda: causal().score(softcap(30)),
    lambda: causal().score(softcap(20)),
    lambda: causal().score(bias("b")),
    lambda: causal().score(alibi(), softcap(30)),
    lambda: causal().score(softcap(30), alibi()),
]


@pytest.mark.parametrize("index", range(len(BUILDERS)))
def test_built_twice_is_equal_and_hash_equal(index):
    a, b = BUILDERS[index](), BUILDERS[index]()
    assert a == b and not (a != b)
    assert hash(a) == hash(b)
    assert {a: 1}[b] == 1


def test_different_patterns_are_different():
    built = [make() for make in BUILDERS]
    for i, a in enumerate(built):
        for j, b in enumerate(built):
            if i != j:
                assert a != b, f"{a} == {b}"
    assert len(set(built)) == len(built)  # hash + eq consistent


def test_equivalent_constructions_are_equal():
    assert (causal() | prefix(2)) | window(1) == causal() | (prefix(2) | window(1))
    assert hash((causal() | prefix(2)) | window(1)) == hash(causal() | (prefix(2) | window(1)))
    assert (causal() & prefix(2)) & window(1) == causal() & (prefix(2) & window(1))
    assert causal().score(alibi()).score(softcap(3)) == causal().score(alibi(), softcap(3))
    assert segments([4, 4], [1, 2]) == segments([4, 4], [1, 2], [0, 1])
    # .causal() is a filter, not a rule: where it is called among the rules does not matter.
    assert blocks(4).causal().local(1) == blocks(4).local(1).causal()


def test_patterns_are_not_equal_to_other_things():
    assert causal() != "causal()"
    assert window(3) != 3
    assert full() != causal()


def test_function_score_mods_compare_by_identity():
    def double(score, b, h, q, k):
        return score * 2

    def double_again(score, b, h, q, k):
        return score * 2

    assert causal().score(double) == causal().score(double)
    assert hash(causal().score(double)) == hash(causal().score(double))
    assert causal().score(double) != causal().score(double_again)
    assert str(causal().score(double)) == "causal().score(double)"


@pytest.mark.parametrize("pattern,attribute", [
    (window(3), "before"),
    (window(3), "after"),
    (dilated(8, 2), "offset"),
    (blocks(4).local(1), "size"),
    (blocks(4).local(1), "rules"),
    (blocks(4).local(1).within(causal()), "within_"),
    (heads(causal(), full()), "parts"),
    (segments([4], [2]), "offsets"),
    (causal() | full(), "parts"),
    (causal() - full(), "left"),
    (~causal(), "inner"),
    (causal().score(alibi()), "mods"),
    (full(), "anything"),
])
def test_patterns_are_immutable(pattern, attribute):
    before = str(pattern)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(pattern, attribute, 1)
    with pytest.raises(AttributeError):
        delattr(pattern, attribute)
    assert str(pattern) == before


def test_block_rules_and_score_mods_are_immutable():
    rule = blocks(4).local(1).rules[0]
    with pytest.raises(AttributeError):
        rule.window = 3
    with pytest.raises(AttributeError):
        softcap(3).cap = 4.0


def test_builder_methods_return_new_patterns():
    base = blocks(4)
    local = base.local(1)
    assert base == blocks(4) and base.rules == ()
    assert local is not base and local.rules != base.rules
    assert base.causal() != base and base.causal_ is False


# ---------------------------------------------------------------------------------------
# Text form
# ---------------------------------------------------------------------------------------

TEXT_FORMS = [
    (full(), "full()"),
    (causal(), "causal()"),
    (window(3), "window(3)"),
    (window(3, 3), "window(3)"),
    (window(2, 5), "window(2, 5)"),
    (window(0, 4), "window(0, 4)"),
    (dilated_window(4, 0, 2), "dilated_window(4, 0, 2)"),
    (chunks(64), "chunks(64)"),
    (strided(16), "strided(16)"),
    (dilated(8, 2), "dilated(8, 2)"),
    (dilated(8, 2, 0), "dilated(8, 2)"),
    (dilated(8, 2, 1), "dilated(8, 2, 1)"),
    (global_tokens(16), "global_tokens(16)"),
    (prefix(32), "prefix(32)"),
    (documents("doc"), "documents('doc')"),
    (blocks(256).local(3).within(segments([128, 128], [1, 2])),
     "blocks(256).local(3).within(segments([128, 128], [1, 2]))"),
    (blocks(64).local(1).dilated([2, 4], window=8).global_(1).random(2, 7).layout("lay").causal(),
     "blocks(64).local(1).dilated([2, 4], window=8).global_(1).random(2, 7).layout('lay').causal()"),
    (blocks(16).dilated(2), "blocks(16).dilated([2])"),
    (blocks(16), "blocks(16)"),
    (blocks(16).causal(), "blocks(16).causal()"),
    (blocks(8).within(window(1) | causal()), "blocks(8).within(window(1) | causal())"),
    (segments([4, 4], [1, 2]), "segments([4, 4], [1, 2])"),
    (segments([4, 4], [1, 2], [0, 1]), "segments([4, 4], [1, 2])"),
    (segments([4, 4], [1, 2], [0, 0]), "segments([4, 4], [1, 2], [0, 0])"),
    (heads(causal(), window(2) | global_tokens(1)), "heads(causal(), window(2) | global_tokens(1))"),
    (causal() | prefix(4) | window(2), "causal() | prefix(4) | window(2)"),
    ((window(2) | causal()) & ~prefix(3), "(window(2) | causal()) & ~prefix(3)"),
    (window(2) | causal() & prefix(3), "window(2) | causal() & prefix(3)"),
    (window(2) - (causal() - prefix(1)), "window(2) - (causal() - prefix(1))"),
    (window(2) - causal() - prefix(1), "window(2) - causal() - prefix(1)"),
    (causal() - window(1) & full(), "causal() - window(1) & full()"),
    (causal() - (window(1) & full()), "causal() - (window(1) & full())"),
    (~(causal() | prefix(2)), "~(causal() | prefix(2))"),
    (~causal() - prefix(2), "~causal() - prefix(2)"),
    (~(causal() - prefix(2)), "~(causal() - prefix(2))"),
    (~~causal(), "~~causal()"),
    (causal().score(alibi()), "causal().score(alibi())"),
    (causal().score(bias("b")), "causal().score(bias('b'))"),
    ((causal() | prefix(4)).score(alibi(), softcap(30)),
     "(causal() | prefix(4)).score(alibi()).score(softcap(30.0))"),
    ((~causal()).score(softcap(2.5)), "(~causal()).score(softcap(2.5))"),
]


@pytest.mark.parametrize("pattern,text", TEXT_FORMS, ids=[t for _, t in TEXT_FORMS])
def test_text_form(pattern, text):
    assert str(pattern) == text
    assert repr(pattern) == text


VOCABULARY = {name: getattr(sparsedsl, name) for name in (
    "full", "causal", "window", "dilated_window", "chunks", "strided", "dilated", "global_tokens",
    "prefix", "documents", "blocks", "heads", "segments", "alibi", "softcap", "bias")}


@pytest.mark.parametrize("pattern,text", TEXT_FORMS, ids=[t for _, t in TEXT_FORMS])
def test_text_form_is_source_for_an_equal_pattern(pattern, text):
    rebuilt = eval(text, {"__builtins__": {}}, dict(VOCABULARY))  # noqa: S307 - test only
    assert rebuilt == pattern and hash(rebuilt) == hash(pattern)


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(patterns(allow_scores=True))
def test_generated_patterns_round_trip_through_text_and_copies(pattern):
    text = str(pattern)
    rebuilt = eval(text, {"__builtins__": {}}, dict(VOCABULARY))  # noqa: S307 - test only
    assert rebuilt == pattern, f"{text!r} -> {rebuilt!s}"
    assert hash(rebuilt) == hash(pattern)
    assert str(rebuilt) == text
    clone = copy.deepcopy(pattern)
    assert clone == pattern and hash(clone) == hash(pattern)
    assert rebuilt.buffer_names() == pattern.buffer_names()
    assert min_heads(rebuilt) == min_heads(pattern)


# ---------------------------------------------------------------------------------------
# buffer_names()
# ---------------------------------------------------------------------------------------

BUFFERS = [
    (causal(), set()),
    (blocks(4).local(1).within(segments([2, 2], [1, 2])), set()),
    (documents("doc"), {"doc"}),
    (blocks(4).layout("lay"), {"lay"}),
    (blocks(4).layout("lay").layout("lay2").local(1), {"lay", "lay2"}),
    (causal().score(bias("b")), {"b"}),
    (causal().score(alibi(), softcap(3)), set()),
    (documents("doc") | blocks(4).layout("lay"), {"doc", "lay"}),
    (heads(documents("doc"), causal()) - blocks(2).layout("lay"), {"doc", "lay"}),
    (~documents("doc") & documents("doc"), {"doc"}),
    ((documents("doc") | blocks(4).layout("lay")).score(bias("bias"), alibi()), {"doc", "lay", "bias"}),
]


@pytest.mark.parametrize("pattern,names", BUFFERS, ids=[str(p) for p, _ in BUFFERS])
def test_buffer_names(pattern, names):
    assert pattern.buffer_names() == frozenset(names)
    assert isinstance(pattern.buffer_names(), frozenset)


# ---------------------------------------------------------------------------------------
# min_heads (the helper exported by tests/strategies.py)
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern,need", [
    (causal(), 1),
    (heads(causal(), full()), 2),
    (segments([4, 4, 4], [1, 2, 3]), 3),
    (heads(causal(), segments([4, 4, 4], [1, 2, 3])), 3),
    (blocks(8).local(1).within(segments([4, 4], [1, 2])), 2),
    (blocks(8).local(1).within(heads(causal(), full(), full(), full())) | causal(), 4),
    ((~heads(full(), causal())).score(alibi()), 2),
])
def test_min_heads(pattern, need):
    assert min_heads(pattern) == need
