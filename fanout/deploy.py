"""``fanout deploy``: package the code and create or update one stage's stack.

The stack is ``deploy/template.yaml`` (queue + DLQ, bucket, table, topic, the
Lambda worker and its roles). Deploying is:

1. :func:`build_zip`: the ``fanout`` package plus the project's ``jobs/`` and
   ``schemas/`` directories, byte-for-byte reproducible, so the same sources give
   the same zip and the same content-addressed key;
2. the dependency layer (:mod:`fanout.deploy_layer`): fanout's third-party
   packages but boto3 (which the runtime provides), installed by pip for the
   stack's ``PythonRuntime`` and ``Architecture``, cached between deploys;
3. upload both to a code bucket (created private, encrypted and TLS-only if
   missing; refused if it exists under another account, see
   :func:`ensure_code_bucket`; every call passes ``ExpectedBucketOwner``);
4. create the CloudFormation stack ``fanout-<stage>``, or update it.

``--dry-run`` does step 1, reports the layer (from the cache, else what pip
would install: it runs no pip) and prints :func:`plan`, calling no AWS API.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import shlex
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fanout.backends.aws.clients import error_code
from fanout.backends.aws.resources import make_private_bucket
from fanout.backends.aws.stack import stack_name
from fanout.backends.aws.store import MISSING_CODES
from fanout.deploy_files import zip_entries
from fanout.deploy_layer import (
    FUNCTION_MOUNT,
    MAX_UNZIPPED_BYTES,
    LayerSpec,
    PipRunner,
    build_layer,
    cached_layer,
    compile_command,
    distributions,
    layer_spec,
    pip_command,
    python_version,
    reproducible_zip,
    run_pip,
    runtime_python,
    unzipped_size,
)
from fanout.errors import UserError

#: The template shipped next to the package in the source tree.
TEMPLATE = Path(__file__).resolve().parents[1] / "deploy" / "template.yaml"

#: Lambda's limit for a zip uploaded through S3, unzipped size aside.
MAX_ZIP_BYTES = 50 * 1024 * 1024

#: SQS event sources want the queue's visibility timeout at least this many times
#: the function's timeout (AWS's advice), so a batch is not redelivered while the
#: function still retries it. CloudFormation cannot multiply, hence this check.
VISIBILITY_FACTOR = 6


def build_zip(
    root: Path, out: Path, *, python_version: str | None = None, run: PipRunner | None = None
) -> Path:
    """Write the function's zip to ``out`` and return it.

    Holds the installed ``fanout`` package and ``root``'s ``jobs/`` and
    ``schemas/`` (when present), without tests, docs or this machine's
    ``__pycache__``. With ``python_version`` ("3.12") and an interpreter of it
    here (see :func:`fanout.deploy_layer.runtime_python`), also the modules'
    checked-hash byte-code for ``/var/task``, which Lambda cannot write, so that
    a cold start does not compile them. Entries are in sorted order with fixed
    timestamps and modes, so equal sources give equal bytes.
    """
    entries = zip_entries(root)
    if not any(name.startswith("jobs/") for name, _ in entries):
        raise UserError(f"no jobs/ directory with files under {root}")
    python = runtime_python(python_version) if python_version else None
    if python is None:
        data = reproducible_zip(entries)
    else:
        data = _compiled_zip(entries, python, f"cpython-{python_version}".replace(".", ""), run)
    if len(data) > MAX_ZIP_BYTES:
        raise UserError(f"the zip is {len(data)} bytes, over Lambda's {MAX_ZIP_BYTES}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    return out


def _compiled_zip(
    entries: list[tuple[str, Path]], python: str, pyc_tag: str, run: PipRunner | None
) -> bytes:
    """The zip of ``entries`` plus their byte-code, compiled by ``python``."""
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory(prefix="fanout-zip-") as tmp:
        stage = Path(tmp)
        for name, path in entries:
            (stage / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, stage / name)
        # A job that does not compile fails at run time, as it would from source.
        with contextlib.suppress(UserError):
            (run or run_pip)(compile_command(python, stage, FUNCTION_MOUNT))
        staged = [
            (path.relative_to(stage).as_posix(), path)
            for path in stage.rglob("*")
            if path.is_file() and (path.suffix != ".pyc" or f".{pyc_tag}." in path.name)
        ]
        return reproducible_zip(staged)


def load_template(template: Path = TEMPLATE) -> dict[str, Any]:
    """The template as a dict; short-form tags become their long form
    (``!Ref X`` -> ``{"Ref": "X"}``, ``!GetAtt A.B`` -> ``{"Fn::GetAtt": ["A", "B"]}``).

    Needs PyYAML (a dependency of cfn-lint and awscli, not of fanout itself).
    """
    try:
        import yaml  # type: ignore[import-untyped]  # no stubs installed
    except ImportError:  # pragma: no cover - depends on the environment
        raise UserError("fanout deploy needs PyYAML: pip install pyyaml") from None

    # A SafeLoader of our own, so the tags are not registered on yaml's global one.
    loader_class: Any = type("CfnLoader", (yaml.SafeLoader,), {})

    def intrinsic(loader: Any, suffix: str, node: Any) -> dict[str, Any]:
        name = "Ref" if suffix == "Ref" else f"Fn::{suffix}"
        value: Any
        if isinstance(node, yaml.ScalarNode):
            value = loader.construct_scalar(node)
            if suffix == "GetAtt":
                value = str(value).split(".", 1)
        elif isinstance(node, yaml.SequenceNode):
            value = loader.construct_sequence(node, deep=True)
        else:
            value = loader.construct_mapping(node, deep=True)
        return {name: value}

    loader_class.add_multi_constructor("!", intrinsic)
    try:
        parsed = yaml.load(template.read_text(), Loader=loader_class)
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(f"{template} does not load: {exc}") from None
    if not isinstance(parsed, dict):
        raise UserError(f"{template} is not a CloudFormation template")
    return parsed


def parse_parameters(pairs: tuple[str, ...] | list[str]) -> dict[str, str]:
    """``KEY=VALUE`` strings as a dict of stack parameters."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--parameter {pair!r} is not KEY=VALUE")
        out[key] = value
    return out


