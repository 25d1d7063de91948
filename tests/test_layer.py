"""The dependency layer of ``fanout deploy`` (fanout/deploy_layer.py): what pip is
asked for, the zip it becomes, the cache, the dry run, and a real build from PyPI
that proves function zip + layer are self-contained (but for boto3)."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import platform
import re
import socket
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from fanout.cli import main
from fanout.deploy import build_zip
from fanout.deploy_layer import (
    RUNTIME_PROVIDED,
    LayerSpec,
    build_layer,
    cache_dir,
    distributions,
    layer_requirements,
    layer_spec,
    local_pins,
    python_version,
    remove_runtime_provided,
)
from fanout.errors import UserError
from support.helpers import fake_aws

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Layers are cached under the test's own XDG_CACHE_HOME, never the user's."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "fanout" / "layers"


def _install_runtime_dists(target: Path) -> None:
    """What a real install into ``target`` holds of the runtime's distributions
    when a package depends on them (croniter: python-dateutil, which needs six),
    each with the RECORD pip writes (a console script's path leads outside)."""
    dateutil = target / "dateutil"
    (dateutil / "tz").mkdir(parents=True)
    for name in ("__init__.py", "parser.py", "tz/__init__.py", "tz/tz.py"):
        (dateutil / name).write_text("")
    info = target / "python_dateutil-2.9.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Name: python-dateutil\nVersion: 2.9.0\n")
    (info / "top_level.txt").write_text("dateutil\n")
    rows = [
        "dateutil/__init__.py,sha256=x,1",
        "dateutil/parser.py,,",
        '"dateutil/tz/__init__.py",,',
    ]
    rows += ["dateutil/tz/tz.py,,", "python_dateutil-2.9.0.dist-info/METADATA,,"]
    rows += ["python_dateutil-2.9.0.dist-info/RECORD,,", "../bin/dateutil-tool,,"]
    (info / "RECORD").write_text("\n".join(rows) + "\n")
    (target / "six.py").write_text("")
    six = target / "six-1.17.0.dist-info"
    six.mkdir()
    (six / "METADATA").write_text("Name: six\nVersion: 1.17.0\n")
    (six / "RECORD").write_text("six.py,,\nsix-1.17.0.dist-info/METADATA,,\n")


class FakePip:
    """Stands in for pip: records each command (and its constraints file) and
    installs a tiny package into its ``--target``, with the litter a real
    install leaves (byte-code of another Python, RECORD, console scripts, a test
    suite, runtime-provided dependencies). The byte-compiler, run through the
    same runner, really runs."""

    def __init__(self) -> None:
        self.commands: list[list[str]] = []
        self.compiled: list[list[str]] = []
        self.constraints: list[list[str]] = []

    def __call__(self, command: Sequence[str]) -> None:
        if "compileall" in command:
            self.compiled.append(list(command))
            subprocess.run(command, check=True, capture_output=True)
            return
        self.commands.append(list(command))
        if "--constraint" in command:
            pins = Path(command[command.index("--constraint") + 1]).read_text()
            self.constraints.append(pins.splitlines())
        target = Path(command[command.index("--target") + 1])
        package = target / "fakedep"
        (package / "__pycache__").mkdir(parents=True)
        (package / "tests").mkdir()
        (package / "__init__.py").write_text("VALUE = 1\n")
        (package / "_speedups.so").write_bytes(b"\x7fELF fake")
        (package / "_speedups.so").chmod(0o755)
        (package / "__pycache__" / "__init__.cpython-39.pyc").write_bytes(b"\0")
        (package / "tests" / "test_fakedep.py").write_text("")
        info = target / "fakedep-1.2.dist-info"
        info.mkdir()
        (info / "METADATA").write_text("Name: fakedep\nVersion: 1.2\n")
        (info / "RECORD").write_text("fakedep/__init__.py,,\n")
        (target / "bin").mkdir()
        (target / "bin" / "fakedep").write_text("#!/usr/bin/python3\n")
        _install_runtime_dists(target)

    def option(self, name: str, index: int = -1) -> list[str]:
        """The values of ``name`` in the last command."""
        command = self.commands[index]
        return [command[i + 1] for i, arg in enumerate(command) if arg == name]


def _project(tmp_path: Path, job: str = "A = 1\n") -> Path:
    root = tmp_path / "project"
    (root / "jobs").mkdir(parents=True)
    (root / "jobs" / "a.py").write_text(job)
    return root


