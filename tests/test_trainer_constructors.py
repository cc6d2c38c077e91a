"""Every trainer class, built through each of its public constructors as a new user would, is
usable: it holds the profile's tokenizer, draws a typed training batch and evaluates.

The forms: ``Cls(config=cfg)``, ``Cls.from_config(cfg)``, ``Cls.from_config(cfg,
train_dataset=..., eval_dataset=...)`` (datasets the user built, no ``tokenizer=``: issue 28
found O1Trainer failing here with "'NoneType' object has no attribute 'vocab_size'") and the
seed README's ``Cls(model=model, train_dataset=..., eval_dataset=..., config=cfg)``. Tiny
models and data, no optimizer step: one process, a few seconds per class.
"""
import json

import pytest
import torch

from apt.core.config import load_profile
from apt.model.architectures import APTModel
from apt.trainops.data.build import build_datasets
from apt.trainops.engine import (ClaudeTrainer, Finetuner, GPT5Trainer, O1Trainer, PreTrainer,
                                 Trainer)

SMALL = ["model.hidden_size=32", "model.num_layers=2", "model.num_attention_heads=4",
         "model.num_query_groups=2", "model.ffn_hidden_size=64", "model.max_seq_len=32",
         "training.batch_size=4", "training.eval_batches=1", "output.sample_tokens=0"]
TEXT = ["data.max_corpus_bytes=60000", "data.seq_length=32"]


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _data(tmp_path):
    """Small files of each corpus a trainer class reads (a profile's synthetic sets hold
    20,000 records: seconds to tokenize)."""
    sums = [(a, a + 7) for a in range(10, 90)]
    return {
        "sft": ["data.corpus=sft", "data.val_fraction=0.3", "data.seq_length=32",
                "data.path=" + _jsonl(tmp_path / "sft.jsonl", [
                    {"prompt": f"{a}+7=", "response": str(b)} for a, b in sums])],
        "preference": ["data.val_fraction=0.3", "data.seq_length=32", "training.init_from=null",
                       "training.checkpoints.dir=null",   # no SFT checkpoint to start from
                       "data.path=" + _jsonl(tmp_path / "pairs.jsonl", [
                           {"prompt": f"{a}+7=", "chosen": str(b), "rejected": str(b + 1)}
                           for a, b in sums])],
        "prompts": ["data.corpus=prompts", "data.val_fraction=0.3", "data.seq_length=24",
                    "training.objective=grpo", "training.grpo.num_generations=2",
                    "training.grpo.max_new_tokens=4", "training.grpo.eval_prompts=2",
                    "training.grpo.rewards=[{name: exact_match}]",
                    "data.path=" + _jsonl(tmp_path / "prompts.jsonl", [
                        {"prompt": f"{a}+7=", "answer": str(b)} for a, b in sums])]}


# class -> (profile, its overrides or the name of a small data set, a metric it evaluates)
CASES = {
    Trainer: ("tiny", TEXT, "val_loss"),
    PreTrainer: ("tiny", TEXT, "val_loss"),
    Finetuner: ("sft-tiny", "sft", "val_loss"),
    ClaudeTrainer: ("dpo-tiny", "preference", "val_rewards/accuracies"),
    GPT5Trainer: ("moe-tiny", TEXT + ["model.num_experts=2", "model.moe_top_k=2"], "val_loss"),
    O1Trainer: ("tiny", "prompts", "val_reward"),
}
FORMS = ("init_config", "from_config", "from_config_datasets", "seed_model_datasets")


def _build(cls, form, cfg):
    if form == "init_config":
        return cls(config=cfg)
    if form == "from_config":
        return cls.from_config(cfg)
    train, held_out, _ = build_datasets(cfg.data, seed=cfg.training.seed)
    if form == "from_config_datasets":
        return cls.from_config(cfg, train_dataset=train, eval_dataset=held_out)
    model = APTModel(cfg.model)
    return cls(model=model, train_dataset=train, eval_dataset=held_out, config=cfg)


