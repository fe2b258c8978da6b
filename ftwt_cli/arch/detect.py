"""Which architecture a bare state dict belongs to (``detect_arch``), and which one is chosen when several fit.

Detection compares key names and shapes: a committed signature index (sorted-key hash per architecture,
``arch_index.json``, rebuilt per user when the installed timm/torchvision differ) narrows ~1450 candidates to the few
with the same key set, and only those are built, on the meta device, to compare shapes. Among several exact matches
the choice rule (``_choose``) prefers the checkpoint's own hint, then the plain family over its rare variants.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..errors import FtwtError
from .dataconfig import resolve_data_config
from .registry import ArchSpec, build_model, head_and_stem, list_archs, parse_arch

__all__ = ["Detection", "detect_arch", "build_index", "VARIANT_MARKERS"]

_INDEX_FILE = Path(__file__).with_name("arch_index.json")


@dataclass(frozen=True)
class Detection:
    arch: ArchSpec
    num_classes: int
    in_chans: int
    alternatives: Tuple[str, ...] = ()   # other architectures whose keys and shapes match exactly
    # of those, the ones that compute another function on the same weights (a rare variant of the chosen plain family)
    other_functions: Tuple[str, ...] = ()
    # of those, the ones that compute the same function but expect other preprocessing (mean/std, size, crop)
    other_preprocessing: Tuple[str, ...] = ()
    rule: str = ""                       # why ``arch`` was chosen among several candidates ("" when it was the only one)


def _key_hash(keys: Sequence[str]) -> str:
    return hashlib.sha1("\n".join(sorted(keys)).encode()).hexdigest()[:16]


def _versions() -> Dict[str, str]:
    import timm  # deferred: timm takes seconds to import, and torchvision models never need it
    import torchvision  # deferred: torchvision loads only when this runs (start-up)
    return {"timm": timm.__version__, "torchvision": torchvision.__version__.split("+")[0]}


def build_index(progress=None) -> dict:
    """Signature of every architecture: (number of state-dict keys, hash of the sorted key names)."""
    entries = []
    archs = list_archs()
    for i, a in enumerate(archs):
        if progress:
            progress(i, len(archs), str(a))
        try:
            keys = list(build_model(a, meta=True).state_dict().keys())
        except Exception:  # a model this library version cannot build at all: leave it out of detection
            continue
        entries.append([str(a), len(keys), _key_hash(keys)])
    return {"versions": _versions(), "entries": entries}


def _load_index() -> dict:
    """The committed index when it matches the installed libraries, else a per-user cached rebuild."""
    want = _versions()
    candidates = [_INDEX_FILE, Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ftwt" /
                  f"arch_index-timm{want['timm']}-tv{want['torchvision']}.json"]
    for p in candidates:
        if p.is_file():
            idx = json.loads(p.read_text())
            if idx.get("versions") == want:
                return idx
    idx = build_index()
    candidates[1].parent.mkdir(parents=True, exist_ok=True)
    tmp = candidates[1].with_suffix(".tmp")
    tmp.write_text(json.dumps(idx))
    tmp.replace(candidates[1])
    return idx


def _diff(sd: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor], skip: Sequence[str]) -> Tuple[List[str], List[str], List[str]]:
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)
              and not any(k.startswith(s + ".") for s in skip)]
    return missing, unexpected, shapes


def _fit(arch: ArchSpec, sd: Mapping[str, torch.Tensor]) -> Optional[Tuple[int, int]]:
    """(num_classes, in_chans) if ``sd`` is exactly this architecture up to head width and stem channels: the same
    keys, then the same shapes once built with the checkpoint's head width and stem channels (auxiliary heads, as
    in GoogLeNet, are as wide as the head)."""
    m = build_model(arch, meta=True)
    head, stem = head_and_stem(m, arch)
    missing, unexpected, _ = _diff(sd, m.state_dict(), [])
    if missing or unexpected:
        return None
    num_classes = int(sd[f"{head}.weight"].shape[0]) if head and f"{head}.weight" in sd else None
    in_chans = int(sd[f"{stem}.weight"].shape[1]) if stem and f"{stem}.weight" in sd else 3
    m2 = build_model(arch, num_classes=num_classes, in_chans=in_chans, meta=True)
    missing, unexpected, shapes = _diff(sd, m2.state_dict(), [])
    return None if (missing or unexpected or shapes) else (num_classes, in_chans)


# The prefixes and infixes timm adds to a family's plain name for rare re-implementations that take the same weights
# but compute another function: TensorFlow ports ("tf_": 'same' padding, other BN eps), blur-pool ("blur") and
# anti-aliased ("aa") downsampling. Removing them from a variant's name gives its plain family's name.
VARIANT_MARKERS = ("tf_", "_blur", "blur", "_aa", "aa")


def _plain_name(name: str) -> str:
    """``name`` with timm's variant markers removed: tf_efficientnet_b0 → efficientnet_b0, resnetblur18 → resnet18,
    resnetaa50 → resnet50, efficientnet_blur_b0 → efficientnet_b0, mobilenetv4_conv_aa_large → mobilenetv4_conv_large."""
    name = name[3:] if name.startswith("tf_") else name
    for marker in VARIANT_MARKERS[1:]:      # "_blur" before "blur", "_aa" before "aa": no stray underscore left
        name = name.replace(marker, "", 1)
    return name


@lru_cache(maxsize=None)
def _timm_module_of() -> Dict[str, str]:
    """timm model name → the module that registers it (public ``list_modules`` / ``list_models(module=...)``)."""
    import timm  # deferred: timm takes seconds to import, and torchvision models never need it
    return {n: m for m in timm.list_modules() for n in timm.list_models(module=m)}


def _family_rank(arch: ArchSpec) -> int:
    """Among candidates that compute the same function: 0 for torchvision's model (a torchvision key layout is
    taken as torchvision's), 1 for a timm model registered in the module that defines its class (vit_tiny_patch16_224
    in vision_transformer.py, the plain family), 2 for one registered elsewhere (deit_tiny_patch16_224 in deit.py,
    a training recipe on the same class)."""
    if arch.source == "torchvision":
        return 0
    module = _timm_module_of().get(arch.name, "")
    cls_module = type(build_model(arch, meta=True)).__module__
    return 1 if module and cls_module.rsplit(".", 1)[-1] == module else 2


def _choose(matches: list, sd: Mapping[str, torch.Tensor], hint: Optional[str]) -> Tuple[list, Tuple[str, ...], str]:
    """Order the architectures that take these weights (same keys and shapes) and say why the first was chosen.

    A checkpoint that names its architecture (``hint``: a timm train checkpoint's ``arch``) is taken at its word.
    Otherwise the candidates are grouped by the function they compute (their outputs on one seeded random input).
    One group: any will do (torchvision's model first, then timm's plain family). Several: the group holding the
    family's plain name is chosen when every other group holds only its variants (``VARIANT_MARKERS``): a plain
    torchvision ResNet-50 state dict is ResNet-50, not ``resnetblur50``. Anything else is refused: never guess
    between different networks that are equally likely.
    Returns (ordered matches, the candidates computing another function, the rule as a sentence)."""
    if hint:
        named = [m for m in matches if m[0].name == hint.split(":")[-1] and (":" not in hint or str(m[0]) == hint)]
        if named:
            return named + [m for m in matches if m not in named], (), f"the checkpoint names {named[0][0]}"
    torch.manual_seed(0)
    outs = []
    for arch, (nc, ic) in matches:
        model = build_model(arch, nc, ic).eval()
        model.load_state_dict(sd, strict=False)
        outs.append(_probe(model, ic, resolve_data_config(arch, model, ic).input_size, _fixed_size(arch)))
    groups: List[List[int]] = []          # candidates that compute the same function, by their first member
    for i, o in enumerate(outs):
        same = next((g for g in groups if o is not None and outs[g[0]] is not None and o.shape == outs[g[0]].shape and torch.allclose(
            o, outs[g[0]], rtol=1e-4, atol=1e-5 * float(outs[g[0]].abs().max()))), None)
        same.append(i) if same is not None else groups.append([i])
    ranked = [sorted(g, key=lambda i: (_family_rank(matches[i][0]), len(matches[i][0].name))) for g in groups]
    if len(ranked) == 1:
        order = [matches[i] for i in ranked[0]]
        return order, (), "" if len(order) == 1 else "torchvision's model, else timm's plain family, among candidates computing the same function"
    names = {i: matches[i][0].name for g in ranked for i in g}
    plain_groups = []
    for gi, g in enumerate(ranked):
        own = {names[i] for i in g}
        others = [i for gj, h in enumerate(ranked) if gj != gi for i in h]
        if all(_plain_name(names[i]) in own and _plain_name(names[i]) != names[i] for i in others):
            plain_groups.append(gi)
    if len(plain_groups) != 1:
        listed = " | ".join(" = ".join(str(matches[i][0]) for i in g) for g in ranked)
        raise FtwtError(f"the weights fit {len(matches)} architectures that compute {len(ranked)} different functions "
                        f"({listed})", f"pass --arch, e.g. --arch {matches[ranked[0][0]][0]}")
    chosen = ranked[plain_groups[0]]
    rest = [i for gj, h in enumerate(ranked) if gj != plain_groups[0] for i in h]
    order = [matches[i] for i in chosen] + [matches[i] for i in rest]
    return order, tuple(str(matches[i][0]) for i in rest), "the family's plain name; the others are its rare variants"


def _other_preprocessing(chosen, same: list) -> Tuple[str, ...]:
    """Of the candidates computing the chosen one's function, those whose reference preprocessing (input size,
    mean/std, interpolation, crop) differs: choosing one of them changes what the images go through."""
    def config(m):
        arch, (nc, ic) = m
        c = resolve_data_config(arch, build_model(arch, nc, ic, meta=True), ic)
        return (c.input_size, tuple(round(v, 4) for v in c.mean), tuple(round(v, 4) for v in c.std), c.interpolation, c.crop_pct)
    if not same:
        return ()
    mine = config(chosen)
    return tuple(str(m[0]) for m in same if config(m) != mine)


def _probe(model: nn.Module, in_chans: int, size: Sequence[int], fixed: bool) -> Optional[torch.Tensor]:
    """The model's output on one seeded random image: at most 64 px (fast), else at its reference size (models built
    for one size); None if it runs at neither."""
    sizes = [tuple(size[1:])] if fixed else list(dict.fromkeys([tuple(min(s, 64) for s in size[1:]), tuple(size[1:])]))
    for hw in sizes:
        x = torch.randn(1, in_chans, *hw, generator=torch.Generator().manual_seed(0))
        try:
            with torch.no_grad():
                return model(x)
        except Exception:       # e.g. a patch grid fixed at the reference size
            continue
    return None


def _fixed_size(arch: ArchSpec) -> bool:
    """Models that only run at their own input size (patch embeddings with a fixed grid)."""
    return arch.source == "timm" and arch.name.startswith(("vit_", "deit", "swin", "maxvit", "coatnet", "cait", "beit", "eva"))


def detect_arch(sd: Mapping[str, torch.Tensor], hub_config: Optional[Mapping] = None,
                arch_hint: Optional[str] = None) -> Detection:
    """Find the architecture whose keys and shapes match ``sd`` exactly (head width and stem channels free).
    ``arch_hint`` is what the checkpoint itself says (a timm train checkpoint's ``arch``)."""
    if hub_config and hub_config.get("architecture"):
        arch = parse_arch(f"timm:{hub_config['architecture']}") if ":" not in hub_config["architecture"] else parse_arch(hub_config["architecture"])
        fit = _fit(arch, sd)
        if fit is None:
            raise FtwtError(f"config.json names {arch} but the weights do not fit it", "fix config.json or pass --arch")
        return Detection(arch, *fit)
    idx = _load_index()
    h, n = _key_hash(list(sd)), len(sd)
    same_keys = [e[0] for e in idx["entries"] if e[2] == h]
    matches = []
    for name in same_keys:
        arch = parse_arch(name)
        fit = _fit(arch, sd)
        if fit is not None:
            matches.append((arch, fit))
    others, rule = (), ""
    if len(matches) > 1:
        matches, others, rule = _choose(matches, sd, arch_hint)
    if matches:
        arch, (nc, ic) = matches[0]
        alternatives = tuple(str(a) for a, _ in matches[1:])
        return Detection(arch, nc, ic, alternatives, others,
                         _other_preprocessing(matches[0], [m for m in matches[1:] if str(m[0]) not in others]), rule)
    # No exact match: report the nearest candidates by key count and what differs, then ask for --arch.
    near = sorted(idx["entries"], key=lambda e: (e[2] != h, abs(e[1] - n)))[:3]
    described = []
    for name, _, _ in near:
        m = build_model(parse_arch(name), meta=True)
        head, stem = head_and_stem(m, parse_arch(name))
        missing, unexpected, shapes = _diff(sd, m.state_dict(), [s for s in (head, stem) if s])
        what = ", ".join(f"{len(v)} {w}" for v, w in ((missing, "missing"), (unexpected, "unexpected"), (shapes, "other shapes")) if v)
        example = (missing or unexpected or shapes or [""])[0]
        described.append(f"{name} ({what}{', e.g. ' + example if example else ''})")
    raise FtwtError(f"no known architecture matches the checkpoint's {n} tensors exactly; closest: {'; '.join(described)}",
                    "pass --arch timm:NAME or --arch torchvision:NAME")


