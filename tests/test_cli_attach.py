"""The attach command end to end through the CLI, including every kind of bad input."""
import hashlib
import json

import pytest
import torch
import torchvision
from typer.testing import CliRunner

import ftwt_cli
import ftwt_cli.attach
from ftwt_cli.cli import app

runner = CliRunner()


def _sha(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_attach_writes_a_run_and_prints_the_table(tmp_path, r18_ckpt):
    before = _sha(r18_ckpt)
    run = tmp_path / "run"
    res = runner.invoke(app, ["attach", str(r18_ckpt), "--arch", "torchvision:resnet18", "--run", str(run), "--input-size", "3,32,32"])
    assert res.exit_code == 0, res.output
    assert "layer1.0.conv1" in res.stdout and "64→64" in res.stdout and "gated layers" in res.stdout
    meta = json.loads((run / "ftwt.json").read_text())
    assert meta["arch"] == {"source": "torchvision", "name": "resnet18", "num_classes": 10, "in_chans": 3}
    assert meta["source"]["sha256"] == before and meta["data_config"]["input_size"] == [3, 32, 32]
    assert len(meta["gating"]["gated"]) == 17 and "conv1" in meta["gating"]["gated"] and "layer2.0.downsample.0" not in meta["gating"]["gated"]
    assert (run / "weights.safetensors").is_file()
    assert _sha(r18_ckpt) == before                          # the input is never touched


def test_loaded_run_reproduces_the_source(r18_run, r18_ckpt):
    src = torchvision.models.resnet18(num_classes=10).eval()
    src.load_state_dict(torch.load(r18_ckpt))
    model = ftwt_cli.load(r18_run)
    assert isinstance(model, ftwt_cli.GatedModel)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref = src(x)
        model.set_gates("open")
        assert torch.allclose(model(x), ref, atol=1e-5 * ref.abs().max())
        assert model.last_stats.macs.shape == (4,)
        assert torch.all(model.last_stats.macs == model.last_stats.dense_macs)
        model.set_gates("oracle", r=0.95)
        model(x)
    s = model.last_stats
    assert set(s.masks) == set(model.gated_names) and s.masks["layer1.0.conv1"].shape == (4, 64)
    assert (s.macs < s.dense_macs).all() and (s.gate_macs > 0).all()


def test_include_exclude_and_shortcuts(tmp_path, r18_ckpt):
    r = ftwt_cli.attach.attach(r18_ckpt, arch="torchvision:resnet18", input_size=(3, 32, 32), run_dir=tmp_path / "a",
                               include=["layer3.*", "layer4.*"], exclude=["*.conv2"], gate_shortcuts=True)
    names = [l.name for l in r.layers]
    assert "layer3.0.downsample.0" in names and "layer3.0.conv1" in names
    assert not any(n.endswith("conv2") or n.startswith("layer1") for n in names)


def test_force_replaces_an_existing_run(tmp_path, r18_ckpt):
    run = tmp_path / "run"
    args = ["attach", str(r18_ckpt), "--arch", "torchvision:resnet18", "--run", str(run), "--input-size", "3,32,32"]
    assert runner.invoke(app, args).exit_code == 0
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and "already exists" in res.stderr and "--force" in res.stderr
    assert runner.invoke(app, args + ["--force"]).exit_code == 0
    assert [p.name for p in tmp_path.iterdir()] == ["run"]       # no temporary folders left behind


def _bad_inputs(tmp_path, ckpt):
    trunc = tmp_path / "trunc.pth"
    trunc.write_bytes(ckpt.read_bytes()[:5000])
    text = tmp_path / "notes.pth"
    text.write_text("hello")
    odd = tmp_path / "odd.pth"
    torch.save({"a.weight": torch.zeros(3, 3), "b.bias": torch.zeros(2)}, odd)
    whole = tmp_path / "whole.pt"
    torch.save(torchvision.models.resnet18(num_classes=10), whole)
    return {
        "missing": ([str(tmp_path / "nope.pth")], "not found"),
        "truncated": ([str(trunc)], "truncated"),
        "not a checkpoint": ([str(text)], "not a PyTorch checkpoint"),
        "no architecture fits": ([str(odd)], "no known architecture matches"),
        "unknown arch": ([str(ckpt), "--arch", "resnet181"], "did you mean"),
        "wrong arch": ([str(ckpt), "--arch", "torchvision:resnet34"], "does not fit torchvision:resnet34"),
        "num_classes mismatch": ([str(ckpt), "--arch", "resnet18", "--num-classes", "100"], "--num-classes 100"),
        "bad input size": ([str(ckpt), "--input-size", "3x32"], "not C,H,W"),
        "pickled module": ([str(whole)], "--trust-pickle"),
        "bad mean": ([str(ckpt), "--arch", "resnet18", "--mean", "0.5,0.5"], "--mean has 2 values"),
    }


@pytest.mark.parametrize("case", ["missing", "truncated", "not a checkpoint", "no architecture fits", "unknown arch",
                                  "wrong arch", "num_classes mismatch", "bad input size", "pickled module", "bad mean"])
def test_bad_input_one_line_nonzero_nothing_written(tmp_path, r18_ckpt, case):
    args, expect = _bad_inputs(tmp_path, r18_ckpt)[case]
    before = _sha(r18_ckpt)
    run = tmp_path / "run"
    res = runner.invoke(app, ["attach", *args, "--run", str(run)])
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Fix:" in lines[0], res.stderr
    assert expect in lines[0]
    assert "Traceback" not in res.output
    assert not run.exists() and not any(p.name.startswith(".run") for p in tmp_path.iterdir())
    assert _sha(r18_ckpt) == before


def test_trust_pickle_loads_a_whole_module(tmp_path):
    whole = tmp_path / "whole.pt"
    torch.save(torchvision.models.resnet18(num_classes=3), whole)
    res = runner.invoke(app, ["attach", str(whole), "--trust-pickle", "--arch", "resnet18", "--run", str(tmp_path / "r"),
                              "--input-size", "3,32,32"])
    assert res.exit_code == 0, res.output


@pytest.mark.integration     # a few seconds each: the default run stays under 6 minutes
def test_vit_attaches_its_mlps_without_arch(tmp_path):
    import timm
    p = tmp_path / "vit.pth"
    torch.save(timm.create_model("vit_tiny_patch16_224", num_classes=5).state_dict(), p)
    res = runner.invoke(app, ["attach", str(p), "--run", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    meta = json.loads((tmp_path / "r" / "ftwt.json").read_text())
    assert meta["format_version"] == 2            # releases without MLP units refuse it with "upgrade ftwt"
    units = meta["plan"]["units"]
    assert [u["name"] for u in units if u.get("kind") == "mlp"] == [f"blocks.{i}.mlp.fc1" for i in range(12)]
    assert meta["plan"]["attention_macs"] == 12 * 3 * 2 * 197 * 197 * 64     # QKᵀ and AV, 3 heads of 64


@pytest.mark.integration     # a few seconds each: the default run stays under 6 minutes
def test_glu_mlps_attach_and_coupled_ones_are_refused(tmp_path):
    import timm
    # EVA-02 tiny: SwiGLU MLPs (one fc1 chunked into value and gate halves) are gated
    p = tmp_path / "eva.pth"
    torch.save(timm.create_model("eva02_tiny_patch14_224", num_classes=5).state_dict(), p)
    res = runner.invoke(app, ["attach", str(p), "--arch", "timm:eva02_tiny_patch14_224", "--run", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    units = json.loads((tmp_path / "r" / "ftwt.json").read_text())["plan"]["units"]
    assert [u["reader"] for u in units if u.get("kind") == "glu"] == [f"blocks.{i}.mlp.fc2" for i in range(12)]
    assert "GLU MLP" in res.stdout
    # EVA-02 base normalises over the hidden units (scale_mlp): masking some would change the rest; under 10% of
    # its MACs (the patch embedding) is left
    p = tmp_path / "eva-base.pth"
    torch.save(timm.create_model("eva02_base_patch14_224", num_classes=5).state_dict(), p)
    res = runner.invoke(app, ["attach", str(p), "--arch", "timm:eva02_base_patch14_224", "--run", str(tmp_path / "b")])
    assert res.exit_code == 2 and "nothing worth gating" in res.stderr
    assert not (tmp_path / "b").exists()
