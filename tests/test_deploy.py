"""deploy/template.yaml (lint, security properties, creation under moto) and
``fanout deploy`` (zip, plan, dry run, the real path under moto)."""

from __future__ import annotations

import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from fanout.cli import main
from fanout.deploy import (
    TEMPLATE,
    VISIBILITY_FACTOR,
    build_zip,
    deploy,
    effective_parameters,
    load_template,
    plan,
)
from fanout.errors import UserError
from fanout.jobs import Job, load_job
from support.helpers import fake_aws

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _layer_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Layers are cached under the test's own XDG_CACHE_HOME, never the user's."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


def _layer_zip(path: Path) -> Path:
    """A stand-in dependency layer (tests/test_layer.py builds real ones)."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("python/fakedep/__init__.py", "VALUE = 1\n")
    return path


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    return load_template(TEMPLATE)


def resources(template: dict[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    """The template's resources of type ``kind``, by logical id."""
    return {k: v for k, v in template["Resources"].items() if v["Type"] == kind}


# -- the template ---------------------------------------------------------------------


def test_cfn_lint_reports_no_errors() -> None:
    from cfnlint.api import lint_all  # type: ignore[import-untyped]

    matches = lint_all(TEMPLATE.read_text())
    errors = [str(m) for m in matches if m.rule.id.startswith("E")]
    assert errors == []


def test_every_checkov_skip_is_justified_in_the_readme() -> None:
    import yaml  # type: ignore[import-untyped]  # no stubs installed

    config = yaml.safe_load((REPO / ".ci" / "checkov.yaml").read_text())
    skips = config["skip-check"]
    assert skips and config["framework"] == ["cloudformation"]
    readme = (REPO / "README.md").read_text()
    security = readme[readme.index("### Security") :]
    unexplained = [s for s in skips if f"`{s}`" not in security]
    assert unexplained == []
    assert 'checkov" -f deploy/template.yaml --config-file .ci/checkov.yaml' in (
        (REPO / ".ci" / "run").read_text()
    )


