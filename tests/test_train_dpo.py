"""06_train_dpo.py: the loss on hand cases, log-probs, parity with TRL's DPOTrainer, DDP, resume,
LoRA merge, reference sources, bad input. Pairs are built by hand from the tiny toy world."""
import importlib
import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch

import common
import train_state
import vlm
from conftest import ROOT, dpo_argv, make_pairs, recording_trl_trainer, run_main, write

dpo = importlib.import_module("06_train_dpo")


# ---- fixtures ---------------------------------------------------------------------------------
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def toy(toy_tiny, tmp_path_factory):
    d = tmp_path_factory.mktemp("pairs")
    return {"root": toy_tiny, "model": toy_tiny / "models" / "toy-llava", "images": toy_tiny / "data" / "toy" / "images",
            "pairs": write(d / "pairs.jsonl", make_pairs(toy_tiny, 12)), "dir": d}


def sidecar(out):
    return json.loads((out / "log.jsonl.meta.json").read_text())


# ---- the method on hand cases -------------------------------------------------------------------
def test_dpo_loss_hand_cases():
    z = torch.zeros(3)
    losses, cr, rr = dpo.dpo_loss(z - 4, z - 7, z - 4, z - 7, beta=0.1)
    assert torch.allclose(losses, torch.full((3,), math.log(2))) and not cr.any() and not rr.any()
    pc, pr, rc, rr_ = map(torch.tensor, ([-1.0], [-3.0], [-2.0], [-2.0]))
    losses, cr, rr = dpo.dpo_loss(pc, pr, rc, rr_, beta=0.1)  # the docstring's worked example
    assert cr.item() == pytest.approx(0.1) and rr.item() == pytest.approx(-0.1)
    assert losses.item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.2))), abs=1e-6)
    assert losses.item() == pytest.approx(0.5981, abs=1e-4)
    _, cr, rr = dpo.dpo_loss(pc, pr, rc, rr_, beta=0.5)  # rewards = beta x log-ratio
    assert (cr.item(), rr.item()) == pytest.approx((0.5, -0.5))
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    ls, _, _ = dpo.dpo_loss(pc, pr, rc, rr_, beta=0.1, label_smoothing=0.2)
    assert ls.item() == pytest.approx(-0.8 * math.log(sig(0.2)) - 0.2 * math.log(sig(-0.2)), abs=1e-6)
    ipo, cr, _ = dpo.dpo_loss(pc, pr, rc, rr_, beta=0.1, loss_type="ipo")
    assert ipo.item() == pytest.approx((2 - 1 / 0.2) ** 2) and cr.item() == pytest.approx(0.1)
    # IPO on per-token averages: chosen over 2 tokens, rejected over 4 -> h = (-0.5 + 1) - (-0.75 + 0.5) = 0.75
    n2, n4 = torch.tensor([2]), torch.tensor([4])
    ipo, cr, rr = dpo.dpo_loss(pc, pr, rc, rr_, beta=0.1, loss_type="ipo", chosen_n_tokens=n2, rejected_n_tokens=n4)
    assert ipo.item() == pytest.approx((0.75 - 5) ** 2) and (cr.item(), rr.item()) == pytest.approx((0.05, -0.025))
    same, _, _ = dpo.dpo_loss(pc, pr, rc, rr_, beta=0.1, chosen_n_tokens=n2, rejected_n_tokens=n4)
    assert same.item() == pytest.approx(0.5981, abs=1e-4)  # the sigmoid loss ignores lengths
    with pytest.raises(ValueError, match="unknown loss_type"):
        dpo.dpo_loss(pc, pr, rc, rr_, loss_type="hinge")
    total = dpo.mia_dpo_loss(torch.tensor([0.69]), torch.tensor([-6.0]), torch.tensor([3]), dpo_alpha=1.0, gamma=0.5)
    assert total.item() == pytest.approx(1.69)
    assert [dpo.lr_factor(s, 2, 10) for s in (0, 1, 2, 3, 10, 11)] == [0, 0.5, 1, 0.875, 0, 0]


