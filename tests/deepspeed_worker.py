"""Worker of tests/test_deepspeed.py, run by ``torch.distributed.run`` on CPU processes (DeepSpeed's CPU accelerator,
gloo).

Trains a patched GPT-2 (neural attention in layer 0) for a few SGD steps under the DeepSpeed engine at the ZeRO
stage given on the command line, each rank on its half of a batch, and prints on rank 0 one JSON line: the mean
loss per step, whether the scorer's parameters were partitioned (ZeRO-3 leaves each rank an empty shard until a
forward gathers it) and how training changed the scorer's weights (gathered), and the same as read back from an adapter
saved from the gathered state dict (ZeRO-3: ``save_neural_adapter`` without it must refuse, writing nothing).

The scorer's weights are read by the attention function, not by a forward of the scorer module; ZeRO-3 has to
gather them all the same, which is what the test checks by comparing the stages.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import tempfile
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel

import hf_neural_attention as hna


def main(stage: int, steps: int = 3) -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=64, vocab_size=128, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    model = hna.patch_model(GPT2LMHeadModel(config), layers=[0], proj_dim=4)
    initial = {name: p.detach().clone() for name, p in model.transformer.h[0].attn.neural_scorer.named_parameters()}
    ds_config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                 # threshold 0: ZeRO-3 keeps even the scorer's small parameters partitioned between forwards
                 "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
                 "zero_allow_untested_optimizer": True}  # fmt: skip
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    scorer = engine.module.transformer.h[0].attn.neural_scorer
    partitioned = any(p.numel() == 0 for p in scorer.parameters())

    ids = torch.randint(0, 128, (2 * world, 32), generator=torch.Generator().manual_seed(1))
    halves = ids.chunk(world)
    losses = []
    for _ in range(steps):
        loss = engine(halves[rank], labels=halves[rank]).loss
        engine.backward(loss)
        engine.step()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        losses.append(mean_loss.item() / world)

    with deepspeed.zero.GatheredParameters(list(scorer.parameters())):  # a no-op below ZeRO-3
        trained = {name: p.detach().clone() for name, p in scorer.named_parameters()}
    # what Trainer.save_model hands _save: every rank takes part in gathering, rank 0 gets the values
    state_dict = engine._zero3_consolidated_16bit_state_dict() if stage == 3 else engine.module.state_dict()
    if rank == 0:  # the updates, not the weights: at GPT-2's init they move the scorer by only ~1e-4
        updates = {name: (trained[name] - initial[name]).flatten().tolist() for name in initial}
        with tempfile.TemporaryDirectory() as directory:
            sharded = any(p.numel() == 0 for p in scorer.parameters())
            refused = False
            try:
                hna.save_neural_adapter(engine.module, Path(directory) / "without")
            except ValueError:
                refused = not (Path(directory) / "without").exists()
            hna.save_neural_adapter(engine.module, directory, state_dict=state_dict)
            saved = load_file(Path(directory) / "neural_adapter.safetensors")
        prefix = "h.0.attn.neural_scorer."
        adapter_updates = {name: (saved[prefix + name].float() - initial[name]).flatten().tolist() for name in initial}
        report = dict(losses=losses, partitioned=partitioned, scorer_updates=updates, adapter_updates=adapter_updates,
                      sharded_at_save=sharded, refused_without_state_dict=refused)
        print(json.dumps(report), flush=True)
    del engine, optimizer, model, scorer
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # past gloo's and DeepSpeed's teardown of C++ statics (see tests/fsdp2_worker.py)
