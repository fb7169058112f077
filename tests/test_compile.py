"""torch.compile: every backend (Triton through its CPU interpreter) traces without a graph break
(``fullgraph=True``), in training (dropout on, padded batch), evaluation and over changing sequence lengths, and the
compiled model computes what the uncompiled one does, gradients included.

The fused kernels run as torch custom ops (``kernels_neural_attention.kernel_op``); ``torch.library.opcheck`` checks
each op's schema, fake (meta) function and aliasing on real inputs.
"""

from __future__ import annotations

import copy
import importlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from hf_neural_attention import NeuralAttentionConfig, patch_model
from hf_neural_attention import cpp_neural_attention as cpp
from hf_neural_attention import fused_cpp_neural_attention as fused
from hf_neural_attention import kernels_neural_attention as kernels
from hf_neural_attention import tiled_neural_attention as tiled
from hf_neural_attention import triton_neural_attention as triton
from tests.models import random_ids, tiny_gpt2, tiny_vit


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # every test compiles GPT-2's forward anew: without a reset the cache entries of the earlier tests count towards
    # dynamo's recompile limit, which fullgraph=True turns into a hard failure
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


needs_triton = pytest.mark.skipif(not triton.triton_is_usable(), reason="triton not installed")
needs_cpp = pytest.mark.skipif(not cpp.cpp_available() or not fused.fused_cpp_available(),
                               reason="C++ extensions not built (no compiler?)")


def _padded_batch() -> dict:
    ids = random_ids(2, 12, seed=3)
    attention_mask = torch.ones_like(ids)
    attention_mask[0, :4] = 0  # left padding: rows that see nothing but themselves, keys no query sees
    return {"input_ids": ids, "attention_mask": attention_mask}


def _loss_and_grads(model, inputs: dict, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout draws in both runs
    out = model(**inputs)
    logits = out.logits
    loss = logits.float().square().mean()
    loss.backward()
    grads = {name.removeprefix("_orig_mod."): p.grad.clone() for name, p in model.named_parameters()
             if p.grad is not None}
    return loss.detach(), grads


def _assert_same_training_step(model, compiled, inputs: dict, *, atol: float) -> None:
    loss, grads = _loss_and_grads(model, inputs, seed=11)
    compiled_loss, compiled_grads = _loss_and_grads(compiled, inputs, seed=11)
    torch.testing.assert_close(compiled_loss, loss, rtol=0, atol=atol)
    assert compiled_grads.keys() == grads.keys()
    scorer_grads = [name for name in grads if "neural_scorer" in name]
    assert scorer_grads, "the neural scorer got no gradient"
    for name, grad in grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=atol, msg=name)


@pytest.mark.parametrize("backend", ["eager", "tiled", pytest.param("cpp", marks=needs_cpp),
                                     pytest.param("triton", marks=needs_triton)])  # triton: its CPU interpreter
@pytest.mark.parametrize("mlp", ["paper", "authors"])
def test_fullgraph_training_step_matches_eager_mode(backend, mlp):
    # training mode: GPT-2's attention dropout (0.1) runs inside the neural kernels, seeded from torch's generator;
    # aot_eager traces exactly what inductor would (dynamo + AOT autograd, the ops' fake functions) and runs the
    # traced graph op by op, so the two runs draw the same random numbers
    model = patch_model(tiny_gpt2(seed=2), layers=[0, 2], config=NeuralAttentionConfig(backend=backend, mlp=mlp))
    model.train()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    _assert_same_training_step(model, compiled, _padded_batch(), atol=1e-6)


@pytest.mark.parametrize("backend", ["tiled", pytest.param("cpp", marks=needs_cpp)])
def test_fullgraph_training_step_of_an_eager_model(backend):
    # a model patched from eager builds eager's additive float masks: whether one is a plain 0 / -inf mask needs its
    # values, so under compile its zeros go in as a score bias instead (that test broke the graph)
    model = tiny_gpt2(seed=2)
    model.set_attn_implementation("eager")
    model = patch_model(model, layers=[0], config=NeuralAttentionConfig(backend=backend))
    model.train()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    _assert_same_training_step(model, compiled, _padded_batch(), atol=1e-6)


