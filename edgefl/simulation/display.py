"""Live progress and the round table of a simulation, drawn with rich."""

from __future__ import annotations

import math
from types import TracebackType

from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from edgefl.simulation.metrics import RoundRecord, SimulationMetrics


def _kib(count: float) -> str:
    return f"{count / 1024:,.1f}"


def _size(count: float) -> str:
    """Bytes in a few characters: 812 B, 24.5 K, 3.1 M (binary units)."""
    for unit, scale in (("M", 1 << 20), ("K", 1 << 10)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count:.0f} B"


def _accuracy(value: float) -> str:
    """An accuracy as a fraction with three decimals, "-" when unknown (NaN)."""
    return "-" if math.isnan(value) else f"{value:.3f}"


class LiveProgress:
    """A progress bar over rounds that shows devices reported, accuracy, bytes and time.

    Use as a context manager; pass `on_round` and `on_status` to the simulation.
    """

    def __init__(self, console: Console, rounds: int) -> None:
        """Prepare the bar for `rounds` rounds on `console`."""
        self.console = console
        self.progress = Progress(
            TextColumn("[bold]round[/bold]"),
            MofNCompleteColumn(),
            BarColumn(bar_width=24),
            TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )
        self.task = self.progress.add_task("rounds", total=rounds, stats="starting")

    def __enter__(self) -> LiveProgress:
        self.progress.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.progress.stop()

    def on_status(self, line: str) -> None:
        """Show a start-up or tear-down step above the bar."""
        self.progress.console.print(f"[dim]{line}[/dim]")

    def on_round(self, record: RoundRecord) -> None:
        """Advance the bar with a round's numbers."""
        stats = (
            f"devices {record.reported}/{record.selected}  acc {_accuracy(record.accuracy)}  "
            f"up {_kib(record.bytes_up)} KiB  {record.seconds:.2f} s"
        )
        self.progress.update(self.task, advance=1, stats=stats)


def round_table(metrics: SimulationMetrics, title: str = "rounds") -> Table:
    """Return the per-round table: devices, accuracy, bytes, time, and ε when rounds are noised."""
    caption = "test: global head on the test set; global, personal: on devices' own data"
    columns = ["round", "online", "updates", "drop", "test", "global", "personal", "up", "down",
               "s"]  # fmt: skip
    private = any(not math.isnan(r.epsilon) for r in metrics.rounds)
    if private:
        deltas = sorted({r.delta for r in metrics.rounds if not math.isnan(r.delta)})
        columns.append("ε")
        caption += f"; ε: privacy spent so far, at δ={', '.join(f'{d:g}' for d in deltas)}"
    # SIMPLE_HEAD has no vertical rules, so all columns fit an 80-column terminal.
    table = Table(
        title=title, box=box.SIMPLE_HEAD, padding=(0, 1), collapse_padding=True, pad_edge=False,
        caption=caption,
    )  # fmt: skip
    for column in columns:
        table.add_column(column, justify="right")
    for r in metrics.rounds:
        cells = [
            str(r.round), str(r.online), f"{r.reported}/{r.selected}", str(r.dropped),
            _accuracy(r.accuracy), _accuracy(r.device_accuracy), _accuracy(r.personal_accuracy),
            _size(r.bytes_up), _size(r.bytes_down), f"{r.seconds:.2f}",
        ]  # fmt: skip
        if private:
            cells.append("-" if math.isnan(r.epsilon) else f"{r.epsilon:.3g}")
        table.add_row(*cells)
    return table


def summary_line(metrics: SimulationMetrics) -> str:
    """Return one line with the run's headline numbers."""
    s = metrics.summary
    accuracy = _accuracy(metrics.final_accuracy)
    return (
        f"final accuracy {accuracy}; federated part {s.get('wall_s', 0):.2f} s "
        f"(start-up {s.get('startup_s', 0):.2f} s); {s.get('bytes_per_device_per_round', 0):,.0f} "
        f"B per device per round; peak RSS {s.get('peak_rss_mb', 0):,.0f} MiB"
        + (f"\nstopped early: {s['stopped']}" if s.get("stopped") else "")
    )
