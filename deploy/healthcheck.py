"""Container health check: exits 0 when the service answers /readyz with 200, else 1 (stdlib only). It asks on
$METRICS_PORT when that is set (the operations server answers there even while the API port is busy), else $PORT."""

from __future__ import annotations

import os
import sys
import urllib.request


def main() -> int:
    port = os.environ.get("METRICS_PORT") or os.environ.get("PORT") or "8000"
    url = f"http://127.0.0.1:{port}/readyz"
    try:
        with urllib.request.urlopen(url, timeout=4) as response:
            return 0 if response.status == 200 else 1
    except OSError as exc:  # URLError and HTTPError (503 while loading or stopping) are OSErrors
        print(f"{url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
