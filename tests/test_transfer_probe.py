"""``timm-cff probe PATH`` onto new data: a new timm export folder, the source only read, refusals before training."""
import hashlib
import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from conftest import make_vit
from safetensors.torch import load_file

from timm_cff import export_model
from timm_cff.experiment.cli import main
from timm_cff.experiment.config import parse_override
from timm_cff.experiment.rundir import RunDir
from timm_cff.experiment.transfer import transfer_probe

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = 'quickstart'
NAMES = ['cat', 'dog', 'owl']
PROBE = ['--probe.epochs=3', '--probe.lr=0.01', '--data.batch_size=16', '--run.device=cpu', '--run.topk=[1,2]']


def npz_folder(path: Path, n_train: int = 60, n_test: int = 24, size: int = 8, channels: int | None = 3,
               names: list[str] | None = NAMES) -> Path:
    """An npz dataset of ``len(NAMES)`` classes whose class sets the brightness of the first channel (learnable);
    ``channels=None`` stores grey [N, H, W] images."""
    rng = np.random.default_rng(0)
    path.mkdir(parents=True)
    for split, n in (('train', n_train), ('test', n_test)):
        y = np.arange(n) % len(NAMES)
        x = rng.integers(0, 60, (n, size, size, channels or 1)).astype(np.uint8)
        x[..., 0] += (y * 80).astype(np.uint8)[:, None, None]
        np.savez(path / f'{split}.npz', x=x if channels else x[..., 0], y=y)
    if names:
        (path / 'classes.txt').write_text('\n'.join(names) + '\n')
    return path


@pytest.fixture(autouse=True)
def detach_cli_log_handler():
    """``main`` points the root logger at this test's captured stderr; detach it afterwards, so that a later test's
    logging does not write to a closed stream."""
    yield
    root = logging.getLogger()
    for handler in [h for h in root.handlers if type(h) is logging.StreamHandler]:
        root.removeHandler(handler)


def dropped_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if 'not carried over' in line]


@pytest.fixture
def source(tmp_path) -> Path:
    """A tiny 5-class export for 3 x 8 x 8 images whose training data section had a train_subset."""
    torch.manual_seed(0)
    vit = make_vit(depth=2, embed_dim=16, img_size=8, patch_size=4, num_classes=5)
    return export_model(vit, tmp_path / 'src', data_config={'mean': (0.5, 0.5, 0.5), 'std': (0.25, 0.25, 0.25)},
                        metadata={'method': 'cff', 'data': {'dataset': 'npz', 'root': 'old', 'train_subset': 40}})


def file_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob('*')) if p.is_file()}


def timm_top1(export: Path, data: Path) -> float:
    """Test top-1 of an export by timm alone: its own data config normalises the raw npz test images."""
    model = timm.create_model(f'local-dir:{export}', pretrained=True).eval()
    cfg = timm.data.resolve_data_config(model=model)
    with np.load(data / 'test.npz') as f:
        x = torch.from_numpy(f['x']).permute(0, 3, 1, 2).float() / 255
        y = torch.from_numpy(f['y'])
    x = (x - torch.tensor(cfg['mean'])[:, None, None]) / torch.tensor(cfg['std'])[:, None, None]
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean() * 100)


def test_transfer_probe_writes_a_new_timm_export_and_leaves_the_source(source, tmp_path):
    data, before = npz_folder(tmp_path / 'new'), file_hashes(source)
    overrides = {**dict(parse_override(p) for p in PROBE), 'data.dataset': 'npz', 'data.root': str(data)}
    result = transfer_probe(source, overrides, out=tmp_path / 'out')
    out = Path(result['export'])
    assert out == tmp_path / 'out' and file_hashes(source) == before  # byte for byte
    assert result['test']['top1'] == pytest.approx(timm_top1(out, data), abs=1e-4)  # one image is 4.2
    assert result['test']['top1'] > 60  # the classes are learnable from the frozen random encoder's features
    old, new = load_file(source / 'model.safetensors'), load_file(out / 'model.safetensors')
    assert new['head.weight'].shape == (3, 16) and old['head.weight'].shape == (5, 16)
    for key in old:  # the encoder is frozen: only the probe's modules differ
        assert torch.equal(old[key], new[key]) != key.startswith(('fc_norm.', 'head.')), key
    meta = json.loads((out / 'timm_cff.json').read_text())
    assert meta['test'] == result['test'] and meta['label_names'] == NAMES and meta['num_classes'] == 3
    assert meta['source']['export'] == str(source.resolve()) and meta['method'] == 'cff'
    assert meta['data']['root'] == str(data) and meta['data']['train_subset'] is None  # not carried over
    assert result['num_images'] == {'train': 54, 'val': 6, 'test': 24}  # all 60 training images, split 90/10
    assert meta['probe']['epochs'] == 3 and meta['probe']['best_epoch'] == result['stage2']['best_epoch']
    again = transfer_probe(source, overrides, out=tmp_path / 'again')  # deterministic on CPU for a fixed seed
    assert (Path(again['export']) / 'model.safetensors').read_bytes() == (out / 'model.safetensors').read_bytes()


def test_cli_transfer_probe_default_folder_beside_the_source(source, tmp_path, capsys):
    data, before = npz_folder(tmp_path / 'new'), file_hashes(source)
    assert main(['probe', str(source), '--data.dataset=npz', f'--data.root={data}', *PROBE]) == 0
    made = [p for p in tmp_path.iterdir() if p.name not in ('src', 'new')]
    assert len(made) == 1 and re.fullmatch(r'src-probe-new-\d{8}-\d{6}', made[0].name), made
    assert file_hashes(source) == before
    printed, err = capsys.readouterr()
    assert f'export: {made[0]}' in printed
    top1 = float(re.search(r'test accuracy: top1 ([\d.]+)%', printed).group(1))
    assert top1 == pytest.approx(timm_top1(made[0], data), abs=0.005)
    dropped = dropped_lines(err)  # the key the new data replaces (data.root) is not among them
    assert len(dropped) == 1 and 'data.train_subset=40' in dropped[0] and 'data.root' not in dropped[0]


