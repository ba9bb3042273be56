"""Operating Keel as a service: SLOs and their alert rules, anomaly detection, cost per tenant
and its forecast, dashboards, and the history of config changes.

Each concern is plain Python over plain data (configs, audit records, metric samples); the
gateway feeds two of them (SLO events and anomaly observations) and the `keel` commands
(`keel slo`, `keel cost`, `keel dashboard`, `keel history`) read the rest. The command table
is serving/ops/commands.py.
"""
