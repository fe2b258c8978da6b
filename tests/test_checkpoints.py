import json

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from ftwt_cli.errors import FtwtError
from ftwt_cli.formats.checkpoints import clean_state_dict, read_checkpoint


@pytest.fixture
def sd():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=5).state_dict()


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("wrap", ["plain", "ddp", "compile", "timm", "lightning", "model_key"])
def test_formats_give_the_clean_state_dict(tmp_path, sd, wrap):
    obj = {
        "plain": sd,
        "ddp": {f"module.{k}": v for k, v in sd.items()},
        "compile": {f"_orig_mod.{k}": v for k, v in sd.items()},
        "timm": {"epoch": 3, "arch": "resnet18", "state_dict": sd, "optimizer": {"lr": 0.1}},
        "lightning": {"pytorch-lightning_version": "2.0", "state_dict": {f"model.{k}": v for k, v in sd.items()}},
        "model_key": {"model": {f"module.{k}": v for k, v in sd.items()}, "epoch": 1},
    }[wrap]
    p = tmp_path / "ckpt.pth"
    torch.save(obj, p)
    _same(read_checkpoint(p).state_dict, dict(sd))


def test_use_ema_picks_ema_weights(tmp_path, sd):
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in sd.items()}
    p = tmp_path / "train.pth.tar"
    torch.save({"state_dict": sd, "state_dict_ema": ema}, p)
    _same(read_checkpoint(p, use_ema=True).state_dict, ema)
    _same(read_checkpoint(p).state_dict, dict(sd))


def test_use_ema_without_ema_is_an_error(tmp_path, sd):
    p = tmp_path / "train.pth"
    torch.save({"state_dict": sd, "epoch": 1}, p)
    with pytest.raises(FtwtError, match="no EMA weights"):
        read_checkpoint(p, use_ema=True)


def test_safetensors_and_hub_folder(tmp_path, sd):
    p = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(p))
    _same(read_checkpoint(p).state_dict, dict(sd))
    hub = tmp_path / "hub"
    hub.mkdir()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(hub / "model.safetensors"))
    (hub / "config.json").write_text(json.dumps({"architecture": "resnet18", "num_classes": 5}))
    ck = read_checkpoint(hub)
    assert ck.fmt == "hub" and ck.hub_config["architecture"] == "resnet18"


def test_whole_module_pickle_is_refused_unless_trusted(tmp_path):
    p = tmp_path / "whole.pt"
    m = torchvision.models.resnet18(num_classes=5)
    torch.save(m, p)
    with pytest.raises(FtwtError, match="--trust-pickle"):
        read_checkpoint(p)
    ck = read_checkpoint(p, trust_pickle=True)
    assert ck.fmt == "pickled-module" and ck.state_dict.keys() == m.state_dict().keys()


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", "truncate"])
def test_unreadable_files(tmp_path, sd, content):
    p = tmp_path / "bad.pth"
    if content == "truncate":
        torch.save(sd, p)
        p.write_bytes(p.read_bytes()[:2000])
    else:
        p.write_bytes(content)
    with pytest.raises(FtwtError) as e:
        read_checkpoint(p)
    assert str(p) in str(e.value) and "Fix:" in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(FtwtError, match="not found"):
        read_checkpoint(tmp_path / "nope.pth")


def test_clean_keeps_a_real_model_prefix_when_not_shared():
    t = torch.zeros(1)
    assert set(clean_state_dict({"model.a": t, "head.b": t})) == {"model.a", "head.b"}
    assert set(clean_state_dict({"module.model.a": t, "module.model.b": t, "module.n_averaged": t})) == {"a", "b"}
