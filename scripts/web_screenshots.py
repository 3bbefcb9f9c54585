"""Screenshots of the web chat page for the README (docs/web-desktop.png, docs/web-phone-dark.png),
taken in Debian's chromium (scripts/setup.sh --test installs it) from a running server:

    scripts/serve.sh &                      # the default models
    .venv/bin/python scripts/web_screenshots.py http://127.0.0.1:8080

The desktop shot uploads a short note into the collection 'screenshots' and asks about it, so
that the retrieved sources show under the answer; the phone shot asks a coding question.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from browser import Page, chrome  # noqa: E402

NOTE = ("# Office notes\n\nThe office Wi-Fi network is called Lighthouse. Guests use the network "
        "Lighthouse-Guest; its password is written on the whiteboard in the kitchen.\n\n"
        "The printer on the second floor is called Hopper.\n")


def desktop(url: str, out: Path) -> None:
    driver = chrome(width=1280, height=1250)
    try:
        page = Page(driver, url, {"edgellm.settings": {"maxTokens": "120", "collection": "screenshots"}})
        page.wait_models()
        with tempfile.TemporaryDirectory() as tmp:
            note = Path(tmp) / "office-notes.md"
            note.write_text(NOTE)
            page.el("file").send_keys(str(note))
            page.el("upload").click()
            page.wait(lambda: " in collection " in page.text("upload-status"), 120, "the upload")
        page.send("What is the guest Wi-Fi called, and where is its password?")
        page.wait_answered()
        page.js("window.scrollTo(0, 0)")
        driver.save_screenshot(str(out))
    finally:
        driver.quit()


def phone(url: str, out: Path) -> None:
    driver = chrome(phone=True, dark=True)
    try:
        page = Page(driver, url, {"edgellm.settings": {"maxTokens": "200"}})
        page.wait_models()
        page.send("Write a Python function that reverses a string, in a code block.")
        page.wait_answered()
        driver.save_screenshot(str(out))
    finally:
        driver.quit()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url", help="the running server, e.g. http://127.0.0.1:8080")
    parser.add_argument("--out", default=str(ROOT / "docs"), help="folder for the PNG files")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    desktop(args.url.rstrip("/"), out / "web-desktop.png")
    phone(args.url.rstrip("/"), out / "web-phone-dark.png")
    print(f"wrote {out / 'web-desktop.png'} and {out / 'web-phone-dark.png'}")


if __name__ == "__main__":
    main()
