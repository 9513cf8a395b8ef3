"""`tellerloop` console script. Long work shows progress; errors are one clear line and exit 2."""

from __future__ import annotations

import argparse
import sys

from pydantic import ValidationError


def _serve(args: argparse.Namespace) -> int:
    from gateway.logging import configure_logging
    from gateway.security import UnsafeBindError, check_bind_safety
    from gateway.settings import load_settings

    overrides: dict = {}
    if args.host:
        overrides.setdefault("server", {})["host"] = args.host
    if args.port is not None:
        overrides.setdefault("server", {})["port"] = args.port
    if args.data_dir:
        overrides.setdefault("storage", {})["data_dir"] = args.data_dir
    try:
        settings = load_settings(args.config, **overrides)
        check_bind_safety(settings)
    except (FileNotFoundError, ValidationError, UnsafeBindError, ValueError) as exc:
        print(f"tellerloop serve: {exc}", file=sys.stderr)
        return 2
    import uvicorn  # heavy imports (torch, transformers) only once the settings are known to be good

    from gateway.app import create_app

    configure_logging(settings.logging)
    app = create_app(settings)
    uvicorn.run(app, host=settings.server.host, port=settings.server.port, log_config=None,
                access_log=False, timeout_graceful_shutdown=30)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tellerloop", description="Self-improving banking support chatbot gateway")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the OpenAI-compatible gateway")
    serve.add_argument("--config", help="TOML file layered over config/default.toml")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--data-dir")
    serve.set_defaults(func=_serve)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