@pytest.mark.skipif(torch.__version__ < "2.13", reason="dynamo before 2.13 cannot trace T5's own config deepcopy")
def test_fullgraph_encoder_decoder_matches_eager_mode():
    # T5 (like BART and Whisper) builds its cache inside forward from a deep copy of its config, which copies the
    # implementation's name too: inside the graph, where constructing one cannot be traced
    from tests.models import tiny_t5

    model = patch_model(tiny_t5().eval(), layers=[0], backend="tiled")
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    inputs = {**_padded_batch(), "decoder_input_ids": random_ids(2, 5, seed=4)}
    with torch.no_grad():
        torch.testing.assert_close(compiled(**inputs).logits, model(**inputs).logits, rtol=0, atol=1e-6)


def test_fullgraph_model_without_an_output_collector():
    # ViTMAE (like LongT5) never sets transformers' output collector, whose ContextVar dynamo cannot read
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    config = ViTMAEConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                          image_size=16, patch_size=4, decoder_hidden_size=32, decoder_num_hidden_layers=1,
                          decoder_num_attention_heads=4, decoder_intermediate_size=48)
    model = patch_model(ViTMAEForPreTraining(config).eval(), layers=[0], backend="tiled")
    inputs = {"pixel_values": torch.randn(2, 3, 16, 16), "noise": torch.rand(2, 16)}
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(**inputs).logits, model(**inputs).logits, rtol=0, atol=1e-6)


def test_a_compiled_model_follows_a_later_switch_of_its_fallback():
    # Llama has no Hub class: its forward pre-hook applies a stock set_attn_implementation inside the compiled region,
    # where everything it reads or writes must trace (a str subclass as the implementation's name did not)
    from tests.models import tiny_llama

    model = patch_model(tiny_llama(), layers=[0], backend="tiled")
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    padded = _padded_batch()
    with torch.no_grad():
        compiled(**padded)
        model.set_attn_implementation("eager")
        got = compiled(**padded).logits
        torch.testing.assert_close(got, model(**padded).logits, rtol=0, atol=1e-6)
        if torch.__version__ >= "2.13":  # dynamo 2.9 drops the hook's write of this attribute (README: known limit)
            assert model.config._neural_attention_fallback == "eager"


