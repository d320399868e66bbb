"""Guided-retraining loss terms on hand-made tensors, and the retraining generator on small data."""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cgd.models import build_model
from cgd.retrain import RetrainConfig, guided_losses, guided_retrain


def test_losses_by_hand():
    student = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    reference = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 3.0]])
    labels = torch.tensor([0, 1, 1])
    suspect = torch.tensor([False, True, True])
    T, a, b = 3.0, 0.5, 0.25
    out = guided_losses(student, reference, labels, suspect, T, a, b)
    ce = -math.log(math.exp(2) / (math.exp(2) + 1))
    assert out["ce"].item() == pytest.approx(ce, rel=1e-6)
    kl = 0.0
    for i in (1, 2):
        p = F.softmax(reference[i] / T, 0)
        q = F.softmax(student[i] / T, 0)
        kl += float((p * (p.log() - q.log())).sum())
    kl = kl / 2 * T * T
    assert out["kl"].item() == pytest.approx(kl, rel=1e-5)
    unl = (F.log_softmax(student[1], 0)[1] + F.log_softmax(student[2], 0)[1]).item() / 2
    assert out["unlearn"].item() == pytest.approx(unl, rel=1e-6)
    assert out["total"].item() == pytest.approx(ce + a * kl + b * unl, rel=1e-6)


def test_kl_zero_when_student_matches_reference_and_unlearning_pushes_label_down():
    ref = torch.randn(4, 5)
    student = ref.clone().requires_grad_(True)
    labels = torch.tensor([0, 1, 2, 3])
    out = guided_losses(student, ref, labels, torch.ones(4, dtype=torch.bool), alpha=1.0, beta=1.0)
    assert out["kl"].item() == pytest.approx(0.0, abs=1e-6)
    assert out["ce"].item() == 0.0
    out["total"].backward()
    # gradient descent on beta * log p(label) lowers the label's logit
    assert (student.grad[torch.arange(4), labels] > 0).all()


def test_bounded_unlearning_term():
    """unlearn="log_1mp": mean -log(1 - p(label)) over suspect rows; >= 0, pushes the label down, fades as p -> 0."""
    student = torch.tensor([[4.0, 0.0, -1.0], [0.0, 9.0, 0.0], [1.0, 1.0, 1.0]], requires_grad=True)
    labels = torch.tensor([0, 1, 2])
    suspect = torch.tensor([True, True, False])
    out = guided_losses(student, torch.zeros(3, 3), labels, suspect, alpha=0.0, beta=1.0, unlearn="log_1mp")
    p = F.softmax(student.detach().double(), 1)[torch.arange(3), labels]
    want = float(-(torch.log1p(-p[0]) + torch.log1p(-p[1])) / 2)
    assert out["unlearn"].item() == pytest.approx(want, rel=1e-5)
    assert out["unlearn"].item() > 0
    out["total"].backward()
    assert (student.grad[[0, 1], [0, 1]] > 0).all()  # descent lowers the suspect labels' logits
    assert student.grad[2].abs().sum() > 0  # the clean row still gets its cross-entropy gradient
    # confident label (p ~ 1 - 1e-8) stays finite; an already unlikely label contributes ~0
    big = guided_losses(torch.tensor([[30.0, 0.0]]), torch.zeros(1, 2), torch.tensor([0]), torch.tensor([True]),
                        unlearn="log_1mp")["unlearn"]
    assert torch.isfinite(big) and big.item() > 20
    small = guided_losses(torch.tensor([[-30.0, 0.0]]), torch.zeros(1, 2), torch.tensor([0]), torch.tensor([True]),
                          unlearn="log_1mp")["unlearn"]
    assert 0 <= small.item() < 1e-6
    with pytest.raises(ValueError, match="unlearn must be"):
        guided_losses(student, torch.zeros(3, 3), labels, suspect, unlearn="nope")


