import pytest

from foresight import policies


@pytest.fixture()
def fresh_registry(monkeypatch):
    """Policies a test defines register into a registry of the shipped policies only (not those
    other test modules define), dropped after the test."""
    monkeypatch.setattr(policies, "_REGISTRY", {name: policies._REGISTRY[name] for name in policies.POLICIES})
