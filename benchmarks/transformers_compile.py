"""Graphs and recompiles of tiny transformers models under ``torch.compile``, with
sparsedsl's attention implementation (every layer running its model pattern) against
transformers' own (``sdpa``; ``eager`` for Gemma2, whose softcapping sdpa refuses).

For each family (2 layers, hidden size 64, 4 query heads, float32, a sliding window of 8
where the family has one), three ways a transformers user compiles:

* ``whole model``: ``torch.compile(model, fullgraph=True)`` on 4 lengths (11, 18, 24, 31
  tokens, 2 rows, the second left-padded on every other length): graphs, graph breaks,
  and the largest logit difference to eager attention on real tokens;
* ``per layer``: every decoder layer compiled with ``fullgraph=True``, then greedy
  ``generate`` of 10 tokens with a dynamic cache: graphs over all layers;
* ``static cache``: ``generate(cache_implementation="static")`` of 16 tokens with
  transformers' compile (``CompileConfig(fullgraph=True)``): graphs of the compiled
  decoding step, and whether the tokens equal eager attention's.

Graphs and recompiles are what this measures; it times nothing.

Graphs are counted by the backend (each graph Dynamo hands it); recompiles are the graphs
after the first of a compiled function. ``--backend inductor`` compiles the graphs too
(slow on a CPU); the default backend runs them as traced.

    PYTHONPATH=. python benchmarks/transformers_compile.py [--families llama,gemma3] [--backend inductor]
"""

from __future__ import annotations

import argparse

import torch
import transformers

from sparsedsl.integrations.transformers import register

SIZES = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=128, max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
             eos_token_id=2)
FAMILIES = {
    "llama": lambda: transformers.LlamaConfig(num_key_value_heads=2, **SIZES),
    "mistral": lambda: transformers.MistralConfig(num_key_value_heads=1, sliding_window=8, **SIZES),
    "qwen2": lambda: transformers.Qwen2Config(num_key_value_heads=1, use_sliding_window=True, sliding_window=8,
                                              max_window_layers=1, **SIZES),
    "qwen3": lambda: transformers.Qwen3Config(num_key_value_heads=2, head_dim=16, **SIZES),
    "phi3": lambda: transformers.Phi3Config(num_key_value_heads=2, sliding_window=8, **SIZES),
    "gemma2": lambda: transformers.Gemma2Config(num_key_value_heads=2, head_dim=16, sliding_window=8, **SIZES),
    "gemma3": lambda: transformers.Gemma3TextConfig(num_key_value_heads=2, head_dim=16, sliding_window=8,
                                                    layer_types=["sliding_attention", "full_attention"], **SIZES),
}
LENGTHS = ((11, 0), (18, 4), (24, 0), (31, 9))  # (tokens, left padding of the second row)


class Counter:
    """A backend that counts the graphs it is given (a function, not an object: generate
    deep-copies its compile configuration)."""

    def __init__(self, backend: str):
        self.graphs = 0
        self.backend = backend

    def function(self):
        def count(graph, example_inputs):
            self.graphs += 1
            if self.backend == "inductor":
                from torch._inductor.compile_fx import compile_fx
                return compile_fx(graph, example_inputs)
            return graph.forward
        return count


def tokens(length: int, padding: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, SIZES["vocab_size"], (2, length), generator=gen)
    mask = torch.ones_like(ids)
    ids[1, :padding], mask[1, :padding] = SIZES["pad_token_id"], 0
    return ids, mask


def build(family: str, implementation: str):
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(FAMILIES[family](), attn_implementation=implementation,
                                                         dtype=torch.float32).eval()


@torch.no_grad()
def whole_model(family: str, implementation: str, backend: str) -> dict:
    model = build(family, implementation)
    reference = build(family, "eager")
    counter = Counter(backend)
    compiled = torch.compile(model, fullgraph=True, backend=counter.function())
    largest = 0.0
    for length, padding in LENGTHS:
        ids, mask = tokens(length, padding, seed=length)
        got, want = compiled(ids, attention_mask=mask).logits, reference(ids, attention_mask=mask).logits
        largest = max(largest, (got - want)[mask.bool()].abs().max().item())
    return dict(graphs=counter.graphs, breaks=sum(torch._dynamo.utils.counters["graph_break"].values()),
                difference=largest)


def per_layer(family: str, implementation: str, backend: str) -> dict:
    model = build(family, implementation)
    ids, mask = tokens(12, 4, seed=0)
    counter = Counter(backend)
    for layer in model.model.layers:
        layer.compile(fullgraph=True, backend=counter.function())
    model.generate(ids, attention_mask=mask, max_new_tokens=10, min_new_tokens=10, do_sample=False)
    return dict(graphs=counter.graphs, layers=len(model.model.layers))


def static_cache(family: str, implementation: str, backend: str) -> dict:
    model = build(family, implementation)
    ids, mask = tokens(12, 4, seed=0)
    options = dict(attention_mask=mask, max_new_tokens=16, min_new_tokens=16, do_sample=False,
                   cache_implementation="static")
    reference = build(family, "eager").generate(ids, **options)
    counter = Counter(backend)
    config = transformers.CompileConfig(fullgraph=True, backend=counter.function(), mode="default")
    config._compile_all_devices = True  # compile on the CPU too
    generated = model.generate(ids, compile_config=config, **options)
    return dict(graphs=counter.graphs, equal=bool(torch.equal(generated, reference)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--backend", choices=("traced", "inductor"), default="traced")
    args = parser.parse_args()
    name = register(None, "sparsedsl")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, backend {args.backend}")
    print("| family | attention | whole model: graphs (recompiles), breaks, max diff | "
          "per layer: graphs (layers) | static cache: graphs, tokens = eager |")
    print("|---|---|---|---|---|")
    for family in args.families.split(","):
        for implementation in ("eager" if family == "gemma2" else "sdpa", name):
            rows = []
            for measure in (whole_model, per_layer, static_cache):
                torch._dynamo.reset()
                torch._dynamo.utils.counters.clear()
                rows.append(measure(family, implementation, args.backend))
            whole, layers, static = rows
            print(f"| {family} | {implementation} | {whole['graphs']} ({whole['graphs'] - 1}), {whole['breaks']}, "
                  f"{whole['difference']:.1e} | {layers['graphs']} ({layers['layers']}) | {static['graphs']}, "
                  f"{'yes' if static['equal'] else 'no'} |", flush=True)


if __name__ == "__main__":
    main()
