"""Every speed measure leaves the results equal: the memory-lean contrastive loss, detached stage inputs, compiled
stages; autocast within a stated tolerance. (Fused views = separate passes: tests/test_trainer.py.)"""
import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import make_batch, make_vit
from timm_cff import LocalTrainer
from timm_cff.loss import marginal_supcon_loss, pairwise_cosine, supcon_from_similarity


def reference_loss(features, labels, temperature, margin, reduction='mean'):
    """The autograd path: the full similarity matrix and every intermediate kept by autograd."""
    return supcon_from_similarity(*pairwise_cosine(features, labels), temperature, margin, reduction)


def _features(batch, views, dim, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (batch,), generator=g)
    labels[0] = 7  # an anchor class with a single sample: no positive with one view
    features = torch.randn(batch, views, dim, generator=g, dtype=dtype).requires_grad_(True)
    return features, labels


@pytest.mark.parametrize('views', [1, 2, 3])
@pytest.mark.parametrize('margin', [0.0, 0.1, 0.4, 2.0])
@pytest.mark.parametrize('reduction', ['mean', 'sum', 'none'])
def test_lean_loss_equals_autograd_reference_float64(views, margin, reduction):
    features, labels = _features(12, views, 6, torch.float64)
    weights = torch.rand(12 * views, dtype=torch.float64)  # a generic upstream gradient for reduction='none'
    values, grads = [], []
    for fn in (marginal_supcon_loss, reference_loss):
        loss = fn(features, labels, 0.15, margin, reduction)
        out = (loss * weights).sum() if reduction == 'none' else loss
        grads.append(torch.autograd.grad(out, features)[0])
        values.append(loss.detach())
    assert torch.allclose(values[0], values[1], rtol=0, atol=1e-12)
    assert torch.allclose(grads[0], grads[1], rtol=0, atol=1e-12)


@pytest.mark.parametrize('margin', [0.0, 0.4])
def test_lean_loss_equals_autograd_reference_float32(margin):
    features, labels = _features(64, 2, 128, torch.float32)
    lean, ref = marginal_supcon_loss(features, labels, 0.15, margin), reference_loss(features, labels, 0.15, margin)
    g_lean, g_ref = (torch.autograd.grad(x, features)[0] for x in (lean, ref))
    assert lean.item() == pytest.approx(ref.item(), rel=1e-6)
    assert torch.allclose(g_lean, g_ref, rtol=1e-5, atol=1e-8)


def test_lean_loss_gradcheck():
    features, labels = _features(10, 2, 5, torch.float64, seed=3)
    assert torch.autograd.gradcheck(lambda f: marginal_supcon_loss(f, labels, 0.3, 0.3), (features,))


def _saved_shapes(fn, features, labels):
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        fn(features, labels, 0.15, 0.4)
    return shapes


def test_lean_loss_keeps_no_pairwise_matrix_for_backward():
    features, labels = _features(24, 2, 16, torch.float32)
    n = 48  # V·B anchors
    assert (n, n) in _saved_shapes(reference_loss, features, labels)  # the autograd path keeps [N, N] tensors
    assert (n, n) not in _saved_shapes(marginal_supcon_loss, features, labels)


def test_loss_under_autocast_is_computed_in_float32():
    features, labels = _features(16, 2, 8, torch.float32)
    with torch.autocast('cpu', torch.bfloat16):
        loss = marginal_supcon_loss(features.bfloat16(), labels, 0.15, 0.4)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(marginal_supcon_loss(features.bfloat16().float(), labels, 0.15, 0.4).item())


@pytest.mark.parametrize('fuse_views', [True, False])
def test_no_gradient_is_ever_computed_for_a_stage_input(vit, fuse_views):
    """Stage inputs (images, then the detached previous output) never require grad, so autograd skips their grad."""
    seen = []
    modules = [vit.patch_embed, *vit.blocks[1:]]
    handles = [m.register_forward_pre_hook(lambda _, args: seen.append(args[0].requires_grad)) for m in modules]
    views, labels = make_batch()
    LocalTrainer(vit, lr=1e-3, fuse_views=fuse_views).step(tuple(v.requires_grad_(True) for v in views), labels)
    for h in handles:
        h.remove()
    assert seen == [False] * len(modules) * (1 if fuse_views else 2)


def _trainer_pair(**kwargs):
    torch.manual_seed(0)
    model = make_vit()
    sgd = dict(optimizer=lambda params: torch.optim.SGD(params, lr=0.1))
    return LocalTrainer(model, **sgd), LocalTrainer(copy.deepcopy(model), **sgd, **kwargs)


@pytest.mark.parametrize('dtype,rtol', [('bfloat16', 3e-2), ('float16', 5e-3)])
def test_autocast_losses_and_gradients_within_tolerance(dtype, rtol):
    """Reduced precision: per-stage losses within ``rtol``, every stage's gradient at cosine similarity > 0.99."""
    full, reduced = _trainer_pair(autocast_dtype=dtype)
    batch = make_batch()
    out_full, out_reduced = full.step(*batch), reduced.step(*batch)
    for key in out_full:
        assert out_reduced[key].item() == pytest.approx(out_full[key].item(), rel=rtol), key
    for p, q in zip(full.model.parameters(), reduced.model.parameters()):
        if p.grad is not None:
            assert F.cosine_similarity(p.grad.flatten(), q.grad.flatten(), dim=0) > 0.99
    assert (reduced.scaler is not None) == (dtype == 'float16')


def test_float16_scaler_state_is_saved_and_restored():
    _, trainer = _trainer_pair(autocast_dtype='float16')
    trainer.step(*make_batch())
    state = trainer.state_dict()
    assert 'scaler' in state
    _, resumed = _trainer_pair(autocast_dtype=torch.float16)
    resumed.load_state_dict(state)
    assert resumed.scaler.get_scale() == trainer.scaler.get_scale()


def test_autocast_dtype_is_validated(vit):
    with pytest.raises(ValueError, match='autocast_dtype'):
        LocalTrainer(vit, autocast_dtype='int8')
    assert LocalTrainer(vit, autocast_dtype='float32').autocast_dtype is None


def test_compiled_stages_equal_eager():
    """``aot_eager`` runs the torch.compile machinery (graph capture, AOT autograd) without code generation."""
    eager, compiled = _trainer_pair(compile_stages={'backend': 'aot_eager'})
    keys = list(compiled.model.state_dict())
    for seed in range(2):
        out_eager, out_compiled = eager.step(*make_batch(seed=seed)), compiled.step(*make_batch(seed=seed))
        for key in out_eager:
            assert torch.allclose(out_eager[key], out_compiled[key], atol=1e-6), key
    for p, q in zip(eager.model.parameters(), compiled.model.parameters()):
        assert torch.allclose(p, q, atol=1e-6)
    assert list(compiled.model.state_dict()) == keys
    assert compiled.stages._compiled_blocks is not None
