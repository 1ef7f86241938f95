"""report.md, report.html and pareto.png: plan.json told for people.

Rendered from the plan dict alone (what plan.json holds), so a report can be rebuilt from a plan
file and never says more than the plan measured. Every latency carries where it came from:
`measured` (timed on this machine or a device), `fitted` or `analytical` (predicted by the cost model).
"""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

from pruneaug.codegen.schedule import DENSE_BLOCK
from pruneaug.pick import BUILDS

REPORT_FILES = ("report.md", "report.html", "pareto.png")


def _us(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds * 1e6:,.1f} µs"


def _ratio(numerator: float | None, denominator: float | None) -> str:
    if not numerator or not denominator:
        return "–"
    return f"{numerator / denominator:.2f}x"


def _sparsity(entry: dict[str, Any]) -> str:
    """The planned sparsity, and the share of blocks it removed where the rounding to whole blocks shows."""
    actual = entry.get("block_sparsity")
    if actual is None or f"{actual:.2f}" == f"{entry['sparsity']:.2f}":
        return f"{entry['sparsity']:.2f}"
    return f"{entry['sparsity']:.2f} ({actual:.2f} of its blocks)"


def _dense_latency(entry: dict[str, Any]) -> str:
    """The layer's dense kernel time, with its block shape where that is not the default's (`schedule.dense_blocks`)."""
    block = entry.get("dense_block")
    shape = f" ({block[0]}x{block[1]} kernel)" if block and tuple(block) != DENSE_BLOCK else ""
    return _us(entry.get("dense_latency_s")) + shape


def layer_rows(plan: dict[str, Any]) -> list[list[str]]:
    rows = []
    for entry in plan["layers"]:
        chosen = entry.get("predicted_latency_s")
        source = entry.get("latency_source") or "–"
        if entry.get("block_sparse_latency_s") is not None:  # a pruned layer the artifact runs dense
            source += f"; runs dense (block-sparse: {_us(entry['block_sparse_latency_s'])})"
        rows.append([
            entry["node"], entry["op_type"], f"{entry['shape'][0]}x{entry['shape'][1]}", str(entry["m"] or "?"),
            f"{entry['block'][0]}x{entry['block'][1]}", _sparsity(entry), f"{entry['nnz_blocks']}/{entry['blocks']}",
            "–" if entry.get("proxy_loss") is None else f"{entry['proxy_loss']:.2e}",
            _dense_latency(entry), _us(chosen), source,
            _ratio(entry.get("dense_latency_s"), chosen),
        ])
    return rows


LAYER_HEADER = ["node", "op", "W [out x in]", "m", "block", "sparsity", "kept blocks", "proxy loss",
                "dense latency", "chosen latency", "source", "speed-up"]


def _baseline_rows(plan: dict[str, Any]) -> list[list[str]]:
    search = plan.get("search") or {}
    baselines = search.get("baselines") or {}
    rows = [[f"chosen (= {search.get('chosen_from', 'searched')})", _us(search.get("predicted_latency_s")),
             _ratio(search.get("dense_latency_s"), search.get("predicted_latency_s")), *_validated(search)]]
    for name, figures in baselines.items():
        rows.append([name, _us(figures.get("predicted_latency_s")),
                     _ratio(search.get("dense_latency_s"), figures.get("predicted_latency_s")), *_validated(figures)])
    return rows


def _validated(figures: dict[str, Any]) -> list[str]:
    """The validated loss and whether the budget was met; a search that met it with no pruned plan
    returns the dense plan, whose loss (0) is not that search's answer."""
    if figures.get("met"):
        return [_metric(figures.get("metric_loss")), "yes"]
    return ["–", "no (the dense plan is returned)"]


PICK_HEADER = ["plan", "build", "predicted (prunable layers)", "measured median (whole model)", "p10", "p90", "kept"]


def _pick_section(pick: dict[str, Any]) -> tuple[str, str | None, list[str], list[list[str]]]:
    """The measured pick among near-equal plans (`pruneaug.pick`): each contender's builds as timed, or why none was."""
    title = "Measured pick among the plans predicted close"
    if "skipped" in pick:
        return title, f"Not run: {pick['skipped']}.", [], []
    text = f"Each contender's artifacts built and timed here: {pick['method']}."
    if pick.get("errors"):
        text += " Not built: " + "; ".join(f"`{name}`: {error}" for name, error in pick["errors"].items()) + "."
    if pick.get("not_built"):
        text += (f" Predicted close but not built (their builds would not have fit in {pick['build_budget_s']:g} s): "
                 + ", ".join(f"`{name}` ({_us(s)} predicted)" for name, s in pick["not_built"].items()) + ".")
    rows = [[name, kind, _us(f["predicted_latency_s"]), _us(f[kind]["median_s"]), _us(f[kind]["p10_s"]),
             _us(f[kind]["p90_s"]), "yes" if (name, kind) == (pick["picked"], pick["build"]) else ""]
            for name, f in pick["contenders"].items() for kind in BUILDS if f.get(kind)]
    return title, text, PICK_HEADER, rows


