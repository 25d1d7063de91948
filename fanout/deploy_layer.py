"""The dependency layer of ``fanout deploy``: fanout's third-party packages as a
Lambda layer zip.

The function's zip (:func:`fanout.deploy.build_zip`) carries only fanout and the
project's ``jobs/`` and ``schemas/``. Lambda's Python runtime provides boto3
(and botocore, s3transfer, jmespath, urllib3, python-dateutil, six); every
other runtime dependency of fanout (pydantic and its parts, fastavro, ...) comes
from this layer, built by pip for the function's runtime and architecture,
never for the machine that deploys:

    python -m pip install --target DIR/python --platform manylinux_2_34_x86_64
        ... --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
        --implementation cp --python-version 3.12 --only-binary=:all:
        --no-compile --constraint DIR/constraints.txt REQUIREMENT...

The requirements are read at build time from fanout's ``pyproject.toml`` (or,
for an installed fanout, from its distribution metadata), less what the runtime
provides. Scrapy (the ``crawl`` extra) is added when a module under the
project's ``jobs/`` imports ``scrapy`` or ``fanout.crawl``: crawl jobs need it,
other projects should not carry its ~20 MB.

The layer is what was tested: the constraints file pins each requirement and
its dependencies to the version installed in the deploying environment (a
distribution not installed here is left to pip, and the plan says so). What
pip installs that the runtime provides anyway (python-dateutil through
croniter, urllib3 and jmespath through Scrapy) is removed again after pip ran.

The layer ships byte-code when this machine has an interpreter of the runtime's
Python version (this one, or ``pythonX.Y`` on ``PATH``): Lambda's code
directories are read-only, so a module without a ``.pyc`` is compiled again at
every cold start, which for pydantic and fastavro doubles the handler's import
time (tests/bench/bench_coldstart.py). The ``.pyc`` files are PEP 552
checked-hash ones (valid whatever the files' timestamps in the zip) naming
their sources under ``/opt/python``, where Lambda puts them, and are
byte-for-byte reproducible.

Built layers are cached under ``$XDG_CACHE_HOME/fanout/layers/`` (by default
``~/.cache/fanout/layers/``), named by a hash of what pip was asked for
(requirements, pins, platforms, Python version, byte-code or not), so a
re-deploy does not download again; upgrading a package here changes its pin,
hence the layer. Delete the file (or pass ``rebuild=True``) to pick up new
releases of what is not pinned.
"""

from __future__ import annotations

import ast
import contextlib
import csv
import functools
import hashlib
import importlib.metadata
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import fanout
from fanout.errors import UserError

#: Distributions the Lambda Python runtime ships: boto3 and its dependency
#: closure (botocore, s3transfer, jmespath, urllib3, python-dateutil, six), in
#: the runtime's own site-packages. Not installed from fanout's requirements,
#: and removed again when pip pulls one in as another package's dependency
#: (croniter needs python-dateutil; Scrapy's parts need urllib3 and jmespath):
#: the layer's ``/opt/python`` comes first on ``sys.path``, so a copy there
#: would shadow the runtime's and could break botocore's own pins
#: (``python-dateutil<3.0.0``, ``urllib3<3``). Those packages ask for ranges the
#: runtime's versions meet.
RUNTIME_PROVIDED = frozenset(
    {"boto3", "botocore", "s3transfer", "jmespath", "urllib3", "python-dateutil", "six"}
)

#: The stack's ``Architecture`` parameter -> the CPU in wheel platform tags.
ARCHITECTURES = {"x86_64": "x86_64", "arm64": "aarch64"}

#: Lambda limits one function's unzipped code, layers included, to this.
MAX_UNZIPPED_BYTES = 250 * 1024 * 1024

#: Bump when the layer's layout or filtering changes, so cached layers built
#: the old way are not reused.
LAYER_FORMAT = 2

#: The newest glibc of the Lambda Python runtimes' OS, by Python version: the
#: python3.12 and later runtimes run Amazon Linux 2023 (glibc 2.34), the
#: python3.11 and earlier ones Amazon Linux 2 (glibc 2.26). Wheels up to this
#: manylinux level are usable there.
GLIBC_AL2023 = 34
GLIBC_AL2 = 26

#: The oldest glibc in the tags pip is given: manylinux2014's, PEP 599.
GLIBC_MIN = 17

