import pytest
import timm
import torch
import torchvision

from ftwt_cli.arch import (
    build_model,
    detect_arch,
    parse_arch,
    resolve_data_config,
)
from ftwt_cli.errors import FtwtError


def test_parse_arch_sources_and_suggestions():
    assert str(parse_arch("torchvision:resnet18")) == "torchvision:resnet18"
    assert str(parse_arch("timm:resnet34.tv_in1k")) == "timm:resnet34"
    assert str(parse_arch("resnet18")) == "torchvision:resnet18"        # bare: torchvision first
    assert str(parse_arch("efficientnet_b0")) == "torchvision:efficientnet_b0"
    assert str(parse_arch("mixnet_s")) == "timm:mixnet_s"
    with pytest.raises(FtwtError, match="did you mean.*resnet18"):
        parse_arch("resnt18")
    with pytest.raises(FtwtError, match="source 'keras'"):
        parse_arch("keras:resnet18")


@pytest.mark.parametrize("build,expect,nc,ic", [
    (lambda: torchvision.models.mobilenet_v2(num_classes=7), "torchvision:mobilenet_v2", 7, 3),
    (lambda: timm.create_model("regnetx_002", num_classes=3), "timm:regnetx_002", 3, 3),
    (lambda: timm.create_model("ghostnet_050", num_classes=4, in_chans=1), "timm:ghostnet_050", 4, 1),
])
def test_detect_exact_match_with_head_and_stem(build, expect, nc, ic):
    sd = build().state_dict()
    d = detect_arch(sd)
    assert str(d.arch) == expect and d.num_classes == nc and d.in_chans == ic


@pytest.mark.parametrize("build,expect,others", [
    # torchvision state dicts, as torch.save(model.state_dict()) writes them
    (lambda: torchvision.models.resnet18(num_classes=10), "torchvision:resnet18", ("timm:resnetblur18",)),
    (lambda: torchvision.models.resnet34(num_classes=10), "torchvision:resnet34", ()),
    (lambda: torchvision.models.resnet50(num_classes=5), "torchvision:resnet50", ("timm:resnetaa50", "timm:resnetblur50")),
    # timm state dicts of the plain family: its rare variants (blur-pool, anti-aliased, TF ports) are not chosen
    pytest.param(lambda: timm.create_model("resnet50", num_classes=5), "torchvision:resnet50",
                 ("timm:resnetaa50", "timm:resnetblur50"), marks=pytest.mark.integration),     # 5 s
    (lambda: timm.create_model("efficientnet_b0", num_classes=4, in_chans=1), "timm:efficientnet_b0",
     ("timm:efficientnet_blur_b0", "timm:tf_efficientnet_b0")),
    (lambda: timm.create_model("mixnet_s", num_classes=3), "timm:mixnet_s", ("timm:tf_mixnet_s",)),
])
def test_plain_family_is_chosen_over_its_variants(build, expect, others):
    """Same keys and shapes, other functions, one of them the family's plain name: that one, saying which others fit."""
    d = detect_arch(build().state_dict())
    assert str(d.arch) == expect
    assert set(d.other_functions) == set(others)
    assert set(others) <= set(d.alternatives)
    assert ("plain name" in d.rule) if others else d.rule


def test_checkpoint_that_names_its_architecture_is_taken_at_its_word():
    sd = torchvision.models.resnet18(num_classes=10).state_dict()
    assert str(detect_arch(sd, arch_hint="timm:resnetblur18").arch) == "timm:resnetblur18"
    assert str(detect_arch(sd, arch_hint="timm:resnet18").arch) == "timm:resnet18"


def test_equally_likely_architectures_are_refused(monkeypatch):
    """Candidates that compute different functions where none is the others' plain family: never guess. (No two
    architectures of the installed timm/torchvision are like that, so the variant rule is switched off here: then
    ResNet-18 and resnetblur18 are equally likely.)"""
    import ftwt_cli.arch.detect as detect
    monkeypatch.setattr(detect, "_plain_name", lambda name: name)
    sd = torchvision.models.resnet18(num_classes=10).state_dict()
    with pytest.raises(FtwtError) as e:
        detect_arch(sd)
    assert "(torchvision:resnet18 = timm:resnet18 | timm:resnetblur18)" in str(e.value) and "pass --arch" in str(e.value)


@pytest.mark.integration     # a few seconds each: the default run stays under 6 minutes
def test_same_weights_other_preprocessing_prefers_the_plain_family():
    """ViT-Tiny and DeiT-Tiny compute the same function but normalise differently: the plain ViT is chosen, and the
    detection says that DeiT's preprocessing differs."""
    sd = timm.create_model("deit_tiny_patch16_224", num_classes=3).state_dict()
    d = detect_arch(sd)
    assert str(d.arch) == "timm:vit_tiny_patch16_224"
    assert "timm:deit_tiny_patch16_224" in d.other_preprocessing and not d.other_functions


def test_detect_no_match_lists_closest():
    sd = torchvision.models.resnet18().state_dict()
    sd.pop("layer4.1.bn2.running_var")
    sd["extra.weight"] = torch.zeros(3)
    with pytest.raises(FtwtError, match="closest: .*resnet18.*--arch"):
        detect_arch(sd)


def test_detect_hub_config_wins():
    sd = timm.create_model("resnet18", num_classes=6).state_dict()
    assert str(detect_arch(sd, {"architecture": "resnet18"}).arch) == "timm:resnet18"


def test_data_config_from_reference_weights():
    tv = resolve_data_config(parse_arch("torchvision:inception_v3"), build_model(parse_arch("torchvision:inception_v3"), meta=True))
    assert tv.input_size == (3, 299, 299) and abs(tv.crop_pct - 299 / 342) < 1e-3
    tm = resolve_data_config(parse_arch("timm:resnet18"), build_model(parse_arch("timm:resnet18"), meta=True), in_chans=1)
    assert tm.input_size[0] == 1 and len(tm.mean) == 1
