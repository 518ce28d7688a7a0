"""DataFrame encodings: protobuf round trips, the JSON form, byte compatibility with the official client."""

from __future__ import annotations

import base64
import json
import subprocess
import textwrap

import pytest

from queue_service import wire
from queue_service.wire import DataFrame

BINARY = bytes(range(256)) + b"\xff\xfe\x00\x80"  # not UTF-8: payloads may be any bytes


def test_frame_round_trip_keeps_binary_data_and_unicode_tags() -> None:
    df = DataFrame(index=2**63 + 5, tags={"requestId": "r-1", "名前": "值 ✓"}, data=BINARY, message="done ✓")

    assert wire.decode_frame(wire.encode_frame(df)) == df


def test_frame_with_defaults_round_trips() -> None:
    df = DataFrame(index=0, tags={}, data=b"")

    assert wire.encode_frame(df) == b""
    assert wire.decode_frame(b"") == df


def test_frame_list_round_trip_keeps_order() -> None:
    frames = [DataFrame(index=i, tags={"n": str(i)}, data=bytes([i, 0xFF]), message=f"m{i}") for i in (3, 1, 2)]

    assert wire.decode_frame_list(wire.encode_frame_list(frames)) == frames


def test_empty_list_is_empty_bytes() -> None:
    assert wire.encode_frame_list([]) == b""
    assert wire.decode_frame_list(b"") == []


def test_corrupt_bytes_are_a_value_error() -> None:
    with pytest.raises(ValueError, match="DataFrameProto"):
        wire.decode_frame(b"\xff\xff\xff")


def test_json_form_carries_data_in_base64() -> None:
    frames = [DataFrame(index=7, tags={"lastCode": "422"}, data=BINARY, message="bad input")]

    as_json = wire.frames_to_json(frames)

    assert as_json == [
        {
            "index": 7,
            "tags": {"lastCode": "422"},
            "data": base64.b64encode(BINARY).decode(),
            "message": "bad input",
        }
    ]
    assert json.loads(json.dumps(as_json)) == as_json


def test_attributes_decode_as_attributes_proto() -> None:
    raw = wire.encode_attributes({"meta.name": "echo", "stream.length": "3"})

    proto = wire.AttributesProto()
    proto.ParseFromString(raw)
    assert dict(proto.attributes) == {"meta.name": "echo", "stream.length": "3"}


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        (None, False),
        ("", False),
        ("application/json", False),
        ("*/*", False),
        ("application/vnd.google.protobuf", True),
        ("Application/VND.Google.Protobuf", True),
        ("application/json;q=0.5, application/vnd.google.protobuf", True),
        ("application/vnd.google.protobuf; q=0.8", True),
        ("application/vnd.google.protobuf;q=0", False),
    ],
)
def test_wants_protobuf_reads_the_accept_header(accept: str | None, expected: bool) -> None:
    assert wire.wants_protobuf(accept) is expected


# Runs in the official client's venv (protobuf 3.20, its own generated queueservice_pb2).
_OFFICIAL_SIDE = textwrap.dedent(
    """
    import base64, json, sys
    from eas_prediction.queue_types import queueservice_pb2 as pb

    ours = json.load(sys.stdin)
    frame = pb.DataFrameProto()
    frame.ParseFromString(base64.b64decode(ours["frame"]))
    frames = pb.DataFrameListProto()
    frames.ParseFromString(base64.b64decode(ours["list"]))

    def as_json(df):
        data = base64.b64encode(df.data).decode()
        return {"index": df.index, "tags": dict(df.tags), "data": data, "message": df.message}

    theirs = pb.DataFrameProto(index=42, data=bytes([0, 255, 128]), message="from eas ✓")
    theirs.tags.update({"requestId": "abc", "ключ": "значение"})
    json.dump({
        "frame": as_json(frame),
        "list": [as_json(df) for df in frames.index],
        "encoded": base64.b64encode(theirs.SerializeToString()).decode(),
        "descriptor": base64.b64encode(pb.DESCRIPTOR.serialized_pb).decode(),
    }, sys.stdout)
    """
)


def test_bytes_are_compatible_with_the_official_client(eas_python: str) -> None:
    python = eas_python
    frame = DataFrame(index=9, tags={"requestId": "r-9", "名前": "值"}, data=BINARY, message="ok")
    frames = [frame, DataFrame(index=10, tags={}, data=b"\x00")]
    ours = {
        "frame": base64.b64encode(wire.encode_frame(frame)).decode(),
        "list": base64.b64encode(wire.encode_frame_list(frames)).decode(),
    }

    run = subprocess.run(
        [python, "-c", _OFFICIAL_SIDE], input=json.dumps(ours), capture_output=True, text=True, timeout=60
    )

    assert run.returncode == 0, run.stderr
    theirs = json.loads(run.stdout)
    assert theirs["frame"] == wire.frames_to_json([frame])[0]
    assert theirs["list"] == wire.frames_to_json(frames)
    assert wire.decode_frame(base64.b64decode(theirs["encoded"])) == DataFrame(
        index=42,
        tags={"requestId": "abc", "ключ": "значение"},
        data=bytes([0, 255, 128]),
        message="from eas ✓",
    )
    ours_descriptor = wire.DataFrameProto.DESCRIPTOR.file.serialized_pb
    assert base64.b64decode(theirs["descriptor"]) == ours_descriptor