@pytest.mark.parametrize("cls", list(CASES), ids=lambda c: c.__name__)
def test_each_constructor_gives_a_usable_trainer(cls, tmp_path):
    profile, overrides, metric = CASES[cls]
    overrides = _data(tmp_path)[overrides] if isinstance(overrides, str) else overrides
    cfg = load_profile(profile, SMALL + overrides + [f"output.dir={tmp_path / 'runs'}"])
    _, _, profile_tokenizer = build_datasets(cfg.data, seed=cfg.training.seed)
    failures = []
    for form in FORMS:
        try:
            trainer = _build(cls, form, cfg)
            assert type(trainer) is cls
            # the profile's tokenizer, whoever built the data
            assert type(trainer.tokenizer) is type(profile_tokenizer), form
            assert trainer.tokenizer.vocab_size == profile_tokenizer.vocab_size, form
            batch = next(iter(trainer.training_batches()))
            assert isinstance(batch, trainer.objective.batch_type), form
            result = trainer.evaluate(max_batches=1)
            assert metric in result and torch.isfinite(torch.tensor(result[metric])), \
                (form, result)
            if cls is O1Trainer:   # the greedy-answer evaluation's names, and only those
                assert set(result) == {"val_reward", "val_rewards/exact_match", "val_accuracy",
                                       "val_completion_length", "val_prompts"}, result
        except Exception as error:   # every form is tried; the report names each failure
            failures.append(f"{cls.__name__} via {form}: {type(error).__name__}: {error}")
    assert not failures, "\n".join(failures)


def test_variants_extend_only_through_public_hooks():
    """No trainer class overrides a private method of Trainer (issue 28: O1Trainer overrode
    _loader, _training_batches and _dataset_options), and an objective declares on its base
    every method the engines, the Evaluator, the rollouts and the trainers call on it."""
    from apt.trainops.objectives import (GRPOObjective, LanguageModelObjective, Objective,
                                         PreferenceObjective)
    private = {name for name in vars(Trainer) if name.startswith("_")
               and not name.startswith("__")}
    for cls in CASES:
        for klass in cls.__mro__[:cls.__mro__.index(Trainer)]:
            assert not private & set(vars(klass)), (klass.__name__, private & set(vars(klass)))
            assert "evaluate" not in vars(klass), klass   # the objective's evaluation decides
    called = {"coerce", "check_model", "bind", "prepare", "state_dict", "check_resumed",
              "loss_units", "forward_step", "step_metrics", "logps_step", "evaluate",
              "eval_forward_step", "eval_metrics", "reference", "needs_reference",
              "stat_names", "eval_stat_names", "batch_type", "name"}
    assert called <= set(dir(Objective)), called - set(dir(Objective))
    for objective in (GRPOObjective, LanguageModelObjective, PreferenceObjective):
        public = {n for n in vars(objective) if not n.startswith("_")}
        assert public - set(dir(Objective)) <= {"epsilon_high", "train_mask", "per_token_terms",
                                                "aggregate", "pair_losses", "token_sft_loss"}


def test_o1_trainer_without_a_profile_takes_the_tokenizer_given_or_says_so(tmp_path):
    """A config built in Python (no profile) does not say which tokenizer made the caller's
    prompts: ``tokenizer=`` gives it, and without one O1Trainer (which decodes answers for its
    rewards) says what it needs instead of failing on None."""
    from apt.core.config import APTConfig, ConfigError, with_overrides
    profile = load_profile("tiny", SMALL + _data(tmp_path)["prompts"])
    train, held_out, tokenizer = build_datasets(profile.data, seed=profile.training.seed)
    python_config = with_overrides(APTConfig(model=profile.model), {
        "data.corpus": "prompts", "data.path": profile.data.path, "data.seq_length": 24,
        "data.val_fraction": 0.3, "training.batch_size": 4, "training.objective": "grpo",
        "training.grpo.num_generations": 2, "training.grpo.max_new_tokens": 4,
        "training.grpo.eval_prompts": 2, "output.sample_tokens": 0})
    assert not python_config.sources
    seed = dict(train_dataset=train, eval_dataset=held_out, config=python_config,
                output_dir=str(tmp_path / "runs"))
    with pytest.raises(ConfigError, match=r"data\.tokenizer: O1Trainer decodes .* pass "
                                          r"tokenizer="):
        O1Trainer(**seed)
    trainer = O1Trainer(**seed, tokenizer=tokenizer)
    assert trainer.tokenizer is tokenizer and trainer.evaluate()["val_prompts"] == 2
