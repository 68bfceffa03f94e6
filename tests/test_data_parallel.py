"""``torchrun --nproc-per-node 2 -m timm_cff train ...`` without a pipeline: two data-parallel replicas of one run
(the contrastive loss on the global batch, gradients summed) equal one process with the same global batch; only
rank 0 reports and writes the run folder."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_cli import QUICKSTART, final_weights

ROOT = Path(__file__).resolve().parents[1]
ARGS = ['--config', QUICKSTART, '--train.epochs=2', '--train.max_steps=3', '--probe.epochs=1',
        '--data.train_subset=300', '--data.test_subset=64', '--data.batch_size=64', '--model.depth=2',
        '--model.embed_dim=32', '--run.quiet=true']


def _train(tmp_path, name, processes):
    env = dict(os.environ, PYTHONPATH=str(ROOT), GLOO_SOCKET_IFNAME='lo', OMP_NUM_THREADS='1')
    launcher = ['-m', 'torch.distributed.run', '--standalone', f'--nproc-per-node={processes}'] if processes else []
    cmd = [sys.executable, *launcher, '-m', 'timm_cff', 'train', *ARGS, f'--run.output={tmp_path}',
           f'--run.name={name}']
    return subprocess.run(cmd, env=env, timeout=300, capture_output=True, text=True)


def _rows(run: Path) -> list[dict[str, float]]:
    with (run / 'metrics.csv').open(newline='') as f:
        return [{k: float(v) for k, v in r.items() if k != 'time_s'} for r in csv.DictReader(f)]


@pytest.mark.slow
def test_two_replicas_equal_one_process_with_the_global_batch(tmp_path):
    one = _train(tmp_path, 'one', 0)
    two = _train(tmp_path, 'two', 2)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    assert two.stdout.count('run folder:') == 1 and two.stdout.count('test accuracy') == 1  # rank 0 reports
    rows_one, rows_two = _rows(tmp_path / 'one'), _rows(tmp_path / 'two')
    assert len(rows_one) == len(rows_two) == 2
    for a, b in zip(rows_one, rows_two):  # the clamped-pair diagnostic is each replica's own part, averaged
        assert a.keys() == b.keys()
        assert all(a[k] == pytest.approx(b[k], rel=1e-5) for k in a if 'clamped' not in k)
    w1, w2 = final_weights(tmp_path / 'one'), final_weights(tmp_path / 'two')
    assert w1.keys() == w2.keys()
    for k in w1:
        a, b = w1[k], w2[k]
        if k.endswith('attn.qkv.bias'):  # the key bias: softmax ignores it, so its true gradient is 0 and Adam turns
            dim = len(a) // 3            # float noise (different summation order) into full-size steps; skip it
            a, b = torch.cat([a[:dim], a[2 * dim:]]), torch.cat([b[:dim], b[2 * dim:]])
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), k
    assert sorted(p.name for p in tmp_path.iterdir()) == ['one', 'two']  # one run folder, not one per rank


def test_torchrun_refuses_a_method_it_cannot_split():
    from timm_cff.experiment.build import RunSetup
    from timm_cff.experiment.config import ConfigError, load_config
    with pytest.raises(ConfigError, match='run it without torchrun'):  # before any process group is joined
        RunSetup(load_config(QUICKSTART, {'train.method': 'bp'}), distributed=True)
