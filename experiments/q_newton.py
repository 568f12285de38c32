"""Q-Newton at small scale: Newton steps with a classical/quantum solver scheduler vs SGD and AdamW.

    .venv/bin/python experiments/q_newton.py [--problems digits lora] [--out runs/experiments/q_newton]

**No quantum computer is used.** The quantum linear solver is a cost model; every solve runs
classically. Q-Newton's time is reported as *measured classical time* plus *modelled quantum
time*, the two shown apart.

(a) ``digits``: an MLP 64-16-10 (tanh, float64) on scikit-learn's digits (1,437 train / 360 test),
    full batch. AdamW and SGD take ``--fo-steps``; Newton and Q-Newton take ``fo-steps / 5``, with
    the GGN per tensor, damping 0.01 max|G_ij| and a trust radius (``max_step_norm``): without one
    the full block-diagonal Gauss-Newton step diverges from this initialisation (measured).
(b) ``lora`` (experiments/q_newton_lora.py): a rank-2 LoRA on q/v of the last two layers of the
    bundled SmolLM2-135M on ``family_relation``, full batch of ``--lora-pool`` training examples;
    accuracy on ``--n`` test examples. The same 5x step ratio. Newton and Q-Newton use the
    Gauss-Newton matrix of the answer tokens' cross-entropy, Hessian-free, with Levenberg-Marquardt
    damping; the initial λ and the Krylov dimension are chosen on a validation pool.

For every run: the loss after each step, measured seconds per step, κ per block and step, the
scheduler's decisions, the fraction of solves sent to the quantum solver. Q-Newton's time is also
re-accounted under several gate times, with and without state preparation and tomography readout
(the decision rule re-applied to the logged systems). Final accuracies are compared on the same
examples with McNemar's exact test (n stated). Writes ``<out>/results.json``, ``<out>/q_newton.png``
and prints the markdown for docs/results.md. ``--problems hhl`` (needs ``expertkit[quantum]``) runs
an HHL circuit on qiskit-aer's statevector simulator for N = 8 systems of growing κ and writes
``<out>/hhl.json``: the solution fidelity and the post-selection probability (~1/κ² worst case).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from expertkit.optim.newton import NewtonOptimizer, NewtonParams
from expertkit.optim.newton.costs import measure_flop_rate
from expertkit.optim.newton.scheduler import Scheduler, System

from q_newton_lora import add_arguments as lora_args  # noqa: E402  (experiments/ is the script's folder)
from q_newton_lora import lora_problem

GATE_TIMES = {"1 us (error-corrected gate, optimistic today)": 1e-6, "1 ns": 1e-9,
              "1 as (the paper's attosecond hypothesis)": 1e-18}


def mcnemar(a: list[bool], b: list[bool]) -> dict[str, Any]:
    """Exact McNemar test of two systems' per-example correctness on the same examples."""
    from scipy.stats import binomtest

    only_a = sum(x and not y for x, y in zip(a, b, strict=True))
    only_b = sum(y and not x for x, y in zip(a, b, strict=True))
    p = binomtest(only_a, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
    return {"n": len(a), "only_first": only_a, "only_second": only_b, "p": float(p)}


# ---------------------------------------------------------------------------------------- runs
def run_optimizer(name: str, steps: int, lr: float, params: list[torch.nn.Parameter], names: list[str],
                  model: Any, loss_once: Any, step_newton: Any, evaluate: Any, hp: dict[str, Any]) -> dict[str, Any]:
    """Train with ``name`` for ``steps``; record loss/time/κ per step and the final evaluation."""
    rec: dict[str, Any] = {"optimizer": name, "steps": steps, "lr": lr, "loss": [], "seconds": [],
                           "quantum_model_s": [], "kappa_median": [], "quantum_fraction": []}
    if name in ("newton", "q-newton", "newton-ef"):
        opt = NewtonOptimizer(params, NewtonParams(**hp), quantum=name == "q-newton", names=names, model=model)
    else:
        cls = torch.optim.AdamW if name == "adamw" else torch.optim.SGD
        opt = cls(params, lr=lr, **({"momentum": 0.9} if name == "sgd" else {}))
    for _ in range(steps):
        t0 = time.perf_counter()
        if isinstance(opt, NewtonOptimizer):
            loss = step_newton(opt, lr)
            h = opt.history[-1]
            rec["seconds"].append(h["classical_s"])
            rec["quantum_model_s"].append(h["quantum_model_s"])
            rec["kappa_median"].append(h["kappa_median"])
            rec["quantum_fraction"].append(h["quantum_solves"] / max(h["solves"], 1))
        else:
            opt.zero_grad(set_to_none=True)
            out = loss_once()
            out.backward()
            opt.step()
            loss = float(out.detach())
            rec["seconds"].append(time.perf_counter() - t0)
        rec["loss"].append(loss)
    with torch.no_grad():
        rec["final_loss"] = float(loss_once())
    rec["eval"] = evaluate()
    if isinstance(opt, NewtonOptimizer):
        rec["decisions"] = [d.as_dict() for d in opt.decisions]
    return rec


def digits_problem(args: argparse.Namespace) -> dict[str, Any]:
    """(a) the MLP on scikit-learn's digits."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X / 16.0, y, test_size=0.2, random_state=0, stratify=y)
    Xtr, Xte = torch.tensor(Xtr), torch.tensor(Xte)  # (1437, 64), (360, 64) float64
    ytr, yte = torch.tensor(ytr), torch.tensor(yte)
    ce = torch.nn.CrossEntropyLoss()
    out: dict[str, Any] = {"n_train": len(ytr), "n_test": len(yte), "runs": {}}
    newton_steps = args.fo_steps // 5
    for name in ("sgd", "adamw", "newton", "q-newton"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.Tanh(), torch.nn.Linear(16, 10)).double()
        named = list(model.named_parameters())
        params, names = [p for _, p in named], [n for n, _ in named]

        def evaluate(model: Any = model) -> dict[str, Any]:
            with torch.no_grad():
                correct = (model(Xte).argmax(1) == yte).tolist()
            return {"accuracy": sum(correct) / len(correct), "n": len(correct), "correct": correct}

        newton = name in ("newton", "q-newton")
        hp = {"curvature": args.curvature, "verbose": False, "flop_rate": args.flop_rate, "damping_rel": 0.01,
              "row_keep": args.row_keep, "gate_time": args.gate_time, "max_step_norm": args.trust}
        out["runs"][name] = run_optimizer(
            name, newton_steps if newton else args.fo_steps, {"sgd": 0.5, "adamw": 0.01}.get(name, 1.0),
            params, names, model, lambda model=model: ce(model(Xtr), ytr),
            lambda opt, lr, model=model: opt.step_problem(model, ce, Xtr, ytr, lr), evaluate, hp)
        print(f"digits {name}: final loss {out['runs'][name]['final_loss']:.4f}, "
              f"test acc {out['runs'][name]['eval']['accuracy']:.3f}", flush=True)
    return out


def hhl_problem(args: argparse.Namespace) -> dict[str, Any]:
    """(c) HHL on the statevector simulator: fidelity and success probability against κ (N = 8)."""
    import numpy as np

    from expertkit.optim.newton.hhl import hhl_solve

    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((8, 8)))
    rows = []
    for kappa in (2, 4, 8, 16, 32, 64):
        a = q @ np.diag(np.geomspace(1.0, kappa, 8)) @ q.T
        a = 0.5 * (a + a.T)
        for clock in (4, 7):
            for which, b in (("top eigenvector (worst case)", q[:, 7]), ("random b", rng.standard_normal(8))):
                r = hhl_solve(a, b, clock_qubits=clock)
                rows.append({"kappa": kappa, "clock_qubits": clock, "b": which, "fidelity": r.fidelity,
                             "success_probability": r.success_probability, "qubits": r.qubits})
                print(f"hhl κ={kappa} m={clock} {which}: fidelity {r.fidelity:.4f}, p {r.success_probability:.3g}",
                      flush=True)
    return {"n": 8, "rows": rows}


# ---------------------------------------------------------------------------------------- analysis
def scenarios(run: dict[str, Any], flop_rate: float) -> dict[str, Any]:
    """Q-Newton's total time re-accounted per gate time, with and without preparation + readout.

    Per solve the scheduler's rule is re-applied to the logged system; a classical choice is charged
    the measured solve time, a quantum one the modelled time. Everything else in a step (gradient,
    curvature, spectra, sparsification) is charged its measured time. A matrix-free block's oracle
    query is charged its logged operator product (``oracle_cost: row``, the default); where a run has
    such blocks, the gate-only model (``oracle_cost: gate``, a query = one gate) is re-accounted too,
    under keys ending in ``[gate-only oracle]``.
    """
    solve_s = sum(d["measured_s"] for d in run["decisions"])
    overhead = sum(run["seconds"]) + sum(d["measured_s"] for d in run["decisions"] if d["chosen"] == "quantum")
    overhead -= solve_s
    out: dict[str, Any] = {"measured_total_s": overhead + solve_s, "solve_share": solve_s / (overhead + solve_s)}
    matrix_free = any("cholesky" not in d["predicted_s"] for d in run["decisions"])
    for oracle, (label, gate), readout in itertools.product(("row", "gate") if matrix_free else ("row",),
                                                            GATE_TIMES.items(), (False, True)):
        hp = NewtonParams(gate_time=gate, readout=readout, state_prep=readout, flop_rate=flop_rate,
                          quantum_model="qnewton", oracle_cost=oracle, verbose=False)
        sched, q_s, c_s, nq = Scheduler(hp, quantum=True, flop_rate=flop_rate), 0.0, 0.0, 0
        for d in run["decisions"]:
            kq = math.inf if d["kappa_q"] == "inf" else d["kappa_q"]
            k = math.inf if d["kappa"] == "inf" else d["kappa"]
            dense = "cholesky" in d["predicted_s"]
            matvec = None if dense else d["quantum_detail"].get("query_s")  # one logged operator product
            dec = sched.decide(System(d["block"], d["n"], dense, k, kq, d["d"], d["alpha"], d["n"] ** 2, matvec),
                               d["step"])
            if dec.chosen == "quantum":
                q_s, nq = q_s + dec.predicted_s["quantum"], nq + 1
            else:
                c_s += d["measured_s"]
        key = f"{label}{' + prep + readout' if readout else ''}{' [gate-only oracle]' if oracle == 'gate' else ''}"
        out[key] = {"classical_s": overhead + c_s, "quantum_model_s": q_s,
                    "quantum_fraction": nq / max(len(run["decisions"]), 1)}
    return out


def steps_to_reach(losses: list[float], final: float, target: float) -> int | None:
    """First step count after which the loss is <= target (losses[i] is the loss before step i+1)."""
    seq = losses[1:] + [final]
    return next((i + 1 for i, v in enumerate(seq) if v <= target), None)


def summarize(name: str, prob: dict[str, Any], flop_rate: float) -> dict[str, Any]:
    """Steps-to-AdamW-loss, paired tests, time accounts for one problem."""
    runs = prob["runs"]
    target = runs["adamw"]["final_loss"]
    s: dict[str, Any] = {"adamw_final_loss": target, "adamw_steps": runs["adamw"]["steps"]}
    for k, r in runs.items():
        s[k] = {"final_loss": r["final_loss"], "steps": r["steps"], "accuracy": r["eval"]["accuracy"],
                "n": r["eval"]["n"], "seconds": sum(r["seconds"]),
                "steps_to_adamw_loss": steps_to_reach(r["loss"], r["final_loss"], target)}
    for k in ("newton", "q-newton"):
        reach = s[k]["steps_to_adamw_loss"]
        s[k]["goal_5x_fewer_steps_met"] = reach is not None and reach * 5 <= runs["adamw"]["steps"]
        s[k]["mcnemar_vs_adamw"] = mcnemar(runs[k]["eval"]["correct"], runs["adamw"]["eval"]["correct"])
        s[k]["scenarios"] = scenarios(runs[k], flop_rate)
        ks = [x for x in runs[k]["kappa_median"] if x is not None]
        s[k]["kappa_median_first_last"] = [ks[0], ks[-1]] if ks else None
        s[k]["quantum_fraction"] = sum(runs[k]["quantum_fraction"]) / max(len(runs[k]["quantum_fraction"]), 1)
    s["newton_vs_qnewton_mcnemar"] = mcnemar(runs["q-newton"]["eval"]["correct"], runs["newton"]["eval"]["correct"])
    return s


def plot(results: dict[str, Any], path: Path) -> None:
    """Loss vs step and vs measured time, κ over training, per problem."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probs = [p for p in ("digits", "lora") if p in results]
    fig, axes = plt.subplots(len(probs), 3, figsize=(15, 4 * len(probs)), squeeze=False)
    for row, p in zip(axes, probs, strict=True):
        for name, r in results[p]["runs"].items():
            losses = r["loss"][1:] + [r["final_loss"]]
            row[0].plot(range(1, len(losses) + 1), losses, label=name)
            row[1].plot(list(_cumsum(r["seconds"])), losses, label=f"{name} (measured classical s)")
            if name in ("newton", "q-newton"):
                ks = [k if k is not None else float("nan") for k in r["kappa_median"]]
                row[2].plot(range(1, len(ks) + 1), ks, marker="o", label=name)
        row[0].set(title=f"{p}: loss vs step", xlabel="step", ylabel="loss", yscale="log")
        row[1].set(title=f"{p}: loss vs measured time", xlabel="seconds", yscale="log")
        row[2].set(title=f"{p}: median κ of the damped blocks", xlabel="step", yscale="log")
        for ax in row:
            ax.legend(fontsize=7)
    fig.suptitle("Q-Newton: the quantum solver is a cost model; every solve ran classically", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def _cumsum(xs: list[float]) -> list[float]:
    out, t = [], 0.0
    for x in xs:
        t += x
        out.append(t)
    return out


def main() -> None:
    """Run the problems, write results.json and the plot, print the summary."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", nargs="+", default=["digits", "lora"], choices=["digits", "lora", "hhl"])
    ap.add_argument("--fo-steps", type=int, default=200, help="AdamW/SGD steps on digits (Newton: / 5)")
    ap.add_argument("--trust", type=float, default=2.0, help="max_step_norm of the digits Newton runs")
    lora_args(ap)
    ap.add_argument("--task", default="family_relation")
    ap.add_argument("--n", type=int, default=64, help="test examples of the LoRA task")
    ap.add_argument("--curvature", default="ggn", choices=["hessian", "ggn", "fisher"], help="digits curvature")
    ap.add_argument("--row-keep", type=float, default=0.25, help="q-newton sparsification (fraction of a row kept)")
    ap.add_argument("--gate-time", type=float, default=1e-18, help="gate time of the q-newton run (paper's scenario)")
    ap.add_argument("--out", type=Path, default=Path("runs/experiments/q_newton"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if "hhl" in args.problems:  # needs the quantum extra; written on its own
        (args.out / "hhl.json").write_text(json.dumps(hhl_problem(args), indent=1))
        args.problems = [p for p in args.problems if p != "hhl"]
        if not args.problems:
            return
    args.flop_rate = measure_flop_rate()
    results: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "flop_rate": args.flop_rate}
    if "digits" in args.problems:
        results["digits"] = digits_problem(args)
        results["digits"]["summary"] = summarize("digits", results["digits"], args.flop_rate)
    if "lora" in args.problems:
        results["lora"] = lora_problem(args, run_optimizer)
        results["lora"]["summary"] = summarize("lora", results["lora"], args.flop_rate)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    plot(results, args.out / "q_newton.png")
    for p in ("digits", "lora"):
        if p in results:
            print(f"## {p}\n" + json.dumps(results[p]["summary"], indent=1))


if __name__ == "__main__":
    main()