def test_model_parts_finds_a_vq_image_tokenizer_as_the_vision_encoder():
    """A model whose images reach the LM as codes of a VQ image tokenizer (`vqmodel`), no vision tower."""
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = torch.nn.Module()
            self.model.layers = torch.nn.ModuleList([torch.nn.Linear(2, 2)])
            self.model.vqmodel = torch.nn.Conv2d(3, 2, 1)

        def get_decoder(self):
            return self.model

    assert train_state.model_parts(Model()) == ("model", ["model.vqmodel"], [])


def test_pair_order_same_pairs_whatever_the_world_size():
    n, gb = 23, 4
    for step in range(12):  # 5 steps per epoch: crosses two epoch boundaries
        one = dpo.pair_order(n, 7, step, gb, 0, 1, 0, 1)
        two = [i for r in range(2) for i in dpo.pair_order(n, 7, step, gb, r, 2, 0, 1)]
        acc = [i for m in range(2) for r in range(2) for i in dpo.pair_order(n, 7, step, gb, r, 2, m, 2)]
        assert one == two == acc and len(set(one)) == 4
    epoch = [i for s in range(5) for i in dpo.pair_order(n, 7, s, gb, 0, 1, 0, 1)]
    assert len(set(epoch)) == 20  # an epoch never repeats a pair (the 3 left over are dropped)


# ---- log-probs ------------------------------------------------------------------------------------
def test_concatenated_logps_equal_per_example(toy):
    model, proc = vlm.load_model(toy["model"])
    pairs, _ = dpo.load_pairs(toy["pairs"], toy["images"], proc, 4096, "raise")
    batch_pairs = pairs[:3]
    assert len({p["n_images"] for p in batch_pairs}) > 1  # unequal lengths: padding is exercised
    with torch.no_grad():
        chosen, rejected, n_chosen, n_rejected = dpo.concatenated_forward(model, dpo.collate(batch_pairs, toy["images"], proc, model))
        sums, n = torch.cat([chosen, rejected]), torch.cat([n_chosen, n_rejected])
        single = []
        for answer in ("chosen", "rejected"):
            for p in batch_pairs:
                ims = [common.load_image(toy["images"], r) for r in p["images"]]
                b = vlm.build_inputs(proc, [p["prompt"]], [ims], answers=[p[answer]])
                single.append(vlm.response_logps(model, b)[0])
    assert torch.allclose(sums, torch.cat(single), atol=1e-5)
    assert (n >= 2).all()  # the answer word(s) and EOS are scored


# ---- parity with TRL's DPOTrainer -------------------------------------------------------------------
@pytest.mark.slow
def test_first_steps_equal_trl_dpotrainer(toy, tmp_path):
    """Same model, same 4 pairs (one global batch, so every step sees all of them in both), full
    fine-tune of every weight, AdamW, linear schedule, clipping: loss, rewards and log-probs of 3
    steps agree to 1e-4, after checking TRL builds exactly our tokens."""
    datasets = pytest.importorskip("datasets")
    rows = make_pairs(toy["root"], 4, seed=3)
    pairs_path = write(tmp_path / "pairs.jsonl", rows)
    model, proc = vlm.load_model(toy["model"])
    tok = proc.tokenizer

    # TRL gets 05's export (05_post_select.to_trl): the rendered prompt with the BOS our tokenizer adds
    # written out (its collator tokenises with add_special_tokens=False), the responses with EOS (its
    # vision path adds none).
    ps = importlib.import_module("05_post_select")
    exported = ps.to_trl(rows, proc, toy["images"])
    assert exported[0]["prompt"].startswith(tok.bos_token) and exported[0]["chosen"].endswith(tok.eos_token)
    ds = datasets.Dataset.from_list([{**{k: e[k] for k in ("prompt", "chosen", "rejected")},
                                      "images": [common.load_image(toy["images"], p) for p in r["image"]]}
                                     for e, r in zip(exported, rows)])
    trainer, seen = recording_trl_trainer(toy["model"], ds, proc, tmp_path / "trl")

    # 1. tokens: TRL's collated batch == ours, row by row (padding aside), scored positions too
    theirs = trainer.data_collator([ds[i] for i in range(4)])
    ours_pairs, _ = dpo.load_pairs(pairs_path, toy["images"], proc, 4096, "raise")
    ours = dpo.collate(ours_pairs, toy["images"], proc, model)
    for i in range(8):
        t_mask, o_mask = theirs["attention_mask"][i].bool(), ours["attention_mask"][i].bool()
        assert theirs["input_ids"][i][t_mask].tolist() == ours["input_ids"][i][o_mask].tolist(), i
        assert theirs["completion_mask"][i][t_mask].bool().tolist() == (ours["labels"][i][o_mask] != -100).tolist(), i
    assert torch.equal(theirs["pixel_values"], ours["pixel_values"])

    # 2. numbers: three steps of each
    trainer.train()
    log = run_main(toy, tmp_path / "ours", "--lora-r", "0", "--tune-vision", "--tune-projector", "--batch-size", "4",
                   "--max-steps", "3", "--lr", "1e-4", "--max-grad-norm", "1.0", pairs=pairs_path)
    assert len(seen) == len(log) == 3
    for t, o in zip(seen, log):
        assert o["loss"] == pytest.approx(t["loss"], abs=1e-4)
        assert o["reward_chosen"] == pytest.approx(t["rewards/chosen"], abs=1e-4)
        assert o["reward_rejected"] == pytest.approx(t["rewards/rejected"], abs=1e-4)
        assert o["logps_chosen"] == pytest.approx(t["logps/chosen"], abs=1e-4)
        assert o["logps_rejected"] == pytest.approx(t["logps/rejected"], abs=1e-4)
    assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and abs(log[2]["loss"] - math.log(2)) > 1e-3  # it moved
    assert sidecar(tmp_path / "ours")["reference"] == "frozen-copy"


