"""The federated run config behind ``expertkit fl simulate CONFIG`` (frozen, unknown keys are errors)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from expertkit.config import Config, load_config


class SigningConfig(Config):
    """How updates are signed; ``scheme: none`` runs without signatures (the baseline)."""

    scheme: str = Field("ml-dsa-65", description="a registered signature scheme, or 'none'")
    digest: Literal["sha3-256", "blake2b"] = Field("sha3-256", description="canonical update hash")
    report_after: int = Field(2, ge=1, description="report a client after this many failed verifications")
    exclude_flagged: bool = Field(False, description="stop sending work to reported clients")

    @field_validator("scheme")
    @classmethod
    def _known(cls, value: str) -> str:
        if value != "none":
            from expertkit.federated.signing import get_signer

            get_signer(value)
        return value


class AttackConfig(Config):
    """One misbehaving client, simulated as a man in the middle after its signing step."""

    kind: Literal["none", "tamper", "replay"] = Field("none", description="tamper: add noise to the update; "
                                                      "replay: resend the first round's update")
    client: int = Field(0, ge=0, description="partition id of the attacked client")
    scale: float = Field(0.5, gt=0, description="std of the noise added by 'tamper'")


class FlConfig(Config):
    """A federated LoRA fine-tuning run: N clients, each on its own shard of one task."""

    name: str = Field("fl", description="run name (output folder under output_dir)")
    model: str = Field("smollm2-135m", description="bundled model, local folder, or 'tiny:<arch>' for tests")
    task: str = Field("bbc_topic", description="task name (see `expertkit tasks list`); 'toy:lohi' for tests")
    clients: int = Field(3, ge=1, description="number of clients (SuperNodes)")
    rounds: int = Field(3, ge=1, description="federated rounds")
    split: Literal["iid", "non-iid"] = Field("iid", description="iid: random shards; non-iid: sorted by answer")
    examples_per_client: int = Field(32, ge=1, description="training examples per client shard")
    local_steps: int = Field(4, ge=1, description="optimizer steps per client per round")
    batch_size: int = Field(8, ge=1, description="examples per local step")
    lr: float = Field(2e-3, gt=0, description="local AdamW learning rate")
    rank: int = Field(4, ge=1, description="LoRA rank")
    alpha: float = Field(8.0, gt=0, description="LoRA alpha")
    target_modules: tuple[str, ...] = Field(("q_proj", "v_proj"), description="LoRA target layers")
    max_prompt_tokens: int = Field(256, ge=1, description="longer prompts keep their last tokens")
    strategy: Literal["fedavg", "fedprox", "fedadam"] = Field("fedavg", description="aggregation strategy")
    strategy_params: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the strategy "
                                            "(e.g. proximal_mu for fedprox, eta for fedadam)")
    signing: SigningConfig = Field(default_factory=SigningConfig)
    attack: AttackConfig = Field(default_factory=AttackConfig)
    exclude_clients: tuple[int, ...] = Field((), description="partition ids that take no part: they answer every "
                                             "message with an error and their shards go unused, while the others "
                                             "keep their shards, seeds and keys (experiments: a run on the other "
                                             "clients' data only)")
    eval_n: int = Field(64, ge=0, description="server-side evaluation examples (test split) after each round")
    eval_rounds: Literal["all", "last"] = Field("all", description="evaluate after every round, or the last only")
    eval_initial: bool = Field(True, description="also evaluate the initial adapter (round 0)")
    seed: int = Field(0, description="seed of LoRA init, shards and local batches")
    engine: Literal["ray", "inline"] = Field("ray", description="ray: Flower's simulation engine; "
                                             "inline: one process, clients in turn (tests, small machines)")
    threads: int = Field(0, ge=0, description="torch threads per client process (0 = torch default)")
    output_dir: str = Field("runs", description="runs are written to output_dir/name")

    @model_validator(mode="after")
    def _check_excluded(self) -> FlConfig:
        """Excluded clients must exist, be listed once, leave at least one client, and not be the attacked one."""
        ex = self.exclude_clients
        bad = sorted({p for p in ex if not 0 <= p < self.clients})
        if bad:
            raise ValueError(f"exclude_clients {bad} outside the partition ids 0..{self.clients - 1}")
        if len(set(ex)) != len(ex):
            raise ValueError(f"exclude_clients lists a client twice: {list(ex)}")
        if len(ex) >= self.clients:
            raise ValueError(f"exclude_clients {list(ex)} leaves none of the {self.clients} clients to train")
        if self.attack.kind != "none" and self.attack.client in ex:
            raise ValueError(f"attack.client {self.attack.client} is in exclude_clients: the attack would do nothing")
        return self


def load_fl_config(path: str) -> FlConfig:
    """Read and validate a federated run config."""
    return load_config(FlConfig, path)
