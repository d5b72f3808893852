"""Jobs: where a command becomes a run — validate, plan, open the run directory, assemble data + model
+ loop, run, finish. The only package that wires plan -> train (docs/ARCHITECTURE.md).

    common.py       the run start shared by every job kind, pretraining's assembly, run_job
    finetune.py     `memfit finetune` / `memfit classify`: LoRA / QLoRA / full fine-tuning
    classify.py     encoder sequence classification: data, stratified split, metrics, confusion matrix
    merge.py        `memfit merge`: adapter + base -> a stock-loadable merged HF folder, on CPU
    tools.py        `memfit eval | generate | export` around a saved model
    rundir.py       the run directory: may this run write there; config.yaml first
    resumecheck.py  would this resume fit the checkpoint it continues (read-only check)
    startup.py      SIGTERM/SIGINT before the first step: "nothing was saved"
"""
