"""Which of a live client's ICE candidates the server sends its connectivity checks to."""

import pytest

from sonic_server.live.peers import MAX_CANDIDATES, PeerPolicy, screen_offer
from sonic.settings import SettingsError
from sonic_server.settings import settings_from


def candidate(address: str, port: int = 50000, kind: str = "host") -> str:
    return f"a=candidate:1 1 udp 2130706431 {address} {port} typ {kind}"


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
    screened = screen_offer(offer([candidate(address), candidate(PUBLIC, kind="srflx")]), PUBLIC, PeerPolicy())
    assert kept(screened.sdp) == [PUBLIC]
    assert screened.left_out == (address,) and address in screened.warning()


def test_the_clients_own_address_public_ones_and_a_configured_network_are_kept():
    sdp = offer([candidate("192.168.1.5"), candidate("10.1.2.3"), candidate("1.1.1.1", kind="srflx"),
                 candidate("2001:4860::8888", kind="relay")])
    screened = screen_offer(sdp, "192.168.1.5", PeerPolicy.from_settings(["10.0.0.0/8"], []))
    assert kept(screened.sdp) == ["192.168.1.5", "10.1.2.3", "1.1.1.1", "2001:4860::8888"]
    assert screened.left_out == () and screened.sdp == sdp  # nothing else of the offer changes


def test_a_private_turn_servers_relay_address_is_kept():
    sdp = offer([candidate("10.9.8.7", kind="relay"), candidate("10.9.8.6", kind="relay")])
    policy = PeerPolicy.from_settings([], ["turn:user:secret@10.9.8.7:3478?transport=udp", "stun:[fd00::1]:3478"])
    assert kept(screen_offer(sdp, PUBLIC, policy).sdp) == ["10.9.8.7"]


def test_mdns_names_resolve_only_for_clients_on_a_private_network():
    sdp = offer([candidate("3f1c7a2e-5d5b-4a57-9f0e-8b5b1f0d2c11.local")])
    assert kept(screen_offer(sdp, "192.168.1.5", PeerPolicy()).sdp) != []
    assert kept(screen_offer(sdp, PUBLIC, PeerPolicy()).sdp) == []


def test_a_client_on_this_machine_may_name_loopback():
    sdp = offer([candidate("127.0.0.1"), candidate("::1"), candidate("10.0.0.5")])
    assert kept(screen_offer(sdp, "127.0.0.1", PeerPolicy()).sdp) == ["127.0.0.1", "::1"]


def test_at_most_so_many_candidates_per_media_section():
    many = [candidate(PUBLIC, 40000 + i) for i in range(3 * MAX_CANDIDATES)]
    screened = screen_offer(offer(many, many[:3]), PUBLIC, PeerPolicy())
    assert len(kept(screened.sdp)) == MAX_CANDIDATES + 3
    assert "at most" in screened.warning()


@pytest.mark.parametrize("newline", ["\n", "\r", "\x0b", "\u2028"])
def test_lines_are_read_as_aiortc_reads_them(newline):
    """aiortc splits an offer at any line break: so does the screen (else one long line hides them)."""
    sdp = offer([candidate("10.0.0.5"), candidate(PUBLIC)]).replace("\r\n", newline)
    assert kept(screen_offer(sdp, PUBLIC, PeerPolicy()).sdp) == [PUBLIC]


def test_a_line_that_is_no_candidate_is_left_out():
    screened = screen_offer(offer(["a=candidate:1 1 udp", candidate(PUBLIC)]), PUBLIC, PeerPolicy())
    assert kept(screened.sdp) == [PUBLIC] and len(screened.left_out) == 1


def test_peer_networks_must_be_networks():
    assert settings_from({"live": {"peer_networks": ["10.0.0.0/8", "fd00::/8"]}}).live.peer_networks
    with pytest.raises(SettingsError, match="not-a-network"):
        settings_from({"live": {"peer_networks": ["10.0.0.0/8", "not-a-network"]}})
