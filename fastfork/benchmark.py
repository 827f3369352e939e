"""``fastfork bench``: measure fork, reap and exec throughput against the stdlib.

Runs the workloads of ``fastfork._workloads`` (the same ones ``bench/`` runs
under pytest-benchmark), prints one table with children per second and the
ratio to the stdlib baseline measured in the same run, with a line per group
saying what that ratio means, and optionally writes JSON (``--json``) and a
chart (``--plot``, needs matplotlib). Each row is the median of its rounds;
the rounds of the methods compared in one group take turns. ``--targets``
also prints the project's own performance goals against this run. The exit
status is 1 only if a workload failed to run.
"""
import datetime
import json
import os
import platform
import statistics
import sys
import time

import fastfork
from fastfork import _workloads as W
from fastfork.errors import describe_exception

SCHEMA = 1
# mode -> (most rounds per row, seconds after which a row stops adding rounds)
ROUNDS = {"quick": (1, 0.0), "default": (5, 1.0), "full": (7, 4.0)}
PLOT_HINT = "pip install 'fastfork[plot]'"


def add_arguments(parser):
    """Add the ``fastfork bench`` options to an argparse ``parser``."""
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="mode", action="store_const", const="quick",
                      help="a few seconds: small sizes, one round each")
    size.add_argument("--full", dest="mode", action="store_const", const="full",
                      help="every workload at every size, including a parent holding --parent-mib "
                           "MiB of touched memory (several minutes)")
    parser.set_defaults(mode="default")
    parser.add_argument("--parent-mib", type=_positive_int, default=1024, metavar="N",
                        help="memory of the big parent in MiB (default 1024; used by "
                             "--full and --big-parent)")
    parser.add_argument("--big-parent", action="store_true",
                        help="also measure from the big parent outside --full")
    parser.add_argument("--only", type=_workload_list, default=None, metavar="W[,W...]",
                        help="run only these workloads: " + ", ".join(W.WORKLOADS))
    parser.add_argument("--children", type=_positive_int, default=None, metavar="N",
                        help="use N children in every row instead of the mode's sizes")
    parser.add_argument("--rounds", type=_positive_int, default=None, metavar="R",
                        help="run exactly R rounds per row (default: by mode and time)")
    parser.add_argument("--json", dest="json_path", metavar="PATH",
                        help="write every figure, the ratios and the machine to PATH")
    parser.add_argument("--plot", dest="plot_path", type=_plot_path, metavar="PATH",
                        help="write a chart to PATH (.png or .svg; needs matplotlib: "
                             f"{PLOT_HINT})")
    parser.add_argument("--targets", action="store_true",
                        help="also print the ratios fastfork's developers aim for, and "
                             "whether this run reaches them")


def _positive_int(text):
    import argparse
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, not {value}")
    return value


def _workload_list(text):
    import argparse
    keys = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in keys if k not in W.WORKLOADS]
    if unknown or not keys:
        raise argparse.ArgumentTypeError(
            f"unknown workload {', '.join(unknown) or text!r}; choose from "
            + ", ".join(W.WORKLOADS))
    return keys


def _plot_path(text):
    import argparse
    if os.path.splitext(text)[1].lower() not in (".png", ".svg"):
        raise argparse.ArgumentTypeError(f"{text!r}: the chart is written as .png or .svg")
    return text


# ---------------------------------------------------------------- planning and running

def plan(args):
    """Return the rows to measure: dicts with workload, method, parent and n, in order.

    All small-parent rows come first, then the big-parent ones.
    """
    big = args.mode == "full" or args.big_parent
    keys = args.only or list(W.WORKLOADS)
    workloads = [W.WORKLOADS[k] for k in keys]
    if "memory" in keys and args.parent_mib != 1024:
        workloads[keys.index("memory")] = W.memory_workload(args.parent_mib)
    rows = []
    for parent in ("small", "big") if big else ("small",):
        for wl in workloads:
            sizes = (wl.sizes if parent == "small" else wl.big_sizes)[args.mode]
            if args.children and sizes:
                sizes = (args.children,)
            for n in sizes:
                for m in wl.methods:
                    if m.slow and args.mode != "full" and n > min(sizes):
                        continue
                    rows.append({"workload": wl, "method": m, "parent": parent, "n": n})
    return rows


def new_result(workload, method, parent, n):
    """Return the result dict of one row, not yet measured (status "ok", no rounds)."""
    return {
        "workload": workload.key, "title": workload.title, "method": method.name,
        "kind": method.kind, "baseline": method.name == workload.baseline,
        "parent": parent, "n": n, "parent_rss_mib": round(W.rss_mib(), 1),
        "status": "ok", "reason": None, "seconds": [],
    }


