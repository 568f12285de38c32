"""Basic stages on the base model. Each is registered by kind with its parameter model.

* ``inspect``: architecture, parameter count, dtypes and tensor groups of the base checkpoint.
* ``generate``: greedy answers of the base model to a list of prompts (chat template when the
  tokenizer has one), with tokens per second.
* ``perplexity``: mean negative log-likelihood per token and perplexity on a list of texts.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from pydantic import Field

from expertkit.config import Config
from expertkit.pipeline.config import STAGES
from expertkit.pipeline.context import RunContext
from expertkit.progress import track


def _cell(text: str) -> str:
    """Make text safe for one markdown table cell."""
    return text.replace("\n", " ").replace("|", "\\|")


class InspectParams(Config):
    """Parameters of the ``inspect`` stage (none)."""


class InspectStage:
    """Describe the base checkpoint without loading the model."""

    def run(self, ctx: RunContext, params: InspectParams) -> dict[str, Any]:
        """Summarise the base checkpoint."""
        from expertkit.weights.summary import checkpoint_summary

        return checkpoint_summary(ctx.model_path())

    def report(self, result: dict[str, Any]) -> str:
        """Render the summary."""
        from expertkit.weights.summary import summary_markdown

        return summary_markdown(result)


class GenerateParams(Config):
    """Parameters of the ``generate`` stage."""

    prompts: list[str] = Field(min_length=1, description="questions to answer")
    max_new_tokens: int = Field(32, ge=1, le=512, description="tokens generated per prompt")
    chat: bool = Field(True, description="wrap prompts in the tokenizer's chat template when it has one")


def _encode(tokenizer: Any, prompt: str, chat: bool) -> torch.Tensor:
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    return tokenizer(prompt, return_tensors="pt").input_ids


class GenerateStage:
    """Greedy generation from the base model."""

    def run(self, ctx: RunContext, params: GenerateParams) -> dict[str, Any]:
        """Answer each prompt greedily."""
        loaded = ctx.model()
        tok, model = loaded.tokenizer, loaded.model
        outputs, n_tokens, started = [], 0, time.perf_counter()
        for prompt in track(params.prompts, "Generating"):
            ids = _encode(tok, prompt, params.chat)  # (1, prompt_len)
            with torch.no_grad():
                out = model.generate(
                    ids, attention_mask=torch.ones_like(ids), max_new_tokens=params.max_new_tokens,
                    do_sample=False, pad_token_id=tok.pad_token_id,
                )
            new = out[0, ids.shape[1]:]
            n_tokens += int(new.numel())
            outputs.append({"prompt": prompt, "answer": tok.decode(new, skip_special_tokens=True).strip()})
        seconds = time.perf_counter() - started
        return {"outputs": outputs, "new_tokens": n_tokens, "seconds": round(seconds, 2),
                "tokens_per_second": round(n_tokens / seconds, 2) if seconds else None}

    def report(self, result: dict[str, Any]) -> str:
        """A table of prompts and answers."""
        rows = ["| prompt | answer |", "|---|---|"]
        for o in result["outputs"]:
            rows.append(f"| {_cell(o['prompt'])} | {_cell(o['answer'])} |")
        rows.append("")
        rows.append(f"{result['new_tokens']} tokens in {result['seconds']} s "
                    f"({result['tokens_per_second']} tokens/s, greedy, CPU).")
        return "\n".join(rows)


class PerplexityParams(Config):
    """Parameters of the ``perplexity`` stage."""

    texts: list[str] = Field(min_length=1, description="texts to score")


class PerplexityStage:
    """Mean negative log-likelihood per token of each text under the base model."""

    def run(self, ctx: RunContext, params: PerplexityParams) -> dict[str, Any]:
        """Score each text."""
        loaded = ctx.model()
        tok, model = loaded.tokenizer, loaded.model
        rows, total_nll, total_tokens = [], 0.0, 0
        for text in track(params.texts, "Scoring texts"):
            ids = tok(text, return_tensors="pt").input_ids  # (1, seq)
            with torch.no_grad():
                logits = model(ids).logits[0, :-1]  # (seq-1, vocab)
            nll = torch.nn.functional.cross_entropy(logits.float(), ids[0, 1:], reduction="sum").item()
            n = ids.shape[1] - 1
            rows.append({"text": text, "tokens": n, "nll_per_token": nll / max(n, 1),
                         "perplexity": math.exp(nll / max(n, 1))})
            total_nll, total_tokens = total_nll + nll, total_tokens + n
        mean = total_nll / max(total_tokens, 1)
        return {"texts": rows, "tokens": total_tokens, "nll_per_token": mean, "perplexity": math.exp(mean)}

    def report(self, result: dict[str, Any]) -> str:
        """A table of texts with their perplexity."""
        rows = ["| text | tokens | perplexity |", "|---|---:|---:|"]
        for r in result["texts"]:
            short = r["text"] if len(r["text"]) <= 60 else r["text"][:57] + "..."
            rows.append(f"| {_cell(short)} | {r['tokens']} | {r['perplexity']:.2f} |")
        rows.append(f"| **all** | {result['tokens']} | **{result['perplexity']:.2f}** |")
        return "\n".join(rows)


STAGES.add("inspect", InspectStage(), params=InspectParams,
           summary="architecture, parameters, dtypes and tensor groups of the base checkpoint")
STAGES.add("generate", GenerateStage(), params=GenerateParams,
           summary="greedy answers of the base model to a list of prompts")
STAGES.add("perplexity", PerplexityStage(), params=PerplexityParams,
           summary="perplexity of the base model on a list of texts")
