"""Peak memory of concurrent jobs on one base: one Ray coordinator vs one coordinator per job.

Issue 5 (a): 4 concurrent jobs on one base should cost at most 1.3x the memory of one job. Each
scenario starts real coordinators through the CLI, creates jobs on a ~170 M parameter Llama (built
here from a config, so it runs offline), runs one real client agent per job to the end, and
samples the proportional set size (PSS: shared pages split between the processes that map them,
so the sum counts every page once) of every coordinator's whole process tree, Ray's GCS, raylet,
object store and workers included, every 0.5 s. Client processes are not counted: they are the
data owners' machines.

Scenarios, in one run:
  ray-1      one coordinator on a local Ray, one job        (the "one job" reference)
  ray-4      one coordinator on a local Ray, 4 jobs at once (the base shared through the object store)
  solo-1     one in-process coordinator, one job
  solo-4x1   4 in-process coordinators, one job each        (what running jobs separately costs)

    python benchmarks/shared_base_memory.py --out benchmarks/out/shared_base_memory
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from round_overhead import REPO, _cli, _spawn, _tail, build_model, machine, source, stop_processes

from fedtune.client.channel import INSECURE
from fedtune.data import write_synthetic_federation
from fedtune.demo import wait_for_coordinator

SPEC = """\
name: {name}
base_model: {base}
peft: {{r: {r}, alpha: {alpha}, target_modules: [{targets}]}}
training: {{steps: {steps}, lr: 0.003, batch_size: 4, max_seq_len: 64}}
rounds: {rounds}
clients_per_round: 1
min_clients: 1
cohort_wait_seconds: 0
eval_data: {eval_data}
resources: {{cpus: {cpus}}}
"""
# Different PEFT configs per job, as an operator running several tasks would.
PEFTS = [(8, "q_proj, v_proj"), (4, "q_proj, k_proj, v_proj, o_proj"), (16, "gate_proj, up_proj"), (8, "down_proj")]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "shared_base_memory")
    p.add_argument("--jobs", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--max-seq-len", type=int, default=64)
    p.add_argument("--scenarios", default="ray-1,ray-4,solo-1,solo-4x1")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------ memory
def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


def tree(pids: list[int]) -> list[int]:
    """The pids and all their descendants."""
    seen: list[int] = []
    stack = list(pids)
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.append(pid)
        stack += _children(pid)
    return seen


def _kind(pid: int) -> str:
    """A short name for what a process is: ray::JobActor, raylet, fedtune coordinator, ..."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    first = args[0].decode(errors="replace")
    if first.startswith("ray::"):
        return first.split()[0]
    if b"fedtune" in args and b"coordinator" in args:
        return "fedtune coordinator"
    return Path(first).name if not first.endswith("python3") and not first.endswith("python") else " ".join(
        a.decode(errors="replace").rsplit("/", 1)[-1] for a in args[1:3])


def pss_by_process(pids: list[int]) -> dict[int, int]:
    out: dict[int, int] = {}
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    out[pid] = int(line.split()[1]) * 1024
                    break
        except OSError:
            continue
    return out


class PeakSampler:
    """Samples the summed PSS of process trees until stopped; keeps the peak and its process count."""

    def __init__(self, roots: list[int], interval: float = 0.5) -> None:
        self.roots, self.interval = roots, interval
        self.peak, self.peak_procs, self.samples = 0, 0, 0
        self.breakdown: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            per = pss_by_process(tree(self.roots))
            value = sum(per.values())
            self.samples += 1
            if value > self.peak:
                self.peak, self.peak_procs = value, len(per)
                kinds: dict[str, int] = {}
                for pid, pss in per.items():
                    kinds[_kind(pid)] = kinds.get(_kind(pid), 0) + pss
                self.breakdown = kinds
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


# ------------------------------------------------------------------------------------ scenarios
def run_scenario(name: str, coordinators: int, jobs_each: int, ray: bool, args: argparse.Namespace, work: Path,
                 model_dir: Path, data: list[Path], eval_file: Path) -> dict[str, Any]:
    root = work / name
    root.mkdir(parents=True)
    procs: list[subprocess.Popen[bytes]] = []
    clients: list[subprocess.Popen[bytes]] = []
    started = time.time()
    try:
        states = []
        for c in range(coordinators):
            state = root / f"coordinator-{c}"
            flags = [] if ray else ["--in-process"]
            proc = _spawn(["coordinator", "start", "--state-dir", str(state), "--port", "0", "--insecure", *flags],
                          root / f"coordinator-{c}.log", None)
            procs.append(proc)
            wait_for_coordinator(state, proc, INSECURE, timeout=180)
            states.append(state)
        coord_pids = [p.pid for p in procs]
        sampler = PeakSampler(coord_pids)
        for c, state in enumerate(states):
            for j in range(jobs_each):
                k = c * jobs_each + j
                r, targets = PEFTS[k % len(PEFTS)]
                spec = root / f"job-{k}.yaml"
                spec.write_text(SPEC.format(name=f"{name}-{k}", base=model_dir, r=r, alpha=2 * r, targets=targets,
                                            steps=args.steps, rounds=args.rounds, eval_data=json.dumps(str(eval_file)),
                                            cpus=0.5))
                job = _cli("job", "create", str(spec), "--state-dir", str(state))
                token = _cli("token", "create", "--job", job, "--state-dir", str(state))
                clients.append(_spawn(["client", "run", "--coordinator", json.loads(
                    (state / "coordinator.json").read_text())["address"], "--token", token, "--data",
                    str(data[k % len(data)]), "--state-dir", str(root / f"client-{k}"), "--no-progress", "--insecure",
                    "--device", "cpu"], root / f"client-{k}.log", 1))
        for i, client in enumerate(clients):
            if client.wait(timeout=1800) != 0:
                raise SystemExit(f"{name}: client {i} failed:\n{_tail(root / f'client-{i}.log')}")
        sampler.stop()
        statuses = [json.loads(_cli("job", "list", "--format", "json", "--state-dir", str(s))) for s in states]
        finished = sum(1 for jobs in statuses for j in jobs if j["state"] == "finished")
        return {"scenario": name, "coordinators": coordinators, "jobs": coordinators * jobs_each, "ray": ray,
                "finished": finished, "peak_pss_bytes": sampler.peak, "peak_processes": sampler.peak_procs,
                "peak_breakdown_mib": {k: round(v / 2**20) for k, v in sorted(sampler.breakdown.items(),
                                                                               key=lambda kv: -kv[1])},
                "samples": sampler.samples, "seconds": time.time() - started}
    finally:
        stop_processes(clients + procs, timeout=60)


