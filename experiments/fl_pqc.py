"""Signed federated LoRA at small scale: signing costs no accuracy and stops a malicious client.

    .venv/bin/python experiments/fl_pqc.py [--task family_relation] [--clients 3] [--rounds 3]
        [--local-steps 4] [--batch-size 4] [--lr 0.01] [--eval-n 80] [--scheme ml-dsa-65] [--out runs/experiments/fl_pqc]

Four federated runs of the bundled SmolLM2-135M-Instruct, each client fine-tuning LoRA (q/v,
rank 4, one torch thread) on its own IID shard of the task, FedAvg, the inline engine (clients in turn in one
process, identical arithmetic in every run):

1. honest, signed (ML-DSA-65 by default)     2. honest, unsigned
3. one attacked client, signed               4. the same attacker, unsigned

The attacker sits on client 1's link after its signing step: ``tamper`` adds Gaussian noise
(std ``--scale``, default 0.2) to every LoRA tensor of its update each round; ``replay`` (``--attack
replay``) resends its first-round update later. Accuracy is the server's evaluation of the
global adapter on the test split after the last round (``--eval-n`` examples, 95% Wilson
intervals); the initial adapter (the same in every run) is evaluated once, in the first run.
Claims checked: (1) == (2) bit for bit and in accuracy; (3) keeps (1)'s accuracy level while (4)
drops. Writes ``<out>/results.json`` and prints the markdown table for docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="family_relation")
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--local-steps", type=int, default=4)
    ap.add_argument("--examples-per-client", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--eval-n", type=int, default=80)
    ap.add_argument("--scheme", default="ml-dsa-65")
    ap.add_argument("--attack", default="tamper", choices=["tamper", "replay"])
    ap.add_argument("--scale", type=float, default=0.2)
    ap.add_argument("--out", default="runs/experiments/fl_pqc")
    args = ap.parse_args()
    import flwr  # noqa: F401  (configures its logger; quiet it afterwards)
    import numpy as np

    logging.getLogger("flwr").setLevel(logging.WARNING)

    from expertkit.federated.config import FlConfig
    from expertkit.federated.simulate import simulate
    from expertkit.tasks.stats import wilson_interval as wilson

    base = dict(model="smollm2-135m", task=args.task, clients=args.clients, rounds=args.rounds, split="iid",
                examples_per_client=args.examples_per_client, local_steps=args.local_steps, batch_size=args.batch_size, lr=args.lr,
                rank=4, alpha=8, threads=1, eval_n=args.eval_n, eval_rounds="last", eval_initial=False, engine="inline",
                output_dir=args.out)
    runs = {
        "honest, signed": dict(signing={"scheme": args.scheme}),
        "honest, unsigned": dict(signing={"scheme": "none"}),
        f"{args.attack} attacker, signed": dict(signing={"scheme": args.scheme},
                                                attack={"kind": args.attack, "client": 1, "scale": args.scale}),
        f"{args.attack} attacker, unsigned": dict(signing={"scheme": "none"},
                                                  attack={"kind": args.attack, "client": 1, "scale": args.scale}),
    }
    results, states = {}, {}
    for i, (label, extra) in enumerate(runs.items()):
        cfg = FlConfig.model_validate({**base, **extra, "name": f"run{i}", "eval_initial": i == 0})
        t = time.perf_counter()
        res = simulate(cfg)
        states[label] = res.pop("final_state")
        res["wall_seconds"] = time.perf_counter() - t
        results[label] = res
        print(f"{label}: accuracy {res['accuracy']} ({res['wall_seconds']:.0f} s)", flush=True)
    labels = list(runs)
    same = all(np.array_equal(states[labels[0]][k], states[labels[1]][k]) for k in states[labels[0]])
    summary = {"args": vars(args), "runs": results, "honest_signed_equals_unsigned_bitwise": same}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(summary, indent=1))

    n = args.eval_n
    last = str(args.rounds)
    print(f"\nTask {args.task}, {args.clients} clients, {args.rounds} rounds x {args.local_steps} local steps, "
          f"scheme {args.scheme}, attacker on client 1 ({args.attack}, noise std {args.scale}), n={n}:\n")
    print("| run | accuracy before (round 0) | after round " + last + " [95% CI] | updates dropped | reported |")
    print("|---|---:|---:|---:|---|")
    for label in labels:
        r = results[label]
        acc0, acc = results[labels[0]]["accuracy"]["0"], r["accuracy"][last]  # one initial adapter for all
        lo, hi = wilson(round(acc * n), n)
        sig = r.get("signing") or {}
        dropped = len(sig.get("rejections", [])) if sig else "-"
        flagged = ", ".join(sig.get("flagged", [])) if sig else "-"
        print(f"| {label} | {acc0:.3f} | {acc:.3f} [{lo:.2f}, {hi:.2f}] | {dropped} | {flagged or 'none'} |")
    print(f"\nhonest signed == honest unsigned, bit for bit: {same}")
    for label in labels[2:3]:
        for rej in results[label]["signing"]["rejections"]:
            print(f"- round {rej['server_round']}: dropped {rej['client']}: {rej['reason']}")


if __name__ == "__main__":
    main()