def test_unlearning_floor_stops_pushing_unlikely_labels():
    """unlearn_floor: log p(label) is clamped at log(floor): rows already below it add a constant and no gradient."""
    student = torch.tensor([[4.0, 0.0], [-6.0, 0.0]], requires_grad=True)  # p(label 0) ~0.98 and ~0.0025
    labels = torch.tensor([0, 0])
    out = guided_losses(student, torch.zeros(2, 2), labels, torch.ones(2, dtype=torch.bool), alpha=0.0, beta=1.0,
                        unlearn_floor=0.01)
    logp0 = F.log_softmax(student.detach()[0], 0)[0].item()
    assert out["unlearn"].item() == pytest.approx((logp0 + math.log(0.01)) / 2, rel=1e-5)
    out["total"].backward()
    assert student.grad[0, 0] > 0  # the believed label is still pushed down
    assert student.grad[1].abs().sum() == 0  # the unlikely one is left alone
    plain = guided_losses(student.detach(), torch.zeros(2, 2), labels, torch.ones(2, dtype=torch.bool), beta=1.0)
    assert plain["unlearn"].item() < out["unlearn"].item()  # without the floor the sum keeps falling
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="unlearn_floor"):
            guided_losses(student, torch.zeros(2, 2), labels, torch.ones(2, dtype=torch.bool), unlearn_floor=bad)


def test_only_clean_or_only_suspect_batches():
    s, r, y = torch.randn(3, 4), torch.randn(3, 4), torch.tensor([0, 1, 2])
    only_clean = guided_losses(s, r, y, torch.zeros(3, dtype=torch.bool))
    assert only_clean["kl"].item() == 0 and only_clean["unlearn"].item() == 0
    only_susp = guided_losses(s, r, y, torch.ones(3, dtype=torch.bool))
    assert only_susp["ce"].item() == 0 and torch.isfinite(only_susp["total"])


