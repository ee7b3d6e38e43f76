"""Which of a live client's ICE candidates the server sends its connectivity checks to."""

import numpy as np
import pytest

from sonic_server.live.peers import MAX_CANDIDATES, Client, PeerPolicy, screen_offer
from sonic.settings import SettingsError
from sonic_server.settings import settings_from


def candidate(address: str, port: int = 50000, kind: str = "host", transport: str = "udp") -> str:
    return f"a=candidate:1 1 {transport} 2130706431 {address} {port} typ {kind}"


def seen(address: str, socket_peer: str | None = None, undeclared_proxy: bool = False) -> Client:
    return Client.seen(address, socket_peer or address, undeclared_proxy)


def offer(*sections: list[str]) -> str:
    lines = ["v=0", "o=- 1 1 IN IP4 0.0.0.0", "s=-", "t=0 0"]
    for i, candidates in enumerate(sections):
        lines += [f"m={'video' if i == 0 else 'audio'} 9 UDP/TLS/RTP/SAVPF 96", "c=IN IP4 0.0.0.0", *candidates]
    return "\r\n".join(lines) + "\r\n"


def kept(sdp: str) -> list[str]:
    """The candidates' addresses as aiortc reads them from the SDP (what its ICE agent is given)."""
    from aiortc.sdp import SessionDescription

    return [c.ip for media in SessionDescription.parse(sdp).media for c in media.ice_candidates]


PUBLIC = "8.8.8.8"  # only a string here: nothing is sent (documentation ranges are not public to ipaddress)


@pytest.mark.parametrize(
    "address",
    ["10.0.0.5", "192.168.1.7", "172.16.0.1", "169.254.169.254", "127.0.0.1", "100.64.0.1", "::1", "fe80::1",
     "fd00::5", "::ffff:10.0.0.5", "64:ff9b::a00:5", "224.0.0.251", "0.0.0.0", "metadata.google.internal"],
)
def test_a_public_client_cannot_point_the_server_inside(address):
    screened = screen_offer(offer([candidate(address), candidate(PUBLIC, kind="srflx")]), seen(PUBLIC), PeerPolicy())
    assert kept(screened.sdp) == [PUBLIC]
    assert screened.left_out == (address,) and address in screened.warning()


def test_the_clients_own_address_public_ones_and_a_configured_network_are_kept():
    sdp = offer([candidate("192.168.1.5"), candidate("10.1.2.3"), candidate("1.1.1.1", kind="srflx"),
                 candidate("2001:4860::8888", kind="relay")])
    screened = screen_offer(sdp, seen("192.168.1.5"), PeerPolicy.from_settings(["10.0.0.0/8"], [], [], True))
    assert kept(screened.sdp) == ["192.168.1.5", "10.1.2.3", "1.1.1.1", "2001:4860::8888"]
    assert screened.left_out == () and screened.sdp == sdp  # nothing else of the offer changes


def test_a_private_turn_servers_relay_candidates_are_kept_and_nothing_else_there():
    sdp = offer([candidate("10.9.8.7", kind="relay"), candidate("10.9.8.6", kind="relay"), candidate("10.9.8.7", 53),
                 candidate("fd00::1", kind="relay")])
    policy = PeerPolicy.from_settings([], ["turn:user:secret@10.9.8.7:3478?transport=udp", "stun:[fd00::1]:3478"], [],
                                      True)
    assert kept(screen_offer(sdp, seen(PUBLIC), policy).sdp) == ["10.9.8.7"]


def test_mdns_names_and_zones_are_never_sent_to():
    """aioice would resolve a name on the server's own link and send to whatever answered; a
    zone picks the server's interface (the client at fe80::1 on eth0 naming eth1)."""
    sdp = offer([candidate("3f1c7a2e-5d5b-4a57-9f0e-8b5b1f0d2c11.local"), candidate("fe80::1234%eth1")])
    for client in (seen("192.168.1.5"), seen("fe80::1234%eth0"), seen("127.0.0.1")):
        assert kept(screen_offer(sdp, client, PeerPolicy()).sdp) == []


