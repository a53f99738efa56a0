"""The Dash app: one read-only :class:`~dashboards.readonly.Source`, three pages, URL routing.

Routes: ``/`` (studies), ``/study/<name>`` (Pareto front ...), ``/study/<name>/trial/<n>``.
Each page is built on the server when its URL is opened (one callback round trip), then
``dcc.Interval`` callbacks refresh it while the study runs; a finished study stops polling.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from dash import Dash, Input, Output, dcc, html

from dashboards import components as c
from dashboards.pages import studies, study, trial
from dashboards.readonly import Source, open_source
from qsearch.errors import ConfigError, QsearchError

log = logging.getLogger(__name__)
ASSETS = Path(__file__).parent / "assets"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


NOT_FOUND = ("Page not found", "There is no page at this address. Open the list of "
             "studies and pick a study or a trial from there.")


def _scrub(src: Source, text: str) -> str:
    """An error message without the server's database URL or file path: a message page
    is shown to whoever opens a wrong link, and says what is missing, not where it lives."""
    for secret in {src.masked_url, src.url, src.ro_url}:
        if secret:
            text = text.replace(f" in {secret}", "").replace(secret, "the database")
    return text


def route(src: Source, pathname: str | None) -> Any:
    """The page for ``pathname`` (a message page for unknown paths, studies or trials)."""
    parts = [unquote(p) for p in (pathname or "/").strip("/").split("/") if p]
    try:
        if not parts:
            return studies.layout(src)
        if parts[0] == "study" and len(parts) == 2:
            return study.layout(src, parts[1])
        if parts[0] == "study" and len(parts) == 4 and parts[2] == "trial":
            if not parts[3].isdigit():
                return c.message_page("Not found", "a trial is named by its number "
                                                   "(/study/<name>/trial/<number>)")
            return trial.layout(src, parts[1], int(parts[3]))
    except QsearchError as e:
        return c.message_page("Cannot show this page", _scrub(src, str(e)))
    return c.message_page(*NOT_FOUND)


def create_app(storage: str | Source | None = None) -> Dash:
    """The dashboard for one database URL, opened read-only."""
    src = storage if isinstance(storage, Source) else open_source(storage)
    app = Dash("dashboards", assets_folder=str(ASSETS), suppress_callback_exceptions=True,
               title="qsearch dashboard", update_title=None, serve_locally=True)
    app.qsearch_source = src  # type: ignore[attr-defined]  - for tests and the CLI
    app.layout = html.Div([
        dcc.Location(id="url", refresh="callback-nav"),
        html.Header([dcc.Link("qsearch", href="/", className="brand"),
                     html.Span("Pareto dashboards", className="brand-sub"),
                     # The database is named on the studies page, not on every page (a
                     # wrong link's page must not show where the server keeps its data).
                     html.Span("read-only", className="header-url")],
                    className="topbar"),
        html.Main(id="page", className="main"),
    ])

    @app.callback(Output("page", "children"), Input("url", "pathname"))
    def _route(pathname: str | None) -> Any:
        return route(src, pathname)

    studies.register(app, lambda: src)
    study.register(app, lambda: src)
    trial.register(app, lambda: src)
    return app


def check_host(host: str) -> bool:
    """True when ``host`` is local only. Anything wider is allowed (the user asked for it)
    but logged loudly: the dashboard has no authentication."""
    if host in LOCAL_HOSTS:
        return True
    log.warning("dashboard listening on %s: reachable from other machines and WITHOUT "
                "authentication (chosen with --host); use --host 127.0.0.1 to keep it local",
                host)
    return False


def serve(storage: str | None = None, host: str = "127.0.0.1", port: int = 8050) -> None:
    """Run the dashboard until interrupted (Flask's threaded server)."""
    if not 0 < port < 65536:
        raise ConfigError("--port", f"must be 1..65535 (got {port})")
    app = create_app(storage)
    check_host(host)
    shown = f"[{host}]" if ":" in host else host
    log.info("qsearch dashboard (read-only) for %s at http://%s:%d/",
             app.qsearch_source.masked_url, shown, port)  # type: ignore[attr-defined]
    app.run(host=host, port=port, debug=False)
