"""Exceptions raised by vringipc.

The ring errors keep vringh's two kinds apart:

* :class:`InvalidRing` - the shared ring itself is inconsistent (a head out of
  range, the avail index jumping, a used entry naming a buffer that is not in
  flight).  Nothing was consumed and the ring refuses further use until reset.
* :class:`InvalidDescriptor` - one chain is malformed (loop, address outside the
  arena, bad indirect table...).  The entry *was* consumed: its ``head`` is in
  flight and the consumer may ``complete(head, 0)`` it and carry on.

Both are :class:`OSError` subclasses carrying the errno vringh would return
(``EINVAL``, ``ELOOP``, ``EPROTO``, ``EMSGSIZE``, ``E2BIG``, ``ENOMEM``).
"""

from __future__ import annotations

import queue

__all__ = [
    "VringError",
    "RingCorrupted",
    "InvalidRing",
    "InvalidDescriptor",
    "PeerDead",
    "ChannelClosed",
    "MessageTooLarge",
    "Full",
    "Empty",
]

Full = queue.Full
Empty = queue.Empty


class VringError(Exception):
    """Base class of every vringipc error."""


class RingCorrupted(VringError, OSError):
    """The peer wrote something into shared memory that breaks the protocol."""

    def __init__(self, errno: int, message: str, head: int | None = None):
        super().__init__(errno, message)
        self.head = head


class InvalidRing(RingCorrupted):
    """The ring is unusable until reset; nothing was consumed (``head`` is None)."""


class InvalidDescriptor(RingCorrupted):
    """One chain is invalid; it was consumed and ``head`` is still in flight."""


class PeerDead(VringError, ConnectionError):
    """The process on the other side of the ring has exited."""


class ChannelClosed(VringError, EOFError):
    """The other end closed the channel cleanly and nothing is left to read."""


class MessageTooLarge(VringError, ValueError):
    """A message that can never fit, whatever the peer does."""