# ---- distributed, resume, merge ---------------------------------------------------------------------
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_processes_equal_one_process(toy, tmp_path, capsys):
    """Global batch 2 as 1 process x 2 pairs and as torchrun 2 processes x 1 pair (gloo, with
    activation checkpointing, which must not change a number): same losses, rewards, log-probs."""
    common_args = ["--max-steps", "3", "--lr", "5e-3", "--replay", str(toy["root"] / "data" / "toy" / "train.json"),
                   "--replay-weight", "0.5"]  # the replay term's own backward: the step's last, the one that syncs
    a = run_main(toy, tmp_path / "one", "--batch-size", "2", "--replay-batch", "2", "--plot", *common_args)
    one = capsys.readouterr().out
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
                          str(ROOT / "06_train_dpo.py"), *dpo_argv(toy, tmp_path / "two", "--batch-size", "1", "--replay-batch", "1",
                                                               "--grad-ckpt", *common_args)],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert two.returncode == 0, two.stdout + two.stderr
    b = [r for _, r in common.read_rows(tmp_path / "two" / "log.jsonl")]
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        for k in ("loss", "reward_chosen", "reward_rejected", "logps_chosen", "logps_rejected", "replay_nll"):
            assert x[k] == pytest.approx(y[k], abs=1e-4), (x["step"], k)
        for by in ("by_format", "by_images"):
            assert {g: (v["n"], v["acc"]) for g, v in x[by].items()} == {g: (v["n"], v["acc"]) for g, v in y[by].items()}
    assert abs(a[-1]["loss"] - math.log(2)) > 1e-3  # updates happened, so gradients were averaged alike
    assert "1 process(es) x 2 pairs" in one and "2 process(es) x 1 pairs" in two.stdout
    assert two.stdout.count("step ") >= 3 and "acc by format" in two.stdout  # rank 0 alone prints
    assert (tmp_path / "one" / "curves.png").stat().st_size > 1000
    assert sidecar(tmp_path / "two")["counts"]["world_size"] == 2


