"""Never a larger file after a "successful" rewrite (issue 10, fault 6): per layer, the bytes of the new tensors,
buffers and ops against the bytes freed; and a final guard in the main job."""
import numpy as np
import pytest

import builders as B
from conftest import FIXTURES, RUNNABLE
from tfrewrite import cli, io, rewrite


@pytest.mark.parametrize("name", RUNNABLE)
def test_size_estimate_is_close_to_the_written_file(name):
    m = io.read(FIXTURES / name)
    assert abs(io.estimated_size(m) - len(io.to_bytes(m))) <= 0.005 * len(io.to_bytes(m)) + 400


def test_estimate_follows_an_edit_as_the_file_does():
    rng = np.random.default_rng(0)
    m = io.read_buffer(B.fc_model(rng.standard_normal((40, 48)), None, (1, 48)))
    before, file_before = io.estimated_size(m), len(io.to_bytes(m))
    rewrite.rewrite_model(m, rewrite.Options(fc_rank=6))
    after, file_after = io.estimated_size(m), len(io.to_bytes(m))
    assert abs((after - before) - (file_after - file_before)) <= 64


@pytest.mark.parametrize("form", ["float32", "float16", "int8"])
def test_tiny_fc_low_rank_is_left_as_it_is_when_it_does_not_pay(form):
    rng = np.random.default_rng(1)
    model = B.fc_model(rng.standard_normal((8, 6)), rng.standard_normal(8), (1, 6), form=form)
    m = io.read_buffer(model)
    (e,) = rewrite.rewrite_model(m, rewrite.Options(fc_rank=2))
    assert e["action"] == "skipped" and e["reason"].startswith("does not pay")
    assert e["params_after"] == e["params_before"] and "factors" not in e
    assert len(io.to_bytes(m)) <= len(model) and m.problems() == []
    m = io.read_buffer(model)
    (e,) = rewrite.rewrite_model(m, rewrite.Options(fc_rank=2, force=True))  # --force: as asked
    assert e["action"] == "rewritten" and len(io.to_bytes(m)) > len(model)


def test_float16_of_a_tiny_layer_does_not_pay_a_larger_one_does():
    rng = np.random.default_rng(2)
    for shape, action in (((4, 4), "skipped"), ((64, 64), "quantized")):
        model = B.fc_model(rng.standard_normal(shape), None, (1, shape[1]))
        m = io.read_buffer(model)
        (e,) = rewrite.rewrite_model(m, rewrite.Options(quantize="float16"))
        assert e["action"] == action
        assert len(io.to_bytes(m)) <= len(model)
        if action == "skipped":
            assert e["reason"].startswith("does not pay")


def test_a_rewrite_that_still_makes_the_file_larger_writes_the_input_unchanged(tmp, capsys):
    src = FIXTURES / "two_signatures.tflite"  # its re-serialization alone is 8 bytes larger
    out = tmp / "o.tflite"
    assert cli.main([str(src), str(out), "--prune", "0.5", "--report", str(tmp / "r.json")]) == 0
    assert out.read_bytes() == src.read_bytes()
    import json
    report = json.loads((tmp / "r.json").read_text())
    assert any("larger" in n and "unchanged" in n for n in report["notes"])
    assert report["totals"]["file_bytes_after"] == report["totals"]["file_bytes_before"]
    assert all(e["action"] == "skipped" for e in report["layers"])
    assert "written unchanged" in capsys.readouterr().out
    # --force asks for the rewrite whatever it costs.
    assert cli.main([str(src), str(out), "--rank", "2", "--force"]) == 0
    assert out.stat().st_size > src.stat().st_size
