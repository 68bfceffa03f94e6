"""Layer-wise analysis against independent references: numpy scatter matrices, brute-force pair loops,
scikit-learn's LDA, the stage adapters, and an end-to-end report with and without the plot extra."""
import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from torch import nn

from conftest import make_batch, make_vit
from timm_cff import LocalTrainer, create_stages, register_stages
from timm_cff.analysis import (
    PLOT_INSTALL_HINT, analyze, anchor_similarity, block_series, clamped_fraction, clamped_fraction_metric,
    extract_block_features, fisher_criterion, fit_linear_discriminant, layerwise_metrics, linear_probe_accuracy,
    read_history, write_report)
from timm_cff.analysis.lda import split_indices


def clusters(num_classes=4, per_class=50, dim=6, spread=1.0, distance=5.0, seed=0):
    """Gaussian clusters: class c centred at ``distance`` times a random unit direction, noise ``spread``.

    ``per_class`` is one count for every class or a list of counts (unbalanced classes)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((num_classes, dim))
    centres *= distance / np.linalg.norm(centres, axis=1, keepdims=True)
    labels = np.repeat(np.arange(num_classes), per_class)
    x = centres[labels] + spread * rng.standard_normal((len(labels), dim))
    return torch.from_numpy(x), torch.from_numpy(labels)


# ------------------------------------------------------------------------------------------------- Fisher
def numpy_fisher(x: np.ndarray, y: np.ndarray) -> float:
    """Eqs. 19-22 written out with per-class loops, plain sums and an explicit inverse."""
    mu = x.mean(0)
    s_w, s_b = np.zeros((x.shape[1],) * 2), np.zeros((x.shape[1],) * 2)
    for c in np.unique(y):
        xc = x[y == c]
        mc = xc.mean(0)
        for row in xc:
            s_w += np.outer(row - mc, row - mc)
        s_b += len(xc) * np.outer(mc - mu, mc - mu)
    return float(np.trace(np.linalg.inv(s_w) @ s_b))


@pytest.mark.parametrize('spread', [0.5, 1.0, 3.0])
def test_fisher_matches_numpy(spread):
    x, y = clusters(per_class=[20, 35, 50, 65], spread=spread)
    out = fisher_criterion(x.float(), y)
    assert out['ridge'] == 0.0
    assert out['value'] == pytest.approx(numpy_fisher(x.numpy(), y.numpy()), rel=1e-5)


def test_fisher_larger_for_separated_clusters():
    values = [fisher_criterion(*clusters(spread=s))['value'] for s in (0.5, 1.0, 3.0)]
    assert values[0] > values[1] > values[2] > 0
    assert values[0] > 20 * values[2]


def test_fisher_invariant_to_invertible_linear_maps():
    x, y = clusters()
    a = torch.randn(6, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 3 * torch.eye(6)
    assert fisher_criterion(x @ a.T + 7.0, y)['value'] == pytest.approx(fisher_criterion(x, y)['value'], rel=1e-8)


def test_fisher_states_its_ridge_when_s_w_is_singular():
    x, y = clusters(per_class=3, dim=20)  # 12 samples in 20 dimensions: S_w has rank 8
    out = fisher_criterion(x, y, ridge=1e-6)
    assert out['ridge'] > 0 and np.isfinite(out['value'])
    s_w = sum(np.cov(x[y == c].numpy().T, bias=True) * 3 for c in range(4)) / 12
    assert out['ridge'] == pytest.approx(1e-6 * np.trace(s_w) / 20, rel=1e-6)
    with pytest.raises(ValueError, match='two classes'):
        fisher_criterion(x, torch.zeros_like(y))


# ------------------------------------------------------------------------------------------------- pairs
def brute_force_clamped(features: torch.Tensor, labels: torch.Tensor, margin: float) -> float:
    """Loop over every ordered pair of view-major anchors; count positives and those with cos + m > 1."""
    b, v, _ = features.shape
    z = [features[i % b, i // b] for i in range(v * b)]
    positives = clamped = 0
    for i, j in itertools.permutations(range(v * b), 2):
        if labels[i % b] == labels[j % b]:
            positives += 1
            cos = float(torch.dot(z[i], z[j]) / (z[i].norm() * z[j].norm()))
            clamped += margin > 0 and cos + margin > 1
    return clamped / positives


@pytest.mark.parametrize('margin', [0.0, 0.1, 0.25, 0.4])
def test_clamped_fraction_matches_brute_force(cff_fixture, margin):
    labels, f1, f2 = cff_fixture
    features = torch.stack([f1, f2], 1)
    expected = brute_force_clamped(features, labels, margin)
    assert float(clamped_fraction(features, labels, margin)) == pytest.approx(expected, abs=1e-12)
    if margin in (0.1, 0.4):  # the counts of cff-method.md §4.6: 32 and 48 of 256 positive pairs
        assert expected == {0.1: 32 / 256, 0.4: 48 / 256}[margin]


@pytest.mark.parametrize('views', [2, 3])
@pytest.mark.parametrize('margin', [0.0, 0.3, 1.5])
def test_clamped_fraction_of_identical_views_counts_every_copy(views, margin):
    """One tensor expanded over the views (stride 0) gives the brute-force count over V real copies."""
    g = torch.Generator().manual_seed(views)
    f, labels = torch.randn(12, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (12,), generator=g)
    expected = brute_force_clamped(f[:, None].repeat(1, views, 1), labels, margin)
    shared = float(clamped_fraction(f[:, None].expand(-1, views, -1), labels, margin))
    assert shared == pytest.approx(expected, abs=1e-6)  # a float32 ratio of pair counts
    assert margin == 0.0 or expected > 0


def test_nothing_is_clamped_without_margin():
    f = torch.randn(6, 8)
    same_views = torch.stack([f, f], 1)  # identical views: cosines of 1 up to rounding
    assert float(clamped_fraction(same_views, torch.zeros(6, dtype=torch.long), 0.0)) == 0.0


def per_stage(stats: dict, name: str, index: int):
    """``{name}_stage{i}`` of a trainer's statistics (``{name}_block{i}`` in runs before the rename)."""
    return stats[f'{name}_stage{index}'] if f'{name}_stage{index}' in stats else stats[f'{name}_block{index}']


