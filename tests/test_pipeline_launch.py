"""End to end through torchrun: the example script, pipelined over two processes, reports the same losses as the
plain sequential trainer and checkpoints every epoch (resuming is covered in test_pipeline_dist.py)."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get('TIMM_CFF_DATA', ROOT.parent / 'shared' / 'data')) / 'cifar10_jpeg' / 'train.npz'
TINY = ['--depth', '3', '--embed-dim', '32', '--heads', '2', '--batches', '3', '--batch', '8', '--data', str(DATA)]


def _torchrun_demo(tmp_path, name, processes, *args):
    env = dict(os.environ, PYTHONPATH=str(ROOT), GLOO_SOCKET_IFNAME='lo', OMP_NUM_THREADS='1')
    out = tmp_path / f'{name}.json'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc-per-node={processes}',
           str(ROOT / 'examples' / 'pipeline_demo.py'), '--stages', str(processes), '--json', str(out), *TINY, *args]
    subprocess.run(cmd, env=env, check=True, timeout=300, capture_output=True)
    return json.loads(out.read_text())


def _sequential_demo(epochs):
    """The demo's model, data and trainer, trained here by the plain LocalTrainer on one thread."""
    spec = importlib.util.spec_from_file_location('pipeline_demo', ROOT / 'examples' / 'pipeline_demo.py')
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    args = demo.parse_args(TINY)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = demo.build_trainer(args)
        batches = demo.two_view_batches(args.data, args.batches, args.batch, args.seed)
        return [trainer.train_epoch(batches) for _ in range(epochs)][-1]
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.skipif(not DATA.is_file(), reason=f'CIFAR-10 npz not found at {DATA}; set TIMM_CFF_DATA')
def test_torchrun_pipeline_matches_sequential(tmp_path):
    checkpoints = tmp_path / 'ckpt'
    run = _torchrun_demo(tmp_path, 'run', 2, '--epochs', '2', '--checkpoint-dir', str(checkpoints))
    assert run['stage_counts'] in ([1, 2], [2, 1]) and len(run['epoch_times']) == 2
    assert run['metrics'] == _sequential_demo(2)  # bit-identical losses of the second epoch
    assert sorted(p.name for p in checkpoints.iterdir()) == ['epoch0001', 'epoch0002']
