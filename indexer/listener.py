"""Receiving pushed radiographs: a DICOM C-STORE SCP (pynetdicom) that indexes each image as it arrives.

A received instance is read as the indexer reads a DICOM file (`cbmir.imaging.io.read_dicom`); one that is
not an image the engine can take is refused with a failure status and recorded in the failure report, its
SOP Instance UID and the reason named. An image is answered Success only after it is on disk: reduced to its
pixels and technical tags (patient-identifying tags are dropped, never stored), written atomically to the
spool folder ``<index>/received/<SOP Instance UID>.dcm``, which is then its location (its original).

A thread indexes the spooled files in batches (after `batch_size` images, or `batch_seconds` after the
first one waiting) through the same read → preprocess → embed → write stages as files. At start, spooled
files that are not indexed yet are indexed first: an instance acknowledged before a crash is never lost,
and one indexed twice is stored once (content hash).

Transfer syntaxes are negotiated: only those pydicom can decode here are accepted, so a sender converts to
one of them (or its association is refused for that SOP class) instead of sending what cannot be read.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import get_decoder
from pydicom.uid import AllTransferSyntaxes, UncompressedTransferSyntaxes
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from cbmir.datasets import Record
from cbmir.errors import CbmirError
from cbmir.files import write_atomically_with
from cbmir.imaging.io import DEFAULT_MAX_PIXELS, TECHNICAL_DICOM_TAGS, ImageReadError, read_dicom
from cbmir.locations import Location, is_uid
from cbmir.search import Retrieval
from indexer.pipeline import Summary, WorkerState, map_record, run_stages

log = logging.getLogger(__name__)

SPOOL = "received"
# C-STORE statuses (DICOM PS3.4 B.2.3).
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000
UNDECODABLE = 0xC210  # the data set cannot be parsed
# The pixel module: what, besides the technical tags, an image needs to be read again.
_PIXEL_MODULE = (
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "PlanarConfiguration",
    "NumberOfFrames",
    "ModalityLUTSequence",
    "VOILUTSequence",
    "PixelData",
)
_KEPT = tuple(dict.fromkeys((*TECHNICAL_DICOM_TAGS, *_PIXEL_MODULE)))


class ListenerError(CbmirError):
    """A listener that cannot start (the port in use, the spool folder not writable)."""


def decodable_transfer_syntaxes() -> list[str]:
    """The transfer syntaxes this installation reads: uncompressed ones, and compressed ones with a decoder."""
    usable = list(UncompressedTransferSyntaxes)
    for syntax in AllTransferSyntaxes:
        if syntax in usable:
            continue
        try:
            if get_decoder(syntax).is_available:
                usable.append(syntax)
        except NotImplementedError:
            continue
    return [str(syntax) for syntax in usable]


def reduced(dataset: Dataset, file_meta: FileMetaDataset) -> Dataset:
    """The data set as it is kept: the pixel module, technical tags and UIDs; nothing that names a patient."""
    kept = Dataset()
    for keyword in _KEPT:
        if keyword in dataset:
            kept[keyword] = dataset[keyword]
    kept.file_meta = FileMetaDataset()
    for keyword in ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID", "TransferSyntaxUID"):
        if keyword in file_meta:
            setattr(kept.file_meta, keyword, getattr(file_meta, keyword))
    return kept


@dataclass
class ListenerStats:
    """What a listener has done since it started."""

    received: int = 0
    refused: int = 0
    summary: Summary = field(default_factory=Summary)


class Listener:
    """A C-STORE SCP on `host`:`port` as `ae_title` that indexes into `retrieval` under `dataset`."""

    def __init__(
        self,
        retrieval: Retrieval,
        *,
        ae_title: str = "CBMIR",
        host: str = "127.0.0.1",
        port: int = 11112,
        dataset: str = "received",
        batch_size: int = 16,
        batch_seconds: float = 2.0,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ):
        self.retrieval, self.dataset, self.max_pixels = retrieval, dataset, max_pixels
        self.batch_size, self.batch_seconds = batch_size, batch_seconds
        self.spool = retrieval.engine.folder.absolute() / SPOOL
        self.address = (host, port)
        self.stats = ListenerStats()
        self._queue: queue.Queue[Path | None] = queue.Queue()
        self._ae = AE(ae_title=ae_title)
        syntaxes = decodable_transfer_syntaxes()
        for context in AllStoragePresentationContexts:
            if context.abstract_syntax is not None:
                self._ae.add_supported_context(context.abstract_syntax, syntaxes)
        self._ae.add_supported_context(Verification)  # C-ECHO, which senders use to test the connection
        self._server: ThreadedAssociationServer | None = None
        self._indexer = threading.Thread(target=self._index_loop, name="listener-indexer", daemon=True)

    def start(self) -> None:
        """Index what an earlier run spooled and did not index, then accept associations (in the background)."""
        try:
            self.spool.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ListenerError(f"spool folder {self.spool}: {error.strerror}") from None
        waiting = sorted(self.spool.glob("*.dcm"))
        indexed = self.retrieval.engine.locations_present(str(Location(path)) for path in waiting)
        for path in waiting:
            if str(Location(path)) not in indexed:
                self._queue.put(path)
        self._indexer.start()
        try:
            self._server = self._ae.start_server(
                self.address, block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
            )
        except OSError as error:
            self.stop()
            raise ListenerError(f"cannot listen on {self.address[0]}:{self.address[1]}: {error.strerror}") from None

    def stop(self) -> None:
        """Stop accepting, then index everything received before returning."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        if self._indexer.is_alive():
            self._queue.put(None)
            self._indexer.join()

    def __enter__(self) -> Listener:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- receiving (association threads) ------------------------------------------------------------------

    def _on_store(self, event: evt.Event) -> int:
        requestor = event.assoc.requestor
        sop = str(getattr(event.request, "AffectedSOPInstanceUID", None) or "")
        where = f"C-STORE from {requestor.ae_title} at {requestor.address}: instance {sop or '(no UID)'}"
        if not is_uid(sop):
            return self._refuse(where, f"{where}: the SOP Instance UID is not a DICOM UID", CANNOT_UNDERSTAND)
        try:
            dataset = event.dataset
            dataset.file_meta = event.file_meta
            read_dicom(dataset, name=where, max_pixels=self.max_pixels)  # refuse what could not be indexed
        except ImageReadError as error:
            return self._refuse(where, str(error), CANNOT_UNDERSTAND)
        except Exception as error:  # a data set pydicom cannot parse at all: the sender's garbage
            return self._refuse(where, f"{where}: cannot be decoded ({type(error).__name__}: {error})", UNDECODABLE)
        path = self.spool / f"{sop}.dcm"
        try:
            kept = reduced(dataset, event.file_meta)
            write_atomically_with(path, lambda file: kept.save_as(file, enforce_file_format=True))
        except OSError as error:
            return self._refuse(where, f"{where}: cannot be stored ({error.strerror})", OUT_OF_RESOURCES)
        self.stats.received += 1
        self._queue.put(path)
        return SUCCESS

    def _refuse(self, where: str, reason: str, status: int) -> int:
        self.stats.refused += 1
        log.warning("refused %s", reason)
        self.retrieval.engine.record_failures([(where, reason)])
        return status

    # -- indexing (one thread) ------------------------------------------------------------------------------

    def _index_loop(self) -> None:
        state = WorkerState(frozenset(), self.retrieval.embedder.pipeline, self.dataset, self.max_pixels)
        while True:
            batch, stopping = self._next_batch()
            if batch:
                self._index(batch, state)
            if stopping:
                return

    def _next_batch(self) -> tuple[list[Path], bool]:
        """The next files to index, and whether the listener is stopping (nothing follows them)."""
        first = self._queue.get()
        if first is None:
            return [], True
        batch, deadline = [first], time.monotonic() + self.batch_seconds
        while len(batch) < self.batch_size:
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if item is None:
                return batch, True
            batch.append(item)
        return batch, False

    def _index(self, paths: list[Path], state: WorkerState) -> None:
        records = [Record(path.stem, path, (), self.dataset) for path in paths]
        try:
            run_stages(
                records,
                map_record,
                state,
                self.retrieval,
                workers=0,
                batch_size=self.batch_size,
                progress=False,
                summary=self.stats.summary,
            )
        except Exception:  # the listener goes on; the files stay spooled and are indexed at its next start
            log.exception("indexing %d received image(s) failed", len(paths))
