"""Scale-out for layer-local training: layer pipelines over devices and processes, and data-parallel replicas.

Layer-local training has no backward dependency between stages, so stage groups can train concurrently while
batches stream through them (CFF paper, Sec. 5.1): ``PipelineTrainer`` over the devices of one process,
``PipelineWorker`` over ``torch.distributed`` ranks (launched with ``torchrun``), with data-parallel replicas of each
stage group. Both perform exactly the updates of sequential ``LocalTrainer`` training. ``cost`` predicts the speed-up.
"""
from .checkpoint import latest_checkpoint as latest_checkpoint
from .checkpoint import load_merged_state as load_merged_state
from .checkpoint import load_pipeline_checkpoint as load_pipeline_checkpoint
from .checkpoint import merge_stage_states as merge_stage_states
from .checkpoint import prune_checkpoints as prune_checkpoints
from .checkpoint import save_pipeline_checkpoint as save_pipeline_checkpoint
from .comm import PeerFailureError as PeerFailureError
from .comm import init_distributed as init_distributed
from .groups import StageGroup as StageGroup
from .groups import balance_stages as balance_stages
from .groups import measure_stage_costs as measure_stage_costs
from .groups import place_groups as place_groups
from .groups import stage_ranges as stage_ranges
from .local import PipelineTrainer as PipelineTrainer
from .replicas import GatheredLoss as GatheredLoss
from .worker import PipelineWorker as PipelineWorker

__all__ = [
    'PipelineTrainer', 'PipelineWorker', 'PeerFailureError', 'init_distributed', 'StageGroup', 'balance_stages',
    'measure_stage_costs', 'place_groups', 'stage_ranges', 'GatheredLoss', 'save_pipeline_checkpoint',
    'load_pipeline_checkpoint', 'latest_checkpoint', 'prune_checkpoints', 'merge_stage_states', 'load_merged_state',
]
