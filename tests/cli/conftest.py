import pytest


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """Caches the CLI keeps under $XDG_CACHE_HOME (downloads, evaluations) go to a directory of the test's
    own, never the user's home, and no test sees another's."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
