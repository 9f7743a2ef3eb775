"""The Docker SDK, wrapped at one boundary (as Kathará does).

Compose creates a case's containers; this module does the rest: find a
project's containers, exec into them, read their logs and files, wait for
them, and remove a project, or what carries the lab's label. Every SDK error
is converted here into a :class:`LabEngineError` whose message is the sentence
the user sees; transient engine errors are retried a bounded number of times.
"""

from __future__ import annotations

import io
import tarfile
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import BinaryIO, Iterable, Sequence

import docker
import docker.errors
import docker.types
import requests.exceptions
from tenacity import retry, retry_if_exception, stop_after_attempt, wait_exponential

from .engine.base import LAB_LABEL, LabContainer, LabObject
from .engine.errors import ContainerGone, LabEngineError

PROJECT_LABEL = "com.docker.compose.project"
SERVICE_LABEL = "com.docker.compose.service"
NUMBER_LABEL = "com.docker.compose.container-number"


# Re-exported: callers of this module have always found them here.
__all__ = ["ContainerGone", "DockerAPI", "ExecJob", "LabContainer", "LabEngineError", "LabObject", "names"]
# Containers first: they hold the networks and volumes.
OBJECT_KINDS = ("containers", "networks", "volumes")
# Below the SDK's connection pool (10), so no request waits for a connection.
REMOVE_WORKERS = 8


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, requests.exceptions.ConnectionError):
        return True
    if isinstance(exc, docker.errors.APIError) and exc.status_code is not None:
        return exc.status_code >= 500 and "is not running" not in str(exc)
    return False


# Bounded: a daemon that stays broken surfaces as one clear error within seconds.
_retry = retry(retry=retry_if_exception(_transient), stop=stop_after_attempt(4),
               wait=wait_exponential(multiplier=0.2, max=2), reraise=True)


def _listed_name(container: dict) -> str:
    """A container's name as the engine's listing gives it ("/name"; its id if it has none)."""
    return (container.get("Names") or [container["Id"]])[0].lstrip("/")


def _convert(what: str, exc: Exception) -> LabEngineError:
    detail = getattr(exc, "explanation", None) or str(exc)
    return LabEngineError(f"Docker could not {what}: {detail}")


