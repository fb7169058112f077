"""The attention function against float64 references of the paper's equation and of the authors' 3-layer
formulation: forward and backward, every CPU backend, fresh random inputs, tiny and odd sizes."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from torch import nn

from hf_neural_attention import NeuralAttentionConfig, NeuralScorer, neural_attention_forward
from tests.reference import AuthorsScorer, attention_from_scores, causal_visible, paper_scores

# In float64 "cpp" runs the tiled kernel with the C++ scorer (the fused C++ kernel computes in fp32): the fused
# kernels meet the reference in test_float32_and_bfloat16_match_float64_reference.
CPU_BACKENDS = ["eager", "tiled", "cpp"]


class ScoredLayer(nn.Module):
    """A bare attention module: what the function reads from a real one (scorer, causality)."""

    def __init__(self, scorer: NeuralScorer, is_causal: bool) -> None:
        super().__init__()
        self.neural_scorer = scorer
        self.is_causal = is_causal


def reference_weights(scorer: NeuralScorer) -> dict[str, torch.Tensor]:
    output_weight = scorer.output_weight if scorer.gate is None else scorer.output_weight * scorer.gate[:, None]
    return {"P_q": scorer.query_down_weight, "c_q": scorer.query_down_bias, "P_k": scorer.key_down_weight,
            "c_k": scorer.key_down_bias, "W_h": scorer.hidden_weight, "b_h": scorer.hidden_bias, "w_a": output_weight}


def random_inputs(batch, heads, q_len, k_len, head_dim, dtype=torch.float64, seed=None):
    seed = torch.seed() % 2**31 if seed is None else seed
    print(f"random inputs: seed {seed}")  # shown with a failure, to reproduce it
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, n, head_dim, generator=generator, dtype=dtype).requires_grad_()
            for n in (q_len, k_len, k_len)]


def run_function(layer, query, key, value, mask=None, scaling=None):
    out, _ = neural_attention_forward(layer, query, key, value, mask, dropout=0.0, scaling=scaling)
    return out.transpose(1, 2)  # back to (batch, heads, q_len, v_dim)


def copy_authors_weights(authors: AuthorsScorer, scorer: NeuralScorer) -> tuple[list, list]:
    """Load the authors' Linear stack into ``scorer`` (``mlp="authors"``, one shared head); returns the matching
    ``(ours, theirs)`` parameter lists (their last bias, which softmax ignores, has no counterpart)."""
    ours = [scorer.query_down_weight, scorer.query_down_bias, scorer.key_down_weight, scorer.key_down_bias,
            scorer.hidden_weight, scorer.hidden_bias, scorer.second_weight, scorer.second_bias, scorer.output_weight]
    theirs = [authors.query_projection.weight, authors.query_projection.bias, authors.key_projection.weight,
              authors.key_projection.bias, authors.mlp[0].weight, authors.mlp[0].bias, authors.mlp[2].weight,
              authors.mlp[2].bias, authors.mlp[4].weight]
    with torch.no_grad():
        for mine, source in zip(ours, theirs, strict=True):
            mine.copy_(source.reshape(mine.shape))
    return ours, theirs


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    ("batch", "heads", "q_len", "k_len", "head_dim", "proj_dim", "hidden_dim", "activation", "shared", "causal"),
    [
        (1, 1, 1, 1, 1, 1, 1, "relu", False, False),
        (2, 3, 7, 7, 5, 2, None, "relu", False, True),
        (1, 2, 3, 11, 8, 3, 5, "gelu", True, False),
        (2, 2, 33, 33, 4, 2, 4, "silu", False, True),
        (1, 4, 5, 9, 6, 4, 2, "tanh", False, True),  # k_len > q_len: upper-left aligned causality
        (1, 2, 70, 70, 3, 2, 3, "relu", True, True),
    ],
)
def test_paper_equation_forward_and_backward(backend, batch, heads, q_len, k_len, head_dim, proj_dim, hidden_dim,
                                              activation, shared, causal):
    settings = NeuralAttentionConfig(proj_dim=proj_dim, hidden_dim=hidden_dim, activation=activation,
                                     share_across_heads=shared, backend=backend)
    scorer = NeuralScorer(head_dim, heads, settings).double()
    layer = ScoredLayer(scorer, is_causal=causal)
    query, key, value = random_inputs(batch, heads, q_len, k_len, head_dim)

    out = run_function(layer, query, key, value)
    visible = causal_visible(q_len, k_len) if causal and q_len > 1 else None
    expected, _ = attention_from_scores(paper_scores(query, key, reference_weights(scorer), activation), value,
                                        visible)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-10)

    upstream = torch.randn_like(out)
    params = list(scorer.parameters())
    got = torch.autograd.grad(out, [query, key, value, *params], upstream)
    want = torch.autograd.grad(expected, [query, key, value, *params], upstream)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(("q_len", "k_len", "head_dim", "proj_dim", "causal"),
                         [(1, 1, 2, 1, False), (6, 6, 8, 2, True), (9, 4, 16, 5, False), (37, 37, 32, 8, True)])
def test_authors_formulation_with_copied_weights(backend, q_len, k_len, head_dim, proj_dim, causal):
    """Our ``mlp="authors"`` scorer equals their Linear stack on the concatenation, weights copied over."""
    seed = torch.seed() % 2**31
    print(f"weights: seed {seed}")
    torch.manual_seed(seed)
    authors = AuthorsScorer(head_dim, proj_dim).double()
    heads = 3
    scorer = NeuralScorer(head_dim, heads, NeuralAttentionConfig(proj_dim=proj_dim, mlp="authors",
                                                                backend=backend)).double()
    assert scorer.weight_heads == 1  # the authors share one scorer across heads
    ours, theirs = copy_authors_weights(authors, scorer)
    layer = ScoredLayer(scorer, is_causal=causal)
    query, key, value = random_inputs(2, heads, q_len, k_len, head_dim)

    out = run_function(layer, query, key, value)
    visible = causal_visible(q_len, k_len) if causal and q_len > 1 else None
    expected, _ = attention_from_scores(authors(query, key), value, visible)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-10)

    upstream = torch.randn_like(out)
    got = torch.autograd.grad(out, [query, key, value, *ours], upstream)
    want = torch.autograd.grad(expected, [query, key, value, *theirs, authors.mlp[4].bias], upstream)
    for g, w in zip(got[:3], want[:3], strict=True):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-10)
    for g, w in zip(got[3:], want[3:-1], strict=True):
        torch.testing.assert_close(g, w.reshape(g.shape), rtol=1e-8, atol=1e-10)
    # Their final bias shifts every score of a row equally: softmax ignores it, which is why we leave it out.
    assert want[-1].abs().max() < 1e-12


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_residual_mode_adds_scaled_dot_product(backend):
    heads, head_dim = 2, 8
    scorer = NeuralScorer(head_dim, heads, NeuralAttentionConfig(mode="residual", backend=backend)).double()
    with torch.no_grad():  # leave the zero init so the neural part contributes
        scorer.output_weight.normal_()
        scorer.gate.uniform_(0.5, 1.5)
    layer = ScoredLayer(scorer, is_causal=True)
    query, key, value = random_inputs(1, heads, 6, 6, head_dim)
    scaling = 0.37
    out = run_function(layer, query, key, value, scaling=scaling)
    scores = scaling * query @ key.transpose(-1, -2) + paper_scores(query, key, reference_weights(scorer), "relu")
    expected, _ = attention_from_scores(scores, value, causal_visible(6, 6))
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-10)
    upstream = torch.randn_like(out)
    got = torch.autograd.grad(out, [query, key, value, *scorer.parameters()], upstream)
    want = torch.autograd.grad(expected, [query, key, value, *scorer.parameters()], upstream)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-10)


ALL_BACKENDS = CPU_BACKENDS + (["triton"] if importlib.util.find_spec("triton") is not None else [])
# bf16: inputs and weights rounded to bf16, the float64 reference computed from those very values; errors are taken
# relative to the largest entry of each tensor (a gradient's small entries are sums that cancel).
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("mlp", ["paper", "authors"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_float32_and_bfloat16_match_float64_reference(backend, mlp, dtype):
    """What the model dtypes reach: the fused C++ kernel and Triton only run below float64. Forward and every
    gradient (inputs and all scorer weights), causal with left padding and a query row that sees no key."""
    seed = torch.seed() % 2**31
    torch.manual_seed(seed)
    heads, head_dim, n = 4, 16, 45
    settings = NeuralAttentionConfig(proj_dim=4, mlp=mlp, backend=backend)
    scorer = NeuralScorer(head_dim, heads, settings)
    if mlp == "authors":
        authors = AuthorsScorer(head_dim, 4)
        ours, theirs = copy_authors_weights(authors, scorer)
        authors.to(dtype).double()  # in place: the reference holds exactly the weights the kernel sees
    else:
        ours = list(scorer.parameters())
    scorer.to(dtype)
    layer = ScoredLayer(scorer, is_causal=True)
    query, key, value = random_inputs(2, heads, n, n, head_dim, dtype=dtype, seed=seed)
    visible = causal_visible(n, n).expand(2, 1, n, n).clone()
    visible[1, :, :, :7] = False  # left padding of sample 1: its first 7 query rows see nothing
    out = run_function(layer, query, key, value, mask=visible)
    assert out.dtype == dtype

    inputs64 = [t.detach().double().requires_grad_() for t in (query, key, value)]
    if mlp == "authors":
        reference_params = theirs  # converted in place above: now the float64 copies of the kernel's weights
        scores = authors(inputs64[0], inputs64[1])
    else:
        scorer64 = copy.deepcopy(scorer).double()
        reference_params = list(scorer64.parameters())
        scores = paper_scores(inputs64[0], inputs64[1], reference_weights(scorer64), "relu")
    expected, _ = attention_from_scores(scores, inputs64[2], visible)
    tolerance = TOLERANCE[dtype]

    def assert_near(got, want, name, scale=None):
        # an exactly zero reference happens: the authors' two second-layer units can both be dead (about 3% of seeds)
        scale = (want.abs().max() if scale is None else scale).clamp_min(1e-12)
        error = (got.double() - want).abs().max() / scale
        assert error < tolerance, f"{name}: relative error {error:.2e} >= {tolerance:.0e} (seed {seed})"

    assert_near(out, expected, "output")
    assert out[1, :, :7].abs().max() == 0  # rows with no visible key
    upstream = torch.randn(out.shape, dtype=torch.float64)
    got = torch.autograd.grad(out, [query, key, value, *ours], upstream.to(dtype))
    want = torch.autograd.grad(expected, [*inputs64, *reference_params], upstream)
    for name, g, w in zip(["query", "key", "value"], got[:3], want[:3], strict=True):
        assert g.dtype == dtype
        assert_near(g, w, f"gradient of {name}")
    # a scorer bias's gradient sums terms that cancel across a softmax row: measured against the layer's largest
    weight_scale = torch.stack([w.abs().max() for w in want[3:]]).max()
    for index, g, w in zip(range(len(ours)), got[3:], want[3:], strict=True):
        assert g.dtype == dtype
        assert_near(g, w.reshape(g.shape), f"gradient of scorer parameter {index}", weight_scale)


def test_default_init_gives_non_degenerate_attention():
    """PyTorch's default Linear init: scores vary across keys at step 0 and gradients do not vanish, unlike
    transformers' ``normal(0, 0.02)`` init, which makes attention uniform."""
    torch.manual_seed(0)
    heads, head_dim = 12, 64
    scorer = NeuralScorer(head_dim, heads, NeuralAttentionConfig())
    assert scorer.proj_dim == 2  # the authors' head_dim // 32 for GPT-2/ViT-Base heads
    query, key = torch.randn(2, heads, 32, head_dim), torch.randn(2, heads, 32, head_dim)

    def spread_and_grads(module):
        scores = module.scores(query, key, scaling=head_dim**-0.5)
        probabilities = torch.softmax(scores, -1)
        loss = (probabilities * torch.randn_like(probabilities)).sum()
        return scores.std(dim=-1).mean(), torch.autograd.grad(loss, list(module.parameters()))

    spread, grads = spread_and_grads(scorer)
    assert spread > 0.05, f"scores nearly constant across keys at init (std {spread:.2e})"
    assert all(g.abs().max() > 1e-4 for g in grads)

    hf_style = NeuralScorer(head_dim, heads, NeuralAttentionConfig())
    with torch.no_grad():
        for p in hf_style.parameters():
            p.normal_(0.0, 0.02) if p.dim() > 1 else p.zero_()
    hf_spread, hf_grads = spread_and_grads(hf_style)
    assert spread > 100 * hf_spread
    assert max(g.abs().max() for g in grads) > 20 * max(g.abs().max() for g in hf_grads)


def test_proj_dim_default_is_floored_for_small_heads():
    settings = NeuralAttentionConfig()
    assert settings.resolved_proj_dim(8) == 2  # head_dim // 32 would be 0
    assert settings.resolved_proj_dim(128) == 4
    assert NeuralAttentionConfig(mlp="authors").resolved_hidden_dims(64) == (2, 1)
