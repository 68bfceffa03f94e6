"""A non-finite value anywhere stops the run (stage 1, the probe, the one-pass head), keeps the last good
checkpoint, and the advice it gives works: resume with a lower learning rate. summary.json is strict JSON."""
import json
import math

import pytest
import torch

from test_cli import train
from timm_cff import train_linear_probe
from timm_cff.experiment.cli import main
from timm_cff.experiment.rundir import RunDir
from timm_cff.methods import NonFiniteLossError


def test_a_nan_in_stage1_is_resumed_with_a_lower_learning_rate(tmp_path, capsys):
    # lr 1e6 blows the weights up after the first updates; the run stops before any weight takes the NaN
    assert train(tmp_path, '--train.lr=1e6', '--train.epochs=3', name='nan') == 3
    run = tmp_path / 'nan'
    assert 'Non-finite loss' in capsys.readouterr().err
    record = json.loads((run / 'nonfinite.json').read_text())
    assert record['stops'][0]['in'] == 'stage 1'
    last = run / 'checkpoints' / 'last.pt'
    if last.exists():  # the kept checkpoint (if an epoch finished) is a good one
        weights = torch.load(last, weights_only=True)['trainer']['model']
        assert all(torch.isfinite(w).all() for w in weights.values())
    # the advice: a lower learning rate is accepted now (and recorded); other changes are still refused
    assert main(['train', '--resume', str(run), '--train.temperature=0.5']) == 1
    assert main(['train', '--resume', str(run), '--train.lr=1e-3']) == 0
    assert RunDir(run).read_config().train.lr == 1e-3
    assert json.loads((run / 'nonfinite.json').read_text())['resumed_with'] == [{'train.lr': [1e6, 1e-3]}]
    assert (run / 'summary.json').is_file()


def test_a_clean_run_may_not_change_its_learning_rate_on_resume(tmp_path):
    assert train(tmp_path, '--train.epochs=1', name='ok') == 0
    assert main(['train', '--resume', str(tmp_path / 'ok'), '--train.lr=1e-3']) == 1


def test_the_probe_refuses_a_nan_before_the_head_changes():
    model = torch.nn.Module()
    model.fc_norm, model.head = torch.nn.LayerNorm(4), torch.nn.Linear(4, 3)
    model.forward_features = lambda x: x
    model.forward_head = lambda f: model.head(model.fc_norm(f))
    head_before = {k: v.clone() for k, v in model.head.state_dict().items()}
    x = torch.randn(8, 4)
    x[3, 0] = float('nan')
    with pytest.raises(NonFiniteLossError, match='stage probe'):
        train_linear_probe(model, [(x, torch.arange(8) % 3)], epochs=2, reinit=False)
    assert all(torch.equal(head_before[k], v) for k, v in model.head.state_dict().items())
    with pytest.raises(ValueError, match='epochs >= 1'):
        train_linear_probe(model, [(x, torch.arange(8) % 3)], epochs=0)


def test_a_nan_in_the_one_pass_head_stops_the_run(tmp_path, monkeypatch, capsys):
    from timm_cff import probe
    real = probe.F.cross_entropy
    monkeypatch.setattr(probe.F, 'cross_entropy', lambda *a, **k: real(*a, **k) * float('nan'))
    assert train(tmp_path, '--train.method=symba', '--model.name=mlp', '--train.epochs=1', name='head') == 3
    record = json.loads((tmp_path / 'head' / 'nonfinite.json').read_text())
    assert record['stops'][0]['in'] == 'stage 2' and not (tmp_path / 'head' / 'summary.json').exists()


def test_summary_is_strict_json(tmp_path):
    RunDir(tmp_path).write_json('summary.json', {'best_val_loss': math.nan, 'x': [math.inf, 1.0]})
    text = (tmp_path / 'summary.json').read_text()
    assert 'NaN' not in text and 'Infinity' not in text
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f'non-strict JSON constant {c}')) == \
        {'best_val_loss': None, 'x': [None, 1.0]}


@pytest.mark.parametrize('name', ['supcon', 'marginal_supcon', 'ff', 'symba'])
def test_losses_refuse_an_empty_batch_and_integer_features(name):
    from timm_cff import create_loss
    loss = create_loss(name)
    args = (lambda f: (f, torch.zeros(len(f), dtype=torch.long))) if 'supcon' in name else (lambda f: (f, f))
    with pytest.raises(ValueError, match='batch is empty'):
        loss(*args(torch.empty(0, 2, 4) if 'supcon' in name else torch.empty(0, 4)))
    with pytest.raises(TypeError, match='floating point'):
        loss(*args(torch.ones(3, 2, 4, dtype=torch.long) if 'supcon' in name else torch.ones(3, 4, dtype=torch.long)))
