"""Test support: a real s390x guest under QEMU TCG that clears adapter indicators.

:mod:`indicators.testing.guest` is the guest program's ABI (parameter block,
results, reports); :mod:`indicators.testing.qemu` builds and runs it.
"""
