"""The attention function against float64 references of the paper's equation and of the authors' 3-layer
formulation: forward and backward, every CPU backend, fresh random inputs, tiny and odd sizes."""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Sequence

import pytest
import torch
from torch import nn

from hf_neural_attention import NeuralAttentionConfig, NeuralScorer, neural_attention_forward
from tests.reference import (
    AuthorsScorer,
    attention_from_scores,
    causal_visible,
    drawn_seed,
    paper_scores,
    smallest_visible_hidden,
)

# In float64 "cpp" runs the tiled kernel with the C++ scorer (the fused C++ kernel computes in fp32): the fused
# kernels meet the reference in float32 (FUSED_CASES, test_float32_and_bfloat16_match_float64_reference).
CPU_BACKENDS = ["eager", "tiled", "cpp"]
HAS_TRITON = importlib.util.find_spec("triton") is not None
# (backend, dtype) pairs for the function-level tests: every backend in float64, and the fused kernels (the C++ one,
# Triton interpreted on CPU) in float32, which is where they run
KERNEL_CASES = [pytest.param(backend, torch.float64, id=backend) for backend in CPU_BACKENDS] + [
    pytest.param(backend, torch.float32, id=f"{backend}-fp32") for backend in ["cpp"] + (["triton"] if HAS_TRITON
                                                                                         else [])]


def assert_matches(got: torch.Tensor, want: torch.Tensor, what: str = "", floor: float = 0.0) -> None:
    """float64: to 1e-9 (rtol) / 1e-10; float32: to 2e-5 of the reference's largest entry, or of ``floor`` where that
    is larger. Pass as ``floor`` the largest entry of all the gradients of one call: a gradient's small entries are
    sums that cancel, and so may a whole tensor's (a hidden unit on one side of its relu for every key of a row
    shifts the row, which softmax ignores; the gradients of its bias and of P_q, c_q, c_k, the gate are then 0 in
    exact arithmetic but carry the fp32 rounding of the call's O(largest) terms)."""
    if got.dtype == torch.float64:
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10, msg=lambda m: f"{what}: {m}")
        return
    scale = max(want.double().abs().max().item(), floor, 1e-30)
    error = (got.double() - want.double()).abs().max().item() / scale
    assert error <= 2e-5, f"{what}: error {error:.2e} of {scale:.2e} (the largest entry, or of the call's gradients)"


def largest_entry(tensors: Sequence[torch.Tensor]) -> float:
    """The largest ``|entry|`` of any of ``tensors``: ``assert_matches``'s ``floor`` for one call's gradients."""
    return max(t.detach().double().abs().max().item() for t in tensors if t.numel())


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
    seed = drawn_seed() if seed is None else seed
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


def live_authors_scorer(head_dim: int, proj_dim: int, query: torch.Tensor, key: torch.Tensor,
                        visible: torch.Tensor | None = None, dtype: torch.dtype | None = None,
                        kink_margin: float = 0.0) -> AuthorsScorer:
    """The authors' scorer (float64), its weights redrawn until every second-layer unit is active on some visible
    keys and not on others in at least a tenth of the query rows. A dead unit (a third of the draws at d' = 2) has
    zero gradients, and a unit active on whole rows shifts them, which softmax ignores: either way a test would not
    see its weights; one that changes few rows has gradients small against the terms they sum. ``dtype``: the
    weights are rounded to it (and held in float64); ``kink_margin``: no visible pair may meet a ReLU closer to 0
    than that (a low-precision kernel could put it on the other side of the kink: a whole gradient term off)."""
    for _ in range(200):
        seed = drawn_seed()
        torch.manual_seed(seed)
        authors = AuthorsScorer(head_dim, proj_dim).to(dtype or torch.float64).double()
        q64, k64 = query.detach().double(), key.detach().double()
        if ((authors.second_layer_mixed_rows(q64, k64, visible) >= 0.1).all()
                and authors.smallest_visible_preactivation(q64, k64, visible) > kink_margin):
            print(f"weights: seed {seed}")
            return authors
    raise AssertionError("no draw of the authors' weights keeps every second-layer unit partly active in a row")


