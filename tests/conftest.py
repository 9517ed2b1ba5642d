"""Shared fixtures: a clean TIERGATE_* environment, the anyio backend, fake upstreams, a tiny model."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.postgres import PostgresServer, postgres_bin
from tests.fakes import UpstreamScript, build_tiny_model, fake_upstream
from tests.servers import serve_in_thread

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_addoption(parser: pytest.Parser) -> None:
    # `make test-fast` passes it, so a fresh checkout passes without `make browser`; `make test`
    # does not, so there a missing Chromium fails the dashboard test rather than hiding it.
    parser.addoption(
        "--allow-missing-browser",
        action="store_true",
        help="skip the dashboard's browser tests when Chromium is not installed, instead of failing",
    )
    parser.addoption(
        "--allow-missing-postgres",
        action="store_true",
        help="skip the PostgreSQL tests when its server is not installed, instead of failing",
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slow tests marked `beside` go first: in `make test`'s parallel pass one worker starts
    on them at once, instead of running them alone after the fast tests (pytest-xdist deals
    the first tests out in collection order)."""
    items.sort(key=lambda item: item.get_closest_marker("beside") is None)


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("TIERGATE_"):
            monkeypatch.delenv(key)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def postgres_server(pytestconfig: pytest.Config) -> Iterator[PostgresServer]:
    """One real PostgreSQL server for the session, on loopback (`make postgres` installs it)."""
    bindir = postgres_bin()
    if bindir is None:
        missing = "PostgreSQL 15+ is not installed (make postgres)"
        if pytestconfig.getoption("--allow-missing-postgres"):
            pytest.skip(f"{missing}; skipped under --allow-missing-postgres")
        pytest.fail(missing)
    server = PostgresServer(bindir)
    try:
        yield server
    finally:
        server.remove()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """A new, empty database on the session's server; dropped after the test."""
    with postgres_server.fresh_database() as url:
        yield url


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture
def student_script() -> UpstreamScript:
    return UpstreamScript(name="student-upstream", text="Your refund will arrive in five business days.")


@pytest.fixture
def teacher_script() -> UpstreamScript:
    return UpstreamScript(name="teacher-upstream", text="Refunds take five business days after we receive the item.")


@pytest.fixture
def student_url(student_script: UpstreamScript) -> Iterator[str]:
    with serve_in_thread(fake_upstream(student_script)) as url:
        yield url + "/v1"


@pytest.fixture
def teacher_url(teacher_script: UpstreamScript) -> Iterator[str]:
    with serve_in_thread(fake_upstream(teacher_script)) as url:
        yield url + "/v1"
