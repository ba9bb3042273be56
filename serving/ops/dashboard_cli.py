"""`keel dashboard [CONFIG] [--out FILE]`: write the Grafana dashboard JSON for a config."""

from __future__ import annotations

from pathlib import Path

from serving.config import REPO_ROOT

DEFAULT_CONFIG = REPO_ROOT / "configs" / "local.yaml"
DEFAULT_OUT = Path("deploy") / "grafana" / "keel.json"


def add_parser(sub) -> None:
    p = sub.add_parser("dashboard", help="write the Grafana dashboard (JSON, provisioning-ready) for a config")
    p.add_argument(
        "config",
        nargs="?",
        default=str(DEFAULT_CONFIG),
        metavar="CONFIG",
        help="Keel config: its models, SLOs and prices shape the panels (default: configs/local.yaml)",
    )
    p.add_argument(
        "--out",
        default=str(DEFAULT_OUT),
        metavar="FILE",
        help=f"where to write it; - for stdout (default: {DEFAULT_OUT})",
    )
    p.add_argument(
        "--hardware",
        default=None,
        metavar="FILE",
        help="hardware profiles that price a "
        "replica-hour (default: `costs.hardware_file`, else configs/bench/hardware.yaml)",
    )


def run(args) -> int:
    from serving.config import load_config
    from serving.ops.dashboard import all_panels, build_dashboard, dashboard_json, panel_queries

    dash = build_dashboard(
        load_config(args.config, check_engine_args=False), args.hardware, base=Path(args.config).parent
    )
    text = dashboard_json(dash)
    if args.out == "-":
        print(text, end="")
        return 0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    panels = [p for p in all_panels(dash) if p.type_val != "row"]
    print(f"{out}: {len(panels)} panels, {len(panel_queries(dash))} queries (uid {dash.uid})")
    return 0
