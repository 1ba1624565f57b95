from tests.conftest_services import postgres_url  # noqa: F401
