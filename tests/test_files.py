"""Never delete or overwrite what timm-cff did not write; written files follow the umask."""
import os
import stat

import pytest

from conftest import make_vit
from timm_cff import export_model
from timm_cff.files import atomic_write, stray_temporaries

from test_cli import train
from timm_cff.experiment.cli import main


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_export_refuses_a_folder_it_did_not_write(tmp_path):
    user = tmp_path / 'mine'
    user.mkdir()
    (user / 'notes.txt').write_bytes(b'my notes\n')
    with pytest.raises(FileExistsError, match='files timm-cff did not write'):
        export_model(make_vit(), user)
    assert sorted(p.name for p in user.iterdir()) == ['notes.txt']
    assert (user / 'notes.txt').read_bytes() == b'my notes\n'
    assert not stray_temporaries(tmp_path)  # the refused export left no temporary folder behind
    (tmp_path / 'afile').write_text('x')
    with pytest.raises(FileExistsError, match='is a file'):
        export_model(make_vit(), tmp_path / 'afile')


def test_export_replaces_only_an_earlier_export(tmp_path):
    out = tmp_path / 'export'
    export_model(make_vit(depth=1), out)                      # a missing folder is created
    first = (out / 'model.safetensors').read_bytes()
    export_model(make_vit(depth=2), out)                      # an earlier export is replaced
    assert (out / 'model.safetensors').read_bytes() != first and (out / 'timm_cff.json').is_file()
    empty = tmp_path / 'empty'
    empty.mkdir()
    export_model(make_vit(depth=1), empty)                    # an empty folder is used
    assert (empty / 'config.json').is_file()


def test_export_command_never_overwrites_a_run_folder(tmp_path, capsys):
    assert train(tmp_path) == 0
    run = tmp_path / 'r'
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob('*') if p.is_file()}
    capsys.readouterr()
    assert main(['export', str(run), '--out', str(run)]) == 1
    err = capsys.readouterr().err
    assert 'Traceback' not in err and [line for line in err.splitlines() if line.startswith('timm-cff: error:')] == \
        [line for line in err.splitlines() if 'holds a run folder' in line]
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob('*') if p.is_file()} == before
    assert main(['export', str(run)]) == 0  # its own export/ is an earlier export: replaced


@pytest.mark.parametrize('umask', [0o022, 0o077])
def test_written_files_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_write(tmp_path / 'a.json', lambda tmp: open(tmp, 'w').write('{}'))
        export_model(make_vit(depth=1), tmp_path / 'export')
    finally:
        os.umask(old)
    assert mode(tmp_path / 'a.json') == 0o666 & ~umask
    assert mode(tmp_path / 'export') == 0o777 & ~umask
    assert mode(tmp_path / 'export' / 'model.safetensors') == 0o666 & ~umask


def test_compare_and_analyze_outputs_never_overwrite_other_files(tmp_path, capsys):
    assert train(tmp_path) == 0
    run = tmp_path / 'r'
    notes = tmp_path / 'table.md'
    notes.write_text('my table\n')
    assert main(['compare', str(run), '--out', str(tmp_path / 'table')]) == 1
    assert notes.read_text() == 'my table\n' and not (tmp_path / 'table.json').exists()
    assert main(['compare', str(run), '--out', str(tmp_path / 'ok')]) == 0
    assert main(['compare', str(run), '--out', str(tmp_path / 'ok')]) == 0  # its own earlier output is replaced
    (tmp_path / 'mine.history.csv').write_text('epoch,loss\n1,0.5\n')  # a CSV of the user's own
    assert main(['compare', str(run), '--out', str(tmp_path / 'mine')]) == 1
    assert (tmp_path / 'mine.history.csv').read_text() == 'epoch,loss\n1,0.5\n'
    mine = tmp_path / 'analysis'
    mine.mkdir()
    (mine / 'report.md').write_text('my report\n')
    assert main(['analyze', str(run), '--out', str(mine), '--samples', '50', '--tsne-samples', '0']) == 1
    assert (mine / 'report.md').read_text() == 'my report\n'
    assert 'no earlier report wrote' in capsys.readouterr().err
