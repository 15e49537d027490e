"""``@sgl.function`` multi-agent programs and the client side of sglang-kvcomm.

Import name ``kvcomm_frontend`` (the folder is ``frontend/``; ``frontend`` is taken on PyPI).
"""

from kvcomm_frontend.agents import MATH_DECISION, MATH_ROLES, AgentRole, fully_connected
from kvcomm_frontend.endpoint import TimedEndpoint

__all__ = ["AgentRole", "MATH_DECISION", "MATH_ROLES", "TimedEndpoint", "fully_connected"]
