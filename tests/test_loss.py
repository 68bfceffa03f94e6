"""Losses against the paper's equations: per-anchor Python loops, the numeric fixture, closed forms, gradients."""
import math

import pytest
import torch
import torch.nn.functional as F

from timm_cff.loss import (FFLoss, MarginalSupConLoss, SupConLoss, create_loss, goodness, list_losses,
                           marginal_supcon_loss, pairwise_cosine, supcon_from_similarity)


def loop_marginal_supcon(views, labels, temperature, margin):
    """Eq. 14/15 written as plain loops over anchors, positives and the denominator set A(i)."""
    z = [v / v.norm() for view in views for v in view]  # view-major
    y = [int(label) for _ in views for label in labels]
    n, total = len(z), 0.0
    for i in range(n):
        positives = [p for p in range(n) if p != i and y[p] == y[i]]

        def q(a):
            s = float(z[i] @ z[a])
            return min(s + margin, 1.0) if a in positives else s
        log_den = math.log(sum(math.exp(q(a) / temperature) for a in range(n) if a != i))
        if positives:
            total += -sum(q(p) / temperature - log_den for p in positives) / len(positives)
    return total / n


FIXTURE_ROWS = [  # (views, margin, temperature, expected) from cff-method.md §4.6
    (2, 0.0, 0.15, 5.4769287), (2, 0.1, 0.15, 5.1245352), (2, 0.4, 0.15, 3.8189146),
    (1, 0.0, 0.15, 4.1555930), (1, 0.1, 0.15, 3.6546079), (1, 0.4, 0.15, 2.5349868),
    (2, 0.4, 1.0, 3.1128753),
]


def test_fixture_sanity(cff_fixture):
    labels, f1, f2 = cff_fixture
    assert labels.tolist() == [3, 2, 2, 1, 1, 0, 0, 0, 0, 3, 2, 3, 2, 2, 3, 2]
    assert torch.bincount(labels).tolist() == [4, 2, 6, 4]
    assert f1[0, 0].item() == pytest.approx(-0.703735, abs=1e-6)
    assert f1.sum().item() == pytest.approx(5.477558, abs=1e-6)
    assert f2.sum().item() == pytest.approx(2.667369, abs=1e-6)


@pytest.mark.parametrize('views,margin,temperature,expected', FIXTURE_ROWS)
def test_fixture_values(cff_fixture, views, margin, temperature, expected):
    labels, f1, f2 = cff_fixture
    feats = [f1, f2][:views]
    loss64 = MarginalSupConLoss(temperature, margin)(feats, labels)
    assert loss64.item() == pytest.approx(expected, abs=1e-6)
    loss32 = MarginalSupConLoss(temperature, margin)([f.float() for f in feats], labels)
    assert loss32.item() == pytest.approx(expected, rel=1e-5)
    assert loop_marginal_supcon(feats, labels, temperature, margin) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize('margin,expected', [(0.0, 3.9020205), (0.4, 2.3826701)])
def test_zero_positive_anchor_counts_in_mean(cff_fixture, margin, expected):
    labels, f1, _ = cff_fixture
    labels = labels.clone()
    labels[0] = 4  # a class of its own: anchor 0 has no positive, adds 0, and still counts in the mean
    assert MarginalSupConLoss(0.15, margin)([f1], labels).item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize('views', [1, 2, 3])
@pytest.mark.parametrize('margin', [0.0, 0.1, 0.4])
def test_matches_loop_oracle(views, margin):
    g = torch.Generator().manual_seed(views * 10 + int(margin * 10))
    labels = torch.randint(0, 3, (7,), generator=g)
    feats = torch.randn(7, views, 5, generator=g, dtype=torch.float64)
    loss = marginal_supcon_loss(feats, labels, temperature=0.3, margin=margin)
    oracle = loop_marginal_supcon(list(feats.unbind(1)), labels, 0.3, margin)
    assert loss.item() == pytest.approx(oracle, abs=1e-10)


