"""The ``[chat]`` table of the config file."""

from __future__ import annotations

from dataclasses import dataclass, field

from livesrv.config import ConfigError


@dataclass(frozen=True)
class ChatSettings:
    max_length: int = 200  # characters per message
    rate: float = 1.0  # messages per second per user (token refill)
    burst: int = 5  # messages a user may send at once before the rate applies
    banned_words: list[str] = field(default_factory=list)  # case-insensitive substrings
    history: int = 100  # chat messages kept per room for joiners and resumes
    send_buffer: int = 256 * 1024  # bytes a socket may leave unsent before it is dropped as too slow
    batch_interval: float = 0.1  # at most one round (a frame per socket) per room per this many seconds
    fanout_threads: int = 1  # threads writing a chunk's frames (0: one per core, up to 4)
    # sockets getting one frame (a chunk's seats at one cursor: nearly all of it) from which
    # that frame's writes are spread over the threads
    fanout_threshold: int = 200
    flush_chunk: int = 250  # sockets written per turn of the event loop
    sample_rate: float = 100.0  # chat events/s per room past which delivery is sampled
    linger_seconds: float = 300.0  # a room without sockets stays subscribed (history current)
    viewers_interval: float = 3.0  # seconds between viewer-count checks

    def __post_init__(self) -> None:
        if self.flush_chunk < 1:
            raise ConfigError("[chat] flush_chunk must be at least 1")