def _toy(n=240, k=3, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    base = np.array([[220, 30, 30], [30, 220, 30], [30, 30, 220]])
    x = np.clip(base[y][:, None, None, :] + rng.normal(0, 20, (n, 16, 16, 3)), 0, 255).astype(np.uint8)
    return x, y


def test_retrain_generator_events_resume_and_early_stop():
    x, y = _toy()
    ref = np.eye(3)[y] * 5.0
    clean, suspect = np.arange(0, 200), np.arange(200, 240)
    cfg = RetrainConfig(epochs=3, max_batches=2, batch_size=64, precision="fp32", log_every=1, tolerance=100.0)

    def run(resume=None, stop_after=None, model=None):
        torch.manual_seed(0)
        m = model or build_model("small-cnn", 3, width=8)
        evs = []
        for ev in guided_retrain(m, x, y, clean, suspect, ref, lambda mm: {"ca": 50.0, "asr": 10.0, "ra": 5.0}, cfg, "cpu", resume=resume):
            evs.append(ev)
            if stop_after is not None and ev["kind"] == "epoch" and ev["epoch"] == stop_after:
                break
        return m, evs

    m_full, evs = run()
    kinds = [e["kind"] for e in evs]
    assert kinds[0] == "epoch" and evs[0]["epoch"] == 0 and kinds[-1] == "done"
    assert [e["epoch"] for e in evs if e["kind"] == "epoch"] == [0, 1, 2, 3]
    assert sum(k == "batch" for k in kinds) == 6
    # stop after epoch 1 and resume from its state: the final weights match the uninterrupted run
    _, part = run(stop_after=1)
    state = [e for e in part if e["kind"] == "epoch" and e["epoch"] == 1][0]["state"]
    torch.manual_seed(0)
    m2 = build_model("small-cnn", 3, width=8)
    rest = list(guided_retrain(m2, x, y, clean, suspect, ref, lambda mm: {"ca": 50.0, "asr": 10.0, "ra": 5.0}, cfg, "cpu", resume=state))
    assert [e["epoch"] for e in rest if e["kind"] == "epoch"] == [2, 3]
    for (k1, v1), (k2, v2) in zip(m_full.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(v1, v2), k1


def test_early_stop_restores_previous_weights():
    x, y = _toy()
    ref = np.eye(3)[y] * 5.0
    cas = iter([80.0, 80.0, 70.0, 70.0])  # before, epoch 1, epoch 2 (drop > tolerance), final
    snaps = []

    def evaluate(m):
        snaps.append({k: v.clone() for k, v in m.state_dict().items()})
        return {"ca": next(cas), "asr": 0.0, "ra": 0.0}

    m = build_model("small-cnn", 3, width=8)
    cfg = RetrainConfig(epochs=5, max_batches=1, batch_size=64, precision="fp32", tolerance=1.0, patience=1)  # the paper's stop
    evs = list(guided_retrain(m, x, y, np.arange(200), np.arange(200, 240), ref, evaluate, cfg, "cpu"))
    ep = [e for e in evs if e["kind"] == "epoch"]
    assert ep[-1]["epoch"] == 2 and ep[-1]["early_stop"]
    assert evs[-1]["stopped_early"] and evs[-1]["best_epoch"] == 1
    after_epoch1 = snaps[1]
    for k, v in m.state_dict().items():
        assert torch.equal(v, after_epoch1[k]), k


def _scripted(cas):
    """An evaluate() that returns the given CAs in call order and records the weights it saw."""
    it, snaps = iter(cas), []

    def evaluate(m):
        snaps.append({k: v.clone() for k, v in m.state_dict().items()})
        return {"ca": next(it), "asr": 0.0, "ra": 0.0}
    return evaluate, snaps


def test_patience_rides_out_a_one_epoch_dip_and_stops_on_a_lasting_drop():
    x, y = _toy()
    ref = np.eye(3)[y] * 5.0
    cfg = RetrainConfig(epochs=6, max_batches=1, batch_size=64, precision="fp32", tolerance=1.0, patience=2)
    # before, ep1 80, ep2 dip 70 (streak 1), ep3 back to 80, ep4 70, ep5 70 -> stop, restore ep3; final
    evaluate, snaps = _scripted([80.0, 80.0, 70.0, 80.0, 70.0, 70.0, 80.0])
    m = build_model("small-cnn", 3, width=8)
    evs = list(guided_retrain(m, x, y, np.arange(200), np.arange(200, 240), ref, evaluate, cfg, "cpu"))
    ep = [e for e in evs if e["kind"] == "epoch"]
    assert [e["epoch"] for e in ep] == [0, 1, 2, 3, 4, 5] and [e["early_stop"] for e in ep] == [False] * 5 + [True]
    assert evs[-1]["stopped_early"] and evs[-1]["best_epoch"] == 1
    assert evs[-1]["kept_epoch"] == 3 and evs[-1]["epochs_run"] == 5 and ep[-1]["restored_epoch"] == 3
    for k, v in m.state_dict().items():
        assert torch.equal(v, snaps[3][k]), k  # the weights after epoch 3, the last within tolerance
    # a streak still open at the last epoch also restores the last good weights
    evaluate, snaps = _scripted([80.0, 80.0, 80.0, 70.0, 80.0])
    m = build_model("small-cnn", 3, width=8)
    evs = list(guided_retrain(m, x, y, np.arange(200), np.arange(200, 240), ref, evaluate,
                              RetrainConfig(epochs=3, max_batches=1, batch_size=64, precision="fp32", patience=2), "cpu"))
    # all 3 epochs ran: the weights were restored, but nothing was left unrun
    assert evs[-1]["restored"] and not evs[-1]["stopped_early"] and [e["early_stop"] for e in evs if e["kind"] == "epoch"][-1]
    assert evs[-1]["kept_epoch"] == 2 and evs[-1]["epochs_run"] == 3
    for k, v in m.state_dict().items():
        assert torch.equal(v, snaps[2][k]), k


def test_resume_in_the_middle_of_a_streak_matches_an_uninterrupted_run():
    x, y = _toy()
    ref = np.eye(3)[y] * 5.0
    cfg = RetrainConfig(epochs=5, max_batches=2, batch_size=64, precision="fp32", tolerance=1.0, patience=3)
    cas = [80.0, 80.0, 70.0, 70.0, 70.0, 99.0]  # ep2-4 below -> stop at 4, restore ep1

    torch.manual_seed(0)
    full = build_model("small-cnn", 3, width=8)
    ev_full, _ = _scripted(cas)
    evs = list(guided_retrain(full, x, y, np.arange(200), np.arange(200, 240), ref, ev_full, cfg, "cpu"))
    assert evs[-1]["stopped_early"]
    torch.manual_seed(0)
    part = build_model("small-cnn", 3, width=8)
    ev_part, _ = _scripted(cas)
    state = None
    for ev in guided_retrain(part, x, y, np.arange(200), np.arange(200, 240), ref, ev_part, cfg, "cpu"):
        if ev["kind"] == "epoch" and ev["epoch"] == 3:
            state = ev["state"]
            break
    assert state["streak"] == 2 and state["good"] is not None
    torch.manual_seed(1)
    resumed = build_model("small-cnn", 3, width=8)
    ev_rest, _ = _scripted(cas[4:])
    rest = list(guided_retrain(resumed, x, y, np.arange(200), np.arange(200, 240), ref, ev_rest, cfg, "cpu", resume=state))
    assert [e["epoch"] for e in rest if e["kind"] == "epoch"] == [4] and rest[-1]["stopped_early"]
    for (k1, v1), (k2, v2) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(v1, v2), k1


def test_retrain_rejects_mismatched_reference():
    x, y = _toy(30)
    with pytest.raises(ValueError, match="reference logits"):
        next(guided_retrain(build_model("small-cnn", 3, width=8), x, y, np.arange(10), np.arange(10, 20), np.zeros((5, 3)),
                            lambda m: {"ca": 0, "asr": 0, "ra": 0}, RetrainConfig(precision="fp32"), "cpu"))


def test_keep_term_distils_clean_samples_from_the_model_before_repair():
    student = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 3.0]])
    before = torch.tensor([[0.0, 2.0, 0.0], [0.0, 1.0, 0.0], [5.0, 0.0, 0.0]])
    labels, suspect = torch.tensor([0, 1, 2]), torch.tensor([False, False, True])
    T = 2.0
    out = guided_losses(student, torch.zeros(3, 3), labels, suspect, T, 0.0, 0.0, before=before, keep=0.5)
    want = 0.0
    for i in (0, 1):  # clean rows only; row 1 matches, so it adds 0
        p, q = F.softmax(before[i] / T, 0), F.softmax(student[i] / T, 0)
        want += float((p * (p.log() - q.log())).sum())
    want = want / 2 * T * T
    assert out["keep"].item() == pytest.approx(want, rel=1e-5) and want > 0
    assert out["total"].item() == pytest.approx(out["ce"].item() + 0.5 * want, rel=1e-5)
    none = guided_losses(student, torch.zeros(3, 3), labels, suspect, T, 0.0, 0.0, before=before, keep=0.0)
    assert none["keep"].item() == 0 and none["total"].item() == pytest.approx(none["ce"].item(), rel=1e-6)