def effective_parameters(overrides: Mapping[str, str], template: Path = TEMPLATE) -> dict[str, str]:
    """The template's defaults with ``overrides`` applied, checked.

    Raises :class:`UserError` for an unknown parameter or a visibility timeout
    under ``VISIBILITY_FACTOR`` x the function timeout.
    """
    declared: dict[str, Any] = load_template(template)["Parameters"]
    unknown = sorted(set(overrides) - set(declared))
    if unknown:
        raise UserError(f"unknown stack parameter(s): {', '.join(unknown)}")
    values = {k: str(v["Default"]) for k, v in declared.items() if "Default" in v}
    values.update(overrides)
    try:
        timeout = int(values["FunctionTimeout"])
        visibility = int(values["VisibilityTimeout"])
    except (KeyError, ValueError) as exc:
        raise UserError(f"FunctionTimeout/VisibilityTimeout must be integers: {exc}") from None
    for name, spec in declared.items():
        # CloudFormation checks these only when the stack is created: say it here.
        low, high = spec.get("MinValue"), spec.get("MaxValue")
        if name in overrides and (low is not None or high is not None):
            try:
                value = float(values[name])
            except ValueError:
                raise UserError(f"{name} must be a number, not {values[name]!r}") from None
            if (low is not None and value < low) or (high is not None and value > high):
                raise UserError(f"{name} {values[name]} is not between {low} and {high}")
    if visibility < VISIBILITY_FACTOR * timeout:
        raise UserError(
            f"VisibilityTimeout {visibility} is under {VISIBILITY_FACTOR} x FunctionTimeout"
            f" ({VISIBILITY_FACTOR * timeout})"
        )
    return values


def plan(
    stage: str,
    parameters: Mapping[str, str] | None = None,
    *,
    stack_exists: bool | None = None,
    template: Path = TEMPLATE,
) -> str:
    """A description of what deploying ``stage`` would create or update.

    ``stack_exists`` None means "not looked up" (a dry run calls no AWS API).
    """
    params = effective_parameters(dict(parameters or {}), template)
    params["Stage"] = stage
    body = load_template(template)
    name = stack_name(stage)
    if stack_exists is None:
        action = "create, or update if it exists (not looked up: dry run)"
    else:
        action = "update" if stack_exists else "create"
    lines = [f"stack {name}: {action}", "parameters:"]
    for key in sorted(params):
        lines.append(f"  {key} = {params[key]}")
    lines.append("resources:")
    for logical, resource in body["Resources"].items():
        lines.append(f"  {logical:<20} {resource['Type']}")
    return "\n".join(lines)


