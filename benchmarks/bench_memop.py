"""How much the emulated memop cmpxchg costs next to a bare libatomic call.

Run from the project root:

    .venv/bin/python benchmarks/bench_memop.py [--ops 50000] [--repeat 20]

Every loop really exchanges: it flips one location between two values A and
B, so each call finds what it expects (checked before timing).  The loops are
timed in turns, ``--repeat`` times each, and the best round counts, which
keeps a busy machine's noise out of the comparison.

- ``bare``: ``__atomic_compare_exchange_8`` through ctypes on the same
  mapping with every argument made in advance, loaded the way the backend
  loads libatomic (``PyDLL``, no ``argtypes``): the floor for one CAS from
  Python;
- ``bare, argtypes``: the same function declared the usual way
  (``CDLL`` with ``argtypes``, plain ints), for reference;
- ``EmulatedBackend.cmpxchg``: sizes 1, 4, 8 and 16, no access key.

The target is a backend that costs no more than twice the bare call; the
last lines judge size 8 against both bare loops.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import time
from collections.abc import Callable

from indicators.guestmem import libatomic
from indicators.memop import EmulatedBackend

MEMORY_SIZE = 1 << 20
GADDR = 0x1000
SIZES = (1, 4, 8, 16)
TARGET_RATIO = 2.0
FASTEST = "bare __atomic_compare_exchange_8"
ARGTYPES = "bare, CDLL + argtypes"


def _pair(size: int) -> tuple[int, int]:
    """Two distinct values of ``size`` bytes that differ in every byte."""
    a = int.from_bytes(bytes(range(1, size + 1)), "big")
    return a, a ^ ((1 << (8 * size)) - 1)


def bare_loop(backend: EmulatedBackend, *, argtypes: bool) -> Callable[[int], float]:
    """A timed loop of bare 8-byte CAS calls on the backend's mapping; returns s/op."""
    address = backend.memory.base + GADDR
    a, b = _pair(8)
    backend.memory.write(GADDR, a.to_bytes(8, "little"))  # native order: bare is not BE
    expect_a, expect_b = ctypes.c_uint64(a), ctypes.c_uint64(b)
    if argtypes:
        lib = ctypes.CDLL(ctypes.util.find_library("atomic") or "libatomic.so.1")
        fn = getattr(lib, "__atomic_compare_exchange_8")
        fn.restype = ctypes.c_bool
        fn.argtypes = (
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_uint64,
            ctypes.c_int,
            ctypes.c_int,
        )
        args_ab = (address, ctypes.addressof(expect_a), b, 5, 5)
        args_ba = (address, ctypes.addressof(expect_b), a, 5, 5)
    else:
        fn = getattr(libatomic(), "__atomic_compare_exchange_8")
        fn.restype = ctypes.c_bool
        where = ctypes.c_size_t(address)
        args_ab = (where, ctypes.byref(expect_a), ctypes.c_uint64(b), 5, 5)
        args_ba = (where, ctypes.byref(expect_b), ctypes.c_uint64(a), 5, 5)
    if not (fn(*args_ab) and fn(*args_ba)):
        raise AssertionError("the bare loop does not exchange")

    def run(ops: int) -> float:
        pairs = ops // 2
        start = time.perf_counter()
        for _ in range(pairs):
            fn(*args_ab)
            fn(*args_ba)
        return (time.perf_counter() - start) / (2 * pairs)

    return run


def backend_loop(backend: EmulatedBackend, size: int) -> Callable[[int], float]:
    """A timed loop of ``EmulatedBackend.cmpxchg`` of ``size`` bytes; returns s/op."""
    a, b = _pair(size)
    gaddr = GADDR + 64
    backend.write(gaddr, a.to_bytes(size, "big"))
    cmpxchg = backend.cmpxchg
    for _ in range(4):
        if not (cmpxchg(gaddr, size, a, b).exchanged and cmpxchg(gaddr, size, b, a).exchanged):
            raise AssertionError(f"the size-{size} loop does not exchange")

    def run(ops: int) -> float:
        pairs = ops // 2
        start = time.perf_counter()
        for _ in range(pairs):
            cmpxchg(gaddr, size, a, b)
            cmpxchg(gaddr, size, b, a)
        return (time.perf_counter() - start) / (2 * pairs)

    return run


def main(argv: list[str] | None = None) -> int:
    """Print ops/s of each loop and the backend's ratio to the bare call."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=50_000, help="calls per timed round")
    parser.add_argument("--repeat", type=int, default=20, help="timed rounds per loop")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)

    with EmulatedBackend(MEMORY_SIZE) as backend:
        loops = {
            FASTEST: bare_loop(backend, argtypes=False),
            ARGTYPES: bare_loop(backend, argtypes=True),
        }
        for size in SIZES:
            loops[f"EmulatedBackend.cmpxchg size {size}"] = backend_loop(backend, size)
        best = dict.fromkeys(loops, float("inf"))
        for _ in range(args.repeat):
            for name, run in loops.items():
                best[name] = min(best[name], run(args.ops))

    bare = best[FASTEST]
    print(f"{'loop':36} {'ops/s':>12} {'us/op':>8} {'x bare':>7}")
    for name, seconds in best.items():
        print(f"{name:36} {1 / seconds:12,.0f} {seconds * 1e6:8.3f} {seconds / bare:7.2f}")
    size8 = best["EmulatedBackend.cmpxchg size 8"]
    for baseline in (FASTEST, ARGTYPES):
        ratio = size8 / best[baseline]
        verdict = "met" if ratio <= TARGET_RATIO else "not met"
        print(f"size 8 vs {baseline}: {ratio:.2f}x (target <= {TARGET_RATIO}x: {verdict})")
    if args.json:
        rows = [{"loop": name, "ops_per_s": 1 / seconds, "us_per_op": seconds * 1e6,
                 "x_fastest_bare": seconds / bare} for name, seconds in best.items()]  # fmt: skip
        with open(args.json, "w") as out:
            json.dump({"rows": rows, "target_ratio": TARGET_RATIO}, out, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
