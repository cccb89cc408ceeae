"""Keys that rotate without an outage (docs/operations.md's three steps, against two worker processes, over HTTP and
gRPC), a file that goes bad keeps the keys read before, and a bad key file stops the start with one line."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton

from app.errors import StartupError
from app.settings import Settings
from bench.service import ServiceProcess, free_port, service_process
from ensemble_contract.manifest import Manifest
from tests.support import grpc_infer, infer_body

OLD, NEW = "the-old-key-of-this-rotation", "the-new-key-of-this-rotation"
REQUESTS = 6  # per check: spread over both workers


def replace(path: Path, *keys: str) -> None:
    """Writes the key file as docs/operations.md says: a new file moved over the old one."""
    draft = path.with_suffix(".new")
    draft.write_text("# inference keys, one a line\n" + "".join(f"{key}\n" for key in keys))
    os.replace(draft, path)


@pytest.fixture(scope="module")
def rotating(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServiceProcess, Path, int]]:
    work = tmp_path_factory.mktemp("keys")
    keys = work / "api-keys"
    replace(keys, OLD)
    grpc_port = free_port()
    with service_process(model_dir, work, WORKERS=2, API_KEYS_FILE=keys, GRPC_PORT=grpc_port) as service:
        yield service, keys, grpc_port


def statuses(service: ServiceProcess, manifest: Manifest, key: str) -> set[int]:
    body = infer_body(np.zeros((1, 3, manifest.image.height, manifest.image.width), np.float32))
    with httpx.Client(base_url=service.url, timeout=30) as client:
        return {
            client.post(f"/v2/models/{manifest.name}/infer", json=body, headers={"Authorization": f"Bearer {key}"})
            .status_code for _ in range(REQUESTS)
        }  # fmt: skip


def grpc_ready(grpc_port: int, manifest: Manifest, key: str) -> str:
    """gRPC ModelInfer with the key: 'OK' or the status code it was refused with."""
    image = np.zeros((1, 3, manifest.image.height, manifest.image.width), np.float32)
    with triton.InferenceServerClient(f"127.0.0.1:{grpc_port}") as client:
        try:
            grpc_infer(client, manifest.name, image, headers={"authorization": f"Bearer {key}"})
        except triton.InferenceServerException as refused:
            return str(refused.status())
    return "OK"


def test_a_key_rotates_in_three_steps_without_a_restart(
    rotating: tuple[ServiceProcess, Path, int], manifest: Manifest
) -> None:
    service, keys, grpc_port = rotating
    pid = service.process.pid
    assert statuses(service, manifest, OLD) == {200}
    assert statuses(service, manifest, NEW) == {401}
    replace(keys, OLD, NEW)  # 1. add the new key
    assert statuses(service, manifest, OLD) == statuses(service, manifest, NEW) == {200}  # 2. move the clients
    assert grpc_ready(grpc_port, manifest, OLD) == grpc_ready(grpc_port, manifest, NEW) == "OK"
    replace(keys, NEW)  # 3. remove the old key
    assert statuses(service, manifest, OLD) == {401}
    assert statuses(service, manifest, NEW) == {200}
    assert grpc_ready(grpc_port, manifest, OLD) == "StatusCode.UNAUTHENTICATED"
    assert service.process.pid == pid and service.process.poll() is None  # no restart


def test_a_key_file_gone_bad_keeps_the_keys_read_before(
    rotating: tuple[ServiceProcess, Path, int], manifest: Manifest
) -> None:
    service, keys, _ = rotating
    replace(keys, NEW)
    replace(keys, "short")  # an invalid key: the whole version is refused, and logged
    assert statuses(service, manifest, NEW) == {200}
    keys.unlink()
    assert statuses(service, manifest, NEW) == {200}
    replace(keys, NEW)
    log = service.output()
    assert "line 2: a key must be at least 16 printable characters" in log
    assert "the keys read before stay valid" in log


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "cannot read it"), ("# only a comment\n", "no key in it"), (f"{NEW}\nshort key\n", "line 2: a key must")],
)
def test_a_bad_key_file_stops_the_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: str | None, message: str
) -> None:
    path = tmp_path / "api-keys"
    if content is not None:
        path.write_text(content)
    monkeypatch.setenv("API_KEYS_FILE", str(path))
    with pytest.raises(StartupError, match=f"API_KEYS_FILE=.*{message}") as refused:
        Settings.from_env()
    assert NEW not in str(refused.value)  # a key is never shown
