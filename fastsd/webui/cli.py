"""`fastsd serve`: the AUTOMATIC1111-compatible API on a session's trained model."""

from __future__ import annotations

import argparse


def _serve(args) -> None:
    import os

    from fastsd.webui.auth import PASSWORD_ENV
    from fastsd.webui.memory import MemoryPolicy
    from fastsd.webui.server import serve, shutdown

    from fastsd.cli_common import home

    policy = MemoryPolicy(**{k: getattr(args, k) for k in MemoryPolicy.field_names()})
    root = home(args)
    password = args.password or os.environ.get(PASSWORD_ENV) or None
    server = serve(args.session, args.model, listen=args.listen, port=args.port,
                   user=args.user, password=password, root=root, policy=policy,
                   max_queue=args.max_queue, page=args.page)
    print(f"fastsd API: {server.url}/sdapi/v1 (docs: {server.url}/docs)"
          + (f", page: {server.url}/" if args.page else ""))
    if server.auth is not None:
        from fastsd.webui.auth import login

        shown = server.auth.password if not password else "(the one you gave)"
        print(f"HTTP Basic auth: {login(server.auth.username, shown)}")
    print("Press Ctrl-C to stop.", flush=True)
    try:
        server.wait()
    finally:
        server.stop()
        shutdown()


def _ngrok_token(args) -> None:
    import getpass
    import sys

    from fastsd.cli_common import home
    from fastsd.errors import DataError
    from fastsd.tunnel import ngrok

    token = (getpass.getpass("ngrok token (not shown): ") if sys.stdin.isatty()
             else sys.stdin.readline()).strip()
    if not token:
        raise DataError("No token was given. Type it when asked, or run "
                        "'fastsd ngrok-token < FILE' with the token in FILE.")
    root = home(args)
    ngrok.set_token(token, root, save=True)
    print(f"Saved the ngrok token in the workspace ({ngrok.TOKEN_FILE}, readable by you "
          "only); the ngrok tunnel uses it from now on.")


def register(sub: argparse._SubParsersAction) -> None:
    """Add `fastsd serve` to the `fastsd` parser."""
    from fastsd.cli_common import add_home
    from fastsd.webui.auth import DEFAULT_PORT, DEFAULT_USER
    from fastsd.webui.memory import MemoryPolicy

    p = sub.add_parser(
        "serve", help="serve the AUTOMATIC1111-compatible API on a session's model",
        description="Start the generation engine and its AUTOMATIC1111-compatible HTTP API "
        "(/sdapi/v1) on the session's trained model, or on --model. Images are saved to the "
        "session's outputs/. Listening beyond localhost turns on HTTP Basic auth.")
    p.add_argument("--session", help="session whose trained model to load and whose "
                   "outputs/ to save to")
    p.add_argument("--model", help="model to load instead: a tiny model, a Hugging Face repo "
                   "id, a diffusers folder or a .safetensors/.ckpt file")
    p.add_argument("--listen", action="store_true",
                   help="listen on all interfaces (0.0.0.0); turns on auth")
    p.add_argument("--port", type=int, default=DEFAULT_PORT,
                   help=f"port (default: {DEFAULT_PORT}; 0: any free port)")
    p.add_argument("--user", default=None,
                   help=f"HTTP Basic auth user (default: {DEFAULT_USER})")
    p.add_argument("--password", default=None,
                   help="HTTP Basic auth password (default: $FASTSD_WEBUI_PASSWORD, else "
                   "generated and shown once)")
    p.add_argument("--page", action=argparse.BooleanOptionalAction, default=True,
                   help="serve the web page at / (needs gradio)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="jobs that may wait; more get 503 (default: 64)")
    for name in MemoryPolicy.field_names():
        p.add_argument("--" + name.replace("_", "-"), dest=name,
                       action=argparse.BooleanOptionalAction, default=None,
                       help=f"force {name.replace('_', ' ').replace('vae', 'VAE')} on or off "
                       "(default: chosen from free VRAM)")
    add_home(p)
    p.set_defaults(func=_serve)
    p = sub.add_parser(
        "ngrok-token", help="keep your ngrok authtoken in the workspace for the ngrok tunnel",
        description="Read your ngrok account's authtoken (typed without being shown, or from "
        "standard input) and keep it in the workspace's ngrok_token file, readable by you "
        "only, where the ngrok tunnel reads it (as the notebooks' Ngrok_Token field with "
        "Save_Ngrok_Token ticked does). It is never put on a command line or in a log.")
    add_home(p)
    p.set_defaults(func=_ngrok_token)
