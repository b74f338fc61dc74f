"""The `cbmir` command: one sub-command per library function, no logic of its own beyond arguments, progress
and turning a `CbmirError` into a one-line message and exit status 2."""

from __future__ import annotations

import enum
import functools
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import cv2
import typer
from tqdm import tqdm

from cbmir.errors import CbmirError

if TYPE_CHECKING:
    from cbmir.embed import Runtime
    from cbmir.locations import Location
    from cbmir.pacs import PacsSettings
    from cbmir.service.settings import ServiceSettings

app = typer.Typer(help="Content-based retrieval of radiographs.", no_args_is_help=True, add_completion=False)
irma_app = typer.Typer(help="IRMA codes: decode and check.", no_args_is_help=True)
app.add_typer(irma_app, name="irma")
db_app = typer.Typer(help="The search index: statistics and failures.", no_args_is_help=True)
app.add_typer(db_app, name="db")
users_app = typer.Typer(help="The service's users: each has a role and a token of their own.", no_args_is_help=True)
app.add_typer(users_app, name="users")
audit_app = typer.Typer(help="The audit trail of an index: who read and changed what.", no_args_is_help=True)
app.add_typer(audit_app, name="audit")


class CodeSourceOption(enum.StrEnum):
    """`cbmir.index.CodeSource` as a typer choice."""

    best = "best"
    true = "true"
    predicted = "predicted"


class RuntimeOption(enum.StrEnum):
    """`cbmir.embed.Runtime` as a typer choice."""

    auto = "auto"
    onnx = "onnx"
    torch = "torch"


RuntimeChoice = Annotated[
    RuntimeOption | None,
    typer.Option(
        help="Inference runtime: onnx (ONNX Runtime on the checkpoint's exported graph), torch, or auto (onnx "
        "where the checkpoint has a current graph; default: $CBMIR_RUNTIME or auto)."
    ),
]


def reports_errors(command: Callable) -> Callable:
    """Print a user-caused error as one line naming the file or field, instead of a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except CbmirError as error:
            typer.secho(f"error: {error}", err=True, fg=typer.colors.RED)
            raise typer.Exit(2) from None

    return wrapper


@app.command()
@reports_errors
def synthetic(
    out: Annotated[Path, typer.Argument(help="Folder to write the synthetic archive into.")],
    per_kind: Annotated[int, typer.Option(min=1, help="Phantoms per kind (chest, hand, skull).")] = 8,
    seed: int = 0,
) -> None:
    """Write a small SYNTHETIC archive (drawn phantoms, not medical images) in the IRMA layout."""
    from cbmir.synthetic import write_synthetic_archive

    folder = write_synthetic_archive(out, per_kind=per_kind, seed=seed)
    typer.echo(f"wrote {per_kind * 3} synthetic phantoms (not medical images) to {folder}")


@app.command()
@reports_errors
def preprocess(
    source: Annotated[Path, typer.Argument(help="An image file or a folder (searched recursively).")],
    out: Annotated[Path, typer.Argument(help="Folder for the preprocessed PNGs.")],
    preset: Annotated[str, typer.Option(help="Table I preset: {resize,repetitive,constant}-{plain,enhanced}.")] = (
        "constant-enhanced"
    ),
    size: Annotated[int | None, typer.Option(help="Output side in pixels (the preset's 512 if not given).")] = None,
    interpolation: Annotated[str | None, typer.Option(help="nearest, linear, area, cubic or lanczos.")] = None,
) -> None:
    """Write preprocessed images for inspection. Colour PNGs show the layers as red = original,
    green = CLAHE, blue = non-local means; a pipeline record is written beside them as preprocessing.json."""
    from cbmir.imaging.io import ImageReadError, read_image
    from cbmir.imaging.listing import IMAGE_SUFFIXES, image_files
    from cbmir.imaging.preprocess import preset as make_preset

    overrides = {name: value for name, value in (("size", size), ("interpolation", interpolation)) if value}
    pipeline = make_preset(preset, **overrides)
    if not source.exists():
        raise CbmirError(f"{source}: no such file or folder")
    files = [source] if source.is_file() else image_files(source)
    if not files:
        raise CbmirError(f"{source}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) found")
    out.mkdir(parents=True, exist_ok=True)
    (out / "preprocessing.json").write_text(pipeline.to_json() + "\n")
    failures: list[str] = []
    for path in tqdm(files, desc=f"preprocess ({preset})", unit="img"):
        try:
            layers = pipeline(read_image(path).pixels)
        except ImageReadError as error:
            failures.append(str(error))
            continue
        target = out / (path.relative_to(source).with_suffix(".png") if source.is_dir() else f"{path.stem}.png")
        target.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(target), layers[..., ::-1])  # OpenCV writes BGR: reverse so red = channel 0
    typer.echo(f"{len(files) - len(failures)} written to {out}, {len(failures)} failed")
    for failure in failures:
        typer.echo(f"  {failure}", err=True)
    if failures:
        raise typer.Exit(1)


@app.command()
@reports_errors
def dataset(
    path: Annotated[
        Path, typer.Argument(help="An archive in a supported layout (IRMA folder, class folders, DICOM tree, .npz).")
    ],
    table: Annotated[
        Path | None, typer.Option(help="NIH ChestX-ray14 label table (Data_Entry CSV, .gz allowed).")
    ] = None,
) -> None:
    """Read an archive and report its records, classes, splits and every problem found (missing files,
    duplicate ids, unknown labels, invalid codes). Exits 1 when there are problems."""
    from cbmir.datasets import open_dataset

    report = open_dataset(path, **({"table": table} if table else {}))
    typer.echo(report.summary())
    if report.problems:
        raise typer.Exit(1)


def _settings():
    """The CLI's defaults from the environment (see `cbmir.settings`)."""
    from cbmir.settings import Settings, load_settings

    return load_settings(Settings)


