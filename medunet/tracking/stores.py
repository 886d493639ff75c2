"""Where a run is tracked: resolving the tracking URI, the local SQLite stores, and store failures.

The tracking URI is the explicit argument (``--tracking-uri``), else ``$MLFLOW_TRACKING_URI``, else the local
store ``sqlite:///<cwd>/mlruns/mlruns.db`` (artifacts in ``<cwd>/mlruns/artifacts``). One store per working directory (not one per run directory) so that all runs started from a project
folder can be compared side by side in ``mlflow ui --backend-store-uri sqlite:///mlruns/mlruns.db``.
A plain path or ``file://`` URI names a local store too (a ``.db`` file, or a folder that holds
``mlruns.db``): MLflow 3 no longer accepts the file store, so medunet maps such paths to SQLite.

When a store fails (server unreachable, database locked, ...) tracking stops with one warning; the command
goes on, and ``medunet track FOLDER`` pushes the folder's records once the store is back.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

STORE_FOLDER = "mlruns"
STORE_FILE = "mlruns.db"
ARTIFACT_FOLDER = "artifacts"

# MLflow error codes meaning "the store is fine but refused this one value": not a reason to stop tracking.
REJECTED_VALUE_CODES = frozenset({"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "INVALID_STATE"})


def local_store_uri(folder: str | Path) -> str:
    """``sqlite:///<abs folder>/mlruns.db``: the SQLite store kept in ``folder`` (created when used)."""
    return "sqlite:///" + str(Path(folder).expanduser().resolve() / STORE_FILE)


def default_store_uri() -> str:
    """The default local store: ``sqlite:///<cwd>/mlruns/mlruns.db``."""
    return local_store_uri(Path.cwd() / STORE_FOLDER)


def resolve_tracking_uri(tracking_uri: str | None = None) -> str:
    """The URI to track in: ``tracking_uri`` > ``$MLFLOW_TRACKING_URI`` > :func:`default_store_uri`.

    A plain path or ``file://`` URI becomes a local SQLite store (a ``.db`` file, else a folder holding
    ``mlruns.db``); relative ``sqlite:///`` paths are made absolute so the URI is valid from anywhere.
    """
    uri = (tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "").strip()
    if not uri:
        return default_store_uri()
    if uri.startswith("file:"):
        uri = unquote(urlparse(uri).path)
    if "://" not in uri:
        path = Path(uri).expanduser()
        return "sqlite:///" + str(path.resolve()) if path.suffix == ".db" else local_store_uri(path)
    if uri.startswith("sqlite:///") and uri != "sqlite:///:memory:":
        return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).expanduser().resolve())
    return uri


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, else None."""
    if not uri.startswith("sqlite:///") or uri.endswith(":memory:"):
        return None
    return Path(uri[len("sqlite:///"):])


def artifact_location(uri: str) -> str | None:
    """Where new experiments of a local SQLite store keep artifacts: ``artifacts/`` beside the database.

    None for other stores: a tracking server decides itself (``--artifacts-destination``).
    """
    database = sqlite_path(uri)
    return (database.parent / ARTIFACT_FOLDER).as_uri() if database else None


def is_remote(uri: str) -> bool:
    """Whether the store is reached over the network (an MLflow server), not a local database."""
    return urlparse(uri).scheme in ("http", "https")


def prepare_store(uri: str) -> None:
    """Create the folder of a local SQLite store so MLflow can create the database in it."""
    database = sqlite_path(uri)
    if database is not None:
        database.parent.mkdir(parents=True, exist_ok=True)


def check_reachable(uri: str, timeout_s: float = 3.0) -> None:
    """Raise ``ConnectionError`` if a tracking server does not answer ``/health`` within ``timeout_s``.

    Asked before each request, so a server that is down costs seconds rather than MLflow's minutes of
    retries, without changing MLflow's settings (environment variables) for the rest of the process.
    """
    if not is_remote(uri):
        return
    import urllib.request

    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s) as response:
            if response.status == 200:
                return
    except OSError as error:
        raise ConnectionError(f"{uri} does not answer: {error}") from None
    raise ConnectionError(f"{uri}/health answered {response.status}")


def create_experiment(client: Any, name: str, uri: str) -> str:
    """Create experiment ``name`` (artifacts beside a local database); the id, also if created meanwhile."""
    from mlflow.exceptions import MlflowException

    try:
        return client.create_experiment(name, artifact_location(uri))
    except MlflowException as error:  # created meanwhile by a concurrent run
        if getattr(error, "error_code", None) != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


def is_rejected_value(error: BaseException) -> bool:
    """True when the store answered and refused one value (e.g. a parameter logged twice, changed).

    Anything else (connection refused, timeout, HTTP 5xx, locked or unwritable database, missing
    permission) means the store cannot take the run, and tracking stops.
    """
    return getattr(error, "error_code", None) in REJECTED_VALUE_CODES


def short_error(error: BaseException, limit: int = 200) -> str:
    """The error in one line, MLflow's wrapping removed: e.g. ``[Errno 111] Connection refused``."""
    while type(error).__name__ in ("MlflowException", "RestException") and (error.__cause__ or error.__context__):
        error = error.__cause__ or error.__context__  # type: ignore[assignment]
    text = " ".join(str(error).split()) or type(error).__name__
    socket_error = re.search(r"\[Errno \d+\][^\"')>]*", text)
    if socket_error and not text.startswith("[Errno"):  # requests' "HTTPConnectionPool(...): ... [Errno 111] ..."
        text = socket_error.group(0).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."