@pytest.mark.parametrize('kind', ['grey', 'size', 'foreign_out', 'out_in_source'])
def test_refusals_are_one_line_and_write_nothing(source, tmp_path, capsys, kind):
    data = npz_folder(tmp_path / 'new', channels=None if kind == 'grey' else 3, size=16 if kind == 'size' else 8)
    out = tmp_path / 'out'
    if kind == 'foreign_out':
        out.mkdir()
        (out / 'notes.txt').write_text('mine')
    if kind == 'out_in_source':
        out = source / 'probe'
    before, listing = file_hashes(tmp_path), sorted(tmp_path.rglob('*'))
    assert main(['probe', str(source), '--data.dataset=npz', f'--data.root={data}', '--out', str(out), *PROBE]) == 1
    lines = capsys.readouterr().err.strip().splitlines()  # log lines, then the error
    err = lines[-1]
    assert [line for line in lines if 'error' in line] == [err] and err.startswith('timm-cff: error:')
    assert not any('Traceback' in line for line in lines)
    expected = {'grey': 'takes 3 x 8 x 8 (C x H x W) images but', 'size': 'resize the images to 8 x 8',
                'foreign_out': 'files timm-cff did not write', 'out_in_source': 'never writes into its source'}
    assert expected[kind] in err, err
    if kind == 'grey':
        assert 'has 1 x 8 x 8' in err and 'export a model for 1 x 8 x 8' in err
    assert file_hashes(tmp_path) == before and sorted(tmp_path.rglob('*')) == listing


def test_run_folder_probe_with_a_new_dataset_drops_the_old_train_subset(tmp_path, capsys):
    tiny = ['--train.epochs=1', '--train.max_steps=1', '--probe.epochs=1', '--data.train_subset=100',
            '--data.test_subset=32', '--data.batch_size=32', '--model.depth=1', '--model.embed_dim=16',
            '--run.quiet=true', '--run.device=cpu']
    assert main(['train', '--config', QUICKSTART, *tiny, f'--run.output={tmp_path}', '--run.name=r']) == 0
    run, data = tmp_path / 'r', npz_folder(tmp_path / 'digits', n_train=120, size=28, channels=None)
    before, out = file_hashes(run), tmp_path / 'out'
    capsys.readouterr()
    assert main(['probe', str(run), '--data.dataset=npz', f'--data.root={data}', '--out', str(out), *PROBE]) == 0
    meta = json.loads((out / 'timm_cff.json').read_text())
    assert meta['data']['train_subset'] is None and meta['data']['test_subset'] is None
    assert sum(meta['num_images'][s] for s in ('train', 'val')) == 120  # not the run's first 100
    assert meta['source']['export'] == str((run / 'export').resolve())
    assert file_hashes(run) == before  # the run folder is only read
    dropped = dropped_lines(capsys.readouterr().err)
    assert len(dropped) == 1 and all(f'data.{k}' in dropped[0] for k in ('train_subset=100', 'test_subset=32',
                                                                          'crop_padding=2'))


def test_probe_of_a_training_runs_best_checkpoint_only_reads_the_run(tmp_path, capsys):
    tiny = ['--train.epochs=2', '--train.max_steps=2', '--probe.epochs=1', '--data.train_subset=100',
            '--data.test_subset=32', '--data.batch_size=32', '--model.depth=1', '--model.embed_dim=16',
            '--run.quiet=true', '--run.device=cpu']
    assert main(['train', '--config', QUICKSTART, *tiny, f'--run.output={tmp_path}', '--run.name=r']) == 0
    run, out = tmp_path / 'r', tmp_path / 'snapshot'
    shutil.rmtree(run / 'export')  # as while it trains: no export yet, and a live process holds the run
    (run / 'summary.json').unlink()
    RunDir(run).lock()
    before = file_hashes(run)
    capsys.readouterr()
    assert main(['probe', str(run), *PROBE]) == 1  # the in-place probe of a run in use is refused ...
    assert 'is in use by process' in capsys.readouterr().err
    assert main(['probe', str(run), '--checkpoint', 'best', '--out', str(out), *PROBE]) == 0  # ... a snapshot is not
    assert file_hashes(run) == before
    best = torch.load(run / 'checkpoints' / 'best.pt', weights_only=True)
    meta = json.loads((out / 'timm_cff.json').read_text())
    assert meta['source'] == {'path': str(run.resolve()), 'export': None, 'checkpoint': 'best',
                              'epoch': best['epoch'], 'data': meta['source']['data']}
    assert meta['source']['data']['train_subset'] == 100 and meta['data']['train_subset'] == 100  # the run's data
    weights, encoder = load_file(out / 'model.safetensors'), best['trainer']['model']
    frozen = [k for k in encoder if not k.startswith(('fc_norm.', 'head.'))]
    assert frozen and all(torch.equal(weights[k], encoder[k]) for k in frozen)  # the best epoch's encoder
    assert f'export: {out}' in capsys.readouterr().out
    assert main(['probe', str(out), '--checkpoint', 'best', *PROBE]) == 1  # an export has no checkpoints
    assert '--checkpoint picks a checkpoint of a run folder' in capsys.readouterr().err
    RunDir(run).unlock()
