"""A real Orthanc PACS for tests: one process on free loopback ports, with basic auth, the DICOMweb plugin and
a DICOM modality ("CBMIR") that Orthanc can push to, so sync and C-STORE tests talk to a real server."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

import httpx

EXECUTABLE = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin")
"""The server, also where /usr/sbin is not on PATH (as for a user other than root), or None."""
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
INSTALL_HINT = "apt-get install orthanc orthanc-dicomweb"
LISTENER_AE_TITLE = "CBMIR"
"""AE title of the modality Orthanc pushes to (`Orthanc.push`); a test's C-STORE SCP uses it."""

_MODALITY = "cbmir"
_START_SECONDS = 10.0
_STOP_SECONDS = 10.0
_PR_SET_PDEATHSIG = 1


class OrthancError(RuntimeError):
    """Orthanc answered a request with an error, or its process did not start."""


def missing() -> str | None:
    """Why Orthanc cannot run here (a skip reason), or None when the server and its DICOMweb plugin exist."""
    if EXECUTABLE is None or not DICOMWEB_PLUGIN.is_file():
        return f"Orthanc is not installed: {INSTALL_HINT}"
    return None


def free_ports(count: int) -> list[int]:
    """`count` distinct free loopback ports: all sockets stay bound until every port is picked."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


_prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before any fork: the child only calls it


def _die_with_parent() -> None:
    """Run in the child before exec: Linux ends Orthanc when the test process dies without tearing down
    (killed by a timeout or a signal), so no server outlives its run."""
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class Orthanc:
    """One Orthanc process with its own storage folder. Stopping and starting it again keeps the stored
    instances and the ports, as a PACS that goes down and comes back would."""

    ae_title = "ORTHANC"
    user = "alice"
    password = "secret"

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.http_port, self.dicom_port, self.listener_port = free_ports(3)
        self.http_url = f"http://127.0.0.1:{self.http_port}"
        self.dicomweb_url = f"{self.http_url}/dicom-web"
        self.log_path = folder / "orthanc.log"
        self.config_path = folder / "orthanc.json"
        self.config_path.write_text(json.dumps(self._config(), indent=2))
        self._process: subprocess.Popen[bytes] | None = None
        self._client = httpx.Client(base_url=self.http_url, auth=(self.user, self.password), timeout=30)

    def _config(self) -> dict[str, object]:
        storage = self.folder / "storage"
        storage.mkdir(exist_ok=True)
        return {
            "Name": "cbmir-test",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.ae_title,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {self.user: self.password},
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "DicomModalities": {_MODALITY: [LISTENER_AE_TITLE, "127.0.0.1", self.listener_port]},
            "SaveJobs": False,  # a restart must not replay a push that a test started before stopping Orthanc
        }

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs (a benchmark counts its CPU time)."""
        return self._process.pid if self.running and self._process is not None else None

    def start(self) -> None:
        """Start Orthanc and wait until its REST API answers; fail with its log tail if it does not in time."""
        if self.running:
            return
        if EXECUTABLE is None:
            raise OrthancError(f"Orthanc is not installed: {INSTALL_HINT}")
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [EXECUTABLE, str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.folder,
                preexec_fn=_die_with_parent,
            )
        deadline = time.monotonic() + _START_SECONDS
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                self._process = None
                raise OrthancError(f"Orthanc exited while starting:\n{self.log_tail()}")
            with contextlib.suppress(httpx.TransportError):
                if self._client.get("/system", timeout=1).status_code == 200:
                    return
            time.sleep(0.05)
        self.kill()
        raise OrthancError(f"Orthanc did not answer within {_START_SECONDS:g} s:\n{self.log_tail()}")

    def stop(self) -> None:
        """Shut Orthanc down as an administrator would (SIGTERM, SIGKILL if it is not done in time); the storage
        stays. Orthanc takes about 3.5 s to shut down; `kill` is the fast way when a test needs no clean stop."""
        process, self._process = self._process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(_STOP_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def kill(self) -> None:
        """End Orthanc at once, as a crash would. Every instance it acknowledged is already in its storage
        (files and SQLite index are committed before it answers), so `start` finds them all again."""
        process, self._process = self._process, None
        if process is not None:
            process.kill()
            process.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        """Kill Orthanc and release the HTTP client: the end of the object's life, when its storage is thrown
        away, so there is nothing to shut down cleanly for."""
        self.kill()
        self._client.close()

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    # ------------------------------------------------------------------------------------------ REST calls

    def _checked(self, response: httpx.Response) -> httpx.Response:
        if response.is_error:
            request = response.request
            raise OrthancError(
                f"Orthanc answered {request.method} {request.url.path} with {response.status_code}: {response.text}"
            )
        return response

    def upload(self, data: bytes) -> str:
        """Store one DICOM file; its Orthanc instance id."""
        return str(self._checked(self._client.post("/instances", content=data)).json()["ID"])

    def upload_files(self, paths: Iterable[os.PathLike[str] | str]) -> list[str]:
        return [self.upload(Path(path).read_bytes()) for path in paths]

    def delete_instance(self, orthanc_id: str) -> None:
        self._checked(self._client.delete(f"/instances/{orthanc_id}"))

    def instances(self) -> list[str]:
        """Orthanc ids of all stored instances."""
        return [str(orthanc_id) for orthanc_id in self._checked(self._client.get("/instances")).json()]

    def push(self, orthanc_ids: Iterable[str]) -> None:
        """Have Orthanc send the instances by C-STORE to the modality at `listener_port` (AE "CBMIR"); returns
        once Orthanc has sent them all, and raises if any transfer failed."""
        self._checked(self._client.post(f"/modalities/{_MODALITY}/store", json=list(orthanc_ids)))
