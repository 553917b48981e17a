"""The keel CLI's client of the cloud's HTTP API."""

import base64
import json
import urllib.error
import urllib.request
from urllib.parse import quote, urlencode

from keel_cloud.config import CloudDir, CloudError


class ApiClient:
    def __init__(self, cloud_dir: CloudDir, timeout: float = 15.0):
        cloud_dir.require()
        config = cloud_dir.config()
        self.base = f"http://{config.http}/api"
        self.token = cloud_dir.token()
        self.timeout = timeout

    def _request(self, method: str, path: str, body: dict | None = None, timeout: float | None = None):
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base + path, data=data, method=method)
        request.add_header("Authorization", f"Bearer {self.token}")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=timeout or self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as e:
            try:
                message = json.loads(e.read()).get("error", e.reason)
            except ValueError:
                message = e.reason
            raise CloudError(message) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise CloudError(f"cannot reach Keel Cloud at {self.base} ({reason}): is 'keel cloud serve' running?") from None

    def devices(self) -> list[dict]:
        return self._request("GET", "/devices")

    def device(self, name: str) -> dict:
        return self._request("GET", f"/devices/{quote(name, safe='')}")

    def get(self, name: str, variable: str):
        return self._request("GET", f"/devices/{quote(name, safe='')}/variables/{quote(variable, safe='')}")["value"]

    def call(self, name: str, function: str, arg: str):
        path = f"/devices/{quote(name, safe='')}/functions/{quote(function, safe='')}"
        return self._request("POST", path, {"arg": arg})["result"]

    def publish(self, name: str, data: str | None) -> int:
        return self._request("POST", "/events", {"name": name, "data": data})["sent_to"]

    def events(self, after: int, device: str | None = None, wait: float = 20.0) -> dict:
        query = {"after": after, "wait": wait}
        if device:
            query["device"] = device
        return self._request("GET", "/events?" + urlencode(query), timeout=wait + 10)

    def flash(self, name: str, image: bytes, module: dict) -> dict:
        """Start an update over the air; {"transfer": ID, "size", "sha256"}."""
        body = {"image": base64.b64encode(image).decode(), "module": module}
        return self._request("POST", f"/devices/{quote(name, safe='')}/flash", body, timeout=60)

    def transfer(self, transfer_id: str) -> dict:
        return self._request("GET", f"/transfers/{quote(str(transfer_id), safe='')}")

    def fleets(self) -> list[dict]:
        return self._request("GET", "/fleets")

    def fleet(self, name: str) -> dict:
        return self._request("GET", f"/fleets/{quote(name, safe='')}")

    def rollout(self, timeout: float = 5.0) -> int:
        """Tell the running cloud that fleets or releases changed in the registry."""
        return self._request("POST", "/rollout", {}, timeout=timeout)["changed"]
