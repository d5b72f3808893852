"""The plan as a new user reads it (issue 10 item 4): LoRA/QLoRA disk figures, platform budgets, epoch and
step lines that agree, examples-per-step for fine-tuning, --epoch-tokens, Llama-2-7B's shape, and a plan
that does not fit naming the settings that do. Every figure is checked against a value computed by hand."""

import json
import math

import pytest

from memfit import cli
from memfit.plan import make_plan
from memfit.plan.report import render_plan

MiB = 2 ** 20
# SmolLM2-135M's shape (the offline GGUF's config), as a config.json: reading the GGUF's metadata costs ~30 s.
SMOLLM2 = {"model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9,
           "num_key_value_heads": 3, "intermediate_size": 1536, "vocab_size": 49152,
           "max_position_embeddings": 8192, "tie_word_embeddings": True, "rms_norm_eps": 1e-5}
# By hand: embeddings 49152*576 + 30 blocks of (2*576^2 + 2*576*192 + 3*576*1536 + 2*576) + final norm 576
SMOLLM2_PARAMS = 49152 * 576 + 30 * (2 * 576 ** 2 + 2 * 576 * 192 + 3 * 576 * 1536 + 2 * 576) + 576
# LoRA r=8 on q,k,v,o: A (in x 8) + B (8 x out) each; k and v project to 3 kv heads x 64 = 192
SMOLLM2_LORA = 30 * (2 * (576 * 8 + 8 * 576) + 2 * (576 * 8 + 8 * 192))


def parse(*argv):
    args = cli.build_parser().parse_args(["plan", *argv])
    return cli.config_from_args(args, "pretrain")


@pytest.fixture
def sft(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(SMOLLM2))
    data = tmp_path / "sft.jsonl"          # 80 records: 4 held out (ceil 5%), 76 train
    data.write_text("".join(json.dumps({"instruction": f"q{i}", "output": "a" * 40}) + "\n" for i in range(80)))
    return tmp_path / "config.json", data


def lora_plan(sft, *extra):
    model, data = sft
    cfg = parse("--model", str(model), "--lora", "--data", str(data), "--batch-size", "4",
                "--effective-batch", "8", "--max-seq-len", "128", "--epochs", "1", "--gpu", "t4", *extra)
    return make_plan(cfg, engine="analytic", task="lora")


def test_lora_disk_figures_are_the_adapter(sft):
    assert SMOLLM2_PARAMS == 134_515_008 and SMOLLM2_LORA == 921_600
    p = lora_plan(sft)
    d = p.disk
    assert p.analytic.trainable_params == SMOLLM2_LORA
    assert d.final_model == 4 * SMOLLM2_LORA == 3_686_400                 # the fp32 adapter, 3.5 MiB
    assert d.merged_model == 2 * SMOLLM2_PARAMS                            # memfit merge: fp16 base, 256.6 MiB
    # adapter + 2 fp32 Adam moments + a 4-byte step count per adapter tensor (240: 30 layers x 4 x A,B) + state
    full = 4 * SMOLLM2_LORA + 8 * SMOLLM2_LORA + 4 * 240 + 2 * MiB
    light = 4 * SMOLLM2_LORA + 2 * MiB
    assert (d.checkpoint_full, d.checkpoint_light) == (full, light)
    # keep-last 4, auto: 2 full + 2 light, + best/ (light) + final_model/ (the adapter)
    assert d.policy_bytes == 2 * full + 3 * light + 4 * SMOLLM2_LORA == 47_351_680
    text = render_plan(p)
    assert "final model (adapter) 3.52 MiB; merged fp16 256.57 MiB" in text
    assert "job: LoRA fine-tuning (r=8 on q_proj,k_proj,v_proj,o_proj)" in text and "from scratch" not in text


def test_finetune_epoch_is_examples_over_effective_batch_and_lines_agree(sft):
    t = lora_plan(sft, "--packing", "off").time
    assert (t.epoch_examples, t.epoch_steps, t.total_steps) == (76, 10, 10)   # ceil(76 / 8), no packing
    assert t.epoch_seconds == pytest.approx(10 * t.step_seconds) == pytest.approx(t.total_seconds)
    text = render_plan(lora_plan(sft, "--packing", "off"))
    epoch = next(x for x in text.splitlines() if "epoch =" in x)
    steps = next(x for x in text.splitlines() if "10 steps ≈" in x and "epoch" not in x)
    assert "76 examples / effective batch 8 (padded, no packing) = 10 steps" in epoch
    assert epoch.split("≈")[-1].strip() == steps.split("≈")[1].split(";")[0].strip()


