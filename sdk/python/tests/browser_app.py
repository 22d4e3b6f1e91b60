"""A real HTTPS web app that knows only browser sessions, for the forward proxy's browser tests
(tests/test_proxy_browser.py; API §16): the "portal" a browser agent works in through Leash.

- `BrowserApp(directory)`: a threaded HTTPS server (HTTP/1.1, keep-alive) on 127.0.0.1 with a
  test CA of its own (tests/proxy_fixtures.py's `RecordingUpstream` and `make_pki`): `ca_file`
  (in `directory`) is the only certificate that trusts it; its leaf names `localhost` and
  `127.0.0.1`; `url` is `https://localhost:PORT`.
- `add_user(name, password)`; `POST /login` (form `user`, `password`) sets the session cookie
  `sid=<random>; HttpOnly; Secure; Path=/` and redirects (303) to `/ledger/home`, a wrong one
  answers 401. `log_in(name, password)` does that over real HTTPS and returns the `sid`.
  Sessions live server-side: `sessions()` maps each valid `sid` to its user.
- Pages that need a valid session (the first `sid` of the `Cookie` header; else `401` and a page
  `#login-needed`):
  - `GET /ledger/...`: the user's ledger, `#user` naming them, `#path` the path;
  - `GET /rotate`: a new session (the old `sid` is invalid from then on), sent as `Set-Cookie:
    sid=<new>`, plus a cookie `seen` that scripts may read (no `HttpOnly`); `#rotated`;
  - `GET /transfer`: a form `#transfer` (fields `to`, `amount`, button `#submit`) posting to
    `POST /transfer`, which carries it out (`transfers()`, in order) and shows `#done`;
  - `GET /cookies`: a script sets the cookie `theme=dark` and writes `document.cookie` into
    `#cookies`;
  - `GET /admin`: a page no Leash route names;
  - `GET /echo/header` and `GET /echo/body`: a debug page that reflects the request's `Cookie`
    header, in the answer's header `X-Seen-Cookie` or in its body after 2,000 bytes of `x`.
- `requests()`: every request the app received, in order, with its headers as sent (names in
  lower case, in order, repeated ones kept) and its body; `mark()` and `since(mark)` give those
  after a point.

No other answer contains a session id or any request header's value (Leash refuses answers that
echo the credential it injected, `502 credential_reflected`, API §16)."""

from __future__ import annotations

import html
import secrets
import ssl
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import httpx
from proxy_fixtures import RecordingHandler, RecordingUpstream, make_pki


@dataclass(frozen=True)
class Transfer:
    """A transfer the app carried out: who asked, and the form's fields."""

    user: str
    to: str
    amount: str


def _page(title: str, body: str) -> bytes:
    return (
        "<!doctype html><html><head><meta charset=utf-8>"
        f"<title>{html.escape(title)}</title></head><body>{body}</body></html>"
    ).encode()


COOKIES_SCRIPT = """<pre id="cookies"></pre>
<script>
document.cookie = "theme=dark; Path=/";
document.getElementById("cookies").textContent = "cookies:" + document.cookie;
</script>"""

TRANSFER_FORM = """<form id="transfer" method="post" action="/transfer">
<input name="to" value="bob"> <input name="amount" value="100">
<button id="submit" type="submit">Send</button></form>"""


