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
import numbers
from collections.abc import Iterable, Mapping, Sequence

import torch

from .constants import NUM_STATS, STAT_COLUMNS
from .stats import SIGNALS, CategoryStats, all_reduce_sum

MODES = ("absolute", "relative")
#: The keys of ``CategoryMargins.config`` (and of a state_dict's ``config``).
CONFIG_KEYS = ("lr", "ema", "min_count", "warmup_steps", "min_margin", "max_margin", "mode", "signal", "sync", "eps")
#: The keys of ``CategoryMargins.state_dict()``.
STATE_KEYS = (
    "num_categories",
    "config",
    "names",
    "target",
    "value",
    "ema_count",
    "ema_unsafe",
    "step",
    "history",
)
# Slack for an unsafe count above the pair count: fp32 sums of per-pair terms may round past it.
_REL_SLACK = 1e-5
_ABS_SLACK = 1e-5


def _real(name: str, v) -> float:
    """A real number (not bool, str, complex, None): TypeError naming ``name`` otherwise."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(v).__name__} {v!r}")
    return float(v)


def _integer(name: str, v, minimum: int) -> int:
    """An int >= ``minimum``: TypeError for a non-number, ValueError for a bool, a float or a small int."""
    if not isinstance(v, (numbers.Real, bool)):
        raise TypeError(f"{name} must be an int >= {minimum}, got {type(v).__name__} {v!r}")
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {v!r}")
    return int(v)


def check_config(
    num_categories,
    *,
    lr,
    ema,
    min_count,
    warmup_steps,
    min_margin,
    max_margin,
    mode,
    signal,
    sync,
    eps,
    where: str = "",
) -> tuple[int, dict]:
    """Validate the scalar arguments of ``CategoryMargins``; ``(C, config)`` or a one-line error naming the argument.

    Shared by the constructor and ``load_state_dict`` (``where`` prefixes the names there), so
    that a checkpoint can never hold a configuration the constructor would refuse.
    """
    num_categories = _integer(f"{where}num_categories", num_categories, 1)
    lr, min_count = _real(f"{where}lr", lr), _real(f"{where}min_count", min_count)
    for name, v in (("lr", lr), ("min_count", min_count)):
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(f"{where}{name} must be a finite number >= 0, got {v!r}")
    eps = _real(f"{where}eps", eps)
    # eps = 0 would make r_c = 0/0 = NaN for a category with no pairs yet.
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"{where}eps must be a finite number > 0, got {eps!r}")
    ema = _real(f"{where}ema", ema)
    if not 0.0 <= ema < 1.0:
        raise ValueError(f"{where}ema must be in [0, 1), got {ema!r}")
    warmup_steps = _integer(f"{where}warmup_steps", warmup_steps, 0)
    min_margin, max_margin = _real(f"{where}min_margin", min_margin), _real(f"{where}max_margin", max_margin)
    if not (math.isfinite(min_margin) and math.isfinite(max_margin) and min_margin <= max_margin):
        raise ValueError(f"{where}need finite min_margin <= max_margin, got {min_margin!r}, {max_margin!r}")
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"{where}mode must be one of {MODES}, got {mode!r}")
    if not isinstance(signal, str) or signal not in SIGNALS:
        raise ValueError(f"{where}signal must be one of {SIGNALS}, got {signal!r}")
    # bool('no') is True: anything but a real bool would be read as a silent yes.
    if not isinstance(sync, bool):
        raise TypeError(f"{where}sync must be a bool, got {type(sync).__name__} {sync!r}")
    return num_categories, dict(
        lr=lr,
        ema=ema,
        min_count=min_count,
        warmup_steps=warmup_steps,
        min_margin=min_margin,
        max_margin=max_margin,
        mode=mode,
        signal=signal,
        sync=sync,
        eps=eps,
    )


def _check_names(name: str, names, num_categories: int) -> tuple[str, ...]:
    # A single string would be split into its characters.
    if isinstance(names, (str, bytes)) or not isinstance(names, Iterable):
        raise TypeError(f"{name} must be a sequence of C = {num_categories} names, got {type(names).__name__}")
    names = tuple(str(n) for n in names)
    if len(names) != num_categories:
        raise ValueError(f"{name} must have C = {num_categories} entries, got {len(names)}")
    return names


def _real_tensor(name: str, value, expected: str) -> torch.Tensor:
    """``value`` as a float64 CPU tensor; TypeError naming ``name`` unless it holds real numbers."""
    try:
        raw = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        raw = None
    # torch would read True as 1.0 and drop an imaginary part with only a warning.
    if raw is None or raw.dtype == torch.bool or raw.dtype.is_complex:
        got = type(value).__name__ + ("" if raw is None else f" of {raw.dtype}")
        raise TypeError(f"{name} must be {expected}, got {got}")
    if not isinstance(value, torch.Tensor):
        # Python floats straight to float64: through torch's default float32 0.1 would become 0.10000000149.
        raw = torch.as_tensor(value, dtype=torch.float64)
    return raw.detach().cpu().to(torch.float64).clone()


def _per_category(name: str, value, num_categories: int) -> torch.Tensor:
    """A scalar or a length-C sequence/tensor of real numbers -> (C,) float64, all finite."""
    t = _real_tensor(name, value, f"a real number or a sequence/tensor of C = {num_categories} real numbers")
    if t.dim() == 0:
        t = t.expand(num_categories).clone()
    if t.shape != (num_categories,):
        raise ValueError(f"{name} must be a scalar or have shape (C,) = ({num_categories},), got {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be finite")
    return t


def _state_vector(key: str, value, num_categories: int) -> torch.Tensor:
    """A state_dict tensor entry: real, finite, shape (C,)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"state_dict[{key!r}] must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype == torch.bool or value.dtype.is_complex:
        raise TypeError(f"state_dict[{key!r}] must be a real tensor, got {value.dtype}")
    if value.shape != (num_categories,):
        raise ValueError(f"state_dict[{key!r}] must have shape (C,) = ({num_categories},), got {tuple(value.shape)}")
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"state_dict[{key!r}] must be finite")
    return value.detach().cpu().clone()


