"""The stage functions called directly, as the benchmarks and scripts call them (no Dagster)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from embed_assets.byod import DataValidationError
from embed_assets.models import BUNDLED_MODEL
from embed_assets.stages.common import ModelSpec, StageContext
from embed_assets.stages.evaluate import EvalSettings, evaluate_checkpoint
from embed_assets.stages.ingest import ChunkSettings, CorpusSettings, chunk_documents, read_documents
from embed_assets.stages.sdg import SDGSettings, generate_pairs, load_pairs
from embed_assets.stages.split import SplitSettings, split_pairs
from embed_assets.storage import write_parquet
from embed_assets_tests.conftest import model_checkpoint, perturbed_model

MODEL = ModelSpec(BUNDLED_MODEL, device="cpu")


@pytest.fixture
def prepared(tmp_path: Path, tiny_corpus: Path):
    """Chunks and inverse-cloze pairs of the tiny corpus."""
    ctx = StageContext.local(tmp_path / "artifacts", run_id="run-1")
    corpus = read_documents(CorpusSettings(path=str(tiny_corpus)), ctx)
    chunks = chunk_documents(corpus, ChunkSettings(passage_max_length=256), MODEL, ctx)
    pairs = generate_pairs(chunks, SDGSettings(), MODEL, ctx)
    return ctx, chunks, pairs


def _golden_csv(tmp_path: Path, chunks, rows: list[tuple[str, str]]) -> Path:
    path = tmp_path / "golden.csv"
    lines = ["Question,Answer", *(f'"{q}","{a}"' for q, a in rows)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _spans(chunks, n: int) -> list[tuple[str, str]]:
    """(question, answer span) pairs whose answers are sentences of distinct documents' passages."""
    out, docs = [], set()
    for c in chunks.load():
        if c.doc_id in docs:
            continue
        sentence = next((s for s in c.text.split(". ") if len(s.split()) >= 8 and '"' not in s), None)
        if sentence:
            docs.add(c.doc_id)
            out.append((f"What does the reference say about {' '.join(sentence.split()[:4])}?", sentence))
        if len(out) == n:
            break
    return out


def test_golden_set_errors_name_file_and_line(tmp_path: Path, prepared) -> None:
    ctx, chunks, pairs = prepared
    good = _spans(chunks, 2)
    bad = _golden_csv(
        tmp_path,
        chunks,
        [good[0], ("", good[1][1]), ("What is a quokka?", "Quokkas live on Rottnest Island."), good[0]],
    )
    with pytest.raises(DataValidationError) as info:
        split_pairs(chunks, pairs, SplitSettings(eval_path=str(bad)), ctx)
    assert info.value.errors == [
        f"{bad}:3: field 'question' is empty",
        f"{bad}:4: field 'answer' matches no passage of the corpus",
        f"{bad}:5: duplicate row: query {good[0][0][:60]!r} and this passage appear earlier",
    ]


