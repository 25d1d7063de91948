"""The engine end to end on the AWS backend (SQS, S3, DynamoDB under moto, in
process): the same job module as on the local backend, the same output."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest
from moto import mock_aws

from fanout import coordinator
from fanout.backends import open_backend
from fanout.backends.aws import AwsSettings
from fanout.backends.aws.resources import create_resources
from fanout.backends.base import Backend, RunState, TaskState
from helpers import TREE, drain
from testjobs.tree import Params, expected_items


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[Backend]:
    for name, value in {
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "FANOUT_STAGE": "test",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with mock_aws():
        create_resources(AwsSettings.from_env())
        backend = open_backend("aws")
        yield backend
        backend.close()


def test_tree_job_runs_exactly_once_on_aws(aws: Backend) -> None:
    params = {"chunks": 3, "rows": 20, "step": 8, "children": 2, "depth": 1}
    run_id = coordinator.submit(aws, TREE, params).run_id
    run = drain(aws, run_id, chunk_timeout=5, limit=120)
    assert run.state == RunState.SUCCEEDED and run.outstanding == 0
    items = Counter(r["item"] for r in coordinator.committed_records(aws, run_id))
    assert [i for i, n in items.items() if n > 1] == []
    assert set(items) == expected_items(Params(**params))
    manifest = coordinator.read_manifest(aws, run_id)
    assert manifest["records"] == run.records == len(items)
    assert aws.store.url(manifest["files"][0]["key"]).startswith("s3://fanout-test-store/")


def test_dead_letter_and_replay_on_aws(aws: Backend, tmp_path: object) -> None:
    run_id = coordinator.submit(
        aws,
        TREE,
        {"chunks": 2, "rows": 3, "fail_chunks": [1], "fail_times": 9},
        {"max_attempts": 2},
    ).run_id
    run = drain(aws, run_id, chunk_timeout=5, limit=120)
    assert run.state == RunState.FAILED
    (dead,) = aws.ledger.list_tasks(run_id, (TaskState.DEAD,))
    assert dead.chunk_id == "0/1" and "flaky chunk 1" in (dead.error or "")
