"""compose.yaml and the Dockerfile hold together, checked without Docker: every service has an
image or a build, health checks and restart policies, and the app and worker are wired to the
same database, broker and KB_HOME volume, with a GPU reserved."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def _compose() -> dict:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def test_services_images_health_and_restart():
    services = _compose()["services"]
    assert {"postgres", "redis", "app", "worker"} <= services.keys()
    for name, svc in services.items():
        assert "image" in svc or "build" in svc, name
        assert svc.get("restart") == "unless-stopped", name
    for name in ("postgres", "redis", "app"):
        assert services[name]["healthcheck"]["test"], name
    assert services["app"]["build"] == "."
    assert services["worker"]["image"] == services["app"]["image"]


def test_app_and_worker_share_database_broker_and_home():
    c = _compose()
    services = c["services"]
    pg = services["postgres"]["environment"]
    for name in ("app", "worker"):
        env = services[name]["environment"]
        url = env["KB_DATABASE_URL"]
        assert (
            url
            == f"postgresql://{pg['POSTGRES_USER']}:{pg['POSTGRES_PASSWORD']}@postgres:5432/{pg['POSTGRES_DB']}"
        )
        assert env["KB_REDIS_URL"].startswith("redis://redis:6379")
        assert env["KB_HOME"] == "/var/lib/kb"
        assert "kbhome:/var/lib/kb" in services[name]["volumes"]
        deps = services[name]["depends_on"]
        assert deps["postgres"]["condition"] == deps["redis"]["condition"] == "service_healthy"
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"]
    assert services["worker"]["command"] == ["worker"]
    assert {"pgdata", "kbhome"} <= c["volumes"].keys()


def test_dockerfile_installs_the_project_and_the_demo_model():
    text = (ROOT / "Dockerfile").read_text()
    for package in ("attention", "index", "storage", "kb", "ui"):
        assert f"COPY {package} ./{package}" in text
        assert (ROOT / package).is_dir()
    assert "RUN pip install ." in text and "kb model fetch" in text
    assert 'ENTRYPOINT ["kb"]' in text
