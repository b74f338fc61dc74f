"""`cbmir quickstart` end to end on a tiny synthetic archive: the real default model trained, an index built,
the service answering with the printed token; a second run reuses everything; another archive is refused."""

import json
import os
import stat

import pytest
from typer.testing import CliRunner

from cbmir.cli import app
from cbmir.quickstart import prepare
from cbmir.synthetic import write_synthetic_archive
from tests.service.conftest import start


@pytest.mark.slow
def test_quickstart_trains_indexes_serves_and_reuses(tmp_path):
    archive = write_synthetic_archive(tmp_path / "archive", per_kind=5, longest_side=96)
    work = tmp_path / "work"
    messages: list[str] = []
    settings = prepare(work, archive, None, say=messages.append)
    assert any(message.startswith("training the default CPU model") for message in messages)
    assert stat.S_IMODE(os.stat(work / "token").st_mode) == 0o600
    token = settings.token
    assert token is not None
    shown = [message for message in messages if token in message]  # issue 12, defect 12
    assert len(shown) == 1 and shown[0].startswith("the service's token (shown this once")
    for running in start(settings, archive):
        with running.client(settings.token) as client:
            stats = client.get("/v1/stats").json()
            assert stats["images"] == 15 and stats["task"] == "irma-axes"
            assert stats["runtime"].startswith("ONNX Runtime")  # training wrote the graph; auto takes it
            assert (
                client.get("/v1/stats", headers={"Authorization": "Bearer wrong-token-0123456789"}).status_code == 401
            )

    card_path = work / "model" / "card.json"
    card = json.loads(card_path.read_text())
    card.pop("onnx")  # as a model trained before models had their graph
    card_path.write_text(json.dumps(card))
    again: list[str] = []
    assert prepare(work, archive, None, say=again.append).token == settings.token
    assert f"reusing the trained model in {work / 'model'}" in again
    assert not any(token in message for message in again)
    assert "exporting it to ONNX for ONNX Runtime (once)" in again
    assert json.loads(card_path.read_text())["onnx"]["checked_on"] == "15 images of archive"
    assert any(message.startswith("indexed 0, skipped 15") for message in again)

    missing = CliRunner().invoke(
        app, ["quickstart", "--data", str(tmp_path / "nowhere"), "--work", str(tmp_path / "fresh-work"), "--no-serve"]
    )
    assert missing.exit_code == 2 and "nowhere" in missing.output
    assert not (tmp_path / "fresh-work" / "quickstart.json").exists()  # a bad archive claims no folder

    other = write_synthetic_archive(tmp_path / "other", per_kind=2)
    result = CliRunner().invoke(app, ["quickstart", "--data", str(other), "--work", str(work), "--no-serve"])
    assert result.exit_code == 2 and "was made for the archive" in result.output
