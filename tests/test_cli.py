"""The command line end to end on tiny budgets: the quickstart, resume, probe/eval/export, and the refusals."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from timm_cff import load_encoder
from timm_cff.experiment.cli import main
from timm_cff.experiment.compare import method_label, summarize_run
from timm_cff.experiment.config import Config, apply_overrides, iter_fields, load_config

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / 'timm_cff' / 'recipes' / 'quickstart.yaml')
CIFAR = ROOT.parent / 'shared' / 'data' / 'cifar10_jpeg'
TINY = ['--train.epochs=2', '--train.max_steps=2', '--probe.epochs=2', '--data.train_subset=200',
        '--data.test_subset=64', '--data.batch_size=32', '--model.depth=2', '--model.embed_dim=32',
        '--run.quiet=true']


def train(tmp_path, *extra, name='r'):
    return main(['train', '--config', QUICKSTART, *TINY, f'--run.output={tmp_path}', f'--run.name={name}', *extra])


def final_weights(run: Path) -> dict:
    return torch.load(run / 'checkpoints' / 'final.pt', weights_only=True)['trainer']['model']


def test_quickstart_smoke_run_writes_the_run_folder(tmp_path, capsys):
    assert train(tmp_path) == 0
    run = tmp_path / 'r'
    names = {p.name for p in run.iterdir()}
    assert {'config.yaml', 'environment.json', 'metrics.csv', 'probe.csv', 'summary.json', 'checkpoints',
            'export'} <= names
    summary = json.loads((run / 'summary.json').read_text())
    assert set(summary['test']) == {'loss', 'top1', 'top5'} and summary['best_epoch'] in (1, 2)
    assert len((run / 'metrics.csv').read_text().strip().splitlines()) == 3  # header + 2 epochs
    assert 'test accuracy: top1' in capsys.readouterr().out
    model = load_encoder(run / 'export')
    assert model.patch_embed.img_size == (28, 28) and model.pretrained_cfg['mean'] == [0.1307]
    # the saved config is itself a valid --config, and eval reproduces the test accuracy from the run and export
    assert main(['eval', str(run)]) == 0
    out = capsys.readouterr().out
    assert f"top1 {summary['test']['top1']:.2f}%" in out
    assert main(['eval', str(run / 'export')]) == 0
    assert f"top1 {summary['test']['top1']:.2f}%" in capsys.readouterr().out


def interrupted(*args, **kwargs):
    raise KeyboardInterrupt  # replaces engine.fit_stage2: the process dies after stage 1's checkpoints, before probing


def test_resume_after_interruption_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    assert train(tmp_path, name='full') == 0
    from timm_cff.experiment import commands as engine
    real = engine.fit_stage2
    monkeypatch.setattr(engine, 'fit_stage2', interrupted)
    assert train(tmp_path, '--train.epochs=1', name='part') == 130  # Ctrl-C: exit 130, checkpoints kept
    monkeypatch.setattr(engine, 'fit_stage2', real)
    # the interrupted run was configured for 1 epoch; extend it to the full run's 2 (any other change is refused)
    with pytest.raises(SystemExit):
        main(['train', '--resume'])
    assert main(['train', '--resume', str(tmp_path / 'part'), '--train.lr=0.5']) == 1
    assert main(['train', '--resume', str(tmp_path / 'part'), '--train.epochs=2']) == 0
    assert load_config(tmp_path / 'part' / 'config.yaml').train.epochs == 2  # a later --resume keeps the extension
    full, part = final_weights(tmp_path / 'full'), final_weights(tmp_path / 'part')
    assert all(torch.equal(full[k], part[k]) for k in full)
    s_full, s_part = (json.loads((tmp_path / n / 'summary.json').read_text()) for n in ('full', 'part'))
    assert s_full['test'] == s_part['test'] and s_full['best_epoch'] == s_part['best_epoch']


def _best_by_csv(run: Path, key: str) -> int:
    """The selected epoch recomputed from metrics.csv: the first minimum of the selection column."""
    with (run / 'metrics.csv').open() as f:
        rows = list(csv.DictReader(f))
    losses = [float(r[f'val_{key}']) for r in rows]
    return losses.index(min(losses)) + 1


def test_resume_records_its_environment_and_warns_when_the_arithmetic_may_differ(tmp_path, capsys):
    assert train(tmp_path, '--train.epochs=1') == 0
    path = tmp_path / 'r' / 'environment.json'
    started = json.loads(path.read_text())
    assert started['cpu_capability'] == torch.backends.cpu.get_cpu_capability() and 'resumes' not in started
    other = 'AVX2' if started['cpu_capability'] != 'AVX2' else 'AVX512'  # as if started on another CPU
    path.write_text(json.dumps({**started, 'cpu_capability': other}))
    capsys.readouterr()
    assert main(['train', '--resume', str(tmp_path / 'r'), '--train.epochs=2']) == 0
    err = capsys.readouterr().err
    assert f"cpu_capability ({other} -> {started['cpu_capability']})" in err and 'not bit for bit' in err
    assert 'torch (' not in err  # only what changed is named
    record = json.loads(path.read_text())
    assert record['cpu_capability'] == other and len(record['resumes']) == 1  # the start's record is kept
    assert record['resumes'][0]['cpu_capability'] == started['cpu_capability']
    assert main(['train', '--resume', str(tmp_path / 'r'), '--train.epochs=3']) == 0
    assert 'not bit for bit' not in capsys.readouterr().err  # compared with the last resume: nothing changed
    assert len(json.loads(path.read_text())['resumes']) == 2


def test_resume_on_another_cpu_model_of_the_same_capability_warns(tmp_path, capsys):
    assert train(tmp_path, '--train.epochs=1') == 0
    path = tmp_path / 'r' / 'environment.json'
    started = json.loads(path.read_text())
    names = [line.split(':', 1)[1].strip() for line in Path('/proc/cpuinfo').read_text().splitlines()
             if line.startswith('model name')] if Path('/proc/cpuinfo').is_file() else []
    if names:
        assert started['cpu_model'] == names[0]
    path.write_text(json.dumps({**started, 'cpu_model': 'Another CPU'}))  # same capability, another chip
    capsys.readouterr()
    assert main(['train', '--resume', str(tmp_path / 'r'), '--train.epochs=2']) == 0
    err = capsys.readouterr().err
    assert f"cpu_model (Another CPU -> {started['cpu_model']})" in err and 'not bit for bit' in err
    assert 'cpu_capability (' not in err


def _best_loss_by_csv(run, key):
    with (run / 'metrics.csv').open() as f:
        return min(float(r[f'val_{key}']) for r in csv.DictReader(f))


def test_compare_tables_finished_interrupted_and_extended_runs(tmp_path, capsys, monkeypatch):
    from timm_cff.experiment import commands as engine
    assert train(tmp_path, '--train.epochs=3', name='cffm') == 0
    assert train(tmp_path, '--train.method=ff', '--model.name=mlp', name='ff') == 0
    key = json.loads((tmp_path / 'ff' / 'summary.json').read_text())['selection_key']
    monkeypatch.setattr(engine, 'fit_stage2', interrupted)
    # extended to 3 epochs, stopped before the probe: the summary is stale
    assert main(['train', '--resume', str(tmp_path / 'ff'), '--train.epochs=3']) == 130
    capsys.readouterr()
    assert main(['compare', str(tmp_path / 'cffm'), str(tmp_path / 'ff')]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and lines[0].startswith('| run | method |')
    cells = [[c.strip() for c in line.strip('|').split('|')] for line in lines[2:]]
    summary = json.loads((tmp_path / 'cffm' / 'summary.json').read_text())
    assert cells[0][:5] == ['cffm', 'CFF+M (0.4→0.1, τ 0.15)', 'ViT[32 4 2]', 'mnist_subset', '3 of 3']
    assert cells[0][5] == str(_best_by_csv(tmp_path / 'cffm', summary['selection_key']))
    assert cells[0][6] == f"{_best_loss_by_csv(tmp_path / 'cffm', summary['selection_key']):.3f}"
    assert cells[0][7] == f"{summary['test']['top1']:.2f}" and cells[0][8] == f"top1 {summary['test']['top1']:.2f}"
    assert cells[1][:5] == ['ff', 'FF', 'MLP[32 2]', 'mnist_subset', '3 of 3, unfinished']
    assert cells[1][5] == f'{_best_by_csv(tmp_path / "ff", key)} so far' and cells[1][7:10] == ['–', '–', '–']
    assert cells[1][6] == f'{_best_loss_by_csv(tmp_path / "ff", key):.3f}'  # the best so far, from last.pt
    # --out keeps both runs' epochs in one CSV: each run's own cells verbatim, the other run's columns empty
    assert main(['compare', str(tmp_path / 'cffm'), str(tmp_path / 'ff'), '--out', str(tmp_path / 't')]) == 0
    with (tmp_path / 't.history.csv').open() as f:
        history = list(csv.DictReader(f))
    for name in ('cffm', 'ff'):
        with (tmp_path / name / 'metrics.csv').open() as f:
            own = list(csv.DictReader(f))
        mine = [r for r in history if r['run'] == name]
        assert [{k: r[k] for k in own[0]} for r in mine] == own and len(own) == 3
        assert all(v == '' for r in mine for k, v in r.items() if k not in own[0] and k != 'run')
    assert set(own[0]) != set(history[0]) - {'run'}  # the two runs have different columns
    row = summarize_run(tmp_path / 'ff')  # an unfinished run still knows its data from dataset.json
    assert row['train_images'] == 180 and not row['stopped_early']
    # seconds per epoch from ff's own metrics.csv (a fast machine's MLP epochs may round to 0.00)
    assert row['s_per_epoch'] == round(sum(float(r['time_s']) for r in own) / len(own), 2)
    # a summary without an epoch count (older runs) counts while it is newer than the last epoch
    run = tmp_path / 'cffm'
    (run / 'summary.json').write_text(json.dumps({k: v for k, v in summary.items() if k != 'epochs'}))
    assert summarize_run(run)['finished']
    later = (run / 'summary.json').stat().st_mtime + 10
    os.utime(run / 'metrics.csv', (later, later))
    assert not summarize_run(run)['finished']
    assert main(['compare', str(tmp_path)]) == 1 and 'not a run folder' in capsys.readouterr().err


@pytest.mark.parametrize('overrides, label', [
    ({}, 'CFF+M (0.4→0.1, τ 0.15)'),
    ({'train.m0': 0.0, 'train.m_last': 0.0}, 'CFF (τ 0.15)'),
    ({'train.loss': 'supcon', 'train.num_views': 1}, 'CFF (τ 0.15, 1 view)'),  # margins do not apply to supcon
    ({'train.margin_schedule': 'cosine', 'train.temperature': 0.07}, 'CFF+M (0.4→0.1 cosine, τ 0.07)'),
    ({'train.method': 'collab'}, 'FF-Collab'), ({'train.method': 'bp'}, 'BP+CE'),
    ({'train.method': 'collab', 'train.score_first_stage': False}, 'FF-Collab (stages 2..L scored)'),
    ({'train.method': 'symba', 'train.score_first_stage': True}, 'SymBa (all stages scored)'),
    ({'train.method': 'ff', 'train.score_first_stage': False}, 'FF')])
def test_compare_names_the_paper_column(overrides, label):
    cfg = Config()
    apply_overrides(cfg, overrides)
    assert method_label(cfg) == label


def test_probe_and_export_subcommands(tmp_path, capsys):
    assert train(tmp_path) == 0
    run = tmp_path / 'r'
    assert main(['probe', str(run), '--probe.epochs=1']) == 0
    assert len((run / 'probe.csv').read_text().strip().splitlines()) == 2
    assert main(['export', str(run), '--out', str(tmp_path / 'e'), '--checkpoint', 'best']) == 0
    best = torch.load(run / 'checkpoints' / 'best.pt', weights_only=True)['trainer']['model']
    exported = load_encoder(tmp_path / 'e').state_dict()
    assert all(torch.equal(best[k], exported[k]) for k in best)
    meta = json.loads((tmp_path / 'e' / 'timm_cff.json').read_text())  # which stage-1 epoch the export holds
    assert (meta['checkpoint'], meta['epoch']) == ('best', json.loads((run / 'summary.json').read_text())['best_epoch'])


@pytest.mark.parametrize('args,message', [
    (['--data.dataset=npz', '--data.root=/nonexistent/folder'], 'train.npz not found'),
    (['--model.img_size=32'], 'set model.img_size=28'),
    (['--train.margin_schedule=zigzag'], 'Unknown margin schedule'),
    (['--data.stats=cifar10'], 'normalisation channels'),
])
def test_bad_input_is_one_line_and_nonzero(tmp_path, capsys, args, message):
    assert train(tmp_path, *args) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and 'Traceback' not in err


def test_unknown_option_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train(tmp_path, '--train.epoch=3')
    assert exit_info.value.code == 2 and '--train.epoch=3' in capsys.readouterr().err


def test_corrupt_checkpoint_and_non_finite_loss(tmp_path, capsys, monkeypatch):
    assert train(tmp_path, '--train.epochs=1') == 0
    last = tmp_path / 'r' / 'checkpoints' / 'last.pt'
    last.write_bytes(last.read_bytes()[:100])
    assert main(['train', '--resume', str(tmp_path / 'r')]) == 1
    assert 'may be corrupt' in capsys.readouterr().err
    from timm_cff.loss import supcon
    calls = {'n': 0}
    real = supcon.marginal_supcon_loss

    def nan_in_second_epoch(*args, **kwargs):
        calls['n'] += 1
        value = real(*args, **kwargs)
        return value * float('nan') if calls['n'] > 8 else value  # 2 steps x 2 stages x (train + val) = epoch 1
    monkeypatch.setattr(supcon, 'marginal_supcon_loss', nan_in_second_epoch)
    assert train(tmp_path, name='nan') == 3
    assert 'Non-finite loss' in capsys.readouterr().err
    saved = torch.load(tmp_path / 'nan' / 'checkpoints' / 'last.pt', weights_only=True)
    assert saved['state']['epoch'] == 1  # the last good checkpoint survives


def test_help_lists_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit):
        main(['train', '--help'])
    text = ' '.join(capsys.readouterr().out.split())
    for key, _, value in iter_fields(Config()):
        assert f'--{key}' in text and f'(default: {value!r})' in text, key


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, '-m', 'timm_cff', '--help'], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and 'train' in out.stdout and 'export' in out.stdout


@pytest.mark.skipif(not (CIFAR / 'train.npz').exists(), reason='needs ../shared/data/cifar10_jpeg')
def test_cifar10_npz_end_to_end(tmp_path):
    args = ['train', '--data.dataset=npz', f'--data.root={CIFAR}', '--data.stats=cifar10', '--data.crop_padding=4',
            '--data.train_subset=300', '--data.test_subset=100', '--data.batch_size=50', '--model.depth=2',
            '--model.embed_dim=32', '--model.num_heads=2', '--train.epochs=1', '--probe.epochs=1',
            f'--run.output={tmp_path}', '--run.name=c', '--run.quiet=true']
    assert main(args) == 0
    summary = json.loads((tmp_path / 'c' / 'summary.json').read_text())
    assert summary['num_images'] == {'train': 270, 'val': 30, 'test': 100} and summary['num_classes'] == 10
    assert load_encoder(tmp_path / 'c' / 'export').pretrained_cfg['mean'] == [0.4914, 0.4822, 0.4465]


@pytest.mark.parametrize('method', ['cff', 'ff', 'symba', 'collab', 'bp'])
@pytest.mark.parametrize('family', ['vit', 'mlp'])
def test_every_method_runs_end_to_end(tmp_path, capsys, method, family):
    extra = ['--model.name=mlp', '--model.embed_dim=16'] if family == 'mlp' else []
    assert train(tmp_path, f'--train.method={method}', '--train.epochs=1', '--probe.epochs=1', *extra) == 0
    run = tmp_path / 'r'
    summary = json.loads((run / 'summary.json').read_text())
    assert summary['method'] == method and 0.0 <= summary['test']['top1'] <= 100.0
    assert ('test_one_pass_head' in summary) == (method in ('ff', 'symba', 'collab'))
    assert (summary['export'] is not None) == (method in ('cff', 'bp') and family == 'vit')
    assert main(['eval', str(run), '--timing']) == 0
    out = capsys.readouterr().out
    assert f"top1 {summary['test']['top1']:.2f}%" in out and 'inference one forward' in out
    assert ('inference goodness c passes' in out) == (method in ('ff', 'symba', 'collab'))


PIPELINE_ARGS = ['--config', QUICKSTART, *TINY, '--model.depth=3', '--train.max_steps=3']


def test_pipeline_over_devices_in_one_process_equals_sequential(tmp_path):
    assert main(['train', *PIPELINE_ARGS, f'--run.output={tmp_path}', '--run.name=seq']) == 0
    assert main(['train', *PIPELINE_ARGS, f'--run.output={tmp_path}', '--run.name=dev',
                 "--pipeline.devices=['cpu', 'cpu']"]) == 0
    seq, dev = final_weights(tmp_path / 'seq'), final_weights(tmp_path / 'dev')
    assert all(torch.equal(seq[k], dev[k]) for k in seq)


def test_torchrun_pipeline_of_two_processes_equals_sequential(tmp_path):
    """Two processes (gloo on loopback), one stage group each: bit-identical to one process with one thread."""
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': str(ROOT)}
    common = [*PIPELINE_ARGS, f'--run.output={tmp_path}']
    subprocess.run([sys.executable, '-m', 'timm_cff', 'train', *common, '--run.name=seq'], env=env, check=True,
                   timeout=300, cwd=tmp_path)
    subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc-per-node', '2',
                    '-m', 'timm_cff', 'train', *common, '--run.name=pipe', '--pipeline.stages=2'], env=env,
                   check=True, timeout=300, cwd=tmp_path, capture_output=True)
    seq, pipe = final_weights(tmp_path / 'seq'), final_weights(tmp_path / 'pipe')
    assert all(torch.equal(seq[k], pipe[k]) for k in seq)
    assert (tmp_path / 'pipe' / 'checkpoints' / 'pipeline' / 'best' / 'complete.json').exists()
    rows = [(tmp_path / n / 'metrics.csv').read_text().splitlines() for n in ('seq', 'pipe')]
    assert [r.split(',')[3:] for r in rows[0]] == [r.split(',')[3:] for r in rows[1]]  # same losses, any time
    # `compare` reads an unfinished pipeline run's best epoch from its newest rank checkpoint
    best = json.loads((tmp_path / 'pipe' / 'summary.json').read_text())['best_epoch']
    (tmp_path / 'pipe' / 'summary.json').unlink()
    row = summarize_run(tmp_path / 'pipe')
    assert not row['finished'] and row['best_epoch'] == best and row['epochs_run'] == 2


def test_pipeline_stages_without_torchrun_is_refused(tmp_path, capsys):
    assert train(tmp_path, '--pipeline.stages=2') == 1
    assert 'launch with torchrun' in capsys.readouterr().err


def test_analyze_a_run_and_an_export(tmp_path):
    assert train(tmp_path, '--train.epochs=2', '--data.train_subset=1000') == 0  # 100 validation images
    run = tmp_path / 'r'
    header = (run / 'metrics.csv').read_text().splitlines()[0]
    assert 'train_clamped_stage0' in header and 'val_clamped_stage1' in header  # R(k) logged during training
    assert main(['analyze', str(run), '--samples=100', '--tsne-samples=30']) == 0
    report = (run / 'analysis' / 'report.md').read_text()
    metrics = json.loads((run / 'analysis' / 'metrics.json').read_text())
    assert 'Fisher' in report and metrics['num_blocks'] == 2 and metrics['margins'] == pytest.approx([0.4, 0.1])
    assert {p.name for p in (run / 'analysis').iterdir()} >= {'report.md', 'metrics.json', 'depth.png',
                                                              'training_curves.png'}
    assert main(['analyze', str(run / 'export'), '--out', str(tmp_path / 'a'), '--samples=100',
                 '--tsne-samples=0']) == 0
    from_export = json.loads((tmp_path / 'a' / 'metrics.json').read_text())
    assert from_export['fisher'] == metrics['fisher'] and from_export['margins'] == metrics['margins']