def test_keep_holds_the_predictions_of_the_model_before_repair():
    """Retraining on labels that contradict the model: with a keep weight its predictions stay closer to the old ones."""
    x, y = _toy(300)
    torch.manual_seed(0)
    victim = build_model("small-cnn", 3, width=8)
    list(guided_retrain(victim, x, y, np.arange(300), np.arange(0), np.zeros((300, 3)), lambda m: {"ca": 0.0},
                        RetrainConfig(epochs=2, max_batches=10, min_batches=10, batch_size=64, lr=0.05, precision="fp32",
                                      augment=False), "cpu"))
    from cgd.train import predict

    old = predict(victim, x, "cpu", precision="fp32").argmax(1)
    assert (old == y).mean() > 0.9
    wrong = (y + 1) % 3  # a relabelled half pulls the other way
    y2 = np.where(np.arange(300) % 2 == 0, wrong, y)
    agree = {}
    for keep, hold_out in ((0.0, None), (3.0, None), (3.0, [0, 1, 2])):
        m = copy.deepcopy(victim)
        list(guided_retrain(m, x, y2, np.arange(300), np.arange(0), np.zeros((300, 3)), lambda mm: {"ca": 0.0},
                            RetrainConfig(epochs=2, max_batches=10, min_batches=10, batch_size=64, lr=0.05, keep=keep,
                                          precision="fp32", augment=False), "cpu", hold_out=hold_out))
        agree[keep, str(hold_out)] = float((predict(m, x, "cpu", precision="fp32").argmax(1) == old).mean())
    assert agree[3.0, "None"] > agree[0.0, "None"] + 0.05, agree
    # every class left out: nothing is held, the same run as without the term
    assert agree[3.0, "[0, 1, 2]"] == agree[0.0, "None"], agree


