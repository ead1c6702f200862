"""``report.html`` from ``results.json``: one self-contained page (inline CSS and SVG, images by
relative links into ``images/``), readable offline.

Every figure in the page is a ``<span class="fig" data-key="...">`` whose key is its path in
``results.json`` as a JSON list (e.g. ``["means", "sd1.5", "pickscore", "mean"]``: names may hold
dots), so a reader or a test can trace it back.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np

from pickalign.runtime import atomic_write_text

COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222;
       padding: 0 1em; }
h1 { margin-bottom: 0.2em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.6em 0; }
th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: right; vertical-align: top; }
th { background: #f4f4f4; } td.name, th.name { text-align: left; }
.ci { color: #777; font-size: 0.85em; }
.above { background: #e6f4e6; } .below { background: #fbe7e7; }
.grid td { text-align: center; font-size: 0.8em; }
.grid img { width: 128px; height: 128px; image-rendering: pixelated; display: block;
            margin: 0 auto; }
.grid td.prompt { text-align: left; max-width: 260px; font-size: 0.9em; }
.best { font-weight: bold; }
.panels { display: flex; flex-wrap: wrap; gap: 12px; }
.muted { color: #777; }
"""


def _esc(value) -> str:
    return html.escape(str(value), quote=True)


def fig(results: dict, key: tuple, digits: int = 3) -> str:
    """The figure at ``key`` (its path into ``results``: names, list indices) as a traceable
    span."""
    value = results
    for part in key:
        value = value[part]
    text = str(value) if isinstance(value, int) else f"{value:.{digits}f}"
    return f'<span class="fig" data-key="{_esc(json.dumps(list(key)))}">{text}</span>'


def _mean_cell(results: dict, key: tuple) -> str:
    low, high = fig(results, (*key, "low")), fig(results, (*key, "high"))
    return f'{fig(results, (*key, "mean"))} <span class="ci">[{low}, {high}]</span>'


def _rate_cell(results: dict, key: tuple, rate: dict) -> str:
    verdict = "above" if rate["low"] > 0.5 else "below" if rate["high"] < 0.5 else ""
    wins, ties, losses = (fig(results, (*key, n)) for n in ("wins", "ties", "losses"))
    low, high = fig(results, (*key, "low")), fig(results, (*key, "high"))
    return (
        f'<td class="{verdict}">{fig(results, (*key, "estimate"))} <span class="ci">'
        f'[{low}, {high}]</span><br><span class="ci">{wins}/{ties}/{losses}</span></td>'
    )


def _rate_matrix(results: dict, prefix: tuple, rates: dict, models: list[str]) -> str:
    judged = [m for m in models if m in rates]
    rows = [
        "<tr><th class='name'>A \\ B</th>"
        + "".join(f"<th>{_esc(m)}</th>" for m in judged)
        + "</tr>"
    ]
    for a in judged:
        cells = []
        for b in judged:
            rate = rates[a].get(b)
            cells.append(_rate_cell(results, (*prefix, a, b), rate) if rate else "<td>&mdash;</td>")
        rows.append(f"<tr><th class='name'>{_esc(a)}</th>{''.join(cells)}</tr>")
    return "<table>" + "".join(rows) + "</table>"


def box_plot(series: dict[str, list[float]], title: str) -> str:
    """Horizontal box plots (quartiles, 5th-95th percentile whiskers, the mean as a dot)."""
    names = list(series)
    width, row, left = 640, 30, 120
    height = row * len(names) + 40
    everything = np.concatenate([np.asarray(v, dtype=float) for v in series.values()])
    low, high = float(everything.min()), float(everything.max())
    span = (high - low) or 1.0

    def x(value):
        return left + (value - low) / span * (width - left - 20)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'role="img" aria-label="{_esc(title)}">',
        f'<text x="4" y="14" font-size="12">{_esc(title)}</text>',
    ]
    for k, name in enumerate(names):
        values = np.asarray(series[name], dtype=float)
        p5, q1, median, q3, p95 = np.percentile(values, [5, 25, 50, 75, 95])
        y = 28 + k * row
        colour = COLOURS[k % len(COLOURS)]
        parts += [
            f'<text x="4" y="{y + 13}" font-size="12">{_esc(name)}</text>',
            f'<line x1="{x(p5):.1f}" x2="{x(p95):.1f}" y1="{y + 9}" y2="{y + 9}" stroke="#888"/>',
            f'<rect x="{x(q1):.1f}" y="{y}" width="{max(x(q3) - x(q1), 1):.1f}" height="18" '
            f'fill="{colour}" fill-opacity="0.35" stroke="{colour}"/>',
            f'<line x1="{x(median):.1f}" x2="{x(median):.1f}" y1="{y}" y2="{y + 18}" '
            f'stroke="{colour}" stroke-width="2"/>',
            f'<circle cx="{x(values.mean()):.1f}" cy="{y + 9}" r="3" fill="black"/>',
        ]
    bottom = height - 6
    parts += [
        f'<text x="{left}" y="{bottom}" font-size="11">{low:.3f}</text>',
        f'<text x="{width - 60}" y="{bottom}" font-size="11">{high:.3f}</text>',
        "</svg>",
    ]
    return "".join(parts)


