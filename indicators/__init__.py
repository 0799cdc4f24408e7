"""indicators: sets s390x adapter-interrupt indicators with the key-checked MEM_OP cmpxchg.

Data flows one way: config -> adapter model -> engine -> memop backend ->
guest memory; the daemon wires its sources (control socket, eventfds, VMM
events) to the engine.

Glossary (each name is spelled this way everywhere in the package):

gaddr
    A guest absolute address; with QEMU's single RAM block, the offset in
    the guest's RAM file.
dsci
    Device-state-change indicator: the bit vector, one bit per vector
    (queue) of a device, that the host sets and the guest clears (zPCI: AIBV).
alsi, summary
    Adapter-local summary indicator: the bit (virtio: byte) that says some
    indicator behind it is set (zPCI: AISB).
isc
    Interruption subclass 0..7, the only thing an adapter interrupt carries.
vector
    A device's queue number; it selects the dsci bit.
access key
    The 4-bit key a memop runs under (``None``: no key checking).
storage key
    The per-4-KiB-page byte ACC | F | R | C that the access key is checked
    against.
"""

import logging

from .errors import ConfigError, IndicatorsError, ResourceError

# The error root and its two most used branches; every other error the package
# raises on purpose derives from IndicatorsError too (see indicators.errors).
__all__ = ["ConfigError", "IndicatorsError", "ResourceError", "__version__"]

logging.getLogger(__name__).addHandler(logging.NullHandler())

__version__ = "0.1.0"
