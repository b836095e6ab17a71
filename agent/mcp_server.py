"""`facsynth serve`: the facsynth tools (agent/tool_registry.py) as an MCP server, on the
official SDK's `MCPServer` (mcp 2.x).

- Transports: stdio (default), or streamable HTTP on a loopback address (`/mcp`); any other
  address only with `allow_remote`. HTTP can require a bearer token, checked by the SDK's
  `TokenVerifier` hook (a static shared secret: there is no OAuth authorization server).
- HTTP always checks Host and Origin (DNS-rebinding protection, the SDK's
  `TransportSecuritySettings`), whatever the address: the SDK turns it on by itself only for
  127.0.0.1/localhost/::1, which left e.g. 127.0.0.2 open to any web page. Allowed: the served
  `host:port`, plus `127.0.0.1`/`localhost`/`[::1]` on that port for a loopback address (and
  the machine's host name for a wildcard address such as 0.0.0.0); origins are `http://` the
  same. A foreign Host gets 421, a foreign Origin 403 (the SDK's answers).
- Every tool is generated from the registry (`mcp_tool`): its handler is a one-line
  delegation to `ToolSpec.run`, run in a worker thread behind one semaphore (`max_concurrent`
  calls at once; model work inside is serialised by the toolbox). The input schema is the
  registry's argument model (the chat agent publishes the same one): typed, bounded, and
  `additionalProperties: false`; unknown arguments are refused naming them (`strict`: the
  SDK validates with a subclass of that model). Results are pydantic models (structured
  content). Long tools report progress through the request context.
- Errors: a project error (FacsynthError: bad data, a refused path, an invalid value) becomes
  a `ToolError` with its message (the SDK logs one line); any other exception is a bug: its
  traceback is logged and the client gets a `ToolError` saying so
  (`tool_registry.internal_error`). Logs go to stderr; stdout is the protocol.
"""

import asyncio
import hmac
import ipaddress
import logging
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import anyio
import anyio.from_thread
import anyio.to_thread
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.mcpserver.tools import Tool
from mcp.server.mcpserver.utilities.func_metadata import ArgModelBase, FuncMetadata
from mcp.server.transport_security import TransportSecuritySettings
from mcp_types import ToolAnnotations
from pydantic import create_model

from agent.tool_registry import TOOLS, ToolArgs, ToolSpec, internal_error
from agent.toolbox import ProgressFn, Toolbox
from tools.errors import ConfigError, FacsynthError

log = logging.getLogger(__name__)

LOOPBACK = ("localhost",)
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
WILDCARD = ("0.0.0.0", "::")
INSTRUCTIONS = (
    "facsynth measures which task features (SAE features of a language model) a training "
    "dataset is missing (Feature Activation Coverage, FAC) and synthesises samples that fill "
    "them. Paths are relative to the server's workspace root. Typical order: describe_dataset, "
    "coverage(anchor, data), explain_feature, generate_and_verify, improve, report. "
    "To pick the real rows worth labelling: select_rows, then add_labels. The long tools "
    "(generate_and_verify, improve, select_rows) start a job and answer at once with a "
    "job_id: poll job_result(job_id, wait=50) until its status is no longer running."
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


def strict(args: type[ToolArgs]) -> type[ArgModelBase]:
    """The registry's argument model as the SDK's argument model (`ArgModelBase`, which it
    requires). It keeps `extra="forbid"` and the check naming unknown arguments (the SDK's own
    models ignore extras and it has no option for it); its JSON schema is the registry's."""
    bases: Any = (args, ArgModelBase)  # create_model's stub wants ArgModelBase subclasses only
    return create_model(args.__name__, __base__=bases, __module__=args.__module__)


def mcp_tool(spec: ToolSpec, call: Callable[[ToolSpec, dict[str, Any], Context], Any]) -> Tool:
    """The MCP tool of a registry entry; `call(spec, args, ctx)` runs it."""

    async def handler(ctx: Context, **args: Any) -> Any:
        return await call(spec, args, ctx)

    return Tool(fn=handler, name=spec.name, description=spec.description,
                parameters=spec.args.model_json_schema(by_alias=True),
                fn_metadata=FuncMetadata(arg_model=strict(spec.args), output_model=spec.result),
                is_async=True, context_kwarg="ctx",
                annotations=WRITES if spec.writes else READ_ONLY)


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

    async def call(spec: ToolSpec, args: dict[str, Any], ctx: Context) -> Any:
        async with gate:
            try:
                return await anyio.to_thread.run_sync(
                    partial(spec.run, box, args, _progress(ctx)))
            except FacsynthError as e:
                raise ToolError(box.sandbox.scrub(str(e))) from e
            except Exception as e:
                log.exception("internal error in the %s tool", spec.name)
                raise ToolError(box.sandbox.scrub(internal_error(spec.name, e))) from e

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
    tools = [mcp_tool(spec, call) for spec in TOOLS]
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
