"""The command line given what a pipeline or a tired person gives it: bad options fail with
exit 2 and one line before any slow step, outputs are never lost or overwritten, an interrupted
export leaves nothing behind, and what it writes others can read. Found by attacking the CLI."""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from xaiserve.export.repository import RepositoryError, staged_version
from xaiserve.service import atomic_file
from xaiserve.service.json_values import dumps, finite

from .conftest import ROOT, run_cli, wait_for

SMALL = ("torch:tests.synthetic:small_cnn", "--input-size", "64")
PROGRESS = re.compile(r"export: \d+/\d+")  # the export's progress bar: its slow steps began


def one_line_error(result: subprocess.CompletedProcess, *words: str, alone: bool = True) -> str:
    """Exit 2 and an error line naming `words`; `alone`: the only line (no traceback, and no
    progress bar or skip line before it either)."""
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = result.stderr.strip().splitlines()
    assert not alone or len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    for word in words:
        assert word in lines[-1], lines[-1]
    return lines[-1]


def test_an_export_is_readable_by_other_users_and_bad_targets_fail_first(tmp_path):
    """mkdtemp makes the staging folder 0700; renamed into place as it was, a server running
    as another user (the runtime image, systemd's DynamicUser) could not read the version."""
    repo = tmp_path / "models"
    done = run_cli("export", *SMALL, "--repository", str(repo), "--name", "cnn")
    assert done.returncode == 0, done.stderr[-2000:]
    assert stat.S_IMODE((repo / "cnn" / "1").stat().st_mode) == 0o755
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    cases = [
        (("--repository", str(repo), "--name", "cnn", "--version", "1"), ["exists", "--version"]),
        (("--repository", str(a_file), "--name", "cnn"), ["--repository", "is a file"]),
        (("--repository", str(repo), "--name", "cnn", "--report",
          str(tmp_path / "missing" / "report.json")), ["--report", "missing"]),
        (("--repository", str(repo), "--name", "cnn", "--scale", "0,1,1"), ["--scale", "0"]),
        (("--repository", str(repo), "--name", "cnn", "--input-size", "0"), ["--input-size"]),
        (("--repository", str(repo), "--name", "cnn", "--mean", "1,2"), ["--mean", "1 or 3"]),
    ]
    for options, words in cases:
        result = run_cli("export", *SMALL, *options)
        one_line_error(result, *words)
        assert not PROGRESS.search(result.stderr), result.stderr  # refused before the work
    # known once the model is built: was ignored
    one_line_error(run_cli("export", *SMALL, "--repository", str(repo), "--name", "cnn",
                           "--num-classes", "5"), "--num-classes 5", "3 classes", alone=False)
    assert sorted(p.name for p in (repo / "cnn").iterdir()) == ["1"]
    # a corrupt deployed model: OpenVINO's TensorFlow frontend used to print its own parse
    # errors before ours when every frontend was asked whether the file was theirs
    (tmp_path / "saved_model").mkdir()
    for name in ("deployed.onnx", "deployed.tflite", "saved_model/saved_model.pb", "deployed.pt2"):
        garbage = tmp_path / name  # the TFLite frontend's load() takes any bytes
        garbage.write_bytes(np.random.default_rng(0).bytes(2000))
        source = garbage.parent if garbage.name == "saved_model.pb" else garbage
        result = run_cli("export", str(source), "--repository", str(repo), "--name", "x")
        one_line_error(result, "not a model OpenVINO reads (IR, ONNX, TFLite, SavedModel, "
                       "torch.export)", alone=False)
        assert not [line for line in result.stderr.splitlines() if "text_format" in line
                    or "absl" in line], result.stderr
    garbage = tmp_path / "deployed.pt"  # TorchScript's suffix
    garbage.write_bytes(np.random.default_rng(0).bytes(2000))
    one_line_error(run_cli("export", str(garbage), "--repository", str(repo), "--name", "x"),
                   "not a whole TorchScript archive", alone=False)


