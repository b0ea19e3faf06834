"""Models that use sparsedsl modules under ``torch.compile(fullgraph=True)``: no graph breaks,
no new graph per sequence length once the length is dynamic, the same outputs and gradients
as eager, and one lowering shared by layers with the same pattern."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounter

import sparsedsl as sd
from sparsedsl.passes.lowering import _LOWERINGS


class TinyModel(nn.Module):
    """Two causal sparse-attention layers with the same pattern, and a head."""

    def __init__(self, pattern, dim=32, heads=4, dtype=torch.float64):
        super().__init__()
        self.layers = nn.ModuleList(
            sd.MultiheadSparseAttention(dim, heads, pattern, batch_first=True, block_size=16,
                                        dtype=dtype) for _ in range(2))
        self.head = nn.Linear(dim, 7, dtype=dtype)

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x, x, x, is_causal=True)[0]
        return self.head(x)


def _step(model, x):
    out = model(x)
    (out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype, device=out.device)).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return out.detach(), grads


def test_fullgraph_two_graphs_for_four_lengths_and_eager_results():
    torch.manual_seed(0)
    model = TinyModel(sd.window(12) | sd.global_tokens(3))
    counter = CompileCounter()
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    for length in (37, 50, 64, 81):
        x = torch.randn(2, length, 32, dtype=torch.float64)
        got, got_grads = _step(compiled, x)
        want, want_grads = _step(model, x)
        assert torch.allclose(got, want, atol=1e-12)
        for g, w in zip(got_grads, want_grads):
            assert torch.allclose(g, w, atol=1e-10)
    assert counter.frame_count <= 2


def test_layers_with_one_pattern_share_one_lowering():
    model = TinyModel(sd.window(9, 0) | sd.global_tokens(2))
    first, second = model.layers
    assert first._attention[1] is second._attention[1]
    _LOWERINGS.clear()
    torch.compile(model, fullgraph=True, backend=CompileCounter())(torch.randn(1, 45, 32, dtype=torch.float64))
    assert len(_LOWERINGS) == 1


def test_inductor_fullgraph_training_step_on_cpu():
    torch.manual_seed(1)
    model = TinyModel(sd.causal() & sd.window(20, 0), dtype=torch.float32)
    x = torch.randn(2, 45, 32)
    got, got_grads = _step(torch.compile(model, fullgraph=True), x)
    want, want_grads = _step(model, x)
    assert torch.allclose(got, want, atol=1e-5)
    for g, w in zip(got_grads, want_grads):
        assert torch.allclose(g, w, atol=1e-4)


def test_dilated_attention_under_fullgraph():
    attention = sd.DilatedAttention([16, 32], [1, 2], block_size=16)
    q, k, v = (torch.randn(1, 64, 4, 8, dtype=torch.float64) for _ in range(3))
    compiled = torch.compile(attention, fullgraph=True, backend=CompileCounter())
    assert torch.allclose(compiled(q, k, v, is_causal=True), attention(q, k, v, is_causal=True), atol=1e-12)


def test_tensors_lse_and_offsets_under_fullgraph():
    module = sd.compile((sd.documents("ids") & sd.causal()).score(sd.alibi()), block_size=16)
    ids = torch.tensor([0] * 20 + [1] * 30)

    def decode(q, k, v, ids):
        return module(q, k, v, ids=ids, q_offset="end", return_lse=True)

    q = torch.randn(1, 2, 5, 8, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, 2, 50, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    got = torch.compile(decode, fullgraph=True, backend=CompileCounter())(q, k, v, ids)
    want = decode(q, k, v, ids)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-12)
    got_grads = torch.autograd.grad((got[0] ** 2).sum() + got[1].sum(), (q, k, v))
    want_grads = torch.autograd.grad((want[0] ** 2).sum() + want[1].sum(), (q, k, v))
    for g, w in zip(got_grads, want_grads):
        assert torch.allclose(g, w, atol=1e-10)


def test_plain_score_functions_run_inside_the_compiled_operator():
    """A plain Python score function runs one element at a time under ``torch.vmap``: inside
    the operator of a graph AOTAutograd compiled (functorch's dispatch keys excluded there),
    forward and backward, as in eager mode."""
    def slope(score, b, h, q, k):
        return score - 0.1 * (q - k)

    module = sd.compile(sd.causal().score(slope), block_size=16)
    q, k, v = (torch.randn(1, 2, 40, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    want = module(q, k, v)
    got = torch.compile(lambda *t: module(*t), fullgraph=True, backend="aot_eager")(q, k, v)
    assert torch.allclose(got, want, atol=1e-12)
    for g, w in zip(torch.autograd.grad(got.sum(), (q, k, v)), torch.autograd.grad(want.sum(), (q, k, v))):
        assert torch.allclose(g, w, atol=1e-12)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_a_learned_bias_gets_its_gradient_under_fullgraph(backend):
    """A bound tensor that requires grad (a learned relative-position bias) is differentiated
    through the compiled operator as in eager mode; a bound tensor that does not (the
    documents' ids, a fixed bias) gets none."""
    module = sd.compile((sd.window(4) & sd.documents("ids")).score(sd.bias("rel"), sd.bias("fixed")),
                        block_size=16)
    ids = torch.tensor([0] * 9 + [1] * 15)
    q, k, v = (torch.randn(2, 4, 24, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    rel = torch.randn(4, 24, 24, dtype=torch.float64, requires_grad=True)
    fixed = torch.randn(1, 24, 24, dtype=torch.float64)

    def call(q, k, v, rel):
        return module(q, k, v, rel=rel, fixed=fixed, ids=ids)

    grad = torch.randn(2, 4, 24, 8, dtype=torch.float64)
    want = torch.autograd.grad(call(q, k, v, rel), (q, k, v, rel), grad)
    got = torch.autograd.grad(torch.compile(call, fullgraph=True, backend=backend)(q, k, v, rel), (q, k, v, rel), grad)
    assert want[3].abs().max() > 0.1
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-10)


@pytest.mark.parametrize("make", [
    lambda: sd.BlockSparseAttention(sparse_config=sd.SparsePatternConfig("local_window", 0.3, 16)),
    lambda: sd.BlockSparseDilatedAttention([8, 16], [1, 2], sd.SparsePatternConfig("dilated_sparse", 0.3, 16)),
])
def test_block_sparse_modules_under_fullgraph_pick_the_pattern_per_length(make):
    """The block-sparse front doors choose their pattern from the length: under
    ``fullgraph=True`` with dynamic lengths the choice is made when the graph runs, one
    graph per ``is_causal`` value, outputs and gradients as in eager mode."""
    module, counter = make(), CompileCounter()
    run = torch.compile(module, backend=counter, fullgraph=True, dynamic=True)
    for length in (40, 57, 130):
        for causal in (False, True):
            q, k, v = (torch.randn(2, length, 4, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
            got, want = run(q, k, v, is_causal=causal), module(q, k, v, is_causal=causal)
            assert torch.allclose(got, want, atol=1e-12)
            grad = torch.randn_like(got)
            for g, w in zip(torch.autograd.grad(got, (q, k, v), grad), torch.autograd.grad(want, (q, k, v), grad)):
                assert torch.allclose(g, w, atol=1e-10)
    assert counter.frame_count == 2
    assert copy.deepcopy(module)._handle == module._handle
    assert pickle.loads(pickle.dumps(module))._handle == module._handle


def test_copies_and_pickles_name_the_same_configuration():
    module = sd.compile(sd.window(5), block_size=16)
    assert copy.deepcopy(module)._handle == module._handle
    assert pickle.loads(pickle.dumps(module))._handle == module._handle
    assert sd.compile(sd.window(6), block_size=16)._handle != module._handle


@pytest.mark.gpu
def test_gpu_inductor_fullgraph_training_step_bf16():
    torch.manual_seed(2)
    model = TinyModel(sd.window(200) | sd.global_tokens(16), dim=256, heads=4,
                      dtype=torch.bfloat16).cuda()
    compiled = torch.compile(model, fullgraph=True)
    for length in (700, 1000, 1300):
        x = torch.randn(2, length, 256, dtype=torch.bfloat16, device="cuda")
        got, got_grads = _step(compiled, x)
        want, want_grads = _step(model, x)
        assert (got.float() - want.float()).abs().max().item() < 5e-2
        for g, w in zip(got_grads, want_grads):
            assert torch.isfinite(g).all()
            assert (g.float() - w.float()).abs().max().item() < 5e-2 * max(1.0, w.float().abs().max().item())


@pytest.mark.parametrize("return_lse,q_offset", [(True, 3), (False, 0)])
def test_operator_passes_torch_library_opcheck(return_lse, q_offset):
    from sparsedsl.compiler.opaque import attention_op
    module = sd.compile(sd.window(5) | sd.global_tokens(2), block_size=16)
    q = torch.randn(1, 2, 37, 8, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, 1, 40, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    result = torch.library.opcheck(attention_op, (q, k, v, module._handle, 0.3, q_offset, return_lse, "", [], ""))
    assert set(result.values()) == {"SUCCESS"}


def test_operator_with_a_differentiated_bound_tensor_passes_opcheck():
    from sparsedsl.compiler.opaque import attention_op
    module = sd.compile(sd.window(5).score(sd.bias("rel")), block_size=16)
    q, k, v = (torch.randn(1, 2, 37, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    rel = torch.randn(2, 37, 37, dtype=torch.float64, requires_grad=True)
    result = torch.library.opcheck(attention_op, (q, k, v, module._handle, 0.3, 0, False, "rel", [rel], ""))
    assert set(result.values()) == {"SUCCESS"}


def test_an_offset_computed_from_shapes_is_accepted_under_fullgraph():
    # q_offset = kv_len - q_len is a symbolic integer once lengths are dynamic
    module = sd.compile(sd.causal() & (sd.window(6, 0) | sd.global_tokens(2)), block_size=16)

    def decode(q, k, v):
        return module(q, k, v, q_offset=k.shape[2] - q.shape[2])

    counter = CompileCounter()
    compiled = torch.compile(decode, fullgraph=True, backend=counter)
    for kv_len in (20, 29, 41, 50):
        q = torch.randn(1, 2, 5, 8, dtype=torch.float64)
        k, v = (torch.randn(1, 2, kv_len, 8, dtype=torch.float64) for _ in range(2))
        assert torch.allclose(compiled(q, k, v), module(q, k, v, q_offset="end"), atol=1e-12)
    assert counter.frame_count <= 2


def test_bad_offsets_are_refused_under_fullgraph_too():
    module = sd.compile(sd.window(3), block_size=16)
    q = torch.randn(1, 1, 4, 8)
    for bad in (-1, "start"):
        with pytest.raises(Exception, match="q_offset"):
            torch.compile(lambda q: module(q, q, q, q_offset=bad), fullgraph=True, backend=CompileCounter())(q)


@pytest.mark.parametrize("pattern", [sd.window(8), sd.causal(), sd.segments([16, 32], [1, 2]),
                                     sd.longnet([16, 32], [1, 2]), sd.window(8) | sd.global_tokens(4)], ids=str)
def test_torch_func_transforms_run_the_gather_plan(pattern):
    """Inside ``torch.func`` transforms a module compiled with ``kernel="auto"`` runs the
    gather plan (differentiable PyTorch operations): ``grad`` equals autograd, ``vmap``
    equals the batched call, ``jacrev`` equals ``grad`` of each output element."""
    from torch.func import grad, jacrev, vmap
    module = sd.compile(pattern, block_size=16)
    q, k, v = torch.randn(3, 1, 2, 40, 8, dtype=torch.float64).unbind(0)
    weights = torch.randn(1, 2, 40, 8, dtype=torch.float64)
    got = grad(lambda q: (module(q, k, v) * weights).sum())(q)
    leaf = q.clone().requires_grad_()
    assert torch.allclose(got, torch.autograd.grad((module(leaf, k, v) * weights).sum(), leaf)[0], atol=1e-12)
    stacked = torch.randn(3, 3, 2, 40, 8, dtype=torch.float64).unbind(0)
    mapped = vmap(lambda a, b, c: module(a[None], b[None], c[None])[0])(*stacked)
    assert torch.allclose(mapped, module(*stacked), atol=1e-12)
    jacobian = jacrev(lambda q: module(q, k, v)[0, 1, 5])(q)  # [8, 1, 2, 40, 8]
    row = torch.autograd.grad(module(leaf, k, v)[0, 1, 5, 3], leaf)[0]
    assert torch.allclose(jacobian[3], row, atol=1e-12)


def test_a_forced_plan_names_itself_inside_torch_func_transforms():
    from torch.func import grad
    module = sd.compile(sd.window(8), block_size=16, kernel="tile_sdpa")
    q, k, v = torch.randn(3, 1, 2, 40, 8, dtype=torch.float64).unbind(0)
    with pytest.raises(sd.PlanNotSupported, match="kernel='tile_sdpa' cannot run inside torch.func transforms"):
        grad(lambda q: module(q, k, v).sum())(q)