def finish_result(result, seconds):
    """Fill in ``result``'s statistics from the per-round ``seconds``; return it."""
    n = result["n"]
    median = statistics.median(seconds)
    result.update(
        seconds=list(seconds), rounds=len(seconds), median_s=median, best_s=min(seconds),
        children_per_s=n / median if median > 0 else float("inf"), per_child_s=median / n)
    return result


def run_group(rows, mode, fixed_rounds=None):
    """Measure the rows of one comparison group; return their result dicts.

    Rounds are interleaved (one round of each method in turn), so every
    method of a group meets the same state of a noisy machine and the ratios
    compare like with like. Each row stops adding rounds after its mode's
    number of rounds, or once its own rounds took its mode's time budget.
    """
    most, budget = ROUNDS[mode]
    if fixed_rounds:
        most, budget = fixed_rounds, float("inf")
    results = [new_result(r["workload"], r["method"], r["parent"], r["n"]) for r in rows]
    seconds = [[] for _ in rows]
    spent = [0.0] * len(rows)
    active = []
    for i, row in enumerate(rows):
        reason = W.unavailable(row["method"])
        if reason:
            results[i].update(status="skipped", reason=reason)
        else:
            active.append(i)
    while active:
        for i in list(active):
            started = time.perf_counter()
            try:
                # Children forked by os.fork/multiprocessing must not inherit unflushed output.
                sys.stdout.flush()
                seconds[i].append(W.measure(rows[i]["method"], rows[i]["n"]))
            except Exception as exc:  # noqa: BLE001 - a failed workload is reported, not fatal
                results[i].update(status="failed", reason=describe_exception(
                    type(exc).__name__, exc))
                active.remove(i)
                continue
            spent[i] += time.perf_counter() - started
            if len(seconds[i]) >= most or spent[i] > budget:
                active.remove(i)
    return [finish_result(r, sec) if r["status"] == "ok" else r
            for r, sec in zip(results, seconds)]


def groups(rows):
    """Split planned rows into comparison groups (same workload, parent and n), in order."""
    grouped = {}
    for row in rows:
        grouped.setdefault((row["workload"].key, row["parent"], row["n"]), []).append(row)
    return list(grouped.values())


def add_ratios(results):
    """Set each result's ``ratio``: its children/s over its group's baseline's."""
    base = {}
    for r in results:
        if r["baseline"] and r["status"] == "ok":
            base[(r["workload"], r["parent"], r["n"])] = r["children_per_s"]
    for r in results:
        b = base.get((r["workload"], r["parent"], r["n"]))
        r["ratio"] = r["children_per_s"] / b if b and r["status"] == "ok" else None


def evaluate_targets(results):
    """Return one dict per target: measured ratio, goal and whether it is met.

    A side measured at several sizes uses the largest n; ``met`` is None when
    a side was not measured (skipped, failed, or the big parent not run).
    """
    best = {}
    for r in results:
        if r["status"] == "ok":
            key = (r["workload"], r["method"], r["parent"])
            if key not in best or r["n"] > best[key]["n"]:
                best[key] = r
    out = []
    for t in W.TARGETS:
        a = best.get((t.workload, t.method, t.parent))
        b = best.get((t.workload, t.versus, t.versus_parent))
        if a and b:
            ratio = a["children_per_s"] / b["children_per_s"]
            out.append({"name": t.name, "ratio": ratio, "goal": t.goal,
                        "goal_text": t.goal_text, "met": ratio >= t.goal, "why": None})
        else:
            why = "needs --full" if "big" in (t.parent, t.versus_parent) and not any(
                r["parent"] == "big" for r in results) else "not measured"
            out.append({"name": t.name, "ratio": None, "goal": t.goal,
                        "goal_text": t.goal_text, "met": None, "why": why})
    return out


