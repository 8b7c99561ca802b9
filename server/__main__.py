"""python -m server: flags -> Settings -> create_app() -> uvicorn."""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from pydantic import ValidationError

from server.config import Settings

PLACEHOLDER_KEY = "change-me"  # the example keys in .env.example contain it


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
    parser.add_argument("--plan", action="store_true", help="print whether MODEL_PATH fits this machine (weights "
                        "and KV cache per precision, from its config only) and exit without serving")
    return parser


def load_settings(argv: list[str] | None = None) -> Settings:
    return _parse(argv)[0]


def _parse(argv: list[str] | None) -> tuple[Settings, argparse.Namespace]:
    args = build_parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None and k != "plan"}
    try:
        return Settings(**overrides), args
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in exc.errors())
        sys.exit(f"glm-serve: invalid settings: {problems}")


def main(argv: list[str] | None = None) -> None:
    settings, args = _parse(argv)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.plan:
        from server.plan import print_plan

        sys.exit(print_plan(settings))
    import uvicorn

    from server.app import create_app
    from server.bootstrap import is_loopback
    from server.http_protocol import protocol_class

    if not is_loopback(settings.host) and any(PLACEHOLDER_KEY in k for k in settings.api_key_list):
        # .env.example ships example keys, and the Docker image binds 0.0.0.0: a published key is no key.
        sys.exit(f"glm-serve: API_KEYS holds an example key ('{PLACEHOLDER_KEY}'); replace it before serving on "
                 f"HOST={settings.host}.")
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

    # sse-starlette ends every open stream the moment uvicorn sees SIGTERM; let them finish instead; uvicorn
    # stops accepting connections and cancels what is still running after timeout_graceful_shutdown.
    from sse_starlette.sse import AppStatus

    AppStatus.disable_automatic_graceful_drain()
    # Once drained, uvicorn re-raises the signal that stopped it, and dying by SIGTERM reads as a crash (-15,
    # docker's 143). A requested stop that went well is a clean exit: 0 (130 for Ctrl+C, the shell convention).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGINT, lambda *_: sys.exit(130))
    app = create_app(settings, on_load_failure=on_load_failure)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level.lower(),
                            access_log=False, timeout_graceful_shutdown=30,
                            timeout_keep_alive=settings.keep_alive_timeout,
                            http=protocol_class(settings.header_read_timeout))
    server = uvicorn.Server(config)
    server.run()
    if failure:
        # One line, the last one a user sees: an engine's log lines under it are already in the log above.
        sys.exit(f"glm-serve: could not load the model: {failure[0].splitlines()[0]}")


if __name__ == "__main__":
    main()
