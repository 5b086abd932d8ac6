"""Container health check: exit 0 when this replica's /ready answers 200, else 1.

Used by the image's HEALTHCHECK and by docker-compose.yml. Python rather than curl, because
the slim image has Python and no curl; it reads DYNAMERGE_PORT so that a changed port keeps
the check right.
"""

import os
import sys
import urllib.error
import urllib.request

url = f"http://127.0.0.1:{os.environ.get('DYNAMERGE_PORT', '8000')}/ready"
try:
    with urllib.request.urlopen(url, timeout=4) as response:
        sys.exit(0 if response.status == 200 else 1)
except (urllib.error.URLError, OSError) as exc:
    print(f"not ready: {exc}", file=sys.stderr)
    sys.exit(1)
