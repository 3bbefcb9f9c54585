"""How often the spec's chat example names Paris: the measurement behind the default config's
sampling defaults for SmolLM2-135M-Instruct (README, "Sampling defaults").

Sends the spec's streaming example (its messages and "stream": true, no sampling fields; our model's
name for "model_name") ``--tries`` times, one at a time, and counts the answers that name Paris in
their first ``--tokens`` chunks. The stream is then closed, which cancels the rest: an answer that
strays can run on until the context is full, minutes on a small machine.

    .venv/bin/python scripts/paris_rate.py --url http://localhost:8080 --tries 20
"""

from __future__ import annotations

import argparse
import http.client
import json
from urllib.parse import urlsplit

BODY = {"messages": [{"role": "system", "content": "You are a helpful assistant."},
                     {"role": "user", "content": "What is the capital of France?"}],
        "model": "SmolLM2-135M-Instruct", "stream": True}


def first_words(url: str, tokens: int) -> str:
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=300)
    try:
        connection.request("POST", "/v1/chat/completions", body=json.dumps(BODY),
                           headers={"Content-Type": "application/json", "accept": "application/json"})
        response = connection.getresponse()
        text = ""
        for _ in range(tokens):
            line = response.readline().decode().strip()
            while not line:
                line = response.readline().decode().strip()
            if line == "data: [DONE]":
                break
            for choice in json.loads(line[len("data: "):]).get("choices", []):
                text += choice["delta"].get("content") or ""
        return text
    finally:
        connection.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://localhost:8080")
    parser.add_argument("--tries", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=24, help="chunks read from each answer")
    args = parser.parse_args()
    named = 0
    for _ in range(args.tries):
        text = first_words(args.url, args.tokens)
        named += "Paris" in text
        print(repr(text))
    print(f"{named}/{args.tries} answers name Paris")


if __name__ == "__main__":
    main()
