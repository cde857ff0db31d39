"""``CategoryMargins``: per-category adaptive safety margins ``Δ_c`` (docs/design.md, "Margins").

Dual ascent in the style of Safe RLHF's Lagrange multiplier, one multiplier per
harm category: a category whose EMA unsafe-preference rate ``r_c`` stays above
its target ``ε_c`` gets a larger margin, one below it a smaller margin.

    N_c ← γ·N_c + n_c ;  S_c ← γ·S_c + v_c ;  r_c = S_c / max(N_c, eps)
    if N_c ≥ min_count and step ≥ warmup_steps:
        Δ_c ← clip(Δ_c + lr·(r_c − ε_c), min_margin, max_margin)

The defaults are our choices (the paper's values are not public) and are all
constructor arguments.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .constants import NUM_STATS
from .stats import SIGNALS, CategoryStats, all_reduce_sum

MODES = ("absolute", "relative")


def _per_category(name: str, value, num_categories: int) -> torch.Tensor:
    """A scalar or a length-C sequence/tensor -> (C,) float64, all finite."""
    t = torch.as_tensor(value, dtype=torch.float64).detach().cpu().clone()
    if t.dim() == 0:
        t = t.expand(num_categories).clone()
    if t.shape != (num_categories,):
        raise ValueError(f"{name} must be a scalar or have shape (C,) = ({num_categories},), got {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be finite")
    return t


def _distributed_world() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


class CategoryMargins:
    """Adaptive per-category safety margins.

    Args:
        num_categories: ``C``.
        init: initial margin, scalar or ``(C,)``.
        lr: dual step size ``η``.
        target: tolerated unsafe-preference rate ``ε_c`` (``absolute`` mode), scalar or ``(C,)``.
        ema: decay ``γ`` of the running pair count and unsafe sum.
        min_count: a category moves only once its EMA pair count ``N_c`` reaches this.
        warmup_steps: the first ``warmup_steps`` updates only feed the EMA.
        min_margin, max_margin: clipping range of ``Δ_c``.
        mode: ``absolute`` (``ε_c = target``) or ``relative`` (``ε_c`` = mean rate over active
            categories: keeps the mean margin, moves only the spread).
        signal: ``soft`` uses ``Σ σ(−β·h)`` (column ``unsafe_pref_sum``), ``hard`` uses
            ``Σ 1[h ≤ 0]`` (``count − reward_acc``) as the per-category unsafe count.
        names: optional category names, used by ``log()``.
        sync: all-reduce stats (SUM) in ``update`` when ``torch.distributed`` is initialised.
        eps: floor of ``N_c`` in ``r_c = S_c / N_c``.
    """

    def __init__(
        self,
        num_categories: int,
        init: float | Sequence[float] | torch.Tensor = 0.5,
        lr: float = 0.5,
        target: float | Sequence[float] | torch.Tensor = 0.1,
        ema: float = 0.9,
        min_count: float = 1.0,
        warmup_steps: int = 0,
        min_margin: float = 0.0,
        max_margin: float = 5.0,
        mode: str = "absolute",
        names: Sequence[str] | None = None,
        signal: str = "soft",
        sync: bool = True,
        eps: float = 1e-8,
    ):
        if isinstance(num_categories, bool) or not isinstance(num_categories, int) or num_categories < 1:
            raise ValueError(f"num_categories must be an int >= 1, got {num_categories!r}")
        for name, v in (("lr", lr), ("min_count", min_count)):
            if isinstance(v, bool) or not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        # eps = 0 would make r_c = 0/0 = NaN for a category with no pairs yet.
        if isinstance(eps, bool) or not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
            raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
        if isinstance(ema, bool) or not (isinstance(ema, (int, float)) and 0.0 <= ema < 1.0):
            raise ValueError(f"ema must be in [0, 1), got {ema!r}")
        if isinstance(warmup_steps, bool) or not (isinstance(warmup_steps, int) and warmup_steps >= 0):
            raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
        if not (math.isfinite(min_margin) and math.isfinite(max_margin) and min_margin <= max_margin):
            raise ValueError(f"need finite min_margin <= max_margin, got {min_margin!r}, {max_margin!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if signal not in SIGNALS:
            raise ValueError(f"signal must be one of {SIGNALS}, got {signal!r}")
        if names is not None:
            names = tuple(str(n) for n in names)
            if len(names) != num_categories:
                raise ValueError(f"names must have C = {num_categories} entries, got {len(names)}")
        self.num_categories = num_categories
        self.config = dict(
            lr=float(lr),
            ema=float(ema),
            min_count=float(min_count),
            warmup_steps=int(warmup_steps),
            min_margin=float(min_margin),
            max_margin=float(max_margin),
            mode=mode,
            signal=signal,
            sync=bool(sync),
            eps=float(eps),
        )
        self.names = names if names is not None else tuple(f"category_{i}" for i in range(num_categories))
        self.target = _per_category("target", target, num_categories)
        init_t = _per_category("init", init, num_categories)
        self._value = init_t.clamp(min_margin, max_margin).float()
        self.ema_count = torch.zeros(num_categories, dtype=torch.float64)
        self.ema_unsafe = torch.zeros(num_categories, dtype=torch.float64)
        self.step = 0
        self.history: list[dict] = []
        self._device_cache: dict[torch.device, torch.Tensor] = {}

    # ------------------------------------------------------------------ value
    @property
    def value(self) -> torch.Tensor:
        """The current ``(C,)`` fp32 margins (a copy is cached per device for ``loss()``)."""
        return self._value

    def value_on(self, device: torch.device) -> torch.Tensor:
        """The margins on ``device``, copied once per update, not once per ``loss()`` call."""
        device = torch.device(device)
        if device == self._value.device:
            return self._value
        cached = self._device_cache.get(device)
        if cached is None:
            src = self._value
            if device.type == "cuda" and src.device.type == "cpu":
                # From pinned memory the copy is asynchronous: no host sync in forward.
                src = src.pin_memory()
            cached = src.to(device, non_blocking=True)
            self._device_cache[device] = cached
        return cached

    @property
    def rate(self) -> torch.Tensor:
        """The EMA unsafe-preference rate ``r_c`` (``(C,)`` float64)."""
        return self.ema_unsafe / self.ema_count.clamp(min=self.config["eps"])

    def __len__(self) -> int:
        return self.num_categories

    def __repr__(self) -> str:
        vals = ", ".join(f"{v:.3f}" for v in self._value.tolist())
        return f"CategoryMargins(C={self.num_categories}, step={self.step}, mode={self.config['mode']}, value=[{vals}])"

    # ----------------------------------------------------------------- update
    def _counts_from_stats(self, stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(stats, torch.Tensor):
            raise TypeError(
                f"stats must be a torch.Tensor (the (C+1, K) category_stats table), got {type(stats).__name__}"
            )
        c = self.num_categories
        if stats.dim() != 2 or stats.shape[1] != NUM_STATS or stats.shape[0] not in (c, c + 1):
            raise ValueError(
                f"stats must have shape (C+1, K) = ({c + 1}, {NUM_STATS}) (or (C, K)), got {tuple(stats.shape)}"
            )
        table = stats.detach().to(torch.float64)
        if self.config["sync"]:
            table = all_reduce_sum(table)
        table = CategoryStats(table.cpu()[:c])  # the category rows only: row C never moves a margin
        if not bool(torch.isfinite(table.table).all()):
            raise ValueError("stats must be finite (a NaN loss upstream?)")
        return table.count, table.unsafe_count(self.config["signal"])

    def update(self, stats: torch.Tensor | None = None, *, unsafe_rate=None) -> torch.Tensor:
        """One dual-ascent step, once per optimiser step, after summing stats over micro-batches.

        ``stats``: the ``(C+1, K)`` ``category_stats`` table (summed over micro-batches;
        summed over ranks here when distributed). ``unsafe_rate``: an external ``(C,)``
        rate (e.g. from a judge) that replaces ``r_c``; NaN entries leave that category
        alone. With ``unsafe_rate`` alone the ``min_count`` gate does not apply (there are
        no pair counts; the judge's sample is its own); with both, it does. Returns the
        new margins.
        """
        if stats is None and unsafe_rate is None:
            raise ValueError("update() needs stats (the (C+1, K) table) or unsafe_rate=(C,)")
        cfg = self.config
        active = torch.ones(self.num_categories, dtype=torch.bool)
        if stats is not None:
            n, v = self._counts_from_stats(stats)
            self.ema_count = cfg["ema"] * self.ema_count + n
            self.ema_unsafe = cfg["ema"] * self.ema_unsafe + v
            active &= self.ema_count >= max(cfg["min_count"], cfg["eps"])
        rate = self.rate
        if unsafe_rate is not None:
            ext = torch.as_tensor(unsafe_rate, dtype=torch.float64).detach().cpu().clone()
            if ext.shape != (self.num_categories,):
                raise ValueError(f"unsafe_rate must have shape (C,) = ({self.num_categories},), got {tuple(ext.shape)}")
            if cfg["sync"] and _distributed_world() > 1:
                # Average each category's finite rates over the ranks (NaN where no rank
                # has one, so that category stays put), so that every rank moves identically.
                has = torch.isfinite(ext)
                packed = all_reduce_sum(torch.stack([torch.where(has, ext, torch.zeros_like(ext)), has.double()]))
                ext = torch.where(packed[1] > 0, packed[0] / packed[1].clamp(min=1), torch.full_like(ext, float("nan")))
            finite = torch.isfinite(ext)
            active &= finite
            rate = torch.where(finite, ext, torch.zeros_like(ext))
        moved = False
        if self.step >= cfg["warmup_steps"] and bool(active.any()):
            if cfg["mode"] == "absolute":
                target = self.target
            else:
                target = rate[active].mean().expand(self.num_categories)
            step = cfg["lr"] * (rate - target)
            cur = self._value.detach().cpu().double()
            new = (cur + step).clamp(cfg["min_margin"], cfg["max_margin"])
            self._value = torch.where(active, new, cur).float().to(self._value.device)
            self._device_cache.clear()
            moved = True
        self.history.append(
            dict(
                step=self.step,
                margin=self._value.tolist(),
                rate=rate.tolist(),
                count=self.ema_count.tolist(),
                active=active.tolist(),
                moved=moved,
            )
        )
        self.step += 1
        return self._value

    # ---------------------------------------------------------------- logging
    def log(self, prefix: str = "") -> dict[str, float]:
        """Flat per-category metrics of the last update, for a logger.

        A category with no pairs yet (and no external rate) logs its rate as NaN,
        not as a 0 that would read like a perfectly safe category.
        """
        out: dict[str, float] = {}
        last = self.history[-1] if self.history else None
        for i, name in enumerate(self.names):
            seen = last is not None and (last["count"][i] > 0 or last["active"][i])
            out[f"{prefix}margin/{name}"] = float(self._value[i])
            out[f"{prefix}unsafe_rate/{name}"] = float(last["rate"][i]) if seen else float("nan")
        return out

    # -------------------------------------------------------- state & devices
    def to(self, device) -> CategoryMargins:
        """Keep the margins on the training device so ``loss()`` needs no copy."""
        self._value = self._value.to(device)
        self._device_cache.clear()
        return self

    def state_dict(self) -> dict:
        return dict(
            num_categories=self.num_categories,
            config=dict(self.config),
            names=list(self.names),
            target=self.target.clone(),
            value=self._value.detach().cpu().clone(),
            ema_count=self.ema_count.clone(),
            ema_unsafe=self.ema_unsafe.clone(),
            step=self.step,
            history=[dict(h) for h in self.history],
        )

    def load_state_dict(self, state: dict) -> None:
        if int(state["num_categories"]) != self.num_categories:
            raise ValueError(
                f"state_dict has num_categories={state['num_categories']}, "
                f"this CategoryMargins has {self.num_categories}"
            )
        self.config = dict(state["config"])
        self.names = tuple(state["names"])
        self.target = state["target"].clone().to(torch.float64)
        self._value = state["value"].clone().float().to(self._value.device)
        self.ema_count = state["ema_count"].clone().to(torch.float64)
        self.ema_unsafe = state["ema_unsafe"].clone().to(torch.float64)
        self.step = int(state["step"])
        self.history = [dict(h) for h in state["history"]]
        self._device_cache.clear()

    @classmethod
    def for_pku_saferlhf(cls, **kwargs) -> CategoryMargins:
        """Margins over the 19 PKU-SafeRLHF harm categories, named."""
        from .categories import PKU_SAFERLHF_CATEGORIES

        return cls(len(PKU_SAFERLHF_CATEGORIES), names=PKU_SAFERLHF_CATEGORIES, **kwargs)
