"""The multi-process pipeline on gloo over loopback: bit-identical to sequential training, data-parallel replicas
equal to single-process training on the global batch, resume from the last complete checkpoint, and a dead or failing
rank ends the others with an error instead of a hang. Every launch is bounded in time and leaves no process behind."""
import contextlib
import datetime
import os
import socket
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import make_batch, make_vit
from timm_cff import LocalTrainer, NonFiniteLossError
from timm_cff.pipeline import (PeerFailureError, PipelineWorker, latest_checkpoint, load_merged_state,
                               load_pipeline_checkpoint, merge_stage_states, save_pipeline_checkpoint)

PEER_TIMEOUT_S = 30  # the process group's timeout: the longest a rank may wait for a silent peer
LAUNCH_TIMEOUT_S = 120  # a whole launch, including start-up of every process


# ------------------------------------------------------------------------------------------------ launching
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _entry(rank, world_size, port, out_dir, fn, args):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), GLOO_SOCKET_IFNAME='lo')
    torch.set_num_threads(1)
    try:
        dist.init_process_group('gloo', rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=PEER_TIMEOUT_S))
        result = {'ok': fn(rank, *args)}
    except BaseException as e:  # report any failure to the test, then exit like a crashed rank
        result = {'error': type(e).__name__, 'message': str(e), 'traceback': traceback.format_exc()}
    torch.save(result, os.path.join(out_dir, f'rank{rank}.pt'))
    os._exit(0 if 'ok' in result else 1)  # no teardown: a failed rank must not wait for its peers


def launch(tmp_path, world_size, fn, *args):
    """``fn(rank, *args)`` on ``world_size`` processes; per rank ``{'ok': result}``, ``{'error': ...}`` or None."""
    out_dir = tmp_path / f'launch{time.monotonic_ns()}'
    out_dir.mkdir()
    ctx = mp.get_context('forkserver')  # children fork from a server that imported torch and timm once
    ctx.set_forkserver_preload(['torch', 'timm', 'timm_cff.pipeline', 'conftest'])
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(rank, world_size, port, str(out_dir), fn, args))
             for rank in range(world_size)]
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        hung = [rank for rank, p in enumerate(procs) if p.is_alive()]
        assert not hung, f'ranks {hung} still running after {LAUNCH_TIMEOUT_S} s'
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(5)
    files = [out_dir / f'rank{rank}.pt' for rank in range(world_size)]
    return [torch.load(f, weights_only=False) if f.exists() else None for f in files]


def ok(results):
    for rank, result in enumerate(results):
        assert result is not None and 'ok' in result, f'rank {rank}: {result}'
    return [r['ok'] for r in results]