def _names(requirements: Sequence[str]) -> set[str]:
    """The distribution names of requirement strings."""
    return {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower() for r in requirements}


def _declared() -> tuple[set[str], set[str]]:
    """Names of pyproject's dependencies and of its crawl extra."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return _names(project["dependencies"]), _names(project["optional-dependencies"]["crawl"])


# -- what pip is asked for ------------------------------------------------------------------


def test_pip_command_targets_the_runtime_and_architecture(tmp_path: Path) -> None:
    pip = FakePip()
    root = _project(tmp_path)
    build_layer(layer_spec(root, "python3.13", "arm64"), pip=pip)
    (command,) = pip.commands
    assert command[:4] == [sys.executable, "-m", "pip", "install"]
    # pip does not widen manylinux_2_N to lower N: every glibc level from the
    # runtime's (Amazon Linux 2023: 2.34) down to 2.17 is listed, best first.
    platforms = pip.option("--platform")
    assert platforms[0] == "manylinux_2_34_aarch64"
    assert platforms[-2:] == ["manylinux_2_17_aarch64", "manylinux2014_aarch64"]
    assert "manylinux_2_24_aarch64" in platforms and "manylinux_2_28_aarch64" in platforms
    assert len(platforms) == len(set(platforms)) == 34 - 17 + 2
    assert pip.option("--python-version") == ["3.13"]
    assert pip.option("--implementation") == ["cp"]
    assert "--only-binary=:all:" in command
    assert pip.option("--target")[0].endswith("/python")

    build_layer(layer_spec(root, "python3.12", "x86_64"), pip=pip)
    assert pip.option("--platform")[0] == "manylinux_2_34_x86_64"
    assert pip.option("--platform")[-1] == "manylinux2014_x86_64"
    assert pip.option("--python-version") == ["3.12"]

    # python3.11 runs on Amazon Linux 2: glibc 2.26, no newer manylinux wheel.
    build_layer(layer_spec(root, "python3.11", "x86_64"), pip=pip)
    platforms = pip.option("--platform")
    assert platforms[0] == "manylinux_2_26_x86_64" and "manylinux_2_27_x86_64" not in platforms
    assert platforms[-2:] == ["manylinux_2_17_x86_64", "manylinux2014_x86_64"]


def test_pip_is_constrained_to_this_environments_versions(tmp_path: Path) -> None:
    pip = FakePip()
    spec = layer_spec(_project(tmp_path), "python3.12", "x86_64")
    build_layer(spec, pip=pip)
    (pins,) = pip.constraints
    assert pins == list(spec.pins)
    # The direct requirements and, transitively, their dependencies, the
    # runtime-provided ones included (croniter -> python-dateutil -> six).
    for name in ("click", "pydantic", "pydantic-core", "croniter", "python-dateutil", "six"):
        assert f"{name}=={importlib.metadata.version(name)}" in pins
    assert not any(name.startswith("boto3==") for name in pins)
    assert spec.unpinned == ()  # everything fanout needs is installed here

    # Another version here is another layer (the pins are in the cache key).
    bumped = dataclasses.replace(spec, pins=tuple(p + ".1" for p in spec.pins))
    assert bumped.key != spec.key
    build_layer(bumped, pip=pip)
    assert len(pip.commands) == 2

    # Nothing installed here to pin against: no constraints file at all.
    build_layer(LayerSpec(("fakedep",), "3.12"), pip=pip)
    assert "--constraint" not in pip.commands[-1] and len(pip.constraints) == 2


def test_what_is_not_installed_here_is_left_unpinned() -> None:
    pins, unpinned = local_pins(
        ["six>=1.5", "no-such-dist-for-fanout>=1", 'not-here-either; sys_platform == "win32"']
    )
    assert pins == (f"six=={importlib.metadata.version('six')}",)  # six depends on nothing
    # A conditional dependency this machine lacks is another platform's business.
    assert unpinned == ("no-such-dist-for-fanout",)
    spec = LayerSpec(
        ("six>=1.5", "no-such-dist-for-fanout>=1"), "3.12", pins=pins, unpinned=unpinned
    )
    assert "not installed here, so unpinned: no-such-dist-for-fanout" in spec.describe()
    assert pins[0] in spec.describe()


def test_requirements_are_pyprojects_less_what_the_runtime_has(tmp_path: Path) -> None:
    required, crawl = _declared()
    plain = _names(layer_requirements(crawl=False))
    assert plain == required - RUNTIME_PROVIDED
    assert {"pydantic", "fastavro"} <= plain
    assert "boto3" not in plain
    assert _names(layer_requirements(crawl=True)) == plain | crawl


@pytest.mark.parametrize(
    ("job", "crawl"),
    [
        ("import scrapy\n", True),
        ("from fanout.crawl import CrawlJob\n", True),
        ("def f():\n    import scrapy.http\n", True),
        ("from fanout import Job\nNOTE = 'no scrapy here'\n", False),
        ("import scrapyish\n", False),
    ],
)
def test_scrapy_only_for_projects_with_crawl_jobs(tmp_path: Path, job: str, crawl: bool) -> None:
    requirements = layer_spec(_project(tmp_path, job), "python3.12", "x86_64").requirements
    assert ("scrapy" in _names(requirements)) is crawl


def test_bad_runtime_or_architecture_is_a_user_error(tmp_path: Path) -> None:
    assert python_version("python3.14") == "3.14"
    with pytest.raises(UserError, match="PythonRuntime"):
        python_version("nodejs22.x")
    with pytest.raises(UserError, match="Architecture"):
        layer_spec(_project(tmp_path), "python3.12", "sparc")


# -- the zip and the cache --------------------------------------------------------------------


def test_runtime_provided_distributions_are_removed(tmp_path: Path) -> None:
    """Found by their RECORD, whatever their directories are called: dateutil/
    for python-dateutil, the module six.py for six; nothing else goes."""
    target = tmp_path / "python"
    (target / "fakedep").mkdir(parents=True)
    (target / "fakedep" / "__init__.py").write_text("")
    (target / "fakedep-1.2.dist-info").mkdir()
    (target / "fakedep-1.2.dist-info" / "RECORD").write_text("fakedep/__init__.py,,\n")
    _install_runtime_dists(target)
    (target / "dateutil" / "__pycache__").mkdir()
    (target / "dateutil" / "__pycache__" / "parser.cpython-312.pyc").write_bytes(b"")
    outside = tmp_path / "bin" / "dateutil-tool"  # in RECORD as ../bin/dateutil-tool
    outside.parent.mkdir()
    outside.write_text("")

    assert remove_runtime_provided(target) == ["python-dateutil", "six"]
    left = sorted(p.relative_to(target).as_posix() for p in target.rglob("*"))
    kept = ["fakedep", "fakedep-1.2.dist-info", "fakedep-1.2.dist-info/RECORD"]
    assert left == [*kept, "fakedep/__init__.py"]
    assert outside.is_file()
    assert remove_runtime_provided(target) == []

    # A runtime distribution whose files cannot be told: an error, not a guess.
    (target / "urllib3-2.0.dist-info").mkdir()
    with pytest.raises(
        UserError, match=r"urllib3 installed: urllib3-2\.0\.dist-info has no RECORD"
    ):
        remove_runtime_provided(target)


def test_layer_zip_layout(tmp_path: Path) -> None:
    layer = build_layer(LayerSpec(("fakedep",), "3.12", "x86_64"), pip=FakePip())
    with zipfile.ZipFile(layer) as archive:
        infos = archive.infolist()
    names = [i.filename for i in infos]
    assert names == sorted(names)
    assert names == [
        "python/fakedep-1.2.dist-info/METADATA",
        "python/fakedep/__init__.py",
        "python/fakedep/_speedups.so",
    ]
    assert all(i.date_time == (1980, 1, 1, 0, 0, 0) for i in infos)
    modes = {i.filename: i.external_attr >> 16 for i in infos}
    assert modes["python/fakedep/_speedups.so"] == 0o755
    assert modes["python/fakedep/__init__.py"] == 0o644


def test_layer_ships_the_runtimes_bytecode(tmp_path: Path, cache: Path) -> None:
    """With an interpreter of the runtime's version at hand (here: this one),
    the layer carries checked-hash .pyc files that name /opt/python sources."""
    import marshal

    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    tag = f"cpython-{version.replace('.', '')}"
    spec = layer_spec(_project(tmp_path), f"python{version}", "x86_64")
    assert spec.bytecode
    pip = FakePip()
    layer = build_layer(spec, pip=pip)
    assert len(pip.compiled) == 1
    pyc = f"python/fakedep/__pycache__/__init__.{tag}.pyc"
    with zipfile.ZipFile(layer) as archive:
        names = archive.namelist()
        data = archive.read(pyc)
    assert [n for n in names if n.endswith(".pyc")] == [pyc]  # not cpython-39's
    assert int.from_bytes(data[4:8], "little") == 0b11  # PEP 552: checked hash
    assert marshal.loads(data[16:]).co_filename == "/opt/python/fakedep/__init__.py"
    # Reproducible, byte-code included.
    assert build_layer(spec, pip=pip, rebuild=True).read_bytes() == layer.read_bytes()
    # A runtime with no interpreter here: sources only.
    assert not layer_spec(_project(tmp_path / "b"), "python3.99", "x86_64").bytecode


def test_layer_is_cached_by_what_pip_was_asked(tmp_path: Path, cache: Path) -> None:
    root = _project(tmp_path)
    pip = FakePip()
    spec = layer_spec(root, "python3.12", "x86_64")
    first = build_layer(spec, pip=pip)
    assert first.parent == cache == cache_dir()
    again = build_layer(spec, pip=pip)
    assert again == first and len(pip.commands) == 1
    # Another runtime or CPU is another layer.
    other = build_layer(layer_spec(root, "python3.13", "x86_64"), pip=pip)
    arm = build_layer(layer_spec(root, "python3.12", "arm64"), pip=pip)
    assert len({first, other, arm}) == 3 and len(pip.commands) == 3
    # Rebuilt from the same files: the same bytes.
    data = first.read_bytes()
    assert build_layer(spec, pip=pip, rebuild=True).read_bytes() == data
    assert len(pip.commands) == 4


def test_pip_failure_is_a_user_error_and_caches_nothing(tmp_path: Path, cache: Path) -> None:
    def failing(command: Sequence[str]) -> None:
        raise UserError("pip could not build the dependency layer: no network")

    with pytest.raises(UserError, match="no network"):
        build_layer(layer_spec(_project(tmp_path), "python3.12", "x86_64"), pip=failing)
    assert not cache.exists() or not list(cache.iterdir())


# -- the CLI's dry run -----------------------------------------------------------------------


def _dry_run(root: Path, *args: str) -> Any:
    return CliRunner().invoke(
        main, ["deploy", "--stage", "qa", "--dry-run", "--root", str(root), *args]
    )


def test_dry_run_runs_no_pip_and_reports_the_layer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_run = subprocess.run

    def forbidden(command: Sequence[str], *args: Any, **kwargs: Any) -> Any:
        # Looking for an interpreter of the runtime's version is fine; pip is not.
        assert "pip" not in command, "the dry run ran pip"
        return real_run(command, *args, **kwargs)

    root = _project(tmp_path)
    with monkeypatch.context() as patch:
        patch.setattr(subprocess, "run", forbidden)
        result = _dry_run(root, "-p", "PythonRuntime=python3.13", "-p", "Architecture=arm64")
    assert result.exit_code == 0, result.output
    assert "not built yet" in result.output
    assert "--python-version 3.13" in result.output
    assert "--platform manylinux2014_aarch64" in result.output
    assert "--constraint TMPDIR/constraints.txt" in result.output
    assert "pinned to this environment's versions:" in result.output
    assert f"pydantic=={importlib.metadata.version('pydantic')}" in result.output

    # Once built (here by the fake pip), the dry run shows the cached layer.
    build_layer(layer_spec(root, "python3.13", "arm64"), pip=FakePip())
    with monkeypatch.context() as patch:
        patch.setattr(subprocess, "run", forbidden)
        result = _dry_run(root, "-p", "PythonRuntime=python3.13", "-p", "Architecture=arm64")
    assert result.exit_code == 0, result.output
    assert "(cached)" in result.output
    assert "fakedep 1.2" in result.output


def test_dry_run_with_a_given_layer_zip(tmp_path: Path) -> None:
    root = _project(tmp_path)
    given = build_layer(layer_spec(root, "python3.12", "x86_64"), pip=FakePip())
    result = _dry_run(root, "--layer-zip", str(given))
    assert result.exit_code == 0, result.output
    assert f"layer: {given}:" in result.output

    not_a_layer = tmp_path / "x.zip"
    with zipfile.ZipFile(not_a_layer, "w") as archive:
        archive.writestr("fakedep/__init__.py", "")
    result = _dry_run(root, "--layer-zip", str(not_a_layer))
    assert result.exit_code == 2
    assert "error: --layer-zip" in result.output and "python/" in result.output

    result = _dry_run(root, "-p", "Architecture=sparc")
    assert result.exit_code == 2 and "Architecture" in result.output


# -- fanout deploy under moto ------------------------------------------------------------------


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    from moto import mock_aws
    from moto.awslambda.models import LayerVersion

    fake_aws(monkeypatch)
    # moto 5.2 gap: ``!Ref`` of a LayerVersion is moto's object, not the ARN
    # CloudFormation documents; moto's function update then fails on Layers.
    monkeypatch.setattr(
        LayerVersion, "physical_resource_id", property(lambda self: self.arn), raising=False
    )
    with mock_aws():
        yield


def test_deploy_builds_uploads_and_reuses_the_layer(
    aws: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import boto3

    pip = FakePip()
    monkeypatch.setattr("fanout.deploy_layer.run_pip", pip)
    root = _project(tmp_path)
    args = ["deploy", "--stage", "t", "--root", str(root), "--code-bucket", "code"]
    args += ["-p", "PythonRuntime=python3.13", "-p", "Architecture=arm64"]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    assert "layer: building" in first.output and "arm64" in first.output
    assert re.search(r"layer: .*: [\d,]+ bytes \([\d,]+ unzipped\), 1 distributions", first.output)
    assert pip.option("--python-version") == ["3.13"]
    assert pip.option("--platform")[0] == "manylinux_2_34_aarch64"

    s3 = boto3.client("s3")
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="code")["Contents"])
    (layer_key,) = [k for k in keys if "/layer-" in k]
    lam = boto3.client("lambda")
    (layer,) = lam.list_layers()["Layers"]
    assert layer["LatestMatchingVersion"]["CompatibleRuntimes"] == ["python3.13"]
    stack = boto3.client("cloudformation").describe_stacks(StackName="fanout-t")["Stacks"][0]
    params = {p["ParameterKey"]: p["ParameterValue"] for p in stack["Parameters"]}
    assert params["LayerKey"] == layer_key
    assert params["Architecture"] == "arm64"

    # Again: the cached layer, no pip, the same key (not uploaded twice).
    uploads: list[str] = []
    make_client = boto3.session.Session.client

    def spying_client(self: Any, *args: Any, **kwargs: Any) -> Any:
        made = make_client(self, *args, **kwargs)
        made.meta.events.register(
            "provide-client-params.s3.PutObject", lambda params, **_: uploads.append(params["Key"])
        )
        return made

    monkeypatch.setattr(boto3.session.Session, "client", spying_client)
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output
    assert "layer: building" not in again.output
    assert len(pip.commands) == 1
    assert uploads and layer_key not in uploads  # the function's zip was put, not the layer
    keys_after = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="code")["Contents"])
    assert keys_after == keys


# -- a real layer, from PyPI --------------------------------------------------------------------


def _pypi_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
        socket.create_connection(("files.pythonhosted.org", 443), timeout=5).close()
    except OSError:
        return False
    return True


#: Run with ``python -I -S``: no site-packages, so every import must come from the
#: function's directory, the layer's python/, or the runtime's boto3 stand-in.
SELF_CONTAINED = """\
import importlib, json, pathlib, sys
from datetime import datetime, timezone
function, layer, runtime = sys.argv[1:4]
sys.path[:0] = [function, layer, runtime]
import fanout.aws_lambda
skipped = []
for path in sorted(pathlib.Path(function, "fanout").rglob("*.py")):
    name = ".".join(path.relative_to(function).with_suffix("").parts).removesuffix(".__init__")
    if name.startswith("fanout.crawl"):
        skipped.append(name)  # Scrapy: only in the layers of projects with crawl jobs
        continue
    importlib.import_module(name)
