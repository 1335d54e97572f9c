#!/usr/bin/env python3
"""An RS-485 line at a real baud rate, between two ptys.

socat pty pairs pass bytes at once, so they say nothing about throughput at 9600 baud. This
relay joins two pty pairs and lets each byte through only when the line would have carried it:
one character takes (1 start + data + parity + stop) bits / baud seconds, and the line is
half-duplex (one direction at a time, like RS-485).

    rtu_line.py --baud 9600 --bits 10 --links GW PEER

creates the symlinks GW (for the daemon) and PEER (for the Modbus peer) and prints READY.
Run until killed; prints the bytes carried each way on exit (SIGTERM).
"""

import argparse
import os
import select
import signal
import sys
import time
import tty


def pty_end(link):
    master, slave = os.openpty()
    tty.setraw(slave)
    tty.setraw(master)
    name = os.ttyname(slave)
    if os.path.lexists(link):
        os.unlink(link)
    os.symlink(name, link)
    return master, slave


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--baud", type=int, default=9600)
    ap.add_argument("--bits", type=int, default=10, help="bits per character (8N1 = 10, 8E1 = 11)")
    ap.add_argument("--links", nargs=2, required=True)
    a = ap.parse_args()
    char_s = a.bits / a.baud
    ends = [pty_end(l) for l in a.links]
    masters = [m for m, _ in ends]
    carried = [0, 0]
    line_free = 0.0

    def stop(*_):
        print(f"carried gw->peer={carried[0]} peer->gw={carried[1]} bytes", flush=True)
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    print("READY", flush=True)
    while True:
        readable, _, _ = select.select(masters, [], [], 1.0)
        for fd in readable:
            i = masters.index(fd)
            try:
                data = os.read(fd, 4096)
            except OSError:
                continue
            other = masters[1 - i]
            for b in data:
                now = time.monotonic()
                start = max(now, line_free)
                line_free = start + char_s
                delay = line_free - now
                if delay > 0:
                    time.sleep(delay)
                os.write(other, bytes([b]))
            carried[i] += len(data)


if __name__ == "__main__":
    main()