@pytest.mark.parametrize('views', [2, 3])
@pytest.mark.parametrize('margin', [0.0, 0.1, 0.4])
def test_identical_views_as_one_expanded_tensor_equal_materialised_copies(views, margin):
    """A stride-0 view axis is computed on [B, B]: per-anchor losses and gradients equal the autograd reference on
    V real copies, also for an anchor whose only positives are its own other views."""
    g = torch.Generator().manual_seed(views * 10 + int(margin * 10))
    labels = torch.randint(0, 3, (9,), generator=g)
    labels[0] = 7
    f = torch.randn(9, 6, generator=g, dtype=torch.float64)
    shared, copies = f.clone().requires_grad_(), f.clone().requires_grad_()
    loss = marginal_supcon_loss(shared[:, None].expand(-1, views, -1), labels, 0.3, margin, reduction='none')
    reference = supcon_from_similarity(*pairwise_cosine(copies[:, None].repeat(1, views, 1), labels), 0.3, margin,
                                       reduction='none')
    assert torch.allclose(loss, reference, atol=1e-12, rtol=0)
    weights = torch.rand(len(loss), generator=g, dtype=torch.float64)  # distinct upstream gradient per anchor
    (loss * weights).sum().backward()
    (reference * weights).sum().backward()
    assert torch.allclose(shared.grad, copies.grad, atol=1e-12, rtol=0)
    assert shared.grad.abs().max() > 0.01
    oracle = loop_marginal_supcon([f] * views, labels, 0.3, margin)
    assert marginal_supcon_loss(f[:, None].expand(-1, views, -1), labels, 0.3, margin).item() == pytest.approx(
        oracle, abs=1e-10)


def test_margin_zero_equals_supcon_exactly(cff_fixture):
    labels, f1, f2 = cff_fixture
    feats = torch.stack([f1, f2], 1)
    assert torch.equal(SupConLoss(0.15)(feats, labels), MarginalSupConLoss(0.15, 0.0)(feats, labels))


def test_list_and_tensor_inputs_agree_and_scale_invariance(cff_fixture):
    labels, f1, f2 = cff_fixture
    loss = MarginalSupConLoss(0.15, 0.4)
    assert torch.allclose(loss([f1, f2], labels), loss(torch.stack([f1, f2], 1), labels))
    assert torch.allclose(loss([3 * f1, 3 * f2], labels), loss([f1, f2], labels))


def two_class_features(p: float, c: float) -> torch.Tensor:
    """Two samples x two views [2, 2, 4] whose cosines are p between a sample's views and c across samples."""
    gram = torch.tensor([[1, p, c, c], [p, 1, c, c], [c, c, 1, p], [c, c, p, 1]], dtype=torch.float64)
    z = torch.linalg.cholesky(gram)  # rows: unit vectors with exactly these cosines
    return torch.stack([z[[0, 2]], z[[1, 3]]], 1)  # [sample, view, dim]


@pytest.mark.parametrize('temperature', [0.07, 0.15, 1.0])
@pytest.mark.parametrize('p,c,margin', [(1.0 - 1e-9, 0.0, 0.0), (0.6, -0.3, 0.0), (0.6, 0.2, 0.3), (0.8, 0.1, 0.4)])
def test_closed_form_of_two_classes(temperature, p, c, margin):
    """Every anchor has one positive (cosine p) and two negatives (cosine c): with q = min(p + m, 1),
    L = log(1 + 2 exp((c - q) / τ)). No τ/base_τ factor (SupContrast's default scales by τ/0.07)."""
    q = min(p + margin, 1.0)
    expected = math.log1p(2 * math.exp((c - q) / temperature))
    loss = MarginalSupConLoss(temperature, margin)(two_class_features(p, c), torch.tensor([0, 1]))
    assert loss.item() == pytest.approx(expected, rel=1e-10, abs=1e-12)


def test_labels_none_is_simclr(cff_fixture):
    _, f1, f2 = cff_fixture
    unique = torch.arange(16)
    assert torch.equal(SupConLoss()([f1, f2]), SupConLoss()([f1, f2], unique))


def test_positive_and_clamped_counts(cff_fixture):
    labels, f1, f2 = cff_fixture
    sim, pos = pairwise_cosine([f1, f2], labels)
    counts = 2 * torch.bincount(labels)  # two views: ordered pairs within a class, self excluded
    assert int(pos.sum()) == int((counts * (counts - 1)).sum()) == 256
    assert int(((sim + 0.1 > 1) & pos).sum()) == 32
    assert int(((sim + 0.4 > 1) & pos).sum()) == 48


def test_clamped_positives_get_zero_gradient(cff_fixture):
    """Eq. A.5: ∂L/∂s is exactly 0 where s + m > 1 on a positive pair, non-zero on the other positives."""
    labels, f1, f2 = cff_fixture
    sim, pos = pairwise_cosine([f1, f2], labels)
    sim = sim.detach().requires_grad_(True)
    supcon_from_similarity(sim, pos, 0.15, 0.4).backward()
    clamped = pos & (sim.detach() + 0.4 > 1)
    assert int(clamped.sum()) == 48
    assert torch.all(sim.grad[clamped] == 0)
    assert torch.all(sim.grad[pos & ~clamped] != 0)