#: Every zip entry gets this timestamp (the zip format's earliest) so that a build
#: depends only on the files' paths and bytes, not on when they were written.
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)

#: What runs pip (and compileall): takes the full command line, raises on failure.
PipRunner = Callable[[Sequence[str]], None]

#: Where Lambda extracts a layer's ``python/`` directory, and the function's
#: code: the source paths compiled into ``.pyc`` files (shown in tracebacks).
LAYER_MOUNT = "/opt/python"
FUNCTION_MOUNT = "/var/task"

#: Directory names never shipped in the layer: test suites. Only ``tests``
#: (plural): some packages import their ``test`` module at run time.
EXCLUDED_DIRS = frozenset({"tests"})


@dataclass(frozen=True)
class LayerSpec:
    """What pip is asked for: the layer's identity (and cache key)."""

    requirements: tuple[str, ...]
    python_version: str  # "3.12"
    architecture: str = "x86_64"  # a key of ARCHITECTURES
    #: Ship ``.pyc`` files (needs an interpreter of ``python_version`` here).
    bytecode: bool = False
    #: ``name==version`` constraints for pip: the versions of this environment.
    pins: tuple[str, ...] = ()
    #: Requirements and dependencies not installed here, so not pinned.
    unpinned: tuple[str, ...] = ()

    @property
    def pyc_tag(self) -> str:
        """The tag of this Python's byte-code files: ``cpython-312``."""
        return "cpython-" + self.python_version.replace(".", "")

    @property
    def glibc_minor(self) -> int:
        """The glibc of the runtime's OS, 2.<this> (see :data:`GLIBC_AL2023`)."""
        major, minor = (int(part) for part in self.python_version.split("."))
        return GLIBC_AL2023 if (major, minor) >= (3, 12) else GLIBC_AL2

    @property
    def platforms(self) -> tuple[str, ...]:
        """Wheel platform tags pip may pick, best first (pip prefers the earlier):
        every ``manylinux_2_N`` from the runtime's glibc down to 2.17, then
        manylinux2014 (the same 2.17, legacy spelling; pip widens it to
        manylinux2010 and manylinux1). Each level is listed because pip does not
        widen ``manylinux_2_N`` to lower N: given only 2014 and 2_28, a wheel
        tagged only ``manylinux_2_24`` could never be picked."""
        cpu = ARCHITECTURES[self.architecture]
        levels = range(self.glibc_minor, GLIBC_MIN - 1, -1)
        return (*(f"manylinux_2_{n}_{cpu}" for n in levels), f"manylinux2014_{cpu}")

    @property
    def key(self) -> str:
        """A short hash naming this layer in the cache."""
        identity = {
            "format": LAYER_FORMAT,
            "requirements": sorted(self.requirements),
            "python": self.python_version,
            "platforms": self.platforms,
            "implementation": "cp",
            "bytecode": self.bytecode,
            "pins": sorted(self.pins),
        }
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]

    def describe(self) -> str:
        """The requirements and the target, then (on indented lines) the pins and
        what is left unpinned."""
        code = "with byte-code" if self.bytecode else "sources only, no byte-code"
        target = f"python{self.python_version} {self.architecture}"
        lines = [f"{', '.join(self.requirements)} for {target} ({code})"]
        lines.append(f"  pinned to this environment's versions: {', '.join(self.pins) or 'none'}")
        if self.unpinned:
            lines.append(f"  not installed here, so unpinned: {', '.join(self.unpinned)}")
        return "\n".join(lines)


def python_version(runtime: str) -> str:
    """``"python3.12"`` (the stack's ``PythonRuntime``) -> ``"3.12"``."""
    match = re.fullmatch(r"python(3\.\d+)", runtime)
    if not match:
        raise UserError(f"PythonRuntime {runtime!r} is not pythonX.Y")
    return match.group(1)


def check_architecture(architecture: str) -> str:
    """``architecture`` if the stack accepts it, else :class:`UserError`."""
    if architecture not in ARCHITECTURES:
        raise UserError(
            f"Architecture {architecture!r}: choose from {', '.join(sorted(ARCHITECTURES))}"
        )
    return architecture


# -- what to install --------------------------------------------------------------------


