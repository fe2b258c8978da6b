"""Architecture coverage: attach gates to a model and check the invariants every supported model must keep.

Tooling, not library: the test-suite imports ``check_arch`` (a representative subset by default, the full sweep
under ``-m slow``), and running this file writes the pass/fail table in docs/coverage.md:

    python benchmarks/arch_coverage.py [NAME ...]   # every torchvision classifier + one model per timm module
                                                    # (NAME...: only those matching, nothing written)
"""
from __future__ import annotations

import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import torch

from ftwt_cli.arch import build_model, detect_arch, parse_arch, resolve_data_config, trace_plan
from ftwt_cli.attach import MIN_GATEABLE_SHARE
from ftwt_cli.errors import FtwtError
from ftwt_cli.gating import GatedModel, gated_share

__all__ = ["CoverageResult", "check_arch", "TORCHVISION_SAMPLE", "TIMM_SAMPLE", "TIMM_FAMILIES", "TIMM_TRANSFORMERS",
           "timm_models", "input_size_for"]

# The default test run: one or two of each structural family (residual, depthwise, concat, split, SE, ...).
TORCHVISION_SAMPLE = ("resnet18", "mobilenet_v2", "mobilenet_v3_small", "densenet121", "efficientnet_b0",
                      "shufflenet_v2_x0_5", "squeezenet1_1", "googlenet", "regnet_x_400mf", "vgg11_bn")
TIMM_SAMPLE = ("resnet50d", "mixnet_s", "ghostnet_050", "dla34", "res2net50_14w_8s", "regnety_002", "repvgg_a0")
# The broad sweep (``-m slow`` and docs/coverage.md): one model per timm conv family named in the issue.
TIMM_FAMILIES = (
    "resnet18", "resnet50", "resnet50d", "resnext50_32x4d", "seresnet50", "ecaresnet50d", "skresnet18",
    "efficientnet_b0", "efficientnetv2_rw_t", "tf_efficientnetv2_b0", "mobilenetv2_100", "mobilenetv3_large_100",
    "mobilenetv3_small_050", "mnasnet_100", "mixnet_s", "regnetx_002", "regnety_002", "regnetz_b16", "ghostnet_050",
    "rexnet_100", "dla34", "densenet121", "dpn68", "vgg11_bn", "repvgg_a0", "cspresnet50", "cspdarknet53",
    "darknet53", "hrnet_w18_small", "res2net50_14w_8s", "resnest14d", "inception_v3", "inception_v4",
    "xception41", "selecsls42b", "fbnetc_100", "lcnet_050", "hardcorenas_a", "gernet_s", "nf_resnet26",
    "convnext_atto", "vit_tiny_patch16_224",
)
# Transformers and hybrids (MLP units), at least one per timm module; ``timm_models`` adds the first small model of
# any module not named here, so that every timm family is tried.
TIMM_TRANSFORMERS = (
    "vit_tiny_patch16_224", "deit_tiny_patch16_224", "deit3_small_patch16_224", "swin_tiny_patch4_window7_224",
    "swinv2_tiny_window8_256", "swinv2_cr_tiny_224", "convnext_tiny", "convnextv2_atto", "maxvit_tiny_tf_224",
    "coatnet_nano_rw_224", "beit_base_patch16_224", "eva02_tiny_patch14_224", "cait_xxs24_224", "pvt_v2_b0",
    "twins_svt_small", "mixer_s16_224", "efficientformer_l1", "efficientformerv2_s0", "poolformer_s12", "levit_128s",
    "mobilevit_xxs", "edgenext_xx_small", "coat_lite_tiny", "gcvit_xxtiny", "focalnet_tiny_srf", "davit_tiny",
    "tiny_vit_5m_224", "fastvit_t8", "hiera_tiny_224", "mvitv2_tiny", "xcit_nano_12_p16_224", "crossvit_tiny_240",
    "volo_d1_224", "nest_tiny", "pit_ti_224", "convit_tiny", "tnt_s_patch16_224", "visformer_tiny",
    "inception_next_tiny", "mambaout_femto", "efficientvit_b0", "repvit_m0_9", "nextvit_small", "sequencer2d_s",
    "vit_small_r26_s32_224", "vit_relpos_small_patch16_224", "samvit_base_patch16", "rdnet_tiny", "starnet_s1",
    "shvit_s1", "swiftformer_xs", "fasternet_t0", "hgnetv2_b0", "vitamin_small_224", "efficientvim_m1",
)
_SMALL = ("atto", "femto", "pico", "nano", "tiny", "xxs", "xs", "small", "_s", "b0", "050", "100")


def timm_models() -> list:
    """One model per timm module: the named conv families and transformers first, then for each module none of those
    comes from, its first model with a small-variant tag in the name (else its first model)."""
    import timm
    names = list(dict.fromkeys(TIMM_FAMILIES + TIMM_TRANSFORMERS))
    have = set(names)
    covered = {m for m in timm.list_modules() if have & set(timm.list_models(module=m))}
    for m in timm.list_modules():
        if m in covered:
            continue
        models = timm.list_models(module=m)
        if models:
            names.append(next((n for n in models if any(t in n for t in _SMALL)), models[0]))
    return names


def input_size_for(source: str, name: str, default: int = 64) -> Tuple[int, int, int]:
    """Small inputs keep the sweep fast; a few models need more pixels. Models built for one fixed size
    (most transformers) are retried at their reference size by ``check_arch``."""
    if "inception" in name or name in ("googlenet",):
        return (3, 96, 96)
    if name.startswith("hrnet"):
        return (3, 96, 96)
    return (3, default, default)


