"""MovieLens adapter (docs/design.md §2): each release layout's fixture -> raw format rows, splits, labels, counts."""

import array
import json
import os
import random
import shutil
import subprocess
import sys

import pytest

from beam_pipelines.adapters import STATS_FILE, movielens
from seminar_tf import schema
from test_adapters import assert_accounted, gzip_dir, load

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MOVIELENS = os.path.join(ROOT, "tests", "fixtures", "movielens")
RATINGS_FILE = {"ml-100k": "u.data", "ml-1m": "ratings.dat", "ml-10m": "ratings.dat", "ml-latest": "ratings.csv",
                "recbole": "ml-tiny.inter"}
LAYOUT_DIRS = tuple(RATINGS_FILE)


def by_id(rows, key):
    return {row[key]: row for row in rows}


def event(events, user_id, item_id):
    (found,) = [e for e in events if e["user_id"] == user_id and e["item_id"] == item_id]
    return found


def splits_of(events, user_id):
    """(item, split) of one user's events in time order, ties in file order."""
    ordered = sorted(enumerate(e for e in events if e["user_id"] == user_id),
                     key=lambda pair: (pair[1]["timestamp"], pair[0]))
    return [(e["item_id"], e["split"]) for _, e in ordered]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Every layout's fixture converted with the defaults: {layout dir: (stats, tables, output dir)}."""
    results = {}
    for name in LAYOUT_DIRS:
        out = str(tmp_path_factory.mktemp(name.replace("-", "_")))
        stats = movielens.convert(os.path.join(MOVIELENS, name), out)
        results[name] = (stats, load(out), out)
    return results


# ---------------------------------------------------------------------------------------------------- layouts
def test_ml100k(converted):
    stats, tables, _ = converted["ml-100k"]
    assert stats["layout"] == "ml-100k"
    items = by_id(tables["items"], "item_id")
    assert items["1"] == {"item_id": "1", "title": "Toy Story", "genres": "Animation|Children's|Comedy",
                          "genre": "Animation", "year": "1995"}
    assert items["3"]["title"] == "Misérables, Les"  # latin-1 byte decoded
    assert items["4"]["title"] == "Seven (Se7en)"  # only the trailing year is cut
    assert items["4"]["year"] == "1996"  # the release date's year wins over the title's
    assert items["5"] == {"item_id": "5", "title": "unknown", "genres": "", "genre": "", "year": ""}
    assert items["99"] == {"item_id": "99", "title": "", "genres": "", "genre": "", "year": ""}  # rated, unknown
    assert items["2"]["title"] == "GoldenEye"  # the duplicate row is skipped
    assert [row["item_id"] for row in tables["items"]] == ["1", "2", "3", "4", "5", "99"]
    assert by_id(tables["users"], "user_id") == {
        "1": {"user_id": "1", "age": "24", "gender": "M", "occupation": "technician"},
        "2": {"user_id": "2", "age": "53", "gender": "F", "occupation": "other"},
        "3": {"user_id": "3", "age": "23", "gender": "M", "occupation": "writer"},
    }
    events = tables["events"]
    assert event(events, "1", "4") == {"user_id": "1", "timestamp": 874965900, "item_id": "4", "query": "",
                                       "event": "impression", "label": 0, "rating": 2.0, "split": "test"}
    assert event(events, "3", "99")["split"] == "valid"
    assert all(set(e) == set(schema.EVENT_COLUMNS) for e in events)
    assert stats["inputs"] == {
        "u.genre": {"read": 20, "converted": 19, "skipped": {"blank_line": 1}},
        "u.item": {"read": 7, "converted": 5, "skipped": {"duplicate_id": 1, "malformed_line": 1}},
        "u.user": {"read": 5, "converted": 3, "skipped": {"duplicate_id": 1, "malformed_line": 1}},
        "u.data": {"read": 15, "converted": 10, "skipped": {
            "bad_rating": 1, "bad_timestamp": 1, "blank_line": 1, "malformed_line": 1, "missing_id": 1}},
    }
    assert stats["outputs"] == {"items": 6, "events": 10, "users": 3}
    assert stats["items_without_metadata"] == 1