def _name(requirement: str) -> str:
    """The normalized distribution name of a PEP 508 requirement."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if not match:
        raise UserError(f"cannot read the requirement {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def _declared_requirements() -> tuple[list[str], dict[str, list[str]]]:
    """fanout's ``(dependencies, optional dependencies)``, from the source tree's
    pyproject.toml when fanout runs from one (it is the truth there, even before
    a re-install), else from the installed distribution's metadata."""
    pyproject = Path(fanout.__file__).resolve().parents[1] / "pyproject.toml"
    if pyproject.is_file():
        project = tomllib.loads(pyproject.read_text()).get("project", {})
        if project.get("name") == "fanout":
            return list(project.get("dependencies", [])), dict(
                project.get("optional-dependencies", {})
            )
    required: list[str] = []
    extras: dict[str, list[str]] = {}
    for line in importlib.metadata.requires("fanout") or []:
        requirement, _, marker = line.partition(";")
        extra = re.search(r"""extra\s*==\s*["']([^"']+)["']""", marker)
        if extra:
            extras.setdefault(extra.group(1), []).append(requirement.strip())
        else:
            required.append(line.strip())
    return required, extras


def layer_requirements(crawl: bool) -> tuple[str, ...]:
    """What the layer installs: fanout's runtime dependencies (plus the ``crawl``
    extra when ``crawl``), less what the Lambda runtime provides."""
    required, extras = _declared_requirements()
    if crawl:
        required += extras.get("crawl", [])
    return tuple(r for r in required if _name(r) not in RUNTIME_PROVIDED)


