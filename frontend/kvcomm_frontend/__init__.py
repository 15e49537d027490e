"""``@sgl.function`` multi-agent programs and the client side of sglang-kvcomm.

Import name ``kvcomm_frontend`` (the folder is ``frontend/``; ``frontend`` is taken on PyPI).
"""

from kvcomm_frontend.agents import (
    CANONICAL_READER,
    MATH_DECISION,
    MATH_ROLES,
    AgentRole,
    fully_connected,
)
from kvcomm_frontend.endpoint import Call, KVCommEndpoint
from kvcomm_frontend.markup import agent, shared

__all__ = [
    "AgentRole",
    "CANONICAL_READER",
    "Call",
    "KVCommEndpoint",
    "MATH_DECISION",
    "MATH_ROLES",
    "agent",
    "fully_connected",
    "shared",
]
