"""`python -m gateway.tune`: what-if tables and plots for product teams, from the command line.

    python -m gateway.tune whatif [--config FILE] [--hours 24] [--tenant T] [--png curve.png]
    python -m gateway.tune dry-run --kind target_rate --rate 0.2 [--config FILE]

Reads the same signal database and policy file as the gateway (no running gateway needed);
changes nothing. Apply a policy through the admin API (`PUT /admin/policy`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from gateway.settings import load_settings
from gateway.tuning import Tuning
from router import DEFAULT_TENANT, ConfidenceRouter, PolicyBook

app = typer.Typer(add_completion=False, help="what-if analysis of escalation thresholds")
ConfigOpt = Annotated[Path | None, typer.Option("--config", help="the gateway's YAML config")]
HoursOpt = Annotated[float | None, typer.Option(help="only the last N hours of logged traffic")]


def _tuning(config: Path | None) -> Tuning:
    settings = load_settings(config)
    policies = PolicyBook.load(settings.policy_store, settings.router.threshold)
    return Tuning(settings, ConfidenceRouter.from_config(settings.router), policies)


def _pct(x: Any) -> str:
    return "–" if x is None or x != x else f"{100 * x:.1f}%"


def plot(data: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    pts = data["curve"]
    ax1.plot([p["escalation_rate"] for p in pts], [p["quality"] for p in pts], "-o", ms=3, label="estimated quality")
    ax1.plot([p["escalation_rate"] for p in pts], [p["quality_lower"] for p in pts], ":", label="lower bound")
    ax2.plot([p["threshold"] for p in pts], [p["escalation_rate"] for p in pts], label="escalation rate")
    ax2.plot([p["threshold"] for p in pts], [p["cost_vs_teacher"] for p in pts], label="cost vs all-teacher")
    cur = data["current"]
    if cur:
        ax1.plot([cur["escalation_rate"]], [cur["quality"]], "r*", ms=14, label=f"current (t={cur['threshold']:.2f})")
        ax2.axvline(cur["threshold"], color="r", ls="--", label="current threshold")
    ax1.set(xlabel="escalation rate", ylabel="served quality", title="quality vs escalation")
    ax2.set(xlabel="threshold (escalate when confidence < t)", title="rate and cost by threshold")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"tiergate what-if over {data['samples']} logged requests")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


@app.command()
def whatif(
    config: ConfigOpt = None,
    hours: HoursOpt = None,
    tenant: Annotated[str, typer.Option(help="tenant (API-key id) whose policy is marked")] = DEFAULT_TENANT,
    png: Annotated[Path | None, typer.Option(help="also write the curve as a PNG")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
) -> None:
    """Escalation rate, estimated quality and cost at each threshold; the current point marked."""
    data = _tuning(config).whatif(hours, tenant)
    if json_out:
        typer.echo(json.dumps(data, indent=2))
    else:
        table = Table(title=f"what-if over {data['samples']} logged requests (policy: {data['policy']})")
        for col in ("threshold", "escalation", "quality", "quality ≥ (95%)", "cost vs all-teacher"):
            table.add_column(col, justify="right")
        current = data["current"]["threshold"] if data["current"] else None
        for p in data["curve"][::2]:
            mark = " ◀ current" if current is not None and abs(p["threshold"] - current) < 0.02 else ""
            table.add_row(
                f"{p['threshold']:.2f}{mark}", _pct(p["escalation_rate"]), _pct(p["quality"]),
                _pct(p["quality_lower"]), _pct(p["cost_vs_teacher"]),
            )  # fmt: skip
        Console(width=120).print(table)
        early = data.get("early") or {}
        if early.get("current"):
            e = early["current"]
            typer.echo(
                f"early decisions, on {early['samples']} records that hold both: agree with full-draft ones on "
                f"{_pct(early['agreement'])}; at the current threshold escalation {_pct(e['escalation_rate'])}, "
                f"quality {_pct(e['quality'])}"
            )
    if png is not None and data["curve"]:
        plot(data, png)
        typer.echo(f"wrote {png}")


@app.command("dry-run")
def dry_run(
    kind: Annotated[str, typer.Option(help="fixed | target_rate | target_quality")],
    threshold: Annotated[float | None, typer.Option()] = None,
    rate: Annotated[float | None, typer.Option()] = None,
    quality: Annotated[float | None, typer.Option()] = None,
    config: ConfigOpt = None,
    hours: HoursOpt = None,
) -> None:
    """What a proposed policy would do on logged traffic. Changes nothing."""
    tuning = _tuning(config)
    try:
        policy, predicted = tuning.resolve(
            {"kind": kind, "threshold": threshold, "rate": rate, "quality": quality}, hours
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    current = tuning.whatif(hours)["current"]
    typer.echo(json.dumps({"policy": policy.to_json(), "predicted": predicted, "current": current}, indent=2))


if __name__ == "__main__":
    app()
