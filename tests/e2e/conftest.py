import pytest

from tests.conftest_services import RedisServer, postgres_url  # noqa: F401
from tests.e2e.services import migrate, service_env


@pytest.fixture
def services(tmp_path, postgres_url):  # noqa: F811
    """(env, redis) for a fresh database and a private redis-server; processes are the test's own."""
    redis = RedisServer(tmp_path / "redis").start()
    env = service_env(tmp_path, postgres_url, redis.url)
    migrate(env, tmp_path / "migrate.log")
    try:
        yield env, redis
    finally:
        redis.stop()
