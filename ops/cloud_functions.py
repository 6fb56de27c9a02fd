"""Deploy each HTTP function to Cloud Run functions with gcloud, `shared/` bundled with each.

Usage: python -m ops.cloud_functions [--dry-run]
Needs GCP_PROJECT (and optionally GCP_REGION, default europe-west1) and the gcloud CLI, signed in.
Secrets come from Secret Manager, one secret per variable with the variable's own name
(`gcloud secrets create STRIPE_SECRET_KEY --data-file=-`); plain settings from the environment.

Then the flush schedule: a Cloud Scheduler job (FLUSH_JOB) that POSTs report-usage's flush action
every minute with the service key (read from Secret Manager), so queued meter events reach Stripe
within a minute also while no report arrives. Created once, updated on every later run.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUNDLES = ROOT / ".local" / "bundles"
GCLOUD = os.environ.get("GCLOUD", "gcloud")
FLUSH_JOB = "metered-billing-flush-usage"
# JSON, so report-usage takes it (any other media type is refused with 415).
FLUSH_BODY = '{"action": "flush", "limit": 10000}'

# function directory -> (entry point, secrets it reads, plain variables it reads)
FUNCTIONS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "create-checkout-session": (
        "create_checkout_session",
        ("DATABASE_URL", "STRIPE_SECRET_KEY", "SUPABASE_JWT_SECRET"),
        ("WEBSITE_URL", "SUPABASE_URL", "STRIPE_SETUP_FEE_PRICE_ID"),
    ),
    "create-portal-session": (
        "create_portal_session",
        ("DATABASE_URL", "STRIPE_SECRET_KEY", "SUPABASE_JWT_SECRET"),
        ("WEBSITE_URL", "SUPABASE_URL", "STRIPE_PORTAL_CONFIGURATION_ID"),
    ),
    "change-plan": (
        "change_plan",
        ("DATABASE_URL", "STRIPE_SECRET_KEY", "SUPABASE_JWT_SECRET"),
        ("WEBSITE_URL", "SUPABASE_URL"),
    ),
    "billing-overview": (
        "billing_overview",
        ("DATABASE_URL", "SUPABASE_JWT_SECRET"),
        ("WEBSITE_URL", "SUPABASE_URL"),
    ),
    "stripe-webhook-handler": (
        "stripe_webhook_handler",
        ("DATABASE_URL", "STRIPE_SECRET_KEY", "STRIPE_WEBHOOK_SECRET"),
        (),
    ),
    "report-usage": (
        "report_usage",
        ("DATABASE_URL", "STRIPE_SECRET_KEY", "SUPABASE_SERVICE_ROLE_KEY", "SUPABASE_JWT_SECRET"),
        ("SUPABASE_URL", "STRIPE_METER_EVENT_NAME", "METER_FLUSH_DELAY_SECONDS"),
    ),
}


def bundle(name: str) -> Path:
    """A source folder holding the function's main.py, shared/ and requirements.txt."""
    target = BUNDLES / name
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    shutil.copy(ROOT / "functions" / name / "main.py", target / "main.py")
    shutil.copytree(
        ROOT / "shared", target / "shared", ignore=shutil.ignore_patterns("__pycache__")
    )
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (target / "requirements.txt").write_text("\n".join(project["dependencies"]) + "\n")
    return target


def deploy_command(name: str, source: Path, project: str, region: str) -> list[str]:
    entry_point, secrets, plain = FUNCTIONS[name]
    command = [
        GCLOUD,
        "functions",
        "deploy",
        name,
        "--gen2",
        "--runtime=python312",
        f"--project={project}",
        f"--region={region}",
        f"--source={source}",
        f"--entry-point={entry_point}",
        "--trigger-http",
        "--allow-unauthenticated",
        "--set-secrets=" + ",".join(f"{secret}={secret}:latest" for secret in secrets),
    ]
    values = {var: os.environ[var] for var in plain if os.environ.get(var)}
    if values:
        command.append("--set-env-vars=" + ",".join(f"{k}={v}" for k, v in values.items()))
    return command


def function_url(name: str, project: str, region: str) -> str:
    """The deployed function's HTTPS URL, as gcloud reports it."""
    done = subprocess.run(
        [
            GCLOUD,
            "functions",
            "describe",
            name,
            "--gen2",
            f"--project={project}",
            f"--region={region}",
            "--format=value(serviceConfig.uri)",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


def service_key(project: str) -> str:
    """SUPABASE_SERVICE_ROLE_KEY from the environment, else from Secret Manager."""
    if os.environ.get("SUPABASE_SERVICE_ROLE_KEY"):
        return os.environ["SUPABASE_SERVICE_ROLE_KEY"]
    done = subprocess.run(
        [
            GCLOUD,
            "secrets",
            "versions",
            "access",
            "latest",
            "--secret=SUPABASE_SERVICE_ROLE_KEY",
            f"--project={project}",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


def schedule_command(verb: str, url: str, key: str, project: str, region: str) -> list[str]:
    """`gcloud scheduler jobs create|update http` for the flush, every minute, UTC."""
    headers = f"Content-Type=application/json,Authorization=Bearer {key}"
    return [
        GCLOUD,
        "scheduler",
        "jobs",
        verb,
        "http",
        FLUSH_JOB,
        f"--project={project}",
        f"--location={region}",
        "--schedule=* * * * *",
        "--time-zone=Etc/UTC",
        f"--uri={url}",
        "--http-method=POST",
        f"--message-body={FLUSH_BODY}",
        "--attempt-deadline=120s",
        ("--headers=" if verb == "create" else "--update-headers=") + headers,
    ]


def schedule_flush(project: str, region: str, *, dry_run: bool) -> None:
    """Create the flush job, or bring an existing one up to date."""
    if dry_run:
        url = f"https://{region}-{project}.cloudfunctions.net/report-usage"
        command = schedule_command("create", url, "[SUPABASE_SERVICE_ROLE_KEY]", project, region)
        print("would run: " + shlex.join(command))
        return
    url, key = function_url("report-usage", project, region), service_key(project)
    created = subprocess.run(
        schedule_command("create", url, key, project, region), capture_output=True, text=True
    )
    if created.returncode != 0:
        if "ALREADY_EXISTS" not in created.stderr:
            sys.exit(f"could not create the flush schedule: {created.stderr.strip()[-300:]}")
        subprocess.run(
            schedule_command("update", url, key, project, region),
            capture_output=True,
            text=True,
            check=True,
        )
    print(f"scheduled {FLUSH_JOB}: POST {url} every minute")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="print the gcloud commands only")
    args = parser.parse_args()
    project = os.environ.get("GCP_PROJECT")
    if not project:
        sys.exit("GCP_PROJECT is not set: the Google Cloud project to deploy the functions to.")
    region = os.environ.get("GCP_REGION", "europe-west1")
    if not args.dry_run and shutil.which(GCLOUD) is None:
        sys.exit("gcloud is not installed: https://cloud.google.com/sdk/docs/install")
    for name in FUNCTIONS:
        command = deploy_command(name, bundle(name), project, region)
        if args.dry_run:
            print("would run: " + " ".join(command))
            continue
        print(f"deploying {name} ...", flush=True)
        subprocess.run(command, check=True)
        print(f"deployed {name}")
    schedule_flush(project, region, dry_run=args.dry_run)


if __name__ == "__main__":
    main()
