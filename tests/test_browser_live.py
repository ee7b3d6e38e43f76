"""The demo page's Live mode in a real headless Chromium, its microphone fed from a speech file
(Chromium's fake capture), against a real server on a free port (SONIC_SCREENSHOT=path saves
the page while the session runs). Both ends stay on loopback:
the server gathers 127.0.0.1 candidates only, Chromium may use loopback and shows its own
addresses instead of mDNS names, and no STUN server is configured on either side."""

import os
import time

import numpy as np
import pytest
import requests
import soundfile as sf

from conftest import PORTRAIT, SPEECH
from sonic.media import load_audio
from test_browser import chromium, open_page, set_param, wait
from test_http_live import start_server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc, info = start_server(
        tmp_path_factory.mktemp("browser-live"), top={"live": {"host_addresses": ["127.0.0.1"], "idle_timeout_s": 5}}
    )
    yield info["base"]
    proc.terminate()
    proc.wait(20)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    wav = tmp_path_factory.mktemp("mic") / "speech.wav"
    speech = load_audio(SPEECH, 60)
    sf.write(wav, np.concatenate([speech, np.zeros(16_000, np.float32)] * 4), 16_000)
    driver = chromium(f"--use-file-for-fake-audio-capture={wav}",
                      "--allow-loopback-in-peer-connection", "--disable-features=WebRtcHideLocalIpsWithMdns")
    yield driver
    driver.quit()


def end_left_session(d, base):
    """A test that failed mid-session leaves no session to the next test (a slot held until the
    idle timeout)."""
    session = d.execute_script("return typeof live === 'object' && live.id")
    if session:
        requests.delete(f"{base}/api/sonic/live/{session}", timeout=10)


def live_sessions(base):
    return requests.get(base + "/health", timeout=5).json()["live"]["sessions"]


def test_the_page_starts_a_live_session_plays_it_and_stops_it(server, browser):
    d = browser
    open_page(d, server)
    d.find_element("id", "image").send_keys(str(PORTRAIT))
    set_param(d, "min_resolution", 256)
    d.find_element("id", "live-start").click()
    wait(d, "return document.getElementById('live-video').videoWidth > 0", 30, "the live video")
    size = d.execute_script("const v = document.getElementById('live-video'); return [v.videoWidth, v.videoHeight]")
    assert min(size) == 256
    t0 = d.execute_script("return document.getElementById('live-video').currentTime")
    time.sleep(2.0)
    t1 = d.execute_script("return document.getElementById('live-video').currentTime")
    assert t1 - t0 > 1.5  # the received track plays on
    frames = d.execute_script("return document.getElementById('live-video').getVideoPlaybackQuality().totalVideoFrames")
    assert frames > 40
    wait(d, "return /\\d+ ms/.test(document.getElementById('live-latency').textContent)", 10, "the latency read-out")
    wait(d, "return /fps/.test(document.getElementById('live-fps').textContent)", 10, "the frame rate read-out")
    wait(d, "return /ms round trip, \\d+ packets? lost.*, video \\d+ kbit\\/s/.test(document.getElementById('live-network').textContent)",
         10, "the network read-out")
    assert live_sessions(server) == 1
    # the pressed Start is hidden: the keyboard's focus is on Stop; the state is announced, the
    # figures that change every second are not
    assert d.execute_script("return document.activeElement.id") == "live-stop"
    assert d.find_element("id", "live-figures").get_attribute("aria-live") is None
    assert d.find_element("id", "live-announce").get_attribute("textContent").startswith("Live: ")
    # the fake microphone's speech reaches the face: the server says it is speaking at some point
    session = d.execute_script("return live.id")
    states = set()
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline and "speaking" not in states:
        states.add(requests.get(f"{server}/api/sonic/live/{session}", timeout=5).json()["state"])
        time.sleep(0.2)
    assert "speaking" in states
    if os.environ.get("SONIC_SCREENSHOT"):
        d.save_screenshot(os.environ["SONIC_SCREENSHOT"])
    d.find_element("id", "live-stop").click()
    d.execute_script("document.getElementById('live-start').click()")  # a double press: Start took Stop's place
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and live_sessions(server):
        time.sleep(0.1)
    assert live_sessions(server) == 0
    time.sleep(1.5)
    assert live_sessions(server) == 0 and d.execute_script("return live.id") is None  # not reopened
    # Stop sends its DELETE before closing the connection: ended by its client, not lost
    gone = requests.get(f"{server}/api/sonic/live/{session}", timeout=5)
    assert gone.status_code == 404 and gone.json()["error"]["ended_reason"] == "client_closed"
    assert d.find_element("id", "live-video").is_displayed() is False
    assert d.execute_script("return document.activeElement.id") == "live-start"

    # a session the server ends (here ended from elsewhere) is told at once, with why: the page
    # hears its transport close (its once-a-second poll is stopped here, so only that can tell)
    d.find_element("id", "live-start").click()
    wait(d, "return live.id !== null && live.pc.connectionState === 'connected'", 30, "the second session")
    d.execute_script("clearInterval(live.timer)")
    session = d.execute_script("return live.id")
    assert requests.delete(f"{server}/api/sonic/live/{session}", timeout=10).status_code == 204
    wait(d, "return /ended: it was ended from elsewhere/.test(document.getElementById('error-live').textContent)",
         5, "the page telling the session ended, and why")
    assert d.find_element("id", "live-video").is_displayed() is False