class BrowserApp(RecordingUpstream):
    """The portal, serving until `stop`. Thread-safe."""

    def __init__(self, directory: Path) -> None:
        self.ca_file, context = make_pki(directory, name="Portal test CA")
        self.users: dict[str, str] = {}
        self.session_users: dict[str, str] = {}
        self.done: list[Transfer] = []
        super().__init__(context)
        self.url = f"https://localhost:{self.port}"

    def add_user(self, name: str, password: str) -> None:
        with self.lock:
            self.users[name] = password

    def log_in(self, name: str, password: str) -> str:
        """Logs `name` in through `POST /login` over HTTPS (trusting only `ca_file`); returns the
        session id the app set."""
        with httpx.Client(verify=ssl.create_default_context(cafile=str(self.ca_file))) as http:
            answer = http.post(self.url + "/login", data={"user": name, "password": password})
        assert answer.status_code == 303, answer.text
        sid = answer.cookies.get("sid")
        assert sid, answer.headers
        return sid

    def sessions(self) -> dict[str, str]:
        with self.lock:
            return dict(self.session_users)

    def transfers(self) -> list[Transfer]:
        with self.lock:
            return list(self.done)

    def handler(self) -> type[RecordingHandler]:
        app = self

        class Handler(RecordingHandler):
            server_version = "Portal/1"
            upstream = app

            def answer(
                self, status: int, body: bytes, headers: list[tuple[str, str]] | None = None
            ) -> None:
                self.send_response(status)
                for name, value in headers or []:
                    self.send_header(name, value)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Cache-Control", "no-store")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def new_session(self, user: str) -> tuple[str, str]:
                sid = secrets.token_urlsafe(24)
                with app.lock:
                    app.session_users[sid] = user
                return sid, f"sid={sid}; HttpOnly; Secure; Path=/; SameSite=Lax"

            def handle_any(self) -> None:
                request = self.record()
                body = request.body
                path = urllib.parse.urlsplit(self.path).path
                if (self.command, path) == ("GET", "/login"):
                    form = (
                        '<form id="login" method="post" action="/login">'
                        '<input name="user"> <input name="password" type="password">'
                        '<button id="submit" type="submit">Log in</button></form>'
                    )
                    return self.answer(200, _page("Log in", form))
                if (self.command, path) == ("POST", "/login"):
                    fields = urllib.parse.parse_qs(body.decode(errors="replace"))
                    name = fields.get("user", [""])[0]
                    password = fields.get("password", [""])[0]
                    with app.lock:
                        known = app.users.get(name)
                    if known is None or not secrets.compare_digest(known, password):
                        return self.answer(401, _page("Log in", '<p id="error">Wrong</p>'))
                    _, cookie = self.new_session(name)
                    return self.answer(
                        303,
                        _page("Logged in", "<p>Logged in</p>"),
                        [("Set-Cookie", cookie), ("Location", "/ledger/home")],
                    )
                sids = [value for name, value in request.cookies() if name == "sid"]
                with app.lock:
                    found = app.session_users.get(sids[0]) if sids else None
                if found is None:
                    return self.answer(
                        401, _page("Log in first", '<h1 id="login-needed">Please log in</h1>')
                    )
                user = found
                name = html.escape(user)
                if self.command == "GET" and path.startswith("/ledger/"):
                    return self.answer(
                        200,
                        _page(
                            "Ledger",
                            f'<h1>Ledger of <span id="user">{name}</span></h1>'
                            f'<p id="path">{html.escape(path)}</p>',
                        ),
                    )
                if (self.command, path) == ("GET", "/rotate"):
                    with app.lock:
                        del app.session_users[sids[0]]
                    _, cookie = self.new_session(user)
                    return self.answer(
                        200,
                        _page("Rotated", f'<p id="rotated">New session for {name}</p>'),
                        [("Set-Cookie", cookie), ("Set-Cookie", "seen=1; Path=/; Secure")],
                    )
                if (self.command, path) == ("GET", "/transfer"):
                    return self.answer(200, _page("Transfer", TRANSFER_FORM))
                if (self.command, path) == ("POST", "/transfer"):
                    fields = urllib.parse.parse_qs(body.decode(errors="replace"))
                    transfer = Transfer(
                        user, fields.get("to", [""])[0], fields.get("amount", [""])[0]
                    )
                    with app.lock:
                        app.done.append(transfer)
                        count = len(app.done)
                    return self.answer(
                        200, _page("Done", f'<p id="done">Transfer {count} done for {name}</p>')
                    )
                if (self.command, path) == ("GET", "/cookies"):
                    return self.answer(200, _page("Cookies", COOKIES_SCRIPT))
                if (self.command, path) == ("GET", "/echo/header"):
                    seen = "; ".join(request.header("cookie"))
                    return self.answer(200, _page("Echo", "<p>ok</p>"), [("X-Seen-Cookie", seen)])
                if (self.command, path) == ("GET", "/echo/body"):
                    seen = html.escape("; ".join(request.header("cookie")))
                    return self.answer(
                        200, _page("Echo", f'<p>{"x" * 2000}</p><pre id="seen">{seen}</pre>')
                    )
                if (self.command, path) == ("GET", "/admin"):
                    return self.answer(200, _page("Admin", f'<p id="admin">Admin {name}</p>'))
                return self.answer(404, _page("Not found", "<p>Not found</p>"))

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = handle_any

        return Handler
