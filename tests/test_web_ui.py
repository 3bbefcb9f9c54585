"""The web chat page (frontend/web_ui.py, frontend/webui/), in a real browser: Debian's chromium,
headless, driven by selenium (tests/browser.py).

The real model answers on the session server; a keyed server with fake workers (tests/fake_worker.py)
plays a model that answers hostile markup, one that never stops, one that dies mid-answer and one
with no worker at all (a 503). Nothing here asserts what the real model says: only what the page
and the server control (what was sent, what is shown, the slots the server frees).
"""

from __future__ import annotations

import re
import time

import httpx
import pytest

from conftest import CHAT_MODEL, EMBED_MODEL, EMBED_PATH, GEMMA_MODEL, ROOT, ServerProcess, model_config, \
    start_fake_worker, wait_for
from frontend.web_ui import ASSET_DIR, ASSETS

from selenium.webdriver.common.keys import Keys

from browser import PHONE, Page, browser_problem, chrome

KEY = "sk-web-page-test"
HOSTILE = "<img src=x onerror=alert(1)> and <b>bold</b>\n\n```html\n<script>alert(2)</script>\n```\n\nafter"
STATS = re.compile(r"^(\d+) tokens? · first token \d+ ms( · [\d.]+ tokens/s)?$")

# The fake models' context is 512 tokens: the page's default max tokens (512) would not fit.
FAKE_STORAGE = {"edgellm.apiKey": KEY, "edgellm.settings": {"maxTokens": "100"}}

needs_browser = pytest.mark.skipif(browser_problem() is not None, reason=browser_problem() or "")


# -- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fakes(tmp_path_factory):
    """A server that needs an API key, with fake models: 'fake-html' answers HOSTILE, 'fake-trickle'
    never ends on its own, 'fake-die' dies after its first chunk, 'fake-absent' has no worker."""
    config = f'queue_timeout = 1.0\napi_keys = ["{KEY}"]\n' + "".join(
        model_config(name, ROOT / "no-model-file.gguf", workers=0)
        for name in ("fake-html", "fake-trickle", "fake-die", "fake-absent"))
    config += model_config(EMBED_MODEL, EMBED_PATH, kind="embedding", workers=0)
    srv = ServerProcess(config, tmp_path_factory.mktemp("web-fakes"))
    srv.http.headers["Authorization"] = f"Bearer {KEY}"
    workers = [start_fake_worker(srv, "text", "fake-html", "--text", HOSTILE),
               start_fake_worker(srv, "trickle", "fake-trickle"), start_fake_worker(srv, "die", "fake-die")]
    yield srv
    for proc in workers:
        proc.kill()
        proc.wait()
    srv.stop()


@pytest.fixture(scope="module")
def desktop():
    if browser_problem():
        pytest.skip(browser_problem())
    driver = chrome()
    yield driver
    driver.quit()


def chat_free_slots(server) -> int:
    return server.health()["models"][CHAT_MODEL]["free_slots"]


# -- served by the front end (no browser) -------------------------------------------------------
def test_page_is_served_from_the_package(server):
    page = server.http.get("/")
    assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
    assert page.headers["x-content-type-options"] == "nosniff"
    total = 0
    for name, media_type in ASSETS.items():
        r = server.http.get(f"/ui/{name}")
        assert r.status_code == 200 and r.headers["content-type"] == media_type, name
        assert r.content == (ASSET_DIR / name).read_bytes()
        body = r.content.replace(b'xmlns="http://www.w3.org/2000/svg"', b"")  # a namespace name, not a load
        assert not re.search(rb"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", body, re.I), f"{name} loads from elsewhere"
        total += len(r.content)
        again = server.http.get(f"/ui/{name}", headers={"If-None-Match": r.headers["etag"]})
        assert again.status_code == 304
    assert total < 100_000, f"the page's files weigh {total} bytes"
    assert sorted(ASSETS) == sorted(p.name for p in ASSET_DIR.iterdir())  # every file shipped is served
    icon = server.http.get("/favicon.ico")  # browsers ask for it on their own: no 404 in their console
    assert icon.status_code == 200 and icon.content == (ASSET_DIR / "icon.svg").read_bytes()
    assert icon.headers["content-type"] == "image/svg+xml"
    missing = server.http.get("/ui/../server.py")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert server.http.get("/ui/secret.txt").status_code == 404


