"""Monitoring assets that ship with the server: Prometheus rules and a Grafana dashboard.

- `rules.yml`: recording rules (`shardserve:*`: request rate by outcome and finish reason,
  tokens/s, TTFT / ITL / end-to-end p50 and p99, queue depth, KV usage, step and batch series)
  and alert rules (high p99 TTFT, KV cache > 95%, queue full and rejections, worker group down
  or restarting, no tokens while requests wait, target down). Add the file to `rule_files:`.
- `dashboard.json`: a Grafana dashboard; import it (Dashboards -> New -> Import) and pick the
  Prometheus data source in its `datasource` variable.

`rules_path()` and `dashboard_path()` give the installed files' locations.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def rules_path() -> Path:
    return Path(str(resources.files(__name__).joinpath("rules.yml")))


def dashboard_path() -> Path:
    return Path(str(resources.files(__name__).joinpath("dashboard.json")))
