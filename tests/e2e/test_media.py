"""A large media upload and download through the router. The deployment has no media worker,
so media goes to the main process (as its access log shows); the content round-trips intact and
the router streams it instead of holding it in memory."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from tests.harness import Router

from .clients import close_all, login_device, only_process, register_users, wait_for_logs
from .conftest import Names
from .deployment import Deployment
from .matrix_helpers import served_by

pytestmark = pytest.mark.e2e

SIZE = 50 * 1024 * 1024


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def test_large_media_upload_and_download_round_trip(
    deployment: Deployment, router: Router, names: Names, tmp_path: Path
) -> None:
    [user] = register_users(deployment.main, deployment.secret, names("u", 1))
    path = tmp_path / "big.bin"
    digest = hashlib.sha256()
    with path.open("wb") as f:
        for _ in range(SIZE // (1024 * 1024)):
            chunk = os.urandom(1024 * 1024)
            digest.update(chunk)
            f.write(chunk)
    device = await login_device(router.url, user)
    rss_before = _rss_kib(router.proc.pid)
    try:
        started = time.monotonic()
        with path.open("rb") as f:
            uploaded, _ = await device.client.upload(
                f, content_type="application/octet-stream", filename="big.bin", filesize=SIZE
            )
        upload_s = time.monotonic() - started
        content_uri = getattr(uploaded, "content_uri", None)
        assert content_uri and content_uri.startswith(f"mxc://{deployment.server_name}/"), uploaded
        rss_after_upload = _rss_kib(router.proc.pid)

        started = time.monotonic()
        downloaded = await device.client.download(mxc=content_uri)
        download_s = time.monotonic() - started
        body = getattr(downloaded, "body", None)
        assert isinstance(body, bytes), f"download failed: {downloaded}"
        rss_after_download = _rss_kib(router.proc.pid)
    finally:
        await close_all([device])

    print(
        f"{SIZE >> 20} MiB: upload {upload_s:.1f}s, download {download_s:.1f}s; router RSS "
        f"{rss_before >> 10} -> {rss_after_upload >> 10} -> {rss_after_download >> 10} MiB"
    )
    assert len(body) == SIZE
    assert hashlib.sha256(body).hexdigest() == digest.hexdigest(), "the downloaded content differs"
    uploads = await wait_for_logs(lambda: served_by(deployment.logs, user, "/upload"), lambda c: sum(c.values()) >= 1)
    downloads = await wait_for_logs(
        lambda: served_by(deployment.logs, user, "/download/"), lambda c: sum(c.values()) >= 1
    )
    assert only_process(uploads) == "main" and uploads["main"] == 1, uploads
    assert only_process(downloads) == "main" and downloads["main"] == 1, downloads
    # Streamed, not buffered: the router never held the 50 MiB body (with room for allocator noise).
    assert max(rss_after_upload, rss_after_download) - rss_before < 30 * 1024, "the router buffered the media body"
