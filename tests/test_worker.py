"""The worker under stress, on small fakes: a runaway job is stopped at its time limit, a full disk
fails one job and not the next, /health answers while jobs start and end, a cached video lives
on when it is served again, an output too large is refused before it is rendered, and a killed
process's leftovers go at start-up when records are kept in memory."""
import errno
import os
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from conftest import PORTRAIT, SPEECH
from server_helpers import FAST, FakePipeline, assert_clean_error, new_record, post, wait_done
from sonic import PipelineError
from sonic.errors import DiskFull
from sonic_server.store import MemoryStore


# -- a time limit per job ---------------------------------------------------------------------

def test_a_runaway_job_is_stopped_at_its_time_limit(make_queue):
    gate = threading.Event()                       # never opened for the first job: it reports progress forever
    pipe = FakePipeline(gate=gate)
    q = make_queue(pipe, job_timeout_s=0.3)
    t0 = time.monotonic()
    a = q.wait(q.submit(new_record(q.uploads)).id, 10)
    assert a.status == "failed" and a.error["code"] == "job_timeout", a.error
    assert "0.3 s" in a.error["message"] and "server.job_timeout_s" in a.error["message"]
    assert 0.3 <= time.monotonic() - t0 < 5
    assert not (q.uploads.root / a.id).exists() and not list((q.output_dir).glob(f"{a.id}*"))
    gate.set()                                     # the next job runs (and ends well within the limit)
    b = q.wait(q.submit(new_record(q.uploads)).id, 10)
    assert b.status == "succeeded" and q.health()["workers_alive"] == 1


def test_the_time_limit_is_a_setting(make_client):
    gate = threading.Event()
    client, _ = make_client(FakePipeline(gate=gate), job_timeout_s=0.2)
    try:
        r = post(client, {**FAST, "seed": 21})             # a synchronous request hears of the limit at once
    finally:
        gate.set()
    assert r.status_code >= 400 and r.get_json()["error"]["code"] == "job_timeout"
    assert "job_timeout_s" in r.get_json()["error"]["message"]


# -- a full disk ------------------------------------------------------------------------------

@pytest.mark.parametrize("error, code", [
    (OSError(errno.ENOSPC, "No space left on device"), "disk_full"),      # raised by a task itself
    (DiskFull("cannot write the video: No space left on device"), "disk_full"),   # the writer's
    (PipelineError("video encoder failed (exit 1): Conversion failed!"), "pipeline_error"),
])
def test_a_full_disk_fails_the_job_and_the_next_one_runs(make_queue, error, code):
    pipe = FakePipeline(error=error)
    q = make_queue(pipe)
    a = q.wait(q.submit(new_record(q.uploads)).id, 10)
    assert a.status == "failed" and a.error["code"] == code
    assert "/" not in a.error["message"]                    # no server path in what a client reads
    if code == "disk_full":
        assert "space" in a.error["message"]
    pipe.error = None                                       # space was freed
    b = q.wait(q.submit(new_record(q.uploads)).id, 10)
    assert b.status == "succeeded" and q.health()["workers_alive"] == 1


def test_an_output_folder_that_cannot_be_written_is_the_services_fault_not_the_callers(pipeline, tmp_path):
    """The library refuses an unwritable out_path as the caller's (invalid_parameter, the path
    named); the service's own output folder is its own fault, and no path of it is shown."""
    from sonic import GenerateOptions
    from sonic_server.jobs import JobRecord
    from sonic_server.tasks import run_generate

    a_file = tmp_path / "outputs"
    a_file.write_bytes(b"x")
    rec = JobRecord.new("generate", GenerateOptions(min_resolution=256, duration=0.4).to_dict(), cache_key="k")
    rec.inputs = {"image": str(PORTRAIT), "audio": str(SPEECH)}
    with pytest.raises(PipelineError) as e:
        run_generate(rec, pipeline, a_file / "inner", None, lambda stage, f: None)
    assert e.value.code == "pipeline_error" and "/" not in e.value.message and e.value.field is None


