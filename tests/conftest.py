"""Fixtures over harness.py: clusters of real processes, the shared test guest image."""

from __future__ import annotations

import uuid
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import IMAGE_CACHE, Cluster, live_logs, new_cluster


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Any, None]:
    """A failed test shows what its cluster's processes logged last (taken before the
    fixtures' teardown stops them)."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and call.when in ("setup", "call") and (logs := live_logs()):
        report.sections.append(("cluster logs", logs))


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with new_cluster(tmp_path) as created:
        yield created


@pytest.fixture(scope="session")
def tiny_image() -> Path:
    """The test guest, built once (a no-op when `make test` built it already)."""
    from multiverse.guest.image import build_test_image

    return build_test_image(IMAGE_CACHE)


@pytest.fixture(scope="session")
def postgres() -> Iterator[str]:
    """One private PostgreSQL cluster for the session (tests/postgres.py); its URL."""
    from postgres import private_postgres

    with private_postgres() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database of each kind the master runs on."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'multiverse.db'}"
    from postgres import fresh_database

    return fresh_database(request.getfixturevalue("postgres"), f"t{uuid.uuid4().hex[:12]}")
