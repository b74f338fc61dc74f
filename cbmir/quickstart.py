"""From an archive (or nothing) to a running engine in one call: split, train the default CPU model, evaluate,
index the archive, and settings for the service with a token.

Everything lands in one working folder, and a second run reuses what the first one finished: a trained
model is loaded instead of retrained (an interrupted training resumes after its last epoch), and the
indexer skips images already indexed. `quickstart.json` in the folder records which archive it was made
for, so another archive is refused instead of mixed in.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path

from cbmir.checkpoint import CARD_FILE, Checkpoint, load_checkpoint
from cbmir.datasets import open_dataset
from cbmir.embed import Embedder
from cbmir.errors import CbmirError
from cbmir.export import export_graph, sample_inputs
from cbmir.graph import GraphError
from cbmir.irma import CodeTables
from cbmir.search import Retrieval
from cbmir.service import ServiceSettings
from cbmir.settings import load_settings
from cbmir.synthetic import write_synthetic_archive
from cbmir.train import STATE_FILE as TRAINING_STATE
from cbmir.train import make_config, train
from indexer.pipeline import index_records, read_archive

STATE_FILE, TOKEN_FILE = "quickstart.json", "token"
SYNTHETIC_PER_KIND = 40


class QuickstartError(CbmirError):
    """A working folder that belongs to another archive, or an archive that cannot be used."""


def prepare(
    work: Path,
    data: Path | None,
    tables_folder: Path | None,
    *,
    say: Callable[[str], None] = print,
    mode: str = "finetune",
    host: str = "127.0.0.1",
    port: int = 8000,
) -> ServiceSettings:
    """Do (or reuse) every step up to serving; returns the service settings, with the token. The IRMA code
    tables, when given, let training choose where predictions stop with '*' and the service show words."""
    tables = CodeTables.load(tables_folder) if tables_folder else None
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    if data is None:
        data = work / "synthetic-archive"
        if not (data / "codes.csv").exists():
            write_synthetic_archive(data, per_kind=SYNTHETIC_PER_KIND)
        say(
            f"no --data given: using {SYNTHETIC_PER_KIND * 3} SYNTHETIC phantoms (drawn shapes, not medical "
            f"images) in {data}, so that the whole flow can be seen"
        )
    data = Path(data).absolute()
    dataset = open_dataset(data)  # before claiming the folder: an unreadable archive must not claim it
    _claim(work, data)
    say(dataset.summary())
    checkpoint = _model(work / "model", dataset, tables, mode, say)
    for part in ("validation", "test"):
        figures = checkpoint.card.get("metrics", {}).get(part)
        if figures:
            say(
                f"{part}: "
                + ", ".join(f"{key} {value:.3f}" for key, value in figures.items() if isinstance(value, float))
            )

    name, records = read_archive(data)
    with Retrieval.open(work / "index", Embedder(checkpoint)) as retrieval:
        say(f"indexing {len(records)} images into {work / 'index'} (already indexed ones are skipped)")
        summary = index_records(records, retrieval, dataset=name)
        say(summary.text())
    return load_settings(
        ServiceSettings,
        db=work / "index",
        model=work / "model",
        irma_tables=tables_folder,
        token=_token(work, say),
        host=host,
        port=port,
    )


def _claim(work: Path, data: Path) -> None:
    state = work / STATE_FILE
    if state.exists():
        recorded = json.loads(state.read_text()).get("data")
        if recorded != str(data):
            raise QuickstartError(
                f"the working folder {work} was made for the archive {recorded}, not {data}: "
                f"give another --work folder for this archive"
            )
    else:
        state.write_text(json.dumps({"data": str(data)}, indent=2) + "\n")


def _model(folder: Path, dataset, tables: CodeTables | None, mode: str, say: Callable[[str], None]) -> Checkpoint:
    if (folder / CARD_FILE).exists():
        say(f"reusing the trained model in {folder}")
        checkpoint = load_checkpoint(folder)
        if "onnx" not in checkpoint.card:  # trained before models had their ONNX graph
            say("exporting it to ONNX for ONNX Runtime (once)")
            try:
                samples = sample_inputs(dataset.records, checkpoint.pipeline)
                export_graph(checkpoint, samples, described=f"images of {dataset.name}")
            except GraphError as error:
                say(f"note: {error}; the model runs in torch")
        return checkpoint
    interrupted = (folder / TRAINING_STATE).exists()
    say(f"{'resuming' if interrupted else 'training'} the default CPU model ({mode} mode) in {folder}")
    return train(dataset, make_config(mode=mode), folder, resume=interrupted, tables=tables)


def _token(work: Path, say: Callable[[str], None]) -> str:
    """The service token, made once (readable by the owner only) and reused. It is shown once, when it is
    made, to the person who ran quickstart; later runs say where it is kept, never the token itself."""
    path = work / TOKEN_FILE
    if not path.exists():
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as file:
            file.write(secrets.token_urlsafe(24) + "\n")
        token = path.read_text().strip()
        say(f"the service's token (shown this once; kept in {path}, readable by you only): {token}")
        return token
    say(f"the service's token is in {path}")
    return path.read_text().strip()
