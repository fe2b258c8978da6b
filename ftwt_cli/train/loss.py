"""The losses of both training phases: the gates' BCE (FTWT eq. 2), optional distillation, and the MACs budget of
task-aware gates."""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F

__all__ = ["gate_loss", "distill_loss", "budget_loss"]


def gate_loss(logits: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """L_pred = mean over layers l of Σ_f BCEWithLogits(P_f^l, g_f^l), averaged over the batch (FTWT eq. 2).

    ``logits`` and ``targets`` map each gated layer to its (B, C_l) gate logits and ground-truth masks (a
    ``GatedModel``'s ``last_logits`` and ``last_targets``); layers without both are left out. Every
    (sample, filter) term carries the same weight 1/(B·L), so one BCE over all layers side by side equals the
    per-layer sums averaged. Computed in float32 whatever autocast gave the logits."""
    names = [n for n in targets if n in logits]
    if not names:
        raise ValueError("gate_loss needs the logits and targets of at least one layer (a forward in predict mode, "
                         "inside GatedModel.collecting)")
    lg = torch.cat([logits[n].float().reshape(-1) for n in names])
    tg = torch.cat([targets[n].reshape(-1) for n in names]).to(lg.dtype)
    batch = logits[names[0]].shape[0]
    return F.binary_cross_entropy_with_logits(lg, tg, reduction="sum") / (batch * len(names))


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, temp: float) -> torch.Tensor:
    """T² · KL(softmax(teacher/T) ‖ softmax(student/T)), batch mean (Hinton et al. 2015); T² keeps gradients
    comparable to CE's."""
    return F.kl_div(F.log_softmax(student.float() / temp, 1), F.log_softmax(teacher.float() / temp, 1),
                    reduction="batchmean", log_target=True) * temp * temp


def budget_loss(macs: torch.Tensor, dense: float, target_cut: float) -> torch.Tensor:
    """(mean_b MACs_b / dense − (1 − target_cut))², float32: DGNet's L2 penalty on the density, with ftwt's exact
    per-sample MACs (gates included; ``GatedModel.differentiable_macs``). The batch mean, not each sample, meets the
    budget: images may differ in cost, which is what dynamic pruning is for."""
    return (macs.float().mean() / dense - (1.0 - target_cut)).square()