from fanout.jobs import load_job
from fanout.avro import RecordWriter
job = load_job(function + "/jobs/meter_readings.py")
writer = RecordWriter(job.schema)
when = datetime(2026, 1, 1, tzinfo=timezone.utc)
writer.add({"meter_id": "M1", "read_at": when, "kwh": 1.0, "adjusted_kwh": 1.0,
            "source": "x.csv", "line": 1})
data = writer.finish()
import croniter  # imported when a schedule is first evaluated: it must be in the layer
where = {}
for name in ("fanout", "pydantic", "pydantic_core", "fastavro", "click", "croniter",
             "boto3", "botocore", "dateutil", "six"):
    where[name] = sys.modules[name].__file__
print(json.dumps({"where": where, "skipped": skipped, "avro": len(data)}))
"""


def _runtime_stand_in(directory: Path) -> Path:
    """Links to this environment's copies of what Lambda's runtime provides
    (boto3 and its dependencies), as the runtime's own directory would hold them."""
    import importlib.util

    directory.mkdir()
    for module in ("boto3", "botocore", "s3transfer", "jmespath", "urllib3", "dateutil", "six"):
        spec = importlib.util.find_spec(module)
        assert spec is not None and spec.origin is not None, module
        origin = Path(spec.origin)
        source = origin.parent if origin.name == "__init__.py" else origin
        (directory / source.name).symlink_to(source)
    return directory


