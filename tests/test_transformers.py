"""``sparsedsl.integrations.transformers``: patterns as a transformers attention
implementation, checked against transformers' own eager attention on tiny random models
built from configs (Llama, Mistral, Qwen2, Qwen3, Phi3, Gemma2, Gemma3; grouped-query
attention in each; sliding-window layers in Mistral, Qwen2, Phi3, Gemma2 and Gemma3, mixed
with full layers in Qwen2, Gemma2 and Gemma3; softcapping in Gemma2) in float32 on the CPU,
eagerly and under ``torch.compile``.

Eager attention is the reference: the model's own masks for the model patterns, an
explicit 4-D mask per layer for other patterns. Eager computes its softmax in float32, so
float32 is as tight as a comparison gets (float64 eager also turns fully padded rows into
NaN)."""

from __future__ import annotations

import inspect
import subprocess
import sys
from functools import partial
from types import SimpleNamespace

import pytest
import torch
from torch._dynamo.testing import CompileCounter

transformers = pytest.importorskip("transformers")

import sparsedsl as sd  # noqa: E402
from sparsedsl.integrations import transformers as integration  # noqa: E402
from sparsedsl.integrations.slots import EMPTY, PADDING, REAL, read_slots  # noqa: E402
from sparsedsl.integrations.transformers import SLOT_DTYPE, register, slot_mask  # noqa: E402

SIZES = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=128, max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
             eos_token_id=2)
SLIDING = 8  # the sliding window of the families that have one: causal() & window(7, 0)
FAMILIES = {
    "llama": lambda: transformers.LlamaConfig(num_key_value_heads=2, **SIZES),
    "mistral": lambda: transformers.MistralConfig(num_key_value_heads=1, sliding_window=SLIDING, **SIZES),
    "qwen2": lambda: transformers.Qwen2Config(num_key_value_heads=1, use_sliding_window=True,
                                              sliding_window=SLIDING, max_window_layers=1, **SIZES),
    "qwen3": lambda: transformers.Qwen3Config(num_key_value_heads=2, head_dim=16, **SIZES),
    "phi3": lambda: transformers.Phi3Config(num_key_value_heads=2, sliding_window=SLIDING, **SIZES),
    "gemma2": lambda: transformers.Gemma2Config(num_key_value_heads=2, head_dim=16, sliding_window=SLIDING,
                                                **SIZES),
    "gemma3": lambda: transformers.Gemma3TextConfig(num_key_value_heads=2, head_dim=16, sliding_window=SLIDING,
                                                    layer_types=["sliding_attention", "full_attention"],
                                                    **SIZES),
    # Mixture-of-experts families whose layers apply their window through the mask alone
    # (their attention function is given no sliding_window)
    "phimoe": lambda: transformers.PhimoeConfig(num_key_value_heads=2, sliding_window=SLIDING, num_local_experts=2,
                                                num_experts_per_tok=1, **SIZES),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(num_key_value_heads=2, use_sliding_window=True,
                                                     sliding_window=SLIDING, max_window_layers=1, num_experts=2,
                                                     num_experts_per_tok=1, moe_intermediate_size=32,
                                                     shared_expert_intermediate_size=32, **SIZES),
}
#: transformers' eager attention on each family (Gemma2 softcaps, which sdpa refuses).
EAGER = "eager"
CONFIGS = {
    "llama": FAMILIES["llama"],
    "qwen2": lambda: transformers.Qwen2Config(num_key_value_heads=1, **SIZES),
    "mistral": lambda: transformers.MistralConfig(num_key_value_heads=1, sliding_window=None, **SIZES),
}
WINDOW = 16  # transformers' sliding_window=16 is causal() & window(15, 0)
MODEL_NAME = register(None, "sparsedsl_test_model")
CAUSAL_NAME = register(sd.causal(), "sparsedsl_test_causal", block_size=16)
WINDOW_NAME = register(sd.causal() & sd.window(WINDOW - 1, 0), "sparsedsl_test_window",
                       block_size=16)
TOLERANCE = dict(rtol=1e-5, atol=1e-5)


def build(config, attn_implementation: str = EAGER, seed: int = 0):
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(
        config, attn_implementation=attn_implementation, dtype=torch.float32).eval()