THREADING_HEADER = ["build", "measured median (whole model, all runs)", "p10", "kept"]


def _threading_section(threading: dict[str, Any]) -> tuple[str, str | None, list[str], list[list[str]]]:
    """The kept plan's parallel and serial builds as the measured pick (`pruneaug.pick`) timed them, or why not."""
    title = "Threads: parallel kernels or every kernel serial"
    if "skipped" in threading:
        return title, f"Not measured: {threading['skipped']}.", [], []
    text = f"Measured here: {threading['method']}."
    text += " Each timing's medians: " + "; ".join(", ".join(
        f"{name} {_us(seconds)}" for name, seconds in timing.items()) for timing in threading["timings_median_s"]) + "."
    rows = [[name, _us(median), _us(threading["p10_s"][name]), "yes" if name == threading["kept"] else ""]
            for name, median in threading["median_s"].items()]
    return title, text, THREADING_HEADER, rows


def _metric(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


MODEL_LATENCY_LABELS = {"onnxruntime_dense_s": "onnxruntime, dense model",
                        "onnxruntime_pruned_s": "onnxruntime, pruned.onnx",
                        "tvm_pruned_s": "pruneaug artifact (TVM, block-sparse)"}
MODEL_HEADER = ["runtime", "median latency", "p10", "p90", "speed-up vs onnxruntime dense"]


def _model_rows(plan: dict[str, Any]) -> list[list[str]]:
    """One row per runtime timed; one whose measurement failed says so instead of giving figures."""
    latency = plan.get("model_latency") or {}
    base = latency.get("onnxruntime_dense_s")
    errors = latency.get("errors") or {}
    on_gpu = latency.get("device") == "cuda"  # onnxruntime ran on the CPU beside it: for reference only
    rows = []
    for key, label in MODEL_LATENCY_LABELS.items():
        if on_gpu:
            label += " on the GPU" if key == "tvm_pruned_s" else " on the CPU"
        if key in errors:
            rows.append([label, f"measurement failed: {errors[key]}", "–", "–", "–"])
        elif latency.get(key):
            rows.append([label, _us(latency[key]), _us((latency.get("p10_s") or {}).get(key)),
                         _us((latency.get("p90_s") or {}).get(key)), _ratio(base, latency[key])])
    return rows


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _probes(search: dict[str, Any]) -> str:
    probes = search.get("layer_probes", 0)
    return f", {probes} layer losses measured (one layer pruned and re-fitted alone)" if probes else ""


def _sections(plan: dict[str, Any]) -> list[tuple[str, str | None, list[str], list[list[str]]]]:
    """(title, text, header, rows) of each section, shared by the Markdown and the HTML."""
    totals = plan["totals"]
    search = plan.get("search")
    latency = plan.get("model_latency") or {}
    summary = (f"Target `{plan['target']}`; {totals['prunable_layers']} prunable layers "
               f"({totals.get('pruned_layers', totals['prunable_layers'])} of them pruned), "
               f"{totals['weight_sparsity']:.1%} of their weights pruned; pruner `{plan.get('pruner')}`.")
    if search:
        summary += (f" Budget {search['budget']:g} on `{search['metric']}`: validated loss "
                    f"{_metric(search.get('metric_loss'))} ({search.get('validations_total', search['validations'])} "
                    f"onnxruntime validations in all, baselines included{_recalled(search)}); search "
                    f"{search.get('time_s', 0):.1f} s, {search.get('kernels_measured', 0)} kernels measured"
                    f"{_probes(search)}.")
        if search.get("message"):
            summary += f" {search['message']}"
    sections = [("Summary", summary, [], [])]
    if latency:
        where = latency.get("note", "")
        failed = " Some runtimes could not be measured (below)." if latency.get("errors") else ""
        sections.append(("Whole model, measured", f"Median of {latency.get('repeat', '?')} runs, "
                         f"{latency.get('threads', '?')} threads.{failed} {where}".strip(),
                         MODEL_HEADER, _model_rows(plan)))
    if plan.get("artifact_error"):
        sections.append(("Artifact", f"No compiled artifact: {plan['artifact_error']}", [], []))
    elif plan.get("artifact_unchecked"):
        sections.append(("Artifact", f"Written unchecked: {plan['artifact_unchecked']}.", [], []))
    if search:
        sections.append(("Plans compared (predicted latency of the prunable layers)", None,
                         ["plan", "latency", "speed-up vs dense", "validated loss", "meets budget"], _baseline_rows(plan)))
    pick = (search or {}).get("measured_pick")
    if pick:
        sections.append(_pick_section(pick))
    if plan.get("threading"):
        sections.append(_threading_section(plan["threading"]))
    sections.append(("Layers", None, LAYER_HEADER, layer_rows(plan)))
    if plan.get("kept_dense"):
        sections.append(("Layers kept dense", "MatMul, Gemm, Conv, ConvTranspose, recurrent and quantized nodes "
                         "that no block-sparse kernel serves: they stay dense, and the figures above leave them out.",
                         ["node", "op", "why"], [[e["node"], e["op_type"], e["reason"]] for e in plan["kept_dense"]]))
    return sections


def render_markdown(plan: dict[str, Any], pareto: bool) -> str:
    parts = [f"# pruneaug report: {plan.get('model_name', 'model')} for {plan['target']}"]
    for title, text, header, rows in _sections(plan):
        parts.append(f"## {title}")
        if text:
            parts.append(text)
        if header:
            parts.append(_markdown_table(header, rows))
    if pareto:
        parts.append("## Latency / accuracy\n\n![Pareto front](pareto.png)")
    return "\n\n".join(parts) + "\n"


def render_html(plan: dict[str, Any], png: bytes | None) -> str:
    """One self-contained page: styles inline, the plot as a data URI."""
    body = [f"<h1>pruneaug report: {html.escape(str(plan.get('model_name', 'model')))} for {html.escape(plan['target'])}</h1>"]
    for title, text, header, rows in _sections(plan):
        body.append(f"<h2>{html.escape(title)}</h2>")
        if text:
            body.append(f"<p>{html.escape(text)}</p>")
        if header:
            head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
            cells = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{cells}</tbody></table>")
    if png:
        data = base64.b64encode(png).decode()
        body.append(f'<h2>Latency / accuracy</h2><img alt="Pareto front" src="data:image/png;base64,{data}">')
    style = ("body{font-family:sans-serif;max-width:70em;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:.2em .5em;text-align:right}th{background:#eee}")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>pruneaug report</title><style>{style}</style></head>" \
           f"<body>{''.join(body)}</body></html>\n"


def pareto_png(plan: dict[str, Any]) -> bytes | None:
    """Validated loss against predicted latency for every plan the search validated, baselines marked."""
    search = plan.get("search")
    if not search or not search.get("trials"):
        return None
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    trials = search["trials"]
    ax.scatter([t["predicted_latency_s"] * 1e6 for t in trials], [t["metric_loss"] for t in trials],
               label="validated plans (per-layer blocks)", color="tab:blue")
    for name, figures in (search.get("baselines") or {}).items():
        if figures.get("predicted_latency_s") is not None and figures.get("metric_loss") is not None:
            ax.scatter([figures["predicted_latency_s"] * 1e6], [figures["metric_loss"]], marker="x", label=name)
    ax.axhline(search["budget"], color="gray", linestyle="--", label=f"budget {search['budget']:g}")
    ax.set_xlabel("predicted latency of the prunable layers (µs)")
    ax.set_ylabel(f"validated loss ({search['metric']})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def write_report(folder: Path, plan: dict[str, Any]) -> list[str]:
    """Write the report files into `folder`; returns the names written."""
    png = pareto_png(plan)
    written = ["report.md", "report.html"]
    (folder / "report.md").write_text(render_markdown(plan, png is not None), encoding="utf-8")
    (folder / "report.html").write_text(render_html(plan, png), encoding="utf-8")
    if png:
        (folder / "pareto.png").write_bytes(png)
        written.append("pareto.png")
    return written


def _recalled(search: dict) -> str:
    """How many more plans had been validated before, by an earlier compile or by this one's search for a
    baseline (their losses read from the cache)."""
    recalled = search.get("recalled_total", 0)
    return f", and {recalled} plan(s) validated before, read from the cache" if recalled else ""
