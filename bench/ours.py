"""Ours: the product's own path, timed the way a user meets it.

This process plays the WebUI: it imports only the host side (``i2l_ext.service``, no torch) and
drives ``Service`` with ``Config`` and ``JobRequest`` exactly as the tab does; the work happens in
the worker process (``python -m i2l_ext.worker``) that the service starts.

    python3 bench/ours.py --models DIR --lora DIR --variant style --images a.png,... --out ours.json
        [--profile auto] [--low-profile disk] [--cap-gb 8[,12]] [--ram-gb 32] [--click-delay 5] [--reps 3]
        [--idle-wait 20] [--no-low] [--low-jobs 2] [--no-restart] [--cold-only] [--config key=value ...]
        [--worker-env K=V ...] [--max-rank R]

Scenarios, in this order, each one's figures in the JSON:

0. **WebUI start**: the service is made and, if it offers ``standby`` (a worker started ahead of
   need, as the WebUI's app-started callback does), that is called and waited for (up to
   ``--standby-wait`` s): its GPU memory (driver's figure) and RAM are recorded. ``--no-standby``
   skips it.
1. ``cold``: page cache dropped, then **tab load** (a ``Service`` is made, and if the service
   offers a start-ahead hook -- ``prepare``/``prewarm``/``warm_up``/``prestart``/``preload`` --
   it is called as the tab would on load), then after ``--click-delay`` s (only when such a hook
   exists) the **click**: ``Service.start(request)``, which checks the inputs and hands the job
   to the worker. The job ends when its result arrives (LoRA, card and preview in place).
   Reported: from click, and from tab load.
2. ``warm``: the same request again, ``--reps`` times back to back (the next LoRA on a warm
   worker); then with the first image only.
3. ``idle``: right after the last warm job the worker's GPU memory (the driver's figure for its
   pid: context, cache and all) is sampled for up to ``--idle-wait`` s, to see what it holds
   between jobs and when it parks; with the host's free RAM and the worker's RSS.
4. ``after_idle``: one more job after that wait (parked weights coming back, or a new worker).
   ``park``: right after it, ``Service.park()``, what the WebUI calls before it generates (its
   time, what it freed, the worker's GPU memory after it).
5. ``restart``: the worker is shut down (the "worker gone" choice) and, as the service does when
   its idle timeout passes, a standby worker started (unless ``--no-standby``); once that is
   ready, one job. The code files are still in the page cache; the weights are not (they are
   read with O_DIRECT) and come from the disk again.
6. ``cold_fresh`` (unless ``--no-fresh``): as ``cold`` with a new service and no standby (the
   worker starts at tab load: a click right after the WebUI started).
7. ``low``: a new service whose worker runs under a VRAM cap of ``--cap-gb`` GB (2**30 bytes):
   ``torch.cuda.set_per_process_memory_fraction`` is set in the worker when it starts
   (the product's own ``vram_limit_gb`` setting, which also sizes the engine to it); page cache dropped; a job with ``--low-profile``, then a second.
   With several caps (``--cap-gb 8,12``), one such service per cap (``low``, then ``low_12``...).
8. ``ram`` (with ``--ram-gb``): a new service whose worker may take that much RAM: a memory
   control group with that limit when this machine lets one be made (the worker, started from
   here, is in it, and finds the limit itself, as in a container), else the product's
   ``ram_limit_gb`` setting; page cache dropped; one job with the default profile. Recorded: the
   profile chosen, the time, and the worker's peak RSS (``VmHWM``) and the group's peak usage.

``--max-rank R`` gives every job the rank cap R (``JobRequest.max_rank``); each job's record then
has the LoRA's rank, its bytes and ``energy_kept``, the share of the LoRA's energy the cap kept.

Peak VRAM of each job: the worker's own ``peak_vram`` (``torch.cuda.max_memory_allocated``, as
the reference) and the driver's per-process peak sampled every 50 ms.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import common as C  # noqa: E402

T_IMPORT = time.perf_counter()
from i2l_ext.settings import Settings  # noqa: E402
from i2l_ext.service import JobRequest, Service  # noqa: E402
T_IMPORT = time.perf_counter() - T_IMPORT

PREPARE_HOOKS = ("prepare", "prewarm", "warm_up", "prestart", "preload")
STATS_HOOKS = ("stats", "worker_stats")
HELD_TARGET = int(1.5 * C.GiB)


def _kwargs_for(fn, **kw):
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {}
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return kw
    return {k: v for k, v in kw.items() if k in params}


class Bench:
    def __init__(self, a):
        self.a = a
        self.images = a.images.split(",")
        self.n = 0
        self.out: dict = {"variant": a.variant, "images": len(self.images), "profile": a.profile,
                          "low_profile": a.low_profile, "cap_gb": a.caps, "click_delay_s": a.click_delay,
                          "max_rank": a.max_rank,
                          "host_import_s": round(T_IMPORT, 3), "scenarios": {}}

    # -- set-up ---------------------------------------------------------------------------------
    def config(self, cap_gb: float = 0.0, standby: bool = True) -> Settings:
        env = {"PYTHONPATH": os.pathsep.join([ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
        for kv in self.a.worker_env:
            k, _, v = kv.partition("=")
            env[k] = v
        python = self.a.python or sys.executable
        cfg = Settings(models_dir=self.a.models, lora_dir=self.a.lora, worker_python=python, worker_env_vars=env,
                       keep_warm_minutes=60.0, vram_limit_gb=cap_gb,
                       trace=self.a.trace, standby=standby and not self.a.no_standby)
        fields = {f.name for f in dataclasses.fields(Settings)}
        applied, ignored = {}, []
        for kv in self.a.config:
            k, _, v = kv.partition("=")
            try:
                val = json.loads(v)
            except ValueError:
                val = v
            if k in fields:
                setattr(cfg, k, val)
                applied[k] = val
            else:
                ignored.append(k)
        self.out["config_applied"], self.out["config_ignored"] = applied, ignored
        return cfg

    def request(self, images=None, profile=None) -> JobRequest:
        self.n += 1
        return JobRequest(images=list(images or self.images), name=f"bench_{self.a.variant}_{self.n}",
                          variant=self.a.variant, vram_profile=profile or self.a.profile, overwrite=True,
                          max_rank=self.a.max_rank)

    # -- one job ----------------------------------------------------------------------------------
    def job(self, svc: Service, req: JobRequest, keep_events: bool = False) -> dict:
        t_click = C.now()
        job = svc.start(req)
        events = []
        with C.VramSampler(svc.worker_pid, interval=self.a.sample_ms / 1000) as vs:
            for ev in job.events(timeout=None):
                t = round(C.now() - t_click, 3)
                if keep_events and ev.get("type") == "progress":
                    events.append((t, ev.get("phase"), ev.get("step"), ev.get("total"), str(ev.get("text"))))
            job.wait()
        t_done = C.now()
        rec = {"from_click_s": round(t_done - t_click, 3), "state": job.state, "images": len(req.images),
               "profile_requested": req.vram_profile, "driver_peak": vs.peak or None, "samples": vs.samples}
        if job.result:
            r = dict(job.result.to_dict(), **job.result.extra)
            rec.update({k: r.get(k) for k in ("seconds", "timings", "peak_vram", "profile", "keys", "rank", "bytes",
                                              "device", "dtype", "energy_kept")})
            for k in r:
                if k.startswith(("stat", "vram", "ram", "load", "weights")) and k not in rec:
                    rec[k] = r[k]
        if job.error is not None:
            rec["error"] = {"code": job.error.code, "message": job.error.message, "fix": job.error.fix,
                            "details": str(job.error.details)[-4000:]}
        if keep_events:
            rec["events"] = events
            rec["log"] = job.log_lines(last=80)
        if job.result and self.a.keep_first and not os.path.exists(self.a.keep_first) \
                and len(req.images) == len(self.images):
            shutil.copyfile(job.result.path, self.a.keep_first)     # the first full LoRA, for bench/compare.py
        self._cleanup_output(job)
        print(f"  job {req.name}: {rec['state']} in {rec['from_click_s']} s"
              + (f", peak {C.gb(rec.get('peak_vram'))} GB" if rec.get("peak_vram") else "")
              + (f", profile {rec.get('profile')}" if rec.get("profile") else "")
              + (f"  [{rec['error']['message'][:200]}]" if "error" in rec else ""), flush=True)
        return rec

    @staticmethod
    def _cleanup_output(job) -> None:
        r = job.result
        for k in ("path", "sidecar", "preview"):
            p = getattr(r, k, None)
            if p and os.path.isfile(p):
                try:
                    os.remove(p)
                except OSError:
                    pass

    def stats(self, svc: Service) -> dict | None:
        for name in STATS_HOOKS:
            fn = getattr(svc, name, None)
            if callable(fn):
                try:
                    return {"hook": name, "value": fn()}
                except Exception as e:   # recorded, not fatal
                    return {"hook": name, "error": repr(e)}
        return None

    # -- scenarios --------------------------------------------------------------------------------
    def drop(self) -> bool:
        return False if self.a.no_drop else C.drop_caches()

    def webui_start(self, svc: Service) -> dict | None:
        """The WebUI started a while before anyone opens the tab: the service's standby hook, called
        as the app-started callback does, and waited for."""
        fn = getattr(svc, "standby", None)
        if self.a.no_standby or not callable(fn):
            return None
        t0 = C.now()
        started = fn()
        pid = svc.standby_pid() if hasattr(svc, "standby_pid") else None
        ready = bool(svc.standby_ready(self.a.standby_wait)) if started and hasattr(svc, "standby_ready") else False
        took = C.now() - t0
        time.sleep(1.0)
        rec = {"started": bool(started), "pid": pid, "ready": ready, "ready_after_s": round(took, 3) if ready else None,
               "vram": C.process_vram(pid), "device_used": C.device_used(), "status": C.proc_status(pid)}
        print(f"  WebUI start: standby {'ready after %.1f s' % took if ready else 'NOT ready'}, "
              f"VRAM {C.gb(rec['vram'])} GB, RSS {C.gb(rec['status'].get('VmRSS'))} GB", flush=True)
        return rec

    def cold(self, fresh: bool = False) -> Service:
        svc = Service(self.config(standby=not fresh))
        standby = None if fresh else self.webui_start(svc)
        dropped = self.drop()
        t_tab = C.now()
        wall_tab = time.time()
        hook = None
        for name in PREPARE_HOOKS:
            fn = getattr(svc, name, None)
            if callable(fn):
                hook = name
                fn(**_kwargs_for(fn, variant=self.a.variant, vram_profile=self.a.profile, bias=None,
                                 images=self.images))
                break
        t_hook = C.now() - t_tab
        if hook and self.a.click_delay > 0:
            time.sleep(max(0.0, self.a.click_delay - (C.now() - t_tab)))
        delay = C.now() - t_tab
        rec = self.job(svc, self.request(), keep_events=True)
        rec.update({"page_cache_dropped": dropped, "start_ahead_hook": hook, "hook_call_s": round(t_hook, 3),
                    "click_after_tab_load_s": round(delay, 3), "tab_load_unix": round(wall_tab, 3),
                    "from_tab_load_s": round(delay + rec["from_click_s"], 3), "standby": standby})
        self.out["scenarios"]["cold_fresh" if fresh else "cold"] = rec
        return svc

    def warm(self, svc: Service) -> None:
        five = [self.job(svc, self.request()) for _ in range(self.a.reps)]
        one = [self.job(svc, self.request(self.images[:1])) for _ in range(self.a.reps)]
        self.out["scenarios"]["warm"] = {
            "runs": five, "median_s": C.median([r["from_click_s"] for r in five if r["state"] == "done"]),
            "min_s": min((r["from_click_s"] for r in five if r["state"] == "done"), default=None)}
        self.out["scenarios"]["warm_1"] = {
            "runs": one, "median_s": C.median([r["from_click_s"] for r in one if r["state"] == "done"]),
            "min_s": min((r["from_click_s"] for r in one if r["state"] == "done"), default=None)}

    def held(self, pid) -> tuple[int | None, int | None]:
        """(the worker's GPU memory per the driver, the whole GPU's use minus what it was before any
        worker ran). The second stands in where the driver lists no per-process figure."""
        v = C.process_vram(pid)
        d = C.device_used()
        base = self.out.get("device_used_before")
        dv = None if d is None or base is None else max(0, d - base)
        if not v and dv:
            v = dv
        return v, dv

    def idle(self, svc: Service) -> None:
        pid = svc.worker_pid()
        mem0 = C.meminfo().get("MemAvailable")
        series, dseries, t0, parked_at = [], [], C.now(), None
        while C.now() - t0 < self.a.idle_wait:
            alive = svc.worker_pid() == pid and pid is not None
            v, dv = self.held(pid) if alive else (0, None)
            t = round(C.now() - t0, 2)
            series.append((t, v))
            dseries.append((t, dv))
            if parked_at is None and v is not None and v <= HELD_TARGET:
                parked_at = t
            if parked_at is not None and t - parked_at >= 2.0:
                break
            time.sleep(0.25)
        rec = {"pid": pid, "worker_alive": svc.worker_pid() == pid and pid is not None,
               "held_right_after_job": series[0][1] if series else None,
               "held_idle": series[-1][1] if series else None, "at_or_under_1_5GB_after_s": parked_at,
               "series": series[:: max(1, len(series) // 40)],
               "device_series": dseries[:: max(1, len(dseries) // 40)],
               "ram_available_before": mem0, "ram_available_after": C.meminfo().get("MemAvailable"),
               "worker_status": C.proc_status(pid), "stats": self.stats(svc)}
        self.out["scenarios"]["idle"] = rec
        print(f"  idle: worker holds {C.gb(rec['held_right_after_job'])} GB after the job, {C.gb(rec['held_idle'])} GB "
              f"after {series[-1][0] if series else 0} s", flush=True)
        after = self.job(svc, self.request())
        held = rec["held_idle"]
        after["came_back_from"] = ("gone" if not rec["worker_alive"] else "unknown" if held is None
                                   else "parked" if held <= HELD_TARGET else "weights still on the GPU")
        self.out["scenarios"]["after_idle"] = after
        self.park(svc)

    def park(self, svc: Service) -> None:
        """The WebUI starts generating right after a job: the worker lets go of what it kept."""
        fn = getattr(svc, "park", None)
        pid = svc.worker_pid()
        if not callable(fn) or pid is None:
            return
        before = self.held(pid)[0]
        t = C.now()
        reply = fn()
        took = C.now() - t
        time.sleep(0.3)
        after = self.held(pid)[0]
        self.out["scenarios"]["park"] = {"seconds": round(took, 3), "held_before": before, "held_after": after,
                                         "freed": (reply or {}).get("freed"), "reply": reply}
        print(f"  park: {took:.3f} s, {C.gb(before)} -> {C.gb(after)} GB", flush=True)

    def restart(self, svc: Service) -> None:
        """The idle timeout passed (the "worker gone" choice): as the service does then, the
        worker stops and a standby worker takes its place (unless ``--no-standby``); one job once
        that is ready (its weights come from the disk again)."""
        svc.slots[0]._idle()          # as the idle timeout does: the worker stops, a standby starts
        waited = None
        if not self.a.no_standby and hasattr(svc, "standby") and svc.standby():
            t = C.now()
            if svc.standby_ready(120):
                waited = round(C.now() - t, 2)
        rec = self.job(svc, self.request())
        rec["page_cache"] = "warm"
        rec["standby_ready_after_s"] = waited
        self.out["scenarios"]["restart"] = rec

    def low(self, cap_gb: float, name: str) -> None:
        dropped = self.drop()
        svc = Service(self.config(cap_gb=cap_gb, standby=False))
        try:
            first = self.job(svc, self.request(profile=self.a.low_profile), keep_events=True)
            first["page_cache_dropped"] = dropped
            second = None
            if first["state"] == "done" and self.a.low_jobs > 1:
                second = self.job(svc, self.request(profile=self.a.low_profile))
        finally:
            svc.shutdown()
        self.out["scenarios"][name] = {"first": first, "second": second, "cap_gb": cap_gb}

    def ram(self) -> None:
        gb = self.a.ram_gb
        group = C.memory_cgroup("i2l-bench", int(gb * C.GiB))
        dropped = self.drop()
        cfg = self.config(standby=False)
        if group is None:
            cfg.ram_limit_gb = gb
        svc = Service(cfg)
        rec = {}
        try:
            with C.in_cgroup(group):          # the worker the job starts is in the group too
                rec = self.job(svc, self.request(), keep_events=True)
            rec["worker_status"] = C.proc_status(svc.worker_pid())
        finally:
            svc.shutdown()
            rec.update({"ram_gb": gb, "limited_by": "control group" if group else "ram_limit_gb setting",
                        "group_peak": C.cgroup_peak(group), "page_cache_dropped": dropped})
            C.remove_cgroup(group)
        self.out["scenarios"]["ram"] = rec
        print(f"  RAM {gb:g} GB ({rec['limited_by']}): {rec.get('state')}, profile {rec.get('profile')}, worker peak RSS "
              f"{C.gb(rec.get('worker_status', {}).get('VmHWM'))} GB, group peak {C.gb(rec.get('group_peak'))} GB", flush=True)

    def run(self) -> dict:
        self.out["device_used_before"] = C.device_used()
        print(f"ours: {self.a.variant}, {len(self.images)} images, profile {self.a.profile}", flush=True)
        svc = self.cold()
        try:
            if self.out["scenarios"]["cold"]["state"] == "done" and not self.a.cold_only:
                self.warm(svc)
                self.idle(svc)
                if not self.a.no_restart:
                    self.restart(svc)
        finally:
            svc.shutdown()
        if not self.a.no_fresh and not self.a.cold_only and not self.a.no_standby:
            time.sleep(1.0)
            fresh = self.cold(fresh=True)
            fresh.shutdown()
        if not self.a.no_low and not self.a.cold_only:
            for i, cap in enumerate(self.a.caps):
                time.sleep(1.0)
                self.low(cap, "low" if i == 0 else f"low_{cap:g}")
        if self.a.ram_gb and not self.a.cold_only:
            time.sleep(1.0)
            self.ram()
        return self.out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", required=True)
    ap.add_argument("--lora", required=True)
    ap.add_argument("--keep-first", help="copy the first LoRA of all the images here (for bench/compare.py)")
    ap.add_argument("--variant", default="style")
    ap.add_argument("--images", required=True)
    ap.add_argument("--out", default=None)
    ap.add_argument("--profile", default="auto")
    ap.add_argument("--low-profile", default="cpu_offload")
    ap.add_argument("--cap-gb", default="8", help="VRAM caps for the low scenario, e.g. 8,12")
    ap.add_argument("--ram-gb", type=float, default=0.0, help="the RAM-limited scenario's limit (0: none)")
    ap.add_argument("--click-delay", type=float, default=5.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--idle-wait", type=float, default=20.0)
    ap.add_argument("--no-low", action="store_true")
    ap.add_argument("--no-restart", action="store_true")
    ap.add_argument("--cold-only", action="store_true", help="only the cold scenario (start-up A/B runs)")
    ap.add_argument("--no-drop", action="store_true", help="leave the page cache alone")
    ap.add_argument("--no-standby", action="store_true", help="no worker started at 'WebUI start' (Config.standby off)")
    ap.add_argument("--standby-wait", type=float, default=120.0, help="how long the standby may take to be ready")
    ap.add_argument("--no-fresh", action="store_true", help="skip the cold run without a standby")
    ap.add_argument("--sample-ms", type=float, default=50.0,
                    help="the driver's per-process VRAM polled this often during jobs (0: not at all)")
    ap.add_argument("--low-jobs", type=int, default=2, help="jobs under the VRAM cap (1 or 2)")
    ap.add_argument("--python", default=None, help="the worker's Python (default: this one)")
    ap.add_argument("--config", action="append", default=[], help="Config field=JSON value (if the field exists)")
    ap.add_argument("--worker-env", action="append", default=[], help="K=V for the worker's environment")
    ap.add_argument("--trace", default=None, help="the worker appends its start-up steps to this file")
    ap.add_argument("--max-rank", type=int, default=None, help="every job's rank cap (default: none)")
    a = ap.parse_args()
    a.caps = [float(x) for x in str(a.cap_gb).split(",") if x.strip()]
    os.makedirs(a.lora, exist_ok=True)
    res = Bench(a).run()
    if a.out:
        C.write_json(a.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
