"""The loss's optional objectives against a plain-Python reference written from their definitions.

The reference (`_reference`) walks every (query, text) pair in Python floats: for each
Matryoshka width k it truncates every embedding to its first k coordinates and L2-normalises it
again; query i's softmax runs over its positive and every negative the rules keep -- own hard
negatives, in-batch candidates, with `document_document` those same in-batch candidates scored
against its positive, with `query_query` the other in-batch queries -- leaving out texts identical
to its positive or carrying its positive's document id (and queries identical to it or sharing
its positive) and, with a margin m,
any score above m x its positive's. Loss = sum over widths of weight x mean over queries.

Tolerance: 1e-12 on float64 losses (only summation order differs). Also: prefix widths leave the
coordinates beyond the widest one without gradient (exactly 0), and bad settings are refused
with an error naming the flag or field.

Run alone: pytest tests/unit/test_loss_objectives.py
"""

import math

import pytest
import torch

from megatron_nvembed.loss import (
    ContrastiveLoss,
    ContrastiveLossConfig,
    LossInputs,
    Matryoshka,
    contrastive_loss,
)
from megatron_nvembed.loss._toy import ToyEncoder, encode, loss_inputs, toy_batch

T = 0.05


def _nll(pos, others, t=T):
    z = [pos / t] + [o / t for o in others]
    top = max(z)
    return -(z[0] - top - math.log(sum(math.exp(v - top) for v in z)))


def _dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def _prefix(v, k):
    if k is None:
        return v
    w = v[:k]
    norm = math.sqrt(sum(x * x for x in w))
    return [x / norm for x in w]


def _kl(teacher, student, t_d, t=T):
    """KL(softmax(teacher / t_d) || softmax(student / t)) over two lists (plain python)."""

    def log_softmax(z):
        top = max(z)
        lse = top + math.log(sum(math.exp(v - top) for v in z))
        return [v - lse for v in z]

    lt = log_softmax([v / t_d for v in teacher])
    ls = log_softmax([v / t for v in student])
    return sum(math.exp(a) * (a - b) for a, b in zip(lt, ls))


def _reference(batch, q, c, *, margin=None, qq=False, dd=False, terms=((None, 1.0),), distill=None):
    q, c = q.tolist(), c.tolist()
    mask, inb = batch["candidate_mask"].tolist(), batch["in_batch"].tolist()
    cid, qid = batch["candidate_ids"].tolist(), batch["query_ids"].tolist()
    b, n = len(c), len(c[0])
    did = batch["document_ids"].tolist() if "document_ids" in batch else [[0] * n] * b

    def same(i, k, j):  # text (k, j) is query i's positive: same tokens, or same document id
        return cid[k][j] == cid[i][0] or (did[i][0] != 0 and did[k][j] == did[i][0])

    total, counts = 0.0, []
    for width, weight in terms:
        losses = []
        for i in range(b):
            qi, pi = _prefix(q[i], width), _prefix(c[i][0], width)
            pos = _dot(qi, pi)
            negs = []

            def add(score, pos=pos, negs=negs):
                if margin is None or score <= margin * pos:
                    negs.append(score)

            for k in range(b):
                if k != i and not (inb[i] and inb[k]):
                    continue
                for j in range(n):
                    if (k, j) == (i, 0) or not mask[k][j] or same(i, k, j):
                        continue
                    ck = _prefix(c[k][j], width)
                    add(_dot(qi, ck))
                    if dd and k != i:
                        add(_dot(pi, ck))
                if qq and k != i and qid[k] != qid[i] and not same(i, k, 0):
                    add(_dot(qi, _prefix(q[k], width)))
            loss = _nll(pos, negs)
            if distill is not None and not math.isnan(batch["teacher_scores"][i][0]):
                weight_d, t_d = distill
                own = [j for j in range(n) if mask[i][j] and (j == 0 or not same(i, i, j))]
                teacher = [float(batch["teacher_scores"][i][j]) for j in own]
                student = [_dot(qi, _prefix(c[i][j], width)) for j in own]
                loss += weight_d * _kl(teacher, student, t_d)
            losses.append(loss)
            if width == terms[0][0]:
                counts.append(1 + len(negs))
        total += weight * sum(losses) / b
    return total, counts