def _statements(template: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for name, role in resources(template, "AWS::IAM::Role").items():
        for policy in role["Properties"].get("Policies", []):
            for statement in policy["PolicyDocument"]["Statement"]:
                yield name, statement
        # Managed policies (e.g. AWSLambdaBasicExecutionRole) hold Resource "*"
        # statements: the template scopes logs permissions inline instead.
        assert not role["Properties"].get("ManagedPolicyArns"), name


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def test_iam_is_least_privilege(template: dict[str, Any]) -> None:
    statements = list(_statements(template))
    assert statements
    for role, statement in statements:
        assert statement["Effect"] == "Allow"
        for action in _as_list(statement["Action"]):
            assert "*" not in action, (role, statement)
        # No exception needed: every action used scopes to a resource ARN.
        for resource in _as_list(statement["Resource"]):
            assert resource != "*", (role, statement)
            # Either an intrinsic naming a stack resource, or a scoped ARN string.
            if isinstance(resource, str):
                assert resource.startswith("arn:"), (role, statement)


def test_scheduler_may_only_send_to_the_work_queue(template: dict[str, Any]) -> None:
    role = template["Resources"]["SchedulerRole"]["Properties"]
    (statement,) = role["Policies"][0]["PolicyDocument"]["Statement"]
    assert statement["Action"] == "sqs:SendMessage"
    assert statement["Resource"] == {"Fn::GetAtt": ["WorkQueue", "Arn"]}


def test_function_role_covers_table_indexes(template: dict[str, Any]) -> None:
    ledger = next(s for _, s in _statements(template) if s.get("Sid") == "Ledger")
    text = str(ledger["Resource"])
    assert "index/gsi1" in text
    assert "index/gsi2" in text


def test_bucket_is_encrypted_and_private(template: dict[str, Any]) -> None:
    (bucket,) = resources(template, "AWS::S3::Bucket").values()
    props = bucket["Properties"]
    rules = props["BucketEncryption"]["ServerSideEncryptionConfiguration"]
    assert rules[0]["ServerSideEncryptionByDefault"]["SSEAlgorithm"] in ("AES256", "aws:kms")
    block = props["PublicAccessBlockConfiguration"]
    assert set(block) == {
        "BlockPublicAcls",
        "BlockPublicPolicy",
        "IgnorePublicAcls",
        "RestrictPublicBuckets",
    }
    assert all(v is True for v in block.values())


def test_queues_are_encrypted_with_redrive(template: dict[str, Any]) -> None:
    queues = resources(template, "AWS::SQS::Queue")
    assert set(queues) == {"WorkQueue", "DeadLetterQueue"}
    for queue in queues.values():
        assert queue["Properties"]["SqsManagedSseEnabled"] is True
    redrive = queues["WorkQueue"]["Properties"]["RedrivePolicy"]
    assert redrive["maxReceiveCount"] == 50
    assert redrive["deadLetterTargetArn"] == {"Fn::GetAtt": ["DeadLetterQueue", "Arn"]}


def _create_table_request(monkeypatch: pytest.MonkeyPatch, stage: str) -> dict[str, Any]:
    """The CreateTable request ``create_table()`` (the AWS backend's own table
    creation, used by ``create_resources``) makes for ``stage``, recorded rather than sent."""
    from fanout.backends.aws import AwsSettings, ledger_items

    sent: list[dict[str, Any]] = []

    class Recorder:
        def create_table(self, **request: Any) -> None:
            sent.append(request)

        def get_waiter(self, name: str) -> Any:
            return type("Waiter", (), {"wait": lambda self, **kw: None})()

    monkeypatch.setattr(ledger_items, "_client", lambda settings: Recorder())
    monkeypatch.delenv("FANOUT_AWS_TABLE", raising=False)
    ledger_items.create_table(AwsSettings.from_env(stage))
    (request,) = sent
    return request


def test_table_matches_create_table(
    template: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The template's table is the one ``create_table()`` builds: same name for a
    stage, keys, attribute types, indexes and projections, billing and encryption."""
    (table,) = resources(template, "AWS::DynamoDB::Table").values()
    props = table["Properties"]
    built = _create_table_request(monkeypatch, "dev")
    assert props["TableName"] == {"Fn::Sub": "fanout-${Stage}-ledger"}
    assert built["TableName"] == "fanout-dev-ledger"

    def by_name(items: list[dict[str, Any]], key: str) -> dict[str, Any]:
        return {item[key]: item for item in items}

    assert by_name(props["AttributeDefinitions"], "AttributeName") == by_name(
        built["AttributeDefinitions"], "AttributeName"
    )
    assert props["KeySchema"] == built["KeySchema"]
    assert by_name(props["GlobalSecondaryIndexes"], "IndexName") == by_name(
        built["GlobalSecondaryIndexes"], "IndexName"
    )
    assert props["BillingMode"] == built["BillingMode"] == "PAY_PER_REQUEST"
    # The same setting under CloudFormation's and the API's names.
    assert props["SSESpecification"]["SSEEnabled"] is built["SSESpecification"]["Enabled"] is True


def test_topic_is_encrypted(template: dict[str, Any]) -> None:
    topics = resources(template, "AWS::SNS::Topic")
    assert topics["RunEventsTopic"]["Properties"]["KmsMasterKeyId"] == "alias/aws/sns"
    # The alarm topic (CloudWatch cannot publish under the AWS-managed key)
    # exists only with an e-mail address, and carries no data.
    assert set(topics) == {"RunEventsTopic", "AlarmTopic"}
    assert topics["AlarmTopic"]["Condition"] == "HasAlarmEmail"


def _policies(template: dict[str, Any]) -> dict[str, tuple[Any, list[dict[str, Any]]]]:
    """Resource policies by logical id: (what they protect, their statements)."""
    found = {}
    for kind, key in (
        ("AWS::S3::BucketPolicy", "Bucket"),
        ("AWS::SQS::QueuePolicy", "Queues"),
        ("AWS::SNS::TopicPolicy", "Topics"),
    ):
        for name, resource in resources(template, kind).items():
            props = resource["Properties"]
            found[name] = (props[key], props["PolicyDocument"]["Statement"])
    return found


def test_bucket_queues_and_topics_deny_plain_http(template: dict[str, Any]) -> None:
    policies = _policies(template)
    protected = {str(target) for target, _ in policies.values()}
    for name in ("StoreBucket", "WorkQueue", "DeadLetterQueue", "RunEventsTopic", "AlarmTopic"):
        assert any(name in text for text in protected), name
    for name, (_, statements) in policies.items():
        (deny,) = [s for s in statements if s.get("Sid") == "DenyInsecureTransport"]
        assert deny["Effect"] == "Deny" and deny["Principal"] == "*", name
        assert deny["Action"].endswith(":*"), name
        assert deny["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}, name
    bucket = policies["StoreBucketPolicy"][1][0]["Resource"]
    assert {"Fn::Sub": "${StoreBucket.Arn}/*"} in bucket  # the objects as well


def test_only_the_stack_sends_to_the_queue_and_publishes_events(template: dict[str, Any]) -> None:
    policies = _policies(template)
    queue = policies["WorkQueuePolicy"][1]
    (account,) = [s for s in queue if isinstance(s, dict) and s.get("Sid") == "DenyOtherAccounts"]
    assert account["Condition"] == {
        "StringNotEquals": {"aws:PrincipalAccount": {"Ref": "AWS::AccountId"}}
    }
    (senders,) = [s for s in queue if "Fn::If" in s]
    condition, deny, otherwise = senders["Fn::If"]
    assert condition == "HasSubmitters" and otherwise == {"Ref": "AWS::NoValue"}
    assert deny["Effect"] == "Deny" and deny["Action"] == "sqs:SendMessage"
    allowed = deny["Condition"]["ArnNotLike"]["aws:PrincipalArn"]["Fn::Split"][1]["Fn::Join"][1]
    assert allowed == [
        {"Fn::GetAtt": ["FunctionRole", "Arn"]},
        {"Fn::GetAtt": ["SchedulerRole", "Arn"]},
        {"Ref": "Submitters"},
    ]
    (publish,) = [
        s for s in policies["RunEventsTopicPolicy"][1] if s.get("Sid") == "DenyOtherPublishers"
    ]
    assert publish["Action"] == "sns:Publish"
    assert publish["Condition"] == {
        "ArnNotEquals": {"aws:PrincipalArn": {"Fn::GetAtt": ["FunctionRole", "Arn"]}}
    }


def test_low_findings_of_the_review(template: dict[str, Any]) -> None:
    res = template["Resources"]
    for queue in ("WorkQueue", "DeadLetterQueue"):
        assert res[queue]["Properties"]["MaximumMessageSize"] == 262144
    assert res["LedgerTable"]["Properties"]["DeletionProtectionEnabled"] is True
    store = next(s for _, s in _statements(template) if s.get("Sid") == "StoreObjects")
    assert store["Action"] == ["s3:GetObject", "s3:PutObject", "s3:AbortMultipartUpload"]
    trust = res["SchedulerRole"]["Properties"]["AssumeRolePolicyDocument"]["Statement"][0]
    arns = trust["Condition"]["ArnLike"]["aws:SourceArn"]
    assert [a["Fn::Sub"].rsplit(":", 1)[1] for a in arns] == [
        "schedule/fanout-${Stage}/*",
        "schedule/default/fanout-${Stage}-recovery-sweep",
    ]
    assert res["RecoverySweep"]["Properties"]["Name"] == {
        "Fn::Sub": "fanout-${Stage}-recovery-sweep"
    }
    retry = res["RecoverySweep"]["Properties"]["Target"]["RetryPolicy"]
    assert retry == {"MaximumEventAgeInSeconds": 300, "MaximumRetryAttempts": 3}


def test_concurrency_is_bounded_by_default(template: dict[str, Any]) -> None:
    reserved = template["Parameters"]["ReservedConcurrency"]
    assert reserved["Default"] == 10 and reserved["MinValue"] >= 2
    res = template["Resources"]
    ref = {"Ref": "ReservedConcurrency"}
    assert res["Function"]["Properties"]["ReservedConcurrentExecutions"] == ref
    assert res["WorkQueueMapping"]["Properties"]["ScalingConfig"] == {"MaximumConcurrency": ref}
    alarm = res["InvocationAlarm"]
    assert alarm["Condition"] == "HasAlarmEmail"
    assert alarm["Properties"]["MetricName"] == "Invocations"
    assert alarm["Properties"]["AlarmActions"] == [{"Ref": "AlarmTopic"}]
    subscription = res["AlarmTopic"]["Properties"]["Subscription"]
    assert subscription == [{"Protocol": "email", "Endpoint": {"Ref": "AlarmEmail"}}]


def test_the_function_is_told_its_owner_and_scheduler(template: dict[str, Any]) -> None:
    env = template["Resources"]["Function"]["Properties"]["Environment"]["Variables"]
    assert env["FANOUT_AWS_BUCKET_OWNER"] == {"Ref": "AWS::AccountId"}
    assert env["FANOUT_AWS_SCHEDULER_SENDER"] == {"Fn::GetAtt": ["SchedulerRole", "RoleId"]}


@pytest.mark.parametrize(
    ("caller", "patterns"),
    [
        ("arn:aws:sts::111122223333:assumed-role/Deployer/alice",
         "arn:aws:iam::111122223333:role/Deployer,arn:aws:iam::111122223333:role/*/Deployer"),
        ("arn:aws:iam::111122223333:user/ci/bob", "arn:aws:iam::111122223333:user/ci/bob"),
        ("arn:aws-cn:sts::111122223333:assumed-role/R/s",
         "arn:aws-cn:iam::111122223333:role/R,arn:aws-cn:iam::111122223333:role/*/R"),
    ],
)  # fmt: skip
def test_deploy_lets_the_deployer_submit(caller: str, patterns: str) -> None:
    from fanout.deploy import submitter_patterns

    assert submitter_patterns(caller) == patterns


def test_visibility_default_is_six_times_timeout(template: dict[str, Any]) -> None:
    params = template["Parameters"]
    timeout = params["FunctionTimeout"]["Default"]
    assert timeout == 60
    assert params["VisibilityTimeout"]["Default"] >= VISIBILITY_FACTOR * timeout
    queue = template["Resources"]["WorkQueue"]["Properties"]
    assert queue["VisibilityTimeout"] == {"Ref": "VisibilityTimeout"}


def test_visibility_check_rejects_short_visibility() -> None:
    assert effective_parameters({})["VisibilityTimeout"] == "360"
    with pytest.raises(UserError, match="VisibilityTimeout"):
        effective_parameters({"FunctionTimeout": "120"})
    with pytest.raises(UserError, match="unknown"):
        effective_parameters({"Nope": "1"})


def test_a_function_timeout_no_chunk_fits_in_is_refused() -> None:
    # At 4 s (which the template allowed) every invocation handed its records
    # back, having under the 5 s a chunk needs: a run that never moved.
    with pytest.raises(UserError, match="FunctionTimeout 4 is not between 10 and 900"):
        effective_parameters({"FunctionTimeout": "4", "VisibilityTimeout": "24"})
    with pytest.raises(UserError, match="must be integers"):
        effective_parameters({"FunctionTimeout": "soon"})
    assert effective_parameters({"FunctionTimeout": "10", "VisibilityTimeout": "60"})


def test_function(template: dict[str, Any]) -> None:
    props = template["Resources"]["Function"]["Properties"]
    assert props["RecursiveLoop"] == "Allow"
    assert props["Handler"] == "fanout.aws_lambda.handler"
    assert set(props["Environment"]["Variables"]) >= {
        "FANOUT_STAGE",
        "FANOUT_AWS_QUEUE",
        "FANOUT_AWS_BUCKET",
        "FANOUT_AWS_TABLE",
        "FANOUT_AWS_EVENTS_TOPIC",  # read by AwsSettings.from_env
    }
    mapping = template["Resources"]["WorkQueueMapping"]["Properties"]
    assert mapping["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
    assert mapping["BatchSize"] == 10


# -- moto -------------------------------------------------------------------------------


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    from moto import mock_aws
    from moto.awslambda.models import LayerVersion

    fake_aws(monkeypatch)
    # moto 5.2 gap: ``!Ref`` of an AWS::Lambda::LayerVersion resolves to moto's
    # Python object instead of the version's ARN (what CloudFormation documents),
    # which breaks moto's update of a function whose Layers reference one.
    monkeypatch.setattr(
        LayerVersion, "physical_resource_id", property(lambda self: self.arn), raising=False
    )
    with mock_aws():
        yield


def test_create_stack_under_moto(aws: None, tmp_path: Path) -> None:
    import boto3

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="code")
    s3.put_object(Bucket="code", Key="f.zip", Body=build_zip(REPO, tmp_path / "f.zip").read_bytes())
    s3.put_object(Bucket="code", Key="l.zip", Body=_layer_zip(tmp_path / "l.zip").read_bytes())
    cfn = boto3.client("cloudformation")
    cfn.create_stack(
        StackName="fanout-t",
        TemplateBody=TEMPLATE.read_text(),
        Parameters=[
            {"ParameterKey": "Stage", "ParameterValue": "t"},
            {"ParameterKey": "CodeBucket", "ParameterValue": "code"},
            {"ParameterKey": "CodeKey", "ParameterValue": "f.zip"},
            {"ParameterKey": "LayerKey", "ParameterValue": "l.zip"},
            {"ParameterKey": "Architecture", "ParameterValue": "arm64"},
        ],
        Capabilities=["CAPABILITY_IAM"],
    )
    stack = cfn.describe_stacks(StackName="fanout-t")["Stacks"][0]
    assert stack["StackStatus"] == "CREATE_COMPLETE"
    outputs = {o["OutputKey"]: o["OutputValue"] for o in stack["Outputs"]}
    attrs = boto3.client("sqs").get_queue_attributes(
        QueueUrl=outputs["QueueUrl"], AttributeNames=["All"]
    )["Attributes"]
    assert attrs["VisibilityTimeout"] == "360"
    assert attrs["SqsManagedSseEnabled"] == "true"
    config = boto3.client("lambda").get_function(FunctionName=outputs["FunctionName"])
    env = config["Configuration"]["Environment"]["Variables"]
    assert env["FANOUT_AWS_QUEUE"] == outputs["QueueUrl"]
    assert env["FANOUT_AWS_TABLE"] == outputs["TableName"] == "fanout-t-ledger"
    assert env["FANOUT_AWS_EVENTS_TOPIC"] == outputs["TopicArn"]
    # The dependency layer was published from the uploaded zip. (moto's
    # CloudFormation does not pass a function's Layers and Architectures on at
    # creation; test_layer_of_the_template checks the template's wiring.)
    lam = boto3.client("lambda")
    (layer,) = lam.list_layers()["Layers"]
    version = layer["LatestMatchingVersion"]
    assert version["CompatibleRuntimes"] == ["python3.12"]
    content = lam.get_layer_version(LayerName=layer["LayerName"], VersionNumber=version["Version"])[
        "Content"
    ]
    assert content["CodeSize"] == (tmp_path / "l.zip").stat().st_size


def test_layer_of_the_template(template: dict[str, Any]) -> None:
    (layer,) = resources(template, "AWS::Lambda::LayerVersion").values()
    props = layer["Properties"]
    assert props["Content"] == {"S3Bucket": {"Ref": "CodeBucket"}, "S3Key": {"Ref": "LayerKey"}}
    assert props["CompatibleRuntimes"] == [{"Ref": "PythonRuntime"}]
    assert props["CompatibleArchitectures"] == [{"Ref": "Architecture"}]
    function = template["Resources"]["Function"]["Properties"]
    assert function["Layers"] == [{"Ref": "DependencyLayer"}]
    assert function["Architectures"] == [{"Ref": "Architecture"}]
    assert template["Parameters"]["Architecture"]["AllowedValues"] == ["x86_64", "arm64"]


def test_deploy_creates_then_updates_under_moto(aws: None, tmp_path: Path) -> None:
    import boto3

    layer = _layer_zip(tmp_path / "layer.zip")
    outputs = deploy("t", REPO, code_bucket="fanout-code", layer_zip=layer)
    assert outputs["TableName"] == "fanout-t-ledger"
    assert outputs["FunctionName"] == "fanout-t-worker"
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket="fanout-code")["Contents"]]
    assert len(keys) == 2 and all(k.startswith("fanout/t/") for k in keys)
    assert len([k for k in keys if k.startswith("fanout/t/layer-")]) == 1
    # Same sources: same keys; a second deploy updates the stack, not fails.
    again = deploy(
        "t", REPO, code_bucket="fanout-code", parameters={"MemorySize": "2048"}, layer_zip=layer
    )
    assert again["QueueUrl"] == outputs["QueueUrl"]
    # The deploying principal may submit runs (the work queue's policy).
    stack = boto3.client("cloudformation").describe_stacks(StackName="fanout-t")["Stacks"][0]
    params = {p["ParameterKey"]: p["ParameterValue"] for p in stack["Parameters"]}
    caller = boto3.client("sts").get_caller_identity()["Arn"]
    assert params["Submitters"] == caller and caller.startswith("arn:aws:")
    response = boto3.client("s3").list_objects_v2(Bucket="fanout-code")
    assert [o["Key"] for o in response["Contents"]] == keys


def test_deploy_refuses_a_code_bucket_owned_by_another_account(
    aws: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import boto3

    # Another account creates the stage's (predictable) code bucket first. moto,
    # like S3 with a permissive bucket policy, then lets this account write to it.
    name = "fanout-t-code-123456789012-us-east-1"
    monkeypatch.setenv("MOTO_ACCOUNT_ID", "999999999999")
    boto3.client("s3").create_bucket(Bucket=name)
    monkeypatch.delenv("MOTO_ACCOUNT_ID")
    with pytest.raises(UserError, match=f"code bucket {name} exists but is not owned by this"):
        deploy("t", REPO, layer_zip=_layer_zip(tmp_path / "layer.zip"))
    monkeypatch.setenv("MOTO_ACCOUNT_ID", "999999999999")
    assert "Contents" not in boto3.client("s3").list_objects_v2(Bucket=name)  # nothing sent
    monkeypatch.delenv("MOTO_ACCOUNT_ID")
    assert boto3.client("cloudformation").describe_stacks()["Stacks"] == []


def test_deploy_reuploads_a_layer_replaced_in_the_bucket(aws: None, tmp_path: Path) -> None:
    import boto3

    s3 = boto3.client("s3")
    layer = _layer_zip(tmp_path / "layer.zip")
    deploy("t", REPO, code_bucket="fanout-code", layer_zip=layer)
    (key,) = [
        o["Key"]
        for o in s3.list_objects_v2(Bucket="fanout-code")["Contents"]
        if "/layer-" in o["Key"]
    ]
    s3.put_object(Bucket="fanout-code", Key=key, Body=b"swapped")  # same name, other bytes
    deploy("t", REPO, code_bucket="fanout-code", layer_zip=layer)
    body = s3.get_object(Bucket="fanout-code", Key=key)["Body"].read()
    assert body == layer.read_bytes()


def test_the_code_bucket_is_private_and_tls_only(aws: None, tmp_path: Path) -> None:
    import json

    import boto3

    deploy("t", REPO, code_bucket="fanout-code", layer_zip=_layer_zip(tmp_path / "l.zip"))
    s3 = boto3.client("s3")
    (statement,) = json.loads(s3.get_bucket_policy(Bucket="fanout-code")["Policy"])["Statement"]
    assert statement["Effect"] == "Deny" and statement["Principal"] == "*"
    assert statement["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
    block = s3.get_public_access_block(Bucket="fanout-code")["PublicAccessBlockConfiguration"]
    assert all(block.values())


# -- zip, plan, CLI ---------------------------------------------------------------------


def _project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    (root / "jobs" / "__pycache__").mkdir(parents=True)
    (root / "jobs" / "tests").mkdir()
    (root / "jobs" / "a.py").write_text("A = 1\n")
    (root / "jobs" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\0")
    (root / "jobs" / "tests" / "test_a.py").write_text("")
    (root / "schemas").mkdir()
    (root / "schemas" / "s.avsc").write_text("{}")
    (root / "docs").mkdir()
    (root / "docs" / "x.md").write_text("")
    return root


def test_zip_contents_and_determinism(tmp_path: Path) -> None:
    root = _project(tmp_path)
    first = build_zip(root, tmp_path / "1.zip")
    names = zipfile.ZipFile(first).namelist()
    assert names == sorted(names)
    assert "fanout/aws_lambda.py" in names
    assert "fanout/__init__.py" in names
    assert "jobs/a.py" in names
    assert "schemas/s.avsc" in names
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    assert not [n for n in names if "/tests/" in n or n.startswith("docs/")]
    assert all(i.date_time == (1980, 1, 1, 0, 0, 0) for i in zipfile.ZipFile(first).infolist())
    # Touching a file changes its mtime, not the zip.
    (root / "jobs" / "a.py").touch()
    second = build_zip(root, tmp_path / "2.zip")
    assert first.read_bytes() == second.read_bytes()
    assert 0 < first.stat().st_size < 5 * 1024 * 1024


def test_the_repos_zip_ships_jobs_and_their_data_only(tmp_path: Path) -> None:
    """What ``fanout deploy`` ships from this repository: besides ``fanout/``,
    only ``jobs/`` and ``schemas/``, and every module under ``jobs/`` is a job a
    user would copy (no test-data generators, no test helpers)."""
    names = zipfile.ZipFile(build_zip(REPO, tmp_path / "f.zip")).namelist()
    project = [n for n in names if not n.startswith("fanout/")]
    assert project and all(n.startswith(("jobs/", "schemas/")) for n in project), project
    modules = [n for n in project if n.endswith(".py")]
    assert "jobs/meter_readings.py" in modules
    for name in modules:
        assert isinstance(load_job(str(REPO / name)), Job), name
    # The example job's sample data still ships: it reads it by default on Lambda.
    assert any(n.startswith("jobs/data/readings/") and n.endswith(".csv") for n in project)


def test_zip_with_the_runtimes_bytecode(tmp_path: Path) -> None:
    """For a runtime this machine has (here: this very Python), the zip carries
    checked-hash byte-code naming /var/task sources, still reproducibly."""
    import marshal
    import sys

    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    tag = f"cpython-{version.replace('.', '')}"
    root = _project(tmp_path)
    first = build_zip(root, tmp_path / "1.zip", python_version=version)
    with zipfile.ZipFile(first) as archive:
        names = archive.namelist()
        data = archive.read(f"fanout/__pycache__/aws_lambda.{tag}.pyc")
        job = archive.read(f"jobs/__pycache__/a.{tag}.pyc")
    # Compiled from jobs/a.py, not the project's own stale __pycache__ (b"\0").
    assert marshal.loads(job[16:]).co_filename == "/var/task/jobs/a.py"
    assert len([n for n in names if n.endswith(".pyc")]) > 10
    assert int.from_bytes(data[4:8], "little") == 0b11  # PEP 552: checked hash
    assert marshal.loads(data[16:]).co_filename == "/var/task/fanout/aws_lambda.py"
    assert build_zip(root, tmp_path / "2.zip", python_version=version).read_bytes() == (
        first.read_bytes()
    )
    # A runtime without an interpreter here: sources only, as before.
    plain = build_zip(root, tmp_path / "3.zip", python_version="3.99")
    assert not [n for n in zipfile.ZipFile(plain).namelist() if n.endswith(".pyc")]


def test_zip_needs_jobs(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="jobs"):
        build_zip(tmp_path, tmp_path / "f.zip")


def test_plan_names_stack_and_resources() -> None:
    text = plan("qa", {"MemorySize": "2048"})
    assert text.startswith("stack fanout-qa: create")
    assert "MemorySize = 2048" in text
    assert "Stage = qa" in text
    assert "AWS::Lambda::Function" in text
    assert "update" in plan("qa", stack_exists=True).splitlines()[0]


def test_cli_dry_run_calls_no_aws(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import boto3

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("dry run called AWS")

    monkeypatch.setattr(boto3, "client", forbidden)
    monkeypatch.setattr(boto3.session.Session, "client", forbidden)
    root = _project(tmp_path)
    result = CliRunner().invoke(
        main, ["deploy", "--stage", "qa", "--dry-run", "--root", str(root)], standalone_mode=False
    )
    assert result.exception is None or (
        isinstance(result.exception, SystemExit) and result.exception.code == 0
    ), result.output
    assert "zip: " in result.output
    assert "stack fanout-qa" in result.output
    assert "AWS::SQS::Queue" in result.output


def test_cli_rejects_bad_parameter(tmp_path: Path) -> None:
    root = _project(tmp_path)
    args = [
        "deploy",
        "--stage",
        "qa",
        "--dry-run",
        "--root",
        str(root),
        "-p",
        "FunctionTimeout=900",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    assert "VisibilityTimeout" in result.output


def test_recovery_sweep_schedule_sends_the_sweep_message(template: dict[str, Any]) -> None:
    from fanout.messages import SWEEP_BODY, is_sweep

    sweep = template["Resources"]["RecoverySweep"]
    assert sweep["Type"] == "AWS::Scheduler::Schedule"
    target = sweep["Properties"]["Target"]
    assert target["Arn"] == {"Fn::GetAtt": ["WorkQueue", "Arn"]}
    assert target["RoleArn"] == {"Fn::GetAtt": ["SchedulerRole", "Arn"]}
    assert is_sweep(target["Input"]) and is_sweep(SWEEP_BODY)
    assert not is_sweep('{"v":1,"kind":"fanout.sweep","x":1}')
    # The function may read the DLQ it redrives, and only that one.
    statements = template["Resources"]["FunctionRole"]["Properties"]["Policies"][0][
        "PolicyDocument"
    ]["Statement"]
    (dlq,) = [s for s in statements if s["Resource"] == {"Fn::GetAtt": ["DeadLetterQueue", "Arn"]}]
    assert set(dlq["Action"]) == {"sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:GetQueueUrl"}


def test_the_stage_schedule_group_is_part_of_the_stack(template: dict[str, Any]) -> None:
    """``fanout schedule add`` puts schedules in ``fanout-<stage>`` (issue 10): the
    stack owns that group, so deleting the stack deletes them."""
    from fanout.schedules.aws import group_name

    (group,) = resources(template, "AWS::Scheduler::ScheduleGroup").values()
    assert group["Properties"]["Name"] == {"Fn::Sub": "fanout-${Stage}"}
    assert group_name("x") == "fanout-x"
    read = next(s for _, s in _statements(template) if s.get("Action") == "scheduler:GetSchedule")
    assert "schedule/fanout-${Stage}/*" in str(read["Resource"])


def test_links_in_jobs_ship_as_followed_locally_and_never_from_outside(tmp_path: Path) -> None:
    # A linked directory (jobs/data -> ../data) was left out silently, so a job
    # that listed it locally found nothing on Lambda; a linked file shipped its
    # target wherever it was (a black-box helper's find).
    root = _project(tmp_path)
    (root / "data").mkdir()
    (root / "data" / "r.csv").write_text("a,b\n")
    (root / "jobs" / "data").symlink_to(root / "data", target_is_directory=True)
    (root / "jobs" / "loop").symlink_to(root / "jobs", target_is_directory=True)  # walked once
    (root / "jobs" / "b.py").symlink_to(root / "jobs" / "a.py")
    names = zipfile.ZipFile(build_zip(root, tmp_path / "in.zip")).namelist()
    assert {"jobs/data/r.csv", "jobs/b.py", "jobs/a.py"} <= set(names)
    assert not [n for n in names if n.startswith("jobs/loop/")]

    secret = tmp_path / "creds.txt"
    secret.write_text("aws_secret_access_key = x\n")
    (root / "jobs" / "creds.txt").symlink_to(secret)
    with pytest.raises(UserError, match=r"^jobs/creds.txt is a link to .*creds.txt, outside"):
        build_zip(root, tmp_path / "out.zip")
    (root / "jobs" / "creds.txt").unlink()
    # A second name for a directory ships under both (a job may open either),
    # whatever order the directory lists them in (the review's find).
    (root / "jobs" / "b").symlink_to(root / "data", target_is_directory=True)
    names = zipfile.ZipFile(build_zip(root, tmp_path / "two.zip")).namelist()
    assert {"jobs/data/r.csv", "jobs/b/r.csv"} <= set(names)
    # schemas/ itself a link out of the project: refused too.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "secret.key").write_text("k\n")
    shutil.rmtree(root / "schemas")
    (root / "schemas").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(UserError, match=r"^schemas is a link to .*elsewhere, outside"):
        build_zip(root, tmp_path / "out.zip")
