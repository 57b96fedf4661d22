"""Rows -> JSON, a Markdown table and a PNG plot in bench/results/.

    python -m bench.report bench/results/<device>-<date>.json     # redraw the .md and .png

The JSON is a list of rows; each has at least: workload, variant, status, median_s,
speedup_vs_eager, ratio_to_ideal, cold_start_s, cached_steps, graph_breaks, recompiles,
syncs_per_call, peak_mem_gb, psnr, ssim, rel_l2, device, torch, date (null where not applicable).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys

log = logging.getLogger("bench")

REQUIRED = ("workload", "variant", "status", "median_s", "speedup_vs_eager", "ratio_to_ideal", "cold_start_s",
            "cached_steps", "graph_breaks", "recompiles", "syncs_per_call", "peak_mem_gb", "psnr", "ssim",
            "rel_l2", "device", "torch", "date")


def finish_row(row: dict, rows: list[dict], meta: dict) -> dict:
    """Add the metadata and the columns computed against other rows (eager, ideal, cache-dit)."""
    by_name = {r["variant"]: r for r in rows if r.get("status") == "ok"}
    out = {key: None for key in REQUIRED}
    out.update(meta)
    out.update(row)
    eager, ideal = by_name.get("eager"), by_name.get("ideal")
    if row.get("status") == "ok":
        if eager:
            out["speedup_vs_eager"] = eager["median_s"] / row["median_s"]
        if ideal:
            out["ratio_to_ideal"] = row["median_s"] / ideal["median_s"]
        cache_dit = by_name.get("cache-dit")
        if row["variant"].startswith("stepcache") and cache_dit and cache_dit.get("decisions") is not None:
            out["matches_cache_dit"] = row.get("decisions") == cache_dit["decisions"]
    for key in ("psnr",):
        if isinstance(out.get(key), float) and math.isinf(out[key]):
            out[key] = None  # identical output; JSON has no infinity
    return out


def group_key(row: dict) -> tuple:
    """Rows of one run: workload, schedule, Inductor settings, and the threshold of a dynamic schedule."""
    threshold = row.get("threshold") if row.get("schedule") == "dynamic" else None
    return row["workload"], row.get("schedule"), row.get("inductor_config", "default"), threshold


def results_stem(rows: list[dict]) -> str:
    device = re.sub(r"[^a-z0-9]+", "-", rows[0]["device"].lower()).strip("-")
    return f"{device}-{rows[0]['date']}"


def write(rows: list[dict], out_dir: str) -> list[str]:
    """Merge into <device>-<date>.json (replacing the rows of this workload, schedule and settings), then redraw."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, results_stem(rows) + ".json")
    existing = []
    if os.path.exists(path):
        with open(path) as f:
            existing = json.load(f)
    keys = {group_key(r) for r in rows}
    merged = [r for r in existing if group_key(r) not in keys] + rows
    with open(path, "w") as f:
        json.dump(merged, f, indent=1, default=str)
    return [path, *render(path)]


def render(json_path: str) -> list[str]:
    with open(json_path) as f:
        rows = json.load(f)
    stem = json_path[: -len(".json")]
    with open(stem + ".md", "w") as f:
        f.write(markdown(rows))
    written = [stem + ".md"]
    try:
        written.append(plot(rows, stem + ".png"))
    except ImportError:
        log.warning("matplotlib is not installed: no plot; run `python -m bench.report %s` where it is", json_path)
    return written


