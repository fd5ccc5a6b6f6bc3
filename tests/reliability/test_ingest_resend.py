"""Ingest across a lost reply: the server ran the send script but the answer never came back
(the connection died first), so the same send is tried again."""

from __future__ import annotations

import pytest

from lineguard.stream.bus import Bus
from lineguard.stream.ingest import Ingestor, SeqConflictError
from lineguard.stream.protocol import encode, make_frame
from tests.stream.pipeline_helpers import BAD, GOOD, SIZE


def test_a_retried_send_whose_reply_was_lost_is_not_a_conflict(bus: Bus) -> None:
    ing = Ingestor(bus, camera="cam0", size=SIZE, encoding="png")
    frame = make_frame(bus.line, "cam0", 0, GOOD, encoding="png", t_capture=1.0, epoch=ing.epoch)
    # the first attempt: it ran on the server, its reply was lost on the way back
    landed = ing._append(0, encode(frame))
    sent = ing.send(GOOD, t_capture=1.0)  # the retry
    assert sent.entry_id == landed.decode()
    assert bus.length("frames") == 1  # not sent twice
    assert ing.next_seq == 1
    assert ing.send(BAD).frame.seq == 1 and bus.length("frames") == 2

    # a second producer on the same camera is still refused, even one seq behind
    other = Ingestor(bus, camera="cam0", size=SIZE, encoding="png")
    other.next_seq = 1
    with pytest.raises(SeqConflictError, match="fed by another ingest"):
        other.send(GOOD)
    assert bus.length("frames") == 2
