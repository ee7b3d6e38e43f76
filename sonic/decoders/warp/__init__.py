"""The `warp` decoder: the photo warped per frame by the predicted motion, on the CPU.

- decoder.py: `WarpDecoder`, one backward warp per frame (head, expression fields, lids);
- eyes.py: the lids' slide in a blink; mouth.py: the painted mouth interior;
- kind.py: the decoder kind, registered as `warp` (sonic/decoders/__init__.py).
The output frame and the sampling of the photo (`Framing`) are every decoder's: sonic/geometry.py.
"""