def test_user_fraction_split_ties_keep_file_order(converted):
    _, tables, _ = converted["ml-100k"]
    events = tables["events"]
    # user 1 rated 3, 5 and 4 at the same second (file order 3, 5, 4): 5 ratings -> 1 test, 1 valid
    assert splits_of(events, "1") == [("1", "train"), ("2", "train"), ("3", "train"), ("5", "valid"),
                                      ("4", "test")]
    assert splits_of(events, "2") == [("3", "train"), ("1", "train")]  # fewer than 3 ratings: train only
    assert splits_of(events, "3") == [("2", "train"), ("99", "valid"), ("4", "test")]
    _, tables, _ = converted["ml-latest"]  # 4973 and 149532 tie; 149532 comes later in the file
    assert splits_of(tables["events"], "1") == [("11", "train"), ("4973", "train"), ("149532", "valid"),
                                                ("1", "test")]
    _, tables, _ = converted["recbole"]  # "881250949.0" and "881250949" tie
    assert splits_of(tables["events"], "196") == [("999", "train"), ("1", "train"), ("242", "valid"),
                                                  ("302", "test")]


def test_ml1m(converted):
    stats, tables, _ = converted["ml-1m"]
    assert stats["layout"] == "ml-1m"
    items = by_id(tables["items"], "item_id")
    assert items["73"] == {"item_id": "73", "title": "Misérables, Les", "genres": "Drama|Musical",
                           "genre": "Drama", "year": "1995"}
    assert items["3196"]["year"] == "1953" and items["3000"]["title"] == ""  # 3000: rating of an unknown movie
    assert "3" not in items  # its line has no genres field: malformed
    assert by_id(tables["users"], "user_id")["1"] == {"user_id": "1", "age": "1", "gender": "F",
                                                      "occupation": "10"}
    events = tables["events"]
    assert event(events, "1", "73") == {"user_id": "1", "timestamp": 978301968, "item_id": "73", "query": "",
                                        "event": "impression", "label": 1, "rating": 4.0, "split": "valid"}
    assert splits_of(events, "1") == [("3196", "train"), ("1", "train"), ("73", "valid"), ("2", "test")]
    assert stats["inputs"]["ratings.dat"] == {"read": 10, "converted": 8,
                                              "skipped": {"bad_rating": 1, "malformed_line": 1}}
    assert stats["inputs"]["movies.dat"] == {"read": 5, "converted": 4, "skipped": {"malformed_line": 1}}
    assert stats["splits"] == {"train": 4, "valid": 2, "test": 2}
    assert stats["labels"] == {"positive": 4, "negative": 4}


def test_ml10m_tags_become_queries(converted):
    stats, tables, _ = converted["ml-10m"]
    assert stats["layout"] == "ml-10m" and "users" not in tables
    items = by_id(tables["items"], "item_id")
    assert items["62"]["title"] == "Nénette et Boni"  # a latin-1 line in a UTF-8 file
    assert items["4973"]["title"] == "Amélie (Fabuleux destin d'Amélie Poulain, Le)"
    assert items["8606"] == {"item_id": "8606", "title": "Pull My Daisy", "genres": "", "genre": "",
                             "year": "1958"}  # "(no genres listed)" is no genre
    events = tables["events"]
    # tags in time order, the two at 1215184630 in file order
    assert event(events, "15", "4973") == {"user_id": "15", "timestamp": 1215184700, "item_id": "4973",
                                           "query": "French excellent! whimsical", "event": "impression",
                                           "label": 1, "rating": 4.5, "split": "test"}
    assert event(events, "20", "5")["query"] == "Snoopy"
    assert event(events, "15", "1")["query"] == "" and event(events, "15", "1")["label"] == 0  # 3.5 < 4
    assert stats["inputs"]["tags.dat"] == {"read": 7, "converted": 4, "skipped": {
        "empty_tag": 1, "malformed_line": 1, "tag_without_rating": 1}}  # (15, 5) was tagged, not rated
    assert stats["ratings_with_query"] == 2 and stats["items_without_ratings"] == 1


def test_ml_latest(converted):
    stats, tables, _ = converted["ml-latest"]
    assert stats["layout"] == "ml-latest"
    items = by_id(tables["items"], "item_id")
    assert items["11"] == {"item_id": "11", "title": "American President, The", "genres": "Comedy|Drama|Romance",
                           "genre": "Comedy", "year": "1995"}  # quoted title with a comma
    assert items["171749"]["title"] == "Death Note: Desu nôto" and items["171749"]["year"] == "2006"
    assert items["149532"]["year"] == "" and items["149532"]["genres"] == ""
    assert items["55555"]["title"] == "" and "7" not in items
    events = tables["events"]
    assert event(events, "2", "4973") == {"user_id": "2", "timestamp": 1445714996, "item_id": "4973",
                                          "query": "Paris quirky, romantic", "event": "impression", "label": 0,
                                          "rating": 3.0, "split": "valid"}
    assert [event(events, "1", i)["label"] for i in ("1", "11", "4973")] == [1, 0, 1]  # 4.0, 3.5, 4.5
    assert stats["inputs"] == {
        "movies.csv": {"read": 6, "converted": 5, "skipped": {"malformed_line": 1}},
        "tags.csv": {"read": 4, "converted": 2, "skipped": {"bad_timestamp": 1, "tag_without_rating": 1}},
        "ratings.csv": {"read": 9, "converted": 7, "skipped": {"bad_rating": 1, "malformed_line": 1}},
    }


