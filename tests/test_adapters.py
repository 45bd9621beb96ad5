"""Public-dataset adapters (docs/design.md §2): KuaiSAR and Amazon reviews fixtures -> raw format rows and counts."""

import gzip
import json
import os
import shutil
import subprocess
import sys

import pytest

from beam_pipelines.adapters import STATS_FILE, amazon, kuaisar
from seminar_tf import schema

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
KUAISAR = os.path.join(FIXTURES, "kuaisar")
AMAZON = os.path.join(FIXTURES, "amazon")


def read_jsonl(path):
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def load(output_dir):
    tables = {}
    for table in schema.RAW_TABLES:
        path = os.path.join(output_dir, f"{table}.jsonl")
        if os.path.exists(path):
            tables[table] = read_jsonl(path)
    return tables


def assert_accounted(stats):
    for name, counts in stats["inputs"].items():
        assert counts["read"] == counts["converted"] + sum(counts["skipped"].values()), name


def gzip_dir(source, target):
    os.makedirs(target)
    for name in os.listdir(source):
        with open(os.path.join(source, name), "rb") as src, gzip.open(os.path.join(target, name + ".gz"), "wb") as dst:
            shutil.copyfileobj(src, dst)


def events_of(events, user_id, item_id, query=None):
    return [e for e in events if e["user_id"] == user_id and e["item_id"] == item_id
            and (query is None or e["query"] == query)]


# ---------------------------------------------------------------------------------------------------- KuaiSAR
@pytest.fixture(scope="module")
def kuaisar_out(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("kuaisar_out"))
    stats = kuaisar.convert(KUAISAR, out)
    return stats, load(out), out


def test_kuaisar_items_and_users(kuaisar_out):
    stats, tables, _ = kuaisar_out
    items = {row["item_id"]: row for row in tables["items"]}
    # 8 from item_features, then placeholders for event items without features (999 and a USER result)
    assert [row["item_id"] for row in tables["items"]] == [
        "101", "102", "103", "104", "105", "106", "107", "108", "999", "103656000000"]
    assert items["999"] == {"item_id": "999", "title": "", **{c: "" for c in kuaisar.ITEM_ATTRIBUTE_COLUMNS}}
    assert stats["items_without_features"] == 2
    assert items["101"] == {
        "item_id": "101", "title": "w1 w213 w24", "author_id": "10", "item_type": "NORMAL",
        "upload_type": "LongImport", "music_id": "", "first_level_category_id": "9",
        "second_level_category_id": "136", "third_level_category_id": "", "fourth_level_category_id": "",
    }
    assert items["102"]["music_id"] == "3301"
    assert items["103"]["title"] == "" and items["103"]["author_id"] == ""  # caption [] and author 0 (padding)
    assert items["106"]["fourth_level_category_id"] == "40211"
    assert items["108"]["title"] == "" and stats["warnings"]["bad_caption"] == 1  # "[1, 2" kept without title
    assert schema.tokenize(items["101"]["title"]) == ["w1", "w213", "w24"]
    users = {row["user_id"]: row for row in tables["users"]}
    assert sorted(users) == ["1", "2", "3", "4", "5"]
    assert users["2"] == {"user_id": "2", "search_active_level": "3", "rec_active_level": "4",
                          "onehot_feat1": "0", "onehot_feat2": "7"}


def test_kuaisar_recommendation_events(kuaisar_out):
    _, tables, _ = kuaisar_out
    events = tables["events"]
    # click=1: a history click plus a positive impression; timestamp ms 1684742000123.0 -> 1684742000 s
    clicked = events_of(events, "1", "101", "")
    assert [(e["event"], e.get("label"), e["timestamp"]) for e in clicked] == [
        ("click", None, 1684742000), ("impression", 1, 1684742000)]
    # click=0: only a negative impression, no history click
    assert [(e["event"], e["label"], e["query"]) for e in events_of(events, "1", "102")] == [("impression", 0, "")]
    # empty epoch column: Beijing time "2023-05-23 08:00:00" = 00:00 UTC
    assert {e["timestamp"] for e in events_of(events, "4", "101")} == {1684800000}
    assert not events_of(events, "4", "102", "")  # both time columns empty -> bad_timestamp
    assert all(set(e) <= set(schema.EVENT_COLUMNS) for e in events)
    assert all(e["event"] in ("click", "impression") for e in events)
    assert all(("label" in e) == (e["event"] == "impression") for e in events)


