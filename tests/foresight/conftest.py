import pytest

from foresight import policies


@pytest.fixture()
def fresh_registry(monkeypatch):
    """Policies a test defines register into a copy of the registry, dropped after the test."""
    monkeypatch.setattr(policies, "_REGISTRY", dict(policies._REGISTRY))
