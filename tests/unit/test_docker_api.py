"""The Docker boundary: what a vanished container means for a run."""

import docker.errors
import pytest

from labkit.docker_api import ContainerGone, DockerAPI, LabContainer


def test_a_container_removed_from_outside_fails_its_case_not_the_run():
    class Missing:
        def get(self, _id):
            raise docker.errors.NotFound("gone")

    class Client:
        containers = Missing()

        class api:
            @staticmethod
            def inspect_container(_id):
                raise docker.errors.NotFound("gone")

    api = DockerAPI(Client())
    gone = LabContainer("x", "p-client-sender-1", "client-sender", 1)
    with pytest.raises(ContainerGone, match="disappeared"):
        api.state(gone)
    assert api.logs(gone) == "" and api.wait(gone, 1) is None


class _Object:
    def __init__(self, name, labels, removed, *, attrs=False, missing=False):
        self.id, self.name = f"id-{name}", name
        if attrs:
            self.attrs = {"Labels": labels}
        else:
            self.labels = labels
        self._removed, self._missing = removed, missing

    def remove(self, **kwargs):
        if self._missing:
            raise docker.errors.NotFound("gone meanwhile")
        self._removed.append((self.name, kwargs))


class _Collection:
    def __init__(self, objects):
        self.objects = {o.id: o for o in objects}

    def list(self, all=False, filters=None):
        (label,) = filters["label"]
        return [o for o in self.objects.values()
                if label in (o.labels if hasattr(o, "labels") else o.attrs["Labels"])]

    def get(self, key):
        return self.objects[key]


def test_the_labs_objects_are_listed_with_their_labels_and_removed_one_by_one():
    removed = []
    lab = {"io.socklab.lab": "true", "io.socklab.owner.pid": "7"}

    containers = _Collection([_Object("p-server-1", lab, removed), _Object("other", {}, removed)])

    class Client:
        networks = _Collection([_Object("p_lab", lab, removed, attrs=True)])
        volumes = _Collection([_Object("p_results", lab, removed, attrs=True, missing=True)])

        class api:
            # The listing as the engine's API gives it, with no inspection of each
            # container afterwards (one a teardown removed meanwhile would fail it).
            @staticmethod
            def containers(all=False, filters=None):
                return [{"Id": o.id, "Names": [f"/{o.name}"], "Labels": o.labels}
                        for o in containers.list(all=all, filters=filters)]

    Client.containers = containers

    api = DockerAPI(Client())
    objects = api.objects()
    assert [(o.kind, o.name, o.labels) for o in objects] == [
        ("containers", "p-server-1", lab), ("networks", "p_lab", lab), ("volumes", "p_results", lab)]
    assert [api.remove_object(o) for o in objects] == [True, True, False]
    assert removed == [("p-server-1", {"force": True, "v": True}), ("p_lab", {})]


def test_a_wait_that_outlasts_a_slow_engines_read_timeout_means_still_running():
    import requests.exceptions

    class Slow:
        def wait(self, timeout):
            raise requests.exceptions.ReadTimeout("read timed out")

    class Client:
        class containers:
            @staticmethod
            def get(_id):
                return Slow()

    running = LabContainer("x", "p-server-1", "server", 1)
    assert DockerAPI(Client()).wait(running, 0.2) is None


def test_a_projects_containers_are_listed_in_one_request_and_it_is_removed_containers_first():
    removed = []
    project = {"com.docker.compose.project": "p"}
    listed = [
        {"Id": "id-s", "Names": ["/p-server-1"],
         "Labels": {**project, "com.docker.compose.service": "server", "com.docker.compose.container-number": "1"}},
        *({"Id": f"id-c{n}", "Names": [f"/p-client-load-{n}"],
           "Labels": {**project, "com.docker.compose.service": "client-load",
                      "com.docker.compose.container-number": str(n)}} for n in (2, 1)),
    ]
    requests = []

    class ByValue(_Collection):  # filters by "key=value", as the engine does
        def list(self, all=False, filters=None):
            (label,) = filters["label"]
            return [o for o in self.objects.values() if label in {f"{k}={v}" for k, v in o.attrs["Labels"].items()}]

    class Client:
        networks = ByValue([_Object("p_lab", project, removed, attrs=True)])
        volumes = ByValue([_Object("p_results", project, removed, attrs=True)])

        class containers:  # no high-level listing: it would inspect each container it lists
            @staticmethod
            def get(key):
                return _Object(next(c["Names"][0][1:] for c in listed if c["Id"] == key), {}, removed)

        class api:
            @staticmethod
            def containers(all=False, filters=None):
                requests.append(filters)
                return [c for c in listed
                        if all and set(filters["label"]) <= {f"{k}={v}" for k, v in c["Labels"].items()}]

    api = DockerAPI(Client())
    assert [(c.name, c.service, c.number) for c in api.containers("p")] == [
        ("p-client-load-1", "client-load", 1), ("p-client-load-2", "client-load", 2), ("p-server-1", "server", 1)]
    assert [c.id for c in api.containers("p", "server")] == ["id-s"] and len(requests) == 2
    api.remove_project("p")
    assert sorted(name for name, _ in removed[:3]) == ["p-client-load-1", "p-client-load-2", "p-server-1"]
    assert removed[3:] == [("p_lab", {}), ("p_results", {"force": True})]
