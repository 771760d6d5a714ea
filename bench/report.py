"""The Markdown report: throughput/latency table, per-query latency, memory, targets, problems."""

from __future__ import annotations

from dataclasses import dataclass, field

from bench.idle_clients import MemoryResult
from bench.pgbench import Measurement, Scenario

TARGET_KEYS = ("direct", "pgbouncer", "shardgate")
TARGET_LABELS = {"direct": "direct", "pgbouncer": "PgBouncer", "shardgate": "Shardgate"}
# A second Shardgate run from a worktree of another revision (`bench.run --baseline REV`).
BASELINE = "baseline"

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
    # "Shardgate <rev>" when a baseline Shardgate ran as target BASELINE, else None.
    baseline_label: str | None = None
    baseline_log_findings: list[str] = field(default_factory=list)
    baseline_log_path: str = ""

    @property
    def target_keys(self) -> tuple[str, ...]:
        return (*TARGET_KEYS, BASELINE) if self.baseline_label else TARGET_KEYS

    def label(self, key: str) -> str:
        if key == BASELINE and self.baseline_label:
            return self.baseline_label
        return TARGET_LABELS.get(key, key)

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

    def round_ratios(
        self, scenario: str, numerator: str = "shardgate", denominator: str = "pgbouncer"
    ) -> list[float]:
        """Numerator TPS over denominator TPS (Shardgate over PgBouncer unless told) in each round where
        both ran clean. The targets run back to back within a round, so a ratio pairs runs that saw the
        same machine."""
        runs = self.runs.get(scenario, {})
        # a target not run in a scenario has no runs at all: nothing to pair
        pairs = zip(runs.get(numerator, []), runs.get(denominator, []), strict=False)
        return [s.tps / p.tps for s, p in pairs if s.ok and p.ok and s.tps is not None and p.tps]

    def ratio(
        self, scenario: str, numerator: str = "shardgate", denominator: str = "pgbouncer"
    ) -> float | None:
        """The median of the per-round ratios (the lower middle one for an even count)."""
        ratios = sorted(self.round_ratios(scenario, numerator, denominator))
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


def _ratio_cells(results: Results, scenario: str, numerator: str, denominator: str) -> list[str]:
    """The median per-round ratio and each round's, in percent."""
    rounds = results.round_ratios(scenario, numerator, denominator)
    return [
        _pct(results.ratio(scenario, numerator, denominator)),
        ", ".join(f"{100.0 * r:.0f}" for r in rounds) or MISSING,
    ]