@pytest.mark.slow  # encodes the corpus with two models
def test_golden_set_is_kept_out_of_training_and_evaluated(tmp_path: Path, prepared) -> None:
    import pytrec_eval

    from embed_assets.beir_io import load_beir_folder
    from embed_assets.models import load_sentence_transformer

    ctx, chunks, pairs = prepared
    golden = _golden_csv(tmp_path, chunks, _spans(chunks, 3))
    split = split_pairs(chunks, pairs, SplitSettings(eval_path=str(golden), golden_holdout="all_pairs"), ctx)
    assert split.golden is not None and split.golden.queries == 3 and split.golden.documents == 3
    assert split.golden.documents_trained_on == 0
    _, _, qrels = load_beir_folder(split.golden.beir, split="test")
    doc_of = {c.chunk_id: c.doc_id for c in chunks.load()}
    golden_docs = {doc_of[cid] for rels in qrels.values() for cid in rels}
    assert golden_docs <= set(split.test_docs) and not golden_docs & set(split.train_docs + split.val_docs)

    # A "fine-tuned" model that is the base model saved with a 32-token window: evaluated at the base window,
    # it must score exactly like the base model (same weights, same window), on both sets.
    tuned = tmp_path / "tuned"
    st = load_sentence_transformer(BUNDLED_MODEL)
    st.max_seq_length = 32
    st.save(str(tuned))
    checkpoint = model_checkpoint(tuned)
    metrics = evaluate_checkpoint(split, checkpoint, EvalSettings(), MODEL, ctx)
    assert metrics.eval_max_seq_length == 256  # the base model's window, for both models
    assert [s.name for s in metrics.sets] == ["generated_test", "golden", "guard"]
    assert metrics.primary.name == "golden"
    for s in metrics.sets:
        assert s.finetuned == s.base, f"{s.name}: same weights at the same window must give the same metrics"
    assert metrics.gates()[0].passed and "golden" in metrics.gates()[0].message
    assert metrics.gates()[1].name == "no_forgetting" and metrics.gates()[1].passed  # same weights: no loss

    # The golden metrics equal an independent pytrec_eval computation on the run file the stage wrote.
    run = json.loads((Path(metrics.path).parent / "golden_run_finetuned.json").read_text())
    scores = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.100"}).evaluate(run)
    ndcg = sum(scores[q]["ndcg_cut_10"] for q in qrels) / len(qrels)
    assert metrics.primary.finetuned["NDCG@10"] == pytest.approx(ndcg, abs=1e-9)
    recall = sum(scores[q]["recall_100"] for q in qrels) / len(qrels)
    assert metrics.primary.finetuned["Recall@100"] == pytest.approx(recall, abs=1e-9)

    # At its own 32-token window the same model would have scored differently: the window matters.
    from embed_assets.stages.evaluate import evaluate_model

    corpus, queries, gen_qrels = load_beir_folder(split.eval_beir, split="test")
    at_32, _, _ = evaluate_model(str(tuned), corpus, queries, gen_qrels, EvalSettings(), MODEL, 32, "cpu")
    assert at_32 != metrics.sets[0].finetuned


def test_each_loss_option_builds_the_loss_it_names() -> None:
    from sentence_transformers.sentence_transformer import losses

    from embed_assets.models import load_sentence_transformer
    from embed_assets.stages.train import MNRL_DIRECTIONS, TrainSettings
    from embed_assets.training import build_loss

    model = load_sentence_transformer(BUNDLED_MODEL, max_seq_length=32)

    def built(**options):
        return build_loss(model, TrainSettings(max_seq_length=32, **options), BUNDLED_MODEL, "cpu")

    assert type(built(loss="mnrl")) is losses.MultipleNegativesRankingLoss
    assert type(built(loss="cached_mnrl")) is losses.CachedMultipleNegativesRankingLoss
    gist = built(loss="gist")
    assert type(gist) is losses.GISTEmbedLoss and gist.guide is not model  # the base model guides
    assert type(built(loss="cached_gist")) is losses.CachedGISTEmbedLoss
    hard = built(loss="mnrl", hardness_mode="hard_negatives", hardness_strength=5.0)
    assert hard.hardness_mode == "hard_negatives" and hard.hardness_strength == 5.0
    nested = built(loss="gist", matryoshka_dims=[96, 192, 999])
    assert type(nested) is losses.MatryoshkaLoss and type(nested.loss) is losses.GISTEmbedLoss
    assert list(nested.matryoshka_dims) == [384, 192, 96]  # the full size always, sizes above it dropped
    with pytest.raises(ValueError, match="GISTEmbed has no hardness"):
        built(loss="gist", hardness_strength=1.0)

    # GTE's improved contrastive loss: the same batch, more contrasts, another loss value.
    gte = built(loss="cached_mnrl", mnrl_directions=list(MNRL_DIRECTIONS))
    assert gte.directions == MNRL_DIRECTIONS and gte.partition_mode == "joint"
    queries, passages = ["python lists", "python dicts"], ["A list is ordered.", "A dict maps keys."]
    batch = [model.tokenize(queries), model.tokenize(passages)]
    plain, full = built(loss="mnrl"), built(loss="mnrl", mnrl_directions=list(MNRL_DIRECTIONS))
    assert float(full(batch, None)) != pytest.approx(float(plain(batch, None)))
    with pytest.raises(ValueError, match="mnrl_directions applies to the MNRL losses"):
        built(loss="gist", mnrl_directions=["query_to_doc", "doc_to_query"])
    with pytest.raises(ValueError, match="must include 'query_to_doc'"):
        TrainSettings(mnrl_directions=["doc_to_query"])


