import functools
import logging

import pytest
from torch import nn

from timm_cff.loss import (MarginalSupConLoss, SupConLoss, create_loss, get_loss_class, get_loss_info, list_losses,
                           register_loss)
from timm_cff.loss import registry


def test_builtin_names_and_filters():
    assert {'supcon', 'marginal_supcon', 'ff', 'symba'} <= set(list_losses())
    assert list_losses('*supcon') == ['marginal_supcon', 'supcon']
    assert list_losses('*supcon', exclude_filters='marg*') == ['supcon']
    assert dict(list_losses('ff', with_description=True))['ff'].startswith('Forward-Forward')


def test_create_by_name_class_and_partial():
    by_name = create_loss('marginal_supcon', margin=0.2, temperature=0.5)
    assert isinstance(by_name, MarginalSupConLoss) and (by_name.margin, by_name.temperature) == (0.2, 0.5)
    assert isinstance(create_loss(SupConLoss), SupConLoss)
    part = create_loss(functools.partial(MarginalSupConLoss, margin=0.3))
    assert part.margin == 0.3
    assert type(create_loss('MARGINAL_SUPCON')) is MarginalSupConLoss  # names are case-insensitive


def test_unknown_name_lists_known_losses():
    with pytest.raises(ValueError, match="Unknown loss 'nope'.*marginal_supcon.*supcon"):
        create_loss('nope')


def test_bad_kwargs_name_the_loss():
    with pytest.raises(TypeError, match="'supcon'.*margin"):
        create_loss('supcon', margin=0.1)


def test_register_defaults_and_overwrite_warning(caplog):
    @register_loss('test_scaled', scale=3.0)
    class Scaled(nn.Module):
        """A test loss."""
        def __init__(self, scale=1.0):
            super().__init__()
            self.scale = scale
    try:
        assert create_loss('test_scaled').scale == 3.0
        assert get_loss_class('test_scaled', bind_defaults=False)().scale == 1.0
        assert get_loss_info('test_scaled').description == 'A test loss.'
        with caplog.at_level(logging.WARNING):
            register_loss('test_scaled')(Scaled)
        assert 'registered again' in caplog.text
    finally:
        registry._LOSSES.unregister('test_scaled')
