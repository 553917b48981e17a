"""Keel Console (keel_cloud.console) in real headless Chromium (Debian's chromium and
chromium-driver, which `make setup` installs), driven by Selenium, against a real `keel
cloud serve` and virtual devices on the MicroPython VM: signing in, the device list going
live, a device healed out of safe mode, a variable read and a function call, an event
arriving live, an app uploaded in the page, a wrong-platform upload refused; and what
answers without a session. Screenshots of the main pages go to the test's temporary
directory (KEEL_CONSOLE_SHOTS=DIR keeps them there too: docs/images/ has two)."""

import json
import os
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from keel import build, vio

try:
    from test_cloud_e2e import Cloud, RunningDevice, make_device, wait_until
except ImportError:  # run from another directory
    from tests.cloud.test_cloud_e2e import Cloud, RunningDevice, make_device, wait_until

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("KEEL_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("KEEL_CHROMEDRIVER", "/usr/bin/chromedriver")


@pytest.fixture
def browser(tmp_path):
    assert Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file(), (
        f"{CHROMIUM} and {CHROMEDRIVER} are needed: `make setup` installs Debian's chromium and "
        "chromium-driver (as root)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,900", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


class Page:
    """The browser on one cloud's console."""

    def __init__(self, driver, base, shots):
        self.driver, self.base, self.shots = driver, base, shots

    def open(self, path):
        self.driver.get(self.base + path)

    def wait(self, predicate, timeout=30, what="the page"):
        def check(_):
            try:
                return predicate()
            except StaleElementReferenceException:  # redrawn meanwhile: look again
                return False
        return WebDriverWait(self.driver, timeout, poll_frequency=0.2).until(check, f"timed out: {what}")

    def find(self, css):
        return self.driver.find_element(By.CSS_SELECTOR, css)

    def finds(self, css):
        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def _again(self, act):
        """act() again when the page redrew the element meanwhile (the stream redraws
        a page whenever what it shows changes)."""
        for _ in range(20):
            try:
                return act()
            except StaleElementReferenceException:
                continue
        return act()

    def text(self, css):
        return self._again(lambda: (found := self.finds(css)) and found[0].text or "")

    def click(self, css):
        self._again(lambda: self.find(css).click())

    def type(self, css, text):
        self._again(lambda: self.find(css).send_keys(text))

    def shot(self, name):
        self.shots.mkdir(parents=True, exist_ok=True)
        self.driver.execute_script("window.scrollTo(0, 0)")
        self.driver.save_screenshot(str(self.shots / f"{name}.png"))

    def sign_in(self, token):
        self.open("/")
        self.wait(lambda: self.driver.current_url.endswith("/login"), what="the sign-in page")
        self.type("#token", token)
        self.click("button[type=submit]")
        self.wait(lambda: self.finds("#device-table") or self.finds("#devices p"), what="the device list")


def row_of(page, name):
    rows = page.finds(f'#device-table tr[data-device="{name}"]')
    return rows[0].text if rows else ""


def test_the_console_in_a_browser(tmp_path, systems, browser):
    cloud = Cloud(tmp_path / "cloud")
    cloud.start()
    shots = Path(os.environ.get("KEEL_CONSOLE_SHOTS") or tmp_path / "shots")
    page = Page(browser, f"http://{cloud.http}", shots)
    devices = []
    try:
        for version in ("1.0.0", "1.1.0"):
            assert "released" in cloud.keel("release", "system", systems[version]).stdout
        sensor_dir = make_device(tmp_path, systems["1.0.0"], cloud, "sensor1", "sensor")
        button_dir = make_device(tmp_path, systems["1.0.0"], cloud, "button1", "button")
        token = (tmp_path / "cloud" / "token").read_text().strip()

        # Signed in, the list shows the devices coming online (no reload: the stream).
        page.sign_in(token)
        assert token not in browser.current_url and token not in browser.page_source
        cookie = browser.get_cookie("keel_session")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and token not in cookie["value"]
        page.wait(lambda: "offline" in row_of(page, "sensor1"), what="sensor1 listed offline")
        devices.append(RunningDevice(sensor_dir))
        devices.append(RunningDevice(button_dir))
        page.wait(lambda: "online" in row_of(page, "sensor1") and "online" in row_of(page, "button1")
                  and "1.0.0" in row_of(page, "sensor1"), timeout=60, what="both devices online in the list")
        page.shot("devices")
        page.type("#device-filter", "button")
        page.wait(lambda: not row_of(page, "sensor1") and row_of(page, "button1"), what="the filter")

        # A variable read and a function call on sensor1's page.
        page.open("/#/devices/sensor1")
        page.wait(lambda: page.finds('button[data-variable="temperature"]'), what="sensor1's variables")
        assert "sensor1" in page.text("h1") and "system-part" in page.text("#modules")
        page.click('button[data-variable="temperature"]')
        value = page.wait(lambda: (t := page.text('button[data-variable="temperature"] + .result'))
                          not in ("", "…") and t, what="the temperature read")
        assert 15 <= float(value) <= 30
        page.type('input[data-argument="led"]', "on")
        page.click('button[data-function="led"]')
        page.wait(lambda: page.text('button[data-function="led"] + .result') == "1", what="led on")
        wait_until(lambda: vio.fold(vio.read_records(sensor_dir))["pins"].get("D7", {}).get("value") == 1,
                   what="the LED pin on")

        # A wrong-platform upload is refused with keel flash's words, and nothing is sent.
        esp32_app = build.build_app(ROOT / "examples" / "sensor", "esp32", None, tmp_path / "esp32.bin")
        page.type("#flash-file", str(esp32_app))
        page.click("#flash-send")
        page.wait(lambda: "nothing sent" in page.text("#flash-result"), what="the refusal")
        assert page.text("#flash-result") == (
            "esp32.bin: the image is for esp32, device 'sensor1' is virtual: nothing sent")
        corrupt = tmp_path / "corrupt.bin"
        data = bytearray(esp32_app.read_bytes())
        data[-40] ^= 0xFF
        corrupt.write_bytes(bytes(data))
        page.type("#flash-file", str(corrupt))
        page.click("#flash-send")
        page.wait(lambda: "corrupt" in page.text("#flash-result"), what="the corrupt image refused")
        page.shot("device")

        # An event the button publishes appears live on the events page.
        page.open("/#/events")
        page.wait(lambda: page.finds("#event-table"), what="the events page")
        page.wait(lambda: "live" == page.text("#live"), what="the stream open")
        vio.send(button_dir, {"op": "press", "button": "MODE", "ms": 200})
        page.wait(lambda: "button1" in page.text("#event-table") and "button" in page.text("#event-table tbody"),
                  timeout=30, what="the button event")
        page.shot("events")

        # An app for system 1.1.0 uploaded in button1's page: safe mode, its reason and
        # what it misses, then healed by the service, and the app runs.
        new = tmp_path / "new"
        new.mkdir()
        (new / "main.py").write_text("def setup():\n    print('app for 1.1.0 is running')\n")
        app = build.build_app(new, "virtual", "1.1.0", tmp_path / "app110.bin", app_version="2.0.0")
        page.open("/#/devices/button1")
        page.wait(lambda: page.finds("#flash-file"), what="button1's page")
        page.type("#flash-file", str(app))
        page.click("#flash-send")
        page.wait(lambda: "sent" in page.text("#flash-result"), timeout=60, what="the upload sent")
        page.wait(lambda: "dependency" in page.text("#safe-mode"), timeout=60, what="safe mode shown")
        assert "system-part 1 ≥ 1.1.0" in page.text("#safe-mode")
        page.shot("device-safe-mode")
        page.wait(lambda: "healed" in page.text("#heal-state") and not page.finds("#safe-mode"),
                  timeout=90, what="healed")
        console = button_dir / vio.CONSOLE_LOG
        wait_until(lambda: "app for 1.1.0 is running" in console.read_text(), what="the new app running")
        page.open("/#/devices")
        page.wait(lambda: "1.1.0" in row_of(page, "button1"), what="button1 on 1.1.0 in the list")

        # The catalog, and a fleet.
        page.open("/#/releases")
        page.wait(lambda: "1.1.0" in page.text("section[data-platform=virtual]"), what="the releases")
        assert "1.0.0" in page.text("section[data-platform=virtual]")
        page.shot("releases")
        cloud.keel("fleet", "create", "lab", "--platform", "virtual")
        cloud.keel("fleet", "add", "lab", "sensor1")
        page.open("/#/fleets/lab")
        page.wait(lambda: "sensor1" in page.text("#fleet-devices"), what="the fleet's members")
        assert page.text("#fleet-release") == "none"
        # An app for another platform is refused; one for this fleet becomes its release.
        page.type("#release-file", str(esp32_app))
        page.click("#release-send")
        page.wait(lambda: "esp32.bin: not released to fleet lab: the app is built for esp32, fleet 'lab' is "
                          "virtual" == page.text("#release-result"), what="the wrong platform refused")
        page.type("#release-file", str(app))
        page.click("#release-send")
        page.wait(lambda: page.text("#release-result").startswith("released app 2.0.0 as release 1"),
                  what="the release made")
        page.wait(lambda: page.text("#fleet-release").startswith("#1: app 2.0.0"), what="the fleet's release")
        assert json.loads(cloud.keel("fleet", "show", "lab", "--json").stdout)["release"]["number"] == 1
        page.shot("fleet")

        # Signing out ends the session: the console sends the browser to sign in again.
        page.open("/#/devices")
        page.wait(lambda: page.finds(".signout button"), what="the sign-out button")
        page.click(".signout button")
        page.wait(lambda: browser.current_url.endswith("/login"), what="signed out")
        page.open("/")
        page.wait(lambda: browser.current_url.endswith("/login"), what="the sign-in page again")
    finally:
        for device in devices:
            device.stop()
        cloud.stop()


def _request(url, method="GET", data=None, headers=None):
    """(status, headers, body) without following redirects."""
    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None
    opener = urllib.request.build_opener(NoRedirect)
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with opener.open(request, timeout=10) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def test_without_a_session_every_page_and_the_api_refuse(tmp_path):
    cloud = Cloud(tmp_path / "cloud")
    cloud.start()
    base = f"http://{cloud.http}"
    try:
        token = (tmp_path / "cloud" / "token").read_text().strip()
        for path in ("/", "/index.html", "/console.js", "/nope"):
            status, headers, _ = _request(base + path)
            assert (status, headers["Location"]) == (303, "/login"), path
        for path in ("/api/devices", "/api/stream", "/api/releases", "/api/events?after=0"):
            assert _request(base + path)[0] == 401, path
        status, headers, body = _request(base + "/login")
        assert status == 200 and b'name="token"' in body
        assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]

        # A wrong token: no session. The right one from another site's form: refused.
        status, headers, body = _request(base + "/login", "POST", b"token=nope")
        assert status == 401 and headers.get("Set-Cookie") is None and b"not this cloud's token" in body
        status, headers, _ = _request(base + "/login", "POST", f"token={token}".encode(),
                                      {"Origin": "https://evil.example"})
        assert status == 403 and headers.get("Set-Cookie") is None
        status, headers, _ = _request(base + "/login", "POST", f"token={token}".encode())
        assert status == 303 and headers["Location"] == "/"
        cookie = headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and token not in cookie
        session = cookie.split(";")[0]

        # With the session: pages and reads; a change needs the page's CSRF token too.
        status, _, body = _request(base + "/", headers={"Cookie": session})
        assert status == 200 and token not in body.decode()
        csrf = body.decode().split('name="csrf" content="', 1)[1].split('"', 1)[0]
        assert _request(base + "/api/devices", headers={"Cookie": session})[0] == 200
        post = {"Cookie": session, "Content-Type": "application/json"}
        assert _request(base + "/api/rollout", "POST", b"{}", post)[0] == 401
        assert _request(base + "/api/rollout", "POST", b"{}", post | {"X-CSRF-Token": "0" * 64})[0] == 401
        status, _, body = _request(base + "/api/rollout", "POST", b"{}", post | {"X-CSRF-Token": csrf})
        assert status == 200 and "changed" in json.loads(body)
        # A forged or expired session is none.
        forged = session[:-4] + ("0000" if not session.endswith("0000") else "1111")
        assert _request(base + "/api/devices", headers={"Cookie": forged})[0] == 401
        # Signing out needs the CSRF token (a cross-site form cannot sign you out either).
        assert _request(base + "/logout", "POST", b"csrf=x", {"Cookie": session})[0] == 403
        status, headers, _ = _request(base + "/logout", "POST", f"csrf={csrf}".encode(), {"Cookie": session})
        assert status == 303 and "Max-Age=0" in headers["Set-Cookie"]
        # The CLI's bearer token still works as before.
        assert _request(base + "/api/devices", headers={"Authorization": f"Bearer {token}"})[0] == 200
    finally:
        cloud.stop()
