"""A real browser for the web page's tests (and scripts/web_screenshots.py): Debian's chromium,
headless, driven by selenium through Debian's chromedriver (scripts/setup.sh --test installs both;
selenium's own browser download needs the internet)."""

from __future__ import annotations

import json
import shutil

from selenium import webdriver
from selenium.common.exceptions import NoAlertPresentException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

from conftest import wait_for

CHROMEDRIVER = "/usr/bin/chromedriver"
PHONE = {"width": 390, "height": 844, "pixelRatio": 3.0}  # an iPhone 12-14 sized screen, in CSS pixels


def browser_problem() -> str | None:
    """Why no browser test can run here, in words; None when chromium and its driver are installed."""
    if not shutil.which("chromium") or not shutil.which(CHROMEDRIVER):
        return "chromium and chromium-driver are not installed (scripts/setup.sh --test installs them as root)"
    return None


def chrome(*, phone: bool = False, dark: bool = False, width: int = 1280, height: int = 900) -> webdriver.Chrome:
    """A headless chromium that keeps its console log (get_log("browser")); ``phone`` emulates a
    390x844 touch screen, ``dark`` the system's dark colour scheme."""
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}", "--disable-extensions", "--no-first-run"):
        options.add_argument(arg)
    if phone:
        options.add_experimental_option("mobileEmulation", {"deviceMetrics": PHONE})
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    if dark:
        driver.execute_cdp_cmd("Emulation.setEmulatedMedia",
                               {"features": [{"name": "prefers-color-scheme", "value": "dark"}]})
    return driver


class Page:
    """The chat page of one server in one browser, from a fresh browser storage."""

    def __init__(self, driver, url: str, storage: dict | None = None):
        self.driver, self.url = driver, url
        driver.get(url + "/ui/icon.svg")  # same origin: clear its storage before the page starts
        driver.execute_script("localStorage.clear()")
        for name, value in (storage or {}).items():
            driver.execute_script("localStorage.setItem(arguments[0], arguments[1])", name, json.dumps(value))
        driver.get_log("browser")  # drop what earlier pages logged
        self.load()

    def load(self) -> None:
        self.driver.get(self.url + "/")
        self.driver.execute_script(  # record every request body the page sends through fetch
            "window.sent = []; const f = window.fetch; window.fetch = (u, o) => "
            "{ window.sent.push([String(u), o && o.body ? JSON.parse(o.body) : null]); return f(u, o); };")

    def el(self, element_id: str):
        return self.driver.find_element(By.ID, element_id)

    def js(self, script: str, *args):
        return self.driver.execute_script(script, *args)

    def wait(self, predicate, timeout: float = 60, what: str = "the page"):
        found = wait_for(predicate, timeout=timeout, interval=0.05)
        assert found, f"timed out waiting for {what}; page text:\n{self.text('conversation')}"
        return found

    def text(self, element_id: str) -> str:
        return self.js("return document.getElementById(arguments[0]).innerText", element_id)

    def models(self) -> list[str]:
        return self.js("return [...document.querySelectorAll('#model option')].map(o => o.value)")

    def wait_models(self):
        return self.wait(lambda: self.models(), 30, "the model list")

    def set_value(self, element_id: str, value: str) -> None:
        self.js("const e = document.getElementById(arguments[0]); e.value = arguments[1]; "
                "e.dispatchEvent(new Event('change'))", element_id, value)

    def send(self, text: str) -> None:
        box = self.el("prompt")
        box.clear()
        box.send_keys(text)
        box.send_keys(Keys.ENTER)

    def replies(self) -> list[dict]:
        return self.js("return [...document.querySelectorAll('#conversation .msg.assistant')].map(m => ({"
                       "body: m.querySelector('.body').innerText, "
                       "pending: !!m.querySelector('.pending'), note: m.querySelector('.note')?.innerText || null, "
                       "error: m.querySelector('.msg-error')?.innerText || null, "
                       "stats: m.querySelector('.stats')?.innerText || null, "
                       "sources: m.querySelector('.sources')?.innerText || null}))")

    def last_reply(self) -> dict:
        replies = self.replies()
        return replies[-1] if replies else {}

    def wait_answered(self, timeout: float = 120) -> dict:
        self.wait(lambda: self.replies() and not self.last_reply()["pending"], timeout, "the answer to end")
        assert self.el("send").is_enabled() and not self.el("stop").is_enabled()
        return self.last_reply()

    def sent(self, path: str) -> list:
        return [body for url, body in self.js("return window.sent") if url == path]

    def console_errors(self) -> list[dict]:
        return [e for e in self.driver.get_log("browser") if e["level"] == "SEVERE"]

    def no_alert(self) -> bool:
        try:
            self.driver.switch_to.alert
        except NoAlertPresentException:
            return True
        return False
