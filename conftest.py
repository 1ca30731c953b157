"""Root conftest: load the shared end-to-end fixtures for every test module."""

pytest_plugins = ["tests.support.chain"]
