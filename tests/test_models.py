"""Every supported architecture: gates attach, open gates reproduce the source exactly, MACs add up."""
import pytest
import torchvision
from arch_coverage import TIMM_FAMILIES, TIMM_SAMPLE, TORCHVISION_SAMPLE, check_arch

from ftwt_cli.attach import MIN_GATEABLE_SHARE


def _assert_ok(r):
    assert r.ok, r
    assert r.units > 0 and r.max_rel_diff <= 1e-5 and r.gated_share >= MIN_GATEABLE_SHARE


@pytest.mark.parametrize("name", TORCHVISION_SAMPLE)
def test_torchvision_sample(name):
    _assert_ok(check_arch(f"torchvision:{name}"))


@pytest.mark.parametrize("name", TIMM_SAMPLE)
def test_timm_sample(name):
    _assert_ok(check_arch(f"timm:{name}"))


@pytest.mark.parametrize("arch", ["timm:vit_tiny_patch16_224"])
def test_transformers_are_refused_not_crashed(arch):
    r = check_arch(arch)
    assert not r.ok and r.note.startswith("refused")


@pytest.mark.slow
@pytest.mark.parametrize("name", torchvision.models.list_models(module=torchvision.models))
def test_every_torchvision_classifier(name):
    # Transformers and ConvNeXt (depthwise convs, but linear MLPs hold 93-97% of its MACs) are refused by design.
    if name.startswith(("vit_", "swin", "convnext")):
        r = check_arch(f"torchvision:{name}", (3, 224, 224) if not name.startswith("convnext") else None)
        assert not r.ok and r.note.startswith("refused")
        return
    _assert_ok(check_arch(f"torchvision:{name}", (3, 224, 224) if name.startswith("maxvit") else None))


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in TIMM_FAMILIES if not n.startswith("vit_")])
def test_timm_families(name):
    _assert_ok(check_arch(f"timm:{name}"))