def tokens(batch: int, length: int, left_padding=(), seed: int = 1):
    """``(input_ids, attention_mask)``: random tokens, row ``i`` left-padded with
    ``left_padding[i]`` pad tokens."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, SIZES["vocab_size"], (batch, length), generator=gen)
    mask = torch.ones_like(ids)
    for row, pad in enumerate(left_padding):
        ids[row, :pad], mask[row, :pad] = SIZES["pad_token_id"], 0
    return ids, mask


@torch.no_grad()
def logits(model, attn_implementation: str, ids, **kwargs) -> torch.Tensor:
    model.set_attn_implementation(attn_implementation)
    return model(ids, **kwargs).logits


def explicit_mask(pattern, mask: torch.Tensor) -> torch.Tensor:
    """The eager 4-D float mask of ``pattern`` over the real keys of ``mask``."""
    length = mask.shape[1]
    allowed = sd.dense(pattern, length)[0].to(mask.device)
    allowed = allowed[None, None] & mask.bool()[:, None, None, :]
    return torch.zeros(allowed.shape, device=mask.device).masked_fill(~allowed, torch.finfo(torch.float32).min)


def window_mask(mask: torch.Tensor) -> torch.Tensor:
    return explicit_mask(sd.causal() & sd.window(WINDOW - 1, 0), mask)


@torch.no_grad()
def eager_logits_with_layer_patterns(model, ids, mask, patterns: dict) -> torch.Tensor:
    """Eager logits with layer ``i`` given the explicit mask of ``patterns[i]`` (the other
    layers keep the model's own masks)."""
    def replace_mask(explicit, module, args, kwargs):
        return args, {**kwargs, "attention_mask": explicit}

    model.set_attn_implementation(EAGER)
    hooks = [model.model.layers[i].register_forward_pre_hook(partial(replace_mask, explicit_mask(p, mask)),
                                                             with_kwargs=True)
             for i, p in patterns.items()]
    try:
        return model(ids, attention_mask=mask, use_cache=False).logits
    finally:
        for hook in hooks:
            hook.remove()


def cache_argument(model) -> str:
    """The forward argument that takes a cache (``past_key_values`` before transformers
    renamed it ``cache``)."""
    parameters = inspect.signature(model.model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def assert_real_close(got, want, mask, **tolerance):
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], **(tolerance or TOLERANCE))
    assert torch.isfinite(got).all()


# -- each layer runs what the model's configuration says -----------------------------------


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_model_patterns_equal_eager_logits_and_greedy_tokens(family):
    # sliding layers run causal() & window(7, 0) over 30 tokens, full layers causal(), Gemma2
    # softcaps at 50; left padding in two rows
    model = build(FAMILIES[family]())
    ids, mask = tokens(3, 30, left_padding=(0, 5, 20))
    assert_real_close(logits(model, MODEL_NAME, ids, attention_mask=mask),
                      logits(model, EAGER, ids, attention_mask=mask), mask)
    options = dict(attention_mask=mask[:2], max_new_tokens=8, min_new_tokens=8, do_sample=False)
    for cache_implementation in ("dynamic", "static"):  # sliding caches drop keys past the window
        model.set_attn_implementation(EAGER)
        want = model.generate(ids[:2], cache_implementation=cache_implementation, **options)
        model.set_attn_implementation(MODEL_NAME)
        got = model.generate(ids[:2], cache_implementation=cache_implementation, **options)
        assert torch.equal(got, want), cache_implementation


def test_a_configured_window_the_model_mask_does_not_apply_is_refused():
    """A window in the configuration that the model's own mask does not apply (a model
    that ignores ``sliding_window``) is refused once it would cut a row, not run."""
    config = FAMILIES["llama"]()
    config.sliding_window = SLIDING
    model = build(config, MODEL_NAME)
    ids, mask = tokens(1, 2 * SLIDING)
    with torch.no_grad():
        model(ids[:, :SLIDING], attention_mask=mask[:, :SLIDING])  # no row is cut yet
        with pytest.raises(NotImplementedError, match=r"layer 0 \(sliding_attention, sliding_window=8.*does "
                                                      r"not cut the rows that sliding_window=8 cuts"):
            model(ids, attention_mask=mask)