class DockerAPI:
    """The engine as the orchestrator uses it; tests may replace it with a fake."""

    def __init__(self, client: docker.DockerClient | None = None):
        if client is None:
            try:
                client = docker.from_env(timeout=60)
                client.ping()
            except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
                raise LabEngineError(
                    f"cannot reach the Docker daemon ({exc}); start Docker, or set DOCKER_HOST"
                ) from None
        self._client = client

    @property
    def client(self) -> docker.DockerClient:
        return self._client

    @_retry
    def _list(self, filters: dict) -> list[dict]:
        # The engine's own listing: the SDK's high-level one inspects every container it lists
        # afterwards, one round trip each (fifty for a case of fifty clients).
        return self._client.api.containers(all=True, filters=filters)

    def containers(self, project: str, service: str | None = None) -> list[LabContainer]:
        """The project's containers (of one service), ordered by service and number."""
        labels = [f"{PROJECT_LABEL}={project}"]
        if service:
            labels.append(f"{SERVICE_LABEL}={service}")
        try:
            found = self._list({"label": labels})
        except docker.errors.DockerException as exc:
            raise _convert(f"list the containers of {project}", exc) from None
        result = []
        for c in found:
            labels = c.get("Labels") or {}
            result.append(LabContainer(c["Id"], _listed_name(c), labels.get(SERVICE_LABEL, ""),
                                       int(labels.get(NUMBER_LABEL, "1") or 1)))
        return sorted(result, key=lambda c: (c.service, c.number))

    @_retry
    def exec(self, container: LabContainer, argv: Sequence[str], user: str = "") -> tuple[int, str]:
        """Run ``argv`` in a running container; its exit code and combined output."""
        try:
            res = self._client.containers.get(container.id).exec_run(list(argv), user=user, demux=False)
        except docker.errors.NotFound:
            raise ContainerGone(f"container {container.name} disappeared while its case ran "
                                "(removed from outside the run?)") from None
        except docker.errors.APIError as exc:
            if _transient(exc):
                raise
            raise _convert(f"run {' '.join(argv)} in {container.name}", exc) from None
        return res.exit_code, (res.output or b"").decode("utf-8", "replace")

    def start_exec(self, container: LabContainer, argv: Sequence[str], env: dict[str, str] | None = None) -> "ExecJob":
        """Start ``argv`` in a running container (as its user) and collect its output in the background."""
        try:
            exec_id = self._client.api.exec_create(container.id, list(argv), environment=env or None)["Id"]
            stream = self._client.api.exec_start(exec_id, stream=True, demux=True)
        except docker.errors.NotFound:
            raise ContainerGone(f"container {container.name} disappeared while its case ran "
                                "(removed from outside the run?)") from None
        except docker.errors.DockerException as exc:
            raise _convert(f"run {' '.join(argv)} in {container.name}", exc) from None
        return ExecJob(self, container, exec_id, stream)

    def stream_exec(self, container: LabContainer, argv: Sequence[str], sink: BinaryIO) -> tuple[int | None, str]:
        """Run ``argv`` in a running container, writing its stdout to ``sink`` as it comes (a live
        capture's pcap); its exit status and stderr once it ends."""
        try:
            exec_id = self._client.api.exec_create(container.id, list(argv))["Id"]
            stream = self._client.api.exec_start(exec_id, stream=True, demux=True)
        except docker.errors.NotFound:
            raise ContainerGone(f"container {container.name} is not running") from None
        except docker.errors.DockerException as exc:
            raise _convert(f"run {' '.join(argv)} in {container.name}", exc) from None
        errors = []
        for out, err in stream:
            if out:
                sink.write(out)
                sink.flush()  # a reader (Wireshark) shows each packet as it comes
            if err:
                errors.append(err)
        return self.exec_exit_code(exec_id), b"".join(errors).decode("utf-8", "replace")

    def exec_exit_code(self, exec_id: str) -> int | None:
        """The exit status of a finished exec; None while it runs."""
        try:
            found = self._client.api.exec_inspect(exec_id)
        except docker.errors.NotFound:
            raise ContainerGone("the container of a command run in it disappeared "
                                "(removed from outside the run?)") from None
        except docker.errors.DockerException as exc:
            raise _convert("inspect a command run in a container", exc) from None
        return None if found.get("Running") else found.get("ExitCode")

    def logs(self, container: LabContainer, stderr: bool = True) -> str:
        """What the container printed (stdout; with stderr too unless told not)."""
        try:
            raw = self._client.containers.get(container.id).logs(stdout=True, stderr=stderr)
        except docker.errors.NotFound:
            return ""  # removed from outside: nothing left to read
        except docker.errors.DockerException as exc:
            raise _convert(f"read the logs of {container.name}", exc) from None
        return raw.decode("utf-8", "replace")

    def wait(self, container: LabContainer, timeout_s: float) -> int | None:
        """The container's exit status, or None if it is still running after ``timeout_s``."""
        try:
            return int(self._client.containers.get(container.id).wait(timeout=timeout_s)["StatusCode"])
        except (requests.exceptions.ConnectionError, requests.exceptions.ReadTimeout):
            # The SDK signals a wait timeout as a read timeout: wrapped in a ConnectionError,
            # or bare when the engine answers slowly (seen under QEMU emulation).
            return None
        except docker.errors.NotFound:
            return None
        except docker.errors.DockerException as exc:
            raise _convert(f"wait for {container.name}", exc) from None

    def state(self, container: LabContainer) -> dict:
        """The container's State object (Status, ExitCode, ...)."""
        try:
            return self._client.api.inspect_container(container.id)["State"]
        except docker.errors.NotFound:
            raise ContainerGone(f"container {container.name} disappeared while its case ran "
                                "(removed from outside the run?)") from None
        except docker.errors.DockerException as exc:
            raise _convert(f"inspect {container.name}", exc) from None

    def read_file(self, container: LabContainer, path: str) -> bytes | None:
        """The contents of a file in a (running or stopped) container; None if absent."""
        try:
            stream, _ = self._client.api.get_archive(container.id, path)
        except docker.errors.NotFound:
            return None
        except docker.errors.DockerException as exc:
            raise _convert(f"copy {path} out of {container.name}", exc) from None
        with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
            member = tar.next()
            if member is None or not member.isfile():
                return None
            return tar.extractfile(member).read()

    def kill(self, container: LabContainer, signal: str = "SIGTERM") -> None:
        """Send ``signal`` to a running container (a stopped one is left alone)."""
        try:
            self._client.containers.get(container.id).kill(signal=signal)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as exc:
            if "is not running" not in str(exc):
                raise _convert(f"signal {container.name}", exc) from None

    def image(self, ref: str) -> tuple[str, dict[str, str]] | None:
        """The id and labels of the image ``ref`` names on this engine; None if it has none by that name."""
        try:
            image = self._client.images.get(ref)
        except docker.errors.ImageNotFound:
            return None
        except docker.errors.DockerException as exc:
            raise _convert(f"inspect image {ref}", exc) from None
        return image.id, dict(image.labels or {})

    def task(self, task_id: str) -> dict | None:
        """A swarm task as the manager knows it (Status, NodeID, ...); None once the swarm forgot it."""
        try:
            return self._client.api.inspect_task(task_id)
        except docker.errors.NotFound:
            return None
        except docker.errors.DockerException as exc:
            raise _convert(f"inspect task {task_id}", exc) from None

    def task_logs(self, task_id: str, stderr: bool = True) -> str:
        """What a swarm task printed (stdout; with stderr too unless told not), wherever it ran.

        The manager relays it from the task's node. The SDK has no call of its own
        for one task's logs (only a whole service's): the engine API's, through
        the SDK's request helpers.
        """
        api = self._client.api
        try:
            response = api._get(api._url("/tasks/{0}/logs", task_id),
                                params={"stdout": 1, "stderr": int(stderr)}, stream=True)
            api._raise_for_status(response)
            raw = b"".join(api._get_result_tty(True, response, False))
        except docker.errors.NotFound:
            return ""  # the swarm forgot the task: nothing left to read
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            raise _convert(f"read the logs of task {task_id}", exc) from None
        return raw.decode("utf-8", "replace")

    def _collection(self, kind: str):
        return {"containers": self._client.containers, "networks": self._client.networks,
                "volumes": self._client.volumes}[kind]

    def objects(self, label: str = LAB_LABEL) -> list[LabObject]:
        """Every container, network and volume carrying ``label``, with its labels; containers first."""
        flt = {"label": [label]}
        found = []
        try:
            for kind in OBJECT_KINDS:
                if kind == "containers":
                    # The low-level listing: the high-level one inspects each container
                    # afterwards, and fails on one that a run's teardown removed meanwhile.
                    for c in self._client.api.containers(all=True, filters=flt):
                        found.append(LabObject(kind, _listed_name(c), dict(c.get("Labels") or {}), c["Id"]))
                    continue
                for obj in self._collection(kind).list(filters=flt):
                    found.append(LabObject(kind, obj.name, dict(obj.attrs.get("Labels") or {}), obj.id))
        except docker.errors.DockerException as exc:
            raise _convert("list the lab's objects", exc) from None
        return found

    def remove_object(self, obj: LabObject) -> bool:
        """Remove one container (with its anonymous volumes), network or volume; False if it was gone."""
        try:
            found = self._collection(obj.kind).get(obj.id or obj.name)
            if obj.kind == "networks":
                found.remove()
            else:
                found.remove(force=True, **({"v": True} if obj.kind == "containers" else {}))
        except docker.errors.NotFound:
            return False  # a project being torn down meanwhile: gone already
        except docker.errors.DockerException as exc:
            raise _convert(f"remove {obj.name}", exc) from None
        return True

    def remove_labelled(self, label: str = LAB_LABEL) -> dict[str, list[str]]:
        """Remove every container, network and volume carrying ``label``; what was removed."""
        removed: dict[str, list[str]] = {kind: [] for kind in OBJECT_KINDS}
        found = self.objects(label)
        containers = [obj for obj in found if obj.kind == "containers"]
        held = [obj for obj in found if obj.kind != "containers"]
        # The containers side by side (each removal waits for the engine to kill it and delete its
        # layer), then what they held, one by one.
        with ThreadPoolExecutor(max_workers=REMOVE_WORKERS) as pool:
            gone = list(pool.map(self.remove_object, containers))
        gone += [self.remove_object(obj) for obj in held]
        for obj, was_there in zip(containers + held, gone):
            if was_there:
                removed[obj.kind].append(obj.name)
        return removed

    def remove_project(self, project: str) -> None:
        """Remove a Compose project's containers, networks and volumes, whatever state they are in."""
        self.remove_labelled(f"{PROJECT_LABEL}={project}")

    def labelled(self, label: str = LAB_LABEL) -> dict[str, list[str]]:
        """The names of the containers, networks and volumes carrying ``label``."""
        found: dict[str, list[str]] = {kind: [] for kind in OBJECT_KINDS}
        for obj in self.objects(label):
            found[obj.kind].append(obj.name)
        return found

    def nofile_allowed(self, image: str, wanted: int) -> tuple[int, str | None]:
        """The most descriptors (RLIMIT_NOFILE) a container of ``image`` can be given, up to ``wanted``.

        Asks for ``wanted`` in a throwaway container; a daemon that cannot grant
        it (its runtime may not raise a hard limit past the daemon's own without
        CAP_SYS_RESOURCE) refuses to start the container, and then the answer is
        the hard limit a container gets by default. Returns the limit, and the
        engine's refusal (None when ``wanted`` was granted).
        """
        refusal = None
        for ulimits in ([docker.types.Ulimit(name="nofile", soft=wanted, hard=wanted)], None):
            try:
                container = self._client.containers.create(
                    image, ["-c", "ulimit -Hn"], entrypoint="sh", network_mode="none", ulimits=ulimits,
                    labels={LAB_LABEL: "true"})
            except docker.errors.DockerException as exc:
                raise _convert(f"create a container of {image}", exc) from None
            try:
                container.start()
                container.wait(timeout=60)
                hard = container.logs(stdout=True, stderr=False).decode().strip()
                return min(wanted, int(hard)) if hard.isdigit() else wanted, refusal
            except docker.errors.APIError as exc:
                if ulimits is None:
                    raise _convert(f"start a container of {image}", exc) from None
                refusal = getattr(exc, "explanation", None) or str(exc)
            finally:
                container.remove(force=True)
        raise AssertionError("unreachable")

    def versions(self) -> dict[str, str]:
        """Engine version, API version and host kernel, for run metadata."""
        try:
            v = self._client.version()
        except docker.errors.DockerException as exc:
            raise _convert("report its version", exc) from None
        return {"engine": v.get("Version", ""), "api": v.get("ApiVersion", ""),
                "kernel": v.get("KernelVersion", "")}


