"""vringipc: inter-process messaging over a virtio split ring in shared memory."""

from vringipc._ring import (
    FEATURE_EVENT_IDX,
    FEATURE_INDIRECT_DESC,
    FEATURE_VERSION_1,
    Iov,
    VringDriver,
    VringHost,
    need_event,
)
from vringipc.aio import AsyncChannel, AsyncQueue
from vringipc.channel import Channel
from vringipc.queue import JoinableQueue, Queue, SimpleQueue
from vringipc.errors import (
    ChannelClosed,
    Empty,
    Full,
    InvalidDescriptor,
    InvalidRing,
    MessageTooLarge,
    PeerDead,
    RingCorrupted,
    VringError,
)

__version__ = "0.1.0"

__all__ = [
    "AsyncChannel",
    "AsyncQueue",
    "Channel",
    "ChannelClosed",
    "Queue",
    "SimpleQueue",
    "JoinableQueue",
    "FEATURE_EVENT_IDX",
    "FEATURE_INDIRECT_DESC",
    "FEATURE_VERSION_1",
    "Iov",
    "VringDriver",
    "VringHost",
    "need_event",
    "Empty",
    "Full",
    "InvalidDescriptor",
    "InvalidRing",
    "MessageTooLarge",
    "PeerDead",
    "RingCorrupted",
    "VringError",
]