def test_slot_tensors_mark_rows_a_window_cuts():
    """Real query slots whose row of the model's mask a window cuts, or does not cut where
    the configured window would."""
    def sliding(b, h, q, k):
        return (k <= q) & (k > q - 4)

    def causal(b, h, q, k):
        return k <= q

    padding = torch.tensor([[0, 1, 1, 1, 1, 1, 1]]).bool()
    for function, window, wanted, cut_rows in ((sliding, 4, "narrower", [4, 5, 6]), (causal, 4, "wider", [4, 5, 6]),
                                               (sliding, 8, "narrower", [4, 5, 6]), (causal, None, None, [])):
        slots = slot_mask(1, 7, 7, 0, 0, function, padding, "cpu", SimpleNamespace(sliding_window=window))
        reading = read_slots(slots, "test", cached=False)
        codes = slots[0, 0, 0].tolist()
        assert codes[0] == PADDING and [i for i, c in enumerate(codes) if c > REAL] == cut_rows
        assert (reading.narrower, reading.wider) == (wanted == "narrower", wanted == "wider")
        assert reading.window_differs(None) == (wanted == "narrower")
        assert reading.window_differs(window) == (wanted == "wider" if window else wanted == "narrower")
        assert reading.first_real == (1,) and reading.filled == 7


def test_patterns_map_to_layer_types_and_indices():
    # Gemma3: layer 0 sliding (window 8), layer 1 full
    model = build(FAMILIES["gemma3"]())
    ids, mask = tokens(2, 30, left_padding=(0, 6))
    narrow, dilated = sd.causal() & sd.window(3, 0), sd.causal() & sd.dilated_window(6, 0, 2)
    by_type = register({"full_attention": narrow}, "sparsedsl_test_by_type")
    assert_real_close(logits(model, by_type, ids, attention_mask=mask),
                      eager_logits_with_layer_patterns(model, ids, mask, {1: narrow}), mask)
    # an index wins over a type; the sliding layer keeps its own window
    by_index = register({"full_attention": narrow, 1: dilated, "sliding_attention": "causal() & window(2, 0)"},
                        "sparsedsl_test_by_index")
    want = eager_logits_with_layer_patterns(model, ids, mask, {0: sd.causal() & sd.window(2, 0), 1: dilated})
    assert_real_close(logits(model, by_index, ids, attention_mask=mask), want, mask)
    # Llama has no layer types: every layer is a full_attention layer
    llama = build(FAMILIES["llama"]())
    first = register({0: narrow}, "sparsedsl_test_first_layer")
    assert_real_close(logits(llama, first, ids, attention_mask=mask),
                      eager_logits_with_layer_patterns(llama, ids, mask, {0: narrow}), mask)


@pytest.mark.parametrize("family,patterns,message", [
    # a single pattern without the window of the sliding layers
    ("mistral", sd.causal(), r"layer 0 \(sliding_attention, sliding_window=8: causal\(\) & window\(7, 0\)\)"),
    ("gemma3", sd.causal() & sd.window(20, 0), r"layer 0 \(sliding_attention, sliding_window=8"),
    ("qwen2", {"sliding_attention": sd.causal() | sd.global_tokens(2)}, r"layer 1 \(sliding_attention"),
    # a pattern that sees later keys in a causal model
    ("llama", sd.window(4), r"layer 0 \(full_attention: causal\(\)\).*sees no later key"),
    ("llama", {1: sd.causal() | sd.global_tokens(1)}, r"layer 1 \(full_attention"),
    # names the model does not have
    ("llama", {"sliding_attention": sd.causal()}, r"layer type\(s\) \['sliding_attention'\]"),
    ("gemma3", {2: sd.causal()}, r"index\(es\) \[2\], but this model has 2 layers"),
])
def test_a_configuration_that_contradicts_the_patterns_is_refused(family, patterns, message):
    name = register(patterns, "sparsedsl_test_contradiction")
    model = build(FAMILIES[family](), name)
    # refused on the first call, though 6 tokens fit in every window
    with torch.no_grad(), pytest.raises(ValueError, match=message):
        model(tokens(1, 6)[0])


def test_softcap_stated_in_the_pattern_is_accepted_when_it_equals_the_config():
    model = build(FAMILIES["gemma2"]())  # attn_logit_softcapping=50.0 on both layers
    ids, mask = tokens(2, 30, left_padding=(0, 7))
    name = register({"sliding_attention": (sd.causal() & sd.window(SLIDING - 1, 0)).score(sd.softcap(50.0)),
                     "full_attention": "causal().score(softcap(50.0))"}, "sparsedsl_test_softcap_gemma2")
    assert_real_close(logits(model, name, ids, attention_mask=mask),
                      logits(model, EAGER, ids, attention_mask=mask), mask)
    for pattern, stated in ((sd.causal(), "states no softcap"),
                            (sd.causal().score(sd.softcap(30.0)), r"states softcap \[30.0\]")):
        name = register({"full_attention": pattern}, "sparsedsl_test_softcap_refused")
        with torch.no_grad(), pytest.raises(ValueError, match=rf"layer 1 .*softcaps.*50.0.*{stated}.*"
                                                              r"causal\(\).score\(softcap\(50.0\)\)"):
            logits(model, name, ids)


