"""The run's metadata: typed, versioned, strict about what it reads, and compatible with runs written before."""
import json

import pytest

from ftwt_cli.errors import FtwtError
from ftwt_cli.formats import RunMeta, read_meta


def test_round_trip_and_types(r18_run):
    meta = read_meta(r18_run)
    assert meta.arch.name == "resnet18" and meta.gating.mode == "open" and len(meta.gating.gated) == 17
    assert tuple(meta.data_config.input_size) == (3, 32, 32) and meta.plan.units[0].name == meta.gating.gated[0]
    d = json.loads(json.dumps(meta.to_dict()))                  # JSON-ready
    assert d == json.loads((r18_run / "ftwt.json").read_text())   # what is on disk is exactly this
    assert json.loads(json.dumps(RunMeta.from_dict(d).to_dict())) == d


def test_reads_the_previous_release_format(r18_run):
    """ftwt 0.1.0 wrote the same keys, with training records and last_eval after an epoch."""
    d = json.loads((r18_run / "ftwt.json").read_text())
    d["ftwt_version"] = "0.1.0"
    d["training"] = {"fit-gates": {"config": {"r": 0.9}, "data": "digits", "data_source": "scikit-learn digits", "epochs": []}}
    d["last_eval"] = {"phase": "fit-gates", "epoch": 1, "top1": 0.5, "top5": 0.9, "macs": 1.0, "dense_macs": 2.0,
                      "reduction": 0.5, "data": "digits", "split": "val", "samples": 10}
    m = RunMeta.from_dict(d)
    assert m.training["fit-gates"].config["r"] == 0.9 and m.last_eval.reduction == 0.5


@pytest.mark.parametrize("edit,expect", [
    (lambda d: d.update(colour="red"), "unknown key 'colour'"),
    (lambda d: d["gating"].update(threshold=3), "unknown key 'threshold' in .*gating"),
    (lambda d: d.pop("arch"), "arch is not a mapping"),
    (lambda d: d["arch"].pop("name"), "arch is incomplete"),
    (lambda d: d.update(format_version=99), "format version 99"),
])
def test_unknown_missing_and_newer_are_refused(r18_run, edit, expect):
    d = json.loads((r18_run / "ftwt.json").read_text())
    edit(d)
    with pytest.raises(FtwtError, match=expect):
        RunMeta.from_dict(d)
