"""Shared fixtures. pytest-twisted runs the global reactor for integration tests."""

import os
import sys
from typing import Any, Dict, Iterator, List

import pytest
from twisted.logger import formatEvent, globalLogPublisher

from lb import reactor as lbreactor

# lb's reactor (an EPollReactor whose epoll set the pump shares), installed before
# pytest-twisted installs the default one, which it then accepts as an EPollReactor.
lbreactor.install()

pytest_plugins = ["tests.consul_agent"]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def repo_dir() -> str:
    return REPO


@pytest.fixture
def python_bin() -> str:
    return sys.executable


@pytest.fixture
def logs() -> Iterator[List[str]]:
    """Every log event emitted during the test, formatted as text."""
    events: List[str] = []

    def observer(event: Dict[str, Any]) -> None:
        events.append(formatEvent(event))
    globalLogPublisher.addObserver(observer)
    yield events
    globalLogPublisher.removeObserver(observer)