def test_kuaisar_search_events(kuaisar_out):
    _, tables, _ = kuaisar_out
    events = tables["events"]
    search = [e for e in events if e["query"]]
    assert {e["query"] for e in search} == {"w20 w34 w3", "w7", "w55 w8", "w91 w20"}
    session = [(e["item_id"], e["event"], e.get("label")) for e in search if e["query"] == "w20 w34 w3"]
    assert session == [("101", "click", None), ("101", "impression", 1), ("103", "impression", 0),
                       ("103656000000", "impression", 0)]
    assert {e["timestamp"] for e in search if e["query"] == "w20 w34 w3"} == {1684763932}
    assert [e.get("label") for e in events_of(events, "2", "104", "w7")] == [None, 1]  # click_cnt 2 -> positive
    fallback = events_of(events, "4", "102", "w91 w20")
    assert [(e["timestamp"], e["label"]) for e in fallback] == [(1684894500, 0)]  # 2023-05-24 10:15 Beijing
    assert schema.tokenize("w20 w34 w3") == ["w20", "w34", "w3"]


def test_kuaisar_accounting(kuaisar_out):
    stats, tables, out = kuaisar_out
    assert_accounted(stats)
    assert stats["inputs"] == {
        "item_features.csv": {"read": 11, "converted": 8,
                              "skipped": {"duplicate_id": 1, "malformed_row": 1, "missing_id": 1}},
        "user_features.csv": {"read": 7, "converted": 5, "skipped": {"duplicate_id": 1, "missing_id": 1}},
        "rec_inter.csv": {"read": 14, "converted": 10, "skipped": {
            "bad_label": 1, "bad_timestamp": 1, "malformed_row": 1, "missing_id": 1}},
        "src_inter.csv": {"read": 12, "converted": 7, "skipped": {
            "bad_keyword": 2, "bad_label": 1, "bad_timestamp": 1, "missing_id": 1}},
    }
    converted_rows = stats["inputs"]["rec_inter.csv"]["converted"] + stats["inputs"]["src_inter.csv"]["converted"]
    assert stats["events"]["impression"] == converted_rows == 17  # one impression per converted exposure
    assert stats["events"]["click"] == stats["events"]["impression_positive"] == 9
    assert stats["outputs"] == {"items": 10, "events": 26, "users": 5}
    assert {t: len(rows) for t, rows in tables.items()} == stats["outputs"]
    assert stats["warnings"]["event_item_without_features"] == 2  # items 999 and 103656000000
    with open(os.path.join(out, STATS_FILE), encoding="utf-8") as handle:
        assert json.load(handle) == json.loads(json.dumps(stats))


def test_kuaisar_options(tmp_path):
    options = kuaisar.KuaiSAROptions(rec_label="long_view", search_item_types=("VIDEO",), placeholder_items=False)
    stats = kuaisar.convert(KUAISAR, str(tmp_path), options=options)
    tables = load(str(tmp_path))
    events = tables["events"]
    assert len(tables["items"]) == 8 and stats["items_without_features"] == 1  # only 999 left, not written
    labels = {(e["user_id"], e["item_id"]): e["label"] for e in events if e["event"] == "impression" and not e["query"]}
    assert labels[("1", "101")] == 1  # 60792 >= 45400
    assert labels[("2", "101")] == 0  # clicked, but 12000 < 20000 watched
    assert labels[("3", "104")] == 1 and labels[("1", "106")] == 1  # 31000 >= 30000, 9000 >= 9000
    assert labels[("5", "107")] == 0  # click "yes" no longer matters
    assert stats["inputs"]["rec_inter.csv"]["skipped"] == {"bad_timestamp": 1, "malformed_row": 1, "missing_id": 1}
    assert stats["inputs"]["src_inter.csv"]["skipped"]["item_type_filtered"] == 3  # USER, LIVE, IMAGE_ATLAS
    assert not [e for e in events if e["item_id"] == "103656000000"]
    assert_accounted(stats)
    with pytest.raises(ValueError):
        kuaisar.KuaiSAROptions(rec_label="like")