def _batch():
    batch = toy_batch(8, 3, seed=5)
    # query 5 repeats query 0's text, and query 6 is another query of query 3's positive: the
    # query-query term must leave both pairs out
    for key in ("q_ids", "q_tok"):
        batch[key][5] = batch[key][0]
    batch["query_ids"][5] = batch["query_ids"][0]
    batch["c_ids"][6, 0] = batch["c_ids"][3, 0]
    batch["c_tok"][6, 0] = batch["c_tok"][3, 0]
    batch["candidate_ids"][6, 0] = batch["candidate_ids"][3, 0]
    # query 4's last hard negative is its own positive's text
    batch["c_ids"][4, 2], batch["c_tok"][4, 2] = batch["c_ids"][4, 0], batch["c_tok"][4, 0]
    batch["candidate_ids"][4, 2] = batch["candidate_ids"][4, 0]
    batch["candidate_mask"][4, 2] = True
    # teacher scores (a reranker's logits) for every query but query 2; NaN for absent negatives
    g = torch.Generator().manual_seed(3)
    teacher = torch.randn(8, 3, generator=g, dtype=torch.float64) * 4
    teacher[2] = float("nan")
    teacher[~batch["candidate_mask"]] = float("nan")
    batch["teacher_scores"] = teacher
    torch.manual_seed(1)
    q, c = encode(ToyEncoder(), batch)
    return batch, q, c


def _mrl(spec: Matryoshka) -> dict:
    """The config fields of a Matryoshka spec (`--matryoshka-dims`, `--matryoshka-weights`)."""
    return {"matryoshka_dims": list(spec.dims), "matryoshka_weights": list(spec.weights)}


def _loss(batch, q, c, **settings):
    """The loss of a toy batch (all its loss inputs) with `settings` (temperature T)."""
    config = ContrastiveLossConfig(**{"temperature": T, **settings})
    return contrastive_loss(q, c, loss_inputs(batch), config)


@pytest.mark.parametrize("margin", [None, 0.3])
@pytest.mark.parametrize("qq,dd", [(True, False), (False, True), (True, True)])
def test_query_query_and_document_document_terms_equal_reference(qq, dd, margin):
    batch, q, c = _batch()
    loss, stats = _loss(
        batch, q, c, query_query=qq, document_document=dd, false_negative_margin=margin
    )
    want, counts = _reference(batch, q.detach(), c.detach(), margin=margin, qq=qq, dd=dd)
    assert abs(loss.item() - want) <= 1e-12
    assert (stats.candidates_per_query_min, stats.candidates_per_query_max) == (
        min(counts),
        max(counts),
    )
    plain, plain_stats = _loss(batch, q, c, false_negative_margin=margin)
    assert stats.counts[0] > plain_stats.counts[0], "the extra terms added no negatives"


def test_identical_texts_are_never_negatives():
    batch, q, c = _batch()
    _, stats = _loss(batch, q, c, query_query=True, in_batch_negatives=True)
    _, counts = _reference(batch, q.detach(), c.detach(), qq=True)
    # query 4 alone, in-batch off: its copy of its positive is not among its negatives
    alone = {k: v[4:5] for k, v in batch.items()}
    _, own = _loss(alone, q[4:5], c[4:5], in_batch_negatives=False)
    assert own.candidates_per_query_max == 2  # positive + one real negative of three
    # queries 0 and 5 (same text) and 3 and 6 (same positive) do not see each other as queries
    _, loose = _loss(batch, q, c, query_query=True, mask_identical_positives=False)
    assert loose.counts[0] - stats.counts[0] >= 4 + 2  # 4 query pairs + 2 shared positives
    assert stats.counts[0] == sum(counts)


def _with_document_ids(batch):
    """Distinct ids for most texts, 0 (none) for some, and duplicates under other texts: query
    1's hard negative 1 is its positive's document; query 4's hard negative 1 (seen in-batch by
    the others) is query 7's positive's document; queries 0 and 3 have positives of one document
    (each sees the other's in-batch; the query-query term leaves them out of each other's).
    Queries 5 and 6 have positives without id, as has a hard negative of query 5: no match by
    id."""
    b, n = batch["candidate_mask"].shape
    ids = torch.arange(1, b * n + 1, dtype=torch.long).view(b, n) * 7919
    ids[1, 1] = ids[1, 0]
    ids[4, 1] = ids[7, 0]
    ids[0, 0] = ids[3, 0]
    ids[5, 0] = ids[6, 0] = ids[5, 1] = 0
    out = dict(batch)
    out["document_ids"] = ids
    return out


