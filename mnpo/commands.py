"""The table of `mnpo` commands: each command's config dataclass and library function, as "module:attr"
strings imported only when the command runs (`load`), so reading the table imports nothing heavy.

A module of its own, below both the CLI and the pipeline: `mnpo.cli` dispatches through it and
`mnpo.pipeline.config` reads a stage's config class from it to check the flags a run passes to that stage.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    config: str  # "module:ConfigClass"
    handler: str  # "module:function", called with the config instance
    help: str


COMMANDS: dict[str, Command] = {
    "toy": Command(
        "mnpo.toy.config:ToyConfig",
        "mnpo.toy.world:build_toy_world",
        "build the offline toy world (tokenizer, policy, oracle, reward and preference models, data)",
    ),
    "split": Command(
        "mnpo.data.split:SplitConfig",
        "mnpo.data.split:split_dataset",
        "shard a preference or prompt dataset into N disjoint parts, one per iteration",
    ),
    "train-sft": Command(
        "mnpo.supervised.sft:SFTRunConfig",
        "mnpo.supervised.sft:train_sft",
        "supervised fine-tuning of a reference policy on chat data",
    ),
    "train-rm": Command(
        "mnpo.supervised.reward_model:RMRunConfig",
        "mnpo.supervised.reward_model:train_reward_model",
        "train a scalar Bradley-Terry reward model on preference pairs",
    ),
    "train-pm": Command(
        "mnpo.supervised.preference_model:PMRunConfig",
        "mnpo.supervised.preference_model:train_preference_model",
        "train a pairwise preference model (2-class classifier over prompt + two responses)",
    ),
    "decode": Command(
        "mnpo.generation.decode:DecodeConfig",
        "mnpo.generation.decode:decode",
        "sample K responses per prompt from a policy (hf or vllm backend), sharded and resumable",
    ),
    "annotate": Command(
        "mnpo.annotation.config:AnnotateConfig",
        "mnpo.annotation.annotate:annotate",
        "score responses with reward / preference models and build chosen-rejected pairs",
    ),
    "pipeline": Command(
        "mnpo.pipeline.config:PipelineConfig",
        "mnpo.pipeline.runner:run_pipeline",
        "run the whole iterative pipeline (split, decode, annotate, precompute, train, evaluate) with stage-level "
        "resume; `mnpo pipeline status DIR` shows a run's stages",
    ),
    "compare": Command(
        "mnpo.compare.config:CompareConfig",
        "mnpo.compare.run:compare",
        "run several methods x seeds through the pipeline and write COMPARE.md (win rates with intervals, "
        "length, KL, wall time, round robin of the final policies)",
    ),
    "evaluate": Command(
        "mnpo.evaluation.config:EvaluateConfig",
        "mnpo.evaluation.evaluate:evaluate",
        "win rate of models against a baseline on held-out prompts (judges, bootstrap CIs, alignment curve)",
    ),
    "train-egpo": Command(
        "mnpo.online.config:OnlineConfig",
        "mnpo.online.trainer:train_egpo",
        "online NLHF training: EGPO, Online IPO 1/2, Nash-MD, Nash-MD-PG (--alg eg|oipo1|oipo2|nmd|nmdpg)",
    ),
    "serve-judge": Command(
        "mnpo.judges.config:ServeJudgeConfig",
        "mnpo.judges.server:serve_judge",
        "HTTP server hosting a judge model (micro-batched) for many training ranks",
    ),
    "simulate": Command(
        "mnpo.simulation.config:SimulateConfig",
        "mnpo.simulation.run:simulate",
        "tabular / neural preference games: duality gap of OIPO1/2, Nash-MD(-PG), EGPO, MNPO",
    ),
    "precompute": Command(
        "mnpo.offline.precompute:PrecomputeConfig",
        "mnpo.offline.precompute:precompute",
        "add reference and history (opponent) log-probs of chosen/rejected to a preference dataset",
    ),
    "train-mnpo": Command(
        "mnpo.offline.config:MNPOConfig",
        "mnpo.offline.trainer:train_mnpo",
        "train one MNPO iteration (TD-MNPO / HT-MNPO) from precomputed opponent log-probs",
    ),
}


def load(ref: str):
    """The object a "module:attr" reference of the table names (importing its module)."""
    module, attr = ref.split(":")
    return getattr(importlib.import_module(module), attr)
