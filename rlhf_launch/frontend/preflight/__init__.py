"""Pre-flight: every input a run will read, checked in seconds before any rank starts or any job is queued.

``preflight`` runs on a valid, resolved spec (rlhf_launch/frontend/spec.py has checked the spec itself) and
returns every problem found, in the spec's one-line ``Problem`` form, collected in a ``Preflight``
(findings.py). One module of this package checks each kind of input (``preflight`` below runs them in order):

- output.py: the run folder can be created, holds no previous run unless resuming, and on Slurm it is not
  under a node-local /tmp;
- data.py (records.py reads the files): each ``ppo_datas`` source exists and its records have a prompt's
  shape; PPO-ptx's ``pretrain_datas`` hold texts or chats; Hugging Face datasets are in the local cache
  (hub_cache.py);
- models.py: each model's config.json fits its role; a model type transformers does not know has its own code,
  allowed to run (remote_code.py); reward and critic checkpoints have a value head; the memory plan is
  recomputed from the configs of cached hub models;
- tokenizer.py (readers.py reads tokenizer folders): the tokenizer loads; its special tokens exist; every
  model's vocabulary holds its ids;
- prompts.py: a sample of prompts renders through the chat template, those longer than max_seq_len are
  counted; each source's system prompts render;
- model_tokenizers.py: each ``model_configs.<role>.tokenizer_config`` loads and fits its model;
- reward_function.py: the reward function imports, accepts (prompts, responses) and returns one finite
  float per response;
- resume.py: the ``--resume`` checkpoint is complete and was written for this spec's roles, models, layout,
  advantage estimator and reward;
- libraries.py: a ``--local`` run has the libraries it needs.

Nothing is loaded but configs, tokenizer files and headers: torch is imported only when the tokenizer
has no tokenizer.json or to call the reward function. A hub model missing from the local cache is an
error for ``--local`` and a warning for a Slurm submission, whose nodes may have it; a missing hub dataset
is an error for both, unless the job gives its nodes a cache of their own (HF_HOME, HF_HUB_CACHE or
HF_DATASETS_CACHE in a role's trainer_config.envs or in slurm.setup).

A check that raises is a bug of the check, not a finding: it becomes one error naming the check and the
input it was reading (``Preflight.run``), its traceback kept for the caller to print after the problems.
"""

from __future__ import annotations

from pathlib import Path

from rlhf_launch.core.config import JobSpec
from rlhf_launch.frontend.preflight.data import check_data, check_pretrain_data
from rlhf_launch.frontend.preflight.findings import Preflight
from rlhf_launch.frontend.preflight.libraries import check_local_libraries
from rlhf_launch.frontend.preflight.model_tokenizers import check_model_tokenizers
from rlhf_launch.frontend.preflight.models import check_memory_plan, check_models
from rlhf_launch.frontend.preflight.output import check_output
from rlhf_launch.frontend.preflight.prompts import check_prompts, check_system_prompts
from rlhf_launch.frontend.preflight.resume import check_resume
from rlhf_launch.frontend.preflight.reward_function import check_reward_function
from rlhf_launch.frontend.preflight.tokenizer import check_tokenizer


def preflight(spec: JobSpec, run_dir: Path, resume: str | None, local: bool) -> Preflight:
    """Run every check on a resolved spec; the result holds the problems and notes."""
    pf = Preflight(spec, Path(run_dir), resume, local)
    pf.run(check_output)
    pf.run(check_data)
    pf.run(check_pretrain_data)
    pf.run(check_models)
    tokenizer = pf.run(check_tokenizer)
    if tokenizer is not None:
        pf.run(check_prompts, tokenizer)
        pf.run(check_system_prompts, tokenizer)
    pf.run(check_model_tokenizers, tokenizer)
    pf.run(check_reward_function, tokenizer)
    pf.run(check_resume)
    pf.run(check_memory_plan)
    if local:
        pf.run(check_local_libraries)
    return pf