def _start_torch() -> None:
    """For the commands that run torch: torch loaded now, with its thread count set once by the program
    (from $CBMIR_THREADS; every core by default)."""
    import torch  # noqa: F401 - loaded first, so that the count applies to it at once

    from cbmir.embed import set_threads

    set_threads(_settings().threads)


def _runtime(runtime: RuntimeOption | None) -> Runtime:
    """The runtime asked for, else $CBMIR_RUNTIME (auto by default)."""
    return runtime.value if runtime is not None else _settings().runtime


def _embedder(model: Path, runtime: RuntimeOption | None, **options):
    """The checkpoint's embedder in the runtime asked for (else $CBMIR_RUNTIME), with $CBMIR_THREADS (torch
    is loaded only if the model runs in it)."""
    from cbmir.embed import Embedder, set_threads

    set_threads(_settings().threads)
    embedder = Embedder.load(model, runtime=_runtime(runtime), threads=_settings().threads, **options)
    typer.echo(f"model runtime: {embedder.runtime_description}", err=True)
    return embedder


def _tables_folder(folder: Path | None) -> Path | None:
    """The code tables folder given, else $CBMIR_IRMA_TABLES, else None."""
    return folder or _settings().irma_tables


def _tables(folder: Path | None):
    """IRMA code tables from `folder` or $CBMIR_IRMA_TABLES, or None (with a note) when neither has them."""
    from cbmir.irma import CodeTables, CodeTablesNotFoundError

    chosen = _tables_folder(folder)
    if chosen is None:
        return None
    try:
        return CodeTables.load(chosen)
    except CodeTablesNotFoundError as error:
        if folder is not None:
            raise
        typer.echo(f"note: {error}", err=True)
        return None


TablesOption = Annotated[
    Path | None, typer.Option(help="Folder with the IRMA code tables A.csv..D.csv (default: $CBMIR_IRMA_TABLES).")
]
NihTableOption = Annotated[
    Path | None, typer.Option("--nih-table", help="NIH ChestX-ray14 label table, for an NIH image folder.")
]


@app.command()
@reports_errors
def train(
    data: Annotated[Path, typer.Argument(help="Training archive in a supported layout.")],
    out: Annotated[Path, typer.Option(help="Checkpoint folder to write.")],
    recipe: Annotated[str | None, typer.Option(help="Start from a recipe: cpu-default or a paper's settings.")] = None,
    config: Annotated[Path | None, typer.Option(help="JSON file of training settings (may name a recipe).")] = None,
    model: Annotated[str | None, typer.Option(help="Registry model name (cbmir models).")] = None,
    task: Annotated[str | None, typer.Option(help="auto, single-label, multi-label or irma-axes.")] = None,
    mode: Annotated[str | None, typer.Option(help="heads (frozen trunk, fast), finetune or full.")] = None,
    preset: Annotated[str | None, typer.Option(help="Preprocessing preset, e.g. constant-enhanced.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs (of the heads stage in heads/finetune mode).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Batch size.")] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate.")] = None,
    optimizer: Annotated[str | None, typer.Option(help="adam, adamw or sgd.")] = None,
    pretrained: Annotated[str | None, typer.Option(help="packaged, none, or a trunk weights file.")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run in OUT.")] = False,
    tables: TablesOption = None,
    nih_table: NihTableOption = None,
) -> None:
    """Train a model and write a checkpoint folder (weights, model card, plots, evaluation reports)."""
    from cbmir.datasets import open_dataset
    from cbmir.train import TrainConfig, make_config
    from cbmir.train import train as run_training

    given = dict(
        model=model,
        task=task,
        mode=mode,
        preset=preset,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        optimizer=optimizer,
        pretrained=pretrained,
        seed=seed,
    )
    overrides = {key: value for key, value in given.items() if value is not None}
    settings = TrainConfig.from_file(config, **overrides) if config else make_config(recipe, **overrides)
    dataset = open_dataset(data, **({"table": nih_table} if nih_table else {}))
    _start_torch()
    typer.echo(dataset.summary())
    checkpoint = run_training(dataset, settings, out, resume=resume, tables=_tables(tables))
    typer.echo(f"checkpoint written to {out}")
    for part, figures in checkpoint.card["metrics"].items():
        typer.echo(f"  {part}: " + ", ".join(f"{key} {_fmt(value)}" for key, value in figures.items()))


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key} {_fmt(item)}" for key, item in value.items()) + "}"
    return str(value)


