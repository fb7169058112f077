"""Worker of tests/test_fsdp2.py, run by ``torch.distributed.run`` on CPU processes (gloo).

Shards a patched GPT-2 (neural attention in layer 0) with FSDP2 (``fully_shard`` per block, as the shipped
``recipes/configs/fsdp.yaml`` wraps ``_no_split_modules``), trains a few SGD steps on each rank's half of a batch and
checks, on rank 0, that losses and the gathered full state dict equal an unsharded copy trained on the whole batch
(the mean of the halves' losses, which is what data-parallel gradient averaging computes). Prints one JSON line.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import GPT2Config, GPT2LMHeadModel

import hf_neural_attention as hna


def main(backend: str, steps: int = 3) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=64, vocab_size=128, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    single = GPT2LMHeadModel(config)
    hna.patch_model(single, layers=[0], proj_dim=4, backend=backend)
    sharded = copy.deepcopy(single)
    initial = copy.deepcopy(single.state_dict())
    mesh = init_device_mesh("cpu", (world,))
    for block in sharded.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(sharded, mesh=mesh)

    ids = torch.randint(0, 128, (2 * world, 32), generator=torch.Generator().manual_seed(1))
    halves = ids.chunk(world)
    opt_sharded = torch.optim.SGD(sharded.parameters(), lr=0.5)
    opt_single = torch.optim.SGD(single.parameters(), lr=0.5)
    losses = []
    for _ in range(steps):
        loss = sharded(halves[rank], labels=halves[rank]).loss
        loss.backward()
        opt_sharded.step()
        opt_sharded.zero_grad()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        ref = sum(single(h, labels=h).loss for h in halves) / world
        ref.backward()
        opt_single.step()
        opt_single.zero_grad()
        losses.append((mean_loss.item() / world, ref.item()))

    full = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        reference = single.state_dict()
        diffs = {k: (full[k] - reference[k]).abs().max().item() for k in reference if k in full}
        scorer_keys = [k for k in reference if "neural_scorer" in k]
        # each scorer weight's difference against how far training moved it: its update may be as small as 1e-5
        updates = {k: (reference[k] - initial[k]).abs().max().item() for k in scorer_keys}
        report = dict(losses=losses, missing=sorted(set(reference) - set(full)), scorer_keys=scorer_keys,
                      max_diff=max(diffs.values()), scorer_diffs={k: diffs[k] for k in scorer_keys},
                      scorer_updates=updates)  # fmt: skip
        print(json.dumps(report), flush=True)
    # Orderly shutdown: drop everything that holds the process group (FSDP state, the mesh), then destroy it while
    # the interpreter is fully alive. Gloo's worker threads outliving that into interpreter finalisation abort the
    # process ("terminate called without an active exception", seen once in CI after the results were printed).
    del sharded, opt_sharded, mesh, full
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip finalisation of torch's C++ statics (gloo); everything the test checks is printed above
