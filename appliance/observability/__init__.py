"""Observability: what the appliance exports, how Prometheus finds it, what Grafana shows.

contract.py     the gateway's metric names and the DCGM exporter's: what queries may use
targets.py      the engines' scrape targets (Prometheus file_sd), written by the supervisor
prometheus.py   prometheus.yml and the alert rules, rendered from the config
dashboards.py   the Grafana dashboards, built with grafana-foundation-sdk (build script)
"""
