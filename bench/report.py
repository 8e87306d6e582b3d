"""The bench's table: ours against the reference, ratios, targets, disk speed and machine.

    python3 bench/report.py RESULTS_DIR [--out DIR]
    python3 bench/report.py A/bench.json B/bench.json [--out DIR]     # runs made as separate calls

Reads ``machine.json``, ``host.json``, ``ref-<variant>-<mode>.json``, ``ours-<variant>.json`` and
``weights-<variant>.json`` from RESULTS_DIR; prints the table; with ``--out`` (or ``$OUT``) writes
``bench.json`` (everything) and ``bench.md`` (the table in Markdown) there.
GB are 2**30 bytes, as in the reference figures.
"""
from __future__ import annotations

import argparse
import glob
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

TARGETS = {  # variant -> metric -> limit; the speed issue's targets (cold: from the click)
    "style": {"cold": 5.0, "warm": 0.40, "warm_1": 0.25, "held": 1.0, "unpark": 0.5, "peak": 11.5, "low": 8.0},
    "coarse-fine": {"cold": 20.0, "warm": 2.0, "warm_1": 0.75, "held": 1.0, "unpark": 0.5, "peak": 13.0, "low": 8.0},
    "z-image": {"cold": 5.0, "warm": 0.30, "warm_1": 0.15, "held": 1.0, "unpark": 0.5, "peak": 11.0, "low": 8.0},
}
LABEL = {"style": "Style", "coarse-fine": "Coarse + Fine + Bias", "z-image": "Z-Image"}
ORDER = ("style", "z-image", "coarse-fine")
REF_MODES = ("disk", "gpu", "cpu")      # cpu: Z-Image's own low-VRAM example, in the notes only


def _load(path):
    try:
        return C.read_json(path)
    except (OSError, ValueError):
        return None


def _s(x, nd=1):
    return "-" if x is None else f"{x:.{nd}f}"


def _ratio(ref, ours):
    if ref is None or ours is None or ours <= 0:
        return "-"
    r = ref / ours
    return f"{r:.1f}x faster" if r >= 1 else f"{1 / r:.1f}x slower"


def _vratio(ref, ours):
    if ref is None or ours is None or ref <= 0:
        return "-"
    return f"{ours / ref:.2f}x"


def _ok(value, limit):
    if value is None or limit is None:
        return ""
    return "PASS" if value <= limit else "FAIL"


