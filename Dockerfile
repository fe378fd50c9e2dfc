# megatron_let on NVIDIA's PyTorch container, which brings CUDA, cuDNN, NCCL, PyTorch, Transformer
# Engine and apex built for each other. The tag is the one Megatron-LM's LTS images use; pick a newer
# one (same -py3 layout) only together with a megatron-core that is tested against it.
#
#   docker build -t megatron-let .
#   docker run --gpus all --ipc=host --ulimit memlock=-1 --ulimit stack=67108864 \
#       -v /data:/data -v /teachers:/teachers -v /checkpoints:/checkpoints \
#       -e DATA_PATH=/data/pile_text_document -e TEACHER_PATH=/teachers/smollm2-135m-instruct \
#       -e CHECKPOINT_DIR=/checkpoints/llama_1b_let \
#       megatron-let bash examples/llama_1b/pretrain_let.sh
#
# The image keeps NGC's entry point (/opt/nvidia/nvidia_entrypoint.sh: CUDA forward-compatibility
# set-up, then it runs the command); the default command prints pretrain_let.py's flags. See
# docs/launching.md for SLURM (pyxis/enroot) use.
FROM nvcr.io/nvidia/pytorch:25.09-py3

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1

# The container's torch, Transformer Engine and apex must stay: megatron-core and megatron_let are
# installed with --no-deps and their remaining, pure-Python dependencies are listed here (the same
# pins as pyproject.toml). NGC pins its packages through PIP_CONSTRAINT; it is cleared for this step
# only, because megatron-core needs a newer `packaging` than the container's pin.
RUN PIP_CONSTRAINT="" pip install --no-deps "megatron-core==0.16.1" && \
    PIP_CONSTRAINT="" pip install \
        "packaging>=24.2" \
        "psutil>=5.9" \
        "transformers>=4.45" \
        "sentencepiece>=0.2" \
        "safetensors>=0.4" \
        "tensorboard>=2.14" \
        "tqdm>=4.60"

WORKDIR /workspace/megatron_let
COPY . .
RUN pip install --no-deps --no-build-isolation . && \
    python -c "import megatron.core, megatron_let.training.arguments"

CMD ["python", "pretrain_let.py", "--help"]
