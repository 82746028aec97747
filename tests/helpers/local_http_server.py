"""A tiny HTTP file server on 127.0.0.1 for download tests (Range requests supported).

``serve(directory)`` is a context manager yielding a ``LocalServer`` with the
base URL, a log of (path, Range header) per request, and knobs to simulate a
connection dropped after N bytes or a server that ignores Range.
"""

from __future__ import annotations

import contextlib
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class LocalServer:
    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.requests: list[tuple[str, str | None]] = []
        self.drop_after: dict[str, int] = {}  # file name -> bytes sent before closing (once)
        self.ignore_range = False
        self.url = ""

    def ranges_for(self, name: str) -> list[str | None]:
        return [rng for path, rng in self.requests if path == "/" + name]


def _handler(server: LocalServer):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep test output quiet
            pass

        def do_GET(self):
            rng = self.headers.get("Range")
            server.requests.append((self.path, rng))
            path = server.directory / self.path.lstrip("/")
            if not path.is_file() or ".." in self.path:
                self.send_error(404)
                return
            data = path.read_bytes()
            start = 0
            match = re.fullmatch(r"bytes=(\d+)-", rng or "")
            if match and not server.ignore_range:
                start = int(match.group(1))
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            body = data[start:]
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            cut = server.drop_after.pop(path.name, None)
            if cut is not None:
                self.wfile.write(body[:cut])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(body)

    return Handler


@contextlib.contextmanager
def serve(directory: Path):
    server = LocalServer(directory)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(server))
    httpd.daemon_threads = True
    server.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)
