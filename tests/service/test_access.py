"""Users, roles and the audit trail over real HTTP: a server (uvicorn on a loopback port) over a copy of the
tiny index, its users added with the `cbmir users` command, its trail read back with `cbmir audit`."""

from __future__ import annotations

import json
import shutil
import sqlite3

import httpx
import pytest
from typer.testing import CliRunner

from cbmir.access import Role
from cbmir.cli import app as cli
from cbmir.service import ServiceSettings
from cbmir.service.access import CHANGING_ROUTES, ROUTE_ROLES
from tests.service.conftest import TOKEN, start
from tests.service.test_api import phantom

# A request for each route, with an image id that exists (1) and bodies that pass the route's checks.
ROLE_CALLS = {
    "GET /v1/me": ("GET", "/v1/me"),
    "POST /v1/search": ("POST", "/v1/search"),
    "POST /v1/search/pacs": ("POST", "/v1/search/pacs"),
    "GET /v1/images/{image_id}/similar": ("GET", "/v1/images/1/similar"),
    "GET /v1/images/{image_id}/explain": ("GET", "/v1/images/1/explain?neighbour=2"),
    "POST /v1/explain": ("POST", "/v1/explain"),
    "GET /v1/images/{image_id}": ("GET", "/v1/images/1"),
    "GET /v1/images/{image_id}/thumbnail": ("GET", "/v1/images/1/thumbnail"),
    "GET /v1/images/{image_id}/original": ("GET", "/v1/images/1/original"),
    "GET /v1/codes": ("GET", "/v1/codes"),
    "GET /v1/stats": ("GET", "/v1/stats"),
    "POST /v1/annotate": ("POST", "/v1/annotate"),
    "GET /v1/annotations": ("GET", "/v1/annotations?ids=1"),
    "PUT /v1/images/{image_id}/code": ("PUT", "/v1/images/1/code"),
    "POST /v1/images": ("POST", "/v1/images"),
    "DELETE /v1/images/{image_id}": ("DELETE", "/v1/images/1"),
}


def run(*arguments: str) -> str:
    result = CliRunner().invoke(cli, list(arguments))
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.fixture(scope="module")
def served(index_parts, tmp_path_factory):
    """The service with three users (one per role) besides the server token."""
    archive, model, db = index_parts
    copy = tmp_path_factory.mktemp("access") / "db"
    shutil.copytree(db, copy)
    tokens = {role: run("users", "add", f"{role}1", "--db", str(copy), "--role", role).strip() for role in Role}
    settings = ServiceSettings(db=copy, model=model, token=TOKEN, failed_logins_per_minute=1000)
    for running in start(settings, archive):
        yield running, tokens


def client(served, role: Role | None = None, token: str | None = None) -> httpx.Client:
    running, tokens = served
    return running.client(token or tokens[role])


def audit(served, *options: str) -> list[dict]:
    running, _ = served
    output = run("audit", "show", "--db", str(running.settings.db), "--json", *options)
    return [json.loads(line) for line in output.splitlines()]


def test_every_v1_route_declares_its_role(served):
    spec = client(served, Role.reader).get("/openapi.json").json()
    routes = {f"{method.upper()} {path}" for path, item in spec["paths"].items() for method in item}
    assert {route for route in routes if " /v1/" in route} == set(ROUTE_ROLES) == set(ROLE_CALLS)
    assert set(ROUTE_ROLES) >= CHANGING_ROUTES


@pytest.mark.parametrize("role", [Role.reader, Role.annotator])
def test_a_role_is_refused_every_route_above_it_before_the_body(served, role):
    """Each refused request is a 403 from the headers alone (no body is sent), and changes nothing."""
    with client(served, role) as caller:
        before = caller.get("/v1/images/1").json()
        for route, needed in ROUTE_ROLES.items():
            if role.allows(needed):
                continue
            method, path = ROLE_CALLS[route]
            answer = caller.request(method, path, content=b"" if method in ("POST", "PUT") else None)
            assert answer.status_code == 403, (route, answer.text)
            assert answer.json()["error"] == f"{route} needs the {needed.value} role; {role.value}1 is {role.value}"
        assert caller.get("/v1/images/1").json() == before


