"""Plots for the lessons: loss curves, memory bars with provenance, token-length histograms.

Every memory plot is in GiB, titled, and says in its title and legend "measured on <device>" (on
CPU: "tiny stand-in") or "predicted for <GPU>";
pass ``usable_bytes`` to draw the card's usable-memory line.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib.pyplot as plt  # headless machines fall back to Agg on their own

from m3lab.gpus import GIB
from m3lab.predict.report import Verdict


def _save(fig, path: str | Path | None):
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110, bbox_inches="tight")
    return fig


def loss_curve(result, path: str | Path | None = None, title: str | None = None):
    """Training loss per step of a ``TrainResult``."""
    steps = [s.step for s in result.steps if s.loss is not None]
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.plot(steps, result.losses, marker="o", markersize=3, label=f"loss, {result.provenance}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (M3 unified)")
    ax.set_title(f"{title or 'Fine-tuning loss'}\n({result.provenance})")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def memory_bars(labels: list[str], values_bytes: list[float], provenance: str, path: str | Path | None = None,
                title: str = "Peak memory per configuration", usable_bytes: float | None = None,
                usable_label: str = "usable memory", ylabel: str = "peak memory (GiB)"):
    """One bar per configuration, in GiB (MiB when every value is below 1 GiB, as the stand-in's CPU
    runs are), with the provenance in the title and the legend."""
    unit, scale = ("GiB", GIB) if max([*values_bytes, usable_bytes or 0]) >= GIB else ("MiB", 2**20)
    fig, ax = plt.subplots(figsize=(max(6.4, 1.1 * len(labels) + 2), 4.0))
    bars = ax.bar(range(len(labels)), [v / scale for v in values_bytes], color="tab:blue", label=provenance)
    ax.bar_label(bars, fmt="%.3f" if unit == "GiB" else "%.1f", fontsize=8)
    if usable_bytes is not None:
        ax.axhline(usable_bytes / scale, color="tab:red", linestyle="--",
                   label=f"{usable_label} ({usable_bytes / scale:.2f} {unit})")
    ax.set_ylim(0, max([v / scale for v in values_bytes] + [(usable_bytes or 0) / scale]) * 1.3 or 1)
    ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right")
    ax.set_ylabel(ylabel.replace("GiB", unit))
    ax.set_title(f"{title}\n({provenance})")  # "measured on CPU (tiny stand-in)" says whose run it was
    ax.legend(loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def token_length_histogram(lengths: dict[str, "list[int]"], path: str | Path | None = None,
                           max_lens: dict[str, int] | None = None, tokenizer_name: str = ""):
    """Histograms of token counts per field, with the chosen max lengths marked."""
    fig, axes = plt.subplots(1, len(lengths), figsize=(4.2 * len(lengths), 3.4))
    axes = [axes] if len(lengths) == 1 else list(axes)
    for ax, (name, values) in zip(axes, lengths.items()):
        ax.hist(values, bins=40, color="tab:green")
        if max_lens and name in max_lens:
            ax.axvline(max_lens[name], color="tab:red", linestyle="--", label=f"max_len {max_lens[name]}")
            ax.legend()
        ax.set_xlabel("tokens per text")
        ax.set_ylabel("texts")
        ax.set_title(f"{name} ({len(values)} texts)")
    fig.suptitle(f"Token lengths{', ' + tokenizer_name + ' tokenizer' if tokenizer_name else ''}")
    fig.tight_layout()
    return _save(fig, path)


CATEGORY_COLOURS = {"weights": "tab:blue", "gradients": "tab:orange", "optimizer_states": "tab:purple",
                    "activations": "tab:green", "temporaries": "tab:gray", "other": "tab:brown"}


def _usable_line(ax, usable_bytes: float | None, label: str = "T4 usable memory"):
    if usable_bytes:
        ax.axhline(usable_bytes / GIB, color="tab:red", linestyle="--", label=f"{label} ({usable_bytes / GIB:.2f} GiB)")


def _bar_axes(totals: list[float], usable_gib: float, width: float):
    """One axis from 0, or, when some figures pass twice the card (FlagEmbedding's example at 8,192
    tokens: 137 GiB against 14.74), a broken axis: the card's band below, every taller figure above. A log
    axis would make stacked bars lie about their parts."""
    if not usable_gib:  # a CPU's live bytes: no card, no band to break around
        usable_gib = max(totals)
    band = max([t for t in totals if t <= 2 * usable_gib] + [usable_gib]) * 1.15
    tall = [t for t in totals if t > 2 * usable_gib]  # each of these drawn in the upper band
    if not tall:
        fig, ax = plt.subplots(figsize=(width, 4.4))
        ax.set_ylim(0, band)
        return fig, [ax]
    fig, (upper, lower) = plt.subplots(2, 1, sharex=True, figsize=(width, 5.2),
                                       gridspec_kw={"height_ratios": [1, 2.2], "hspace": 0.08})
    upper.set_ylim(min(tall) * 0.85, max(tall) * 1.12)
    lower.set_ylim(0, band)
    upper.spines["bottom"].set_visible(False)
    lower.spines["top"].set_visible(False)
    upper.tick_params(bottom=False)
    for ax, y in ((upper, 0), (lower, 1)):  # the break marks
        ax.plot([0, 1], [y, y], transform=ax.transAxes, marker=[(-1, -0.5), (1, 0.5)], markersize=10,
                linestyle="none", color="k", mec="k", mew=1, clip_on=False)
    return fig, [upper, lower]


def _gib_or_mib(gib: float) -> str:
    """A bar's figure: GiB, or MiB below 1 GiB (the stand-in's CPU runs are tens of MiB)."""
    return f"{gib:.1f} GiB" if gib >= 1 else f"{gib * 1024:.1f} MiB"


def _finish_bars(fig, axes, labels: list[str], title: str, ylabel: str):
    axes[-1].set_xticks(range(len(labels)), labels, rotation=15, ha="right")
    for ax in axes:
        ax.grid(axis="y", alpha=0.3)
    fig.supylabel(ylabel, fontsize=10) if len(axes) > 1 else axes[0].set_ylabel(ylabel)
    axes[0].set_title(title)
    axes[0].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def breakdown_bars(reports: dict, path: str | Path | None = None, title: str = "What the peak is made of",
                   measured: dict | None = None, measured_provenance: str = "measured"):
    """Stacked bars, one per configuration: what is alive at the predicted peak (weights,
    gradients, optimizer states, activations, temporaries, DeepSpeed's buffers), then up to what the
    step needs of the card (the simulated allocator's gaps, the CUDA context); the card's usable
    memory as a line; a broken axis when some bars dwarf the card. ``measured`` ({label: bytes}) adds measured peaks as black
    markers, labelled ``measured_provenance`` (e.g. "measured on Tesla T4")."""
    labels = list(reports)
    first = next(iter(reports.values()))
    on_card = bool(first.usable_bytes)
    # a CPU's stand-in holds tens of MiB: drawn in MiB, and not called GPU memory
    unit, unit_name = (GIB, "GiB") if on_card or max(r.total_bytes for r in reports.values()) >= GIB else (2**20, "MiB")
    totals = [reports[k].total_bytes / unit for k in labels]
    tops = [max(t, (measured or {}).get(k, 0) / unit) for k, t in zip(labels, totals)]
    fig, axes = _bar_axes(tops, first.usable_bytes / unit, max(6.4, 1.3 * len(labels) + 3))
    for ax in axes:
        bottoms = [0.0] * len(labels)
        for category, colour in CATEGORY_COLOURS.items():
            values = [reports[k].breakdown[category] / unit for k in labels]
            ax.bar(range(len(labels)), values, bottom=bottoms, color=colour, label=category.replace("_", " "))
            bottoms = [b + v for b, v in zip(bottoms, values)]
        extra = [t - b for t, b in zip(totals, bottoms)]
        if any(e > 1e-9 for e in extra):
            ax.bar(range(len(labels)), extra, bottom=bottoms, color="white", edgecolor="black", hatch="//",
                   label="what the card needs beyond them: PyTorch's cache's unusable pieces + CUDA context (estimated)")
        _measured_diamonds(ax, labels, measured, measured_provenance, unit)
        _usable_line(ax, first.usable_bytes)
    for i, (total, top) in enumerate(zip(totals, tops)):  # the figure itself, over every mark at that bar
        axes[0 if len(axes) > 1 and top > axes[-1].get_ylim()[1] else -1].annotate(
            _gib_or_mib(total * unit / GIB), (i, top), xytext=(0, 4), textcoords="offset points", ha="center",
            va="bottom", fontsize=8)
    provenance = " / ".join(sorted({r.provenance for r in reports.values()} | ({measured_provenance} if measured else set())))
    ylabel = f"GPU memory at the peak ({unit_name})" if on_card else f"memory on the CPU at the peak ({unit_name})"
    _finish_bars(fig, axes, labels, f"{title}\n({provenance})", ylabel)
    return _save(fig, path)


def _measured_diamonds(ax, labels: list[str], measured: dict | None, provenance: str, unit: int = GIB) -> None:
    """Measured peaks ({label: bytes}) as black diamonds over the bars they measure."""
    if measured:
        xs = [i for i, k in enumerate(labels) if k in measured]
        ax.scatter(xs, [measured[labels[i]] / unit for i in xs], color="black", marker="D", zorder=6,
                   label=f"peak allocated, {provenance}")


VERDICT_COLOURS = {Verdict.FITS: "tab:green", Verdict.CLOSE_CALL: "tab:orange",
                   Verdict.OUT_OF_MEMORY: "tab:red", Verdict.NO_CARD: "tab:gray"}


def ledger(reports: dict, path: str | Path | None = None,
           title: str = "The path so far: what each knob does to memory", measured: dict | None = None,
           measured_provenance: str = "measured"):
    """The series' ledger (``m3lab.plan.ledger``): one bar per step, one knob each. A bar's height is
    what the step needs of the card and its colour the verdict that figure gives (fits, close call,
    out of memory), so height and colour never disagree; a tick inside marks the peak of live tensors,
    written over the bar with its change from the step before; the card's usable memory is a line, and
    the axis breaks where a step dwarfs the card. ``measured`` ({label: bytes}) adds measured peaks as
    black diamonds (beside the ticks they measure)."""
    labels = list(reports)
    first = next(iter(reports.values()))
    on_card = bool(first.usable_bytes)
    peaks = [reports[k].peak_allocated_bytes / GIB for k in labels]
    needs = [reports[k].total_bytes / GIB for k in labels]
    tops = [max(n, p, (measured or {}).get(k, 0) / GIB) for k, n, p in zip(labels, needs, peaks)]
    fig, axes = _bar_axes(tops + peaks, first.usable_bytes / GIB, max(7.0, 0.95 * len(labels) + 3.5))
    kinds = [reports[k].kind for k in labels]
    need_words = "what the step needs of the card" if on_card else "live tensors on the CPU"
    for ax in axes:
        for i, (need, kind) in enumerate(zip(needs, kinds)):
            ax.bar(i, need, color=VERDICT_COLOURS[kind], alpha=0.75, label=f"{need_words}; {kind.value}")
        ax.scatter(range(len(labels)), peaks, color="black", marker="_", s=300, zorder=5,
                   label="peak of live tensors (the figure written over the bar)")
        _measured_diamonds(ax, labels, measured, measured_provenance)
        _usable_line(ax, first.usable_bytes)
    for i, (peak, top) in enumerate(zip(peaks, tops)):  # over everything drawn at that step
        change = "" if i == 0 else f"\n{peak - peaks[i - 1]:+.2f}"
        axes[0 if len(axes) > 1 and top > axes[-1].get_ylim()[1] else -1].annotate(
            f"{peak:.2f}{change}", (i, top), xytext=(0, 2), textcoords="offset points", ha="center", va="bottom",
            fontsize=7)
    handles, names = axes[-1].get_legend_handles_labels()
    unique = dict(zip(names, handles))
    axes[0].legend(unique.values(), unique.keys(), fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    provenance = " / ".join(sorted({r.provenance for r in reports.values()}))
    axes[-1].set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize=8)
    for ax in axes:
        ax.grid(axis="y", alpha=0.3)
    ylabel = "GPU memory (GiB)" if on_card else "memory on the CPU (GiB)"
    fig.supylabel(ylabel, fontsize=10) if len(axes) > 1 else axes[0].set_ylabel(ylabel)
    axes[0].set_title(f"{title}\n({provenance})")
    return _save(fig, path)


def evidence(rows: list, path: str | Path | None = None,
             title: str = "Predicted against measured, every GPU run"):
    """Each measured run (``m3lab.evidence.compare.Evidence``) as points: how far the prediction is
    from the measurement, in percent on a linear axis (the difference is the point), against the
    measured GiB: peak allocated (filled), reserved (hollow), the bytes in use at an out-of-memory
    (a cross). A run under a T4's limit is ringed in the colour of the predicted verdict."""
    fig, ax = plt.subplots(figsize=(6.8, 4.6))
    points = []
    for row in rows:
        run, report = row.run, row.report
        if run.ran:
            points += [(run.peak_allocated_bytes, report.peak_allocated_bytes, "o", "tab:blue", "peak allocated"),
                       (run.peak_reserved_bytes, report.predicted_reserved_bytes, "o", "none", "reserved")]
        else:
            oom = report.out_of_memory
            points.append((run.oom_allocated_bytes, oom.allocated_bytes if oom else report.peak_allocated_bytes,
                           "X", "tab:red", "in use at the out-of-memory (under a T4's limit)"))
        if run.limit_bytes and run.ran:
            error = 100 * (report.peak_allocated_bytes / run.peak_allocated_bytes - 1)
            ax.scatter(run.peak_allocated_bytes / GIB, error, s=220, facecolors="none",
                       edgecolors=VERDICT_COLOURS[Verdict.FITS if report.fits else Verdict.OUT_OF_MEMORY], linewidths=1.5,
                       label="ran under a T4's limit; ring: the predicted verdict")
    for measured, predicted, marker, colour, label in points:
        error = 100 * (predicted / measured - 1)
        ax.scatter(measured / GIB, error, marker=marker, s=40, label=label, zorder=5,
                   facecolors=colour, edgecolors="tab:red" if marker == "X" else "tab:blue")
        if abs(error) > 2:  # what the text names: every point beyond the reserved bytes' 2%
            ax.annotate(f"{error:+.1f}%", (measured / GIB, error), xytext=(6, 0), textcoords="offset points",
                        va="center", fontsize=8)
    ax.axhline(0, color="grey", linestyle="--", linewidth=1, label="predicted = measured")
    ax.axhspan(-2, 2, color="grey", alpha=0.12, label="within 2%")
    ax.set_xscale("log")
    ax.set_xlabel(f"measured (GiB, log scale), {rows[0].run.provenance.headline}")
    ax.set_ylabel("predicted - measured (% of measured)")
    handles, names = ax.get_legend_handles_labels()
    unique = dict(zip(names, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(f"{title}\n(predicted for {rows[0].report.provenance.removeprefix('predicted for ')})", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    return _save(fig, path)


def _zoom_on_the_card(ax, xs: list, series: list[list], usable_bytes: int, reach: float = 2.0) -> None:
    """Keep the y axis to ``reach`` times the card, where the verdicts are decided; a point above it is
    written at the top edge with its value, so a 137 GiB OOM does not flatten everything that fits."""
    top = reach * usable_bytes / GIB
    if not usable_bytes or max(r.total_bytes for reports in series for r in reports) / GIB <= top * 1.1:
        return
    ax.set_ylim(0, top)
    for reports in series:
        for x, report in zip(xs, reports):
            if report.peak_allocated_bytes / GIB > top:
                ax.annotate(f"{report.peak_allocated_bytes / GIB:.0f} GiB \u2191", (x, top), xytext=(0, -12),
                            textcoords="offset points", ha="center", fontsize=8)


def memory_curve(xs: list, reports: list, xlabel: str, path: str | Path | None = None,
                 title: str = "Peak memory", measured: tuple[list, list, str] | None = None, log_x: bool = False,
                 label: str = "", compare: dict[str, list] | None = None):
    """Predicted peak (allocated, and with cache and context) against a knob, with the usable line;
    ``measured`` = (xs, bytes, provenance) overlays measured points; ``compare`` ({label: reports at
    the same xs}) adds other configurations' predicted peaks as dashed lines, and ``label`` names
    the main one."""
    first = reports[0]
    fig, ax = plt.subplots(figsize=(6.8, 4.0))
    name = f"{label}: " if label else ""
    ax.plot(xs, [r.peak_allocated_bytes / GIB for r in reports], marker="o", color="tab:blue",
            label=f"{name}peak allocated, {first.provenance}")
    needs = "what the step needs of the card (allocator simulated, CUDA context estimated)"
    ax.plot(xs, [r.total_bytes / GIB for r in reports], marker=".", linestyle=":", color="tab:blue",
            label=f"{name}{needs}")
    for (other, other_reports), colour in zip((compare or {}).items(), ("tab:orange", "tab:purple", "tab:brown")):
        ax.plot(xs, [r.peak_allocated_bytes / GIB for r in other_reports], marker="s", linestyle="--", color=colour,
                label=f"{other}: peak allocated, {other_reports[0].provenance}")
        ax.plot(xs, [r.total_bytes / GIB for r in other_reports], marker=".", linestyle=":", color=colour,
                label=f"{other}: {needs}")
    if measured:
        ax.scatter(measured[0], [b / GIB for b in measured[1]], color="black", marker="D", zorder=5,
                   label=f"peak allocated, {measured[2]}")
    # an out-of-memory verdict is marked where its peak is drawn, whatever line it sits on
    failed = [(x, r.peak_allocated_bytes / GIB) for series in [reports, *(compare or {}).values()]
              for x, r in zip(xs, series) if r.kind is Verdict.OUT_OF_MEMORY]
    if failed:
        ax.scatter(*zip(*failed), marker="x", s=90, color="tab:red", zorder=6, linewidths=2,
                   label="out of memory (what it needs is over the usable line)")
    _usable_line(ax, first.usable_bytes)
    _zoom_on_the_card(ax, xs, [reports, *(compare or {}).values()], first.usable_bytes)
    if log_x:
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("GPU memory (GiB)" if first.usable_bytes else "memory on the CPU (GiB)")
    ax.set_title("\n".join(textwrap.wrap(title, 60)), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the axes: over no point
    return _save(fig, path)


def epoch_costs(costs: list, path: str | Path | None = None, title: str = "One epoch on your data"):
    """``buckets.epoch_costs``: the share of the passages' tokens trained on, and the estimated time
    (a range; a hatched stub where the card cannot run it)."""
    fig, (kept, time) = plt.subplots(1, 2, figsize=(10, 3.2))
    names = [cost.name for cost in costs]
    ys = range(len(costs))
    kept.barh(ys, [100 * cost.tokens_kept for cost in costs], color="tab:blue")
    kept.set_xlim(0, 100)
    kept.set_xlabel("passage tokens trained on (%)")
    kept.set_yticks(list(ys), names)
    for y, cost in zip(ys, costs):
        if cost.seconds:
            low, high = (s / 60 for s in cost.seconds)
            time.barh(y, high - low, left=low, color="tab:green", alpha=0.7)
        else:
            time.text(0, y, f" cannot run: {cost.verdict}", va="center", fontsize=8, color="tab:red")
    time.set_yticks(list(ys), [""] * len(costs))
    time.set_xlabel("estimated epoch time (min, a range)")
    time.set_xlim(left=0)
    fig.suptitle(f"{title} (memory predicted, times estimated)")
    fig.tight_layout()
    return _save(fig, path)


def retrieval_before_after(before, after, provenance: str, path: str | Path | None = None,
                           title: str = "Retrieval on the held-out split, before and after fine-tuning"):
    """MRR@10 of each of BGE-M3's scores (``RetrievalScores``), before and after, side by side."""
    from m3lab.use.evaluate import MODES

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    xs = range(len(MODES))
    for shift, scores, label in ((-0.2, before, "before"), (0.2, after, "after")):
        values = [scores.mrr_at_10[mode] for mode in MODES]
        bars = ax.bar([x + shift for x in xs], values, width=0.4, label=label)
        ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], fontsize=8, padding=2)
    ax.set_xticks(list(xs), MODES)
    ax.set_ylabel(f"MRR@10 ({before.queries} queries)")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"{title}\n({provenance})", fontsize=10)
    ax.legend(loc="upper left")
    return _save(fig, path)
