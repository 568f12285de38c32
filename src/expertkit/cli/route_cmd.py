"""``expertkit route ...``: build an expert library, evaluate a routing method on it, generate with it.

    expertkit route build [RECIPE] [--out DIR]             # one LoRA expert + gates per task (cached)
    expertkit route eval LIBRARY -t gcd -t syllogism -m glider -n 200
    expertkit route generate LIBRARY "Sort these words: b, a" -m glider
    expertkit route methods                                # GLIDER and the baselines

Wired into the main app by :func:`register`; heavy imports stay inside the commands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

route_app = typer.Typer(
    help="GLIDER: global and local routing over a library of LoRA experts, and its baselines.",
    no_args_is_help=True,
    add_completion=False,
)
out = Console(soft_wrap=True)

MethodOpt = Annotated[str, typer.Option("--method", "-m", help="glider or a baseline (`expertkit route methods`).")]
AlphaOpt = Annotated[str, typer.Option(help="GLIDER's alpha: a number, held_in, held_out or auto.")]


def _config(method: str, top_k: int, alpha: str) -> object:
    from expertkit.config import validate
    from expertkit.route import RouteConfig

    value: object = alpha
    try:
        value = float(alpha)
    except ValueError:
        pass
    return validate(RouteConfig, {"method": method, "top_k": top_k, "alpha": value}, source="route options")


def _open(library: Path, model: str | None) -> tuple[object, object]:
    from expertkit.models import load_model
    from expertkit.route import ExpertLibrary
    from expertkit.route.api import library_model

    lib = ExpertLibrary.load(library)
    return lib, load_model(library_model(lib, model))


@route_app.command("build")
def build_cmd(
    recipe: Annotated[Path | None, typer.Argument(help="a library recipe YAML (omit for the 10 default tasks)")] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="library folder (default: the expertkit cache)")] = None,
    gates: Annotated[bool, typer.Option(help="Also train the Phatgoose gates (local routers).")] = True,
) -> None:
    """Train one LoRA expert and its gates per task; resumable, and reused when already built."""
    from expertkit.config import load_config, validate
    from expertkit.route import LibraryConfig, build_library

    config = load_config(LibraryConfig, recipe) if recipe is not None else validate(LibraryConfig, {})
    lib = build_library(None, config, out_dir, gates=gates)
    out.print(f"Library {lib.root}: {len(lib.experts)} experts ({', '.join(lib.names)}) on base "
              f"{lib.base_fingerprint}; gates: {'yes' if lib.has_gates else 'no'}.", markup=False, highlight=False)


@route_app.command("eval")
def eval_cmd(
    library: Annotated[Path, typer.Argument(help="a library folder (expertkit route build)")],
    task: Annotated[list[str], typer.Option("--task", "-t", help="task to evaluate on (repeatable)")],
    method: MethodOpt = "glider",
    n: Annotated[int, typer.Option("-n", min=1, help="test examples per task")] = 100,
    top_k: Annotated[int, typer.Option(min=1, help="experts per token")] = 2,
    alpha: AlphaOpt = "auto",
    model: Annotated[str | None, typer.Option(help="base model (default: the one the library was built on)")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="examples per forward pass")] = 16,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="write per-example scores as JSON")] = None,
) -> None:
    """Accuracy of one routing method on each task's test examples."""
    import json

    from expertkit.fileio import write_atomic
    from expertkit.route.api import make_router
    from expertkit.route.evaluate import evaluate_router
    from expertkit.tasks.base import get_task
    from expertkit.tasks.stats import wilson_interval

    cfg = _config(method, top_k, alpha)
    lib, loaded = _open(library, model)
    router = make_router(loaded, lib, cfg)
    result = {}
    for name in task:
        t = get_task(name)
        scores = [r.score for r in evaluate_router(router, t, t.examples("test", n, 0), batch_size=batch_size)]
        lo, hi = wilson_interval(sum(scores), len(scores))
        result[name] = {"accuracy": sum(scores) / len(scores), "ci": [lo, hi], "n": len(scores), "scores": scores}
        out.print(f"{method} on {name} (n={len(scores)}): accuracy {result[name]['accuracy']:.3f} "
                  f"(95% CI {lo:.3f}-{hi:.3f})", markup=False, highlight=False)
    if output is not None:
        write_atomic(output, json.dumps({"method": method, "library": str(library), "tasks": result}, indent=1))


@route_app.command("generate")
def generate_cmd(
    library: Annotated[Path, typer.Argument(help="a library folder (expertkit route build)")],
    prompt: Annotated[list[str], typer.Argument(help="one or more queries")],
    method: MethodOpt = "glider",
    top_k: Annotated[int, typer.Option(min=1, help="experts per token")] = 2,
    alpha: AlphaOpt = "auto",
    max_new_tokens: Annotated[int, typer.Option(min=1, help="tokens to generate per query")] = 32,
    model: Annotated[str | None, typer.Option(help="base model (default: the one the library was built on)")] = None,
) -> None:
    """Generate a routed answer for each query (GLIDER also shows the written instruction and top experts)."""
    cfg = _config(method, top_k, alpha)
    lib, loaded = _open(library, model)
    from expertkit.route.api import make_router

    router = make_router(loaded, lib, cfg)
    answers = router.generate(prompt, max_new_tokens)
    for i, (q, a) in enumerate(zip(prompt, answers, strict=True)):
        out.print(f"> {q}", markup=False, highlight=False)
        if "instructions" in router.last:
            top = router.last["scores"][i].topk(min(3, len(lib.experts)))
            best = ", ".join(f"{lib.names[j]} {v:.2f}" for v, j in zip(top.values.tolist(), top.indices.tolist(), strict=True))
            out.print(f"  instruction: {router.last['instructions'][i]}  (experts: {best}; alpha "
                      f"{router.last['alphas'][i]:g})", markup=False, highlight=False)
        out.print(f"  {a}", markup=False, highlight=False)


@route_app.command("methods")
def methods_cmd() -> None:
    """GLIDER and the baselines, one line each."""
    from expertkit.route import METHODS

    for name, summary in METHODS.items():
        out.print(f"{name}: {summary}", markup=False, highlight=False)


def register(app: typer.Typer) -> None:
    """Add the ``route`` command group."""
    app.add_typer(route_app, name="route")
