"""Run a web server in a child while the parent tests it.

fastfork.service forks the server and enters the block only once the server
accepts connections (no sleep standing in for "ready"). On leaving the block
the server's process group gets SIGINT -- KeyboardInterrupt in the server,
even when this program runs with SIGINT ignored (nohup, a background job) --
then a grace period, then SIGKILL, and the server is reaped. What the server
printed is kept.
"""
import functools
import http.server
import signal
import tempfile
import urllib.request

import fastfork


def serve(port, directory):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=directory)
    with http.server.ThreadingHTTPServer(("127.0.0.1", port), handler) as server:
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            print("server stopped cleanly")


if __name__ == "__main__":
    port = fastfork.ready.free_port()
    with tempfile.TemporaryDirectory() as site:
        with open(f"{site}/index.html", "w") as page:
            page.write("<h1>hello</h1>\n")
        with fastfork.service(serve, port, site, ready=fastfork.ready.port(port),
                              stop_signal=signal.SIGINT, grace=5) as server:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/index.html") as reply:
                print("test request:", reply.status, reply.read().decode().strip())
            assert server.alive
    print("server exit status:", server.returncode)
    print("server output:")
    print(server.output, end="")