def test_each_role_can_do_what_its_role_allows(served):
    running, _ = served
    image = phantom(running, 3).read_bytes()
    with client(served, Role.reader) as reader:
        assert reader.post("/v1/search", files={"file": ("q.png", image)}, data={"k": "3"}).status_code == 200
        assert reader.get("/v1/images/2/similar").status_code == 200
        assert reader.get("/v1/me").json()["role"] == "reader"
    with client(served, Role.annotator) as annotator:
        code = annotator.get("/v1/images/2").json()["predicted"]
        assert annotator.put("/v1/images/2/code", json={"code": code}).status_code == 200
        assert annotator.get("/v1/annotations?ids=2").status_code == 200
        me = annotator.get("/v1/me").json()
        assert me["user"] == "annotator1" and "PUT /v1/images/{image_id}/code" in me["allowed"]
        assert "POST /v1/images" not in me["allowed"]
    with client(served, Role.admin) as admin:
        added = admin.post("/v1/images", files={"files": ("new.png", image[:-12] + image[-12:])})
        assert added.status_code == 200
        assert admin.delete(f"/v1/images/{added.json()['items'][0]['id']}").status_code == 200
    with client(served, token=TOKEN) as server_token:
        assert server_token.get("/v1/me").json() == {
            "user": "server-token",
            "role": "admin",
            "allowed": sorted(ROUTE_ROLES),
        }


def test_the_audit_trail_records_who_saw_and_changed_which_images(served):
    running, _ = served
    with client(served, Role.reader) as reader:
        found = reader.post("/v1/search", files={"file": ("q.png", phantom(running, 5).read_bytes())}, data={"k": "4"})
        refused = reader.delete("/v1/images/3")
    with client(served, Role.annotator) as annotator:
        code = annotator.get("/v1/images/4").json()["predicted"]
        annotator.put("/v1/images/4/code", json={"code": code})
    with client(served, token="wrong-token-0123456789") as stranger:
        stranger.get("/v1/images/5")
    records = audit(served, "--last", "6")
    search, delete, view, change, stranger_view = records[-5:]
    assert (search["user"], search["role"], search["route"], search["status"]) == (
        "reader1",
        "reader",
        "POST /v1/search",
        200,
    )
    assert search["images"] == [hit["id"] for hit in found.json()["neighbours"]] and search["count"] == 4
    assert search["client"] == "127.0.0.1" and search["detail"]["k"] == 4
    assert (delete["route"], delete["status"], refused.status_code) == ("DELETE /v1/images/{image_id}", 403, 403)
    assert (view["user"], view["images"]) == ("annotator1", [4])
    assert (change["route"], change["images"], change["detail"]["code"]) == (
        "PUT /v1/images/{image_id}/code",
        [4],
        code,
    )
    assert (stranger_view["user"], stranger_view["status"]) == ("-", 401)
    assert [record["seq"] for record in audit(served, "--image", "4")][-2:] == [view["seq"], change["seq"]]
    assert all(record["user"] == "reader1" for record in audit(served, "--user", "reader1"))


def test_a_request_whose_audit_record_cannot_be_written_answers_nothing(served):
    running, _ = served
    store = running.settings.db / "store.sqlite"
    with sqlite3.connect(store) as db:
        db.execute("CREATE TRIGGER refuse BEFORE INSERT ON audit BEGIN SELECT RAISE(ABORT, 'disk full'); END")
    try:
        with client(served, Role.reader) as reader:
            answer = reader.get("/v1/images/1/similar")
        assert answer.status_code == 503
        assert "audit trail cannot be written" in answer.json()["error"] and "neighbours" not in answer.text
        assert "the change itself was made" not in answer.json()["error"]  # a search changes nothing
        with client(served, Role.annotator) as annotator:
            code = annotator.get("/v1/images/6").json()  # refused too: nothing is read unaudited
            assert code.get("error", "").startswith("the audit trail cannot be written")
            changed = annotator.put("/v1/images/6/code", json={"code": "1121-110-411-700"})
        assert changed.status_code == 503 and "the change itself was made" in changed.json()["error"]
    finally:
        with sqlite3.connect(store) as db:
            db.execute("DROP TRIGGER refuse")
    with client(served, Role.reader) as reader:
        assert reader.get("/v1/images/1/similar").status_code == 200


