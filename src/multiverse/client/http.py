"""A small typed client of the REST API (httpx). One method per route the CLI needs."""

from __future__ import annotations

import base64
import json
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
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
UPLOAD_CHUNK = 1024 * 1024


class ApiClient:
    def __init__(
        self, server: str, token: str, timeout: float = 60.0, verify: ssl.SSLContext | bool = True
    ) -> None:
        self.server = server.rstrip("/")
        self.token = token
        self.verify = verify
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(
            base_url=f"{self.server}/api/v1", headers=headers, timeout=timeout, verify=verify
        )

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise Unreachable(f"cannot reach the master at {self.server}: {exc}") from exc
        _raise_for_error(response)
        return response.json()

    def nodes(self) -> list[JSON]:
        return list(self._request("GET", "/nodes"))

    def node(self, name: str) -> JSON:
        return dict(self._request("GET", f"/nodes/{name}"))

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
            response = self._http.get(f"/blobs/sha256:{sha256}")
        except httpx.TransportError as exc:
            raise Unreachable(f"cannot reach the master at {self.server}: {exc}") from exc
        if response.status_code == 404:
            return False
        _raise_for_error(response)
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

    def instances(self, env: str | None = None) -> list[JSON]:
        """Every instance, or an environment's."""
        params = {"env": env} if env is not None else {}
        return list(self._request("GET", "/instances", params=params))

    def instance(self, name: str) -> JSON:
        return dict(self._request("GET", f"/instances/{name}"))

    def info(self, name: str) -> JSON:
        return dict(self._request("GET", f"/instances/{name}/info"))

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
