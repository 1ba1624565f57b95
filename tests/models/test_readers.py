"""Format readers and detection: each SPEC §2 format parses to the right columns; bad files name themselves."""

from __future__ import annotations

import numpy as np
import pytest

from models.errors import DataError
from models.readers import detect_format, find_interactions_file, read_interactions, read_titles


def write(path, text, encoding="utf-8"):
    path.write_bytes(text.encode(encoding))
    return path


@pytest.mark.parametrize("name, text, fmt", [
    ("u.data", "1\t2\t3\t100\n", "ml-100k"),
    ("ratings.dat", "1::2::3::100\n", "ml-1m"),
    ("x.inter", "user_id:token\titem_id:token\ttimestamp:float\n1\t2\t3\n", "recbole"),
    ("plain.data", "1\t2\t5\t881250949\n", "ml-100k"),  # detected from content, not the name
    ("r.txt", "1::2::3::100\n", "ml-1m"),
    ("seq.txt", "1 2\n1 3\n", "sasrec"),
    ("a.tsv", "user_id:token\titem_id:token\ttimestamp:float\n", "recbole"),
    ("b.csv", "userId,movieId,rating,timestamp\n1,2,3,4\n", "csv"),
])
def test_detect_format(tmp_path, name, text, fmt):
    assert detect_format(write(tmp_path / name, text)) == fmt


def test_detect_format_refuses_unknown_numeric_layout(tmp_path):
    with pytest.raises(DataError, match=r"odd\.txt: cannot detect the format.*--format"):
        detect_format(write(tmp_path / "odd.txt", "1 2 3\n"))


def test_ml100k_columns(tmp_path):
    inter = read_interactions(write(tmp_path / "u.data", "196\t242\t3\t881250949\n186\t302\t3\t891717742\n"))
    assert inter.fmt == "ml-100k"
    assert inter.user.tolist() == [196, 186] and inter.item.tolist() == [242, 302]
    assert inter.order.tolist() == [881250949, 891717742]


def test_ml1m_columns(tmp_path):
    inter = read_interactions(write(tmp_path / "ratings.dat", "1::1193::5::978300760\n2::661::3::978302109\n"))
    assert inter.fmt == "ml-1m"
    assert inter.user.tolist() == [1, 2] and inter.item.tolist() == [1193, 661]
    assert inter.order.tolist() == [978300760, 978302109]


def test_sasrec_keeps_string_ids_and_file_order(tmp_path):
    inter = read_interactions(write(tmp_path / "s.txt", "u1 007\nu1 8\nu2 007\n"), fmt="sasrec")
    assert inter.order is None
    assert inter.user.tolist() == ["u1", "u1", "u2"] and inter.item.tolist() == ["007", "8", "007"]


def test_recbole_typed_header_and_float_time(tmp_path):
    text = ("user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
            "5\t9\t4.0\t12.5\n5\t7\t1.0\t3.25\n")
    inter = read_interactions(write(tmp_path / "d.inter", text))
    assert inter.fmt == "recbole"
    assert inter.user.tolist() == ["5", "5"] and inter.item.tolist() == ["9", "7"]
    assert inter.order.dtype == np.float64 and inter.order.tolist() == [12.5, 3.25]


def test_csv_aliases_quotes_and_hash_in_fields(tmp_path):
    # A title with a comma and a '#' must not shift columns or be cut as a comment.
    text = 'title,userId,movieId,timestamp\n"Se7en, #1",10,20,300\nplain,11,21,301\n'
    inter = read_interactions(write(tmp_path / "r.csv", text))
    assert inter.fmt == "csv"
    assert inter.user.tolist() == [10, 11] and inter.item.tolist() == [20, 21]  # integer-only: int64
    assert inter.order.tolist() == [300, 301]


def test_csv_explicit_columns(tmp_path):
    text = "who;what;when\na;x;2\nb;y;1\n"
    inter = read_interactions(write(tmp_path / "r.csv", text), user_col="who", item_col="what", order_col="when")
    assert inter.user.tolist() == ["a", "b"] and inter.order.tolist() == [2, 1]


def test_csv_unknown_columns_named(tmp_path):
    f = write(tmp_path / "r.csv", "who,what,when\na,x,1\n")
    with pytest.raises(DataError, match=r"r\.csv: no user column among who, what, when.*--user-col"):
        read_interactions(f)
    with pytest.raises(DataError, match=r"r\.csv: no column 'nope' \(columns: who, what, when\)"):
        read_interactions(f, user_col="nope", item_col="what", order_col="when")


def test_csv_non_numeric_order(tmp_path):
    f = write(tmp_path / "r.csv", "user,item,time\na,x,1\na,y,yesterday\n")
    with pytest.raises(DataError, match=r"r\.csv: order column 'time' is not numeric \(value 'yesterday'\)"):
        read_interactions(f)


def test_ragged_rows_name_the_file(tmp_path):
    f = write(tmp_path / "u.data", "1\t2\t3\t4\n1\t2\n")
    with pytest.raises(DataError, match=r"u\.data: "):
        read_interactions(f)


@pytest.mark.parametrize("text", ["", "\n\n"])
def test_empty_file(tmp_path, text):
    with pytest.raises(DataError, match=r"u\.data: file is empty"):
        read_interactions(write(tmp_path / "u.data", text))


def test_header_only_csv(tmp_path):
    with pytest.raises(DataError, match=r"r\.csv: no interactions"):
        read_interactions(write(tmp_path / "r.csv", "user,item,timestamp\n"))


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nothere\.csv: no such file"):
        read_interactions(tmp_path / "nothere.csv")


def test_column_options_refused_for_fixed_formats(tmp_path):
    with pytest.raises(DataError, match="apply to csv and recbole"):
        read_interactions(write(tmp_path / "u.data", "1\t2\t3\t4\n"), user_col="user")


def test_directory_picks_the_interactions_file(tmp_path):
    write(tmp_path / "u.item", "1|Toy Story (1995)|x\n")
    write(tmp_path / "u.data", "1\t1\t5\t10\n")
    write(tmp_path / "notes.txt", "anything\n")
    assert find_interactions_file(tmp_path).name == "u.data"


def test_directory_with_two_candidates_is_refused(tmp_path):
    write(tmp_path / "a.csv", "user,item,ts\n")
    write(tmp_path / "b.csv", "user,item,ts\n")
    with pytest.raises(DataError, match=r"several interaction files \(a\.csv, b\.csv\)"):
        find_interactions_file(tmp_path)


def test_titles_from_u_item_latin1(tmp_path):
    write(tmp_path / "u.item", "1|Misérables, Les (1995)|01-Jan-1995||url|0\n2|GoldenEye (1995)|x\n", "latin-1")
    assert read_titles(tmp_path / "u.data") == {"1": "Misérables, Les (1995)", "2": "GoldenEye (1995)"}


def test_titles_from_movies_dat(tmp_path):
    write(tmp_path / "movies.dat", "1::Toy Story (1995)::Animation\n73::Misérables, Les (1995)::Drama\n",
          "latin-1")
    assert read_titles(tmp_path / "ml-1m.seq.tsv") == {"1": "Toy Story (1995)", "73": "Misérables, Les (1995)"}


def test_titles_from_recbole_item(tmp_path):
    write(tmp_path / "d.item", "item_id:token\tmovie_title:token_seq\trelease_year:token\n"
                               "1\tToy Story\t1995\n2\tGoldenEye\t1995\n")
    assert read_titles(tmp_path / "d.inter") == {"1": "Toy Story", "2": "GoldenEye"}
    assert read_titles(tmp_path / "other.csv") == {}
