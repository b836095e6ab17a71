"""The compare result as a table (terminal and HTML) and a plot: each method's paired
difference in the task's metric (AUPRC, pairwise accuracy, SCR) against the reference with
its 95% interval, and the metric against graded FAC."""

from __future__ import annotations

import base64
import html
import io

from rich.table import Table

from agent.compare import CompareResult
from tools.rundir import METRIC_LABELS

SECOND = {"auprc": ("AUROC", "auroc"), "scr": ("Acc(+v) / Acc(-v)", "acc_plus"),
          "pairwise_accuracy": ("mean margin", "mean_margin")}
"""Per headline metric: the column shown beside it (name, metric key)."""


def label(result: CompareResult) -> str:
    return METRIC_LABELS.get(result.metric, result.metric)


def picks(result: CompareResult) -> bool:
    return any(m.curve or m.positives is not None for m in result.methods.values())


def columns(result: CompareResult) -> tuple[str, ...]:
    pool = ("vs pick-random (paired)", "positives") if picks(result) else ()
    return ("method", "n train", "added", "FAC", "graded FAC", "G-Vendi", label(result),
            SECOND.get(result.metric, ("", ""))[0], "vs ref (paired)", *pool, "label agree",
            "LLM calls / kept", "hit rate", "gate pass")


def _second(result: CompareResult, means: dict[str, float]) -> str:
    key = SECOND.get(result.metric, ("", ""))[1]
    if key == "acc_plus":
        return f"{100 * means.get('acc_plus', 0):.1f} / {100 * means.get('acc_minus', 0):.1f}"
    if key == "mean_margin":
        return f"{means.get(key, 0):.3f}"
    return f"{100 * means[key]:.1f}" if key in means else ""


def rows(result: CompareResult) -> list[list[str]]:
    out = []
    for name, m in result.methods.items():
        pool = [m.paired_random.describe() if m.paired_random else "",
                "" if m.positives is None else f"{m.positives:.1f}"] if picks(result) else []
        out.append([
            name, f"{m.n_train:.0f}", f"{m.n_added:.0f}", f"{m.fac:.3f}", f"{m.fac_graded:.3f}",
            "" if m.g_vendi is None else f"{m.g_vendi:.1f}",
            f"{100 * m.metric_mean:.1f} ± {100 * m.metric_std:.1f}", _second(result, m.means),
            m.paired.describe() if m.paired else "reference" if name == result.reference else "",
            *pool,
            f"{m.label_agreement:.0%}" if m.label_agreement is not None else "",
            "" if m.calls_per_kept is None else f"{m.calls_per_kept:.1f}",
            f"{m.loop.hit_rate:.0%} of {m.loop.requests}" if m.loop else "",
            f"{m.loop.gate_pass_rate:.0%} of {m.loop.kept + m.loop.disputed}" if m.loop else "",
        ])
    return out


def curve_rows(result: CompareResult) -> tuple[list[str], list[list[str]]]:
    """The pick methods' learning curve: per label count, the mean and the paired
    difference against pick-random (header, rows)."""
    ks = sorted({k for m in result.methods.values() for k in m.curve})
    head = ["method", *(f"k={k}" for k in ks)]
    body = []
    for name, m in result.methods.items():
        if not m.curve:
            continue
        cells = [name]
        for k in ks:
            p = m.curve.get(k)
            if p is None:
                cells.append("")
                continue
            vs = f" ({100 * p.paired_random.mean:+.1f} [{100 * p.paired_random.low:+.1f}, " \
                 f"{100 * p.paired_random.high:+.1f}])" if p.paired_random else ""
            cells.append(f"{100 * p.mean:.1f}{vs}")
        body.append(cells)
    return head, body


def curve_table(result: CompareResult) -> Table:
    head, body = curve_rows(result)
    t = Table(title=f"learning curve: {label(result)} x 100 after k labels (paired vs "
                    "pick-random, 95% CI)")
    for c in head:
        t.add_column(c, justify="left" if c == "method" else "right")
    for r in body:
        t.add_row(*r)
    t.caption = failure_line(result)
    return t


