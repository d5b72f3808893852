"""Jobs: where a command becomes a run — validate, plan, open the run directory, assemble data + model
+ loop, run, finish. The only package that wires plan -> train (docs/ARCHITECTURE.md).

    dispatch.py     `memfit train | finetune | classify`: task -> job kind (the one place)
    common.py       THE run start (validate once, device, run dir, seed), the run length, assemble_job,
                    run_job: shared by every job kind and memfit.fit; depends on no kind
    pretrain.py     `memfit train`: tokenizer, a model sized to --target-params, streams, unigram floor
    finetune.py     `memfit finetune`: LoRA / QLoRA / full fine-tuning of a causal LM
    classify.py     `memfit classify`: encoder sequence classification: data, stratified split, metrics,
                    confusion matrix
    merge.py        `memfit merge`: adapter + base -> a stock-loadable merged HF folder, on CPU
    tools.py        `memfit eval | generate | export` around a saved model
    rundir.py       the run directory: may this run write there; config.yaml first
    resumecheck.py  would this resume fit the checkpoint it continues (read-only check)
    startup.py      SIGTERM/SIGINT before the first step: "nothing was saved"
"""