@pytest.mark.slow
def test_fsdp_full_finetune_equals_one_process_and_resumes(toy, tmp_path):
    """Full fine-tune sharded over 2 torchrun processes (FSDP2, gloo): same losses and the same
    saved weights as one process; resumed from its step-2 checkpoint, the same step 3."""
    from safetensors.torch import load_file

    args = ["--lora-r", "0", "--max-steps", "3", "--lr", "1e-3", "--replay", str(toy["root"] / "data" / "toy" / "train.json"),
            "--replay-weight", "0.5"]
    a = run_main(toy, tmp_path / "one", "--batch-size", "2", "--replay-batch", "2", *args)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def torchrun(out, *extra):
        run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                              str(_free_port()), str(ROOT / "06_train_dpo.py"),
                              *dpo_argv(toy, out, "--batch-size", "1", "--replay-batch", "1", "--fsdp", *args, *extra)],
                             capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
        assert run.returncode == 0, run.stdout + run.stderr
        return [r for _, r in common.read_rows(out / "log.jsonl")]

    b = torchrun(tmp_path / "fsdp", "--save-every", "2")
    c = torchrun(tmp_path / "resumed", "--resume", str(tmp_path / "fsdp" / "checkpoints" / "step-000002"))
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], abs=1e-4)
    assert [r["replay_nll"] for r in b] == pytest.approx([r["replay_nll"] for r in a], abs=1e-4)
    assert [r["step"] for r in c] == [3] and c[0]["loss"] == pytest.approx(b[2]["loss"], abs=1e-6)
    w = {d: load_file(tmp_path / d / "final" / "model.safetensors") for d in ("one", "fsdp", "resumed")}
    assert set(w["one"]) == set(w["fsdp"]) == set(w["resumed"])
    for k in w["one"]:  # subtle: Adam scales tiny gradients up, so their float noise moves a weight by ~1e-5
        assert torch.allclose(w["one"][k], w["fsdp"][k], atol=1e-4) and torch.allclose(w["fsdp"][k], w["resumed"][k], atol=1e-6)
    with pytest.raises(SystemExit, match="--fsdp shards a full fine-tune"):
        run_main(toy, tmp_path / "x", "--fsdp")


def test_resume_gives_the_uninterrupted_loss_sequence(toy, tmp_path):
    full = run_main(toy, tmp_path / "full", "--max-steps", "5", "--save-every", "2", "--keep-checkpoints", "0", "--lr", "5e-3")
    ck = tmp_path / "full" / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["step-000002", "step-000004", "step-000005"]
    resumed = run_main(toy, tmp_path / "resumed", "--max-steps", "5", "--lr", "5e-3", "--resume", str(ck / "step-000002"))
    assert [r["step"] for r in resumed] == [3, 4, 5]
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in full[2:]], abs=1e-6)
    # --resume auto in the same folder: the log is cut back to the checkpoint and continued
    again = run_main(toy, tmp_path / "full", "--max-steps", "5", "--lr", "5e-3", "--resume", "auto")
    assert [r["step"] for r in again] == [1, 2, 3, 4, 5]  # step 5's checkpoint is the latest: nothing left to do
    with pytest.raises(SystemExit, match="not a checkpoint folder"):
        run_main(toy, tmp_path / "x", "--resume", str(tmp_path))


def test_lora_training_save_merge_reload_same_logps(toy, tmp_path):
    rows = make_pairs(toy["root"], 4, seed=5)
    pairs_path = write(tmp_path / "pairs.jsonl", rows)
    log = run_main(toy, tmp_path / "run", "--batch-size", "4", "--max-steps", "8", "--lr", "1e-2", "--merge", pairs=pairs_path)
    assert log[-1]["loss"] < log[0]["loss"] - 0.05 and log[-1]["acc"] >= log[0]["acc"]  # it learns these 4 pairs
    from peft import PeftModel

    base, proc = vlm.load_model(toy["model"])
    pairs, _ = dpo.load_pairs(pairs_path, toy["images"], proc, 4096, "raise")
    batch = dpo.collate(pairs, toy["images"], proc, base)
    with torch.no_grad():
        ref = vlm.response_logps(base, batch)[0]
        adapter = PeftModel.from_pretrained(base, tmp_path / "run" / "adapter").eval()
        via_adapter = vlm.response_logps(adapter.get_base_model(), batch)[0]
        merged, _ = vlm.load_model(tmp_path / "run" / "final")  # what 04 and 07 load
        via_merged = vlm.response_logps(merged, batch)[0]
        on_load, _ = vlm.load_model(toy["model"], adapter=tmp_path / "run" / "adapter")  # merged on load
        via_on_load = vlm.response_logps(on_load, batch)[0]
    assert not torch.allclose(ref, via_adapter, atol=1e-3)  # training changed the model
    assert torch.allclose(via_adapter, via_merged, atol=1e-4)
    assert torch.allclose(via_on_load, via_merged, atol=1e-4)
    assert sidecar(tmp_path / "run")["saved"] == [str(tmp_path / "run" / "adapter"), str(tmp_path / "run" / "final")]


