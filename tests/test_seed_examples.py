"""The seed README's Python examples (../shared/seed/README.en.md), run as a new user would:
each saved as a plain script (top-level code, no ``if __name__ == "__main__"`` guard) and run
with ``python script.py`` (``torchrun`` for the multi-process ones).

The example lines are the seed's, changing only sizes (model dimensions, steps, batch sizes,
world size 8 -> 2; ``max_steps=`` where the seed leaves the default 1000 steps) and ``'apt-base'``
into a Hugging Face Llama directory made here offline. What an example leaves undefined
(``train_dataset``, ``eval_data``, ``model``, ``optimizer``, ...) is defined before it with the
project's own APIs, and checks follow it. To keep the launches few (each costs seconds of
imports), several examples share one script, one after the other, each in its own directory;
the script prints ``EXAMPLE <name> OK`` after each, and each example is its own test.

Three failures the issue found are each covered: a save spawning a process that re-runs the
unguarded script (every section that saves), resuming a Trainer from ``manager.save(...)``
(``resume``), and saving a plain ``torch.nn.Module`` (``checkpoints``).
"""
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = ("hidden_size=64, num_layers=2, num_attention_heads=4, num_query_groups=2, "
        "ffn_hidden_size=128, vocab_size=384, max_seq_len=128")

PREAMBLE = f"""\
import os
import sys
import torch
from apt.core.config import load_profile
from apt.model.architectures import APTLargeModel
from apt.trainops.data.build import build_datasets
from apt.trainops.engine import Trainer
from apt.trainops.checkpoints import CheckpointManager
from apt.trainops.distributed import setup_distributed
from apt.trainops.data import create_dataloader
TINY = dict({TINY})
# The project's own data, offline: the stdlib corpus, byte tokens, 128-token samples.
train_dataset, eval_dataset, tokenizer = build_datasets(
    load_profile('tiny', ['data.max_corpus_bytes=200000']).data)
"""


def section(name: str, code: str) -> str:
    """One example in its own directory, then its marker: one write of one line (under torchrun
    every rank prints it into the same pipe; print's separate newline write could interleave
    two ranks' markers into one line that matches neither)."""
    return (f"os.makedirs('{name}', exist_ok=True)\nos.chdir('{name}')\n"
            f"{textwrap.dedent(code).strip()}\nos.chdir('..')\n"
            f"sys.stdout.write('EXAMPLE {name} OK\\n'); sys.stdout.flush()\n")