# -- output_attentions ------------------------------------------------------------------


@pytest.mark.parametrize("family", ["gemma3", "mistral"])
def test_output_attentions_returns_the_weights_of_eager(family):
    model = build(FAMILIES[family]())
    ids, mask = tokens(2, 30, left_padding=(0, 5))
    with torch.no_grad():
        want = model(ids, attention_mask=mask, output_attentions=True).attentions
        model.set_attn_implementation(MODEL_NAME)
        got = model(ids, attention_mask=mask, output_attentions=True).attentions
    assert len(got) == len(want) == 2
    real = mask.bool()
    for g, w in zip(got, want):
        assert g.shape == w.shape == (2, 4, 30, 30)
        torch.testing.assert_close(g.transpose(1, 2)[real], w.transpose(1, 2)[real], **TOLERANCE)


def test_output_attentions_over_the_memory_limit_is_refused(monkeypatch):
    model = build(FAMILIES["llama"](), MODEL_NAME)
    monkeypatch.setattr(integration, "ATTENTION_WEIGHTS_LIMIT", 1000)
    with torch.no_grad(), pytest.raises(ValueError, match=r"\[1, 4, 20, 20\] attention weights.*6400 bytes"):
        model(tokens(1, 20)[0], output_attentions=True)


# -- left padding and positions ---------------------------------------------------------


@pytest.mark.parametrize("pattern", [
    sd.causal() & (sd.window(5, 0) | sd.global_tokens(3)),
    sd.causal() & (sd.window(3, 0) | sd.prefix(4)),
    sd.causal() & sd.chunks(8),
], ids=["global_tokens", "prefix", "chunks"])
def test_left_padding_counts_positions_from_the_first_real_token(pattern):
    # a padded row attends, and generates, as the same tokens alone
    name = register(pattern, "sparsedsl_test_positions")
    model = build(FAMILIES["llama"](), name)
    ids, mask = tokens(2, 30, left_padding=(0, 9))
    ids[1, 9:] = ids[0, :21]
    torch.testing.assert_close(logits(model, name, ids, attention_mask=mask)[1, 9:],
                               logits(model, name, ids[:1, :21])[0], **TOLERANCE)
    options = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)
    for cache_implementation in ("dynamic", "static"):
        padded = model.generate(ids, attention_mask=mask, cache_implementation=cache_implementation, **options)
        alone = model.generate(ids[:1, :21], cache_implementation=cache_implementation, **options)
        assert torch.equal(padded[1, 9:], alone[0]), cache_implementation


def test_left_padding_does_not_change_a_shift_invariant_scored_pattern():
    # RoPE scores depend on q - k only, so a row's real tokens give the same logits padded
    name = register(sd.causal().score(sd.softcap(5.0)), "sparsedsl_test_softcap", block_size=16)
    model = build(CONFIGS["llama"](), name)
    ids, mask = tokens(2, 40, left_padding=(0, 9))
    ids[1, 9:] = ids[0, :31]
    padded = logits(model, name, ids, attention_mask=mask)
    alone = logits(model, name, ids[:1, :31])
    torch.testing.assert_close(padded[1, 9:], alone[0], **TOLERANCE)


def test_a_position_dependent_pattern_refuses_a_cache_that_dropped_keys():
    # inside Mistral's window, but chunks count positions from 0, which the cache dropped
    name = register(sd.causal() & sd.window(SLIDING - 1, 0) & sd.chunks(4), "sparsedsl_test_dropped")
    model = build(FAMILIES["mistral"](), name)
    with pytest.raises(NotImplementedError, match="dropped the earlier ones"):
        model.generate(tokens(1, 6)[0], max_new_tokens=6, do_sample=False)


