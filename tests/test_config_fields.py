"""Every field of the typed config (memfit.config) is read by something a test proves (issue 12): each has a
behavioural test named here, or sits on the commented allowlist below saying why not. A name found in
config/ or cli.py is not a reader; the test named must exist and pass the field to a run or a function
(its flag, its keyword or its key appears in that test's own body).

Adding a field: add a test that shows what it does and name it in BEHAVIOURAL."""

import ast
import dataclasses
import re
from pathlib import Path

from memfit.config.groups import Config

TESTS = Path(__file__).resolve().parent

# field -> "file::test" that shows what the field does
BEHAVIOURAL = {
    "task": "test_classify.py::test_minilm_on_bbc_reaches_macro_f1",
    "data.data": "test_api_contract.py::test_gradient_checkpointing_on_plain_module_refused_before_writing",
    "data.val_data": "test_eval_oom.py::test_finetune_eval_oom_shrinks_the_eval_batch_with_the_same_val_loss",
    "data.val_fraction": "test_classify.py::test_minilm_on_bbc_reaches_macro_f1",
    "data.text_field": "test_finetune_data.py::test_formats_are_recognised_by_their_fields",
    "data.text_split": "test_data_sources.py::test_paragraph_mode",
    "data.tokenizer": "test_best_model.py::test_best_and_checkpoints_load_with_from_pretrained_and_generate",
    "data.vocab_size": "test_context_and_crash.py::test_short_context_training_and_generate",
    "data.seq_len": "test_build.py::test_built_model_has_the_sized_parameter_count",
    "data.stride": "test_data_stream.py::test_packing_eos_stride_and_val_tail",
    "data.max_seq_len": "test_classify.py::test_minilm_on_bbc_reaches_macro_f1",
    "data.max_val_examples": "test_classify_validation.py::test_eval_batches_and_max_val_examples_on_a_real_run",
    "data.epoch_tokens": "test_plan_user.py::test_epoch_tokens_sizes_the_epoch",
    "data.shuffle_buffer_size": "test_data_stream.py::test_resume_at_batch_10000_reads_one_chunk",
    "data.max_examples": "test_data_stream.py::test_max_examples_and_subset",
    "data.subset_ratio": "test_classify.py::test_minilm_on_bbc_reaches_macro_f1",
    "data.encoding": "test_data_sources.py::test_grid_units_partition_text_and_jsonl",
    "data.on_bad_record": "test_data_sources.py::test_bad_jsonl_records_skip_or_fail",
    "data.num_workers": "test_data_stream.py::test_resume_exact",
    "model.arch": "test_context_and_crash.py::test_short_context_training_and_generate",
    "model.target_params": "test_context_and_crash.py::test_short_context_training_and_generate",
    "model.model": "test_api_fit.py::test_custom_module_survives_injected_oom",
    "model.dropout": "test_build.py::test_config_fields",
    "model.attn_implementation": "test_attention.py::test_eager_attention_costs_its_probabilities_in_both_engines",
    "optim.optimizer": "test_checkpoint.py::test_atomic_layout_manifest_and_weights_only",
    "optim.lr": "test_api_contract.py::test_gradient_checkpointing_on_plain_module_refused_before_writing",
    "optim.weight_decay": "test_classify.py::test_minilm_on_bbc_reaches_macro_f1",
    "optim.beta2": "test_job_defaults.py::test_given_values_win_over_job_defaults",
    "optim.warmup_steps": "test_classify.py::test_minilm_on_bbc_reaches_macro_f1",
    "optim.warmup_ratio": "test_job_defaults.py::test_given_values_win_over_job_defaults",
    "train.batch_size": "test_classify.py::test_minilm_on_bbc_reaches_macro_f1",
    "train.gradient_accumulation_steps": "test_config_cli.py::test_effective_batch",
    "train.effective_batch": "test_config_cli.py::test_effective_batch",
    "train.epochs": "test_classify.py::test_minilm_on_bbc_reaches_macro_f1",
    "train.max_steps": "test_api_contract.py::test_gradient_checkpointing_on_plain_module_refused_before_writing",
    "train.precision": "test_attention.py::test_an_eager_run_measures_the_peak_its_plan_priced",
    "train.gradient_checkpointing": "test_api_contract.py::test_gradient_checkpointing_on_plain_module_refused_before_writing",
    "train.eval_every": "test_attention.py::test_an_eager_run_measures_the_peak_its_plan_priced",
    "train.eval_strategy": "test_epoch_strategy.py::test_three_epochs_checkpoint_and_evaluate_at_each_epoch_end",
    "train.eval_batches": "test_attention.py::test_an_eager_run_measures_the_peak_its_plan_priced",
    "train.log_every": "test_classify.py::test_minilm_on_bbc_reaches_macro_f1",
    "train.seed": "test_checkpoint.py::test_resume_is_exact",
    "train.sample_tokens": "test_attention.py::test_an_eager_run_measures_the_peak_its_plan_priced",
    "checkpoint.save_every": "test_api_fit.py::test_killed_process_resumes_bit_identically",
    "checkpoint.save_every_minutes": "test_checkpoint.py::test_should_save_every_n_steps",
    "checkpoint.save_strategy": "test_epoch_strategy.py::test_three_epochs_checkpoint_and_evaluate_at_each_epoch_end",
    "checkpoint.keep_last": "test_best_model.py::test_keep_last_0_keeps_best_only_once_finished",
    "checkpoint.save_optimizer_state": "test_checkpoint.py::test_full_and_light_modes",
    "checkpoint.metric_for_best": "test_checkpoint.py::test_best_survives_rotation_and_early_stopping",
    "checkpoint.early_stopping_patience": "test_checkpoint.py::test_best_survives_rotation_and_early_stopping",
    "checkpoint.mirror_to": "test_checkpoint_mirror.py::test_mirror_copies_rotates_and_resume_uses_it",
    "checkpoint.resume": "test_api_fit.py::test_sigint_saves_and_a_second_call_resumes_exactly",
    "checkpoint.overwrite": "test_rundir_safety.py::test_overwrite_refuses_a_directory_that_is_not_a_memfit_run",
    "budget.gpu": "test_attention.py::test_flash_attention_2_without_cuda_is_refused_before_anything_is_written",
    "budget.platform": "test_doctor.py::test_json_has_every_field_with_this_machines_values",
    "budget.gpu_memory": "test_doctor.py::test_json_has_every_field_with_this_machines_values",
    "budget.time_limit": "test_notebook.py::test_notebook_runs_top_to_bottom",
    "budget.deadline": "test_deadline.py::test_stop_arithmetic",
    "budget.disk_budget": "test_attention.py::test_an_eager_run_measures_the_peak_its_plan_priced",
    "budget.auto_fit": "test_gpu_truth.py::test_cpu_tiny_run_recovers_from_a_real_oom_and_matches_a_fresh_run",
    "budget.preflight": "test_preflight_run.py::test_preflight_on_trains_bit_identically_and_records_its_peak",
    "oom.empty_cache_every": "test_oom.py::test_empty_cache_every_n_steps",
    "oom.inject_oom_above_tokens": "test_api_fit.py::test_each_call_releases_the_previous_runs_memory",
    "lora.lora": "test_finetune_qlora.py::test_qlora_trains_under_fp16_gradscaler_with_8bit_adamw",
    "lora.qlora": "test_finetune_qlora.py::test_4bit_load_and_fp32_adapters",
    "lora.lora_alpha": "test_plan_trace.py::test_trace_matches_independent_measurement_with_peft",
    "lora.lora_dropout": "test_plan_trace.py::test_trace_matches_independent_measurement_with_peft",
    "lora.train_on_prompt": "test_finetune_data.py::test_loss_only_on_responses",
    "run.output_dir": "test_api_contract.py::test_gradient_checkpointing_on_plain_module_refused_before_writing",
    "run.name": "test_atomic_swap.py::test_exception_after_any_step_leaves_the_target_whole",
    "run.quiet": "test_api_contract.py::test_gradient_checkpointing_on_plain_module_refused_before_writing",
    "run.verbose": "test_phase_bars.py::test_quiet_lasts_one_command_and_leaves_the_environment_alone",
    "data.packing": "test_finetune_packing.py::test_packing_on_where_it_does_not_work_exits_2_and_auto_pads",
    "train.chunked_loss": "test_chunked_loss.py::test_switch_reaches_the_plan",
}