def test_kuaisar_gzip_and_max_rows(tmp_path, kuaisar_out):
    gz_dir = str(tmp_path / "gz")
    gzip_dir(KUAISAR, gz_dir)
    stats = kuaisar.convert(gz_dir, str(tmp_path / "out"))
    _, plain_tables, _ = kuaisar_out
    assert load(str(tmp_path / "out")) == plain_tables
    assert stats["inputs"] == kuaisar_out[0]["inputs"]
    limited = kuaisar.convert(KUAISAR, str(tmp_path / "few"), max_rows=3)
    assert {name: c["read"] for name, c in limited["inputs"].items()} == {
        "item_features.csv": 3, "user_features.csv": 3, "rec_inter.csv": 3, "src_inter.csv": 3}
    assert_accounted(limited)


def test_kuaisar_value_parsers():
    assert kuaisar.parse_token_ids("[20, 34, 3]") == ["20", "34", "3"]
    assert kuaisar.parse_token_ids("") == [] and kuaisar.parse_token_ids("[]") == []
    for bad in ("[1, 2", "[1.5]", "{'a': 1}", "[true]", "[1e999]"):
        with pytest.raises(ValueError):
            kuaisar.parse_token_ids(bad)
    assert kuaisar.clean_id("103656000000.0") == "103656000000"
    assert kuaisar.event_seconds("1.684742e+12", "", 8.0) == 1684742000
    assert kuaisar.event_seconds("", "2023-05-22 15:53:20", 8.0) == 1684742000
    with pytest.raises(ValueError):
        kuaisar.event_seconds("", "", 8.0)


# ---------------------------------------------------------------------------------------------------- Amazon
def convert_amazon(version, tmp_path, **option_kwargs):
    out = str(tmp_path / f"out_{version}")
    options = amazon.AmazonOptions(**option_kwargs)
    stats = amazon.convert(os.path.join(AMAZON, version), out, options=options)
    return stats, load(out)


def impressions(events, user_id):
    return [e for e in events if e["event"] == "impression" and e["user_id"] == user_id]


def assert_negatives_untouched(events):
    touched = {(e["user_id"], e["item_id"]) for e in events if e["event"] == "click"}
    negatives = [e for e in events if e["event"] == "impression" and e["label"] == 0]
    assert negatives and all((e["user_id"], e["item_id"]) not in touched for e in negatives)


def test_amazon_2014(tmp_path):
    stats, tables = convert_amazon("v2014", tmp_path)
    items = {row["item_id"]: row for row in tables["items"]}
    assert items["0307141985"] == {"item_id": "0307141985", "title": "Rudolph & Frosty's Christmas in July",
                                   "brand": "Rankin/Bass", "main_category": "Movies & TV", "category": "Holidays"}
    assert items["0005019281"]["title"] == "An American Christmas Carol VHS"
    assert items["0307142469"]["title"] == ""  # no title in the 2014 metadata
    assert items["B00005JKZY"] == {"item_id": "B00005JKZY", "title": "", "brand": "", "main_category": "",
                                   "category": ""}  # reviewed, no metadata
    assert "B000NOREVW" not in items and stats["items_without_metadata"] == 2
    events = tables["events"]
    clicks = [e for e in events if e["event"] == "click"]
    assert all(e["query"] == "" and "label" not in e for e in clicks)
    # leave-one-out splits on the clicks too (pretraining targets); ties keep read order
    assert [(e["item_id"], e["split"]) for e in clicks if e["user_id"] == "A3R5OBKS7OM2IR"] == [
        ("0005019281", "train"), ("0307141985", "train"), ("0307142469", "train"), ("6300213161", "valid"),
        ("B00005JKZY", "test")]
    assert all(e["split"] in schema.SPLITS for e in events)
    assert events_of(clicks, "A3R5OBKS7OM2IR", "6300213161")[0]["timestamp"] == 1267747200  # "03 05, 2010"
    assert events_of(clicks, "A3R5OBKS7OM2IR", "0005019281")[0]["timestamp"] == 1203984000
    samples = impressions(events, "A3R5OBKS7OM2IR")
    positives = [(e["item_id"], e["split"], e["timestamp"]) for e in samples if e["label"] == 1]
    assert positives == [("0307141985", "train", 1224374400), ("0307142469", "train", 1224374400),
                         ("6300213161", "valid", 1267747200), ("B00005JKZY", "test", 1293840000)]
    negatives = [e for e in samples if e["label"] == 0]
    assert len(negatives) == len(positives)
    assert [(e["split"], e["timestamp"]) for e in negatives] == [(s, t) for _, s, t in positives]
    assert_negatives_untouched(events)
    assert stats["schema_versions"] == {"reviews_2014": 10, "meta_2014": 5}
    assert stats["inputs"] == {
        "reviews_Movies_and_TV_5.json": {"read": 15, "converted": 10, "skipped": {
            "bad_timestamp": 1, "blank_line": 1, "duplicate_review": 1, "malformed_line": 1, "missing_id": 1}},
        "meta_Movies_and_TV.json": {"read": 9, "converted": 5, "skipped": {
            "duplicate_id": 1, "malformed_line": 1, "missing_id": 1, "not_in_reviews": 1}},
    }
    assert_accounted(stats)
    assert stats["events"]["click"] == 10 and stats["events"]["impression"] == 14
    assert stats["outputs"] == {"items": 7, "events": 24}