def test_the_writer_says_disk_full():
    from sonic.writer import write_error
    assert isinstance(write_error(OSError(errno.ENOSPC, "No space left on device")), DiskFull)
    other = write_error(PermissionError(errno.EACCES, "Permission denied"))
    assert type(other) is PipelineError and "Permission denied" in other.message


# -- /health under load -----------------------------------------------------------------------

def test_health_is_answered_while_jobs_start_and_end(make_client):
    client, _ = make_client(FakePipeline(delay_s=0.01), queue_size=64)
    app = client.application
    stop, answers, bad = threading.Event(), [], []

    def hammer():
        c = app.test_client()
        while not stop.is_set():
            r = c.get("/health")
            body = r.get_json()
            answers.append(r.status_code)
            if r.status_code != 200 or body["readiness"] not in ("ready", "busy") or \
                    (body["readiness"] == "busy") != (body["running_job"] is not None):
                bad.append((r.status_code, body))
            time.sleep(0.001)  # a reader that never yields starves the jobs (~200 reads a job still)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        jobs = [post(client, {**FAST, "seed": 100 + i, "async": True}).get_json()["job_id"] for i in range(20)]
        for job in jobs:
            assert wait_done(client, job)["status"] == "succeeded"
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not bad and len(answers) > 20


def test_health_is_one_snapshot(make_queue):
    gate = threading.Event()
    pipe = FakePipeline(gate=gate)
    q = make_queue(pipe)
    try:
        a = q.submit(new_record(q.uploads))
        assert pipe.started.wait(5)
        q.submit(new_record(q.uploads))
        assert q.health() == {"running_job": a.id, "workers_alive": 1, "queue_length": 1}
    finally:
        gate.set()


# -- the result cache -------------------------------------------------------------------------

def test_an_upgrade_does_not_answer_from_the_old_cache(make_client, monkeypatch):
    import sonic.version
    client, _ = make_client()
    first = post(client, {**FAST, "seed": 31}).get_json()
    assert first["success"] and not first.get("cached")
    again = post(client, {**FAST, "seed": 31}).get_json()
    assert again["cached"] is True and again["video_url"] == first["video_url"]
    monkeypatch.setattr(sonic.version, "OUTPUT_REVISION", sonic.version.OUTPUT_REVISION + 1)   # output changed
    fresh = post(client, {**FAST, "seed": 31}).get_json()
    assert fresh["success"] and not fresh.get("cached") and fresh["job_id"] != first["job_id"]


def test_the_cache_key_names_the_pipeline_version(monkeypatch):
    import sonic.version
    from sonic import GenerateOptions
    from sonic_server.jobs import cache_key
    opts = GenerateOptions()
    key = cache_key(b"i", b"a", opts)
    assert key == cache_key(b"i", b"a", opts) and key != cache_key(b"i", b"a", GenerateOptions(seed=1))
    assert cache_key(b"i", b"a", opts, version="0.0.1/r1") != key
    monkeypatch.setattr(sonic.version, "package_version", lambda: "99.0")       # a release
    assert cache_key(b"i", b"a", opts) != key
    assert "99.0" in sonic.version.pipeline_version()


@pytest.mark.parametrize("jobs_db", [None, ""])           # SQLite, memory
def test_a_cache_hit_keeps_its_video_alive(make_client, jobs_db):
    client, cfg = make_client(output_ttl_s=60, jobs_db=jobs_db)
    first = post(client, {**FAST, "seed": 41}).get_json()
    queue = client.application.extensions["sonic"].queue
    video = Path(cfg["output_dir"]) / first["video_url"].rsplit("/", 1)[1]
    old = time.time() - 50                                   # 50 s of its 60 s gone, file and record
    os.utime(video, (old, old))
    queue.store.save(queue.get(first["job_id"]), updated=old)
    assert post(client, {**FAST, "seed": 41}).get_json()["cached"] is True
    queue.expiry.sweep(now=time.time() + 30)                 # 80 s after it was made, 30 s after the hit
    assert video.is_file() and queue.get(first["job_id"]) is not None
    assert client.get(first["video_url"]).status_code == 200


# -- output size ------------------------------------------------------------------------------