# Fields without a behavioural test of their own, each with the reason (none is unread: the reader is named).
ALLOWLIST = {
    "optim.beta1": "read by jobs/common.assemble_job (the AdamW betas it builds); no test changes it yet",
    "optim.min_lr_ratio": "read by jobs/common.assemble_job -> models/optim.warmup_cosine; no test changes it yet",
    "optim.max_grad_norm": "read by train/loop (clip_grad_norm_), train/preflight and plan/spec; tests run the default 1.0",
    "train.sample_prompt": "read by jobs/pretrain's eval sample; only --help shows it in tests",
    "train.class_weights": "read by jobs/classify (balanced class weights); only --help shows it in tests",
    "checkpoint.greater_is_better": "read by ckpt/best (metric direction); tests use the per-metric default",
    "budget.ram": "read by plan/spec.resolve_target (host RAM budget); no test gives it",
    "oom.oom_regrow": "read by jobs/common.assemble_job (the OOMController's regrow); no test turns it on",
    "lora.lora_r": "read by jobs/finetune (apply_lora) and plan/spec; tests use the default rank 8",
    "lora.lora_target_modules": "read by jobs/finetune and plan/spec (models/lora.lora_targets); tests use the defaults",
    "run.report_to": "read by jobs/common (History) and metrics; tensorboard/wandb are not installed offline",
}


def config_fields() -> list[tuple[str, dataclasses.Field]]:
    out = []
    for group in dataclasses.fields(Config):
        if group.default_factory is dataclasses.MISSING:
            out.append((group.name, group))
            continue
        out += [(f"{group.name}.{f.name}", f) for f in dataclasses.fields(group.default_factory())]
    return out


def test_every_config_field_has_a_behavioural_test_or_a_reason():
    names = {name for name, _ in config_fields()}
    assert not set(BEHAVIOURAL) & set(ALLOWLIST)
    assert names - set(BEHAVIOURAL) - set(ALLOWLIST) == set(), "name a behavioural test (or a reason)"
    assert set(BEHAVIOURAL) | set(ALLOWLIST) <= names, "a field named here no longer exists"


def test_each_named_test_exists_and_uses_its_field():
    bodies: dict[str, dict[str, str]] = {}
    for name, field in config_fields():
        if name not in BEHAVIOURAL:
            continue
        file, test = BEHAVIOURAL[name].split("::")
        if file not in bodies:
            src = (TESTS / file).read_text()
            bodies[file] = {n.name: ast.get_source_segment(src, n) for n in ast.parse(src).body
                            if isinstance(n, ast.FunctionDef)}
        body = bodies[file].get(test)
        assert body is not None, f"{name}: {file}::{test} does not exist"
        leaf = name.rsplit(".", 1)[-1]
        flag = field.metadata.get("flag") or "--" + leaf.replace("_", "-")
        assert re.search(re.escape(flag) + r"\b|\b" + leaf + r"\s*=|\"" + leaf + r"\"", body), \
            f"{name}: {file}::{test} does not pass {flag}"
