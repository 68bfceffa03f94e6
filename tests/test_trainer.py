"""LocalTrainer against an independent re-implementation of the official loop, plus locality, resume, refusals."""
import copy
import csv
import io

import pytest
import torch

from conftest import make_batch, make_vit
from timm_cff import LocalTrainer, NonFiniteLossError, linear_margins
from timm_cff.analysis import clamped_fraction_metric, read_history
from timm_cff.experiment.rundir import RunDir
from timm_cff.loss import marginal_supcon_loss


def official_loop(model, batches, lr, margins, temperature=0.15):
    """The official main_CFF.py stage-1 loop: two separate forwards, step each stage right after its backward."""
    m = model
    stage_params = [[m.pos_embed, *m.patch_embed.parameters(), *m.blocks[0].parameters()]] + \
        [list(b.parameters()) for b in m.blocks[1:]]
    opts = [torch.optim.AdamW(p, lr=lr, weight_decay=0.01) for p in stage_params]
    for (h1, h2), y in batches:  # the images; stage 0 starts with the patch projection
        for l, block in enumerate(m.blocks):
            h1, h2 = h1.detach(), h2.detach()
            if l == 0:
                h1, h2 = m._pos_embed(m.patch_embed(h1)), m._pos_embed(m.patch_embed(h2))
            h1, h2 = block(h1), block(h2)
            loss = marginal_supcon_loss([h1.mean(1), h2.mean(1)], y, temperature, margins[l])
            opts[l].zero_grad()
            loss.backward()
            opts[l].step()


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_matches_official_loop():
    torch.manual_seed(0)
    model = make_vit(depth=3)
    reference = copy.deepcopy(model)
    batches = [make_batch(seed=s) for s in range(3)]
    # Fused views: with AdamW, float noise in near-zero gradients becomes up to ±lr steps, and the fused pass
    # happens to round like the official loop here; per-view passes equal fused ones (SGD test below).
    trainer = LocalTrainer(model, loss='marginal_supcon', margins=linear_margins(0.4, 0.1), lr=1e-3, fuse_views=True)
    for views, y in batches:
        trainer.step(views, y)
    official_loop(reference, batches, 1e-3, [0.4, 0.25, 0.1])
    for (n, a), b in zip(params(model).items(), params(reference).values()):
        assert torch.allclose(a, b, atol=1e-5), n
    assert trainer.num_updates == 3


def test_step_returns_total_and_per_stage_losses(vit):
    trainer = LocalTrainer(vit, lr=1e-3)
    out = trainer.step(*make_batch())
    assert set(out) == {'loss', 'loss_stage0', 'loss_stage1', 'loss_stage2'}
    assert torch.allclose(out['loss'], out['loss_stage0'] + out['loss_stage1'] + out['loss_stage2'])
    assert not out['loss'].requires_grad
    assert trainer.margins == pytest.approx([0.4, 0.25, 0.1])  # margins=None: the paper's CFF+M schedule


@pytest.mark.parametrize('stage', [0, 1, 2])
def test_a_stage_loss_changes_only_its_stage(vit, stage):
    """Zero every other stage's loss; with weight decay off, every other parameter stays bit-identical."""
    losses = [(lambda f, y: 0.0 * f.sum()) for _ in range(3)]
    losses[stage] = lambda f, y: marginal_supcon_loss(f, y, 0.15, 0.2)
    trainer = LocalTrainer(vit, loss=[torch.nn.Identity()] * 3, weight_decay=0.0, lr=1e-2)
    trainer.losses = losses
    before = params(vit)
    trainer.step(*make_batch())
    owned = {id(p) for p in trainer.stages.stage_parameters(stage)}
    for n, p in vit.named_parameters():
        changed = not torch.equal(before[n], p.detach())
        assert changed == (id(p) in owned), n