SINGLE = {   # one process: python script.py
    "data": """
        dataset = train_dataset
        # --- seed: data/ (batch_size 32 -> 8)
        from apt.trainops.data import APTDataLoader, create_dataloader
        dataloader = create_dataloader(dataset=dataset, batch_size=8, num_workers=4, shuffle=True)
        for batch in dataloader:
            # "training logic": the loader is endless (it serves the Trainer), so stop here
            assert batch['tokens'].shape == (8, 128)
            break
        """,
    "checkpoints": """
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16),
                                    torch.nn.Linear(16, 4))   # any torch module
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model(torch.randn(4, 8)).sum().backward()
        optimizer.step()
        # --- seed: checkpoints/
        from apt.trainops.checkpoints import CheckpointManager
        checkpoint_manager = CheckpointManager(save_dir='checkpoints/', save_interval=500, keep_last_n=5)
        checkpoint_manager.save(model=model, optimizer=optimizer, step=1000)
        state = checkpoint_manager.load('checkpoint-1000')
        # --- checks: the state loads back into a fresh module and optimizer
        assert state.step == 1000
        fresh = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16),
                                    torch.nn.Linear(16, 4))
        fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
        checkpoint_manager.load('checkpoint-1000', model=fresh, optimizer=fresh_optimizer)
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                      fresh.state_dict().values()))
        assert torch.equal(fresh_optimizer.state_dict()['state'][0]['exp_avg'],
                           optimizer.state_dict()['state'][0]['exp_avg'])
        """,
    "eval": """
        model = APTLargeModel(**TINY)
        eval_data = eval_dataset
        # --- seed: eval/
        from apt.trainops.eval import Evaluator, compute_metrics
        evaluator = Evaluator(model=model, eval_dataset=eval_data, metrics=['accuracy', 'perplexity'])
        results = evaluator.evaluate()
        print(results)  # {'accuracy': 0.95, 'perplexity': 12.3}
        # --- checks: the metrics asked for, over the whole validation split
        assert 0 <= results['accuracy'] <= 1 and results['perplexity'] > 1
        assert results['tokens'] == len(eval_data) * 128
        """,
    "artifacts": """
        model = APTLargeModel(**TINY)
        metrics = {'step': 10, 'loss': 2.5}
        logs = ['step 10 | loss 2.5']
        # --- seed: artifacts/
        from apt.trainops.artifacts import ArtifactManager
        artifact_manager = ArtifactManager(output_dir='outputs/', experiment_name='my_experiment')
        artifact_manager.save_model(model)
        artifact_manager.save_metrics(metrics)
        artifact_manager.save_logs(logs)
        # --- checks
        run = artifact_manager.run_dir
        assert artifact_manager.read_metrics() == [metrics]
        assert 'loss 2.5' in (run / 'logs.txt').read_text()
        saved = torch.load(run / 'model' / 'model.pt', weights_only=True)
        assert torch.equal(saved['embedding.word_embeddings.weight'],
                           model.embedding.word_embeddings.weight)
        """,
    "basic_training": """
        # --- seed: basic training (APTLargeModel() -> tiny, batch 32 -> 8, steps 10000 -> 2)
        from apt.model.architectures import APTLargeModel
        from apt.trainops.engine import Trainer
        from apt.trainops.data import create_dataloader
        model = APTLargeModel(**TINY)
        train_loader = create_dataloader(train_dataset, batch_size=8)
        eval_loader = create_dataloader(eval_dataset, batch_size=8)
        trainer = Trainer(model=model, train_dataloader=train_loader, eval_dataloader=eval_loader,
                          max_steps=2, learning_rate=3e-5)
        trainer.train()
        # --- checks
        assert [r['step'] for r in trainer.history] == [1, 2]
        """,
    "config_profile": """
        # --- seed: from a config profile ('standard' resized by a profile of the same name on
        # APT_PROFILE_PATH that extends the repository's)
        from apt.core.config import load_profile
        config = load_profile('standard')
        trainer = Trainer.from_config(config)
        trainer.train()
        # --- checks
        assert config.model.hidden_size == 64 and config.training.max_steps == 2
        assert [r['step'] for r in trainer.history] == [1, 2]
        """,
    "resume": """
        model = APTLargeModel(**TINY)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        # What the seed's checkpoints/ section saves (step 1000 -> 998: 2 steps before the
        # default 1000).
        CheckpointManager('checkpoints/').save(model=model, optimizer=optimizer, step=998)
        saved = model.embedding.word_embeddings.weight.detach().clone()
        # --- seed: resume after interruption
        checkpoint_manager = CheckpointManager('checkpoints/')
        state = checkpoint_manager.load_latest()
        trainer = Trainer(model=model, resume_from_checkpoint=state)
        trainer.train()
        # --- checks: resumed at step 998 from the saved weights, trained the last 2 steps
        assert state.step == 998 and trainer.resumed_from.path == state.path
        assert [r['step'] for r in trainer.history] == [999, 1000]
        assert trainer.consumed_samples == 1000 * 32   # resumed at 998 x 32, 2 steps since
        assert not torch.equal(saved, model.embedding.word_embeddings.weight)
        """,
    "relation": """
        # --- seed: relation to apt.model (hidden 2048 x 32 layers -> tiny, + 2 steps)
        model = APTLargeModel(hidden_size=64, num_layers=2, num_attention_heads=4,
                              num_query_groups=2, ffn_hidden_size=128, vocab_size=384,
                              max_seq_len=128)
        trainer = Trainer(model=model, max_steps=2)
        trainer.train()
        assert [r['step'] for r in trainer.history] == [1, 2]
        """,
    "monitoring": """
        model = APTLargeModel(**TINY)
        # --- seed: monitoring and logging (+ 2 steps)
        trainer = Trainer(model=model, monitoring={'tensorboard': True, 'wandb': True, 'mlflow': True},
                          max_steps=2)
        trainer.train()  # logs to every monitoring system
        # --- checks: each backend wrote its store
        run = trainer.artifacts.run_dir
        assert list((run / 'tensorboard').glob('events.out.tfevents.*'))
        assert list((run / 'wandb').glob('offline-run-*'))
        assert (run / 'mlflow.db').is_file()
        """,
}

