"""The range checks every task's A-FAN section shares, and the shared AdvProp section."""
from types import SimpleNamespace

import pytest

from afan_harness.settings import AdvPropConfig, check_nonnegative, check_positive, check_strengths


def test_nonnegative_names_the_first_bad_setting():
    check_nonnegative(SimpleNamespace(steps=0, gamma=0.5), "afan", ("steps", "gamma"))
    with pytest.raises(ValueError, match="afan.gamma must be >= 0, got -0.1"):
        check_nonnegative(SimpleNamespace(steps=1, gamma=-0.1), "afan", ("steps", "gamma"))


def test_positive_counts_at_the_top_level():
    check_positive(SimpleNamespace(iterations=1, batch_size=8), ("iterations", "batch_size"))
    with pytest.raises(ValueError, match="^batch_size must be >= 1, got 0$"):
        check_positive(SimpleNamespace(iterations=1, batch_size=0), ("iterations", "batch_size"))


@pytest.mark.parametrize("section,message", [
    (SimpleNamespace(n=0, mask=""), "afan.n must be >= 1, got 0"),
    (SimpleNamespace(n=2, mask="011"), "afan.mask"),
    (SimpleNamespace(n=2, mask="01", w=1.5), r"afan.w must be in \[0, 1\], got 1.5"),
])
def test_strengths_reject_bad_n_mask_and_weight(section, message):
    with pytest.raises(ValueError, match=message):
        check_strengths(section)


def test_strengths_accept_a_section_without_a_weight():
    check_strengths(SimpleNamespace(n=4, mask="0011"))
    check_strengths(SimpleNamespace(n=2, mask="11", w=0.3))


def test_advprop_section_defaults_and_checks():
    cfg = AdvPropConfig()
    assert (cfg.steps, cfg.step_size, cfg.eps, cfg.random_start) == (1, 1.0, 4.0, True)
    with pytest.raises(ValueError, match="advprop.eps must be >= 0, got -1"):
        AdvPropConfig(eps=-1)
