"""The studio's web server: a Starlette app over one `Studio`, served by uvicorn on localhost.

Routes (JSON in and out; every error is ``{"error": "one line"}`` with status 400, or 500 for
a bug, whose traceback goes to the server's log, never to the page):

- ``GET /`` the page; ``GET /static/...`` its script and style.
- ``GET /api/info`` adapters, layer groups, methods and their parameters, examples.
- ``POST /api/outputs`` ``{fusion, prompts, max_new_tokens}`` -> outputs and scores.
- ``POST /api/search`` ``{fusion, optimizer, granularity, budget, objective}`` starts a search;
  ``GET /api/search`` its state, curve and, when done, the found fusion.
- ``POST /api/export`` ``{fusion, folder, adapter, recipe, fold, overwrite, name}``.
"""

from __future__ import annotations

import json
import logging
import socket
import sys
import threading
import traceback
from pathlib import Path
from typing import Any, Awaitable, Callable, Optional

from ..errors import IA3FuseError, MissingDependencyError
from .session import Studio

__all__ = ["create_app", "StudioServer", "LOCALHOST", "require", "warn_if_public"]

LOCALHOST = ("127.0.0.1", "localhost", "::1")
STATIC = Path(__file__).parent / "static"
_log = logging.getLogger("ia3fuse.studio")


def require() -> None:
    for module in ("starlette", "uvicorn"):
        try:
            __import__(module)
        except ImportError:
            raise MissingDependencyError("ia3fuse studio", module, "studio") from None


class _SearchJob:
    """One search at a time, in a thread; the page polls its state."""

    def __init__(self) -> None:
        self.state = "idle"
        self.history: list[dict[str, float]] = []
        self.result: Optional[dict[str, Any]] = None
        self.error: Optional[str] = None
        self.thread: Optional[threading.Thread] = None

    def snapshot(self) -> dict[str, Any]:
        return {"state": self.state, "history": list(self.history), "result": self.result, "error": self.error}


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def create_app(studio: Studio) -> Any:
    """The Starlette application serving ``studio``."""
    require()
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import FileResponse, JSONResponse
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    job = _SearchJob()

    def fail(exc: BaseException) -> JSONResponse:
        if isinstance(exc, IA3FuseError):
            return JSONResponse({"error": _one_line(exc)}, status_code=400)
        _log.error("studio request failed:\n%s", "".join(traceback.format_exception(exc)))
        return JSONResponse(
            {"error": f"internal error ({type(exc).__name__}: {_one_line(exc)}); the server log has the details"},
            status_code=500,
        )

    async def body(request: Request) -> dict[str, Any]:
        try:
            data = json.loads(await request.body() or b"{}")
        except ValueError as exc:
            raise IA3FuseError(f"the request is not JSON ({exc})") from None
        if not isinstance(data, dict):
            raise IA3FuseError("the request is not a JSON object")
        return data

    async def index(request: Request) -> Any:
        return FileResponse(STATIC / "index.html")

    def info(request: Request) -> Any:
        try:
            return JSONResponse(studio.info())
        except Exception as exc:  # noqa: BLE001 - every error reaches the page as one line
            return fail(exc)

    def threaded(work: Callable[[dict[str, Any]], Any]) -> Callable[[Request], Awaitable[Any]]:
        """A route that runs ``work(request JSON)`` off the event loop; its errors become one line."""
        from starlette.concurrency import run_in_threadpool

        async def route(request: Request) -> Any:
            try:
                return JSONResponse(await run_in_threadpool(work, await body(request)))
            except Exception as exc:  # noqa: BLE001 - every error reaches the page as one line
                return fail(exc)

        return route

    outputs = threaded(
        lambda data: studio.outputs(
            data.get("fusion") or {}, data.get("prompts") or [], max_new_tokens=data.get("max_new_tokens", 20)
        )
    )
    export = threaded(
        lambda data: studio.export(
            data.get("fusion") or {},
            data.get("folder") or "",
            adapter=bool(data.get("adapter", True)),
            recipe=bool(data.get("recipe", True)),
            fold=bool(data.get("fold", False)),
            overwrite=bool(data.get("overwrite", False)),
            name=str(data.get("name") or "fused"),
        )
    )

    async def search_start(request: Request) -> Any:
        try:
            data = await body(request)
            if job.state == "running":
                raise IA3FuseError("a search is already running; wait for it to finish")
            fusion = studio.fusion(data.get("fusion") or {})  # checked here: a bad fusion fails the request
            budget = data.get("budget")
            if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int)):
                raise IA3FuseError(f"budget {budget!r}; pass a whole number of forward passes")
            job.state, job.history, job.result, job.error = "running", [], None, None

            def run() -> None:
                try:
                    job.result = studio.search(
                        fusion,
                        optimizer=str(data.get("optimizer", "adam")),
                        granularity=str(data.get("granularity", "task")),
                        budget=budget,
                        objective=str(data.get("objective", "loss")),
                        on_step=job.history.append,
                    )
                    job.state = "done"
                except Exception as exc:  # noqa: BLE001 - shown in the page, the app stays usable
                    if not isinstance(exc, IA3FuseError):
                        _log.error("studio search failed:\n%s", "".join(traceback.format_exception(exc)))
                    job.error, job.state = _one_line(exc), "error"

            job.thread = threading.Thread(target=run, name="ia3fuse-studio-search", daemon=True)
            job.thread.start()
            return JSONResponse(job.snapshot())
        except Exception as exc:  # noqa: BLE001
            return fail(exc)

    def search_state(request: Request) -> Any:
        return JSONResponse(job.snapshot())

    routes = [
        Route("/", index),
        Route("/api/info", info),
        Route("/api/outputs", outputs, methods=["POST"]),
        Route("/api/search", search_start, methods=["POST"]),
        Route("/api/search", search_state, methods=["GET"]),
        Route("/api/export", export, methods=["POST"]),
        Mount("/static", app=StaticFiles(directory=str(STATIC)), name="static"),
    ]
    app = Starlette(routes=routes)
    app.state.search = job
    return app


