"""Scale-out as deployed, shown with processes on one machine and one real server.

Line 1 runs two ``lineguard infer`` processes in one consumer group (what two GPUs, two
compose services or two KEDA replicas do) and a ``lineguard decide`` process; line 2 runs its
own workers on the same server. Checked: both infer processes score frames, no frame is
scored twice, every frame gets exactly one event with the right verdict, and nothing of one
line appears in the other's streams (keys hash-tagged per line, so a Redis Cluster would put
each line in one slot).
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pytest
from redis.crc import key_slot

from lineguard.stream.bus import Bus
from lineguard.stream.feed import send_source, wait_for_events
from lineguard.stream.protocol import ENTRY_FIELD, decode_frame, decode_scores
from lineguard.stream.run import LocalPipeline
from lineguard.stream.sources import ArraySource
from lineguard.stream.worker import health_pattern
from tests.stream.pipeline_helpers import BAD, GOOD, SIZE, all_events, settings_for, wait_until
from tests.stream.pipeline_helpers import split_bundle as make_split_bundle

pytestmark = pytest.mark.slow

N_LINE1 = 60
N_LINE2 = 30


def infer_frames_by_consumer(bus: Bus) -> dict[str, int]:
    """Frames each live infer worker of the bus's line reports in its heartbeat."""
    out: dict[str, int] = {}
    for key in bus.client.scan_iter(match=health_pattern(bus, "infer"), count=100):
        raw = bus.client.get(key)
        if raw is not None:
            beat = json.loads(raw)
            out[str(beat["consumer"])] = int(beat.get("frames", 0))
    return out


def scored_seqs(bus: Bus) -> Counter[tuple[str, str, int]]:
    """How often each (line, camera, seq) was written to the line's scores stream."""
    rows: Any = bus.client.xrange(bus.key("scores"))
    scores = [decode_scores(fields[ENTRY_FIELD], bus.limits) for _id, fields in rows]
    return Counter((s.line, s.camera, s.seq) for s in scores)


def test_two_infer_processes_share_one_line_and_two_lines_stay_apart(
    bus: Bus, redis_url: str
) -> None:
    split = make_split_bundle()
    small_batches = {"infer.max_batch": 4, "infer.batch_buckets": "1,2,4"}
    cfg1 = settings_for(bus, redis_url, **small_batches, **{"line.camera": "camA"})
    cfg2 = settings_for(bus, redis_url, **{"line.id": "line2", "line.camera": "camB"})
    bus2 = Bus(bus.client, line="line2", prefix=bus.prefix)
    assert bus.line == "line1"

    line1 = LocalPipeline(
        cfg1, redis_url, split.path, mode="processes", runtime="onnxruntime",
        infer_workers=2, consumer_prefix="scale1",
    )  # fmt: skip
    line2 = LocalPipeline(
        cfg2, redis_url, split.path, mode="threads", runtime="onnxruntime",
        consumer_prefix="scale2",
    )  # fmt: skip
    with line1, line2:
        # paced, so both blocked infer workers are woken in turn, as on a real line
        source1 = ArraySource([GOOD, BAD, GOOD], count=N_LINE1)
        sent1 = send_source(bus, cfg1, source1, size=SIZE, fps=100)
        sent2 = send_source(bus2, cfg2, ArraySource([BAD, GOOD], count=N_LINE2), size=SIZE)
        events1, counts1 = wait_for_events(
            bus, "camA", sent1.seqs, since=sent1.events_from, timeout_s=90
        )
        events2, counts2 = wait_for_events(
            bus2, "camB", sent2.seqs, since=sent2.events_from, timeout_s=90
        )
        # heartbeats refresh every 2 s; wait until they account for every frame of line 1
        wait_until(
            lambda: sum(infer_frames_by_consumer(bus).values()) >= N_LINE1,
            15,
            "the infer heartbeats to report every frame",
        )
        per_worker = infer_frames_by_consumer(bus)
        group = bus.client.xinfo_consumers(bus.key("frames"), "infer")
        consumers = {n.decode() if isinstance(n, bytes) else n for n in (c["name"] for c in group)}

    # both processes of line 1 worked, in one consumer group, and together scored each once
    assert set(per_worker) == {"scale1-infer-0", "scale1-infer-1"} == consumers
    assert all(n > 0 for n in per_worker.values()), f"an infer worker did nothing: {per_worker}"
    assert sum(per_worker.values()) == N_LINE1, per_worker
    scored1 = scored_seqs(bus)
    assert set(scored1) == {("line1", "camA", s) for s in sent1.seqs}
    assert max(scored1.values()) == 1, "a frame was scored twice"

    # every frame got exactly one event, with the verdict its image deserves
    assert sorted(events1) == sent1.seqs and max(counts1.values()) == 1
    assert [events1[s].verdict for s in sent1.seqs] == ["pass", "fail", "pass"] * (N_LINE1 // 3)
    assert sorted(events2) == sent2.seqs and max(counts2.values()) == 1
    assert [events2[s].verdict for s in sent2.seqs] == ["fail", "pass"] * (N_LINE2 // 2)

    # the lines never mix: each stream holds its own line's frames, scores and events only
    assert {(e.line, e.camera) for e in all_events(bus)} == {("line1", "camA")}
    assert {(e.line, e.camera) for e in all_events(bus2)} == {("line2", "camB")}
    assert len(all_events(bus)) == N_LINE1 and len(all_events(bus2)) == N_LINE2
    assert {k[:2] for k in scored_seqs(bus2)} == {("line2", "camB")}
    for b, line in ((bus, "line1"), (bus2, "line2")):
        rows: Any = b.client.xrange(b.key("frames"))
        frames = [decode_frame(f[ENTRY_FIELD], b.limits) for _i, f in rows]
        assert {fr.line for fr in frames} == {line}

    # every key carries its line's hash tag: one Cluster slot per line, different lines apart
    keys = [k.decode() for k in bus.client.scan_iter(match=f"{bus.prefix}:*", count=1000)]
    slots: dict[str, set[int]] = {"line1": set(), "line2": set()}
    for key in keys:
        tag = key.split("{", 1)[1].split("}", 1)[0]
        assert tag in slots, f"{key} is not hash-tagged by line"
        slots[tag].add(key_slot(key.encode()))
    assert len(slots["line1"]) == 1 and len(slots["line2"]) == 1
    assert slots["line1"] != slots["line2"]
