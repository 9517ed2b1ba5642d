"""The tuning dashboard in a real headless Chromium: it loads behind admin auth, draws the
curve from real records, the slider previews the effect, and Apply changes the live threshold."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway import Settings, create_app
from models import BackendConfig, ChatMessage, FakeBackend, Scripted
from tests.servers import serve_in_thread

ADMIN = "dash-admin-key"
CHROMIUM, DRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


def student_reply(messages: tuple[ChatMessage, ...]) -> Scripted:
    # "q<k>" prompts: the student is sure (logprob near 0) for high k and right half the time.
    k = int(re.findall(r"\d+", messages[-1].content)[0])
    right = k % 2 == 0
    return Scripted("refunds take five days" if right else "no idea at all", -3.0 + 3.0 * k / 40)


@pytest.fixture
def gateway_with_traffic(tmp_path: Path) -> Iterator[str]:
    settings = Settings(
        server={"admin_api_key": ADMIN},
        router={"threshold": 0.3},
        signal={"path": tmp_path / "s.db", "audit_fraction": 1.0},
    )
    student = FakeBackend(BackendConfig(kind="fake", model="student"), student_reply)
    teacher = FakeBackend(BackendConfig(kind="fake", model="teacher"), lambda _m: Scripted("refunds take five days"))
    with serve_in_thread(create_app(settings, student=student, teacher=teacher), ready_path="/health/ready") as url:
        with httpx.Client(base_url=url) as c:
            for k in range(40):
                r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": f"q{k}"}]})
                assert r.status_code == 200
        yield url


def require_chromium(config: pytest.Config) -> None:
    if CHROMIUM.exists() and DRIVER.exists():
        return
    missing = "Chromium is not installed: run `make browser` (apt-get install chromium chromium-driver)"
    if config.getoption("--allow-missing-browser"):
        pytest.skip(f"{missing}; skipped under --allow-missing-browser")
    pytest.fail(missing)


@pytest.fixture
def browser(pytestconfig: pytest.Config) -> Iterator[object]:
    require_chromium(pytestconfig)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(DRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_dashboard_renders_previews_and_applies(gateway_with_traffic: str, browser: object) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    url = gateway_with_traffic
    driver = browser  # type: ignore[assignment]
    assert httpx.get(url + "/admin/dashboard").status_code == 401  # behind admin auth
    host = url.removeprefix("http://")
    driver.get(f"http://admin:{ADMIN}@{host}/admin/dashboard")  # type: ignore[attr-defined]
    wait = WebDriverWait(driver, 20)
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-loaded") == "true")
    assert driver.find_element(By.TAG_NAME, "body").get_attribute("data-error") is None  # type: ignore[attr-defined]
    # The curve is drawn from the 40 logged records.
    line = driver.find_element(By.ID, "curve-line")  # type: ignore[attr-defined]
    assert int(line.get_attribute("data-points")) >= 10
    assert driver.find_element(By.ID, "current-point").is_displayed()  # type: ignore[attr-defined]
    assert driver.find_element(By.ID, "samples").text == "40"  # type: ignore[attr-defined]
    assert driver.find_element(By.ID, "current-threshold").text == "0.30"  # type: ignore[attr-defined]
    before = driver.find_element(By.ID, "pred-rate").text  # type: ignore[attr-defined]
    # A person drags the slider (keyboard): the prediction updates before anything is applied.
    slider = driver.find_element(By.ID, "slider")  # type: ignore[attr-defined]
    for _ in range(20):
        slider.send_keys(Keys.ARROW_RIGHT)
    wait.until(lambda d: d.find_element(By.ID, "slider-value").text == "0.70")
    after = driver.find_element(By.ID, "pred-rate").text  # type: ignore[attr-defined]
    assert after != before and float(after.rstrip("%")) > float(before.rstrip("%"))
    auth = {"authorization": f"Bearer {ADMIN}"}
    assert httpx.get(url + "/admin/threshold", headers=auth).json()["threshold"] == 0.3  # not applied yet
    driver.find_element(By.ID, "apply").click()  # type: ignore[attr-defined]
    wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "applied 0.70"))
    assert httpx.get(url + "/admin/threshold", headers=auth).json()["threshold"] == pytest.approx(0.7)
    audit = httpx.get(url + "/admin/policy/audit", headers=auth).json()["audit"]
    assert audit[0]["new"] == {"kind": "fixed", "threshold": pytest.approx(0.7)} and audit[0]["actor"].startswith(
        "key-"
    )


def test_chromium_binaries_present(pytestconfig: pytest.Config) -> None:
    require_chromium(pytestconfig)
    assert shutil.which("chromium") or CHROMIUM.exists()