@pytest.mark.parametrize("qq,dd", [(False, False), (True, True)])
def test_same_document_id_is_never_a_negative(qq, dd):
    """With document ids the loss equals the reference that excludes a negative carrying the
    positive's id whatever its text (1e-12), masks exactly the duplicates placed (own, in-batch
    and, with query-query, a query whose positive is that document), and never matches two texts
    that have no id; without `mask_identical_positives` ids change nothing."""
    batch, q, c = _batch()
    with_ids = _with_document_ids(batch)
    loss, stats = _loss(with_ids, q, c, query_query=qq, document_document=dd)
    want, counts = _reference(with_ids, q.detach(), c.detach(), qq=qq, dd=dd)
    assert abs(loss.item() - want) <= 1e-12
    assert stats.counts[0] == sum(counts)
    _, plain = _loss(batch, q, c, query_query=qq, document_document=dd)
    # query 1's own negative; query 4's negative for query 7 and queries 0 / 3's positives
    # for each other, in-batch (twice each with dd: also against the positive); with qq
    # queries 0 and 3 no longer see each other as queries
    masked = 1 + (1 + 2) * (2 if dd else 1) + (2 if qq else 0)
    assert plain.counts[0] - stats.counts[0] == masked
    loose, _ = _loss(with_ids, q, c, query_query=qq, document_document=dd,
                     mask_identical_positives=False)  # fmt: skip
    plain_loose, _ = _loss(batch, q, c, query_query=qq, document_document=dd,
                           mask_identical_positives=False)  # fmt: skip
    assert loose.item() == plain_loose.item()
    with pytest.raises(ValueError, match="document_ids must be"):
        _loss({**with_ids, "document_ids": with_ids["document_ids"][:, :2]}, q, c)


@pytest.mark.parametrize("qq", [False, True])
def test_matryoshka_is_the_weighted_sum_over_renormalised_prefixes(qq):
    batch, q, c = _batch()
    spec = Matryoshka((8, 4, 2), (1.0, 0.5, 0.25))
    loss, _ = _loss(batch, q, c, **_mrl(spec), query_query=qq, false_negative_margin=0.9)
    want, _ = _reference(
        batch, q.detach(), c.detach(), qq=qq, margin=0.9, terms=tuple(zip(spec.dims, spec.weights))
    )
    assert abs(loss.item() - want) <= 1e-12
    # the full width alone, renormalised (a no-op up to rounding), is the plain loss
    full, _ = _loss(batch, q, c, **_mrl(Matryoshka((8,))))
    plain, _ = _loss(batch, q, c)
    assert abs(full.item() - plain.item()) <= 1e-12


@pytest.mark.parametrize("in_batch", [True, False])
def test_distillation_adds_the_kl_to_the_teachers_distribution(in_batch):
    batch, q, c = _batch()
    spec = Matryoshka((8, 4), (1.0, 0.5))
    loss, _ = _loss(
        batch, q, c, distill_weight=0.7, distill_temperature=2.0, in_batch_negatives=in_batch,
        **_mrl(spec),
    )  # fmt: skip
    if in_batch:
        want, _ = _reference(batch, q.detach(), c.detach(), terms=tuple(zip(spec.dims,
                             spec.weights)), distill=(0.7, 2.0))  # fmt: skip
        assert abs(loss.item() - want) <= 1e-12
    plain, _ = _loss(batch, q, c, in_batch_negatives=in_batch, **_mrl(spec))
    assert loss.item() > plain.item() + 1e-3  # KL >= 0, and > 0 for random teachers
    # a teacher that agrees with the student at the student's temperature adds nothing
    agree = dict(batch)
    agree["teacher_scores"] = torch.where(
        torch.isnan(batch["teacher_scores"]),
        batch["teacher_scores"],
        torch.einsum("bd,bnd->bn", q, c).detach(),
    )
    same, _ = _loss(agree, q, c, distill_weight=0.7, distill_temperature=T,
                    in_batch_negatives=in_batch)  # fmt: skip
    base, _ = _loss(agree, q, c, in_batch_negatives=in_batch)
    assert abs(same.item() - base.item()) <= 1e-12
    with pytest.raises(ValueError, match="teacher_scores"):
        stage2 = ContrastiveLossConfig(in_batch_negatives=False, distill_weight=1.0)
        contrastive_loss(q, c, LossInputs(batch["candidate_mask"]), stage2)
    for kw, flag in (
        (dict(distill_weight=-1.0), "--distill-weight"),
        (dict(distill_temperature=0.0), "--distill-temperature"),
        (dict(distill_weight=float("inf")), "--distill-weight"),
    ):
        with pytest.raises(ValueError, match=flag):
            ContrastiveLossConfig(**kw).validate()