def test_collections_are_listed(server):
    r = server.http.get("/v1/collections")
    assert r.status_code == 200 and r.json()["object"] == "list"
    models = server.http.get("/v1/models").json()["data"]
    assert {m["id"]: m["kind"] for m in models} == {CHAT_MODEL: "chat", GEMMA_MODEL: "chat", EMBED_MODEL: "embedding"}


def test_page_needs_no_key_but_the_api_does(fakes):
    bare = httpx.Client(base_url=fakes.url)
    for path in ("/", "/ui/app.js", "/ui/style.css", "/favicon.ico"):
        assert bare.get(path).status_code == 200, path
    for path in ("/v1/models", "/v1/collections", "/ui/nothing"):
        assert bare.get(path).status_code == 401, path
    bare.close()


def test_web_ui_can_be_turned_off(tmp_path_factory):
    config = model_config(EMBED_MODEL, EMBED_PATH, kind="embedding", workers=0)
    srv = ServerProcess("web_ui = false\n" + config, tmp_path_factory.mktemp("web-off"))
    try:
        for path in ("/", "/ui/app.js", "/favicon.ico"):
            r = srv.http.get(path)
            assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", path
    finally:
        srv.stop()
    srv = ServerProcess(config, tmp_path_factory.mktemp("web-off-flag"), extra_args=["--no-web-ui"])
    try:
        assert srv.http.get("/").status_code == 404
    finally:
        srv.stop()


# -- in the browser: the real model ---------------------------------------------------------------
@needs_browser
def test_page_loads_with_no_console_errors(server, desktop):
    page = Page(desktop, server.url)
    assert page.wait_models() == [CHAT_MODEL, GEMMA_MODEL]  # chat models only, not the embedding one
    time.sleep(0.5)
    assert page.console_errors() == []
    assert page.js("return document.documentElement.scrollWidth <= window.innerWidth")
    labelled = page.js("return [...document.querySelectorAll('input, select, textarea')].filter(e => "
                       "!e.labels.length && !e.getAttribute('aria-label')).map(e => e.id)")
    assert labelled == []


@needs_browser
def test_damaged_browser_storage_does_not_stop_the_page(server, desktop):
    chat = [5, None, {"role": "x", "content": "?"}, {"role": "user", "content": 5},
            {"role": "user", "content": "kept"}, {"role": "assistant", "content": "also kept",
                                                 "stats": {"tokens": 1, "tokens_per_s": "x"}, "sources": "abc"}]
    page = Page(desktop, server.url, {"edgellm.chat": chat, "edgellm.settings": [1]})
    assert page.wait_models()
    assert [r["body"] for r in page.replies()] == ["also kept"] and page.last_reply()["stats"] == "1 token"
    assert page.console_errors() == []


@needs_browser
def test_answer_streams_continues_survives_a_reload_and_clears(server, desktop):
    page = Page(desktop, server.url)
    page.wait_models()
    page.set_value("system", "You are a counting assistant.")
    page.set_value("max-tokens", "100")
    page.set_value("temperature", "0")
    box = page.el("prompt")
    box.send_keys("Count from 1 to 100,")
    box.send_keys(Keys.SHIFT, Keys.ENTER)  # a new line, not a send
    box.send_keys("separated by commas.")
    assert page.replies() == [] and box.get_attribute("value") == "Count from 1 to 100,\nseparated by commas."
    page.js(  # the reply's length at every change of the page while it is pending, seen from inside
        "window.lengths = []; new MutationObserver(() => { const m = document.querySelector("
        "'#conversation .msg.assistant:last-of-type'); if (m && m.querySelector('.pending')) "
        "window.lengths.push(m.querySelector('.body').textContent.length); })"
        ".observe(document.getElementById('conversation'), {childList: true, subtree: true});")
    box.send_keys(Keys.ENTER)
    first = page.wait_answered()
    lengths = sorted(set(page.js("return window.lengths")) - {0})
    assert len(lengths) >= 3, f"the answer did not grow while it streamed: lengths {lengths}"
    assert first["error"] is None and first["note"] in (None, "The answer reached the max tokens limit.")
    tokens = int(STATS.match(first["stats"]).group(1))
    assert 0 < tokens <= 100
    [request] = page.sent("/v1/chat/completions")
    assert request["messages"] == [{"role": "system", "content": "You are a counting assistant."},
                                   {"role": "user", "content": "Count from 1 to 100,\nseparated by commas."}]
    assert request["stream"] is True and request["stream_options"] == {"include_usage": True}
    assert (request["model"], request["max_tokens"], request["temperature"]) == (CHAT_MODEL, 100, 0)

    page.send("And now backwards.")
    page.wait_answered()
    second = page.sent("/v1/chat/completions")[1]
    answer = page.js("return JSON.parse(localStorage.getItem('edgellm.chat'))[1].content")
    assert second["messages"][1:] == [
        {"role": "user", "content": "Count from 1 to 100,\nseparated by commas."},
        {"role": "assistant", "content": answer}, {"role": "user", "content": "And now backwards."}]
    shown = page.text("conversation")

    page.load()  # a reload keeps the conversation and the settings
    assert page.text("conversation") == shown
    assert page.el("system").get_attribute("value") == "You are a counting assistant."
    page.el("clear").click()
    assert page.replies() == []
    page.load()
    assert page.replies() == [] and page.text("conversation") == ""