# -- the dependency layer -------------------------------------------------------------


def stack_layer_spec(root: Path, parameters: Mapping[str, str]) -> LayerSpec:
    """The layer the stack's ``PythonRuntime`` and ``Architecture`` call for."""
    return layer_spec(
        root,
        parameters.get("PythonRuntime", "python3.12"),
        parameters.get("Architecture", "x86_64"),
    )


def describe_layer(path: Path) -> str:
    """One line on a layer zip: its size, unzipped size and distributions."""
    dists = distributions(path)
    return (
        f"layer: {path}: {path.stat().st_size:,} bytes ({unzipped_size(path):,} unzipped),"
        f" {len(dists)} distributions: {', '.join(dists) or '(none found)'}"
    )


def _given_layer(path: Path) -> Path:
    """A layer zip passed with ``--layer-zip``, checked: a zip with ``python/`` in it."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile) as exc:
        raise UserError(f"--layer-zip {path}: not a readable zip ({exc})") from None
    if not any(name.startswith("python/") for name in names):
        raise UserError(
            f"--layer-zip {path}: no python/ directory (Lambda adds python/ to sys.path)"
        )
    return path


def check_unzipped(function_zip: Path, layer: Path) -> int:
    """The unzipped bytes of function + layer; :class:`UserError` over Lambda's limit."""
    total = unzipped_size(function_zip) + unzipped_size(layer)
    if total > MAX_UNZIPPED_BYTES:
        raise UserError(
            f"function and layer are {total:,} bytes unzipped, over Lambda's {MAX_UNZIPPED_BYTES:,}"
        )
    return total


def bytecode_note(version: str) -> str | None:
    """A warning when this machine cannot byte-compile for Python ``version``."""
    if runtime_python(version) is not None:
        return None
    return (
        f"note: no python{version} here to byte-compile zip and layer: every cold start"
        " compiles their modules (about twice the import time); deploy from a machine"
        f" with python{version}, or pick a PythonRuntime this one has"
    )


def layer_report(
    root: Path, parameters: Mapping[str, str], layer_zip: Path | None = None
) -> list[str]:
    """What a dry run says about the layer: the given or cached zip, else the pip
    command a deploy would run. Runs no pip and calls no AWS API."""
    if layer_zip is not None:
        return [describe_layer(_given_layer(layer_zip))]
    spec = stack_layer_spec(root, effective_parameters(parameters))
    lines = [f"layer: {spec.describe()}"]
    cached = cached_layer(spec)
    if cached.is_file():
        lines.append(f"{describe_layer(cached)} (cached)")
    else:
        command = shlex.join(pip_command(spec, Path("TMPDIR/python")))
        lines.append(f"layer: not built yet; a deploy runs (needs PyPI): {command}")
    note = bytecode_note(spec.python_version)
    return [*lines, note] if note else lines


def resolve_layer(
    root: Path,
    parameters: Mapping[str, str],
    *,
    layer_zip: Path | None = None,
    rebuild: bool = False,
    pip: PipRunner | None = None,
    echo: Callable[[str], None] | None = None,
) -> Path:
    """The layer zip to deploy: ``layer_zip`` if given, else the cached layer for
    the stack's parameters, built with ``pip`` when missing (or ``rebuild``)."""
    if layer_zip is not None:
        return _given_layer(layer_zip)
    spec = stack_layer_spec(root, parameters)
    if echo is not None and (rebuild or not cached_layer(spec).is_file()):
        echo(f"layer: building {spec.describe()} (pip, from PyPI)")
    return build_layer(spec, pip=pip, rebuild=rebuild)


# -- the real deployment (AWS calls) ------------------------------------------------


#: What S3 answers a request whose ``ExpectedBucketOwner`` is not the bucket's owner.
_DENIED_CODES = frozenset({"403", "AccessDenied", "Forbidden"})


def _not_ours(bucket: str, account: str) -> UserError:
    return UserError(
        f"code bucket {bucket} exists but is not owned by this account ({account}):"
        " refusing to upload the function's code to it; pass --code-bucket NAME"
        " of a bucket this account owns"
    )


