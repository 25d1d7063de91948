"""Security properties of the AWS path (issue 15): the store only talks to a
bucket of the expected account, and on Lambda a job ref resolves only inside
the deployed package."""

from __future__ import annotations

import io
import logging
import shutil
from pathlib import Path
from typing import Any

import boto3
import pytest

from fanout import coordinator
from fanout.backends.aws import AwsSettings
from fanout.backends.aws.store import SINGLE_PUT_BYTES, S3Store
from fanout.backends.base import Backend, RunState, TaskState
from fanout.packaged import job_refusal
from support.lambda_source import EventSource

REPO = Path(__file__).resolve().parents[1]
TREE = REPO / "tests" / "testjobs" / "tree.py"

OWNER = "123456789012"


def test_every_store_call_to_the_bucket_names_its_owner(aws: Backend) -> None:
    settings = AwsSettings.from_env()
    s3 = boto3.client("s3")
    calls: list[tuple[str, dict[str, Any]]] = []

    def record(params: dict[str, Any], model: Any, **_: Any) -> None:
        calls.append((model.name, dict(params)))

    s3.meta.events.register("provide-client-params.s3", record)
    store = S3Store(AwsSettings(**{**settings.__dict__, "bucket_owner": OWNER}), s3=s3)
    big = b"x" * (SINGLE_PUT_BYTES + 1)
    store.put("a/small", b"1")
    assert store.put("a/small", b"2", if_absent=True) is False
    store.put("a/big", io.BytesIO(big))  # s3transfer's multipart upload
    store.put("a/big-once", io.BytesIO(big), if_absent=True)  # our own multipart upload
    assert store.get("a/small") == b"1" and store.exists("a/big")
    assert list(store.list("a/")) == ["a/big", "a/big-once", "a/small"]
    store.delete("a/small")
    ops = {name for name, _ in calls}
    assert {"PutObject", "GetObject", "HeadObject", "ListObjectsV2", "DeleteObject"} <= ops
    assert {"CreateMultipartUpload", "UploadPart", "CompleteMultipartUpload"} <= ops
    missing = [name for name, params in calls if params.get("ExpectedBucketOwner") != OWNER]
    assert missing == []


# -- on Lambda, jobs only from the package ----------------------------------------


@pytest.fixture
def package(tmp_path: Path) -> Path:
    """A deployed package's layout: jobs/ (with a module and a link out of it)
    beside files that are not jobs."""
    root = tmp_path / "task"
    (root / "jobs" / "sub").mkdir(parents=True)
    shutil.copy(TREE, root / "jobs" / "tree.py")
    (root / "jobs" / "sub" / "m.py").write_text("X = 1\n")
    (root / "jobs" / "notes.txt").write_text("")
    (root / "helper.py").write_text("X = 1\n")
    (tmp_path / "elsewhere.py").write_text("X = 1\n")
    (root / "jobs" / "link.py").symlink_to(tmp_path / "elsewhere.py")
    return root


@pytest.mark.parametrize(
    "ref",
    ["jobs/tree.py", "jobs/tree.py:job", "jobs/sub/m.py", "./jobs/tree.py", "jobs.tree",
     "jobs.tree:job", "jobs.sub.m"],
)  # fmt: skip
def test_a_job_in_the_package_may_run(package: Path, ref: str) -> None:
    assert job_refusal(ref, package) is None
    assert job_refusal(str(package / "jobs" / "tree.py"), package) is None  # as submit stores it


@pytest.mark.parametrize(
    "ref",
    ["helper.py", "jobs/../helper.py", "jobs/link.py", "jobs/notes.txt", "/etc/passwd",
     "../elsewhere.py", "os", "os.path:join", "tests.testjobs.tree", "jobs.missing",
     "jobs..tree", "jobs.link", "fanout.cli:main"],
)  # fmt: skip
def test_a_job_outside_the_package_is_refused(package: Path, ref: str) -> None:
    reason = job_refusal(ref, package)
    assert reason is not None and "deployed jobs" in reason


def test_off_lambda_any_job_may_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LAMBDA_TASK_ROOT", raising=False)
    assert job_refusal(str(TREE)) is None and job_refusal("tests.testjobs.tree") is None
    monkeypatch.setenv("LAMBDA_TASK_ROOT", str(REPO))
    assert job_refusal(str(TREE)) is not None  # the repository's tests/ is not jobs/


def _poll(aws: Backend, run_id: str) -> Any:
    queue = aws.queue
    source = EventSource(queue.sqs, queue.url, timeout_ms=60_000, visibility=30)  # type: ignore[attr-defined]
    for _ in range(20):
        run = aws.ledger.get_run(run_id)
        assert run is not None
        if run.state != RunState.RUNNING:
            return run
        messages = source.receive()
        if messages:
            source.invoke(messages)
    return aws.ledger.get_run(run_id)


def test_on_lambda_a_job_outside_the_package_is_dead_lettered(
    aws: Backend, package: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("LAMBDA_TASK_ROOT", str(package))
    # The ledger names a job that is not in the package (a forged or stale ref).
    outside = coordinator.submit(aws, str(TREE), {"chunks": 1, "rows": 1}).run_id
    with caplog.at_level(logging.ERROR):
        run = _poll(aws, outside)
    assert run.state == RunState.FAILED
    (dead,) = aws.ledger.list_tasks(outside, (TaskState.DEAD,))
    assert [e["outcome"] for e in dead.history] == ["permanent", "dead"], dead.history
    assert "JobOutsidePackage" in dead.history[0]["error"]
    assert f"job {str(TREE)!r} is not a file under the deployed jobs/" in caplog.text
    # The same job, deployed: it runs.
    inside = coordinator.submit(aws, str(package / "jobs" / "tree.py"), {"chunks": 1, "rows": 1})
    run = _poll(aws, inside.run_id)
    assert run.state == RunState.SUCCEEDED and run.records == 1
