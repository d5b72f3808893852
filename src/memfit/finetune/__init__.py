"""Fine-tuning jobs: LoRA / QLoRA / full fine-tuning of causal LMs, encoder classification, and merging.

    load.py      model sources: HF folder, .gguf file (dequantized, cached as a plain HF folder), hub id,
                 offline aliases (smollm2, minilm); 4-bit nf4 loading for --qlora; a fingerprint of the base
    lora.py      peft adapters with per-architecture targets, fp32 trainable params, the resumable
                 "model" part (trainable tensors + base fingerprint), peft-format adapter saves
    formats.py   alpaca / prompt-completion / chat messages / plain text -> input_ids + labels
                 (-100 on prompts)
    batches.py   padded, length-sorted effective batches with an exact O(1) resume position
    jobs.py      run_finetune(cfg): the `memfit finetune` and `memfit classify` entry point
    classify.py  encoder sequence classification: data, stratified split, metrics, confusion matrix
    merge.py     `memfit merge`: adapter + base -> a stock-loadable merged HF folder, on CPU
"""