def test_amazon_2018(tmp_path):
    stats, tables = convert_amazon("v2018", tmp_path)
    items = {row["item_id"]: row for row in tables["items"]}
    assert items["0005092663"]["main_category"] == "Prime Video"  # from the <img ... alt="Prime Video"/> tag
    assert items["0005092663"]["category"] == ""
    assert items["B00004CJ2O"] == {"item_id": "B00004CJ2O", "title": "Blazing Saddles", "brand": "Mel Brooks",
                                   "main_category": "Movies & TV", "category": "Comedy"}
    assert items["0005089549"]["category"] == "Kids & Family"
    assert stats["schema_versions"] == {"reviews_2018": 6, "meta_2018": 3}
    assert stats["inputs"]["Movies_and_TV_5.json"]["skipped"] == {"malformed_line": 1, "unknown_schema": 1}
    # every user reviewed all 3 catalogue items, so no negative can be drawn; the shortfall is counted
    assert stats["events"]["negatives_unavailable"] == stats["events"]["impression_positive"] == 4
    splits = [(e["item_id"], e["split"]) for e in impressions(tables["events"], "A2M1CU2IRZG0K9")]
    assert splits == [("0005092663", "valid"), ("B00004CJ2O", "test")]
    assert_accounted(stats)


def test_amazon_2023(tmp_path):
    stats, tables = convert_amazon("v2023", tmp_path)
    items = {row["item_id"]: row for row in tables["items"]}
    assert items["B013488XFS"] == {"item_id": "B013488XFS", "title": "Star Trek: The Original Series",
                                   "brand": "William Shatner", "main_category": "Prime Video", "category": ""}
    assert items["B00CB6VTDS"]["brand"] == "Steve Carell (Actor)" and items["B00CB6VTDS"]["category"] == "Comedy"
    assert "B09WDLJ4HP" not in items and "B0BFV3TSSW" in items  # parent_asin is the item id
    events = tables["events"]
    user = "AGGZ357AO26RQZVRLGU4D4N52DZQ"
    assert events_of(events, user, "B013488XFS")[0]["timestamp"] == 1440385637  # 1440385637000 ms
    assert events_of(events, user, "B0BFV3TSSW")[0]["event"] == "click"
    assert [(e["item_id"], e["split"]) for e in impressions(events, user) if e["label"] == 1] == [
        ("B00CB6VTDS", "train"), ("B0BFV3TSSW", "valid"), ("B07YF38F25", "test")]
    assert not impressions(events, "AFKZENTNBQ7A7V7UXW5JJI6UGRYQ")  # a single review has no sample
    assert stats["events"]["users_without_samples"] == 1
    assert stats["schema_versions"] == {"reviews_2023": 8, "meta_2023": 3}
    assert stats["inputs"]["Movies_and_TV.jsonl"]["skipped"] == {
        "bad_timestamp": 1, "malformed_line": 1, "missing_id": 1}
    assert stats["inputs"]["meta_Movies_and_TV.jsonl"]["skipped"] == {"malformed_line": 1, "not_in_reviews": 1}
    assert_negatives_untouched(events)
    assert_accounted(stats)


