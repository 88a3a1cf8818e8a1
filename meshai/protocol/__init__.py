"""The meshai wire protocol, sans-I/O: messages, frames with limits, and the connection state machine.

Bytes in, messages out; no sockets, no asyncio, no threads.  ``transport.py`` feeds it.
"""

from meshai.protocol.connection import SESSION_MESSAGES, TRANSITIONS, Connection, Phase, State
from meshai.protocol.framing import DEFAULT_LIMITS, DTYPES, MAGIC, FrameDecoder, Limits, encode
from meshai.protocol.messages import (
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    ROLES,
    Control,
    ControlReply,
    Deploy,
    Deployed,
    Error,
    Goodbye,
    Heartbeat,
    Hello,
    Infer,
    Message,
    Result,
    Tensor,
    Undeploy,
    Upload,
    Uploaded,
)

__all__ = [
    "DEFAULT_LIMITS",
    "DTYPES",
    "MAGIC",
    "MESSAGE_TYPES",
    "PROTOCOL_VERSION",
    "ROLES",
    "SESSION_MESSAGES",
    "TRANSITIONS",
    "Connection",
    "Control",
    "ControlReply",
    "Deploy",
    "Deployed",
    "Error",
    "FrameDecoder",
    "Goodbye",
    "Heartbeat",
    "Hello",
    "Infer",
    "Limits",
    "Message",
    "Phase",
    "Result",
    "State",
    "Tensor",
    "Undeploy",
    "Upload",
    "Uploaded",
    "encode",
]
