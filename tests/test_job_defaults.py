"""Each job kind has its own optimizer defaults (issue 10 items 8 and 9): asserted on the optimizer's
real param_groups and the real schedule's warmup, in --help of each subcommand, and in config.yaml —
which, like --help, shows only the options that job reads."""

import math

import pytest
import torch
import yaml

from memfit import api, cli
from memfit import config as C
from memfit.device import detect
from memfit.jobs.common import assemble_job

# (command line, job kind) -> (lr, weight decay, beta2, warmup steps of a 100-step run)
CASES = {
    ("train",): (1e-3, 0.1, 0.95, 50),
    ("finetune", "--model", "m"): (2e-5, 0.0, 0.999, 10),               # ratio 0.1
    ("finetune", "--model", "m", "--lora"): (2e-4, 0.0, 0.999, 3),      # ratio 0.03, rounded up
    ("finetune", "--model", "m", "--qlora"): (2e-4, 0.0, 0.999, 3),
    ("classify", "--model", "m"): (5e-5, 0.01, 0.999, 10),
}


class Batches:      # a resumable stream for the registry; assemble_job never draws from it
    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def parse(argv):
    args = cli.build_parser().parse_args(list(argv))
    return cli.config_from_args(args, {"train": "pretrain"}.get(argv[0], argv[0]))


def peak_index(sched, total):
    f = sched.lr_lambdas[0]
    return next(i for i in range(total) if f(i) == pytest.approx(1.0))


def optimizer_figures(cfg, tiny_gpt2, total=100):
    job = assemble_job(cfg, tiny_gpt2, Batches(), total, detect(), None, checkpoint=False)
    decay, no_decay = job.optimizer.param_groups
    assert no_decay["weight_decay"] == 0.0       # biases and norms are never decayed
    # "initial_lr": the peak the schedule scales ("lr" already holds the first warmup step's value)
    return decay["initial_lr"], decay["weight_decay"], decay["betas"][1], peak_index(job.scheduler, total), decay


@pytest.mark.parametrize("argv", list(CASES), ids=lambda a: "-".join(x for x in a if x != "m"))
def test_defaults_reach_the_real_optimizer(argv, tiny_gpt2):
    lr, wd, beta2, warmup, decay = optimizer_figures(parse(argv), tiny_gpt2)
    assert (lr, wd, beta2, warmup) == CASES[argv]
    assert decay["betas"][0] == 0.9


def test_given_values_win_over_job_defaults(tiny_gpt2):
    cfg = parse(("finetune", "--model", "m", "--lora", "--lr", "1e-3", "--warmup-steps", "7",
                 "--weight-decay", "0.05", "--beta2", "0.98"))
    assert optimizer_figures(cfg, tiny_gpt2)[:4] == (1e-3, 0.05, 0.98, 7)
    cfg = parse(("train", "--warmup-ratio", "0.25"))       # a ratio replaces pretraining's 50 steps
    assert optimizer_figures(cfg, tiny_gpt2)[3] == 25
    with pytest.raises(C.ConfigError, match="give --warmup-steps or --warmup-ratio, not both"):
        raise C.ConfigError(C.validate(parse(("train", "--warmup-ratio", "0.1", "--warmup-steps", "3"))))


def test_memfit_fit_takes_torch_adamw_defaults_and_a_real_run_warms_up(tmp_path):
    """memfit.fit: torch's AdamW defaults (lr 1e-3, wd 0.01, betas 0.9/0.999), no warmup; a given
    warmup_ratio shapes the lr of every step of a real run."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    data = [{"x": torch.randn(4), "y": torch.tensor(i % 2)} for i in range(32)]

    def loss_fn(m, b):
        return torch.nn.functional.cross_entropy(m(b["x"]), b["y"], reduction="sum"), b["y"].numel()

    cfg = api.make_config(None, tmp_path / "d", {})
    o = cfg.optim
    assert (o.lr, o.weight_decay, o.beta1, o.beta2, o.warmup_steps) == (1e-3, 0.01, 0.9, 0.999, 0)
    res = api.fit(model, data, loss_fn=loss_fn, output_dir=tmp_path / "run", max_steps=8, batch_size=8,
                  warmup_ratio=0.25, log_every=1, eval_every=0, quiet=True, precision="fp32")
    lrs = [r["lr"] for r in res.history if r["kind"] == "train"]
    # 2 warmup steps (ceil(0.25 * 8)), then cosine to 0.1x: the lr after each of the 8 steps
    f = lambda s: (s + 1) / 3 if s < 2 else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - 2) / 6))
    assert lrs == pytest.approx([1e-3 * f(s) for s in range(1, 9)])
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["optim"]["warmup_ratio"] == 0.25 and saved["optim"]["warmup_steps"] is None
    assert "data" not in saved and "model" not in saved and "lora" not in saved   # fit reads none of them


def subparser(command):
    return cli.build_parser()._subparsers._group_actions[0].choices[command]


def help_of(command):
    return " ".join(subparser(command).format_help().split())


def flags_of(command):
    return {s for a in subparser(command)._actions for s in a.option_strings}


def test_each_subcommand_help_shows_its_own_options_and_defaults():
    train, finetune, classify = help_of("train"), help_of("finetune"), help_of("classify")
    assert "--lr X Peak learning rate. [default: 0.001]" in train
    assert "[default: 2e-05 full fine-tuning, 0.0002 with --lora/--qlora]" in finetune
    assert "--lr X Peak learning rate. [default: 5e-05]" in classify
    assert "--beta2 X Adam beta2. [default: 0.95]" in train and "[default: 0.999]" in classify
    assert "not both. [default: 0.1 full fine-tuning, 0.03 with --lora/--qlora]" in finetune
    assert "accuracy, f1). [default: f1]" in classify and "accuracy, f1). [default: val_loss]" in train
    pretrain_only = {"--arch", "--target-params", "--vocab-size", "--sample-prompt", "--tokenizer", "--seq-len"}
    assert not flags_of("classify") & (pretrain_only | {"--lora-r", "--val-data", "--sample-tokens"})
    assert not flags_of("finetune") & (pretrain_only | {"--class-weights"})
    assert not flags_of("train") & {"--model", "--max-seq-len", "--class-weights", "--lora-r"}
    assert {"--class-weights", "--eval-batches"} <= flags_of("classify")
    assert pretrain_only <= flags_of("train") and "--lora-r" in flags_of("finetune")


def test_config_yaml_of_classify_records_only_what_classify_reads(tmp_path):
    from memfit.jobs.rundir import prepare_run_dir
    cfg = parse(("classify", "--model", "m", "--data", "bbc"))
    prepare_run_dir(cfg, tmp_path)
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert "tokenizer" not in saved["data"] and "arch" not in saved["model"] and "lora" not in saved
    # classify loads the encoder with --attn-implementation (issue 12), so config.yaml records it
    assert saved["model"] == {"model": "m", "attn_implementation": "sdpa"} and saved["checkpoint"]["metric_for_best"] == "f1"
    assert (saved["optim"]["lr"], saved["optim"]["weight_decay"], saved["optim"]["beta2"]) == (5e-5, 0.01, 0.999)
    assert C.load_yaml(tmp_path / "config.yaml") == cfg      # what is left out comes back as its default