# ---- reference sources -----------------------------------------------------------------------------
def test_reference_sources_agree_and_stored_logps_are_checked(toy, tmp_path):
    model, proc = vlm.load_model(toy["model"])
    fp = vlm.model_fingerprint(model)
    pairs, _ = dpo.load_pairs(toy["pairs"], toy["images"], proc, 4096, "raise")
    with torch.no_grad():
        c, r, _, _ = dpo.concatenated_forward(model, dpo.collate(pairs, toy["images"], proc, model))
    rows = [json.loads(x) for x in toy["pairs"].read_text().splitlines()]
    stored = [{**row, "ref_chosen_logps": float(c[i]), "ref_rejected_logps": float(r[i]),
               "ref_model": {"path": str(toy["model"]), "fingerprint": fp},
               "ref_text": vlm.text_fingerprint(proc, row["prompt"], [row["chosen"], row["rejected"]])}
              for i, row in enumerate(rows)]
    stored_path = write(tmp_path / "stored.jsonl", stored)
    logs = {}
    for name, extra, pairs_path in (("lora", [], None), ("full", ["--lora-r", "0"], None), ("stored", [], stored_path)):
        logs[name] = run_main(toy, tmp_path / name, "--max-steps", "2", *extra, pairs=pairs_path)
    assert {n: sidecar(tmp_path / n)["reference"] for n in logs} == {
        "lora": "adapters-disabled", "full": "frozen-copy", "stored": "stored"}
    for step in range(2):
        for k in ("ref_logps_chosen", "ref_logps_rejected"):
            assert logs["lora"][step][k] == pytest.approx(logs["full"][step][k], abs=1e-5)
            assert logs["lora"][step][k] == pytest.approx(logs["stored"][step][k], abs=1e-5)
    # log-probs from another model: refused, unless told to recompute
    other = write(tmp_path / "other.jsonl", [{**row, "ref_model": {"path": "x", "fingerprint": "0123abcd"}} for row in stored])
    with pytest.raises(SystemExit, match="not the loaded model"):
        run_main(toy, tmp_path / "o", "--max-steps", "1", pairs=other)
    run_main(toy, tmp_path / "o", "--max-steps", "1", "--ref-logps", "recompute", pairs=other)
    assert sidecar(tmp_path / "o")["reference"] == "adapters-disabled"
    # log-probs of other prompt tokens (a chat template that writes the date, rendered yesterday): refused
    dated = write(tmp_path / "dated.jsonl", stored[:6] + [{**row, "ref_text": "0123456789abcdef"} for row in stored[6:]])
    with pytest.raises(SystemExit, match="6 pairs .* render to other tokens than 04 scored"):
        run_main(toy, tmp_path / "d", "--max-steps", "1", pairs=dated)
    mixed = write(tmp_path / "mixed.jsonl", stored[:6] + rows[6:])
    with pytest.raises(SystemExit, match="lack ref_chosen_logps"):
        run_main(toy, tmp_path / "m", "--max-steps", "1", pairs=mixed)


