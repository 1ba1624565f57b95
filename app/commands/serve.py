"""`recmerge serve`: the API under uvicorn. With no RECMERGE_* variables set it runs embedded: SQLite and
artifacts under ./.recmerge, migrations applied at start, jobs on an in-process runner."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("serve", help="run the REST API (embedded mode when nothing is configured)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(func=run)


def run(args) -> int:
    import uvicorn

    from core.settings import get_settings

    settings = get_settings()
    mode = "embedded (in-process jobs)" if settings.embedded else "broker " + settings.BROKER_URL.split("@")[-1]
    print(f"recmerge serve: http://{args.host}:{args.port}  data {settings.DATA_DIR}  {mode}", flush=True)
    # One process: the model cache and the request batcher live in it (scale out with more processes).
    uvicorn.run("app.main:create_app", factory=True, host=args.host, port=args.port, workers=1,
                log_level=args.log_level)
    return 0