@pytest.mark.parametrize("cache_implementation", ["dynamic", "static"])
def test_a_position_dependent_pattern_on_full_layers_generates_with_a_sliding_cache(cache_implementation):
    """Gemma3's sliding layers drop early keys from their cache, but the pattern that
    depends on absolute positions runs on its full layers only, whose cache keeps them:
    generation runs, with the tokens of generation without a cache."""
    name = register({"full_attention": sd.causal() & (sd.window(3, 0) | sd.global_tokens(2))},
                    "sparsedsl_test_full_global")
    model = build(FAMILIES["gemma3"](), name)
    ids = tokens(1, 6)[0]
    options = dict(max_new_tokens=3 * SLIDING, min_new_tokens=3 * SLIDING, do_sample=False)
    want = model.generate(ids, use_cache=False, **options)
    assert torch.equal(model.generate(ids, cache_implementation=cache_implementation, **options), want)
    # the same pattern on the sliding layers addresses the keys their cache dropped
    model.set_attn_implementation(register({"sliding_attention": sd.causal() & sd.window(3, 0) & sd.chunks(4)},
                                           "sparsedsl_test_sliding_chunks"))
    with pytest.raises(NotImplementedError, match="for its sliding layers"):
        model.generate(ids, cache_implementation=cache_implementation, **options)


# -- registered patterns on models without windows --------------------------------------


@pytest.mark.parametrize("cache_implementation", ["dynamic", "static"])
@pytest.mark.parametrize("name,eager_sliding_window", [(CAUSAL_NAME, None), (WINDOW_NAME, WINDOW)],
                         ids=["causal", "window"])
def test_greedy_generation_equals_eager(cache_implementation, name, eager_sliding_window):
    # Mistral's eager attention with sliding_window=16 is causal() & window(15, 0)
    model = build(CONFIGS["mistral"]())
    ids, mask = tokens(2, 21, left_padding=(0, 6))
    options = dict(attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                   cache_implementation=cache_implementation)
    model.set_attn_implementation(name)
    got = model.generate(ids, **options)
    model.set_attn_implementation(EAGER)
    model.config.sliding_window = eager_sliding_window
    expected = model.generate(ids, **options)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("name", [CAUSAL_NAME, WINDOW_NAME])
@pytest.mark.parametrize("static", [False, True], ids=["dynamic-cache", "static-cache"])
def test_decoding_with_a_cache_equals_one_forward(name, static):
    config = CONFIGS["qwen2"]()
    model = build(config, name)
    ids, _ = tokens(2, 50)
    full = logits(model, name, ids)
    cache = (transformers.StaticCache(config=config, max_cache_len=64) if static
             else transformers.DynamicCache(config=config))
    steps = [(0, 21), (21, 24), *((i, i + 1) for i in range(24, 50))]  # prefill, a chunk, tokens
    with torch.no_grad():
        pieces = [model(ids[:, start:stop], use_cache=True, **{cache_argument(model): cache}).logits
                  for start, stop in steps]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, **TOLERANCE)


def test_window_pattern_equals_eager_with_the_explicit_mask_and_mistral_sliding_window():
    model = build(CONFIGS["llama"]())
    ids, mask = tokens(2, 50, left_padding=(0, 9))
    got = logits(model, WINDOW_NAME, ids, attention_mask=mask)
    expected = logits(model, EAGER, ids, attention_mask=window_mask(mask))
    assert_real_close(got, expected, mask)

    mistral = CONFIGS["mistral"]()
    mistral.sliding_window = WINDOW
    model = build(mistral)
    got = logits(model, WINDOW_NAME, ids, attention_mask=mask, use_cache=False)
    expected = logits(model, EAGER, ids, attention_mask=mask, use_cache=False)
    assert_real_close(got, expected, mask)


def test_window_pattern_training_step_has_the_gradients_of_eager():
    model = build(CONFIGS["llama"]()).train()
    ids, mask = tokens(2, 50, left_padding=(0, 9))
    # a label counts when its token and the one before it are real (padding outputs differ)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, 1:].masked_fill_(mask[:, :-1] == 0, -100)
    gradients = {}
    for name, attention_mask in ((WINDOW_NAME, mask), (EAGER, window_mask(mask))):
        model.set_attn_implementation(name)
        model.zero_grad()
        loss = model(ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        gradients[name] = {k: p.grad.clone() for k, p in model.named_parameters()}
    for key, expected in gradients[EAGER].items():
        got = gradients[WINDOW_NAME][key]
        assert torch.isfinite(got).all(), key
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6, msg=key)


