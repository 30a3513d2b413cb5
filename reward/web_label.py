"""`python -m pipeline label --web`: the labelling page, several people at once, on Starlette under uvicorn.

The page (reward/web_static/) fetches each pair as JSON and puts model text into the page with `textContent`, so a
response is shown as written and never parsed as HTML; the Content-Security-Policy lets only our own script file
run besides. What keeps the labels safe:
- bound to localhost by default, where only Host headers naming localhost are served (a web page that rebinds its
  own domain to 127.0.0.1 gets nothing);
- bound to any other address, every request needs the token printed with the address (once given as ?token=, it
  is kept in a same-site cookie);
- requests that change labels are JSON POSTs carrying the page's CSRF token in a header, which another site can
  neither read nor send.
Every handler runs on the one event loop, so the desk (reward.desk) sees one request at a time; a label's fsync
blocks the loop for a moment, which a person clicking cannot notice.
"""

from __future__ import annotations

import hmac
import html
import ipaddress
import json
import secrets
import signal
import socket
from pathlib import Path
from typing import Callable

import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from pipeline.config import JudgeConfig
from pipeline.errors import PipelineError
from pipeline.log import console
from reward.desk import Desk, Refused
from reward.pairs import Pair

STATIC = Path(__file__).with_name("web_static")
TOKEN_COOKIE = "label_token"
LOCAL_NAMES = {"localhost", "127.0.0.1", "::1"}
# The page's own script and style only: an injected <script> or inline handler would not run even if some text did
# reach the page as HTML.
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",  # the token may be in the address bar
    "Cache-Control": "no-store",
}


class Forbidden(Refused):
    status = 403


def _state(desk: Desk, name: str) -> dict:
    """What the page shows `name` next: their pair (None when nothing is left for them) and the progress."""
    pair = desk.next_pair(name)
    return {"annotator": name, "progress": desk.progress(name).__dict__,
            "pair": None if pair is None else {"id": pair.id, "prompt": pair.prompt, "response_a": pair.response_a,
                                               "response_b": pair.response_b, "source": pair.source}}


async def _json_body(request: Request, csrf: str) -> dict:
    """The body of a label-changing request, once it shows it comes from our own page."""
    if not hmac.compare_digest(request.headers.get("x-csrf-token", "").encode(), csrf.encode()):
        raise Forbidden("missing or stale CSRF token: reload the page (the server may have restarted)")
    if request.headers.get("sec-fetch-site", "same-origin") != "same-origin":
        raise Forbidden("cross-site request refused")
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        raise Refused("send JSON (Content-Type: application/json)")
    try:
        body = json.loads(await request.body())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise Refused(f"the body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise Refused("the body must be a JSON object")
    return body


def create_app(desk: Desk, token: str | None, local: bool) -> Starlette:
    """The app over `desk`. `token`: asked of every request (None: of none, for a server on localhost).
    `local`: serve only requests whose Host names localhost."""
    csrf = secrets.token_urlsafe(32)
    page = (STATIC / "label.html").read_text(encoding="utf-8").replace("{{csrf}}", html.escape(csrf))

    async def index(request: Request) -> Response:
        response = HTMLResponse(page)
        if token and request.query_params.get("token"):  # `guard` checked it: keep it for the page's requests
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
        return response

    async def next_pair(request: Request) -> Response:
        return JSONResponse(_state(desk, request.query_params.get("annotator", "")))

    async def answer(request: Request) -> Response:
        body = await _json_body(request, csrf)
        name, pair_id, choice = body.get("annotator"), body.get("pair_id"), body.get("choice")
        comment = body.get("comment") or ""
        if not all(isinstance(value, str) for value in (name, pair_id, choice, comment)):
            raise Refused("annotator, pair_id, choice and comment must be strings")
        desk.answer(name, pair_id, choice, comment)
        return JSONResponse(_state(desk, name))

    async def undo(request: Request) -> Response:
        body = await _json_body(request, csrf)
        name = body.get("annotator")
        undone = desk.undo(name)
        return JSONResponse({**_state(desk, name), "undone": undone})

    async def guard(request: Request, call_next: Callable) -> Response:
        if local and request.url.hostname not in LOCAL_NAMES:
            return PlainTextResponse("this server answers only to localhost\n", status_code=400, headers=HEADERS)
        if token:
            given = (request.query_params.get("token") or request.cookies.get(TOKEN_COOKIE)
                     or request.headers.get("authorization", "").removeprefix("Bearer ").strip())
            if not hmac.compare_digest(given.encode(), token.encode()):
                return PlainTextResponse("a token is required: open the address that `python -m pipeline label "
                                         "--web` printed\n", status_code=401, headers=HEADERS)
        response = await call_next(request)
        response.headers.update(HEADERS)
        return response

    async def refused(request: Request, exc: Refused) -> Response:
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    routes = [Route("/", index), Route("/api/next", next_pair), Route("/api/answer", answer, methods=["POST"]),
              Route("/api/undo", undo, methods=["POST"]), Mount("/static", StaticFiles(directory=STATIC))]
    return Starlette(routes=routes, middleware=[Middleware(BaseHTTPMiddleware, dispatch=guard)],
                     exception_handlers={Refused: refused})


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on `host`:`port` (0: any free port)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        raise PipelineError(f"cannot listen on {host}:{port}: {e}") from None
    sock.listen(128)
    return sock


def address_url(sock: socket.socket, host: str) -> str:
    port = sock.getsockname()[1]
    shown = socket.gethostname() if host in ("0.0.0.0", "::") else host
    return f"http://[{shown}]:{port}/" if ":" in shown else f"http://{shown}:{port}/"


def serve(desk: Desk, host: str, port: int, announce: Callable[[str], None]) -> None:
    """Serve the page until Ctrl-C. `announce` gets the address to open (with the token, off localhost)."""
    sock = bind(host, port)
    local = ipaddress.ip_address(sock.getsockname()[0].split("%")[0]).is_loopback
    token = None if local else secrets.token_urlsafe(24)
    url = address_url(sock, host)
    announce(url if local else f"{url}?token={token}")
    server = uvicorn.Server(uvicorn.Config(create_app(desk, token, local), log_level="warning", access_log=False))
    server.run(sockets=[sock])


def _stop(signum, frame):
    raise KeyboardInterrupt  # a kill stops the server as Ctrl-C does: after the requests in flight, with a summary


def label_on_the_web(run_dir: Path, pairs: list[Pair], judge: JudgeConfig, host: str, port: int) -> int:
    """`label --web`: serve the page over `pairs` until Ctrl-C or a kill, then say what is left to label."""
    desk = Desk(run_dir, pairs, judge.overlap, judge.disagreement)
    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        serve(desk, host, port, lambda url: console.print(
            f"labelling page: {url}\n  each person opens it and gives a name; every answer is saved as it is "
            f"given; Ctrl-C stops the server", markup=False))
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        desk.close()
    counts = desk.outcomes()
    console.print(f"labelling stopped: {counts['decided']} of {len(pairs)} pairs decided, {counts['dropped']} "
                  f"dropped (annotators disagreed), {counts['waiting']} still waiting for labels", markup=False)
    if not counts["waiting"]:
        console.print("run `python -m pipeline run` to continue", markup=False)
    return 0
