"""compare, --verify and the report schema."""
import json

import numpy as np
import pytest

from conftest import FIXTURES, ROOT
from digits import load_split
from tfrewrite import cli, verify

VGG = FIXTURES / "vgg_digits.tflite"


def _schema():
    return json.loads((ROOT / "schemas" / "report.schema.json").read_text())


def _validate(report):
    import jsonschema
    jsonschema.validate(report, _schema())


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    x, y = load_split("test", 32)
    path = tmp_path_factory.mktemp("data") / "test32.npz"
    np.savez(path, image=x[:60], labels=y[:60])
    return path


def test_compare_a_model_with_itself_is_exact():
    r = verify.compare(VGG, VGG, samples=3, runs=3)
    (o,) = r["outputs"]
    assert o["rel_l2"] == 0 and o["max_abs"] == 0 and o["cosine"] == pytest.approx(1.0)
    assert o["top1_agree"] == 1.0 and o["top5_agree"] == 1.0
    assert r["a"]["file_bytes"] == VGG.stat().st_size and r["a"]["params"] > 800_000
    assert r["a"]["latency_ms"] > 0 and r["speedup"] > 0


def test_compare_cli_json_with_labels(tmp, capsys, labelled):
    small = tmp / "small.tflite"
    assert cli.main([str(VGG), str(small), "--rank", "32", "--quiet"]) == 0
    capsys.readouterr()
    assert cli.main(["compare", str(VGG), str(small), "--data", str(labelled), "--runs", "5", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert set(r) >= {"a", "b", "speedup", "outputs", "accuracy"}
    for key in ("a", "b"):
        assert set(r[key]) == {"file_bytes", "params", "macs", "latency_ms"}
    assert r["b"]["params"] < r["a"]["params"] and r["b"]["macs"] < r["a"]["macs"]
    assert set(r["outputs"][0]) == {"name", "rel_l2", "max_abs", "cosine", "top1_agree", "top5_agree"}
    assert r["accuracy"]["a"]["top1"] >= 0.95
    assert r["samples"] == 60
    _validate({"input": "a", "output": "b", "options": {}, "layers": [], "notes": [],
               "totals": {k: 0 for k in ("file_bytes_before", "file_bytes_after", "params_before", "params_after",
                                         "macs_before", "macs_after", "weight_bytes_before", "weight_bytes_after")},
               "verify": r})
    # The table form prints the same facts.
    assert cli.main(["compare", str(VGG), str(small), "--samples", "2", "--runs", "3", "--no-xnnpack"]) == 0
    text = capsys.readouterr().out
    assert "speed-up" in text and "top-5 agree" in text


def test_verify_passes_writes_output_and_report(tmp, capsys, labelled):
    out, rep = tmp / "o.tflite", tmp / "r.json"
    code = cli.main([str(VGG), str(out), "--rank", "32", "--verify", "--data", str(labelled),
                     "--min-top5-agree", "0.9", "--max-error", "0.9", "--report", str(rep), "--runs", "3"])
    assert code == 0 and out.exists()
    report = json.loads(rep.read_text())
    _validate(report)
    assert report["verify"]["passed"] and "accuracy" in report["verify"]
    assert [p.name for p in tmp.iterdir()] == sorted(["o.tflite", "r.json"]) or set(p.name for p in tmp.iterdir()) == {"o.tflite", "r.json"}


def test_verify_failure_exits_3_and_leaves_no_output(tmp, capsys):
    out, rep = tmp / "o.tflite", tmp / "r.json"
    code = cli.main([str(VGG), str(out), "--rank", "8", "--verify", "--max-error", "0.01", "--report", str(rep),
                     "--runs", "2", "--samples", "2"])
    err = capsys.readouterr().err
    assert code == 3
    assert "exceeds --max-error" in err and "no output written" in err
    assert not out.exists()
    assert {p.name for p in tmp.iterdir()} == {"r.json"}, "no temp file may stay behind"
    report = json.loads(rep.read_text())
    _validate(report)
    assert report["verify"]["passed"] is False and report["verify"]["failures"]


def test_verify_top5_bound(tmp, capsys, labelled):
    out = tmp / "o.tflite"
    code = cli.main([str(VGG), str(out), "--rank", "2", "--force", "--verify", "--data", str(labelled),
                     "--min-top5-agree", "1.0", "--runs", "2"])
    assert code == 3 and not out.exists()
    assert "top-5 agreement" in capsys.readouterr().err


def test_reports_of_every_kind_validate(tmp, capsys):
    for args in (["--rank", "16"], ["--conv-rank", "8", "--conv-method", "tucker2", "--skip", "fc1"], []):
        rep = tmp / "r.json"
        assert cli.main([str(VGG), str(tmp / "o.tflite"), *args, "--report", str(rep), "--quiet"]) == 0
        _validate(json.loads(rep.read_text()))


def test_signatures(capsys):
    model = FIXTURES / "two_signatures.tflite"
    for key in ("encode", "decode"):
        r = verify.compare(model, model, signature=key, samples=2, runs=2)
        assert r["outputs"] and all(o["rel_l2"] == 0 for o in r["outputs"])
    code = cli.main(["compare", str(model), str(model), "--signature", "nope", "--runs", "1"])
    assert code == 2 and "no signature" in capsys.readouterr().err


BAD_DATA = {
    "wrong name": lambda x, y: {"pixels": x},
    "wrong shape": lambda x, y: {"image": x[:, :16]},
    "wrong dtype": lambda x, y: {"image": (x * 255).astype(np.int32)},
    "empty": lambda x, y: {"image": x[:0]},
    "nan": lambda x, y: {"image": np.where(x > 0.5, np.nan, x)},
    "bad labels": lambda x, y: {"image": x, "labels": y[:3]},
}


@pytest.mark.parametrize("what", sorted(BAD_DATA))
def test_bad_data_files_get_one_error_line(tmp, capsys, what):
    x, y = load_split("test", 32)
    path = tmp / "d.npz"
    np.savez(path, **BAD_DATA[what](x[:5], y[:5]))
    code = cli.main(["compare", str(VGG), str(VGG), "--data", str(path), "--runs", "1"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("tfrewrite: error:") and err.count("\n") == 1, err
    out = tmp / "o.tflite"
    code = cli.main([str(VGG), str(out), "--rank", "16", "--verify", "--data", str(path)])
    assert code == 2 and not out.exists()
    (tmp / "junk.npz").write_bytes(b"not a zip")
    code = cli.main(["compare", str(VGG), str(VGG), "--data", str(tmp / "junk.npz")])
    assert code == 2
