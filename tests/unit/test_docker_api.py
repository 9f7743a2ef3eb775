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