@pytest.mark.slow  # trains: learning-rate probes, then GISTEmbed + Matryoshka with early stopping
def test_training_picks_its_learning_rate_on_validation_and_reports_matryoshka(
    tmp_path: Path, prepared
) -> None:
    from embed_assets.stages.mine import MiningSettings, mine_negatives
    from embed_assets.stages.train import TrainSettings, train_checkpoint

    ctx, chunks, pairs = prepared
    split = split_pairs(chunks, pairs, SplitSettings(), ctx)
    assert split.n_val > 0, "small data keeps a validation split (small_data_ratios)"
    mined = mine_negatives(chunks, pairs, split, MiningSettings(), MODEL, ctx)
    settings = TrainSettings(
        loss="gist",
        matryoshka_dims=[96],
        lr_candidates=[1e-6, 1e-4],
        lr_probe_fraction=1.0,
        batch_size=8,
        max_seq_length=48,
        epochs=2,
        negatives_per_row=1,
    )
    checkpoint = train_checkpoint(chunks, pairs, split, mined, settings, MODEL, ctx)
    selection = checkpoint.selection
    assert selection is not None and [p["learning_rate"] for p in selection.probes] == [1e-6, 1e-4]
    best = max(selection.probes, key=lambda p: p["val_ndcg@10"])
    assert selection.learning_rate == best["learning_rate"] and "best validation nDCG@10" in selection.reason
    meta = checkpoint.metadata()
    assert meta["learning_rate"] == selection.learning_rate and meta["learning_rate_probes"].rows
    assert checkpoint.eval_curve and "best validation" in meta["kept_checkpoint"]
    recorded = json.loads((Path(checkpoint.model_dir) / "embed_assets_training.json").read_text())
    assert recorded["settings"]["learning_rate"] == selection.learning_rate
    # validated (and so chosen) at the 48-token training window by default; saved at the base window
    assert meta["validation_window"] == recorded["validation_max_seq_length"] == 48
    # the kept model is the best on validation of the winning probe and the final training's checkpoints
    probe_won = best["val_ndcg@10"] > max(v for _, v in checkpoint.eval_curve)
    assert bool(selection.kept) == probe_won
    assert recorded["settings"]["max_steps"] == (selection.probe_steps if probe_won else -1)
    card = (Path(checkpoint.model_dir) / "README.md").read_text()
    assert ("learning-rate probe" in card) == probe_won
    # Matryoshka starts from the variance rotation, which training leaves an exact rotation (frozen).
    assert 0.0 < meta["rotation_variance_at_96"] <= meta["rotation_variance_at_384"] == pytest.approx(1.0)
    import torch

    from embed_assets.models import load_sentence_transformer

    rotation = load_sentence_transformer(checkpoint.model_dir)[-1].linear.weight.detach()
    assert (rotation @ rotation.T - torch.eye(384)).abs().max().item() < 1e-5

    metrics = evaluate_checkpoint(split, checkpoint, EvalSettings(), MODEL, ctx)
    dims = metrics.primary.matryoshka
    assert set(dims) == {"96"} and 0.0 <= dims["96"] <= 1.0
    assert metrics.metadata()["matryoshka"].rows[0]["dimensions"] == 96


def test_generated_pairs_of_golden_documents_train_and_the_users_own_never_do(
    tmp_path: Path, prepared
) -> None:
    from embed_assets.storage import write_jsonl

    ctx, chunks, pairs = prepared
    spans = _spans(chunks, 3)
    golden = _golden_csv(tmp_path, chunks, spans)
    passages = chunks.load()
    golden_docs = {c.doc_id for c in passages for _, a in spans if a in c.text}
    assert len(golden_docs) == 3
    questions = {q for q, _ in spans}

    # Generated pairs (the offline generator's): a golden passage trains as it would in use.
    split = split_pairs(chunks, pairs, SplitSettings(eval_path=str(golden)), ctx)
    trained = {r.doc_id for r in split.train_records()} & golden_docs
    assert trained and split.golden.documents_trained_on == len(trained)
    assert split.metadata()["golden_documents_with_generated_training_pairs"] == len(trained)
    assert not questions & {r.query for r in split.train_records()}
    # golden_holdout all_pairs: no golden document is trained on, or validated on.
    strict = split_pairs(
        chunks,
        pairs,
        SplitSettings(eval_path=str(golden), golden_holdout="all_pairs"),
        StageContext.local(tmp_path / "strict", run_id="strict"),
    )
    assert golden_docs <= set(strict.test_docs) and strict.golden.documents_trained_on == 0
    assert not golden_docs & {r.doc_id for r in [*strict.train_records(), *strict.val_records()]}

    # The user's own pairs on golden documents never train; the corpus pseudo-queries beside them train on
    # every golden document, whether it has user pairs (test documents) or not.
    spared = sorted(golden_docs)[0]
    user = [
        {
            "query": f"which passage starts with {' '.join(c.text.split()[:5])}?",
            "positives": [c.text],
            "doc_id": c.doc_id,
        }
        for c in passages
        if c.doc_id != spared
    ]
    write_jsonl(tmp_path / "pairs.jsonl", user)
    sdg = SDGSettings(
        generator="user_data", user_data_path=str(tmp_path / "pairs.jsonl"), corpus_queries_per_pair=1.0
    )
    uctx = StageContext.local(tmp_path / "user", run_id="user")
    user_split = split_pairs(
        chunks, generate_pairs(chunks, sdg, MODEL, uctx), SplitSettings(eval_path=str(golden)), uctx
    )
    train = user_split.train_records()
    assert not {r.doc_id for r in train if r.generator == "byod"} & golden_docs
    assert golden_docs - {spared} <= set(user_split.test_docs)
    generated = {r.doc_id for r in train if r.generator == "inverse_cloze"}
    assert spared in generated and generated & (golden_docs - {spared})
    assert user_split.golden.documents_trained_on == len(generated & golden_docs)