def test_clamped_fraction_as_a_trainer_stage_metric():
    """evaluate() on one batch reports exactly the brute-force count on that batch's pooled stage outputs."""
    torch.manual_seed(0)
    model = make_vit(depth=3)
    trainer = LocalTrainer(model, margins=[0.6, 0.5, 0.4], stage_metrics={'clamped': clamped_fraction_metric})
    views, y = make_batch(batch=8, num_classes=2)
    out = trainer.evaluate([(views, y)])
    stages, h = create_stages(model.eval()), torch.cat(views)
    with torch.no_grad():
        for i, margin in enumerate([0.6, 0.5, 0.4]):
            h = stages.forward_stage(i, h)
            features = stages.pool(h).view(2, 8, -1).transpose(0, 1)
            assert per_stage(out, 'clamped', i) == pytest.approx(brute_force_clamped(features, y, margin), abs=1e-6)
    assert 0 < per_stage(out, 'clamped', 0) < 1
    assert per_stage(trainer.step(views, y), 'clamped', 2) is not None


def test_anchor_similarity_matches_loops():
    x, y = clusters(num_classes=3, per_class=5, spread=2.0)
    same, other = [], []
    for a in range(len(y)):
        cos = [float(torch.cosine_similarity(x[a], x[b], dim=0)) for b in range(len(y))]
        same.append(np.mean([cos[b] for b in range(len(y)) if b != a and y[b] == y[a]]))
        other.append(np.mean([cos[b] for b in range(len(y)) if y[b] != y[a]]))
    out = anchor_similarity(x, y)
    assert out['same_class_cosine'] == pytest.approx(np.mean(same), abs=1e-12)
    assert out['different_class_cosine'] == pytest.approx(np.mean(other), abs=1e-12)
    assert out['same_class_cosine_std'] == pytest.approx(np.std(same), abs=1e-12)


# ------------------------------------------------------------------------------------------------- probe
@pytest.mark.parametrize('collinear', [False, True])
def test_probe_separates_separable_clusters(collinear):
    """Collinear class means defeat a least-squares one-hot classifier (masking); the LDA probe separates them."""
    x, y = clusters(num_classes=5, per_class=40, spread=0.3)
    if collinear:
        x = torch.randn(200, 6, dtype=torch.float64) * 0.3
        x[:, 0] += 3.0 * y
    assert linear_probe_accuracy(x, y) >= 99.0
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
    assert linear_probe_accuracy(x, shuffled) < 50.0  # chance is 20 %


