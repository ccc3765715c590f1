"""Dashboards as code: `python -m dashboards.generate` writes the Perses dashboards, ServiceMonitor and
PrometheusRule under dashboards/generated/ (committed, so they can be applied without Python)."""
