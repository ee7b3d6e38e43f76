"""The Sonic diffusion video decoder (decoder `sonic`): the official checkpoints, loaded from a
local folder (layout.py), on diffusers and transformers; CUDA in fp16, or the CPU in fp32.

- layout.py: the folder's files; weights.py: safe loading, named setup errors;
- audio.py: whisper features, audio-to-token and audio-to-bucket projections;
- unet.py: SVD's UNet with face-masked audio cross-attention;
- model.py: loading and sampling; rife.py: RIFE frame interpolation (12.5 -> 25 a second);
- kind.py: the decoder kind; tiny.py: a tiny random model.
Importing this package imports no torch; its modules do.
"""