@app.command()
@reports_errors
def export(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint folder.")],
    images: Annotated[
        Path | None,
        typer.Option(help="Radiographs to check the graph on (an archive or a folder; default: drawn phantoms)."),
    ] = None,
    count: Annotated[int, typer.Option(min=1, max=256, help="How many images to check on.")] = 16,
) -> None:
    """Export the checkpoint's model to an ONNX graph (model.onnx) for ONNX Runtime, checked against torch on
    real inputs; the result and the differences measured go into its card. Training does this by itself."""
    from cbmir.checkpoint import load_checkpoint
    from cbmir.export import export_graph

    _start_torch()
    loaded = load_checkpoint(checkpoint)
    samples, described = _check_images(images, count, loaded.pipeline)
    section = export_graph(loaded, samples, described=described)
    typer.echo(
        f"wrote {checkpoint / section['file']}: on {section['checked_on']}, ONNX Runtime differs from torch by "
        f"{section['max_abs_difference']['embedding']:.1e} (embedding) and "
        f"{section['max_abs_difference']['logits']:.1e} (logits)"
    )


def _check_images(images: Path | None, count: int, pipeline):
    """Up to `count` prepared inputs: readable radiographs of `images`, or drawn phantoms without it."""
    import numpy as np

    from cbmir.export import sample_inputs

    if images is None:
        from cbmir.synthetic import KINDS, phantom

        rng = np.random.default_rng(0)
        drawn = [phantom(KINDS[number % len(KINDS)], rng) for number in range(count)]
        return np.stack([pipeline(pixels) for pixels in drawn]), "drawn phantoms (not radiographs)"
    from indexer.pipeline import read_archive

    name, records = read_archive(images)
    return sample_inputs(records, pipeline, count), f"images of {name}"


@app.command()
@reports_errors
def evaluate(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint folder.")],
    data: Annotated[Path, typer.Argument(help="Labelled archive in a supported layout.")],
    out: Annotated[Path, typer.Option(help="Folder for the reports and plots.")] = Path("evaluation"),
    split: Annotated[str | None, typer.Option(help="Only this split of the archive (train, validation, test).")] = None,
    tables: TablesOption = None,
    nih_table: NihTableOption = None,
    runtime: RuntimeChoice = None,
) -> None:
    """Evaluate a checkpoint: accuracy, loss, confusion matrix, per-class figures (and per IRMA axis with the
    ImageCLEF error score), written as JSON, Markdown and PNG."""
    from cbmir.checkpoint import load_checkpoint
    from cbmir.datasets import open_dataset
    from cbmir.evaluate import evaluate_dataset

    _start_torch()
    loaded = load_checkpoint(checkpoint)
    dataset = open_dataset(data, **({"table": nih_table} if nih_table else {}))
    out.mkdir(parents=True, exist_ok=True)
    headline = evaluate_dataset(loaded, dataset, out, _tables(tables), split=split, runtime=_runtime(runtime))
    typer.echo(", ".join(f"{key} {_fmt(value)}" for key, value in headline.items()))
    typer.echo(f"reports written to {out}")


DbOption = Annotated[
    str,
    typer.Option(
        "--db",
        help="The index: a folder (SQLite store + FAISS vectors), or the URL of a PostgreSQL store, "
        "postgresql://user@host:port/dbname (the password from PGPASSWORD or ~/.pgpass; see --vectors).",
    ),
]
VectorsOption = Annotated[
    Path | None,
    typer.Option(
        help="With a PostgreSQL --db: the local folder of the vectors (default: $CBMIR_VECTORS, else "
        "cbmir-vectors/<host>-<port>-<dbname> in the working folder)."
    ),
]


def _vectors(vectors: Path | None) -> Path | None:
    """The vector folder given, else $CBMIR_VECTORS (None: the index's own default)."""
    return vectors or _settings().vectors


def _existing_index(db: str) -> str:
    """Read commands must not create an empty index where the user mistyped a folder or a database."""
    from cbmir.index.database import PostgresAddress, is_database_url
    from cbmir.index.engine import STORE_FILE, store_location
    from cbmir.index.store import store_exists

    if not store_exists(store_location(db)):
        if is_database_url(db):
            raise CbmirError(f"{PostgresAddress.parse(db).name} holds no cbmir index; build one with `cbmir index`")
        raise CbmirError(f"{db} holds no cbmir index (no {STORE_FILE}); build one with `cbmir index`")
    return db