@dataclass(frozen=True)
class CoverageResult:
    arch: str
    ok: bool
    units: int = 0
    gated_share: float = 0.0       # share of dense MACs in gated convs and MLP units (fc1, fc2)
    max_rel_diff: float = 0.0      # open gates vs source model
    oracle_macs_ratio: float = 1.0 # MACs at r=0.9 oracle / dense (random weights: only a sanity figure)
    seconds: float = 0.0
    note: str = ""


def check_arch(arch: str, input_size: Optional[Tuple[int, int, int]] = None, tol: float = 1e-5) -> CoverageResult:
    t0 = time.time()
    spec = parse_arch(arch)
    size = input_size or input_size_for(spec.source, spec.name)
    torch.manual_seed(0)
    try:
        src = build_model(spec).eval()
        twin = build_model(spec).eval()
        twin.load_state_dict(src.state_dict())
        # a model built for one size (patch grid, windows) fails at 64 px: its reference size, else 224 px
        tries = [size] if input_size is not None else list(dict.fromkeys(
            [size, tuple(resolve_data_config(spec, twin).input_size), (3, 224, 224)]))
        for i, size in enumerate(tries):
            try:
                plan = trace_plan(twin, size)
                break
            except Exception:
                if i == len(tries) - 1:
                    raise
        if not plan.units:
            return CoverageResult(str(spec), False, note="refused: nothing gateable", seconds=time.time() - t0)
        g = GatedModel(twin, plan).eval()
        x = torch.randn(2, *size)
        with torch.no_grad():
            ref = src(x)
            y = g(x)
            dense = g.last_stats.dense_macs
            per = g.last_stats.per_layer
            share = gated_share(plan.units, per, dense)
            if share < MIN_GATEABLE_SHARE:
                return CoverageResult(str(spec), False, len(plan.units), share, seconds=time.time() - t0,
                                      note=f"refused: only {share:.0%} of MACs gateable")
            rel = float((ref - y).abs().max() / ref.abs().max().clamp_min(1e-12))
            open_ok = bool(torch.allclose(g.last_stats.macs, torch.full_like(g.last_stats.macs, dense)))
            g.set_gates("oracle", r=0.9)
            g(x)
            ratio = float(g.last_stats.macs.mean()) / dense
        detected, how = _detection(spec, src)
        ok = rel <= tol and open_ok and ratio <= 1.0 + g.gate_macs_dense() / dense and detected
        return CoverageResult(str(spec), ok, len(plan.units), share, rel, ratio, time.time() - t0,
                              how if ok else f"open-gate diff {rel:.1e}" if rel > tol else how if not detected
                              else "MACs mismatch")
    except FtwtError as e:
        return CoverageResult(str(spec), False, note=f"refused: {e.message}", seconds=time.time() - t0)
    except Exception as e:        # the sweep reports a model ftwt cannot even run, and goes on
        return CoverageResult(str(spec), False, note=f"error: {type(e).__name__}: {str(e).splitlines()[0][:120]}",
                              seconds=time.time() - t0)


def _detection(spec, model) -> Tuple[bool, str]:
    """What `ftwt attach` without --arch makes of the bare state dict: this architecture (or one computing the same
    function), or a refusal that lists it among equally fitting architectures and asks for --arch."""
    try:
        det = detect_arch(model.state_dict())
    except FtwtError as e:
        listed = str(spec) in e.message
        return listed, ("weights also fit other architectures: attach asks for --arch" if listed
                        else f"not detected: {e.message[:80]}")
    if spec in (det.arch, *(parse_arch(a) for a in det.alternatives)):
        return True, ""
    return False, f"detected as {det.arch}"


def main() -> int:
    import torchvision
    warnings.filterwarnings("ignore")
    archs = [f"torchvision:{n}" for n in torchvision.models.list_models(module=torchvision.models)]
    archs += [f"timm:{n}" for n in timm_models()]
    only = sys.argv[1:]
    if only:
        archs = [a for a in archs if any(o in a for o in only)]
    rows, passed = [], 0
    for a in archs:
        r = check_arch(a)
        passed += r.ok
        rows.append(f"| `{r.arch}` | {'pass' if r.ok else 'no'} | {r.units} | {r.gated_share:.0%} | {r.max_rel_diff:.1e} "
                    f"| {r.oracle_macs_ratio:.2f} | {r.note} |")
        print(rows[-1], flush=True)
    if only:                     # a spot check: the table stays as the last full sweep wrote it
        print(f"{passed}/{len(archs)} pass")
        return 0
    out = Path(__file__).resolve().parents[1] / "docs" / "coverage.md"
    out.write_text(
        "# Architecture coverage\n\n"
        "Generated by `python benchmarks/arch_coverage.py`: every torchvision classifier and one model per timm module\n"
        "(random weights; 64 px inputs, 96 px for Inception/GoogLeNet/HRNet, and a model built for one size, as most\n"
        "transformers are, at its reference size). *pass*: the bare state dict is detected as this architecture (where\n"
        "the weights also fit architectures that compute other functions, attach names them and asks for `--arch`: noted),\n"
        "open gates reproduce the source model's output within 1e-5 of its scale, and MACs with open gates equal the dense count.\n"
        "*gated share*: share of dense MACs in gated convs and MLP units (fc1 and fc2). *oracle r=0.9*: MACs with\n"
        "heatmap-mass oracle masks at r=0.9 over dense (random weights, so only a sanity figure). A refusal (under 10%\n"
        "of MACs gateable, or nothing gateable) or an error counts as not passing; under 25%, attach notes that the saving\n"
        "is capped at that share.\n\n"
        f"**{passed} / {len(archs)} pass.**\n\n"
        "| architecture | result | gated layers | gated share | open-gate max rel. diff | oracle r=0.9 | note |\n"
        "|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
    print(f"{passed}/{len(archs)} pass; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
