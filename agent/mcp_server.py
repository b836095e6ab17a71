"""`facsynth serve`: the toolbox (agent/toolbox.py) as an MCP server, on the official SDK's
`MCPServer` (mcp 2.x).

- Transports: stdio (default), or streamable HTTP on a loopback address (`/mcp`); any other
  address only with `allow_remote`. HTTP can require a bearer token, checked by the SDK's
  `TokenVerifier` hook (a static shared secret: there is no OAuth authorization server).
- HTTP always checks Host and Origin (DNS-rebinding protection, the SDK's
  `TransportSecuritySettings`), whatever the address: the SDK turns it on by itself only for
  127.0.0.1/localhost/::1, which left e.g. 127.0.0.2 open to any web page. Allowed: the served
  `host:port`, plus `127.0.0.1`/`localhost`/`[::1]` on that port for a loopback address (and
  the machine's host name for a wildcard address such as 0.0.0.0); origins are `http://` the
  same. A foreign Host gets 421, a foreign Origin 403 (the SDK's answers).
- Every tool is a one-line delegation to the Toolbox, run in a worker thread behind one
  semaphore (`max_concurrent` calls at once; model work inside is serialised by the toolbox).
  Parameters are typed and bounded (the SDK validates them against the JSON schema); results
  are pydantic models (structured content). Unknown arguments are refused, naming them (the
  SDK's argument models ignore extras; `strict` makes each tool's model forbid them, which
  also puts `additionalProperties: false` in its input schema). Long tools report progress
  through the request context.
- Expected failures (bad data, refused paths, invalid values) become `ToolError`s: the client
  gets the message, the server logs one line. Logs go to stderr; stdout is the protocol.
"""

import asyncio
import hmac
import ipaddress
import logging
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, TypeVar

import anyio
import anyio.from_thread
import anyio.to_thread
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.mcpserver.tools import Tool
from mcp.server.mcpserver.utilities.func_metadata import ArgModelBase
from mcp.server.transport_security import TransportSecuritySettings
from mcp_types import ToolAnnotations
from pydantic import ConfigDict, create_model, model_validator
from pydantic_core import PydanticCustomError

from agent.toolbox import (
    Budget,
    CoverageSummary,
    DatasetSummary,
    Examples,
    FeatureExplanation,
    FeatureId,
    FeatureList,
    FeatureSearch,
    GenerationResult,
    ImproveResult,
    K,
    Limit,
    MissingFeatures,
    PathArg,
    PerFeature,
    ProgressFn,
    Query,
    Relevance,
    Rounds,
    RunReport,
    Temperature,
    Toolbox,
    Top,
)
from tools.errors import ConfigError, FacsynthError

log = logging.getLogger(__name__)
T = TypeVar("T")

LOOPBACK = ("localhost",)
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
WILDCARD = ("0.0.0.0", "::")
INSTRUCTIONS = (
    "facsynth measures which task features (SAE features of a language model) a training "
    "dataset is missing (Feature Activation Coverage, FAC) and synthesises samples that fill "
    "them. Paths are relative to the server's workspace root. Typical order: describe_dataset, "
    "coverage(anchor, data), explain_feature, generate_and_verify, improve, report. "
    "generate_and_verify and improve take minutes."
)
READ_ONLY = ToolAnnotations(read_only_hint=True, open_world_hint=False)
WRITES = ToolAnnotations(read_only_hint=False, destructive_hint=False, open_world_hint=False)


class StaticTokenVerifier:
    """Accepts exactly one shared bearer token (compared in constant time)."""

    def __init__(self, token: str) -> None:
        if len(token) < 16:
            raise ConfigError("the MCP bearer token must be at least 16 characters")
        self._token = token

    async def verify_token(self, token: str) -> AccessToken | None:
        if not hmac.compare_digest(token.encode(), self._token.encode()):
            return None
        return AccessToken(token=token, client_id="facsynth-client", scopes=["facsynth"])