def line_plot(steps: list, values: list[float], title: str, colour: str) -> str:
    """One curve over training steps."""
    width, height, left, bottom = 300, 180, 44, 150
    low, high = min(values), max(values)
    span, x_span = (high - low) or 1.0, (max(steps) - min(steps)) or 1

    def point(s, v):
        return (
            left + (s - min(steps)) / x_span * (width - left - 10),
            bottom - (v - low) / span * (bottom - 24),
        )

    points = " ".join(
        f"{px:.1f},{py:.1f}" for px, py in (point(s, v) for s, v in zip(steps, values))
    )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
        f'aria-label="{_esc(title)}"><text x="4" y="14" font-size="12">{_esc(title)}</text>'
        f'<rect x="{left}" y="20" width="{width - left - 10}" height="{bottom - 20}" fill="none" '
        f'stroke="#ccc"/><polyline points="{points}" fill="none" stroke="{colour}" '
        f'stroke-width="2"/><text x="2" y="28" font-size="10">{high:.3f}</text>'
        f'<text x="2" y="{bottom}" font-size="10">{low:.3f}</text>'
        f'<text x="{left}" y="{height - 12}" font-size="10">step {min(steps)}</text>'
        f'<text x="{width - 70}" y="{height - 12}" font-size="10">step {max(steps)}</text></svg>'
    )


def _settings(results: dict) -> str:
    config = results["config"]
    rows = []
    for model in config["models"]:
        extras = []
        if model.get("lora"):
            extras.append(f"LoRA {_esc(model['lora'])} x {model['lora_scale']}")
        if model.get("rank_by"):
            extras.append(f"best of {model['rank_n']} by {_esc(model['rank_by'])}")
        for key in ("steps", "guidance_scale"):
            if model.get(key) is not None:
                extras.append(f"{key} {model[key]}")
        rows.append(
            f"<tr><td class='name'>{_esc(model['name'])}</td><td class='name'>"
            f"{_esc(model['model'])}</td><td class='name'>{'; '.join(extras) or '&mdash;'}</td>"
            f"<td>{_esc(results['seconds']['generation'].get(model['name'], ''))}</td></tr>"
        )
    prompts = results["prompts"]
    return (
        f"<p>{_esc(prompts['count'])} prompts from <code>{_esc(prompts['source'])}</code>, "
        f"{_esc(config['seeds_per_prompt'])} seed(s) each ({_esc(prompts['items'])} images per "
        f"model, seed {_esc(config['seed'])} + item, the same for every model); DDIM "
        f"{_esc(config['steps'])} steps, guidance {_esc(config['guidance_scale'])}; "
        f"{_esc(results['processes'])} process(es). Scorers: "
        + ", ".join(
            f"{_esc(k)} = <code>{_esc(config['scorers'][k])}</code>"
            for k in results["scorer_names"]
        )
        + ".</p><table><tr><th class='name'>model</th><th class='name'>pipeline</th>"
        "<th class='name'>with</th><th>sampling s</th></tr>" + "".join(rows) + "</table>"
    )


def _grid(results: dict, models: list[str], scorers: list[str], count: int) -> str:
    images = results["images"]
    position = {(row["model"], row["index"]): k for k, row in enumerate(images)}
    indices = sorted({row["index"] for row in images})[:count]
    header = "<tr><th class='name'>prompt (seed)</th>" + "".join(
        f"<th>{_esc(m)}</th>" for m in models
    )
    rows = [header + "</tr>"]
    for index in indices:
        first = images[position[(models[0], index)]]
        cells = [
            f"<td class='prompt'>{_esc(first['prompt'])} <span class='ci'>({first['seed']})</span></td>"
        ]
        best = {s: max(images[position[(m, index)]]["scores"][s] for m in models) for s in scorers}
        for model in models:
            k = position[(model, index)]
            row = images[k]
            lines = []
            for s in scorers:
                mark = " class='best'" if row["scores"][s] == best[s] and len(models) > 1 else ""
                lines.append(
                    f"<span{mark}>{_esc(s)} {fig(results, ('images', k, 'scores', s))}</span>"
                )
            cells.append(
                f"<td><img src='{_esc(row['path'])}' alt='{_esc(model)}: {_esc(row['prompt'])}' "
                f"loading='eager'>{'<br>'.join(lines)}</td>"
            )
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return "<table class='grid'>" + "".join(rows) + "</table>"


