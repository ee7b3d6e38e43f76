"""ComfyUI custom node for a sonic service: copy this folder into ComfyUI's `custom_nodes/`
(e.g. as `custom_nodes/sonic/`) and restart ComfyUI. The node "Sonic talking head" (category
"sonic") sends an IMAGE and an AUDIO to a running sonic server, follows the job, and returns
the MP4's path, its frames as an IMAGE batch, and the audio cut to the video's length.

It needs only what ComfyUI has: torch, numpy, Pillow, and PyAV (or OpenCV) to read the video.
The server does the work: `python app.py` from the sonic repository (README).
"""
from .node import SonicTalkingHead

NODE_CLASS_MAPPINGS = {"SonicTalkingHead": SonicTalkingHead}
NODE_DISPLAY_NAME_MAPPINGS = {"SonicTalkingHead": "Sonic talking head"}
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
