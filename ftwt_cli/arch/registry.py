"""The architectures ftwt can build: a registry view over torchvision and timm.

Three jobs, each a small function: ``parse_arch`` (a name → ArchSpec, with close-name suggestions),
``build_model`` (random init, optionally on the meta device, which is cheap), and ``detect_arch``
(which architecture a bare state dict belongs to). Detection compares key names and shapes: a committed
signature index (sorted-key hash per architecture) narrows ~1450 candidates to the few with the same key
set, and only those are built, on the meta device, to compare shapes.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import os
import warnings
from collections import OrderedDict
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..errors import FtwtError
from ..settings import AUGMENTS, INTERPOLATIONS

__all__ = [
    "ArchSpec", "DataConfig", "Detection", "parse_arch", "build_model", "detect_arch", "resolve_data_config",
    "head_and_stem", "load_weights", "list_archs",
]

SOURCES = ("torchvision", "timm")
_INDEX_FILE = Path(__file__).with_name("arch_index.json")


@dataclass(frozen=True)
class ArchSpec:
    source: str  # "torchvision" | "timm"
    name: str

    def __str__(self) -> str:
        return f"{self.source}:{self.name}"


@dataclass(frozen=True)
class DataConfig:
    """What a model expects at its input, as timm's data config spells it."""
    input_size: Tuple[int, int, int]
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    interpolation: str = "bilinear"
    crop_pct: float = 0.875
    crop_mode: str = "center"
    augment: str = "auto"           # training augmentation: auto (by image size) | small (pad-crop + flip) | imagenet | none

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "DataConfig":
        return cls(input_size=tuple(d["input_size"]), mean=tuple(d["mean"]), std=tuple(d["std"]),
                   interpolation=d.get("interpolation", "bilinear"), crop_pct=float(d.get("crop_pct", 0.875)),
                   crop_mode=d.get("crop_mode", "center"), augment=d.get("augment", "auto"))

    def updated(self, values: Mapping, where: str) -> "DataConfig":
        """This config with ``values`` (input_size, mean, std, interpolation, crop_pct, crop_mode, augment) put in,
        checked; ``where`` names their source in errors ("--mean", "the checkpoint")."""
        d = self.to_dict()
        c = self.input_size[0]
        for k, v in values.items():
            if v is None:
                continue
            what = f"--{k.replace('_', '-')}" if where == "the flags" else f"{k} from {where}"
            if k == "input_size":
                v = tuple(int(x) for x in v)
                if len(v) == 2:
                    v = (c, *v)
                if len(v) != 3 or min(v) <= 0 or v[0] != c:
                    raise FtwtError(f"{what} {','.join(map(str, v))} does not fit a model reading {c} channels",
                                    f"pass --input-size {c},{v[-2]},{v[-1]}")
            elif k in ("mean", "std"):
                v = tuple(float(x) for x in (v if isinstance(v, (list, tuple)) else [v]))
                if len(v) == 1:                    # one value for every channel, as timm's train.py expands it
                    v = v * c
                if len(v) != c:
                    if where != "the checkpoint" or len(v) != 3:
                        raise FtwtError(f"{what} has {len(v)} values but the model reads {c} channels",
                                        f"pass {c} values")
                    v = (sum(v) / 3,) * c          # RGB statistics for a model with another channel count
            elif k == "interpolation" and v not in INTERPOLATIONS:
                raise FtwtError(f"{what} '{v}' is unknown", f"use one of {', '.join(INTERPOLATIONS)}")
            elif k == "crop_pct" and not 0 < float(v) <= 1:
                raise FtwtError(f"{what} {v} is outside (0, 1]", "e.g. --crop-pct 0.875 (1 = no crop)")
            elif k == "augment" and v not in AUGMENTS:
                raise FtwtError(f"{what} '{v}' is unknown", f"use one of {', '.join(AUGMENTS)}")
            d[k] = float(v) if k == "crop_pct" else v
        return DataConfig.from_dict(d)


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


# --------------------------------------------------------------------------------------------- registry
@lru_cache(maxsize=None)
def _torchvision_names() -> Tuple[str, ...]:
    import torchvision
    return tuple(torchvision.models.list_models(module=torchvision.models))


@lru_cache(maxsize=None)
def _timm_names() -> Tuple[str, ...]:
    import timm
    return tuple(timm.list_models())


def list_archs() -> List[ArchSpec]:
    return [ArchSpec("torchvision", n) for n in _torchvision_names()] + [ArchSpec("timm", n) for n in _timm_names()]


