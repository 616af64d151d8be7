"""Shared fixtures. pytest-twisted runs the global reactor for integration tests."""

import os
import sys

import pytest

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
