"""DataFrame encodings on the wire: the queue protobuf messages, the JSON form and the Accept choice.

The messages are those of the official client's ``queueservice.proto`` (package ``streaming``).
We build their descriptor at import time instead of committing protoc output, because generated
``_pb2`` code is tied to the protobuf runtime version that generated it; a descriptor built here
works with every runtime from 4.21 on.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor_pb2 import FieldDescriptorProto as _FD
from google.protobuf.message import DecodeError

from queue_service.protocol import PROTOBUF_MEDIA_TYPE
from queue_service.store.model import DataFrame

__all__ = ["PROTOBUF_MEDIA_TYPE", "DataFrame"]


class WireError(ValueError):
    """Bytes that are not the protobuf message they claim to be."""


def _field(name: str, number: int, kind: int, *, repeated: bool = False, type_name: str = "") -> _FD:
    label = _FD.LABEL_REPEATED if repeated else _FD.LABEL_OPTIONAL
    field = _FD(name=name, number=number, type=kind, label=label)
    if type_name:  # even an empty type_name counts as set, which scalar fields must not have
        field.type_name = type_name
    return field


def _string_map_entry(name: str) -> descriptor_pb2.DescriptorProto:
    # A proto3 map<string,string> is, on the wire, a repeated nested message flagged map_entry.
    return descriptor_pb2.DescriptorProto(
        name=name,
        field=[_field("key", 1, _FD.TYPE_STRING), _field("value", 2, _FD.TYPE_STRING)],
        options=descriptor_pb2.MessageOptions(map_entry=True),
    )


def _file_descriptor() -> descriptor_pb2.FileDescriptorProto:
    data_frame = descriptor_pb2.DescriptorProto(
        name="DataFrameProto",
        field=[
            _field("index", 1, _FD.TYPE_UINT64),
            _field("tags", 2, _FD.TYPE_MESSAGE, repeated=True, type_name=".streaming.DataFrameProto.TagsEntry"),
            _field("data", 3, _FD.TYPE_BYTES),
            _field("message", 4, _FD.TYPE_STRING),
        ],
        nested_type=[_string_map_entry("TagsEntry")],
    )
    data_frame_list = descriptor_pb2.DescriptorProto(
        name="DataFrameListProto",
        field=[_field("index", 1, _FD.TYPE_MESSAGE, repeated=True, type_name=".streaming.DataFrameProto")],
    )
    attributes = descriptor_pb2.DescriptorProto(
        name="AttributesProto",
        field=[
            _field(
                "attributes",
                1,
                _FD.TYPE_MESSAGE,
                repeated=True,
                type_name=".streaming.AttributesProto.AttributesEntry",
            )
        ],
        nested_type=[_string_map_entry("AttributesEntry")],
    )
    return descriptor_pb2.FileDescriptorProto(
        name="queueservice.proto",
        package="streaming",
        syntax="proto3",
        message_type=[data_frame, data_frame_list, attributes],
        options=descriptor_pb2.FileOptions(go_package="pkg/streaming/types"),
    )


# A private pool: another copy of queueservice.proto (the official client's) may sit in the default one.
_POOL = descriptor_pool.DescriptorPool()
_POOL.Add(_file_descriptor())
DataFrameProto: Any = message_factory.GetMessageClass(_POOL.FindMessageTypeByName("streaming.DataFrameProto"))
DataFrameListProto: Any = message_factory.GetMessageClass(_POOL.FindMessageTypeByName("streaming.DataFrameListProto"))
AttributesProto: Any = message_factory.GetMessageClass(_POOL.FindMessageTypeByName("streaming.AttributesProto"))


def _to_proto(df: DataFrame, into: Any) -> None:
    into.index = df.index
    into.tags.update(df.tags)
    into.data = df.data
    into.message = df.message


def _from_proto(proto: Any) -> DataFrame:
    return DataFrame(index=proto.index, tags=dict(proto.tags), data=proto.data, message=proto.message)


def _parse(message_class: Any, raw: bytes) -> Any:
    proto = message_class()
    try:
        proto.ParseFromString(raw)
    except DecodeError as exc:
        raise WireError(f"not a valid {message_class.DESCRIPTOR.name}: {exc}") from exc
    return proto


def encode_frame(df: DataFrame) -> bytes:
    proto = DataFrameProto()
    _to_proto(df, proto)
    return proto.SerializeToString()


def decode_frame(raw: bytes) -> DataFrame:
    return _from_proto(_parse(DataFrameProto, raw))


def encode_frame_list(frames: Sequence[DataFrame]) -> bytes:
    proto = DataFrameListProto()
    for df in frames:
        _to_proto(df, proto.index.add())
    return proto.SerializeToString()


def decode_frame_list(raw: bytes) -> list[DataFrame]:
    return [_from_proto(item) for item in _parse(DataFrameListProto, raw).index]


def frames_to_json(frames: Sequence[DataFrame]) -> list[dict[str, Any]]:
    """The JSON answer of a get: payloads in base64, since they need not be text."""
    return [
        {
            "index": df.index,
            "tags": dict(df.tags),
            "data": base64.b64encode(df.data).decode("ascii"),
            "message": df.message,
        }
        for df in frames
    ]


def encode_attributes(attrs: Mapping[str, str]) -> bytes:
    proto = AttributesProto()
    proto.attributes.update(attrs)
    return proto.SerializeToString()


def wants_protobuf(accept_header: str | None) -> bool:
    """True when the Accept header lists the protobuf media type (and does not refuse it with q=0)."""
    if not accept_header:
        return False
    for media_range in accept_header.split(","):
        media_type, *params = (part.strip() for part in media_range.split(";"))
        if media_type.lower() != PROTOBUF_MEDIA_TYPE:
            continue
        return not any(_is_zero_quality(param) for param in params)
    return False


def _is_zero_quality(param: str) -> bool:
    name, _, value = param.partition("=")
    if name.strip().lower() != "q":
        return False
    try:
        return float(value) == 0
    except ValueError:
        return False
