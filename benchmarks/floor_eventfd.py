"""The floor of the eventfd path: a bare asyncio process that sets two bits per write.

What any Python service must do at least to turn an eventfd write into a
bit in guest memory: an ``add_reader`` callback reads the eventfd, then one
libatomic 1-byte compare-and-swap ORs 0x80 into the dsci byte and another
into the summary byte, on the same kind of RAM file the daemon maps (the
benchmark gives it a page of the daemon's own file that no device uses).
No validation, no statistics, no events: the service's work is everything
it takes beyond this.

``bench_latency.py`` starts it with the eventfd inherited; it prints
``ready`` once reading and runs until its stdin closes.

    python benchmarks/floor_eventfd.py FD RAM SIZE DSCI SUMMARY
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import mmap
import os
import sys


def main() -> None:
    fd, ram, size = int(sys.argv[1]), sys.argv[2], int(sys.argv[3], 0)
    dsci, summary = int(sys.argv[4], 0), int(sys.argv[5], 0)
    with open(ram, "r+b") as file:
        memory = mmap.mmap(file.fileno(), size, flags=mmap.MAP_SHARED)
    base = ctypes.addressof(ctypes.c_char.from_buffer(memory))
    lib = ctypes.PyDLL(ctypes.util.find_library("atomic") or "libatomic.so.1")
    cas = lib.__atomic_compare_exchange_1
    cas.restype = ctypes.c_bool
    # Arguments made once, as the backend does: no conversion per call.
    where = [ctypes.c_size_t(base + dsci), ctypes.c_size_t(base + summary)]
    seen = ctypes.c_uint8()
    seen_ref = ctypes.byref(seen)
    desired = ctypes.c_uint8()

    def set_bit(address: ctypes.c_size_t) -> None:
        seen.value = 0  # the usual case: the guest consumed the byte
        desired.value = 0x80
        while not cas(address, seen_ref, desired, 5, 5):
            desired.value = seen.value | 0x80

    def readable() -> None:
        try:
            os.read(fd, 8)
        except BlockingIOError:
            return
        set_bit(where[0])
        set_bit(where[1])

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        os.set_blocking(fd, False)
        loop.add_reader(fd, readable)
        loop.add_reader(sys.stdin.fileno(), lambda: done.done() or done.set_result(None))
        print("ready", flush=True)
        await done

    asyncio.run(serve())


if __name__ == "__main__":
    main()
