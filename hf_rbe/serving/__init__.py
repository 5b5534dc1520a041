"""Serving engines: RBE checkpoints outside transformers (layer 4, beside training and evaluation).

    sharding    which tensor-parallel splits an RBE layer allows, and each rank's tensors (torch only)
    vllm        the vLLM quantization plugin, registered through the ``vllm.general_plugins`` entry point

``vllm`` imports vLLM; nothing imports it but vLLM's plugin loader (``hf_rbe.serving.vllm:register``).
"""