def render(results: dict) -> str:
    models, scorers = results["model_names"], results["scorer_names"]
    body = [f"<h1>{_esc(results['title'])}</h1>", f"<p class='muted'>{_esc(results['date'])}</p>"]
    if results.get("notes"):
        body.append(f"<p>{_esc(results['notes'])}</p>")
    body += ["<h2>Settings</h2>", _settings(results)]

    body.append("<h2>Mean scores <span class='ci'>[bootstrap 95% interval]</span></h2>")
    rows = ["<tr><th class='name'>model</th>" + "".join(f"<th>{_esc(s)}</th>" for s in scorers)]
    for m in models:
        cells = "".join(f"<td>{_mean_cell(results, ('means', m, s))}</td>" for s in scorers)
        rows.append(f"<tr><th class='name'>{_esc(m)}</th>{cells}")
    body.append("<table>" + "</tr>".join(rows) + "</tr></table>")

    if len(models) > 1:
        body.append(
            "<h2>Win rates</h2><p>Row A over column B on the same prompts and seeds (ties 0.5), "
            "paired bootstrap 95% interval (prompts resampled), wins/ties/losses. Green: the "
            "interval is above 0.5; red: below.</p>"
        )
        for s in scorers:
            body.append(f"<h3>by {_esc(s)}</h3>")
            body.append(_rate_matrix(results, ("win_rates", s), results["win_rates"][s], models))

    if results.get("human"):
        human = results["human"]
        body.append(
            f"<h2>Human win rates</h2><p>{fig(results, ('human', 'judgments'))} judgments.</p>"
            + _rate_matrix(results, ("human", "win_rates"), human["win_rates"], models)
        )
    if results.get("reward_accuracy"):
        acc = results["reward_accuracy"]
        body.append(
            f"<h2>Reward accuracy</h2><p><code>{_esc(acc['model'])}</code> on "
            f"<code>{_esc(acc['data'])}</code> test_unique ({fig(results, ('reward_accuracy', 'test_pairs'))}"
            f" pairs, tie threshold {fig(results, ('reward_accuracy', 'tie_threshold'), 2)} chosen on "
            f"validation_unique): accuracy {fig(results, ('reward_accuracy', 'accuracy'))} "
            f"<span class='ci'>[{fig(results, ('reward_accuracy', 'accuracy_ci95', 0))}, "
            f"{fig(results, ('reward_accuracy', 'accuracy_ci95', 1))}]</span>.</p>"
        )

    body.append("<h2>Score distributions</h2><div class='panels'>")
    for s in scorers:
        by_model = {
            m: [row["scores"][s] for row in results["images"] if row["model"] == m] for m in models
        }
        body.append(box_plot(by_model, f"{s}: quartiles, 5-95% whiskers, mean (dot)"))
    body.append("</div>")

    if results.get("curves"):
        body.append(
            "<h2>Training curves</h2><p>From each run's log.jsonl: the learned reward and the "
            "oracle on the run's held-out monitor prompts side by side (monitor/...), the "
            "training reward and loss.</p>"
        )
        for run, curves in results["curves"].items():
            body.append(f"<h3>{_esc(run)}</h3><div class='panels'>")
            for k, key in enumerate(curves["values"]):
                body.append(
                    line_plot(curves["steps"][key], curves["values"][key], key, COLOURS[k % 8])
                )
            body.append("</div>")

    count = results["config"]["grid_prompts"]
    if count:
        body.append(
            f"<h2>Images</h2><p>The first {count} items; under each image every scorer's value "
            "(bold: the best of the row).</p>"
        )
        body.append(_grid(results, models, scorers, count))
    body.append(
        f"<p class='muted'>Scoring {fig(results, ('seconds', 'scoring'), 1)} s; total "
        f"{fig(results, ('seconds', 'total'), 1)} s. Every figure on this page is in results.json."
        "</p>"
    )
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{_esc(results['title'])}</title><style>{STYLE}</style></head><body>"
        + "\n".join(body)
        + "</body></html>"
    )


def write_report(results: dict, out: str | Path) -> Path:
    path = Path(out) / "report.html"
    atomic_write_text(path, render(results))
    return path