def shown(result: CompareResult) -> tuple[list[str], list[list[str]]]:
    """(columns, rows) without the columns no method fills (a pool compare without
    synthesis has no hit rates)."""
    head, body = list(columns(result)), rows(result)
    keep = [i for i, c in enumerate(head) if c == "method" or any(r[i] for r in body)]
    return [head[i] for i in keep], [[r[i] for i in keep] for r in body]


def failure_line(result: CompareResult) -> str | None:
    """The methods that failed on some seeds, and why (a table's caption)."""
    return "; ".join(f"{m} {why}" for m, why in result.failures.items()) or None


def table(result: CompareResult) -> Table:
    t = Table(title=f"compare: {result.task} task, {label(result)} x 100 ({result.protocol} "
                    f"protocol, reference {result.reference}, {result.settings.seeds} seeds, "
                    f"kept per seed {result.kept})")
    head, body = shown(result)
    for c in head:
        t.add_column(c, justify="left" if c == "method" else "right")
    for r in body:
        t.add_row(*r)
    t.caption = failure_line(result)
    return t


def plot_png(result: CompareResult) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    paired = [(n, m.paired) for n, m in result.methods.items() if m.paired is not None]
    for i, (_, p) in enumerate(paired):
        a.errorbar(100 * p.mean, i, xerr=[[100 * (p.mean - p.low)], [100 * (p.high - p.mean)]],
                   fmt="o", capsize=4)
    a.set_yticks(range(len(paired)), [n for n, _ in paired])
    a.axvline(0, color="grey", lw=1)
    a.set_xlabel(f"{label(result)} minus {result.reference} (points, paired, 95% CI)")
    for name, m in result.methods.items():
        b.scatter(m.fac_graded, 100 * m.metric_mean)
        b.annotate(name, (m.fac_graded, 100 * m.metric_mean), fontsize=8)
    b.set_xlabel("graded FAC of the training set")
    b.set_ylabel(f"{label(result)} (held out)")
    b.set_title(f"Spearman {result.spearman_graded_metric:.2f} (binary FAC "
                f"{result.spearman_fac_metric:.2f})", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def html_report(result: CompareResult) -> str:
    esc = html.escape
    cols, cells = shown(result)
    head = "".join(f"<th>{esc(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>"
                   for r in cells)
    png = base64.b64encode(plot_png(result)).decode()
    curve = ""
    if picks(result):
        c_head, c_body = curve_rows(result)
        curve = ("<h2>Learning curve: labels added</h2><table><tr>"
                 + "".join(f"<th>{esc(c)}</th>" for c in c_head) + "</tr>"
                 + "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>"
                           for r in c_body) + "</table>")
    external = "".join(f"<li>{esc(x)}</li>" for x in result.external)
    return f"""<!doctype html><meta charset="utf-8"><title>facsynth compare</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}
td,th{{padding:2px 8px;text-align:right}}td:first-child{{text-align:left}}</style>
<h1>facsynth compare: {esc(result.task)} task</h1>
<p><b>Metric:</b> {esc(label(result))} on held-out rows, x 100.
<b>Protocol:</b> {esc(result.protocol)} (reference: {esc(result.reference)}).
{result.settings.seeds} seeds; pool {result.n_pool} rows, held out {result.n_eval} rows.
<b>Equal kept budget:</b> {esc(result.rule)}; rows added per seed: {result.kept}.</p>
<p><b>Knowledge beyond the protocol's labels:</b></p><ul>{external}</ul>
<table><tr>{head}</tr>{body}</table>
{"".join(f"<p><b>{esc(m)}</b> {esc(why)}</p>" for m, why in result.failures.items())}
<p>FAC and label agreement are measured against the pool's real labels (diagnostics that no
method reads). Spearman(graded FAC, {esc(label(result))}) = {result.spearman_graded_metric:.2f};
Spearman(binary FAC, {esc(label(result))}) = {result.spearman_fac_metric:.2f};
Spearman(G-Vendi, {esc(label(result))}) = {result.spearman_g_vendi_metric:.2f}.</p>
{curve}
<img src="data:image/png;base64,{png}" alt="paired differences and FAC vs the metric">
"""
