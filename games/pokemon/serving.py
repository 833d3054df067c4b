"""The game's HTTP servers as game developers run Flask in production: waitress, with
persistent connections (HTTP/1.1 keep-alive), so a player's requests ride one TCP
connection instead of paying a handshake each (werkzeug's development server answered
every request with `Connection: close`).

In an edge container waitress is Debian bookworm's `python3-waitress` (the image has no
pip and no internet); an image without it makes the server exit at once with a message
saying so, in the app's log (`/var/log/enorm-app/app.log`).
"""

from __future__ import annotations

import logging
import signal
import sys

# Waitress' defaults are 4 threads and 100 open connections, past which it stops
# accepting (new players would wait in the backlog behind idle keep-alive connections).
THREADS = 8
CONNECTIONS = 2000
# An idle keep-alive connection is closed after this long (a player's think time is
# seconds; waitress' default is 120 s).
IDLE_S = 60


def server(app, host: str, port: int, *, threads: int = THREADS,
           connections: int = CONNECTIONS, idle_s: int = IDLE_S):  # fmt: skip
    """`app` bound to host:port (listening, not yet serving); `run` serves it."""
    try:
        from waitress.server import create_server
    except ImportError:
        raise SystemExit(
            "pokemon: the WSGI server waitress is not installed for "
            f"{sys.executable} (Debian: apt-get install python3-waitress; the enorm base "
            "image must include it: rebuild it with `enorm image build debian`)"
        ) from None
    # "Task queue depth is N" for every request that waits for a thread: a queue is what
    # a loaded server has, and the request log already times each request
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    # poll(), not select(): select stops at 1024 descriptors
    return create_server(app, host=host, port=port, threads=threads,
                         connection_limit=connections, channel_timeout=idle_s,
                         asyncore_use_poll=True, ident="pokemon")  # fmt: skip


def run(http) -> None:
    """Serve until SIGTERM or SIGINT; waitress then stops its threads and returns."""

    def _stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    http.run()  # returns on KeyboardInterrupt
