import cv2
import numpy as np
from typer.testing import CliRunner

from cbmir.cli import app
from tests.conftest import shared_path

runner = CliRunner()


def test_synthetic_then_preprocess_writes_layered_pngs(tmp_path):
    archive = tmp_path / "archive"
    result = runner.invoke(app, ["synthetic", str(archive), "--per-kind", "2"])
    assert result.exit_code == 0, result.output
    assert "not medical images" in (archive / "SYNTHETIC.txt").read_text().lower()
    out = tmp_path / "out"
    result = runner.invoke(app, ["preprocess", str(archive / "images"), str(out), "--size", "64"])
    assert result.exit_code == 0, result.output
    written = sorted(out.glob("*.png"))
    assert len(written) == 6
    colour = cv2.imread(str(written[0]), cv2.IMREAD_UNCHANGED)
    assert colour is not None and colour.shape == (64, 64, 3)
    assert not np.array_equal(colour[..., 2], colour[..., 1])  # red (original) differs from green (CLAHE)
    assert '"size": 64' in (out / "preprocessing.json").read_text()


def test_preprocess_reports_unreadable_files_and_continues(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    cv2.imwrite(str(folder / "good.png"), np.full((20, 30), 100, np.uint8))
    (folder / "notes.png").write_text("not an image")
    result = runner.invoke(app, ["preprocess", str(folder), str(tmp_path / "out"), "--size", "32"])
    assert result.exit_code == 1
    assert "1 written" in result.output and "1 failed" in result.output
    assert "notes.png" in result.output
    assert (tmp_path / "out" / "good.png").exists()


def test_bad_preset_is_one_line_error(tmp_path):
    result = runner.invoke(app, ["preprocess", str(tmp_path), str(tmp_path / "out"), "--preset", "fancy"])
    assert result.exit_code == 2
    assert "unknown preset 'fancy'" in result.output
    assert "Traceback" not in result.output


def test_irma_decode_prints_each_axis_in_words():
    tables = shared_path("irma-code-tables")
    result = runner.invoke(app, ["irma", "decode", "1121127700500", "--tables", str(tables)])
    assert result.exit_code == 0, result.output
    assert "1121-127-700-500" in result.output
    assert "x-ray, plain radiography, analog, overview image" in result.output
    assert "coronal, anteroposterior, supine" in result.output
    assert "uropoietic system" in result.output


def test_irma_decode_errors_name_the_problem(tmp_path, monkeypatch):
    monkeypatch.delenv("CBMIR_IRMA_TABLES", raising=False)
    result = runner.invoke(app, ["irma", "decode", "1121-127-700"])
    assert result.exit_code == 2 and "1121-127-700" in result.output
    result = runner.invoke(app, ["irma", "decode", "1121-127-700-500", "--tables", str(tmp_path)])
    assert result.exit_code == 2 and "A.csv" in result.output and "Traceback" not in result.output


def test_dataset_reports_records_and_problems(tmp_path):
    runner.invoke(app, ["synthetic", str(tmp_path), "--per-kind", "2"])
    result = runner.invoke(app, ["dataset", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "6 records" in result.output and "3 classes" in result.output
    with (tmp_path / "codes.csv").open("a") as codes:
        codes.write("ghost;1121-127-700-500\nbad;1121-127\n")
    result = runner.invoke(app, ["dataset", str(tmp_path)])
    assert result.exit_code == 1
    assert "missing-file" in result.output and "invalid-code" in result.output and "ghost" in result.output
