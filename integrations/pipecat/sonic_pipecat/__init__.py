"""sonic for Pipecat: a talking face after the text-to-speech (see README.md)."""

from .service import SonicVideoService

__all__ = ["SonicVideoService"]
