"""Live sessions over WebRTC: the transport (rtc.py: aiortc, one event loop, the tracks), the
registry that owns each session's life, limits and metering (sessions.py) and the routes
(routes.py). The frames come from the library's streaming engine (sonic/live/)."""
