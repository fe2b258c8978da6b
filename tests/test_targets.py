import math

import pytest
import torch

from ftwt_cli.errors import FtwtError
from ftwt_cli.gating.targets import check_r, heatmap_mass, uniform


def test_mass_rule_smallest_topk_reaching_r():
    # masses 0.4, 0.3, 0.2, 0.1 (already normalised): r=0.7 → first two; r=0.75 → three; r=0.4 → one.
    s = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    assert heatmap_mass(s, 0.7).tolist() == [[True, True, False, False]]
    assert heatmap_mass(s, 0.75).tolist() == [[True, True, True, False]]
    assert heatmap_mass(s, 0.4).tolist() == [[True, False, False, False]]
    assert heatmap_mass(s, 1.0).tolist() == [[True, True, True, True]]


def test_mass_rule_is_order_independent_and_per_sample():
    s = torch.tensor([[1.0, 4.0, 2.0, 3.0], [0.0, 0.0, 5.0, 5.0]])
    assert heatmap_mass(s, 0.7).tolist() == [[False, True, False, True], [False, False, True, True]]


def test_r1_drops_only_dead_channels():
    s = torch.tensor([[0.0, 1e-3, 5.0, 0.0, 2.0]])
    assert heatmap_mass(s, 1.0).tolist() == [[False, True, True, False, True]]


def test_r1_keeps_all_live_channels_despite_float_rounding():
    torch.manual_seed(0)
    s = torch.rand(64, 512) + 1e-4
    assert heatmap_mass(s, 1.0).all()


def test_ties_are_broken_by_channel_index():
    s = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    assert heatmap_mass(s, 0.5).tolist() == [[True, True, False, False]]
    assert heatmap_mass(s, 0.51).tolist() == [[True, True, True, False]]


def test_all_dead_sample_keeps_nothing():
    assert not heatmap_mass(torch.zeros(2, 8), 0.9).any()


def test_uniform_keeps_fixed_fraction():
    torch.manual_seed(0)
    s = torch.rand(3, 10)
    m = uniform(s, 0.3)
    assert m.sum(1).tolist() == [3, 3, 3]
    top = s.topk(3, dim=1).indices
    assert all(m[i, top[i]].all() for i in range(3))


@pytest.mark.parametrize("r", [0.0, -0.1, 1.01, float("nan")])
def test_r_out_of_range(r):
    with pytest.raises(FtwtError, match=r"outside \(0, 1\]"):
        check_r(r)


def _reference_mass(s: torch.Tensor, r: float) -> torch.Tensor:
    """The rule written the slow, obvious way: a stable argsort, cumulative mass, scatter back."""
    sorted_s, order = s.sort(dim=1, descending=True, stable=True)
    mass = sorted_s.double() / sorted_s.double().sum(1, keepdim=True).clamp_min(1e-300)
    keep = (mass.cumsum(1) - mass < r - 1e-9) & (mass > 0)
    return torch.zeros_like(keep).scatter(1, order, keep)


@pytest.mark.parametrize("r", [0.3, 0.7, 0.9, 0.95, 0.999])
def test_mass_rule_matches_a_stable_argsort_with_many_ties(r):
    torch.manual_seed(1)
    # few distinct values per row (as with ReLU6 saturating at 6), dead channels and an all-dead row
    s = torch.randint(0, 5, (64, 96)).float() * torch.rand(64, 1)
    s[3] = 0
    assert torch.equal(heatmap_mass(s, r), _reference_mass(s, r))
    c = torch.rand(32, 512)
    assert torch.equal(heatmap_mass(c, r), _reference_mass(c, r))


def test_uniform_breaks_ties_by_index():
    s = torch.tensor([[2.0, 1.0, 1.0, 1.0, 0.0]])
    assert uniform(s, 0.6).tolist() == [[True, True, True, False, False]]


@pytest.mark.parametrize("rule", [heatmap_mass, uniform])
@pytest.mark.parametrize("shape", [(1, 1), (5, 1), (1, 7)])
def test_single_channel_or_single_sample(rule, shape):
    """A layer with one output channel, a batch of one: the ranking used to fail on (B, 1) scores."""
    torch.manual_seed(2)
    s = torch.rand(*shape)
    s[0, 0] = 0.0 if shape[1] > 1 else s[0, 0]
    if rule is heatmap_mass:
        want = _reference_mass(s, 0.8)
    else:                                  # the ceil(0.8·C) highest, by a stable argsort
        order = s.sort(dim=1, descending=True, stable=True).indices
        keep = torch.arange(shape[1]).expand(shape) < math.ceil(0.8 * shape[1])
        want = torch.zeros_like(keep).scatter(1, order, keep)
    assert torch.equal(rule(s, 0.8), want)
