"""Test support: a real s390x guest under QEMU TCG that clears adapter indicators.

The layers, each usable on its own:

- :mod:`indicators.testing.guest`: the guest program's ABI (parameter block,
  groups of areas behind one summary, results, reports) and its source;
- :mod:`indicators.testing.build`: the toolchain, and the guest built once
  per source into a cache;
- :mod:`indicators.testing.qemu`: :class:`~indicators.testing.qemu.AirqGuest`,
  one QEMU running the guest with its RAM shared with this process;
- :mod:`indicators.testing.layout`: from device configs to the guest's layout;
- :mod:`indicators.testing.oracle`: :class:`~indicators.testing.oracle.DeliveryOracle`,
  whether every acknowledged notification reached the guest, judged from the
  caller's and the guest's side only (no QEMU needed; the demo uses it too);
- :mod:`indicators.testing.delivery`: that oracle over the real test guest,
  and notifications sent through a QMP client or an engine, told to it;
- :mod:`indicators.testing.rig`: :class:`~indicators.testing.rig.IndicatorsRig`,
  the guest plus an ``indicators`` daemon attached to it;
- :mod:`indicators.testing.plugin`: the pytest plugin (entry point
  ``pytest11``, name ``indicators``) with the rig as fixtures.

Nothing is imported here, so loading the plugin costs a pytest run nothing
until a test asks for the rig.
"""