# -- torch.compile ----------------------------------------------------------------------


@pytest.fixture
def dynamo():
    """Dynamo with no compiled code and no counts: the decoder layers of every model share
    their code objects, whose recompile limit would otherwise count across tests."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield torch._dynamo.utils.counters
    torch._dynamo.reset()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_whole_model_compiles_with_fullgraph_into_two_graphs_for_four_lengths(family, dynamo):
    model = build(FAMILIES[family]())
    counter = CompileCounter()
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    for length, padding in ((11, 0), (18, 4), (24, 0), (31, 9)):  # padded or not
        ids, mask = tokens(2, length, left_padding=(0, padding), seed=length)
        want = logits(model, EAGER, ids, attention_mask=mask)
        model.set_attn_implementation(MODEL_NAME)
        with torch.no_grad():
            got = compiled(ids, attention_mask=mask).logits
        assert_real_close(got, want, mask)
    assert counter.frame_count <= 2
    assert not dynamo["graph_break"]


@pytest.mark.slow
def test_whole_model_under_inductor_equals_eager(dynamo):
    # Inductor compiles the graph around the opaque operator (about 40 s on 2 CPU cores)
    model = build(FAMILIES["gemma3"]())
    ids, mask = tokens(2, 24, left_padding=(0, 5))
    want = logits(model, EAGER, ids, attention_mask=mask)
    model.set_attn_implementation(MODEL_NAME)
    with torch.no_grad():
        got = torch.compile(model, fullgraph=True)(ids, attention_mask=mask).logits
    assert_real_close(got, want, mask)


def test_compiled_training_step_has_the_gradients_of_eager(dynamo):
    model = build(FAMILIES["gemma3"]()).train()
    ids, mask = tokens(2, 30, left_padding=(0, 5))
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, 1:].masked_fill_(mask[:, :-1] == 0, -100)
    counter = CompileCounter()
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    gradients = {}
    for key, attention in (("compiled", compiled), (EAGER, model)):
        model.set_attn_implementation(MODEL_NAME if key == "compiled" else EAGER)
        model.zero_grad()
        attention(ids, attention_mask=mask, labels=labels, use_cache=False).loss.backward()
        gradients[key] = {k: p.grad.clone() for k, p in model.named_parameters()}
    assert counter.frame_count == 1
    for k, expected in gradients[EAGER].items():
        torch.testing.assert_close(gradients["compiled"][k], expected, rtol=1e-4, atol=1e-6, msg=k)


def test_each_layer_compiles_with_fullgraph_and_generates_the_tokens_of_eager(dynamo):
    model = build(FAMILIES["gemma3"]())  # a sliding and a full layer
    ids, mask = tokens(2, 12, left_padding=(0, 4))
    options = dict(attention_mask=mask, max_new_tokens=10, min_new_tokens=10, do_sample=False)
    want = model.generate(ids, **options)
    model.set_attn_implementation(MODEL_NAME)
    counter = CompileCounter()
    for layer in model.model.layers:
        layer.compile(fullgraph=True, backend=counter)
    assert torch.equal(model.generate(ids, **options), want)
    # per layer: the prefill, the first decoding step, then one graph for every later length
    assert counter.frame_count <= 3 * len(model.model.layers)
    assert not dynamo["graph_break"]


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_static_cache_generation_under_transformers_compile_runs_one_graph(family, dynamo):
    model = build(FAMILIES[family]())
    ids, mask = tokens(2, 12, left_padding=(0, 4))
    options = dict(attention_mask=mask, max_new_tokens=16, min_new_tokens=16, do_sample=False,
                   cache_implementation="static")
    want = model.generate(ids, **options)
    graphs = []

    def backend(graph, example_inputs):  # a function: generate deep-copies its compile config
        graphs.append(graph)
        return graph.forward

    config = transformers.CompileConfig(fullgraph=True, backend=backend, mode="default")
    config._compile_all_devices = True  # compile on the CPU too
    model.set_attn_implementation(MODEL_NAME)
    assert torch.equal(model.generate(ids, compile_config=config, **options), want)
    assert len(graphs) == 1  # the decoding steps: no recompile per token
    assert dynamo["stats"]["unique_graphs"] == 1


# -- the slot tensor, the attention function and the mask function -------------------------


def _attention(name):
    return transformers.AttentionInterface()[name]


def _reference(pattern, q, k, v, q_offset, ids=None):
    """Dense masked softmax with ``k``/``v`` heads repeated for grouped-query attention."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    allowed = sd.dense(pattern, q.shape[2], k.shape[2], q_offset=q_offset)[0]
    allowed = allowed.expand(q.shape[0], 1, *allowed.shape).clone()
    if ids is not None:
        rows = ids[:, q_offset:q_offset + q.shape[2]]
        allowed &= (rows[:, :, None] == ids[:, None, :k.shape[2]])[:, None]
    scores = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).masked_fill(~allowed, float("-inf"))
    return (scores.softmax(-1).nan_to_num() @ v).transpose(1, 2)