@app.command()
@reports_errors
def index(
    archive: Annotated[Path, typer.Argument(help="Archive to index: any supported layout, or a folder of images.")],
    model: Annotated[Path, typer.Option(help="Checkpoint folder whose model embeds and predicts.")],
    db: DbOption,
    workers: Annotated[int, typer.Option(min=1, help="Processes reading and preprocessing images.")] = 2,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per model batch and per write transaction.")] = 32,
    index_type: Annotated[
        str | None,
        typer.Option(
            help="FAISS factory string (Flat, HNSW32, IVF1024,Flat), ondisk:FACTORY to keep the vectors on disk "
            "(ondisk:IVF1024,PQ64), or auto."
        ),
    ] = None,
    nih_table: NihTableOption = None,
    runtime: RuntimeChoice = None,
    vectors: VectorsOption = None,
    ray: Annotated[
        str | None,
        typer.Option(
            metavar="ADDRESS",
            help="Run on a Ray cluster: read and preprocess in Ray tasks, the model in one actor per node (or "
            "GPU); this process writes the index. ADDRESS: host:port of `ray start --head`, auto (the cluster "
            "started on this machine) or local (a Ray instance started for this run). The archive and the "
            "model must be at these paths on every node; --workers is then unused.",
        ),
    ] = None,
) -> None:
    """Index an archive: embeddings and predicted codes into the search index. Re-running skips what is
    already indexed; unreadable files go into the failure report and never stop the run."""
    from cbmir.search import Retrieval
    from indexer.pipeline import index_records, read_archive

    embedder = _embedder(model, runtime, batch_size=batch_size)
    name, records = read_archive(archive, **({"table": nih_table} if nih_table else {}))
    with Retrieval.open(db, embedder, vectors=_vectors(vectors), index_type=index_type) as retrieval:
        settings = _settings()
        if ray is None:
            summary = index_records(
                records, retrieval, dataset=name, workers=workers, batch_size=batch_size, max_pixels=settings.max_pixels
            )
        else:
            from indexer.ray_pipeline import index_on_ray

            summary = index_on_ray(
                records,
                retrieval,
                model=model,
                dataset=name,
                address=ray,
                batch_size=batch_size,
                max_pixels=settings.max_pixels,
                threads=settings.threads,
            )
        typer.echo(summary.text())
        if summary.failed:
            typer.echo(f"failure report: cbmir db failures --db {retrieval.engine.location}")


@app.command()
@reports_errors
def sync(
    url: Annotated[
        str,
        typer.Argument(
            help="DICOMweb base URL of the PACS (http://pacs:8042/dicom-web). Credentials come from "
            "CBMIR_PACS_USER and CBMIR_PACS_PASSWORD, or CBMIR_PACS_TOKEN, never from the URL."
        ),
    ],
    db: DbOption,
    model: Annotated[Path, typer.Option(help="Checkpoint folder whose model embeds and predicts.")],
    modality: Annotated[
        list[str] | None,
        typer.Option(help="A modality to index (repeatable; default CR and DX; 'any' for every modality)."),
    ] = None,
    study_dates: Annotated[
        str | None, typer.Option(help="Studies in this DICOM date range: 20240101-20241231, 20240101-, -20231231.")
    ] = None,
    match: Annotated[
        list[str] | None,
        typer.Option(help="Only instances whose QIDO attribute equals a value, KEY=VALUE (repeatable)."),
    ] = None,
    dataset: Annotated[str, typer.Option(help="Dataset name the synced images are stored under.")] = "pacs",
    workers: Annotated[int, typer.Option(min=1, help="Processes fetching, reading and preprocessing.")] = 2,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per model batch and per write transaction.")] = 32,
    runtime: RuntimeChoice = None,
    vectors: VectorsOption = None,
) -> None:
    """Index the radiographs of a PACS over DICOMweb (QIDO-RS to find, WADO-RS to fetch). A re-run fetches
    only instances not indexed yet; instances that cannot be taken go into the failure report."""
    from cbmir.pacs import RADIOGRAPH_MODALITIES, Pacs, PacsSettings
    from cbmir.search import Retrieval
    from cbmir.settings import load_settings
    from indexer.pacs import sync_pacs

    attributes = dict(_key_value(item, "--match") for item in match or ())
    modalities = tuple(m.upper() for m in modality) if modality else RADIOGRAPH_MODALITIES
    pacs = Pacs(url, load_settings(PacsSettings))
    embedder = _embedder(model, runtime, batch_size=batch_size)
    with Retrieval.open(db, embedder, vectors=_vectors(vectors)) as retrieval:
        summary = sync_pacs(
            pacs,
            retrieval,
            dataset=dataset,
            modalities=() if "ANY" in modalities else modalities,
            study_dates=study_dates,
            attributes=attributes,
            workers=workers,
            batch_size=batch_size,
            max_pixels=_settings().max_pixels,
        )
        typer.echo(summary.text())
        if summary.failed:
            typer.echo(f"failure report: cbmir db failures --db {retrieval.engine.location}")