def test_matryoshka_prefixes_send_no_gradient_beyond_the_widest():
    batch, q, c = _batch()
    q = q.detach().requires_grad_(True)
    c = c.detach().requires_grad_(True)
    loss, _ = _loss(batch, q, c, **_mrl(Matryoshka((5, 3))), document_document=True)
    loss.backward()
    assert q.grad[:, 5:].abs().max().item() == 0.0 and c.grad[..., 5:].abs().max().item() == 0.0
    assert q.grad[:, :5].abs().max().item() > 0.0 and c.grad[..., :5].abs().max().item() > 0.0


def test_module_passes_its_settings_and_refuses_bad_ones():
    batch, q, c = _batch()
    cfg = ContrastiveLossConfig(
        temperature=T, query_query=True, document_document=True, **_mrl(Matryoshka((8, 4)))
    )
    inputs = LossInputs(
        batch["candidate_mask"], batch["in_batch"], batch["candidate_ids"], batch["query_ids"]
    )
    got = ContrastiveLoss(cfg)(q, c, inputs)
    want, _ = _loss(batch, q, c, query_query=True, document_document=True,
                    **_mrl(Matryoshka((8, 4))))  # fmt: skip
    assert got.item() == want.item()
    bad = [
        (dict(query_query=True, in_batch_negatives=False), "needs in-batch negatives"),
        (dict(document_document=True, in_batch_negatives=False), "needs in-batch negatives"),
        (dict(matryoshka_weights=[1.0]), "--matryoshka-weights needs --matryoshka-dims"),
        (dict(matryoshka_dims=[4, 4]), "distinct"),
        (dict(matryoshka_dims=[4, 2], matryoshka_weights=[1.0]), "--matryoshka-weights"),
        (dict(matryoshka_dims=[4], matryoshka_weights=[-1.0]), "> 0"),
    ]
    for kw, words in bad:
        with pytest.raises(ValueError, match=words):
            ContrastiveLossConfig(**kw).validate()
    with pytest.raises(ValueError, match="exceeds the embedding width 8"):
        _loss(batch, q, c, **_mrl(Matryoshka((16,))))
    with pytest.raises(ValueError, match="query_ids"):
        inputs = LossInputs(batch["candidate_mask"], candidate_ids=batch["candidate_ids"])
        contrastive_loss(q, c, inputs, ContrastiveLossConfig(query_query=True))


def test_training_flags_reach_the_loss():
    from megatron_nvembed.training.arguments import parse_args

    argv = ["--train-data", "x.jsonl", "--matryoshka-dims", "64", "16", "--matryoshka-weights",
            "1", "0.5", "--query-query-negatives", "--document-document-negatives"]  # fmt: skip
    loss_cfg = parse_args(argv).loss  # what `training.setup.build` hands the loss
    assert loss_cfg.matryoshka == Matryoshka((64, 16), (1.0, 0.5))
    assert loss_cfg.query_query and loss_cfg.document_document
    for extra, flag in (
        (["--matryoshka-dims", "65"], "--matryoshka-dims"),
        (["--matryoshka-weights", "1"], "--matryoshka-weights"),
        (["--matryoshka-dims", "8", "--matryoshka-weights", "inf"], "--matryoshka-weights"),
        (["--stage", "2", "--query-query-negatives"], "--query-query-negatives"),
        (["--no-in-batch-negatives", "--document-document-negatives"],
         "--document-document-negatives"),
    ):  # fmt: skip
        with pytest.raises(ValueError, match=flag):
            parse_args(["--train-data", "x.jsonl", *extra])
