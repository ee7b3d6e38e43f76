"""The demo page at / and Swagger UI at /docs in a real Chromium (Debian's chromium and
chromium-driver, driven by selenium, headless) against app.py on a free port with the real model.
Set SONIC_SCREENSHOT=path to save the finished page (docs/demo.png is made this way)."""
import os
import shutil
import tempfile
import time

import pytest
import requests

from conftest import EXAMPLES, PORTRAIT, SPEECH
from test_http_live import start_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
BROWSER_TMP = tempfile.TemporaryDirectory(prefix="sonic-chromium-")  # removed when the test process ends


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc, info = start_server(tmp_path_factory.mktemp("browser"), queue_size=4)
    yield info["base"]
    proc.terminate()
    proc.wait(20)


def chromium(*extra_args):
    """A headless Chromium driven by selenium, with a fake microphone (a beeping tone, unless
    `extra_args` give it a file) that needs no permission prompt."""
    if not (CHROMIUM and DRIVER):
        pytest.fail("chromium and chromedriver are not installed (.ci/run installs Debian's chromium and "
                    "chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,1500",
                "--autoplay-policy=no-user-gesture-required", "--mute-audio",
                "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream", *extra_args):
        opts.add_argument(arg)
    # Chromium leaves a folder in TMPDIR per run (its singleton socket): under this file's own
    driver = webdriver.Chrome(service=Service(DRIVER, env={**os.environ, "TMPDIR": BROWSER_TMP.name}), options=opts)
    driver.set_script_timeout(30)
    return driver


@pytest.fixture(scope="module")
def browser():
    driver = chromium()
    yield driver
    driver.quit()


