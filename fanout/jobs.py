"""The job API (:class:`Job`) and loading a job from ``path.py`` or ``module:attr``."""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import inspect
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, NoReturn

from fanout.errors import JobLoadError, ParamsError, UserError
from fanout.filestamp import Stamp, stamp_of
from fanout.isolation import JobModules, import_fresh
from fanout.isolation import activate as activate_modules
from fanout.json_fields import params_problem
from fanout.limits import RunKind
from fanout.tables.spec import pop_table_spec

if TYPE_CHECKING:
    from pydantic import BaseModel, ValidationError

    from fanout.avro import Schema
    from fanout.context import ChunkContext, Continue

    # Re-exported: RunSettings is part of the job API (``Job(..., max_attempts=5)``).
    from fanout.settings import RunSettings as RunSettings


def __getattr__(name: str) -> Any:
    # ``from fanout.jobs import RunSettings`` imports pydantic only when asked:
    # loading a job that sets no run settings does not (the Lambda handler
    # imports this module at init; tests/test_coldstart.py).
    if name == "RunSettings":
        from fanout.settings import RunSettings

        return RunSettings
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


PlanFn = Callable[[Any, "ChunkContext"], Iterable[Any]]
ProcessFn = Callable[[Any, "ChunkContext"], "Continue | None"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class Job:
    """A job: how to plan a run's first chunks and how to process one chunk.

    ``schema`` is a name (``"meter_reading"`` → ``schemas/meter_reading.avsc``),
    a path to an ``.avsc`` file, or a dict; retry, back-off and runaway bounds
    are keyword arguments (see :class:`RunSettings`).
    """

    #: What kind of job this is, recorded with each of its runs (a subclass
    #: that runs something else declares its own, as ``CrawlJob`` does).
    kind: RunKind = RunKind.ETL

    def __init__(
        self,
        name: str,
        params: type[BaseModel] | None = None,
        schema: str | os.PathLike[str] | dict[str, Any] | None = None,
        **settings: Any,
    ) -> None:
        if not _NAME.match(name):
            raise ValueError(f"job name {name!r}: use letters, digits, '.', '_' or '-'")
        # Checked here, where the job is defined (duck-typed: no pydantic import).
        if params is not None and not (
            isinstance(params, type) and hasattr(params, "model_validate")
        ):
            raise ValueError(
                f"job {name}: params must be a pydantic BaseModel class, not {params!r}"
            )
        if schema is not None and not isinstance(schema, str | os.PathLike | dict):
            raise ValueError(
                f"job {name}: schema must be a schema name, an .avsc path or a dict,"
                f" not {type(schema).__name__}"
            )
        self.name = name
        self.params_model = params
        self.schema_spec = schema
        # Issue 14: partition_by / table / schema_evolution are the job's table
        # (fanout.tables.spec), not run settings: taken out before those are checked.
        settings = dict(settings)
        self.table_spec = pop_table_spec(name, settings)
        self._settings: RunSettings | None = None
        if settings:
            # Checked now, so a bad setting fails where the job is defined. A job
            # that sets none has the defaults, built when first asked for: the
            # engine reads a run's limits from its record (fanout.limits), and
            # loading such a job on a worker or on Lambda needs no pydantic.
            from pydantic import ValidationError

            from fanout.settings import RunSettings

            try:
                self._settings = RunSettings(**settings)
            except ValidationError as exc:
                raise ValueError(f"job {name}: {_first_error(exc)}") from None
        self.plan_fn: PlanFn | None = None
        self.process_fn: ProcessFn | None = None
        self.source: Path | None = None  # the file that defined it, set by the loader
        #: The modules the loader imported from beside the job file (``fanout.isolation``).
        self.modules: JobModules | None = None
        self._schema: Schema | None = None

    @property
    def settings(self) -> RunSettings:
        """The job's default run settings (:class:`~fanout.settings.RunSettings`)."""
        if self._settings is None:
            from fanout.settings import RunSettings

            self._settings = RunSettings()
        return self._settings

    @settings.setter
    def settings(self, value: RunSettings) -> None:
        self._settings = value

    def plan(self, fn: PlanFn) -> PlanFn:
        """Decorator: ``fn(params, ctx)`` yields the payloads of the run's first chunks."""
        self.plan_fn = fn
        return fn

    def process(self, fn: ProcessFn) -> ProcessFn:
        """Decorator: ``fn(payload, ctx)`` runs one chunk."""
        # A generator (or coroutine) function's body would never run: calling
        # it only makes the generator, and the chunk would "succeed" empty.
        what = f"job {self.name}: process {getattr(fn, '__name__', fn)!s}()"
        if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
            raise ValueError(
                f"{what} is a generator (it has a `yield`); emit records with ctx.emit(record)"
            )
        if inspect.iscoroutinefunction(fn):
            raise ValueError(f"{what} must not be async")
        self.process_fn = fn
        return fn

    def validate_params(self, raw: Mapping[str, Any]) -> BaseModel | dict[str, Any]:
        """Params checked against the job's model, and as JSON a message can
        carry (no NaN or infinity, no bytes...): :class:`ParamsError` names the
        field. Every path that takes params checks them here (submit, validate,
        a schedule's add), so none lets through what another refuses."""
        if self.params_model is None:
            self._params_travel(dict(raw))
            return dict(raw)
        from pydantic import ValidationError  # imported already, by the params model

        if self.params_model.model_config.get("extra") != "allow":
            # A misspelled param (`-p row=5` for `rows`) must not silently run
            # with the default.
            fields = self.params_model.model_fields
            known = set(fields) | {f.alias for f in fields.values() if f.alias}
            unknown = sorted(set(raw) - known)
            if unknown:
                raise ParamsError(
                    f"params for job {self.name}: unknown param {unknown[0]!r}"
                    f" (known: {', '.join(fields) or 'none'})"
                )
        try:
            model = self.params_model.model_validate(dict(raw))
            dumped = model.model_dump(mode="json")
        except ValidationError as exc:
            raise ParamsError(f"params for job {self.name}: {_first_error(exc)}") from None
        except KeyboardInterrupt:
            raise  # Ctrl-C while it ran
        except BaseException as exc:  # a validator of the job's that raised something else
            # SystemExit too: `submit` exited 0 with no run made, or with the
            # validator's code and no word; another BaseException, a traceback.
            raise ParamsError(
                f"params for job {self.name}: the params model raised {type(exc).__name__}: {exc}"
            ) from None
        self._params_travel(dumped)
        return model

    def _params_travel(self, params: dict[str, Any]) -> None:
        # A chunk's message could not carry them (the root's payload, or what
        # the job passes on): refused now, in one line, not failed later.
        problem = params_problem(params)
        if problem is not None:
            raise ParamsError(f"params for job {self.name}: {problem}")

    def schema_dirs(self) -> list[Path]:
        """Where a schema given by name is looked up, in order."""
        dirs = [Path(p) for p in os.environ.get("FANOUT_SCHEMA_PATH", "").split(os.pathsep) if p]
        if self.source is not None:
            dirs += [self.source.parent / "schemas", self.source.parent.parent / "schemas"]
        dirs.append(Path.cwd() / "schemas")
        return list(dict.fromkeys(d.resolve() for d in dirs))  # each directory once

    @property
    def schema(self) -> Schema | None:
        """The loaded Avro schema (None for a job that emits nothing)."""
        if self._schema is None and self.schema_spec is not None:
            from fanout.avro import load_schema

            spec = self.schema_spec
            if isinstance(spec, str | os.PathLike) and self.source is not None:
                path = Path(spec)
                if (path.suffix == ".avsc" or "/" in str(spec)) and not path.is_absolute():
                    # A relative schema path is relative to the job file, not the cwd.
                    spec = str(self.source.parent / path)
            self._schema = load_schema(spec, self.schema_dirs())
        return self._schema

    def check(self) -> None:
        """Raise :class:`UserError` if the job cannot run (no process function, bad schema)."""
        if self.process_fn is None:
            raise JobLoadError(f"job {self.name} has no @job.process function")
        _ = self.schema


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err.get("loc", ()))
    return f"{where}: {err['msg']}" if where else str(err["msg"])


