"""The latent weaver: identity when untrained, learns z* - z_base, checkpoints, LoRA, train.py."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from lit_latent.config import TrainerConfig, UserError, WeaverConfig
from lit_latent.memory import EpisodicMemory
from lit_latent.weaver import LoraWeaver, TransformerWeaver, WeaverModule, build_weaver, fit_weaver, load_weaver, save_weaver

ROOT = Path(__file__).resolve().parents[1]
HIDDEN, D, LATENTS = 16, 12, 4
CPU = TrainerConfig(accelerator="cpu")
SMALL = dict(layers=1, heads=2, lr=3e-2, batch_size=32, max_epochs=10, patience=5)


def synthetic(n=96, seed=0):
    """z* = z_base + f(e), f linear, the same shift for every latent: learnable, invisible to the identity."""
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(n, D, generator=g)
    z_base = torch.randn(n, LATENTS, HIDDEN, generator=g)
    f = torch.randn(D, HIDDEN, generator=g) / D**0.5
    return e, z_base, z_base + (e @ f).unsqueeze(1)  # [n, d] -> [n, 1, d], broadcast over the L' latents


def perturbed(weaver, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in weaver.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return weaver


def test_an_untrained_weaver_is_exactly_the_identity(tiny_model_dir):
    e, z_base, _ = synthetic(5)
    assert torch.equal(TransformerWeaver(HIDDEN, D, LATENTS, layers=2, heads=4)(e, z_base), z_base)
    assert torch.equal(LoraWeaver(str(tiny_model_dir), HIDDEN, D, LATENTS)(e, z_base), z_base)
    bf16 = z_base.bfloat16()
    assert torch.equal(TransformerWeaver(HIDDEN, D, LATENTS)(e, bf16), bf16)


def test_fit_learns_what_the_identity_cannot(tmp_path):
    e, z_base, z_star = synthetic()
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    result = fit_weaver(e, z_base, z_star, WeaverConfig(**{**SMALL, "max_epochs": 20}), CPU, tmp_path / "w", seed=0,
                        hidden_size=HIDDEN, model_id="tiny", progress_bar=False)
    assert result.path == tmp_path / "w" and not result.identity  # it learned: no fallback to the identity
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's random stream is left alone
    assert result.train_mse_last < 0.5 * result.train_mse_first
    assert result.val_mse < 0.5 * result.identity_val_mse  # (about 0.31x: z* - z_base is a function of e)
    assert (tmp_path / "w" / "weaver.safetensors").is_file() and (tmp_path / "w" / "logs" / "metrics.csv").is_file()
    assert not (tmp_path / "w" / "checkpoints").exists()  # nothing to resume after a finished fit
    weaver = load_weaver(result.path, HIDDEN, "tiny", latent_count=LATENTS)
    n_val = round(len(e) * 0.2)
    val = torch.randperm(len(e), generator=torch.Generator().manual_seed(0))[:n_val]  # fit_weaver's split
    z = weaver(e[val], z_base[val])
    mse = torch.nn.functional.mse_loss(z, z_star[val])
    assert mse.item() == pytest.approx(result.val_mse, rel=1e-4)
    # the saved weaver moves z, and towards z*: by at least half the true shift on average
    moved, shift = (z - z_base[val]).abs().mean(), (z_star[val] - z_base[val]).abs().mean()
    assert moved > 0.5 * shift
    assert torch.nn.functional.cosine_similarity((z - z_base[val]).flatten(), (z_star[val] - z_base[val]).flatten(), dim=0) > 0.7


def test_fit_without_structure_falls_back_to_the_identity(tmp_path):
    """z* = z_base + noise independent of e and z_base: nothing beats "change nothing" on held-out
    entries, so the saved weaver is exactly the identity."""
    g = torch.Generator().manual_seed(5)
    e, z_base = torch.randn(48, D, generator=g), torch.randn(48, LATENTS, HIDDEN, generator=g)
    z_star = z_base + torch.randn(z_base.shape, generator=g)
    result = fit_weaver(e, z_base, z_star, WeaverConfig(**SMALL), CPU, tmp_path / "w", seed=0, hidden_size=HIDDEN,
                        model_id="tiny", progress_bar=False)
    assert result.identity and result.val_mse == result.identity_val_mse
    weaver = load_weaver(result.path, HIDDEN, "tiny", latent_count=LATENTS)
    assert torch.equal(weaver(e, z_base), z_base)


def test_a_tiny_memory_is_refused(tmp_path):
    e, z_base, z_star = synthetic(1)
    with pytest.raises(UserError, match="too small"):
        fit_weaver(e, z_base, z_star, WeaverConfig(), CPU, tmp_path, 0, HIDDEN, "tiny")


def test_save_load_round_trip_and_refusals(tmp_path):
    cfg = WeaverConfig(layers=1, heads=2)
    weaver = perturbed(build_weaver(cfg, HIDDEN, D, LATENTS))
    save_weaver(weaver, cfg, tmp_path, HIDDEN, "tiny")
    meta = json.loads((tmp_path / "weaver.json").read_text())
    assert meta["weaver"]["layers"] == 1 and (meta["hidden_size"], meta["e_size"], meta["latent_count"]) == (HIDDEN, D, LATENTS)
    loaded = load_weaver(tmp_path, HIDDEN, "tiny")
    e, z_base, _ = synthetic(6)
    weaver.eval().requires_grad_(False)  # the same (inference fast) path of nn.TransformerEncoder as loaded
    assert torch.equal(loaded(e, z_base), weaver(e, z_base))
    assert not any(p.requires_grad for p in loaded.parameters())

    for args, message in [
        ((HIDDEN * 2, "tiny"), f"weaver checkpoint {tmp_path} was trained for model tiny (hidden {HIDDEN}), not tiny (hidden {HIDDEN * 2})"),
        ((HIDDEN, "other"), "not other (hidden"),
        ((tmp_path / "none", HIDDEN, "tiny"), "weaver.json and weaver.safetensors not found"),
    ]:
        with pytest.raises(UserError, match=re.escape(message)) as err:
            load_weaver(*args) if len(args) == 3 else load_weaver(tmp_path, *args)
        assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="on 4 latents per problem, not 8"):
        load_weaver(tmp_path, HIDDEN, "tiny", latent_count=8)
    meta["weaver"]["layers"] = 3  # the config no longer describes the weights
    (tmp_path / "weaver.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=f"weaver checkpoint {tmp_path}: weights do not match its weaver.json"):
        load_weaver(tmp_path, HIDDEN, "tiny")


def test_lora_trains_only_adapters_and_projections(tiny_model_dir, tmp_path):
    cfg = WeaverConfig(kind="lora", lora_r=4, backbone_path=str(tiny_model_dir))
    weaver = build_weaver(cfg, HIDDEN, D, LATENTS)
    trainable = {n for n, p in weaver.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trainable) and {"out.weight", "z_in.1.weight", "e_in.1.weight"} <= trainable
    assert all("lora_" in n or not n.startswith("backbone.") for n in trainable)
    assert {n.split(".")[-4] for n in trainable if "lora_A" in n} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    frozen = {n: p.detach().clone() for n, p in weaver.named_parameters() if not p.requires_grad}
    before = {n: p.detach().clone() for n, p in weaver.named_parameters() if p.requires_grad}

    module = WeaverModule(weaver, lr=1e-2)
    optimizer = module.configure_optimizers()
    e, z_base, z_star = synthetic(8)
    for _ in range(3):  # zero-initialised out and lora_B: gradients reach lora_A from the third step on
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(weaver(e, z_base), z_star).backward()
        optimizer.step()
    changed = {n for n, p in weaver.named_parameters() if p.requires_grad and not torch.equal(p, before[n])}
    assert changed == trainable
    assert all(torch.equal(p, frozen[n]) for n, p in weaver.named_parameters() if not p.requires_grad)

    save_weaver(weaver, cfg, tmp_path, HIDDEN, "tiny")
    with torch.no_grad():
        expected = weaver(e, z_base)
    loaded = load_weaver(tmp_path, HIDDEN, "tiny")
    assert isinstance(loaded, LoraWeaver) and torch.equal(loaded(e, z_base), expected)
    saved = json.loads((tmp_path / "weaver.json").read_text())["weaver"]
    assert saved["backbone_path"] == str(tiny_model_dir)


def test_lora_fit(tiny_model_dir, tmp_path):
    e, z_base, _ = synthetic(32)
    z_star = z_base + torch.linspace(-1, 1, HIDDEN)  # a fixed shift: learnable within a few LoRA epochs
    cfg = WeaverConfig(kind="lora", lora_r=4, lr=1e-2, batch_size=8, max_epochs=4, patience=3)
    result = fit_weaver(e, z_base, z_star, cfg, CPU, tmp_path, 0, HIDDEN, "tiny", backbone_path=str(tiny_model_dir), progress_bar=False)
    assert not result.identity and result.val_mse < 0.5 * result.identity_val_mse  # (about 0.04x)
    weaver = load_weaver(result.path, HIDDEN, "tiny")
    assert isinstance(weaver, LoraWeaver)
    moved = (weaver(e, z_base) - z_base).abs().mean()
    assert moved > 0.5 * (z_star - z_base).abs().mean()


def write_memory(path, n=40):
    e, z_base, z_star = synthetic(n)
    EpisodicMemory(path, "tiny", HIDDEN).add(e, z_base, z_star, [1.0] * n, [f"q{i}" for i in range(n)])


def test_train_py_writes_a_loadable_checkpoint(tmp_path, capsys):
    write_memory(tmp_path / "run" / "memory")
    overrides = ["weaver.layers=1", "weaver.heads=2", "weaver.max_epochs=3", "trainer.accelerator=cpu"]
    result = train.main([f"run_dir={tmp_path / 'run'}", *overrides])
    out = capsys.readouterr().out
    assert result.path == tmp_path / "run" / "weaver" and f"weaver saved to {result.path}" in out
    assert "val_mse" in out and "identity baseline" in out
    assert isinstance(load_weaver(result.path, HIDDEN, "tiny"), TransformerWeaver)
    result = train.main([f"memory.path={tmp_path / 'run' / 'memory'}", f"out={tmp_path / 'elsewhere'}", *overrides])
    assert (tmp_path / "elsewhere" / "weaver.json").is_file()


def test_train_py_resumes_a_killed_fit(tmp_path, monkeypatch, capsys):
    write_memory(tmp_path / "memory")
    args = [f"memory.path={tmp_path / 'memory'}", "weaver.layers=1", "weaver.heads=2", "weaver.patience=50", "trainer.accelerator=cpu"]
    import lightning as L

    class Kill(L.Callback):
        def on_train_epoch_end(self, trainer, module):
            if trainer.current_epoch == 1:
                raise RuntimeError("killed")  # (Lightning turns Ctrl-C into SystemExit(1))

    real_trainer = L.Trainer
    monkeypatch.setattr(L, "Trainer", lambda **kw: real_trainer(**{**kw, "callbacks": kw["callbacks"] + [Kill()]}))
    with pytest.raises(RuntimeError, match="killed"):
        train.main([*args, "weaver.max_epochs=4"])
    monkeypatch.setattr(L, "Trainer", real_trainer)
    assert (tmp_path / "weaver" / "checkpoints" / "last.ckpt").is_file()
    capsys.readouterr()
    result = train.main([*args, "weaver.max_epochs=4"])
    assert "resuming the weaver fit from" in capsys.readouterr().out
    assert result.epochs == 4 and (tmp_path / "weaver" / "weaver.json").is_file()


def test_train_py_without_a_memory_is_one_line_and_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "memory.path=/nonexistent"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: no episodic memory at /nonexistent (manifest.json not found)"]


def test_a_second_fit_into_the_same_out_folder_is_refused_naming_it(tmp_path):
    memory = EpisodicMemory(tmp_path / "memory", "tiny", HIDDEN)
    memory.add(*[torch.randn(2, *shape) for shape in ((D,), (LATENTS, HIDDEN), (LATENTS, HIDDEN))], [0.9, 0.8], ["a", "b"])
    out = tmp_path / "weaver"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from lit_latent.runs import hold_lock; "
                               f"hold_lock({str(out)!r}, 'out'); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = subprocess.run([sys.executable, str(ROOT / "train.py"), f"memory.path={tmp_path / 'memory'}", f"out={out}"],
                              capture_output=True, text=True, cwd=tmp_path)
    finally:
        holder.kill()
    assert proc.returncode == 2
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("error: config key out:") and f"pid {holder.pid}" in line
    assert not (out / "weaver.json").exists()


def test_checkpoint_records_whether_its_memory_used_labels(tmp_path):
    from lit_latent.memory import check_labels

    cfg = WeaverConfig(layers=1, heads=2)
    save_weaver(build_weaver(cfg, HIDDEN, D, LATENTS), cfg, tmp_path / "w", HIDDEN, "tiny", uses_labels=True)
    weaver = load_weaver(tmp_path / "w", HIDDEN, "tiny")
    assert weaver.uses_labels is True
    with pytest.raises(UserError, match="config key weaver.checkpoint: .* uses the gold labels"):
        check_labels(weaver.uses_labels, False, "weaver.checkpoint", f"weaver checkpoint {tmp_path / 'w'}")
    save_weaver(build_weaver(cfg, HIDDEN, D, LATENTS), cfg, tmp_path / "v", HIDDEN, "tiny")
    assert load_weaver(tmp_path / "v", HIDDEN, "tiny").uses_labels is None


@pytest.fixture(scope="module")
def mamba_dir(tmp_path_factory):
    """A tiny random Mamba: no attention projections; its blocks' linears are in_proj, x_proj, dt_proj and out_proj
    (which peft refuses for Mamba: its fused kernels read that weight directly)."""
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-mamba")
    MambaForCausalLM(MambaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, state_size=4, expand=2)).save_pretrained(path)
    return path


def test_lora_on_a_backbone_without_attention_adapts_its_blocks_linears(mamba_dir, tmp_path, capsys):
    # python train.py weaver.kind=lora weaver.backbone_path=<a Mamba>: adapters on the blocks' linears, a loadable checkpoint
    write_memory(tmp_path / "memory")
    result = train.main([f"memory.path={tmp_path / 'memory'}", "weaver.kind=lora", f"weaver.backbone_path={mamba_dir}",
                         "weaver.lora_r=2", "weaver.max_epochs=1", "trainer.accelerator=cpu"])
    weaver = load_weaver(result.path, HIDDEN, "tiny")
    adapted = {n.split(".")[-4] for n, p in weaver.named_parameters() if "lora_A" in n}
    assert isinstance(weaver, LoraWeaver) and adapted == {"in_proj", "x_proj", "dt_proj"}


def test_lora_on_a_backbone_with_no_layer_to_adapt_is_refused_in_one_line(mamba_dir, monkeypatch):
    import lit_latent.weaver as weaver_module

    monkeypatch.setattr(weaver_module, "lora_targets", lambda backbone, lora: None)  # as for a backbone peft knows nothing of
    with pytest.raises(UserError, match=rf"^config key weaver.backbone_path: {re.escape(str(mamba_dir))} \(mamba\) has no layer LoRA can adapt: [^\n]*$"):
        build_weaver(WeaverConfig(kind="lora", backbone_path=str(mamba_dir)), HIDDEN, D, LATENTS)


@pytest.mark.parametrize("strategy", ["fsdp", "fsdp_cpu_offload"])
def test_fsdp_is_refused_in_one_line(strategy, tmp_path, capsys):
    # Lightning 2.6 runs FSDP on CUDA only (its accelerator connector refuses others): nothing of ours could test it
    from lit_latent.runs import run_entry_point

    write_memory(tmp_path / "memory")
    rc = run_entry_point(train.main, [f"memory.path={tmp_path / 'memory'}", "weaver.kind=lora", f"trainer.strategy={strategy}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith(f"error: config key trainer.strategy: {strategy} is not supported") and "\n" not in err


@pytest.mark.slow  # two processes start Lightning and peft (about 40 s on 2 CPU cores)
def test_lora_weaver_under_two_process_ddp_writes_a_checkpoint(tiny_model_dir, tmp_path):
    write_memory(tmp_path / "memory", n=24)
    out = tmp_path / "weaver"
    run = subprocess.run([sys.executable, str(ROOT / "train.py"), f"memory.path={tmp_path / 'memory'}", f"out={out}",
                          "weaver.kind=lora", f"weaver.backbone_path={tiny_model_dir}", "weaver.lora_r=2",
                          "weaver.max_epochs=2", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("weaver saved to") == 1  # one report, from rank 0
    weaver = load_weaver(out, HIDDEN, "tiny", backbone_path=str(tiny_model_dir))
    e, z_base, _ = synthetic(2)
    assert isinstance(weaver, LoraWeaver) and weaver(e, z_base).shape == (2, LATENTS, HIDDEN)