def test_corpus_queries_train_beside_user_pairs_and_never_validate(tmp_path: Path, prepared) -> None:
    """They never validate or test, and train on every document (all_pairs: not on held-out ones)."""
    from embed_assets.storage import write_jsonl

    ctx, chunks, _ = prepared
    passages = chunks.load()
    user = [
        {
            "query": f"which passage starts with {' '.join(c.text.split()[:5])}?",
            "positives": [c.text],
            "doc_id": c.doc_id,
        }
        for c in passages
    ]
    path = tmp_path / "pairs.jsonl"
    write_jsonl(path, user)
    plain = SDGSettings(generator="user_data", user_data_path=str(path))
    mixed = plain.model_copy(update={"corpus_queries_per_pair": 0.5})
    only_user = generate_pairs(chunks, plain, MODEL, ctx)
    both = generate_pairs(chunks, mixed, MODEL, StageContext.local(tmp_path / "b", run_id="b"))
    assert only_user.stats["corpus_queries"] == 0 and only_user.n_pairs == len(user)
    assert both.stats["corpus_queries"] == int(0.5 * len(user)) > 0  # capped per user pair
    assert both.n_pairs == len(user) + both.stats["corpus_queries"]

    split_user = split_pairs(chunks, only_user, SplitSettings(), ctx)
    split_both = split_pairs(chunks, both, SplitSettings(), StageContext.local(tmp_path / "b", run_id="b"))
    # the user's pairs are placed exactly as without the pseudo-queries; those only ever train
    assert (split_both.train_docs, split_both.val_docs, split_both.test_docs) == (
        split_user.train_docs,
        split_user.val_docs,
        split_user.test_docs,
    )
    assert split_both.n_val and {r.generator for r in split_both.val_records()} == {"byod"}
    assert {r.generator for r in load_pairs(split_both.test)} == {"byod"}
    train = split_both.train_records()
    assert {r.generator for r in train} == {"byod", "inverse_cloze"}
    held_out = set(split_both.val_docs) | set(split_both.test_docs)
    generated = {r.doc_id for r in train if r.generator == "inverse_cloze"}
    # validation and test measure the model adapted to their passages too, as a golden set does
    assert generated & set(split_both.val_docs) and generated & set(split_both.test_docs)
    assert split_both.n_val == split_user.n_val and split_both.n_test == split_user.n_test
    strict = split_pairs(
        chunks,
        both,
        SplitSettings(golden_holdout="all_pairs"),
        StageContext.local(tmp_path / "s", run_id="s"),
    )
    assert strict.val_docs == split_both.val_docs and strict.n_val == split_both.n_val
    strict_generated = {r.doc_id for r in strict.train_records() if r.generator == "inverse_cloze"}
    assert strict_generated and not strict_generated & held_out

    # Mining takes the trained test passages as candidates, and no other test passage.
    from embed_assets.stages.mine import MiningSettings, mine_negatives

    rows = mine_negatives(chunks, both, split_both, MiningSettings(), MODEL, ctx).rows()
    assert len(rows) == split_both.n_train
    trained = {r.positive_chunk_ids[0] for r in train}
    test_passages = {c.chunk_id for c in passages if c.doc_id in set(split_both.test_docs)}
    assert trained & test_passages
    assert not {n for row in rows for n in row["negative_ids"]} & (test_passages - trained)


