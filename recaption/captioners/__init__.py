"""Captioner backends behind one interface (base.py), found by name (registry.py).

analyzer.py  offline pixel analysis (the default)   openai.py  chat completions, online
batch.py     the Batch API (openai-batch), batch_state.py its saved ids   local.py  transformers
endpoints.py clients, credentials, the endpoint pool   prompt.py  the prompt contract
"""

from recaption.captioners.base import (
    Answer,
    Captioner,
    CaptionFailure,
    CaptionResult,
    ShardJob,
    ShardPending,
)
from recaption.captioners.registry import (
    BACKENDS,
    backend_class,
    backend_of,
    captioner_identity,
    make_captioner,
)
from recaption.errors import CaptionerFatal

__all__ = [
    "BACKENDS",
    "Answer",
    "CaptionFailure",
    "CaptionResult",
    "Captioner",
    "CaptionerFatal",
    "ShardJob",
    "ShardPending",
    "backend_class",
    "backend_of",
    "captioner_identity",
    "make_captioner",
]
