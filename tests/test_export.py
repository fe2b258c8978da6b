"""ftwt export / info / load(FILE): a portable file that rebuilds the gated model bit-exactly."""
import json
import subprocess
import sys

import pytest
import torch
import torchvision
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import ftwt_cli
from ftwt_cli.cli import app
from ftwt_cli.errors import FtwtError
from ftwt_cli.runs import export

runner = CliRunner()


def test_export_roundtrip_is_bit_exact(fitted, tmp_path):
    out = tmp_path / "m.safetensors"
    rep = export(fitted, out)
    assert rep.path == out and (tmp_path / "report.json").is_file() and (tmp_path / "report.md").is_file()
    with safe_open(str(out), "pt") as f:
        md = f.metadata()
    assert all(isinstance(v, str) for v in md.values())
    assert md["ftwt_format"] == "ftwt-export" and json.loads(md["arch"])["name"] == "resnet18"
    gc = json.loads(md["gate_config"])
    assert gc["r"] == 0.9 and len(gc["gated"]) == 17 and json.loads(md["evaluation"])["reduction"] > 0
    a, b = ftwt_cli.load(fitted), ftwt_cli.load(out)
    assert b.mode == "predict" and b.r == 0.9
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        ya, yb = a(x), b(x)
    assert torch.equal(ya, yb) and torch.equal(a.last_stats.macs, b.last_stats.macs)


@pytest.mark.integration      # a fresh Python process that imports torch: ~8 s
def test_exported_file_loads_without_the_run(fitted, tmp_path):
    out = tmp_path / "alone.safetensors"
    export(fitted, out)
    moved = tmp_path / "elsewhere" / "model.safetensors"
    moved.parent.mkdir()
    out.rename(moved)
    code = ("import ftwt_cli, torch; m = ftwt_cli.load(%r); m(torch.zeros(1, 3, 16, 16)); "
            "print(len(m.gated_names), m.mode)") % str(moved)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path / "elsewhere")
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["17", "predict"]


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_backbone_only_loads_into_torchvision(fitted, tmp_path, suffix):
    out = tmp_path / f"bb{suffix}"
    export(fitted, out, backbone_only=True)
    sd = torch.load(out, weights_only=True) if suffix == ".pth" else load_file(str(out))
    tv = torchvision.models.resnet18(num_classes=10)
    tv.load_state_dict(sd)                            # strict
    m = ftwt_cli.load(fitted).set_gates("open")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(tv.eval()(x), m(x))


def test_refuses_newer_versions_and_foreign_files(fitted, tmp_path):
    out = tmp_path / "m.safetensors"
    export(fitted, out)
    tensors = load_file(str(out))
    with safe_open(str(out), "pt") as f:
        md = dict(f.metadata())
    newer = tmp_path / "newer.safetensors"
    save_file(tensors, str(newer), {**md, "ftwt_format_version": "99"})
    with pytest.raises(FtwtError, match="format version '99'.*upgrade"):
        ftwt_cli.load(newer)
    plain = tmp_path / "plain.safetensors"
    save_file(tensors, str(plain))
    with pytest.raises(FtwtError, match="no ftwt metadata"):
        ftwt_cli.load(plain)
    broken = tmp_path / "broken.safetensors"
    save_file(tensors, str(broken), {k: v for k, v in md.items() if k != "gate_config"})
    with pytest.raises(FtwtError, match="incomplete ftwt metadata"):
        ftwt_cli.load(broken)


@pytest.mark.integration
def test_cli_export_info_and_errors(fitted, tmp_path):
    out = tmp_path / "cli.safetensors"
    res = runner.invoke(app, ["export", "--run", str(fitted), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert out.is_file()
    res = runner.invoke(app, ["export", "--run", str(fitted), "--out", str(out)])
    assert res.exit_code == 2 and "already exists" in res.stderr
    res = runner.invoke(app, ["export", "--run", str(fitted), "--out", str(tmp_path / "x.pth")])
    assert res.exit_code == 2 and "must end in .safetensors" in res.stderr
    for target in (fitted, out):
        res = runner.invoke(app, ["info", str(target)])
        assert res.exit_code == 0, res.output
        assert "torchvision:resnet18" in res.stdout and "17 (conv1" in res.stdout and "fit-gates" in res.stdout
    res = runner.invoke(app, ["info", str(tmp_path / "nothing")])
    assert res.exit_code == 2 and "no ftwt run" in res.stderr