@needs_browser
def test_stop_cancels_the_job_and_frees_its_slot(server, desktop):
    page = Page(desktop, server.url)
    page.wait_models()
    page.set_value("max-tokens", "1500")
    page.set_value("temperature", "1.5")
    full = chat_free_slots(server)
    for _ in range(3):  # sampled at temperature 1.5, the model could still end before Stop is clicked
        page.send("Write a very long story about a dragon who learns to cook.")
        page.wait(lambda: len(page.last_reply().get("body", "")) > 10 or not page.last_reply()["pending"], 60,
                  "the answer to start")
        generating = wait_for(lambda: chat_free_slots(server) == full - 1 or not page.last_reply()["pending"], 5)
        assert generating, "the job holds no slot while its answer streams"
        page.el("stop").click()
        reply = page.wait_answered(10)
        if reply["note"] == "Stopped.":
            break
        assert reply["stats"] and reply["note"] is None, reply  # it ended by itself: try again
    assert reply["note"] == "Stopped." and reply["stats"] is None
    assert wait_for(lambda: chat_free_slots(server) == full, timeout=5), "the slot was not freed"
    assert page.no_alert()


@needs_browser
def test_upload_a_document_and_see_its_sources_under_the_answer(server, desktop, tmp_path):
    collection = f"web-{time.monotonic_ns()}"
    doc = tmp_path / "zorblat.md"
    doc.write_text("# The Zorblat festival\n\nThe Zorblat festival is held in the town of Quenton every "
                   "March. Visitors bring lanterns shaped like fish.\n")
    page = Page(desktop, server.url)
    page.wait_models()
    page.set_value("collection", collection)
    page.el("file").send_keys(str(doc))
    page.el("upload").click()
    status = page.wait(lambda: re.fullmatch(rf"zorblat\.md: added, (\d+) chunks? in collection '{collection}'\.",
                                            page.text("upload-status")), 60, "the upload's result")
    assert int(status.group(1)) >= 1
    assert not page.el("upload-progress").is_displayed() and page.el("upload").is_enabled()
    page.wait(lambda: collection in page.js("return [...document.querySelectorAll('#collections option')]"
                                            ".map(o => o.value)"), 10, "the new collection in the list")
    page.el("upload").click()  # the same file again
    page.wait(lambda: page.text("upload-status").startswith("zorblat.md: unchanged,"), 60, "unchanged")

    assert page.el("use-docs").is_selected()  # an upload turns retrieval on
    page.set_value("max-tokens", "30")
    page.send("When is the Zorblat festival held?")
    reply = page.wait_answered()
    [retrieval] = page.sent("/v1/retrieve")
    assert retrieval == {"messages": [{"role": "user", "content": "When is the Zorblat festival held?"}],
                         "collection": collection}
    points = server.http.post("/v1/retrieve", json={**retrieval}).json()["points"]
    assert points and "Quenton" in points[0]["source"]
    assert reply["sources"].startswith(f"{len(points)} source")
    assert f"score {points[0]['score']:.3f}" in reply["sources"] and "Quenton" in reply["sources"]
    [request] = page.sent("/v1/chat/completions")
    assert request["rag"] is False and request["messages"][0]["role"] == "system"
    assert points[0]["source"] in request["messages"][0]["content"]