# ---- bad input --------------------------------------------------------------------------------------
def test_bad_pairs_are_listed_or_counted_and_long_ones_dropped(toy, tmp_path):
    rows = [json.loads(x) for x in toy["pairs"].read_text().splitlines()]
    bad = [dict(r) for r in rows]
    bad[1]["image"] = bad[1]["image"][:-1]  # one marker too many
    bad[3]["image"] = ["plain/does-not-exist.png"] + bad[3]["image"][1:]
    bad[5]["chosen"] = ""
    bad[7]["ref_chosen_logps"] = 1.0  # half a stored reference
    path = write(tmp_path / "bad.jsonl", bad)
    with pytest.raises(SystemExit) as e:
        run_main(toy, tmp_path / "a", "--max-steps", "1", pairs=path)
    msg = str(e.value)
    assert "4 bad pairs" in msg and "bad.jsonl:2: prompt" in msg and "does-not-exist.png" in msg
    assert "bad.jsonl:6: chosen" in msg and "bad.jsonl:8: ref_chosen_logps" in msg and "--on-error skip" in msg
    run_main(toy, tmp_path / "b", "--max-steps", "1", "--on-error", "skip", pairs=path)
    meta = sidecar(tmp_path / "b")
    assert meta["counts"]["pairs_used"] == 8 and meta["skipped"]["by_reason"] == {"bad pair": 4}
    # --max-length: the 3-image pairs (3 x 65 visual tokens + text) are dropped and counted, never cut
    _, proc = vlm.load_model(toy["model"])
    kept, skips = dpo.load_pairs(toy["pairs"], toy["images"], proc, 180, "raise")
    assert kept and all(p["n_images"] == 2 for p in kept) and skips.counts["too long"] == 12 - len(kept)
    with pytest.raises(SystemExit, match="04_gen_pairs.py"):
        run_main(toy, tmp_path / "c", pairs=tmp_path / "missing.jsonl")


def test_non_finite_loss_stops_after_saving_a_checkpoint(toy, tmp_path, monkeypatch):
    real, calls = dpo.dpo_loss, []

    def poisoned(*a, **k):
        losses, cr, rr = real(*a, **k)
        calls.append(1)
        return (losses * float("nan") if len(calls) == 3 else losses), cr, rr

    monkeypatch.setattr(dpo, "dpo_loss", poisoned)
    with pytest.raises(SystemExit, match="non-finite loss at step 3"):
        run_main(toy, tmp_path / "nan", "--max-steps", "5")
    assert [r["step"] for _, r in common.read_rows(tmp_path / "nan" / "log.jsonl")] == [1, 2]
    assert (tmp_path / "nan" / "checkpoints" / "step-000002" / "trainer_state.pt").is_file()
    assert sidecar(tmp_path / "nan")["status"].startswith("non-finite loss at step 3")


# ---- the replay term ----------------------------------------------------------------------------------
def test_replay_loss_hand_case():
    # an answer of 2 tokens + EOS with log-prob -1.5 in all: mean NLL 0.5; weight 0.5 -> 0.25; weight 0 -> 0
    lp, n = torch.tensor([-1.5, -4.0]), torch.tensor([3, 2])
    assert dpo.replay_loss(lp, n, 1.0).tolist() == pytest.approx([0.5, 2.0])
    assert dpo.replay_loss(lp, n, 0.5).tolist() == pytest.approx([0.25, 1.0])
    assert dpo.replay_loss(lp, n).tolist() == [0.0, 0.0]