class ExecJob:
    """A command running in a container (see :meth:`DockerAPI.start_exec`), read by a thread."""

    def __init__(self, api: DockerAPI, container: LabContainer, exec_id: str, stream):
        self.api = api
        self.container = container
        self.exec_id = exec_id
        self._stdout: list[bytes] = []
        self._stderr: list[bytes] = []
        self._reader = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._reader.start()

    def _read(self, stream) -> None:
        try:
            for out, err in stream:
                if out:
                    self._stdout.append(out)
                if err:
                    self._stderr.append(err)
        except (docker.errors.DockerException, requests.exceptions.RequestException):
            pass  # the container went away: what was read is what there is

    def running(self) -> bool:
        """Whether the command has not finished (its output is still open)."""
        return self._reader.is_alive()

    def wait(self, timeout_s: float) -> int | None:
        """The command's exit status, or None if it still runs after ``timeout_s``."""
        self._reader.join(timeout_s)
        return None if self._reader.is_alive() else self.api.exec_exit_code(self.exec_id)

    @property
    def stdout(self) -> str:
        return b"".join(self._stdout).decode("utf-8", "replace")

    @property
    def output(self) -> str:
        """Everything it printed, stderr after stdout."""
        return self.stdout + b"".join(self._stderr).decode("utf-8", "replace")


def names(containers: Iterable[LabContainer]) -> list[str]:
    """Container names, for messages."""
    return [c.name for c in containers]