class StudioServer:
    """uvicorn serving `create_app` on ``host:port`` (port 0: a free one), in this thread
    (`run`) or a background one (`start` / `stop`)."""

    def __init__(self, studio: Studio, *, host: str = "127.0.0.1", port: int = 7860, log_level: str = "warning"):
        require()
        import uvicorn

        self.studio = studio
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.socket.bind((host, port))
        except OSError as exc:
            self.socket.close()
            raise IA3FuseError(
                f"cannot listen on {host}:{port} ({exc.strerror or exc}); pick another --port or --host"
            ) from None
        self.host, self.port = host, self.socket.getsockname()[1]
        config = uvicorn.Config(create_app(studio), log_level=log_level, lifespan="off")
        self.server = uvicorn.Server(config)
        self._thread: Optional[threading.Thread] = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def run(self) -> None:
        """Serve in this thread until stopped."""
        self.server.run(sockets=[self.socket])

    def start(self) -> str:
        """Serve in a background thread; returns the URL once it accepts connections."""
        import time

        self._thread = threading.Thread(target=self.run, name="ia3fuse-studio", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise IA3FuseError(f"the studio did not start on {self.url}")
            time.sleep(0.02)
        return self.url

    def wait(self) -> None:
        """Block until the background server stops (Ctrl-C reaches this thread as KeyboardInterrupt)."""
        while self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout=0.5)

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.socket.close()


def warn_if_public(host: str) -> None:
    if host not in LOCALHOST:
        print(
            f"ia3fuse: warning: the studio listens on {host}, beyond this machine, and has no authentication: "
            "anyone who reaches it can run the model and write files as you",
            file=sys.stderr,
        )