def render(result: dict[str, Any]) -> str:
    rows = {r["scenario"]: r for r in result["scenarios"]}
    gib = 2**30
    lines = [("| scenario | coordinators | jobs (finished) | peak PSS of coordinator trees | processes at peak "
             "| wall s |"), "|---|---|---|---|---|---|"]
    for r in result["scenarios"]:
        lines.append(f"| {r['scenario']} | {r['coordinators']} | {r['jobs']} ({r['finished']}) | "
                     f"{r['peak_pss_bytes'] / gib:.2f} GiB | {r['peak_processes']} | {r['seconds']:.0f} |")
    if "ray-1" in rows and "ray-4" in rows:
        ratio = rows["ray-4"]["peak_pss_bytes"] / rows["ray-1"]["peak_pss_bytes"]
        lines.append(f"\n4 jobs on one Ray coordinator / 1 job on it: **{ratio:.2f}x** (goal <= 1.3x: "
                     f"{'met' if ratio <= 1.3 else 'NOT met'})")
    if "ray-4" in rows and "solo-4x1" in rows:
        lines.append(f"4 jobs on one Ray coordinator / 4 separate in-process coordinators: "
                     f"{rows['ray-4']['peak_pss_bytes'] / rows['solo-4x1']['peak_pss_bytes']:.2f}x")
    if "solo-1" in rows and "solo-4x1" in rows:
        lines.append(f"4 separate coordinators / 1 in-process coordinator: "
                     f"{rows['solo-4x1']['peak_pss_bytes'] / rows['solo-1']['peak_pss_bytes']:.2f}x")
    for r in result["scenarios"]:
        top = ", ".join(f"{k} {v}" for k, v in list(r["peak_breakdown_mib"].items())[:6])
        lines.append(f"\n{r['scenario']} at its peak (MiB): {top}")
    m = result["model"]
    lines.append(f"\nBase: Llama, {m['params'] / 1e6:.0f} M parameters ({m['dir_bytes'] / 2**20:.0f} MiB fp32), "
                 f"hidden {m['hidden']}, {m['layers']} layers; {result['args']['rounds']} rounds, "
                 f"{result['args']['steps']} local steps, one client per job, eval data on the coordinator.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = args.out.resolve()
    work = out / "work"
    if work.exists():
        subprocess.run(["rm", "-rf", str(work)], check=True)
    work.mkdir(parents=True)
    model_dir = out / "model"
    if not (model_dir / "config.json").exists():
        model_info = build_model(args, model_dir)
        (out / "model.json").write_text(json.dumps(model_info))
    model_info = json.loads((out / "model.json").read_text())
    data, eval_file = write_synthetic_federation(work / "data", args.jobs, examples_per_client=32, eval_examples=32)
    plan = {"ray-1": (1, 1, True), "ray-4": (1, args.jobs, True), "solo-1": (1, 1, False),
            "solo-4x1": (args.jobs, 1, False)}
    results = []
    for name in args.scenarios.split(","):
        coordinators, jobs_each, ray = plan[name]
        print(f"scenario {name}: {coordinators} coordinator(s) x {jobs_each} job(s), ray={ray}", flush=True)
        results.append(run_scenario(name, coordinators, jobs_each, ray, args, work, model_dir, data, eval_file))
        print(f"  peak PSS {results[-1]['peak_pss_bytes'] / 2**30:.2f} GiB", flush=True)
    result = {"date": datetime.now().isoformat(timespec="seconds"), "machine": machine(), "source": source(),
              "args": {k: str(v) for k, v in vars(args).items()} | {"rounds": args.rounds, "steps": args.steps},
              "model": model_info, "scenarios": results}
    (out / "shared_base_memory.json").write_text(json.dumps(result, indent=2))
    text = render(result)
    (out / "shared_base_memory.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
