"""Strided sliding-window perplexity of a fixed-length causal LM over one long token stream.

The standard method for fixed-length models (Transformers docs, "Perplexity of fixed-length models"): windows of
``max_length`` tokens advance by ``stride`` tokens; each window scores only the tokens not scored by the previous
window, so every token is scored exactly once and, after the first window, with at least
``max_length - stride`` tokens of context. Unlike the docs' loop, which averages the per-window mean losses,
this sums token NLLs and divides by the token count (exact token weighting, also for the shorter last window).

The paper's authors instead averaged the loss over overlapping windows: tokens are counted several times and
many are scored with short context, so their numbers are higher than ours for the same model and not comparable.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def window_plan(num_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, first_scored)`` per window: tokens ``first_scored..end-1`` are predicted in that window.

    The first window scores tokens ``1..max_length-1`` (token 0 has no context and is never scored); each later
    window ends ``stride`` tokens further and scores only its last ``stride`` tokens, each with at least
    ``max_length - stride`` tokens of context. Every other token is scored exactly once. ``stride`` must be below
    ``max_length``: at ``stride == max_length`` (no overlap) the first token of each window would have no context.
    """
    if not 0 < stride < max_length:
        raise ValueError(
            f"sliding-window stride must be in 1..max_length-1 ({max_length - 1}), got {stride}: each scored token "
            f"needs its predecessor inside the window."
        )
    if num_tokens < 2:
        return []
    end = min(max_length, num_tokens)
    plan = [(0, end, 1)]
    while end < num_tokens:
        previous_end, end = end, min(end + stride, num_tokens)
        plan.append((end - max_length, end, previous_end))
    return plan


@torch.no_grad()
def sliding_window_nll(
    model: Any,
    input_ids: torch.Tensor,
    max_length: int,
    stride: int,
    batch_size: int = 8,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
) -> tuple[float, int]:
    """Summed NLL (nats) and number of scored tokens for this process's share of the windows.

    Windows are dealt round-robin to ``world_size`` processes; every process runs the same number of forward
    passes (padding with empty batches) so that sharded wrappers (FSDP) stay in step. Sum the results over
    processes to get the corpus totals.
    """
    plan = window_plan(int(input_ids.numel()), max_length, stride)
    mine = plan[rank::world_size]
    steps = -(-len(plan[0::world_size]) // batch_size) if plan else 0  # same count on every rank
    total_nll = torch.zeros((), dtype=torch.float64)
    total_tokens = 0
    was_training = model.training
    model.eval()
    for step in range(steps):
        chunk = mine[step * batch_size : (step + 1) * batch_size]
        if not chunk:  # keep collective-communicating wrappers in step
            chunk, dummy = [plan[0]], True
        else:
            dummy = False
        width = max(end - begin for begin, end, _ in chunk)
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        score = torch.zeros((len(chunk), width), dtype=torch.bool)
        for row, (begin, end, first) in enumerate(chunk):
            ids[row, : end - begin] = input_ids[begin:end]
            mask[row, : end - begin] = 1
            score[row, first - begin : end - begin] = True
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        nll = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1).to(device), reduction="none"
        ).view(len(chunk), width - 1)
        scored = score[:, 1:].to(device)
        if not dummy:
            total_nll += (nll * scored).sum().double().cpu()
            total_tokens += int(scored.sum())
    model.train(was_training)
    return float(total_nll), total_tokens
