"""The flat side-by-side buffers the hooks write into while training, and their fallback."""
import pytest
import torch

from ftwt_cli import sidebyside, train
from ftwt_cli.gating import GatedModel
from ftwt_cli.sidebyside import FlatBuffers, Layout
from test_dataflow import _plan


def test_layout_groups_layers_by_width_in_forward_order():
    lay = Layout.of(["a", "b", "c", "d", "e"], [8, 16, 8, 4, 16])
    assert lay.names == ("a", "c", "b", "e", "d")
    assert lay.widths == (8, 8, 16, 16, 4) and lay.offsets == (0, 8, 16, 32, 48)
    assert lay.groups == ((0, 2, 8), (2, 2, 16), (4, 1, 4))
    flat = torch.arange(3 * lay.total)
    assert torch.equal(lay.block(flat, 1, 3), torch.arange(24, 48).view(3, 8))       # "c": after a's 3 × 8
    assert torch.equal(lay.group(flat, 1, 3), torch.arange(48, 144).view(6, 16))     # b and e, one row per sample
    flags = torch.zeros(3 * lay.total, dtype=torch.bool)
    lay.block(flags, 2, 3)[1, :5] = True                                             # "b", sample 1: 5 set
    counts = lay.sample_counts(flags, 3)
    assert counts.dtype == torch.float64 and counts.shape == (5, 3)
    assert counts[2].tolist() == [0, 5, 0] and counts.sum() == 5


def test_flat_buffers_refuse_a_second_write_or_another_batch():
    lay = Layout.of(["a", "b"], [4, 4])
    fb = FlatBuffers.new(lay, 2)
    x = torch.zeros(2, 4)
    assert fb.slot("s", "a", x) is not None and fb.complete("s") is None     # "b" has not written yet
    assert fb.slot("s", "b", x) is not None and fb.complete("s") is not None
    assert fb.slot("s", "a", x) is None and fb.complete("s") is None         # "a" ran twice: concatenate instead
    assert fb.slot("t", "a", torch.zeros(3, 4)) is None and fb.complete("t") is None
    assert fb.slot("u", "zzz", x) is None


def test_flat_buffers_count_a_kind_once_and_again_after_put():
    lay = Layout.of(["a", "b"], [3, 2])
    fb = FlatBuffers.new(lay, 2)
    assert fb.sample_counts("m") is None                                      # nothing written yet
    fb.put("m", torch.tensor([1, 1, 0, 0, 1, 0, 1, 1, 1, 0], dtype=torch.bool))
    want = torch.tensor([[2.0, 1.0], [2.0, 1.0]], dtype=torch.float64)          # (layer, sample)
    assert torch.equal(fb.sample_counts("m"), want) and fb.sample_counts("m") is fb.sample_counts("m")
    fb.put("m", torch.ones(10, dtype=torch.bool))
    assert torch.equal(fb.sample_counts("m"), torch.tensor([[3.0, 3.0], [2.0, 2.0]], dtype=torch.float64))


def _fit_step(g, x):
    g(x)
    loss = train.gate_grads(g)
    return (float(loss), train._batch_metrics(g), {n: p.grad.clone() for n, p in g.gates.named_parameters()},
            {k: v.clone() for k, v in g.last_targets.items()})


@pytest.mark.parametrize("frozen", [True, False])
def test_flat_path_equals_concatenating_per_layer(frozen, monkeypatch):
    """Loss, gradients, ground truth and progress metrics are the same whether the hooks wrote into the flat
    buffers or each layer's tensors are concatenated afterwards (widths 4-16 in several groups)."""
    torch.manual_seed(0)
    net, plan = _plan()
    g = GatedModel(net, plan).eval().set_gates("predict", r=0.7)
    for p in g.gates.parameters():
        torch.nn.init.normal_(p, std=0.5)
    g.collect_targets, g.frozen_backbone = True, frozen
    x = torch.randn(6, 3, 16, 16)
    if frozen:
        a = _fit_step(g, x)
        assert all(g._state.flat.complete(k) is not None for k in ("logits", "scores", "masks", "targets"))
        assert set(g._state.flat.counts) == {"masks"}      # counted once, for the MACs and the keep ratio
        monkeypatch.setattr(sidebyside.FlatBuffers, "slot", lambda *args, **kw: None)
        b = _fit_step(g, x)
        assert g._state.flat.complete("scores") is None
        assert a[0] == b[0] and a[1] == b[1]
        assert all(torch.equal(a[2][k], b[2][k]) for k in a[2]) and all(torch.equal(a[3][k], b[3][k]) for k in a[3])
    else:                                      # finetune: logits carry autograd, so they are concatenated
        g(x)
        loss = train.gate_loss(g)
        assert loss.requires_grad and g._state.flat.complete("logits") is None
        m = train._batch_metrics(g)
        monkeypatch.setattr(sidebyside.FlatBuffers, "slot", lambda *args, **kw: None)
        g(x)
        assert torch.equal(train.gate_loss(g), loss) and train._batch_metrics(g) == m


def test_no_gated_layer_in_predict_mode():
    """A model with nothing gated still runs, reports and counts its MACs (no flat buffer to read)."""
    net, plan = _plan()
    g = GatedModel(net, plan, gated=[]).eval().set_gates("predict")
    with torch.no_grad():
        g(torch.randn(2, 3, 16, 16))
    s = g.last_stats
    assert s.masks == {} and torch.equal(s.macs, torch.full((2,), s.dense_macs, dtype=torch.float64))
