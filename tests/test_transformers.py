"""``sparsedsl.integrations.transformers``: a pattern as a transformers attention
implementation, checked against transformers' own eager attention on tiny random models
(Llama, Qwen2, Qwen3, Mistral; grouped-query attention in each) in float32 on the CPU.

Eager attention is the reference: for ``causal()`` as the model builds it, for windowed
patterns given the equivalent explicit 4-D mask (or Mistral's own sliding window). Eager
computes its softmax in float32, so float32 is as tight as a comparison gets (float64
eager also turns fully padded rows into NaN)."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

import sparsedsl as sd  # noqa: E402
from sparsedsl.integrations.transformers import (  # noqa: E402
    SLOT_DTYPE,
    register,
    slot_mask,
)

SIZES = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=128, max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
             eos_token_id=2)
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(num_key_value_heads=2, **SIZES),
    "qwen2": lambda: transformers.Qwen2Config(num_key_value_heads=1, **SIZES),
    "qwen3": lambda: transformers.Qwen3Config(num_key_value_heads=2, head_dim=16, **SIZES),
    "mistral": lambda: transformers.MistralConfig(num_key_value_heads=1, sliding_window=None,
                                                  **SIZES),
}
WINDOW = 16  # transformers' sliding_window=16 is causal() & window(15, 0)
CAUSAL_NAME = register(sd.causal(), "sparsedsl_test_causal", block_size=16)
WINDOW_NAME = register(sd.causal() & sd.window(WINDOW - 1, 0), "sparsedsl_test_window",
                       block_size=16)
TOLERANCE = dict(rtol=1e-5, atol=1e-5)


def build(config, attn_implementation: str = "eager", seed: int = 0):
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


def window_mask(mask: torch.Tensor) -> torch.Tensor:
    """The eager 4-D float mask of ``causal() & window(WINDOW - 1, 0)`` over the real keys."""
    length = mask.shape[1]
    allowed = sd.dense(sd.causal() & sd.window(WINDOW - 1, 0), length)[0].to(mask.device)
    allowed = allowed[None, None] & mask.bool()[:, None, None, :]
    return torch.zeros(allowed.shape, device=mask.device).masked_fill(~allowed, torch.finfo(torch.float32).min)


def cache_argument(model) -> str:
    """The forward argument that takes a cache (``past_key_values`` before transformers
    renamed it ``cache``)."""
    parameters = inspect.signature(model.model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


# -- causal(): the model's own attention --------------------------------------------------


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_causal_logits_equal_eager_with_and_without_left_padding(family):
    model = build(CONFIGS[family]())
    ids, mask = tokens(3, 37, left_padding=(0, 5, 20))
    expected = logits(model, "eager", ids, attention_mask=mask)
    got = logits(model, CAUSAL_NAME, ids, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], **TOLERANCE)
    assert torch.isfinite(got).all()
    unpadded = ids[:1]
    torch.testing.assert_close(logits(model, CAUSAL_NAME, unpadded),
                               logits(model, "eager", unpadded), **TOLERANCE)


def test_left_padding_does_not_change_a_shift_invariant_scored_pattern():
    # RoPE scores depend on q - k only, so a row's real tokens give the same logits padded
    name = register(sd.causal().score(sd.softcap(5.0)), "sparsedsl_test_softcap", block_size=16)
    model = build(CONFIGS["llama"](), name)
    ids, mask = tokens(2, 40, left_padding=(0, 9))
    ids[1, 9:] = ids[0, :31]
    padded = logits(model, name, ids, attention_mask=mask)
    alone = logits(model, name, ids[:1, :31])
    torch.testing.assert_close(padded[1, 9:], alone[0], **TOLERANCE)


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
    model.set_attn_implementation("eager")
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


# -- a windowed pattern -----------------------------------------------------------------


def test_window_pattern_equals_eager_with_the_explicit_mask_and_mistral_sliding_window():
    model = build(CONFIGS["llama"]())
    ids, mask = tokens(2, 50, left_padding=(0, 9))
    got = logits(model, WINDOW_NAME, ids, attention_mask=mask)
    expected = logits(model, "eager", ids, attention_mask=window_mask(mask))
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], **TOLERANCE)

    mistral = CONFIGS["mistral"]()
    mistral.sliding_window = WINDOW
    model = build(mistral)
    got = logits(model, WINDOW_NAME, ids, attention_mask=mask, use_cache=False)
    expected = logits(model, "eager", ids, attention_mask=mask, use_cache=False)
    torch.testing.assert_close(got[real], expected[real], **TOLERANCE)


def test_window_pattern_training_step_has_the_gradients_of_eager():
    model = build(CONFIGS["llama"]()).train()
    ids, mask = tokens(2, 50, left_padding=(0, 9))
    # a label counts when its token and the one before it are real (padding outputs differ)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, 1:].masked_fill_(mask[:, :-1] == 0, -100)
    gradients = {}
    for name, attention_mask in ((WINDOW_NAME, mask), ("eager", window_mask(mask))):
        model.set_attn_implementation(name)
        model.zero_grad()
        loss = model(ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        gradients[name] = {k: p.grad.clone() for k, p in model.named_parameters()}
    for key, expected in gradients["eager"].items():
        got = gradients[WINDOW_NAME][key]
        assert torch.isfinite(got).all(), key
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6, msg=key)


# -- the attention function and the mask function -----------------------------------------


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
        assert mask.dtype == SLOT_DTYPE and mask.shape == (2, 1, 0 if padding is None else 1, 40)
        out, weights = attention(None, q, k, v, mask, scaling=16 ** -0.5)
        assert weights is None and out.shape == (2, 5, 4, 16)
        ids = None if padding is None else padding.long()
        torch.testing.assert_close(out, _reference(pattern, q, k[:, :, :40], v[:, :, :40], 35, ids))
    # without a mask the queries are aligned to the end of the keys
    out, _ = attention(None, q, k, v, None, scaling=16 ** -0.5)
    torch.testing.assert_close(out, _reference(pattern, q, k, v, 59))


def test_slot_mask_pads_short_masks_and_refuses_offset_caches():
    short = torch.tensor([[True, True, True]])
    mask = slot_mask(1, 2, 5, q_offset=2, attention_mask=short)
    assert mask[:, 0, 0].tolist() == [[1, 1, 1, 0]]  # slots past the 2-D mask are padding
    with pytest.raises(NotImplementedError, match="from position 3 on"):
        slot_mask(1, 1, 8, q_offset=10, kv_offset=3)


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
    ((3, "x"), TypeError, "argument 'pattern'"),
    (("window(", "x"), sd.PatternSyntaxError, "window"),
    ((sd.causal() & sd.documents("doc"), "x"), ValueError, r"\['doc'\]"),
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


def test_a_cache_that_dropped_keys_is_refused():
    mistral = CONFIGS["mistral"]()
    mistral.sliding_window = 8
    model = build(mistral, WINDOW_NAME)
    with pytest.raises(NotImplementedError, match="sliding_window=None"):
        model.generate(tokens(1, 12)[0], max_new_tokens=3, do_sample=False)


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
    want = logits(model, "eager", ids, attention_mask=explicit)
    real = mask.bool()
    assert (got[real] - want[real]).abs().max().item() < 1e-3
    # greedy decoding through the KV cache (unpadded rows) against eager, step by step, with
    # the same window as an explicit mask over the grown sequence
    ids = ids[:1]
    model.set_attn_implementation(name)
    generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                               min_new_tokens=6, do_sample=False)
    model.set_attn_implementation("eager")
    sequence = ids
    for _ in range(6):
        step_logits = model(sequence, attention_mask=window_mask(torch.ones_like(sequence))).logits[:, -1]
        sequence = torch.cat([sequence, step_logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, sequence)
