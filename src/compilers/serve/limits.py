"""What a server holds at most, and for how long: request bodies (one request's, per model, and all at once),
connections, gRPC's RPCs at once, the timeouts that close the ones that stall, and how long a stopping server
lets the requests in flight finish. The defaults protect a default install; `compilers serve` flags set each.

A request body is refused from its headers when the model could not take that many bytes: a version takes at
most `max_batch_size` rows (or its dims' declared maxima), so its largest valid request has a size known before a
byte of data is read (`request_bytes`). Bodies that are read and decoded hold room in one `BodyBudget` until
their arrays exist, so many large requests at once wait (then get 503) instead of swelling memory.
"""
from __future__ import annotations

import asyncio
import resource
from collections import deque
from dataclasses import dataclass

from ..errors import CompilerError
from ..signature import Signature

MAX_BODY_BYTES = 64 << 20
JSON_BYTES_PER_ELEMENT = 48     # a number as JSON with its separators, nesting and indentation, generously
JSON_BYTES_PER_CHARACTER = 6    # a string's byte as JSON at worst: a control character escaped \u00XX
HEAD_BYTES = 64 << 10           # a request's names, shapes, parameters and id
CONTROL_BYTES = 64 << 10        # the repository API's bodies: small JSON objects


@dataclass(frozen=True)
class Limits:
    """A server's limits. None for `max_connections`: from the process's open-file limit (`connection_cap`)."""

    max_body_bytes: int = MAX_BODY_BYTES    # one request's body at most (inflated), whatever its model
    max_bodies_bytes: int | None = None     # bodies read or being decoded at once; None: 2 x max_body_bytes
    body_wait: float = 10.0                 # how long a request waits for that room before a 503
    max_connections: int | None = None      # open connections at most; beyond, the longest-stalled idle one goes
    header_timeout: float = 10.0            # a request's line and headers must arrive within this
    body_timeout: float = 30.0              # the longest pause while a body arrives
    idle_timeout: float = 5.0               # a kept-alive connection with no request closes after this
    grpc_max_rpcs: int = 256                # gRPC RPCs running at once (each holds at most one message of
                                            # max_body_bytes); beyond, RESOURCE_EXHAUSTED at once
    drain_timeout: float = 30.0             # a stopping server's requests in flight (HTTP and gRPC) finish within this

    def __post_init__(self):
        for name in ("max_body_bytes", "body_wait", "header_timeout", "body_timeout", "idle_timeout", "drain_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"Limits.{name} must be positive, not {getattr(self, name)}")
        for name in ("max_connections", "grpc_max_rpcs"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"Limits.{name} must be at least 1, not {getattr(self, name)}")
        if self.max_bodies_bytes is not None and self.max_bodies_bytes < self.max_body_bytes:
            raise ValueError(f"Limits.max_bodies_bytes ({self.max_bodies_bytes}) must hold at least one body of "
                             f"max_body_bytes ({self.max_body_bytes})")

    @property
    def bodies_bytes(self) -> int:
        return self.max_bodies_bytes if self.max_bodies_bytes is not None else 2 * self.max_body_bytes

    @property
    def connections(self) -> int:
        return self.max_connections if self.max_connections is not None else connection_cap()


def connection_cap() -> int:
    """Connections a server may hold open: 7/8 of the process's open-file limit (the rest for model files,
    logs and the loop), so a flood of connections never leaves it unable to accept or open a file."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 65536
    return max(8, soft - max(64, soft // 8))


def request_bytes(signature: Signature, max_batch_size: int) -> int | None:
    """The most bytes a valid request for this signature can take (its inputs' largest shapes as JSON, plus
    room for names and parameters); None when a dim has no upper bound."""
    elements = 0
    for spec in signature.inputs:
        count = 1
        for d in spec.shape:
            if isinstance(d, int):
                count *= d
            elif d == signature.batch:
                count *= max_batch_size
            elif d in signature.dims and signature.dims[d].max is not None:
                count *= signature.dims[d].max
            else:
                return None
        elements += count
    return HEAD_BYTES + elements * JSON_BYTES_PER_ELEMENT


def items_bytes(max_item_bytes: int, max_batch_size: int) -> int:
    """The most bytes a valid request to a pipeline can take: max_batch_size items of at most max_item_bytes
    each, as JSON strings (escapes make a byte up to JSON_BYTES_PER_CHARACTER) or binary, plus the head."""
    return HEAD_BYTES + max_batch_size * (max_item_bytes * JSON_BYTES_PER_CHARACTER + 4)


class Busy(CompilerError):
    """The server holds as many request bodies as it may; retry (HTTP 503)."""


class _Held:
    """`BodyBudget.hold`'s block (a class: an async generator costs more per request)."""

    __slots__ = ("budget", "size")

    def __init__(self, budget: "BodyBudget", size: int):
        self.budget, self.size = budget, size

    async def __aenter__(self) -> None:
        await self.budget._take(self.size)

    async def __aexit__(self, *exc: object) -> None:
        self.budget._give(self.size)


class BodyBudget:
    """Room for request bodies held at once (read, or being decoded), in bytes. Requests take room in arrival
    order and wait at most `wait` seconds for it (then Busy)."""

    def __init__(self, capacity: int, wait: float):
        self.capacity, self.wait, self.free = capacity, wait, capacity
        self._waiting: deque[tuple[int, asyncio.Future]] = deque()

    def hold(self, size: int) -> "_Held":
        """Room for `size` bytes (at most the capacity) while the `async with` block runs."""
        return _Held(self, min(size, self.capacity))

    async def _take(self, size: int) -> None:
        if not self._waiting and size <= self.free:
            self.free -= size
            return
        turn = asyncio.get_running_loop().create_future()
        self._waiting.append((size, turn))
        try:
            await asyncio.wait_for(asyncio.shield(turn), self.wait)
        except TimeoutError:
            if self._withdraw(size, turn):
                raise Busy(f"the server holds as many request bodies as it may ({self.capacity} bytes); retry "
                           "shortly, or send smaller requests") from None
        except BaseException:                 # the request was cancelled while it waited
            if not self._withdraw(size, turn):
                self._give(size)
            raise

    def _withdraw(self, size: int, turn: asyncio.Future) -> bool:
        """Leave the line; False if the room was given meanwhile (the caller holds it)."""
        if turn.done():
            return False
        turn.cancel()
        self._waiting.remove((size, turn))
        self._give(0)                     # a request behind this one may fit now
        return True

    def _give(self, size: int) -> None:
        self.free += size
        while self._waiting and self._waiting[0][0] <= self.free:
            size, turn = self._waiting.popleft()
            if not turn.cancelled():
                self.free -= size
                turn.set_result(None)