def wait(driver, condition, timeout=60, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = driver.execute_script(condition)
        if value:
            return value
        time.sleep(0.05)
    logs = driver.get_log("browser") if hasattr(driver, "get_log") else []
    pytest.fail(f"{what} not reached in {timeout} s; browser log: {logs}")


def open_page(driver, base):
    driver.get(base + "/")
    wait(driver, "return document.querySelectorAll('[data-param]').length > 5", 20, "parameter controls")


def choose(driver, image, audio=None):
    driver.find_element("id", "image").send_keys(str(image))
    if audio:
        driver.find_element("id", "audio").send_keys(str(audio))


def set_param(driver, name, value):
    el = driver.find_element("id", "param-" + name)
    driver.execute_script("arguments[0].value = arguments[1]", el, str(value))


def test_a_person_makes_and_plays_a_video_with_progress(server, browser):
    d = browser
    open_page(d, server)
    # controls come from /api/sonic/params: ranges and defaults
    seed = d.find_element("id", "param-seed")
    assert seed.get_attribute("type") == "number"
    scale = d.find_element("id", "param-dynamic_scale")
    assert (scale.get_attribute("min"), scale.get_attribute("max")) == ("0.5", "2")
    assert d.find_element("id", "param-align_mouth").get_attribute("type") == "checkbox"
    expression = d.find_element("id", "param-expression")  # a parameter with choices: a select
    options = [o.get_attribute("value") for o in expression.find_elements("tag name", "option")]
    assert expression.tag_name == "select" and options == ["neutral", "smile", "serious"], options
    choose(d, PORTRAIT, SPEECH)
    wait(d, "return !document.getElementById('preview').hidden && document.getElementById('preview').naturalWidth > 0",
         10, "the portrait's preview")
    set_param(d, "min_resolution", 512)
    set_param(d, "seed", 11)
    set_param(d, "expression", "smile")
    assert d.execute_script("return config().expression") == "smile"
    # record what the progress bar shows while the job runs
    d.execute_script("""
        window.seen = [];
        new MutationObserver(() => window.seen.push([document.getElementById('stage').textContent,
            Number(document.getElementById('progress').getAttribute('aria-valuenow'))]))
          .observe(document.getElementById('progress-box'), {subtree: true, childList: true, attributes: true,
                                                             characterData: true});""")
    d.find_element("id", "submit").click()
    # the pressed button is disabled: the keyboard's focus moves on to Cancel, not to the page's start
    assert d.execute_script("return document.activeElement.id") == "cancel"
    wait(d, "return !document.getElementById('result').hidden", 120, "the finished video")
    # a screen reader hears the end, and the focus is on the result (Tab: the player)
    assert d.execute_script("return document.activeElement.id") == "result-title"
    assert d.find_element("id", "announce").get_attribute("textContent") == "Your video is ready"
    assert d.find_element("id", "progress-box").get_attribute("aria-live") is None  # each figure is not read out
    seen = d.execute_script("return window.seen")
    stages = [s for s, _ in seen]
    values = [v for _, v in seen]
    assert "render" in stages and stages[-1] == "done", stages
    assert any(0 < v < 100 for v in values) and values[-1] == 100, values
    # the video plays: its clock advances, and its duration is the recording's
    duration = wait(d, "const v = document.getElementById('video'); return v.readyState >= 1 && v.duration", 20,
                    "the video's metadata")
    assert abs(duration - 3.0) < 0.2, duration
    d.execute_script("document.getElementById('video').play()")
    wait(d, "return document.getElementById('video').currentTime > 0.5", 20, "the video playing")
    figures = d.find_element("id", "figures").text
    assert "3 s, 75 frames at 25 fps" in figures and "lip-sync offset" in figures and "512" in figures
    assert d.find_element("id", "download").get_attribute("href").endswith(".mp4")
    wait(d, "return document.getElementById('history').textContent.includes('video')", 10, "the server's list")
    if os.environ.get("SONIC_SCREENSHOT"):
        d.execute_script("document.getElementById('video').pause(); document.getElementById('video').currentTime = 1.2")
        time.sleep(0.5)
        d.save_screenshot(os.environ["SONIC_SCREENSHOT"])
    # the list is the server's (GET /api/sonic/jobs); its Delete deletes the job there
    job_id = d.find_element("id", "download").get_attribute("href").rsplit("/", 1)[1].split(".")[0]
    first = d.find_element("css selector", "#history li")
    assert job_id in first.find_element("tag name", "a").get_attribute("href")
    first.find_element("css selector", ".delete-job").click()
    d.switch_to.alert.dismiss()  # deleting asks first: nothing is deleted on "Cancel"
    time.sleep(0.5)
    assert requests.get(f"{server}/api/sonic/jobs/{job_id}", timeout=5).status_code == 200
    first.find_element("css selector", ".delete-job").click()
    assert "cannot be undone" in d.switch_to.alert.text
    d.switch_to.alert.accept()
    wait(d, f"return !document.getElementById('history').innerHTML.includes('{job_id}')", 10, "the job deleted")
    assert requests.get(f"{server}/api/sonic/jobs/{job_id}", timeout=5).status_code == 404
    # the focus is not dropped to the page's start: it is on the list's next item, or its heading
    assert d.execute_script("return document.activeElement.className || document.activeElement.id") in (
        "delete-job", "history-title", "submit")


def test_speech_recorded_from_the_microphone_makes_a_video(server, browser):
    d = browser
    open_page(d, server)
    choose(d, PORTRAIT)
    d.find_element("id", "record").click()
    wait(d, "return document.getElementById('record-state').textContent === 'recording...'", 10, "recording")
    time.sleep(2.0)
    d.find_element("id", "record").click()
    wait(d, "return document.getElementById('record-state').textContent === 'recorded'", 10, "the recording")
    assert d.execute_script("return !document.getElementById('audio-preview').hidden")
    set_param(d, "min_resolution", 256)
    d.find_element("id", "submit").click()
    wait(d, "return !document.getElementById('result').hidden || document.getElementById('error-audio').textContent"
            " || document.getElementById('error-form').textContent", 60, "the result")
    assert d.find_element("id", "error-audio").text == "" and d.find_element("id", "error-form").text == ""
    duration = wait(d, "const v = document.getElementById('video'); return v.readyState >= 1 && v.duration", 20,
                    "the video's metadata")
    assert 1.5 < duration < 3.5, duration                                   # about the 2 s recorded


def test_corrupt_storage_and_a_refused_event_stream_do_not_stop_the_page(server, browser):
    d = browser
    d.get(server + "/")
    d.execute_script("localStorage.setItem('sonic.apiKey', '{')")
    open_page(d, server)                                      # the parameters still load
    # the server has no stream to spare (503): the page polls the status instead
    d.execute_script("""const real = window.fetch;
        window.fetch = (url, opts) => String(url).endsWith('/events')
            ? Promise.resolve(new Response('{}', {status: 503})) : real(url, opts);""")
    choose(d, PORTRAIT, SPEECH)
    set_param(d, "min_resolution", 256)
    set_param(d, "seed", 13)
    d.find_element("id", "submit").click()
    wait(d, "return !document.getElementById('result').hidden", 60, "the finished video, by polling")
    d.execute_script("localStorage.clear()")


def test_cancel_stops_a_long_job(server, browser):
    d = browser
    open_page(d, server)
    choose(d, PORTRAIT, SPEECH)
    set_param(d, "min_resolution", 512)
    set_param(d, "duration", 120)
    set_param(d, "seed", 12)
    d.find_element("id", "submit").click()
    wait(d, "return document.getElementById('stage').textContent === 'render'", 60, "the render stage")
    d.find_element("id", "cancel").click()
    # what the person asked for is a status, not an error
    message = wait(d, "return document.getElementById('status-form').textContent", 30, "the cancel message")
    assert "canceled" in message and d.find_element("id", "error-form").text == ""
    assert d.find_element("id", "result").get_attribute("hidden") is not None
    assert not d.find_element("id", "submit").get_attribute("disabled")          # ready for the next one
    assert d.execute_script("return document.activeElement.id") == "submit"    # the focus left the hidden Cancel


def test_a_text_file_as_the_image_shows_the_servers_415_next_to_the_image(server, browser, tmp_path):
    d = browser
    open_page(d, server)
    text = tmp_path / "notes.jpg"
    text.write_text("these are not pixels\n" * 20)
    choose(d, text, SPEECH)
    d.find_element("id", "submit").click()
    message = wait(d, "return document.getElementById('error-image').textContent", 20, "the image's error")
    assert "image" in message.lower() and "decod" in message.lower(), message
    assert "invalid" in d.find_element("id", "field-image").get_attribute("class")
    assert d.find_element("id", "image").get_attribute("aria-invalid") == "true"
    assert d.find_element("id", "error-form").text == ""


def test_a_bad_parameter_is_shown_at_its_control(server, browser):
    d = browser
    open_page(d, server)
    choose(d, PORTRAIT, SPEECH)
    set_param(d, "dynamic_scale", 9)
    d.find_element("id", "submit").click()
    message = wait(d, "return document.getElementById('error-dynamic_scale').textContent", 20, "the field's error")
    assert "dynamic_scale" in message
    assert d.find_element("id", "params-box").get_attribute("open") is not None


def test_swagger_ui_renders_and_try_it_out_calls_this_server(server, browser):
    d = browser
    d.get(server + "/docs")
    wait(d, "return document.querySelectorAll('.opblock').length >= 6", 30, "the operations")
    assert "/api/sonic/generate" in d.page_source
    # the method badges' white text is readable (Swagger UI's own colours gave 2.0-3.6:1; AA is 4.5)
    ratios = d.execute_script("""
        const lum = (c) => c.match(/[\\d.]+/g).slice(0, 3).map((v) => v / 255)
          .map((v) => (v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4))
          .reduce((s, v, i) => s + v * [0.2126, 0.7152, 0.0722][i], 0);
        return [...document.querySelectorAll('.opblock-summary-method')].map((e) => {
          const s = getComputedStyle(e), a = lum(s.color), b = lum(s.backgroundColor);
          return (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05); });""")
    assert len(ratios) >= 6 and min(ratios) >= 4.5, ratios
    op = "#operations-default-params"  # Swagger UI names it by the operationId
    d.find_element("css selector", op + " .opblock-summary").click()
    wait(d, f"return document.querySelector('{op} .try-out__btn')", 10, "the Try it out button")
    d.execute_script(f"document.querySelector('{op} .try-out__btn').click()")
    wait(d, f"return document.querySelector('{op} .execute')", 10, "the Execute button")
    d.execute_script(f"document.querySelector('{op} .execute').click()")
    status = wait(d, f"const c = document.querySelector('{op} .live-responses-table tr.response .response-col_status');"
                     "return c && c.textContent.trim()", 20, "the live response")
    assert status.startswith("200"), status
    body = d.find_element("css selector", f"{op} .live-responses-table .microlight").text
    assert '"parameters"' in body and "dynamic_scale" in body


def test_the_pages_load_nothing_from_elsewhere(server, browser):
    d = browser
    for path in ("/", "/docs"):
        d.get(server + path)
        time.sleep(1)
        urls = d.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert urls and all(u.startswith(server) or u.startswith("blob:") for u in urls), urls
    assert EXAMPLES.is_dir()


def test_with_api_keys_the_key_field_unlocks_the_page_and_the_event_stream(browser, tmp_path):
    proc, info = start_server(tmp_path, api_keys=["browser-key-1"])
    try:
        d = browser
        d.get(info["base"] + "/")
        d.execute_script("localStorage.clear()")
        d.get(info["base"] + "/")
        # the 401 is said at the key field, which is marked invalid
        message = wait(d, "return document.getElementById('error-api-key').textContent", 20, "the 401 message")
        assert "key" in message.lower(), message
        key = d.find_element("id", "api-key")
        assert key.get_attribute("aria-invalid") == "true"
        key.send_keys("browser-key-1")
        d.execute_script("arguments[0].dispatchEvent(new Event('change'))", key)
        wait(d, "return document.querySelectorAll('[data-param]').length > 5", 20, "the parameters, with the key")
        assert d.execute_script("return localStorage.getItem('sonic.apiKey')") == "browser-key-1"
        choose(d, PORTRAIT, SPEECH)
        set_param(d, "min_resolution", 256)
        d.execute_script("window.stages = []; new MutationObserver(() => window.stages.push("
                         "document.getElementById('stage').textContent)).observe(document.getElementById('stage'),"
                         "{childList: true, characterData: true, subtree: true})")
        d.find_element("id", "submit").click()
        wait(d, "return !document.getElementById('result').hidden", 60, "the finished video")
        assert "render" in d.execute_script("return window.stages")
        log = (tmp_path / "server.log").read_text()                     # through the stream, with the key
        assert '/events", "status": 200' in log and "/api/sonic/jobs/" in log
        assert not [line for line in log.splitlines() if '"status": 401' in line and "/events" in line]
        d.execute_script("localStorage.clear()")
    finally:
        proc.terminate()
        proc.wait(20)


def test_a_page_whose_name_was_pointed_here_cannot_call_the_server(server):
    """DNS rebinding, in a real browser: a page of another site points its own name at this
    machine once loaded (here the browser's resolver maps rebind.test to 127.0.0.1), then calls
    the server as its own origin, where CORS does not apply. Before server.allowed_hosts its
    script read the job list and could delete jobs; the same script from localhost still can."""
    port = server.rsplit(":", 1)[1]
    driver = chromium("--host-resolver-rules=MAP rebind.test 127.0.0.1")
    call = """const done = arguments[arguments.length - 1];
        Promise.all([fetch('/api/sonic/jobs'), fetch('/api/sonic/jobs/x', {method: 'DELETE'})])
          .then(rs => Promise.all(rs.map(r => r.json().then(b => [r.status, b.error ? b.error.code : 'none']))))
          .then(done, e => done(String(e)))"""
    try:
        driver.get(f"http://rebind.test:{port}/")
        assert "server.allowed_hosts" in driver.page_source  # the page itself is not served there
        assert driver.execute_async_script(call) == [[403, "forbidden"], [403, "forbidden"]]
        driver.get(f"http://localhost:{port}/")
        assert driver.execute_async_script(call) == [[200, "none"], [404, "job_not_found"]]
    finally:
        driver.quit()
