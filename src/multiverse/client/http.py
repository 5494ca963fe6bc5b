"""A small typed client of the REST API (httpx). One method per route the CLI needs."""

from __future__ import annotations

import base64
import json
import ssl
from collections.abc import Iterator
from typing import Any

import httpx


class ApiError(Exception):
    """The master answered with an error (4xx/5xx and its JSON error body)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class Unreachable(Exception):
    """No answer from the master at all."""


JSON = dict[str, Any]
INFO_CHUNK = 100  # names per `info` request: the query string stays well under URL limits


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
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._timeout = timeout
        self._http = self._client()

    def _client(self) -> httpx.Client:
        return httpx.Client(
            base_url=f"{self.server}/api/v1",
            headers=self._headers,
            timeout=self._timeout,
            verify=self.verify,
        )

    def close(self) -> None:
        self._http.close()

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        for _ in range(len(self.servers) - 1):
            try:
                response = self._http.request(method, path, **kwargs)
                break
            except (httpx.ConnectError, httpx.ConnectTimeout):
                self._http.close()
                turn = self.servers.index(self.server) + 1
                self.server = self.servers[turn % len(self.servers)]
                self._http = self._client()
        else:
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                raise Unreachable(f"cannot reach the master at {self.server}: {exc}") from exc
        _raise_for_error(response)
        return response

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._send(method, path, **kwargs).json()

    def _listing(self, path: str, params: dict[str, Any] | None = None) -> list[JSON]:
        """Every item of a paginated listing: pages are followed by their ``Link`` header."""
        response = self._send("GET", path, params={k: v for k, v in (params or {}).items() if v})
        items = list(response.json())
        while "next" in response.links:
            response = self._send("GET", response.links["next"]["url"])
            items += response.json()
        return items

    def masters(self) -> list[JSON]:
        return list(self._request("GET", "/masters"))

    def nodes(self, label: str = "") -> list[JSON]:
        return self._listing("/nodes", {"label": label})

    def node(self, name: str) -> JSON:
        return dict(self._request("GET", f"/nodes/{name}"))

    def images(self) -> list[JSON]:
        return list(self._request("GET", "/images"))

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

    def delete(self, name: str) -> JSON:
        return dict(self._request("DELETE", f"/instances/{name}"))

    def logs(self, name: str) -> str:
        return str(self._request("GET", f"/instances/{name}/logs")["log"])

    def exec(self, name: str, command: list[str], stdin: bytes = b"") -> Iterator[JSON]:
        """Yields ``{"stream", "data": bytes}`` chunks, then ``{"exit_code"}``."""
        body = {"command": command, "stdin": base64.b64encode(stdin).decode()}
        try:
            with self._http.stream("POST", f"/instances/{name}/exec", json=body) as response:
                if response.is_error:
                    response.read()
                    _raise_for_error(response)
                for line in response.iter_lines():
                    if not line:
                        continue
                    item = json.loads(line)
                    if "error" in item:
                        raise ApiError(502, item["error"]["code"], item["error"]["message"])
                    if "data" in item:
                        item["data"] = base64.b64decode(item["data"])
                    yield item
        except httpx.TransportError as exc:
            raise Unreachable(f"lost the master at {self.server}: {exc}") from exc

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

    def node_action(self, name: str, action: str) -> JSON:
        """``cordon``, ``uncordon`` (the node) or ``drain``, ``evacuate``, ``restore``
        (an operation)."""
        return dict(self._request("POST", f"/nodes/{name}/{action}"))

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


def _raise_for_error(response: httpx.Response) -> None:
    if not response.is_error:
        return
    try:
        error = response.json()["error"]
        raise ApiError(response.status_code, error["code"], error["message"])
    except (ValueError, KeyError, TypeError):
        raise ApiError(response.status_code, "http_error", response.text[:200]) from None