def _owned_by_caller(s3: Any, bucket: str) -> bool | None:
    """Whether ``bucket`` is among the caller's own buckets (``ListBuckets`` lists
    only those); None when the caller may not list them."""
    try:
        pages = s3.get_paginator("list_buckets").paginate(Prefix=bucket)
        return any(b["Name"] == bucket for page in pages for b in page.get("Buckets", ()))
    except Exception as exc:
        if error_code(exc) in _DENIED_CODES:
            return None
        raise


def ensure_code_bucket(s3: Any, bucket: str, region: str, account: str) -> None:
    """Create ``bucket`` (private, encrypted, TLS only) unless ``account`` owns it
    already; :class:`UserError` when it exists under another account.

    S3 bucket names are global and the default name is predictable: whoever
    creates it first owns it, and would receive (and could swap) the code.
    Ownership is read from ``ListBuckets`` (only the caller's own), else from
    ``HeadBucket`` with ``ExpectedBucketOwner`` (403 for another owner)."""
    owned = _owned_by_caller(s3, bucket)
    if owned is None:
        try:
            s3.head_bucket(Bucket=bucket, ExpectedBucketOwner=account)
            owned = True
        except Exception as exc:
            code = error_code(exc)
            if code in _DENIED_CODES:
                raise _not_ours(bucket, account) from None
            if code not in ("404", "NoSuchBucket", "NotFound"):
                raise
            owned = False
    if owned:
        return
    try:
        make_private_bucket(s3, bucket, region, owner=account, tls_only=True)
    except Exception as exc:
        if error_code(exc) == "BucketAlreadyExists" or error_code(exc) in _DENIED_CODES:
            raise _not_ours(bucket, account) from None
        raise


def _upload(s3: Any, bucket: str, key: str, data: bytes, account: str) -> None:
    """Put ``data`` at ``key``, only into a bucket ``account`` owns, with its
    SHA-256 checksum (S3 refuses a body that does not match it)."""
    try:
        s3.put_object(
            Bucket=bucket,
            Key=key,
            Body=data,
            ChecksumAlgorithm="SHA256",
            ExpectedBucketOwner=account,
        )
    except Exception as exc:
        # The bucket changed hands since ensure_code_bucket (deleted, re-created).
        if error_code(exc) in _DENIED_CODES:
            raise _not_ours(bucket, account) from None
        raise


def _stack_exists(cfn: Any, name: str) -> bool:
    try:
        stacks = cfn.describe_stacks(StackName=name)["Stacks"]
    except Exception as exc:
        if error_code(exc) == "ValidationError":  # "Stack with id ... does not exist"
            return False
        raise
    # A stack whose creation failed and rolled back cannot be updated, only deleted.
    status = stacks[0]["StackStatus"] if stacks else ""
    if status == "ROLLBACK_COMPLETE":
        raise UserError(f"stack {name} is ROLLBACK_COMPLETE: delete it, then deploy again")
    return bool(stacks) and status != "DELETE_COMPLETE"


def _uploaded(s3: Any, bucket: str, key: str, data: bytes, account: str) -> bool:
    """Whether ``key`` holds exactly ``data`` already: the object's SHA-256 (as S3
    recorded it at upload) must be the local one, so a layer replaced in the
    bucket is uploaded again rather than trusted for its name."""
    try:
        head = s3.head_object(
            Bucket=bucket, Key=key, ChecksumMode="ENABLED", ExpectedBucketOwner=account
        )
    except Exception as exc:
        if error_code(exc) in MISSING_CODES:
            return False
        if error_code(exc) in _DENIED_CODES:
            raise _not_ours(bucket, account) from None
        raise
    digest = base64.b64encode(hashlib.sha256(data).digest()).decode()
    return bool(head.get("ChecksumSHA256") == digest)


def submitter_patterns(caller_arn: str) -> str:
    """The ``Submitters`` parameter for the principal of ``caller_arn``: its
    ``aws:PrincipalArn`` as the work queue's policy sees it. An assumed role's
    session (``arn:aws:sts::ACCOUNT:assumed-role/NAME/SESSION``) is its role,
    with or without a path; a user or the root is itself."""
    parts = caller_arn.split(":", 5)
    if len(parts) == 6 and parts[2] == "sts" and parts[5].startswith("assumed-role/"):
        partition, account, name = parts[1], parts[4], parts[5].split("/")[1]
        role = f"arn:{partition}:iam::{account}:role"
        return f"{role}/{name},{role}/*/{name}"
    return caller_arn


