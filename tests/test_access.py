"""HTTP access control: API keys, the Host check (DNS rebinding) and the browser Origin policy (CORS).

Two real servers with the embedding model: one with API keys from all three sources (flag, key file,
environment) and an allowed CORS origin, one without a key (the default) listing one allowed host.
The policy's pure functions have fast tests of their own at the end.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from unittest import mock

import httpx
import openai
import pytest
from werkzeug.test import EnvironBuilder
from werkzeug.wrappers import Request, Response

from conftest import EMBED_MODEL, EMBED_PATH, ROOT, ServerProcess, model_config
from frontend.access import AccessPolicy, canonical_origin, exposure_warnings, parse_host
from frontend.config import API_KEY_ENV, ConfigError, ServerConfig, add_server_flags, load_config
from frontend.errors import APIError, error_response

KEY_FLAG, KEY_FILE, KEY_ENV = "flag-key-0123456789", "file-key-0123456789", "env-key-0123456789"
ALLOWED_ORIGIN = "http://app.example:3000"
FOREIGN_ORIGIN = "http://evil.example"
ALLOWED_HOST = "lan.example"
PARIS = ROOT / "tests" / "data" / "paris"


def embed_config(extra: str = "") -> str:
    return extra + model_config(EMBED_MODEL, EMBED_PATH, kind="embedding", ctx_size=512, parallel=2, threads=1)


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def error_of(r: httpx.Response, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    error = r.json()["error"]
    assert set(error) == {"message", "type", "code", "param"} and error["code"] == code and error["message"]
    return error


def cors_headers(r: httpx.Response) -> dict:
    return {k: v for k, v in r.headers.items() if k.lower().startswith("access-control-")}


def without_key_env() -> dict:
    return {k: v for k, v in os.environ.items() if k != API_KEY_ENV}


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    """Keys from --api-key, --api-key-file and EDGELLM_API_KEY; one allowed CORS origin (a TOML list)."""
    tmp = tmp_path_factory.mktemp("keyed")
    key_file = tmp / "keys.txt"
    key_file.write_text(f"# the test's keys\n\n   {KEY_FILE}  \n# {KEY_FLAG}-commented-out\n")
    with mock.patch.dict(os.environ, {API_KEY_ENV: KEY_ENV}):
        srv = ServerProcess(embed_config(f'cors_origins = ["{ALLOWED_ORIGIN}"]\n'), tmp,
                            extra_args=["--api-key", KEY_FLAG, "--api-key-file", str(key_file)])
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def open_server(tmp_path_factory):
    """No API key (the default), one allowed host name, no CORS origin."""
    with mock.patch.dict(os.environ):
        os.environ.pop(API_KEY_ENV, None)
        srv = ServerProcess(embed_config(), tmp_path_factory.mktemp("open"),
                            extra_args=["--allowed-hosts", ALLOWED_HOST])
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def url_map(tmp_path_factory):
    """The route table of an app built as the server builds it (its model served by no worker)."""
    import server
    tmp = tmp_path_factory.mktemp("routes")
    config = parse("--model-name", EMBED_MODEL, "--model-path", str(EMBED_PATH), "--model-kind", "embedding",
                   "--workers", "0", "--store-path", str(tmp / "store.db"), "--worker-addr", f"ipc://{tmp}/w.ipc")
    app = server.create_app(config).start()
    yield app.url_map
    app.stop()


def v1_requests(url_map) -> list[tuple[str, str]]:
    """(method, path) for every method of every /v1 rule, path arguments filled in."""
    adapter = url_map.bind("localhost")
    found = []
    for rule in url_map.iter_rules():
        if rule.rule.startswith("/v1"):
            path = adapter.build(rule.endpoint, {name: "file_none" for name in rule.arguments})
            found += [(method, path) for method in sorted(rule.methods)]
    return found


# -- API keys ---------------------------------------------------------------------------------
def test_every_v1_route_needs_a_key(keyed, url_map):
    routes = v1_requests(url_map)
    assert {("POST", "/v1/chat/completions"), ("POST", "/v1/create/rag"), ("DELETE", "/v1/files/file_none"),
            ("GET", "/v1/models")} <= set(routes)
    for method, path in routes:
        r = keyed.http.request(method, path, json={} if method == "POST" else None)
        assert r.status_code == 401, (method, path, r.status_code)
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
        if method != "HEAD":
            error_of(r, 401, "invalid_api_key")
        r = keyed.http.request(method, path, json={} if method == "POST" else None, headers=bearer(KEY_FLAG))
        assert r.status_code != 401, (method, path, r.text)
        assert "WWW-Authenticate" not in r.headers


def test_missing_wrong_and_right_keys(keyed):
    def models(headers):
        return keyed.http.get("/v1/models", headers=headers)

    error = error_of(models({}), 401, "invalid_api_key")
    assert error["type"] == "authentication_error" and "Authorization: Bearer" in error["message"]
    for headers in (bearer("wrong"), bearer(KEY_FLAG + "x"), bearer(KEY_FLAG[:-1]), {"x-api-key": "wrong"},
                    {"Authorization": KEY_FLAG}, {"Authorization": f"Basic {KEY_FLAG}"}, {"Authorization": "Bearer"}):
        r = models(headers)
        assert error_of(r, 401, "invalid_api_key")["type"] == "authentication_error", headers
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
    for key in (KEY_FLAG, KEY_FILE, KEY_ENV):  # the flag, the key file and the environment variable
        for headers in (bearer(key), {"x-api-key": key}, {"Authorization": f"bearer  {key}"}):
            assert models(headers).status_code == 200, headers
    assert models({"Authorization": "Bearer wrong", "x-api-key": KEY_ENV}).status_code == 200


def test_health_is_public_but_shows_workers_only_with_a_key(keyed):
    anonymous = keyed.http.get("/health")
    assert anonymous.status_code == 200
    assert anonymous.json() == {"status": "ok", "waiting_for": [], "failed": []}
    full = keyed.http.get("/health", headers=bearer(KEY_ENV)).json()
    [worker] = full["models"][EMBED_MODEL]["workers"]
    assert worker["pid"] and str(worker["pid"]) not in anonymous.text
    assert keyed.http.get("/health", headers=bearer("wrong")).json() == anonymous.json()


def test_the_openai_client_sends_its_key(keyed):
    client = openai.OpenAI(base_url=f"{keyed.url}/v1", api_key=KEY_FILE, max_retries=0, timeout=120)
    result = client.embeddings.create(model=EMBED_MODEL, input="Paris is the capital of France")
    assert len(result.data[0].embedding) == 384
    wrong = openai.OpenAI(base_url=f"{keyed.url}/v1", api_key="sk-wrong", max_retries=0, timeout=120)
    with pytest.raises(openai.AuthenticationError) as caught:
        wrong.models.list()
    assert caught.value.status_code == 401 and caught.value.code == "invalid_api_key"


def test_ingest_cli_sends_the_key(keyed):
    def ingest(*args, env):
        return subprocess.run([sys.executable, str(ROOT / "server.py"), "ingest", str(PARIS), "--server", keyed.url,
                               "--collection", "paris", *args], env=env, capture_output=True, text=True,
                              timeout=300)

    refused = ingest(env=without_key_env())
    assert refused.returncode == 2, refused.stderr
    assert "HTTP 401" in refused.stderr and "--api-key" in refused.stderr and API_KEY_ENV in refused.stderr
    assert keyed.http.get("/v1/files", headers=bearer(KEY_FLAG)).json()["data"] == []
    done = ingest("--api-key", KEY_FLAG, env=without_key_env())
    assert done.returncode == 0, done.stderr
    assert "4 added" in done.stdout and "0 failed" in done.stdout
    again = ingest(env={**without_key_env(), API_KEY_ENV: KEY_ENV})
    assert again.returncode == 0, again.stderr
    assert "4 unchanged" in again.stdout
    assert len(keyed.http.get("/v1/files", headers=bearer(KEY_FLAG)).json()["data"]) == 4


def test_with_a_key_the_host_is_not_checked(keyed):
    r = keyed.http.get("/v1/models", headers={**bearer(KEY_FLAG), "Host": "rebound.example"})
    assert r.status_code == 200


# -- CORS and Origin --------------------------------------------------------------------------
def test_an_allowed_origin_gets_cors_headers(keyed):
    r = keyed.http.get("/v1/models", headers={**bearer(KEY_FLAG), "Origin": ALLOWED_ORIGIN})
    assert r.status_code == 200
    assert r.headers["Access-Control-Allow-Origin"] == ALLOWED_ORIGIN and "Origin" in r.headers["Vary"]
    r = keyed.http.post("/v1/embeddings", json={"model": EMBED_MODEL, "input": "hi"},
                        headers={**bearer(KEY_FLAG), "Origin": ALLOWED_ORIGIN})
    assert r.status_code == 200 and r.headers["Access-Control-Allow-Origin"] == ALLOWED_ORIGIN
    r = keyed.http.get("/v1/models", headers={"Origin": ALLOWED_ORIGIN})  # the page can read why it failed
    assert r.status_code == 401 and r.headers["Access-Control-Allow-Origin"] == ALLOWED_ORIGIN
    r = keyed.http.get("/v1/models", headers={**bearer(KEY_FLAG), "Origin": FOREIGN_ORIGIN})
    assert r.status_code == 200 and cors_headers(r) == {}


def test_a_preflight_from_an_allowed_origin_is_answered_without_a_key(keyed):
    preflight = {"Origin": ALLOWED_ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os, bad header"}
    r = keyed.http.options("/v1/chat/completions", headers=preflight)
    assert r.status_code == 204, r.text
    assert r.headers["Access-Control-Allow-Origin"] == ALLOWED_ORIGIN
    assert "POST" in r.headers["Access-Control-Allow-Methods"]
    allowed = [h.strip().lower() for h in r.headers["Access-Control-Allow-Headers"].split(",")]
    assert {"authorization", "content-type", "x-stainless-os"} <= set(allowed) and "bad header" not in allowed
    r = keyed.http.options("/v1/chat/completions", headers={**preflight, "Origin": FOREIGN_ORIGIN})
    error_of(r, 403, "origin_not_allowed")
    assert cors_headers(r) == {}


def test_no_cors_headers_by_default(open_server):
    r = open_server.http.get("/v1/models", headers={"Origin": ALLOWED_ORIGIN})
    assert r.status_code == 200 and cors_headers(r) == {} and "Vary" not in r.headers
    r = open_server.http.options("/v1/embeddings", headers={"Origin": ALLOWED_ORIGIN,
                                                            "Access-Control-Request-Method": "POST"})
    error_of(r, 403, "origin_not_allowed")
    assert cors_headers(r) == {}


def test_foreign_pages_cannot_post(open_server):
    """What a web page on another site may send without a preflight: text/plain and multipart POSTs."""
    foreign = {"Origin": FOREIGN_ORIGIN}
    r = open_server.http.post("/v1/chat/completions", headers={**foreign, "Content-Type": "text/plain"},
                              content=b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}')
    error = error_of(r, 403, "origin_not_allowed")
    assert error["type"] == "permission_error" and "--cors-origins" in error["message"]
    upload = {"file": ("notes.md", b"# Notes\n\nParis is in France.\n", "text/markdown")}
    r = open_server.http.post("/v1/create/rag", headers=foreign, files=upload, data={"collection": "web"})
    error_of(r, 403, "origin_not_allowed")
    error_of(open_server.http.post("/v1/files", headers={"Origin": "null"}, files=upload), 403, "origin_not_allowed")
    assert open_server.http.get("/v1/files").json()["data"] == []  # nothing was stored
    same_origin = {"Origin": open_server.url}  # the server's own pages (scheme://Host)
    r = open_server.http.post("/v1/create/rag", headers=same_origin, files=upload, data={"collection": "web"})
    assert r.status_code == 200, r.text
    [stored] = open_server.http.get("/v1/files").json()["data"]
    error_of(open_server.http.delete(f"/v1/files/{stored['id']}", headers=foreign), 403, "origin_not_allowed")
    assert open_server.http.delete(f"/v1/files/{stored['id']}").status_code == 200  # no Origin: curl, SDKs


# -- Host -------------------------------------------------------------------------------------
def test_foreign_host_is_refused_without_a_key(open_server):
    port = open_server.port
    for host in (f"rebound.example:{port}", "rebound.example", "192.0.2.1", f"{ALLOWED_HOST}.evil:{port}", "a b"):
        for path in ("/v1/models", "/health"):
            error = error_of(open_server.http.get(path, headers={"Host": host}), 403, "host_not_allowed")
            assert "--allowed-hosts" in error["message"] and "--api-key" in error["message"]
    for host in (f"{ALLOWED_HOST}:{port}", ALLOWED_HOST.upper(), f"localhost:{port}", f"127.0.0.2:{port}",
                 f"[::1]:{port}"):
        assert open_server.http.get("/v1/models", headers={"Host": host}).status_code == 200, host
    assert "models" in open_server.http.get("/health").json()  # no key configured: the full view


def test_a_malformed_host_is_a_400_not_a_500(open_server):
    """Host names Werkzeug cannot encode (empty or over-long DNS labels) are refused as bad requests,
    without a traceback in the log."""
    for host in ("localhost..", "..", ".", "a" * 64):
        for path in ("/v1/models", "/health"):
            r = open_server.http.get(path, headers={"Host": host})
            assert r.status_code in (400, 403), (host, r.status_code)
            assert r.json()["error"]["code"] in ("http_error", "host_not_allowed")
    assert "Traceback" not in open_server.log_text()


# -- the policy's pure functions (fast, no server) -----------------------------------------------
def make_request(path="/v1/models", method="GET", headers=None, host="127.0.0.1:8080") -> Request:
    return Request(EnvironBuilder(path=path, method=method, headers={"Host": host, **(headers or {})}).get_environ())


def admit(policy: AccessPolicy, req: Request):
    try:
        return policy.admit(req, lambda: ["GET", "POST"])
    except APIError as exc:
        return exc.code


def test_policy_api_keys():
    policy = AccessPolicy(api_keys=["k1", "k2"])
    assert admit(policy, make_request()) == "invalid_api_key"
    assert admit(policy, make_request(headers=bearer("k2"))) is None
    assert admit(policy, make_request(headers={"X-API-Key": "k1"})) is None
    assert admit(policy, make_request(headers=bearer("k3"))) == "invalid_api_key"
    assert admit(policy, make_request("/health")) is None  # public
    assert admit(policy, make_request("/nothing")) == "invalid_api_key"  # every other path, known or not
    assert admit(policy, make_request(headers={"Authorization": "Bearer \xe9"})) == "invalid_api_key"
    assert admit(AccessPolicy(), make_request(headers=bearer("anything"))) is None


def test_policy_host_check():
    policy = AccessPolicy(allowed_hosts=["Box.Lan"], bind_host="0.0.0.0")
    for host in ("localhost", "LOCALHOST.:1", "127.9.9.9:80", "[::1]", "box.lan:8080", "BOX.LAN."):
        assert policy.host_allowed(host), host
    for host in ("0.0.0.0", "evil.example", "[::2]", "box.lan.evil", "box.lan:99999", "", "a@localhost", "::1"):
        assert not policy.host_allowed(host), host
    assert policy.host_allowed(None)  # no Host header: not a browser
    assert AccessPolicy(bind_host="192.168.1.10").host_allowed("192.168.1.10:8080")
    assert not AccessPolicy(bind_host="::").host_allowed("[::]:8080")
    assert AccessPolicy(allowed_hosts=["*"]).host_allowed("anything.example")
    assert admit(AccessPolicy(), make_request(host="evil.example")) == "host_not_allowed"
    assert admit(AccessPolicy(api_keys=["k"]), make_request(host="evil.example", headers=bearer("k"))) is None


def test_policy_origins():
    policy = AccessPolicy(cors_origins=["http://app.example:3000"])
    post = {"method": "POST", "path": "/v1/chat/completions"}
    assert admit(policy, make_request(**post, headers={"Origin": "http://evil.example"})) == "origin_not_allowed"
    assert admit(policy, make_request(**post, headers={"Origin": "http://app.example:3000"})) is None
    assert admit(policy, make_request(**post, headers={"Origin": "http://127.0.0.1:8080"})) is None  # same origin
    assert admit(policy, make_request(**post, headers={"Origin": "https://127.0.0.1:8080"})) == "origin_not_allowed"
    assert admit(policy, make_request(**post, headers={"Origin": "http://localhost"}, host="localhost:80")) is None
    assert admit(policy, make_request(**post)) is None  # no Origin: not a browser
    # a GET: the page cannot read the answer
    assert admit(policy, make_request(headers={"Origin": "http://evil.example"})) is None
    preflight = {"Origin": "http://app.example:3000", "Access-Control-Request-Method": "POST"}
    answer = admit(policy, make_request(method="OPTIONS", headers=preflight))
    assert isinstance(answer, Response) and answer.status_code == 204
    assert answer.headers["Access-Control-Allow-Methods"] == "GET, OPTIONS, POST"
    any_origin = AccessPolicy(cors_origins=["*"])
    assert any_origin.cors_allowed("https://anywhere.example") and not any_origin.cors_allowed("null")
    response = any_origin.add_cors_headers(make_request(headers={"Origin": "https://x.example"}), Response())
    assert response.headers["Access-Control-Allow-Origin"] == "https://x.example"
    assert response.headers["Vary"] == "Origin"
    assert "Vary" not in AccessPolicy().add_cors_headers(make_request(headers={"Origin": "https://x.example"}),
                                                         Response()).headers


def test_parsing_hosts_and_origins():
    assert parse_host("[::1]:8080") == ("::1", 8080) and parse_host("Example.COM.") == ("example.com", None)
    assert parse_host("x" * 300) is None and parse_host("host:0") is None and parse_host("[zz::1]") is None
    assert canonical_origin("HTTP://Example.com:80") == "http://example.com"
    assert canonical_origin("https://[::1]:443") == "https://[::1]"
    assert canonical_origin("http://example.com:8080") == "http://example.com:8080"
    for bad in ("null", "http://example.com/", "example.com", "http://user@example.com", "", None,
                "http://exa mple.com", "http://example.com\r\nX: y"):
        assert canonical_origin(bad) is None, bad


def test_error_response_challenges_only_for_a_missing_key():
    response = error_response(APIError("invalid_api_key", "no"))
    assert response.status_code == 401 and response.headers["WWW-Authenticate"].startswith("Bearer")
    assert "WWW-Authenticate" not in error_response(APIError("origin_not_allowed", "no")).headers


def test_exposure_warnings():
    [warning] = exposure_warnings("0.0.0.0", (), ())
    assert "--api-key" in warning and "127.0.0.1" in warning
    assert exposure_warnings("0.0.0.0", ("k",), ()) == []
    assert exposure_warnings("127.0.0.1", (), ()) == [] and exposure_warnings("localhost", (), ()) == []
    assert exposure_warnings("::1", (), ()) == []
    assert len(exposure_warnings("127.0.0.1", (), ("*",))) == 1


# -- configuration --------------------------------------------------------------------------------
def parse(*argv: str, environ: dict | None = None) -> ServerConfig:
    parser = argparse.ArgumentParser()
    add_server_flags(parser)
    return load_config(parser.parse_args(list(argv)), environ={} if environ is None else environ)


@pytest.fixture()
def model_args(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF")
    return ["--model-name", "m", "--model-path", str(path)]


def test_config_defaults_bind_to_loopback_without_keys(model_args):
    config = parse(*model_args)
    assert config.host == "127.0.0.1" == ServerConfig.host
    assert (config.api_keys, config.cors_origins, config.allowed_hosts) == ((), (), ())


def test_config_collects_keys_from_every_source(tmp_path, model_args):
    keys = tmp_path / "keys.txt"
    keys.write_text("# comment\n\n  k-file  \n")
    config = parse(*model_args, "--api-key", "k1", "--api-key", "k2,k3", "--api-key-file", str(keys),
                   environ={API_KEY_ENV: " k-env "})
    assert config.api_keys == ("k1", "k2", "k3", "k-file", "k-env")
    toml = tmp_path / "edgellm.toml"
    toml.write_text('api_keys = ["t1", "t2"]\napi_key_file = "keys.txt"\ncors_origins = ["http://a.example", '
                    '"https://b.example:8443"]\nallowed_hosts = ["box.lan"]\n'
                    f'[[models]]\nname = "m"\npath = "{model_args[-1]}"\n')
    config = parse("--config", str(toml))
    assert config.api_keys == ("t1", "t2", "k-file")  # the key file is relative to the config file
    assert config.cors_origins == ("http://a.example", "https://b.example:8443")
    assert config.allowed_hosts == ("box.lan",)
    config = parse("--config", str(toml), "--api-key", "cli", "--cors-origins", "*")
    assert config.api_keys == ("cli", "k-file") and config.cors_origins == ("*",)  # flags override the file
    assert parse(*model_args, environ={API_KEY_ENV: ""}).api_keys == ()


@pytest.mark.parametrize("argv, message", [
    (["--api-key", "has space"], "visible ASCII"),
    (["--api-key-file", "/nonexistent/keys"], "cannot read the API key file"),
    (["--api-key-file", "{empty}"], "holds no key"),
    (["--cors-origins", "app.example"], "scheme://host"),
    (["--cors-origins", "http://app.example/path"], "scheme://host"),
    (["--allowed-hosts", "box.lan:8080"], "without a port"),
])
def test_bad_access_settings_are_refused(tmp_path, model_args, argv, message):
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    with pytest.raises(ConfigError, match=message):
        parse(*model_args, *[a.replace("{empty}", str(empty)) for a in argv])