# -- loading ----------------------------------------------------------------------

#: How many loaded jobs a process keeps (a worker loads each run's job afresh).
_CACHE_SIZE = 32

# (ref, run id) -> the job, and the stamps of its file and its own modules when
# loaded: a worker that outlives an edit of either (fix, then `fanout replay`)
# loads the new code.
_loaded: dict[tuple[str, str | None], tuple[dict[str, Stamp], Job]] = {}


def _stamps(files: Iterable[str]) -> dict[str, Stamp]:
    stamps = {}
    for f in files:
        try:
            st = os.stat(f)
            stamps[f] = stamp_of(st)
        except OSError:
            stamps[f] = (-1, -1, -1, -1)
    return stamps


def _unchanged(stamps: dict[str, Stamp]) -> bool:
    return all(_stamps([f]).get(f) == mtime for f, mtime in stamps.items())


def is_path_ref(ref: str) -> bool:
    """``jobs/x.py`` or ``./x.py`` is a file; ``package.module:attr`` is a module."""
    return ref.endswith(".py") or os.sep in ref or "/" in ref


def canonical_ref(ref: str) -> str:
    """The reference workers load: an absolute path for files."""
    return str(Path(ref).resolve()) if is_path_ref(ref) else ref


def load_checked(ref: str, params: Mapping[str, Any]) -> tuple[Job, BaseModel | dict[str, Any]]:
    """The job ``ref`` names, checked runnable, and ``params`` validated by it
    (:meth:`Job.validate_params`): what submit, validate and replay each ask
    before anything is written. :class:`UserError` (one line) if not."""
    job = load_job(ref)
    job.check()
    return job, job.validate_params(params)