@pytest.mark.parametrize("lifted, lift, chosen", [(1, 0.08, 5e-05), (40, 0.1, 1e-04)])
def test_a_learning_rate_replaces_the_configured_one_only_beyond_noise(
    tmp_path: Path, monkeypatch, lifted, lift, chosen
) -> None:
    """1e-4 validates higher either way; only a lift the paired bootstrap trusts moves the choice off 5e-05."""
    from types import SimpleNamespace

    from embed_assets.stages import train as stage

    queries = [f"q{i}" for i in range(40)]
    base = {q: 0.3 + 0.01 * i for i, q in enumerate(queries)}

    def fake_train(rows, work, out, settings, *args):  # the probes' scores, without the trainer
        up = settings.learning_rate == 1e-04
        per_query = {q: v + (lift if up and i < lifted else 0.0) for i, (q, v) in enumerate(base.items())}
        mean = sum(per_query.values()) / len(per_query)
        return SimpleNamespace(eval_curve=[(settings.max_steps, mean)], val_per_query=per_query)

    monkeypatch.setattr(stage, "_train", fake_train)
    settings = stage.TrainSettings(lr_candidates=[5e-05, 1e-04], max_steps=100, learning_rate=5e-05)
    val = {"queries": dict.fromkeys(queries, "q"), "corpus": {}, "relevant_docs": {}}
    ctx = StageContext.local(tmp_path, run_id="lr")
    selection = stage.choose_learning_rate([], val, settings, MODEL, "cpu", 1, tmp_path, ctx, None, "")
    best = max(selection.probes, key=lambda p: p["val_ndcg@10"])
    assert best["learning_rate"] == 1e-04  # the higher mean both times
    assert selection.learning_rate == chosen and selection.probe_steps == 25
    if chosen == 5e-05:
        assert "not better beyond noise" in selection.reason and "40 validation queries" in selection.reason
    else:
        assert selection.reason.startswith("best validation nDCG@10")


@pytest.mark.parametrize("probe_score, kept", [(0.6, "probe"), (0.4, "final")])
def test_the_winning_probe_is_kept_when_it_validates_better(tmp_path: Path, probe_score, kept) -> None:
    from types import SimpleNamespace

    from embed_assets.stages.train import LRSelection, keep_best_probe

    work, out = tmp_path / "work", tmp_path / "out" / "model"
    (work / "probe-lr-5e-05" / "model").mkdir(parents=True)
    (work / "probe-lr-5e-05" / "model" / "which.txt").write_text("probe")
    out.mkdir(parents=True)
    (out / "which.txt").write_text("final")
    probes = [
        {"learning_rate": 2e-05, "val_ndcg@10": 0.9},
        {"learning_rate": 5e-05, "val_ndcg@10": probe_score},
    ]
    selection = LRSelection(5e-05, "best", probes, probe_steps=25)
    report = SimpleNamespace(eval_curve=[(50, 0.45), (100, 0.5)])
    keep_best_probe(selection, report, work, out, StageContext.local(tmp_path / "a", run_id="r"), None, "")
    assert (out / "which.txt").read_text() == kept
    assert bool(selection.kept) == (kept == "probe")
    if selection.kept:
        assert "probe 5e-05 after 25 steps" in selection.kept and "0.5000" in selection.kept


def test_cloze_mask_rate_cuts_the_sentence_from_the_trained_positive(tmp_path: Path, prepared) -> None:
    from embed_assets.stages.mine import MiningSettings, mine_negatives

    _, chunks, pairs = prepared
    runs = {}
    for rate in (0.0, 1.0):
        ctx = StageContext.local(tmp_path / "artifacts", run_id=f"mask-{rate:g}")  # a folder per run
        p = pairs if rate == 0.0 else generate_pairs(chunks, SDGSettings(cloze_mask_rate=rate), MODEL, ctx)
        split = split_pairs(chunks, p, SplitSettings(), ctx)
        runs[rate] = (split, mine_negatives(chunks, p, split, MiningSettings(), MODEL, ctx))
    (_, kept), (split, masked) = runs[0.0], runs[1.0]
    assert kept.metadata()["positives_with_cloze_sentence_cut"] == 0  # the default keeps every sentence in
    whole = {(r["query"], r["positive_id"]): r["positive_text"] for r in kept.rows()}
    sentence = {r.query: r.answer for r in split.train_records() if r.mask_answer}
    cut = [r for r in masked.rows() if r["positive_text"] != whole[(r["query"], r["positive_id"])]]
    assert masked.metadata()["positives_with_cloze_sentence_cut"] == len(cut) > 0.5 * masked.n_rows
    for r in cut:
        assert sentence[r["query"]] not in r["positive_text"]
        assert sentence[r["query"]] in " ".join(whole[(r["query"], r["positive_id"])].split())


