"""The Markdown report: throughput/latency table, per-query latency, memory, targets, problems."""

from __future__ import annotations

from dataclasses import dataclass, field

from bench.idle_clients import MemoryResult
from bench.pgbench import Measurement, Scenario

TARGET_KEYS = ("direct", "pgbouncer", "shardgate")
TARGET_LABELS = {"direct": "direct", "pgbouncer": "PgBouncer", "shardgate": "Shardgate"}

# Targets from issue 2.
MIN_RATIO_SIMPLE = 0.85
MIN_RATIO_EXTENDED = 0.85
MIN_RATIO_CONNECT = 0.50
MAX_EXTRA_LATENCY_US = 20.0
MAX_KB_PER_IDLE_CLIENT = 50.0

MISSING = "n/a"
NOISY_BACKGROUND_PCT = 10.0


@dataclass(slots=True)
class Results:
    """Everything one benchmark run measured."""

    info: dict[str, str]
    scenarios: list[Scenario]
    runs: dict[str, dict[str, list[Measurement]]] = field(default_factory=dict)
    memory: list[MemoryResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # Machine CPU busy while only idle poolers ran, sampled before each scenario.
    background_busy_pct: list[float] = field(default_factory=list)
    # Pooler RSS right after the warm-up, by target key: the start of the growth column.
    rss_after_warmup_kb: dict[str, int] = field(default_factory=dict)
    # (scenario, target) pairs not run, with the reason.
    unsupported: dict[tuple[str, str], str] = field(default_factory=dict)
    shardgate_log_findings: list[str] = field(default_factory=list)
    shardgate_log_path: str = ""

    def add(self, measurement: Measurement) -> None:
        self.runs.setdefault(measurement.scenario, {}).setdefault(measurement.target, []).append(measurement)

    def representative(self, scenario: str, target: str) -> Measurement | None:
        """The run with the median TPS among the clean runs (the lower middle one for an even count)."""
        clean = [m for m in self.runs.get(scenario, {}).get(target, []) if m.ok]
        if not clean:
            return None
        ordered = sorted(clean, key=lambda m: m.tps or 0.0)
        return ordered[(len(ordered) - 1) // 2]

    def failures(self, scenario: str, target: str) -> list[Measurement]:
        return [m for m in self.runs.get(scenario, {}).get(target, []) if not m.ok]

    def round_ratios(self, scenario: str) -> list[float]:
        """Shardgate TPS over PgBouncer TPS in each round where both ran clean. The two run back to back
        within a round, so a ratio pairs runs that saw the same machine."""
        runs = self.runs.get(scenario, {})
        # a target not run in a scenario has no runs at all: nothing to pair
        pairs = zip(runs.get("shardgate", []), runs.get("pgbouncer", []), strict=False)
        return [s.tps / p.tps for s, p in pairs if s.ok and p.ok and s.tps is not None and p.tps]

    def ratio(self, scenario: str) -> float | None:
        """The median of the per-round ratios (the lower middle one for an even count)."""
        ratios = sorted(self.round_ratios(scenario))
        return ratios[(len(ratios) - 1) // 2] if ratios else None

    def cpu_us_per_transaction(self, scenario: str, target: str) -> float | None:
        """Pooler CPU time per transaction, the median over clean runs (the lower middle one for an even
        count). Steadier than TPS on a shared machine: it is what the pooler itself spends."""
        values = sorted(
            m.pooler_cpu_pct * 10_000.0 / m.tps  # % of one core -> µs of CPU per second, per transaction
            for m in self.runs.get(scenario, {}).get(target, [])
            if m.ok and m.pooler_cpu_pct is not None and m.tps
        )
        return values[(len(values) - 1) // 2] if values else None

    def added_latency_us(self, scenario: str, target: str) -> float | None:
        direct = self.representative(scenario, "direct")
        pooled = self.representative(scenario, target)
        if direct is None or pooled is None or direct.latency_ms is None or pooled.latency_ms is None:
            return None
        return (pooled.latency_ms - direct.latency_ms) * 1000.0


def _tps(measurement: Measurement | None, failed: bool) -> str:
    if measurement is None or measurement.tps is None:
        return "FAILED" if failed else MISSING
    text = f"{measurement.tps:,.0f}"
    return text + " (some runs FAILED)" if failed else text


def _ms(measurement: Measurement | None) -> str:
    if measurement is None or measurement.latency_ms is None:
        return MISSING
    return f"{measurement.latency_ms:.3f}"


def _pct(value: float | None) -> str:
    return MISSING if value is None else f"{100.0 * value:.1f}%"


def _us(value: float | None, signed: bool = False) -> str:
    if value is None:
        return MISSING
    return f"{value:+.0f} µs" if signed else f"{value:.0f} µs"


def _kb(value: float | None) -> str:
    return MISSING if value is None else f"{value:,.0f}"


def _verdict(passed: bool | None) -> str:
    return "not measured" if passed is None else ("met" if passed else "**MISSED**")


def throughput_table(results: Results) -> list[str]:
    lines = [
        "| scenario | direct TPS | PgBouncer TPS | Shardgate TPS | Shardgate/PgBouncer | each round % "
        "| direct latency ms | PgBouncer latency ms | Shardgate latency ms |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    footnotes: dict[str, int] = {}
    for scenario in results.scenarios:
        if scenario.key not in results.runs:
            continue
        picked = {key: results.representative(scenario.key, key) for key in TARGET_KEYS}
        failed = {key: bool(results.failures(scenario.key, key)) for key in TARGET_KEYS}
        cells = [scenario.title]
        for key in TARGET_KEYS:
            reason = results.unsupported.get((scenario.key, key))
            if reason is None:
                cells.append(_tps(picked[key], failed[key]))
            else:
                number = footnotes.setdefault(reason, len(footnotes) + 1)
                cells.append(f"not run[^{number}]")
        cells.append(_pct(results.ratio(scenario.key)))
        cells.append(", ".join(f"{100.0 * r:.0f}" for r in results.round_ratios(scenario.key)) or MISSING)
        cells += [_ms(picked[key]) for key in TARGET_KEYS]
        lines.append("| " + " | ".join(cells) + " |")
    if footnotes:
        lines.append("")
        lines.extend(f"[^{number}]: {reason}" for reason, number in footnotes.items())
    return lines


def latency_section(results: Results) -> list[str]:
    if "latency" not in results.runs:
        return []
    pgbouncer = results.added_latency_us("latency", "pgbouncer")
    shardgate = results.added_latency_us("latency", "shardgate")
    difference = None if pgbouncer is None or shardgate is None else shardgate - pgbouncer
    lines = [
        "## Per-query latency (`-S -c 1`)",
        "",
        "| target | average latency ms | added per query over direct |",
        "|---|--:|--:|",
    ]
    for key in TARGET_KEYS:
        added = None if key == "direct" else results.added_latency_us("latency", key)
        lines.append(
            f"| {TARGET_LABELS[key]} | {_ms(results.representative('latency', key))} "
            f"| {MISSING if key == 'direct' else _us(added)} |"
        )
    lines += ["", f"Shardgate minus PgBouncer: **{_us(difference, signed=True)}** per query.", ""]
    return lines


def memory_section(results: Results) -> list[str]:
    if not results.memory:
        return []
    wanted = max(result.wanted for result in results.memory)
    lines = [
        f"## Memory ({wanted:,} idle authenticated clients)",
        "",
        "| process | RSS at rest KB | RSS with idle clients KB | clients connected "
        "| per idle client KB | RSS after they left KB |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    for result in results.memory:
        per_client = result.per_client_kb
        lines.append(
            f"| {result.label} | {_kb(result.rss_rest_kb)} | {_kb(result.rss_loaded_kb)} | {result.opened:,} "
            f"| {MISSING if per_client is None else f'{per_client:.1f}'} | {_kb(result.rss_after_kb)} |"
        )
    lines.append("")
    return lines


def targets_section(results: Results) -> list[str]:
    def ratio_row(key: str, title: str, minimum: float) -> str:
        ratio = results.ratio(key) if key in results.runs else None
        passed = None if ratio is None else ratio >= minimum
        return f"| {title} | >= {minimum:.0%} of PgBouncer | {_pct(ratio)} | {_verdict(passed)} |"

    rows = [
        ratio_row("select-simple", "`-S` simple, 16 clients", MIN_RATIO_SIMPLE),
        ratio_row("select-extended", "`-S -M extended`, 16 clients", MIN_RATIO_EXTENDED),
        ratio_row("connect", "`-S -C`", MIN_RATIO_CONNECT),
    ]
    pgbouncer = results.added_latency_us("latency", "pgbouncer")
    shardgate = results.added_latency_us("latency", "shardgate")
    difference = None if pgbouncer is None or shardgate is None else shardgate - pgbouncer
    passed = None if difference is None else difference <= MAX_EXTRA_LATENCY_US
    rows.append(
        f"| `-c 1` added latency | within {MAX_EXTRA_LATENCY_US:.0f} µs of PgBouncer's "
        f"| {_us(difference, signed=True)} | {_verdict(passed)} |"
    )
    shardgate_memory = next((m for m in results.memory if m.label == "Shardgate"), None)
    per_client = shardgate_memory.per_client_kb if shardgate_memory else None
    passed = None if per_client is None else per_client < MAX_KB_PER_IDLE_CLIENT
    rows.append(
        f"| memory per idle client | < {MAX_KB_PER_IDLE_CLIENT:.0f} KB "
        f"| {MISSING if per_client is None else f'{per_client:.1f} KB'} | {_verdict(passed)} |"
    )
    return [
        "## Targets (issue 2)",
        "",
        "| target | goal | measured | result |",
        "|---|---|--:|---|",
        *rows,
        "",
    ]


def rss_growth_section(results: Results) -> list[str]:
    """Pooler RSS after the warm-up and after each scenario's last run: steady growth hints at a leak."""
    if not results.rss_after_warmup_kb:
        return []
    lines = [
        "## Pooler RSS during the pgbench runs (KB, after the last run of each scenario)",
        "",
        "| after | PgBouncer | Shardgate |",
        "|---|--:|--:|",
        f"| warm-up | {_kb(results.rss_after_warmup_kb.get('pgbouncer'))} "
        f"| {_kb(results.rss_after_warmup_kb.get('shardgate'))} |",
    ]
    for scenario in results.scenarios:
        if scenario.key not in results.runs:
            continue
        cells = []
        for key in ("pgbouncer", "shardgate"):
            runs = results.runs[scenario.key].get(key, [])
            cells.append(_kb(runs[-1].pooler_rss_after_kb if runs else None))
        lines.append(f"| {scenario.title} | {cells[0]} | {cells[1]} |")
    lines.append("")
    return lines


def cpu_section(results: Results) -> list[str]:
    lines = [
        "## CPU during each run (pooler: % of one core; machine: % of all cores)",
        "",
        "| scenario | PgBouncer | Shardgate | PgBouncer µs/txn | Shardgate µs/txn | machine busy: direct "
        "| machine busy: PgBouncer | machine busy: Shardgate |",
        "|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for scenario in results.scenarios:
        if scenario.key not in results.runs:
            continue
        picked = [results.representative(scenario.key, key) for key in TARGET_KEYS]
        cells = [_percent(m.pooler_cpu_pct if m else None) for m in picked[1:]]
        cells += [_one_decimal(results.cpu_us_per_transaction(scenario.key, key)) for key in TARGET_KEYS[1:]]
        cells += [_percent(m.machine_busy_pct if m else None) for m in picked]
        lines.append(f"| {scenario.title} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Pooler CPU: user+system time of the pooler process over the run (% of one core for the median run; "
        "µs per transaction, the median over the rounds). Machine busy: all CPUs, everything running "
        "(pgbench, PostgreSQL, the pooler, anything else on the machine).",
        "",
    ]
    return lines


def _one_decimal(value: float | None) -> str:
    return MISSING if value is None else f"{value:.1f}"


def _percent(value: float | None) -> str:
    return MISSING if value is None else f"{value:.0f}%"


def problems_section(results: Results) -> list[str]:
    lines: list[str] = []
    for scenario in results.scenarios:
        for key in TARGET_KEYS:
            for measurement in results.failures(scenario.key, key):
                detail = "; ".join(measurement.problems) or "no result"
                lines.append(f"- {scenario.title} via {TARGET_LABELS[key]}: {detail}")
    for memory in results.memory:
        lines.extend(f"- memory via {memory.label}: {error}" for error in memory.errors)
    lines.extend(f"- {note}" for note in results.notes)
    if results.shardgate_log_findings:
        lines.append(
            f"- Shardgate stderr ({results.shardgate_log_path}) has "
            f"{len(results.shardgate_log_findings)} warning/error line(s); first ones:"
        )
        lines.extend(f"    - `{line[:300]}`" for line in results.shardgate_log_findings[:10])
    else:
        lines.append("- Shardgate stderr: no warnings, errors or tracebacks.")
    return ["## Problems", "", *lines, ""]


def background_lines(results: Results) -> list[str]:
    samples = results.background_busy_pct
    if not samples:
        return []
    mean = sum(samples) / len(samples)
    line = (
        f"Background load (machine CPU busy with our poolers idle, sampled before each scenario): "
        f"mean {mean:.0f}%, max {max(samples):.0f}%."
    )
    if max(samples) > NOISY_BACKGROUND_PCT:
        line += (
            f" **Other work was running on the machine (> {NOISY_BACKGROUND_PCT:.0f}%): "
            "treat the numbers as noisy and re-run on a quiet machine.**"
        )
    return [line, ""]


def render(results: Results) -> str:
    info = results.info
    header = [
        "# Shardgate benchmark: PostgreSQL direct vs PgBouncer vs Shardgate",
        "",
        f"{info['mode']} run, {info['started']} · {info['machine']}",
        "",
        f"{info['versions']}",
        "",
        f"{info['setup']}",
        "",
        *background_lines(results),
    ]
    body = [
        "## Throughput and latency",
        "",
        *throughput_table(results),
        "",
        "TPS and latencies are the median run (by TPS) when there are several rounds; latency is pgbench's "
        "average per transaction. Shardgate/PgBouncer is the median of the per-round ratios (each round "
        "runs the two back to back), listed in the next column.",
        "",
    ]
    return "\n".join(
        header
        + body
        + latency_section(results)
        + memory_section(results)
        + rss_growth_section(results)
        + targets_section(results)
        + cpu_section(results)
        + problems_section(results)
    )