def test_probe_equals_scikit_learn_lda():
    lda = pytest.importorskip('sklearn.discriminant_analysis').LinearDiscriminantAnalysis
    x, y = clusters(num_classes=4, per_class=30, spread=3.0)
    fit, test = split_indices(len(y), 0.5, seed=0)
    ours = fit_linear_discriminant(x[fit], y[fit], 4, shrinkage=0.1)(x[test])
    reference = lda(solver='lsqr', shrinkage=0.1).fit(x[fit].numpy(), y[fit].numpy())
    assert np.allclose(ours.numpy(), reference.decision_function(x[test].numpy()), atol=1e-8)
    assert linear_probe_accuracy(x, y, shrinkage=0.1) == pytest.approx(100 * reference.score(x[test], y[test]))


# ------------------------------------------------------------------------------------------------- features
VITS = {
    'cff_vit': lambda: make_vit(depth=3),
    'class token': lambda: timm.create_model('test_vit', img_size=32),
    'register token': lambda: timm.create_model('test_vit2', img_size=32),
}


@pytest.mark.parametrize('name', VITS)
def test_intermediates_pool_like_the_stages(name):
    """The block features against timm's own forward_intermediates (one pass), pooled by the model."""
    torch.manual_seed(0)
    model = VITS[name]().eval()
    size = model.patch_embed.img_size
    x, y = torch.randn(5, 3, *size), torch.arange(5)
    features, labels = extract_block_features(model, [(x, y)])
    with torch.no_grad():
        outputs = model.forward_intermediates(x, return_prefix_tokens=True, output_fmt='NLC', intermediates_only=True)
        if model.num_prefix_tokens:  # timm splits off class/register tokens; pool expects them in front
            outputs = [torch.cat([prefix, tokens], dim=1) for tokens, prefix in outputs]
        for i, h in enumerate(outputs):
            assert torch.allclose(features[i], model.pool(h), atol=1e-5), i
    assert torch.equal(labels, y)


class TinyMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(12, 8), nn.Linear(8, 8)])

    def forward(self, x):
        for layer in self.layers:
            x = torch.relu(layer(x.flatten(1)))
        return x


@register_stages(TinyMLP)
class TinyMLPStages:
    def __init__(self, model):
        self.model, self.num_stages = model, len(model.layers)

    def forward_stage(self, index, h):
        return torch.relu(self.model.layers[index](h.flatten(1)))

    def pool(self, h):
        return h

    def stage_parameters(self, index):
        return list(self.model.layers[index].parameters())


def test_other_families_go_through_their_stage_adapter():
    torch.manual_seed(0)
    model = TinyMLP().train()
    x = torch.randn(10, 3, 2, 2)
    loader = [((x[:6], x[:6] + 1), torch.arange(6)), ((x[6:], x[6:] + 1), torch.arange(4))]  # two views each
    features, labels = extract_block_features(model, loader, max_samples=8)
    assert [f.shape for f in features] == [(8, 8), (8, 8)] and labels.tolist() == [0, 1, 2, 3, 4, 5, 0, 1]
    with torch.no_grad():
        assert torch.allclose(features[1], model(x[:8]))
    assert model.training  # the mode is restored


# ------------------------------------------------------------------------------------------------- report
def tiny_run(tmp_path, epochs=3, depth=3):
    """A tiny ViT, a class-shifted validation loader and a metrics.csv shaped like a training run's."""
    torch.manual_seed(0)
    model = make_vit(depth=depth, num_classes=3)
    x, y = torch.randn(60, 3, 16, 16), torch.arange(60) % 3
    x += y[:, None, None, None].float()
    loader = [((x[i:i + 20], x[i:i + 20]), y[i:i + 20]) for i in range(0, 60, 20)]
    columns = ['epoch', 'time_s', 'lr', 'train_loss'] + [f'train_loss_block{i}' for i in range(depth)] + \
        ['val_loss'] + [f'val_loss_block{i}' for i in range(depth)] + \
        [f'{s}_clamped_block{i}' for s in ('train', 'val') for i in range(depth)]
    rows = [[e, 1.0, 4e-3] + [5.0 - 0.1 * e - 0.01 * c for c in range(len(columns) - 3)] for e in range(1, epochs + 1)]
    csv = tmp_path / 'metrics.csv'
    csv.write_text('\n'.join(','.join(map(str, r)) for r in [columns] + rows) + '\n')
    return model, loader, csv