def throughput_table(results: Results) -> list[str]:
    keys = results.target_keys
    baseline = results.baseline_label
    if baseline is None:
        ratio_header = "Shardgate/PgBouncer | each round %"
    else:
        ratio_header = (
            f"Shardgate/PgBouncer | each round % | {baseline}/PgBouncer | after/before (Shardgate/{baseline}) "
            "| each round %"
        )
    lines = [
        "| scenario | "
        + " | ".join(f"{results.label(key)} TPS" for key in keys)
        + f" | {ratio_header} | "
        + " | ".join(f"{results.label(key)} latency ms" for key in keys)
        + " |",
        "|---|" + "--:|" * (2 * len(keys) + ratio_header.count("|") + 1),
    ]
    footnotes: dict[str, int] = {}
    for scenario in results.scenarios:
        if scenario.key not in results.runs:
            continue
        picked = {key: results.representative(scenario.key, key) for key in keys}
        failed = {key: bool(results.failures(scenario.key, key)) for key in keys}
        cells = [scenario.title]
        for key in keys:
            reason = results.unsupported.get((scenario.key, key))
            if reason is None:
                cells.append(_tps(picked[key], failed[key]))
            else:
                number = footnotes.setdefault(reason, len(footnotes) + 1)
                cells.append(f"not run[^{number}]")
        cells += _ratio_cells(results, scenario.key, "shardgate", "pgbouncer")
        if baseline is not None:
            cells.append(_pct(results.ratio(scenario.key, BASELINE, "pgbouncer")))
            cells += _ratio_cells(results, scenario.key, "shardgate", BASELINE)
        cells += [_ms(picked[key]) for key in keys]
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
    for key in results.target_keys:
        added = None if key == "direct" else results.added_latency_us("latency", key)
        lines.append(
            f"| {results.label(key)} | {_ms(results.representative('latency', key))} "
            f"| {MISSING if key == 'direct' else _us(added)} |"
        )
    lines += ["", f"Shardgate minus PgBouncer: **{_us(difference, signed=True)}** per query.", ""]
    if results.baseline_label:
        before = results.added_latency_us("latency", BASELINE)
        change = None if shardgate is None or before is None else shardgate - before
        lines[-1:] = [
            f"Shardgate minus {results.baseline_label}: **{_us(change, signed=True)}** per query.",
            "",
        ]
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
    poolers = results.target_keys[1:]
    lines = [
        "## Pooler RSS during the pgbench runs (KB, after the last run of each scenario)",
        "",
        "| after | " + " | ".join(results.label(key) for key in poolers) + " |",
        "|---|" + "--:|" * len(poolers),
        "| warm-up | " + " | ".join(_kb(results.rss_after_warmup_kb.get(key)) for key in poolers) + " |",
    ]
    for scenario in results.scenarios:
        if scenario.key not in results.runs:
            continue
        cells = []
        for key in poolers:
            runs = results.runs[scenario.key].get(key, [])
            cells.append(_kb(runs[-1].pooler_rss_after_kb if runs else None))
        lines.append(f"| {scenario.title} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def cpu_section(results: Results) -> list[str]:
    keys = results.target_keys
    poolers = keys[1:]
    baseline = results.baseline_label
    change = [] if baseline is None else ["Shardgate - " + baseline + " µs/txn"]
    header = (
        [results.label(key) for key in poolers]
        + [f"{results.label(key)} µs/txn" for key in poolers]
        + change
        + [f"machine busy: {results.label(key)}" for key in keys]
    )
    lines = [
        "## CPU during each run (pooler: % of one core; machine: % of all cores)",
        "",
        "| scenario | " + " | ".join(header) + " |",
        "|---|" + "--:|" * len(header),
    ]
    for scenario in results.scenarios:
        if scenario.key not in results.runs:
            continue
        picked = [results.representative(scenario.key, key) for key in keys]
        per_transaction = [results.cpu_us_per_transaction(scenario.key, key) for key in poolers]
        cells = [_percent(m.pooler_cpu_pct if m else None) for m in picked[1:]]
        cells += [_one_decimal(value) for value in per_transaction]
        if baseline is not None:
            after, before = (
                per_transaction[poolers.index("shardgate")],
                per_transaction[poolers.index(BASELINE)],
            )
            cells.append(MISSING if after is None or before is None else f"{after - before:+.1f}")
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
        for key in results.target_keys:
            for measurement in results.failures(scenario.key, key):
                detail = "; ".join(measurement.problems) or "no result"
                lines.append(f"- {scenario.title} via {results.label(key)}: {detail}")
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
    if results.baseline_label and results.baseline_log_findings:
        lines.append(
            f"- {results.baseline_label} stderr ({results.baseline_log_path}) has "
            f"{len(results.baseline_log_findings)} warning/error line(s); first ones:"
        )
        lines.extend(f"    - `{line[:300]}`" for line in results.baseline_log_findings[:10])
    elif results.baseline_label:
        lines.append(f"- {results.baseline_label} stderr: no warnings, errors or tracebacks.")
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
    title = "# Shardgate benchmark: PostgreSQL direct vs PgBouncer vs Shardgate"
    if results.baseline_label:
        title += f" vs {results.baseline_label}"
    header = [
        title,
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
    if results.baseline_label:
        body[-1:] = [
            f"{results.baseline_label} is the same config run from a git worktree of that revision, "
            "interleaved with the others in every round. after/before is Shardgate TPS over "
            f"{results.baseline_label} TPS, the median of the per-round ratios like the PgBouncer ratio.",
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
