"""The wire protocol's frame checks (worker/protocol.py)."""

from __future__ import annotations

import pytest

from worker import protocol as ewp

JOB_ID = "0123456789abcdef0123456789abcdef"


def test_round_trip():
    for command, job_id, body in [(ewp.READY, None, {"model": "m", "kind": "chat", "slots": 2}),
                                  (ewp.JOB, JOB_ID, {"messages": []}), (ewp.CANCEL, JOB_ID, None),
                                  (ewp.HEARTBEAT, None, None),
                                  (ewp.CHUNK, JOB_ID, {"text": "é"}), (ewp.DISCONNECT, None, None)]:
        msg = ewp.decode(ewp.encode(command, job_id, body))
        assert (msg.command, msg.job_id, msg.body) == (command, job_id, body)


@pytest.mark.parametrize("frames", [
    [], [b"EWP1"], [b"EWP0", ewp.HEARTBEAT], [b"EWP1", b"\x42"],
    [b"EWP1", ewp.JOB, b"{}"], [b"EWP1", ewp.JOB, b"not-a-job-id", b"{}"],
    [b"EWP1", ewp.JOB, JOB_ID.encode()], [b"EWP1", ewp.JOB, JOB_ID.encode(), b"{", b"}"],
    [b"EWP1", ewp.CHUNK, JOB_ID.encode(), b"\xff"], [b"EWP1", ewp.CHUNK, JOB_ID.encode(), b"[1]"],
    [b"EWP1", ewp.CANCEL, JOB_ID.encode(), b"{}"], [b"EWP1", ewp.DISCONNECT, b"extra"],
    [b"EWP1", ewp.HEARTBEAT, b'{"free_slots": 1}'],  # heartbeats carry no body, either way
])
def test_malformed_frames_raise_protocol_error(frames):
    with pytest.raises(ewp.ProtocolError):
        ewp.decode(frames)


@pytest.mark.parametrize("command, body, ok", [
    (ewp.CHUNK, {"text": "hi"}, True),
    (ewp.CHUNK, {"index": 0, "embedding": [0.1, 2]}, True),
    (ewp.CHUNK, {"index": 0, "embedding": [True]}, False),
    (ewp.CHUNK, {"text": 5}, False),
    (ewp.DONE, {"finish_reason": "stop", "usage": {"prompt_tokens": 1, "total_tokens": 2}}, True),
    (ewp.DONE, {"finish_reason": "stop", "usage": {"prompt_tokens": "1"}}, False),
    (ewp.ERROR, {"code": "context_length_exceeded", "message": "y", "param": "messages"}, True),
    (ewp.ERROR, {"code": "internal_error", "message": "y"}, True),
    (ewp.ERROR, {"message": "y"}, False),
    (ewp.ERROR, {"code": "x", "message": "y"}, False),  # not a code a worker may send
    (ewp.ERROR, {"code": "queue_full", "message": "y"}, False),  # the broker's, not a worker's
    (ewp.ERROR, {"code": "internal_error", "message": "y", "param": 3}, False),
])
def test_job_body_checks(command, body, ok):
    assert (ewp.check_job_body(ewp.Message(command, JOB_ID, body)) is None) == ok