@app.command()
@reports_errors
def listen(
    db: DbOption,
    model: Annotated[Path, typer.Option(help="Checkpoint folder whose model embeds and predicts.")],
    ae_title: Annotated[str, typer.Option(help="This node's AE title, as the senders address it.")] = "CBMIR",
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="DICOM port.")] = 11112,
    dataset: Annotated[str, typer.Option(help="Dataset name the received images are stored under.")] = "received",
    batch_size: Annotated[int, typer.Option(min=1, help="Images per model batch and per write transaction.")] = 16,
    runtime: RuntimeChoice = None,
    vectors: VectorsOption = None,
) -> None:
    """Receive radiographs pushed by DICOM C-STORE and index each as it arrives, until interrupted (Ctrl-C).
    An image is acknowledged only once it is on disk; what cannot be indexed is refused and reported."""
    import signal

    from cbmir.search import Retrieval
    from indexer.listener import Listener

    if not 1 <= len(ae_title.strip()) <= 16:
        raise CbmirError(f"--ae-title {ae_title!r}: an AE title has 1 to 16 characters")
    embedder = _embedder(model, runtime, batch_size=batch_size)
    stop = threading.Event()
    for stopping in (signal.SIGTERM, signal.SIGINT):  # also when started in the background, where Ctrl-C is ignored
        signal.signal(stopping, lambda *_: stop.set())
    with (
        Retrieval.open(db, embedder, vectors=_vectors(vectors)) as retrieval,
        Listener(
            retrieval,
            ae_title=ae_title.strip(),
            host=host,
            port=port,
            dataset=dataset,
            batch_size=batch_size,
            max_pixels=_settings().max_pixels,
        ) as listener,
    ):
        where = f"{host}:{port}, indexing into {retrieval.engine.location}"
        typer.echo(f"cbmir: listening as {ae_title.strip()} on {where} (Ctrl-C stops)")
        shown = ""
        while not stop.wait(5):  # progress: a line whenever something arrived
            stats = listener.stats
            line = (
                f"received {stats.received}, refused {stats.refused}, indexed {stats.summary.indexed}, "
                f"failed {sum(stats.summary.failed.values())}"
            )
            if line != shown:
                typer.echo(line)
                shown = line
        typer.echo("stopping: indexing what was received")
    typer.echo(listener.stats.summary.text())


def _key_value(text: str, option: str) -> tuple[str, str]:
    key, equals, value = text.partition("=")
    if not equals or not key.strip() or not value.strip():
        raise CbmirError(f"{option} {text!r}: expected KEY=VALUE, e.g. BodyPartExamined=CHEST")
    return key.strip(), value.strip()


@app.command()
@reports_errors
def search(
    db: DbOption,
    model: Annotated[Path, typer.Option(help="Checkpoint folder the index was built with.")],
    image: Annotated[
        Path | None, typer.Argument(help="Query radiograph (PNG, JPEG, TIFF, BMP or DICOM); or give --pacs-instance.")
    ] = None,
    k: Annotated[int, typer.Option("-k", min=1, help="Number of neighbours.")] = 10,
    anatomy: Annotated[str | None, typer.Option(help="IRMA anatomical prefix, e.g. 9 (any leg region).")] = None,
    biology: Annotated[str | None, typer.Option(help="IRMA biological prefix, e.g. 7 (musculoskeletal).")] = None,
    technical: Annotated[str | None, typer.Option(help="IRMA technical prefix.")] = None,
    directional: Annotated[str | None, typer.Option(help="IRMA directional prefix.")] = None,
    code: Annotated[str | None, typer.Option(help="A full IRMA code.")] = None,
    on: Annotated[
        CodeSourceOption, typer.Option(help="Filter on the best (true where known), true or predicted code.")
    ] = CodeSourceOption.best,
    dataset: Annotated[str | None, typer.Option(help="Only images of this dataset.")] = None,
    label: Annotated[str | None, typer.Option(help="Only images with this label or finding.")] = None,
    tables: TablesOption = None,
    runtime: RuntimeChoice = None,
    pacs_instance: Annotated[
        str | None,
        typer.Option(
            help="Search by an image on the PACS at $CBMIR_PACS_URL instead of a file: STUDY/SERIES/INSTANCE UIDs."
        ),
    ] = None,
    vectors: VectorsOption = None,
) -> None:
    """Find the radiographs most similar to IMAGE (or to a PACS image), with the predicted code in words."""
    from cbmir.datasets import read_pixels
    from cbmir.imaging.io import read_image
    from cbmir.index import Filters
    from cbmir.pacs import PacsSettings
    from cbmir.search import Retrieval
    from cbmir.settings import load_settings

    filters = Filters(
        technical=technical,
        directional=directional,
        anatomy=anatomy,
        biology=biology,
        code=code,
        on=on.value,
        dataset=dataset,
        label=label,
    )
    code_tables = _tables(tables)
    embedder = _embedder(model, runtime)  # a model that cannot run is reported before the image is read
    pacs = load_settings(PacsSettings)
    if (image is None) == (pacs_instance is None):
        raise CbmirError("give either IMAGE or --pacs-instance STUDY/SERIES/INSTANCE")
    if image is not None:
        pixels = read_image(image, max_pixels=_settings().max_pixels).pixels
    else:
        pixels = read_pixels(_pacs_location(pacs, str(pacs_instance)), max_pixels=_settings().max_pixels)
    with Retrieval.open(_existing_index(db), embedder, vectors=_vectors(vectors)) as retrieval:
        result = retrieval.search_image(pixels, k, filters)
    prediction, hits = result.prediction, result.hits
    blended = f", with the known labels of {prediction.neighbours} similar images" if prediction.neighbours else ""
    typer.echo(f"predicted: {prediction.label} (confidence {prediction.confidence:.3f}{blended})")
    if prediction.axes:
        for axis, axis_prediction in prediction.axes.items():
            typer.echo(f"  {axis:<12} {axis_prediction.code:<5} {axis_prediction.confidence:.3f}")
        if code_tables is not None:
            typer.echo(f"  in words: {code_tables.describe(prediction.label)}")
    typer.echo(f"{len(hits)} similar radiograph(s):")
    for rank, hit in enumerate(hits, 1):
        shown = hit.true_code or f"predicted {hit.predicted}"
        typer.echo(f"{rank:>3}. score {hit.score:.4f}  id {hit.id:<7} {shown:<28} {hit.location}")
        link = pacs.viewer_link_of(hit.extra)
        if link:
            typer.echo(f"     viewer: {link}")


