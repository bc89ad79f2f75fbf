"""The online dashboard: ``python analyze.py artifact=DIR serve=true`` (FastAPI app, served by uvicorn).

Routes: the offline page and its data (``GET /``, ``GET /<file>``: only the files that ``artifact/dashboard/``
held when the app started, looked up by name in a table built then, so no request ever names a path that is
read), ``GET /api/info``, ``POST /api/encode`` and ``POST /api/intervene`` (`crosscoder_pl.dashboard.online`).
Bodies above ``max_request_bytes`` get 413 before any parsing; refused prompts get 422 with the reason.
Bound to 127.0.0.1 by default: the app runs models on demand and has no authentication.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from fastapi import FastAPI, HTTPException
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, ConfigDict

from crosscoder_pl.config import DashboardSettings
from crosscoder_pl.crosscoder import CrossCoder
from crosscoder_pl.dashboard.offline import DASHBOARD_DIR, write_dashboard
from crosscoder_pl.dashboard.online import OnlineSession, Prompt, PromptError
from crosscoder_pl.data.activations import token_table

log = logging.getLogger(__name__)
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
}


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: str
    content: str


class EncodeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str | None = None
    messages: list[Message] | None = None
    latents: list[int] = []


class InterveneRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str | None = None
    messages: list[Message] | None = None
    latent: int
    model: Literal["base", "chat", "both"] = "both"
    mode: Literal["ablate", "scale"] = "ablate"
    factor: float = 0.0


class BodyLimit:
    """ASGI middleware: reads at most ``max_bytes`` of a request body, answers 413 beyond (whatever the
    Content-Length claims), then hands the buffered body to the app."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._refuse(send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._refuse(send)
                return
            if not message.get("more_body", False):
                break
        buffered = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        delivered = False

        async def replay() -> dict:
            nonlocal delivered
            if not delivered:
                delivered = True
                return buffered
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send: Any) -> None:
        body = json.dumps({"detail": f"request body over {self.max_bytes} bytes "
                                     "(dashboard.server.max_request_bytes)"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def page_files(dashboard_dir: Path) -> dict[str, Path]:
    """``{relative name: path}`` of the page and data files under ``dashboard_dir`` (html, js, css), listed once."""
    return {
        path.relative_to(dashboard_dir).as_posix(): path
        for path in sorted(dashboard_dir.rglob("*"))
        if path.is_file() and path.suffix in MEDIA_TYPES
    }


def create_app(session: OnlineSession, dashboard_dir: str | Path, info: Mapping[str, Any] | None = None) -> FastAPI:
    """The app: the page of ``dashboard_dir`` (which must hold ``index.html``) plus the prompt API."""
    files = page_files(Path(dashboard_dir))
    if "index.html" not in files:
        raise FileNotFoundError(f"{Path(dashboard_dir) / 'index.html'} not found: write the dashboard first "
                                "(python analyze.py artifact=DIR)")
    settings = session.settings
    app = FastAPI(title="crosscoder_pl dashboard", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, max_bytes=settings.max_request_bytes)

    @app.exception_handler(PromptError)
    async def refused(_request: Any, error: PromptError) -> JSONResponse:
        return JSONResponse(status_code=422, content={"detail": str(error)})

    @app.get("/api/info")
    def api_info() -> dict[str, Any]:
        return {
            "online": True,
            "n_latents": session.crosscoder.n_latents,
            "max_prompt_tokens": settings.max_prompt_tokens,
            "max_text_chars": settings.max_text_chars,
            "max_messages": settings.max_messages,
            "max_chosen_latents": settings.max_chosen_latents,
            "max_request_bytes": settings.max_request_bytes,
            **dict(info or {}),
        }

    @app.post("/api/encode")
    def api_encode(request: EncodeRequest) -> dict[str, Any]:
        return session.encode(_prompt(request), request.latents)

    @app.post("/api/intervene")
    def api_intervene(request: InterveneRequest) -> dict[str, Any]:
        return session.intervene(_prompt(request), request.latent, request.model, request.mode, request.factor)

    @app.get("/")
    def index() -> FileResponse:
        return _file(files, "index.html")

    @app.get("/{name:path}")
    def page_file(name: str) -> FileResponse:
        return _file(files, name)

    return app


def _prompt(request: EncodeRequest | InterveneRequest) -> Prompt:
    messages = None if request.messages is None else [m.model_dump() for m in request.messages]
    return Prompt(text=request.text, messages=messages)


def _file(files: dict[str, Path], name: str) -> FileResponse:
    path = files.get(name)
    if path is None:
        raise HTTPException(status_code=404, detail="not found")
    return FileResponse(path, media_type=MEDIA_TYPES[path.suffix])


def serve_artifact(
    artifact: str | Path,
    crosscoder: CrossCoder,
    pair: Any,
    heldout: Any,
    dashboard: Mapping[str, Any],
) -> None:
    """Serve the artifact's dashboard with the prompt API until interrupted.

    ``heldout``: a callable giving the held-out activations (with their token ids), used only when the
    artifact has no dashboard yet. ``dashboard``: the ``conf/dashboard`` group (``server`` node included).
    """
    import uvicorn  # only the serve path needs it

    artifact = Path(artifact)
    server = DashboardSettings.server(dashboard)
    cc = crosscoder.eval()
    if not (artifact / DASHBOARD_DIR / "index.html").is_file():
        acts = heldout()
        tokens = token_table(acts)
        if tokens is None:
            raise ValueError("the held-out activations carry no token ids: cannot write the dashboard")
        write_dashboard(cc, pair, acts, tokens, artifact, DashboardSettings.read(dashboard))
    torch.set_grad_enabled(False)
    info = {"base_model": getattr(pair, "base_id", "base"), "chat_model": getattr(pair, "chat_id", "chat")}
    app = create_app(OnlineSession(cc, pair, server), artifact / DASHBOARD_DIR, info)
    print(f"\ndashboard of {artifact.resolve()} at http://{server.host}:{server.port}/ (Ctrl-C to stop)")
    uvicorn.run(app, host=server.host, port=server.port, log_level="info")