@contextlib.contextmanager
def one_thread():
    """The reference runs single-threaded like the workers: CPU kernels may round differently across thread counts."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------ the runs
SEEDS = [0, 1, 2, 3]
DEPTH = 4


def _batches(seeds=SEEDS, batch=8, last=4):
    return [make_batch(batch=batch, seed=s) for s in seeds] + [make_batch(batch=last, seed=99)]  # no drop_last


def _trainer(**kwargs):
    torch.manual_seed(0)
    kwargs.setdefault('scheduler', dict(sched='cosine', num_epochs=3, warmup_epochs=1, step_on_epochs=False,
                                        updates_per_epoch=len(SEEDS) + 1))
    return LocalTrainer(make_vit(depth=DEPTH), lr=1e-3, **kwargs)


def _sequential(epochs):
    with one_thread():
        trainer = _trainer()
        history = [trainer.train_epoch(_batches()) for _ in range(epochs)]
        return trainer, history, trainer.evaluate(_batches())


def _pipeline(rank, stage_counts, epochs, checkpoint_root=None):
    worker = PipelineWorker(_trainer(), stage_counts=stage_counts)
    data = _batches() if worker.reads_data else None
    history = []
    for epoch in range(epochs):
        history.append(worker.train_epoch(data))
        if checkpoint_root:
            save_pipeline_checkpoint(worker, f'{checkpoint_root}/epoch{worker.epoch:04d}')
    return {'history': history, 'val': worker.evaluate(data), 'state': worker.state_dict()}


def _equal_states(a, b):
    assert a['num_updates'] == b['num_updates'] and a['epoch'] == b['epoch']
    assert a['model'].keys() == b['model'].keys()
    for key in a['model']:
        assert torch.equal(a['model'][key], b['model'][key]), key
    for opt_a, opt_b in zip(a['optimizers'], b['optimizers'], strict=True):
        for sa, sb in zip(opt_a['state'].values(), opt_b['state'].values(), strict=True):
            assert all(torch.equal(sa[k], sb[k]) for k in sa)
        assert opt_a['param_groups'][0]['lr'] == opt_b['param_groups'][0]['lr']


@pytest.mark.parametrize('stage_counts', [[1, 3], [2, 1, 1]], ids=['2proc', '3proc'])
def test_process_pipeline_is_bit_identical_to_sequential(tmp_path, stage_counts):
    results = ok(launch(tmp_path, len(stage_counts), _pipeline, stage_counts, 2, str(tmp_path / 'ckpt')))
    reference, history, val = _sequential(2)
    _equal_states(merge_stage_states([r['state'] for r in results]), reference.state_dict())
    for r in results:  # every rank reports every stage's losses, the same floats as sequential training
        assert r['history'] == history and r['val'] == val
    # the checkpoint of the last epoch is complete and merges into the same trainer state
    latest = latest_checkpoint(tmp_path / 'ckpt')
    assert latest is not None and latest.name == 'epoch0002'
    _equal_states(load_merged_state(latest), reference.state_dict())


def _dying(rank, stage_counts, checkpoint_root, die_rank):
    """Train epoch 1 and checkpoint it; in epoch 2 ``die_rank`` exits abruptly while working on its second batch."""
    worker = PipelineWorker(_trainer(), stage_counts=stage_counts)
    data = _batches() if worker.reads_data else None
    worker.train_epoch(data)
    save_pipeline_checkpoint(worker, f'{checkpoint_root}/epoch{worker.epoch:04d}')
    if rank == die_rank:
        run_stage, calls = worker.trainer.forward_backward_stage, []

        def run_stage_then_die(*args, **kwargs):
            calls.append(1)
            if len(calls) > len(worker.group.stages):
                os._exit(17)
            return run_stage(*args, **kwargs)
        worker.trainer.forward_backward_stage = run_stage_then_die
    worker.train_epoch(data)
    return 'finished'


def _resume(rank, stage_counts, checkpoint_root, epochs):
    worker = PipelineWorker(_trainer(), stage_counts=stage_counts)
    load_pipeline_checkpoint(worker, latest_checkpoint(checkpoint_root))
    data = _batches() if worker.reads_data else None
    while worker.epoch < epochs:
        worker.train_epoch(data)
    return worker.state_dict()


def test_dead_rank_stops_the_others_and_the_run_resumes(tmp_path):
    stage_counts, root = [1, 2, 1], str(tmp_path / 'ckpt')
    start = time.monotonic()
    results = launch(tmp_path, 3, _dying, stage_counts, root, 1)
    assert time.monotonic() - start < PEER_TIMEOUT_S + 30
    assert results[1] is None  # it died without a word
    for rank in (0, 2):
        assert results[rank]['error'] == 'PeerFailureError', results[rank]
        assert f'Rank {rank} stopped' in results[rank]['message'] and 'resume' in results[rank]['message']
    assert latest_checkpoint(root).name == 'epoch0001'  # epoch 2 never completed
    states = ok(launch(tmp_path, 3, _resume, stage_counts, root, 2))
    reference, _, _ = _sequential(2)
    _equal_states(merge_stage_states(states), reference.state_dict())


def _poisoned(rank, stage_counts, bad_stage):
    worker = PipelineWorker(_trainer(), stage_counts=stage_counts)
    with torch.no_grad():
        worker.trainer.model.blocks[bad_stage].mlp.fc2.bias.fill_(float('nan'))
    worker.train_epoch(_batches() if worker.reads_data else None)


def test_non_finite_loss_on_one_rank_stops_all(tmp_path):
    results = launch(tmp_path, 2, _poisoned, [2, 2], 3)
    assert results[1]['error'] == 'NonFiniteLossError' and 'stage 3, step 0' in results[1]['message']
    assert results[0]['error'] == 'PeerFailureError'
    assert issubclass(NonFiniteLossError, FloatingPointError) and issubclass(PeerFailureError, RuntimeError)


# ------------------------------------------------------------------------------------------------ replicas
def _sgd(params):
    # SGD: Adam would turn float noise in a zero gradient into a full ±lr step (see test_trainer.py)
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def _shard(batch, replica, num_replicas):
    """Consecutive slices of the batch; the first replicas take one sample more when it does not divide."""
    views, labels = batch
    sizes = [len(labels) // num_replicas + (r < len(labels) % num_replicas) for r in range(num_replicas)]
    part = slice(sum(sizes[:replica]), sum(sizes[:replica + 1]))
    return tuple(v[part] for v in views), labels[part]


def _margin(features, labels, loss_fn):
    return torch.tensor(float(loss_fn.margin))  # a stage metric reading its loss's settings through the wrapper


def _replica_trainer():
    return _trainer(optimizer=_sgd, scheduler=None, stage_metrics={'margin': _margin})


def _replicated(rank, num_groups, epochs):
    worker = PipelineWorker(_replica_trainer(), num_groups, stage_counts=[DEPTH // num_groups] * num_groups)
    data = [_shard(b, worker.replica, worker.num_replicas) for b in _batches(batch=16, last=7)]
    history = [worker.train_epoch(data if worker.reads_data else None) for _ in range(epochs)]
    return {'history': history, 'state': worker.state_dict(), 'replica': worker.replica,
            'group': worker.group_index}


@pytest.mark.parametrize('num_groups,world_size', [(1, 2), (2, 4)], ids=['2replicas', '2stages_x_2replicas'])
def test_replicas_match_single_process_global_batch(tmp_path, num_groups, world_size):
    results = ok(launch(tmp_path, world_size, _replicated, num_groups, 2))
    with one_thread():
        reference = _replica_trainer()
        history = [reference.train_epoch(_batches(batch=16, last=7)) for _ in range(2)]  # last: shards of 4 and 3
    first = sorted((r for r in results if r['replica'] == 0), key=lambda r: r['group'])
    merged = merge_stage_states([r['state'] for r in first])
    for key, value in reference.state_dict()['model'].items():
        assert torch.allclose(merged['model'][key], value, atol=1e-5), key
    for r in results:
        for epoch, expected in zip(r['history'], history, strict=True):
            assert epoch == pytest.approx(expected, rel=1e-5)
        twin = first[r['group']]['state']['model']  # replicas stay bit-identical to each other
        assert all(torch.equal(twin[k], v) for k, v in r['state']['model'].items())


def _scaler_round_trip(rank, stage_counts):
    """float16 autocast: each rank's GradScaler state (its loss scale) is in its checkpoint and comes back."""
    worker = PipelineWorker(_trainer(autocast_dtype='float16', scheduler=None), stage_counts=stage_counts)
    worker.trainer.scaler.scale(torch.ones(()))  # the scaler starts lazily
    worker.trainer.scaler.update(new_scale=1234.0 + rank)
    state = worker.state_dict()
    fresh = PipelineWorker(_trainer(autocast_dtype='float16', scheduler=None), stage_counts=stage_counts)
    before = fresh.trainer.scaler.get_scale()
    fresh.load_state_dict(state)
    return before, fresh.trainer.scaler.get_scale()


def test_a_pipeline_checkpoint_keeps_each_ranks_loss_scale(tmp_path):
    results = ok(launch(tmp_path, 2, _scaler_round_trip, [2, 2]))
    assert [after for _, after in results] == [1234.0, 1235.0]
    assert all(before != after for before, after in results)