def _distributed_world() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _within_counts(unsafe: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Per category: ``0 <= unsafe <= count``, up to fp32 rounding."""
    slack = count.abs() * _REL_SLACK + _ABS_SLACK
    return (unsafe >= -slack) & (unsafe <= count + slack)


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
            ``Σ 1[h < 0] + ½·1[h = 0]`` (a tie counts half) as the per-category unsafe count.
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
        num_categories, self.config = check_config(
            num_categories,
            lr=lr,
            ema=ema,
            min_count=min_count,
            warmup_steps=warmup_steps,
            min_margin=min_margin,
            max_margin=max_margin,
            mode=mode,
            signal=signal,
            sync=sync,
            eps=eps,
        )
        if names is not None:
            names = _check_names("names", names, num_categories)
        self.num_categories = num_categories
        self.names = names if names is not None else tuple(f"category_{i}" for i in range(num_categories))
        self.target = _per_category("target", target, num_categories)
        init_t = _per_category("init", init, num_categories)
        self._value = init_t.clamp(self.config["min_margin"], self.config["max_margin"]).float()
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
        """The all-reduced ``(count, unsafe count)`` per category, validated.

        The values are checked after the all-reduce: every rank then holds the same table
        and raises together, where a check before it would leave the other ranks hanging.
        """
        if not isinstance(stats, torch.Tensor):
            raise TypeError(
                f"stats must be a torch.Tensor (the (C+1, K) category_stats table), got {type(stats).__name__}"
            )
        # .to(float64) would drop an imaginary part with only a warning.
        if stats.dtype.is_complex or stats.dtype == torch.bool:
            raise TypeError(f"stats must be a real-valued table, got {stats.dtype}")
        c = self.num_categories
        if stats.dim() != 2 or stats.shape[1] != NUM_STATS or stats.shape[0] not in (c, c + 1):
            raise ValueError(
                f"stats must have shape (C+1, K) = ({c + 1}, {NUM_STATS}) (or (C, K)), got {tuple(stats.shape)}"
            )
        table = stats.detach().to(torch.float64)
        if self.config["sync"]:
            table = all_reduce_sum(table)
        table = CategoryStats(table.cpu()[:c])  # the category rows only: row C never moves a margin
        bad = ~torch.isfinite(table.table)
        if bool(bad.any()):
            i, j = (int(k) for k in bad.nonzero()[0])
            raise ValueError(
                f"stats must be finite: column {STAT_COLUMNS[j]!r} of category {self.names[i]!r} is "
                f"{float(table.table[i, j])} (a NaN loss upstream?)"
            )
        count = table.count
        negative = count < 0
        if bool(negative.any()):
            i = int(negative.nonzero()[0])
            raise ValueError(f"stats column 'count' is negative ({float(count[i]):g}) for category {self.names[i]!r}")
        signal = self.config["signal"]
        unsafe = table.unsafe_count(signal)
        outside = ~_within_counts(unsafe, count)
        if bool(outside.any()):
            i = int(outside.nonzero()[0])
            if signal == "soft":
                column, what = "unsafe_pref_sum", f"{float(unsafe[i]):g}"
            else:
                column, what = (
                    "reward_acc",
                    f"{float(table.reward_acc[i]):g} with reward_tie = {float(table.reward_tie[i]):g} "
                    "(signal='hard': count - reward_acc - reward_tie/2 unsafe)",
                )
            raise ValueError(
                f"stats column {column!r} = {what} is outside [0, count = {float(count[i]):g}] for category "
                f"{self.names[i]!r}: an unsafe count cannot exceed the pair count"
            )
        return count, unsafe

    def _external_rate(self, unsafe_rate) -> torch.Tensor:
        """The local ``unsafe_rate`` as ``(C,)`` float64; only its type and shape are checked here."""
        ext = _real_tensor("unsafe_rate", unsafe_rate, "a (C,) sequence/tensor of rates in [0, 1] (NaN: leave alone)")
        if ext.shape != (self.num_categories,):
            raise ValueError(f"unsafe_rate must have shape (C,) = ({self.num_categories},), got {tuple(ext.shape)}")
        return ext

    def _reduce_rate(self, ext: torch.Tensor) -> torch.Tensor:
        """Average each category's rates over the ranks (when distributed), then check them.

        NaN is "no rate here": where no rank has one the result is NaN and that category stays
        put. A rate outside [0, 1] (±inf included) is counted in the same all-reduce, so that
        every rank learns of it and raises together, where a local check would leave the others
        hanging in the next collective.
        """
        given = ~torch.isnan(ext)
        bad = given & ~((ext >= 0) & (ext <= 1))
        ok = given & ~bad
        packed = torch.stack([torch.where(ok, ext, torch.zeros_like(ext)), ok.double(), bad.double()])
        if self.config["sync"] and _distributed_world() > 1:
            packed = all_reduce_sum(packed)
        if bool((packed[2] > 0).any()):
            i = int((packed[2] > 0).nonzero()[0])
            got = f"got {float(ext[i])}" if bool(bad[i]) else "got a value outside it on another rank"
            raise ValueError(
                f"unsafe_rate must be within [0, 1] (or NaN: leave the category alone); "
                f"category {self.names[i]!r} {got}"
            )
        return torch.where(packed[1] > 0, packed[0] / packed[1].clamp(min=1), torch.full_like(ext, float("nan")))

    def update(self, stats: torch.Tensor | None = None, *, unsafe_rate=None) -> torch.Tensor:
        """One dual-ascent step, once per optimiser step, after summing stats over micro-batches.

        ``stats``: the ``(C+1, K)`` ``category_stats`` table (summed over micro-batches;
        summed over ranks here when distributed). ``unsafe_rate``: an external ``(C,)``
        rate in [0, 1] (e.g. from a judge) that replaces ``r_c``; NaN entries leave that
        category alone. With ``unsafe_rate`` alone the ``min_count`` gate does not apply
        (there are no pair counts; the judge's sample is its own); with both, it does.
        Returns the new margins.

        Impossible inputs (a negative count, an unsafe count above the pair count, a
        non-finite value, a rate outside [0, 1]) raise a ``ValueError`` and leave the
        margins, the EMA, ``step`` and ``history`` exactly as they were.
        """
        if stats is None and unsafe_rate is None:
            raise ValueError("update() needs stats (the (C+1, K) table) or unsafe_rate=(C,)")
        cfg = self.config
        # Every check runs before any state changes: a rejected update changes nothing.
        ext = self._external_rate(unsafe_rate) if unsafe_rate is not None else None
        ema_count, ema_unsafe = self.ema_count, self.ema_unsafe
        active = torch.ones(self.num_categories, dtype=torch.bool)
        if stats is not None:
            n, v = self._counts_from_stats(stats)
            ema_count = cfg["ema"] * ema_count + n
            ema_unsafe = cfg["ema"] * ema_unsafe + v
            active &= ema_count >= max(cfg["min_count"], cfg["eps"])
        rate = ema_unsafe / ema_count.clamp(min=cfg["eps"])
        if ext is not None:
            ext = self._reduce_rate(ext)
            finite = torch.isfinite(ext)
            active &= finite
            rate = torch.where(finite, ext, torch.zeros_like(ext))
        self.ema_count, self.ema_unsafe = ema_count, ema_unsafe
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
        """Restore a ``state_dict()``; every entry is checked first, so a rejected state changes nothing.

        The configuration goes through the constructor's checks (``check_config``): a
        checkpoint cannot smuggle in a value the constructor would refuse.
        """
        if not isinstance(state, Mapping):
            raise TypeError(
                f"state_dict must be a dict (from CategoryMargins.state_dict()), got {type(state).__name__}"
            )
        for key in STATE_KEYS:
            if key not in state:
                raise ValueError(f"state_dict lacks the key {key!r} (not a CategoryMargins.state_dict()?)")
        saved_c = state["num_categories"]
        if isinstance(saved_c, bool) or not isinstance(saved_c, numbers.Integral):
            raise TypeError(f"state_dict['num_categories'] must be an int, got {type(saved_c).__name__} {saved_c!r}")
        c = self.num_categories
        if int(saved_c) != c:
            raise ValueError(f"state_dict has num_categories={saved_c}, this CategoryMargins has {c}")
        config = state["config"]
        if not isinstance(config, Mapping):
            raise TypeError(f"state_dict['config'] must be a dict, got {type(config).__name__}")
        missing = [k for k in CONFIG_KEYS if k not in config]
        unknown = sorted(str(k) for k in set(config) - set(CONFIG_KEYS))
        if missing or unknown:
            raise ValueError(f"state_dict['config'] lacks keys {missing} / has unknown keys {unknown}")
        _, config = check_config(c, **{k: config[k] for k in CONFIG_KEYS}, where="state_dict['config']: ")
        names = _check_names("state_dict['names']", state["names"], c)
        target = _state_vector("target", state["target"], c)
        value = _state_vector("value", state["value"], c)
        ema_count = _state_vector("ema_count", state["ema_count"], c)
        ema_unsafe = _state_vector("ema_unsafe", state["ema_unsafe"], c)
        if bool((ema_count < 0).any()) or not bool(_within_counts(ema_unsafe, ema_count).all()):
            raise ValueError("state_dict['ema_count'] / ['ema_unsafe'] must satisfy 0 <= ema_unsafe <= ema_count")
        step = state["step"]
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
            raise ValueError(f"state_dict['step'] must be an int >= 0, got {step!r}")
        history = state["history"]
        if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
            raise TypeError(f"state_dict['history'] must be a list of dicts, got {type(history).__name__}")
        # All checked: only now is anything replaced.
        self.config = config
        self.names = names
        self.target = target.to(torch.float64)
        self._value = value.float().to(self._value.device)
        self.ema_count = ema_count.to(torch.float64)
        self.ema_unsafe = ema_unsafe.to(torch.float64)
        self.step = int(step)
        self.history = [dict(h) for h in history]
        self._device_cache.clear()

    @classmethod
    def for_pku_saferlhf(cls, **kwargs) -> CategoryMargins:
        """Margins over the 19 PKU-SafeRLHF harm categories, named."""
        from .categories import PKU_SAFERLHF_CATEGORIES

        return cls(len(PKU_SAFERLHF_CATEGORIES), names=PKU_SAFERLHF_CATEGORIES, **kwargs)
