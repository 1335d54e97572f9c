#!/usr/bin/env python3
"""Modbus test peer for tests/e2e/e2e_modbus.rs: a pymodbus server that moves counters on a schedule
and writes the ground truth to a JSON state file.

    python3 tests/modbus_peer.py --mode tcp --port P --plan basic --state STATE [--start-file F]
    python3 tests/modbus_peer.py --mode rtu --serial /dev/pts/N --plan basic --state STATE ...

TCP serves unit 1; RTU serves units 1 and 2 and stays silent for every other unit (a powered-off
controller on the bus). Prints READY on stdout once serving. With --start-file, the plan's
movement starts only once that path exists (the initial values are served meanwhile).

Plan `basic`, per unit (0-based addresses):
  holding 0      in_count     u16, starts at 65530, +1..3 every 100 ms (wraps past 65535)
  holding 2-3    out_count    u32 high word first, starts at 1000, +1 every 150 ms; paused at
                              4.0 s, reset to 0 at 6.5 s, paused until 9.0 s, then +1 every 150 ms
  coil 0         barrier_open toggles every 1 s
  holding 10-11  temp_c       f32 high word first, 21.5
After --seconds of movement (default 12) the values freeze, the state says done, and the peer
keeps serving until killed.

State file (rewritten atomically after every change):
  {"phase": ..., "done": bool, "elapsed_s": ..., "updated_ms": ...,
   "units": {"1": {"in_count": {"increments": n, "value": v, "wraps": n},
                   "out_count": {"increments": n, "value": v, "resets": n, "registers": [hi, lo]},
                   "barrier_open": {"value": bool}, "temp_c": {"value": 21.5, "registers": [..]}}}}
`increments` is the truth: every +k applied since the start (a reset is not an increment).

Supports pymodbus 3.11-3.16 (checked with 3.11.4, 3.12.1, 3.13.1, 3.14.0, 3.15.0 and 3.16.1): up to
3.12 through a ModbusBaseDeviceContext per unit, from 3.13 through a ModbusServerContext that
serves the data itself. The datastore is our own in both, only the adapter differs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import signal
import struct
import sys
import time

import pymodbus
from pymodbus.constants import ExcCodes
from pymodbus.datastore import ModbusServerContext
from pymodbus.exceptions import NoSuchIdException

try:  # pymodbus <= 3.11 style: the server asks the server context for a device context
    from pymodbus.datastore.context import ModbusBaseDeviceContext
except ImportError:  # pymodbus 3.13+ style: the server asks the server context directly
    ModbusBaseDeviceContext = None

IN_START = 65530
OUT_START = 1000
TEMP_C = 21.5
IN_EVERY = 0.100
OUT_EVERY = 0.150
OUT_PAUSE_AT = 4.0
OUT_RESET_AT = 6.5
OUT_RESUME_AT = 9.0
COIL_EVERY = 1.0
TABLE_SIZE = 16

# Function code -> table.
FC_TABLE = {1: "co", 5: "co", 15: "co", 2: "di", 3: "hr", 6: "hr", 16: "hr", 22: "hr", 23: "hr", 4: "ir"}


def f32_words(value: float) -> list[int]:
    """IEEE 754 single, high word first."""
    raw = struct.unpack(">I", struct.pack(">f", value))[0]
    return [raw >> 16, raw & 0xFFFF]


class Unit:
    """One unit's tables (our own datastore) and its counters' truth."""

    def __init__(self, unit_id: int):
        self.id = unit_id
        self.tables = {
            "co": [False] * TABLE_SIZE,
            "di": [False] * TABLE_SIZE,
            "hr": [0] * TABLE_SIZE,
            "ir": [0] * TABLE_SIZE,
        }
        self.in_count = IN_START
        self.in_increments = 0
        self.in_wraps = 0
        self.out_count = OUT_START
        self.out_increments = 0
        self.out_resets = 0
        self.barrier = False
        self.requests = 0
        self.sync()

    def sync(self) -> None:
        hr = self.tables["hr"]
        hr[0] = self.in_count
        hr[2] = (self.out_count >> 16) & 0xFFFF
        hr[3] = self.out_count & 0xFFFF
        hr[10], hr[11] = f32_words(TEMP_C)
        self.tables["co"][0] = self.barrier

    def get(self, func_code: int, address: int, count: int):
        self.requests += 1
        table = self.tables.get(FC_TABLE.get(func_code, ""))
        if table is None:
            return ExcCodes.ILLEGAL_FUNCTION
        if address < 0 or count < 1 or address + count > len(table):
            return ExcCodes.ILLEGAL_ADDRESS
        return list(table[address : address + count])

    def set(self, func_code: int, address: int, values):
        # Writes are accepted (a real controller would) but never change the plan's counters.
        table = self.tables.get(FC_TABLE.get(func_code, ""))
        if table is None:
            return ExcCodes.ILLEGAL_FUNCTION
        values = list(values) if isinstance(values, (list, tuple)) else [values]
        if address < 0 or address + len(values) > len(table):
            return ExcCodes.ILLEGAL_ADDRESS
        table[address : address + len(values)] = values
        return None

    def add_in(self, k: int) -> None:
        new = self.in_count + k
        if new > 0xFFFF:
            self.in_wraps += 1
        self.in_count = new & 0xFFFF
        self.in_increments += k
        self.sync()

    def add_out(self, k: int) -> None:
        self.out_count = (self.out_count + k) & 0xFFFF_FFFF
        self.out_increments += k
        self.sync()

    def reset_out(self) -> None:
        self.out_count = 0
        self.out_resets += 1
        self.sync()

    def toggle_barrier(self) -> None:
        self.barrier = not self.barrier
        self.sync()

    def state(self) -> dict:
        hr = self.tables["hr"]
        return {
            "in_count": {"increments": self.in_increments, "value": self.in_count, "wraps": self.in_wraps},
            "out_count": {
                "increments": self.out_increments,
                "value": self.out_count,
                "resets": self.out_resets,
                "registers": [hr[2], hr[3]],
            },
            "barrier_open": {"value": self.barrier},
            "temp_c": {"value": TEMP_C, "registers": [hr[10], hr[11]]},
            "requests": self.requests,
        }


# ---------------------------------------------------------------------------------------------
# pymodbus adapters
# ---------------------------------------------------------------------------------------------

if ModbusBaseDeviceContext is not None:

    class UnitContext(ModbusBaseDeviceContext):  # type: ignore[misc, valid-type]
        """pymodbus 3.11: a device context that reads our tables (addresses as requested)."""

        def __init__(self, unit: Unit):
            self.unit = unit

        def reset(self):
            pass

        def getValues(self, func_code, address, count=1):  # noqa: N802 (pymodbus API)
            return self.unit.get(func_code, address, count)

        def setValues(self, func_code, address, values):  # noqa: N802 (pymodbus API)
            return self.unit.set(func_code, address, values)

    def server_context(units: dict[int, Unit]):
        # single=False: an unknown unit raises NoSuchIdException, which the server ignores.
        return ModbusServerContext(devices={i: UnitContext(u) for i, u in units.items()}, single=False)

else:

    class PeerServerContext(ModbusServerContext):
        """pymodbus 3.13+: the server calls async_getValues(device_id, ...) on the context itself
        when it holds no SimDevices (3.16 also checks `old_simulator`)."""

        def __init__(self, units: dict[int, Unit]):  # pylint: disable=super-init-not-called
            self.units = units
            self.old_simulator = True
            self.simdevices = []
            self._devices = {}

        def _unit(self, device_id: int) -> Unit:
            if device_id not in self.units:
                # Unlike SimCore (KeyError -> exception 0x04), this makes the server stay silent.
                raise NoSuchIdException(f"no unit {device_id}")
            return self.units[device_id]

        async def async_getValues(self, device_id, func_code, address, count=1):  # noqa: N802
            return self._unit(device_id).get(func_code, address, count)

        async def async_setValues(self, device_id, func_code, address, values):  # noqa: N802
            return self._unit(device_id).set(func_code, address, values)

        def device_ids(self):
            return list(self.units)

    def server_context(units: dict[int, Unit]):
        import inspect

        import pymodbus.server.base as base

        # 3.13-3.16: a ModbusServerContext without simdevices is used as the datastore itself
        # (3.16 also wants `old_simulator`). Anything else is a layout this peer does not know.
        if "simdevices" not in inspect.getsource(base):
            sys.exit(
                f"modbus_peer: unsupported pymodbus {pymodbus.__version__} (tested with 3.11 to 3.16); "
                "run scripts/test-deps.sh"
            )
        return PeerServerContext(units)


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------


def basic_schedule(unit_ids: list[int], seconds: float) -> list[tuple[float, int, str, int, int]]:
    """(t, order, action, unit, amount) for every change, sorted by time."""
    events = []
    for uid in unit_ids:
        rng = random.Random(1000 + uid)
        n = 1
        while n * IN_EVERY <= seconds + 1e-9:
            events.append((round(n * IN_EVERY, 3), 0, "in", uid, rng.randint(1, 3)))
            n += 1
        n = 1
        while n * OUT_EVERY <= min(OUT_PAUSE_AT, seconds) + 1e-9:
            events.append((round(n * OUT_EVERY, 3), 1, "out", uid, 1))
            n += 1
        if OUT_RESET_AT <= seconds:
            events.append((OUT_RESET_AT, 1, "reset", uid, 0))
        n = 1
        while OUT_RESUME_AT + n * OUT_EVERY <= seconds + 1e-9:
            events.append((round(OUT_RESUME_AT + n * OUT_EVERY, 3), 1, "out", uid, 1))
            n += 1
        n = 1
        while n * COIL_EVERY <= seconds + 1e-9:
            events.append((n * COIL_EVERY, 2, "coil", uid, 0))
            n += 1
    events.sort(key=lambda e: (e[0], e[1], e[3]))
    return events


def phase_at(t: float, seconds: float) -> str:
    if t >= seconds:
        return "done"
    if t < OUT_PAUSE_AT:
        return "counting"
    if t < OUT_RESET_AT:
        return "out_paused"
    if t < OUT_RESUME_AT:
        return "out_reset_paused"
    return "out_resumed"


class Peer:
    def __init__(self, args, units: dict[int, Unit]):
        self.args = args
        self.units = units
        self.phase = "waiting"
        self.done = False
        self.elapsed = 0.0
        self.seq = 0

    def write_state(self) -> None:
        self.seq += 1
        state = {
            "mode": self.args.mode,
            "plan": self.args.plan,
            "pymodbus": pymodbus.__version__,
            "phase": self.phase,
            "done": self.done,
            "elapsed_s": round(self.elapsed, 3),
            "seq": self.seq,
            "updated_ms": int(time.time() * 1000),
            "units": {str(uid): u.state() for uid, u in sorted(self.units.items())},
        }
        tmp = f"{self.args.state}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(state, f, sort_keys=True)
            f.flush()
        os.replace(tmp, self.args.state)

    async def run_plan(self) -> None:
        if self.args.start_file:
            while not os.path.exists(self.args.start_file):
                await asyncio.sleep(0.02)
        schedule = basic_schedule(sorted(self.units), self.args.seconds)
        t0 = time.monotonic()
        self.phase = "counting"
        self.write_state()
        i = 0
        while True:
            now = time.monotonic() - t0
            changed = False
            while i < len(schedule) and schedule[i][0] <= now:
                _, _, action, uid, k = schedule[i]
                unit = self.units[uid]
                if action == "in":
                    unit.add_in(k)
                elif action == "out":
                    unit.add_out(k)
                elif action == "reset":
                    unit.reset_out()
                else:
                    unit.toggle_barrier()
                i += 1
                changed = True
            self.elapsed = min(now, self.args.seconds)
            phase = phase_at(now, self.args.seconds)
            if i >= len(schedule) and now >= self.args.seconds:
                self.phase = "done"
                self.done = True
                self.write_state()
                return
            if changed or phase != self.phase:
                self.phase = phase
                self.write_state()
            next_t = schedule[i][0] if i < len(schedule) else self.args.seconds
            await asyncio.sleep(max(0.001, min(0.05, next_t - (time.monotonic() - t0))))


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["tcp", "rtu"], required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int)
    p.add_argument("--serial")
    p.add_argument("--baud", type=int, default=9600)
    p.add_argument("--plan", choices=["basic"], default="basic")
    p.add_argument("--state", required=True)
    p.add_argument("--start-file")
    p.add_argument("--seconds", type=float, default=12.0)
    p.add_argument("--debug", action="store_true", help="pymodbus debug logging (stderr)")
    args = p.parse_args()

    # pymodbus logs to stderr; stdout carries READY only.
    logging.basicConfig(stream=sys.stderr, level=logging.DEBUG if args.debug else logging.WARNING)
    logging.getLogger("pymodbus").setLevel(logging.DEBUG if args.debug else logging.ERROR)

    from pymodbus.server import ModbusSerialServer, ModbusTcpServer

    try:
        from pymodbus import FramerType
    except ImportError:  # older layout
        from pymodbus.framer import FramerType

    unit_ids = [1] if args.mode == "tcp" else [1, 2]
    units = {i: Unit(i) for i in unit_ids}
    context = server_context(units)
    if args.mode == "tcp":
        if args.port is None:
            p.error("--mode tcp needs --port")
        server = ModbusTcpServer(
            context, framer=FramerType.SOCKET, address=(args.host, args.port), ignore_missing_devices=True
        )
    else:
        if not args.serial:
            p.error("--mode rtu needs --serial")
        server = ModbusSerialServer(
            context,
            framer=FramerType.RTU,
            port=args.serial,
            baudrate=args.baud,
            bytesize=8,
            parity="N",
            stopbits=1,
            ignore_missing_devices=True,
        )

    peer = Peer(args, units)
    peer.write_state()
    await server.serve_forever(background=True)
    print("READY", flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    plan = asyncio.create_task(peer.run_plan())
    await stop.wait()
    plan.cancel()
    # Final snapshot (request counts) for whoever looks at the files after a failure.
    peer.write_state()
    await server.shutdown()


if __name__ == "__main__":
    asyncio.run(main())