@needs_browser
def test_upload_shows_its_progress(server, desktop, tmp_path):
    doc = tmp_path / "long-notes.txt"  # about 600 chunks: the server takes a while to embed it
    doc.write_text("".join(f"Note {i}: shelf {i % 97} holds {i * 7 % 1013} jars of item {i * 13 % 389}.\n"
                           for i in range(2500)))
    page = Page(desktop, server.url)
    page.wait_models()
    page.set_value("collection", f"web-long-{time.monotonic_ns()}")
    page.el("file").send_keys(str(doc))
    page.el("upload").click()
    seen = page.wait(lambda: page.js("const p = document.getElementById('upload-progress'); return !p.hidden && "
                                     "document.getElementById('upload-status').innerText"), 10, "the progress")
    assert seen.startswith(("Uploading long-notes.txt", "Uploaded long-notes.txt; the server is splitting"))
    assert not page.el("upload").is_enabled()  # one upload at a time
    page.wait(lambda: re.fullmatch(r"long-notes\.txt: added, \d+ chunks in collection 'web-long-\d+'\.",
                                   page.text("upload-status")), 120, "the upload's result")
    assert not page.el("upload-progress").is_displayed()


@needs_browser
def test_phone_layout_light_and_dark(server):
    if browser_problem():
        pytest.skip(browser_problem())
    long_code = "x = [" + ", ".join(str(i) for i in range(200)) + "]"
    chat = [{"role": "user", "content": "a" * 300}, {"role": "assistant", "content": f"```python\n{long_code}\n```",
                                                      "model": CHAT_MODEL}]
    colours = {}
    for dark in (False, True):
        driver = chrome(phone=True, dark=dark)
        try:
            page = Page(driver, server.url, {"edgellm.chat": chat})
            page.wait_models()
            widths = page.js("return [window.innerWidth, document.documentElement.scrollWidth]")
            assert widths == [PHONE["width"], PHONE["width"]], "the page scrolls sideways on a phone"
            assert not page.el("settings").get_attribute("open")  # folded away on a small screen
            for element_id in ("model", "prompt", "send", "stop", "clear"):
                rect = page.el(element_id).rect
                assert rect["x"] >= 0 and rect["x"] + rect["width"] <= PHONE["width"], element_id
            colours[dark] = page.js("return getComputedStyle(document.body).backgroundColor")
            assert page.console_errors() == []
        finally:
            driver.quit()
    assert colours[False] == "rgb(255, 255, 255)" and colours[True] == "rgb(21, 24, 29)"


@needs_browser
def test_focus_is_visible_for_keyboard_users(server, desktop):
    page = Page(desktop, server.url)
    page.wait_models()
    page.el("prompt").send_keys(Keys.TAB)  # from the message box to the Send button, by keyboard
    focused = page.js("const e = document.activeElement; return [e.id, getComputedStyle(e).outlineStyle]")
    assert focused == ["send", "solid"]


# -- in the browser: fakes for what a real model cannot be made to do ----------------------------------
@needs_browser
def test_api_key_prompt(fakes, desktop):
    page = Page(desktop, fakes.url, {"edgellm.settings": FAKE_STORAGE["edgellm.settings"]})
    page.wait(lambda: page.el("key-dialog").is_displayed(), 10, "the key prompt")
    page.el("api-key").send_keys(Keys.ESCAPE)  # dismissed: the page says what is missing
    page.wait(lambda: page.text("banner").startswith("This server needs an API key"), 5, "the banner")
    page.el("key-button").click()
    page.el("api-key").send_keys("has space", Keys.ENTER)  # not a key any server accepts
    assert page.text("key-reason").startswith("An API key is 1 to 512 visible ASCII characters")
    assert page.el("key-dialog").is_displayed()
    page.el("key-cancel").click()
    page.load()
    page.wait(lambda: page.el("key-dialog").is_displayed(), 10, "the key prompt")
    assert page.text("key-reason") == "This server needs an API key."
    page.el("api-key").send_keys("sk-wrong", Keys.ENTER)
    page.wait(lambda: "not accepted" in page.text("key-reason"), 10, "the prompt to come back")
    assert page.el("key-dialog").is_displayed() and page.models() == []
    page.el("api-key").send_keys(KEY, Keys.ENTER)
    assert "fake-html" in page.wait_models()
    assert not page.el("key-dialog").is_displayed()
    page.load()  # kept in browser storage
    assert "fake-html" in page.wait_models() and not page.el("key-dialog").is_displayed()
    page.js("localStorage.setItem('edgellm.apiKey', JSON.stringify('sk-revoked'))")
    page.set_value("model", "fake-html")
    page.send("hello")  # a 401 on a chat brings the prompt back
    reply = page.wait_answered(10)
    assert reply["error"].startswith("The server needs a valid API key")
    assert page.el("key-dialog").is_displayed()


