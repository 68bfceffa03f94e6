"""The one-process layer pipeline against sequential LocalTrainer (bit-identical), stage balancing against brute
force, and the cost model against closed forms, timm's parameter count and torch's FLOP counter."""
import copy
import itertools

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import make_batch, make_vit
from timm_cff import LocalTrainer, NonFiniteLossError
from timm_cff.pipeline import (PipelineTrainer, balance_stages, latest_checkpoint, measure_stage_costs,
                               merge_stage_states, prune_checkpoints, stage_ranges)
from cost import (group_costs, ring_allreduce_time, sequential_time, simulate_pipeline,
                                    simulate_wavefront, vit_stage_flops, vit_stage_params)

@pytest.fixture(autouse=True)
def single_thread():
    """Tiny models gain nothing from a second thread, and on a busy machine it costs them 10x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SCHEDULER = dict(sched='cosine', num_epochs=3, warmup_epochs=1, step_on_epochs=False, updates_per_epoch=4)


def _batches():
    return [make_batch(seed=s) for s in range(3)] + [make_batch(batch=4, seed=9)]  # a smaller last batch


def _trainer(model):
    return LocalTrainer(model, lr=1e-3, scheduler=SCHEDULER)


@pytest.mark.parametrize('stage_counts', [[4], [1, 3], [2, 1, 1]], ids=['1device', '2devices', '3devices'])
def test_pipeline_trainer_is_bit_identical_to_sequential(stage_counts):
    torch.manual_seed(0)
    model = make_vit(depth=4)
    sequential, pipelined = _trainer(copy.deepcopy(model)), _trainer(model)
    pipeline = PipelineTrainer(pipelined, ['cpu'] * len(stage_counts), stage_counts=stage_counts)
    for _ in range(2):
        assert pipeline.train_epoch(_batches()) == sequential.train_epoch(_batches())
        assert pipeline.num_steps == len(stage_counts) + len(_batches()) - 1  # K + N - 1
    assert pipeline.evaluate(_batches()) == sequential.evaluate(_batches())
    a, b = sequential.state_dict(), pipeline.state_dict()
    assert a['num_updates'] == b['num_updates'] == 8 and a['epoch'] == b['epoch'] == 2
    for key, value in a['model'].items():
        assert torch.equal(value, b['model'][key]), key
    for opt_a, opt_b in zip(a['optimizers'], b['optimizers']):
        for sa, sb in zip(opt_a['state'].values(), opt_b['state'].values(), strict=True):
            assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a['schedulers'] == b['schedulers']
    assert pipelined.optimizers[3].param_groups[0]['lr'] == sequential.optimizers[3].param_groups[0]['lr']


def test_pipeline_refuses_non_finite_loss_before_the_step_updates():
    torch.manual_seed(0)
    model = make_vit(depth=3)
    pipeline = PipelineTrainer(_trainer(model), ['cpu', 'cpu', 'cpu'], stage_counts=[1, 1, 1])
    batches = _batches()
    calls = []

    def poisoned_second_batch(features, labels, _loss=pipeline.trainer.losses[1]):
        calls.append(1)
        return _loss(features, labels) * (float('nan') if len(calls) == 2 else 1.0)
    pipeline.trainer.losses[1] = poisoned_second_batch
    before = {}

    def remember(index, *args, _step=pipeline.trainer.forward_backward_stage, **kwargs):
        if index == 0 and len(calls) == 1:  # step 2: group 0 runs batch 2 while group 1 runs the poisoned batch 1
            before.update({n: p.detach().clone() for n, p in model.named_parameters()})
        return _step(index, *args, **kwargs)
    pipeline.trainer.forward_backward_stage = remember
    with pytest.raises(NonFiniteLossError, match='stage 1, step 1'):
        pipeline.train_epoch(batches)
    for name, param in model.named_parameters():  # no group of the failing step updated
        assert torch.equal(before[name], param.detach()), name


def test_pipeline_refusals(vit):
    trainer = _trainer(vit)
    with pytest.raises(ValueError, match='must give each of the 2 devices a group'):
        PipelineTrainer(trainer, ['cpu', 'cpu'], stage_counts=[1, 1])
    with pytest.raises(ValueError, match='Cannot split 3 stages into 4 groups'):
        PipelineTrainer(trainer, ['cpu'] * 4)
    with pytest.raises(ValueError, match='at least one stage'):
        stage_ranges([2, 0, 1])


def test_merge_stage_states_refusals():
    def state(start, stop, epoch=1):
        return {'stages': [start, stop], 'model': {}, 'optimizers': {i: {} for i in range(start, stop)},
                'schedulers': {}, 'num_updates': 4 * epoch, 'epoch': epoch}
    merged = merge_stage_states([state(0, 1), state(1, 3)])
    assert len(merged['optimizers']) == 3 and merged['epoch'] == 1 and merged['schedulers'] == []
    with pytest.raises(ValueError, match='give every group once, in order'):
        merge_stage_states([state(1, 3), state(0, 1)])
    with pytest.raises(ValueError, match='different epochs'):
        merge_stage_states([state(0, 1), state(1, 3, epoch=2)])


def test_latest_and_prune_keep_complete_checkpoints(tmp_path):
    for epoch, complete in [(1, True), (2, True), (3, False), (4, True), (5, False)]:
        folder = tmp_path / f'epoch{epoch:04d}'
        folder.mkdir()
        if complete:
            (folder / 'complete.json').write_text(f'{{"epoch": {epoch}}}')
    (tmp_path / 'best').mkdir()
    (tmp_path / 'best' / 'complete.json').write_text('{"epoch": 2}')
    assert latest_checkpoint(tmp_path).name == 'epoch0004'  # epoch 5 was interrupted
    removed = prune_checkpoints(tmp_path, keep=2)
    assert sorted(d.name for d in removed) == ['epoch0001']
    assert sorted(d.name for d in tmp_path.iterdir()) == ['best', 'epoch0002', 'epoch0003', 'epoch0004', 'epoch0005']
    prune_checkpoints(tmp_path, keep=1)  # the interrupted epoch 3 goes with the older complete ones
    assert sorted(d.name for d in tmp_path.iterdir()) == ['best', 'epoch0004', 'epoch0005']
    assert latest_checkpoint(tmp_path / 'missing') is None


# ------------------------------------------------------------------------------------------------ balancing
def _brute_force(costs, num_groups):
    best = None
    for cuts in itertools.combinations(range(1, len(costs)), num_groups - 1):
        bounds = [0, *cuts, len(costs)]
        worst = max(sum(costs[a:b]) for a, b in zip(bounds[:-1], bounds[1:]))
        best = worst if best is None else min(best, worst)
    return best


@pytest.mark.parametrize('seed', range(5))
def test_balance_stages_is_optimal(seed):
    g = torch.Generator().manual_seed(seed)
    costs = (torch.rand(7, generator=g) + 0.1).tolist()
    for num_groups in range(1, 8):
        counts = balance_stages(costs, num_groups)
        assert len(counts) == num_groups and sum(counts) == 7 and min(counts) >= 1
        assert max(group_costs(costs, counts)) == pytest.approx(_brute_force(costs, num_groups))


def test_balance_gives_the_heavier_stem_stage_fewer_companions():
    assert balance_stages([3.0, 1, 1, 1, 1, 1, 1], 2) == [2, 5]  # stage 0 carries the embedding
    assert balance_stages([1.0] * 6, 3) == [2, 2, 2]


def test_measure_stage_costs_leaves_no_trace(vit):
    trainer = _trainer(vit)
    weights = {n: p.detach().clone() for n, p in vit.named_parameters()}
    rng = torch.get_rng_state()
    costs = measure_stage_costs(trainer, *make_batch(), repeats=2)
    assert len(costs) == 3 and all(c > 0 for c in costs)
    assert all(torch.equal(weights[n], p) for n, p in vit.named_parameters())
    assert all(p.grad is None for p in vit.parameters()) and torch.equal(rng, torch.get_rng_state())
    assert all(not opt.state for opt in trainer.optimizers)


# ------------------------------------------------------------------------------------------------ cost model
def test_equal_groups_take_k_plus_n_minus_1_steps():
    for k, n in [(1, 5), (2, 10), (4, 7), (7, 3)]:
        assert simulate_pipeline([2.0] * k, n) == pytest.approx(2.0 * (k + n - 1))
        assert simulate_wavefront([2.0] * k, n) == pytest.approx(2.0 * (k + n - 1))
    assert sequential_time([1.0, 2.0], 10) == 30.0
    assert simulate_pipeline([3.0], 10) == sequential_time([3.0], 10)


def test_pipeline_pace_is_set_by_the_slowest_group_and_its_transfer():
    # group 1 is busy 1 + 0.5 per batch (receive, then compute): T = c0 + N (c1 + x)
    assert simulate_pipeline([1.0, 1.0], 20, transfers=[0.5]) == pytest.approx(1.0 + 20 * 1.5)
    # a slow first group: the second waits for it, T = N c0 + x + c1
    assert simulate_pipeline([2.0, 1.0], 20, transfers=[0.5]) == pytest.approx(20 * 2.0 + 0.5 + 1.0)
    # wavefront steps: fill (c0), 19 full steps max(c0, c1 + x), drain (c1 + x)
    assert simulate_wavefront([1.0, 1.0], 20, transfers=[0.5]) == pytest.approx(1.0 + 19 * 1.5 + 1.5)
    # gradient sums of replicas add to every step of their group
    assert simulate_pipeline([1.0, 1.0], 20, reduces=[0.25, 0.25]) == pytest.approx(21 * 1.25)


def test_bounded_queue_holds_back_a_fast_sender_but_not_the_pace():
    free = simulate_pipeline([0.1, 1.0], 50, transfers=[0.01], max_in_flight=100)
    bounded = simulate_pipeline([0.1, 1.0], 50, transfers=[0.01], max_in_flight=1)
    assert bounded == pytest.approx(free)


def test_ring_allreduce_time():
    assert ring_allreduce_time(1e9, 1, 1e9) == 0.0
    assert ring_allreduce_time(1e9, 4, 1e9, latency=1e-3) == pytest.approx(1.5 + 6e-3)


def test_vit_params_match_timm():
    model = make_vit(depth=3, embed_dim=32, img_size=16, patch_size=4)  # 16 tokens, mlp_ratio 2
    counts = vit_stage_params(32, 3, mlp_ratio=2, patch_size=4, num_tokens=16)
    stages = LocalTrainer(model).stages
    assert counts == [sum(p.numel() for p in stages.stage_parameters(i)) for i in range(3)]


def test_vit_flops_match_torch_flop_counter():
    """Forward + backward of every stage on one image, counted by torch (matrix products and attention)."""
    model = make_vit(depth=2, embed_dim=64, img_size=32, patch_size=4, num_heads=2)  # 64 tokens
    for block in model.blocks:
        block.attn.fused_attn = False  # explicit matrix products: the counter misses CPU fused attention
    stages = LocalTrainer(model).stages
    h = torch.randn(1, 3, 32, 32)
    counted = []
    for index in range(2):
        with FlopCounterMode(display=False) as counter:
            h = stages.forward_stage(index, h.detach())
            h.sum().backward()
        counted.append(counter.get_total_flops())
    expected = vit_stage_flops(64, 2, num_tokens=64, mlp_ratio=2, patch_size=4)
    assert counted == pytest.approx(expected, rel=1e-9)