def random_visible(batch: int, q_len: int, k_len: int) -> torch.Tensor:
    """A padding-style bool mask ``(batch, 1, q_len, k_len)`` with one query row that sees no key."""
    visible = torch.rand(batch, 1, q_len, k_len) > 0.3
    visible[..., 0] = True
    visible[-1, :, q_len // 2] = False
    return visible


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(("q_len", "k_len", "head_dim", "proj_dim", "masking"),
                         [(1, 2, 2, 1, "none"), (6, 6, 8, 2, "causal"), (9, 4, 16, 5, "padding"),
                          (37, 37, 32, 8, "causal"), (23, 30, 8, 4, "padding")])
def test_authors_formulation_with_copied_weights(backend, q_len, k_len, head_dim, proj_dim, masking):
    """Our ``mlp="authors"`` scorer equals their Linear stack on the concatenation, weights copied over: forward and
    every gradient, with causal and padding masks (a query row that sees no key included)."""
    heads = 3
    query, key, value = random_inputs(2, heads, q_len, k_len, head_dim)
    mask = random_visible(2, q_len, k_len) if masking == "padding" else None
    visible = causal_visible(q_len, k_len) if masking == "causal" else mask
    authors = live_authors_scorer(head_dim, proj_dim, query, key, visible)
    scorer = NeuralScorer(head_dim, heads, NeuralAttentionConfig(proj_dim=proj_dim, mlp="authors",
                                                                backend=backend)).double()
    assert scorer.weight_heads == 1  # the authors share one scorer across heads
    ours, theirs = copy_authors_weights(authors, scorer)
    layer = ScoredLayer(scorer, is_causal=masking == "causal")

    out = run_function(layer, query, key, value, mask=mask)
    expected, _ = attention_from_scores(authors(query, key), value, visible)
    if mask is not None:
        assert out[-1, :, q_len // 2].abs().max() == 0  # the row that sees no key
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-10)

    upstream = torch.randn_like(out)
    got = torch.autograd.grad(out, [query, key, value, *ours], upstream)
    want = torch.autograd.grad(expected, [query, key, value, *theirs, authors.mlp[4].bias], upstream)
    for g, w in zip(got[:3], want[:3], strict=True):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-10)
    for g, w in zip(got[3:], want[3:-1], strict=True):
        torch.testing.assert_close(g, w.reshape(g.shape), rtol=1e-8, atol=1e-10)
    assert want[10].abs().max() > 1e-8  # the second layer's bias matters (live_authors_scorer)
    # Their final bias shifts every score of a row equally: softmax ignores it, which is why we leave it out.
    assert want[-1].abs().max() < 1e-12


@pytest.mark.parametrize(("backend", "dtype"), KERNEL_CASES)
def test_residual_mode_adds_scaled_dot_product(backend, dtype):
    heads, head_dim = 2, 8
    scorer = NeuralScorer(head_dim, heads, NeuralAttentionConfig(mode="residual", backend=backend)).to(dtype)
    with torch.no_grad():  # leave the zero init so the neural part contributes
        scorer.output_weight.normal_()
        scorer.gate.uniform_(0.5, 1.5)
    layer = ScoredLayer(scorer, is_causal=True)
    query, key, value = random_inputs(1, heads, 6, 6, head_dim, dtype=dtype)
    scaling = 0.37
    out = run_function(layer, query, key, value, scaling=scaling)
    scorer64 = copy.deepcopy(scorer).double()
    query64, key64, value64 = (t.detach().double().requires_grad_() for t in (query, key, value))
    scores = scaling * query64 @ key64.transpose(-1, -2) + paper_scores(query64, key64, reference_weights(scorer64),
                                                                        "relu")
    expected, _ = attention_from_scores(scores, value64, causal_visible(6, 6))
    assert_matches(out, expected, "output")
    upstream = torch.randn(out.shape, dtype=torch.float64)
    got = torch.autograd.grad(out, [query, key, value, *scorer.parameters()], upstream.to(dtype))
    want = torch.autograd.grad(expected, [query64, key64, value64, *scorer64.parameters()], upstream)
    for index, (g, w) in enumerate(zip(got, want, strict=True)):
        assert_matches(g, w, f"gradient {index}", floor=largest_entry(want))