def parse_arch(text: str) -> ArchSpec:
    """``timm:NAME``, ``torchvision:NAME`` or a bare name (torchvision first, then timm)."""
    source, _, name = text.rpartition(":")
    name = name.strip()
    if source and source not in SOURCES:
        raise FtwtError(f"unknown architecture source '{source}' in --arch {text}",
                        f"use one of {', '.join(s + ':NAME' for s in SOURCES)}")
    # timm names may carry a pretrained tag (resnet34.tv_in1k); the architecture is the part before it.
    name = name.split(".")[0] if source != "torchvision" else name
    # each source's names only as needed: listing timm's imports timm (seconds), which a torchvision name never needs
    names = {"torchvision": _torchvision_names, "timm": _timm_names}
    for src in ([source] if source else SOURCES):
        if name in names[src]():
            return ArchSpec(src, name)
    pools = {"torchvision": _torchvision_names(), "timm": _timm_names()}
    every = [f"{s}:{n}" for s in ([source] if source else SOURCES) for n in pools[s]]
    close = difflib.get_close_matches(text if source else name, every if source else list(set(pools["timm"]) | set(pools["torchvision"])), n=4, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else "list choices with: python -c 'import timm; print(timm.list_models(\"resnet*\"))'"
    raise FtwtError(f"unknown architecture '{text}'", hint)


# --------------------------------------------------------------------------------------------- building
def _replace_stem_in_chans(model: nn.Module, in_chans: int) -> None:
    """torchvision models are fixed at 3 input channels; swap the first conv for one with ``in_chans``."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            if m.in_channels == in_chans:
                return
            new = nn.Conv2d(in_chans, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups,
                            m.bias is not None, m.padding_mode, device=m.weight.device, dtype=m.weight.dtype)
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            setattr(parent, name.rpartition(".")[2], new)
            return


def build_model(arch: ArchSpec, num_classes: Optional[int] = None, in_chans: int = 3, *, meta: bool = False) -> nn.Module:
    """Random-init model. ``meta=True`` builds without allocating weights (falls back to CPU for the few
    builders, like torchvision's RegNets, that compute with tensors while constructing)."""
    def _build() -> nn.Module:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if arch.source == "timm":
                import timm
                kw = {} if num_classes is None else {"num_classes": num_classes}
                return timm.create_model(arch.name, pretrained=False, in_chans=in_chans, **kw)
            import torchvision
            kw = {} if num_classes is None else {"num_classes": num_classes}
            if arch.name in ("googlenet", "inception_v3"):
                kw["init_weights"] = False   # the scipy-based init is slow and irrelevant: weights get loaded
            m = torchvision.models.get_model(arch.name, weights=None, **kw)
            if in_chans != 3:
                _replace_stem_in_chans(m, in_chans)
            return m

    if meta:
        try:
            with torch.device("meta"):
                return _build()
        except (NotImplementedError, RuntimeError):
            pass
    try:
        return _build()
    except (TypeError, ValueError, RuntimeError, AssertionError) as e:
        raise FtwtError(f"cannot build {arch} with num_classes={num_classes}, in_chans={in_chans} ({e})",
                        "check --num-classes / --in-chans") from None


def head_and_stem(model: nn.Module, arch: ArchSpec) -> Tuple[Optional[str], Optional[str]]:
    """Module paths of the classifier head and the stem conv (from timm's cfg when it has one)."""
    head = stem = None
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if arch.source == "timm":
        c = cfg.get("classifier")
        head = (c[0] if c else None) if isinstance(c, (tuple, list)) else c      # timm may state an empty list
        stem = cfg.get("first_conv")
        stem = (stem[0] if stem else None) if isinstance(stem, (tuple, list)) else stem
    names = dict(model.named_modules())
    if head not in names:
        lin = [n for n, m in names.items() if isinstance(m, nn.Linear)]
        convs = [n for n, m in names.items() if isinstance(m, nn.Conv2d)]
        head = lin[-1] if lin else (convs[-1] if convs else None)
    if stem not in names:
        stem = next((n for n, m in names.items() if isinstance(m, nn.Conv2d)), None)
    return head, stem


def load_weights(model: nn.Module, sd: Mapping[str, torch.Tensor], arch: ArchSpec) -> None:
    """Strict load with a one-line summary of what does not fit."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if shapes:
            parts.append(f"{len(shapes)} with other shapes (e.g. {shapes[0]})")
        raise FtwtError(f"the checkpoint does not fit {arch}: {'; '.join(parts)} keys",
                        "pass the right --arch / --num-classes / --in-chans, or omit --arch to detect it")
    for k, v in own.items():
        if v.is_floating_point() and not sd[k].is_floating_point():
            raise FtwtError(f"the checkpoint's {k} holds {sd[k].dtype} values where {arch} has floating-point weights",
                            "save the model's own state_dict() (its weights are floats)")
    sd = OrderedDict(sd)
    # Some modules read the version their weights were saved with (torchvision's MNASNet); a state dict that lost it
    # (rebuilt, or from safetensors) gets the current one, which is what build_model constructed.
    sd._metadata = getattr(sd, "_metadata", None) or getattr(own, "_metadata", None)
    model.load_state_dict(sd, strict=True)


# --------------------------------------------------------------------------------------------- detection
def _key_hash(keys: Sequence[str]) -> str:
    return hashlib.sha1("\n".join(sorted(keys)).encode()).hexdigest()[:16]


def _versions() -> Dict[str, str]:
    import timm
    import torchvision
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
    import timm
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


# --------------------------------------------------------------------------------------------- data config
def resolve_data_config(arch: ArchSpec, model: nn.Module, in_chans: int = 3) -> DataConfig:
    """Input size, mean/std, interpolation and crop the architecture's reference weights were trained with."""
    if arch.source == "timm":
        from timm.data import resolve_model_data_config
        c = resolve_model_data_config(model)
        size, mean, std = tuple(c["input_size"]), tuple(c["mean"]), tuple(c["std"])
        interp, crop_pct, crop_mode = c.get("interpolation", "bilinear"), c.get("crop_pct", 0.875), c.get("crop_mode", "center")
    else:
        from torchvision.models import get_model_weights
        size, mean, std = (3, 224, 224), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
        interp, crop_pct, crop_mode = "bilinear", 0.875, "center"
        try:
            t = get_model_weights(arch.name).DEFAULT.transforms()
            crop, resize = t.crop_size[0], t.resize_size[0]
            size, mean, std = (3, crop, crop), tuple(t.mean), tuple(t.std)
            interp, crop_pct = t.interpolation.value, round(crop / resize, 4)
        except (ValueError, AttributeError, KeyError):
            pass
    if len(mean) != in_chans:   # e.g. a 1-channel stem: average the RGB statistics
        mean, std = (sum(mean) / len(mean),) * in_chans, (sum(std) / len(std),) * in_chans
    return DataConfig((in_chans, size[1], size[2]), mean, std, interp, float(crop_pct), crop_mode)
