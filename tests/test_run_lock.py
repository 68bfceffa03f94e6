"""One writer per run: a run folder is claimed atomically and locked while a process writes it; a refused start
leaves nothing behind."""
import json
import socket
import subprocess
import sys

import pytest

from test_cli import QUICKSTART, TINY, train
from timm_cff.experiment.cli import main
from timm_cff.experiment.rundir import LOCK_FILE, RunDir, RunInUseError


def snapshot(run):
    return {p.relative_to(run): p.read_bytes() for p in run.rglob('*') if p.is_file()}


def test_a_second_writer_is_refused_and_the_first_run_is_intact(tmp_path, capsys):
    assert train(tmp_path, '--train.epochs=1') == 0
    run = tmp_path / 'r'
    assert not (run / LOCK_FILE).exists()  # released at the end
    holder = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
    try:  # a live process holds the run
        (run / LOCK_FILE).write_text(json.dumps({'pid': holder.pid, 'host': socket.gethostname()}))
        before = snapshot(run)
        capsys.readouterr()
        assert main(['train', '--resume', str(run), '--train.epochs=2']) == 1
        assert f'in use by process {holder.pid}' in capsys.readouterr().err
        assert snapshot(run) == before
        with pytest.raises(RunInUseError):
            RunDir(run).lock()
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone: its lock is stale and the resume takes the run over
    assert main(['train', '--resume', str(run), '--train.epochs=2']) == 0
    assert not (run / LOCK_FILE).exists()


def test_the_same_name_twice_refuses_at_once(tmp_path, capsys):
    assert train(tmp_path, '--train.epochs=1') == 0
    before = snapshot(tmp_path / 'r')
    capsys.readouterr()
    assert train(tmp_path, '--train.epochs=1') == 1
    assert 'already holds a run' in capsys.readouterr().err and snapshot(tmp_path / 'r') == before


def test_a_refused_start_leaves_nothing_behind(tmp_path, capsys):
    # the data is checked before the folder is created: a missing dataset refuses without a trace
    assert main(['train', '--config', QUICKSTART, *TINY, f'--run.output={tmp_path}', '--run.name=bad',
                 '--data.dataset=npz', f'--data.root={tmp_path / "nowhere"}']) == 1
    assert not (tmp_path / 'bad').exists()
    # a folder that exists and is no run is never written into
    (tmp_path / 'mine').mkdir()
    (tmp_path / 'mine' / 'keep.txt').write_text('x')
    assert train(tmp_path, name='mine') == 1
    assert 'is no run folder' in capsys.readouterr().err
    assert [p.name for p in (tmp_path / 'mine').iterdir()] == ['keep.txt']


def test_stray_temporaries_of_a_killed_write_are_removed_on_the_next_start(tmp_path):
    assert train(tmp_path, '--train.epochs=1') == 0
    run = tmp_path / 'r'
    stray = run / 'checkpoints' / '.last.pt.tmp-abc123'
    stray.write_bytes(b'half a checkpoint')
    assert main(['train', '--resume', str(run), '--train.epochs=2']) == 0
    assert not stray.exists() and (run / 'checkpoints' / 'last.pt').is_file()