def is_loopback(host: str) -> bool:
    if host in LOOPBACK:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def parse_address(address: str) -> tuple[str, int]:
    """'HOST:PORT' (or ':PORT', or '[::1]:PORT') -> (host, port); host defaults to loopback."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--http {address!r}: expected HOST:PORT, e.g. 127.0.0.1:8765")
    return host.strip("[]") or "127.0.0.1", int(port)


def _host_header(host: str) -> str:
    """How a Host header names `host` (IPv6 literals in brackets)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def transport_security(host: str, port: int) -> TransportSecuritySettings:
    """DNS-rebinding protection for HTTP served on `host:port`: only these Host headers, and
    Origins `http://` + the same, are accepted (see the module doc)."""
    names = {_host_header(host)}
    if is_loopback(host):
        names.update(LOOPBACK_NAMES)
    if host in WILDCARD:  # clients cannot send 0.0.0.0: the loopback names and our host name
        names = {*LOOPBACK_NAMES, socket.gethostname()}
    hosts = [f"{n}:{port}" for n in sorted(names)]
    if port == 80:  # clients leave the default port out of Host and Origin
        hosts += sorted(names)
    return TransportSecuritySettings(
        enable_dns_rebinding_protection=True, allowed_hosts=hosts,
        allowed_origins=[f"http://{h}" for h in hosts])


class _RejectUnknown(ArgModelBase):
    """Mixed into a tool's argument model: unknown arguments are an error naming them."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def reject_unknown_arguments(cls, data: Any) -> Any:
        if isinstance(data, dict):
            known = [f.alias or name for name, f in cls.model_fields.items()]
            unknown = sorted(str(k) for k in data if k not in known)
            if unknown:
                raise PydanticCustomError(
                    "unknown_argument",
                    "unknown argument{s} {unknown}: this tool takes {known}",
                    {"s": "s" if len(unknown) > 1 else "", "unknown": ", ".join(unknown),
                     "known": ", ".join(known)})
        return data


def strict(tool: Tool) -> Tool:
    """`tool` with unknown arguments refused. The SDK builds each tool's argument model with
    pydantic's default `extra="ignore"` and has no option for it, so the model is replaced by
    a subclass that forbids extras (the input schema is regenerated from it)."""
    base = tool.fn_metadata.arg_model
    model = create_model(base.__name__, __base__=(base, _RejectUnknown),
                         __module__=base.__module__)
    meta = tool.fn_metadata.model_copy(update={"arg_model": model})
    return tool.model_copy(update={"fn_metadata": meta,
                                   "parameters": model.model_json_schema(by_alias=True)})


def _progress(ctx: Context) -> ProgressFn:
    """A toolbox progress callback (called in a worker thread) -> the client's progress."""

    def report(message: str, done: float, total: float | None) -> None:
        try:
            anyio.from_thread.run(ctx.report_progress, done, total, message)
        except Exception as e:  # a client that went away must not fail the tool
            log.debug("progress not delivered: %s", e)

    return report


