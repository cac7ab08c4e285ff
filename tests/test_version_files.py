"""A version copied into the repository file by file, or rewritten where it serves: the server
compiles files only once they are whole (the export's SHA-256 list in the model card, and
files quiet for SETTLE_SECONDS), and a version rewritten in place is loaded again or keeps
answering from memory, saying so."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time

import grpc
import numpy as np

from xaiserve.service.proto import grpc_predict_v2_pb2_grpc as kgrpc
from xaiserve.service.version_files import (CARD_NAME, SETTLE_SECONDS, digests, mismatch,
                                            quiet)

from .test_operations import health_of, infer_request, server_on, wait_until


def logits(channel: grpc.Channel) -> tuple[str, np.ndarray]:
    answer = kgrpc.GRPCInferenceServiceStub(channel).ModelInfer(infer_request(), timeout=30)
    return answer.model_version, np.frombuffer(answer.raw_output_contents[0], np.float32)


def reason(server, version: int) -> str:
    return next((e.reason for e in server.repository.index() if e.version == version), "")


def test_a_version_copied_file_by_file_is_served_only_once_whole(small_export, tmp_path):
    """model.bin reserved at its full size and filled later (what some copy tools do) compiled
    and served zeros as weights, for good. Now: not compiled while its files change, refused
    while they differ from the card's list (version 1 answers, the index says why), served
    once whole; the server stays ready meanwhile."""
    shutil.copytree(small_export.path, tmp_path / "shapes" / "1")
    whole = (small_export.path / "model.bin").read_bytes()
    with server_on(tmp_path, latest_versions=1) as (server, channel):
        copy = tmp_path / "shapes" / "2"
        copy.mkdir()
        for name in ("model.xml", "labels.txt", CARD_NAME):
            shutil.copy(small_export.path / name, copy)
        (copy / "model.bin").write_bytes(bytes(len(whole)))  # reserved, not yet filled
        time.sleep(SETTLE_SECONDS / 2)  # five polls: the files are still settling
        assert server.repository.versions("shapes") == [1]
        assert health_of(channel, "") == "SERVING"
        assert wait_until(lambda: "does not match the SHA-256" in reason(server, 2), 20)
        assert logits(channel)[0] == "1" and health_of(channel, "") == "SERVING"
        (copy / "model.bin").write_bytes(whole)  # the copy ends
        assert wait_until(lambda: logits(channel)[0] == "2", 30)


def test_a_served_version_rewritten_in_place_is_loaded_again_or_answers_on(
        small_export, tmp_path, caplog):
    """A served version's model.bin overwritten went unnoticed (the index said READY, a
    restart or a new replica would serve other weights). Now: zeros over it do not match the
    card, so the copy in memory answers on, said in the log; the export's own bytes put back
    are loaded again."""
    shutil.copytree(small_export.path, tmp_path / "shapes" / "1")
    weights = tmp_path / "shapes" / "1" / "model.bin"
    whole = weights.read_bytes()
    with server_on(tmp_path, latest_versions=1) as (server, channel), \
            caplog.at_level(logging.INFO, logger="xaiserve.repository"):
        version, before = logits(channel)
        weights.write_bytes(bytes(len(whole)))

        def logged(text: str) -> bool:
            return any(text in record.getMessage() for record in caplog.records)
        assert wait_until(lambda: logged("keeps serving as loaded before: compiling its "
                                         "changed files failed: model.bin does not match"), 30)
        assert logged("shapes version 1: its files changed on disk while it serves")
        again, after = logits(channel)
        assert (version, again) == ("1", "1") and np.array_equal(before, after)
        caplog.clear()
        weights.write_bytes(whole)
        assert wait_until(lambda: logged("shapes version 1 now runs its changed files"), 30)
        assert np.array_equal(logits(channel)[1], before)


def test_the_card_check_and_the_quiet_time(small_export, tmp_path):
    version = tmp_path / "v"
    shutil.copytree(small_export.path, version)
    card = json.loads((version / CARD_NAME).read_text())
    assert card["files"] == digests(version, ("model.xml", "model.bin", "labels.txt"))
    assert mismatch(version) == ""
    (version / "labels.txt").write_text("other\n")
    assert mismatch(version).startswith("labels.txt does not match the SHA-256")
    card["files"] = {"../model.bin": "0" * 64}  # a list naming a file elsewhere is not read
    (version / CARD_NAME).write_text(json.dumps(card))
    assert mismatch(version).startswith("../model.bin listed in model_card.json is missing")
    (version / CARD_NAME).unlink()
    assert mismatch(version) == ""  # an IR from elsewhere: only the quiet time applies

    now = time.time_ns()
    signature = (("model.bin", 10, now - int(SETTLE_SECONDS * 1e9) - 1),
                 ("model.xml", 10, now - 1000))
    assert not quiet(signature, now) and not quiet((), now)
    assert quiet(signature[:1], now)
    os.utime(version / "model.xml", ns=(now, now - int(10 * SETTLE_SECONDS * 1e9)))
    assert quiet((("model.xml", 1, (version / "model.xml").stat().st_mtime_ns),), now)
