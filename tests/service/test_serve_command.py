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