def variant_rows(variant: str, ours: dict | None, refs: dict) -> tuple[list[list[str]], dict]:
    t = TARGETS.get(variant, {})
    sc = (ours or {}).get("scenarios", {})
    cold, warm, warm1 = sc.get("cold") or {}, sc.get("warm") or {}, sc.get("warm_1") or {}
    idle, after, restart = sc.get("idle") or {}, sc.get("after_idle") or {}, sc.get("restart") or {}
    rd, rg = refs.get("disk") or {}, refs.get("gpu") or {}
    rows, summary = [], {}

    def row(name, r_disk, r_gpu, o, limit, ratio_fn, nd=1, note=""):
        rows.append([name, _s(r_disk, nd), _s(r_gpu, nd), _s(o, nd) + (f" {note}" if note else ""),
                     "-" if limit is None else f"<= {limit:g}", ratio_fn(r_disk, o), ratio_fn(r_gpu, o), _ok(o, limit)])
        summary[name] = {"reference_disk": r_disk, "reference_gpu": r_gpu, "ours": o, "target": limit,
                         "pass": None if limit is None or o is None else o <= limit}

    cold_click = cold.get("from_click_s") if cold.get("state") == "done" else None
    cold_tab = cold.get("from_tab_load_s") if cold.get("state") == "done" else None
    note = ""
    if cold_tab is not None and cold.get("start_ahead_hook"):
        note = f"(tab load: {cold_tab:.1f}; click {cold.get('click_after_tab_load_s', 0):.0f} s after"
        sb = cold.get("standby") or {}
        note += (f"; standby worker ready {sb['ready_after_s']:.0f} s after WebUI start)" if sb.get("ready")
                 else "; no standby worker)")
    row("first LoRA, cold (s)", rd.get("first_lora_s"), rg.get("first_lora_s"), cold_click, t.get("cold"), _ratio,
        note=note)
    if cold.get("start_ahead_hook"):
        row("first LoRA from tab load (s)", rd.get("first_lora_s"), rg.get("first_lora_s"), cold_tab, None, _ratio)
    fresh = sc.get("cold_fresh") or {}
    if fresh:
        ok = fresh.get("state") == "done"
        row("first LoRA, cold, no standby worker (s)", rd.get("first_lora_s"), rg.get("first_lora_s"),
            fresh.get("from_click_s") if ok else None, None, _ratio,
            note=f"(tab load: {fresh['from_tab_load_s']:.1f}; the worker starts at tab load)" if ok else "")
    row(f"next LoRA, {ours.get('images') if ours else 5} images (s)", rd.get("warm_s"), rg.get("warm_s"),
        warm.get("median_s"), t.get("warm"), _ratio, nd=2)
    row("next LoRA, 1 image (s)", rd.get("warm_1_s"), rg.get("warm_1_s"), warm1.get("median_s"), t.get("warm_1"),
        _ratio, nd=2)
    held = idle.get("held_idle")
    row("VRAM held between jobs (GB)", C.gb(rd.get("held_reserved")), C.gb(rg.get("held_reserved")),
        C.gb(held) if held is not None else None, t.get("held"), _vratio, nd=2,
        note=(f"({C.gb(idle.get('held_right_after_job'))} right after the job"
              + (f", at or under {t.get('held', 1.5):g} after {idle['at_or_under_1_5GB_after_s']:g} s)"
                 if idle.get("at_or_under_1_5GB_after_s") is not None else ")")) if idle else "")
    if after:
        came = after.get("came_back_from")
        if came == "parked" and (idle.get("held_idle") or 0) > C.GiB * (t.get("held") or 1.5):
            came = "weights still on the GPU"      # nothing was parked: no cost of coming back to judge
        after = dict(after, came_back_from=came)
        extra = None
        if after.get("state") == "done" and warm.get("median_s") is not None:
            extra = round(after["from_click_s"] - warm["median_s"], 3)
        row(f"next LoRA after idle, {after.get('came_back_from', '?')} (s)", None, None,
            after.get("from_click_s") if after.get("state") == "done" else None, None, _ratio, nd=2)
        row("  cost of coming back (s)", None, None, extra, t.get("unpark") if after.get("came_back_from") == "parked"
            else None, _ratio, nd=2)
    park = sc.get("park") or {}
    if park:
        row("WebUI generates: worker frees kept VRAM (s)", None, None, park.get("seconds"), None, _ratio, nd=3,
            note=f"({C.gb(park.get('held_before'))} -> {C.gb(park.get('held_after'))} GB)")
    if restart:
        sb = restart.get("standby_ready_after_s") is not None
        row("next LoRA, worker gone (s)", None, None,
            restart.get("from_click_s") if restart.get("state") == "done" else None, None, _ratio,
            note=("(a standby worker in its place, as after the idle timeout" if sb else "(a new worker")
            + "; the weights read from disk again)")
    peaks = [r.get("peak_vram") for r in [cold] + (warm.get("runs") or []) + (warm1.get("runs") or [])
             if r.get("peak_vram") is not None]
    row(f"peak VRAM, profile {ours.get('profile') if ours else '?'} (GB)", C.gb(rd.get("peak_vram")),
        C.gb(rg.get("peak_vram")), C.gb(max(peaks)) if peaks else None, t.get("peak"), _vratio, nd=2,
        note=f"(driver: {C.gb(cold.get('driver_peak'))})" if cold.get("driver_peak") else "")
    for key in sorted((k for k in sc if k == "low" or k.startswith("low_")), key=lambda k: sc[k].get("cap_gb") or 0):
        low = sc[key] or {}
        f = low.get("first") or {}
        done = f.get("state") == "done"
        lp = C.gb(f.get("peak_vram")) if done else None
        second = low.get("second") or {}
        rows.append([f"low-VRAM profile '{ours.get('low_profile')}' under a {low.get('cap_gb'):g} GB cap",
                     "-", "-", ("completed" if done else f"FAILED: {(f.get('error') or {}).get('message', f.get('state'))}"[:80])
                     + (f", peak {lp} GB (driver {C.gb(f.get('driver_peak'))}), {f.get('from_click_s'):.1f} s cold"
                        + (f", {second['from_click_s']:.1f} s next" if second.get('state') == 'done' else "")
                        if done else ""),
                     f"completes, <= {low.get('cap_gb'):g}", "-", "-", "PASS" if done and (lp or 0) <= low.get("cap_gb", 8) else "FAIL"])
        summary[key] = {"completed": done, "peak_GB": lp, "cold_s": f.get("from_click_s"),
                        "next_s": second.get("from_click_s"), "cap_GB": low.get("cap_gb")}
    ram = sc.get("ram") or {}
    if ram:
        done = ram.get("state") == "done"
        hwm = C.gb((ram.get("worker_status") or {}).get("VmHWM"))
        rows.append([f"{ram.get('ram_gb'):g} GB of RAM for the worker ({ram.get('limited_by')})", "-", "-",
                     (f"completed, profile {ram.get('profile')}, {ram.get('from_click_s'):.1f} s cold, worker peak RSS "
                      f"{hwm} GB" + (f", group peak {C.gb(ram.get('group_peak'))} GB" if ram.get("group_peak") else "")
                      if done else f"FAILED: {(ram.get('error') or {}).get('message', ram.get('state'))}"[:120]),
                     "completes", "-", "-", "PASS" if done else "FAIL"])
        summary["ram"] = {"completed": done, "profile": ram.get("profile"), "cold_s": ram.get("from_click_s"),
                          "worker_peak_rss_GB": hwm, "group_peak_GB": C.gb(ram.get("group_peak")),
                          "limited_by": ram.get("limited_by")}
    return rows, summary