def load_job(ref: str, run_id: str | None = None) -> Job:
    """Load the job named by ``ref`` (``path.py``, ``path.py:attr`` or ``module[:attr]``).

    A job file is imported afresh, with the modules beside it, for each
    ``run_id`` (and again when it or one of them changes), so runs do not share
    job modules (``fanout.isolation``); call :func:`activate` before running its
    code. Raises :class:`JobLoadError` with one line saying what is wrong.
    """
    cached = _loaded.get((ref, run_id))
    if cached is not None and _unchanged(cached[0]):
        return cached[1]
    target, _, attr = ref.partition(":") if not ref.endswith(".py") else (ref, "", "")
    if is_path_ref(target):
        path = Path(target)
        _check_file(path)
        path = path.resolve()
        module, own = import_fresh(path.parent, lambda: _import_file(path))
        where = target
        stamps = _stamps([str(path), *own.files()])
    else:
        module, own, stamps = _import_module(target), None, {}
        where = f"module {target}"
        if getattr(module, "__file__", None) is None and hasattr(module, "__path__"):
            # A directory, imported as a namespace package: no code, no Job.
            raise JobLoadError(f"{target} is a directory: name a job file (path/to/job.py)")
    job = _find_job(module, attr, where)
    if job.source is None and getattr(module, "__file__", None):
        job.source = Path(str(module.__file__)).resolve()
    job.modules = own
    _loaded[(ref, run_id)] = (stamps, job)
    while len(_loaded) > _CACHE_SIZE:
        del _loaded[next(iter(_loaded))]
    return job


def activate(job: Job) -> None:
    """Make ``job``'s own modules the ones its code imports (see ``fanout.isolation``)."""
    activate_modules(job.modules)


def _check_file(path: Path) -> None:
    if not path.exists():
        raise JobLoadError(f"job file {path} does not exist")
    if path.is_dir() or path.suffix != ".py":
        raise JobLoadError(f"job file {path} is not a .py file")


def _import_file(path: Path) -> ModuleType:
    name = "fanout_job_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise JobLoadError(f"job file {path} cannot be imported")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        # What the module prints as it loads is no output of the command
        # (`fanout run --json` prints one JSON object on stdout): to stderr.
        with _no_exit_at_import(path), contextlib.redirect_stdout(sys.stderr):
            spec.loader.exec_module(module)
    except UserError:
        raise
    except BaseException as exc:
        sys.modules.pop(name, None)
        raise JobLoadError(f"job file {path} does not import: {_describe(exc)}") from exc
    return module


class _ExitAtImport(JobLoadError):
    """Raised in place of ``os._exit`` while a job file is imported."""


@contextlib.contextmanager
def _no_exit_at_import(path: Path) -> Iterator[None]:
    """``os._exit`` while importing a job would end the CLI (or the worker) with
    no word (``fanout validate`` exiting 0, printing nothing): make it an error
    of the job file instead, for the duration of the import only."""
    real = os._exit

    def refuse(status: int) -> NoReturn:
        raise _ExitAtImport(
            f"job file {path} calls os._exit({status}) at import: a job must not end the process"
        )

    os._exit = refuse
    try:
        yield
    finally:
        os._exit = real


def _import_module(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and name.startswith(exc.name):
            raise JobLoadError(f"job module {name} not found{_beside_hint(name)}") from None
        raise JobLoadError(f"job module {name} does not import: {_describe(exc)}") from exc
    except UserError:
        raise
    except BaseException as exc:
        raise JobLoadError(f"job module {name} does not import: {_describe(exc)}") from exc


def _beside_hint(name: str) -> str:
    """Why a module that is there, under the current directory, was not found:
    the ``fanout`` script, unlike ``python -m``, does not put the current
    directory on the module path."""
    path = Path(*name.split("."))
    on_path = "" in sys.path or os.getcwd() in sys.path
    if on_path or not (path.with_suffix(".py").is_file() or path.is_dir()):
        return ""
    return (
        f" (it is under the current directory, which the module path does not hold:"
        f" name the file, {path.with_suffix('.py')}, or set PYTHONPATH=.)"
    )


def _describe(exc: BaseException) -> str:
    if isinstance(exc, SyntaxError):
        return f"SyntaxError: {exc.msg} (line {exc.lineno})"
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _find_job(module: ModuleType, attr: str, where: str) -> Job:
    if attr:
        job = getattr(module, attr, None)
        if not isinstance(job, Job):
            raise JobLoadError(f"{where} has no Job named {attr!r}")
        return job
    job = getattr(module, "job", None)
    if isinstance(job, Job):
        return job
    found = [v for v in vars(module).values() if isinstance(v, Job)]
    if len(found) == 1:
        return found[0]
    if not found:
        raise JobLoadError(f"{where} defines no Job (expected `job = Job(...)`)")
    raise JobLoadError(f"{where} defines several Jobs: name one as {where}:ATTR")
