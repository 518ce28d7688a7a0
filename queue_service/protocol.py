"""The platform's queue protocol as names: headers, media types, defaults and its own status codes.

Shared by the API and the clients (the CLI), so that each name is written once.
"""

from __future__ import annotations

REQUEST_ID_HEADER = "X-Eas-Queueservice-Request-Id"
INDEX_HEADER = "X-Eas-Queueservice-Index"
LAST_CODE_HEADER = "X-Eas-Queueservice-Last-Code"
UID_HEADER = "X-EAS-QueueService-Redis-Uid"
GID_HEADER = "X-EAS-QueueService-Redis-Gid"
PRIORITY_PARAMETER = "_priority_"
# The header `meta.header.priority` names: the Go client sends priority only there, the Java client there too.
# Without underscores: proxies such as nginx drop headers with underscores by default.
PRIORITY_HEADER = "X-EAS-QueueService-Priority"
# The tag of the frame a watch sends at the end of the stream (`_x_` names are never a client's tags).
END_OF_STREAM_TAG = "_eos_"
PROTOBUF_MEDIA_TYPE = "application/vnd.google.protobuf"

# The official clients' consumer group when they name none.
DEFAULT_GROUP = "eas"

QUEUE_FULL = 450  # the platform's "queue is full, the request was dropped"
CLIENT_CLOSED = 499  # logged only: the client left before its answer
TOO_MANY_REQUESTS = 429

# Tags the service writes on results: a client may filter on them, never set them.
RESERVED_TAGS = frozenset({"requestId", "lastCode"})
