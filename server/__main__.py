"""python -m server: flags -> Settings -> create_app() -> uvicorn."""

from __future__ import annotations

import argparse
import logging
import sys

from pydantic import ValidationError

from server.config import Settings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m server",
        description="OpenAI/ZhipuAI-compatible server. Every flag also reads from the environment and .env "
        "(the upper-case name, e.g. --model-path <-> MODEL_PATH).",
    )
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        help_text = f"{field.description} [env {name.upper()}, default {field.default!r}]"
        if field.annotation is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(flag, default=None, help=help_text)
    return parser


def load_settings(argv: list[str] | None = None) -> Settings:
    args = build_parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in exc.errors())
        sys.exit(f"glm-serve: invalid settings: {problems}")


def main(argv: list[str] | None = None) -> None:
    settings = load_settings(argv)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import uvicorn

    from server.app import create_app
    from server.bootstrap import is_loopback

    if not is_loopback(settings.host) and not (settings.api_keys or settings.api_keys_file):
        logging.getLogger("glm_serve").warning(
            "HOST=%s exposes the server beyond this machine WITHOUT API keys: anyone who can reach port %d can use "
            "it. Set API_KEYS, or keep HOST=127.0.0.1 and use an SSH tunnel.", settings.host, settings.port)

    failure: list[str] = []
    server: uvicorn.Server | None = None

    def on_load_failure(reason: str) -> None:
        failure.append(reason)
        if server is not None:
            server.should_exit = True

    app = create_app(settings, on_load_failure=on_load_failure)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level.lower(),
                            access_log=False, timeout_graceful_shutdown=30)
    server = uvicorn.Server(config)
    server.run()
    if failure:
        sys.exit(f"glm-serve: could not load the model: {failure[0]}")


if __name__ == "__main__":
    main()