def test_sigterm_during_an_export_leaves_nothing_and_says_so(tmp_path):
    """A pipeline's timeout sends SIGTERM; by default it ends the process where it stands and
    leaves the staging folder. The export now cleans up and exits 130 with one line."""
    repo = tmp_path / "models"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    process = subprocess.Popen(
        [sys.executable, "-m", "xaiserve.service.cli", "export", "default", "--repository",
         str(repo), "--name", "lite0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=env, cwd=ROOT)
    stderr: list[str] = []
    reader = threading.Thread(target=lambda: stderr.extend(iter(process.stderr.readline, "")))
    reader.start()
    end = time.monotonic() + 120
    while not PROGRESS.search("".join(stderr)) and time.monotonic() < end:
        time.sleep(0.05)
    assert PROGRESS.search("".join(stderr)), "".join(stderr)
    time.sleep(1.0)  # inside the export's steps
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 130, "".join(stderr)[-2000:]
    reader.join()
    last = "".join(stderr).replace("\r", "\n").strip().splitlines()[-1]
    assert last == "xaiserve export: SIGTERM; nothing was written"
    assert not (repo / "lite0").exists()


STAGED_THEN_SIGTERM = """
import os, signal, sys, time
from pathlib import Path
from xaiserve.export.repository import staged_version
from xaiserve.service.interrupts import interrupts_raised
before = signal.getsignal(signal.SIGTERM)
try:
    with interrupts_raised(), staged_version(Path(sys.argv[1]), "cnn", None) as (staging, _):
        (staging / "model.xml").write_text("half written")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)  # the handler raises before this ends
except KeyboardInterrupt as exc:
    assert signal.getsignal(signal.SIGTERM) is before
    print("interrupted:", exc)
"""


def test_sigterm_inside_the_staged_version_removes_it(tmp_path):
    """The same at the moment the staging folder holds files (in a process of its own: the
    test runner's threads are no place for a SIGTERM)."""
    done = subprocess.run([sys.executable, "-c", STAGED_THEN_SIGTERM, str(tmp_path)],
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert done.returncode == 0 and "interrupted: SIGTERM" in done.stdout, done.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []


SIGTERM_AFTER_THE_RENAME = """
import os, signal, sys, time
from pathlib import Path
from xaiserve.export import repository
from xaiserve.service.interrupts import interrupts_raised

def sync_then_signal(folder):  # the version is renamed into place; its folder not yet synced
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(10)

repository._sync_folder = sync_then_signal
try:
    with interrupts_raised(), repository.staged_version(Path(sys.argv[1]), "cnn", None) as (
            staging, _):
        (staging / "model.xml").write_text("whole")
except repository.InterruptedAfterWriting as exc:
    print("interrupted:", exc.reason, "after", exc.path)
"""


def test_sigterm_after_the_rename_says_the_version_was_written(tmp_path):
    """Once renamed into place, the version is there: the command used to say that nothing
    was written."""
    done = subprocess.run([sys.executable, "-c", SIGTERM_AFTER_THE_RENAME, str(tmp_path)],
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == f"interrupted: SIGTERM after {tmp_path / 'cnn' / '1'}"
    assert (tmp_path / "cnn" / "1" / "model.xml").read_text() == "whole"
    assert [p.name for p in (tmp_path / "cnn").iterdir()] == ["1"]


SIGTERM_INSIDE_AN_IMPORT = """
import os, signal, sys, time
sys.path.insert(0, sys.argv[1])
from xaiserve.service.interrupts import interrupts_raised
try:
    with interrupts_raised():
        import slow_module  # signals itself half-way through its import
        time.sleep(10)  # the signal is raised again once the import is over
except KeyboardInterrupt as exc:
    print("interrupted:", exc, "import complete:", sys.modules["slow_module"].COMPLETE)
"""


def test_a_signal_inside_an_import_is_raised_after_it(tmp_path):
    """Raised inside an import (torch's takes seconds), the KeyboardInterrupt reached C++ code:
    6 of 40 SIGTERMs early in an export ended in SIGABRT or in a process reported killed by
    SIGINT, whatever exit code it chose."""
    (tmp_path / "slow_module.py").write_text(
        "import os, signal, time\nos.kill(os.getpid(), signal.SIGTERM)\n"
        "time.sleep(0.3)\nCOMPLETE = True\n")
    done = subprocess.run([sys.executable, "-c", SIGTERM_INSIDE_AN_IMPORT, str(tmp_path)],
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "interrupted: SIGTERM import complete: True", done.stdout


A_FORKED_CHILD_STUCK_IN_C = """
import ctypes, multiprocessing, time
from xaiserve.service.interrupts import interrupts_raised

def stuck_in_c():
    libc = ctypes.CDLL(None)
    mutex = ctypes.create_string_buffer(64)  # zeroed: an unlocked normal pthread mutex
    libc.pthread_mutex_lock(mutex)
    libc.pthread_mutex_lock(mutex)  # locked again: waits for ever, in C, as a lock inherited

with interrupts_raised():
    child = multiprocessing.get_context("fork").Process(target=stuck_in_c, daemon=True)
    child.start()
    time.sleep(1.0)
    child.terminate()
    child.join(10)
    print("exit code:", child.exitcode)
    if child.exitcode is None:
        child.kill()
        child.join()
"""


def test_a_child_forked_during_an_export_dies_on_sigterm():
    """OpenVINO's telemetry sends from a forked child; one stuck in a C lock it inherited never
    ran our SIGTERM handler, so the export's exit (which terminates and joins its children)
    hung: an export in CI waited 15 minutes. Forked children get the default handler."""
    done = subprocess.run([sys.executable, "-c", A_FORKED_CHILD_STUCK_IN_C],
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == f"exit code: {-signal.SIGTERM}", done.stdout


def test_outputs_devices_ports_and_counts_are_checked_before_the_work(default_export, tmp_path):
    model = str(default_export.path)
    image = cv2.imencode(".jpg", np.full((32, 32, 3), 128, np.uint8))[1].tobytes()
    first, second = tmp_path / "a" / "img.jpg", tmp_path / "b" / "img.jpg"
    for path in (first, second):
        path.parent.mkdir()
        path.write_bytes(image)
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    out = tmp_path / "out"
    corrupt = tmp_path / "corrupt" / "1"  # a version whose model.xml is not an IR
    corrupt.mkdir(parents=True)
    (corrupt / "model.xml").write_text("node { name: 'not an IR'\n")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("server:\n  port: [1, 2\n")
    cases = [
        (("explain", str(first), str(second), "--model-path", model, "--out", str(out)),
         ["img.json", "rename one"]),
        (("explain", str(first), "--model-path", model, "--out", str(a_file)), ["--out"]),
        (("explain", str(first), "--model-path", model, "--device", "BOGUS", "--out", str(out)),
         ["--device BOGUS"]),
        (("explain", str(first), "--server", "127.0.0.1:99999", "--model", "m"),
         ["99999", "1..65535"]),
        (("explain", str(first), "--server", "127.0.0.1:9", "--model", "m", "--tls-ca",
          str(a_file)), ["--tls-ca", "no PEM certificate"]),  # was gRPC's lines, UNAVAILABLE
        (("explain", str(first), "--model-path", str(corrupt), "--out", str(out)),
         ["model.xml", "cannot read the IR"]),  # no runtime's parse errors before it
        (("explain", str(first), "--model-path", model, "--method", "black-box"),
         ["--method black-box", "--server"]),  # was silently white-box
        (("explain", str(first), "--model-path", model, "--label", "5000", "--out", str(out)),
         ["--label 5000", "[0, 1000)"]),
        (("bench", "--model-path", model, "--out", str(a_file), "--no-reference"), ["--out"]),
        (("bench", "--model-path", model, "--device", "BOGUS", "--no-reference", "--out",
          str(out)), ["nothing was measured", "BOGUS"], False),  # after its skip line
        (("serve", "--repository", str(tmp_path / "missing")), ["--repository", "no such"]),
        (("serve", "--repository", str(tmp_path), "--port", "99999"), ["--port 99999", "65535"]),
        (("serve", "--repository", str(tmp_path), "--poll-seconds", "0"), ["--poll-seconds"]),
        (("serve", "--repository", str(tmp_path), "--config", str(bad_yaml)),
         ["--config", "not valid YAML at line 3"]),
    ]
    for args, words, *rest in cases:
        one_line_error(run_cli(*args), *words, alone=rest[0] if rest else True)
    overlay_named = out / "photo_overlay.png"  # an input that another input's overlay would be
    out.mkdir(exist_ok=True)
    overlay_named.write_bytes(image)
    one_line_error(run_cli("explain", str(overlay_named), str(out / "photo.jpg"), "--model-path",
                           model, "--out", str(out)), "photo_overlay.png", "written over it")
    assert overlay_named.read_bytes() == image
    assert a_file.read_text() == "keep me"
    assert not (out / "img.json").exists()
    for option, value in (("--masks", "-5"), ("--seed", "-1"), ("--top-k", "0"),
                          ("--steps", "-1")):
        result = run_cli("explain", str(first), "--server", "127.0.0.1:9", "--model", "m",
                         option, value)
        assert result.returncode == 2 and f"argument {option}" in result.stderr, result.stderr


def test_json_never_carries_nan():
    value = {"mean": float("nan"), "curve": [1.0, float("inf"), np.float64("nan")], "n": 3}
    assert finite(value) == {"mean": None, "curve": [1.0, None, None], "n": 3}
    assert json.loads(dumps(value)) == {"mean": None, "curve": [1.0, None, None], "n": 3}


def test_second_pass_names_numbers_and_places(default_export, tmp_path):
    """What a second attack on the commands found: names that are not UTF-8 crashed OpenCV
    (SIGSEGV), and numbers and places that were accepted and failed later or never ended."""
    model = str(default_export.path)
    image = cv2.imencode(".jpg", np.full((32, 32, 3), 128, np.uint8))[1].tobytes()
    odd = tmp_path / os.fsdecode(b"caf\xe9.jpg")  # a Latin-1 name, as from a Windows zip
    odd.write_bytes(image)
    mask = tmp_path / os.fsdecode(b"masque\xe9.png")
    mask.write_bytes(cv2.imencode(".png", np.full((32, 32), 255, np.uint8))[1].tobytes())
    out = tmp_path / os.fsdecode(b"sortie\xe9")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-m", "xaiserve.service.cli", "explain", str(odd),
                           "--model-path", model, "--out", str(out), "--mask", str(mask)],
                          capture_output=True, text=True, errors="replace", env=env, cwd=ROOT,
                          timeout=600)  # it prints the name as it is: not UTF-8
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert (out / os.fsdecode(b"caf\xe9_overlay.png")).stat().st_size > 0
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\nc\n")
    repo = tmp_path / "models"
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    cases = [
        (("health", "--server", "127.0.0.1:99999"), ["1..65535"]),
        (("health", "--server", "127.0.0.1:9", "--timeout", "nan"), ["--timeout"]),
        (("explain", str(odd), "--server", "", "--model", "m"), ["--server: empty"]),
        (("evaluate", str(dataset), "--server", "127.0.0.1:99999", "--model", "m", "--out",
          str(tmp_path / "report")), ["1..65535"]),
        (("evaluate", str(dataset), "--model-path", model, "--out", str(dataset / "report")),
         ["--out", "inside the dataset"]),
        (("export", *SMALL, "--repository", str(repo), "--name", "n", "--version", str(10**18)),
         ["--version", "18 digits"]),
        (("export", *SMALL, "--repository", str(repo), "--name", "n", "--labels", str(labels),
          "--report", str(labels)), ["--report", "inputs"]),
        (("export", *SMALL, "--repository", str(repo), "--name", "n", "--scale", "1e-300"),
         ["--scale"]),
        (("export", *SMALL, "--repository", str(repo), "--name", "n", "--mean", "1e39"),
         ["--mean", "float32"]),
        (("serve", "--repository", str(tmp_path), "--poll-seconds", "inf"), ["--poll-seconds"]),
        (("serve", "--repository", str(tmp_path), "--shutdown-grace", "inf"),
         ["--shutdown-grace", "finite"]),
        (("bench", "--model-path", model, "--warmup", "inf", "--no-reference"), ["--warmup"]),
        (("serve", "--repository", str(tmp_path), "--host", "999.1.1.1", "--port", "0"),
         ["--host 999.1.1.1", "cannot bind"], False),  # after gRPC's own log line
        (("export", *SMALL, "--repository", str(repo), "--name", "n", "--reference", "gradcam",
          "--min-reference-agreement", "nan"), ["--min-reference-agreement"]),
        (("export", *SMALL, "--repository", str(repo), "--name", "n", "--method", "none",
          "--target-layer", "conv"), ["--target-layer", "--method none"]),
    ]
    for args, words, *rest in cases:
        result = run_cli(*args)
        one_line_error(result, *words, alone=rest[0] if rest else True)
        assert not PROGRESS.search(result.stderr), result.stderr  # refused before the work
    assert labels.read_text() == "a\nb\nc\n" and not repo.exists()
    # under umask 077 the repository, the model's folder and its files stay readable by others
    done = subprocess.run([sys.executable, "-m", "xaiserve.service.cli", "export", *SMALL,
                           "--repository", str(repo), "--name", "cnn"], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=600,
                          preexec_fn=lambda: os.umask(0o077))
    assert done.returncode == 0, done.stderr[-2000:]
    modes = {p.relative_to(repo).as_posix(): stat.S_IMODE(p.stat().st_mode)
             for p in [repo, *repo.rglob("*")]}
    assert {m for p, m in modes.items() if (repo / p).is_dir()} == {0o755}, modes
    assert {m for p, m in modes.items() if (repo / p).is_file()} == {0o644}, modes


def _children(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in children.read_text().split()] if children.exists() else []


def test_sigterm_during_a_bench_ends_benchmark_app_and_keeps_the_points(default_export, tmp_path):
    """SIGTERM used to end `xaiserve bench` on the spot: benchmark_app, its child, ran on
    alone for its whole window and the points measured in the minutes before were lost."""
    out = tmp_path / "bench"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    process = subprocess.Popen(
        [sys.executable, "-m", "xaiserve.service.cli", "bench", "--model-path",
         str(default_export.path.parent), "--works", "predict", "--batch", "1,2",
         "--concurrency", "1", "--warmup", "0.2", "--window", "0.3", "--max-windows", "3",
         "--reference-seconds", "60", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    benchmark_app = []
    assert wait_for(lambda: benchmark_app.extend(_children(process.pid)) or benchmark_app,
                    timeout=120), "benchmark_app never started"
    time.sleep(1.0)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr[-2000:]
    assert not Path(f"/proc/{benchmark_app[0]}").exists(), "benchmark_app outlived the bench"
    assert stderr.strip().splitlines()[-1] == (
        "xaiserve bench: SIGTERM; what was measured before it is written")
    data = json.loads((out / "bench.json").read_text())
    assert data["interrupted"] == "SIGTERM"
    assert [(p["work"], p["batch"]) for p in data["points"]] == [("predict", 1)]
    assert "interrupted (SIGTERM) after 1 of 2 points" in stdout
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["bench.json", "bench.csv", "summary.txt", "throughput.png", "latency.png", "split.png"])


def test_an_output_file_is_replaced_whole_or_not_at_all(tmp_path):
    """A report rewritten in place could be read half-written by a pipeline, and a failure in
    the middle lost the previous one."""
    report = tmp_path / "report.json"
    atomic_file.write_text(report, '{"status": "ok"}\n')
    try:
        with atomic_file.replacing(report) as handle:
            handle.write('{"status": ')
            raise KeyboardInterrupt("SIGTERM")
    except KeyboardInterrupt:
        pass
    assert report.read_text() == '{"status": "ok"}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]  # nothing partial left
    atomic_file.write_bytes(report, b"{}\n")
    assert report.read_bytes() == b"{}\n"
    link = tmp_path / "latest.json"  # a pipeline's link to its report: the link stays
    link.symlink_to(report)
    atomic_file.write_text(link, "[]\n")
    assert link.is_symlink() and report.read_text() == "[]\n"


def test_files_too_large_to_be_images_fail_fast_and_alone(default_export, tmp_path, photos):
    """/dev/zero among the images filled the memory, and a 3 GB file was read whole (3.3 GB,
    12 s) before its header was looked at; a pipe (`<(curl ...)`) still works."""
    pipe, huge, photo = tmp_path / "pipe.png", tmp_path / "huge.jpg", tmp_path / "coffee.png"
    cv2.imwrite(str(photo), cv2.cvtColor(photos["coffee"], cv2.COLOR_RGB2BGR))
    os.mkfifo(pipe)
    writer = threading.Thread(target=lambda: pipe.write_bytes(photo.read_bytes()))
    writer.start()
    with huge.open("wb") as handle:  # sparse: no disk used
        handle.truncate(3 << 30)
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "xaiserve.service.cli", "explain", "/dev/zero", str(huge),
         str(pipe), "--model-path", str(default_export.path.parent), "--out",
         str(tmp_path / "out")], capture_output=True, text=True, timeout=120, cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)))
    writer.join()
    assert time.monotonic() - started < 60
    assert done.returncode == 1, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    too_large = ("over 268435456 bytes: not an image (JPEG, PNG, BMP, TIFF or WebP) of at most "
                 "40000000 pixels")
    assert errors == [f"xaiserve explain: error: /dev/zero: {too_large}",
                      f"xaiserve explain: error: {huge}: {too_large}"]
    assert "pipe.png: espresso" in done.stdout  # read from the pipe and explained
    one_line_error(run_cli("bench", "--model-path", str(default_export.path.parent), "--image",
                           str(huge), "--out", str(tmp_path / "bench")),
                   "--image", "over 268435456 bytes")


@pytest.fixture
def small_file_system(tmp_path):
    """A 4 MiB tmpfs: a disk that fills (this project's machine lets root mount one)."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=True)


def test_a_full_disk_is_named_with_what_to_do_and_leaves_nothing(default_export, tmp_path,
                                                                 small_file_system, photos):
    """A full disk gave `explain: error:: No space left on device` (no file, no advice) and an
    export `RuntimeError: basic_ios::clear: iostream error` after all its work."""
    repository = small_file_system / "models"
    result = run_cli("export", "default", "--repository", str(repository), "--name", "lite0")
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"xaiserve export: error: --repository {repository}: no room")
    assert "MiB free" in line and "give another --repository" in line
    assert list(small_file_system.iterdir()) == []  # not even the repository folder

    # a write that runs out of room half-way: the version and the folders it made go
    with pytest.raises(RepositoryError, match="no room for the version"):
        with staged_version(repository, "big", None) as (staging, _):
            (staging / "model.bin").write_bytes(bytes(8 * 2**20))
    assert list(small_file_system.iterdir()) == []

    (small_file_system / "filler").write_bytes(bytes(4 * 2**20 - 64 * 1024))
    image = tmp_path / "chelsea.png"
    cv2.imwrite(str(image), cv2.cvtColor(photos["chelsea"], cv2.COLOR_RGB2BGR))
    out = small_file_system / "out"
    result = run_cli("explain", str(image), "--model-path", str(default_export.path.parent),
                     "--out", str(out))
    assert result.returncode == 1
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"xaiserve explain: error: {out}/chelsea")
    assert line.endswith("No space left on device; free some space or write elsewhere")
    assert [p.name for p in out.iterdir()] in ([], ["chelsea.json"])  # no partial file


def test_exports_running_at_once_never_take_the_same_version(tmp_path):
    """Two pipeline jobs exporting one model at once both chose the next version; the second's
    rename failed (`Directory not empty`) and its work was lost."""
    first = staged_version(tmp_path, "m", None)
    second = staged_version(tmp_path, "m", None)
    (a, version_a), (b, version_b) = first.__enter__(), second.__enter__()
    (a / "model.xml").write_text("a")
    (b / "model.xml").write_text("b")
    first.__exit__(None, None, None)
    second.__exit__(None, None, None)
    assert (version_a, version_b) == (1, 2)
    assert [(tmp_path / "m" / v / "model.xml").read_text() for v in ("1", "2")] == ["a", "b"]

    (tmp_path / "m" / ".staging-3").mkdir()  # left by an export killed with SIGKILL
    with staged_version(tmp_path, "m", None) as (_, version):
        pass
    assert version == 4
    with pytest.raises(RepositoryError, match=r"\.staging-3: another export of version 3"):
        with staged_version(tmp_path, "m", 3):
            pass
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [".staging-3", "1", "2", "4"]
