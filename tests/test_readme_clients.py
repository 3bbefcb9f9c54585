"""The README's client snippets (section "Clients"), run exactly as printed against the real server:
only the URL is changed to the test server's. What each snippet leaves behind is checked."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def snippet(name: str) -> str:
    found = re.search(rf"<!-- tested: {name} -->\n```python\n(.*?)```", README.read_text(), re.S)
    assert found, f"the README has no tested {name} snippet"
    return found.group(1)


def run(name: str, server) -> dict:
    code = snippet(name).replace("http://localhost:8080", server.url)
    namespace: dict = {"__name__": f"readme_{name}"}
    exec(compile(code, f"README.md ({name} snippet)", "exec"), namespace)
    return namespace


def test_the_openai_snippet(server, capsys):
    done = run("openai", server)
    assert isinstance(done["answer"].choices[0].message.content, str)
    assert isinstance(done["city"], done["City"])
    assert done["call"].function.name == "get_weather"
    assert len(done["vector"]) == 384
    assert capsys.readouterr().out


def test_the_langchain_snippet(server):
    done = run("langchain", server)
    assert isinstance(done["llm"].invoke("Hi").content, str)
    assert len(done["vector"]) == 384
