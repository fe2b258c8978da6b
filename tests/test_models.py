"""Every supported architecture: gates attach, open gates reproduce the source exactly, MACs add up."""
import pytest
import torchvision
from arch_coverage import TIMM_FAMILIES, TIMM_SAMPLE, TIMM_TRANSFORMERS, TORCHVISION_SAMPLE, check_arch

from ftwt_cli.attach import MIN_GATEABLE_SHARE


def _assert_ok(r):
    assert r.ok, r
    assert r.units > 0 and r.max_rel_diff <= 1e-5 and r.gated_share >= MIN_GATEABLE_SHARE


# The sample's largest models take 4-6 s each on the 2-core CPU: they run with the integration set, so that the
# default run stays under 6 minutes while every family of the sample is still checked on each CI run.
_HEAVY = {"vgg11_bn", "densenet121", "resnet50d", "res2net50_14w_8s"}


def _sample(names):
    return [pytest.param(n, marks=pytest.mark.integration) if n in _HEAVY else n for n in names]


@pytest.mark.parametrize("name", _sample(TORCHVISION_SAMPLE))
def test_torchvision_sample(name):
    _assert_ok(check_arch(f"torchvision:{name}"))


@pytest.mark.parametrize("name", _sample(TIMM_SAMPLE))
def test_timm_sample(name):
    _assert_ok(check_arch(f"timm:{name}"))


@pytest.mark.parametrize("arch", ["timm:vit_tiny_patch16_224", "torchvision:convnext_tiny"])
def test_transformers_attach_through_their_mlps(arch):
    r = check_arch(arch)
    _assert_ok(r)


@pytest.mark.slow
@pytest.mark.parametrize("name", torchvision.models.list_models(module=torchvision.models))
def test_every_torchvision_classifier(name):
    _assert_ok(check_arch(f"torchvision:{name}"))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(dict.fromkeys(TIMM_FAMILIES + TIMM_TRANSFORMERS)))
def test_timm_families(name):
    _assert_ok(check_arch(f"timm:{name}"))
