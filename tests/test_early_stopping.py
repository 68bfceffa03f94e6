"""``train.patience``: stage 1 stops once the selection loss has not improved for N epochs, and a resumed run
with more patience or more epochs continues exactly where an uninterrupted run with those settings would be."""
import csv
import json
from pathlib import Path

import torch

from timm_cff.experiment.cli import main
from timm_cff.experiment.config import load_config

from test_cli import QUICKSTART, TINY, final_weights

# A learning rate high enough that the tiny run's validation loss stops improving within a few epochs.
NOISY = [*TINY, '--train.epochs=8', '--train.lr=0.02']


def train(tmp_path: Path, name: str, *extra: str) -> int:
    return main(['train', '--config', QUICKSTART, *NOISY, f'--run.output={tmp_path}', f'--run.name={name}', *extra])


def rows(run: Path) -> list[dict[str, str]]:
    """metrics.csv without the wall-time column (the only value that differs between equal runs)."""
    with (run / 'metrics.csv').open(newline='') as f:
        return [{k: v for k, v in r.items() if k != 'time_s'} for r in csv.DictReader(f)]


def summary(run: Path) -> dict:
    return json.loads((run / 'summary.json').read_text())


def test_a_run_where_nothing_improves_stops_after_one_plus_patience_epochs(tmp_path, monkeypatch):
    from timm_cff.methods import LocalTrainer
    real, calls = LocalTrainer.evaluate, []

    def worsening(self, loader):  # every validation loss grows each epoch: epoch 1 is never beaten
        calls.append(1)
        return {k: v + len(calls) for k, v in real(self, loader).items()}

    monkeypatch.setattr(LocalTrainer, 'evaluate', worsening)
    assert train(tmp_path, 'flat', '--train.patience=3') == 0
    run = tmp_path / 'flat'
    assert len(rows(run)) == 4 and len(calls) == 4
    s = summary(run)
    assert (s['epochs'], s['epochs_configured'], s['patience'], s['stop_reason'], s['best_epoch']) == \
        (4, 8, 3, 'patience', 1)
    assert 'top1' in s['test']  # the stopped run still probes, tests and exports
    assert (run / 'export' / 'model.safetensors').is_file()


def test_a_patience_run_equals_the_plain_run_up_to_its_stopping_epoch(tmp_path):
    assert train(tmp_path, 'plain') == 0
    assert train(tmp_path, 'patient', '--train.patience=2') == 0
    plain, patient = rows(tmp_path / 'plain'), rows(tmp_path / 'patient')
    stop, best = summary(tmp_path / 'patient')['epochs'], summary(tmp_path / 'patient')['best_epoch']
    assert summary(tmp_path / 'patient')['stop_reason'] == 'patience' and stop < 8
    assert patient == plain[:stop] and stop == best + 2
    # the plain run's own record agrees: nothing in the two epochs after `best` beat it
    losses = [float(r['val_loss']) for r in plain]
    assert min(losses[:stop]) == losses[best - 1] and min(losses[best:stop]) >= losses[best - 1]
    assert summary(tmp_path / 'plain')['stop_reason'] == 'epochs'


def test_resume_with_more_patience_continues_as_an_uninterrupted_run(tmp_path):
    assert train(tmp_path, 'short', '--train.patience=1') == 0
    stopped = summary(tmp_path / 'short')
    assert stopped['stop_reason'] == 'patience'
    # more patience: the stopped run trains on from its last checkpoint and ends where a run started with it does
    assert main(['train', '--resume', str(tmp_path / 'short'), '--train.patience=3']) == 0
    assert train(tmp_path, 'long', '--train.patience=3') == 0
    assert load_config(tmp_path / 'short' / 'config.yaml').train.patience == 3  # a later --resume keeps it
    assert rows(tmp_path / 'short') == rows(tmp_path / 'long')
    assert summary(tmp_path / 'short')['epochs'] > stopped['epochs']
    for key in ('epochs', 'best_epoch', 'stop_reason', 'test'):
        assert summary(tmp_path / 'short')[key] == summary(tmp_path / 'long')[key]
    a, b = final_weights(tmp_path / 'short'), final_weights(tmp_path / 'long')
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_of_a_stopped_run_with_more_epochs_stays_stopped(tmp_path):
    assert train(tmp_path, 'stop', '--train.patience=1') == 0
    before = rows(tmp_path / 'stop')
    assert main(['train', '--resume', str(tmp_path / 'stop'), '--train.epochs=12']) == 0
    assert rows(tmp_path / 'stop') == before  # still out of patience: no epoch is added, stage 2 is redone
    assert summary(tmp_path / 'stop')['epochs_configured'] == 12


def test_patience_must_be_positive(tmp_path, capsys):
    assert train(tmp_path, 'bad', '--train.patience=0') == 1
    assert 'train.patience' in capsys.readouterr().err and not (tmp_path / 'bad').exists()


def test_compare_reads_a_stopped_run_as_finished_and_writes_json(tmp_path, capsys):
    assert train(tmp_path, 'stop', '--train.patience=1') == 0
    s = summary(tmp_path / 'stop')
    capsys.readouterr()
    out = tmp_path / 'results' / 'recipe'
    assert main(['compare', str(tmp_path / 'stop'), '--json', '--out', str(out)]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert row == json.loads(out.with_suffix('.json').read_text())[0]
    assert (row['method'], row['variant'], row['model'], row['dataset']) == \
        ('CFF+M', '0.4→0.1, τ 0.15', 'ViT[32 4 2]', 'mnist_subset')
    assert (row['finished'], row['stopped_early'], row['epochs_run'], row['epochs'], row['best_epoch']) == \
        (True, True, s['epochs'], 8, s['best_epoch'])
    assert row['train_images'] == s['num_images']['train'] == 180 and row['test_top1'] == s['test']['top1']
    times = [float(r['time_s']) for r in csv.DictReader((tmp_path / 'stop' / 'metrics.csv').open())]
    assert row['stage1_s'] == round(sum(times), 2) and row['s_per_epoch'] == round(sum(times) / len(times), 2)
    table = out.with_suffix('.md').read_text()
    assert f"| {s['epochs']} of 8, stopped (patience 1) |" in table and 'CFF+M (0.4→0.1, τ 0.15)' in table
    with (tmp_path / 'stop' / 'metrics.csv').open() as f:
        epochs = list(csv.DictReader(f))
    with out.with_name('recipe.history.csv').open() as f:
        assert list(csv.DictReader(f)) == [{'run': 'stop', **epoch} for epoch in epochs]  # every epoch, verbatim
