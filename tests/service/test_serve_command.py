"""`cbmir serve` as a user starts it: a real process on a free loopback port."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time

import cv2
import httpx
import numpy as np
import pytest

from cbmir.service import ServiceSettings
from tests.service.conftest import TOKEN, start


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serve_never_prints_the_token(index_parts, tmp_path):
    """Issue 12, defect 12: the token from --token-file (or the environment) went to standard output, and so
    into logs."""
    _, model, shared_db = index_parts
    db = shutil.copytree(shared_db, tmp_path / "db")  # the other tests' index stays untouched
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    port = free_port()
    command = [sys.executable, "-m", "cbmir", "serve", "--db", str(db), "--model", str(model)]
    server = subprocess.Popen(
        [*command, "--token-file", str(token_file), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None and time.monotonic() < deadline, "the server did not start"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        answer = httpx.get(f"http://127.0.0.1:{port}/v1/stats", headers={"Authorization": f"Bearer {TOKEN}"})
        assert answer.status_code == 200
    finally:
        server.terminate()
        output, _ = server.communicate(timeout=30)
    assert "every /v1 request needs the token" in output
    assert TOKEN not in output


def test_leftovers_of_a_killed_server_are_removed_when_it_starts(index_parts, tmp_path):
    """Issue 12, defect 11: temporary upload files left by a kill were never cleaned up."""
    archive, model, shared_db = index_parts
    db = shutil.copytree(shared_db, tmp_path / "db")
    settings = ServiceSettings(db=db, model=model, token=TOKEN)
    pixels = np.random.default_rng(5).integers(0, 255, (60, 40), dtype=np.uint8)
    for running in start(settings, archive):
        with running.client() as client:
            added = client.post("/v1/images", files={"files": ("kept.png", cv2.imencode(".png", pixels)[1].tobytes())})
            assert added.status_code == 200, added.text
    uploads, thumbnails = db / "uploads", db / "thumbnails"
    survivors = sorted(path.name for path in uploads.iterdir())
    planted = [uploads / ".0123abcd.png.1a2b3c4d.tmp", thumbnails / ".7.png.5e6f7a8b.tmp", uploads / f"{'ab' * 32}.png"]
    for path in planted:
        path.write_bytes(b"half-written")
    for _ in start(settings, archive):
        assert not any(path.exists() for path in planted)
        assert sorted(path.name for path in uploads.iterdir()) == survivors


@pytest.mark.timeout(60)
def test_a_body_that_stops_arriving_is_answered_408(index_parts, tmp_path):
    """Issue 12, defect 8: a body that stopped short of its Content-Length held the connection for minutes."""
    archive, model, shared_db = index_parts
    db = shutil.copytree(shared_db, tmp_path / "db")
    settings = ServiceSettings(db=db, model=model, token=TOKEN, body_timeout_seconds=1)
    for running in start(settings, archive):
        host, port = running.url.removeprefix("http://").split(":")
        head = (
            f"POST /v1/search HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            "Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 100000\r\n\r\n--b\r\n"
        )
        with socket.create_connection((host, int(port)), timeout=20) as connection:
            connection.sendall(head.encode())  # then nothing more of the 100 kB it announces
            started = time.monotonic()
            answer = ""
            while chunk := connection.recv(4096).decode(errors="replace"):  # until the server closes
                answer += chunk
        assert answer.startswith("HTTP/1.1 408"), answer[:300]
        assert "the request body stopped arriving" in answer
        assert time.monotonic() - started < 10
        with running.client() as client:  # and the server goes on answering
            assert client.get("/v1/stats").status_code == 200