def test_a_client_on_this_machine_may_name_loopback_and_only_it():
    """Only where sessions run here and live.host_addresses serves loopback clients."""
    local = PeerPolicy.from_settings([], [], ["127.0.0.1"], here=True)
    sdp = offer([candidate("127.0.0.1"), candidate("::1"), candidate("10.0.0.5")])
    assert kept(screen_offer(sdp, seen("127.0.0.1"), local).sdp) == ["127.0.0.1", "::1"]
    assert kept(screen_offer(sdp, seen("::ffff:127.0.0.1"), local).sdp) == ["127.0.0.1", "::1"]  # dual stack
    # seen at loopback through a proxy the settings do not declare: anyone at all
    assert kept(screen_offer(sdp, seen("127.0.0.1", undeclared_proxy=True), local).sdp) == []
    # X-Forwarded-For: 127.0.0.1 sent straight to a server that trusts one proxy hop
    assert kept(screen_offer(sdp, seen("127.0.0.1", socket_peer="198.51.100.7"), local).sdp) == []
    # a server that does not serve this machine's clients (a proxy on it makes every client
    # look local), and sessions on workers (another machine)
    for policy in (PeerPolicy.from_settings([], [], [], True), PeerPolicy.from_settings([], [], ["127.0.0.1"], False)):
        assert kept(screen_offer(sdp, seen("127.0.0.1"), policy).sdp) == []


def test_an_offer_costs_one_lookup_of_the_turn_servers_however_many_candidates(monkeypatch):
    import socket
    looked_up = []

    def getaddrinfo(host, *args, **kw):
        looked_up.append(host)
        return [(socket.AF_INET, socket.SOCK_DGRAM, 17, "", ("10.9.8.7", 0))]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    policy = PeerPolicy.from_settings([], ["turn:u:p@turn.internal:3478"], [], True)
    relays = [candidate("10.9.8.7", 40000 + i, kind="relay") for i in range(1000)]
    assert len(kept(screen_offer(offer(relays), seen(PUBLIC), policy).sdp)) == MAX_CANDIDATES
    assert looked_up == ["turn.internal"]


def test_a_dual_stack_listener_sees_the_client_at_its_ipv4_address():
    sdp = offer([candidate("192.168.1.5")])
    assert kept(screen_offer(sdp, seen("::ffff:192.168.1.5"), PeerPolicy()).sdp) == ["192.168.1.5"]


def test_end_of_candidates_goes_where_a_candidate_was_left_out():
    """With it and no candidate left, aioice fails at once, before the client's own checks can
    teach it the client's address."""
    sdp = offer([candidate("10.0.0.5"), "a=end-of-candidates"], [candidate(PUBLIC), "a=end-of-candidates"])
    lines = screen_offer(sdp, seen(PUBLIC), PeerPolicy()).sdp.split("\r\n")
    at = lines.index("m=audio 9 UDP/TLS/RTP/SAVPF 96")
    video, audio = lines[:at], lines[at:]
    assert "a=end-of-candidates" not in video and "a=end-of-candidates" in audio


def test_tcp_candidates_are_left_out_and_do_not_count():
    tcp = [candidate(PUBLIC, 9, transport="tcp") for _ in range(MAX_CANDIDATES)]
    assert kept(screen_offer(offer([*tcp, candidate(PUBLIC, kind="relay")]), seen(PUBLIC), PeerPolicy()).sdp) == [PUBLIC]


def test_a_browsers_offer_is_not_warned_of_what_could_never_be_used():
    """Chrome adds a TCP candidate (port 9, active) beside each UDP one: the TCP ones go without a
    warning and the section keeps its end-of-candidates; an address that also has a kept UDP
    candidate is not "left out"."""
    udp_and_tcp = [candidate(PUBLIC), candidate(PUBLIC, 9, transport="tcp"), "a=end-of-candidates"]
    screened = screen_offer(offer(udp_and_tcp), seen(PUBLIC), PeerPolicy())
    assert screened.left_out == () and "a=end-of-candidates" in screened.sdp and kept(screened.sdp) == [PUBLIC]