def fmt_table(rows, header) -> str:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def md_table(rows, header) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c).replace("|", "/") for c in r) + " |" for r in rows]
    return "\n".join(out)


def load_results(results: str) -> dict:
    """Everything a run left in RESULTS_DIR, as one dict (what bench.json holds)."""
    data = {"machine": _load(os.path.join(results, "machine.json")) or {},
            "host": _load(os.path.join(results, "host.json")) or {}, "variants": {}}
    variants = sorted({os.path.basename(p)[5:-5] for p in glob.glob(os.path.join(results, "ours-*.json"))}
                      | {os.path.basename(p)[4:-5].rsplit("-", 1)[0] for p in glob.glob(os.path.join(results, "ref-*.json"))},
                      key=lambda v: (ORDER.index(v) if v in ORDER else len(ORDER), v))
    for v in variants:
        data["variants"][v] = {
            "ours": _load(os.path.join(results, f"ours-{v}.json")),
            "reference": {m: _load(os.path.join(results, f"ref-{v}-{m}.json")) for m in REF_MODES
                          if m in ("disk", "gpu") or os.path.isfile(os.path.join(results, f"ref-{v}-{m}.json"))},
            "weights": _load(os.path.join(results, f"weights-{v}.json")) or {},
            "equal": {m: _load(os.path.join(results, f"equal-{v}-{m}.json")) for m in REF_MODES
                      if os.path.isfile(os.path.join(results, f"equal-{v}-{m}.json"))}}
    return data


def merge(datas: list[dict]) -> dict:
    """Several runs' bench.json (say style and coarse-fine, run as two calls) as one."""
    out = {"machine": {}, "host": {}, "variants": {}, "runs": []}
    for d in datas:
        out["machine"] = out["machine"] or d.get("machine", {})
        out["host"] = d.get("host") or out["host"]
        out["variants"].update(d.get("variants", {}))
        out["runs"].append({"date": d.get("machine", {}).get("date"), "code": d.get("machine", {}).get("code"),
                            "variants": sorted(d.get("variants", {}))})
    return out


def _timeline(cold: dict) -> str:
    """When the cold job passed its milestones, in seconds from the click."""
    marks, seen = [], set()
    for t, phase, step, total, msg in cold.get("events") or []:
        key = None
        if phase == "start" and step == 1:
            key = "worker ready"
        elif phase == "load" and step == 0 and "Checking" in (msg or ""):
            key = "job in the worker"
        elif phase == "load" and step == total:
            key = "models ready"
        elif phase == "encode" and step == total:
            key = "encoded"
        elif phase == "write" and step == total:
            key = "done"
        if key and key not in seen:
            seen.add(key)
            marks.append(f"{key} +{t:.1f}")
    return ", ".join(marks)