DISTRIBUTED = {   # torchrun --nproc_per_node=2
    "distributed_training": """
        # --- seed: distributed training (world size 8 -> 2, + 2 steps)
        setup_distributed(backend='nccl', world_size=2, rank=int(os.environ['RANK']))
        train_loader = create_dataloader(train_dataset, batch_size=4)   # undefined in the seed
        model = APTLargeModel(**TINY)
        trainer = Trainer(model=model, train_dataloader=train_loader,
                          distributed_config={'strategy': 'fsdp', 'world_size': 2}, max_steps=2)
        trainer.train()
        # --- checks: ZeRO-3 over the 2 processes
        assert trainer.plan.dp == 2 and trainer.plan.zero_stage == 3
        assert [r['step'] for r in trainer.history] == [1, 2]
        """,
    "config_driven": """
        # --- seed: config-driven training (profiles/my_training.yaml, written by the test)
        config = load_profile('my_training')
        trainer = Trainer.from_config(config)
        trainer.train()
        assert trainer.plan.dp == 2 and trainer.plan.zero_stage == 3
        assert [r['step'] for r in trainer.history] == [1, 2]
        """,
}

# The fine-tuning half of the seed (Finetuner, from_pretrained, DDPWrapper): same script.
SINGLE |= {
    "distributed": """
        model = APTLargeModel(**TINY)
        # --- seed: distributed/ (+ 2 steps)
        from apt.trainops.distributed import setup_distributed, DDPWrapper
        setup_distributed(backend='nccl')
        model = DDPWrapper(model)
        trainer = Trainer(model=model, distributed=True, max_steps=2)
        trainer.train()
        assert [r['step'] for r in trainer.history] == [1, 2]
        """,
    "engine": """
        model = APTLargeModel(**TINY)
        train_data, eval_data = train_dataset, eval_dataset
        config = load_profile('tiny', ['training.max_steps=2', 'training.warmup_steps=1',
                                       'data.max_corpus_bytes=200000'])
        # --- seed: engine/
        from apt.trainops.engine import Trainer, Finetuner
        trainer = Trainer(model=model, train_dataset=train_data, eval_dataset=eval_data, config=config)
        trainer.train()
        assert [r['step'] for r in trainer.history] == [1, 2]
        """,
    "fine_tuning": """
        from apt.trainops.engine import Finetuner
        from apt.trainops.data import ByteTokenizer, SFTDataset
        finetune_data = SFTDataset([{'prompt': f'{a}+{b}=', 'response': str(a + b)}
                                    for a in range(8) for b in range(8)], ByteTokenizer(),
                                   seq_length=32)
        # --- seed: fine-tuning ('apt-base' -> a Llama directory made with transformers)
        model = APTLargeModel.from_pretrained(os.environ['APT_BASE'])
        finetuner = Finetuner(model=model, train_dataset=finetune_data, learning_rate=1e-5, num_epochs=3)
        finetuner.finetune()
        finetuner.save_model('my_finetuned_model')
        assert os.listdir('my_finetuned_model')
        """,
}