def test_amazon_gzip_input(tmp_path):
    gz_dir = str(tmp_path / "gz")
    gzip_dir(os.path.join(AMAZON, "v2023"), gz_dir)
    stats = amazon.convert(gz_dir, str(tmp_path / "gz_out"))
    plain_stats, plain = convert_amazon("v2023", tmp_path)
    assert load(str(tmp_path / "gz_out")) == plain
    assert set(stats["inputs"]) == {"Movies_and_TV.jsonl.gz", "meta_Movies_and_TV.jsonl.gz"}
    assert [c["read"] for c in stats["inputs"].values()] == [c["read"] for c in plain_stats["inputs"].values()]


def test_amazon_sampling_options(tmp_path):
    first, tables = convert_amazon("v2014", tmp_path / "a", negatives=2, seed=7)
    again, tables_again = convert_amazon("v2014", tmp_path / "b", negatives=2, seed=7)
    assert tables == tables_again  # seeded per user: reproducible
    # A3R5OBKS7OM2IR touched 5 of 7 items: exactly the 2 others are its negatives, each time
    negatives = {e["item_id"] for e in impressions(tables["events"], "A3R5OBKS7OM2IR") if e["label"] == 0}
    assert negatives == {"6300157555", "0307142477"}
    assert_negatives_untouched(tables["events"])
    last_two, tables = convert_amazon("v2014", tmp_path / "c", train_samples=False, negatives=0)
    assert {e["split"] for e in tables["events"] if e["event"] == "impression"} == {"valid", "test"}
    assert last_two["events"]["impression"] == last_two["events"]["impression_positive"] == 5
    rated, _ = convert_amazon("v2014", tmp_path / "d", min_rating=4.0)
    assert rated["inputs"]["reviews_Movies_and_TV_5.json"]["skipped"]["below_min_rating"] == 4
    assert_accounted(rated)
    everything, tables = convert_amazon("v2014", tmp_path / "e", all_metadata=True)
    assert "B000NOREVW" in {row["item_id"] for row in tables["items"]}


def test_amazon_parse_record():
    assert amazon.parse_record('{"asin": "1", "title": "x"}') == {"asin": "1", "title": "x"}
    assert amazon.parse_record("{'asin': '1', 'categories': [['A', 'B']]}")["categories"] == [["A", "B"]]
    for bad in ("{'asin': '1'", "[1, 2]", "nonsense"):
        with pytest.raises(ValueError):
            amazon.parse_record(bad)


# ---------------------------------------------------------------------------------------------------- CLI
@pytest.mark.parametrize("module, flags", [
    ("kuaisar", ["--input", "--output", "--max-rows", "--rec-label", "--long-view-ratio", "--token-prefix",
                 "--search-item-types", "--utc-offset-hours", "--no-placeholder-items"]),
    ("amazon", ["--input", "--output", "--reviews", "--meta", "--max-rows", "--negatives", "--seed",
                "--min-rating", "--no-train-samples", "--all-metadata"]),
])
def test_cli_help(module, flags):
    result = subprocess.run([sys.executable, "-m", f"beam_pipelines.adapters.{module}", "--help"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": ROOT})
    assert result.returncode == 0, result.stderr
    for flag in flags:
        assert flag in result.stdout


def test_cli_main_runs(tmp_path, capsys):
    assert kuaisar.main(["--input", KUAISAR, "--output", str(tmp_path / "k"), "--max-rows", "5"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["inputs"]["rec_inter.csv"]["read"] == 5
    assert amazon.main(["--input", os.path.join(AMAZON, "v2023"), "--output", str(tmp_path / "a"),
                        "--negatives", "0"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["events"]["impression"] == printed["events"]["impression_positive"] == 5


def test_adapters_stay_light():
    """beam_pipelines imports only seminar_tf.schema: no TensorFlow on a Dataflow worker."""
    code = ("import sys, beam_pipelines.adapters.kuaisar, beam_pipelines.adapters.amazon; "
            "sys.exit(int('tensorflow' in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": ROOT})
    assert result.returncode == 0, result.stderr
