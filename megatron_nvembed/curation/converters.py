"""Non-retrieval datasets as contrastive training records (NV-Embed paper, section 4.2).

- classification: text -> query; positive = the label text (`positive="label"`) or another
  example of the same class (`positive="example"`); negatives = other classes' label texts (or
  examples); stratified subsampling across the positive's class.
- clustering: title (S2S) or abstract (P2P) -> query; its category -> positive (one of a list of
  categories at random); other categories -> negatives; stratified across categories.
- sts: pairs with score >= 4 -> two records (each direction); negatives = BM25 matches over all
  texts of rank >= 2 that have no annotated score > 2.5 with the query.
- decontaminate: drop records whose query's best BM25 score against the evaluation texts exceeds a
  threshold.
All are deterministic for a seed.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence

from megatron_nvembed.curation.bm25 import BM25Index


def stratified_indices(labels: Sequence, max_samples: int | None, seed: int) -> list[int]:
    """Indices of a subsample of at most `max_samples` keeping each label's share
    (largest-remainder quotas), in input order."""
    if max_samples is None or max_samples >= len(labels):
        return list(range(len(labels)))
    by_label: dict = defaultdict(list)
    for i, lab in enumerate(labels):
        by_label[lab].append(i)
    rng = random.Random(seed)
    total = len(labels)
    exact = {lab: max_samples * len(idx) / total for lab, idx in by_label.items()}
    quota = {lab: int(q) for lab, q in exact.items()}
    left = max_samples - sum(quota.values())
    for lab in sorted(exact, key=lambda lab: (-(exact[lab] - quota[lab]), str(lab)))[:left]:
        quota[lab] += 1
    keep = []
    for lab, idx in by_label.items():
        keep += rng.sample(idx, quota[lab])
    return sorted(keep)


def classification_records(
    texts: Sequence[str],
    labels: Sequence,
    *,
    task: str,
    label_texts: Sequence[str] | None = None,
    positive: str = "label",
    num_negatives: int = 7,
    max_samples: int | None = None,
    seed: int = 0,
) -> list[dict]:
    """Records from a classification dataset.

    Args:
        texts, labels: the examples and their class labels.
        label_texts: text of each example's label (default: str(label)).
        positive: "label" (the label text) or "example" (another example of the same class).
    """
    if positive not in ("label", "example"):
        raise ValueError(f"--positive must be 'label' or 'example', got {positive!r}")
    names = [str(t) for t in (label_texts if label_texts is not None else labels)]
    rng = random.Random(seed)
    classes = sorted(set(names))
    class_index = {c: k for k, c in enumerate(classes)}
    members: dict[str, list[int]] = defaultdict(list)
    position = [0] * len(names)  # each example's place in its class's member list
    for i, n in enumerate(names):
        position[i] = len(members[n])
        members[n].append(i)

    # Every draw is O(1) (or O(num_negatives)): "any item but one" is an index into the list
    # with that item left out, so no per-example list of the others is built (that was
    # quadratic in the class size).
    def other_class(own: int) -> str:
        r = rng.randrange(len(classes) - 1)
        return classes[r + (r >= own)]

    out = []
    for i in stratified_indices(names, max_samples, seed):
        own = names[i]
        ci = class_index[own]
        if positive == "label":
            pos = own
            k = min(num_negatives, len(classes) - 1)
            negs = [classes[r + (r >= ci)] for r in rng.sample(range(len(classes) - 1), k)]
        else:
            peers = members[own]
            if len(peers) < 2:
                continue  # a singleton class has no other example to pair with
            r = rng.randrange(len(peers) - 1)
            pos = texts[peers[r + (r >= position[i])]]
            neg_classes = (
                [other_class(ci) for _ in range(num_negatives)] if len(classes) > 1 else []
            )
            negs = [texts[rng.choice(members[c])] for c in neg_classes]
        out.append(
            {
                "query": texts[i],
                "pos": [pos],
                "neg": negs,
                "task": task,
                "in_batch_negatives": False,
            }
        )
    return out


def clustering_records(
    texts: Sequence[str],
    categories: Sequence,
    *,
    task: str,
    num_negatives: int = 7,
    max_samples: int | None = None,
    seed: int = 0,
) -> list[dict]:
    """Records from a clustering dataset; a category cell may be a string or a list of strings."""
    rng = random.Random(seed)
    cats = [list(c) if isinstance(c, (list, tuple)) else [str(c)] for c in categories]
    all_cats = sorted({c for cs in cats for c in cs})
    first = [cs[0] for cs in cats]
    out = []
    for i in stratified_indices(first, max_samples, seed):
        pos = rng.choice(cats[i])
        own = set(cats[i])
        n_others = len(all_cats) - len(own)
        if num_negatives >= n_others:  # all of them (few categories): order drawn at random
            others = [c for c in all_cats if c not in own]
            negs = rng.sample(others, len(others))
        else:  # distinct draws, rejecting the record's own: O(num_negatives) expected
            negs, seen = [], set()
            while len(negs) < num_negatives:
                c = all_cats[rng.randrange(len(all_cats))]
                if c not in own and c not in seen:
                    seen.add(c)
                    negs.append(c)
        out.append(
            {
                "query": texts[i],
                "pos": [pos],
                "neg": negs,
                "task": task,
                "in_batch_negatives": False,
            }
        )
    return out


def sts_records(
    pairs: Sequence[tuple[str, str, float]],
    *,
    task: str,
    min_score: float = 4.0,
    exclude_above: float = 2.5,
    num_negatives: int = 7,
    search_depth: int = 50,
) -> list[dict]:
    """Records from scored text pairs (t_a, t_b, score).

    Each pair with score >= `min_score` gives (t_a -> t_b) and (t_b -> t_a). Negatives: BM25
    over all distinct texts, best first, skipping rank 1 (the query itself), texts sharing no
    term with the query, and any text with an annotated score > `exclude_above` with the query
    (the positive included), keeping
    `num_negatives` (fewer if the first `search_depth` matches run out).
    """
    pool = sorted({t for a, b, _ in pairs for t in (a, b)})
    scored: dict[str, dict[str, float]] = defaultdict(dict)
    for a, b, s in pairs:
        scored[a][b] = max(s, scored[a].get(b, s))
        scored[b][a] = max(s, scored[b].get(a, s))
    directions = []
    for a, b, s in pairs:
        if s >= min_score:
            directions += [(a, b), (b, a)]
    if not directions:
        return []
    index = BM25Index(pool)
    docs, bm25 = index.search([q for q, _ in directions], k=search_depth + 1)
    out = []
    for (q, p), ranked, match in zip(directions, docs, bm25):
        negs = []
        for rank, (j, score) in enumerate(zip(ranked, match), 1):
            text = pool[j]
            if score <= 0:  # no shared term: not a match at all
                break
            if rank < 2 or text == q or scored[q].get(text, 0.0) > exclude_above:
                continue
            negs.append(text)
            if len(negs) == num_negatives:
                break
        out.append({"query": q, "pos": [p], "neg": negs, "task": task})
    return out


def decontaminate(
    records: Sequence[dict], eval_texts: Sequence[str], threshold: float
) -> tuple[list[dict], list[dict]]:
    """Splits records into (kept, dropped): dropped when the query's best BM25 score against any
    evaluation text exceeds `threshold` (bm25s scores; pick the threshold on your data)."""
    if not records:
        return [], []
    index = BM25Index(list(eval_texts))
    _, scores = index.search([r["query"] for r in records], k=1)
    kept, dropped = [], []
    for rec, best in zip(records, scores[:, 0]):
        (dropped if best > threshold else kept).append(rec)
    return kept, dropped
