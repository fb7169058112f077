"""Worker of tests/test_fsdp2.py's FSDP1 case, run by ``torch.distributed.run`` on two CPU processes (gloo).

Wraps a patched Llama (a stock class: its scorers are saved as an adapter) in FSDP1 with ``use_orig_params=True``,
whose parameters are flat 1-D shards, and saves the adapter from the full state dict, as ``NeuralAttentionTrainer``
does. Prints one JSON line on rank 0: whether the saved weights equal the unwrapped model's.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import tempfile

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
from transformers import LlamaConfig, LlamaForCausalLM

import hf_neural_attention as hna
from hf_neural_attention.adapters import WEIGHTS_NAME, adapter_state_dict


def main() -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))  # fmt: skip
    hna.patch_model(model, layers=[0], proj_dim=4)
    expected = adapter_state_dict(model)
    full = {name: value.detach().clone() for name, value in model.state_dict().items()}
    flat = FullyShardedDataParallel(copy.deepcopy(model), use_orig_params=False, device_id=torch.device("cpu"))
    wrapped = FullyShardedDataParallel(model, use_orig_params=True, device_id=torch.device("cpu"),
                                       sharding_strategy=ShardingStrategy.FULL_SHARD)  # fmt: skip
    if dist.get_rank() == 0:
        shard_shapes = sorted({tuple(p.shape) for n, p in wrapped.named_parameters() if "neural_scorer" in n})
        with tempfile.TemporaryDirectory() as directory:
            hna.save_neural_adapter(wrapped, directory, base_model="base", state_dict=full)
            saved = load_file(os.path.join(directory, WEIGHTS_NAME))
        try:  # its scorers own no parameters: refused, saying why (it said "weights missing" once)
            with tempfile.TemporaryDirectory() as directory:
                hna.save_neural_adapter(flat, directory, base_model="base", state_dict=full)
            flat_error = None
        except ValueError as error:
            flat_error = str(error)
        report = dict(shard_shapes=shard_shapes, names_equal=sorted(saved) == sorted(expected),
                      values_equal=all(torch.equal(saved[k], expected[k]) for k in expected),
                      flat_error=flat_error)  # fmt: skip
        print(json.dumps(report), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)  # skip finalisation of torch's C++ statics (gloo), as fsdp2_worker does
