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
    batch_interval: float = 0.1  # at most one frame per room per this many seconds
    fanout_threads: int = 0  # threads writing a big room's frames (0: up to 4, one per core)
    fanout_threshold: int = 2000  # sockets in a room from which its frames are written on threads
    flush_chunk: int = 2500  # sockets a frame is written to per turn of the event loop
    sample_rate: float = 100.0  # chat events/s per room past which delivery is sampled
    linger_seconds: float = 300.0  # a room without sockets stays subscribed (history current)
    viewers_interval: float = 3.0  # seconds between viewer-count checks

    def __post_init__(self) -> None:
        if self.flush_chunk < 1:
            raise ConfigError("[chat] flush_chunk must be at least 1")
