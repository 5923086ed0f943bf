"""A real Prometheus for the local stack (Debian's ``prometheus`` package).

``prometheus_process`` writes ``<run_dir>/prometheus/prometheus.yml`` and
returns the server as a ``ManagedProcess``. The config has one scrape job,
``flotilla``, whose targets come from the stack's file_sd targets file
(every service's and every Triton replica's metrics endpoint, rewritten as
batchers come and go; Prometheus re-reads it on change). Each target's
``process`` and ``tier`` labels are attached to its series, and the alert
and recording rules in ``observability/prometheus/alerts.yml`` are loaded.

``honor_labels``: Flotilla's request metrics carry a ``tier`` label of
their own, the same tier the target label names. With the default
(``honor_labels: false``) Prometheus would rename the scraped one to
``exported_tier``; honouring it keeps ``tier`` what metrics.py says it is.

The server scrapes itself too: its own address is in the targets file
once the stack has started it.
"""

from __future__ import annotations

import logging
import shutil
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from flotilla.stack.processes import ManagedProcess, wait_for_previous_holder

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
RULES_FILE = REPO / "observability" / "prometheus" / "alerts.yml"
"""Alert and recording rules (a source checkout's; absent from an installed wheel)."""
JOB = "flotilla"
RETENTION = "2d"
"""The local stack's TSDB keeps this much history in its run directory."""
# An earlier run's server, still stopping, holds the TSDB's lock; wait this long for it.
_PREVIOUS_HOLDER_TIMEOUT_S = 15.0
_READY_TIMEOUT_S = 2.0


def prometheus_duration(seconds: float) -> str:
    """0.5 -> ``500ms``, 15 -> ``15000ms``: Prometheus's duration syntax, to the millisecond."""
    ms = max(1, round(seconds * 1000))
    return f"{ms}ms"


def prometheus_config(
    targets_file: Path, *, scrape_interval_s: float, rules_file: Path | None = RULES_FILE
) -> dict[str, Any]:
    """The server's configuration as a dict (written as YAML by ``prometheus_process``)."""
    interval = prometheus_duration(scrape_interval_s)
    config: dict[str, Any] = {
        "global": {
            "scrape_interval": interval,
            "scrape_timeout": interval,  # the default (10 s) may not exceed a short interval
            "evaluation_interval": interval,
        },
        "scrape_configs": [
            {
                "job_name": JOB,
                "honor_labels": True,  # see the module docstring
                "file_sd_configs": [
                    {
                        "files": [str(targets_file)],
                        # Changes are picked up at once (inotify); this is the fallback re-read.
                        "refresh_interval": prometheus_duration(max(1.0, scrape_interval_s)),
                    }
                ],
            }
        ],
    }
    if rules_file is not None:
        config["rule_files"] = [str(rules_file)]
    return config


def prometheus_process(
    run_dir: Path,
    host: str,
    port: int,
    targets_file: Path,
    *,
    scrape_interval_s: float,
    log_path: Path,
    rules_file: Path | None = RULES_FILE,
) -> ManagedProcess:
    """Prometheus serving its HTTP API on ``host:port``, scraping the targets in ``targets_file``.

    The config and the TSDB live under ``<run_dir>/prometheus/``. Raises
    RuntimeError when the ``prometheus`` binary is missing. The caller starts
    the process; ``prometheus_ready`` tells when it answers.
    """
    binary = shutil.which("prometheus")
    if binary is None:
        raise RuntimeError(
            "the prometheus binary is not installed (Debian's prometheus package); "
            "run `make prometheus` (make test does it too)"
        )
    if rules_file is not None and not rules_file.exists():
        log.warning("alert rules %s not found; Prometheus starts without rules", rules_file)
        rules_file = None
    home = run_dir.resolve() / "prometheus"
    data_dir = home / "data"
    wait_for_previous_holder(data_dir, _PREVIOUS_HOLDER_TIMEOUT_S)
    data_dir.mkdir(parents=True, exist_ok=True)
    config_path = home / "prometheus.yml"
    config = prometheus_config(targets_file.resolve(), scrape_interval_s=scrape_interval_s, rules_file=rules_file)
    config_path.write_text(
        "# Written by flotilla.stack.prometheus for this run; edits are overwritten.\n"
        + yaml.safe_dump(config, sort_keys=False),
        encoding="utf-8",
    )
    address = f"{host}:{port}"
    argv = [
        binary,
        f"--config.file={config_path}",
        f"--storage.tsdb.path={data_dir}",
        f"--storage.tsdb.retention.time={RETENTION}",
        f"--web.listen-address={address}",
    ]
    return ManagedProcess("prometheus", argv, log_path=log_path, address=address, metrics_address=address)


def prometheus_ready(address: str) -> bool:
    """True once the server at ``host:port`` answers ``GET /-/ready`` with 200 (config loaded, TSDB open)."""
    try:
        with urllib.request.urlopen(f"http://{address}/-/ready", timeout=_READY_TIMEOUT_S) as reply:
            return bool(reply.status == 200)
    except (urllib.error.URLError, OSError):
        return False