STANDARD_RESIZED = f"""\
extends: {REPO / 'profiles' / 'standard.yaml'}
model: {{hidden_size: 64, num_layers: 2, num_attention_heads: 4, num_query_groups: 2,
        ffn_hidden_size: 128, max_seq_len: 128}}
data: {{seq_length: 128, max_corpus_bytes: 200000}}
training: {{batch_size: 8, micro_batch_size: 8, warmup_steps: 1, max_steps: 2,
           eval_interval: 0, eval_batches: 2}}
output: {{sample_tokens: 0}}
"""

# The seed's profiles/my_training.yaml, sizes changed (batch 32 -> 8, 10000 steps -> 2, world
# size 8 -> 2) plus a small corpus (the seed's leaves the data at its default).
MY_TRAINING = """\
training:
  batch_size: 8
  learning_rate: 3e-5
  max_steps: 2
  warmup_steps: 1   # the default 100 would exceed 2 steps
  distributed:
    enabled: true
    strategy: fsdp
    world_size: 2
  checkpoints:
    save_interval: 500
    keep_last_n: 5
data:
  max_corpus_bytes: 200000
"""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("seed")
    profiles = root / "profiles"
    profiles.mkdir()
    (profiles / "standard.yaml").write_text(STANDARD_RESIZED)
    (profiles / "my_training.yaml").write_text(MY_TRAINING)
    return root


def _env(root: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=str(REPO), APT_PROFILE_PATH=str(root / "profiles"),
               WANDB_MODE="offline", WANDB_SILENT="true", PYTHONUNBUFFERED="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache/apt/torch_extensions"))
    return env


def _run(root: Path, name: str, sections: dict, command: list[str], env: dict) -> dict:
    """Write the script, run it once, return {example: (passed, output)}."""
    return run_script(root / name / "script.py",
                      PREAMBLE + "".join(section(k, v) for k, v in sections.items()),
                      list(sections), command, env)


def run_script(script: Path, text: str, examples: list[str], command: list[str],
               env: dict) -> dict:
    """Run ``text`` as a plain script file in its own directory; an example passed when the
    script printed ``EXAMPLE <name> OK``. Returns {example: (passed, output)}."""
    script.parent.mkdir(exist_ok=True)
    script.write_text(text)
    proc = subprocess.run(command + [str(script)], cwd=script.parent, env=env,
                          capture_output=True, text=True, timeout=600)
    output = f"exit code {proc.returncode}\n" + proc.stdout + proc.stderr
    done = set(re.findall(r"EXAMPLE (\w+) OK", proc.stdout))
    return {example: (example in done, output) for example in examples}


_RESULTS: dict = {}


def _result(root, group, example):
    if group not in _RESULTS:
        env = _env(root)
        if group == "single":
            env["APT_BASE"] = str(_llama_dir(root))
            _RESULTS[group] = _run(root, group, SINGLE, [sys.executable], env)
        elif group == "distributed":
            _RESULTS[group] = _run(root, group, DISTRIBUTED, [
                sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node=2"], {**env, "OMP_NUM_THREADS": "1"})
        else:
            raise KeyError(group)
    return _RESULTS[group][example]


def _llama_dir(root: Path) -> Path:
    """'apt-base': a tiny Llama saved by transformers (offline, random weights)."""
    transformers = pytest.importorskip("transformers")
    import torch
    out = root / "apt-base"
    if not out.exists():
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(transformers.LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=384, max_position_embeddings=128)
        ).save_pretrained(out)
    return out


def _check(passed_output, example):
    passed, output = passed_output
    assert "bootstrapping phase" not in output, "a process re-ran the script as __main__"
    assert passed, f"example {example} failed ({output.splitlines()[0]}):\n{output[-6000:]}"


@pytest.mark.parametrize("example", list(SINGLE))
def test_single_process_example(workdir, example):
    _check(_result(workdir, "single", example), example)


@pytest.mark.parametrize("example", list(DISTRIBUTED))
def test_two_process_example(workdir, example):
    _check(_result(workdir, "distributed", example), example)

