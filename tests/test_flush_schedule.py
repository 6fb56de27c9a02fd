"""`deploy.sh functions` schedules the meter event flush: a Cloud Scheduler job that POSTs
report-usage's flush action every minute with the service key, as JSON (else it gets 415).
gcloud is replaced by a script that records its arguments and answers like gcloud."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from tests.test_deploy import deploy

FAKE_GCLOUD = r"""#!/usr/bin/env bash
printf '%s\n' "$(printf '%q ' "$@")" >> "$CALLS"
case "$1 $2" in
  "functions deploy") exit 0 ;;
  "functions describe") echo "https://report-usage-abc123-ew.a.run.app" ;;
  "secrets versions") printf 'sb_secret_from_secret_manager' ;;
  "scheduler jobs")
    if [ "$3" = create ] && [ -f "$STATE" ]; then
      echo "ERROR: (gcloud.scheduler.jobs.create.http) ALREADY_EXISTS: Job exists." >&2; exit 1
    fi
    touch "$STATE" ;;
esac
"""


def fake_gcloud(tmp_path: Path) -> dict[str, str]:
    script = tmp_path / "gcloud"
    script.write_text(FAKE_GCLOUD)
    script.chmod(0o755)
    return {
        "GCLOUD": str(script),
        "CALLS": str(tmp_path / "calls"),
        "STATE": str(tmp_path / "job-exists"),
        "GCP_PROJECT": "demo-project",
        "GCP_REGION": "europe-west3",
        "WEBSITE_URL": "https://app.example.com",
        "PATH": f"{tmp_path}:/usr/bin:/bin",
    }


def scheduler_calls(env: dict[str, str]) -> list[list[str]]:
    lines = Path(env["CALLS"]).read_text().splitlines()
    return [shlex.split(line) for line in lines if line.startswith("scheduler ")]


def option(call: list[str], name: str) -> str:
    return next(arg.split("=", 1)[1] for arg in call if arg.startswith(f"--{name}="))


def test_functions_creates_the_flush_job_once_and_updates_it_after(tmp_path):
    env = fake_gcloud(tmp_path)
    first = deploy("functions", **env)
    assert first.returncode == 0, first.stderr
    assert "scheduled metered-billing-flush-usage" in first.stdout
    (create,) = scheduler_calls(env)
    assert create[:5] == ["scheduler", "jobs", "create", "http", "metered-billing-flush-usage"]
    assert option(create, "schedule") == "* * * * *"
    assert option(create, "uri") == "https://report-usage-abc123-ew.a.run.app"
    assert option(create, "http-method") == "POST"
    assert json.loads(option(create, "message-body")) == {"action": "flush", "limit": 10000}
    headers = dict(h.split("=", 1) for h in option(create, "headers").split(","))
    assert headers == {
        "Content-Type": "application/json",
        "Authorization": "Bearer sb_secret_from_secret_manager",
    }
    assert "sb_secret_from_secret_manager" not in first.stdout + first.stderr

    again = deploy("functions", **env)
    assert again.returncode == 0, again.stderr
    update = scheduler_calls(env)[-1]
    assert update[:5] == ["scheduler", "jobs", "update", "http", "metered-billing-flush-usage"]
    assert "Bearer sb_secret_from_secret_manager" in option(update, "update-headers")


def test_functions_dry_run_prints_the_job_without_the_key(tmp_path):
    env = fake_gcloud(tmp_path)
    run = deploy("functions", "--dry-run", **env)
    assert run.returncode == 0, run.stderr
    (line,) = [x for x in run.stdout.splitlines() if "scheduler jobs create" in x]
    assert "Bearer [SUPABASE_SERVICE_ROLE_KEY]" in line and "'--schedule=* * * * *'" in line
    assert not Path(env["CALLS"]).exists()  # a dry run calls nothing
