"""A small asyncio RTMP publisher over ``ClientConnection`` (tests and the load generator).

    async with asyncio.timeout(10):
        pub = await open_publisher("127.0.0.1", 1935, "STREAM_KEY")
    pub.send_metadata({...}); pub.send_media(VIDEO, ts, body); await pub.drain()
    await pub.close()

After the publish is accepted a reader task keeps consuming what the server sends (acks,
pings) and sets ``closed`` when the server hangs up.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from .connection import ClientConnection
from .errors import RtmpError
from .events import CommandResponse, Event, StatusMessage


class RtmpPublishError(RtmpError):
    """The server refused (``status`` is its onStatus/_error code) or hung up."""

    def __init__(self, message: str, status: str = "") -> None:
        super().__init__(message)
        self.status = status


class Publisher:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 conn: ClientConnection) -> None:
        self.reader = reader
        self.writer = writer
        self.conn = conn
        self.stream_id = 0
        self.closed = asyncio.Event()
        self._events: list[Event] = []
        self._reader_task: asyncio.Task[None] | None = None

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data and not self.writer.is_closing():
            self.writer.write(data)

    async def _wait_for(self, match: Callable[[Event], bool]) -> Event:
        while True:
            self._flush()
            for index, event in enumerate(self._events):
                if match(event):
                    del self._events[index]
                    return event
            data = await self.reader.read(65536)
            if not data:
                raise RtmpPublishError("the server closed the connection")
            self.conn.receive_data(data)
            self._events.extend(self.conn.next_events())

    async def _setup(self, host: str, app: str, key: str, port: int, chunk_size: int) -> None:
        conn = self.conn
        await self._wait_for(lambda e: type(e).__name__ == "HandshakeComplete")
        conn.set_chunk_size(chunk_size)
        tid = conn.connect(app, f"rtmp://{host}:{port}/{app}")
        reply = await self._wait_for(lambda e: isinstance(e, CommandResponse) and e.transaction_id == tid)
        if reply.name != "_result":  # type: ignore[attr-defined]
            raise RtmpPublishError("connect refused", "NetConnection.Connect.Rejected")
        conn.call("releaseStream", key)
        conn.call("FCPublish", key)
        tid = conn.create_stream()
        reply = await self._wait_for(lambda e: isinstance(e, CommandResponse) and e.transaction_id == tid)
        args = reply.arguments  # type: ignore[attr-defined]
        if reply.name != "_result" or len(args) < 2:  # type: ignore[attr-defined]
            raise RtmpPublishError("createStream refused")
        self.stream_id = int(args[1])
        conn.publish(self.stream_id, key)
        status = await self._wait_for(lambda e: isinstance(e, StatusMessage) and e.name == "onStatus")
        assert isinstance(status, StatusMessage)
        if status.code != "NetStream.Publish.Start":
            raise RtmpPublishError(f"publish refused: {status.code} {status.description}", status.code)
        self._reader_task = asyncio.get_running_loop().create_task(self._read_forever())

    async def _read_forever(self) -> None:
        try:
            while True:
                data = await self.reader.read(65536)
                if not data:
                    break
                self.conn.receive_data(data)
                self.conn.next_events()
                self._flush()
        except (OSError, RtmpError):
            pass
        finally:
            self.closed.set()

    # -- publishing ------------------------------------------------------------------------------
    def send_metadata(self, values: dict[str, Any]) -> None:
        self.conn.send_metadata(self.stream_id, values)
        self._flush()

    def send_media(self, type_id: int, timestamp: int, payload: bytes) -> None:
        self.conn.send_media(type_id, self.stream_id, timestamp, payload)
        self._flush()

    def write_raw(self, data: bytes) -> None:
        """Bytes already chunked for this connection (the load generator's fast path)."""
        self.writer.write(data)

    async def drain(self) -> None:
        await self.writer.drain()

    async def close(self) -> None:
        if self._reader_task is not None:
            self._reader_task.cancel()
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


async def open_publisher(host: str, port: int, key: str, *, app: str = "live", chunk_size: int = 4096,
                         digest: bool = True) -> Publisher:
    """Connect and publish; wrap in ``asyncio.timeout()`` to bound the wait."""
    reader, writer = await asyncio.open_connection(host, port)
    publisher = Publisher(reader, writer, ClientConnection(digest=digest))
    try:
        await publisher._setup(host, app, key, port, chunk_size)
    except BaseException:
        writer.close()
        raise
    return publisher
