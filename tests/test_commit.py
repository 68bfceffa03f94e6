"""A checkpoint and the metrics rows it describes are one commit: whatever the kill point, a resumed run ends with
exactly the rows of an uninterrupted one, none lost and none twice."""
import csv

import pytest

from test_cli import train
from timm_cff.experiment import fit
from timm_cff.experiment.cli import main
from timm_cff.experiment.rundir import RunDir


def rows(run):
    with (run / 'metrics.csv').open(newline='') as f:
        return [{k: v for k, v in r.items() if k != 'time_s'} for r in csv.DictReader(f)]


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp('reference')
    assert train(root, '--train.epochs=3', name='full') == 0
    return rows(root / 'full')


def kill_at_epoch(monkeypatch, cls, method, epoch):
    real = getattr(cls, method)

    def killed(self, result, *args):
        if result.epoch == epoch:
            raise KeyboardInterrupt
        return real(self, result, *args)
    monkeypatch.setattr(cls, method, killed)


@pytest.mark.parametrize('point', ['after the checkpoint, before its row', 'during the checkpoint write',
                                   'before the checkpoint'])
def test_a_kill_at_any_point_of_the_commit_loses_no_row(tmp_path, monkeypatch, reference, point):
    if point == 'after the checkpoint, before its row':
        kill_at_epoch(monkeypatch, fit.MetricsLog, 'on_epoch_end', 2)
    elif point == 'before the checkpoint':
        kill_at_epoch(monkeypatch, fit.Checkpoints, 'on_epoch_end', 2)
    else:  # the temporary file is written, the rename never happens
        real = RunDir.save_checkpoint

        def torn(self, name, state):
            if name == 'last' and state['state']['epoch'] == 2:
                (self.path / 'checkpoints' / '.last.pt.tmp-killed').write_bytes(b'half')
                raise KeyboardInterrupt
            return real(self, name, state)
        monkeypatch.setattr(RunDir, 'save_checkpoint', torn)
    assert train(tmp_path, '--train.epochs=3', name='k') == 130
    monkeypatch.undo()
    assert main(['train', '--resume', str(tmp_path / 'k')]) == 0
    assert rows(tmp_path / 'k') == reference
    assert not list((tmp_path / 'k' / 'checkpoints').glob('.*tmp-*'))


def test_deleting_last_pt_restarts_without_duplicate_rows(tmp_path, reference):
    assert train(tmp_path, '--train.epochs=3', name='d') == 0
    (tmp_path / 'd' / 'checkpoints' / 'last.pt').unlink()
    (tmp_path / 'd' / 'summary.json').unlink()
    assert main(['train', '--resume', str(tmp_path / 'd')]) == 0
    assert rows(tmp_path / 'd') == reference


def test_a_full_disk_ends_in_one_line_and_the_run_resumes(tmp_path, monkeypatch, capsys, reference):
    real = RunDir.save_checkpoint

    def full(self, name, state):
        if name == 'last' and state['state']['epoch'] == 2:
            raise OSError(28, 'No space left on device', str(self.checkpoint_path(name)))
        return real(self, name, state)
    monkeypatch.setattr(RunDir, 'save_checkpoint', full)
    assert train(tmp_path, '--train.epochs=3', name='full') == 1
    err = capsys.readouterr().err
    assert 'Traceback' not in err and 'No space left on device' in err and '--resume' in err
    monkeypatch.undo()
    assert main(['train', '--resume', str(tmp_path / 'full')]) == 0
    assert rows(tmp_path / 'full') == reference
