"""schemathesis against the live endpoint's own OpenAPI schema on 127.0.0.1: generated requests,
well-formed and not, on every route; none may get a 5xx. It fuzzes the tight application (API key,
batch 2, queue 2, 1.5 s timeout, 4 KiB bodies), so long generations end in 408 and the run stays
bounded; one worker, so the queue never overflows into 503s."""
import json
import subprocess
from pathlib import Path

import pytest

from tests.integration.conftest import API_KEY, call

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def test_generated_requests_never_get_a_5xx(served, tmp_path):
    replica = call(served.tight, "/healthz")[1]["replica"]
    report = tmp_path / "schemathesis.json"
    run = subprocess.run(
        [str(ROOT / ".venv/bin/schemathesis"), "run", f"{served.tight}/openapi.json", "--url", served.tight,
         "-H", f"Authorization: Bearer {API_KEY}", "--checks", "not_a_server_error", "--max-examples", "15",
         "--seed", "25", "--workers", "1", "--request-timeout", "30", "--phases", "examples,coverage,fuzzing",
         "--report", "json", "--report-json-path", str(report), "--no-color"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    summary = json.loads(report.read_text())  # every route tried, hundreds of cases (620 here), none failing
    assert summary["operations"]["tested"] == summary["operations"]["total"] >= 8, summary["operations"]
    assert summary["test_cases"]["generated"] >= 200 and summary["test_cases"]["with_failures"] == 0, summary
    assert call(served.tight, "/healthz", token=API_KEY)[1]["replica"] == replica  # the same replica serves on
