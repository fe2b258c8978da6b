"""MLP units: the hidden units of fc1 → activation → fc2 on tokens are gated like a conv's filters."""
import copy

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from helpers import MacsMeter
from ptflops import get_model_complexity_info
from ptflops.flops_counter import FLOPS_BACKEND

from ftwt_cli.arch.trace import trace_plan
from ftwt_cli.fast import make_compact
from ftwt_cli.gating import GatedModel


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act: nn.Module, glu: bool = False) -> None:
        super().__init__()
        self.glu = glu
        self.fc1 = nn.Linear(dim, hidden * (2 if glu else 1))
        self.act = act
        self.drop = nn.Dropout(0.1)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        if self.glu:                                       # timm GluMlp: value half times act(gate half)
            v, g = self.fc1(x).chunk(2, dim=-1)
            return self.fc2(self.drop(v * self.act(g)))
        return self.fc2(self.drop(self.act(self.fc1(x))))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x)) (the residual after fc2)."""

    def __init__(self, dim: int, act: nn.Module, glu: bool = False) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = Mlp(dim, 4 * dim, act, glu)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, N, 3, 2, C // 2).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C))
        return x + self.mlp(self.ln2(x))


class TinyViT(nn.Module):
    def __init__(self, act=nn.GELU, glu: bool = False, dim: int = 16, depth: int = 2, head_mlp: bool = False) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 4, stride=4)
        self.blocks = nn.Sequential(*[Block(dim, act(), glu) for _ in range(depth)])
        self.head = Mlp(dim, 32, nn.GELU()) if head_mlp else nn.Linear(dim, 5)   # an MLP on one vector per sample

    def forward(self, x):
        return self.head(self.blocks(self.embed(x).flatten(2).transpose(1, 2)).mean(1))


SIZE = (3, 16, 16)     # 16 tokens of 16 channels


def _plan(model):
    return trace_plan(model.eval(), SIZE)


def test_gelu_mlp_is_a_unit_and_fc2_reads_its_hidden_units():
    plan = _plan(TinyViT())
    mlp = {u.name: u for u in plan.units if u.kind == "mlp"}
    assert set(mlp) == {"blocks.0.mlp.fc1", "blocks.1.mlp.fc1"}
    u = mlp["blocks.0.mlp.fc1"]
    assert (u.in_channels, u.out_channels, u.reader, u.act) == (16, 64, "blocks.0.mlp.fc2", "blocks.0.mlp.act")
    ops = {o.name: o for o in plan.ops}
    assert ops["blocks.0.mlp.fc2"].in_expr == ["unit", "blocks.0.mlp.fc1", 64]
    # the residual after fc2 makes the stream dense again: the next block's fc1 and qkv read every channel
    assert ops["blocks.1.mlp.fc1"].in_expr == ["dense", 16] and ops["blocks.1.qkv"].in_expr == ["dense", 16]
    assert not any(n.endswith(("qkv", "proj", "fc2")) for n in plan.rejected)     # not MLP candidates: not listed
    # attention: per block and head, QKᵀ and AV each cost N·N·d = 16·16·8
    assert plan.attention_macs == 2 * 2 * 2 * 16 * 16 * 8


@pytest.mark.parametrize("act,why", [(nn.Sigmoid, "f(0)≠0"), (nn.Softplus, "f(0)≠0")])
def test_activation_with_nonzero_at_zero_is_refused(act, why):
    plan = _plan(TinyViT(act))
    assert not [u for u in plan.units if u.kind == "mlp"]
    assert why in plan.rejected["blocks.0.mlp.fc1"]


class SwiGLUFunctional(nn.Module):
    """Gemma/LLaMA style: down(act(gate(x)) * up(x)), no module between the product and fc2."""

    def __init__(self, dim: int, hidden: int, gate_act=F.gelu) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(dim, hidden), nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.gate_act = gate_act

    def forward(self, x):
        return self.down_proj(self.gate_act(self.gate_proj(x)) * self.up_proj(x))


def _with_mlp(mlp, **kw):
    m = TinyViT(**kw)
    for b in m.blocks:
        b.mlp = mlp()
    return m


def _glu_fused():         # timm GluMlp's layout, with a sigmoid gate (f(0) ≠ 0 is fine: the mask is on the product)
    return TinyViT(nn.Sigmoid, glu=True)


def _glu_timm_swiglu():
    from timm.layers import SwiGLU
    return _with_mlp(lambda: SwiGLU(16, 32))


def _glu_functional():
    return _with_mlp(lambda: SwiGLUFunctional(16, 32))


GLU_BUILDS = [_glu_fused, _glu_timm_swiglu, _glu_functional]
GLU_IDS = ["fused-chunk", "timm-swiglu", "functional-swiglu"]


@pytest.mark.parametrize("build,name,partner,reader,hidden", [
    (_glu_fused, "mlp.fc1", None, "mlp.fc2", 64),
    (_glu_timm_swiglu, "mlp.fc1_x", "mlp.fc1_g", "mlp.fc2", 32),
    (_glu_functional, "mlp.up_proj", "mlp.gate_proj", "mlp.down_proj", 32)], ids=GLU_IDS)
def test_gated_glu_mlps_are_units(build, name, partner, reader, hidden):
    plan = _plan(build())
    glu = {u.name: u for u in plan.units if u.kind == "glu"}
    assert set(glu) == {f"blocks.{i}.{name}" for i in (0, 1)} and not [u for u in plan.units if u.kind == "mlp"]
    u = glu[f"blocks.0.{name}"]
    assert (u.in_channels, u.out_channels, u.end, u.reader) == (16, hidden, f"blocks.0.{reader}", f"blocks.0.{reader}")
    assert u.partner == (partner and f"blocks.0.{partner}")
    assert {o.name: o for o in plan.ops}[u.reader].in_expr == ["unit", u.name, hidden]
    assert not plan.rejected


def test_timm_mlp_is_a_unit():
    from timm.layers import Mlp as TimmMlp
    assert [u.reader for u in _plan(_with_mlp(lambda: TimmMlp(16, 32))).units if u.kind == "mlp"] == \
        ["blocks.0.mlp.fc2", "blocks.1.mlp.fc2"]


def test_glu_with_coupled_hidden_units_is_refused():
    from timm.layers import SwiGLU
    # a LayerNorm over the hidden units (EVA's scale_mlp): masking some would change the others
    plan = _plan(_with_mlp(lambda: SwiGLU(16, 32, norm_layer=nn.LayerNorm)))
    assert not [u for u in plan.units if u.kind != "conv"]
    assert "GLU" in plan.rejected["blocks.0.mlp.fc1_g"] and "norm" in plan.rejected["blocks.0.mlp.fc1_g"]
    # a softmax over the hidden units on the gate side: not elementwise, every gate row is needed
    plan = _plan(_with_mlp(lambda: SwiGLUFunctional(16, 32, gate_act=lambda t: t.softmax(-1))))
    assert not [u for u in plan.units if u.kind != "conv"]


def test_mlp_on_one_vector_per_sample_is_not_gated():
    plan = _plan(TinyViT(head_mlp=True))
    assert "gate would cost as much" in plan.rejected["head.fc1"]
    assert "head.fc1" not in {u.name for u in plan.units}


def _masked_outputs_are_zero(g, x):
    seen = {}
    hooks = [g.backbone.get_submodule(u.reader).register_forward_pre_hook(lambda m, a, n=u.name: seen.__setitem__(n, a[0]))
             for u in g.units if u.kind != "conv"]
    try:
        g(x)
    finally:
        for h in hooks:
            h.remove()
    for name, h in seen.items():
        mask = g.last_masks[name]                                     # (B, hidden), one per sample for all tokens
        assert (h.flatten(1, -2).ne(0).any(1) <= mask).all()       # fc2 reads exact zeros where the mask is off
        assert not mask.all()


@pytest.mark.parametrize("build", [TinyViT, *GLU_BUILDS], ids=["mlp", *GLU_IDS])
def test_oracle_masks_zero_fc2_inputs_and_compact_matches_masked(build):
    torch.manual_seed(0)
    m = build()
    g = GatedModel(m, _plan(m)).eval().set_gates("oracle", r=0.8)
    x = torch.randn(3, *SIZE)
    with torch.no_grad():
        _masked_outputs_are_zero(g, x)
        masks = dict(g.last_masks)
        g.set_gates("predict")
        with g.forcing(masks):
            ref = g(x)
        c = make_compact(g, calibrate=False, input_size=SIZE)
        for b in (slice(0, 1), slice(0, 3)):
            y = c(x[b], {k: v[b] for k, v in masks.items()})
            assert torch.allclose(y, ref[b], atol=1e-5)


@pytest.mark.parametrize("build,hidden", [(TinyViT, 64), (_glu_fused, 64), (_glu_timm_swiglu, 32)],
                         ids=["mlp", "fused-chunk", "timm-swiglu"])
def test_gate_training_reaches_mlp_gates(build, hidden):
    torch.manual_seed(0)
    m = build()
    g = GatedModel(m, _plan(m)).train().set_gates("predict")
    name = next(u.name for u in g.units if u.kind != "conv" and u.name.startswith("blocks.0."))
    with g.collecting(decoupled=True):
        out = g(torch.randn(2, *SIZE))
    t, logits = g.last_targets[name], g.last_logits[name]
    assert t.shape == logits.shape == (2, hidden) and 0 < t.sum() < t.numel()
    # the task loss reaches the backbone through the masked hidden units; BCE reaches the gate
    (F.cross_entropy(out, torch.tensor([0, 1])) + F.binary_cross_entropy_with_logits(logits, t.float())).backward()
    assert g.gates[name.replace(".", "__")].fc.weight.grad.abs().sum() > 0
    assert g.backbone.get_submodule(name).weight.grad.abs().sum() > 0


def _vit(**kw):
    return timm.create_model("vit_tiny_patch16_224", img_size=64, patch_size=16, depth=2, num_classes=10, **kw)


def _swin():
    return timm.create_model("swin_tiny_patch4_window7_224", img_size=64, window_size=4, embed_dim=32,
                             depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), num_classes=10)


def _convnext():
    return timm.create_model("convnext_atto", conv_mlp=False, num_classes=10)


def _eva02():           # fused GLU MLPs (timm GluMlp with SiLU: SwiGLU), rotary embeddings
    return timm.create_model("eva02_tiny_patch14_224", img_size=64, patch_size=16, depth=2, num_classes=10)


@pytest.mark.parametrize("build", [_vit, _swin, _convnext, lambda: torchvision.models.swin_t(num_classes=10), _eva02],
                         ids=["vit", "swin", "convnext", "tv-swin", "eva02-glu"])
@pytest.mark.parametrize("mode", ["open", "oracle"])
def test_transformer_open_gates_exact_and_macs_match_hooks(build, mode):
    torch.manual_seed(0)
    m = build().eval()
    src = copy.deepcopy(m)
    g = GatedModel(m, trace_plan(m, (3, 64, 64))).eval().set_gates(mode, r=0.85)
    assert any(u.kind in ("mlp", "glu") for u in g.units)
    x = torch.randn(2, 3, 64, 64)
    measured = MacsMeter(g).run(x)
    assert torch.allclose(g.last_stats.macs, measured, rtol=1e-12), (g.last_stats.macs, measured)
    if mode == "open":
        with torch.no_grad():
            assert torch.equal(g(x), src(x))
        assert torch.allclose(measured, torch.full_like(measured, g.last_stats.dense_macs))
    else:
        assert (measured < g.last_stats.dense_macs).all()


def test_attention_macs_at_another_size():
    m = _vit(dynamic_img_size=True).eval()
    g = GatedModel(m, trace_plan(m, (3, 64, 64)))
    # 16 → 4 tokens (+ the class token): QKᵀ and AV per block, 3 heads of 64
    assert g.attention_macs((3, 64, 64)) == 2 * 2 * 3 * 17 * 17 * 64
    assert g.attention_macs((3, 32, 32)) == 2 * 2 * 3 * 5 * 5 * 64


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "convnext_atto"])
def test_dense_macs_agree_with_ptflops_aten_on_transformers(name, monkeypatch):
    # ptflops' aten backend sees SDPA's fused CPU kernel as one op it does not count, so it is measured with timm's
    # explicit q @ kᵀ and attn @ v (the same products: our count reads either from the autograd graph)
    m = timm.create_model(name, **({"img_size": 112} if name.startswith("vit") else {})).eval()
    size = (3, 112, 112)
    ours = float(GatedModel(m, trace_plan(m, size)).dense_macs().total[0])
    for blk in m.modules():
        if hasattr(blk, "fused_attn"):
            blk.fused_attn = False
    assert float(GatedModel(m, trace_plan(m, size)).dense_macs().total[0]) == ours    # bmm or SDPA: the same count
    ref, _ = get_model_complexity_info(m, size, as_strings=False, print_per_layer_stat=False, backend=FLOPS_BACKEND.ATEN)
    assert abs(ours / ref - 1) < 0.01, (ours, ref)


def test_vit_run_fits_gates_exports_and_reloads(tmp_path):
    import ftwt_cli
    from ftwt_cli.attach import attach
    from ftwt_cli.runs import export
    from ftwt_cli.train.config import FitGatesConfig
    from ftwt_cli.train.loops import fit_gates
    torch.manual_seed(0)
    torch.save(timm.create_model("test_vit", num_classes=10).state_dict(), tmp_path / "vit.pth")
    rep = attach(tmp_path / "vit.pth", arch="timm:test_vit", input_size=(3, 32, 32), run_dir=tmp_path / "run")
    assert sum(row.kind == "mlp" for row in rep.layers) == 6
    fit_gates(tmp_path / "run", "digits", FitGatesConfig(r=0.8, epochs=1, lr=0.05, batch_size=64, workers=0))
    out = export(tmp_path / "run", tmp_path / "vit.safetensors").path
    a, b = ftwt_cli.load(tmp_path / "run"), ftwt_cli.load(out)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ya, yb = a(x), b(x)
    assert torch.equal(ya, yb) and torch.equal(a.last_stats.macs, b.last_stats.macs)
    masks = a.last_stats.masks["blocks.0.mlp.fc1"]
    assert masks.shape == (4, 192) and not masks.all()          # the fitted gates switch hidden units off
    s = a.last_stats
    assert (s.macs - s.gate_macs < s.dense_macs).all() and (s.gate_macs == 6 * 64 * 192 + 3 * 64).all()


def test_cnn_plan_is_written_as_before_mlp_units():
    from ftwt_cli.arch.trace import Plan
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.Flatten())
    plan = trace_plan(m.eval(), SIZE)
    d = plan.to_dict()
    assert "attention_macs" not in d and all("kind" not in u and "reader" not in u for u in d["units"])
    assert Plan.from_dict(d) == plan and not plan.has_new_features
    vit = _plan(TinyViT())
    assert Plan.from_dict(vit.to_dict()) == vit and vit.has_new_features


class _PosAndHeads(nn.Module):
    """A conv on a positional grid made from parameters alone (XCiT) and a conv on heads folded into the batch
    dim (MViTv2's pooling): neither has one row per sample, so neither may be gated."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.grid = nn.Parameter(torch.randn(1, 4, 16, 16))
        self.pos = nn.Conv2d(4, 8, 1)
        self.pool = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.head = nn.Conv2d(8, 5, 1)

    def forward(self, x):
        B = x.shape[0]
        h = torch.relu(self.stem(x)) + self.pos(self.grid)
        h = self.pool(h.reshape(B * 2, 4, 16, 16)).reshape(B, 8, 16, 16)
        return self.head(torch.relu(h)).mean((2, 3))


def test_units_without_one_row_per_sample_are_refused():
    m = _PosAndHeads().eval()
    plan = trace_plan(m, SIZE)
    assert "does not depend on the image" in plan.rejected["pos"]
    assert "folded into the batch dim" in plan.rejected["pool"]
    g = GatedModel(m, plan).eval().set_gates("oracle", r=0.8)
    with torch.no_grad():
        g(torch.randn(3, *SIZE))                  # batch > 1 runs, and every mask has one row per sample
    assert all(v.shape[0] == 3 for v in g.last_stats.masks.values()) and g.last_stats.macs.shape == (3,)


def test_functional_projections_are_counted():
    # torchvision's ViT runs nn.MultiheadAttention, whose in- and out-projections are F.linear calls on its own
    # parameters, not nn.Linear module calls: they count with attention's products
    from torchvision.models.vision_transformer import VisionTransformer
    d, mlp, layers, n = 32, 64, 2, 17            # 32 px / patch 8 = 16 patches + the class token
    m = VisionTransformer(image_size=32, patch_size=8, num_layers=layers, num_heads=2, hidden_dim=d, mlp_dim=mlp,
                          num_classes=5).eval()
    g = GatedModel(m, trace_plan(m, (3, 32, 32)))
    per_layer = n * 3 * d * d + n * d * d + 2 * n * n * d + 2 * n * d * mlp
    expect = 3 * d * 64 * 16 + layers * per_layer + d * 5
    assert float(g.dense_macs().total[0]) == expect
    assert g.plan.attention_macs == layers * (n * 3 * d * d + n * d * d + 2 * n * n * d)
