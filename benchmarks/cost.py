"""A cost model of layer-pipelined and data-parallel CFF training: predicted epoch time and speed-up.

With K stage groups of equal cost c and N batches, a pipeline needs K + N - 1 group-steps instead of K·N (CFF paper,
Sec. 5.1), a speed-up of K·N / (K + N - 1). Real groups are unequal and activations take time to move, so
``simulate_pipeline`` replays the schedule that ``PipelineWorker`` runs, batch by batch:

- group g starts batch b once it has finished batch b - 1 and batch b has arrived from group g - 1;
- a transfer starts when the sender has the activation and the receiver asks for it (point-to-point sends of gloo and
  NCCL meet the matching receive), and it holds the receiver for ``size / bandwidth``;
- a sender may have at most ``max_in_flight`` sends outstanding;
- with data-parallel replicas, each group's gradient all-reduce ends its step.

``simulate_wavefront`` models ``PipelineTrainer`` (one process, one host sync per step). ``vit_stage_flops`` and
``ring_allreduce_time`` turn model shapes into the inputs. Every time is in seconds.
"""
from collections.abc import Sequence

__all__ = ['simulate_pipeline', 'simulate_wavefront', 'sequential_time', 'ring_allreduce_time', 'vit_stage_flops',
           'vit_stage_params', 'group_costs']


def sequential_time(stage_costs: Sequence[float], num_batches: int) -> float:
    """One device, stage after stage: ``N · Σ_l c_l``."""
    return num_batches * sum(stage_costs)


def group_costs(stage_costs: Sequence[float], stage_counts: Sequence[int]) -> list[float]:
    """Per-group step time: the sum of its stages' costs."""
    bounds = [0]
    for count in stage_counts:
        bounds.append(bounds[-1] + count)
    return [sum(stage_costs[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def simulate_pipeline(costs: Sequence[float], num_batches: int, transfers: Sequence[float] | None = None,
                      reduces: Sequence[float] | None = None, max_in_flight: int = 2) -> float:
    """Epoch time of the multi-process pipeline (``PipelineWorker``), drained at the end.

    Args:
        costs: ``[K]`` step time of each group on one batch (forward, loss, backward, optimizer step).
        num_batches: N.
        transfers: ``[K - 1]`` time to move a batch from group g to g + 1 (0 by default).
        reduces: ``[K]`` gradient all-reduce time per step of each group, with replicas (0 by default).
        max_in_flight: sends a group may have outstanding before it waits.
    """
    k = len(costs)
    transfers = list(transfers) if transfers is not None else [0.0] * (k - 1)
    reduces = list(reduces) if reduces is not None else [0.0] * k
    if len(transfers) != k - 1 or len(reduces) != k:
        raise ValueError(f'{k} groups need {k - 1} transfer times and {k} reduce times.')
    finish = [[0.0] * num_batches for _ in range(k)]  # finish[g][b]: group g is done with batch b
    received = [[0.0] * num_batches for _ in range(k)]  # received[g][b]: batch b has reached group g
    for b in range(num_batches):
        for g in range(k):
            start = finish[g][b - 1] if b else 0.0
            if g > 0:  # the transfer needs the sender's output and the receiver's request
                received[g][b] = max(finish[g - 1][b], start) + transfers[g - 1]
                start = received[g][b]
            if g < k - 1 and b > max_in_flight:  # a full send queue: wait for the oldest send to complete
                start = max(start, received[g + 1][b - 1 - max_in_flight])
            finish[g][b] = start + costs[g] + reduces[g]
    return max(row[-1] for row in finish) if num_batches else 0.0


def simulate_wavefront(costs: Sequence[float], num_batches: int, transfers: Sequence[float] | None = None) -> float:
    """Epoch time of the one-process pipeline (``PipelineTrainer``): K + N - 1 steps, each as long as its slowest
    active group plus that group's incoming transfer."""
    k = len(costs)
    transfers = [0.0] + (list(transfers) if transfers is not None else [0.0] * (k - 1))
    total = 0.0
    for step in range(k + num_batches - 1):
        active = [g for g in range(k) if 0 <= step - g < num_batches]
        total += max(costs[g] + transfers[g] for g in active)
    return total


def ring_allreduce_time(num_bytes: float, replicas: int, bandwidth: float, latency: float = 0.0) -> float:
    """A ring all-reduce of ``num_bytes`` over ``replicas`` links of ``bandwidth`` bytes/s: 2(R - 1)/R of the data
    crosses each link, in 2(R - 1) hops."""
    if replicas <= 1:
        return 0.0
    return 2 * (replicas - 1) / replicas * num_bytes / bandwidth + 2 * (replicas - 1) * latency


def vit_stage_params(embed_dim: int, depth: int, mlp_ratio: float = 4.0, patch_size: int = 16,
                     num_tokens: int = 196, in_chans: int = 3) -> list[int]:
    """Parameters per stage of a ViT (stage 0 adds the patch projection and the position embedding)."""
    d, hidden = embed_dim, int(embed_dim * mlp_ratio)
    block = 4 * d * d + 4 * d + 2 * d * hidden + hidden + d + 4 * d  # qkv, proj, fc1, fc2 (+ biases), two norms
    stem = in_chans * patch_size ** 2 * d + d + num_tokens * d
    return [block + stem] + [block] * (depth - 1)


def vit_stage_flops(embed_dim: int, depth: int, num_tokens: int, mlp_ratio: float = 4.0, patch_size: int = 16,
                    in_chans: int = 3) -> list[float]:
    """Training FLOPs per image and stage (forward + backward ≈ 3 x forward; the stem needs no input gradient).

    A block's forward costs 2·T·(4D² + 2·r·D²) for its matrix products and 4·T²·D for attention.
    """
    d, t = embed_dim, num_tokens
    block = 3 * (2 * t * (4 * d * d + 2 * mlp_ratio * d * d) + 4 * t * t * d)
    stem = 2 * 2 * t * in_chans * patch_size ** 2 * d  # forward + weight gradient
    return [block + stem] + [block] * (depth - 1)
