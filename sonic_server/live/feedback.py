"""What the client's reports on the face's video (RTCP) make the service do, apart from aiortc:
the rate the face is encoded at, when a keyframe is sent, which lost packets are sent again.

aiortc 1.16 follows only the client's bandwidth estimate (REMB, delay-based: it ignores loss),
turns every picture-loss report into a keyframe, and resends every packet each report names.
Tried with 1-8 % of the packets lost on the way to the client (and reordered by 30-80 ms of
jitter): the rate rose to its ceiling at 8 % loss; 26 picture-loss reports in 6 s made 23
keyframes, up to 4 in a row, each coarser than the one before (a constant rate's buffer drained
by the last); reordering made the client report packets that were only late, and 72 % of the
video was sent twice; a packet reported after it had left aiortc's history (128 packets, about
a second) was never sent, and nothing else was (the client froze until its own report of a lost
picture, 4.5 s later for aiortc's receiver).

Each sender of the face owns one `LinkFeedback` (in its encoder, sonic_server/live/rtc.py). Its
methods are called on the event loop (reports) and in aiortc's encoding thread (`wanted`,
`keyframe_now`, `keyframe_made`): each field is written by one side only, or is a flag whose
late read costs a frame.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import asdict, dataclass

# libvpx cannot change its rate in place: the encoder is made again (its next frame a keyframe),
# so it follows a rise of the client's estimate once that is this far (a share of the rate) above
# its own, and a drop of VP8_RATE_DROP (aiortc's own step) at once
VP8_RATE_STEP = 0.3
VP8_RATE_DROP = 0.1
# the loss a client reports (its share of the packets since its last report, before any was
# sent again), as a sender's congestion control reads it (GCC, draft-ietf-rmcat-gcc 6): from
# LOSS_HOLD the rate does not rise; above LOSS_CUT what it may be falls by half the loss, at
# most once per round trip and LOSS_CUT_GAP_S (a browser may report with every feedback
# packet); under LOSS_HOLD it is let up by LOSS_RECOVERY a report, not at once (the estimate,
# blind to loss, is often the ceiling: straight back there, the loss came back with it)
LOSS_HOLD = 0.02
LOSS_CUT = 0.10
LOSS_CUT_GAP_S = 0.3
LOSS_RECOVERY = 0.08
# picture-loss reports within the round trip (at least this long) of a keyframe are answered by
# one keyframe after it: a client asks again for each frame it cannot decode while the answer is
# on its way (a first keyframe that a late client missed is answered at most this much later)
KEYFRAME_GAP_MIN_S = 0.1
# a packet named again within the round trip (at least this long) is on its way already
RESEND_GAP_MIN_S = 0.02
RESENDS_REMEMBERED = 512  # packets whose last resend is remembered (aiortc keeps 128)


def next_rate(rate: int, estimate: int) -> int:
    """The face's VP8 rate after a client's estimate (already within aiortc's bounds): a drop
    of VP8_RATE_DROP or more at once (the link carries less: frames would queue or be lost), a
    rise only of VP8_RATE_STEP or more (each move makes a new encoder: a coarse keyframe)."""
    if estimate <= rate * (1 - VP8_RATE_DROP) or estimate >= rate * (1 + VP8_RATE_STEP):
        return estimate
    return rate


@dataclass(frozen=True)
class FeedbackCounts:
    """What the face's sender did with the client's reports, since the session began (the
    session's state shows them: a picture that stalls on a lossy link tells here whether the
    packets were sent again and keyframes were asked for)."""

    video_kbps: int | None = None  # the rate the face is encoded at now; None before its first frame
    keyframes_asked: int = 0  # the client's picture-loss reports (PLI, FIR)
    keyframes_sent: int = 0  # keyframes made: the first, those asked for, and one for each new rate
    packets_resent: int = 0
    resends_skipped: int = 0  # named again within the round trip: already on their way
    packets_past_history: int = 0  # named after they had left the sender's history (a keyframe sent)

    def as_json(self) -> dict:
        return asdict(self)


class LinkFeedback:
    """The face's rate, keyframes and resends, from the client's reports (see the module's
    docstring). `floor` and `ceiling`: aiortc's bounds of a VP8 rate, in bit/s."""

    def __init__(self, start: int, floor: int, ceiling: int) -> None:
        self.floor, self.ceiling = floor, ceiling
        self.running = start  # the current encoder's rate (set by the encoding thread)
        self._estimate = start  # the client's last estimate (REMB)
        self._loss_cap: int | None = None  # the rate the reported loss allows; None: any
        self._last_cut = float("-inf")
        self.rtt_s: float | None = None  # the round trip, as of the client's last report
        self._keyframe_due = False
        self._last_keyframe = float("-inf")
        self._resent: OrderedDict[int, float] = OrderedDict()  # sequence number -> when
        self._asked = self._sent = self._resends = self._skipped = self._past = 0

    # --- the rate ----------------------------------------------------------------------------
    def estimated(self, bitrate: int) -> None:
        """The client's bandwidth estimate (REMB)."""
        self._estimate = max(self.floor, min(int(bitrate), self.ceiling))

    def lost(self, fraction: float, rtt_s: float | None, now: float | None = None) -> None:
        """A receiver report: the share of the face's packets lost since the previous one, and
        the round trip as the sender now estimates it."""
        now = time.monotonic() if now is None else now
        self.rtt_s = rtt_s
        cap = self._loss_cap
        held = self.running if cap is None else min(cap, self.running)  # where the loss keeps it
        if fraction > LOSS_CUT:
            if now - self._last_cut >= (rtt_s or 0.0) + LOSS_CUT_GAP_S:
                self._loss_cap, self._last_cut = max(self.floor, int(held * (1 - 0.5 * fraction))), now
        elif fraction >= LOSS_HOLD:
            self._loss_cap = held
        elif cap is not None:
            lifted = int(cap * (1 + LOSS_RECOVERY))
            self._loss_cap = None if lifted >= self.ceiling else lifted

    def wanted(self) -> int:
        """The rate the next frame is encoded at (the encoding thread asks, once a frame: the
        rate it decides from is the encoder's own, which only that thread changes)."""
        cap = self._loss_cap
        return next_rate(self.running, self._estimate if cap is None else min(self._estimate, cap))

    # --- keyframes -----------------------------------------------------------------------------
    def keyframe_asked(self) -> None:
        """A picture-loss report (PLI or FIR)."""
        self._asked += 1
        self._keyframe_due = True

    def keyframe_now(self, now: float | None = None) -> bool:
        """Whether the frame being encoded is to be a keyframe the client asked for: once per
        round trip at most, however many reports came (the encoding thread asks)."""
        now = time.monotonic() if now is None else now
        if not self._keyframe_due or now - self._last_keyframe < max(self.rtt_s or 0.0, KEYFRAME_GAP_MIN_S):
            return False
        self._keyframe_due = False
        return True

    def keyframe_made(self, now: float | None = None) -> None:
        """The encoder made a keyframe (asked for, or its first with a new rate): it answers
        every request before it."""
        self._sent += 1
        self._keyframe_due = False
        self._last_keyframe = time.monotonic() if now is None else now

    # --- resends -------------------------------------------------------------------------------
    def resend(self, sequence_number: int, in_history: bool, rtt_s: float | None, now: float | None = None) -> bool:
        """Whether a packet the client reported lost is sent again: not when it was sent again
        within the round trip; never when it has left the history (a keyframe is asked for
        instead: the client could not decode past it)."""
        now = time.monotonic() if now is None else now
        if not in_history:
            self._past += 1
            self._keyframe_due = True
            return False
        last = self._resent.get(sequence_number)
        if last is not None and now - last < max(rtt_s or 0.0, RESEND_GAP_MIN_S):
            self._skipped += 1
            return False
        self._resent[sequence_number] = now
        self._resent.move_to_end(sequence_number)
        while len(self._resent) > RESENDS_REMEMBERED:
            self._resent.popitem(last=False)
        self._resends += 1
        return True

    def counts(self) -> FeedbackCounts:
        return FeedbackCounts(
            video_kbps=round(self.running / 1000),
            keyframes_asked=self._asked,
            keyframes_sent=self._sent,
            packets_resent=self._resends,
            resends_skipped=self._skipped,
            packets_past_history=self._past,
        )
