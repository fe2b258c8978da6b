import pytest

from ftwt_cli.errors import FtwtError
from ftwt_cli.train.config import (
    FinetuneConfig,
    FitGatesConfig,
    load_recipe,
    resolve_config,
)


def test_recipe_then_flags(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("fit_gates: {r: 0.9, epochs: 3, lr: 1}\nfinetune: {mode: joint, step_epochs: [1]}\n")
    rec = load_recipe(p)
    cfg = resolve_config(FitGatesConfig, rec, "fit_gates", {"epochs": 5, "r": None})
    assert cfg.r == 0.9 and cfg.epochs == 5 and isinstance(cfg.lr, float)
    ft = resolve_config(FinetuneConfig, rec, "finetune", {})
    assert ft.mode == "joint" and ft.step_epochs == [1]


@pytest.mark.parametrize("text,expect", [
    ("fit_gates: {rr: 0.9}", "unknown key 'rr'.*valid keys: r, gt"),
    ("fitgates: {r: 0.9}", "unknown key 'fitgates'"),
    ("fit_gates: {r: 1.5}", r"outside \(0, 1\]"),
    ("fit_gates: {epochs: two}", "must be an integer"),
    ("fit_gates: [1, 2]", "must be a mapping"),
    ("fit_gates: {r: 0.9", "not valid YAML"),
])
def test_bad_recipes(tmp_path, text, expect):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    with pytest.raises(FtwtError, match=expect):
        resolve_config(FitGatesConfig, load_recipe(p), "fit_gates", {})


def test_shipped_recipes_are_valid():
    from pathlib import Path
    for p in sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml")):
        rec = load_recipe(p)
        resolve_config(FitGatesConfig, rec, "fit_gates", {})
        resolve_config(FinetuneConfig, rec, "finetune", {})


def test_bad_choices():
    with pytest.raises(FtwtError, match="decoupled, joint"):
        resolve_config(FinetuneConfig, None, "finetune", {"mode": "both"})
    with pytest.raises(FtwtError, match="mass, uniform"):
        resolve_config(FitGatesConfig, None, "fit_gates", {"gt": "max"})
    with pytest.raises(FtwtError, match="bce-weight=-1.0"):
        resolve_config(FinetuneConfig, None, "finetune", {"bce_weight": -1.0})
    with pytest.raises(FtwtError, match=r"freeze-gates-at=2.0 is outside \[0, 1\]"):
        resolve_config(FinetuneConfig, None, "finetune", {"freeze_gates_at": 2.0})


def test_workers_default_to_the_machine_and_must_not_be_negative(monkeypatch):
    import ftwt_cli.data as data
    assert resolve_config(FitGatesConfig, None, "fit_gates", {}).workers is None     # resolved when a run starts
    with pytest.raises(FtwtError, match="workers=-1"):
        resolve_config(FitGatesConfig, None, "fit_gates", {"workers": -1})
    with pytest.raises(FtwtError, match="must be an integer"):
        resolve_config(FinetuneConfig, {"_path": "r.yaml", "finetune": {"workers": "two"}}, "finetune", {})
    monkeypatch.setattr(data.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(data.os, "cpu_count", lambda: 2)
    assert data.default_workers() == 0          # workers would compete with torch's threads for 2 cores
    monkeypatch.setattr(data.os, "cpu_count", lambda: 16)
    assert data.default_workers() == 4