def test_keep_term_leaves_out_the_target_column():
    """A -inf column of the old logits (the verdict's target) is dropped from both distributions; gradients stay finite."""
    before = torch.tensor([[float("-inf"), 2.0, 0.0], [float("-inf"), 0.0, 1.0]])
    student = torch.tensor([[9.0, 2.0, 0.0], [-3.0, 0.5, 1.0]], requires_grad=True)
    labels, suspect = torch.tensor([1, 2]), torch.zeros(2, dtype=torch.bool)
    out = guided_losses(student, torch.zeros(2, 3), labels, suspect, 1.0, 0.0, 0.0, before=before, keep=1.0)
    p = F.softmax(before[1, 1:], 0)
    q = F.softmax(student.detach()[1, 1:], 0)
    want = float((p * (p.log() - q.log())).sum()) / 2  # row 0 agrees on the other classes whatever the target's logit
    assert out["keep"].item() == pytest.approx(want, rel=1e-5)
    out["keep"].backward()
    assert torch.isfinite(student.grad).all() and (student.grad[:, 0] == 0).all()


def test_frozen_batchnorm_keeps_the_running_statistics_of_the_model_before_repair():
    """bn_stats "freeze": retraining batches (here shifted in colour, as stamped ones are) leave the BatchNorm
    running statistics as they were, while the weights still learn; "update" moves them."""
    x, y = _toy(200)
    x_shift = np.clip(x.astype(np.int16) + 60, 0, 255).astype(np.uint8)
    torch.manual_seed(0)
    victim = build_model("small-cnn", 3, width=8)
    bn_keys = [k for k in victim.state_dict() if k.endswith(("running_mean", "running_var"))]
    assert bn_keys
    out = {}
    for mode in ("update", "freeze"):
        m = copy.deepcopy(victim)
        list(guided_retrain(m, x_shift, y, np.arange(200), np.arange(0), np.zeros((200, 3)), lambda mm: {"ca": 0.0},
                            RetrainConfig(epochs=1, max_batches=3, min_batches=3, batch_size=64, lr=0.05, precision="fp32",
                                          bn_stats=mode), "cpu"))
        out[mode] = m
    before, sd = victim.state_dict(), {k: v.state_dict() for k, v in out.items()}
    assert all(torch.equal(before[k], sd["freeze"][k]) for k in bn_keys)
    assert not all(torch.equal(before[k], sd["update"][k]) for k in bn_keys)
    weights = [k for k in before if k.endswith("weight")]
    assert not all(torch.equal(before[k], sd["freeze"][k]) for k in weights)  # the rest trained
    assert out["freeze"].training is False  # retraining ends in eval mode either way
