"""Every node class has a meaning in every table that must give it one.

What a node means to a pass is one ``functools.singledispatch`` table per question, with
one entry per node class (or per block rule class, for the tables on ``blocks`` rules).
The tables listed in :data:`TOTAL_TABLES` must answer for every class: a class that reached
their default would get a refusal or the answer that claims nothing, not its meaning. So a
new class in :mod:`sparsedsl.lang.nodes` fails here until each of them names it.

Shape recognisers are not listed: they name the classes that can have their shape and
answer "not this shape" for every other one (:func:`sparsedsl.lang.queries.diagonal_period`,
``block_band``, ``is_diagonal_band``, the lattice decomposition).
"""

from __future__ import annotations

import math

import pytest
import torch

import sparsedsl as sd
from sparsedsl.analysis import formula, structure
from sparsedsl.lang import nodes as n
from sparsedsl.lang import queries
from sparsedsl.passes import dense, maskmod, tiles

#: ``(name, table, base class)``: each concrete subclass of ``base class`` in
#: :mod:`sparsedsl.lang.nodes` must be registered in ``table`` by itself (not reach the
#: default). Adding a table is one line here.
TOTAL_TABLES = [
    ("mask_mod lowering", maskmod._lower, n.Pattern),
    ("tile classification", tiles._classify, n.Pattern),
    ("dense reference", dense._dense, n.Pattern),
    ("head groups", queries._own_head_groups, n.Pattern),
    ("formula terms", formula._poly_of, n.Pattern),
    ("formula block rule terms", formula._rule_poly, n.BlockRule),
    ("periodicity", structure.periodicity, n.Pattern),
    ("block rule periodicity bound", structure._rule_bound, n.BlockRule),
    ("tile signature", structure._signature, n.Pattern),
    ("block rule tile signature", structure._rule_signature, n.BlockRule),
    ("diagonal support", structure.diagonal_support, n.Pattern),
    ("block rule diagonals", structure._rule_diagonals, n.BlockRule),
]


def node_classes(base: type) -> list[type]:
    """Every subclass of ``base`` (at any depth) defined in :mod:`sparsedsl.lang.nodes`."""
    found, stack = set(), [base]
    while stack:
        for sub in stack.pop().__subclasses__():
            stack.append(sub)
            if sub.__module__ == n.__name__:
                found.add(sub)
    return sorted(found, key=lambda cls: cls.__name__)


def unregistered(table, classes) -> list[type]:
    """The classes of ``classes`` that ``table`` has no entry of their own for."""
    return [cls for cls in classes if cls not in table.registry]


CASES = [(name, table, cls) for name, table, base in TOTAL_TABLES for cls in node_classes(base)]


@pytest.mark.parametrize("name,table,cls", CASES,
                         ids=[f"{name}-{cls.__name__}" for name, _, cls in CASES])
def test_every_node_class_is_registered(name, table, cls):
    assert not unregistered(table, [cls]), (
        f"{cls.__name__} has no entry in the {name} table ({table.__module__}.{table.__name__}); "
        f"register it there"
    )


def _vocabulary() -> list[n.Pattern]:
    """One pattern per public constructor, block rule and combinator."""
    built = (sd.blocks(8).local(1).dilated([2, 3], window=4).global_(1).random(1, 0).layout("lay")
             .causal().within(sd.dilated(4, 2)))
    return [
        sd.full(), sd.causal(), sd.window(3), sd.dilated_window(4, 2, 2), sd.chunks(4),
        sd.strided(3), sd.dilated(8, 2), sd.global_tokens(1), sd.prefix(2), sd.documents("doc"),
        built, sd.heads(sd.causal(), sd.full()), sd.segments([4, 8], [1, 2]),
        sd.window(1) | sd.causal(), sd.window(1) & sd.causal(), sd.full() - sd.causal(),
        ~sd.causal(), sd.causal().score(sd.alibi(), sd.softcap(5.0), sd.bias("b"), torch.tanh),
    ]


def test_the_enumeration_sees_every_class_the_language_builds():
    built = {type(node) for pattern in _vocabulary() for node in queries.walk(pattern)}
    rules = {type(rule) for pattern in _vocabulary() if isinstance(pattern, n.Blocks)
             for rule in pattern.rules}
    assert built <= set(node_classes(n.Pattern))
    assert rules <= set(node_classes(n.BlockRule))


def test_a_class_without_entries_is_caught_and_gets_the_stated_default():
    new_node = type("NewNode", (n.Pattern,), {"__str__": lambda self: "new_node()"})
    new_rule = type("NewRule", (n.BlockRule,), {"__str__": lambda self: "new_rule()"})
    for name, table, base in TOTAL_TABLES:
        cls = new_node if base is n.Pattern else new_rule
        assert unregistered(table, [cls]) == [cls], name
    node = new_node()
    with pytest.raises(TypeError, match="NewNode"):
        queries.head_group_count(node)
    with pytest.raises(TypeError, match="NewNode"):
        formula._poly_of(node)
    with pytest.raises(TypeError, match="NewRule"):
        formula._rule_poly(new_rule(), sd.blocks(4))
    assert structure.periodicity(node) is None
    assert structure.tile_signature(node, torch.arange(3), torch.arange(3), 4) is None
    assert structure.diagonal_support(node) == (-math.inf, math.inf)
    blocks = n.Blocks(4, (new_rule(),), False, None)
    assert structure.periodicity(blocks) is None
    assert structure.tile_signature(blocks, torch.arange(3), torch.arange(3), 4) is None
    assert structure.diagonal_support(blocks) == (-math.inf, math.inf)


def test_every_class_with_head_groups_tells_how_it_splits_heads():
    """``head_layers`` reads the split of each node with head groups of its own; a class
    without an entry in that table would be refused there."""
    patterns = _vocabulary() + [sd.longnet([4, 8], [1, 2]), sd.dilated_heads(4, 2),
                                sd.cycle_heads(sd.causal(), sd.full())]
    splitting = {type(node) for pattern in patterns for node in queries.walk(pattern)
                 if queries._own_head_groups(node) is not None}
    assert splitting == {n.Heads, n.Segments, n.LongNet, n.DilatedHeads, n.CycleHeads}
    assert not unregistered(queries._head_split, splitting)