def _groups(rows: list[dict]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(group_key(r), []).append(r)
    return groups


def _fmt(value, digits=2):
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _spread(times: list[float] | None) -> str:
    return "-" if not times else f"{min(times):.4f}-{max(times):.4f}"


def table(rows: list[dict]) -> str:
    header = ("variant", "status", "median s", "min-max s", "GPU busy s", "speedup", "/ideal", "cold s", "cached",
              "graphs/breaks", "recomp", "syncs/call", "peak GB", "PSNR", "SSIM", "rel L2")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        status = r["status"] if r["status"] == "ok" else f"failed: {r.get('error', '')[:120]}"
        if r.get("matches_cache_dit") is False:
            status += " (decisions differ from cache-dit)"
        if r.get("caveat"):
            status += f" ({r['caveat']})"
        cells = (
            r["variant"],
            status,
            _fmt(r.get("median_s"), 4),  # four places: ratios of 0.2% are read from these tables
            _spread(r.get("times_s")),
            _fmt(r.get("gpu_busy_s"), 4),
            _fmt(r.get("speedup_vs_eager")),
            _fmt(r.get("ratio_to_ideal"), 3),
            _fmt(r.get("cold_start_s"), 1),
            _fmt(r.get("cached_steps")),
            f"{_fmt(r.get('graph_count'))}/{_fmt(r.get('graph_breaks'))}",
            _fmt(r.get("recompiles")),
            _fmt(r.get("syncs_per_call")),
            _fmt(r.get("peak_mem_gb"), 1),
            _fmt(r.get("psnr"), 1),
            _fmt(r.get("ssim"), 4),
            _fmt(r.get("rel_l2"), 4),
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(rows: list[dict]) -> str:
    parts = []
    for (workload, schedule, settings, threshold), group in _groups(rows).items():
        first = group[0]
        title = f"### {workload}, {schedule} schedule" + (f" (threshold {threshold})" if threshold is not None else "")
        if settings == "cache-dit":
            title += ", every variant under cache_dit.set_compile_configs()"
        parts.append(title + "\n")
        parts.append(f"{first.get('note', '')}. Device: {first['device']}, torch {first['torch']}, {first['date']}, "
                     f"{first.get('repeats')} timed repeats (median), {_order(first)}. Config: `{first.get('config')}`.\n")
        parts.append(f"Command: `{first.get('command')}`\n")
        parts.append(table(group) + "\n")
    return "\n".join(parts)


def _order(row: dict) -> str:
    """How the repeats were taken and what the cold column includes."""
    order = row.get("order") or "one variant after another"
    text = ("repeats round-robin across variants, each on its own copy of the model" if order == "interleaved"
            else "each variant's repeats in a row")
    warmup = row.get("compiler_warmup_s")
    if warmup is None:
        return text + "; cold s includes the process's compiler start-up for the first compiled variant"
    return (text + f"; cold s: fresh compile caches, after a {warmup:.1f} s warm-up that paid the process's "
            "compiler start-up for all; peak GB: what the variant holds plus its generation's peak")


def plot(rows: list[dict], path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _groups(rows)
    fig, axes = plt.subplots(len(groups), 2, figsize=(13, 3.6 * len(groups)), squeeze=False)
    for key, (ax_speed, ax_cold) in zip(groups, axes):
        group = groups[key]
        workload, schedule, settings, threshold = key
        names = [r["variant"] for r in group]
        speed = [r.get("speedup_vs_eager") or 0 for r in group]
        cold = [r.get("cold_start_s") or 0 for r in group]
        colors = ["tab:red" if r["status"] != "ok" else "tab:green" if r["variant"].startswith("stepcache")
                  else "tab:blue" if r["variant"].startswith("cache-dit") else "tab:gray" for r in group]
        ax_speed.barh(names, speed, color=colors)
        label = schedule + (f" {threshold}" if threshold is not None else "")
        label += ", cache-dit Inductor settings" if settings == "cache-dit" else ""
        ax_speed.set_title(f"{workload} ({label}): speedup vs eager (red: failed)")
        ax_speed.invert_yaxis()
        ax_cold.barh(names, cold, color=colors)
        ax_cold.set_title("cold start: first generation incl. compile (s)")
        ax_cold.invert_yaxis()
        ax_cold.set_yticklabels([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    for written in render(sys.argv[1]):
        print("wrote", written)
