"""sonic: a portrait photo and a speech recording in, a lip-synced talking-head MP4 out."""
from .errors import (AudioTooLong, EmptyAudio, InputTooLarge, InvalidParameter, NoFaceDetected, PipelineError,
                     SonicError, UnsupportedMedia)
from .options import GenerateOptions, load_config, schema
from .pipeline import GenerationResult, SonicPipeline, load_pipeline

__all__ = ["AudioTooLong", "EmptyAudio", "GenerateOptions", "GenerationResult", "InputTooLarge",
           "InvalidParameter", "NoFaceDetected", "PipelineError", "SonicError", "SonicPipeline",
           "UnsupportedMedia", "load_config", "load_pipeline", "schema"]
