"""`recmerge db upgrade`: apply the Alembic migrations to RECMERGE_DATABASE_URL (embedded mode does this
by itself at start; deployments run it before the API and the workers)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("db", help="database schema")
    db_sub = p.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    up = db_sub.add_parser("upgrade", help="migrate the database to the latest schema")
    up.add_argument("--revision", default="head")
    up.set_defaults(func=run_upgrade)
    cur = db_sub.add_parser("current", help="print the schema revision of the database")
    cur.set_defaults(func=run_current)


def _target() -> tuple[str, str]:
    from sqlalchemy.engine import make_url

    from core.settings import get_settings

    url = get_settings().DATABASE_URL
    return url, make_url(url).render_as_string(hide_password=True)


def run_upgrade(args) -> int:
    from sqlalchemy.exc import OperationalError

    from app.migrate import current, upgrade
    from models.errors import RecmergeError

    url, shown = _target()
    try:
        upgrade(url, args.revision)
        rev = current(url)
    except OperationalError as e:
        raise RecmergeError(f"cannot reach {shown}: {str(e.orig).strip().splitlines()[0]}") from None
    print(f"recmerge db: {shown} at revision {rev}")
    return 0


def run_current(args) -> int:
    from app.migrate import current

    url, shown = _target()
    print(f"recmerge db: {shown} at revision {current(url) or '(none)'}")
    return 0