@pytest.mark.parametrize("mlp", ["paper", "authors"])
def test_under_autocast_only_the_first_layer_runs_in_16_bits_on_the_materialising_path(mlp):
    # every backend gets A and B from the first layer (a GEMM autocast may run in bf16); the fused kernels then run
    # the per-pair MLP and the dot term in fp32, and so must the materialising path (output_attentions' scores)
    scorer = NeuralScorer(8, 2, NeuralAttentionConfig(proj_dim=4, mlp=mlp, mode="residual", backend="eager"))
    with torch.no_grad():
        scorer.output_weight.normal_()
    query, key, _ = random_inputs(2, 2, 5, 7, 8, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = scorer.scores(query, key, 0.37)
        query_hidden, key_hidden, *weights = scorer(query, key)
    assert logits.dtype == torch.float32
    output_weight, second_weight, second_bias = [None if w is None else w.detach().double() for w in weights]
    # the per-pair MLP in float64, written out here, from the very A and B autocast gave
    hidden = (query_hidden.detach().double()[:, :, :, None, :] + key_hidden.detach().double()[:, :, None, :, :]).relu()
    if second_weight is not None:  # authors: relu(W2 h + b2), shared by the heads
        hidden = (torch.einsum("bhijk,mk->bhijm", hidden, second_weight.reshape(second_weight.shape[-2:]))
                  + second_bias.reshape(-1)).relu()
    mlp_scores = torch.einsum("bhijm,hm->bhij", hidden, output_weight.expand(2, -1))
    expected = mlp_scores + 0.37 * query.double() @ key.double().transpose(-1, -2)
    assert_matches(logits.detach(), expected, "scores")
    with torch.device("meta"):  # a device without autocast (meta: shape inference) takes no guard, and refuses one
        meta = NeuralScorer(8, 2, NeuralAttentionConfig(proj_dim=4, mlp=mlp))
        assert meta.scores(torch.empty(1, 2, 5, 8), torch.empty(1, 2, 7, 8), 0.37).shape == (1, 2, 5, 7)


ALL_BACKENDS = CPU_BACKENDS + (["triton"] if HAS_TRITON else [])
# bf16: inputs and weights rounded to bf16, the float64 reference computed from those very values. Output and input
# gradients: errors relative to the largest entry of each tensor (a gradient's small entries are sums that cancel).
# Scorer weights: norm-wise, tensor by tensor (see the test for the floor). WEIGHT_TOLERANCE: worst measured over 15
# seeds: paper 9.6e-7 / 8.8e-3 (fp32 / bf16); authors 6.1e-6 / 5.0e-2 (Triton's second-layer bias).
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2}
WEIGHT_TOLERANCE = {("paper", torch.float32): 2e-5, ("paper", torch.bfloat16): 3e-2,
                    ("authors", torch.float32): 1e-4, ("authors", torch.bfloat16): 0.1}


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("mlp", ["paper", "authors"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_float32_and_bfloat16_match_float64_reference(backend, mlp, dtype):
    """What the model dtypes reach: the fused C++ kernel and Triton only run below float64. Forward and every
    gradient (inputs and all scorer weights), causal with left padding and a query row that sees no key."""
    seed = drawn_seed()
    torch.manual_seed(seed)
    heads, head_dim, n = 4, 16, 45
    settings = NeuralAttentionConfig(proj_dim=4, mlp=mlp, backend=backend)
    scorer = NeuralScorer(head_dim, heads, settings)
    query, key, value = random_inputs(2, heads, n, n, head_dim, dtype=dtype, seed=seed)
    visible = causal_visible(n, n).expand(2, 1, n, n).clone()
    visible[1, :, :, :7] = False  # left padding of sample 1: its first 7 query rows see nothing
    if mlp == "authors":
        # weights rounded to dtype: the reference holds exactly the weights the kernel sees
        authors = live_authors_scorer(head_dim, 4, query, key, visible, dtype=dtype, kink_margin=1e-6)
        ours, theirs = copy_authors_weights(authors, scorer)
    else:
        # weights redrawn until no visible pair meets the relu within 1e-6 of its kink (weights rounded to dtype, as
        # the kernel sees them): fp32 and float64 may take different branches there, a whole gradient term apart
        for _ in range(100):
            if smallest_visible_hidden(query, key, reference_weights(copy.deepcopy(scorer).to(dtype)), visible) > 1e-6:
                break
            drawn_seed()  # reseeds torch's global generator: the new scorer's weights
            scorer = NeuralScorer(head_dim, heads, settings)
        else:
            raise AssertionError("no draw of 100 keeps every visible pair 1e-6 away from a relu kink")
        ours = list(scorer.parameters())
    names = {id(p): name for name, p in scorer.named_parameters()}
    scorer.to(dtype)
    layer = ScoredLayer(scorer, is_causal=True)
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

    def assert_near(got, want, name):
        error = (got.double() - want).abs().max() / want.abs().max()
        assert error < tolerance, f"{name}: relative error {error:.2e} >= {tolerance:.0e} (seed {seed})"

    assert_near(out, expected, "output")
    assert out[1, :, :7].abs().max() == 0  # rows with no visible key
    upstream = torch.randn(out.shape, dtype=torch.float64)
    got = torch.autograd.grad(out, [query, key, value, *ours], upstream.to(dtype))
    want = torch.autograd.grad(expected, [*inputs64, *reference_params], upstream)
    for name, g, w in zip(["query", "key", "value"], got[:3], want[:3], strict=True):
        assert g.dtype == dtype
        assert_near(g, w, f"gradient of {name}")
    # a bias's gradient sums terms that cancel across a softmax row, and Triton's backward (like flash attention's)
    # takes rowsum(dO * O) from the output it computed with P rounded to the inputs' dtype: in bf16 such a sum is
    # off by a fraction of its terms, not of itself. Norms below a tenth of the layer's largest count as that tenth.
    floor = 0.1 * max(w.norm() for w in want[3:])
    for parameter, g, w in zip(ours, got[3:], want[3:], strict=True):
        assert g.dtype == dtype
        error = (g.double() - w.reshape(g.shape)).norm() / max(w.norm(), floor)
        tolerance = WEIGHT_TOLERANCE[mlp, dtype]
        assert error < tolerance, (f"gradient of {names[id(parameter)]}: norm-wise error {error:.2e} >= "
                                   f"{tolerance:.0e} (seed {seed})")


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