def test_slot_codes_for_a_static_cache_padding_and_dropped_keys():
    real = torch.tensor([[True] * 6, [False, False, True, True, True, True]])
    # 4 slots filled before, 2 queries, a static cache of 8 slots
    slots = slot_mask(2, 2, 8, q_offset=torch.tensor(4), attention_mask=real)
    assert slots.dtype == SLOT_DTYPE and slots.shape == (2, 1, 1, 8)
    assert slots[:, 0, 0].tolist() == [[REAL] * 6 + [EMPTY] * 2, [PADDING] * 2 + [REAL] * 4 + [EMPTY] * 2]
    reading = read_slots(slots, "test")
    assert (reading.filled, reading.first_real, reading.dense) == (6, (0, 2), (True, True))
    assert reading.ids.tolist() == [[1] * 6, [0, 0, 1, 1, 1, 1]]
    # keys from position 3 on (a sliding cache dropped 3), slots past the 2-D mask are padding
    slots = slot_mask(2, 1, 3, q_offset=5, kv_offset=3, attention_mask=real[:, :5])
    assert slots[:, 0, 0].tolist() == [[REAL, REAL, PADDING]] * 2
    assert read_slots(slots, "test").dense == (False, False)


def test_attention_function_with_gqa_static_slots_and_padding():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 16, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(2, 1, 64, 16, generator=gen, dtype=torch.float64) for _ in range(2))
    real = torch.ones(2, 40, dtype=torch.bool)
    real[1, :7] = False
    attention = _attention(WINDOW_NAME)
    pattern = sd.causal() & sd.window(WINDOW - 1, 0)
    for padding in (None, real):
        # 35 slots filled before the call, 5 queries, a static cache of 64 slots
        mask = slot_mask(2, 5, 64, q_offset=torch.tensor(35), attention_mask=padding)
        out, weights = attention(None, q, k, v, mask, scaling=16 ** -0.5)
        assert weights is None and out.shape == (2, 5, 4, 16)
        ids = None if padding is None else padding.long()
        torch.testing.assert_close(out, _reference(pattern, q, k[:, :, :40], v[:, :, :40], 35, ids))
    # without a mask the queries are aligned to the end of the keys
    out, _ = attention(None, q, k, v, None, scaling=16 ** -0.5)
    torch.testing.assert_close(out, _reference(pattern, q, k, v, 59))


# -- register ---------------------------------------------------------------------------


def test_register_returns_the_name_and_two_patterns_live_side_by_side():
    ids, _ = tokens(1, 40)
    config = CONFIGS["llama"]()
    causal = logits(build(config, CAUSAL_NAME), CAUSAL_NAME, ids)
    window = logits(build(config, WINDOW_NAME), WINDOW_NAME, ids)
    assert not torch.allclose(causal, window)
    # the same window from its text, under a third name
    name = register(f"causal() & window({WINDOW - 1}, 0)", "sparsedsl_test_text", block_size=32)
    assert name == "sparsedsl_test_text"
    torch.testing.assert_close(logits(build(config), name, ids), window, **TOLERANCE)
    # registering a name again replaces its pattern
    assert register(sd.causal(), name) == name
    torch.testing.assert_close(logits(build(config), name, ids), causal, **TOLERANCE)


