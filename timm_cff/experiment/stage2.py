"""Stage 2 and the test of a run: the linear probe (CFF) or the one-pass head (FF family) on the best stage-1
model, then test top-k of every way the method predicts."""
from typing import Any

from torch import nn

from ..methods import schedule, train_one_pass_head
from ..metrics import evaluate_accuracy
from ..probe import ProbeResult, train_linear_probe
from .build import RunSetup, seed_all
from .config import Config
from .progress import Progress
from .rundir import RunDir

__all__ = ['fit_stage2', 'test_accuracy', 'train_probe', 'probe_settings']


def fit_stage2(cfg: Config, run: RunDir, setup: RunSetup, progress: Progress) -> dict[str, Any]:
    """The probe (CFF) or one-pass head (FF family) on the best stage-1 model; deterministic, so a resumed run
    simply redoes it. BP's classifier is trained end to end and needs no stage 2."""
    setup.load(run, 'best')
    loaders = setup.loaders
    if setup.method.end_to_end or cfg.probe.epochs == 0:
        run.save_checkpoint('final', {'trainer': setup.trainer.state_dict()})
        return {}
    seed_all(cfg.run.seed + 2)
    bar = progress.bar(desc='probe' if not setup.is_ff else 'one-pass head', total=cfg.probe.epochs)

    def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
        run.append_row('probe.csv', {'epoch': epoch, **metrics})
        progress.update(bar, metrics, advance=True)

    (run.path / 'probe.csv').unlink(missing_ok=True)
    if setup.is_ff:
        setup.classifier, result = train_one_pass_head(setup.trainer, loaders['probe_train'], loaders['probe_val'],
                                                       **probe_settings(cfg), on_epoch=on_epoch)
    else:
        result = train_probe(cfg, setup.model, loaders, on_epoch)
    progress.close(bar)
    head = setup.classifier.head.state_dict() if setup.is_ff else None
    run.save_checkpoint('final', {'trainer': setup.trainer.state_dict(), 'head': head})
    progress.message(f'stage 2: best epoch {result.best_epoch}, val loss {result.best_val_loss:.4f}')
    return {'best_epoch': result.best_epoch, 'best_val_loss': result.best_val_loss}


def probe_settings(cfg: Config) -> dict[str, Any]:
    """``train_linear_probe`` keyword arguments of the ``probe`` section: epochs, AdamW settings, LR schedule."""
    p = cfg.probe
    return dict(epochs=p.epochs, lr=p.lr, weight_decay=p.weight_decay,
                scheduler=schedule(p.sched, p.epochs, warmup_epochs=p.warmup_epochs, min_lr=p.min_lr))


def train_probe(cfg: Config, model: nn.Module, loaders: dict, on_epoch=None) -> ProbeResult:
    """The linear probe of ``model`` on ``probe_train`` / ``probe_val`` with the ``probe`` section's settings."""
    # Without augmentation the probe sees the same inputs every epoch: encode them once.
    augment = loaders['probe_train'].augment
    fixed = not (cfg.data.randaugment or augment.padding or augment.hflip)
    return train_linear_probe(model, loaders['probe_train'], loaders['probe_val'], cache_features=fixed,
                              on_epoch=on_epoch, **probe_settings(cfg))


def test_accuracy(cfg: Config, setup: RunSetup) -> dict[str, Any]:
    """Test top-k: the one-forward classifier; for the FF family also the C-pass goodness prediction (``test``)."""
    out = {}
    if setup.classifier is not None:
        out['test'] = evaluate_accuracy(setup.classifier, setup.loaders['test'], topk=cfg.run.topk)
    if setup.is_ff:
        if 'test' in out:
            out['test_one_pass_head'] = out.pop('test')
        out['test'] = evaluate_accuracy(setup.trainer.predict, setup.loaders['test'], topk=cfg.run.topk,
                                        device=setup.device)
    return out