def _phases(runs: list[dict]) -> str:
    runs = [r for r in runs if r.get("state") == "done" and r.get("timings")]
    if not runs:
        return ""
    keys = list(runs[0]["timings"])
    med = {k: C.median([r["timings"].get(k) for r in runs]) for k in keys}
    worker = C.median([r.get("seconds") for r in runs])
    click = C.median([r.get("from_click_s") for r in runs])
    inner = sum(v for v in med.values() if v is not None)
    parts = ", ".join(f"{k} {v:.2f}" for k, v in med.items() if v is not None)
    return (f"{parts}; in the worker around the engine (images, preview, card) {worker - inner:.2f}; "
            f"service and messages {click - worker:.2f} (s, medians)")


def render(data: dict) -> tuple[str, str]:
    machine, host = data.get("machine") or {}, data.get("host") or {}
    pk = machine.get("packages", {})
    head = (f"Machine: {machine.get('gpu')} ({machine.get('gpu_memory')}), driver {machine.get('driver')}, "
            f"{machine.get('cpus')} CPUs, {C.gb(machine.get('ram_total'))} GB RAM, kernel {machine.get('kernel')}; "
            f"Python {machine.get('python')}, torch {pk.get('torch')}, diffsynth {pk.get('diffsynth')}, "
            f"transformers {pk.get('transformers')}; {machine.get('date')}")
    dr = machine.get("disk_read") or {}
    disk = (f"Disk ({dr.get('on', {}).get('fstype')} on {dr.get('on', {}).get('device')}): "
            f"{dr.get('cold_1_reader_GBps')} GB/s cold with 1 reader, {dr.get('cold_4_readers_GBps')} GB/s cold with "
            f"4 readers, {dr.get('page_cache_GBps')} GB/s from the page cache") if dr else "Disk: not measured"
    text, md = [head, disk], [f"- {head}", f"- {disk}"]
    for run in data.get("runs") or []:
        line = f"Run {run.get('date')}: {', '.join(run.get('variants') or [])}; code {run.get('code')}"
        text.append(line)
        md.append(f"- {line}")
    if not data.get("runs") and machine.get("code"):
        text.append(f"Code: {machine['code']}")
        md.append(f"- Code: {machine['code']}")
    header = ["", "ref disk", "ref gpu", "ours", "target", "vs ref disk", "vs ref gpu", ""]
    for v, vd in data.get("variants", {}).items():
        ours, refs, weights = vd.get("ours"), vd.get("reference") or {}, vd.get("weights") or {}
        rows, summary = variant_rows(v, ours, refs)
        vd["summary"] = summary
        n = (ours or {}).get("images") or next((r.get("images") for r in refs.values() if r), 5)
        spilled = sorted(r for r, w in weights.items() if isinstance(w, dict) and "spill" in (w.get("where") or []))
        title = f"{LABEL.get(v, v)}, {n} images of 1024x1024"
        sc = (ours or {}).get("scenarios") or {}
        cold = sc.get("cold") or {}
        notes = [f"page cache dropped before each cold run: {cold.get('page_cache_dropped', '?')}",
                 f"start-ahead hook at tab load: {cold.get('start_ahead_hook') or 'none (the worker starts at the click)'}"]
        sb = cold.get("standby") or {}
        if sb:
            st = sb.get("status") or {}
            notes.append(f"standby worker at WebUI start: {'ready after %.1f s' % sb['ready_after_s'] if sb.get('ready') else 'NOT ready'}"
                         f", GPU memory {C.gb(sb.get('vram')) if sb.get('vram') is not None else '?'} GB (driver's figure for its pid)"
                         f", RSS {C.gb(st.get('VmRSS'))} GB (anonymous {C.gb(st.get('RssAnon'))} GB)")
        for m, eq in (vd.get("equal") or {}).items():
            if eq:
                notes.append(f"ours = reference {m}? relative error of B·A over the LoRA {eq['relative_error']:.2e}, "
                             f"worst module {eq['worst_module']:.2e} ({eq['modules']} modules, {eq['n_missing']} missing)")
        if _timeline(cold):
            notes.append(f"ours, cold job from the click: {_timeline(cold)}; in the worker: "
                         + ", ".join(f"{k} {x:.2f}" for k, x in (cold.get("timings") or {}).items()))
        if (ours or {}).get("max_rank"):
            capped = [(f"{n} images", cold)] + [("1 image", r) for r in ((sc.get("warm_1") or {}).get("runs") or [])[:1]]
            notes.append(f"ours, rank cap {ours['max_rank']}: " + "; ".join(
                f"{label}: rank {r['rank']}, {_s(r['bytes'] / 1e6)} MB, energy kept {_s(100 * r['energy_kept'], 2)}%"
                for label, r in capped if r.get("state") == "done"))
        fresh = sc.get("cold_fresh") or {}
        if _timeline(fresh):
            notes.append(f"ours, cold job without a standby, from the click: {_timeline(fresh)}")
        if _phases((sc.get("warm") or {}).get("runs") or []):
            notes.append(f"ours, warm job ({n} images): {_phases(sc['warm']['runs'])}")
        if _phases((sc.get("warm_1") or {}).get("runs") or []):
            notes.append(f"ours, warm job (1 image): {_phases(sc['warm_1']['runs'])}")
        idle = sc.get("idle") or {}
        if idle.get("worker_status"):
            ws = idle["worker_status"]
            notes.append(f"ours, idle worker: RSS {C.gb(ws.get('VmRSS'))} GB (shared/pinned {C.gb(ws.get('RssShmem'))} GB), "
                         f"host RAM available {C.gb(idle.get('ram_available_after'))} GB")
        for m, r in refs.items():
            if r:
                notes.append(f"reference {m}: import {r.get('import_s')} s, load {r.get('load_s')} s, runs "
                             + ", ".join(f"{x['images']} img {x['total_s']:.2f}" for x in r.get("runs", []))
                             + (f"; first LoRA {_s(r.get('first_lora_s'))} s, next {_s(r.get('warm_s'), 2)} s, "
                                f"1 image {_s(r.get('warm_1_s'), 2)} s, peak VRAM {C.gb(r.get('peak_vram'))} GB"
                                if m not in ("disk", "gpu") else ""))
        if spilled:
            notes.append("held in RAM (tmpfs) because the disk was full, so read warm: " + ", ".join(spilled))
        if cold.get("state") not in (None, "done"):
            notes.append(f"ours, cold job: {cold.get('state')}: {(cold.get('error') or {}).get('message')}")
        for key in [k for k in sc if k == "low" or k.startswith("low_") or k == "ram"]:
            first = (sc[key] or {}).get("first", sc[key]) or {}
            if first.get("error"):
                det = str(first["error"].get("details") or "").strip().splitlines()
                notes.append(f"ours, {key} job: {first['error'].get('message')} {det[-1][:300] if det else ''}")
        text += ["", f"== {title}", fmt_table(rows, header)] + [f"   {x}" for x in notes]
        md += ["", f"**{title}**", "", md_table(rows, header), ""] + [f"- {x}" for x in notes]
    if host:
        h = (f"Host side: scripts/i2l_tab.py {_s(host.get('tab_import_s'), 3)} s, preload.py "
             f"{_s(host.get('preload_import_s'), 3)} s, install.py with nothing to do "
             f"{_s(host.get('install_process_s'), 3)} s as a process ({_s(host.get('install_noop_s'), 3)} s beyond "
             f"Python's start; {host.get('install_case')}); total {_s(host.get('total_added_s'), 3)} s, target <= 0.5: "
             f"{_ok(host.get('total_added_s'), 0.5)}")
        text += ["", h]
        md += ["", f"- {h}"]
    return "\n".join(text), "\n".join(md)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("results", nargs="+", help="a results folder, or bench.json files of earlier runs to merge")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    a = ap.parse_args()
    if len(a.results) == 1 and os.path.isdir(a.results[0]):
        data = load_results(a.results[0])
    else:
        data = merge([load_results(p) if os.path.isdir(p) else C.read_json(p) for p in a.results])
    text, md = render(data)
    print(text, flush=True)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        C.write_json(os.path.join(a.out, "bench.json"), data)
        with open(os.path.join(a.out, "bench.md"), "w") as f:
            f.write(md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
