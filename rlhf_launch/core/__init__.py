"""The torch-free core of rlhf-launch: the typed job spec and its schema, prompt-source
parsing, the resource plan with its memory estimate, and reading a resolved spec.

Login nodes, the launcher and every worker rank share it; nothing here imports torch.
"""