def test_a_face_the_browser_will_not_play_with_sound_plays_muted_and_says_so(server):
    """A phone plays sound only right after a tap: a session that took long to start (a slow
    upload), without a microphone (the video is not muted then), sat paused on a black box. Here
    the start is no tap at all, under the phones' autoplay rule."""
    d = chromium("--autoplay-policy=user-gesture-required", "--allow-loopback-in-peer-connection",
                 "--disable-features=WebRtcHideLocalIpsWithMdns")
    try:
        open_page(d, server)
        d.find_element("id", "image").send_keys(str(PORTRAIT))
        set_param(d, "min_resolution", 256)
        d.execute_script("navigator.mediaDevices.getUserMedia = () => Promise.reject("
                         "new DOMException('no microphone', 'NotFoundError')); startLive();")
        wait(d, "return !document.getElementById('live-muted').hidden", 30, "the muted face's note")
        video = "document.getElementById('live-video')"
        wait(d, f"return !{video}.paused && {video}.currentTime > 0.5", 10, "the face playing, muted")
        assert d.execute_script(f"return {video}.muted") is True
        assert "played the face muted" in d.find_element("id", "live-announce").get_attribute("textContent")
        d.find_element("id", "live-unmute").click()  # a tap: sound allowed
        assert d.execute_script(f"return {video}.muted") is False and not d.execute_script(f"return {video}.paused")
        assert d.find_element("id", "live-muted").is_displayed() is False
        assert d.execute_script("return document.activeElement.id") == "live-stop"  # not lost to the page's body
        d.find_element("id", "live-stop").click()
        wait(d, "return live.id === null", 10, "the session stopped")
        # and ended on the server, not left to its idle timeout (the next test counts sessions)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and live_sessions(server):
            time.sleep(0.1)
        assert live_sessions(server) == 0
    finally:
        end_left_session(d, server)
        d.quit()


def test_live_without_a_portrait_names_the_field(server, browser):
    d = browser
    open_page(d, server)
    d.find_element("id", "live-start").click()
    wait(d, "return document.getElementById('error-image').textContent.length > 0", 5, "the portrait's error")
    assert live_sessions(server) == 0


def test_the_page_names_every_reason_a_session_ends_for():
    """The page tells why a session ended, in words, for each reason the server gives."""
    import re

    from conftest import ROOT
    from sonic_server.live import END_REASONS

    script = (ROOT / "sonic_server" / "web" / "live.js").read_text()
    table = script[script.index("const ENDED_BECAUSE = {"):]
    named = set(re.findall(r"^  (\w+): \"", table[: table.index("};")], re.MULTILINE))
    assert named == set(END_REASONS)