@pytest.mark.parametrize("backend", ["eager", "tiled", pytest.param("cpp", marks=needs_cpp)])
@pytest.mark.parametrize("mlp", ["paper", "authors"])
def test_one_graph_serves_every_sequence_length(backend, mlp):
    # decoding and variable-length batches: the kernels are single ops, so after one recompile with symbolic lengths
    # every further length reuses the graph (an unrolled tile loop would compile one graph per length and, past
    # dynamo's recompile limit of 8, fail under fullgraph=True)
    model = patch_model(tiny_gpt2(seed=7), layers=[0], config=NeuralAttentionConfig(backend=backend, mlp=mlp))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        for length in range(3, 15):
            ids = random_ids(2, length, seed=length)
            torch.testing.assert_close(compiled(ids).logits, model(ids).logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", ["tiled", pytest.param("cpp", marks=needs_cpp)])
def test_fullgraph_vit_evaluation_matches_eager_mode(backend):
    model = patch_model(tiny_vit(seed=4), layers=[0], config=NeuralAttentionConfig(backend=backend))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    pixels = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(compiled(pixel_values=pixels).logits, model(pixel_values=pixels).logits,
                                   rtol=0, atol=1e-6)


@needs_cpp
def test_inductor_compiles_the_default_cpu_backend():
    # the default compiler: generated C++ around the fused kernel, which stays one opaque call
    model = patch_model(tiny_gpt2(seed=6), layers=[0])  # backend "auto": the fused C++ kernel on CPU
    compiled = torch.compile(model, fullgraph=True)
    _assert_same_training_step(model, compiled, _padded_batch(), atol=1e-5)


@needs_cpp  # (a C++ compiler, which inductor needs too)
@pytest.mark.parametrize("backend", ["tiled", "cpp"])
def test_inductor_decodes_a_padded_batch_from_a_dynamic_cache(backend):
    # one token against a DynamicCache, left padding, symbolic lengths: the bool mask transformers builds from the 2-D
    # padding mask was recomputed, bounds checked, in the kernels that zero the rows of the keys no query sees, and
    # inductor's C++ code used the check's index before declaring it ("'tmp1' was not declared in this scope")
    model = patch_model(tiny_gpt2(seed=8), layers=[0], config=NeuralAttentionConfig(backend=backend, proj_dim=4))
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    batch = _padded_batch()
    ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        prompt = model(ids[:, :-1], attention_mask=attention_mask[:, :-1], position_ids=positions[:, :-1])
        step = {"input_ids": ids[:, -1:], "attention_mask": attention_mask, "position_ids": positions[:, -1:]}
        expected = model(**step, past_key_values=copy.deepcopy(prompt.past_key_values)).logits
        decoded = compiled(**step, past_key_values=prompt.past_key_values).logits
    torch.testing.assert_close(decoded, expected, rtol=0, atol=1e-5)


@needs_cpp
def test_a_fresh_process_compiles_before_any_kernel_is_loaded():
    # the first call of a process, traced: loading the C++ extensions takes a lock, which dynamo cannot enter; the
    # availability check runs outside the trace (assume_constant_result), the tiled C++ scorers inside their op
    script = textwrap.dedent("""
        import sys, torch
        from hf_neural_attention import NeuralAttentionConfig, patch_model
        from tests.models import random_ids, tiny_gpt2
        torch.set_num_threads(1)
        for mlp in ("paper", "authors"):
            model = patch_model(tiny_gpt2(seed=3), layers=[0], config=NeuralAttentionConfig(mlp=mlp, backend="cpp"))
            ids = random_ids(2, 9)
            compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(ids).logits
            torch.testing.assert_close(compiled, model(ids).logits, rtol=0, atol=1e-6)
        print("compiled-first-ok")
    """)
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0 and "compiled-first-ok" in done.stdout, done.stderr[-3000:]


# --- the custom ops themselves ----------------------------------------------------------------------------------
def _rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _op_inputs(mlp: str) -> tuple[list[torch.Tensor | None], torch.Tensor]:
    """The kernel ops' eight differentiable inputs with the dot term (the authors' MLP with its second layer) and a
    padding-like mask: every optional input present. batch 1, where a transposed view keeps its odd strides."""
    batch, heads, q_len, k_len, hidden, v_dim, head_dim = 1, 2, 5, 7, 4, 3, 6
    inputs = [_rand(batch, heads, q_len, hidden, seed=1), _rand(batch, heads, k_len, hidden, seed=2),
              _rand(batch, heads, k_len, v_dim, seed=3), _rand(heads, hidden, seed=4), None, None,
              _rand(batch, heads, q_len, head_dim, seed=5), _rand(batch, heads, k_len, head_dim, seed=6)]
    if mlp == "authors":
        inputs[3:6] = [_rand(heads, 6, seed=7), _rand(heads, 6, hidden, seed=8), _rand(heads, 6, seed=9)]
    # the dot query as transformers hands it over: (batch, q_len, heads, head_dim) transposed, not contiguous
    inputs[6] = _rand(batch, q_len, heads, head_dim, seed=5).transpose(1, 2)
    return inputs, torch.rand(batch, 1, q_len, k_len, generator=torch.Generator().manual_seed(10)) > 0.3


@needs_cpp
@pytest.mark.parametrize("act", [0, 1])  # relu (signed-max operands, cvec), gelu (plain operands)
@pytest.mark.parametrize("bias_shape", [None, (1, 2, 9, 70), (1, 1, 1, 70)])  # none, T5's, a soft padding mask
def test_fused_ops_pass_opcheck(act, bias_shape):
    G, q_len, k_len, hidden, v_dim, batch, heads = 4, 9, 70, 4, 3, 2, 2
    A, Bt, V = _rand(G, q_len, hidden, seed=1), _rand(G, hidden, k_len, seed=2), _rand(G, k_len, v_dim, seed=3)
    w = _rand(G, hidden, seed=4)
    cvec = _rand(G, k_len, seed=5) if act == 0 else torch.empty(0)
    mask = torch.rand(batch, heads, q_len, k_len, generator=torch.Generator().manual_seed(6)) > 0.3
    bias = None if bias_shape is None else _rand(*bias_shape, seed=12)
    seed = torch.tensor(123, dtype=torch.int64)
    forward_args = (A, Bt, V, w, None, None, mask, bias, cvec, batch, heads, False, 1.0, act, 64, 0.25, seed)
    torch.library.opcheck(fused._fused_forward.op, forward_args)
    _, stats = fused._fused_forward(*forward_args)
    dO, D = _rand(G, q_len, v_dim, seed=7), _rand(G, q_len, seed=8)
    # a fixed bias (ALiBi, a float mask) gets no dS buffer; a learned one shared by the batch gets it whole or one
    # batch row per run, summed over the batch
    for bias_grad, rows in {(False, batch), (bias is not None, batch), (bias is not None, 1)}:
        backward_args = (A, A.transpose(1, 2).contiguous(), Bt.transpose(1, 2).contiguous(), Bt, V, w, None, None,
                         mask, bias, bias_grad, rows, cvec, stats, dO, D, batch, heads, False, 1.0, act, 64, 0.25,
                         seed)  # fmt: skip
        torch.library.opcheck(fused._fused_backward.op, backward_args)


@pytest.mark.parametrize("scorers", ["torch", pytest.param("cpp", marks=needs_cpp)])
@pytest.mark.parametrize("mlp,bias_shape", [("paper", None), ("authors", None), ("paper", (1, 2, 5, 7)),
                                            ("authors", (1, 1, 1, 7))])
def test_tiled_ops_pass_opcheck(scorers, mlp, bias_shape):
    forward_op, backward_op = tiled.tiled_ops(cpp._cpp_scorer_factory if scorers == "cpp" else None)
    inputs, mask = _op_inputs(mlp)
    bias = None if bias_shape is None else _rand(*bias_shape, seed=12)  # a score bias (T5's position bias)
    sinks = None if bias_shape is None else _rand(1, 2, 1, 1, seed=13)  # attention sinks (gpt-oss)
    settings = ("relu", False, 0.4, 0.2, torch.tensor(77), [4, 4], 1.5)  # the last: a soft-cap (Gemma 2)
    torch.library.opcheck(forward_op.op, (*inputs, mask, bias, sinks, *settings))
    out, stats = forward_op(*inputs, mask, bias, sinks, *settings)
    grad_out = _rand(*out.shape, seed=11)
    for bias_grad in {False, bias is not None}:  # a fixed bias (ALiBi, a float mask) gets no gradient computed
        torch.library.opcheck(backward_op.op, (*inputs, mask, bias, sinks, bias_grad, out, stats, grad_out,
                                               *settings))  # fmt: skip


@needs_triton
@pytest.mark.parametrize("mlp,half_mlp,bias_shape", [("paper", False, None), ("paper", True, None),
                                                     ("authors", False, None), ("paper", True, (1, 2, 5, 7)),
                                                     ("authors", False, (1, 1, 1, 7))])
def test_triton_ops_pass_opcheck(mlp, half_mlp, bias_shape):
    inputs, mask = _op_inputs(mlp)
    bias = None if bias_shape is None else _rand(*bias_shape, seed=12)  # a score bias (T5's position bias)
    launch = [-1] * (len(triton._LAUNCH_KEYS) - 1) + [1 if half_mlp else -1]  # defaults; the last: half_mlp
    settings = ("relu", False, 0.4, 0.2, torch.tensor(77), 0.0 if bias_shape is None else 1.5)  # the last: softcap
    torch.library.opcheck(triton._triton_forward.op, (*inputs, bias, mask, *settings, launch))
    out, stats = triton._triton_forward(*inputs, bias, mask, *settings, launch)
    grad_out = _rand(*out.shape, seed=11)
    for bias_grad in {False, bias is not None}:  # a fixed bias (ALiBi, a float mask) gets no dS buffer
        torch.library.opcheck(triton._triton_backward.op,
                              (*inputs, bias, mask, out, stats, grad_out, *settings, bias_grad, launch))


def test_user_scorer_factories_get_ops_of_their_own():
    # two factories from one module (lambdas, closures) must not share an op: each op runs its own factory
    def scaled(factor):
        def factory(At, Bt, w, W2, b2, activation, need_grad):
            return tiled._PaperScorer(At, Bt, w * factor, activation, need_grad)
        return factory

    inputs, mask = _op_inputs("paper")
    args = [t.detach() if t is not None else None for t in inputs[:6]]
    plain, doubled = scaled(1.0), scaled(2.0)
    outs = {}
    for name, factory in (("plain", plain), ("doubled", doubled)):
        run = torch.compile(lambda *a, f=factory: tiled.neural_attention_tiled(*a, mask=mask, scorer_factory=f),
                            fullgraph=True, backend="aot_eager")
        tiled.tiled_ops(factory)  # registered outside the trace
        outs[name] = run(*args)
        torch.testing.assert_close(outs[name], tiled.neural_attention_tiled(*args, mask=mask, scorer_factory=factory))
    assert not torch.allclose(outs["plain"], outs["doubled"])
    unregistered = scaled(3.0)
    with pytest.raises(Exception, match=r"tiled_ops\(scorer_factory\) once before compiling"):
        torch.compile(lambda *a: tiled.neural_attention_tiled(*a, scorer_factory=unregistered), fullgraph=True,
                      backend="aot_eager")(*args)


def test_seed_tensor_draws_only_with_dropout():
    torch.manual_seed(0)
    state = torch.get_rng_state()
    assert int(kernels.seed_tensor(0.0, None)) == 0
    assert torch.equal(torch.get_rng_state(), state)  # no dropout: the caller's random stream is untouched
    drawn = kernels.seed_tensor(0.1, None)
    assert drawn.dtype == torch.int64 and drawn.dim() == 0 and 0 <= int(drawn) < 2**62
    assert int(kernels.seed_tensor(0.1, -1)) == 2**63 - 1  # kept to 63 bits, an int or a tensor alike
    assert int(kernels.seed_tensor(0.1, torch.tensor(-1))) == 2**63 - 1


@needs_cpp
def test_a_hub_checkpoints_kernel_copies_reuse_the_registered_ops(tmp_path, monkeypatch):
    # a process that loaded a checkpoint with trust_remote_code before importing the plugin holds two copies of the
    # kernel files (transformers imports the checkpoint's as a package of its own); the copy's ops have the same
    # names and must be reused, not registered twice (which torch refuses)
    model = patch_model(tiny_gpt2(seed=8), layers=[0], config=NeuralAttentionConfig(backend="cpp"))
    model.save_pretrained(tmp_path / "checkpoint_copy")
    (tmp_path / "checkpoint_copy" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    copy = importlib.import_module("checkpoint_copy.fused_cpp_neural_attention")
    assert copy is not fused and copy._fused_forward.op is fused._fused_forward.op
    args = [_rand(1, 2, 9, 4, seed=s) for s in (1, 2, 3)] + [_rand(2, 4, seed=4)]
    kwargs = {"causal": True, "dropout_p": 0.2, "generator_seed": 5}
    torch.testing.assert_close(copy.neural_attention_fused_cpp(*args, **kwargs),
                               fused.neural_attention_fused_cpp(*args, **kwargs), rtol=0, atol=0)