def build_server(
    box: Toolbox,
    *,
    max_concurrent: int = 2,
    token: str | None = None,
    url: str | None = None,
) -> MCPServer:
    """The MCP server over `box`. `token` (HTTP only) needs `url`, the server's base URL."""
    if max_concurrent < 1:
        raise ConfigError("--max-concurrent must be at least 1")
    gate = asyncio.Semaphore(max_concurrent)

    async def call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        async with gate:
            try:
                return await anyio.to_thread.run_sync(partial(fn, *args, **kwargs))
            except (FacsynthError, ValueError, OSError) as e:
                raise ToolError(str(e)) from e

    @asynccontextmanager
    async def lifespan(_: MCPServer) -> AsyncIterator[None]:
        try:
            yield None
        finally:
            await anyio.to_thread.run_sync(box.close)

    auth: dict[str, Any] = {}
    if token:
        if not url:
            raise ConfigError("a bearer token needs the HTTP transport (--http HOST:PORT)")
        auth = {
            "token_verifier": StaticTokenVerifier(token),
            # the SDK publishes these as OAuth protected-resource metadata; with a static token
            # there is no authorization server, so the issuer is this server itself
            "auth": AuthSettings(issuer_url=url, resource_server_url=f"{url}/mcp",  # type: ignore[arg-type]
                                 validate_token_resource=False, required_scopes=["facsynth"]),
        }
    tools: list[Tool] = []

    def tool(annotations: ToolAnnotations) -> Callable[[Callable[..., Any]], Any]:
        def register(fn: Callable[..., Any]) -> Any:
            tools.append(strict(Tool.from_function(fn, annotations=annotations)))
            return fn

        return register

    @tool(READ_ONLY)
    async def describe_dataset(path: PathArg, examples: Examples = 3) -> DatasetSummary:
        """Rows, label balance (1 = harmful), text lengths, duplicates and example rows of a
        dataset file (JSONL/CSV/Parquet) in the workspace root."""
        return await call(box.describe_dataset, path, examples)

    @tool(READ_ONLY)
    async def coverage(anchor: PathArg, data: PathArg, ctx: Context, top: Top = 10
                       ) -> CoverageSummary:
        """Feature Activation Coverage (FAC) of `data` against the task features of the
        labelled `anchor` set, with the top missing features and a span activating each."""
        return await call(box.coverage, anchor, data, top, progress=_progress(ctx))

    @tool(READ_ONLY)
    async def missing_features(anchor: PathArg, data: PathArg, limit: Limit = 20
                               ) -> MissingFeatures:
        """The task features `data` never activates (most task-specific first), with spans."""
        return await call(box.missing_features, anchor, data, limit)

    @tool(READ_ONLY)
    async def search_features(query: Query, k: K = 10) -> FeatureSearch:
        """Search the feature memory (features interpreted so far) by meaning."""
        return await call(box.search_features, query, k)

    @tool(READ_ONLY)
    async def explain_feature(anchor: PathArg, data: PathArg, feature: FeatureId
                              ) -> FeatureExplanation:
        """What one SAE feature responds to, its strongest anchor spans and its relevance."""
        return await call(box.explain_feature, anchor, data, feature)

    @tool(WRITES)
    async def generate_and_verify(
        anchor: PathArg, data: PathArg, features: FeatureList, ctx: Context,
        per_feature: PerFeature = 2, out: PathArg = "synthetic.jsonl",
        temperature: Temperature = 0.8,
    ) -> GenerationResult:
        """Generate samples aimed at missing features and keep only those that activate their
        target; kept rows go to `out` (JSONL), rejected ones beside it. Takes minutes."""
        return await call(box.generate_and_verify, anchor, data, features, per_feature, out,
                          temperature, progress=_progress(ctx))

    @tool(WRITES)
    async def improve(
        anchor: PathArg, data: PathArg, ctx: Context, run_dir: PathArg = "runs/mcp",
        rounds: Rounds = 1, budget: Budget = 40, top: Top = 5, per_feature: PerFeature = 2,
        relevance: Relevance = "auto", resume: bool = False,
    ) -> ImproveResult:
        """Self-improvement rounds in `run_dir` (coverage, interpret, generate, verify, train,
        evaluate) until FAC stops improving or `rounds`/`budget` is reached. Takes minutes."""
        return await call(box.improve, anchor, data, run_dir, rounds, budget, top,
                          per_feature, relevance, resume, progress=_progress(ctx))

    @tool(WRITES)
    async def report(run_dir: PathArg) -> RunReport:
        """Write the HTML report of an improve run and summarise its rounds."""
        return await call(box.report, run_dir)

    return MCPServer("facsynth", instructions=INSTRUCTIONS, lifespan=lifespan,
                     log_level="WARNING", tools=tools, **auth)


def serve(
    box: Toolbox,
    *,
    http: str | None = None,
    allow_remote: bool = False,
    token: str | None = None,
    max_concurrent: int = 2,
) -> None:
    """Run the server until the client disconnects (stdio) or Ctrl-C (HTTP)."""
    if http is None:
        if token:
            log.warning("a bearer token only applies to --http; stdio is protected by the "
                        "process that launched the server")
        build_server(box, max_concurrent=max_concurrent).run("stdio")
        return
    host, port = parse_address(http)
    if not is_loopback(host) and not allow_remote:
        raise ConfigError(f"--http {http}: {host} is not a loopback address; the tools read and "
                          "write files under the root, so add --allow-remote (and --token) to "
                          "serve other machines on purpose")
    if not is_loopback(host) and not token:
        log.warning("serving %s without a bearer token: anyone who can reach it can run tools",
                    host)
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}"
    server = build_server(box, max_concurrent=max_concurrent, token=token, url=url)
    security = transport_security(host, port)
    log.warning("facsynth MCP server on %s/mcp (root %s); accepted Host headers: %s", url,
                box.root, ", ".join(security.allowed_hosts))
    server.run("streamable-http", host=host, port=port, transport_security=security)