def test_history_is_read_per_block(tmp_path):
    _, _, csv = tiny_run(tmp_path)
    history = read_history(csv)
    assert history['epoch'] == [1.0, 2.0, 3.0]
    assert len(block_series(history, 'val_loss')) == 3 and len(block_series(history, 'train_clamped')) == 3
    assert block_series(history, 'val_loss')[1] == history['val_loss_block1']
    with pytest.raises(FileNotFoundError, match='metrics.csv'):
        read_history(tmp_path / 'missing.csv')


def test_analyze_writes_every_promised_file(tmp_path):
    pytest.importorskip('matplotlib')
    pytest.importorskip('sklearn')
    model, loader, csv = tiny_run(tmp_path)
    out = analyze(model, loader, margins=[0.4, 0.25, 0.1], history_csv=csv, out_dir=tmp_path / 'report',
                  class_names=['a', 'b', 'c'], tsne_samples=30)
    names = {'report.md', 'metrics.json', 'depth.png', 'tsne.png', 'training_curves.png', 'clamped_curves.png'}
    assert {p.name for p in (tmp_path / 'report').iterdir()} == names
    assert {str(tmp_path / 'report' / n) for n in names} == set(out['files'])
    for png in names - {'report.md', 'metrics.json'}:
        assert (tmp_path / 'report' / png).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
        assert f']({png})' in (tmp_path / 'report' / 'report.md').read_text()
    saved = json.loads((tmp_path / 'report' / 'metrics.json').read_text())
    assert saved['fisher'] == pytest.approx(out['fisher']) and len(saved['clamped_fraction']) == 3
    assert saved['margins'] == pytest.approx([0.4, 0.25, 0.1])
    features, labels = extract_block_features(model, loader)
    assert out['fisher'][2] == pytest.approx(fisher_criterion(features[2], labels)['value'])


def test_analyze_without_the_plot_extra_still_writes_the_numbers(tmp_path, monkeypatch):
    model, loader, csv = tiny_run(tmp_path)
    monkeypatch.setitem(sys.modules, 'matplotlib', None)  # `import matplotlib` now raises ImportError
    out = analyze(model, loader, margins=0.2, history_csv=csv, out_dir=tmp_path / 'report')
    assert {p.name for p in (tmp_path / 'report').iterdir()} == {'report.md', 'metrics.json'}
    report = (tmp_path / 'report' / 'report.md').read_text()
    assert PLOT_INSTALL_HINT in report and 'matplotlib' in report and '| 2 |' in report
    assert json.loads((tmp_path / 'report' / 'metrics.json').read_text())['figures'] == []
    assert len(out['probe_accuracy']) == 3


def test_layerwise_metrics_without_margins_leave_r_k_out():
    x, y = clusters()
    metrics = layerwise_metrics([x, 2 * x], y)
    assert 'clamped_fraction' not in metrics and metrics['margins'] is None
    assert metrics['fisher'][0] == pytest.approx(metrics['fisher'][1])
    assert metrics['separable_block'] == 0


def test_the_package_imports_without_the_plot_extra():
    code = ("import sys; sys.modules['matplotlib'] = sys.modules['sklearn'] = None; import timm_cff.analysis as a; "
            "assert a.missing_plot_packages() == ['matplotlib', 'scikit-learn']")
    subprocess.run([sys.executable, '-c', code], check=True, cwd=Path(__file__).parents[1])


def test_report_of_a_run_without_per_block_history(tmp_path):
    """An end-to-end (BP) run logs one loss per epoch: the curves fall back to it and R(k) curves are left out."""
    pytest.importorskip('matplotlib')
    csv = tmp_path / 'metrics.csv'
    csv.write_text('epoch,time_s,lr,train_loss,val_loss,val_top1\n1,1.0,5e-4,2.1,2.0,25.0\n2,1.0,5e-4,1.9,1.8,33.0\n')
    x, y = clusters()
    files = write_report(tmp_path / 'out', layerwise_metrics([x, x], y, margins=0.1), history=read_history(csv))
    assert {f.name for f in files} == {'report.md', 'metrics.json', 'depth.png', 'training_curves.png'}
    assert 'Last epoch (2): train_loss 1.900, val_loss 1.800, val_top1 33.000.' in (files[0]).read_text()
