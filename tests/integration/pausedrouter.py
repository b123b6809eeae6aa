"""A ROUTER process for test_paused_links.py: `python pausedrouter.py KIND HWM EXPECTED`.

KIND is `mesh` (the broker's peer ROUTER from `mesh.sockets`, with whatever liveness
options that module gives it) or `plain` (a ROUTER with the same high-water mark and no
liveness option at all). It prints its endpoint, then waits until it is told (a line on
stdin) that it was paused and resumed; then, like a loop busy catching up, it reads
nothing for 1.5 s and then one message per 5 ms, until it has EXPECTED messages or hears nothing for 2 s, prints
how many it read and exits 0. libzmq aborting the process shows as exit -6.
"""

from __future__ import annotations

import sys
import time

import zmq

from mesh.sockets import bound_endpoint, peer_router


def main() -> None:
    kind, hwm, expected = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    ctx = zmq.Context()
    if kind == "mesh":
        sock = peer_router(ctx, "tcp://127.0.0.1:*", 1 << 20, hwm)
    else:
        sock = ctx.socket(zmq.ROUTER)
        sock.sndhwm = sock.rcvhwm = hwm
        sock.bind("tcp://127.0.0.1:*")
    print(bound_endpoint(sock), flush=True)
    sys.stdin.readline()  # the test paused us, flooded, closed its side and resumed us
    time.sleep(1.5)
    got = 0
    quiet_since = time.monotonic()
    while got < expected and time.monotonic() - quiet_since < 2.0:
        try:
            sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            pass
        else:
            got += 1
            quiet_since = time.monotonic()
        time.sleep(0.005)
    print(got, flush=True)
    sock.close(linger=0)
    ctx.term()


if __name__ == "__main__":
    main()