@needs_browser
def test_hostile_markup_in_a_reply_stays_text(fakes, desktop):
    page = Page(desktop, fakes.url, FAKE_STORAGE)
    page.wait_models()
    page.set_value("model", "fake-html")
    page.send("anything")
    reply = page.wait_answered(30)
    blocks = page.js("return [...document.querySelector('#conversation .msg.assistant .body').children]"
                     ".map(e => [e.tagName, e.textContent])")
    assert blocks == [["P", "<img src=x onerror=alert(1)> and <b>bold</b>"], ["PRE", "<script>alert(2)</script>"],
                      ["P", "after"]]
    assert page.js("return document.querySelectorAll('#conversation img, #conversation script, #conversation b')"
                   ".length") == 0
    assert page.js("return document.querySelector('#conversation .msg.assistant pre code').textContent") \
        == "<script>alert(2)</script>"
    assert STATS.match(reply["stats"])
    time.sleep(0.3)
    assert page.no_alert()


@needs_browser
def test_stop_ends_an_answer_that_would_never_end(fakes, desktop):
    page = Page(desktop, fakes.url, FAKE_STORAGE)
    page.wait_models()
    page.set_value("model", "fake-trickle")
    page.send("go")
    page.wait(lambda: page.last_reply().get("body", "").count("tick") >= 2, 10, "ticks")
    assert wait_for(lambda: fakes.health()["models"]["fake-trickle"]["free_slots"] == 1, timeout=5)
    page.el("stop").click()
    assert page.wait_answered(5)["note"] == "Stopped."
    assert wait_for(lambda: fakes.health()["models"]["fake-trickle"]["free_slots"] == 2, timeout=5)


@needs_browser
@pytest.mark.parametrize("model, temperature, shown", [
    ("fake-absent", "", r"The server is busy \(503\): .+\. Try again in 1 s\."),
    ("fake-html", "5", r"The request was refused \(400\): .*temperature.*"),
    ("fake-die", "", r"The answer failed: .+"),
])
def test_errors_are_shown_in_words(fakes, desktop, model, temperature, shown):
    page = Page(desktop, fakes.url, FAKE_STORAGE)
    page.wait_models()
    page.set_value("model", model)
    page.set_value("temperature", temperature)
    page.send("hello")
    reply = page.wait_answered(30)
    assert reply["error"] and re.fullmatch(shown, reply["error"], re.S), reply
    page.set_value("model", "fake-html")  # the conversation goes on without the failed turn
    page.set_value("temperature", "")
    page.send("again")
    assert page.wait_answered(30)["error"] is None
    assert page.sent("/v1/chat/completions")[-1]["messages"] == [
        {"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "again"}]


@needs_browser
def test_a_dropped_stream_is_shown(tmp_path, desktop):
    srv = ServerProcess(model_config("fake-trickle", ROOT / "no-model-file.gguf", workers=0), tmp_path)
    worker = start_fake_worker(srv, "trickle", "fake-trickle")
    try:
        page = Page(desktop, srv.url, FAKE_STORAGE)
        page.wait_models()
        page.send("go")
        page.wait(lambda: "tick" in page.last_reply().get("body", ""), 10, "ticks")
        srv.proc.kill()  # the server goes away mid-answer
        reply = page.wait_answered(15)
        assert reply["error"] == "The connection dropped before the answer was complete."
    finally:
        worker.kill()
        worker.wait()
        srv.stop()