def test_autograd_matches_corrected_eq18(cff_fixture):
    """Anchor k = 0, τ = 1, m = 0.4: autograd's ∂ℓ_0/∂z_0 equals Eq. 18 with e·|R(k)| in the denominator."""
    labels, f1, f2 = cff_fixture
    z = F.normalize(torch.cat([f1, f2]), dim=1).requires_grad_(True)
    tiled = labels.repeat(2)
    pos = tiled[:, None] == tiled[None, :]
    pos.fill_diagonal_(False)
    supcon_from_similarity(z @ z.T, pos, temperature=1.0, margin=0.4, reduction='none')[0].backward()
    zd, m, k = z.detach(), 0.4, 0
    s = zd @ zd[k]
    P = [p for p in range(32) if pos[k, p]]
    R = [r for r in P if s[r] + m > 1]
    Rc = [r for r in P if s[r] + m <= 1]
    N = [n for n in range(32) if tiled[n] != tiled[k]]
    assert (len(P), len(R), len(Rc)) == (7, 1, 6)
    num = sum(math.exp(s[r] + m) * zd[r] for r in Rc) + sum(math.exp(s[n]) * zd[n] for n in N)
    den = math.e * len(R) + sum(math.exp(s[r] + m) for r in Rc) + sum(math.exp(s[n]) for n in N)
    expected = -sum(zd[r] for r in Rc) / len(P) + num / den
    assert torch.allclose(z.grad[k], expected, atol=1e-12)
    literal = -sum(zd[r] for r in Rc) / len(P) + num / (den - math.e * len(R) + len(R))  # the paper's |R(k)|
    assert (literal - expected).abs().max() > 1e-3


def test_goodness_and_ff_losses_closed_form():
    pos = torch.tensor([[1.0, 3.0], [2.0, 0.0]])
    neg = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    g_pos, g_neg = goodness(pos), goodness(neg)
    assert g_pos.tolist() == [5.0, 2.0] and g_neg.tolist() == [0.5, 1.0]
    sp = lambda v: math.log1p(math.exp(v))  # noqa: E731
    ff = (sp(2 - 5) + sp(2 - 2) + sp(0.5 - 2) + sp(1 - 2)) / 4
    assert FFLoss(2.0)(pos, neg).item() == pytest.approx(ff, rel=1e-6)
    symba = (sp(-(5 - 0.5)) + sp(-(2 - 1))) / 2
    assert create_loss('symba')(pos, neg).item() == pytest.approx(symba, rel=1e-6)
    shifted = (sp(2 - 6) + sp(2 - 3) + sp(1.5 - 2) + sp(2 - 2)) / 4  # FF-Collab style goodness offsets
    assert FFLoss(2.0)(pos, neg, 1.0, 1.0).item() == pytest.approx(shifted, rel=1e-6)


def _call(name, loss, dtype):
    g = torch.Generator().manual_seed(0)
    if name in ('ff', 'symba'):
        pos = torch.randn(6, 4, generator=g, dtype=dtype, requires_grad=True)
        neg = torch.randn(6, 4, generator=g, dtype=dtype, requires_grad=True)
        return loss(pos, neg), [pos, neg]
    feats = torch.randn(6, 2, 4, generator=g, dtype=dtype, requires_grad=True)
    return loss(feats, torch.tensor([0, 1, 0, 1, 2, 2])), [feats]


@pytest.mark.parametrize('name', list_losses())
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_every_registered_loss_is_finite_and_differentiable(name, dtype):
    value, inputs = _call(name, create_loss(name), dtype)
    assert value.dim() == 0 and value.dtype == dtype and torch.isfinite(value)
    value.backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0 for x in inputs)


@pytest.mark.parametrize('kwargs', [dict(temperature=0.0), dict(margin=-0.1), dict(margin=2.5),
                                    dict(reduction='median')])
def test_invalid_arguments(kwargs):
    with pytest.raises(ValueError):
        MarginalSupConLoss(**kwargs)


def test_label_shape_mismatch():
    with pytest.raises(ValueError, match='Labels must have shape'):
        SupConLoss()(torch.randn(4, 2, 3), torch.zeros(5, dtype=torch.long))