def test_platform_sets_budgets_and_gpu_only_the_device(sft):
    p = lora_plan(sft, "--platform", "kaggle")
    assert p.target.ram_bytes == 30 * 10 ** 9 and p.disk.budget == 20 * 10 ** 9
    assert p.time.session_seconds == 9 * 3600 and p.target.profile.name == "t4"
    assert p.disk.checkpoints_fit == (20 * 10 ** 9 - p.disk.final_model - p.disk.checkpoint_light) \
        // p.disk.checkpoint_full
    assert "platform: Kaggle notebook: 9 h session, 20 GB /kaggle/working, 30 GB RAM" in render_plan(p)
    given = lora_plan(sft, "--platform", "kaggle", "--disk-budget", "5GB", "--time-limit", "2h")
    assert given.disk.budget == 5 * 10 ** 9 and given.time.session_seconds == 7200   # given budgets win
    import psutil
    plain = lora_plan(sft)                          # --gpu t4 alone: this machine's RAM, no session
    assert plain.target.ram_bytes == psutil.virtual_memory().total and plain.time.session_seconds is None


def test_epoch_tokens_sizes_the_epoch():
    p = make_plan(parse("--epoch-tokens", "103M", "--epochs", "1", "--gpu", "t4", "--target-params", "3M",
                        "--batch-size", "16", "--seq-len", "256"), engine="analytic")
    t = p.time
    assert t.epoch_tokens == 103_000_000 and t.epoch_steps == math.ceil(103e6 / (16 * 256)) == 25_147
    assert t.total_steps == 25_147 and t.epoch_seconds == pytest.approx(25_147 * t.step_seconds)
    assert "epoch = 103.00M tokens / 4,096 per step (--epoch-tokens) = 25,147 steps" in render_plan(p)


def test_llama_7b_is_llama2_7b_and_qlora_is_never_from_scratch():
    p = make_plan(parse("--arch", "llama", "--target-params", "7B", "--gpu", "t4", "--seq-len", "512",
                        "--batch-size", "1", "--vocab-size", "32000"), engine="analytic", task="qlora")
    c = p.model.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
            c.intermediate_size) == (32, 4096, 32, 32, 11008)
    text = render_plan(p)
    assert "from scratch" not in text and "job: QLoRA fine-tuning" in text


def test_not_fitting_names_settings_that_fit_and_nothing_fitting_exits_3(capsys):
    from memfit.plan import plan_main  # what `memfit plan` runs (the analytic engine keeps this fast)
    cfg = parse("--arch", "llama", "--target-params", "350M", "--gpu", "t4", "--seq-len", "1024",
                "--batch-size", "64", "--vocab-size", "32000")
    assert plan_main(cfg, as_json=True, engine="analytic") == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] is False and out["micro_batch"] == 64
    fit = out["fits_with"]
    assert fit["nvidia_smi_bytes"] <= fit["budget_bytes"] and "--batch-size" in fit["flags"]
    mb = int(fit["flags"].split("--batch-size ")[1].split()[0])
    # the same 64 rows per step: as accumulation when mb divides 64, else as the effective batch
    assert 1 <= mb < 64 and (f"--gradient-accumulation-steps {64 // mb}" in fit["flags"] if 64 % mb == 0
                             else "--effective-batch 64" in fit["flags"])
    assert plan_main(cfg, engine="analytic") == 0
    assert "does not fit at these settings; these do" in capsys.readouterr().out
    # Full pretraining of 7B on a T4: fp32 weights alone are 26 GB; nothing fits at all
    big = parse("--arch", "llama", "--target-params", "7B", "--gpu", "t4", "--seq-len", "256",
                "--vocab-size", "32000")
    assert plan_main(big, engine="analytic") == 3
    assert "does not fit" in capsys.readouterr().err


def test_a_small_model_on_a_gpu_is_priced_at_its_kernel_launches_not_0_ms():
    """A 2-layer GPT on a T4 has ~0.1 ms of FLOPs a step; eager PyTorch launches ~120 kernels a step (45 a layer,
    30 outside them) at ~10 us each, so the plan prices 1.2 ms and says why (it printed "0 ms/step")."""
    from memfit.plan.report import _dur
    from memfit.plan.timing import KERNELS_OUTSIDE_LAYERS, KERNELS_PER_LAYER, LAUNCH_SECONDS
    cfg = parse("--gpu", "t4", "--target-params", "300k", "--seq-len", "64", "--vocab-size", "1024",
                "--batch-size", "8", "--max-steps", "100")
    p = make_plan(cfg, engine="analytic")
    layers = p.spec.model_config.n_layer
    assert (layers, KERNELS_PER_LAYER, KERNELS_OUTSIDE_LAYERS, LAUNCH_SECONDS) == (2, 45, 30, 10e-6)
    assert p.time.step_seconds == pytest.approx((2 * 45 + 30) * 10e-6)
    assert p.time.tokens_per_second == pytest.approx(8 * 64 / 1.2e-3)
    text = render_plan(p)
    assert "time: 1 ms/step" in text and "launch-bound: ~120 kernel launches x 10 us" in text
    assert " 0 ms" not in text
    assert (_dur(1.2e-4), _dur(1.2e-3), _dur(0.0)) == ("0.12 ms", "1 ms", "0 ms")
    cpu = make_plan(parse("--target-params", "300k", "--seq-len", "64", "--vocab-size", "1024"), engine="analytic")
    assert "launch-bound" not in cpu.time.how         # a CPU launches nothing