@pytest.mark.slow  # evaluates two models on the bundled guard set
def test_the_forgetting_guard_stops_a_model_that_forgot(tmp_path: Path, prepared) -> None:
    """A model made to forget (its weights perturbed) loses on the general-domain guard set: a blocking gate."""
    ctx, chunks, pairs = prepared
    split = split_pairs(chunks, pairs, SplitSettings(), ctx)
    forgot = perturbed_model(tmp_path / "forgot", spread=0.4)  # matrices: noise of 40 % of their spread
    checkpoint = model_checkpoint(forgot)
    metrics = evaluate_checkpoint(split, checkpoint, EvalSettings(allow_regression=False), MODEL, ctx)
    guard = metrics.guard
    assert guard is not None and guard.bootstrap.ci95_high < -0.01
    gate = next(g for g in metrics.gates() if g.name == "no_forgetting")
    assert not gate.passed and gate.blocking and gate.severity == "error"
    assert "loses more than 1.0 points beyond noise outside the domain" in gate.message
    assert "allow_regression: true" in gate.message
    card = (forgot / "README.md").read_text()
    assert "no_forgetting: FAILED" in card and "| guard |" in card


def test_chunking_reuses_unchanged_documents_and_evicts_removed_ones(
    tmp_path: Path, tiny_corpus: Path
) -> None:
    ctx = StageContext.local(tmp_path / "artifacts", run_id="run-1")
    settings = ChunkSettings(passage_max_length=256)

    def cut(run_id: str, chunk_settings: ChunkSettings = settings):
        c = StageContext.local(tmp_path / "artifacts", run_id=run_id)
        return chunk_documents(
            read_documents(CorpusSettings(path=str(tiny_corpus)), c), chunk_settings, MODEL, c
        )

    first = chunk_documents(read_documents(CorpusSettings(path=str(tiny_corpus)), ctx), settings, MODEL, ctx)
    assert first.documents_chunked == first.n_docs and first.documents_reused == 0
    again = cut("run-2")
    assert again.documents_chunked == 0 and again.documents_reused == first.n_docs
    assert [c.to_dict() for c in again.load()] == [c.to_dict() for c in first.load()]  # identical passages

    docs = sorted(p for p in tiny_corpus.rglob("*") if p.is_file())
    docs[0].write_text(docs[0].read_text() + "\n\nA sentence that was not there before the edit.\n")
    docs[1].unlink()
    edited = cut("run-3")
    assert edited.documents_chunked == 1 and edited.documents_reused == first.n_docs - 2
    assert edited.cache_evicted == 2  # the removed document and the edited one's old content
    assert edited.metadata()["documents_reused_from_cache"] == first.n_docs - 2

    other = cut("run-4", ChunkSettings(passage_max_length=128))  # other settings: nothing stale is reused
    assert other.documents_chunked == other.n_docs and other.documents_reused == 0


def test_pairs_of_unchanged_inputs_are_reused_and_a_change_regenerates(prepared, tmp_path: Path) -> None:
    ctx, chunks, pairs = prepared
    assert not pairs.output_reused and pairs.inputs_fingerprint
    again = generate_pairs(
        chunks, SDGSettings(), MODEL, StageContext.local(ctx.root, "run-2"), previous=pairs
    )
    assert again.output_reused and again.path == pairs.path and again.n_pairs == pairs.n_pairs
    assert again.metadata()["output_reused"] is True
    # another generator setting, or other chunks: generated (from the SDG cache) into this run's folder
    other = generate_pairs(
        chunks, SDGSettings(queries_per_chunk=1), MODEL, StageContext.local(ctx.root, "run-3"), previous=pairs
    )
    assert not other.output_reused and other.path != pairs.path
    fewer = dataclasses.replace(chunks, path=str(tmp_path / "fewer.parquet"))
    gone = pairs.load()[0].doc_id  # a document with pairs leaves the corpus
    write_parquet(fewer.path, [c.to_dict() for c in chunks.load() if c.doc_id != gone])
    redone = generate_pairs(
        fewer, SDGSettings(), MODEL, StageContext.local(ctx.root, "run-4"), previous=pairs
    )
    assert not redone.output_reused and redone.n_pairs < pairs.n_pairs