def test_at_most_so_many_candidates_per_media_section():
    many = [candidate(PUBLIC, 40000 + i) for i in range(3 * MAX_CANDIDATES)]
    screened = screen_offer(offer(many, many[:3]), seen(PUBLIC), PeerPolicy())
    assert len(kept(screened.sdp)) == MAX_CANDIDATES + 3
    assert "at most" in screened.warning()


@pytest.mark.parametrize("newline", ["\n", "\r", "\x0b", "\u2028"])
def test_lines_are_read_as_aiortc_reads_them(newline):
    """aiortc splits an offer at any line break: so does the screen (else one long line hides them)."""
    sdp = offer([candidate("10.0.0.5"), candidate(PUBLIC)]).replace("\r\n", newline)
    assert kept(screen_offer(sdp, seen(PUBLIC), PeerPolicy()).sdp) == [PUBLIC]


def test_a_line_that_is_no_candidate_is_left_out():
    screened = screen_offer(offer(["a=candidate:1 1 udp", candidate(PUBLIC)]), seen(PUBLIC), PeerPolicy())
    assert kept(screened.sdp) == [PUBLIC] and len(screened.left_out) == 1


def test_peer_networks_must_be_networks():
    assert settings_from({"live": {"peer_networks": ["10.0.0.0/8", "fd00::/8"]}}).live.peer_networks
    with pytest.raises(SettingsError, match="not-a-network"):
        settings_from({"live": {"peer_networks": ["10.0.0.0/8", "not-a-network"]}})


def test_one_caller_cannot_take_every_live_slot():
    """live.max_sessions_per_caller: a key (or account) at its most is refused 429 by name while
    others still get slots; anonymous callers (no keys) cannot be told apart and are not counted."""
    from sonic_server.live.sessions import CallerLimit, LiveSessions
    from sonic_server.settings import LiveSettings

    live = LiveSessions(LiveSettings(max_sessions=4, max_sessions_per_caller=1, processes=False, warm_start=False))
    live.take_slot("key:a")
    with pytest.raises(CallerLimit, match="max_sessions_per_caller") as refused:
        live.take_slot("key:a")
    assert refused.value.code == "rate_limited"
    live.take_slot("key:b")
    live.take_slot(None)
    live.take_slot(None)
    live.give_slot("key:a")
    live.give_slot(None)
    live.take_slot("key:a")  # its slot came back


