"""The lab image is built again only when what it is built from has changed."""

from __future__ import annotations

import os

import pytest

from labkit.compose import ComposeProject
from labkit.engine import compose as compose_engine
from labkit.engine.compose import SOURCES_DIGEST_ENV, SOURCES_DIGEST_LABEL, ComposeEngine, lab_image_ref, sources_digest


def make_context(root):
    (root / "socklab" / "__pycache__").mkdir(parents=True)
    (root / "Dockerfile").write_text("FROM base\n")
    (root / "socklab" / "entry.py").write_text("print('hi')\n")
    return root


def test_the_digest_follows_every_file_its_mode_and_the_base_image_and_not_bytecode(tmp_path):
    context = make_context(tmp_path)
    first = sources_digest(context, "sha256:base1")
    assert first == sources_digest(context, "sha256:base1") and len(first) == 64
    (context / "socklab" / "__pycache__" / "entry.cpython-311.pyc").write_bytes(b"\0bytecode")
    (context / "socklab" / "stale.pyc").write_bytes(b"\0")
    assert sources_digest(context, "sha256:base1") == first
    assert sources_digest(context, "sha256:base2") != first
    (context / "socklab" / "entry.py").write_text("print('hello')\n")
    edited = sources_digest(context, "sha256:base1")
    assert edited != first
    os.chmod(context / "socklab" / "entry.py", 0o755)
    assert sources_digest(context, "sha256:base1") != edited
    os.chmod(context / "socklab" / "entry.py", 0o644)
    (context / "socklab" / "new.py").write_text("")
    assert sources_digest(context, "sha256:base1") != edited


def test_the_image_ref_follows_the_tag_variable(monkeypatch):
    monkeypatch.delenv("SOCKLAB_IMAGE_TAG", raising=False)
    assert lab_image_ref() == "socklab:latest"
    monkeypatch.setenv("SOCKLAB_IMAGE_TAG", "dev")
    assert lab_image_ref() == "socklab:dev"


class Images:
    """The engine's images by name: (id, labels)."""

    def __init__(self, **images):
        self.images = images

    def image(self, ref):
        return self.images.get(ref)


@pytest.fixture
def builds(monkeypatch, tmp_path):
    monkeypatch.setattr(compose_engine, "BUILD_CONTEXT", make_context(tmp_path))
    monkeypatch.setenv("BASE_IMAGE", "base:1")
    monkeypatch.delenv("SOCKLAB_IMAGE_TAG", raising=False)
    done = []
    monkeypatch.setattr(ComposeProject, "build", lambda self, *services, env=None: done.append((services, env)))
    return done


def test_an_image_built_from_the_same_sources_is_not_built_again(builds, tmp_path):
    digest = sources_digest(tmp_path, "sha256:b1")
    ComposeEngine(Images(**{"base:1": ("sha256:b1", {}),
                            "socklab:latest": ("sha256:lab", {SOURCES_DIGEST_LABEL: digest})})).build_image()
    assert builds == []


@pytest.mark.parametrize("lab_image", [
    None,  # never built
    ("sha256:lab", {}),  # built by `docker compose build`, which does not label it
    ("sha256:lab", {SOURCES_DIGEST_LABEL: "0" * 64}),  # from other sources or another base
])
def test_an_image_missing_unlabelled_or_from_other_sources_is_built_with_the_digest(builds, tmp_path, lab_image):
    images = {"base:1": ("sha256:b1", {})} | ({"socklab:latest": lab_image} if lab_image else {})
    ComposeEngine(Images(**images)).build_image()
    assert builds == [(("server",), {SOURCES_DIGEST_ENV: sources_digest(tmp_path, "sha256:b1")})]


def test_without_the_base_image_on_the_engine_the_build_runs_and_fetches_it(builds, tmp_path):
    ComposeEngine(Images(**{"socklab:latest": ("sha256:lab", {SOURCES_DIGEST_LABEL: sources_digest(tmp_path, "")})})
                  ).build_image()
    assert len(builds) == 1