def wide_portrait(path: Path, width: int) -> Path:
    """The example portrait in the middle of a very wide canvas."""
    face = Image.open(PORTRAIT).convert("RGB")
    canvas = Image.new("RGB", (width, face.height), (90, 120, 150))
    canvas.paste(face, ((width - face.width) // 2, 0))
    canvas.save(path)
    return path


def test_an_extreme_aspect_ratio_is_refused_before_rendering(make_client, tmp_path):
    pipe = FakePipeline()
    client, cfg = make_client(pipe)
    wide = wide_portrait(tmp_path / "wide.png", 12_000)        # 12000x300: 3.6 Mpx in, 40 Mpx a frame out
    r = post(client, {"crop_to_face": False, "min_resolution": 1024}, image=wide, names=("wide.png", "talk.flac"))
    assert_clean_error(r, 413, "input_too_large")
    assert "limits.max_output_pixels" in r.get_json()["error"]["message"]
    assert not pipe.calls
    r = post(client, {"crop_to_face": True, "min_resolution": 256}, image=wide, names=("wide.png", "talk.flac"))
    assert r.status_code == 200                              # cropped to the face it is an ordinary frame


def test_pixels_times_frames_are_capped(tmp_path):
    from sonic.checks import check_inputs
    from sonic import GenerateOptions, InputTooLarge
    from sonic.settings import Limits
    from conftest import SPEECH
    limits = Limits(max_output_pixels=10**7, max_output_pixel_frames=10**8)
    wide = wide_portrait(tmp_path / "wide.png", 1200)          # 1200x300 -> 1024x256 a frame at 256 px
    opts = GenerateOptions(crop_to_face=False, min_resolution=256, duration=10.0, fps=25)
    with pytest.raises(InputTooLarge) as e:                    # 262144 px x 250 frames = 65.5 M: fine
        check_inputs(wide, SPEECH, GenerateOptions(crop_to_face=False, min_resolution=256, duration=10.0, fps=60),
                     limits)
    assert "limits.max_output_pixel_frames" in e.value.message
    check_inputs(wide, SPEECH, opts, limits)


# -- leftovers of a killed process --------------------------------------------------------------

def test_leftovers_go_at_start_without_a_jobs_database(tmp_path, make_client):
    from server_helpers import settings
    cfg = settings(tmp_path, jobs_db="")
    up, out = Path(cfg["server"]["upload_dir"]), Path(cfg["output_dir"])
    job = "0123456789abcdef0123456789abcdef"
    (up / job).mkdir(parents=True)
    (up / job / "image").write_bytes(b"half an upload")
    (up / "README").write_text("not a job's folder")
    out.mkdir(parents=True)
    for name in (f".{job}.mp4.part", f".{job}.mp4.wav.part"):
        (out / name).write_bytes(b"half a video")
    (out / ("a" * 32 + ".mp4")).write_bytes(b"a finished video")
    client, _ = make_client(jobs_db="")
    assert isinstance(client.application.extensions["sonic"].queue.store, MemoryStore)
    assert not (up / job).exists() and (up / "README").is_file()
    assert sorted(p.name for p in out.iterdir()) == ["a" * 32 + ".mp4"]


def test_a_shared_folders_mark_is_made_once_read_by_every_process_and_made_again_when_deleted(tmp_path):
    from sonic_server.shared_folders import FOLDER_MARK, differing, folder_id

    made = folder_id(tmp_path)
    assert len(made) == 16 and folder_id(tmp_path) == made  # read, not made again
    assert [p.name for p in tmp_path.iterdir()] == [FOLDER_MARK]  # no temporary file left
    (tmp_path / FOLDER_MARK).unlink()  # an operator's clean-up
    again = folder_id(tmp_path)
    assert again and again != made and folder_id(tmp_path) == again
    assert differing({"output_dir": made}, {"output_dir": again}) == ["output_dir"]
    assert differing({"output_dir": made}, {"output_dir": ""}) == []  # unreadable on one side: not checked
    assert differing(None, {"output_dir": again}) == []  # a job from an older API process