def test_recbole_atomic(converted):
    stats, tables, _ = converted["recbole"]
    assert stats["layout"] == "recbole"
    items = by_id(tables["items"], "item_id")
    assert items["302"] == {"item_id": "302", "title": "L.A. Confidential",
                            "genres": "Crime|Film-Noir|Mystery|Thriller", "genre": "Crime", "year": "1997",
                            "director": "Hanson"}  # an extra column becomes an attribute
    assert items["267"] == {"item_id": "267", "title": "unkonwn", "genres": "", "genre": "", "year": "",
                            "director": ""}
    assert items["999"] == {"item_id": "999", "title": "", "genres": "", "genre": "", "year": "", "director": ""}
    assert by_id(tables["users"], "user_id")["186"] == {"user_id": "186", "age": "39", "gender": "F",
                                                        "occupation": "executive", "region": "east"}
    assert event(tables["events"], "196", "1") == {
        "user_id": "196", "timestamp": 881250949, "item_id": "1", "query": "", "event": "impression", "label": 0,
        "rating": 3.0, "split": "train"}
    assert stats["inputs"]["ml-tiny.inter"]["skipped"] == {"bad_timestamp": 1, "malformed_line": 1}


def test_accounting_and_stats_file(converted):
    for name, (stats, tables, out) in converted.items():
        assert_accounted(stats)
        assert {t: len(rows) for t, rows in tables.items()} == stats["outputs"], name
        events = tables["events"]
        assert stats["inputs"][RATINGS_FILE[name]]["converted"] == len(events), name  # one event per rating
        assert sum(stats["splits"].values()) == sum(stats["labels"].values()) == len(events)
        assert stats["labels"]["positive"] == sum(e["label"] for e in events)
        assert all(e["event"] == "impression" and e["split"] in schema.SPLITS for e in events)
        assert all(isinstance(v, str) for row in tables["items"] for v in row.values())
        assert {e["item_id"] for e in events} <= {row["item_id"] for row in tables["items"]}
        with open(os.path.join(out, STATS_FILE), encoding="utf-8") as handle:
            assert json.load(handle) == json.loads(json.dumps(stats))


# ---------------------------------------------------------------------------------------------------- options
def test_label_threshold(tmp_path):
    stats = movielens.convert(os.path.join(MOVIELENS, "ml-1m"), str(tmp_path), label_threshold=3)
    events = load(str(tmp_path))["events"]
    assert stats["labels"] == {"positive": 7, "negative": 1}  # only the 2-star rating stays negative
    assert event(events, "2", "73")["label"] == 0 and event(events, "1", "2")["label"] == 1
    assert stats["options"]["label_threshold"] == 3


def test_time_split(tmp_path):
    stats = movielens.convert(os.path.join(MOVIELENS, "ml-latest"), str(tmp_path), split="time",
                              valid_fraction=0.4, test_fraction=0.3)
    events = load(str(tmp_path))["events"]
    # 7 ratings: test = the last round(2.1) = 2, valid starts round(2.8) = 3 before them, at 964982224, which a
    # second rating shares: both go to valid
    assert stats["time_cutoffs"] == {"test": 1445714996, "valid": 964982224}
    assert stats["splits"] == {"train": 1, "valid": 4, "test": 2}
    for e in events:
        expected = "test" if e["timestamp"] >= 1445714996 else ("valid" if e["timestamp"] >= 964982224 else "train")
        assert e["split"] == expected
    assert event(events, "1", "11")["split"] == "train"


