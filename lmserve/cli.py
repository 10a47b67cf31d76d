"""`lmserve serve [MODEL ...]`: serve models behind the OpenAI API, loading each when it is asked for."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from lmserve.cli_parser import DEFAULT_CHAT_URL, build_parser, configure_logging
from lmserve.fleet.download import pull
from lmserve.serve_settings import (
    connection_options,
    # The packaged models' paths: tests and benchmarks import them from lmserve.cli.
    default_embedding_model_path as default_embedding_model_path,
    default_model_path as default_model_path,
    listen_options,
    server_state,
)

log = logging.getLogger("lmserve")


def serve(args: argparse.Namespace) -> None:
    from lmserve.scale.options import scale_settings
    from lmserve.store.conversations import StoreError

    try:
        if scale_settings(args) is not None:
            from lmserve.scale.launch import serve_on_ray

            serve_on_ray(args)
            return
        state = server_state(args)
        listen = listen_options(args)
    except (ValueError, StoreError) as exc:
        raise SystemExit(f"lmserve: {exc}") from None
    for given, why in args.llama_accepted:
        log.info("%s changes nothing: %s", given, why)
    from lmserve.server.app import create_app  # after the flags' checks: a mistake is told at once
    from lmserve.server.graceful import serve as run_server

    # lmserve's own access log (lmserve.access) replaces uvicorn's.
    run_server(create_app(state), state, **listen, **connection_options(args), log_level=args.log_level,
               access_log=False)


def ps(args: argparse.Namespace) -> None:
    """`lmserve ps`: the server's GET / status, as a table (like `ollama ps`)."""
    import httpx

    headers = {"Accept": "application/json"} | ({"Authorization": f"Bearer {args.api_key}"} if args.api_key else {})
    try:
        response = httpx.get(args.url.rstrip("/") + "/", headers=headers, timeout=10)
        response.raise_for_status()
    except httpx.HTTPError as exc:
        raise SystemExit(f"lmserve ps: cannot read {args.url}: {exc}") from None
    print(ps_table(response.json()["models"], everything=args.all))


def ps_table(models: list[dict], everything: bool = False) -> str:
    rows = [("NAME", "KIND", "STATUS", "MEMORY", "REQUESTS", "UNLOADS")]
    for model in models:
        if not everything and model["status"] != "loaded":
            continue
        unloads = "never" if model["unloads_in_seconds"] is None else _duration_text(model["unloads_in_seconds"])
        if model["status"] != "loaded":
            unloads = "-"
        elif model["requests"]:
            unloads = "in use"
        rows.append((model["id"], model["kind"], model["status"] + (f" ({model['error']})" if model["error"] else ""),
                     f"{model['memory_mib']} MiB" if model["status"] == "loaded" else "-",
                     str(model["requests"]), unloads))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


def _duration_text(seconds: float) -> str:
    if seconds < 60:
        return f"in {seconds:.0f} s"
    if seconds < 3600:
        return f"in {seconds / 60:.0f} min"
    return f"in {seconds / 3600:.1f} h"


def chat(args: argparse.Namespace) -> None:
    """`lmserve chat`: lmserve/chat_cli.py's loop on the terminal, against --url or a server of its own."""
    import httpx

    from lmserve.chat_cli import ChatError, ChatSession, answers, first_model, own_server, run

    try:
        import readline  # noqa: F401 - line editing and history for input()
    except ImportError:
        pass
    local = args.model is not None and Path(args.model).expanduser().exists()
    if local or (args.model is None and args.url == DEFAULT_CHAT_URL and not answers(args.url)):
        if not local:
            _write(f"(no server at {args.url}: starting one for the packaged model)\n")
        connection = own_server(str(Path(args.model).expanduser()) if local else None)
    else:
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        connection = httpx.Client(base_url=args.url, headers=headers, timeout=httpx.Timeout(10.0, read=None))
    try:
        with connection as client:
            model = first_model(client) if local or args.model is None else args.model
            settings = {name: value for name, value in (("temperature", args.temperature), ("max_tokens", args.max_tokens))
                        if value is not None}
            run(ChatSession(client, model, system=args.system, settings=settings), input, _write)
    except (ChatError, httpx.HTTPError) as exc:
        raise SystemExit(f"lmserve chat: {exc}") from None


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    if args.command == "serve":
        serve(args)
    elif args.command == "ps":
        ps(args)
    elif args.command == "pull":
        pull(args)
    elif args.command == "chat":
        chat(args)


if __name__ == "__main__":
    main(sys.argv[1:])
