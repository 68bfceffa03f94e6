"""A run folder written before the package layout of e0cb882 (tests/fixtures/run_before_redesign, see its README)
resumes with the current code and ends where a fresh run of the same config does."""
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from timm_cff.experiment.cli import main

FIXTURE = Path(__file__).parent / 'fixtures' / 'run_before_redesign'


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    """(the old run resumed to 2 epochs, a fresh 2-epoch run of its config), both by the current code.

    One CPU thread, as the fixture was written with: float sums of another thread count differ in the last bits.
    """
    root = tmp_path_factory.mktemp('old_runs')
    resumed = root / 'resumed'
    shutil.copytree(FIXTURE, resumed, ignore=shutil.ignore_patterns('README.md'))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(['train', '--resume', str(resumed), '--train.epochs=2']) == 0
        assert main(['train', '--config', str(FIXTURE / 'config.yaml'), '--train.epochs=2', f'--run.output={root}',
                     '--run.name=fresh']) == 0
    finally:
        torch.set_num_threads(threads)
    return resumed, root / 'fresh'


def _rows(run: Path, name: str) -> list[dict[str, float]]:
    """CSV rows as floats, ``time_s`` dropped, ``*_block{i}`` columns named ``*_stage{i}``."""
    lines = (run / name).read_text().splitlines()
    header = [k.replace('_block', '_stage') for k in lines[0].split(',')]
    return [{k: float(v) for k, v in zip(header, line.split(',')) if k != 'time_s'} for line in lines[1:]]


#: Tolerances where this machine's float kernels differ from the fixture machine's in the last bits (another CPU
#: instruction set, e.g. AVX-512 against AVX2): losses and accuracies drift ~1e-7 relative over the two epochs,
#: weights up to ~0.3 % of a tensor's largest entry (AdamW's first steps turn last-bit noise in the near-zero
#: gradients of the key biases into whole steps). A resume that loses state is far outside both (tested below).
FLOAT_RTOL = 1e-5
TENSOR_TOL = 1e-2


def _assert_same_state(a, b, where='', exact=True):
    """Nested dicts/lists of tensors and numbers equal, tensor for tensor; with ``exact=False`` floats within
    ``FLOAT_RTOL`` and float tensors within ``TENSOR_TOL`` of their largest entry (integers, RNG states, step counts
    and structure stay exact)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        if exact or not a.is_floating_point():
            assert torch.equal(a, b), where
        else:
            assert (a - b).abs().max() <= TENSOR_TOL * b.abs().max(), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same_state(a[k], b[k], f'{where}.{k}', exact)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_state(x, y, f'{where}[{i}]', exact)
    elif isinstance(a, float) and not exact:
        assert math.isclose(a, b, rel_tol=FLOAT_RTOL), where
    else:
        assert a == b, where


@pytest.fixture(scope='module')
def exact(runs):
    """Whether this machine computes the fixture's epoch bit for bit (then every comparison is exact)."""
    return _rows(runs[1], 'metrics.csv')[0] == _rows(FIXTURE, 'metrics.csv')[0]


def test_fixture_is_a_one_epoch_run_of_the_old_layout():
    rows = _rows(FIXTURE, 'metrics.csv')
    assert [r['epoch'] for r in rows] == [1]
    assert not (FIXTURE / 'checkpoints' / 'final.pt').exists()
    assert sum(p.stat().st_size for p in FIXTURE.rglob('*') if p.is_file()) < 1_000_000


def _assert_ends_like(resumed: Path, fresh: Path, exact: bool) -> None:
    """The checkpoints of ``resumed`` equal those of ``fresh``: weights after the probe (final.pt) and stage 1's
    whole state after epoch 2 (last.pt: optimizer moments, step counts, RNG and loop state)."""
    a = torch.load(resumed / 'checkpoints' / 'final.pt', map_location='cpu', weights_only=True)
    b = torch.load(fresh / 'checkpoints' / 'final.pt', map_location='cpu', weights_only=True)
    _assert_same_state(a['trainer']['model'], b['trainer']['model'], 'final.pt', exact)
    a = torch.load(resumed / 'checkpoints' / 'last.pt', map_location='cpu', weights_only=True)
    b = torch.load(fresh / 'checkpoints' / 'last.pt', map_location='cpu', weights_only=True)
    for state in (a['state'], b['state']):  # wall times differ; everything else must not
        state.pop('time_s')
        for row in state['rows']:  # the metrics rows kept in the checkpoint (the old epoch's row read back)
            row.pop('time_s')
    if not exact:  # the old epoch's row is the fixture machine's
        a['state']['rows'], b['state']['rows'] = a['state']['rows'][1:], b['state']['rows'][1:]
    _assert_same_state(a, b, 'last.pt', exact)


def test_resumed_old_run_ends_with_the_weights_of_a_fresh_run(runs, exact):
    _assert_ends_like(*runs, exact)


def test_a_resume_that_loses_the_optimizer_state_fails_that_comparison(runs, exact, tmp_path):
    broken = tmp_path / 'broken'
    shutil.copytree(FIXTURE, broken, ignore=shutil.ignore_patterns('README.md'))
    checkpoint = torch.load(broken / 'checkpoints' / 'last.pt', map_location='cpu', weights_only=True)
    for optimizer in checkpoint['trainer']['optimizers']:
        for moments in optimizer['state'].values():
            moments['exp_avg'].zero_(), moments['exp_avg_sq'].zero_()
    torch.save(checkpoint, broken / 'checkpoints' / 'last.pt')
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(['train', '--resume', str(broken), '--train.epochs=2']) == 0
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(AssertionError):
        _assert_ends_like(broken, runs[1], exact=False)


def test_resumed_old_run_logs_the_rows_of_a_fresh_run(runs, exact):
    resumed, fresh = runs
    rows = _rows(resumed, 'metrics.csv')
    assert [r['epoch'] for r in rows] == [1, 2]
    want = _rows(fresh, 'metrics.csv')
    assert [row.keys() for row in rows] == [row.keys() for row in want]
    _assert_same_state(rows, want, 'metrics.csv', exact)
    old = (FIXTURE / 'metrics.csv').read_text().splitlines()
    assert (resumed / 'metrics.csv').read_text().splitlines()[1] == old[1]  # the old epoch is kept (its time_s too)
    _assert_same_state(_rows(resumed, 'probe.csv'), _rows(fresh, 'probe.csv'), 'probe.csv', exact)
    a, b = (json.loads((run / 'summary.json').read_text()) for run in runs)
    for key in ('run', 'export', 'stage1_time_s', 'wall_time_s'):
        a.pop(key), b.pop(key)
    _assert_same_state(a, b, 'summary.json', exact)
    assert a['epochs'] == 2 and a['epochs_configured'] == 2


def test_compare_and_eval_read_old_and_resumed_runs(runs, tmp_path, capsys):
    resumed, _ = runs
    old = tmp_path / 'old'
    shutil.copytree(FIXTURE, old, ignore=shutil.ignore_patterns('README.md'))
    capsys.readouterr()
    assert main(['compare', str(old), str(resumed), '--json']) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r['epochs_run'], r['epochs'], r['finished']) for r in rows] == [(1, 1, True), (2, 2, True)]
    assert [r['method'] for r in rows] == ['CFF+M', 'CFF+M']
    assert rows[0]['test_top1'] == json.loads((FIXTURE / 'summary.json').read_text())['test']['top1']
    assert main(['eval', str(resumed)]) == 0
    top1 = json.loads((resumed / 'summary.json').read_text())['test']['top1']
    assert f'top1 {top1:.2f}%' in capsys.readouterr().out
