"""ModelStreamInfer: a bidirectional stream on which every message is one ModelInfer.

Messages are served concurrently, not one after another, so those in flight from one stream
join the model's batches with each other and with other streams' and unary calls'; responses
go out as they complete, each carrying its request's ``id``. A failed message is answered with
``error_message`` (one line, bounded like a status message) and the stream goes on, as
Triton's does. The call itself ends with a status only for what concerns the whole stream:
the client gone, its deadline, the idle limit, or a request stream that fails.

Bounds: at most ``max_in_flight`` messages read and not yet answered (then the stream is not
read: the client's writes wait, a backpressure, not an error); the call's deadline applies to
every message; the responses are written by the RPC wrapper (service/errors.py), each write
bounded by the idle timeout, so a client that stops reading frees the call. A stream with
nothing in flight on which the client sent nothing for ``idle_timeout_s`` is closed
(DEADLINE_EXCEEDED): it holds an RPC slot, and a client that means to keep it open has only to
send. Cancelling the call cancels the work in flight.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from paramserve.protos import inference_pb2 as pb

from .errors import MAX_STATUS_CHARS, client_message
from .loaded import ModelUnavailable
from .status import DeadlineExceeded

METHOD = "ModelStreamInfer"
_END = object()  # the client closed its side of the stream
# A message's work cancelled under it, not by the call (its model's queue dropped it).
_DROPPED = (
    "the request was dropped on the server (its model was unloaded or the server is "
    "stopping); retry"
)


@dataclass(frozen=True)
class StreamLimits:
    max_in_flight: int = 64
    idle_timeout_s: float = 30.0  # 0: wait forever
    max_status_chars: int = MAX_STATUS_CHARS

    @classmethod
    def of(cls, config) -> StreamLimits:
        """A ServerConfig's --max-stream-in-flight, --stream-idle-timeout-s and
        --max-status-chars."""
        return cls(
            config.max_stream_in_flight, config.stream_idle_timeout_s, config.max_status_chars
        )


class _Stream:
    """One call's state; everything runs on the event loop, so plain counters suffice."""

    def __init__(self, core, limits: StreamLimits, requests, context):
        self.core, self.limits, self.requests, self.context = core, limits, requests, context
        self.events: asyncio.Queue = asyncio.Queue()  # responses, _END, or the reader's error
        self.slots = asyncio.Semaphore(limits.max_in_flight)
        self.in_flight = 0  # read and not yet answered
        self.last_heard = time.monotonic()
        self.tasks: set[asyncio.Task] = set()

    async def read(self) -> None:
        """Take a slot, then a message: with every slot taken the stream is not read."""
        try:
            while True:
                await self.slots.acquire()
                request = await anext(self.requests, _END)
                if request is _END:
                    self.events.put_nowait(_END)
                    return
                self.in_flight += 1
                self.last_heard = time.monotonic()
                task = asyncio.create_task(self.one(request))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
        except asyncio.CancelledError:
            raise
        except Exception as err:  # the request stream failed: the call ends with it
            self.events.put_nowait(err)

    async def one(self, request) -> None:
        """One message, answered whatever happens to it (else its slot would never free)."""
        try:
            response = await self.core.infer(request, self.context.time_remaining())
            message = pb.ModelStreamInferResponse(infer_response=response)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is None or task.cancelling():  # the call is over: nothing to answer
                raise
            message = self.failed(request, ModelUnavailable(_DROPPED))
        except Exception as err:
            message = self.failed(request, err)
        self.events.put_nowait(message)

    def failed(self, request, err: Exception) -> pb.ModelStreamInferResponse:
        return pb.ModelStreamInferResponse(
            error_message=client_message(err, METHOD, self.limits.max_status_chars),
            infer_response=pb.ModelInferResponse(id=request.id),  # to match it by
        )

    async def next_event(self):
        """The next event; DeadlineExceeded once the stream has been idle too long."""
        idle_s = self.limits.idle_timeout_s
        while True:
            if not idle_s or self.in_flight:
                return await self.events.get()
            left = self.last_heard + idle_s - time.monotonic()
            try:
                async with asyncio.timeout(max(0.0, left)):
                    return await self.events.get()
            except TimeoutError:
                if not self.in_flight and time.monotonic() - self.last_heard >= idle_s:
                    raise DeadlineExceeded(
                        f"{METHOD}: the client sent nothing for {idle_s:g} s with no request "
                        "in flight (--stream-idle-timeout-s); the stream is closed"
                    ) from None

    def answered(self) -> None:
        """A response was written: its slot is free again."""
        self.in_flight -= 1
        self.last_heard = time.monotonic()
        self.slots.release()

    def cancel(self) -> None:
        for task in list(self.tasks):
            task.cancel()


async def stream_infer(core, limits: StreamLimits, requests, context):
    """The responses of one ModelStreamInfer call, as they complete (see the module doc)."""
    stream = _Stream(core, limits, requests, context)
    reader = asyncio.create_task(stream.read())
    closed = False
    try:
        while not (closed and stream.in_flight == 0):
            event = await stream.next_event()
            if event is _END:
                closed = True
            elif isinstance(event, BaseException):
                raise event
            else:
                yield event
                stream.answered()
    finally:
        reader.cancel()
        stream.cancel()
