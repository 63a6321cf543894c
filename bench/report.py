"""Turning ``results.json`` into the plot and the numbers section of BENCHMARKS.md.

``python3 bench/report.py [RESULTS_DIR]`` redoes both from a saved results.json
without measuring anything.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

BEGIN = "<!-- BEGIN GENERATED NUMBERS (bench/run rewrites this section) -->"
END = "<!-- END GENERATED NUMBERS -->"

TARGET_VS_RAW = {"snapshot": 1.3, "pivot": 1.5, "migrate": 1.15}
LIST_TARGET_S = 0.25
COLORS = {"virtshift": "tab:blue", "raw": "tab:gray", "libvirt": "tab:orange", "floor": "black"}


def fmt_t(s: float | None) -> str:
    if s is None:
        return "-"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 0.01:
        return f"{s * 1000:.1f} ms"
    return f"{s * 1000:.2f} ms"


def fmt_series(st: dict[str, Any] | None) -> str:
    if not st or not st.get("n"):
        return "-"
    return f"{fmt_t(st['median'])} ({fmt_t(st['min'])}–{fmt_t(st['max'])})"


def verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("PASS" if ok else "**FAIL**")


def comparisons(row: dict[str, Any]) -> list[dict[str, Any]]:
    """The target checks of one row: one dict per (reference, target)."""
    out: list[dict[str, Any]] = []
    s = row.get("series", {})
    kind = row["row"]
    err = row.get("errors", {}) or {}
    if kind in TARGET_VS_RAW:
        tgt = TARGET_VS_RAW[kind]
        r = (row.get("vs_raw") or {}).get("ratio")
        ref_name = "raw QMP" if kind != "migrate" else "qemu-img convert + raw mirror/pivot"
        out.append(
            {
                "what": row["what"],
                "reference": ref_name,
                "vs": s.get("virtshift"),
                "ref": s.get("raw"),
                "ratio": r,
                "ratio_text": f"{r:.2f}x" if r else "-",
                "spread": row.get("vs_raw"),
                "target": f"≤ {tgt}x raw",
                "pass": (r <= tgt) if r else (False if err.get("virtshift") else None),
                "note": err.get("virtshift"),
            }
        )
        if kind in ("snapshot", "migrate"):
            lr = (row.get("lv_vs") or {}).get("ratio")
            need = 2.0 if kind == "snapshot" else 1.0
            out.append(
                {
                    "what": row["what"],
                    "reference": "libvirt 9.0",
                    "vs": s.get("virtshift"),
                    "ref": s.get("libvirt"),
                    "ratio": (1 / lr) if lr else None,
                    "ratio_text": f"libvirt ÷ virtshift = {lr:.2f}" if lr else "-",
                    "spread": {
                        "paired_q1": row["lv_vs"]["paired_q1"],
                        "paired_q3": row["lv_vs"]["paired_q3"],
                    }
                    if lr and "paired_q1" in row["lv_vs"]
                    else None,
                    "target": "≥ 2 (2x faster than libvirt)"
                    if need == 2.0
                    else "> 1 (faster than libvirt)",
                    "pass": (lr >= need if need > 1 else lr > 1)
                    if lr
                    else (False if err.get("virtshift") else None),
                    "note": err.get("libvirt") or err.get("virtshift"),
                }
            )
    elif kind == "startup":
        r = (row.get("vs_ref") or {}).get("ratio")
        vs = s.get("virtshift")
        is_list = "list" in row["variant"]
        out.append(
            {
                "what": row["what"],
                "reference": "python3 -c pass",
                "vs": vs,
                "ref": s.get("python3 -c pass"),
                "ratio": r,
                "ratio_text": f"{r:.2f}x" if r else "-",
                "spread": row.get("vs_ref"),
                "target": f"say the ratio; list < {LIST_TARGET_S} s"
                if is_list
                else "say the ratio",
                "pass": (vs["median"] < LIST_TARGET_S) if is_list and vs else None,
                "note": None,
            }
        )
    return out


def row_summary(row: dict[str, Any]) -> str:
    if row["row"] == "tree":
        return "tree: " + ", ".join(
            f"{op}: slopes {g['slopes']}" for op, g in row.get("growth", {}).items()
        )
    parts = []
    for c in comparisons(row):
        parts.append(
            f"{c['reference']}: {fmt_t(c['vs']['median']) if c['vs'] else '-'} vs "
            f"{fmt_t(c['ref']['median']) if c['ref'] else '-'} -> {c['ratio_text']} "
            f"[{c['target']}] {verdict(c['pass']).strip('*')}"
        )
    return f"{row['what']}: " + "; ".join(parts)


# -- plot -------------------------------------------------------------------------------------


def write_plot(results: dict[str, Any], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = results.get("rows", [])
    fig, axes = plt.subplots(3, 3, figsize=(19, 16))
    meta = results.get("meta", {})
    m = meta.get("machine", {})
    fig.suptitle(
        f"virtshift {m.get('virtshift', '')} benchmarks "
        f"({'quick' if meta.get('quick') else 'full'} run, "
        f"{meta.get('date', '')}) — {m.get('nproc')} cores, {m.get('qemu', '')}",
        fontsize=12,
    )
    # (a, b) snapshots
    for ax, mode in ((axes[0][0], "created"), (axes[0][1], "precreated")):
        snaps = [r for r in rows if r["row"] == "snapshot" and r["variant"] == mode]
        if not snaps:
            _empty(ax, f"snapshots ({mode}): not measured")
            continue
        for sysname in ("virtshift", "floor", "raw", "libvirt"):
            pts = [
                (r["size"], r["series"][sysname]) for r in snaps if sysname in r.get("series", {})
            ]
            if not pts:
                continue
            xs = [p[0] for p in pts]
            med = [p[1]["median"] * 1000 for p in pts]
            lo = [(p[1]["median"] - p[1]["min"]) * 1000 for p in pts]
            hi = [(p[1]["max"] - p[1]["median"]) * 1000 for p in pts]
            label = {"raw": "raw QMP transaction", "floor": "floor (see BENCHMARKS.md)"}.get(
                sysname, sysname
            )
            ax.errorbar(
                xs, med, yerr=[lo, hi], marker="o", capsize=3, label=label, color=COLORS[sysname]
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("disks")
        ax.set_ylabel("ms (median, min–max)")
        ax.set_title(f"snapshotCreateXML ATOMIC, {mode} overlays")
        ax.set_xticks(sorted({r["size"] for r in snaps}) or [1])
        ax.set_xticklabels([str(x) for x in sorted({r["size"] for r in snaps})] or ["1"])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    # (c) ratios against raw
    ax = axes[0][2]
    labels, vals, tg, cols = [], [], [], []
    for r in rows:
        for c in comparisons(r):
            if (
                c["reference"] == "libvirt 9.0"
                or c["reference"] == "python3 -c pass"
                or not c["ratio"]
            ):
                continue
            short = (
                r["what"]
                .replace("snapshotCreateXML ATOMIC, ", "snap ")
                .replace(" overlays", "")
                .replace("migrate-storage of a ", "migrate ")
                .replace(": call to job end", "")
            )
            labels.append(short[:48])
            vals.append(c["ratio"])
            tg.append(TARGET_VS_RAW[r["row"]])
            cols.append("tab:green" if c["pass"] else "tab:red")
    y = list(range(len(labels)))
    if not vals:
        _empty(ax, "ratios to raw: not measured")
    ax.barh(y, vals, color=cols)
    ax.scatter(tg, y, marker="|", s=200, color="black", label="target", zorder=3)
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    if vals:
        ax.set_xscale("log")
        from matplotlib.ticker import FixedLocator, NullLocator

        ticks = [t for t in (1, 1.5, 2, 3, 5, 10, 20, 50, 100) if t <= max(vals) * 1.5]
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([f"{t:g}" for t in ticks], fontsize=7)
        for yy, v in zip(y, vals, strict=True):
            ax.text(v, yy, f" {v:.2f}", va="center", fontsize=7)
    ax.set_xlabel("virtshift / reference (median), log")
    ax.set_title("ratio to the raw reference (green: target met)")
    ax.grid(True, axis="x", which="both", alpha=0.3)
    if vals:
        ax.legend(loc="lower right")
    _plot_depth(axes[1][0], rows)
    _plot_pivot(axes[1][1], rows)
    _plot_copy(axes[2][0], rows)
    # (f) migrate phases
    ax = axes[1][2]
    migs = [r for r in rows if r["row"] == "migrate"]
    if not migs:
        _empty(ax, "migrate-storage: not measured")
    xpos: float = 0.0
    xl: list[tuple[float, str]] = []
    for r in migs:
        for sysname in ("raw", "virtshift", "libvirt"):
            ph = r.get("phases_median_s", {}).get(sysname)
            if not ph:
                continue
            bottom = 0.0
            keys = [k for k in ph if k not in ("pivot-pause", "reopen-mirror")]
            for i, k in enumerate(keys):
                ax.bar(xpos, ph[k], bottom=bottom, color=f"C{i % 10}", edgecolor="white")
                if ph[k] > 0.06 * max(1e-9, sum(ph[x] for x in keys)):
                    ax.text(xpos, bottom + ph[k] / 2, k[:18], ha="center", va="center", fontsize=6)
                bottom += ph[k]
            st = r["series"].get(sysname)
            if st:
                ax.errorbar(
                    xpos,
                    st["median"],
                    yerr=[[st["median"] - st["min"]], [st["max"] - st["median"]]],
                    color="black",
                    capsize=3,
                )
            xl.append((xpos, f"{sysname}\n{r['variant']}"))
            xpos += 1
        xpos += 0.5
    ax.set_xticks([p for p, _ in xl])
    ax.set_xticklabels([t for _, t in xl], fontsize=8)
    ax.set_ylabel("s (median per phase; whisker: total min–max)")
    size = migs[0]["size"] if migs else ""
    ax.set_title(f"migrate-storage, {size} MiB chain: phases")
    # (h) startup
    ax = axes[2][1]
    st_rows = [r for r in rows if r["row"] == "startup"]
    if not st_rows:
        _empty(ax, "start-up: not measured")
    bars: list[tuple[str, dict[str, Any]]] = []
    if st_rows:
        bars.append(("python3 -c pass", st_rows[0]["series"]["python3 -c pass"]))
        for r in st_rows:
            bars.append((r["variant"], r["series"]["virtshift"]))
    for i, (_name, st) in enumerate(bars):
        ax.bar(i, st["median"] * 1000, color="tab:gray" if i == 0 else "tab:blue")
        ax.errorbar(
            i,
            st["median"] * 1000,
            yerr=[[(st["median"] - st["min"]) * 1000], [(st["max"] - st["median"]) * 1000]],
            color="black",
            capsize=3,
        )
        ax.text(
            i,
            st["median"] * 1000,
            f"{st['median'] * 1000:.0f} ms",
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.axhline(
        LIST_TARGET_S * 1000,
        color="red",
        ls="--",
        label=f"list target {LIST_TARGET_S * 1000:.0f} ms",
    )
    ax.set_xticks(range(len(bars)))
    ax.set_xticklabels([b[0] for b in bars], fontsize=8)
    ax.set_ylabel("ms (median, min–max)")
    ax.set_title("start-up (new process each time)")
    ax.legend()
    # (i) tree
    ax = axes[2][2]
    trees = [r for r in rows if r["row"] == "tree"]
    if not trees:
        _empty(ax, "snapshot tree: not measured")
    for ti, tree in enumerate(trees):
        style = "o-" if ti == 0 else "s--"
        if tree.get("build") and ti == 0:
            bx = [b[0] + 1 for b in tree["build"]]
            by = [b[1] * 1000 for b in tree["build"]]
            ax.plot(
                bx,
                by,
                ".",
                ms=2,
                color="lightgray",
                label=f"each REDEFINE while growing ({tree['variant']})",
            )
        for i, (op, g) in enumerate(tree.get("growth", {}).items()):
            pts = g["points"]
            if pts:
                ax.plot(
                    [p[0] for p in pts],
                    [p[1] * 1000 for p in pts],
                    style,
                    color=f"C{i}",
                    label=f"{tree['variant']}: {op} {g['slopes']}",
                )
        for key, msg in tree.get("errors", {}).items():
            n = int(key.rsplit("@", 1)[1])
            ax.annotate(
                f"{tree['variant']}: --tree fails at {n}:\n{msg.replace('error: ', '')[:45]}",
                (n, 2 + 4 * ti),
                fontsize=7,
                color="red",
                ha="right",
            )
    if trees:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("snapshots in the domain")
        ax.set_ylabel("ms (median)")
        ax.set_title("snapshot tree scaling (slope 1 = linear)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6, loc="upper left")
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _plot_depth(ax: Any, rows: list[dict[str, Any]]) -> None:
    dep = next((r for r in rows if r["row"] == "snapshot_depth"), None)
    if dep is None:
        _empty(ax, "snapshot by chain depth: not measured")
        return
    for name, xs in dep["by_depth"].items():
        ax.plot(
            range(1, len(xs) + 1),
            [x * 1000 for x in xs],
            ".-",
            color=COLORS.get(name, "black"),
            label={"raw": "raw QMP transaction"}.get(name, name),
        )
    ax.set_yscale("log")
    ax.set_xlabel("chain depth of every disk before the snapshot")
    ax.set_ylabel("ms")
    ax.set_title(
        f"one more snapshot of {dep['size']} disks, by chain depth (one domain per system)"
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()


def _plot_pivot(ax: Any, rows: list[dict[str, Any]]) -> None:
    piv = [r for r in rows if r["row"] == "pivot"]
    if not piv:
        _empty(ax, "pivots: not measured")
        return
    x: float = 0.0
    ticks: list[tuple[float, str]] = []
    for r in piv:
        short = "abort" if r["variant"] == "blockJobAbort" else "REOPEN"
        bars = [
            (f"virtshift\n{short}", r["series"].get("virtshift"), COLORS["virtshift"]),
            ("raw\ncomplete", r["series"].get("raw"), COLORS["raw"]),
        ]
        if "floor" in r["series"]:
            bars.insert(1, ("floor", r["series"]["floor"], COLORS["floor"]))
        if "raw_attach" in r["series"]:
            att = r["series"]["raw_attach"]["median"]
            bars.append(
                (
                    "raw attach\n+ complete",
                    {"median": att + r["series"]["raw"]["median"], "min": 0, "max": 0},
                    "silver",
                )
            )
        for label, st, col in bars:
            if not st:
                continue
            ax.bar(x, st["median"] * 1000, color=col)
            ax.text(
                x,
                st["median"] * 1000,
                f"{st['median'] * 1000:.1f}",
                ha="center",
                va="bottom",
                fontsize=8,
            )
            ticks.append((x, label))
            x += 1
        x += 0.6
    ax.set_xticks([t[0] for t in ticks])
    ax.set_xticklabels([t[1] for t in ticks], fontsize=7)
    ax.set_ylabel("ms (median): call to job end")
    ax.set_title("pivot: virtshift call vs raw block-job-complete -> COMPLETED")


def _plot_copy(ax: Any, rows: list[dict[str, Any]]) -> None:
    mig = next((r for r in rows if r["row"] == "migrate" and r.get("copy_methods")), None)
    if mig is None:
        _empty(ax, "copy methods: not measured")
        return
    items = list(mig["copy_methods"].items())
    for i, (name, st) in enumerate(items):
        col = (
            "tab:blue"
            if name.startswith("virtshift")
            else "tab:green"
            if name.startswith("prototype")
            else "tab:gray"
        )
        ax.barh(
            i,
            st["median"],
            color=col,
            xerr=[[st["median"] - st["min"]], [st["max"] - st["median"]]],
            capsize=3,
        )
        ax.text(st["median"], i, f" {st['median']:.2f} s", va="center", fontsize=8)
    ax.set_yticks(range(len(items)))
    ax.set_yticklabels([_short_method(n) for n, _ in items], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("s (median, min–max)")
    ax.set_title(f"copying the same {mig['size']} MiB chain (the copy phase alone)")


def _short_method(name: str) -> str:
    for key, short in (
        ("1 thread", "virtshift copy_files,\n1 thread"),
        ("virtshift copy_files", "virtshift copy_files"),
        ("virtshift copy_sparse", "virtshift copy_sparse"),
        ("convert + fsync", "qemu-img convert\n+ fsync"),
        ("qemu-img convert", "qemu-img convert\n(no data sync)"),
        ("cp --sparse", "cp --sparse + sync"),
        ("prototype", "prototype: copy_file_range\n+ write-behind + fsync"),
    ):
        if key in name:
            return short
    return name[:30]


def _empty(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


# -- BENCHMARKS.md ----------------------------------------------------------------------------


def numbers_section(results: dict[str, Any], out_dir: Path, repo: Path) -> str:
    meta = results.get("meta", {})
    m = meta.get("machine", {})
    cfg = meta.get("config", {})
    rel = _rel(out_dir, repo)
    L: list[str] = []
    L.append(
        f"Run: `{meta.get('command', 'bench/run')}` on {meta.get('date', '?')} "
        f"({'quick' if meta.get('quick') else 'full'}, {meta.get('duration_s', '?')} s), "
        f"virtshift {m.get('virtshift')} at `{m.get('git_head')}`. "
        f"Raw data: `{rel}/results.json`; plot: `{rel}/results.png`; profiles: `{rel}/profiles/`."
    )
    dirty = [x.strip() for x in m.get("src_uncommitted") or []]
    if dirty:
        L.append("")
        L.append(
            "src/ had uncommitted changes when this ran (another engineer was working in the "
            "same tree): " + ", ".join(f"`{d}`" for d in dirty)
        )
    L.append("")
    L.append("Machine:")
    L.append("")
    L.append(
        f"- {m.get('nproc')} cores: {m.get('cpu')}; {m.get('mem_total_mib')} MiB RAM; "
        f"{m.get('os')}, "
        f"kernel {m.get('kernel')}"
    )
    L.append(
        f"- {m.get('qemu')} (TCG, no guest OS, domains started paused); "
        f"Python {m.get('python')} (`{m.get('python_exe')}`)"
    )
    lvm = meta.get("libvirt", {})
    if lvm.get("status") == "used":
        L.append(
            f"- libvirt {lvm.get('libvirt')} (Debian), `libvirtd` in session mode "
            f"as uid {lvm.get('uid')} "
            f"(`{lvm.get('uri')}`), python3-libvirt under `/usr/bin/python3`"
        )
    else:
        L.append(f"- libvirt: {lvm.get('status')}")
    L.append(
        f"- images on `{m.get('work_fs')}`; one durable state write (`write_atomic`: write, fsync, "
        f"rename, fsync dir) costs {m.get('fsync_write_atomic_ms')} ms here"
        + (
            f", creating a file there {m['create_file_ms']} ms"
            if m.get("create_file_ms") is not None
            else ""
        )
    )
    L.append(
        f"- load: at start `{m.get('uptime_start')}`; at end `{meta.get('uptime_end', '?')}` "
        "(other engineers' test suites share the 2 cores)"
    )
    L.append(
        f"- repetitions: snapshots {cfg.get('snapshot_reps')}, pivots {cfg.get('pivot_reps')}, "
        f"migrate {cfg.get('migrate_reps')}, start-up {cfg.get('startup_reps')}, "
        f"tree {cfg.get('tree_reps')} "
        f"(+{cfg.get('warmup')} warm-up, not counted)"
    )
    L.append("")
    L.append("### Targets")
    L.append("")
    L.append(
        "Times: median (min–max) of the repetitions. Ratio: median / median; for ratios to raw the "
        "interquartile range of the per-repetition (paired) ratios follows in brackets."
    )
    L.append("")
    L.append("| what | reference | virtshift | reference time | ratio | target | result |")
    L.append("|---|---|---|---|---|---|---|")
    rows = results.get("rows", [])
    for r in rows:
        for c in comparisons(r):
            ratio = c["ratio_text"]
            sp = c.get("spread") or {}
            if "paired_q1" in sp:
                ratio += f" [{sp['paired_q1']:.2f}–{sp['paired_q3']:.2f}]"
            vs = fmt_series(c["vs"]) if c["vs"] else (c["note"] or "-")
            ref = (
                fmt_series(c["ref"])
                if c["ref"]
                else (c["note"] or "-")
                if c["reference"] == "libvirt 9.0"
                else "-"
            )
            L.append(
                f"| {c['what']} | {c['reference']} | {_cell(vs)} | {_cell(ref)} | {ratio} | "
                f"{c['target']} | {verdict(c['pass'])} |"
            )
    trees = [r for r in rows if r["row"] == "tree"]
    for tree in trees:
        for op, g in tree["growth"].items():
            pts = ", ".join(f"{n}: {fmt_t(t)}" for n, t in g["points"])
            missing = [n for n in tree["sizes"] if n not in [p[0] for p in g["points"]]]
            note = f"; **fails at {missing}**" if missing else ""
            L.append(
                f"| {tree['variant']} of snapshots: {op} | (growth) | {pts}{note} | - | "
                f"log-log slopes "
                f"{g['slopes']} | linear or better (slope ≤ 1.1) | {verdict(g['pass'])} |"
            )
    L.append("")
    L.extend(_floor_section(rows))
    # details
    snaps = [r for r in rows if r["row"] == "snapshot"]
    if snaps:
        L.append(
            "### Where a snapshot's time goes (virtshift, one instrumented call, exclusive ms)"
        )
        L.append("")
        L.append("| disks, overlays | total | " + " | ".join(_PHASE_COLS) + " | other |")
        L.append("|---|---|" + "---|" * (len(_PHASE_COLS) + 1))
        for r in snaps:
            ph = r.get("phases")
            if not ph:
                continue
            L.append(
                f"| {r['size']}, {r['variant']} | {ph['total_ms']:.1f} | "
                + " | ".join(f"{_phase_sum(ph, c):.1f}" for c in _PHASE_COLS)
                + f" | {_phase_other(ph):.1f} |"
            )
        L.append("")
        for r in snaps:
            if r.get("errors", {}).get("virtshift"):
                L.append(f"- {r['size']} disks: virtshift {r['errors']['virtshift'][:400]}")
            if r.get("raw_qemu", "").startswith("QEMU started by the bench"):
                L.append(f"- {r['size']} disks, raw reference: {r['raw_qemu']}")
        L.append("")
    dep = next((r for r in rows if r["row"] == "snapshot_depth"), None)
    if dep:
        L.append(
            f"### One more snapshot of {dep['size']} disks by chain depth "
            "(created overlays, one domain per system)"
        )
        L.append("")
        depth = max(len(v) for v in dep["by_depth"].values())
        marks = sorted({1, 2, 5, 10, 20, 30, depth} & set(range(1, depth + 1)))
        L.append("| system | " + " | ".join(f"depth {d}" for d in marks) + " |")
        L.append("|---|" + "---|" * len(marks))
        for name, xs in dep["by_depth"].items():
            L.append(f"| {name} | " + " | ".join(fmt_t(xs[d - 1]) for d in marks) + " |")
        L.append("")
        for d, ph in dep.get("phases_by_depth", {}).items():
            top = sorted(
                ((k, v["ms"], v["calls"]) for k, v in ph["phases"].items()), key=lambda x: -x[1]
            )[:6]
            L.append(
                f"- virtshift at depth {d} ({ph['total_ms']:.0f} ms instrumented): "
                + ", ".join(f"{k} {ms:.1f} ms ×{n}" for k, ms, n in top)
            )
        L.append("")
    facts = [
        (r["size"], r["variant"], r["status_file"], r.get("xml_costs", {}))
        for r in snaps
        if r.get("status_file")
    ]
    if facts:
        L.append("Status file and XML costs (virtshift, after one snapshot):")
        L.append("")
        for n, v, sf, xc in facts:
            L.append(
                f"- {n} disks, {v}: status file {sf['bytes']} bytes, "
                f"{sf['elements']} elements of which "
                f"{sf['qemu_command_elements']} `<command>` (QEMU's command list); format_status "
                f"{xc.get('format_status_ms')} ms vs lxml tostring of the same tree "
                f"{xc.get('lxml_tostring_same_tree_ms')} ms; "
                f"parse_status {xc.get('parse_status_ms')} ms vs lxml fromstring "
                f"{xc.get('lxml_fromstring_same_text_ms')} ms"
            )
        L.append("")
    for r in rows:
        if r["row"] == "pivot" and r.get("phases"):
            ph = r["phases"]
            top = sorted(
                ((k, v["ms"], v["calls"]) for k, v in ph["phases"].items()), key=lambda x: -x[1]
            )[:9]
            L.append(
                f"- {r['what']} ({fmt_t(ph['total_ms'] / 1000)} instrumented): "
                + ", ".join(f"{k} {ms:.1f} ms ×{n}" for k, ms, n in top)
            )
            fl, rw = r.get("series", {}).get("floor"), r.get("series", {}).get("raw")
            if fl and rw:
                budget = TARGET_VS_RAW["pivot"] * rw["median"]
                fr = r.get("floor_raw") or {}
                if fl["median"] <= budget:
                    says = f"{fmt_t(budget - fl['median'])} left above the floor"
                elif fr.get("paired_q1", 0) > TARGET_VS_RAW["pivot"]:
                    says = "the floor is above it: cannot hold"
                else:
                    says = "the floor is at it (within the spread)"
                L.append(
                    "  - floor (the steps of a crash-safe pivot without a daemon around the raw "
                    f"complete, `_PivotFloor`): {fmt_series(fl)}, "
                    f"{fr.get('ratio', 0):.2f}x raw "
                    f"[{fr.get('paired_q1', 0):.2f}–{fr.get('paired_q3', 0):.2f}]; "
                    f"≤ 1.5x raw is {fmt_t(budget)}: {says}"
                )
            if "raw_attach" in r.get("series", {}):
                ra = r["vs_raw_attach"].get("ratio")
                L.append(
                    "  - raw attach of the destination chain "
                    "(blockdev-add ×2 + blockdev-snapshot) "
                    f"{fmt_series(r['series']['raw_attach'])}; virtshift / (attach + complete) = "
                    f"{ra:.2f}x"
                    if ra
                    else ""
                )
    migs = [r for r in rows if r["row"] == "migrate"]
    if migs:
        L.append("")
        L.append("### migrate-storage phases (median seconds)")
        L.append("")
        for r in migs:
            for sysname, ph in r.get("phases_median_s", {}).items():
                w = r.get("guest_writes_per_s", {}).get(sysname)
                L.append(
                    f"- {r['variant']}, {sysname}: "
                    + ", ".join(f"{k} {v:.3f}" for k, v in ph.items())
                    + (f"; guest writes {w}/s" if w else "")
                )
            if r.get("copy_methods") and r["variant"] == "idle":
                L.append(
                    "- the copy alone, same chain: "
                    + ", ".join(f"{m}: {fmt_series(st)}" for m, st in r["copy_methods"].items())
                )
            for k, e in (r.get("errors") or {}).items():
                if e:
                    L.append(f"- {r['variant']}, {k}: {e[:300]}")
            if r.get("phases"):
                ph = r["phases"]
                top = sorted(
                    ((k, v["ms"], v["calls"]) for k, v in ph["phases"].items()), key=lambda x: -x[1]
                )[:8]
                L.append(
                    f"- {r['variant']}, virtshift instrumented ({fmt_t(ph['total_ms'] / 1000)}): "
                    + ", ".join(f"{k} {ms / 1000:.3f} s ×{n}" for k, ms, n in top)
                )
    st_rows = [r for r in rows if r["row"] == "startup"]
    if st_rows:
        L.append("")
        L.append("### Start-up")
        L.append("")
        for r in st_rows:
            L.append(
                f"- `{' '.join([Path(r['command'][0]).name, *r['command'][1:]])}`: "
                f"{fmt_series(r['series']['virtshift'])}"
            )
            if r.get("through_pyenv_shim"):
                s = r["through_pyenv_shim"]
                L.append(
                    f"- the same through the pyenv shim on PATH (`{s['command']}`): "
                    f"{fmt_t(s['median'])} "
                    "(the shim is a bash script: not virtshift's cost)"
                )
            if r.get("importtime_top"):
                L.append(
                    "- heaviest imports of `list` (`-X importtime`, cumulative ms): "
                    + ", ".join(
                        f"{x['module']} {x['cumulative_ms']:.1f}" for x in r["importtime_top"][:12]
                    )
                )
    for tree in trees:
        L.append("")
        L.append(f"### Snapshot tree: {tree['variant']} of REDEFINEd snapshots")
        L.append("")
        ops = list(tree["growth"])
        L.append("| snapshots | " + " | ".join(ops) + " | --tree output |")
        L.append("|---|" + "---|" * (len(ops) + 1))
        for n in tree["sizes"]:
            b = tree["by_size"].get(str(n), {})
            cells = [fmt_series(b.get("series", {}).get(op)) for op in ops]
            err = tree["errors"].get(f"snapshot-list --tree @ {n}")
            if err:
                cells[0] = "fails: " + _cell(err[:80])
            L.append(
                f"| {n} | " + " | ".join(cells) + f" | {b.get('tree_output_bytes', '-')} bytes |"
            )
        big = tree["by_size"].get(str(tree["sizes"][-1]), {}).get("lookup_phases")
        if big:
            top = sorted(
                ((k, v["ms"], v["calls"]) for k, v in big["phases"].items()), key=lambda x: -x[1]
            )[:5]
            L.append("")
            L.append(
                f"- snapshotLookupByName at {tree['sizes'][-1]} ({big['total_ms']:.0f} ms): "
                + ", ".join(f"{k} {ms:.1f} ms ×{n}" for k, ms, n in top)
            )
    if results.get("notes"):
        L.append("")
        for n in results["notes"]:
            L.append(f"- note: {n}")
    L.append("")
    L.append(f"![results]({rel}/results.png)")
    return "\n".join(L)


_PHASE_COLS = [
    "QMP connect + negotiate",
    "QMP query-block",
    "QMP transaction",
    "QMP other",
    "read + parse status/config XML",
    "load snapshot tree (parse every file)",
    "format status XML",
    "build the new status while QEMU works (overlapped)",
    "parse the new status back for a next call (while QEMU runs)",
    "format domain XML",
    "format snapshot XML",
    "state writes (write_atomic)",
    "state files written under temporary names (prepare_atomic)",
    "state files put in place (rename + directory fsync)",
    "take the domain lock",
]


def _floor_section(rows: list[dict[str, Any]]) -> list[str]:
    """The snapshot rows' floor: the steps of a crash-safe call without a
    daemon, in their cheapest form, against the targets' budgets."""
    snaps = [r for r in rows if r["row"] == "snapshot" and "floor" in r.get("series", {})]
    if not snaps:
        return []
    L = [
        "### The floor of a snapshot call (same run)",
        "",
        "`floor`: what any crash-safe implementation without a daemon does around "
        "the raw `transaction`, each step in its cheapest Python form and nothing "
        "of the request's own: take the domain's lock, read and parse the state "
        "file, parse the request, write the transaction but its closing brace "
        "(QEMU reads it meanwhile), read each pre-created overlay's header, write "
        "the intent, connect and negotiate QMP (overlapping the above), write the "
        "new state file and write and sync the new metadata file (while QEMU "
        "still reads, the rest after), send the rest of the transaction, put "
        "them in place after the reply (the "
        "state file, which a power loss makes moot with its QEMU, is not synced), "
        "remove the intent, disconnect. "
        "Where the floor is above a target's budget (its median, and its paired "
        "ratio in three repetitions of four), no implementation of that shape "
        "meets the target (bench/virtshift_bench.py, `_FloorSnap`).",
        "",
        "| disks, overlays | raw | floor | floor ÷ raw | virtshift | virtshift ÷ floor "
        "| 1.3x raw | libvirt ÷ 2 | the floor says |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in snaps:
        s = r["series"]
        raw, floor, vs = s.get("raw"), s["floor"], s.get("virtshift")
        lv = s.get("libvirt")
        budget = 1.3 * raw["median"] if raw else None
        half = lv["median"] / 2 if lv else None
        says = []
        for name, limit, paired, need in (
            ("≤ 1.3x raw", budget, r.get("floor_raw") or {}, 1.3),
            ("2x libvirt", half, r.get("floor_lv") or {}, 0.5),
        ):
            if limit is None:
                continue
            if floor["median"] <= limit:
                says.append(f"{name}: {fmt_t(limit - floor['median'])} left above the floor")
            elif paired.get("paired_q1", 0) > need:
                # in three repetitions of four the floor alone was over the budget
                says.append(f"{name}: floor above it, cannot hold")
            else:
                says.append(f"{name}: floor at the budget (within the spread)")
        fr = (r.get("floor_raw") or {}).get("ratio")
        vf = (r.get("vs_floor") or {}).get("ratio")
        L.append(
            f"| {r['size']}, {r['variant']} | {fmt_t(raw['median']) if raw else '-'} | "
            f"{fmt_t(floor['median'])} | {f'{fr:.2f}x' if fr else '-'} | "
            f"{fmt_t(vs['median']) if vs else '-'} | {f'{vf:.2f}x' if vf else '-'} | "
            f"{fmt_t(budget) if budget else '-'} | {fmt_t(half) if half else '-'} | "
            f"{'; '.join(says) or '-'} |"
        )
    L.append("")
    return L


def _phase_sum(ph: dict[str, Any], col: str) -> float:
    p = ph["phases"]
    if col == "QMP other":
        return sum(
            float(v["ms"])
            for k, v in p.items()
            if k.startswith("QMP ")
            and k not in ("QMP query-block", "QMP transaction")
            and k != "QMP connect + negotiate"
        )
    return float(p.get(col, {}).get("ms", 0.0))


def _phase_other(ph: dict[str, Any]) -> float:
    known = {c for c in _PHASE_COLS if c != "QMP other"}
    return sum(
        float(v["ms"])
        for k, v in ph["phases"].items()
        if k not in known and not k.startswith("QMP ")
    )


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _rel(p: Path, repo: Path) -> str:
    try:
        return str(p.resolve().relative_to(repo.resolve()))
    except ValueError:
        return str(p)


SKELETON = """# Benchmarks

`bench/run [--quick] [--with-libvirt] [--out bench/results]` measures every row
below on this machine and rewrites the section between the markers.

{begin}
{end}
"""


def write_benchmarks_md(results: dict[str, Any], md: Path, out_dir: Path, repo: Path) -> None:
    text = md.read_text() if md.exists() else SKELETON.format(begin=BEGIN, end=END)
    if BEGIN not in text or END not in text:
        text = text.rstrip("\n") + f"\n\n## Results\n\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    _old, tail = rest.split(END, 1)
    md.write_text(head + BEGIN + "\n" + numbers_section(results, out_dir, repo) + "\n" + END + tail)


if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else here / "results"
    res = json.loads((out / "results.json").read_text())
    write_plot(res, out / "results.png")
    pub = here / "published"
    if pub.resolve() != out.resolve():
        import shutil

        shutil.rmtree(pub, ignore_errors=True)
        shutil.copytree(out, pub)
    write_benchmarks_md(res, here.parent / "BENCHMARKS.md", pub, here.parent)
    print(f"rewrote {out / 'results.png'} and BENCHMARKS.md")
