from pathlib import Path

from setuptools import find_packages, setup

MONITORING = ["tensorboard>=2.21,<3", "wandb>=0.31,<1", "mlflow>=3.17,<4"]

setup(
    name="apt-trainops",
    version="0.1.0",
    description="APT TrainOps: LLM training orchestration over Megatron-core and DeepSpeed",
    long_description=Path(__file__).with_name("README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["apt", "apt.*"]),
    # torch is left unpinned here so GPU installs get their CUDA build; CPU installs pin it
    # through constraints/cpu.txt (see the Makefile).
    install_requires=[
        "torch>=2.4",
        "megatron-core>=0.16,<0.17",
        "deepspeed>=0.19.8,<0.20",
        "numpy",
        "pyyaml",
        "tqdm",
        "psutil",
        "ninja",
        "matplotlib>=3.8",  # the run's PNG plots (on by default)
    ],
    # Built-in multiple-choice tasks (apt/trainops/eval/tasks/*.jsonl).
    package_data={"apt.trainops.eval": ["tasks/*.jsonl"], "apt.trainops.perf": ["*.yaml"]},
    extras_require={
        # Tokenizers and Parquet input for the data pipeline (trainops preprocess, data.tokenizer).
        "data": ["tokenizers>=0.19", "sentencepiece>=0.2", "pyarrow>=14"],
        "test": ["pytest>=8", "tokenizers>=0.19", "sentencepiece>=0.2", "pyarrow>=14",
                 "transformers>=5,<6", "safetensors>=0.4", *MONITORING],
        # Monitoring backends (apt/trainops/monitoring, switched on in the profile); the
        # tests read each backend's files back with that library's own reader.
        "monitoring": MONITORING,
        # Hugging Face interop (trainops export-hf / import-hf): Llama and Mixtral directories.
        "hf": ["transformers>=5,<6", "safetensors>=0.4"],
        # bench/peer_hf.py: APT against the Hugging Face Trainer (which needs accelerate).
        "bench": ["transformers>=5,<6", "accelerate>=1.0"],
        # Transformer Engine is optional and used only on CUDA (layer spec, fused attention).
        "gpu": ["transformer-engine[pytorch]"],
    },
    entry_points={"console_scripts": ["trainops=apt.cli:main"]},
)