def test_the_microphones_buffer_steps_over_a_lost_packet_and_stays_one_packet_behind():
    """The microphone's packets are released as the next arrives (20 ms behind); a lost packet
    is stepped over as soon as a later one has come. aiortc's buffer waited for 16 to queue
    behind it and stayed that deep: every loss left the mouth 300 ms further behind the voice."""
    from aiortc.rtp import RtpPacket

    from sonic_server.live.rtc import microphone_buffer

    buffer = microphone_buffer()
    behind = []
    for seq in range(60):
        if seq in (10, 30, 31):  # one packet lost, then two in a row
            continue
        packet = RtpPacket(payload_type=111, sequence_number=seq, timestamp=seq * 960, payload=b"x")
        packet._data = packet.payload  # as the receiver hands it over, depayloaded
        _, frame = buffer.add(packet)
        if frame is not None:
            behind.append(seq - frame.timestamp // 960)
    assert len(behind) == 56 and set(behind) == {1, 2, 3}, behind  # 2, 3: the packets before the gaps
    assert behind[-20:] == [1] * 20, behind


def test_the_clients_receiver_report_reads_as_the_state_shows_it():
    """aiortc hands the report's fraction lost over as sent, in 256ths: 64 is a quarter lost."""
    import datetime

    from aiortc.stats import RTCRemoteInboundRtpStreamStats

    from sonic_server.live.sessions import network_report

    stat = RTCRemoteInboundRtpStreamStats(
        timestamp=datetime.datetime.now(), type="remote-inbound-rtp", id="r", ssrc=1, kind="video",
        transportId="t", packetsReceived=300, packetsLost=100, jitter=0, roundTripTime=0.0423, fractionLost=64,
    )
    report = network_report(stat).as_json()
    assert report == {"round_trip_ms": 42.3, "packets_lost": 100, "fraction_lost": 0.25, "video_kbps": None,
                      "keyframes_asked": 0, "keyframes_sent": 0, "packets_resent": 0, "resends_skipped": 0,
                      "packets_past_history": 0}
    # before the first round trip is known
    assert network_report(RTCRemoteInboundRtpStreamStats(
        timestamp=datetime.datetime.now(), type="remote-inbound-rtp", id="r", ssrc=1, kind="video",
        transportId="t", packetsReceived=0, packetsLost=0, jitter=0, roundTripTime=None, fractionLost=0,
    )).round_trip_ms is None


def test_the_voice_waits_for_the_encoder_as_long_as_the_face():
    """The event loop stalls for 0.4 s (a busy machine): both tracks keep all of it, the face's
    10 frames and the voice's 20 packets, and hand them on in order. Counted alike in frames (12),
    the voice's 20 ms packets were cut after 0.24 s: a gap in the speech, heard, and a recording
    that joins the packets out of sync from there on."""
    import asyncio

    import numpy as np

    from sonic_server.live.rtc import AUDIO_RATE, face_tracks

    async def stalled() -> tuple[list, list]:
        face, voice = face_tracks(asyncio.get_running_loop(), 25)
        for index in range(10):  # what the clock hands on in 0.4 s, while nothing is taken
            face.send(np.zeros((96, 64), np.uint8), index, 25)
            voice.send(np.zeros(AUDIO_RATE // 25, np.float32), index * AUDIO_RATE // 25)
        await asyncio.sleep(0.05)  # the puts land on the loop
        face.put(None)  # the ends of the tracks: a frame dropped shows as one missing, not as a wait
        voice.put(None)
        await asyncio.sleep(0.05)
        return await taken(face), await taken(voice)

    async def taken(track) -> list:
        from aiortc.mediastreams import MediaStreamError
        got = []
        while True:
            try:
                got.append(await track.recv())
            except MediaStreamError:
                return got

    frames, packets = asyncio.run(stalled())
    assert [f.pts for f in frames] == list(range(10))
    assert [p.pts for p in packets] == [i * AUDIO_RATE // 50 for i in range(20)]


def test_the_faces_vp8_starts_at_a_megabit_and_is_made_again_only_for_large_moves_of_the_estimate(monkeypatch):
    """aiortc's VP8 encoder started every connection at 500 kbit/s (a 512 px face's first seconds
    soft), and was made again, its next frame a coarse keyframe, each time the client's estimate
    moved by 10 %: a stream whose estimate climbed went soft every 1.5 s. The session's senders
    encode VP8 with the face's encoder: it starts at 1 Mbit/s, keeps its encoder through rises of
    the estimate under VP8_RATE_STEP, follows a larger rise and any drop of 10 %, and stays
    within aiortc's bounds."""
    import asyncio
    import fractions
    import time

    import av
    from aiortc import RTCRtpCodecParameters, rtcrtpsender
    from aiortc.codecs.vpx import MAX_BITRATE, MIN_BITRATE

    from sonic_server.live import feedback
    from sonic_server.live.feedback import VP8_RATE_STEP
    from sonic_server.live.rtc import VP8_START_BITRATE, face_tracks

    async def made() -> None:
        face_tracks(asyncio.get_running_loop(), 25)

    asyncio.run(made())
    vp8 = RTCRtpCodecParameters(mimeType="video/VP8", clockRate=90000, payloadType=96)
    encoder = rtcrtpsender.get_encoder(vp8)  # what a sender takes as it starts
    assert type(encoder).__name__ == "FaceEncoder" and encoder.target_bitrate == VP8_START_BITRATE == 1_000_000
    opus = RTCRtpCodecParameters(mimeType="audio/opus", clockRate=48000, channels=2, payloadType=111)
    assert type(rtcrtpsender.get_encoder(opus)).__name__ == "OpusEncoder"

    texture = np.random.default_rng(0).integers(0, 256, (96, 64), dtype=np.uint8)  # the same each frame

    def frame_at(index: int):
        frame = av.VideoFrame.from_ndarray(texture, format="yuv420p")
        frame.pts, frame.time_base = index * 40_000, fractions.Fraction(1, 1_000_000)
        return frame

    def encoded(index: int) -> list[bytes]:
        return encoder.encode(frame_at(index))[0]

    encoded(0)
    first = encoder.codec
    encoder.target_bitrate = int(VP8_START_BITRATE * (1 + VP8_RATE_STEP * 0.9))  # a REMB 27 % up: kept
    encoded(1)
    assert encoder.codec is first and encoder.target_bitrate == VP8_START_BITRATE
    encoder.target_bitrate = int(VP8_START_BITRATE * 1.35)  # 35 % up: followed
    assert encoder.target_bitrate == VP8_START_BITRATE  # (the running encoder's until the next frame)
    encoded(2)
    assert encoder.codec is not first and encoder.codec.bit_rate == encoder.target_bitrate == 1_350_000
    second = encoder.codec
    encoder.target_bitrate = int(1_350_000 * 0.85)  # a drop of 15 %: followed at once
    encoded(3)
    assert encoder.codec is not second and encoder.target_bitrate == int(1_350_000 * 0.85)
    encoder.target_bitrate = 10 * MAX_BITRATE
    encoded(4)
    assert encoder.target_bitrate == MAX_BITRATE
    encoder.target_bitrate = 1
    encoded(5)
    assert encoder.target_bitrate == MIN_BITRATE == encoder.codec.bit_rate
    # picture-loss reports for three frames in a row, a round trip after the last keyframe: one
    # keyframe (a still picture's other frames are a few bytes), the others' answered by one a
    # round trip later (the feedback's clock is the test's: 40 ms a frame)
    clock = [time.monotonic() + 1.0]
    monkeypatch.setattr(feedback.time, "monotonic", lambda: clock[0])

    def at_40_ms(index: int, **kwargs) -> int:
        clock[0] += 0.04
        return sum(map(len, encoder.encode(frame_at(index), **kwargs)[0]))

    sizes = [at_40_ms(i, force_keyframe=True) for i in range(6, 9)]  # 0, 40 and 80 ms
    assert sizes[0] > 4 * max(sizes[1:]), sizes  # the second and third wait
    assert at_40_ms(9) > 4 * max(sizes[1:])  # 120 ms: one keyframe for both
    assert at_40_ms(10) < 2 * max(sizes[1:])


def test_the_faces_rate_keyframes_and_resends_follow_the_clients_reports():
    """aiortc followed only the client's delay-based estimate (the rate rose to its ceiling at 8 %
    loss), made a keyframe for every picture-loss report (23 in 6 s, up to 4 in a row, each
    coarser), resent a packet as often as it was named (reordering made 72 % of the video go
    twice), and sent nothing for a packet past its history. The face's sender: no rise from 2 %
    loss, a cut by half the loss above 10 %, one keyframe per round trip, one resend per round
    trip, a keyframe for a packet that is gone."""
    from sonic_server.live.feedback import KEYFRAME_GAP_MIN_S, LinkFeedback

    link = LinkFeedback(1_000_000, 250_000, 1_500_000)
    link.lost(0.05, 0.03, now=0.0)
    link.estimated(1_400_000)  # 40 % more: followed on a clean link, held at 5 % loss
    assert link.wanted() == 1_000_000
    lifted = [(link.lost(0.0, 0.03, now=0.0), link.wanted())[1] for _ in range(4)]  # let up by 8 % a report
    assert lifted[:3] == [1_000_000] * 3 and 1_300_000 <= lifted[3] <= 1_400_000, lifted
    link.running = lifted[3]  # (the encoder made at it)
    link.lost(0.25, 0.03, now=10.0)  # 12.5 % less: at once
    assert link.wanted() == int(lifted[3] * 0.875)
    link.running = link.wanted()
    link.lost(0.25, 0.03, now=10.1)  # within the round trip and 0.3 s of the last cut: the same report
    assert link.wanted() == int(lifted[3] * 0.875)
    for i in range(30):  # a link that goes on losing a quarter
        link.lost(0.25, 0.03, now=11.0 + i)
        link.running = link.wanted()
    low = link.wanted()
    assert 250_000 <= low < 250_000 / 0.9  # at aiortc's floor (within a step of it), no further
    link.estimated(5_000_000)
    assert link.wanted() == low  # an estimate cannot lift what the loss holds down
    for _ in range(40):
        link.lost(0.01, 0.03, now=50.0)
        link.running = link.wanted()
    # the loss gone, back up to within a step (30 %) of the estimate (held at aiortc's ceiling)
    assert 1_500_000 / 1.3 < link.wanted() <= 1_500_000

    t = 100.0
    link.keyframe_made(t)  # the first frame
    for dt in (0.0, 0.04, 0.08):  # a client asking for each frame it cannot decode
        link.keyframe_asked()
        assert not link.keyframe_now(t + dt)
    assert link.keyframe_now(t + KEYFRAME_GAP_MIN_S + 0.01) and not link.keyframe_now(t + 0.2)  # one, after the gap
    link.keyframe_made(t + KEYFRAME_GAP_MIN_S + 0.01)
    link.keyframe_asked()
    link.keyframe_made(t + 0.5)  # a new rate's keyframe answers it
    assert not link.keyframe_now(t + 1.0)

    assert link.resend(7, True, 0.05, now=t) and not link.resend(7, True, 0.05, now=t + 0.03)
    assert link.resend(7, True, 0.05, now=t + 0.06)  # named again after the round trip: lost again
    assert not link.resend(9, False, 0.05, now=t) and link.keyframe_now(t + 1.0)  # gone: a keyframe
    counts = link.counts()
    assert (counts.keyframes_asked, counts.keyframes_sent, counts.packets_resent, counts.resends_skipped,
            counts.packets_past_history) == (4, 3, 2, 1, 1)


def test_speak_requests_take_their_turns_first_come_first_served():
    """Requests waiting for a session's turn get it in the order they came (a lock's waiters wake
    in no set order), the refused one leaves the line, and a turn let go early (an interrupt)
    lets the next one go before the holder is done."""
    import threading
    import time

    from sonic_server.live.sessions import SpeakerBusy, SpeakTurns

    turns, order, holding = SpeakTurns(), [], threading.Event()

    def speak(name: str, hold_s: float = 0.0) -> None:
        with turns.turn("s1") as turn:
            order.append(name)
            if name == "first":
                holding.set()
                time.sleep(hold_s)
                turn.release()  # an interrupt: the next goes now
                time.sleep(hold_s)
                order.append("first done")

    first = threading.Thread(target=speak, args=("first", 0.6))
    first.start()
    holding.wait(5)
    waiting = []
    for name in ("second", "third", "fourth"):
        waiting.append(threading.Thread(target=speak, args=(name,)))
        waiting[-1].start()
        time.sleep(0.1)  # in this order
    for t in (first, *waiting):
        t.join(10)
    assert order == ["first", "second", "third", "fourth", "first done"], order
    with turns.turn("s2"):
        with pytest.raises(SpeakerBusy, match="still arriving after 0.2 s"):
            with turns.turn("s2", wait_s=0.2):
                pass
    with turns.turn("s2", wait_s=0.2):  # the refused one left the line
        pass