def deploy(
    stage: str,
    root: Path,
    *,
    code_bucket: str | None = None,
    parameters: Mapping[str, str] | None = None,
    template: Path = TEMPLATE,
    session: Any = None,
    layer_zip: Path | None = None,
    rebuild_layer: bool = False,
    pip: PipRunner | None = None,
    echo: Callable[[str], None] | None = None,
) -> dict[str, str]:
    """Build, upload and create-or-update the stack of ``stage``; returns its outputs.

    ``layer_zip``: a prebuilt dependency layer instead of the cached or built one
    (see :func:`resolve_layer`); ``echo`` receives progress lines.
    """
    import tempfile

    import boto3

    params = effective_parameters(dict(parameters or {}), template)
    # The layer before any AWS call: pip fails for want of PyPI or of a wheel for
    # the runtime, and should do so before anything exists in the account.
    layer = resolve_layer(
        root, params, layer_zip=layer_zip, rebuild=rebuild_layer, pip=pip, echo=echo
    )
    runtime = python_version(params.get("PythonRuntime", "python3.12"))
    with tempfile.TemporaryDirectory() as tmp:
        function_zip = build_zip(root, Path(tmp) / "fanout.zip", python_version=runtime, run=pip)
        unzipped = check_unzipped(function_zip, layer)
        data = function_zip.read_bytes()
    if echo is not None:
        note = bytecode_note(runtime)
        if note:
            echo(note)
        echo(f"zip: {len(data):,} bytes")
        echo(describe_layer(layer))
        echo(f"unzipped, function and layer: {unzipped:,} bytes of {MAX_UNZIPPED_BYTES:,}")
    session = session or boto3.session.Session()
    region = session.region_name or "us-east-1"
    s3 = session.client("s3", region_name=region)
    cfn = session.client("cloudformation", region_name=region)
    identity = session.client("sts", region_name=region).get_caller_identity()
    account = str(identity["Account"])
    if code_bucket is None:
        code_bucket = f"fanout-{stage}-code-{account}-{region}"
    ensure_code_bucket(s3, code_bucket, region, account)

    # Content-addressed: CloudFormation only redeploys the function when CodeKey
    # changes, and equal sources give equal zips (see build_zip).
    key = f"fanout/{stage}/{hashlib.sha256(data).hexdigest()[:20]}.zip"
    _upload(s3, code_bucket, key, data, account)
    # The layer likewise (a new LayerKey publishes a new layer version); it is
    # megabytes and rarely changes, so an upload already there is skipped.
    layer_data = layer.read_bytes()
    layer_key = f"fanout/{stage}/layer-{hashlib.sha256(layer_data).hexdigest()[:20]}.zip"
    if not _uploaded(s3, code_bucket, layer_key, layer_data, account):
        _upload(s3, code_bucket, layer_key, layer_data, account)

    if "Submitters" not in (parameters or {}):
        # The deploying principal may send to the work queue (submit runs);
        # -p Submitters=... names others (see the template).
        params["Submitters"] = submitter_patterns(str(identity["Arn"]))
    params.update(Stage=stage, CodeBucket=code_bucket, CodeKey=key, LayerKey=layer_key)
    name = stack_name(stage)
    request: dict[str, Any] = {
        "StackName": name,
        "TemplateBody": template.read_text(),
        "Parameters": [{"ParameterKey": k, "ParameterValue": v} for k, v in params.items()],
        # The roles are unnamed (CloudFormation names them), so CAPABILITY_IAM is
        # enough; CAPABILITY_NAMED_IAM is not asked for.
        "Capabilities": ["CAPABILITY_IAM"],
        "Tags": [{"Key": "fanout:stage", "Value": stage}],
    }
    if _stack_exists(cfn, name):
        try:
            cfn.update_stack(**request)
        except Exception as exc:
            # Same template, code and parameters: nothing to do is not an error.
            if "No updates are to be performed" not in str(exc):
                raise
        else:
            cfn.get_waiter("stack_update_complete").wait(StackName=name)
    else:
        cfn.create_stack(**request)
        cfn.get_waiter("stack_create_complete").wait(StackName=name)
    stack = cfn.describe_stacks(StackName=name)["Stacks"][0]
    return {o["OutputKey"]: o["OutputValue"] for o in stack.get("Outputs", [])}
