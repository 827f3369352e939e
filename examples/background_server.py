"""Seed article 2: run a web server in a child while the parent tests it.

The server lives exactly as long as the with block: on leaving it is sent
SIGINT (KeyboardInterrupt in the server), given a grace period, then killed,
and always reaped.
"""
import http.server
import signal
import socket
import urllib.request

import fastfork


def serve(sock):
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler,
                                    bind_and_activate=False)
    server.socket = sock  # bound and listening before the fork: no race with the client
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        return "server stopped cleanly"


if __name__ == "__main__":
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    with fastfork.background(serve, sock, stop_signal=signal.SIGINT) as server:
        sock.close()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/") as reply:
            print("test request:", reply.status)
    print("server:", server.result())