def test_split_of_unchanged_inputs_is_reused(prepared, tmp_path: Path) -> None:
    ctx, chunks, pairs = prepared
    first = split_pairs(chunks, pairs, SplitSettings(), ctx)
    again = split_pairs(chunks, pairs, SplitSettings(), StageContext.local(ctx.root, "run-2"), previous=first)
    assert again.output_reused and again.train == first.train and again.eval_beir == first.eval_beir
    assert again.metadata()["output_reused"] is True
    # other settings, or a re-frozen test set (the record removed), make a new split
    seeded = split_pairs(chunks, pairs, SplitSettings(seed=7), StageContext.local(ctx.root, "run-3"), first)
    assert not seeded.output_reused and seeded.train != first.train
    for record in (ctx.root / "eval_frozen").glob("*.json"):
        record.unlink()
    refrozen = split_pairs(chunks, pairs, SplitSettings(), StageContext.local(ctx.root, "run-4"), first)
    assert not refrozen.output_reused


def test_split_streams_the_pairs_and_states_what_the_eval_passages_gained_and_lost(
    prepared, tmp_path: Path
) -> None:
    from embed_assets.prep import split_by_document
    from embed_assets.records import Chunk, content_hash
    from embed_assets.stages.sdg import load_pairs

    ctx, chunks, pairs = prepared
    settings = SplitSettings()
    first = split_pairs(chunks, pairs, settings, ctx)
    # the same split as the in-memory rule
    expected = split_by_document(
        pairs.load(),
        ratios=(settings.train_ratio, settings.val_ratio, settings.test_ratio),
        small_data_ratios=settings.small_data_ratios,
        small_data_threshold=settings.small_data_threshold,
        seed=settings.seed,
    )
    for name in ("train", "val", "test"):
        assert load_pairs(getattr(first, name)) == getattr(expected, name), name
        assert getattr(first, f"{name}_docs") == expected.docs[name]
    assert (first.n_train, first.n_val, first.n_test) == tuple(
        len(getattr(expected, n)) for n in ("train", "val", "test")
    )
    corpus_file = Path(first.eval_beir) / "corpus.jsonl"
    ids = [json.loads(line)["_id"] for line in corpus_file.read_text(encoding="utf-8").splitlines()]
    assert ids == [c.chunk_id for c in chunks.load()] and first.eval_set.passages == len(ids)

    # one passage of a training document replaced by a new one, another dropped: +1/-2, no query changed
    passages = chunks.load()
    doc = first.train_docs[0]
    old = [i for i, c in enumerate(passages) if c.doc_id == doc][:2]
    assert len(old) == 2
    text = "A passage that no earlier run has seen, written for this test."
    passages[old[0]] = Chunk(content_hash(text), doc, text, 0, 1)
    del passages[old[1]]
    edited = dataclasses.replace(chunks, path=str(tmp_path / "edited.parquet"), data_version="edited")
    write_parquet(edited.path, [c.to_dict() for c in passages])
    second = split_pairs(edited, pairs, settings, StageContext.local(ctx.root, "run-2"), previous=first)
    e = second.eval_set
    assert e.status == "reused" and (e.passages_added, e.passages_removed) == (1, 2)
    assert (e.queries_added, e.queries_removed) == (0, 0) and e.passages == len(passages)


