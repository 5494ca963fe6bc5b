"""Fixtures over harness.py: clusters of real processes, the shared test guest image."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import IMAGE_CACHE, Cluster, new_cluster


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with new_cluster(tmp_path) as created:
        yield created


@pytest.fixture(scope="session")
def tiny_image() -> Path:
    """The test guest, built once (a no-op when `make test` built it already)."""
    from multiverse.guest.image import build_test_image

    return build_test_image(IMAGE_CACHE)