def local_pins(requirements: Iterable[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(pins, unpinned)`` for ``requirements`` and, transitively, their
    dependencies: ``name==version`` of each one installed in this environment
    (what the deploy was tested with), and the names of those that are not.

    A dependency an extra asks for is skipped, and so is a conditional one this
    environment does not have (``colorama; platform_system == "Windows"``): its
    marker is this machine's, not the runtime's, so it says nothing about the
    layer. Runtime-provided distributions are pinned too, although the layer
    drops them: pip then resolves the rest as it was resolved here.
    """
    pins: dict[str, str] = {}
    unpinned: set[str] = set()
    todo = [(_name(r), r.partition(";")[2].strip()) for r in requirements]
    while todo:
        name, marker = todo.pop()
        if name in pins or name in unpinned:
            continue
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            if not marker:
                unpinned.add(name)
            continue
        pins[name] = dist.version
        for line in dist.requires or []:
            requirement, _, condition = line.partition(";")
            if not re.search(r"\bextra\s*==", condition):
                todo.append((_name(requirement), condition.strip()))
    return tuple(f"{n}=={v}" for n, v in sorted(pins.items())), tuple(sorted(unpinned))


def _imports(source: str) -> Iterator[str]:
    """The module names a Python source imports (any nesting level)."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def uses_crawl(root: Path) -> bool:
    """Whether a module under ``root/jobs`` imports Scrapy or ``fanout.crawl``
    (``import scrapy``, ``from fanout.crawl import CrawlJob``, ...)."""
    for path in sorted((root / "jobs").rglob("*.py")):
        text = path.read_text(errors="replace")
        try:
            names = list(_imports(text))
        except SyntaxError:
            # A job that does not parse fails at run time anyway; guess from the text.
            names = re.findall(r"\b(scrapy|fanout\.crawl)\b", text)
        if any(n == "scrapy" or n.startswith(("scrapy.", "fanout.crawl")) for n in names):
            return True
    return False


@functools.cache
def runtime_python(version: str) -> str | None:
    """An interpreter of Python ``version`` ("3.12") on this machine: this one,
    or a ``pythonX.Y`` on ``PATH`` that runs and says it is; None if none does
    (a pyenv shim of a version not installed is on PATH but does not run)."""
    if f"{sys.version_info.major}.{sys.version_info.minor}" == version:
        return sys.executable
    found = shutil.which(f"python{version}")
    if found is None:
        return None
    probe = "import sys; print('%d.%d' % sys.version_info[:2])"
    try:
        done = subprocess.run([found, "-c", probe], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return found if done.returncode == 0 and done.stdout.strip() == version else None


def layer_spec(root: Path, runtime: str, architecture: str) -> LayerSpec:
    """The layer the project at ``root`` needs on ``runtime`` / ``architecture``;
    with byte-code when this machine can compile for ``runtime``."""
    version = python_version(runtime)
    requirements = layer_requirements(crawl=uses_crawl(root))
    pins, unpinned = local_pins(requirements)
    return LayerSpec(
        requirements,
        version,
        check_architecture(architecture),
        bytecode=runtime_python(version) is not None,
        pins=pins,
        unpinned=unpinned,
    )


def constraints_file(target: Path) -> Path:
    """Where :func:`build_layer` writes the pins for a build into ``target``."""
    return target.parent / "constraints.txt"


def pip_command(spec: LayerSpec, target: Path, python: str = sys.executable) -> list[str]:
    """The pip command line that installs ``spec`` into ``target``."""
    command = [python, "-m", "pip", "install", "--target", str(target)]
    for platform in spec.platforms:
        command += ["--platform", platform]
    command += [
        "--implementation",
        "cp",
        "--python-version",
        spec.python_version,
        # Wheels only: an sdist would be built for this machine, not for Lambda.
        "--only-binary=:all:",
        # Byte-code of the deploying interpreter is useless to another version.
        "--no-compile",
        "--disable-pip-version-check",
        "--no-input",
        "--quiet",
    ]
    if spec.pins:
        command += ["--constraint", str(constraints_file(target))]
    return command + list(spec.requirements)


def compile_command(python: str, target: Path, mount: str = LAYER_MOUNT) -> list[str]:
    """The command that byte-compiles ``target`` (the layer's ``python/``, or the
    function's staged code) with ``python``: checked-hash ``.pyc`` files naming
    their sources under ``mount``, so that the bytes depend neither on this
    machine's paths nor on file timestamps."""
    return [
        python,
        "-m",
        "compileall",
        "-q",
        "-j",
        "0",
        "--invalidation-mode",
        "checked-hash",
        "-s",
        str(target),
        "-p",
        mount,
        str(target),
    ]


def run_pip(command: Sequence[str]) -> None:
    """Run pip; :class:`UserError` with the end of its output if it fails."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise UserError(f"cannot run pip: {exc}") from None
    if done.returncode != 0:
        tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        raise UserError(f"pip could not build the dependency layer: {tail}")


def _dist_name(info: Path) -> str:
    """The normalized distribution name of a ``NAME-VERSION.dist-info`` directory
    (wheels spell ``python-dateutil`` as ``python_dateutil``)."""
    return re.sub(r"[-_.]+", "-", info.name.partition("-")[0]).lower()


def remove_runtime_provided(target: Path) -> list[str]:
    """Delete from ``target`` (pip's ``--target``) every distribution of
    :data:`RUNTIME_PROVIDED`, its files and its ``.dist-info``; return their names.

    Which files are a distribution's comes from its ``RECORD`` (every wheel
    install writes one), not from guessed directory names: python-dateutil's
    are ``dateutil/``, six's the module ``six.py``. A path leading outside
    ``target`` (console scripts, ``../../bin/...``) is left alone; directories
    the removal empties go too.
    """
    root = Path(os.path.abspath(target))
    removed = []
    for info in sorted(target.glob("*.dist-info")):
        name = _dist_name(info)
        if name not in RUNTIME_PROVIDED:
            continue
        record = info / "RECORD"
        if not record.is_file():
            raise UserError(f"cannot tell which files {name} installed: {info.name} has no RECORD")
        with record.open(newline="") as rows:
            listed = [row[0] for row in csv.reader(rows) if row and row[0]]
        shutil.rmtree(info)
        emptied: set[Path] = set()
        for entry in listed:
            # normpath, not resolve: a listed symlink goes, not what it points to.
            path = Path(os.path.normpath(root / entry))
            if path != root and path.is_relative_to(root) and (path.is_file() or path.is_symlink()):
                path.unlink()
                emptied.add(path.parent)
        # Deepest first, so that a package's emptied parent is seen emptied.
        for directory in sorted(emptied, key=lambda p: len(p.parts), reverse=True):
            while directory != root and directory.is_dir():
                left = list(directory.iterdir())
                if any(p.name != "__pycache__" or not p.is_dir() for p in left):
                    break
                shutil.rmtree(directory)  # empty, or only byte-code of removed modules
                directory = directory.parent
        removed.append(name)
    return removed


# -- the zip ------------------------------------------------------------------------------


def _layer_files(target: Path, pyc_tag: str | None) -> Iterator[tuple[str, Path]]:
    """``(archive name, path)`` of what pip installed that the layer keeps: no
    byte-code but the runtime's (``pyc_tag``; None: none at all)."""
    for path in target.rglob("*"):
        rel = path.relative_to(target)
        parts = rel.parts
        if parts[0] == "bin":
            continue  # console scripts, with this machine's interpreter in their #!
        if any(part in EXCLUDED_DIRS for part in parts):
            continue
        if path.suffix in (".pyc", ".pyo") and (pyc_tag is None or f".{pyc_tag}." not in path.name):
            continue
        if len(parts) == 2 and parts[0].endswith(".dist-info") and parts[1] == "RECORD":
            continue  # hashes of files stripped above; only an uninstaller reads it
        if path.is_file():
            yield f"python/{rel.as_posix()}", path


def reproducible_zip(entries: Iterable[tuple[str, Path]], *, keep_exec: bool = False) -> bytes:
    """A zip of ``(archive name, path)`` entries whose bytes depend only on the
    names and contents: sorted, with fixed timestamps and modes (0644, or 0755
    for executable files when ``keep_exec``)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, path in sorted(entries):
            info = zipfile.ZipInfo(name, date_time=ZIP_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            executable = keep_exec and path.stat().st_mode & 0o111
            # Readable by the Lambda runtime's user, whatever this machine's umask.
            info.external_attr = (0o755 if executable else 0o644) << 16
            archive.writestr(info, path.read_bytes())
    return buffer.getvalue()


def unzipped_size(path: Path) -> int:
    """Bytes of ``path``'s contents once extracted (what Lambda's limit counts)."""
    with zipfile.ZipFile(path) as archive:
        return sum(info.file_size for info in archive.infolist())


def distributions(path: Path) -> list[str]:
    """``name version`` of each distribution in a layer zip, from its dist-info."""
    found = set()
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            match = re.fullmatch(r"python/([^/]+)-([^/-]+)\.dist-info/METADATA", name)
            if match:
                found.add(f"{match.group(1)} {match.group(2)}")
    return sorted(found, key=str.lower)


# -- the cache ----------------------------------------------------------------------------


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/fanout/layers``, by default ``~/.cache/fanout/layers``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fanout" / "layers"


def cached_layer(spec: LayerSpec, cache: Path | None = None) -> Path:
    """Where the layer of ``spec`` is (or would be) cached."""
    return (cache or cache_dir()) / f"layer-{spec.key}.zip"


def build_layer(
    spec: LayerSpec,
    *,
    cache: Path | None = None,
    pip: PipRunner | None = None,
    rebuild: bool = False,
) -> Path:
    """The layer zip of ``spec``, from the cache or built by ``pip`` (then cached).

    The zip holds ``python/<package>`` (Lambda puts a layer's ``python/`` on
    ``sys.path``) and, if ``spec.bytecode``, the runtime's ``.pyc`` files;
    without what the runtime provides (:func:`remove_runtime_provided`), test
    suites, console scripts or ``RECORD`` files. Entries are
    sorted with fixed timestamps, so the same installed files give the same
    bytes. ``pip`` (which also runs the byte-compiler) defaults to :func:`run_pip`.
    """
    out = cached_layer(spec, cache)
    if out.is_file() and not rebuild:
        return out
    with tempfile.TemporaryDirectory(prefix="fanout-layer-") as tmp:
        target = Path(tmp) / "python"
        run = pip or run_pip
        if spec.pins:
            constraints_file(target).write_text("".join(f"{pin}\n" for pin in spec.pins))
        run(pip_command(spec, target))
        if not target.is_dir() or not any(target.iterdir()):
            raise UserError("pip installed nothing into the dependency layer")
        remove_runtime_provided(target)
        python = runtime_python(spec.python_version) if spec.bytecode else None
        if spec.bytecode and python is None:
            raise UserError(f"no Python {spec.python_version} here to byte-compile the layer")
        if python is not None:
            # compileall fails when any file does not compile (templates, test
            # data named *.py): those are never imported; the rest did compile.
            with contextlib.suppress(UserError):
                run(compile_command(python, target))
        kept = _layer_files(target, spec.pyc_tag if python else None)
        data = reproducible_zip(kept, keep_exec=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename: a deploy interrupted mid-write leaves no half layer to reuse.
    partial = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    partial.write_bytes(data)
    os.replace(partial, out)
    return out