def test_function_and_layer_are_self_contained(tmp_path: Path) -> None:
    """Builds a real layer with pip from PyPI, for this interpreter's Python and
    CPU (the layer of a deploy is the same command with the runtime's), then
    imports every fanout module but the crawl ones with no site-packages at all.
    Takes about 8 s (pip's download cache helps)."""
    cpu = {"x86_64": "x86_64", "aarch64": "arm64"}.get(platform.machine())
    if sys.platform != "linux" or cpu is None:
        pytest.skip("manylinux wheels only import on Linux x86_64 / aarch64")
    if not _pypi_reachable():
        pytest.skip("PyPI (pypi.org, files.pythonhosted.org) is unreachable from here")
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    requirements = layer_requirements(crawl=False)
    pins, unpinned = local_pins(requirements)
    spec = LayerSpec(requirements, version, cpu, bytecode=True, pins=pins, unpinned=unpinned)
    layer = build_layer(spec)
    # The runtime's distributions (python-dateutil and six come with croniter)
    # are not in the layer, where they would shadow the runtime's own...
    shipped = {
        re.sub(r"[-_.]+", "-", d.split()[0]).lower(): d.split()[1] for d in distributions(layer)
    }
    assert RUNTIME_PROVIDED.isdisjoint(shipped), sorted(RUNTIME_PROVIDED & set(shipped))
    with zipfile.ZipFile(layer) as archive:
        tops = {name.split("/")[1] for name in archive.namelist()}
    assert tops.isdisjoint({"dateutil", "six.py", "boto3", "botocore", "urllib3", "jmespath"})
    # ...and every distribution in it is the version installed here.
    assert shipped == {
        p.split("==")[0]: p.split("==")[1] for p in pins if p.split("==")[0] in shipped
    }
    assert {"pydantic", "croniter", "fastavro"} <= shipped.keys()
    function = build_zip(REPO, tmp_path / "function.zip", python_version=version)
    zipfile.ZipFile(function).extractall(tmp_path / "task")
    zipfile.ZipFile(layer).extractall(tmp_path / "opt")
    runtime = _runtime_stand_in(tmp_path / "runtime")
    paths = [str(tmp_path / "task"), str(tmp_path / "opt" / "python"), str(runtime)]

    done = subprocess.run(
        # -B: nothing is written (Lambda's /opt is read-only); -v: say where each
        # module's code came from, a .pyc or a compiled source.
        [sys.executable, "-I", "-S", "-B", "-v", "-c", SELF_CONTAINED, *paths],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    import json

    report = json.loads(done.stdout)
    where = report["where"]
    assert where["fanout"].startswith(paths[0])
    for name in ("pydantic", "pydantic_core", "fastavro", "click", "croniter"):
        assert where[name].startswith(paths[1]), (name, where[name])
    for name in ("boto3", "botocore", "dateutil", "six"):
        assert where[name].startswith(paths[2]), (name, where[name])
    assert report["avro"] > 0
    assert report["skipped"], "fanout.crawl was expected (and left out)"
    # Every module of zip and layer came from their byte-code; none was compiled.
    loaded = [line for line in done.stderr.splitlines() if line.startswith("# code object from")]
    for shipped in paths[:2]:
        assert [line for line in loaded if shipped in line and line.endswith(".py")] == []
        assert any(shipped in line and line.endswith(".pyc'") for line in loaded)