def _pacs_location(pacs: PacsSettings, uids: str) -> Location:
    """The location of STUDY/SERIES/INSTANCE on the configured PACS."""
    from cbmir.locations import Location, LocationError

    if pacs.pacs_url is None:
        raise CbmirError("no PACS configured: set CBMIR_PACS_URL to its DICOMweb base URL")
    parts = uids.strip().split("/")
    if len(parts) != 3:
        raise CbmirError(f"--pacs-instance {uids!r}: expected STUDY/SERIES/INSTANCE UIDs separated by '/'")
    try:
        return Location.pacs(pacs.pacs_url, *parts)
    except LocationError as error:
        raise CbmirError(f"--pacs-instance {uids!r}: {error}") from None


@app.command()
@reports_errors
def quickstart(
    data: Annotated[
        Path | None, typer.Option(help="Archive in any supported layout (default: a small synthetic set).")
    ] = None,
    work: Annotated[Path, typer.Option(help="Working folder: model, index, token. A second run reuses it.")] = Path(
        "cbmir-work"
    ),
    tables: TablesOption = None,
    mode: Annotated[
        str,
        typer.Option(help="Training mode: finetune (the default's last trunk stage too) or heads (a little faster)."),
    ] = "finetune",
    host: Annotated[str, typer.Option(help="Address to serve on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
    serve: Annotated[bool, typer.Option(help="Start the service at the end.")] = True,
) -> None:
    """From an archive to a running engine: split, train the default CPU model, evaluate, index, serve."""
    from cbmir.quickstart import prepare

    _start_torch()
    settings = prepare(work, data, _tables_folder(tables), say=typer.echo, mode=mode, host=host, port=port)
    if serve:
        _run_service(settings)


@app.command()
@reports_errors
def serve(
    db: DbOption,
    model: Annotated[Path, typer.Option(help="Checkpoint folder the index was built with.")],
    host: Annotated[
        str | None,
        typer.Option(help="Address to listen on (default 127.0.0.1); without a token only loopback is allowed."),
    ] = None,
    port: Annotated[int | None, typer.Option(min=1, max=65535, help="Port (default 8000).")] = None,
    token_file: Annotated[
        Path | None, typer.Option(help="File whose first line is the bearer token (default: $CBMIR_TOKEN).")
    ] = None,
    tables: TablesOption = None,
    max_upload_mb: Annotated[
        float | None, typer.Option(min=0.01, help="Largest request body, in MiB (default 64).")
    ] = None,
    max_pixels: Annotated[
        int | None,
        typer.Option(
            min=1, help="Largest image, in pixels, checked before decoding (default: $CBMIR_MAX_PIXELS or 50,000,000)."
        ),
    ] = None,
    allow_originals: Annotated[
        bool | None,
        typer.Option(
            "--allow-originals/--thumbnails-only",
            help="Serve original files, not only thumbnails (default: thumbnails only).",
        ),
    ] = None,
    cors_origin: Annotated[
        list[str] | None, typer.Option(help="A web origin allowed to call the API (repeatable).")
    ] = None,
    keep_dicom_tag: Annotated[
        list[str] | None,
        typer.Option(help="A DICOM tag to store with uploads besides the technical ones (repeatable)."),
    ] = None,
    runtime: RuntimeChoice = None,
    max_batch: Annotated[
        int | None, typer.Option(min=1, max=256, help="Most images in one model run of joined searches (16).")
    ] = None,
    batch_wait_ms: Annotated[
        float | None, typer.Option(min=0, max=1000, help="Longest wait for more searches before a model run (0 ms).")
    ] = None,
    max_decoding: Annotated[
        int | None, typer.Option(min=1, help="Most images decoded at once; more wait for a turn (2).")
    ] = None,
    vectors: VectorsOption = None,
) -> None:
    """Start the query service: the HTTP API (/v1, docs at /docs) and the web page (/). Every option can also
    be set as an environment variable CBMIR_<SETTING> (CBMIR_TOKEN, CBMIR_MAX_PIXELS, ...)."""
    from cbmir.service.settings import MEGABYTE, ServiceSettings, read_token_file
    from cbmir.settings import load_settings

    settings = load_settings(
        ServiceSettings,
        db=_existing_index(db),
        vectors=vectors,
        model=model,
        irma_tables=tables,
        host=host,
        port=port,
        token=read_token_file(token_file) if token_file else None,
        max_upload_bytes=int(max_upload_mb * MEGABYTE) if max_upload_mb else None,
        max_pixels=max_pixels,
        allow_originals=allow_originals,
        cors_origins=tuple(cors_origin) if cors_origin else None,
        dicom_tags=tuple(keep_dicom_tag) if keep_dicom_tag else None,
        runtime=runtime.value if runtime is not None else None,
        max_batch=max_batch,
        batch_wait_ms=batch_wait_ms,
        max_decoding=max_decoding,
    )
    _run_service(settings)


def _run_service(settings: ServiceSettings) -> None:
    import uvicorn

    from cbmir.embed import set_threads
    from cbmir.service import create_app

    settings.check_binding(has_users=_access(settings.db)[0].has_users())
    set_threads(settings.threads)  # the service's own settings hold $CBMIR_THREADS: no second read
    app_instance = create_app(settings)
    index = app_instance.state.catalog.engine.location
    typer.echo(f"cbmir: serving {index} at http://{settings.host}:{settings.port}/ (API docs at /docs)")
    # The token itself is never printed here: it came from a file or the environment, and output lands in logs.
    typer.echo("every /v1 request needs the token" if settings.token else "no token: reachable from this machine only")
    uvicorn.run(app_instance, host=settings.host, port=settings.port, log_level="warning")


@db_app.command("stats")
@reports_errors
def db_stats(db: DbOption, vectors: VectorsOption = None) -> None:
    """Images, model, index type, datasets and failures of an index."""
    from cbmir.index import Engine

    with Engine.open(_existing_index(db), vectors=_vectors(vectors)) as engine:
        typer.echo(json.dumps(engine.stats(), indent=2, sort_keys=True, default=str))


@db_app.command("failures")
@reports_errors
def db_failures(db: DbOption, vectors: VectorsOption = None) -> None:
    """The files the indexer could not read, with the reason."""
    from cbmir.index import Engine

    with Engine.open(_existing_index(db), vectors=_vectors(vectors)) as engine:
        failures = engine.failures()
    for failure in failures:
        typer.echo("\t".join(str(value) for value in failure.values()))
    typer.echo(f"{len(failures)} failure(s)", err=True)


@app.command("models")
def list_registered_models() -> None:
    """List the registry's models with their source, input size and embedding size."""
    from cbmir.models import list_models, model_info

    for name in list_models():
        info = model_info(name)
        weights = "ImageNet weights packaged" if info.pretrained else "no packaged weights"
        typer.echo(f"{name:<24} input {info.input_size:<4} {weights:<26} {info.source}")


@irma_app.command("decode")
@reports_errors
def irma_decode(
    code: Annotated[str, typer.Argument(help="An IRMA code, e.g. 1121-127-700-500 (dashes optional, * = not known).")],
    tables: Annotated[
        Path | None, typer.Option(help="Folder with the IRMA tables A.csv..D.csv (default: $CBMIR_IRMA_TABLES).")
    ] = None,
) -> None:
    """Print an IRMA code in words, axis by axis, from the most general level to the most specific."""
    from cbmir.irma import TABLES_ENV, CodeTables, IrmaCode

    parsed = IrmaCode.parse(code)
    folder = _tables_folder(tables)
    if folder is None:
        raise CbmirError(f"no IRMA code tables: give their folder with --tables or set {TABLES_ENV}")
    code_tables = CodeTables.load(folder)
    typer.echo(str(parsed))
    for axis, texts in code_tables.decode(parsed).items():
        typer.echo(f"  {axis:<12} {parsed[axis]:<5} {', '.join(texts)}")
    for problem in code_tables.validate(parsed):
        typer.echo(f"  note: {problem}")


class RoleOption(enum.StrEnum):
    """`cbmir.access.Role` as a typer choice."""

    reader = "reader"
    annotator = "annotator"
    admin = "admin"


def _access(db: str | Path):
    """The users and the audit trail of an index, opened beside a running service (not through its engine,
    which one process at a time may open)."""
    from cbmir.access import AuditTrail, UserDirectory
    from cbmir.index.engine import store_location
    from cbmir.index.store import Store

    store = Store(store_location(_existing_index(str(db))))
    return UserDirectory(store), AuditTrail(store)


def _audit_command(trail, route: str, name: str, **detail) -> None:
    """Record a change made with the `cbmir users` command in the audit trail, under the system user."""
    import getpass

    from cbmir.access import Event

    trail.append(
        Event(
            user=f"cli:{getpass.getuser()}",
            role="admin",
            route=route,
            client="cli",
            status=0,
            detail={"user": name, **detail},
        )
    )


def _show_token(token: str, name: str) -> None:
    typer.echo(token)
    typer.echo(f"the token of {name}: shown this once, only its hash is kept; give it to them privately", err=True)


@users_app.command("add")
@reports_errors
def users_add(
    name: Annotated[str, typer.Argument(help="User name (letters, digits, '.', '_', '@', '-').")],
    db: DbOption,
    role: Annotated[RoleOption, typer.Option(help="reader: search and view; annotator: also codes; admin: all.")],
) -> None:
    """Add a user and print their token (once: only a salted hash of it is kept)."""
    from cbmir.access import Role

    users, trail = _access(db)
    token = users.add(name, Role(role.value))
    _audit_command(trail, "cbmir users add", name, role=role.value)
    _show_token(token, name)


@users_app.command("list")
@reports_errors
def users_list(db: DbOption) -> None:
    """The users, their roles and whether they are disabled."""
    users, _ = _access(db)
    for user in users.users():
        state = "disabled" if user.disabled else "enabled"
        typer.echo(
            f"{user.name:<24} {user.role.value:<10} {state:<9} added {user.created_at}, changed {user.changed_at}"
        )


@users_app.command("rotate")
@reports_errors
def users_rotate(name: Annotated[str, typer.Argument()], db: DbOption) -> None:
    """Give a user a new token (printed once); the old one is refused from now on."""
    users, trail = _access(db)
    token = users.rotate(name)
    _audit_command(trail, "cbmir users rotate", name)
    _show_token(token, name)


@users_app.command("disable")
@reports_errors
def users_disable(
    name: Annotated[str, typer.Argument()],
    db: DbOption,
    enable: Annotated[bool, typer.Option("--enable", help="Enable a disabled user again instead.")] = False,
) -> None:
    """Refuse a user's token from their next request on (or, with --enable, accept it again)."""
    users, trail = _access(db)
    users.set_disabled(name, not enable)
    _audit_command(trail, "cbmir users " + ("enable" if enable else "disable"), name)
    typer.echo(f"{name} is {'enabled' if enable else 'disabled'}")


@users_app.command("role")
@reports_errors
def users_role(
    name: Annotated[str, typer.Argument()], db: DbOption, role: Annotated[RoleOption, typer.Option()]
) -> None:
    """Change a user's role (their token stays)."""
    from cbmir.access import Role

    users, trail = _access(db)
    users.set_role(name, Role(role.value))
    _audit_command(trail, "cbmir users role", name, role=role.value)
    typer.echo(f"{name} is now {role.value}")


@audit_app.command("show")
@reports_errors
def audit_show(
    db: DbOption,
    user: Annotated[str | None, typer.Option(help="Only this user's records.")] = None,
    image: Annotated[int | None, typer.Option(help="Only records that returned or changed this image id.")] = None,
    since: Annotated[str | None, typer.Option(help="From this UTC time or date on (e.g. 2026-12-01).")] = None,
    until: Annotated[str | None, typer.Option(help="Before this UTC time or date.")] = None,
    last: Annotated[int | None, typer.Option(min=1, help="Only the newest N records.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object a line.")] = False,
) -> None:
    """The audit records, oldest first: time, user, role, route, status, result count, client, image ids."""
    from dataclasses import asdict

    _, trail = _access(db)
    records = trail.records(user=user, image=image, since=_iso(since, "since"), until=_iso(until, "until"), last=last)
    for record in records:
        if as_json:
            typer.echo(json.dumps(asdict(record), sort_keys=True))
            continue
        images = ",".join(map(str, record.images[:20])) + (",..." if len(record.images) > 20 else "")
        count = "-" if record.count is None else record.count
        typer.echo(
            f"{record.seq}\t{record.at}\t{record.user}\t{record.role}\t{record.route}\t{record.status}\t"
            f"{count}\t{record.client}\t{images or '-'}"
        )
    typer.echo(f"{len(records)} record(s)", err=True)


def _iso(value: str | None, name: str) -> str | None:
    """A time given on the command line, checked and in the audit trail's form (UTC ISO 8601)."""
    from datetime import UTC, datetime

    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise CbmirError(f"--{name} {value!r}: give a date or time such as 2026-12-01 or 2026-12-01T09:30") from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).astimezone(UTC).isoformat()


@audit_app.command("verify")
@reports_errors
def audit_verify(
    db: DbOption,
    head: Annotated[
        str | None,
        typer.Option(help="A head noted earlier (SEQ:HASH, as this command prints): check it is still there."),
    ] = None,
) -> None:
    """Check the audit trail's hash chain: exit 0 when intact, 1 (listing what is wrong) when not."""
    noted = None
    if head is not None:
        seq, _, digest = head.partition(":")
        if not seq.isdigit() or len(digest) != 64:
            raise CbmirError(f"--head {head!r}: expected SEQ:HASH, e.g. 42:<64 hex digits>")
        noted = (int(seq), digest)
    _, trail = _access(db)
    result = trail.verify(noted)
    for problem in result.problems[:50]:
        typer.secho(f"problem: {problem}", err=True, fg=typer.colors.RED)
    if len(result.problems) > 50:
        typer.secho(f"... and {len(result.problems) - 50} more", err=True, fg=typer.colors.RED)
    where = f"; head {result.head[0]}:{result.head[1]}" if result.head else ""
    typer.echo(f"{result.records} record(s){where}: " + ("intact" if result.intact else "NOT intact"))
    if not result.intact:
        raise typer.Exit(1)
