import pytest

from timm_cff.margins import (MarginSchedule, cosine, create_margins, exponential, linear, linear_margins, parabolic,
                              resolve_margins)

PAPER_TABLE = {  # cff-method.md §5
    2: [0.4, 0.1], 3: [0.4, 0.25, 0.1], 4: [0.4, 0.3, 0.2, 0.1], 5: [0.4, 0.325, 0.25, 0.175, 0.1],
    6: [0.4, 0.34, 0.28, 0.22, 0.16, 0.1], 7: [0.4, 0.35, 0.3, 0.25, 0.2, 0.15, 0.1],
}


@pytest.mark.parametrize('num_stages', sorted(PAPER_TABLE))
def test_linear_matches_paper_table(num_stages):
    assert linear(num_stages, 0.4, 0.1) == pytest.approx(PAPER_TABLE[num_stages], abs=1e-12)
    assert linear_margins(0.4, 0.1)(num_stages) == pytest.approx(PAPER_TABLE[num_stages], abs=1e-12)


def test_single_stage_and_plain_cff():
    assert linear(1) == [0.4]
    assert create_margins('linear', 5, m0=0.0) == [0.0] * 5


@pytest.mark.parametrize('fn', [parabolic, cosine])
def test_extras_run_from_m0_to_m_last_monotonically(fn):
    values = fn(6, 0.4, 0.1)
    assert values[0] == pytest.approx(0.4) and values[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_extras_at_the_middle_stage():
    """Closed forms at t = 1/2: cos(π/2) = 0 puts cosine at the mean; (r/2)^2 = (m0 - m_last)/4 for parabolic."""
    assert cosine(3, 0.4, 0.1)[1] == pytest.approx(0.25, abs=1e-12)
    assert parabolic(3, 0.4, 0.1)[1] == pytest.approx(0.3 / 4 + 0.1, abs=1e-12)


def test_exponential_always_ends_at_one_tenth():
    assert exponential(5, 0.4, 0.3)[-1] == pytest.approx(0.1)
    assert exponential(3, 0.4)[1] == pytest.approx(0.2)  # geometric mean of 0.4 and 0.1


def test_resolve_forms_and_errors():
    assert resolve_margins(None, 3) is None
    assert resolve_margins(0.2, 3) == [0.2] * 3
    assert resolve_margins([0.3, 0.2], 2) == [0.3, 0.2]
    assert resolve_margins(MarginSchedule('cosine'), 4) == cosine(4)
    with pytest.raises(ValueError, match='3 margins for a model with 2 stages'):
        resolve_margins([0.1, 0.2, 0.3], 2)
    with pytest.raises(ValueError, match='Unknown margin schedule'):
        MarginSchedule('zigzag')
