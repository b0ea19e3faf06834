"""Train a tiny character-level language model with sparse attention, on the CPU.

    python examples/train_small_lm.py [--steps 300] [--pattern TEXT]

The text is sparsedsl's own source code and docstrings (always installed with the
package). The model is a two-layer Transformer whose attention is
``sparsedsl.MultiheadSparseAttention`` with a causal sparse pattern from the catalog: by
default the Sparse Transformer's strided pattern, ``sparse_transformer_strided(stride=16,
merged=True)`` (the previous 16 characters, and every 16th one before them). A few hundred
steps take about half a minute on one CPU core; the loss is printed with a progress bar
(tqdm when installed) and must go down.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import sparsedsl as sd
from sparsedsl.progress import Progress


def corpus() -> str:
    """sparsedsl's own sources: a few hundred kilobytes of English and Python."""
    root = Path(sd.__file__).resolve().parent
    return "\n".join(p.read_text(encoding="utf-8") for p in sorted(root.rglob("*.py")))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, pattern: str):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attention = sd.MultiheadSparseAttention(dim, heads, pattern, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attention(h, h, h)[0]
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    def __init__(self, vocab: int, context: int, pattern: str, dim: int = 64, heads: int = 4,
                 layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.position = nn.Parameter(torch.zeros(context, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, pattern) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens):
        x = self.embed(tokens) + self.position[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--pattern", default="sparse_transformer_strided(stride=16, merged=True)",
                        help="a causal pattern: text or catalog name")
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (default 1: the matmuls are tiny, and one thread stays "
                             "fast when other processes share the cores)")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)

    text = corpus()
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([index[c] for c in text], dtype=torch.long)
    print(f"corpus: {len(text):,} characters of sparsedsl's own source, vocabulary {len(chars)}")

    model = TinyLM(len(chars), args.context, args.pattern)
    pattern = model.blocks[0].attention.pattern
    counts = sd.count(pattern, args.context)
    print(f"pattern: {pattern} ({counts.density:.1%} of the {args.context}x{args.context} pairs)")
    print(f"parameters: {sum(p.numel() for p in model.parameters()):,}")
    optimiser = torch.optim.AdamW(model.parameters(), lr=args.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / args.steps)))

    losses = []
    bar = Progress(args.steps, "training", unit="step")
    start = time.perf_counter()
    for _ in range(args.steps):
        offsets = torch.randint(len(data) - args.context - 1, (args.batch,))
        batch = torch.stack([data[o: o + args.context + 1] for o in offsets])
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, len(chars)), batch[:, 1:].reshape(-1))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        schedule.step()
        losses.append(loss.item())
        bar.update(f"loss {losses[-1]:.3f}")
    bar.close()
    elapsed = time.perf_counter() - start

    window = max(1, min(20, len(losses) // 5))
    first = sum(losses[:window]) / window
    last = sum(losses[-window:]) / window
    print(f"{args.steps} steps in {elapsed:.1f} s; mean loss of the first {window} steps "
          f"{first:.3f}, of the last {window} steps {last:.3f}")
    print(f"loss went down: {last < first}")

    model.eval()
    prompt = torch.tensor([[index[c] for c in "def "]])
    with torch.no_grad():
        for _ in range(60):
            logits = model(prompt[:, -args.context:])[:, -1] / 0.8
            prompt = torch.cat([prompt, torch.multinomial(logits.softmax(-1), 1)], 1)
    print("sample:", repr("".join(chars[i] for i in prompt[0].tolist())))
    assert last < first, "the loss did not go down"


if __name__ == "__main__":
    main()