def machine_info():
    """Return a dict describing this machine and interpreter."""
    info = {
        "system": platform.system(), "kernel": platform.release(),
        "machine": platform.machine(), "cpu_count": os.cpu_count(),
        "cpu_model": None, "mem_total_mib": None,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "fastfork": fastfork.__version__,
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as f:
            info["mem_total_mib"] = int(f.readline().split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return info


# ---------------------------------------------------------------- output

class Progress:
    """One self-overwriting status line on stderr, only when stderr is a terminal."""

    def __init__(self, total):
        self.total = total
        self.done = 0
        self.on = sys.stderr.isatty()

    def show(self, text):
        if self.on:
            self.done += 1
            sys.stderr.write(f"\r\x1b[K[{self.done}/{self.total}] {text}")
            sys.stderr.flush()

    def note(self, text):
        """Print a message on its own line (always)."""
        self.clear()
        print(text, file=sys.stderr)

    def clear(self):
        if self.on:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


def _fmt_rate(x):
    return f"{x:,.0f}" if x >= 10 else f"{x:,.1f}"


def _fmt_time(s):
    if s >= 1e-3:
        return f"{s * 1e3:,.2f} ms"
    return f"{s * 1e6:,.1f} us"


def _parent_label(r, parent_mib):
    if r["parent"] == "small":
        return "small parent"
    return f"parent holding {parent_mib} MiB"


def reading(group):
    """Return one sentence on what a group's results mean, or None.

    ``group`` is the result dicts of one workload, parent and N (ratios set).
    The sentence gives the workload's headline method's ratio to the baseline
    and what to expect of it; None if the workload names no headline or it
    was not measured.
    """
    workload = W.WORKLOADS.get(group[0]["workload"])
    if workload is None or not workload.headline:
        return None
    for r in group:
        if r["method"] == workload.headline and r.get("ratio") is not None:
            return (f"{workload.headline} is {r['ratio']:.2f}x {workload.baseline} here; "
                    f"{workload.expect}")
    return None


def format_rows(results, parent_mib):
    """Return the table lines of ``results``: one block per workload, N and parent.

    Each block ends with its ``reading``.
    """
    width = max([len(r["method"]) for r in results] + [24])
    blocks = {}
    for r in results:
        blocks.setdefault((r["workload"], r["parent"], r["n"]), []).append(r)
    lines = []
    for group in blocks.values():
        first = group[0]
        lines += ["", f"{first['title']}: N={first['n']}, {_parent_label(first, parent_mib)} "
                      f"(RSS {first['parent_rss_mib']:.0f} MiB)",
                  f"  {'method':<{width}}  {'children/s':>12}  {'per child':>10}  "
                  f"{'ratio':>8}  rounds"]
        for r in group:
            mark = "*" if r["baseline"] else " "
            if r["status"] == "ok":
                ratio = f"{r['ratio']:.2f}x" if r["ratio"] is not None else "-"
                lines.append(f"{mark} {r['method']:<{width}}  "
                             f"{_fmt_rate(r['children_per_s']):>12}  "
                             f"{_fmt_time(r['per_child_s']):>10}  {ratio:>8}  {r['rounds']:>6}")
            else:
                label = "skipped: " if r["status"] == "skipped" else "FAILED: "
                lines.append(f"{mark} {r['method']:<{width}}  {label}{r['reason']}")
        sentence = reading(group)
        if sentence:
            lines.append(f"  -> {sentence}")
    return lines


def format_targets(targets):
    """Return the lines of the targets table (``evaluate_targets`` output)."""
    lines = ["fastfork's performance goals (throughput ratio, same run)"]
    tw = max(len(t["name"]) for t in targets)
    for t in targets:
        if t["met"] is None:
            lines.append(f"  {t['name']:<{tw}}  {'-':>8}  goal {t['goal_text']:<8}  "
                         f"n/a ({t['why']})")
        else:
            lines.append(f"  {t['name']:<{tw}}  {t['ratio']:>7.2f}x  goal {t['goal_text']:<8}  "
                         f"{'met' if t['met'] else 'MISSED'}")
    return lines


def format_report(report, targets=False):
    """Return the human-readable table of ``report`` (as from ``build_report``).

    ``targets`` adds the table of the project's performance goals.
    """
    m = report["machine"]
    lines = [
        f"fastfork bench  {report['date']}  {m['system']} {m['kernel']} {m['machine']}  "
        f"{m['cpu_count']} CPUs  {m['implementation']} {m['python']}  "
        f"fastfork {m['fastfork']}",
        f"mode {report['mode']}: each row is the median of its rounds; ratio = children/s "
        f"over the baseline (*) of its group, same run",
    ]
    lines += format_rows(report["results"], report["parent_mib"])
    if targets:
        lines += [""] + format_targets(report["targets"])
    return "\n".join(lines)


def build_report(args, results, command):
    """Return the JSON-ready report of a run."""
    add_ratios(results)
    return {
        "schema": SCHEMA,
        "tool": "fastfork bench",
        "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "mode": args.mode,
        "statistic": "median",
        "jobs": W.JOBS,
        "parent_mib": args.parent_mib,
        "machine": machine_info(),
        "results": results,
        "targets": evaluate_targets(results),
    }


def write_plot(report, path):
    """Write the charts of ``report`` to ``path``; return False if matplotlib is missing."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    ok = [r for r in report["results"] if r["status"] == "ok"]
    # Panel per workload; per parent, the largest N measured.
    panels = {}
    for r in ok:
        top = panels.setdefault(r["workload"], {})
        if r["parent"] not in top or r["n"] > top[r["parent"]]:
            top[r["parent"]] = r["n"]
    cost = [r for r in ok if r["workload"] in ("fork", "exec") and "jobs=" not in r["method"]]
    count = len(panels) + 1
    cols = 2
    rows = (count + cols - 1) // cols
    fig = Figure(figsize=(13, 3.6 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    colors = {"small": "tab:blue", "big": "tab:red"}
    for ax, (key, ns) in zip(axes, panels.items()):
        sel = [r for r in ok if r["workload"] == key and r["n"] == ns.get(r["parent"])]
        methods = list(dict.fromkeys(r["method"] for r in sel))
        height = 0.8 / len(ns)
        for j, parent in enumerate(ns):
            vals = {r["method"]: r["children_per_s"] for r in sel if r["parent"] == parent}
            ys = [i + j * height for i, mname in enumerate(methods) if mname in vals]
            xs = [vals[mname] for mname in methods if mname in vals]
            label = ("small parent" if parent == "small"
                     else f"{report['parent_mib']} MiB parent") + f", N={ns[parent]}"
            ax.barh(ys, xs, height=height, color=colors[parent], label=label)
        ax.set_yticks([i + 0.4 - height / 2 for i in range(len(methods))], methods, fontsize=8)
        ax.invert_yaxis()
        rates = [r["children_per_s"] for r in sel]
        if max(rates) > 30 * min(rates):
            ax.set_xscale("log")
            ax.minorticks_off()  # a narrow log range otherwise labels every minor tick
        for patch in ax.patches:
            ax.annotate(_fmt_rate(patch.get_width()), (patch.get_width(), patch.get_y()
                        + patch.get_height() / 2), xytext=(3, 0), textcoords="offset points",
                        va="center", fontsize=7)
        ax.set_xlabel("children per second (higher is better)")
        ax.set_title(sel[0]["title"], fontsize=10)
        ax.legend(fontsize=7, loc="best")
    ax = axes[len(panels)]
    for (wl, mname) in dict.fromkeys((r["workload"], r["method"]) for r in cost):
        pts = sorted((r["parent_rss_mib"], r["per_child_s"] * 1e3) for r in cost
                     if r["workload"] == wl and r["method"] == mname)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                label=f"{wl}: {mname}")
    ax.set_yscale("log")
    ax.set_xlabel("parent resident memory (MiB)")
    ax.set_ylabel("ms per child (lower is better)")
    ax.set_title("fork cost vs parent size", fontsize=10)
    if cost:
        ax.legend(fontsize=6, loc="best")
    for extra in axes[len(panels) + 1:]:
        extra.set_visible(False)
    fig.suptitle(f"fastfork bench {report['date']}  {report['machine']['kernel']}  "
                 f"{report['machine']['cpu_count']} CPUs  Python {report['machine']['python']}",
                 fontsize=10)
    fig.savefig(path)
    return True


# ---------------------------------------------------------------- entry point

def main(args):
    """Run ``fastfork bench`` with parsed ``args``; return the exit status.

    1 if a workload failed to run, else 0 (a missing matplotlib is not an error).
    """
    planned = groups(plan(args))
    progress = Progress(len(planned))
    results = []
    big = None
    try:
        for group in planned:
            first = group[0]
            if first["parent"] == "big" and big is None:
                progress.note(f"fastfork bench: allocating and touching {args.parent_mib} MiB "
                              "in this process to measure from a big parent")
                big = W.allocate_parent(args.parent_mib)
            progress.show(f"{first['workload'].key} N={first['n']} {first['parent']} parent")
            results.extend(run_group(group, args.mode, args.rounds))
    finally:
        del big
        progress.clear()
    command = "fastfork bench " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["bench"]
                                           else sys.argv[1:])
    report = build_report(args, results, command.strip())
    print(format_report(report, targets=args.targets))
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(report, f, indent=1)
            f.write("\n")
        print(f"\nresults written to {args.json_path}")
    if args.plot_path:
        if write_plot(report, args.plot_path):
            print(f"chart written to {args.plot_path}")
        else:
            print(f"fastfork bench: --plot needs matplotlib, which is not installed; "
                  f"get it with: {PLOT_HINT}", file=sys.stderr)
    return 1 if any(r["status"] == "failed" for r in results) else 0
