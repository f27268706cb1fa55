"""One server interceptor that logs every CSI call, with secrets redacted.

Per call: one line with the method, the volume and path it concerns, the resulting status code
and the duration (INFO for publish/unpublish and for errors, DEBUG for the periodic calls), and
at DEBUG the whole request. Redaction is driven by the proto itself: every field carrying the
spec's ``csi_secret`` option is masked, plus ``mount_flags``, which the spec says may contain
secrets without marking it. So a secret can only leak if the proto loses that option, and a
test checks the log for a planted secret.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf import text_format
from google.protobuf.message import Message

from . import csi_pb2

log = logging.getLogger("datahoard.csi_node.calls")

REDACTED = "<redacted>"
#: Fields the spec calls sensitive in prose only.
_SENSITIVE_BY_NAME = frozenset({"mount_flags"})
#: Called every few seconds by kubelet and the sidecars: logged at DEBUG unless they fail.
_QUIET = frozenset({"Probe", "NodeGetCapabilities", "NodeGetVolumeStats", "GetPluginInfo", "NodeGetInfo", "GetPluginCapabilities"})
#: Request fields worth one glance in the summary line.
_SUMMARY_FIELDS = ("volume_id", "target_path", "volume_path")


def _is_secret(field: Any) -> bool:
    return field.name in _SENSITIVE_BY_NAME or field.GetOptions().Extensions[csi_pb2.csi_secret]


def _redact_in_place(msg: Message) -> None:
    for field, value in msg.ListFields():
        is_map = field.message_type is not None and field.message_type.GetOptions().map_entry
        if _is_secret(field):
            if is_map:
                for key in list(value):
                    value[key] = REDACTED
            elif field.is_repeated:
                value[:] = [REDACTED] * len(value)
            elif field.type == field.TYPE_STRING:
                setattr(msg, field.name, REDACTED)
            else:
                msg.ClearField(field.name)
        elif field.message_type is not None and not is_map:
            for item in value if field.is_repeated else [value]:
                _redact_in_place(item)


def redact(msg: Message) -> str:
    """The message as one line of text with every sensitive value replaced."""
    copy = type(msg)()
    copy.CopyFrom(msg)
    _redact_in_place(copy)
    return text_format.MessageToString(copy, as_one_line=True)


def _summary(request: Message) -> str:
    parts = [f"{name}={getattr(request, name)}" for name in _SUMMARY_FIELDS if getattr(request, name, "")]
    return " ".join(parts)


class LoggingInterceptor(grpc.ServerInterceptor):
    def intercept_service(self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails):
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        method = handler_call_details.method.rsplit("/", 1)[-1]
        inner = handler.unary_unary

        def logged(request: Message, context: grpc.ServicerContext) -> Any:
            start = time.monotonic()
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s request: %s", method, redact(request))
            ok = False
            try:
                response = inner(request, context)
                ok = True
                return response
            finally:
                elapsed_ms = (time.monotonic() - start) * 1000
                code = grpc.StatusCode.OK if ok else (context.code() or grpc.StatusCode.UNKNOWN)
                level = logging.DEBUG if ok and method in _QUIET else logging.INFO if ok else logging.WARNING
                raw = b"" if ok else context.details() or b""
                details = "" if ok else f": {raw.decode(errors='replace') if isinstance(raw, bytes) else raw}"
                log.log(level, "%s %s -> %s in %.0f ms%s", method, _summary(request), code.name, elapsed_ms, details)

        return grpc.unary_unary_rpc_method_handler(
            logged,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
