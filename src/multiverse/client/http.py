"""A small typed client of the REST API. One method per route the CLI needs.

It speaks HTTP/1.1 with the standard library's http.client over one kept-alive connection:
every CLI call makes a client and then a request or a few, so the import of an HTTP library
would be most of a call's start-up (httpx with httpcore and h11 cost ~3x http.client with ssl,
measured with ``python -X importtime``), for features (HTTP/2, proxies, cookies, retries) that
a CLI talking to its own master does not use.
"""

from __future__ import annotations

import base64
import http.client
import json
import re
import ssl
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

from multiverse.client.errors import ApiError, Unreachable

__all__ = ["ApiClient", "ApiError", "Unreachable"]


JSON = dict[str, Any]
INFO_CHUNK = 100  # names per `info` request: the query string stays well under URL limits
UPLOAD_CHUNK = 1024 * 1024

# A kept-alive connection the master closed while idle fails this way on its next request,
# which then never reached the master: sent again on a new connection, once.
_STALE = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError)


class ApiClient:
    """The REST API of a cluster. ``server`` may name several masters, comma-separated: a
    master that cannot be connected to is skipped for the next (a request that never left
    cannot have done anything, so retrying it elsewhere is safe)."""

    def __init__(
        self, server: str, token: str, timeout: float = 60.0, verify: ssl.SSLContext | bool = True
    ) -> None:
        self.servers = [item.strip().rstrip("/") for item in server.split(",") if item.strip()]
        self.server = self.servers[0] if self.servers else server
        self.token = token
        self.verify = verify
        self.timeout = timeout
        self._headers = {"Accept": "application/json"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._connection: http.client.HTTPConnection | None = None

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def _connect(self) -> http.client.HTTPConnection:
        """The kept connection, or a new one: to the first master (from the current one on)
        that accepts it, so a request never sent to a dead master goes to the next."""
        if self._connection is not None:
            return self._connection
        failure: OSError | None = None
        for _ in self.servers or [self.server]:
            connection = self._new_connection()
            try:
                connection.connect()
            except OSError as exc:
                failure = exc
                connection.close()
                if self.server in self.servers:
                    turn = self.servers.index(self.server) + 1
                    self.server = self.servers[turn % len(self.servers)]
                continue
            self._connection = connection
            return connection
        assert failure is not None
        raise failure

    def _new_connection(self) -> http.client.HTTPConnection:
        url = urlsplit(self.server)
        if url.scheme == "https" and url.hostname:
            context = self.verify if isinstance(self.verify, ssl.SSLContext) else None
            if context is None:
                context = ssl.create_default_context()
                if not self.verify:
                    context.check_hostname = False
                    context.verify_mode = ssl.CERT_NONE
            return http.client.HTTPSConnection(
                url.hostname, url.port, timeout=self.timeout, context=context
            )
        if url.scheme == "http" and url.hostname:
            return http.client.HTTPConnection(url.hostname, url.port, timeout=self.timeout)
        raise Unreachable(
            f"cannot reach the master at {self.server}: not an http:// or https:// address"
        )

    def _send(
        self,
        method: str,
        path: str,
        json: Any = None,
        params: JSON | None = None,
        content: Iterable[bytes] | None = None,
        headers: dict[str, str] | None = None,
    ) -> http.client.HTTPResponse:
        """Send a request; the response with its body still to read. ``content`` is a body
        streamed as it is iterated (give its length in ``headers``)."""
        # A streamed body cannot be sent twice: no retry on a stale connection for it.
        reused = (
            content is None and self._connection is not None and self._connection.sock is not None
        )
        try:
            connection = self._connect()
        except OSError as exc:
            self.close()
            raise Unreachable(
                f"cannot reach the master at {self.server}: {_describe(exc)}"
            ) from exc
        target = f"{urlsplit(self.server).path}/api/v1{path}"
        if params:
            target += "?" + urlencode(
                [(k, _query_value(item)) for k, v in params.items() for item in _listed(v)]
            )
        headers = {**self._headers, **(headers or {})}
        body: bytes | Iterable[bytes] | None = content
        if json is not None:
            body = _json_dumps(json)
            headers["Content-Type"] = "application/json"
        try:
            try:
                connection.request(method, target, body=body, headers=headers)
                return connection.getresponse()
            except _STALE:
                if not reused:
                    raise
                connection.close()
                connection.request(method, target, body=body, headers=headers)
                return connection.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise Unreachable(
                f"cannot reach the master at {self.server}: {_describe(exc)}"
            ) from exc

    def _read(self, response: http.client.HTTPResponse) -> bytes:
        try:
            return response.read()
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise Unreachable(f"lost the master at {self.server}: {_describe(exc)}") from exc

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._send(method, path, **kwargs)
        data = self._read(response)
        _raise_for_error(response.status, data)
        return json.loads(data)

    def _listing(self, path: str, params: JSON | None = None) -> list[JSON]:
        """Every item of a paginated listing: pages are followed by their ``Link`` header."""
        wanted = {key: value for key, value in (params or {}).items() if value}
        items: list[JSON] = []
        page: str | None = path
        while page is not None:
            response = self._send("GET", page, params=wanted)
            data = self._read(response)
            _raise_for_error(response.status, data)
            items += json.loads(data)
            page, wanted = _next_page(response.getheader("Link") or ""), {}
        return items

    def masters(self) -> list[JSON]:
        return list(self._request("GET", "/masters"))

    def nodes(self, label: str = "") -> list[JSON]:
        return self._listing("/nodes", {"label": label})

    def node(self, name: str) -> JSON:
        return dict(self._request("GET", f"/nodes/{name}"))

    def faults(self) -> list[JSON]:
        return list(self._request("GET", "/faults"))

    def add_fault(self, body: JSON) -> JSON:
        return dict(self._request("POST", "/faults", json=body))

    def heal_fault(self, fault_id: str | None) -> list[JSON]:
        return list(self._request("DELETE", f"/faults/{fault_id}" if fault_id else "/faults"))

    def network(self) -> JSON:
        return dict(self._request("GET", "/network"))

    def images(self) -> list[JSON]:
        return list(self._request("GET", "/images"))

    def stored_images(self) -> list[JSON]:
        return list(self._request("GET", "/image-store"))

    def import_image(self, body: JSON) -> JSON:
        """Starts the import; the operation's result is the image."""
        return dict(self._request("POST", "/image-store", json=body))

    def delete_image(self, name: str) -> JSON:
        return dict(self._request("DELETE", f"/image-store/{name}"))

    def pull_image(self, name: str, nodes: list[str], all_nodes: bool) -> JSON:
        body = {"nodes": nodes, "all": all_nodes}
        return dict(self._request("POST", f"/image-store/{name}/pull", json=body))

    def has_blob(self, sha256: str) -> bool:
        try:
            self._request("GET", f"/blobs/sha256:{sha256}")
        except ApiError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def put_blob(
        self, sha256: str, path: Path, progress: Callable[[int, int], None] | None = None
    ) -> JSON:
        """Stream a file to the master in chunks: never the whole file in memory."""
        total = path.stat().st_size

        def chunks() -> Iterator[bytes]:
            done = 0
            with path.open("rb") as file:
                while block := file.read(UPLOAD_CHUNK):
                    done += len(block)
                    if progress:
                        progress(done, total)
                    yield block

        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(total)}
        return dict(
            self._request("PUT", f"/blobs/sha256:{sha256}", content=chunks(), headers=headers)
        )

    def instances(
        self, node: str = "", state: str = "", label: str = "", env: str | None = None
    ) -> list[JSON]:
        """Every instance (or those matching), all pages of them; ``env``: an environment's."""
        params = {"node": node, "state": state, "label": label, "env": env}
        return self._listing("/instances", params)

    def instance(self, name: str) -> JSON:
        return dict(self._request("GET", f"/instances/{name}"))

    def info(self, names: list[str] | None = None) -> list[JSON]:
        """Info of the named instances (all when None), a page of them per request."""
        if names is None:
            return self._listing("/info")
        found: list[JSON] = []
        for start in range(0, len(names), INFO_CHUNK):
            found += self._listing("/info", {"name": names[start : start + INFO_CHUNK]})
        return found

    def launch(self, body: JSON) -> JSON:
        return dict(self._request("POST", "/instances", json=body))

    def action(self, name: str, verb: str, body: JSON | None = None) -> JSON:
        """``start``, ``stop`` or ``restart``."""
        return dict(self._request("POST", f"/instances/{name}/{verb}", json=body or {}))

    def move(self, name: str, node: str, kind: str = "cold") -> JSON:
        """Start moving the instance to ``node``; the answer names the operation."""
        return dict(
            self._request("POST", f"/instances/{name}/move", json={"node": node, "kind": kind})
        )

    def delete(self, name: str) -> JSON:
        return dict(self._request("DELETE", f"/instances/{name}"))

    def logs(self, name: str) -> str:
        return str(self._request("GET", f"/instances/{name}/logs")["log"])

    def open_session(self, name: str, command: list[str], tty: bool, cols: int, rows: int) -> JSON:
        """Where to open a session straight on the instance's node, with its one-time ticket
        (``url`` None: the node serves none; use the master's ``shell`` WebSocket)."""
        body = {"command": command, "tty": tty, "cols": cols, "rows": rows}
        return dict(self._request("POST", f"/instances/{name}/sessions", json=body))

    def ssh_login(self, name: str, public_key: str) -> JSON:
        """Let ``public_key`` log in to the instance's own SSH server for a short window;
        where that server answers and the host key it must show (client/openssh.py)."""
        body = {"public_key": public_key}
        return dict(self._request("POST", f"/instances/{name}/ssh", json=body))

    def exec(self, name: str, command: list[str], stdin: bytes = b"") -> Iterator[JSON]:
        """Yields ``{"stream", "data": bytes}`` chunks, then ``{"exit_code"}``, each as soon as
        its line arrives."""
        body = {"command": command, "stdin": base64.b64encode(stdin).decode()}
        response = self._send("POST", f"/instances/{name}/exec", json=body)
        finished = False
        try:
            if response.status >= 400:
                _raise_for_error(response.status, response.read())
            while line := response.readline():
                if not line.strip():
                    continue
                item = json.loads(line)
                if "error" in item:
                    raise ApiError(502, item["error"]["code"], item["error"]["message"])
                if "data" in item:
                    item["data"] = base64.b64decode(item["data"])
                yield item
            finished = True
        except (OSError, http.client.HTTPException) as exc:
            raise Unreachable(f"lost the master at {self.server}: {_describe(exc)}") from exc
        finally:
            if not finished:  # the rest of the answer is unread: the connection is unusable
                self.close()

    def apply_environment(
        self, spec: JSON, *, prune: bool, recreate: bool, dry_run: bool = False
    ) -> JSON:
        """The plan and (unless ``dry_run``) the operation carrying it out."""
        body = {"spec": spec, "prune": prune, "recreate": recreate}
        path = f"/environments/{spec['name']}"
        return dict(self._request("PUT", path, json=body, params={"dry_run": dry_run}))

    def environments(self) -> list[JSON]:
        return list(self._request("GET", "/environments"))

    def environment(self, name: str) -> JSON:
        return dict(self._request("GET", f"/environments/{name}"))

    def delete_environment(self, name: str) -> JSON:
        return dict(self._request("DELETE", f"/environments/{name}"))

    def operation(self, operation_id: str) -> JSON:
        return dict(self._request("GET", f"/operations/{operation_id}"))

    def wait_operation(self, operation_id: str, timeout: float) -> JSON:
        params = {"timeout": timeout}
        return dict(self._request("GET", f"/operations/{operation_id}/wait", params=params))

    def node_action(self, name: str, action: str, params: dict[str, str] | None = None) -> JSON:
        """``cordon``, ``uncordon`` (the node) or ``drain``, ``evacuate``, ``restore``
        (an operation); ``params``: e.g. evacuate's ``mode``."""
        return dict(self._request("POST", f"/nodes/{name}/{action}", params=params))

    def add_node(self, body: JSON) -> JSON:
        """Install a worker over SSH: an operation (credentials go in the body, over TLS)."""
        return dict(self._request("POST", "/nodes", json=body))

    def uninstall_node(self, name: str, credentials: JSON) -> JSON:
        return dict(self._request("POST", f"/nodes/{name}/uninstall", json=credentials))

    def remove_node(self, name: str, force: bool = False) -> JSON:
        return dict(self._request("DELETE", f"/nodes/{name}", params={"force": force}))

    def create_token(self, body: JSON) -> JSON:
        return dict(self._request("POST", "/tokens", json=body))

    def tokens(self) -> list[JSON]:
        return list(self._request("GET", "/tokens"))

    def revoke_token(self, token_id: str) -> JSON:
        return dict(self._request("DELETE", f"/tokens/{token_id}"))

    def revoke_token_itself(self, token: str) -> JSON:
        """Revoke by the whole token, sent in the body (never in a URL, which gets logged)."""
        return dict(self._request("POST", "/tokens/revoke", json={"token": token}))

    def label_node(self, name: str, labels: dict[str, str | None]) -> JSON:
        """Set the admin's labels of a node; a None value removes one."""
        return dict(self._request("PATCH", f"/nodes/{name}/labels", json={"labels": labels}))


def _raise_for_error(status: int, body: bytes) -> None:
    if status < 400:
        return
    try:
        error = json.loads(body)["error"]
        raise ApiError(status, error["code"], error["message"])
    except (ValueError, KeyError, TypeError):
        text = body.decode(errors="replace")[:200]
        raise ApiError(status, "http_error", text) from None


def _json_dumps(value: Any) -> bytes:
    return json.dumps(value).encode()


def _listed(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else [value]


def _next_page(link: str) -> str | None:
    """The path (below /api/v1) and query of a ``Link: <URL>; rel="next"`` header."""
    match = re.search(r'<([^>]*)>\s*;\s*rel="next"', link)
    if match is None:
        return None
    url = urlsplit(match.group(1))
    path = url.path.split("/api/v1", 1)[-1]
    return f"{path}?{url.query}" if url.query else path


def _query_value(value: Any) -> str:
    """As the API reads query values: booleans as true/false."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _describe(error: BaseException) -> str:
    if isinstance(error, TimeoutError):
        return "timed out"
    return str(error) or type(error).__name__
