"""Send a finite source through a running pipeline and wait until every frame has its event.

``lineguard replay --source SOURCE`` is a producer and an observer, not a worker: it sends the
frames of an image folder, video file or recording (made with ``lineguard ingest --record DIR``)
with the ingest stage's own code, remembers which sequence numbers it used, then follows the events
stream until each of them has a verdict (``--burst`` semantics) or the timeout passes. The
infer and decide workers must already be running against ``LINEGUARD_REDIS__URL``;
``lineguard run`` is the one-box variant that starts them too.

Frames are stamped with the time they are replayed (not the recorded capture time), so the
latencies in the summary are those of this replay; the recorded times stay in the recording's
index. Pacing is ``--rate`` (frames per second) or as fast as possible.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from lineguard.engines.errors import ConfigError
from lineguard.stream.bus import Bus, connect, wait_for_server
from lineguard.stream.feed import RunSummary, send_source, summarise, wait_for_events
from lineguard.stream.ingest import bundle_frame_codec, bundle_input_size
from lineguard.stream.protocol import Event
from lineguard.stream.settings import Settings
from lineguard.stream.sources import open_source
from lineguard.stream.worker import StopFlag


def replay(
    settings: Settings,
    source_spec: str,
    *,
    rate: float | None = None,
    size: tuple[int, int] | None = None,
    bundle: str | Path | None = None,
    loop: bool = False,
    limit: int | None = None,
    record: str | Path | None = None,
    timeout_s: float = 120.0,
    stop: StopFlag | None = None,
    on_event: Callable[[Event], None] | None = None,
) -> RunSummary:
    """``lineguard replay``: send ``source_spec`` into the pipeline at ``settings.redis.url``
    and wait for every frame's event."""
    if not settings.redis.url:
        raise ConfigError(
            "replay feeds a running pipeline: set LINEGUARD_REDIS__URL to its Redis, or use "
            "'lineguard run --bundle B --source SOURCE' to start the workers here"
        )
    if loop and limit is None:
        raise ConfigError("--loop needs --limit N, or replay would never finish")
    if size is None and bundle is not None:
        size = bundle_input_size(bundle)
    codec = None if bundle is None else bundle_frame_codec(bundle)
    client = connect(settings, client_name="lineguard-replay")
    try:
        wait_for_server(client, settings.redis.wait_timeout)
        bus = Bus.from_settings(client, settings)
        with open_source(source_spec, loop=loop) as source:
            sent = send_source(
                bus, settings, source, size=size, fps=rate, record=record, limit=limit, stop=stop,
                codec=codec,
            )  # fmt: skip
        events, counts = wait_for_events(
            bus,
            sent.camera,
            sent.seqs,
            since=sent.events_from,
            timeout_s=timeout_s,
            stop=stop,
            on_event=on_event,
        )
        return summarise(sent, events, counts)
    finally:
        client.close()
