"""``CategoryMargins``: the update rule (docs/design.md, "Margins"), state, logging; ``CatDPOLoss`` bookkeeping."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _utils import make_batch

import catdpo_kernels
from catdpo_kernels import PKU_SAFERLHF_CATEGORIES, STAT_COLUMNS, CatDPOLoss, CategoryMargins

K = len(STAT_COLUMNS)
COL = {name: i for i, name in enumerate(STAT_COLUMNS)}


def table(count, unsafe=None, reward_acc=None, reward_tie=None, none_row=(5.0, 1.0)):
    """A (C+1, K) stats table; only the columns the margins read matter, the rest is noise."""
    c = len(count)
    t = torch.rand(c + 1, K, generator=torch.Generator().manual_seed(c)) * 3
    t[:c, COL["count"]] = torch.tensor(count, dtype=torch.float32)
    if unsafe is not None:
        t[:c, COL["unsafe_pref_sum"]] = torch.tensor(unsafe, dtype=torch.float32)
    if reward_acc is not None:
        t[:c, COL["reward_acc"]] = torch.tensor(reward_acc, dtype=torch.float32)
    t[:c, COL["reward_tie"]] = torch.tensor(reward_tie or [0.0] * c, dtype=torch.float32)
    t[c, COL["count"]], t[c, COL["unsafe_pref_sum"]] = none_row
    return t


def f32(x):
    """Round to fp32 the way the margins are stored."""
    return float(np.float32(x))


# ------------------------------------------------------------------ the rule
def test_unsafe_category_rises_and_safe_category_falls_by_hand():
    m = CategoryMargins(2, init=0.5, lr=0.5, target=0.1, ema=0.0)
    new = m.update(table([10, 10], unsafe=[8, 0]))
    # r = [0.8, 0.0]: Δ = 0.5 + 0.5·(r − 0.1).
    assert new.dtype == torch.float32 and new.shape == (2,)
    assert new.tolist() == [f32(0.5 + 0.5 * 0.7), f32(0.5 - 0.5 * 0.1)]
    assert new[0] > 0.5 > new[1]


def test_caught_up_category_falls_back():
    m = CategoryMargins(1, init=1.0, lr=1.0, target=0.2, ema=0.5)
    for _ in range(3):
        m.update(table([10], unsafe=[9]))
    peak = float(m.value[0])
    assert peak > 1.0
    seen = [peak]
    for _ in range(6):  # the policy catches up: no unsafe preference any more
        seen.append(float(m.update(table([10], unsafe=[0]))[0]))
    assert seen[-1] < peak
    # It falls monotonically once the EMA rate drops below the target.
    assert all(b <= a for a, b in zip(seen[2:], seen[3:]))


def test_clipping_holds_at_both_ends():
    m = CategoryMargins(2, init=1.0, lr=2.0, target=0.5, ema=0.0, min_margin=0.25, max_margin=1.5)
    for _ in range(5):
        m.update(table([4, 4], unsafe=[4, 0]))
        assert 0.25 <= float(m.value.min()) and float(m.value.max()) <= 1.5
    assert m.value.tolist() == [1.5, 0.25]
    # The initial value is clipped too.
    assert CategoryMargins(2, init=[9.0, -3.0], min_margin=0.1, max_margin=2.0).value.tolist() == [2.0, f32(0.1)]


def test_ema_math_by_hand_for_two_steps():
    lr, target, ema, init = 0.3, [0.1, 0.4], 0.8, [0.5, 1.0]
    m = CategoryMargins(2, init=init, lr=lr, target=target, ema=ema, max_margin=10.0)
    # Step 1: N = n, S = v.
    m.update(table([4, 2], unsafe=[3, 0.5]))
    N, S = [4.0, 2.0], [3.0, 0.5]
    expect = [f32(f32(init[i]) + lr * (S[i] / N[i] - target[i])) for i in range(2)]
    assert m.value.tolist() == expect
    assert m.ema_count.tolist() == N and m.ema_unsafe.tolist() == S
    # Step 2: N = γN + n, S = γS + v.
    m.update(table([1, 6], unsafe=[0, 3]))
    N = [ema * 4 + 1, ema * 2 + 6]
    S = [ema * 3 + 0, ema * 0.5 + 3]
    torch.testing.assert_close(m.ema_count, torch.tensor(N, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(m.ema_unsafe, torch.tensor(S, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(m.rate, torch.tensor([S[0] / N[0], S[1] / N[1]], dtype=torch.float64))
    expect = [f32(expect[i] + lr * (S[i] / N[i] - target[i])) for i in range(2)]
    assert m.value.tolist() == pytest.approx(expect, abs=1e-7)


def test_min_count_gates_each_category():
    m = CategoryMargins(2, init=1.0, lr=1.0, target=0.0, ema=0.9, min_count=5.0)
    moved = []
    for _ in range(3):
        before = m.value.clone()
        m.update(table([2, 10], unsafe=[2, 10]))
        moved.append((m.value != before).tolist())
    # Category 0: N = 2, 3.8, 5.42 -> moves only at the third update; category 1 always.
    assert moved == [[False, True], [False, True], [True, True]]
    assert m.history[0]["active"] == [False, True]
    assert m.history[2]["active"] == [True, True]


def test_warmup_only_feeds_the_ema():
    m = CategoryMargins(1, init=1.0, lr=1.0, target=0.0, ema=0.5, warmup_steps=2)
    for _ in range(2):
        m.update(table([4], unsafe=[4]))
        assert m.value.tolist() == [1.0]
        assert not m.history[-1]["moved"]
    assert m.ema_count.tolist() == [4 * 0.5 + 4]
    m.update(table([4], unsafe=[2]))
    # Third update: N = 7, S = 5 (0.5·6 + 2), r = 5/7.
    assert m.value.tolist() == [f32(1.0 + 5 / 7)]
    assert m.history[-1]["moved"] and m.step == 3


def test_relative_mode_keeps_the_mean_and_moves_the_spread():
    m = CategoryMargins(4, init=[1.0, 2.0, 3.0, 4.0], lr=0.7, ema=0.6, mode="relative", min_margin=-100, max_margin=100)
    start_mean = float(m.value.mean())
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        count = (torch.rand(4, generator=gen) * 10 + 1).tolist()
        unsafe = [c * r for c, r in zip(count, torch.rand(4, generator=gen).tolist())]
        m.update(table(count, unsafe=unsafe))
        assert float(m.value.mean()) == pytest.approx(start_mean, abs=1e-5)
    assert not torch.equal(m.value, torch.tensor([1.0, 2.0, 3.0, 4.0]))
    # ε = mean rate, so the category with the highest rate gains the most.
    r = m.rate
    step = 0.7 * (r - r.mean())
    before = torch.tensor(m.history[-2]["margin"], dtype=torch.float64)
    torch.testing.assert_close(m.value.double(), before + step, atol=1e-6, rtol=0)


def test_relative_mode_leaves_inactive_categories_out_of_the_mean():
    m = CategoryMargins(3, init=[1.0, 1.0, 1.0], lr=1.0, ema=0.0, mode="relative", min_count=1.0)
    m.update(table([10, 10, 0], unsafe=[8, 2, 0]))
    # Active: 0 and 1, ε = 0.5; category 2 has no pairs and stays.
    assert m.value.tolist() == [f32(1.3), f32(0.7), 1.0]


def test_hard_and_soft_signal():
    stats = table([10, 10], unsafe=[6.5, 1.0], reward_acc=[2, 9])
    soft = CategoryMargins(2, init=1.0, lr=1.0, target=0.0, ema=0.0, signal="soft")
    hard = CategoryMargins(2, init=1.0, lr=1.0, target=0.0, ema=0.0, signal="hard")
    soft.update(stats)
    hard.update(stats)
    assert soft.value.tolist() == [f32(1.65), f32(1.1)]  # Σσ(−βh) / n
    assert hard.value.tolist() == [f32(1.8), f32(1.1)]  # (n − Σ1[h>0]) / n


def test_hard_signal_counts_a_tie_as_half():
    # Category 0: 10 pairs, 2 with h > 0 and 4 ties: 4 + 4/2 = 6 unsafe. Category 1: all 10 tie.
    stats = table([10, 10], unsafe=[5.0, 5.0], reward_acc=[2, 0], reward_tie=[4, 10])
    hard = CategoryMargins(2, init=1.0, lr=1.0, target=0.0, ema=0.0, signal="hard")
    hard.update(stats)
    assert hard.value.tolist() == [f32(1.6), f32(1.5)]


def test_a_c_by_k_table_without_the_none_row_also_works():
    a = CategoryMargins(2, ema=0.5)
    b = CategoryMargins(2, ema=0.5)
    full = table([3, 4], unsafe=[1, 2])
    a.update(full)
    b.update(full[:2])
    assert torch.equal(a.value, b.value)


# ------------------------------------------------------------ external rates
def test_update_with_an_external_unsafe_rate():
    m = CategoryMargins(3, init=1.0, lr=0.5, target=0.2, ema=0.9)
    new = m.update(unsafe_rate=[0.6, float("nan"), 0.0])
    assert new.tolist() == [f32(1.2), 1.0, f32(0.9)]  # NaN: left alone
    assert m.history[-1]["active"] == [True, False, True]
    assert m.ema_count.tolist() == [0, 0, 0]  # no stats: the EMA is untouched
    # As a tensor too, and together with stats: the rate is replaced, the min_count gate stays.
    m2 = CategoryMargins(2, init=1.0, lr=1.0, target=0.0, ema=0.0, min_count=3)
    m2.update(table([5, 1], unsafe=[5, 1]), unsafe_rate=torch.tensor([0.25, 0.5]))
    assert m2.value.tolist() == [1.25, 1.0]


def test_update_argument_errors():
    m = CategoryMargins(2)
    with pytest.raises(ValueError, match="stats.*unsafe_rate"):
        m.update()
    with pytest.raises(ValueError, match=r"unsafe_rate must have shape \(C,\)"):
        m.update(unsafe_rate=[0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match=r"stats must have shape \(C\+1, K\)"):
        m.update(torch.zeros(4, K))
    with pytest.raises(ValueError, match="stats must have shape"):
        m.update(torch.zeros(3, K - 1))
    with pytest.raises(TypeError, match="stats must be a torch.Tensor"):
        m.update([[0.0] * K] * 3)
    bad = table([1, 1], unsafe=[0, 0])
    bad[0, COL["loss_sum"]] = float("nan")
    with pytest.raises(ValueError, match="stats must be finite"):
        m.update(bad)
    assert m.step == 0 and m.history == []  # failed updates change nothing


def snapshot(m: CategoryMargins) -> dict:
    """Everything an update or a load may change, deep-copied."""
    state = m.state_dict()
    state["value_device"] = m.value.device
    return state


def assert_same_state(m: CategoryMargins, before: dict) -> None:
    after = snapshot(m)
    assert after.keys() == before.keys()
    for key, want in before.items():
        got = after[key]
        if isinstance(want, torch.Tensor):
            assert got.dtype == want.dtype and torch.equal(got, want), key
        else:
            assert got == want, key


def trained(signal="soft", c=2) -> CategoryMargins:
    """Margins that have seen a few updates, so that a corrupted EMA would show."""
    m = CategoryMargins(c, ema=0.5, lr=0.7, signal=signal, names=[f"cat{i}" for i in range(c)])
    for t in random_tables(3, c, seed=11):
        m.update(t)
    return m


def test_update_rejects_a_negative_count():
    m = trained()
    before = snapshot(m)
    with pytest.raises(ValueError, match=r"^stats column 'count' is negative \(-3\) for category 'cat1'$"):
        m.update(table([4, -3], unsafe=[1, 0]))
    assert_same_state(m, before)


def test_update_rejects_an_unsafe_count_above_the_pair_count():
    m = trained()
    before = snapshot(m)
    # rate 2.5: the margin would jump by lr·2.4 in one step.
    with pytest.raises(ValueError, match=r"'unsafe_pref_sum' = 10 is outside \[0, count = 4\] for category 'cat0'"):
        m.update(table([4, 4], unsafe=[10, 1]))
    with pytest.raises(ValueError, match=r"'unsafe_pref_sum' = -1 .* category 'cat1'"):
        m.update(table([4, 4], unsafe=[1, -1]))
    assert_same_state(m, before)
    # fp32 rounding past the count is not an error.
    m.update(table([1000, 4], unsafe=[1000 * (1 + 4e-6), 4]))
    assert m.step == before["step"] + 1


@pytest.mark.parametrize("reward_acc", [[5, 1], [-1, 1]], ids=["above_count", "negative"])
def test_update_rejects_impossible_hard_counts(reward_acc):
    # signal='hard': unsafe = count − reward_acc, so reward_acc must lie in [0, count] too.
    m = trained(signal="hard")
    before = snapshot(m)
    with pytest.raises(ValueError, match=r"'reward_acc' = -?\d+ with reward_tie = 0 \(signal='hard'.* category 'cat0'"):
        m.update(table([4, 4], unsafe=[0, 0], reward_acc=reward_acc))
    assert_same_state(m, before)


def test_update_names_the_non_finite_column_and_category():
    m = trained()
    before = snapshot(m)
    bad = table([4, 4], unsafe=[1, 1])
    bad[1, COL["reward_margin_sum"]] = float("inf")
    with pytest.raises(ValueError, match=r"stats must be finite: column 'reward_margin_sum' of category 'cat1' is inf"):
        m.update(bad)
    assert_same_state(m, before)


def test_update_rejects_a_complex_table():
    m = trained()
    before = snapshot(m)
    with pytest.raises(TypeError, match="stats must be a real-valued table, got torch.complex64"):
        m.update(table([4, 4], unsafe=[1, 1]).to(torch.complex64))
    assert_same_state(m, before)


@pytest.mark.parametrize("bad", [float("inf"), -float("inf"), 1.5, -0.1])
def test_update_rejects_an_external_rate_outside_0_1(bad):
    m = trained()
    before = snapshot(m)
    with pytest.raises(ValueError, match=r"unsafe_rate must be within \[0, 1\].*category 'cat1' got"):
        m.update(unsafe_rate=[0.5, bad])
    # Valid stats with a bad rate: the stats must not have fed the EMA either.
    with pytest.raises(ValueError, match="unsafe_rate must be within"):
        m.update(table([4, 4], unsafe=[1, 1]), unsafe_rate=[0.5, bad])
    assert_same_state(m, before)
    # The edges themselves and NaN ("leave alone") are fine.
    m.update(unsafe_rate=[0.0, 1.0])
    m.update(unsafe_rate=[float("nan"), 1.0])
    assert m.history[-1]["active"] == [False, True]


@pytest.mark.parametrize("bad", [[0.1 + 0.2j, 0.3], torch.tensor([0.1, 0.2], dtype=torch.complex128), ["0.1", "0.2"]])
def test_update_rejects_a_non_real_external_rate(bad):
    m = trained()
    before = snapshot(m)
    with pytest.raises(TypeError, match="unsafe_rate must be a \\(C,\\) sequence/tensor of rates"):
        m.update(unsafe_rate=bad)
    assert_same_state(m, before)


def _raise_together_worker(rank: int, port: int, out_dir: str) -> None:
    import datetime
    import os

    import torch.distributed as dist

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=30)
    )
    try:
        m = CategoryMargins(2, init=1.0, lr=1.0, target=0.0, ema=0.0)
        errors = []
        # Only rank 0 holds a bad value; rank 1 must learn of it through the all-reduce.
        bad_rate = [float("inf"), 0.2] if rank == 0 else [0.1, 0.2]
        bad_stats = table([4, 4], unsafe=[float("nan") if rank == 0 else 1, 1])
        for kwargs in (dict(unsafe_rate=bad_rate), dict(stats=bad_stats)):
            try:
                m.update(**kwargs)
                errors.append(None)
            except ValueError as e:
                errors.append(str(e))
        # The ranks are still in step: a valid update goes through on both.
        good = m.update(table([4, 4], unsafe=[2, 1]), unsafe_rate=[0.5 if rank == 0 else 0.25, float("nan")]).clone()
        torch.save(dict(errors=errors, good=good, step=m.step), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_distributed_ranks_reject_a_bad_update_together(tmp_path):
    """A value only one rank holds must make every rank raise, not leave the others hanging."""
    import socket
    import time

    import torch.multiprocessing as mp

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.start_processes(
        _raise_together_worker, args=(port, str(tmp_path)), nprocs=2, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + 120
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError("a rank hung: the ranks did not raise together")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for r in ranks:
        assert r["errors"][0] is not None and "unsafe_rate must be within [0, 1]" in r["errors"][0]
        assert r["errors"][1] is not None and "stats must be finite" in r["errors"][1]
        assert r["step"] == 1  # the rejected updates did not count
    assert "got inf" in ranks[0]["errors"][0] and "on another rank" in ranks[1]["errors"][0]
    # mean rate (0.5 + 0.25) / 2 for category 0; category 1 has none and stays.
    assert ranks[0]["good"].tolist() == ranks[1]["good"].tolist() == [1.375, 1.0]


# -------------------------------------------------------- names, log, history
def test_names_and_log():
    m = CategoryMargins(2, init=[0.5, 1.5], names=["violence", "privacy"], ema=0.0)
    assert m.names == ("violence", "privacy")
    logged = m.log()
    assert logged["margin/violence"] == 0.5 and logged["margin/privacy"] == 1.5
    assert math.isnan(logged["unsafe_rate/violence"])
    m.update(table([4, 4], unsafe=[1, 3]))
    logged = m.log(prefix="train/")
    assert set(logged) == {
        "train/margin/violence",
        "train/margin/privacy",
        "train/unsafe_rate/violence",
        "train/unsafe_rate/privacy",
    }
    assert logged["train/unsafe_rate/privacy"] == 0.75
    assert logged["train/margin/privacy"] == float(m.value[1])
    # A category no batch has contained yet logs NaN, not a perfect-looking 0.
    m.update(table([0, 4], unsafe=[0, 1]))
    fresh = CategoryMargins(2, ema=0.0)
    fresh.update(table([0, 4], unsafe=[0, 1]))
    assert math.isnan(fresh.log()["unsafe_rate/category_0"]) and fresh.log()["unsafe_rate/category_1"] == 0.25
    fresh.update(unsafe_rate=[0.3, float("nan")])
    assert fresh.log()["unsafe_rate/category_0"] == pytest.approx(0.3)
    assert CategoryMargins(3).names == ("category_0", "category_1", "category_2")
    pku = CategoryMargins.for_pku_saferlhf(lr=0.1)
    assert len(pku) == 19 and pku.names == PKU_SAFERLHF_CATEGORIES and pku.config["lr"] == 0.1


def test_history_records_every_update():
    m = CategoryMargins(2, ema=0.5, warmup_steps=1)
    for _ in range(3):
        m.update(table([4, 2], unsafe=[1, 1]))
    assert [h["step"] for h in m.history] == [0, 1, 2]
    assert [h["moved"] for h in m.history] == [False, True, True]
    assert m.history[-1]["margin"] == m.value.tolist()
    assert m.history[-1]["rate"] == m.rate.tolist()
    assert m.history[1]["count"] == [6.0, 3.0]
    assert "step=3" in repr(m)


# ---------------------------------------------------------------- state
def random_tables(n, c, seed):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        count = torch.randint(0, 8, (c,), generator=gen).float()
        unsafe = count * torch.rand(c, generator=gen)
        acc = torch.floor(count * torch.rand(c, generator=gen))
        out.append(table(count.tolist(), unsafe=unsafe.tolist(), reward_acc=acc.tolist()))
    return out


@pytest.mark.parametrize("mode, signal", [("absolute", "soft"), ("relative", "hard")])
@pytest.mark.parametrize("via_file", [False, True])
def test_state_dict_round_trip_resumes_bitwise(mode, signal, via_file, tmp_path):
    kwargs = dict(
        init=[0.3, 0.9, 1.4],
        lr=0.37,
        target=[0.1, 0.2, 0.05],
        ema=0.83,
        min_count=2.5,
        warmup_steps=1,
        min_margin=0.05,
        max_margin=3.0,
        mode=mode,
        signal=signal,
        names=["a", "b", "c"],
    )
    tables = random_tables(8, 3, seed=5)
    straight = CategoryMargins(3, **kwargs)
    first = CategoryMargins(3, **kwargs)
    for t in tables[:4]:
        straight.update(t)
        first.update(t)
    state = first.state_dict()
    if via_file:
        torch.save(state, tmp_path / "margins.pt")
        state = torch.load(tmp_path / "margins.pt")
    # A differently configured object becomes the same one.
    resumed = CategoryMargins(3, init=2.0, lr=0.01, mode="absolute")
    resumed.load_state_dict(state)
    del first
    for t in tables[4:]:
        a, b = straight.update(t), resumed.update(t, unsafe_rate=None)
        assert torch.equal(a, b)
    assert torch.equal(straight.ema_count, resumed.ema_count)
    assert torch.equal(straight.ema_unsafe, resumed.ema_unsafe)
    assert straight.history == resumed.history and straight.step == resumed.step == 8
    assert resumed.names == ("a", "b", "c") and resumed.config == straight.config


def test_state_dict_is_a_snapshot():
    m = CategoryMargins(2, ema=0.5)
    m.update(table([3, 3], unsafe=[2, 1]))
    state = m.state_dict()
    saved = state["value"].clone()
    m.update(table([3, 3], unsafe=[3, 0]))
    assert torch.equal(state["value"], saved) and state["step"] == 1


def test_load_state_dict_with_another_c_raises():
    with pytest.raises(ValueError, match="num_categories"):
        CategoryMargins(3).load_state_dict(CategoryMargins(2).state_dict())


def _corrupt(state: dict, path: tuple, value) -> dict:
    """A copy of ``state`` with ``state[path[0]][path[1]]...`` set to ``value`` (``...`` deletes it)."""
    state = {k: dict(v) if isinstance(v, dict) else v for k, v in state.items()}
    holder = state
    for key in path[:-1]:
        holder = holder[key]
    if value is ...:
        del holder[path[-1]]
    else:
        holder[path[-1]] = value
    return state


@pytest.mark.parametrize(
    "path, value, error, match",
    [
        (("value",), ..., ValueError, r"state_dict lacks the key 'value'"),
        (("history",), ..., ValueError, r"state_dict lacks the key 'history'"),
        (("config", "signal"), ..., ValueError, r"state_dict\['config'\] lacks keys \['signal'\]"),
        (("config", "colour"), "red", ValueError, r"unknown keys \['colour'\]"),
        (("config", "lr"), "abc", TypeError, r"state_dict\['config'\]: lr must be a real number"),
        (("config", "mode"), "bogus", ValueError, r"state_dict\['config'\]: mode must be one of"),
        (("config", "signal"), "x", ValueError, r"state_dict\['config'\]: signal must be one of"),
        (("config", "ema"), 1.5, ValueError, r"state_dict\['config'\]: ema must be in \[0, 1\)"),
        (("config", "min_margin"), 9.0, ValueError, r"state_dict\['config'\]: need finite min_margin <= max_margin"),
        (("config", "sync"), "no", TypeError, r"state_dict\['config'\]: sync must be a bool"),
        (("value",), torch.zeros(5), ValueError, r"state_dict\['value'\] must have shape \(C,\) = \(3,\)"),
        (("target",), torch.zeros(3, 1), ValueError, r"state_dict\['target'\] must have shape"),
        (("ema_count",), [1.0, 2.0, 3.0], TypeError, r"state_dict\['ema_count'\] must be a torch.Tensor"),
        (("ema_unsafe",), torch.full((3,), float("nan")), ValueError, r"state_dict\['ema_unsafe'\] must be finite"),
        (("ema_unsafe",), torch.full((3,), 1e6, dtype=torch.float64), ValueError, r"0 <= ema_unsafe <= ema_count"),
        (("names",), ["a", "b"], ValueError, r"state_dict\['names'\] must have C = 3 entries"),
        (("names",), "abc", TypeError, r"state_dict\['names'\] must be a sequence"),
        (("step",), -1, ValueError, r"state_dict\['step'\] must be an int >= 0"),
        (("step",), 2.5, ValueError, r"state_dict\['step'\] must be an int >= 0"),
        (("history",), {"step": 0}, TypeError, r"state_dict\['history'\] must be a list"),
        (("num_categories",), "3", TypeError, r"state_dict\['num_categories'\] must be an int"),
    ],
)
def test_load_state_dict_rejects_a_bad_state_and_changes_nothing(path, value, error, match):
    good = trained(c=3).state_dict()
    m = CategoryMargins(3, init=[0.1, 0.2, 0.3], lr=0.01, names=["x", "y", "z"])
    m.update(table([4, 4, 4], unsafe=[1, 2, 3]))
    before = snapshot(m)
    with pytest.raises(error, match=match):
        m.load_state_dict(_corrupt(good, path, value))
    assert_same_state(m, before)
    m.load_state_dict(good)  # the uncorrupted state loads
    assert m.names == ("cat0", "cat1", "cat2") and m.step == 3


def test_load_state_dict_with_more_categories_raises_and_changes_nothing():
    # A 5-category state into CategoryMargins(3) used to load: len(m) == 3 with a (5,) value.
    m = CategoryMargins(3)
    before = snapshot(m)
    with pytest.raises(ValueError, match=r"state_dict has num_categories=5, this CategoryMargins has 3"):
        m.load_state_dict(trained(c=5).state_dict())
    assert_same_state(m, before)
    with pytest.raises(TypeError, match="state_dict must be a dict"):
        m.load_state_dict([("value", torch.zeros(3))])


# ---------------------------------------------------------------- constructor
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_categories=0), "num_categories"),
        (dict(num_categories=2.0), "num_categories"),
        (dict(num_categories=True), "num_categories"),
        (dict(lr=-0.1), "lr"),
        (dict(lr=float("nan")), "lr"),
        (dict(min_count=-1), "min_count"),
        (dict(eps=0.0), "eps"),
        (dict(ema=1.0), "ema"),
        (dict(ema=-0.1), "ema"),
        (dict(warmup_steps=-1), "warmup_steps"),
        (dict(warmup_steps=1.5), "warmup_steps"),
        (dict(min_margin=2.0, max_margin=1.0), "min_margin <= max_margin"),
        (dict(max_margin=float("inf")), "min_margin <= max_margin"),
        (dict(mode="both"), "mode"),
        (dict(signal="loud"), "signal"),
        (dict(names=["a"]), "names"),
        (dict(init=[0.1, 0.2, 0.3]), "init"),
        (dict(init=float("nan")), "init"),
        (dict(target=[0.1]), "target"),
        (dict(target=float("inf")), "target"),
    ],
)
def test_bad_constructor_arguments(kwargs, match):
    kwargs = {"num_categories": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        CategoryMargins(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(min_margin="0"), "min_margin must be a real number, got str"),
        (dict(max_margin=None), "max_margin must be a real number, got NoneType"),
        (dict(lr="0.5"), "lr must be a real number"),
        (dict(lr=True), "lr must be a real number, got bool"),
        (dict(ema=0.5 + 0j), "ema must be a real number, got complex"),
        (dict(min_count=[1.0]), "min_count must be a real number"),
        (dict(eps="1e-8"), "eps must be a real number"),
        (dict(warmup_steps="2"), "warmup_steps must be an int >= 0, got str"),
        (dict(num_categories="3"), "num_categories must be an int >= 1, got str"),
        (dict(sync="no"), "sync must be a bool"),
        (dict(names="ab"), "names must be a sequence of C = 2 names, got str"),
        (dict(names=7), "names must be a sequence"),
        (dict(init="0.5"), "init must be a real number or a sequence/tensor"),
        (dict(init=[True, False]), r"init must be .* of torch.bool"),
        (dict(target=[0.1 + 1j, 0.2]), r"target must be .* of torch.complex"),
        (dict(target=torch.tensor([0.1, 0.2], dtype=torch.complex64)), "target must be"),
    ],
)
def test_constructor_type_errors_name_the_argument(kwargs, match):
    kwargs = {"num_categories": 2, **kwargs}
    with pytest.raises(TypeError, match=match):
        CategoryMargins(**kwargs)


def test_constructor_accepts_numpy_and_tensor_numbers():
    m = CategoryMargins(np.int64(2), lr=np.float32(0.25), warmup_steps=np.int64(1), init=np.array([0.5, 1.0]))
    assert len(m) == 2 and m.config["lr"] == 0.25 and m.config["warmup_steps"] == 1
    assert m.value.tolist() == [0.5, 1.0]
    # Python floats keep their float64 value (0.1, not fp32's 0.10000000149).
    assert CategoryMargins(2, target=0.1).target.tolist() == [0.1, 0.1]


# ------------------------------------------------------- with the real loss
def test_margins_move_the_right_way_from_real_loss_stats():
    # V = 1: policy log-probs are 0, so h = ρ_l − ρ_w comes from ref_logps.
    h = torch.tensor([-5.0, -4.0, 60.0, 50.0, 0.0, 0.0], dtype=torch.float64)
    cats = torch.tensor([0, 0, 1, 1, -1, -1])
    ref = torch.cat([torch.zeros(6, dtype=torch.float64), h])
    m = CategoryMargins(2, init=1.0, lr=1.0, target=0.1, ema=0.0)
    out = catdpo_kernels.loss(
        torch.zeros(12, 1, 1),
        torch.zeros(12, 1, dtype=torch.int64),
        cats,
        m,
        ref_logps=ref.float(),
        beta=0.1,
        backend="torch",
    )
    m.update(out.category_stats)
    assert m.value[0] > 1.0 > m.value[1]
    assert torch.equal(out.category_stats[2, :1], torch.tensor([2.0]))  # -1 -> row C


def test_category_margins_object_works_as_margins():
    batch = make_batch(3, 4, 16, 3, seed=2)
    m = CategoryMargins(3, init=[0.2, 0.7, 1.9])
    a = catdpo_kernels.loss(**{**batch, "margins": m}, backend="torch")
    b = catdpo_kernels.loss(**{**batch, "margins": m.value.clone()}, backend="torch")
    assert torch.equal(a.loss, b.loss)


# ------------------------------------------------------------- CatDPOLoss
def test_module_accumulates_stats_over_micro_batches():
    kwargs = dict(lr=0.5, target=0.1, ema=0.7, init=0.6)
    module = CatDPOLoss(3, beta=0.2, backend="torch", **kwargs)
    alone = CategoryMargins(3, **kwargs)
    tables = []
    for step in range(2):
        for micro in range(3):
            batch = make_batch(4, 5, 17, 3, seed=10 * step + micro)
            batch.pop("margins")
            out = module(**batch)
            tables.append(out.category_stats)
            expect = catdpo_kernels.loss(**batch, margins=alone, beta=0.2, backend="torch")
            assert torch.equal(out.loss, expect.loss)  # uses the current margins
        summed = tables[-3] + tables[-2] + tables[-1]
        assert torch.equal(module.pending_stats, summed)
        new = module.update_margins()
        assert torch.equal(new, alone.update(summed))
        assert module.pending_stats is None
    assert module.margins.step == 2
    with pytest.raises(RuntimeError, match=r"before any training forward\(\)"):
        module.update_margins()


def test_module_evaluation_calls_do_not_feed_the_margins():
    module = CatDPOLoss(3, backend="torch")
    batch = make_batch(2, 3, 11, 3, seed=5)
    batch.pop("margins")
    with torch.no_grad():
        module(**batch)
    module.eval()
    module(**batch)
    assert module.pending_stats is None
    module.train()
    out = module(**batch)
    assert torch.equal(module.pending_stats, out.category_stats)


def test_module_update_with_an_external_rate_only():
    module = CatDPOLoss(2, lr=1.0, target=0.0, init=1.0, backend="torch")
    assert module.update_margins(unsafe_rate=[0.5, float("nan")]).tolist() == [1.5, 1.0]


def test_module_for_dpo_has_no_margins_to_update():
    module = CatDPOLoss(loss_type="dpo", backend="torch")
    batch = make_batch(2, 3, 9, 1, seed=4)
    out = module(batch["policy_logits"], batch["labels"], ref_logits=batch["ref_logits"])
    assert out.category_stats.shape == (1, K)
    assert module.update_margins() is None


def test_module_state_dict_round_trips_the_margins(tmp_path):
    kwargs = dict(lr=0.4, ema=0.5, mode="relative", init=[0.5, 1.0, 1.5])
    a = CatDPOLoss(3, backend="torch", **kwargs)
    for seed in range(2):
        batch = make_batch(3, 4, 12, 3, seed=seed)
        batch.pop("margins")
        a(**batch)
        a.update_margins()
    torch.save(a.state_dict(), tmp_path / "loss.pt")
    b = CatDPOLoss(3, backend="torch", lr=0.4)
    b.load_state_dict(torch.load(tmp_path / "loss.pt"))
    assert torch.equal(a.margins.value, b.margins.value)
    assert a.margins.state_dict()["history"] == b.margins.state_dict()["history"]
    batch = make_batch(3, 4, 12, 3, seed=9)
    batch.pop("margins")
    assert torch.equal(a(**batch).loss, b(**batch).loss)
    assert torch.equal(a.update_margins(), b.update_margins())
