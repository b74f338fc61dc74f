"""The ONNX graph of a checkpoint and the runtimes of the embedder: the graph gives torch's answers within the
recorded tolerances, a graph that is missing, stale, damaged or foreign is refused by name (never used), and
concurrent callers share model runs without one bad request failing the others."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import cbmir.export
from cbmir.checkpoint import WEIGHTS_FILE, load_checkpoint
from cbmir.cli import app
from cbmir.embed import Embedder, RuntimeUnavailableError
from cbmir.export import EMBEDDING_TOLERANCE, LOGIT_TOLERANCE, export_graph
from cbmir.files import file_digest
from cbmir.graph import GraphError
from cbmir.search import Retrieval
from cbmir.synthetic import phantom
from tests.conftest import small_checkpoint
from tests.test_search import prepared

CODES = ["1121-110-411-700", "1123-127-500-000", "1121-120-200-700"]


def phantoms(count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [phantom(("chest", "hand", "skull")[i % 3], rng, longest_side=96) for i in range(count)]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """A small IRMA-axes checkpoint with its graph, exported once for the module (copy it to change it)."""
    folder = small_checkpoint(tmp_path_factory.mktemp("exported") / "model", CODES)
    checkpoint = load_checkpoint(folder)
    samples = np.stack([checkpoint.pipeline(image) for image in phantoms(6)])
    export_graph(checkpoint, samples, described="phantoms")
    return folder


@pytest.fixture
def copy(exported, tmp_path) -> Path:
    return Path(shutil.copytree(exported, tmp_path / "model"))


def test_the_graph_gives_torchs_answers_within_the_recorded_tolerance(exported):
    card = json.loads((exported / "card.json").read_text())["onnx"]
    assert card["max_abs_difference"]["embedding"] <= EMBEDDING_TOLERANCE
    assert card["max_abs_difference"]["logits"] <= LOGIT_TOLERANCE
    assert card["checked_on"] == "6 phantoms" and card["versions"]["onnxruntime"]
    onnx, torch_ = Embedder.load(exported, runtime="onnx"), Embedder.load(exported, runtime="torch")
    assert onnx.runtime == "onnx" and torch_.runtime == "torch"
    assert Embedder.load(exported).runtime == "onnx"  # auto takes a current graph
    images = phantoms(11, seed=1)  # not the images the export was checked on; 11 > batch of 8 and odd
    ours, theirs = onnx.embed(images), torch_.embed(images)
    np.testing.assert_allclose(ours.vectors, theirs.vectors, atol=EMBEDDING_TOLERANCE)
    for head in theirs.probabilities:
        np.testing.assert_allclose(ours.probabilities[head], theirs.probabilities[head], atol=1e-4)
    assert [p.label for p in ours.predictions] == [p.label for p in theirs.predictions]
    assert onnx.stamp == torch_.stamp


def test_a_process_running_the_graph_never_loads_torch(exported):
    """The ONNX runtime reads the card and the graph only: a Ray actor or a CLI search does not spend seconds
    importing torch (a fresh interpreter, since this one has torch loaded)."""
    program = (
        "import sys; import numpy as np; from cbmir.embed import Embedder, set_threads; set_threads(1); "
        f"embedder = Embedder.load({str(exported)!r}, runtime='auto'); "
        "size = embedder.pipeline.size; "
        "vectors = embedder.embed_inputs(np.zeros((3, size, size, 3), np.uint8)).vectors; "
        "print(embedder.runtime, vectors.shape, 'torch' in sys.modules)"
    )
    answer = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=True)
    assert answer.stdout.split("\n")[0] == f"onnx (3, {load_checkpoint(exported).embedding_dim}) False"


def test_an_index_built_in_torch_answers_the_same_in_onnx(exported, tmp_path):
    torch_, onnx = Embedder.load(exported, runtime="torch"), Embedder.load(exported, runtime="onnx")
    images = phantoms(9, seed=2)
    with Retrieval.open(tmp_path / "db", torch_) as retrieval:
        retrieval.store(prepared(torch_, images))
        expected = [hit.id for hit in retrieval.search_image(images[3], 5).hits]
    with Retrieval.open(tmp_path / "db", onnx) as retrieval:
        assert [hit.id for hit in retrieval.search_image(images[3], 5).hits] == expected


def test_without_a_graph_auto_is_torch_and_onnx_is_refused_saying_what_to_run(tmp_path):
    folder = small_checkpoint(tmp_path / "model", CODES)
    assert Embedder.load(folder).runtime == "torch"
    with pytest.raises(GraphError, match=f"{folder} has no ONNX graph: run `cbmir export {folder}`"):
        Embedder.load(folder, runtime="onnx")


def test_a_graph_of_other_weights_is_refused_as_stale(copy):
    state = torch.load(copy / WEIGHTS_FILE, weights_only=True)
    torch.save(
        {key: value + 0.01 if value.is_floating_point() else value for key, value in state.items()}, copy / WEIGHTS_FILE
    )
    for runtime in ("auto", "onnx"):
        with pytest.raises(
            GraphError, match=r"model.onnx was exported from other weights .*\(stale\): run `cbmir export"
        ):
            Embedder.load(copy, runtime=runtime)
    assert Embedder.load(copy, runtime="torch").runtime == "torch"


@pytest.mark.parametrize("content", [b"not an onnx graph", b""])
def test_a_replaced_or_damaged_graph_is_refused(copy, content):
    (copy / "model.onnx").write_bytes(content)
    with pytest.raises(GraphError, match="model.onnx is not the graph its card records"):
        Embedder.load(copy)


def test_a_missing_graph_file_is_refused(copy):
    (copy / "model.onnx").unlink()
    with pytest.raises(GraphError, match="model.onnx is missing"):
        Embedder.load(copy)


def test_a_graph_that_ort_cannot_load_is_named(copy):
    """A foreign file recorded as the graph (its hash in the card) still fails by name when ONNX Runtime reads it."""
    graph = copy / "model.onnx"
    graph.write_bytes(b"\x08\x07garbage")
    card = json.loads((copy / "card.json").read_text())
    card["onnx"]["sha256"] = file_digest(graph)[1]
    (copy / "card.json").write_text(json.dumps(card))
    with pytest.raises(GraphError, match=f"{graph}: ONNX Runtime cannot load it"):
        Embedder.load(copy)


def test_a_missing_onnx_runtime_is_a_clear_error(exported, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what `import onnxruntime` meets when not installed
    with pytest.raises(RuntimeUnavailableError, match="ONNX Runtime is not installed: `pip install onnxruntime`"):
        Embedder.load(exported, runtime="onnx")


def test_an_export_beyond_the_tolerance_writes_nothing(tmp_path, monkeypatch):
    folder = small_checkpoint(tmp_path / "model", CODES)
    checkpoint = load_checkpoint(folder)
    card_before = (folder / "card.json").read_text()
    monkeypatch.setattr(cbmir.export, "EMBEDDING_TOLERANCE", -1.0)
    samples = np.stack([checkpoint.pipeline(image) for image in phantoms(2)])
    with pytest.raises(GraphError, match="differs from torch by .* beyond the tolerances"):
        export_graph(checkpoint, samples, described="phantoms")
    assert not (folder / "model.onnx").exists() and (folder / "card.json").read_text() == card_before


def test_an_export_that_meets_cpythons_ast_race_is_tried_again(tmp_path, monkeypatch):
    folder = small_checkpoint(tmp_path / "model", CODES)
    checkpoint = load_checkpoint(folder)
    real_export, calls = torch.onnx.export, []

    def racing_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:  # what another thread's concurrent ast.parse causes on CPython 3.11
            raise SystemError("AST constructor recursion depth mismatch (before=102, after=37)")
        return real_export(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", racing_once)
    samples = np.stack([checkpoint.pipeline(image) for image in phantoms(2)])
    export_graph(checkpoint, samples, described="phantoms")
    assert len(calls) == 2 and (folder / "model.onnx").is_file()


@pytest.mark.parametrize("runtime", ["torch", "onnx"])
def test_concurrent_callers_share_model_runs_and_get_their_own_answers(exported, runtime):
    embedder = Embedder.load(exported, runtime=runtime, batch_size=16, batch_wait_ms=300)
    images = phantoms(8, seed=3)
    alone = Embedder.load(exported, runtime=runtime).embed(images)
    answers: dict[int, np.ndarray] = {}
    start = threading.Barrier(len(images))

    def search(number: int) -> None:
        start.wait()
        answers[number] = embedder.embed([images[number]]).vectors[0]

    threads = [threading.Thread(target=search, args=(number,)) for number in range(len(images))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert embedder.model_runs < len(images)  # joined into fewer model runs
    np.testing.assert_allclose(np.stack([answers[n] for n in range(len(images))]), alone.vectors, atol=1e-5)


def test_a_failing_request_does_not_fail_the_others_in_its_batch(exported):
    embedder = Embedder.load(exported, batch_size=16, batch_wait_ms=300)
    good = [embedder.prepare(image) for image in phantoms(3, seed=4)]
    bad = np.zeros((32, 32, 3), np.uint8)  # not this model's input size
    results: dict[str, np.ndarray | Exception] = {}
    start = threading.Barrier(4)

    def run(name: str, inputs: list[np.ndarray]) -> None:
        start.wait()
        try:
            results[name] = embedder.embed_inputs(inputs).vectors
        except Exception as error:
            results[name] = error

    jobs = {"bad": [bad], **{f"good{n}": [image] for n, image in enumerate(good)}}
    threads = [threading.Thread(target=run, args=item) for item in jobs.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert isinstance(results["bad"], Exception)
    expected = Embedder.load(exported).embed_inputs(good).vectors
    for n in range(3):
        answer = results[f"good{n}"]
        assert isinstance(answer, np.ndarray)
        np.testing.assert_allclose(answer, expected[n : n + 1], atol=1e-5)


def test_cli_export_then_search_in_either_runtime(tmp_path):
    runner = CliRunner()
    folder = small_checkpoint(tmp_path / "model", CODES)
    archive = tmp_path / "archive"
    assert runner.invoke(app, ["synthetic", str(archive), "--per-kind", "2"]).exit_code == 0
    result = runner.invoke(
        app, ["index", str(archive), "--model", str(folder), "--db", str(tmp_path / "db"), "--runtime", "onnx"]
    )
    assert result.exit_code == 2 and "has no ONNX graph: run `cbmir export" in result.output
    assert not (tmp_path / "db").exists()  # refused before anything was read or written
    result = runner.invoke(app, ["export", str(folder), "--images", str(archive), "--count", "4"])
    assert result.exit_code == 0, result.output
    assert "on 4 images of archive, ONNX Runtime differs from torch by" in result.output
    result = runner.invoke(app, ["index", str(archive), "--model", str(folder), "--db", str(tmp_path / "db")])
    assert result.exit_code == 0, result.output
    assert "model runtime: ONNX Runtime" in result.output
    answers = []
    for runtime in ("onnx", "torch"):
        query = archive / "images" / "synthetic-hand-0001.png"
        result = runner.invoke(
            app,
            [
                "search",
                str(query),
                "--db",
                str(tmp_path / "db"),
                "--model",
                str(folder),
                "--runtime",
                runtime,
                "-k",
                "3",
            ],
        )
        assert result.exit_code == 0, result.output
        answers.append([line.split("id ")[1].split()[0] for line in result.output.splitlines() if "score" in line])
    assert answers[0] == answers[1] and answers[0][0] == "2"