def test_replay_step_gradient_equals_a_naive_sum_of_both_terms(toy, tmp_path, monkeypatch):
    """One step's gradient with the replay term = the gradient of mean(pair loss) (plain path) +
    weight x mean over the step's replay rows of each row's own token NLL, from full logits."""
    replay = toy["root"] / "data" / "toy" / "train.json"
    grads, nlls, real = [], [], dpo.replay_loss

    def record_grads(opt, *a, **k):  # the gradients the first step would apply; the weights stay as loaded
        grads.append([p.grad.detach().clone() for p in opt.param_groups[0]["params"]])

    def record_nlls(logps, n_tokens, weight):
        nlls.extend((-logps.detach() / n_tokens).tolist())
        return real(logps, n_tokens, weight)

    monkeypatch.setattr(torch.optim.AdamW, "step", record_grads)
    monkeypatch.setattr(dpo, "replay_loss", record_nlls)
    log = run_main(toy, tmp_path / "g", "--lora-r", "0", "--gamma", "0.5", "--batch-size", "3", "--max-grad-norm", "1e9",
                   "--replay", str(replay), "--replay-weight", "0.7", "--replay-batch", "4", "--max-steps", "1")
    assert log[0]["n"] == 3 and len(nlls) == 4 and len(grads) == 1
    meta = sidecar(tmp_path / "g")
    assert meta["args"]["replay_batch"] == 4 and meta["replay_skips"] == {"total": 0, "by_reason": {}, "rows": []}

    model, proc = vlm.load_model(toy["model"], dtype="float32")  # the weights the step saw (frozen copy = reference)
    train_state.prepare_policy(model, "stored")  # the same trainable weights: vision tower and projector frozen
    trainable = [p for p in model.parameters() if p.requires_grad]
    pairs, _ = dpo.load_pairs(toy["pairs"], toy["images"], proc, 4096, "raise")
    rows, _ = dpo.load_replay(replay, toy["images"], proc, 4096, "raise")
    pairs = [pairs[i] for i in dpo.pair_order(len(pairs), 0, 0, 3, 0, 1, 0, 1)]
    plain = dpo.collate(pairs, toy["images"], proc, model)
    with torch.no_grad():
        ref_c, ref_r, _, _ = dpo.concatenated_forward(model, plain)
    c, r, nc, _ = dpo.concatenated_forward(model, plain)
    pair_loss = dpo.mia_dpo_loss(dpo.dpo_loss(c, r, ref_c, ref_r, 0.1)[0], c, nc, 1.0, 0.5).mean()
    naive = []
    for i in dpo.pair_order(len(rows), 1, 0, 4, 0, 1, 0, 1):
        row = rows[i]
        b = vlm.build_inputs(proc, [row["prompt"]], [[common.load_image(toy["images"], x) for x in row["images"]]],
                             answers=[row["answer"]])
        logits = model(**{k: v for k, v in b.items() if k not in ("labels", "prompt_lens")}).logits[0, :-1]
        tgt = b["labels"][0, 1:]
        keep = tgt != vlm.IGNORE_INDEX
        naive.append(-torch.log_softmax(logits[keep].float(), -1).gather(-1, tgt[keep][:, None]).mean())
    assert torch.stack(naive).tolist() == pytest.approx(nlls, abs=1e-5)
    (pair_loss + 0.7 * torch.stack(naive).mean()).backward()
    assert len(grads[0]) == len(trainable)
    for got, p in zip(grads[0], trainable):
        assert torch.allclose(got, p.grad, atol=1e-6, rtol=1e-4)
    assert sum(float(g.abs().sum()) for g in grads[0]) > 0


def test_replay_rows_bad_input_resume_and_auto(toy, tmp_path):
    """Bad replay rows are listed (file:line: field) or counted; the replay rows of a step follow
    from (seed, step), so a resumed run repeats the uninterrupted one; --replay auto wants the
    toy world's train.json beside --pairs."""
    rows = json.loads((toy["root"] / "data" / "toy" / "train.json").read_text())[:12]
    bad = [dict(r) for r in rows]
    del bad[1]["conversations"]
    bad[4] = {**bad[4], "image": [bad[4]["image"], bad[4]["image"]]}  # two images, one marker
    bad[6] = {**bad[6], "image": "plain/does-not-exist.png"}
    path = write(tmp_path / "replay.jsonl", bad)
    extra = ["--replay", str(path), "--replay-weight", "0.5"]
    with pytest.raises(SystemExit) as e:
        run_main(toy, tmp_path / "a", "--max-steps", "1", *extra)
    msg = str(e.value)
    assert "3 bad replay rows" in msg and "replay.jsonl:2: conversations" in msg
    assert "replay.jsonl:5: conversations[0].value" in msg and "does-not-exist.png" in msg
    run_main(toy, tmp_path / "b", "--max-steps", "1", "--on-error", "skip", *extra)
    meta = sidecar(tmp_path / "b")
    assert meta["counts"]["replay_rows"] == 9 and meta["replay_skips"]["by_reason"] == {"bad replay row": 3}
    full = run_main(toy, tmp_path / "full", "--max-steps", "4", "--save-every", "2", "--lr", "5e-3", *extra, "--on-error", "skip")
    resumed = run_main(toy, tmp_path / "res", "--max-steps", "4", "--lr", "5e-3", *extra, "--on-error", "skip",
                       "--resume", str(tmp_path / "full" / "checkpoints" / "step-000002"))
    assert [r["replay_nll"] for r in resumed] == pytest.approx([r["replay_nll"] for r in full[2:]], abs=1e-6)
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in full[2:]], abs=1e-6)
    with pytest.raises(SystemExit, match="--replay auto looks for the toy world's train.json beside --pairs"):
        run_main(toy, tmp_path / "c", "--max-steps", "1", "--replay", "auto", "--replay-weight", "1")
    with pytest.raises(SystemExit, match="no replay term would be trained"):  # a file without a weight (the paper's 0)
        run_main(toy, tmp_path / "e", "--max-steps", "1", "--replay", str(path))
    with pytest.raises(SystemExit, match="without replay rows"):  # a weight without a file (the paper's none)
        run_main(toy, tmp_path / "e", "--max-steps", "1", "--replay-weight", "1")
    with pytest.raises(SystemExit, match="fewer than one step's 40"):
        run_main(toy, tmp_path / "d", "--max-steps", "1", *extra, "--on-error", "skip", "--replay-batch", "40")


