"""The indicators daemon: wires its sources (control socket, eventfds, VMM events) to the engine.

:mod:`indicators.daemon.qmp_server` is a generic QMP server on a unix socket
(QEMU's wire format, :mod:`indicators.daemon.qmp_wire`; one client
connection, :mod:`indicators.daemon.qmp_session`); the daemon registers its
commands on it.
"""