def test_user_split_sizes_round_half_to_even():
    """Python's round (half to even) gives the 9,988 test ratings of ml-100k with 0.1 / 0.1."""
    assert movielens.user_split_sizes(25, 0.1, 0.1) == (2, 2)  # 2.5 -> 2
    assert movielens.user_split_sizes(35, 0.1, 0.1) == (4, 4)  # 3.5 -> 4
    assert movielens.user_split_sizes(20, 0.1, 0.1) == (2, 2)
    assert movielens.user_split_sizes(15, 0.1, 0.1) == (2, 2)  # 1.5 -> 2, though 0.1 * 15 = 1.5000000000000002
    assert movielens.user_split_sizes(5, 0.1, 0.1) == (1, 1)  # at least one each from 3 ratings
    assert movielens.user_split_sizes(3, 0.1, 0.1) == (1, 1)
    assert movielens.user_split_sizes(2, 0.1, 0.1) == (0, 0)
    assert movielens.user_split_sizes(10, 0.0, 0.2) == (0, 2)  # a zero fraction stays empty
    assert movielens.round_half_even(0.05, 50) == 2  # 2.5 -> 2
    values = array.array("q", (random.Random(3).randrange(1, 1 << 31) for _ in range(2000)))
    ordered = sorted(values)
    assert [movielens._kth_smallest(values, k) for k in (0, 1, 999, 1999)] == [ordered[k] for k in (0, 1, 999, 1999)]


def test_value_parsers():
    assert movielens.split_title("Toy Story (1995)") == ("Toy Story", "1995")
    assert movielens.split_title("Seven (Se7en) (1995) ") == ("Seven (Se7en)", "1995")
    assert movielens.split_title("Babylon 5") == ("Babylon 5", "")
    assert movielens.split_title("Death Note (2006–2007)") == ("Death Note", "2006")
    assert movielens.year_of("01-Jan-1995") == "1995" and movielens.year_of("") == ""
    for bad in ("x", "nan", "-1", "inf"):
        with pytest.raises(ValueError):
            movielens.parse_rating(bad)


def test_gzip_input_and_max_rows(tmp_path, converted):
    gz_dir = str(tmp_path / "gz")
    gzip_dir(os.path.join(MOVIELENS, "ml-100k"), gz_dir)  # u.item is latin-1
    stats = movielens.convert(gz_dir, str(tmp_path / "out"))
    plain_stats, plain_tables, _ = converted["ml-100k"]
    assert load(str(tmp_path / "out")) == plain_tables
    assert stats["inputs"] == {name + ".gz": counts for name, counts in plain_stats["inputs"].items()}
    limited = movielens.convert(os.path.join(MOVIELENS, "ml-latest"), str(tmp_path / "few"), max_rows=2)
    assert {name: c["read"] for name, c in limited["inputs"].items()} == {
        "movies.csv": 2, "tags.csv": 2, "ratings.csv": 2}
    assert_accounted(limited)


def test_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError):
        movielens.convert(str(tmp_path), str(tmp_path / "out"))
    mixed = tmp_path / "mixed"
    shutil.copytree(os.path.join(MOVIELENS, "ml-1m"), mixed)
    shutil.copy(os.path.join(MOVIELENS, "ml-latest", "ratings.csv"), mixed)
    with pytest.raises(ValueError, match="several MovieLens layouts"):
        movielens.convert(str(mixed), str(tmp_path / "out"))
    for kwargs in ({"split": "random"}, {"valid_fraction": 0.5, "test_fraction": 0.5}, {"test_fraction": -0.1},
                   {"max_rows": -1}):
        with pytest.raises(ValueError):
            movielens.convert(os.path.join(MOVIELENS, "ml-1m"), str(tmp_path / "out"), **kwargs)


# ---------------------------------------------------------------------------------------------------- CLI
def test_cli_main_runs(tmp_path, capsys):
    argv = ["--input", os.path.join(MOVIELENS, "ml-1m"), "--output", str(tmp_path), "--label-threshold", "3",
            "--split", "time", "--valid-fraction", "0.25", "--test-fraction", "0.25"]
    assert movielens.main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["layout"] == "ml-1m" and printed["labels"] == {"positive": 7, "negative": 1}
    assert printed["time_cutoffs"] == {"test": 978301968, "valid": 978300760}
    assert printed["splits"] == {"train": 4, "valid": 2, "test": 2}
    assert printed == json.loads(json.dumps(movielens.convert(  # the same as calling convert
        os.path.join(MOVIELENS, "ml-1m"), str(tmp_path), label_threshold=3, split="time", valid_fraction=0.25,
        test_fraction=0.25)))


def test_cli_help_and_stays_light():
    """``--help`` lists the flags; the module imports only seminar_tf.schema (no TensorFlow on a worker)."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    result = subprocess.run([sys.executable, "-m", "beam_pipelines.adapters.movielens", "--help"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    for flag in ("--input", "--output", "--label-threshold", "--split", "--valid-fraction", "--test-fraction",
                 "--max-rows", "user_fraction"):
        assert flag in result.stdout
    code = "import sys, beam_pipelines.adapters.movielens; sys.exit(int('tensorflow' in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                            env=env)
    assert result.returncode == 0, result.stderr
