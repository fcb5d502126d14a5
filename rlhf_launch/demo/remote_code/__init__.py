"""The Python code that the tiny remote-code demo models carry in their folders (rlhf_launch/demo/remote_code_models.py
copies these files there): a model type of its own, ``tiny_remote``, which transformers does not know, so that loading
the models needs ``trust_remote_code``, as InternLM2's do. Not imported by the project itself."""
