"""The README as a newcomer meets it: two commands, a short page whose links all lead somewhere,
and the first command tried from a clean checkout with nothing but the README, its first
request sent as printed. (The second command is what CI itself runs from a clean checkout.)"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.test_docs import MAKE_RUN_URL, curl_examples, fenced, run_curl

ROOT = Path(__file__).resolve().parents[1]
PAGES = [
    ROOT / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
    ROOT / "bench" / "README.md",
    ROOT / "bench" / "HISTORY.md",
]


def readme_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block, "README has no bash block"
    return [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.strip()]


def test_readme_opens_with_exactly_two_commands() -> None:
    cmds = readme_commands()
    assert cmds == ["make run", "make test"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci


def test_readme_is_a_short_page_that_leads_into_the_docs() -> None:
    text = (ROOT / "README.md").read_text()
    assert len(text) < 12_000, "move detail into docs/: the README is a newcomer's page"
    for page in ("api", "distillation", "tuning", "deploy", "metrics"):
        assert f"(docs/{page}.md" in text, page
    assert "(bench/README.md)" in text


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_leads_somewhere(page: Path) -> None:
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not checked offline
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", dest.read_text(), re.M)
            if anchor not in {slug(h) for h in headings}:
                broken.append(target)
    assert not broken, broken


@pytest.mark.slow
@pytest.mark.beside  # pip, on one core, most of its minutes
def test_first_command_starts_the_gateway_from_a_clean_checkout(tmp_path: Path) -> None:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout")
    checkout = tmp_path / "checkout"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(checkout)], check=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TIERGATE_", "VIRTUAL_ENV"))}
    env["TIERGATE_SERVER__PORT"] = str(port)  # the documented override; everything else as shipped
    log = open(tmp_path / "run.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        readme_commands()[0].split(),
        cwd=checkout,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 1200
        while True:
            assert proc.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "gateway never became ready"
            time.sleep(2)
        url = f"http://127.0.0.1:{port}"
        for command in curl_examples(ROOT / "README.md"):  # the first request, as printed
            status, output = run_curl(command, url)
            assert status == 200, output
            assert re.search(r"(?im)^x-tiergate-tier: (student|teacher)\r?$", output), output
        (example,) = fenced(ROOT / "README.md", "python")
        done = subprocess.run(
            [str(checkout / ".venv" / "bin" / "python"), "-c", example.replace(MAKE_RUN_URL, url)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.split()[0] in ("student", "teacher")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
        log.close()
    assert (checkout / "data" / "signal.db").exists()  # the store was created where documented
