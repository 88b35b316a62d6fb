"""A real uvicorn server on 127.0.0.1 for the HTTP and browser tests."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn


class LiveServer:
    """Run an ASGI app with uvicorn on 127.0.0.1 and a free port, in a background thread.

    ``with LiveServer(app) as server: httpx.get(server.url + "/health")``
    """

    def __init__(self, app, startup_timeout: float = 60.0) -> None:
        self.app = app
        self.startup_timeout = startup_timeout
        self.url = ""

    def __enter__(self) -> "LiveServer":
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", timeout_keep_alive=30))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + self.startup_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