@pytest.mark.parametrize("arguments,error,message", [
    ((sd.causal(), "eager"), ValueError, "transformers already has"),
    ((sd.causal(), "sdpa"), ValueError, "transformers already has"),
    ((sd.causal(), "org/kernel"), ValueError, "argument 'name'"),
    ((sd.causal(), ""), ValueError, "argument 'name'"),
    ((sd.causal(), 7), ValueError, "argument 'name'"),
    ((3, "x"), TypeError, "argument 'patterns'"),
    (({1.5: sd.causal()}, "x"), TypeError, "layer indices"),
    (({"full_attention": 3}, "x"), TypeError, r"argument \"patterns\['full_attention'\]\""),
    (("window(", "x"), sd.PatternSyntaxError, "window"),
    ((sd.causal() & sd.documents("doc"), "x"), ValueError, r"\['doc'\]"),
    (({0: sd.causal() & sd.documents("doc")}, "x"), ValueError, r"patterns\[0\].*\['doc'\]"),
])
def test_register_refuses_bad_arguments(arguments, error, message):
    with pytest.raises(error, match=message):
        register(*arguments)


@pytest.mark.parametrize("options,message", [
    (dict(block_size=100), "block_size"),
    (dict(kernel="fast"), "kernel"),
])
def test_register_checks_compile_options(options, message):
    with pytest.raises(sd.PatternArgumentError, match=message):
        register(sd.causal(), "sparsedsl_test_bad", **options)


# -- what is refused at run time --------------------------------------------------------


def test_attention_dropout_in_training_is_refused():
    config = CONFIGS["llama"]()
    config.attention_dropout = 0.1
    model = build(config, CAUSAL_NAME).train()
    with pytest.raises(ValueError, match="dropout=0.1"):
        model(tokens(1, 8)[0])


def test_packed_sequences_and_prepared_masks_are_refused():
    model = build(CONFIGS["llama"](), CAUSAL_NAME)
    ids, mask = tokens(1, 12)
    packed = torch.cat([torch.arange(5), torch.arange(7)])[None]
    with torch.no_grad(), pytest.raises(NotImplementedError, match="packed sequences"):
        model(ids, position_ids=packed, use_cache=False)
    with torch.no_grad(), pytest.raises(ValueError, match="torch.float32 tensor of shape"):
        model(ids, attention_mask=window_mask(mask))
    q = k = v = torch.randn(1, 2, 12, 16)
    with pytest.raises(NotImplementedError, match="cu_seq_lens_q"):
        _attention(CAUSAL_NAME)(None, q, k, v, None, cu_seq_lens_q=torch.tensor([0, 5, 12]))


def test_a_position_bias_folded_into_the_mask_is_refused_for_what_it_is():
    # Falcon with ALiBi adds per-head scores to the mask it hands its attention layers
    config = transformers.FalconConfig(alibi=True, attention_dropout=0.0, hidden_dropout=0.0,
                                       **{k: v for k, v in SIZES.items() if k != "intermediate_size"})
    model = build(config, CAUSAL_NAME)
    ids, mask = tokens(1, 12)
    with torch.no_grad(), pytest.raises(NotImplementedError, match=r"shape \[1, 4, 1, 12\], scores per head.*ALiBi"):
        model(ids, attention_mask=mask)


def test_import_sparsedsl_does_not_import_transformers(monkeypatch):
    code = ("import sys, sparsedsl, sparsedsl.integrations.transformers; "
            "assert 'transformers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if it were not installed
    with pytest.raises(ImportError, match="pip install 'transformers>="):
        register(sd.causal(), "sparsedsl_test_missing")


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_gpu_logits_and_greedy_generation_equal_eager(family):
    """On CUDA (flex and decoding plans, tiles of 128), float32: a windowed pattern's logits
    and greedy tokens equal eager attention with the same window, with left padding."""
    name = register(sd.causal() & sd.window(WINDOW - 1, 0), f"sparsedsl_test_gpu_{family}")
    model = build(CONFIGS[family]()).cuda()
    ids, mask = (t.cuda() for t in tokens(2, 150, left_padding=(0, 9)))
    explicit = window_mask(mask)
    got = logits(model, name, ids, attention_mask=mask)
    want = logits(model, EAGER, ids, attention_mask=explicit)
    real = mask.bool()
    assert (got[real] - want[real]).abs().max().item() < 1e-3
    # greedy decoding through the KV cache (unpadded rows) against eager, step by step, with
    # the same window as an explicit mask over the grown sequence
    ids = ids[:1]
    model.set_attn_implementation(name)
    generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                               min_new_tokens=6, do_sample=False)
    model.set_attn_implementation(EAGER)
    sequence = ids
    for _ in range(6):
        step_logits = model(sequence, attention_mask=window_mask(torch.ones_like(sequence))).logits[:, -1]
        sequence = torch.cat([sequence, step_logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, sequence)