def test_audit_verify_catches_an_edited_record(served):
    running, _ = served
    db = str(running.settings.db)
    intact = CliRunner().invoke(cli, ["audit", "verify", "--db", db])
    assert intact.exit_code == 0 and intact.stdout.endswith("intact\n"), intact.output
    head = intact.stdout.split("head ")[1].split(":")[0]
    store = running.settings.db / "store.sqlite"
    with sqlite3.connect(store) as db_file:
        db_file.execute("DROP TRIGGER audit_no_update")
        db_file.execute(f"UPDATE audit SET user = 'someone-else' WHERE seq = {int(head) - 1}")
    broken = CliRunner().invoke(cli, ["audit", "verify", "--db", db])
    assert broken.exit_code == 1
    assert f"record {int(head) - 1} was changed after it was written" in broken.output
    assert "NOT intact" in broken.stdout


def test_rotated_and_disabled_tokens_are_refused_at_the_next_request(served):
    running, _ = served
    db = str(running.settings.db)
    token = run("users", "add", "temp", "--db", db, "--role", "reader").strip()
    with client(served, token=token) as caller:
        assert caller.get("/v1/stats").status_code == 200
        new = run("users", "rotate", "temp", "--db", db).strip()
        assert caller.get("/v1/stats").status_code == 401
    with client(served, token=new) as caller:
        assert caller.get("/v1/stats").status_code == 200
        run("users", "disable", "temp", "--db", db)
        assert caller.get("/v1/stats").status_code == 401
        run("users", "disable", "temp", "--db", db, "--enable")
        assert caller.get("/v1/stats").status_code == 200
    listing = run("users", "list", "--db", db)
    assert "temp" in listing and "reader1" in listing and new not in listing
    changes = [record["route"] for record in audit(served, "--user", "cli:" + __import__("getpass").getuser())]
    assert changes[-4:] == ["cbmir users add", "cbmir users rotate", "cbmir users disable", "cbmir users enable"]


def test_the_users_command_refuses_bad_input_by_name(served):
    running, _ = served
    db = str(running.settings.db)
    for arguments, message in [
        (["users", "add", "reader1", "--db", db, "--role", "reader"], "user 'reader1' already exists"),
        (["users", "add", "bad name", "--db", db, "--role", "reader"], "user name 'bad name'"),
        (["users", "rotate", "nobody", "--db", db], "no user 'nobody'"),
        (["audit", "show", "--db", db, "--since", "yesterday"], "--since 'yesterday'"),
        (["audit", "verify", "--db", db, "--head", "12"], "--head '12': expected SEQ:HASH"),
    ]:
        result = CliRunner().invoke(cli, arguments)
        assert result.exit_code == 2 and message in result.output, (arguments, result.output)


def test_wrong_tokens_are_rate_limited_per_client(index_parts, tmp_path):
    archive, model, db = index_parts
    shutil.copytree(db, tmp_path / "db")
    settings = ServiceSettings(db=tmp_path / "db", model=model, token=TOKEN, failed_logins_per_minute=3)
    for running in start(settings, archive):
        with running.client("wrong-token-0123456789") as stranger:
            assert [stranger.get("/v1/stats").status_code for _ in range(3)] == [401, 401, 401]
            limited = stranger.get("/v1/stats")
        assert limited.status_code == 429 and 55 <= int(limited.headers["retry-after"]) <= 61
        with running.client() as right:  # the same address: refused before its token is looked at
            assert right.get("/v1/stats").status_code == 429
            assert right.get("/health").status_code == 200  # outside the API: not limited
