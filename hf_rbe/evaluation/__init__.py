"""Measuring RBE models next to others: metrics, sizes, results, the comparison (data: ``hf_rbe.data``).

    metrics     local ``evaluate`` metric modules (perplexity, embedding cosine, probe accuracy)
    measure     sliding-window perplexity, sentence embeddings
    sizes       bits per weight of any quantized model (RBE, HQQ, quanto, bitsandbytes)
    baselines   the scalar min-max quantizer the benchmarks compare with
    results     result files stamped with machine, date and command
    reload      a checkpoint's logits from a plain from_pretrained in a fresh process
    memory      peak resident memory of a job, overall and per calibration phase
    llama_cpp   llama.cpp as a peer: its quantizer and its forward, through llama-cpp-python
    compare     hf-rbe compare: methods, run, report
"""