def test_fused_views_equal_two_passes():
    """SGD, because Adam turns float noise in a zero gradient (e.g. the key bias) into a full ±lr step."""
    torch.manual_seed(0)
    a = make_vit()
    b = copy.deepcopy(a)
    kw = dict(optimizer=lambda params: torch.optim.SGD(params, lr=0.1))
    fused, separate = LocalTrainer(a, fuse_views=True, **kw), LocalTrainer(b, fuse_views=False, **kw)
    for s in range(2):
        out_a, out_b = fused.step(*make_batch(seed=s)), separate.step(*make_batch(seed=s))
        for k in out_a:
            assert torch.allclose(out_a[k], out_b[k], atol=1e-5), k
    for (n, pa), pb in zip(params(a).items(), params(b).values()):
        assert torch.allclose(pa, pb, atol=1e-5), n


@pytest.mark.parametrize('fuse_views,passes_per_stage', [(None, 2), (False, 2), (True, 1)])
def test_view_passes_per_stage(vit, monkeypatch, fuse_views, passes_per_stage):
    """On CPU the default runs one pass per view; fuse_views=True runs one 2B pass."""
    trainer = LocalTrainer(vit, lr=1e-3, fuse_views=fuse_views)
    batches, forward = [], trainer.stages.forward_stage
    monkeypatch.setattr(trainer.stages, 'forward_stage', lambda i, h: batches.append(len(h)) or forward(i, h))
    (x1, x2), y = make_batch()
    trainer.step((x1, x2), y)
    assert batches == [len(y) * 2 // passes_per_stage] * passes_per_stage * len(vit.blocks)


@pytest.mark.parametrize('fuse_views', [False, True])
def test_identical_views_run_once_and_train_as_two_copies(monkeypatch, fuse_views):
    """Views that are one tensor object run each stage once on B rows and update the model as two equal tensors
    run as two views (SGD: Adam would amplify float noise in near-zero gradients)."""
    torch.manual_seed(0)
    a = make_vit()
    b = copy.deepcopy(a)
    kw = dict(optimizer=lambda params: torch.optim.SGD(params, lr=0.1), fuse_views=fuse_views,
              stage_metrics={'clamped': clamped_fraction_metric})
    shared, copies = LocalTrainer(a, **kw), LocalTrainer(b, **kw)
    batches, forward = [], shared.stages.forward_stage
    monkeypatch.setattr(shared.stages, 'forward_stage', lambda i, h: batches.append(len(h)) or forward(i, h))
    for s in range(2):
        (x, _), y = make_batch(seed=s)
        out_a, out_b = shared.step((x, x), y), copies.step((x, x.clone()), y)
        for k in out_a:
            assert torch.allclose(out_a[k], out_b[k], atol=1e-5), k
        val_a, val_b = shared.evaluate([((x, x), y)]), copies.evaluate([((x, x.clone()), y)])
        assert val_a == pytest.approx(val_b, abs=1e-5)
    assert batches == [len(y)] * (2 * 2 * len(a.blocks))  # one B-row pass per stage, steps and evaluations
    for (n, pa), pb in zip(params(a).items(), params(b).values()):
        assert torch.allclose(pa, pb, atol=1e-5), n


def test_one_view_mode_uses_in_batch_positives_only(vit):
    trainer = LocalTrainer(vit, num_views=1, lr=1e-3)
    (x1, x2), y = make_batch()
    with torch.no_grad():
        h = trainer.stages.forward_stage(0, x1)
        expected = marginal_supcon_loss([trainer.stages.pool(h)], y, 0.15, 0.4)
    out = trainer.step((x1, x2), y)  # the second view is ignored
    assert torch.allclose(out['loss_stage0'], expected, atol=1e-6)


def _run(steps, seed=0, state=None):
    torch.manual_seed(seed)
    model = make_vit()
    trainer = LocalTrainer(model, lr=1e-3, scheduler=dict(sched='cosine', num_epochs=4, warmup_epochs=1))
    if state is not None:
        trainer.load_state_dict(state)
    for s in steps:
        trainer.step(*make_batch(seed=s))
        if s % 2 == 1:
            trainer.end_epoch()
    return trainer


def test_deterministic_for_a_fixed_seed():
    a, b = _run(range(4)), _run(range(4))
    assert all(torch.equal(x, y) for x, y in zip(params(a.model).values(), params(b.model).values()))


def test_resume_from_state_dict_equals_uninterrupted_run():
    full = _run(range(4))
    first = _run(range(2))
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = _run(range(2, 4), seed=123, state=torch.load(buffer))
    assert resumed.num_updates == full.num_updates and resumed.epoch == full.epoch == 2
    assert resumed.optimizers[0].param_groups[0]['lr'] == full.optimizers[0].param_groups[0]['lr']
    for (n, a), b in zip(params(full.model).items(), params(resumed.model).values()):
        assert torch.equal(a, b), n


def test_model_stays_a_stock_timm_model(vit):
    keys, cls = list(vit.state_dict()), type(vit)
    trainer = LocalTrainer(vit, lr=1e-3)
    trainer.step(*make_batch())
    assert type(trainer.model) is cls and list(vit.state_dict()) == keys


def test_evaluate_matches_step_losses_before_update(vit):
    trainer = LocalTrainer(vit, lr=1e-3)
    views, y = make_batch()
    vit.eval()
    expected = trainer.evaluate([(views, y)])
    out = trainer.step(views, y)  # dropout-free model: train and eval forward agree
    assert expected['loss_stage2'] == pytest.approx(out['loss_stage2'].item(), abs=1e-5)


def test_train_epoch_averages_over_samples(vit):
    trainer = LocalTrainer(vit, lr=0.0)  # lr 0: every batch sees the same weights
    batches = [make_batch(batch=8, seed=0), make_batch(batch=4, seed=1)]
    means = trainer.train_epoch(batches)
    per_batch = [trainer.evaluate([b])['loss'] for b in batches]
    assert means['loss'] == pytest.approx((8 * per_batch[0] + 4 * per_batch[1]) / 12, rel=1e-5)
    assert means['loss'] == pytest.approx(sum(means[f'loss_stage{i}'] for i in range(3)), rel=1e-6)
    assert trainer.epoch == 1


def test_refusals(vit):
    with pytest.raises(ValueError, match='Unknown loss'):
        LocalTrainer(vit, loss='nope')
    with pytest.raises(ValueError, match='2 margins for a model with 3 stages'):
        LocalTrainer(vit, margins=[0.4, 0.1])
    with pytest.raises(ValueError, match='takes no margin'):
        LocalTrainer(vit, loss='supcon', margins=linear_margins())
    assert LocalTrainer(vit, loss='supcon').margins == [0.0] * 3
    trainer = LocalTrainer(vit)
    (x1, x2), y = make_batch()
    with pytest.raises(ValueError, match='Labels must be a \\[B\\] tensor with B = 8'):
        trainer.step((x1, x2), y[:5])
    with pytest.raises(ValueError, match='uses 2 views'):
        trainer.step(x1, y)
    with pytest.raises(TypeError, match='Cannot split'):
        LocalTrainer(torch.nn.Linear(2, 2))


def test_non_finite_loss_raises_before_any_update(vit):
    trainer = LocalTrainer(vit, lr=1e-3)
    trainer.step(*make_batch())
    before = params(vit)
    (x1, x2), y = make_batch(seed=1)
    with torch.no_grad():
        vit.blocks[1].mlp.fc2.bias.fill_(float('nan'))
    before['blocks.1.mlp.fc2.bias'].fill_(float('nan'))
    with pytest.raises(NonFiniteLossError, match='stage 1, step 1') as info:
        trainer.step((x1, x2), y)
    assert info.value.stage == 1 and info.value.step == 1
    for n, p in vit.named_parameters():
        assert torch.equal(before[n].nan_to_num(), p.detach().nan_to_num()), n
    assert trainer.num_updates == 1


def test_timm_optimizer_names_and_schedulers(vit):
    trainer = LocalTrainer(vit, optimizer='sgd', lr=0.1, optimizer_kwargs=dict(momentum=0.9))
    assert isinstance(trainer.optimizers[0], torch.optim.SGD)
    assert all(g['weight_decay'] == 0.01 for opt in trainer.optimizers for g in opt.param_groups)
    default = LocalTrainer(make_vit(), lr=4e-3)
    assert isinstance(default.optimizers[0], torch.optim.AdamW) and len(default.optimizers) == 3
    assert len(default.optimizers[0].param_groups) == 1  # decay on every parameter, as the official code


def test_selection_key_and_predict(vit):
    assert LocalTrainer(vit).selection_key == 'loss_stage2'
    assert LocalTrainer(vit, select_on='sum').selection_key == 'loss'
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(LocalTrainer(vit).predict(x), vit.eval()(x))


def test_stage_metrics_are_reported_per_stage(vit):
    def positives(features, labels, loss_fn):
        return torch.tensor(float(loss_fn.margin))
    trainer = LocalTrainer(vit, lr=1e-3, stage_metrics={'margin': positives})
    out = trainer.step(*make_batch())
    assert [float(out[f'margin_stage{i}']) for i in range(3)] == pytest.approx([0.4, 0.25, 0.1])
    assert 'margin' not in out
    assert trainer.evaluate([make_batch()])['margin_stage1'] == pytest.approx(0.25)


def test_checkpoint_keeps_the_keys_old_run_folders_have(vit):
    """A run folder's last.pt from before the per-stage optimizers moved into one object still loads: same keys."""
    trainer = LocalTrainer(vit, lr=1e-3, scheduler=dict(sched='cosine', num_epochs=2))
    trainer.step(*make_batch())
    state = trainer.state_dict()
    assert set(state) == {'model', 'optimizers', 'schedulers', 'num_updates', 'epoch'}
    assert [type(s) for s in (state['optimizers'], state['schedulers'])] == [list, list]
    assert len(state['optimizers']) == len(state['schedulers']) == 3 and state['num_updates'] == 1
    legacy = {'model': vit.state_dict(), 'optimizers': [opt.state_dict() for opt in trainer.optimizers],
              'schedulers': [sched.state_dict() for sched in trainer.schedulers], 'num_updates': 1, 'epoch': 0}
    resumed = LocalTrainer(make_vit(), lr=1e-3, scheduler=dict(sched='cosine', num_epochs=2))
    resumed.load_state_dict(legacy)
    assert resumed.num_updates == 1 and resumed.optimizers[2].state_dict()['state'].keys() == \
        trainer.optimizers[2].state_dict()['state'].keys()


def test_an_old_run_folders_metrics_are_read_and_resumed_under_stage_names(tmp_path, vit):
    """metrics.csv written with ``*_block{i}`` columns: read under the new names, and the resume's truncation
    rewrites the header, so the rows the trainer appends afterwards land in their columns."""
    trainer = LocalTrainer(vit, lr=1e-3, stage_metrics={'clamped': clamped_fraction_metric})
    new = {f'val_{k}': v for k, v in trainer.evaluate([make_batch()]).items()}
    names = ['epoch', 'time_s', 'lr', *new]
    old_names = [n.replace('_stage', '_block') for n in names]
    assert 'val_loss_block2' in old_names and 'val_clamped_block0' in old_names and 'val_loss' in old_names
    old_rows = [[epoch, 1.0, 4e-3, *(10 * epoch + c for c in range(len(new)))] for epoch in (1, 2, 3)]
    (tmp_path / 'metrics.csv').write_text('\n'.join(','.join(map(str, r)) for r in [old_names, *old_rows]) + '\n')
    run = RunDir(tmp_path)
    run.truncate_rows('metrics.csv', 2)  # the resume point: epoch 3 is dropped
    run.append_row('metrics.csv', {'epoch': 3, 'time_s': 2.0, 'lr': 4e-3, **new})
    with (tmp_path / 'metrics.csv').open(newline='') as f:
        assert next(csv.reader(f)) == names
    history = read_history(tmp_path / 'metrics.csv')
    assert list(history) == names and history['epoch'] == [1, 2, 3]
    for c, name in enumerate(new):
        assert history[name] == pytest.approx([10 + c, 20 + c, new[name]]), name
    assert history['val_loss_block2'] == history['val_loss_stage2'] and 'val_clamped_block1' in history
    assert history.get('val_loss_block9') is None and 'val_loss_block9' not in history
