"""What counts as a voice in 16-bit audio, for the service and its remote sessions alike."""

VOICED = 300  # audio louder than this (16-bit peak) carries speech