# ---- recipes ----------------------------------------------------------------------------------------
def test_recipe_toy_for_a_toy_model_paper_for_any_other_and_flags_win(toy, tmp_path, capsys):
    """With no flags, a model 00 built gets the toy recipe and any other checkpoint the paper's
    (never the toy's full fine-tune at lr 2e-4); flags given on the command line always win."""
    import shutil

    real = tmp_path / "real-model"  # the same weights without 00's toy_report.json: "a real checkpoint"
    shutil.copytree(toy["model"], real, ignore=shutil.ignore_patterns("toy_report.json"))
    cases = {"toy": [], "real": ["--model", str(real)], "forced": ["--model", str(real), "--recipe", "toy"],
             "flag": ["--model", str(real), "--lr", "1e-3", "--no-grad-ckpt"]}
    got = {}
    for name, extra in cases.items():  # get_args applies the recipe: main reads final flags
        got[name] = dpo.get_args(["--model", str(toy["model"]), *extra])
    assert {n: a.recipe for n, a in got.items()} == {"toy": "toy", "real": "paper", "forced": "toy", "flag": "paper"}
    assert (got["toy"].lora_r, got["toy"].lr, got["toy"].gamma, got["toy"].epochs) == (0, 2e-4, 1.0, 6)
    assert (got["toy"].replay, got["toy"].replay_weight, got["real"].replay, got["real"].replay_weight) == ("auto", 1.0, "none", 0.0)
    assert (got["real"].lora_r, got["real"].lora_alpha, got["real"].lr, got["real"].gamma) == (128, 256, 5e-5, 0.0)
    assert got["real"].dtype == "bfloat16" and got["real"].grad_ckpt and got["real"].grad_accum == 8
    assert got["flag"].lr == 1e-3 and got["flag"].grad_ckpt is False and "lr" not in got["flag"].recipe_values
    out = capsys.readouterr().out
    assert "06_train_dpo: recipe paper (auto: not a toy model): --lora-r 128 --lora-alpha 256" in out
    assert "--dtype bfloat16 --grad-ckpt --save-every 100 --merge" in out
    # the recipe a run used is in its sidecar
    run_main(toy, tmp_path / "run", "--max-steps", "1")
    meta = sidecar(tmp_path / "run")
    assert meta["args"]["recipe"] == "paper" and meta["args"]["lr"] == 5e-5


def test_stored_reference_refused_when_the_image_settings_differ():
    """The weights' fingerprint cannot see a changed --max-image-tokens: the settings' record can."""
    pairs = [{"ref": (-1.0, -2.0), "ref_fingerprint": "f", "ref_images": "settings-a", "ref_fresh": True}]
    assert dpo.pick_reference(pairs, "auto", "f", True, "settings-a") == "stored"
    with pytest.raises(SystemExit, match="other image settings"):
        dpo.pick_reference(pairs, "auto", "f", True, "settings-b")
    assert dpo.pick_reference(pairs, "recompute", "f", True, "settings-b") == "adapters-disabled"
    old = [{"ref": (-1.0, -2.0), "ref_fingerprint": "f", "ref_images": None, "ref_fresh": True}]  # pairs 04 wrote before the record
    assert dpo.pick_reference(old, "auto", "f", True, "settings-b") == "stored"
