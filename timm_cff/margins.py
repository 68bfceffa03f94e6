"""Margin schedules of CFF+M: one margin per stage, shrinking from ``m0`` at the first stage to ``m_last``.

The CFF paper uses ``linear`` (``linspace(0.4, 0.1, L)``). ``parabolic``, ``cosine`` and ``exponential`` follow the
official code's later additions (``utils.set_margins``, with its exponent ``k``); ``exponential`` always decays
towards 0.1 there and does so here. Every schedule is a pure function ``(num_stages, m0, m_last) -> list[float]``.
"""
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .registry import Registry

#: The CFF+M margins of the paper: 0.4 at the first stage, 0.1 at the last.
PAPER_M0, PAPER_M_LAST = 0.4, 0.1

__all__ = ['PAPER_M0', 'PAPER_M_LAST', 'PAPER_MARGINS', 'linear', 'parabolic', 'cosine', 'exponential',
           'MarginSchedule', 'linear_margins', 'create_margins', 'list_margin_schedules', 'register_margin_schedule',
           'resolve_margins']


def _positions(num_stages: int) -> list[float]:
    """Stage positions scaled to [0, 1]: 0 for the first stage, 1 for the last (a single stage sits at 0)."""
    if num_stages < 1:
        raise ValueError(f'num_stages must be >= 1, got {num_stages}.')
    return [i / (num_stages - 1) if num_stages > 1 else 0.0 for i in range(num_stages)]


def linear(num_stages: int, m0: float = PAPER_M0, m_last: float = PAPER_M_LAST) -> list[float]:
    """``linspace(m0, m_last, L)``: the CFF+M schedule (0.4 -> 0.1)."""
    return [m0 * (1 - t) + m_last * t for t in _positions(num_stages)]


def parabolic(num_stages: int, m0: float = PAPER_M0, m_last: float = PAPER_M_LAST, k: float = 1.0) -> list[float]:
    """``(r (1 - t))^(2k) + m_last`` with ``r = (m0 - m_last)^(1/2k)``: falls fast, then flattens at ``m_last``."""
    r = (m0 - m_last) ** (1 / (2 * k))
    return [(r * (1 - t)) ** (2 * k) + m_last for t in _positions(num_stages)]


def cosine(num_stages: int, m0: float = PAPER_M0, m_last: float = PAPER_M_LAST, k: float = 1.0) -> list[float]:
    """Half a cosine from ``m0`` to ``m_last`` over ``t^k``."""
    return [0.5 * (m0 - m_last) * (math.cos(math.pi * t ** k) + 1) + m_last for t in _positions(num_stages)]


def exponential(num_stages: int, m0: float = PAPER_M0, m_last: float = PAPER_M_LAST, k: float = 1.0) -> list[float]:
    """``m0 · (0.1 / m0)^(t^k)``; like the official code it ends at 0.1 whatever ``m_last`` is."""
    del m_last  # kept for the common signature; the official schedule ignores it
    return [m0 * (0.1 / m0) ** (t ** k) for t in _positions(num_stages)]


_SCHEDULES: Registry[Callable[..., list[float]]] = Registry('margin schedule')


def register_margin_schedule(name: str) -> Callable[[Callable], Callable]:
    """Decorator: a schedule ``fn(num_stages, m0, m_last, k) -> list[float]`` usable as ``train.margin_schedule``."""
    def _register(fn: Callable[..., list[float]]) -> Callable[..., list[float]]:
        return _SCHEDULES.register(name, fn)
    return _register


for _fn in (linear, parabolic, cosine, exponential):
    register_margin_schedule(_fn.__name__)(_fn)


def list_margin_schedules(filter: str = '') -> list[str]:
    return _SCHEDULES.names(filter)


@dataclass(frozen=True)
class MarginSchedule:
    """A schedule waiting for the number of stages: ``MarginSchedule('linear', 0.4, 0.1)(5)``."""
    name: str = 'linear'
    m0: float = PAPER_M0
    m_last: float = PAPER_M_LAST
    k: float = 1.0

    def __post_init__(self):
        _SCHEDULES.get(self.name)  # refuses an unknown name, naming the known ones

    def __call__(self, num_stages: int) -> list[float]:
        return create_margins(self.name, num_stages, self.m0, self.m_last, self.k)


def linear_margins(m0: float = PAPER_M0, m_last: float = PAPER_M_LAST) -> MarginSchedule:
    """The CFF+M schedule for any depth: ``LocalTrainer(vit, margins=linear_margins(0.4, 0.1))``."""
    return MarginSchedule('linear', m0, m_last)


def create_margins(name: str, num_stages: int, m0: float = PAPER_M0, m_last: float = PAPER_M_LAST,
                   k: float = 1.0) -> list[float]:
    """Margins of schedule ``name`` for ``num_stages`` stages. ``m0 = 0`` gives all zeros (plain CFF)."""
    fn = _SCHEDULES.get(name)
    if m0 == 0:  # the official code's convention: no first margin means plain CFF everywhere
        return [0.0] * num_stages
    return fn(num_stages, m0, m_last) if name == 'linear' else fn(num_stages, m0, m_last, k)


def resolve_margins(margins: float | Sequence[float] | Callable[[int], Sequence[float]] | None,
                    num_stages: int) -> list[float] | None:
    """Per-stage margins from a constant, a per-stage list or a schedule; ``None`` stays ``None``."""
    if margins is None:
        return None
    if callable(margins):
        margins = margins(num_stages)
    elif isinstance(margins, (int, float)):
        margins = [float(margins)] * num_stages
    margins = [float(m) for m in margins]
    if len(margins) != num_stages:
        raise ValueError(f'Got {len(margins)} margins for a model with {num_stages} stages; give one margin per '
                         f'stage or a schedule such as linear_margins(0.4, 0.1).')
    return margins


#: The paper's CFF+M schedule, used when a loss takes a margin and none is given.
PAPER_MARGINS = linear_margins(PAPER_M0, PAPER_M_LAST)