@pytest.mark.parametrize("probe_kept", [False, True])
def test_the_refit_trains_train_and_validation_rows_as_many_epochs_as_the_kept_model(
    tmp_path: Path, monkeypatch, probe_kept: bool
) -> None:
    """The refit's steps are the kept model's epochs over the larger set, one schedule, no validation."""
    from types import SimpleNamespace

    from embed_assets.stages import train as stage

    seen = {}

    def fake_train(rows, work, out, settings, model, device, nproc, val, *args):
        seen.update(rows=rows, work=work, out=out, settings=settings, val=val)
        return SimpleNamespace(seconds=1.0)

    monkeypatch.setattr(stage, "_train", fake_train)
    train = [{"anchor": f"q{i}", "positive": f"p{i}", "negative_1": f"n{i}"} for i in range(40)]
    val = [{"anchor": f"v{i}", "positive": f"w{i}"} for i in range(8)]  # no mined negative: in-batch only
    selection = stage.LRSelection(
        5e-05, "best", [{"learning_rate": 5e-05, "val_ndcg@10": 0.5}], probe_steps=3
    )
    if probe_kept:
        selection.kept = "learning-rate probe 5e-05 after 3 steps"
    report = SimpleNamespace(eval_curve=[(5, 0.6), (10, 0.7), (15, 0.65)])  # the best checkpoint: step 10
    settings = stage.TrainSettings(batch_size=8, learning_rate=5e-05)
    ctx = StageContext.local(tmp_path, run_id="refit")
    out = tmp_path / "model"
    refit = stage.refit_on_validation(
        train, val, selection, report, settings, MODEL, "cpu", 1, tmp_path / "w", out, ctx
    )
    kept = 3 if probe_kept else 10
    # 40 rows = 5 steps an epoch; with the 8 validation rows (their own batch) 6: the same epochs, 6/5 the steps
    assert refit is not None and refit.steps == round(kept / 5 * 6) == selection.refit_steps
    assert seen["rows"] == train + val and seen["out"] == out and seen["val"] is None
    assert seen["settings"].max_steps == refit.steps and seen["settings"].learning_rate == 5e-05
    assert seen["settings"].early_stopping_patience == 0
    assert (
        f"as the kept model's {kept} steps" in selection.refit
        and "40 training + 8 validation" in selection.refit
    )

    # Nothing to refit on: the model stays, and the reason is recorded.
    none = stage.LRSelection(5e-05, "as configured")
    assert (
        stage.refit_on_validation(train, [], none, report, settings, MODEL, "cpu", 1, tmp_path, out, ctx)
        is None
    )
    assert none.refit == "not refit: no validation rows were mined" and none.refit_steps == 0


def test_mining_mines_the_validation_rows_apart_from_the_training_rows(tmp_path: Path, prepared) -> None:
    from embed_assets.stages.mine import MiningSettings, mine_negatives

    ctx, chunks, pairs = prepared
    split = split_pairs(chunks, pairs, SplitSettings(), ctx)
    mined = mine_negatives(chunks, pairs, split, MiningSettings(), MODEL, ctx)
    val_queries = {r.query for r in split.val_records()}
    assert val_queries and mined.n_val_rows == len(mined.val_rows()) > 0
    assert {r["query"] for r in mined.val_rows()} <= val_queries
    assert not val_queries & {r["query"] for r in mined.rows()}  # validation never trains before a refit
    assert mined.metadata()["validation_rows_mined"] == mined.n_val_rows
    assert any(r["negative_texts"] for r in mined.val_rows())  # mined like the training rows


@pytest.mark.slow  # trains twice: the validated run, then the refit on training + validation rows
def test_refit_on_validation_serves_a_model_trained_on_the_validation_rows_too(
    tmp_path: Path, prepared
) -> None:
    from embed_assets.stages.mine import MiningSettings, mine_negatives
    from embed_assets.stages.train import TrainSettings, train_checkpoint

    ctx, chunks, pairs = prepared
    split = split_pairs(chunks, pairs, SplitSettings(), ctx)
    mined = mine_negatives(chunks, pairs, split, MiningSettings(), MODEL, ctx)
    settings = TrainSettings(
        refit_on_validation=True, lr_candidates=[], batch_size=8, max_seq_length=48, epochs=1
    )
    checkpoint = train_checkpoint(chunks, pairs, split, mined, settings, MODEL, ctx)
    selection = checkpoint.selection
    assert selection is not None and selection.refit_steps > 0 and checkpoint.eval_curve
    assert checkpoint.train_rows == mined.n_rows + mined.n_val_rows
    assert checkpoint.metadata()["refit"] == selection.refit and "validation) for" in selection.refit
    recorded = json.loads((Path(checkpoint.model_dir) / "embed_assets_training.json").read_text())
    assert recorded["settings"]["max_steps"] == selection.refit_steps  # the served model is the refit
    card = (Path(checkpoint.model_dir) / "README.md").read_text()
    assert "refit from the base model" in card
    # The choices before the refit keep their trainer folder: the refit is keyed apart from them.
    plain = train_checkpoint(
        chunks, pairs, split, mined, settings.model_copy(update={"refit_on_validation": False}), MODEL, ctx
    )
    assert plain.work_dir == checkpoint.work_dir and not plain.selection.refit
