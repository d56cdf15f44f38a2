"""Tiny real HTTP backends for HAProxy tests: one stdlib server process per backend, answering every
path with its name; `/readyz` answers 503 while the file `<folder>/<name>.down` exists."""

from __future__ import annotations

import sys
from pathlib import Path

from mercato.cluster.haproxy import Backend
from mercato.cluster.processes import spawn, stop, wait_until
from mercato.kit.ports import free_port

SERVER = r"""
import sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

name, port, folder = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        if self.path == "/readyz" and (folder / f"{name}.down").exists():
            status, body = 503, b"draining"
        else:
            delay = folder / f"{name}.delay"
            if self.path != "/readyz" and delay.exists():
                time.sleep(float(delay.read_text() or 0))
            status, body = 200, name.encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

ThreadingHTTPServer.daemon_threads = True
ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
"""


class TinyBackends:
    def __init__(self, folder: Path, count: int) -> None:
        self.folder = folder
        self.backends = [Backend(f"hlb_b{i}", "127.0.0.1", free_port()) for i in range(count)]

    def start(self) -> TinyBackends:
        self.folder.mkdir(parents=True, exist_ok=True)
        script = self.folder / "server.py"
        script.write_text(SERVER)
        for b in self.backends:
            spawn(self.folder, b.name, [sys.executable, str(script), b.name, str(b.port), str(self.folder)])
        import httpx

        for b in self.backends:
            url = f"http://{b.address}/readyz"
            assert wait_until(lambda url=url: httpx.get(url, timeout=1).status_code == 200, timeout_s=15)
        return self

    def set_ready(self, name: str, ready: bool) -> None:
        flag = self.folder / f"{name}.down"
        if ready:
            flag.unlink(missing_ok=True)
        else:
            flag.write_text("")

    def set_delay(self, name: str, seconds: float) -> None:
        (self.folder / f"{name}.delay").write_text(str(seconds))

    def stop(self) -> None:
        for b in self.backends:
            stop(self.folder, b.name, timeout_s=5)
